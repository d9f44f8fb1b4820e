"""Moved to torch_pagedkv.tiers.protocol; this name stays the same module (imports and patches alike)."""
import sys

from ..tiers import protocol

sys.modules[__name__] = protocol
