"""The drop-in attention layer, its per-step metadata, and the one write-then-attend."""
from .attention import PagedAttention, write_and_attend
from .metadata import AttentionMetadata, CascadeMetadata

__all__ = ["PagedAttention", "AttentionMetadata", "CascadeMetadata", "write_and_attend"]
