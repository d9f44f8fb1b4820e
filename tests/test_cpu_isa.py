"""The CPU kernels' ISA variants and tiling knobs (csrc/cpu/isa.h, csrc/knobs.h).

Every compiled variant this CPU runs matches the reference (decode, prefill over a cached
prefix, causal=False lse, GQA, float32/float16/bfloat16 and fp8 caches, a head size that
is not a multiple of 16, the cache writes); one it cannot run is skipped naming the CPU
flags it lacks, and selecting it is refused in the knob's voice. The tiling knobs change
the plan, never the result beyond rounding. And the library is safe on an AVX2 CPU: no
function outside the AVX-512 variants' namespaces holds an AVX-512 instruction (the
linker keeps one copy of each inline function, so link order decides which).
"""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import torch_pagedkv as pk
from torch_pagedkv import knobs, reference
from torch_pagedkv._load import LIBRARY_PATH
from paged_inputs import ATOL, make_batch

INFO = knobs.cpu_isa_info()
DECODE = [(1, 37), (1, 100), (1, 1), (1, 64), (1, 17)]
PREFILL = [(17, 50), (5, 5), (3, 100), (0, 20), (33, 33)]  # over cached prefixes
PREFIX_PASS = [(7, 37), (40, 20), (0, 5), (64, 48)]  # causal=False: all keys per row


def variant(name: str) -> str:
    """Skips (never drops) a compiled variant this CPU cannot run."""
    if name not in INFO["runnable"]:
        pytest.skip(f"this CPU cannot run {name}: it lacks {' '.join(INFO['missing'][name])}")
    return name


def test_info_lists_compiled_runnable_and_active():
    assert INFO["compiled"], INFO
    assert set(INFO["runnable"]) <= set(INFO["compiled"])
    with knobs.override(cpu_isa="auto"):
        auto = knobs.cpu_isa_info()["active"]
    assert auto == INFO["runnable"][-1]  # the widest this CPU runs (listed narrowest first)
    for name in INFO["runnable"]:
        with knobs.override(cpu_isa=name):
            assert knobs.cpu_isa_info()["active"] == name


@pytest.mark.parametrize("name", INFO["compiled"])
def test_a_variant_this_cpu_cannot_run_is_refused(name):
    if name in INFO["runnable"]:
        pytest.skip(f"this CPU runs {name}")
    before = knobs.cpu_isa_info()["active"]
    flags = " ".join(INFO["missing"][name])
    with pytest.raises(RuntimeError, match=re.escape(f"cpu_isa={name}") + ".*" + re.escape(flags)):
        knobs.set_knob("cpu_isa", name)
    assert knobs.cpu_isa_info()["active"] == before  # nothing changed


