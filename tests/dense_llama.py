"""A dense (unpaged) forward of the tiny Llama for tests: plain causal attention over
the whole sequence with the model's own weights, and greedy decoding by recompute."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_pagedkv.models import TinyLlama


@torch.inference_mode()
def dense_logits(model: TinyLlama, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of every position."""
    ids_t = torch.tensor(ids)
    pos = torch.arange(len(ids))
    x = model.embed_tokens(ids_t)
    for layer in model.layers:
        a = layer.self_attn
        qkv = a.qkv_proj(layer.input_norm(x))
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = a.rotary(pos, q.unflatten(-1, (a.num_heads, a.head_size)))
        k = a.rotary(pos, k.unflatten(-1, (a.num_kv_heads, a.head_size)))
        v = v.unflatten(-1, (a.num_kv_heads, a.head_size))
        g = a.num_heads // a.num_kv_heads
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
            v.repeat_interleave(g, 1).transpose(0, 1), is_causal=True, scale=a.attn.scale)
        x = x + a.o_proj(o.transpose(0, 1).flatten(1))
        x = x + layer.mlp(layer.post_attention_norm(x))
    return model.compute_logits(model.norm(x))


def greedy_reference(model: TinyLlama, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(dense_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]
