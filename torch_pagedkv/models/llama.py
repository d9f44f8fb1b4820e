"""A tiny Llama-style decoder on PagedAttention, with deterministic random weights.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention through
PagedAttention, SwiGLU MLP. QKV and gate/up are fused projections: q, k and v are
views of one matmul output (PagedAttention takes the strided value view as is).
Weights are drawn from a seeded generator, so the same config gives the same model
on any device. It implements models.base.PagedModel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.attention import PagedAttention
from ..layers.metadata import AttentionMetadata
from .base import KVCaches, KVScales


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 64
    max_position: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.1  # 0.02 makes random models repeat one token; tests then see little
    seed: int = 0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotates each head's (first half, second half) pairs by position * inv_freq."""

    def __init__(self, head_size: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1),
                             persistent=False)  # [max_position, head_size]

    def forward(self, positions: Tensor, x: Tensor) -> Tensor:
        """x [num_tokens, heads, head_size] -> rotated copy of the same shape and dtype."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_size)
        self.q_size = cfg.num_heads * cfg.head_size
        self.kv_size = cfg.num_kv_heads * cfg.head_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_size, cfg.max_position, cfg.rope_theta)
        self.attn = PagedAttention(cfg.num_heads, cfg.head_size, cfg.num_kv_heads)

    def forward(self, positions: Tensor, x: Tensor, kv_cache: tuple[Tensor, Tensor],
                metadata: AttentionMetadata, k_scale: Optional[Tensor],
                v_scale: Optional[Tensor]) -> Tensor:
        qkv = self.qkv_proj(x)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = self.rotary(positions, qk.unflatten(-1, (self.num_heads + self.num_kv_heads,
                                                      self.head_size)))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        # q, k, v are strided views (of the rotated q|k and of qkv): PagedAttention takes
        # them as they are, no copies.
        out = self.attn(q, k, v, kv_cache, metadata, k_scale, v_scale)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions, x, kv_cache, metadata, k_scale, v_scale):
        x = x + self.self_attn(positions, self.input_norm(x), kv_cache, metadata,
                               k_scale, v_scale)
        return x + self.mlp(self.post_attention_norm(x))


class TinyLlama(nn.Module):
    """Llama-style decoder implementing models.base.PagedModel."""

    def __init__(self, config: Optional[LlamaConfig] = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        cfg = config or LlamaConfig()
        if cfg.num_heads * cfg.head_size == 0 or cfg.num_heads % cfg.num_kv_heads:
            raise ValueError("num_heads must be a positive multiple of num_kv_heads")
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.num_kv_heads = cfg.num_kv_heads
        self.head_size = cfg.head_size
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.max_position = cfg.max_position
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights(cfg)
        self.to(device=device, dtype=dtype)  # rotary tables stay float32: only floats move
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.cos_sin = m.cos_sin.float()
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.no_grad()
    def _init_weights(self, cfg: LlamaConfig) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, p in self.named_parameters():  # a fixed order: deterministic per seed
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]: scale by fan-in so activations keep their size
                std = cfg.init_std * (p.shape[1] / 64) ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata, kv_scales: KVScales = None) -> Tensor:
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            k_scale, v_scale = kv_scales[i] if kv_scales is not None else (None, None)
            x = layer(positions, x, kv_caches[i], metadata, k_scale, v_scale)
        return self.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()
