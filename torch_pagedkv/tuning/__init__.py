"""CUDA launch configurations: the shipped table (table.py), `pagedkv tune` (tune.py) and
`pagedkv occupancy` (occupancy.py). The kernels install the table themselves, at the
first launch-config lookup of the process (torch_pagedkv/_launch_configs.py); importing this
package does not."""
from . import table

__all__ = ["table"]
