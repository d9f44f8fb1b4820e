"""torch_pagedkv's ops as a vLLM V1 attention backend (vLLM selects it as "CUSTOM").

The KV cache is vLLM's own buffer, used in place. `customize_spec` asks for two head
slots per block (K and V), each holding num_kv_heads * head_size values per token, and
`supported_kv_cache_layouts` for LHBNC, which puts a layer's K slots of every block
together and then its V slots. vLLM's per-layer view is then [num_blocks, 2, block_size,
num_kv_heads * head_size] over memory laid out [2, num_blocks, block_size, ...], so
`kv_cache.transpose(0, 1)[0]` is our contiguous [num_blocks, block_size, num_kv_heads,
head_size] key cache and `[1]` the value cache: no copy, no change to the ops (the same
trick as vLLM's ROCm backend).

Per step: `do_kv_cache_update` writes the new tokens' K/V with `reshape_and_cache`
(slot -1 skips a padding token), `forward` attends with `paged_attention` (decode,
prefill, chunked prefill and mixed batches in one call), or, when 16+ requests share
256+ tokens of prefix blocks (cascade.py; PAGEDKV_VLLM_CASCADE=0 turns it off), with
`paged_attention_lse` over the shared prefix and over each request's own blocks, merged by
`merge_attn_states`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from importlib import metadata
from typing import ClassVar

import torch

from vllm.logger import init_logger
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

import torch_pagedkv.ops as ops
from torch_pagedkv.layers.attention import cascade_attention
from torch_pagedkv.layers.metadata import CascadeMetadata
from torch_pagedkv.vllm.cascade import plan_cascade

# Under "vllm" so that vLLM's own log handler and level apply.
logger = init_logger("vllm.torch_pagedkv")

NAME = "torch_pagedkv"
MAX_BLOCK_SIZE = 256
HEAD_SIZES = list(range(8, 513, 8))
# vLLM's kv_cache_dtype strings for fp8 caches (stored as uint8) and what they hold.
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}
SAME_AS_MODEL = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}


def version() -> str:
    try:
        return metadata.version(NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def config_problems(head_size: int, dtype: torch.dtype | None, kv_cache_dtype: str | None,
                    block_size: int | None, use_mla: bool = False, has_sink: bool = False,
                    use_sparse: bool = False, attn_type: str = AttentionType.DECODER,
                    use_non_causal: bool = False, **_ignored) -> list[str]:
    """What torch_pagedkv cannot run in this configuration, one phrase each (empty: ok).
    dtype None: the model dtype is not known here."""
    problems = []
    if head_size not in HEAD_SIZES:
        problems.append(f"head_size {head_size} (it takes multiples of 8 up to 512)")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        problems.append(f"dtype {dtype} (it takes float32, float16, bfloat16)")
    kv = kv_cache_dtype or "auto"
    if kv not in FP8_DTYPES and kv not in SAME_AS_MODEL:
        problems.append(f"kv_cache_dtype {kv!r} (it takes auto, the model dtype, "
                        f"{', '.join(FP8_DTYPES)})")
    elif dtype is not None and SAME_AS_MODEL.get(kv) not in (None, dtype):
        problems.append(f"kv_cache_dtype {kv!r} with a {dtype} model (a non-fp8 cache "
                        "holds the model dtype)")
    if block_size is not None and not 1 <= block_size <= MAX_BLOCK_SIZE:
        problems.append(f"block_size {block_size} (it takes 1 to {MAX_BLOCK_SIZE})")
    for flag, what in ((use_mla, "multi-head latent attention (MLA)"),
                       (has_sink, "attention sinks"), (use_sparse, "sparse attention"),
                       (use_non_causal, "non-causal decoder attention"),
                       (attn_type != AttentionType.DECODER, f"{attn_type} attention")):
        if flag:
            problems.append(what)
    return problems


class PagedKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16,
                                                     torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [*SAME_AS_MODEL, *FP8_DTYPES]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM looks the layer's backend up by this enum member name

    @staticmethod
    def get_impl_cls() -> type["PagedKVImpl"]:
        return PagedKVImpl

    @staticmethod
    def get_builder_cls() -> type["PagedKVMetadataBuilder"]:
        return PagedKVMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return HEAD_SIZES

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # Connectors see vLLM's logical per-layer view, blocks first ([num_blocks, K/V,
        # block_size, heads * head_size]), as torch_pagedkv.vllm.connector copies it.
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LHBNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if spec.state_content_bytes is not None:
            return spec
        return replace(spec, num_head_slots=2, state_content_bytes=spec.num_kv_heads
                       * spec.head_size * get_dtype_size(spec.dtype))

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size,
                               use_mla, has_sink, use_sparse, *args, **kwargs) -> list[str]:
        problems = config_problems(head_size, dtype, kv_cache_dtype, block_size, use_mla,
                                   has_sink, use_sparse, **kwargs)
        if problems:  # vLLM's own reasons would not say whose backend refused
            return [f"{NAME} does not support {p}" for p in problems]
        return [f"{NAME}: {r}" for r in super().validate_configuration(
            head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
            *args, **kwargs)]


@dataclass
class PagedKVMetadata:
    num_actual_tokens: int     # query rows that belong to a request (qsl[-1])
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    cascade: CascadeMetadata | None = None  # requests sharing prefix blocks, if any


class PagedKVMetadataBuilder(AttentionMetadataBuilder[PagedKVMetadata]):
    # The decode kernels launch a grid sized from shapes alone and never sync the host.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        # Planned from the host block table: on CPU only (on GPU it would cost a sync),
        # and not for sliding-window layers (their forward never uses it).
        self.cascade = (device.type == "cpu" and not getattr(kv_cache_spec, "sliding_window", None)
                        and os.environ.get("PAGEDKV_VLLM_CASCADE", "1") != "0")
        cache = vllm_config.cache_config.cache_dtype
        logger.info_once("Attention by %s %s: kv cache dtype %s (%s), block size %d",
                         NAME, version(), cache, kv_cache_spec.dtype,
                         kv_cache_spec.block_size, scope="global")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PagedKVMetadata:
        m = common_attn_metadata
        cascade = None
        if self.cascade:
            cascade = plan_cascade(m.block_table_tensor, m.seq_lens, m.query_start_loc,
                                   self.block_size)
        return PagedKVMetadata(
            num_actual_tokens=int(m.query_start_loc_cpu[m.num_reqs]),
            query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            block_table=m.block_table_tensor, cascade=cascade)


class PagedKVImpl(AttentionImpl[PagedKVMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        problems = config_problems(head_size, None, kv_cache_dtype, None,
                                   has_sink=sinks is not None, attn_type=attn_type)
        if problems:
            raise ValueError(f"{NAME} attention backend does not support "
                             + "; ".join(problems))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8_dtype = FP8_DTYPES.get(kv_cache_dtype)
        self.alibi_slopes = (None if alibi_slopes is None
                             else torch.tensor(alibi_slopes, dtype=torch.float32))
        self.sliding_window = -1 if sliding_window is None else sliding_window
        self.softcap = float(logits_soft_cap or 0.0)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def _caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Our key and value caches: views of vLLM's [num_blocks, 2, block_size,
        num_kv_heads * head_size] layer view (K/V planes outermost in memory)."""
        kv = kv_cache.transpose(0, 1)
        if self.fp8_dtype is not None:
            kv = kv.view(self.fp8_dtype)  # vLLM allocates fp8 caches as uint8
        shape = (kv.shape[1], kv.shape[2], self.num_kv_heads, self.head_size)
        return kv[0].view(shape), kv[1].view(shape)

    def _scales(self, layer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.fp8_dtype is None:
            return None, None
        return layer._k_scale, layer._v_scale

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = min(key.shape[0], slot_mapping.shape[0])
        key_cache, value_cache = self._caches(kv_cache)
        ops.reshape_and_cache(key[:n], value[:n], key_cache, value_cache,
                              slot_mapping[:n], *self._scales(layer))

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: PagedKVMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{NAME}: fused output quantization is not supported")
        if attn_metadata is None:  # vLLM's memory-profiling run
            return output
        m = attn_metadata
        n = m.num_actual_tokens
        key_cache, value_cache = self._caches(kv_cache)
        k_scale, v_scale = self._scales(layer)
        if m.cascade is not None and self.alibi_slopes is None and self.sliding_window <= 0:
            out = cascade_attention(query[:n], key_cache, value_cache, m.cascade,
                                    scale=self.scale, softcap=self.softcap,
                                    k_scale=k_scale, v_scale=v_scale)
        else:
            out = ops.paged_attention(query[:n], key_cache, value_cache, m.block_table,
                                      m.seq_lens, m.query_start_loc, self.scale,
                                      self.alibi_slopes, self.sliding_window, self.softcap,
                                      k_scale, v_scale)
        output[:n].copy_(out)
        return output
