"""Streaming: what each engine step added to a set of requests, as RequestOutputs.

`LLM.stream` steps the engine and hands every step to a `Streamer`, which yields one
RequestOutput per request that gained tokens: a CompletionOutput per sample that grew,
holding only the new tokens (and their text, see engine/text.py). A sample's pieces,
concatenated, are exactly its tokens (and text) in generate()'s result.
"""
from __future__ import annotations

from typing import Any, Iterable

from .request import CompletionOutput, Request, RequestOutput, SequenceStatus
from .text import TextStream


class Streamer:
    def __init__(self, requests: Iterable[Request], tokenizer: Any = None) -> None:
        self.requests = {r.request_id: r for r in requests}
        self.tokenizer = tokenizer
        self._sent: dict[int, int] = {}  # seq_id -> output tokens already handed out
        self._texts: dict[int, TextStream] = {}

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.requests.values())

    def outputs(self, step) -> list[RequestOutput]:
        """The step's new tokens (a StepOutput) of this streamer's requests, in the
        order the step scheduled them."""
        grew: dict[int, Request] = {}
        for sch in step.scheduled.scheduled:
            for seq in sch.samplers:
                if seq.request.request_id in self.requests:
                    grew.setdefault(seq.request.request_id, seq.request)
        return [self._delta(r) for r in grew.values()]

    def _delta(self, req: Request) -> RequestOutput:
        outputs = []
        for seq in req.sequences:
            ids = seq.output_token_ids
            new = ids[self._sent.get(seq.seq_id, 0):]
            if not new:
                continue
            self._sent[seq.seq_id] = len(ids)
            piece = None
            if self.tokenizer is not None:
                stream = self._texts.setdefault(seq.seq_id, TextStream(self.tokenizer))
                piece = stream.push(ids, seq.status is SequenceStatus.FINISHED)
            outputs.append(CompletionOutput(seq.index, new, seq.finish_reason or "", piece))
        return RequestOutput(req.request_id, req.prompt_token_ids, outputs, req.metrics,
                             req.prompt, req.finished)
