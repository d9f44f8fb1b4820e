"""The reference engine: LLM.generate with continuous batching, chunked prefill,
prefix caching, preemption by recompute and parallel sampling by fork."""
from .llm import LLM, StepOutput
from .request import CompletionOutput, Request, RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .stats import EngineStats

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "Request", "EngineStats", "StepOutput"]