ENV_ISA = """
import torch, torch_pagedkv as pk
q = torch.randn(1, 2, 64); kc = torch.randn(1, 16, 2, 64)
try:
    pk.paged_attention(q, kc, kc, torch.zeros(1, 1, dtype=torch.int32),
                       torch.tensor([3], dtype=torch.int32),
                       torch.tensor([0, 1], dtype=torch.int32), 0.125)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""


@pytest.mark.parametrize("name", INFO["compiled"])
def test_the_env_var_naming_a_variant_this_cpu_cannot_run_fails_at_the_first_op(name):
    if name in INFO["runnable"]:
        pytest.skip(f"this CPU runs {name}")
    run = subprocess.run([sys.executable, "-c", ENV_ISA], capture_output=True, text=True,
                         env={**os.environ, "PAGEDKV_CPU_ISA": name})
    assert run.returncode == 0, run.stderr
    assert f"cpu_isa={name} (PAGEDKV_CPU_ISA) cannot run on this CPU" in run.stdout
    assert " ".join(INFO["missing"][name]) in run.stdout


def check_attention(batch, dtype, causal, lse):
    scale = 1.0 / math.sqrt(batch.query.shape[-1])
    kw = {"k_scale": batch.k_scale, "v_scale": batch.v_scale}
    args = batch.attention_args()
    if lse:
        out, got_lse = pk.paged_attention_lse(*args, scale, causal=causal, **kw)
        ref, ref_lse = reference.paged_attention_lse(*args, scale, causal=causal, **kw)
        seen = ref_lse != -math.inf
        torch.testing.assert_close(got_lse[seen], ref_lse[seen], atol=2e-3, rtol=0)
    else:
        out = pk.paged_attention(*args, scale, **kw)
        ref = reference.paged_attention(*args, scale, **kw)
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("name", INFO["compiled"])
@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
    (torch.bfloat16, torch.float8_e4m3fn), (torch.float32, torch.float8_e5m2)])
@pytest.mark.parametrize("head_size", [128, 40])
@pytest.mark.parametrize("pass_", ["decode", "prefill", "prefill_lse", "prefix_lse"])
def test_each_runnable_variant_matches_the_reference(name, dtype, cache_dtype, head_size,
                                                     pass_):
    seqs = {"decode": DECODE, "prefill": PREFILL, "prefill_lse": PREFILL,
            "prefix_lse": PREFIX_PASS}[pass_]
    batch = make_batch(seqs, 8, 2, head_size, 16, dtype, cache_dtype, seed=head_size)
    with knobs.override(cpu_isa=variant(name)):
        check_attention(batch, dtype, causal=pass_ != "prefix_lse", lse=pass_.endswith("lse"))


@pytest.mark.parametrize("name", INFO["compiled"])
@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, None), (torch.bfloat16, None), (torch.float16, torch.float8_e4m3fn),
    (torch.bfloat16, torch.float8_e5m2), (torch.float32, torch.float8_e4m3fn)])
@pytest.mark.parametrize("head_size", [128, 40])
def test_each_runnable_variant_writes_the_cache_exactly(name, dtype, cache_dtype, head_size):
    gen = torch.Generator().manual_seed(head_size)
    cache_dtype = cache_dtype or dtype
    fp8 = cache_dtype not in (torch.float32, torch.float16, torch.bfloat16)
    key = (torch.randn(29, 2, head_size, generator=gen) * 3).to(dtype)
    value = torch.randn(29, 2, head_size, generator=gen).to(dtype)
    slots = torch.randperm(8 * 16, generator=gen)[:29]
    slots[3] = -1
    scales = (torch.tensor([0.37]), torch.tensor([1.9])) if fp8 else (None, None)
    got = [torch.zeros(8, 16, 2, head_size, dtype=cache_dtype) for _ in range(2)]
    want = [torch.zeros(8, 16, 2, head_size, dtype=cache_dtype) for _ in range(2)]
    with knobs.override(cpu_isa=variant(name)):
        pk.reshape_and_cache(key, value, *got, slots, *scales)
    reference.reshape_and_cache(key, value, *want, slots, *scales)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))


# ---- the tiling knobs ----

TILING = {"cpu_vectors_per_head": ["32", "8", "16", "64", "128"],
          "cpu_vectors_per_item": ["64", "16", "32", "128", "256"],
          "cpu_prefix_vectors_per_head": ["256", "64", "128", "512"],
          "cpu_serial_products": ["2048", "0", "512", "8192", "32768"]}


def plan(seqs, num_heads, num_kv_heads, causal=True, window=-1):
    seq_lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor([q for q, _ in seqs]).cumsum(0).tolist(),
                       dtype=torch.int32)
    return torch.ops.pagedkv._cpu_attention_plan(seq_lens, qsl, num_heads, num_kv_heads, window,
                                                 causal)


def test_the_knobs_list_the_tiling_defaults_first():
    for name, values in TILING.items():
        assert name in knobs.KNOBS
        first = knobs.set_knob(name, values[0])
        assert first == values[0] or "PAGEDKV_" + name.upper() in os.environ
        knobs.set_knob(name, first)


@pytest.mark.parametrize("name", list(TILING))
def test_bad_tiling_values_are_refused(name):
    with pytest.raises(RuntimeError, match=re.escape(
            f"_set_knob: value of {name} must be one of {', '.join(TILING[name])}, got '48'")):
        knobs.set_knob(name, "48")


@pytest.mark.parametrize("name,seqs,num_heads,num_kv_heads,causal,window", [
    # one long causal prefill under a sliding window (the decode-style tiles)
    ("cpu_vectors_per_head", [(256, 256)], 4, 1, True, 64),
    ("cpu_vectors_per_item", [(1, 300)] * 16, 256, 32, True, -1),  # a decode batch
    ("cpu_prefix_vectors_per_head", [(512, 300)], 4, 1, False, -1),  # one tall shared prefix
    # one long causal prefill without a window: matrix-style tiles too
    ("cpu_prefix_vectors_per_head", [(1024, 1024)], 4, 1, True, -1),
])
def test_each_tiling_value_changes_the_plan(name, seqs, num_heads, num_kv_heads, causal,
                                            window):
    counts = {}
    for value in TILING[name]:
        with knobs.override(**{name: value}):
            counts[value] = plan(seqs, num_heads, num_kv_heads, causal, window)[0]  # items
    assert len(set(counts.values())) == len(counts), counts


def test_serial_products_decides_the_calling_thread():
    if torch.get_num_threads() == 1:
        pytest.skip("one thread: every call runs on the calling thread")
    _, products, _ = plan([(1, 16)], 32, 8)  # 512 query-key products
    assert products == 512
    for value in TILING["cpu_serial_products"]:
        with knobs.override(cpu_serial_products=value):
            assert plan([(1, 16)], 32, 8)[2] == (products <= int(value))


@pytest.mark.parametrize("name", list(TILING))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiling_values_change_only_the_rounding(name, dtype):
    gen = torch.Generator().manual_seed(7)
    seqs = [(int(q), int(q) + int(c)) for q, c in
            zip(torch.randint(1, 70, (5,), generator=gen), torch.randint(0, 90, (5,), generator=gen))]
    seqs += [(1, 200)] * 6
    batch = make_batch(seqs, 8, 2, 72, 16, dtype, seed=3)
    prefix = make_batch(PREFIX_PASS, 8, 2, 72, 16, dtype, seed=4)
    scale = 1.0 / math.sqrt(72)

    def run():
        return (pk.paged_attention(*batch.attention_args(), scale),
                *pk.paged_attention_lse(*prefix.attention_args(), scale, causal=False))

    with knobs.override(**{name: TILING[name][0]}):
        base = run()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]  # bf16: the output's rounding
    for value in TILING[name][1:]:
        with knobs.override(**{name: value}):
            for got, want in zip(run(), base):
                torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=0)


ENV_TILING = """
import torch
from torch_pagedkv import knobs
print(knobs.set_knob("cpu_vectors_per_head", "32"), knobs.set_knob("cpu_serial_products", "2048"))
"""


def test_the_tiling_env_vars_are_read():
    env = {**os.environ, "PAGEDKV_CPU_VECTORS_PER_HEAD": "8", "PAGEDKV_CPU_SERIAL_PRODUCTS": "0"}
    run = subprocess.run([sys.executable, "-c", ENV_TILING], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["8", "0"]


# ---- no AVX-512 instruction outside the AVX-512 variants ----

# A function belongs to an AVX-512 variant when its name (demangled, or mangled where
# objdump leaves an OpenMP outline's name as is) holds the variant's namespace, ours or
# ATen's capability namespace (its template arguments count: no other object can emit a
# function of that name).
VARIANT_NAME = re.compile(r"pagedkv::cpu::avx512(_bf16)?::|at::vec::AVX512(_BF16)?::"
                          r"|7pagedkv3cpu(6avx512|11avx512_bf16)|2at3vec(6AVX512|11AVX512_BF16)")
AVX512_OPERAND = re.compile(r"%zmm\d|%k[1-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def avx512_outside_variants(disassembly: str) -> dict[str, str]:
    """Function -> its first AVX-512 instruction, for every function of an
    `objdump -d --no-show-raw-insn -C` listing outside the AVX-512 variants."""
    found: dict[str, str] = {}
    name = None
    for line in disassembly.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
        elif name and AVX512_OPERAND.search(line) and not VARIANT_NAME.search(name):
            found.setdefault(name, line.strip())
    return found


SYNTHETIC = """
0000000000001000 <c10::BFloat16::operator float() const>:
    1000:	vmovups %ymm0,(%rdi)
    1004:	ret
