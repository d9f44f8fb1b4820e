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


# A value every knob takes (its default): set_knob is the only accessor.
DEFAULTS = {"generic_kernels": "0", "attention_path": "auto", "debug": "0",
            "decode_splits": "auto", "cpu_isa": "auto", "cpu_vectors_per_head": "32",
            "cpu_vectors_per_item": "64", "cpu_prefix_vectors_per_head": "256",
            "cpu_serial_products": "2048"}


def current(name: str) -> str:
    """A knob's value: set_knob is the only accessor, so set any value and put it back."""
    value = knobs.set_knob(name, DEFAULTS[name])
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
    changed = {"generic_kernels": "1", "attention_path": "decode", "debug": "1",
               "decode_splits": "3", "cpu_isa": "avx2", "cpu_vectors_per_head": "16",
               "cpu_vectors_per_item": "128", "cpu_prefix_vectors_per_head": "64",
               "cpu_serial_products": "0"}
    if "avx2" not in knobs.cpu_isa_info()["runnable"]:  # a non-x86 build
        changed["cpu_isa"] = "auto"
    with knobs.override(**changed):
        assert {name: current(name) for name in knobs.KNOBS} == changed
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
                     "decode_splits, cpu_isa, cpu_vectors_per_head, cpu_vectors_per_item, "
                     "cpu_prefix_vectors_per_head, cpu_serial_products, got 'generic'"),
    ("cpu_isa", "native", "_set_knob: value of cpu_isa must be one of auto, avx2, avx512, "
                          "avx512_bf16, got 'native'"),
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
