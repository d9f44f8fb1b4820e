"""The "pagedkv" attention implementation for transformers' AttentionInterface.

Every transformers attention module (Llama, Mistral, Qwen2, Gemma2, ...) ends in
`attention_forward(module, query, key, value, attention_mask, *, dropout, scaling, **kw)`
with query [B, heads, q_len, D] and key/value [B, kv_heads, kv_len, D]; it wants back
[B, q_len, heads, D]. Here that call ends in layers.write_and_attend (reshape_and_cache
+ paged_attention) with metadata from the package's StepPlanner. Where the K/V come from
decides how, tried in this order:

1. `kw["pagedkv_step"]`: the engine's flat ragged batch (HFPagedModel.forward passes it
   with the engine's metadata and caches); key/value are the step's new tokens.
2. key carries `PAGED_TARGET_ATTR`: PagedCache.update tagged the new tokens' states with
   the cache that owns them; the cache plans the step from the padding mask and attends.
3. anything else (HF's own DynamicCache, or no cache): key/value hold the layer's whole
   visible context; they are written into a scratch paged cache and attended with the
   same kernels, so a model keeps working whatever cache generate() gave it.

Masks: transformers builds the mask per implementation name (AttentionMaskInterface).
For "pagedkv" `padding_mask` below passes on only the user's 2-D padding mask,
restricted to the layer's kv columns; causality, sliding windows and softcap are the
kernel's job. Padding tokens are never attended: they get slot -1 and each row's
sequence is built from its real tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from ..cache.step_plan import StepPlanner
from ..layers import write_and_attend

ATTN_IMPLEMENTATION = "pagedkv"
STEP_KWARG = "pagedkv_step"  # forward(..., pagedkv_step=...) reaches attention_forward
PAGED_TARGET_ATTR = "_pagedkv_target"  # set by PagedCache.update on the views it returns
SCRATCH_BLOCK_SIZE = 16  # block size of the scratch cache in the dense path


@dataclass(frozen=True)
class AttnParams:
    """Per-layer attention settings, read from the module and the kwargs HF passes."""

    scale: float
    sliding_window: int = -1  # W > 0: a query sees its last W tokens (itself included)
    softcap: float = 0.0


class PagedTarget(Protocol):
    """Something that writes a layer's new K/V into a paged cache and attends."""

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               padding_mask: Optional[Tensor], params: AttnParams) -> Tensor:
        """query [B, H, q, D], key/value [B, KVH, q, D] -> [B, q, H, D]."""
        ...


