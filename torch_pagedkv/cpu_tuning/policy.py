"""The CPU choices in force in this process, asked by the layers on every call.

The engine puts its tuned choices here when it is built (resolve.CpuTuning.apply); a
context with nothing put here follows its documented default (choices.default_for).
Kernel tiling and variant choices live in the kernels' knobs (torch_pagedkv.knobs);
the cascade rule is handed to the engine's planner. All of them are process-wide, as the
kernels' knobs are: the last engine built in a process sets them.
"""
from __future__ import annotations

import torch

from .choices import FLOAT32_PACKED_MAX_ROWS

# (weight dtype, out_features, in_features) -> (packed_min_rows, packed_max_rows)
_linear: dict[tuple[torch.dtype, int, int], tuple[int, int]] = {}


def linear_runs_packed(dtype: torch.dtype, out_features: int, in_features: int,
                       rows: int) -> bool:
    """A CPU linear product of `rows` rows by an [out, in] weight of dtype runs packed."""
    limits = _linear.get((dtype, out_features, in_features))
    if limits is None:  # the default (choices.default_for), at the current thread count
        if dtype != torch.float32:
            return True
        return rows <= FLOAT32_PACKED_MAX_ROWS and torch.get_num_threads() > 1
    return limits[0] <= rows <= limits[1]


def set_linear(dtype: torch.dtype, out_features: int, in_features: int,
               packed_max_rows: int | None, packed_min_rows: int = 1) -> None:
    """Puts a measured linear choice in force (None: back to the default)."""
    if packed_max_rows is None:
        _linear.pop((dtype, out_features, in_features), None)
    else:
        _linear[(dtype, out_features, in_features)] = (int(packed_min_rows), int(packed_max_rows))


def clear() -> None:
    _linear.clear()
