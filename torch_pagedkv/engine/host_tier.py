"""Moved to torch_pagedkv.tiers.host; this name stays the same module (imports and patches alike)."""
import sys

from ..tiers import host

sys.modules[__name__] = host
