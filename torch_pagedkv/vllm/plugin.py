"""The `vllm.general_plugins` entry point: makes `attention_backend="CUSTOM"` mean
torch_pagedkv on every platform. vLLM loads it in each of its processes (front end,
engine core, workers); it imports neither torch_pagedkv's ops nor the backend, so a
vLLM run that does not select CUSTOM is exactly what it was without our package.

- Registers `torch_pagedkv.vllm.backend.PagedKVBackend` as the CUSTOM backend. CUDA's
  selector honours the choice by itself (and validates it with the backend's
  `validate_configuration`).
- vLLM's CPU platform ignores the selection (it always returns CPU_ATTN): its
  `get_attn_backend_cls` is wrapped so that CUSTOM, and only CUSTOM, returns ours.
- The platform's `check_and_update_config` is wrapped to refuse a model the backend
  cannot run while `vllm.LLM(...)` / `vllm serve` builds its config, in the caller's
  process, before any worker starts.
"""
from __future__ import annotations

import logging

BACKEND = "torch_pagedkv.vllm.backend.PagedKVBackend"
logger = logging.getLogger("vllm.torch_pagedkv")  # vLLM's handler and level


def register() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND:
        logger.warning("torch_pagedkv: the CUSTOM attention backend is already %s; "
                       "leaving it", custom.get_path())
        return
    register_backend(custom, BACKEND)
    platform = type(current_platform)
    if getattr(platform, "_pagedkv_patched", False):
        return
    platform._pagedkv_patched = True
    _wrap_config_check(platform)
    if current_platform.is_cpu():
        _wrap_cpu_selector(platform)


def _selected(backend) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return (backend == AttentionBackendEnum.CUSTOM
            and AttentionBackendEnum.CUSTOM.get_path() == BACKEND)


def _wrap_config_check(platform) -> None:
    original = platform.check_and_update_config

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        if _selected(vllm_config.attention_config.backend):
            check_model(vllm_config)

    platform.check_and_update_config = classmethod(check_and_update_config)


def check_model(vllm_config) -> None:
    """Raises ValueError naming torch_pagedkv if it cannot run this model."""
    from torch_pagedkv.vllm.backend import config_problems

    model, cache = vllm_config.model_config, vllm_config.cache_config
    if model is None:
        return
    problems = config_problems(model.get_head_size(), model.dtype, cache.cache_dtype,
                               cache.block_size, use_mla=model.use_mla)
    if problems:
        raise ValueError(f"torch_pagedkv attention backend (attention_backend='CUSTOM') "
                         f"cannot run {model.model}: it does not support "
                         + "; ".join(problems))


def _wrap_cpu_selector(platform) -> None:
    original = platform.get_attn_backend_cls

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not _selected(selected_backend):
            return original(selected_backend, attn_selector_config, num_heads)
        from torch_pagedkv.vllm.backend import PagedKVBackend
        reasons = PagedKVBackend.validate_configuration(device_capability=None,
                                                        **attn_selector_config._asdict())
        if reasons:
            raise ValueError("Selected backend CUSTOM (torch_pagedkv) is not valid for this "
                             f"configuration: {'; '.join(reasons)}")
        return BACKEND

    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
