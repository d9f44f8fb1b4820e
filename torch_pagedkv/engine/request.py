"""Requests, their sequences, and what generate() returns.

A Request is one prompt with its SamplingParams. It owns n Sequences, one per
sample: the first (the parent) computes the prompt; when its prefill ends the
other n - 1 are forked from it and share its prompt blocks (copy-on-write).
A Sequence is what the scheduler moves between the waiting and running queues.
While it holds cache blocks, `seq.block_table` is the BlockManager's live handle for
it (block ids, tokens held, tokens committed); its progress, `num_computed_tokens`,
is read from that handle, the one counter of how far its K/V are in the cache.
A sequence preempted by swap waits with its K/V in the swap space (`seq.swapped`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..cache.block_manager import BlockTable
from .sampling import SamplingParams
from .swap import SwappedOut


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or (a child sample) waiting for its parent's prefill
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: waiting, its K/V in the swap space
    FINISHED = "finished"  # done, or aborted (finish_reason "abort")


class Sequence:
    """One sample stream: tokens, its block table while it holds blocks, its status."""

    def __init__(self, seq_id: int, request: "Request", index: int,
                 generator: Optional[torch.Generator]) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index  # sample index within its request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.block_table: Optional[BlockTable] = None  # by allocate/fork; None when preempted
        self.swapped: Optional[SwappedOut] = None  # while SWAPPED
        self.status = SequenceStatus.WAITING
        self.generator = generator
        self.finish_reason: Optional[str] = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V are in the cache: committed to (or reused from) it."""
        return 0 if self.block_table is None else self.block_table.num_committed

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")


@dataclass
class RequestMetrics:
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at admission
    time_to_first_token: Optional[float] = None  # seconds from arrival
    latency: Optional[float] = None  # seconds from arrival to the last sample's end
    num_preemptions: int = 0  # times a sequence of this request was preempted


class Request:
    def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, cache_salt: Optional[str] = None,
                 prompt: Optional[str] = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt = prompt  # the text, when the prompt was given as text
        self.params = params
        self.arrival_time = arrival_time
        self.cache_salt = cache_salt
        self.sequences: list[Sequence] = []
        self.admitted = False
        self.forked = params.n == 1
        self.metrics = RequestMetrics(num_prompt_tokens=len(self.prompt_token_ids))

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.sequences)


@dataclass
class CompletionOutput:
    index: int  # the sample's index within its request
    token_ids: list[int]
    finish_reason: str  # "length" (max_tokens or max_model_len), "stop", "abort"; "" running
    text: Optional[str] = None  # the tokens decoded, when the engine has a tokenizer


@dataclass
class RequestOutput:
    """A request's samples. From generate(): whole outputs. From stream(): the tokens
    (and text) each sample gained in one step; `finished` marks the request's last one."""

    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    metrics: Optional[RequestMetrics] = None
    prompt: Optional[str] = None
    finished: bool = True

    @property
    def token_ids(self) -> list[int]:
        """The first listed sample's tokens (the only one when n == 1)."""
        return self.outputs[0].token_ids

    @property
    def text(self) -> Optional[str]:
        """The first listed sample's text (None without a tokenizer)."""
        return self.outputs[0].text

    @classmethod
    def of(cls, request: Request,
           decode: Optional[Callable[[list[int]], str]] = None) -> "RequestOutput":
        outputs = []
        for s in request.sequences:
            ids = s.output_token_ids
            outputs.append(CompletionOutput(s.index, ids, s.finish_reason or "",
                                            None if decode is None else decode(ids)))
        return cls(request.request_id, request.prompt_token_ids, outputs, request.metrics,
                   request.prompt, request.finished)
