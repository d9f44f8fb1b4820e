"""The reference engine: LLM.generate (and stream, abort) with continuous batching,
chunked prefill, prefix caching, preemption by recompute or by swap, parallel sampling
by fork, text in and out through a tokenizer, and models by checkpoint path."""
from .llm import LLM, StepOutput
from .request import CompletionOutput, Request, RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .stats import EngineStats

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "Request", "EngineStats", "StepOutput"]
