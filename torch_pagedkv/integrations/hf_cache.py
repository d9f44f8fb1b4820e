"""PagedCache: a transformers Cache whose K/V live in a paged KVCache, blocks from a BlockManager.

Pass it to HF's own generate (`model.generate(ids, attention_mask=m,
past_key_values=PagedCache.for_model(model, num_blocks=...))`) on a model whose
attention implementation is "pagedkv". Each batch row is one BlockManager sequence
built from the row's real tokens only: left (or any) padding gets slot -1, is never
written and never attended, so query_start_loc/seq_lens describe the unpadded rows.

How a step flows (the model code is transformers', unchanged):
  1. mask creation calls get_mask_sizes; our "pagedkv" mask function hands the
     attention the 2-D padding mask of the step's columns;
  2. each attention module calls update(k, v, layer): nothing is written yet (the
     padding is not known here); it returns views of the new states tagged with
     this cache's layer target;
  3. the attention implementation finds the tag and calls attend(): the first layer
     of a step plans it (BlockManager allocate/append, then the package's StepPlanner
     turns the rows' BlockTables into the step's AttentionMetadata), every layer then
     selects the real rows and calls layers.write_and_attend with that metadata.

HF addresses the cache in columns (padding included): get_seq_length counts columns,
so HF's positions and masks stay as with DynamicCache. Beam search and the other
row-reordering calls fork BlockManager sequences, sharing blocks copy-on-write.
The cache sees K/V, never token ids, so it allocates with placeholder ids and prefix
caching is off here; LLM(hf_model) (the engine) is the path with prefix caching.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache.block_manager import BlockManager, NoFreeBlocksError
from ..cache.kv_cache import KVCache
from ..cache.step_plan import StepPlanner
from ..layers import AttentionMetadata, write_and_attend
from .hf_attention import PAGED_TARGET_ATTR, AttnParams, pad_rows


def text_config(config):
    """The decoder config of a (possibly composite) HF config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_size) of an HF decoder config."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_size


class _PagedLayer(CacheLayerMixin):
    """HF's per-layer view: counts the columns (tokens, padding included) and forward
    passes the layer has seen. The K/V themselves are in the PagedCache's KVCache."""

    is_sliding = False  # windows are applied by the kernel; every token is kept

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True
        self.columns = 0
        self.steps = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.columns += key_states.shape[-2]
        self.steps += 1
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.columns = self.steps = 0


class _LayerTarget:
    """What PagedCache.update tags its returned views with: (cache, layer)."""

    __slots__ = ("cache", "layer_idx")

    def __init__(self, cache: "PagedCache", layer_idx: int) -> None:
        self.cache = cache
        self.layer_idx = layer_idx

    def attend(self, module, query, key, value, padding_mask, params):
        return self.cache.attend(self.layer_idx, query, key, value, padding_mask, params)


@dataclass
class _Row:
    seq_id: int
    length: int  # real tokens in the cache


