"""The kernels' runtime knobs (torch_pagedkv.knobs): set returns the previous value,
override restores on exit (errors included), bad names and values are refused in the ops'
voice, the environment is read once per process, and paged_attention matches the
reference with the generic kernels on and off."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import torch_pagedkv as pk
from torch_pagedkv import knobs, reference
from paged_inputs import ATOL, make_batch


def current(name: str) -> str:
    """A knob's value: set_knob is the only accessor, so set any value and put it back."""
    value = knobs.set_knob(name, "auto" if name in ("attention_path", "decode_splits") else "0")
    knobs.set_knob(name, value)
    return value


def test_set_returns_the_previous_value():
    first = knobs.set_knob("attention_path", "prefill")
    try:
        assert knobs.set_knob("attention_path", "decode") == "prefill"
        assert knobs.set_knob("attention_path", "auto") == "decode"
    finally:
        knobs.set_knob("attention_path", first)


def test_a_flag_takes_a_bool_or_its_string_and_reports_the_string():
    first = knobs.set_knob("generic_kernels", True)
    try:
        assert knobs.set_knob("generic_kernels", False) == "1"
        assert knobs.set_knob("generic_kernels", "1") == "0"
    finally:
        knobs.set_knob("generic_kernels", first)


def test_override_sets_then_restores_nested():
    before = {name: current(name) for name in knobs.KNOBS}
    with knobs.override(generic_kernels=True, attention_path="decode", debug=True,
                        decode_splits="3"):
        assert {name: current(name) for name in knobs.KNOBS} == \
            {"generic_kernels": "1", "attention_path": "decode", "debug": "1",
             "decode_splits": "3"}
        with knobs.override(attention_path="prefill"):
            assert current("attention_path") == "prefill"
        assert current("attention_path") == "decode"
    assert {name: current(name) for name in knobs.KNOBS} == before


def test_override_restores_after_an_error_inside_or_a_bad_value():
    before = current("generic_kernels")
    with pytest.raises(ValueError, match="inside"):
        with knobs.override(generic_kernels=before == "0"):
            raise ValueError("inside")
    assert current("generic_kernels") == before
    with pytest.raises(RuntimeError, match="attention_path must be one of"):
        with knobs.override(generic_kernels=before == "0", attention_path="sideways"):
            pass
    assert current("generic_kernels") == before


@pytest.mark.parametrize("name,value,message", [
    ("generic", "1", "_set_knob: name must be one of generic_kernels, attention_path, debug, "
                     "decode_splits, got 'generic'"),
    ("decode_splits", "5", "_set_knob: value of decode_splits must be one of auto, 1, 2, 3, 4, "
                           "8, 16, got '5'"),
    ("generic_kernels", "yes", "_set_knob: value of generic_kernels must be one of 0, 1, "
                               "got 'yes'"),
    ("attention_path", "Decode", "_set_knob: value of attention_path must be one of auto, "
                                 "decode, prefill, got 'Decode'"),
    ("debug", "", "_set_knob: value of debug must be one of 0, 1, got ''"),
])
def test_bad_name_or_value_is_refused(name, value, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        knobs.set_knob(name, value)


READ_ONCE = """
import os, torch_pagedkv
from torch_pagedkv import knobs
print(knobs.set_knob("generic_kernels", "0"), knobs.set_knob("attention_path", "auto"),
      knobs.set_knob("debug", "0"))
os.environ["PAGEDKV_GENERIC_KERNELS"] = "1"
print(knobs.set_knob("generic_kernels", "0"))
"""


def test_environment_is_read_once_at_start():
    env = {**os.environ, "PAGEDKV_GENERIC_KERNELS": "1", "PAGEDKV_ATTENTION_PATH": "decode",
           "PAGEDKV_DEBUG": "true"}
    run = subprocess.run([sys.executable, "-c", READ_ONCE], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["1 decode 1", "0"]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size,block_size", [(128, 16), (64, 8)])
def test_both_kernel_kinds_match_the_reference(generic, dtype, head_size, block_size):
    seqs = [(1, 37), (5, 5), (0, 20), (3, 100), (17, 50), (1, 1)]
    batch = make_batch(seqs, 8, 2, head_size, block_size, dtype, seed=head_size + block_size)
    scale = 1.0 / math.sqrt(head_size)
    with knobs.override(generic_kernels=generic):
        out = pk.paged_attention(*batch.attention_args(), scale)
    ref = reference.paged_attention(*batch.attention_args(), scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)
