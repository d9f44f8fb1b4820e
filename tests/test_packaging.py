"""The built library is tied to the torch minor version it was compiled against."""
import os

import pytest
import torch

from torch_pagedkv import _load


def major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def test_build_records_the_running_torch_version():
    record = os.path.join(os.path.dirname(_load.LIBRARY_PATH), "_C.torch")
    with open(record) as f:
        built = f.read().strip()
    assert major_minor(built) == major_minor(torch.__version__)


def test_load_check_refuses_another_torch_minor_version():
    with pytest.raises(ImportError, match=r"built against torch 2\.14 but torch 2\.11 is running"):
        _load.check_torch("2.14.1", running="2.11.0")


@pytest.mark.parametrize("running", ["2.14.0", "2.14.3+cu128", "2.14.1+cpu"])
def test_load_check_accepts_any_patch_or_local_build_of_the_same_minor(running):
    _load.check_torch("2.14.1", running=running)
