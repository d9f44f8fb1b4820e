"""LLM: the engine's front door. generate() turns prompts into tokens.

    LLM.generate -> Scheduler.schedule  (which sequences, how many tokens; blocks)
                 -> ModelRunner.execute  (plan metadata, run the model, sample)
                 -> Scheduler.update     (commit K/V to the prefix cache, fork, finish)
one step at a time until every request is done. step() is public so a caller (the
trace, a server loop) can watch the engine between steps; stream() yields each step's
new tokens; abort() cancels a request between steps.

Admission is all or nothing: generate() and add_request() check every prompt and
parameter (engine/admission.py) before queueing any, and a generate() or stream() that
fails or is abandoned midway aborts the requests it queued, so an error never leaves
work queued or blocks held.
"""
from __future__ import annotations

import os
import time
import weakref
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence as Seq, Union

import torch
from tqdm.auto import tqdm

from ..cache.block_manager import BlockManager
from ..cache.kv_cache import KVCache
from ..cache.step_plan import ALWAYS_CASCADE, CascadeRule
from ..cpu_tuning.choices import NEVER_SEQS, attention_context
from ..cpu_tuning.resolve import CpuTuning, contexts_for_model, num_heads_of, resolve
from ..layers import packed_linear
from . import text
from .admission import Checked, Limits, Prompt, check_batch, check_request
from .model_runner import ModelRunner
from .model_source import is_hf_model, load_model, model_device
from .request import Request, RequestOutput, Sequence
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .stats import EngineStats
from .stream import Streamer
from .swap import SwapSpace
from ..tiers.tiered_cache import TieredCache

DEFAULT_MEMORY_BYTES = 512 * 2**20
DEFAULT_SWAP_BYTES = 4 * 2**30  # at most; never more than the KV cache itself
PREEMPTION_MODES = ("recompute", "swap")


def _cascade_rule(enable_cascade: Optional[bool], tuned: Optional[CascadeRule]
                  ) -> Optional[CascadeRule]:
    """enable_cascade None: the CPU tuning table's rule (the documented default, 16+
    sequences sharing 256+ tokens, off the CPU or with cpu_tuning="off")."""
    if enable_cascade is None:
        if tuned is None:
            from ..cpu_tuning.choices import CascadeChoice
            d = CascadeChoice()
            tuned = CascadeRule(d.min_seqs, d.min_shared_tokens)
        return tuned if tuned.min_seqs < NEVER_SEQS else None
    return ALWAYS_CASCADE if enable_cascade else None


def _heads(model) -> tuple[int, int, int]:
    return num_heads_of(model), model.num_kv_heads, model.head_size


@dataclass
class StepOutput:
    scheduled: SchedulerOutput
    tokens: list[int]
    finished: list[Request] = field(default_factory=list)
    seconds: float = 0.0


