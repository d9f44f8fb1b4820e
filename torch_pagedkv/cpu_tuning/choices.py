"""Every CPU-side performance choice, its documented default, and the context it is
measured for (docs/design.md, "CPU tuning", lists them with where each default came from).

A choice only picks how the work is done (which GEMM path, how attention work is tiled
and threaded, whether a shared prefix runs as cascade): outputs are the same up to float
rounding order. Each kind of choice is measured and stored per context, a string key:

    linear/<dtype>/<out>x<in>                     one weight shape of one dtype
    attention/<cache dtype>/<heads>x<kv heads>x<head size>/b<block size>
    cascade/<cache dtype>/<heads>x<kv heads>x<head size>/b<block size>
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Union

import torch

# LinearChoice.packed_max_rows meaning "every row count".
ALL_ROWS = 1 << 30
ISA_VARIANTS = ("auto", "avx2", "avx512", "avx512_bf16")


class ChoiceError(ValueError):
    """A stored choice that does not follow its format."""


@dataclass(frozen=True)
class LinearChoice:
    """A CPU nn.Linear product of packed_min_rows to packed_max_rows rows runs through
    oneDNN's packed weight (layers/packed_linear.py), any other through aten's F.linear;
    packed_max_rows 0: never packed, ALL_ROWS: no upper limit. (A lower limit too: on the
    AVX2 machine a one-row product of a small weight is faster in aten, 4-64 rows packed.)"""
    packed_max_rows: int
    packed_min_rows: int = 1

    def check(self) -> None:
        if not 0 <= self.packed_max_rows <= ALL_ROWS:
            raise ChoiceError(f"packed_max_rows must be in [0, {ALL_ROWS}], "
                              f"got {self.packed_max_rows}")
        if not 1 <= self.packed_min_rows <= ALL_ROWS:
            raise ChoiceError(f"packed_min_rows must be in [1, {ALL_ROWS}], "
                              f"got {self.packed_min_rows}")

    def packs(self, rows: int) -> bool:
        return self.packed_min_rows <= rows <= self.packed_max_rows


@dataclass(frozen=True)
class AttentionChoice:
    """The CPU attention kernels' variant and work tiling (csrc/cpu/attention.cpp
    plan_items; torch_pagedkv.knobs names each): which ISA variant runs, query vectors per
    kv head in a decode-style work item (a causal prefill under a sliding window; the
    shortest tile a prefill is split to), query vectors per decode item across kv heads,
    query vectors per kv head in a matrix-style tile (a shared prefix's causal=False pass,
    and causal prefill without a sliding window), and the query-key product count up to
    which a call stays on the calling thread."""
    isa: str = "auto"
    vectors_per_head: int = 32
    vectors_per_item: int = 64
    prefix_vectors_per_head: int = 256
    serial_products: int = 2048

    def check(self) -> None:
        allowed = {"isa": ISA_VARIANTS, "vectors_per_head": (8, 16, 32, 64, 128),
                   "vectors_per_item": (16, 32, 64, 128, 256),
                   "prefix_vectors_per_head": (64, 128, 256, 512),
                   "serial_products": (0, 512, 2048, 8192, 32768)}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ChoiceError(f"{name} must be one of {values}, got {getattr(self, name)!r}")

    def knobs(self) -> dict[str, str]:
        """The kernel knobs (torch_pagedkv.knobs) that put this choice in force."""
        return {"cpu_isa": self.isa, "cpu_vectors_per_head": str(self.vectors_per_head),
                "cpu_vectors_per_item": str(self.vectors_per_item),
                "cpu_prefix_vectors_per_head": str(self.prefix_vectors_per_head),
                "cpu_serial_products": str(self.serial_products)}


@dataclass(frozen=True)
class CascadeChoice:
    """LLM(enable_cascade=None) plans cascade attention for a group of at least min_seqs
    running sequences sharing at least min_shared_tokens tokens of full blocks;
    min_seqs = NEVER_SEQS: never.

    The default, measured on the 2-core AVX2 EPYC (benchmarks/RESULTS.md, "Cascade
    attention", threshold sweep: one decode step of N sequences sharing P tokens, 100-200
    own tokens each, 32/8 heads, head 128, block 16, 2 threads): with N >= 16 and P >= 256
    cascade was 1.04-1.39x faster in bf16; fp32 broke even at P = 256 and gained 1.02-1.56x
    from P = 512; with N <= 8 or P <= 128 it lost (0.68-1.01x): two passes, two row
    gathers and the merge cost more than the prefix re-reads, which the plain kernel finds
    in L3."""
    min_seqs: int = 16
    min_shared_tokens: int = 256

    def check(self) -> None:
        if self.min_seqs < 2 or self.min_shared_tokens < 1:
            raise ChoiceError(f"min_seqs must be >= 2 and min_shared_tokens >= 1, got "
                              f"{self.min_seqs} and {self.min_shared_tokens}")


NEVER_SEQS = 1 << 20
Choice = Union[LinearChoice, AttentionChoice, CascadeChoice]
KINDS: dict[str, type] = {"linear": LinearChoice, "attention": AttentionChoice,
                          "cascade": CascadeChoice}

# Where the defaults come from (measured on the 2-core AVX2 EPYC the project began on;
# benchmarks/RESULTS.md): float32 linears packed up to 64 rows with 2+ threads ("Packed
# linear weights"), bf16/fp16 always packed (aten's half GEMM 5-7x slower without bf16
# dot products); the kernels' tiling ("CPU decode: where the time goes"); cascade at 16+
# sequences sharing 256+ tokens ("Cascade attention", threshold sweep).
FLOAT32_PACKED_MAX_ROWS = 64


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def linear_context(dtype: torch.dtype, out_features: int, in_features: int) -> str:
    return f"linear/{dtype_name(dtype)}/{out_features}x{in_features}"


def attention_context(kind: str, cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                      head_size: int, block_size: int) -> str:
    """The context of an "attention" or "cascade" choice."""
    return (f"{kind}/{dtype_name(cache_dtype)}/{num_heads}x{num_kv_heads}x{head_size}"
            f"/b{block_size}")


def kind_of(context: str) -> str:
    kind = context.split("/", 1)[0]
    if kind not in KINDS:
        raise ChoiceError(f"context {context!r}: kind must be one of {sorted(KINDS)}")
    return kind


def default_for(context: str, threads: int) -> Choice:
    """The documented default of a context's choice (LLM(cpu_tuning="off") uses these)."""
    kind = kind_of(context)
    if kind == "linear":
        dtype = context.split("/")[1]
        if dtype == "float32":  # one thread: aten's sgemm measured as fast or faster
            return LinearChoice(FLOAT32_PACKED_MAX_ROWS if threads > 1 else 0)
        return LinearChoice(ALL_ROWS)
    return KINDS[kind]()


def choice_to_json(choice: Choice) -> dict:
    return asdict(choice)


def choice_from_json(context: str, raw: object) -> Choice:
    """The choice stored for context; ChoiceError when raw does not follow its format."""
    cls = KINDS[kind_of(context)]
    names = {f.name: f.type for f in fields(cls)}
    if not isinstance(raw, dict) or set(raw) != set(names):
        raise ChoiceError(f"{context}: choice must have exactly the fields {sorted(names)}, "
                          f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    for name, value in raw.items():
        want = str if names[name] == "str" else int
        if type(value) is not want:
            raise ChoiceError(f"{context}: {name} must be {want.__name__}, got {value!r}")
    choice = cls(**raw)
    choice.check()
    return choice
