"""Moved to torch_pagedkv.tiers.block_file; this name stays the same module (imports and patches alike)."""
import sys

from ..tiers import block_file

sys.modules[__name__] = block_file
