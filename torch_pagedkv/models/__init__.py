"""Models the engine can drive: the PagedModel protocol and a tiny Llama."""
from .base import KVCaches, KVScales, PagedModel

__all__ = ["PagedModel", "KVCaches", "KVScales"]
