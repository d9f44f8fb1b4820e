"""Hugging Face transformers on the pagedkv kernels, model code unchanged.

    import torch_pagedkv.integrations.hf as pkv_hf   # registers "pagedkv" with transformers

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pagedkv")
    # (or model.set_attn_implementation("pagedkv") on a loaded model)
    cache = pkv_hf.PagedCache.for_model(model, max_batch_size=4, max_seq_len=512)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache)  # HF's generate

    llm = torch_pagedkv.engine.LLM(model, ...)       # the engine: prefix caching,
                                                     # chunked prefill, preemption

Pieces (one file each):
  hf_attention.py  the "pagedkv" AttentionInterface function and its mask function
  hf_cache.py      PagedCache: HF Cache over a paged KVCache + BlockManager
  hf_model.py      as_paged_model: an HF causal LM as the engine's PagedModel
Without a PagedCache (HF's DynamicCache, or no cache) "pagedkv" attention still runs
on reshape_and_cache + paged_attention, over a scratch paged copy of HF's K/V.
Tested with transformers==5.23.0 (the `hf` extra pins it).
"""
from __future__ import annotations

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # the extra is optional: `import torch_pagedkv` never needs it
    raise ImportError("torch_pagedkv.integrations.hf needs transformers: "
                      "pip install 'torch_pagedkv[hf]'") from e

from .hf_attention import ATTN_IMPLEMENTATION, attention_forward, padding_mask
from .hf_cache import PagedCache
from .hf_model import (HFPagedModel, PagedStep, UnsupportedModelError, as_paged_model,
                       unsupported_reason)

__all__ = ["ATTN_IMPLEMENTATION", "HFPagedModel", "PagedCache", "PagedStep",
           "UnsupportedModelError", "as_paged_model", "attention_forward", "padding_mask",
           "register", "unsupported_reason"]


def register() -> None:
    """Registers "pagedkv" with transformers' AttentionInterface and, so that the
    user's 2-D padding mask reaches the attention, AttentionMaskInterface. Done on
    import; calling it again is harmless."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)


register()
