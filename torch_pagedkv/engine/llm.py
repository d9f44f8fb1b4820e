"""LLM: the engine's front door. generate() turns prompts into tokens.

    LLM.generate -> Scheduler.schedule  (which sequences, how many tokens; blocks)
                 -> ModelRunner.execute  (plan metadata, run the model, sample)
                 -> Scheduler.update     (commit K/V to the prefix cache, fork, finish)
one step at a time until every request is done. step() is public so a caller (the
trace, a server loop) can watch the engine between steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from ..cache.block_manager import BlockManager
from ..cache.kv_cache import KVCache
from .model_runner import ModelRunner
from .request import Request, RequestOutput, Sequence
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .stats import EngineStats

DEFAULT_MEMORY_BYTES = 512 * 2**20


def _is_hf_model(model) -> bool:
    """A transformers PreTrainedModel, detected without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


@dataclass
class StepOutput:
    scheduled: SchedulerOutput
    tokens: list[int]
    finished: list[Request] = field(default_factory=list)
    seconds: float = 0.0


class LLM:
    """A paged-KV-cache engine over a PagedModel (or a Hugging Face model, adapted).

    num_blocks or memory_bytes sizes the KV cache (default: a 512 MiB budget);
    cache_dtype defaults to the model's dtype (fp8 dtypes allowed). max_model_len caps a
    sequence (default: the model's max_position, at most what the cache holds; without
    chunked prefill also max_num_batched_tokens). compile=True runs the model under
    torch.compile(fullgraph=True, dynamic=True) with compile_backend ("inductor"; "eager"
    to check tracing cheaply); the graph is shared by every engine in the process.
    cuda_graphs (None: on when the model is on CUDA) pads decode steps to capture sizes
    and replays one CUDA graph per size (engine/cuda_graphs.py); True on a CPU model runs
    the same padding with no capture.
    """

    def __init__(self, model, num_blocks: Optional[int] = None, *,
                 memory_bytes: Optional[int] = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                 max_model_len: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                 compile: bool = True, compile_backend: str = "inductor",
                 cuda_graphs: Optional[bool] = None) -> None:
        if _is_hf_model(model):
            from ..integrations.hf import as_paged_model
            model = as_paged_model(model)
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if num_blocks is None and memory_bytes is None:
            memory_bytes = DEFAULT_MEMORY_BYTES
        self.model = model
        self.device = _model_device(model)
        self.kv_cache = KVCache(model.num_layers, model.num_kv_heads, model.head_size,
                                block_size, num_blocks=num_blocks, memory_bytes=memory_bytes,
                                dtype=cache_dtype or model.dtype, device=self.device)
        self.block_manager = BlockManager(self.kv_cache.num_blocks, block_size,
                                          enable_prefix_caching=enable_prefix_caching)
        limit = getattr(model, "max_position", None) or self.kv_cache.num_blocks * block_size
        self.max_model_len = min(max_model_len or limit, limit,
                                 self.kv_cache.num_blocks * block_size)
        if not enable_chunked_prefill:  # a whole sequence (a recompute too) fits one step
            self.max_model_len = min(self.max_model_len, max_num_batched_tokens)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                   enable_chunked_prefill=enable_chunked_prefill)
        self.runner = ModelRunner(model, self.kv_cache, self.block_manager,
                                  max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=self.max_model_len, compile=compile,
                                  compile_backend=compile_backend,
                                  cuda_graphs=self._want_cuda_graphs(cuda_graphs))
        self.stats = EngineStats()
        self._next_request_id = 0
        self._next_seq_id = 0

    def _want_cuda_graphs(self, cuda_graphs: Optional[bool]) -> bool:
        if cuda_graphs is None:
            return self.device.type == "cuda"
        return bool(cuda_graphs)

    @property
    def num_compiled_graphs(self) -> int:
        return self.runner.num_compiled_graphs

    # ------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: Seq[int], params: Optional[SamplingParams] = None,
                    *, cache_salt: Optional[str] = None) -> Request:
        params = params or SamplingParams()
        tolist = getattr(prompt_token_ids, "tolist", None)
        prompt = [int(t) for t in (tolist() if tolist else prompt_token_ids)]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        vocab = self.model.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (the model's vocab)")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate: "
                             f"max_model_len is {self.max_model_len}")
        req = Request(self._next_request_id, prompt, params, time.perf_counter(), cache_salt)
        self._next_request_id += 1
        for i in range(params.n):
            req.sequences.append(Sequence(self._next_seq_id, req, i,
                                          params.generator(i, self.device)))
            self._next_seq_id += 1
        self.scheduler.add(req.sequences[0])
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------ one step
    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if not out.scheduled:
            return StepOutput(out, [])
        sampled = self.runner.execute(out)
        tokens = [] if sampled is None else sampled.tolist()  # the step's one device sync
        now = time.perf_counter()
        finished = self.scheduler.update(out, tokens, now)
        done = []
        for s in finished:
            req = s.request
            if req.finished:
                req.metrics.latency = now - req.arrival_time
                done.append(req)
        st = self.stats
        st.num_steps += 1
        prefill = out.num_prefill_tokens
        st.num_prefill_tokens += prefill
        st.num_decode_tokens += out.num_decode_tokens
        if prefill:
            st.prefill_time_s += now - t0
        else:
            st.decode_time_s += now - t0
        st.num_preemptions += len(out.preempted)
        st.num_cow_copies += len(out.copies)
        st.peak_blocks_used = max(st.peak_blocks_used, used)
        st.prefix_queries, st.prefix_hits = bm.stats.queries, bm.stats.hits
        return StepOutput(out, tokens, done, now - t0)

    # ------------------------------------------------------------ the batch API
    def generate(self, prompts: Seq[Seq[int]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None, *,
                 use_tqdm: bool = True, cache_salts: Optional[Seq[Optional[str]]] = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (token ids); results in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        salts = cache_salts or [None] * len(prompts)
        reqs = [self.add_request(p, sp, cache_salt=salt)
                for p, sp, salt in zip(prompts, params, salts)]
        with tqdm(total=len(reqs), desc="generate", unit="req", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            while self.has_unfinished():
                step = self.step()
                if step.finished:
                    bar.update(len(step.finished))
        return [RequestOutput.of(r) for r in reqs]
