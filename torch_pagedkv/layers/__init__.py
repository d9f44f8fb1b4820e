"""The drop-in attention layer and its per-step metadata."""
from .attention import PagedAttention
from .metadata import AttentionMetadata

__all__ = ["PagedAttention", "AttentionMetadata"]
