"""HFPagedModel: a transformers causal LM as the engine's PagedModel (models/base.py).

The engine hands forward() one flat ragged batch (new tokens of every scheduled
sequence, their positions, the per-layer paged caches and the step's metadata).
The HF decoder runs on it as a batch of one row of num_tokens tokens, with the given
position_ids (so rotary embeddings see each token's own position) and no HF cache;
the step travels as the `pagedkv_step` keyword, which transformers forwards to every
attention call, where PagedStep.attend hands the new q/k/v to layers.write_and_attend
with the engine's AttentionMetadata (planned by the engine's StepPlanner). Sequences never see
each other: paged_attention keeps each to its own blocks. Everything model-specific
(embedding scale, norms, per-layer windows, softcaps, biases) stays HF's own code, so
prefix caching, chunked prefill and preemption come from the engine unchanged.

What cannot be routed is refused up front (`unsupported_reason`), before anything runs:
a model whose attention does not go through transformers' AttentionInterface would keep
running its own attention over no cache and generate other tokens, silently; layer
kinds and attention variants the kernels do not implement would too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..layers import AttentionMetadata, write_and_attend
from .hf_attention import ATTN_IMPLEMENTATION, STEP_KWARG, AttnParams
from .hf_cache import kv_geometry, text_config


class PagedStep:
    """Carries one engine step (its caches and AttentionMetadata) to the attention
    implementation, as its target (see hf_attention)."""

    def __init__(self, kv_caches: list[tuple[Tensor, Tensor]], metadata: AttentionMetadata,
                 kv_scales: Optional[list[tuple[Tensor, Tensor]]] = None) -> None:
        self.kv_caches = kv_caches
        self.metadata = metadata
        self.kv_scales = kv_scales

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               padding_mask: Optional[Tensor], params: AttnParams) -> Tensor:
        """query [1, H, T, D], key/value [1, KVH, T, D] of the step's T tokens
        -> [1, T, H, D]."""
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx: cannot pick its cache")
        if query.shape[0] != 1:
            raise ValueError(f"an engine step is one flat batch, got batch {query.shape[0]}")
        k_scale, v_scale = self.kv_scales[layer_idx] if self.kv_scales is not None else (None, None)
        k = key[0].transpose(0, 1).contiguous()  # [T, KVH, D]
        v = value[0].transpose(0, 1).contiguous()
        q = query[0].transpose(0, 1).contiguous()
        out = write_and_attend(q, k, v, self.kv_caches[layer_idx], self.metadata,
                               scale=params.scale, sliding_window=params.sliding_window,
                               softcap=params.softcap, k_scale=k_scale, v_scale=v_scale)
        return out.unsqueeze(0)


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError, NotImplementedError):
    """A transformers model whose attention cannot run on the pagedkv kernels: both a
    ValueError (a model the engine cannot take) and a NotImplementedError (what its
    attention needs is not implemented here), so either except catches it."""


def unsupported_reason(hf_model: nn.Module) -> Optional[str]:
    """Why the adapter cannot route the model's attention through write_and_attend,
    or None when it can."""
    cls = type(hf_model)
    cfg = text_config(hf_model.config)
    if getattr(hf_model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; the engine runs decoder-only causal LMs"
    kinds = sorted(set(getattr(cfg, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if kinds:
        return (f"it has {', '.join(kinds)} layers; the pagedkv kernels implement "
                f"{' and '.join(SUPPORTED_LAYER_TYPES)} only")
    if getattr(cfg, "kv_lora_rank", None):
        return ("it uses multi-head latent attention (kv_lora_rank), whose cached latent "
                "and separate value head size the paged cache does not hold")
    if getattr(cfg, "alibi", False) or getattr(cfg, "position_embedding_type", "") == "alibi":
        return "it uses ALiBi position biases, which the HF adapter does not pass to the kernels"
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in hf_model.named_parameters()):
        return ("its attention has learned sinks (an extra logit per head in the softmax), "
                "which the pagedkv kernels do not implement")
    if not (cls._can_set_attn_implementation() and cls._supports_attention_backend):
        return ("its attention does not go through transformers' AttentionInterface "
                "(transformers does not support setting its attention implementation "
                "dynamically), so it would keep running its own attention")
    return None


class HFPagedModel(nn.Module):
    """Adapts a transformers *ForCausalLM to the PagedModel protocol."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} cannot run on torch_pagedkv: {reason}. The "
                "families tested token for token against transformers are listed in the "
                "README (Hugging Face models)")
        config = hf_model.config
        if config._attn_implementation != ATTN_IMPLEMENTATION:
            hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if config._attn_implementation != ATTN_IMPLEMENTATION:  # transformers declined
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} cannot run on torch_pagedkv: transformers kept "
                f"its attention implementation {config._attn_implementation!r} instead of "
                f"{ATTN_IMPLEMENTATION!r}")
        self.hf_model = hf_model.eval()
        cfg = text_config(config)
        self.num_layers, self.num_kv_heads, self.head_size = kv_geometry(cfg)
        self.num_heads = cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.max_position = getattr(cfg, "max_position_embeddings", None)
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.dtype

    @property
    def device(self) -> torch.device:
        return self.hf_model.device

    @torch.no_grad()
    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[tuple[Tensor, Tensor]],
                metadata, kv_scales: Optional[list[tuple[Tensor, Tensor]]] = None) -> Tensor:
        """input_ids, positions: int64 [T] -> hidden states [T, hidden_size]."""
        out = self.hf_model.base_model(
            input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
            use_cache=False, **{STEP_KWARG: PagedStep(kv_caches, metadata, kv_scales)})
        return out.last_hidden_state[0]

    @torch.no_grad()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [n, hidden_size] -> float32 logits [n, vocab] (with Gemma-2's final
        logit softcap, as the HF model's own forward applies it)."""
        logits = self.hf_model.get_output_embeddings()(hidden)
        cap = self.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


def as_paged_model(hf_model: nn.Module) -> HFPagedModel:
    """A transformers causal LM as a PagedModel for torch_pagedkv.engine.LLM. Switches
    the model's attention implementation to "pagedkv" (HF's own generate keeps working
    on it, through the same kernels). Raises UnsupportedModelError, naming the model
    class and the reason, for a model whose attention it cannot route there."""
    return HFPagedModel(hf_model)
