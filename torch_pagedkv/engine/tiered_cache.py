"""Moved to torch_pagedkv.tiers.tiered_cache; this name stays the same module (imports and patches alike)."""
import sys

from ..tiers import tiered_cache

sys.modules[__name__] = tiered_cache
