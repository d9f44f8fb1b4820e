"""Models the engine can drive: the PagedModel protocol and a tiny Llama."""
from .base import KVCaches, KVScales, PagedModel
from .llama import LlamaConfig, TinyLlama

__all__ = ["PagedModel", "KVCaches", "KVScales", "LlamaConfig", "TinyLlama"]
