"""CUDA launch configurations: the shipped table (table.py), `pagedkv tune` (tune.py) and
`pagedkv occupancy` (occupancy.py). Importing this package installs the table into the
kernels once per process."""
from . import table

INSTALLED_ENTRIES = table.install()

__all__ = ["table", "INSTALLED_ENTRIES"]
