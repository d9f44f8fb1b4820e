"""The emulator against the GPU (scripts/gpu_check.sh): the same fixed inputs through the
CUDA kernels on the device (torch.ops.pagedkv on cuda tensors) and on the SIMT emulator
(torch_pagedkv.emulation on CPU copies), the largest difference per op, and an exhaustive
fp8 comparison: every bfloat16 value quantized to e4m3fn and e5m2 by reshape_and_cache, and
every fp8 byte dequantized by paged_attention (one visible key: out = v * v_scale), byte
for byte and bit for bit. Where the emulator and the device differ, the emulator is wrong
(or a case is order-dependent): the report says which.

    python scripts/simt_vs_device.py                      # on a GPU machine
    python scripts/simt_vs_device.py --against reference  # here: the emulator vs the reference
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import torch_pagedkv as pk  # noqa: E402
from torch_pagedkv import emulation, knobs, reference  # noqa: E402
from paged_inputs import make_batch  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


class Target:
    """Runs an op where the comparison needs it: the device, or the reference on the CPU."""

    def __init__(self, kind: str):
        self.kind = kind
        self.device = "cuda" if kind == "device" else "cpu"
        self.ops = pk if kind == "device" else reference

    def to(self, x):
        return x.to(self.device) if torch.is_tensor(x) else x


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().float(), b.detach().cpu().float()
    both_nan = a.isnan() & b.isnan()
    same_inf = (a == b) & a.isinf()
    d = (a - b).abs().masked_fill(both_nan | same_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def attention_cases(target: Target) -> dict[str, float]:
    out = {}
    cases = {
        "decode f32": ([(1, 300), (1, 7), (1, 1030)], torch.float32, None, "auto"),
        "decode bf16 16 splits": ([(1, 2100), (1, 64)], torch.bfloat16, None, "auto"),
        "prefill f16 over a cached prefix": ([(40, 300), (7, 7)], torch.float16, None, "auto"),
        "mixed bf16/e4m3": ([(1, 900), (33, 200), (0, 5), (1, 1)], torch.bfloat16,
                            torch.float8_e4m3fn, "auto"),
        "mixed f32/e5m2 forced prefill": ([(1, 900), (9, 90)], torch.float32, torch.float8_e5m2,
                                          "prefill"),
    }
    for name, (seqs, dtype, cache, path) in cases.items():
        b = make_batch(seqs, 16, 4, 128, 16, dtype, cache, seed=5)
        args = [*b.attention_args(), 128 ** -0.5]
        kw = dict(k_scale=b.k_scale, v_scale=b.v_scale, sliding_window=-1, softcap=0.0)
        splits = "16" if "splits" in name else "auto"
        with knobs.override(attention_path=path, decode_splits=splits):
            emu, emu_lse = emulation.paged_attention_lse(*args, **kw)
            dev, dev_lse = target.ops.paged_attention_lse(*map(target.to, args),
                                                          **{k: target.to(v) for k, v in kw.items()})
        out[f"paged_attention_lse {name}: out"] = max_diff(emu, dev)
        out[f"paged_attention_lse {name}: lse"] = max_diff(emu_lse, dev_lse)
    g = torch.Generator().manual_seed(0)
    a, bb = torch.randn(50, 4, 64, generator=g), torch.randn(50, 4, 64, generator=g).bfloat16()
    la, lb = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    la[::5] = -math.inf
    emu = emulation.merge_attn_states(a, la, bb, lb)
    dev = target.ops.merge_attn_states(*map(target.to, (a, la, bb, lb)))
    out["merge_attn_states f32+bf16: out"] = max_diff(emu[0], dev[0])
    out["merge_attn_states f32+bf16: lse"] = max_diff(emu[1], dev[1])
    return out


def cache_cases(target: Target) -> dict[str, float]:
    out = {}
    g = torch.Generator().manual_seed(1)
    for cache in [torch.float32, torch.bfloat16] + FP8:
        src = torch.float32 if cache in FP8 else cache
        k = (torch.randn(70, 4, 64, generator=g) * 200).to(src)
        v = torch.randn(70, 4, 64, generator=g).to(src)
        slots = torch.randperm(10 * 16, generator=g)[:70]
        slots[::9] = -1
        scales = (torch.tensor([0.7]), torch.tensor([1.3])) if cache in FP8 else (None, None)
        kc, vc = torch.zeros(10, 16, 4, 64, dtype=cache), torch.zeros(10, 16, 4, 64, dtype=cache)
        ekc, evc, dkc, dvc = kc.clone(), vc.clone(), target.to(kc.clone()), target.to(vc.clone())
        emulation.reshape_and_cache(k, v, ekc, evc, slots, *scales)
        target.ops.reshape_and_cache(*map(target.to, (k, v)), dkc, dvc, target.to(slots),
                                     *map(target.to, scales))
        name = str(cache).removeprefix("torch.")
        out[f"reshape_and_cache {name}: differing bytes"] = float(
            (ekc.view(torch.uint8) != dkc.cpu().view(torch.uint8)).sum()
            + (evc.view(torch.uint8) != dvc.cpu().view(torch.uint8)).sum())
    mapping = torch.tensor([[0, 5], [3, 7], [3, 9], [8, 1]])
    layers = [torch.randn(10, 16, 2, 64, generator=g) for _ in range(4)]
    emu_layers = [x.clone() for x in layers]
    dev_layers = [target.to(x.clone()) for x in layers]
    emulation.copy_blocks(emu_layers[:2], emu_layers[2:], mapping)
    target.ops.copy_blocks(dev_layers[:2], dev_layers[2:], target.to(mapping))
    out["copy_blocks: max diff"] = max(max_diff(a, b) for a, b in zip(emu_layers, dev_layers))
    src, dst = torch.randn(12, 16, 2, 64, generator=g), torch.randn(11, 16, 2, 64, generator=g)
    edst, ddst = dst.clone(), target.to(dst.clone())
    emulation.swap_blocks(src, edst, mapping)
    target.ops.swap_blocks(target.to(src), ddst, target.to(mapping))
    out["swap_blocks: max diff"] = max_diff(edst, ddst)
    return out


def fp8_exhaustive(target: Target) -> dict[str, float]:
    """Every bf16 bit pattern through the quantizer; every fp8 byte through the dequantizer."""
    out = {}
    bf16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = bf16.float().view(256, 1, 256)
    slots = torch.arange(256)
    for cache in FP8:
        name = str(cache).removeprefix("torch.")
        one = torch.tensor([1.0])
        ek = torch.zeros(256, 1, 1, 256, dtype=cache)
        dk = target.to(ek.clone())
        emulation.reshape_and_cache(values, values, ek, ek.clone(), slots, one, one)
        target.ops.reshape_and_cache(target.to(values), target.to(values), dk, dk.clone(),
                                     target.to(slots), target.to(one), target.to(one))
        out[f"quantize all 65536 bf16 -> {name}: differing bytes"] = float(
            (ek.view(torch.uint8) != dk.cpu().view(torch.uint8)).sum())
        # Dequantize: one cache row holding the 256 byte values, one key visible.
        vc = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(cache).view(1, 1, 1, 256)
        kc = torch.zeros(1, 1, 1, 256, dtype=cache)
        q = torch.randn(1, 1, 256)
        args = (q, kc, vc, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                torch.tensor([0, 1], dtype=torch.int32), 1.0)
        emu = emulation.paged_attention(*args, k_scale=one, v_scale=one)
        dev = target.ops.paged_attention(*map(target.to, args), k_scale=target.to(one),
                                         v_scale=target.to(one))
        e, d = emu.view(-1), dev.cpu().view(-1)
        # Equal values (+0 == -0: the P.V accumulation starts at +0, so a -0 byte reads +0),
        # or both NaN.
        same = (e == d) | (e.isnan() & d.isnan())
        out[f"dequantize all 256 {name} bytes: differing values"] = float((~same).sum())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", choices=["device", "reference"], default="device")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.against == "device" and not torch.cuda.is_available():
        print("simt_vs_device: no CUDA device: use --against reference")
        return 2
    target = Target(args.against)
    results = {**attention_cases(target), **cache_cases(target), **fp8_exhaustive(target)}
    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:{width}s}  {v:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