class LLM:
    """A paged-KV-cache engine over a PagedModel, a Hugging Face model (adapted), the
    path of a local Hugging Face checkpoint (loaded with from_pretrained, files only), or
    a callable that builds one of these.

    num_blocks or memory_bytes sizes the KV cache (default: a 512 MiB budget);
    cache_dtype defaults to the model's dtype (fp8 dtypes allowed). max_model_len caps a
    sequence (default: the model's max_position, at most what the cache holds; without
    chunked prefill also max_num_batched_tokens). compile=True runs the model under
    torch.compile(fullgraph=True, dynamic=True) with compile_backend ("inductor"; "eager"
    to check tracing cheaply); the graph is shared by every engine in the process.
    cuda_graphs (None: on when the model is on CUDA, off with tensor parallelism, whose
    NCCL collectives in a captured graph are not tested yet) pads decode steps to capture sizes
    and replays one CUDA graph per size (engine/cuda_graphs.py); True on a CPU model runs
    the same padding with no capture.
    tokenizer (any object with encode/decode; by default the one saved beside a
    checkpoint given by path) lets prompts be text and gives outputs `.text`.
    preemption_mode: "recompute" frees a preempted sequence's blocks and computes its K/V
    again on resumption; "swap" first copies them to a CPU swap space of
    swap_space_bytes (default: the KV cache's size, at most 4 GiB) and back on
    resumption, falling back to recompute while the swap space is full.
    enable_cascade: shared-prefix (cascade) attention for running sequences whose block
    tables start with the same blocks. None: when the planner finds a group worth it
    by the CPU tuning table's rule (see cpu_tuning; default 16+ sequences sharing 256+
    tokens, also on CUDA); True: every group of 2+ sequences sharing
    1+ full blocks; False: never.
    tensor_parallel_size: N > 1 splits the model's heads and MLP columns over N ranks
    (torch.distributed: gloo on CPU, NCCL on CUDA with one GPU per rank; distributed/).
    `model` is then a checkpoint path or a picklable builder (each rank builds its own);
    N - 1 worker processes are spawned, or, under torchrun, the group's ranks are used
    (LLM(...) on a rank other than 0 serves until rank 0 shuts down). num_blocks and
    memory_bytes size each rank's cache, which holds that rank's KV heads. shutdown() (or
    leaving a `with LLM(...)` block) stops the workers; a dead worker makes the next call
    raise a RuntimeError naming its rank.
    device: where a model given by path or builder runs ("cpu", "cuda"; default: the
    builder's choice, and for a path with N > 1 the GPU when there is one).
    host_cache_bytes, disk_cache_dir, disk_cache_bytes: tiers below the prefix cache
    (tiers/tiered_cache.py; they need prefix caching, and N = 1). A cached block the
    KV cache evicts is copied to a host-memory LRU of host_cache_bytes (pinned on CUDA;
    0 or None: none);
    every cached block is also written to disk_cache_dir (an LRU of disk_cache_bytes,
    default 16 GiB, shared safely by engines, kept across restarts). A prompt's prefix is
    looked up in the KV cache, then the host tier, then the disk, and what a tier holds is
    copied back instead of computed: RequestOutput.metrics.num_cached_tokens counts it,
    stats.num_host_hit_tokens / num_disk_hit_tokens say where it came from.
    pack_linear_weights (None: on for a model on the CPU) runs the model's nn.Linear
    layers through weights packed once for oneDNN (layers/packed_linear.py: 1.1-7x
    faster products; bf16/fp16 ones in float32 on a CPU without native half-precision
    dot products, at the memory of a float32 copy of the weights). It changes the
    model's nn.Linear modules in place (to PackedLinear: same parameters, any other
    caller gets the packed path too); num_packed_linears counts them.
    cpu_tuning ("auto", "off" or a path; None: $PAGEDKV_CPU_TUNING, else "auto") picks
    every CPU-side performance choice of a CPU model (which linear products run packed,
    the attention kernels' ISA variant and tiling, the cascade rule) from the CPU tuning
    table of this machine (torch_pagedkv/cpu_tuning): "auto" reads the table cached for
    this CPU identity and measures what it lacks (at most 20 s, one progress line),
    a path does the same with that file, "off" takes the documented defaults. No choice
    changes results beyond float rounding order. llm.cpu_tuning says what is in force.
    """

    def __init__(self, model, num_blocks: Optional[int] = None, *,
                 memory_bytes: Optional[int] = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                 max_model_len: Optional[int] = None, cache_dtype: Optional[torch.dtype] = None,
                 compile: bool = True, compile_backend: str = "inductor",
                 cuda_graphs: Optional[bool] = None,
                 tokenizer: Any = None, preemption_mode: str = "recompute",
                 swap_space_bytes: Optional[int] = None,
                 enable_cascade: Optional[bool] = None, tensor_parallel_size: int = 1,
                 device: Union[str, torch.device, None] = None,
                 host_cache_bytes: Optional[int] = None,
                 disk_cache_dir: Union[str, os.PathLike, None] = None,
                 disk_cache_bytes: Optional[int] = None,
                 pack_linear_weights: Optional[bool] = None,
                 cpu_tuning: Union[str, os.PathLike, None] = None) -> None:
        # Every rank of a tensor-parallel engine builds it from the same arguments.
        engine_args = {k: v for k, v in locals().items()
                       if k not in ("self", "model", "tokenizer", "tensor_parallel_size", "device")}
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, "
                             f"got {preemption_mode!r}")
        if swap_space_bytes is not None and preemption_mode != "swap":
            raise ValueError("swap_space_bytes sizes the swap space of "
                             "preemption_mode='swap'; pass that too, or drop swap_space_bytes")
        tiered = bool(host_cache_bytes) or (disk_cache_dir, disk_cache_bytes) != (None, None)
        if tiered and not enable_prefix_caching:
            raise ValueError("host_cache_bytes, disk_cache_dir and disk_cache_bytes are tiers "
                             "of the prefix cache: they need enable_prefix_caching=True")
        if tiered and tensor_parallel_size != 1:
            raise ValueError("the host and disk cache tiers are not supported with "
                             "tensor_parallel_size > 1 yet; drop them or run on one rank")
        self.tp = None  # the ranks of a tensor-parallel engine (distributed/)
        if tensor_parallel_size != 1:
            from ..distributed import TensorParallel
            self.tp = TensorParallel.start(model, tensor_parallel_size, device, engine_args,
                                           engine=LLM)
            model = self.tp.model  # this rank's shard
            tokenizer = self.tp.tokenizer if tokenizer is None else tokenizer
        elif isinstance(model, (str, os.PathLike)) or (
                callable(model) and not hasattr(model, "forward")):  # a builder, as for N > 1
            model, saved_tokenizer = load_model(model, None if device is None
                                                else torch.device(device))
            tokenizer = saved_tokenizer if tokenizer is None else tokenizer
        try:
            self._build(model, tokenizer, **engine_args)
            if self.tp is not None:  # rank 0 returns; any other rank serves until stopped
                weakref.finalize(self, self.tp.close)
                self.tp.connect(self.runner)
        except BaseException:
            if self.tp is not None:
                self.tp.close()
            raise

    def _build(self, model, tokenizer, *, num_blocks, memory_bytes, block_size,
               enable_prefix_caching, enable_chunked_prefill, max_num_batched_tokens,
               max_num_seqs, max_model_len, cache_dtype, compile, compile_backend, cuda_graphs,
               preemption_mode, swap_space_bytes, enable_cascade, host_cache_bytes,
               disk_cache_dir, disk_cache_bytes, pack_linear_weights, cpu_tuning) -> None:
        """Everything after the model is known: cache, scheduler, runner."""
        if isinstance(tokenizer, (str, os.PathLike)):
            from .checkpoint import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is not None and not (hasattr(tokenizer, "encode")
                                          and hasattr(tokenizer, "decode")):
            raise TypeError(f"tokenizer must have encode() and decode(), got "
                            f"{type(tokenizer).__name__}")
        if is_hf_model(model):
            from ..integrations.hf import as_paged_model
            model = as_paged_model(model)  # refuses a model it cannot route
        cache_dtype = cache_dtype or model.dtype
        self.cpu_tuning: Optional[CpuTuning] = None
        tuned_cascade = None
        if model_device(model).type == "cpu":
            self.cpu_tuning = resolve(cpu_tuning, contexts_for_model(
                model, cache_dtype, block_size, cascade=enable_cascade is None))
            self.cpu_tuning.apply()
            tuned_cascade = self.cpu_tuning.cascade_rule(attention_context(
                "cascade", cache_dtype, *_heads(model), block_size))
        self.num_packed_linears = 0
        if pack_linear_weights or (pack_linear_weights is None
                                   and model_device(model).type == "cpu"):
            self.num_packed_linears = packed_linear.pack_linear_weights(model)
        if num_blocks is None and memory_bytes is None:
            memory_bytes = DEFAULT_MEMORY_BYTES
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model)
        self.kv_cache = KVCache(model.num_layers, model.num_kv_heads, model.head_size,
                                block_size, num_blocks=num_blocks, memory_bytes=memory_bytes,
                                dtype=cache_dtype, device=self.device)
        self.tiers: Optional[TieredCache] = None
        if host_cache_bytes or (disk_cache_dir, disk_cache_bytes) != (None, None):
            self.tiers = TieredCache(self.kv_cache, model, host_cache_bytes=host_cache_bytes,
                                     disk_cache_dir=disk_cache_dir,
                                     disk_cache_bytes=disk_cache_bytes)
        self.block_manager = BlockManager(
            self.kv_cache.num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
            hash_seed=self.tiers and self.tiers.hash_seed, tiers=self.tiers)
        self.swap: Optional[SwapSpace] = None
        if preemption_mode == "swap":
            budget = swap_space_bytes
            if budget is None:
                budget = min(DEFAULT_SWAP_BYTES, self.kv_cache.nbytes)
            self.swap = SwapSpace.for_budget(self.kv_cache, budget)
        self.preemption_mode = preemption_mode
        limit = getattr(model, "max_position", None) or self.kv_cache.num_blocks * block_size
        self.max_model_len = min(max_model_len or limit, limit,
                                 self.kv_cache.num_blocks * block_size)
        if not enable_chunked_prefill:  # a whole sequence (a recompute too) fits one step
            self.max_model_len = min(self.max_model_len, max_num_batched_tokens)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                   enable_chunked_prefill=enable_chunked_prefill, swap=self.swap)
        self.runner = ModelRunner(model, self.kv_cache, self.block_manager,
                                  max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=self.max_model_len, compile=compile,
                                  compile_backend=compile_backend, swap=self.swap,
                                  tiers=self.tiers,
                                  cuda_graphs=self._want_cuda_graphs(cuda_graphs),
                                  cascade=_cascade_rule(enable_cascade, tuned_cascade))
        self.stats = EngineStats()
        self.limits = Limits(model.vocab_size, self.max_model_len, max_num_seqs, tokenizer)
        self._requests: dict[int, Request] = {}  # unfinished, by request_id
        self._next_request_id = 0
        self._next_seq_id = 0

    def _want_cuda_graphs(self, cuda_graphs: Optional[bool]) -> bool:
        if cuda_graphs is None:  # not yet with tensor parallelism: NCCL capture is untested
            return self.device.type == "cuda" and self.tp is None
        return bool(cuda_graphs)

    @property
    def num_compiled_graphs(self) -> int:
        return self.runner.num_compiled_graphs

    # ------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    *, cache_salt: Optional[str] = None) -> Request:
        """Queue one request (text needs a tokenizer); checked first, so a bad one
        raises and queues nothing."""
        return self._enqueue(check_request(prompt, params, self.limits, cache_salt))

    def _enqueue(self, checked: Checked) -> Request:
        params = checked.params
        req = Request(self._next_request_id, checked.token_ids, params, time.perf_counter(),
                      checked.cache_salt, checked.prompt)
        self._next_request_id += 1
        for i in range(params.n):
            req.sequences.append(Sequence(self._next_seq_id, req, i,
                                          params.generator(i, self.device)))
            self._next_seq_id += 1
        self._requests[req.request_id] = req
        self.scheduler.add(req.sequences[0])
        return req

    def abort(self, request_id: int) -> None:
        """Cancel a request wherever it is (waiting, running, swapped out): its blocks
        are freed (committed full blocks stay in the prefix cache) and it takes no part
        in later steps; its samples end with finish_reason "abort". An unknown or
        finished id is a no-op. A Request or RequestOutput may stand for its id."""
        req = self._requests.pop(getattr(request_id, "request_id", request_id), None)
        if req is None:
            return
        self.scheduler.abort(req)
        req.metrics.latency = time.perf_counter() - req.arrival_time
        self.stats.num_aborted += 1

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (vLLM's name and answer): False, and nothing dropped,
        while requests are unfinished; True once no block is cached. The host and disk
        tiers keep their copies."""
        return not self.has_unfinished() and self.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------ one step
    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if not out.scheduled:
            return StepOutput(out, [])
        sampled = self.runner.execute(out) if self.tp is None else self._execute_parallel(out)
        tokens = [] if sampled is None else sampled.tolist()  # the step's one device sync
        now = time.perf_counter()
        finished = self.scheduler.update(out, tokens, now)
        if self.tiers is not None:  # the blocks this step cached, to the disk tier
            self.tiers.write_through()
        done = []
        for s in finished:
            req = s.request
            if req.finished and self._requests.pop(req.request_id, None) is not None:
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
            st.num_decode_step_tokens += out.num_decode_tokens
        st.num_preemptions += len(out.preempted)
        st.num_swapped_out += len(out.swapped)
        st.num_swapped_out_blocks += len(out.swap_out)
        st.num_swapped_in_blocks += len(out.swap_in)
        st.num_cow_copies += len(out.copies)
        st.num_cascade_steps += self.runner.last_metadata.cascade is not None
        st.peak_blocks_used = max(st.peak_blocks_used, used)
        st.prefix_queries, st.prefix_hits = bm.stats.queries, bm.stats.hits
        if self.tiers is not None:
            ts = self.tiers.stats
            st.num_host_hit_tokens, st.num_disk_hit_tokens = ts.host_hit_tokens, ts.disk_hit_tokens
            st.num_tier_saved_blocks, st.num_disk_written_blocks = (ts.saved_blocks,
                                                                    ts.written_blocks)
        return StepOutput(out, tokens, done, now - t0)

    def _execute_parallel(self, out: SchedulerOutput) -> Optional[torch.Tensor]:
        self.tp.check()  # a dead worker is named here, before any collective
        try:
            return self.runner.execute(out)
        except RuntimeError as e:  # a collective failed: name the rank, stop every worker
            raise self.tp.fail(e) from e
        except BaseException as e:  # an interrupt mid-step leaves the ranks out of step
            self.tp.fail(e)
            raise

    # ------------------------------------------------------------ lifecycle
    @property
    def is_driver(self) -> bool:
        """True on the rank that generates: rank 0 of a tensor-parallel engine (under
        torchrun the other ranks' LLM(...) returns once rank 0 shuts down)."""
        return self.tp is None or self.tp.is_driver

    def shutdown(self) -> None:
        """Stop a tensor-parallel engine's workers and leave its process group
        (idempotent; also done when the engine is collected and at exit). A
        single-process engine has nothing to stop."""
        if self.tp is not None:
            self.tp.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------ the batch API
    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None, *,
                 use_tqdm: bool = True, cache_salts: Optional[Seq[Optional[str]]] = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (token ids, or text with a tokenizer); results in
        prompt order. Every prompt is checked before any is queued."""
        reqs = [self._enqueue(c) for c in check_batch(prompts, params, cache_salts, self.limits)]
        try:
            with tqdm(total=len(reqs), desc="generate", unit="req", disable=not use_tqdm,
                      dynamic_ncols=True) as bar:
                while self.has_unfinished():
                    step = self.step()
                    if step.finished:
                        bar.update(len(step.finished))
        except BaseException:  # an error or an interrupt: leave nothing queued
            for r in reqs:
                self.abort(r.request_id)
            raise
        return [self.output(r) for r in reqs]

    def stream(self, prompts: Union[Prompt, Seq[Prompt]],
               params: Union[SamplingParams, Seq[SamplingParams], None] = None, *,
               cache_salts: Optional[Seq[Optional[str]]] = None) -> Iterator[RequestOutput]:
        """Like generate(), but yields as steps produce them each request's new tokens
        (and text): one RequestOutput per request and step, holding the samples that
        grew, each with only its new tokens; `finished` marks a request's last one.
        Leaving the loop early aborts the requests still unfinished."""
        reqs = [self._enqueue(c) for c in check_batch(prompts, params, cache_salts, self.limits)]
        streamer = Streamer(reqs, self.tokenizer)
        try:
            while not streamer.done:
                yield from streamer.outputs(self.step())
        finally:
            for r in reqs:
                self.abort(r.request_id)  # a no-op for the finished ones

    def output(self, request: Request) -> RequestOutput:
        """The request's outputs so far (with text, given a tokenizer)."""
        decode = None if self.tokenizer is None else partial(text.decode, self.tokenizer)
        return RequestOutput.of(request, decode)
