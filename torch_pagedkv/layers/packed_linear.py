"""Linear layers on the CPU with their weights packed once for oneDNN.

aten's CPU linear multiplies by the weight in its plain [out, in] layout on every call.
oneDNN can reorder a weight once into the blocked layout its GEMM kernels read, and
then each call skips that work. Measured on a 2-core AVX2 EPYC (benchmarks/RESULTS.md,
"Packed linear weights"): float32 decode-sized products of the large weights (2-64
rows; the vocabulary projection, the MLP) run 1.3-5.9x faster, prefill-sized ones no
faster, so float32 is packed for the former only.

bfloat16 and float16 gain most: a CPU without bf16/fp16 dot-product instructions (no
AVX512-BF16, AMX or AVX-NE-CONVERT, e.g. any AVX2 machine) runs aten's half-precision
GEMM 5-7x slower than its float32 one, and oneDNN refuses to pack a bf16 weight there.
On such a CPU the packed weight is float32 (converted once) and the input is upcast per
call. aten's kernel also accumulates a half-precision product in float32 and rounds once,
so the values agree with aten's (all but ~0.1% of elements bit for bit; the rest one
rounding step apart, from the summation order). float32 runs packed only for
products of up to a row count that the CPU tuning table holds per weight shape
(cpu_tuning/policy.py; measured where it runs, default 64 rows with 2+ torch threads:
on the AVX2 machine aten's sgemm was as fast at prefill sizes, on an AVX-512 one packed
was 2.2-2.5x faster there), and so does bf16/fp16 (default: every size). The cost is memory: a float32
copy of every packed weight beside the model's own (2x a bf16 model's linear weights,
1x a float32 one's).

Use: pack_linear_weights(model) turns every nn.Linear of a CPU model into a
PackedLinear (same parameters, state_dict and repr; only forward differs), whose
forward calls the custom op pagedkv_cpu::linear (opaque to torch.compile, with a fake
impl, so a compiled graph keeps it as one call). The op finds the packed copy of the
weight it is given, packing it on first use, and packs again when the weight changed
in place (its version counter moved) or is another tensor: it never uses a stale copy.
The engine packs a CPU model's linears when it is built (LLM(pack_linear_weights=...)).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cpu_tuning import policy

HALF = (torch.bfloat16, torch.float16)
PACKABLE = (torch.float32, *HALF)


def available() -> bool:
    """oneDNN can pack linear weights in this torch build."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def native_half(dtype: torch.dtype) -> bool:
    """The CPU multiplies dtype natively (packing it as is), instead of in float32."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return getattr(cpu, "_is_amx_fp16_supported", lambda: False)()
    return True


@dataclass
class _Packed:
    ref: weakref.ref  # the weight it was packed from (identity, not just address)
    version: int  # the weight's version counter when packed
    packed: Tensor  # oneDNN's blocked copy (an mkldnn tensor)
    dtype: torch.dtype  # what the packed copy computes in


_packed: dict[int, _Packed] = {}  # id(weight) -> its packed copy
stats = {"packs": 0}  # how many times a weight was packed (tests, benchmarks)


def packable(weight: Tensor) -> bool:
    """A weight the op packs: 2-D, on the CPU, of a PACKABLE dtype, and not an
    inference tensor (it has no version counter, so an in-place change to it would go
    unseen and leave a stale packed copy)."""
    return (weight.dim() == 2 and weight.device.type == "cpu" and weight.dtype in PACKABLE
            and not weight.is_inference() and not weight.is_meta)


def packed_weight(weight: Tensor) -> _Packed:
    """The packed copy of weight, packing it when it has none or it changed since."""
    key, version = id(weight), weight._version
    entry = _packed.get(key)
    if entry is not None and entry.ref() is weight and entry.version == version:
        return entry
    dtype = weight.dtype if native_half(weight.dtype) else torch.float32
    w = weight.detach().to(dtype).contiguous()
    entry = _Packed(weakref.ref(weight, lambda _, k=key: _drop(k)), version,
                    torch.ops.mkldnn._reorder_linear_weight(w, None), dtype)
    _packed[key] = entry
    stats["packs"] += 1
    return entry


def _drop(key: int) -> None:
    entry = _packed.get(key)
    if entry is not None and entry.ref() is None:
        del _packed[key]


_lib = torch.library.Library("pagedkv_cpu", "DEF")
_lib.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear(x, weight, bias) on the CPU through weight's packed copy.

    x [..., in_features], weight [out_features, in_features], bias [out_features] or
    None, all of one dtype -> [..., out_features] in that dtype. A weight it cannot
    pack (an inference tensor, whose in-place changes nothing records; another device;
    another dtype) takes F.linear. So does a float32 one for more than
    product whose row count the CPU tuning table sends to aten (cpu_tuning.policy:
    per dtype and weight shape, measured on this CPU; by default float32 past 64 rows or
    on one thread, where aten's sgemm measured as fast on the AVX2 machine)."""
    if x.shape[-1] != weight.shape[-1]:
        raise RuntimeError(f"pagedkv_cpu::linear: x has {x.shape[-1]} features, "
                           f"expected weight's in_features {weight.shape[-1]}")
    if not packable(weight) or x.device.type != "cpu" or x.numel() == 0 or (
            not policy.linear_runs_packed(weight.dtype, weight.shape[0], weight.shape[1],
                                          x.numel() // x.shape[-1])):
        return F.linear(x, weight, bias)
    return packed_forward(x, weight, bias, packed_weight(weight))


def packed_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], entry: _Packed) -> Tensor:
    """x @ weight.T + bias through weight's packed copy entry (whatever the policy)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != entry.dtype:
        x2 = x2.to(entry.dtype)
        bias = None if bias is None else bias.to(entry.dtype)
    out = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), entry.packed,
                                             None if bias is None else bias.contiguous(),
                                             "none", [], "")
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


# A plain Library impl, not torch.library.custom_op: its Python wrappers cost ~90 us a
# call, more than a decode-sized product itself (measured, torch 2.14).
_lib.impl("linear", linear, "CPU")


@torch.library.register_fake("pagedkv_cpu::linear")
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == weight.shape[-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Linear):
    """nn.Linear whose CPU forward runs through its weight's oneDNN-packed copy; when
    autograd records (a parameter or the input requires grad), nn.Linear's own."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (
                x.requires_grad or self.weight.requires_grad
                or (self.bias is not None and self.bias.requires_grad))):
            return F.linear(x, self.weight, self.bias)  # the op has no backward
        return torch.ops.pagedkv_cpu.linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Make every plain nn.Linear of model on the CPU (float32, bfloat16 or float16) a
    PackedLinear and pack its weight now (not on the first step), unless its weight is
    an inference tensor (see packable). Subclasses of nn.Linear keep their own forward.
    Returns how many layers run packed; 0 when oneDNN cannot pack here."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is PackedLinear:
            if packable(module.weight):
                module.__class__ = PackedLinear
                packed_weight(module.weight)
                n += 1
    return n
