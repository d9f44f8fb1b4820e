"""Shared test settings: hypothesis profiles and the devices every op test runs on."""
import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

# The engine's CPU tuning (LLM(cpu_tuning=None) reads PAGEDKV_CPU_TUNING): tests run on
# the documented defaults unless a test asks for a table itself (tests/test_cpu_tuning.py),
# so no test measures for seconds or depends on this machine's table.
os.environ.setdefault("PAGEDKV_CPU_TUNING", "off")

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Op tests are parametrized over these; CUDA cases are skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "simt_sample(n): on the SIMT emulator, CI runs one case in n of this grid "
        "(a fixed choice by test id); PAGEDKV_SIMT_FULL=1 runs every case")


def pytest_collection_modifyitems(config, items):
    """Deselects the emulated cases that a simt_sample(n) grid leaves out of CI."""
    if os.environ.get("PAGEDKV_SIMT_FULL", "0") not in ("", "0"):
        return
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("simt_sample")
        emulated = "simt" in getattr(getattr(item, "callspec", None), "id", "").split("-")
        if mark and emulated and zlib.crc32(item.nodeid.encode()) % mark.args[0] != 0:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
