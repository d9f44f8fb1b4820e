"""Megatron-style sharding of a model's layers across the ranks of a process group.

Every rank builds the full model, then keeps its slice of each layer:
- column-parallel (q/k/v, gate/up): the rank keeps some output rows of the weight (and
  bias), so it computes its own heads / MLP columns, no communication;
- row-parallel (o, down): the rank keeps the matching input columns, and the partial
  outputs are summed across ranks with one all-reduce (the bias added once, after it).
Two all-reduces per layer. Query heads split evenly; KV heads too when the rank count
divides them, else each KV head is replicated on the ranks whose query heads read it
(vLLM's rule: tensor_parallel_size a multiple of num_kv_heads). Each rank's KV cache
then holds its own KV heads only. The embedding stays replicated (a row lookup, no
matmul). The lm_head, by PAGEDKV_TP_LM_HEAD: "vocab" (default) splits the vocabulary,
each rank computes its share of the sampled rows' logits and one all-gather joins them;
"replicated" keeps it whole on every rank (benchmarks/RESULTS.md compares the two).

TinyLlama's fused qkv and gate_up projections are sliced per part. A Hugging Face model
is sharded by transformers' own `base_model_tp_plan` ("colwise" / "rowwise" per module
pattern): its attention reshapes with -1 heads, so sliced projections just work.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Shard:
    """This rank's place: rank `rank` of `world`, all-reducing over `group`."""

    rank: int
    world: int
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    def heads(self, num_heads: int) -> range:
        """The query heads this rank computes."""
        per = num_heads // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, num_kv_heads: int) -> range:
        """The KV heads this rank keeps: its share, or the one head its query heads
        read when there are fewer KV heads than ranks (replicated)."""
        if num_kv_heads >= self.world:
            per = num_kv_heads // self.world
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank * num_kv_heads // self.world
        return range(head, head + 1)

    def part(self, size: int) -> range:
        """This rank's even share of `size` columns (MLP intermediate)."""
        per = size // self.world
        return range(self.rank * per, (self.rank + 1) * per)


def check_divisible(world: int, num_heads: int, num_kv_heads: int,
                    intermediate_size: int) -> None:
    """ValueError unless `world` ranks can share the heads and MLP columns evenly."""
    if num_heads % world:
        raise ValueError(f"tensor_parallel_size={world} must divide the model's "
                         f"{num_heads} attention heads")
    if num_kv_heads % world and world % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={world} must divide the model's "
                         f"{num_kv_heads} KV heads or be a multiple of them (replicated KV)")
    if intermediate_size % world:
        raise ValueError(f"tensor_parallel_size={world} must divide the model's MLP "
                         f"intermediate size {intermediate_size}")


def head_rows(heads: range, head_size: int, offset: int = 0) -> Tensor:
    """Weight rows (or columns) of `heads`, each head_size wide, after `offset`."""
    return torch.arange(heads.start * head_size, heads.stop * head_size) + offset