0000000000002000 <pagedkv::cpu::avx512::attention_float(pagedkv::cpu::AttnArgs const&)>:
    2000:	vfmadd231ps %zmm1,%zmm2,%zmm0
0000000000003000 <_ZN2at8internal15invoke_parallelIZN7pagedkv3cpu11avx512_bf16Ev._omp_fn.0>:
    3000:	kmovw %k1,%eax
0000000000004000 <std::vector<float, std::allocator<float> >::_M_default_append(unsigned long)>:
    4000:	vmovdqu64 %zmm0,(%rax)
0000000000005000 <at::vec::AVX2::Vectorized<float>::exp() const>:
    5000:	vblendmps %ymm17,%ymm1,%ymm2{%k2}
0000000000006000 <c10::Half::operator float() const>:
    6000:	vcvtph2ps %xmm15,%xmm0
"""


def test_the_checker_finds_a_planted_violation():
    found = avx512_outside_variants(SYNTHETIC)
    assert set(found) == {
        "std::vector<float, std::allocator<float> >::_M_default_append(unsigned long)",
        "at::vec::AVX2::Vectorized<float>::exp() const"}
    assert "zmm0" in found["std::vector<float, std::allocator<float> >::"
                           "_M_default_append(unsigned long)"]


@pytest.fixture(scope="module")
def disassembly() -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed: cannot disassemble the library")
    run = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", LIBRARY_PATH],
                         capture_output=True, text=True, check=True)
    return run.stdout


def test_no_avx512_instruction_outside_the_avx512_variants(disassembly):
    found = avx512_outside_variants(disassembly)
    assert not found, "AVX-512 code an AVX2 CPU may run:\n" + "\n".join(
        f"{name}: {insn}" for name, insn in list(found.items())[:20])


def test_the_avx512_variants_are_avx512_code(disassembly):
    """The variants really hold what their names say: zmm code in both AVX-512 variants,
    vdpbf16ps only in avx512_bf16 (the avx512 variant runs on CPUs without it)."""
    if "avx512" not in INFO["compiled"]:
        pytest.skip("not an x86 build")
    body: dict[str, list[str]] = {"avx2": [], "avx512": [], "avx512_bf16": []}
    name = None
    for line in disassembly.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
            ns = re.search(r"pagedkv::cpu::(avx2|avx512_bf16|avx512)::", name)
            name = ns.group(1) if ns else None
        elif name:
            body[name].append(line)
    text = {k: "\n".join(v) for k, v in body.items()}
    assert "%zmm" in text["avx512"] and "%zmm" in text["avx512_bf16"]
    assert "vdpbf16ps" in text["avx512_bf16"]
    assert "vdpbf16ps" not in text["avx512"] and "%zmm" not in text["avx2"]