def attn_params(module: nn.Module, head_size: int, scaling: Optional[float],
                kwargs: dict) -> AttnParams:
    """Scale, sliding window and softcap of one attention call.

    Mistral passes `sliding_window=` only as a kwarg, Gemma2 and Qwen2 pass their
    per-layer window (None on global layers) and keep it as a module attribute too;
    Gemma2 passes `softcap=` and keeps `attn_logit_softcapping`."""
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    else:
        window = getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    if scaling is None:
        scaling = getattr(module, "scaling", head_size ** -0.5)
    return AttnParams(scale=float(scaling),
                      sliding_window=int(window) if window else -1,
                      softcap=float(softcap) if softcap else 0.0)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature, on the pagedkv kernels. Returns
    ([B, q_len, heads, D], None): no attention weights are materialized."""
    if dropout and module.training:
        raise NotImplementedError("pagedkv attention is for inference: call model.eval() "
                                  "(or use attn_implementation='sdpa' to train)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"pagedkv attention takes a 2-D padding mask [batch, kv_len], got shape "
            f"{tuple(attention_mask.shape)}: pass the tokenizer's attention_mask, not a 4-D mask")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of kv heads "
                         f"({key.shape[1]})")
    params = attn_params(module, query.shape[-1], scaling, kwargs)
    target: Optional[PagedTarget] = kwargs.get(STEP_KWARG)
    if target is None:
        target = getattr(key, PAGED_TARGET_ATTR, None)
    if target is not None:
        return target.attend(module, query, key, value, attention_mask, params), None
    return attend_dense(query, key, value, attention_mask, params), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function=None,
                 attention_mask: Optional[Tensor] = None, use_vmap: bool = False,
                 **kwargs) -> Optional[Tensor]:
    """AttentionMaskInterface entry for "pagedkv": the bool padding mask of the layer's kv
    columns [batch, kv_length] (True = real token), or None when nothing is padding."""
    if use_vmap:  # transformers sets it exactly when a model overlays its own mask
        raise NotImplementedError(
            "pagedkv attention supports causal and sliding-window masks with padding; this "
            "model overlays a custom mask (or_mask_function/and_mask_function)")
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < kv_offset + kv_length:  # transformers pads the mask the same way
        mask = nn.functional.pad(mask, (0, kv_offset + kv_length - mask.shape[-1]))
    mask = mask[:, kv_offset:kv_offset + kv_length]
    return None if bool(mask.all()) else mask


def unpad_rows(x: Tensor, real: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x [B, n, ...] -> its real rows, flat [T, ...], and their flat indices (None = all)."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    if real is None:
        return flat, None
    index = real.reshape(-1).nonzero().squeeze(1)
    return flat.index_select(0, index), index


def pad_rows(out: Tensor, index: Optional[Tensor], batch: int, q_len: int) -> Tensor:
    """Inverse of unpad_rows: [T, H, D] -> [B, q_len, H, D], padding rows zero."""
    if index is not None:
        full = out.new_zeros(batch * q_len, *out.shape[1:])
        out = full.index_copy_(0, index, out)
    return out.view(batch, q_len, *out.shape[1:])


def attend_dense(query: Tensor, key: Tensor, value: Tensor, real: Optional[Tensor],
                 params: AttnParams) -> Tensor:
    """Path 3: key/value hold each row's visible context, the queries being its last
    q_len columns; `real` [B, kv_len] marks the non-padding columns. Row b's real
    columns become sequence b of a scratch paged cache (b's own blocks, planned by a
    StepPlanner like any step), so padding is never written nor attended."""
    batch, heads, q_len, head_size = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if real is not None and tuple(real.shape) != (batch, kv_len):
        raise ValueError(f"padding mask has shape {tuple(real.shape)}, expected "
                         f"({batch}, {kv_len}) for the layer's key/value states")
    bs = SCRATCH_BLOCK_SIZE
    blocks_per_row = -(-kv_len // bs)
    q_real = None if real is None else real[:, kv_len - q_len:]
    lens = [kv_len] * batch if real is None else real.sum(1).tolist()
    q_lens = [q_len] * batch if q_real is None else q_real.sum(1).tolist()
    # Every real column is new to the scratch cache; the real ones of the last q_len
    # columns (a row's last real tokens) are its queries.
    steps = [(range(b * blocks_per_row, (b + 1) * blocks_per_row), 0, n, n_q)
             for b, (n, n_q) in enumerate(zip(lens, q_lens))]
    planner = StepPlanner(bs, max_num_seqs=batch, max_num_tokens=max(1, sum(lens)),
                          max_blocks_per_seq=blocks_per_row, device=query.device,
                          pin_memory=False)
    metadata = planner.plan(steps)
    cache_shape = (batch * blocks_per_row, bs, kv_heads, head_size)
    caches = key.new_zeros(cache_shape), value.new_zeros(cache_shape)
    k, _ = unpad_rows(key.transpose(1, 2).contiguous(), real)
    v, _ = unpad_rows(value.transpose(1, 2).contiguous(), real)
    q, index = unpad_rows(query.transpose(1, 2).contiguous(), q_real)
    out = write_and_attend(q, k, v, caches, metadata, scale=params.scale,
                           sliding_window=params.sliding_window, softcap=params.softcap)
    return pad_rows(out, index, batch, q_len)