def column_parallel(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """`linear` keeping only output rows `rows` (in place)."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows), requires_grad=False)
    linear.out_features = rows.numel()
    return linear


class RowParallelLinear(nn.Module):
    """y = all_reduce(x @ W[:, cols].T) + b: the rank's input columns, summed over ranks."""

    def __init__(self, linear: nn.Linear, cols: Tensor, group: Any) -> None:
        super().__init__()
        cols = cols.to(linear.weight.device)
        self.weight = nn.Parameter(linear.weight.index_select(1, cols), requires_grad=False)
        self.bias = linear.bias
        self.group = group
        self.in_features, self.out_features = cols.numel(), linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (this rank's), out_features={self.out_features}"


# torch 2.14 renamed all_gather_into_tensor (deprecated there); older ones lack the name.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class VocabParallelLinear(nn.Module):
    """logits = all_gather(x @ W[rows].T): each rank its share of the vocabulary (the
    last share padded with zero rows, cut off after the gather)."""

    def __init__(self, linear: nn.Linear, shard: Shard) -> None:
        super().__init__()
        vocab = linear.out_features
        per = -(-vocab // shard.world)
        rows = torch.arange(shard.rank * per, min(vocab, (shard.rank + 1) * per),
                            device=linear.weight.device)

        def share(t: Tensor) -> Tensor:
            part = t.index_select(0, rows)
            pad = part.new_zeros((per - rows.numel(), *part.shape[1:]))
            return nn.Parameter(torch.cat([part, pad]), requires_grad=False)

        self.weight = share(linear.weight)
        self.bias = None if linear.bias is None else share(linear.bias)
        self.group, self.world = shard.group, shard.world
        self.in_features, self.out_features = linear.in_features, vocab

    def forward(self, x: Tensor) -> Tensor:
        local = F.linear(x, self.weight, self.bias)  # [n, per]
        parts = local.new_empty((self.world * local.shape[0], local.shape[1]))
        all_gather(parts, local, group=self.group)
        full = parts.view(self.world, *local.shape).permute(1, 0, 2).flatten(1)
        return full[:, :self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (split)"


LM_HEAD_MODES = ("vocab", "replicated")


def lm_head_mode() -> str:
    """PAGEDKV_TP_LM_HEAD: how the lm_head is sharded (module docstring)."""
    mode = os.environ.get("PAGEDKV_TP_LM_HEAD", "vocab")
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"PAGEDKV_TP_LM_HEAD must be one of {LM_HEAD_MODES}, got {mode!r}")
    return mode


# ------------------------------------------------------------------ TinyLlama
def shard_tiny_llama(model: nn.Module, shard: Shard) -> None:
    """Shard models.llama.TinyLlama in place."""
    cfg = model.config
    check_divisible(shard.world, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
    d = cfg.head_size
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    q, kv = shard.heads(cfg.num_heads), shard.kv_heads(cfg.num_kv_heads)
    mlp = shard.part(cfg.intermediate_size)
    qkv_rows = torch.cat([head_rows(q, d), head_rows(kv, d, q_size),
                          head_rows(kv, d, q_size + kv_size)])
    mlp_cols = head_rows(mlp, 1)
    for layer in model.layers:
        attn = layer.self_attn
        column_parallel(attn.qkv_proj, qkv_rows)
        attn.o_proj = RowParallelLinear(attn.o_proj, head_rows(q, d), shard.group)
        attn.num_heads, attn.num_kv_heads = len(q), len(kv)
        attn.q_size, attn.kv_size = len(q) * d, len(kv) * d
        attn.attn.num_heads, attn.attn.num_kv_heads = len(q), len(kv)
        column_parallel(layer.mlp.gate_up_proj,
                        torch.cat([mlp_cols, mlp_cols + cfg.intermediate_size]))
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, mlp_cols, shard.group)
    if lm_head_mode() == "vocab":
        model.lm_head = VocabParallelLinear(model.lm_head, shard)
    model.num_kv_heads = len(kv)


# ------------------------------------------------------------------ Hugging Face
SUPPORTED_STYLES = ("colwise", "rowwise")


def hf_geometry(config) -> tuple[int, int, int, int]:
    """(num_heads, num_kv_heads, head_size, intermediate_size) of an HF config."""
    from ..integrations.hf_cache import kv_geometry, text_config
    cfg = text_config(config)
    _, kv_heads, head_size = kv_geometry(cfg)
    return cfg.num_attention_heads, kv_heads, head_size, cfg.intermediate_size


def tp_plan(config) -> dict[str, str]:
    """transformers' tensor-parallel plan of the model's base model, checked."""
    from ..integrations.hf_cache import text_config
    plan = dict(getattr(text_config(config), "base_model_tp_plan", None) or {})
    if not plan:
        raise ValueError(f"{type(config).__name__} has no base_model_tp_plan: transformers "
                         "does not say how to shard it, so tensor_parallel_size must be 1")
    odd = sorted({s for s in plan.values() if s not in SUPPORTED_STYLES})
    if odd:
        raise ValueError(f"{type(config).__name__}'s tp_plan uses {odd}; tensor parallelism "
                         f"here implements {' and '.join(SUPPORTED_STYLES)} only")
    return plan


def shard_hf_model(paged_model: nn.Module, shard: Shard) -> None:
    """Shard an integrations.hf_model.HFPagedModel in place, module by module as
    transformers' base_model_tp_plan says: projections named k_proj / v_proj keep this
    rank's KV heads, q_proj and o_proj its query heads, the others an even share."""
    hf = paged_model.hf_model
    num_heads, num_kv, d, inter = hf_geometry(hf.config)
    check_divisible(shard.world, num_heads, num_kv, inter)
    q, kv = shard.heads(num_heads), shard.kv_heads(num_kv)
    patterns = [(re.compile(re.escape(p).replace(r"\*", r"\d+") + "$"), style)
                for p, style in tp_plan(hf.config).items()]
    base = hf.base_model
    for name, module in list(base.named_modules()):
        style = next((s for pat, s in patterns if pat.match(name)), None)
        if style is None:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"tp_plan marks {name} {style}, but it is a "
                             f"{type(module).__name__}, not a Linear")
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "v_proj"):
            index = head_rows(kv, d)
        elif leaf in ("q_proj", "o_proj"):
            index = head_rows(q, d)
        else:
            size = module.out_features if style == "colwise" else module.in_features
            index = head_rows(shard.part(size), 1)
        if style == "colwise":
            column_parallel(module, index)
        else:
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            setattr(parent, leaf, RowParallelLinear(module, index, shard.group))
    for module in base.modules():
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = len(q) // len(kv)
    head = hf.get_output_embeddings()
    if lm_head_mode() == "vocab" and isinstance(head, nn.Linear):
        hf.set_output_embeddings(VocabParallelLinear(head, shard))
    paged_model.num_kv_heads = len(kv)


def shard_model(model: nn.Module, shard: Shard) -> None:
    """Shard a TinyLlama or an HFPagedModel in place for `shard`."""
    from ..integrations.hf_model import HFPagedModel
    from ..models.llama import TinyLlama
    if isinstance(model, TinyLlama):
        shard_tiny_llama(model, shard)
    elif isinstance(model, HFPagedModel):
        shard_hf_model(model, shard)
    else:
        raise ValueError(f"tensor parallelism shards TinyLlama and Hugging Face models with "
                         f"a tp_plan, got {type(model).__name__}")


def model_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, intermediate_size) of a TinyLlama or an HFPagedModel
    (before sharding), for check_divisible."""
    cfg = getattr(model, "config", None)
    if hasattr(model, "hf_model"):
        heads, kv, _, inter = hf_geometry(model.hf_model.config)
        return heads, kv, inter
    if cfg is not None and hasattr(cfg, "num_heads"):
        return cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    raise ValueError(f"tensor parallelism shards TinyLlama and Hugging Face models with a "
                     f"tp_plan, got {type(model).__name__}")
