"""Moved to torch_pagedkv.tiers.disk; this name stays the same module (imports and patches alike)."""
import sys

from ..tiers import disk

sys.modules[__name__] = disk