class PagedCache(Cache):
    """A transformers Cache backed by a paged KVCache and a BlockManager."""

    def __init__(self, config, *, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 k_scales: Optional[Sequence[float]] = None,
                 v_scales: Optional[Sequence[float]] = None) -> None:
        num_layers, kv_heads, head_size = kv_geometry(config)
        super().__init__(layers=[_PagedLayer() for _ in range(num_layers)])
        self.kv = KVCache(num_layers, kv_heads, head_size, block_size, num_blocks=num_blocks,
                          dtype=dtype, device=device, k_scales=k_scales, v_scales=v_scales)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.block_size = block_size
        self._targets = [_LayerTarget(self, i) for i in range(num_layers)]
        self._rows: Optional[list[Optional[_Row]]] = None  # per batch row; None: no real token yet
        self._ids = count()
        self._planner: Optional[StepPlanner] = None  # grown to the largest step seen
        # The current forward's plan, shared by its layers: (forward number, metadata,
        # flat indices of the real rows among batch * q_len, None when all are real).
        self._plan: Optional[tuple[int, AttentionMetadata, Optional[Tensor]]] = None

    @classmethod
    def for_model(cls, model: nn.Module, *, num_blocks: Optional[int] = None,
                  max_batch_size: int = 1, max_seq_len: Optional[int] = None,
                  block_size: int = 16, dtype: Optional[torch.dtype] = None) -> "PagedCache":
        """A cache for `model`'s geometry, dtype and device. Give num_blocks, or the
        batch size and the longest row (prompt plus new tokens) to size it for."""
        if num_blocks is None:
            if max_seq_len is None:
                raise ValueError("give num_blocks, or max_batch_size and max_seq_len")
            num_blocks = max_batch_size * -(-max_seq_len // block_size)
        return cls(model.config, num_blocks=num_blocks, block_size=block_size,
                   dtype=dtype or model.dtype, device=model.device)

    # ------------------------------------------------------------ HF's Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[Tensor, Tensor]:
        """Counts the step's columns; returns views of the new states tagged with this
        cache, so the "pagedkv" attention writes and attends them here."""
        self.layers[layer_idx].update(key_states, value_states)
        key = key_states.view(key_states.shape)  # our own object to tag, no copy
        setattr(key, PAGED_TARGET_ATTR, self._targets[layer_idx])
        return key, value_states

    def reset(self) -> None:
        """Frees every row's blocks; the cache is empty and ready for a new batch."""
        for row in self._rows or ():
            if row is not None:
                self.block_manager.free(row.seq_id)
        self._rows = None
        self._plan = None
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: new row i continues old row beam_idx[i] (blocks shared)."""
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._rows is not None:
            self._select_rows([i for i in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(torch.as_tensor(indices).reshape(-1).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PagedCache cannot drop tokens (assisted decoding); use "
                                  "generate without an assistant model")

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # ------------------------------------------------------------ paged attention
    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor,
               padding_mask: Optional[Tensor], params: AttnParams) -> Tensor:
        """Writes the layer's new K/V and attends: query [B, H, q, D], key/value
        [B, KVH, q, D] -> [B, q, H, D]."""
        batch, _, q_len, head_size = query.shape
        layer = self.layers[layer_idx]
        if self._plan is None or self._plan[0] != layer.steps:
            self._plan = (layer.steps, *self._plan_step(layer.columns - q_len, padding_mask,
                                                        batch, q_len))
        _, metadata, real_rows = self._plan
        # [B, n, q, D] -> [B * q, n, D], heads contiguous as the ops want them.
        q, k, v = (x.transpose(1, 2).contiguous().view(batch * q_len, x.shape[1], head_size)
                   for x in (query, key, value))
        if real_rows is not None:
            q, k, v = (x.index_select(0, real_rows) for x in (q, k, v))
        k_scale, v_scale = self._scales(layer_idx)
        out = write_and_attend(q, k, v, self.kv.layer(layer_idx), metadata,
                               scale=params.scale, sliding_window=params.sliding_window,
                               softcap=params.softcap, k_scale=k_scale, v_scale=v_scale)
        return pad_rows(out, real_rows, batch, q_len)

    def _scales(self, layer_idx: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if not self.kv.is_fp8:
            return None, None
        return self.kv.k_scales[layer_idx], self.kv.v_scales[layer_idx]

    def _plan_step(self, columns_before: int, padding_mask: Optional[Tensor],
                   batch: int, q_len: int) -> tuple[AttentionMetadata, Optional[Tensor]]:
        """Host side, once per forward: blocks for each row's real new tokens, then the
        step's metadata from the package's StepPlanner."""
        if padding_mask is not None and padding_mask.shape != (batch, columns_before + q_len):
            raise ValueError(
                f"attention_mask covers {padding_mask.shape[-1]} columns, but the cache holds "
                f"{columns_before} and the step adds {q_len}: pass generate() the mask of the "
                "whole sequence, or reset() the cache before a new batch")
        if self._rows is None:
            self._rows = [None] * batch
        elif len(self._rows) != batch:
            raise ValueError(f"this PagedCache holds a batch of {len(self._rows)} rows, the "
                             f"step has {batch}: reset() it (or use a new cache) for a new batch")
        new_real = None if padding_mask is None else padding_mask[:, columns_before:]
        counts = [q_len] * batch if new_real is None else new_real.sum(1).tolist()
        bm = self.block_manager
        old_lens = []
        try:
            for b, n in enumerate(counts):
                row = self._rows[b]
                old_lens.append(0 if row is None else row.length)
                if n == 0:
                    continue
                if row is None:
                    row = _Row(next(self._ids), 0)
                    bm.allocate(row.seq_id, [0] * n)  # placeholder ids: no prefix caching here
                    self._rows[b] = row
                else:
                    bm.append(row.seq_id, [0] * n)
                row.length += n
        except NoFreeBlocksError as e:
            e.add_note("PagedCache: build it with more num_blocks (about batch * max_len / "
                       "block_size); reset() this one before using it again")
            raise
        self.kv.copy_blocks(bm.take_copies())  # copy-on-write after a beam reorder

        tables = [bm.table(r.seq_id).block_ids if r is not None else [] for r in self._rows]
        steps = list(zip(tables, old_lens, counts))
        width = max(map(len, tables), default=1)
        metadata = self._planner_for(batch, sum(counts), width).plan(steps)
        real_rows = (None if new_real is None
                     else new_real.reshape(-1).nonzero().squeeze(1).to(self.kv.device))
        return metadata, real_rows

    def _planner_for(self, num_seqs: int, num_tokens: int, width: int) -> StepPlanner:
        """The planner, regrown (at least doubling) when a step outgrows its buffers."""
        p = self._planner
        need = (max(1, num_seqs), max(1, num_tokens), max(1, width))
        have = (0, 0, 0) if p is None else (p.max_num_seqs, p.max_num_tokens,
                                            p.max_blocks_per_seq)
        if all(n <= h for n, h in zip(need, have)):
            return p
        seqs, tokens, blocks = (h if n <= h else max(n, 2 * h) for n, h in zip(need, have))
        self._planner = StepPlanner(self.block_size, max_num_seqs=seqs, max_num_tokens=tokens,
                                    max_blocks_per_seq=blocks, device=self.kv.device)
        return self._planner

    def _select_rows(self, sources: list[int]) -> None:
        """New row i continues old row sources[i]; rows share blocks (fork)."""
        if self._rows is None:
            return
        old = self._rows
        new: list[Optional[_Row]] = []
        for src in sources:
            row = old[src]
            if row is None:
                new.append(None)
                continue
            child = _Row(next(self._ids), row.length)
            self.block_manager.fork(row.seq_id, child.seq_id)
            new.append(child)
        for row in old:
            if row is not None:
                self.block_manager.free(row.seq_id)
        self._rows = new
        self._plan = None
