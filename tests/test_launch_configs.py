"""The CUDA launch-config table: the shipped file loads and validates, bad files are
refused with the field named, the C++ heuristic covers every (head size, dtype, block
size) the ops accept, and the Python and C++ validity rules agree. Runs without a GPU
(the C++ parts need a CUDA build of the kernels, not a device)."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import torch_pagedkv as pk
from torch_pagedkv.tuning import table
from torch_pagedkv.tuning.table import Entry, LaunchConfig, TableError

needs_cuda_build = pytest.mark.skipif(not pk.HAS_CUDA_KERNELS,
                                      reason="built without CUDA kernels")
GOOD = dict(gpu="NVIDIA H100 80GB HBM3", head_size=128, dtype="bfloat16", block_size=16,
            decode_threads=128, partition_size=512, prefill_threads=128, write_threads=256)


def doc(*rows) -> str:
    return json.dumps({"version": 1, "entries": list(rows)})


# A table of the shape `pagedkv tune` writes, with entries for two GPUs: the shipped file
# is empty until the first GPU run, so the checks below run on this one too.
FIXTURE = pathlib.Path(__file__).parent / "data" / "launch_configs_fixture.json"


@pytest.mark.parametrize("path", [table.DEFAULT_PATH, FIXTURE], ids=["shipped", "fixture"])
def test_table_loads_and_validates(path):
    entries = table.load(path)
    assert len({e.key for e in entries}) == len(entries)
    assert all(e.config.error() is None for e in entries)


def test_fixture_is_not_empty_and_one_bad_entry_refuses_the_file(tmp_path):
    raw = json.loads(FIXTURE.read_text())
    assert len(table.load(FIXTURE)) == len(raw["entries"]) >= 10
    raw["entries"][3]["partition_size"] = 96
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(TableError, match=re.escape("entries[3]: partition_size must be")):
        table.load(bad)


@needs_cuda_build
def test_every_fixture_entry_is_what_its_launch_uses():
    entries = table.load(FIXTURE)
    try:
        assert table.apply(entries) == len(entries)
        for e in entries:
            assert table.lookup(*e.key) == (e.config, True), e.key
        config, from_table = table.lookup("NVIDIA H100 80GB HBM3", 128, "float16", 16)
        assert not from_table and config == table.heuristic(128, "float16", 16)
    finally:
        torch.ops.pagedkv._clear_launch_configs()
        table.install()


def test_round_trip(tmp_path):
    entries = [Entry("GPU A", 128, "bfloat16", 16, LaunchConfig(256, 1024, 128, 128),
                     {"decode_us": {"64x4096": 100.5}}),
               Entry("GPU B", 64, "float8_e5m2", 8, LaunchConfig(64, 256, 256, 512))]
    path = tmp_path / "t.json"
    table.save(entries, path)
    assert sorted(table.load(path), key=lambda e: e.key) == sorted(entries, key=lambda e: e.key)


def test_merge_replaces_only_the_same_keys():
    a = Entry("GPU A", 128, "bfloat16", 16, LaunchConfig(128, 512, 128, 256))
    b = Entry("GPU B", 128, "bfloat16", 16, LaunchConfig(128, 512, 128, 256))
    a2 = Entry("GPU A", 128, "bfloat16", 16, LaunchConfig(256, 256, 64, 64))
    assert sorted(table.merge([a, b], [a2]), key=lambda e: e.key) == [a2, b]


@pytest.mark.parametrize("change,message", [
    (dict(decode_threads=100), "decode_threads must be 64, 128 or 256, got 100"),
    (dict(partition_size=96), "partition_size must be a multiple of 64 in [64, 1024], got 96"),
    (dict(partition_size=2048), "partition_size must be a multiple of 64"),
    (dict(prefill_threads=512), "prefill_threads must be 64, 128 or 256, got 512"),
    (dict(write_threads=48), "write_threads must be a multiple of 32 in [64, 512], got 48"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(head_size=100), "head_size must be a multiple of 8 in [8, 512], got 100"),
    (dict(block_size=0), "block_size must be in [1, 256], got 0"),
    (dict(gpu=""), "gpu must be a non-empty string"),
    (dict(decode_threads="128"), "decode_threads must be an integer"),
    (dict(threads=128), "unknown fields ['threads']"),
])
def test_bad_entry_is_refused_naming_the_field(change, message):
    with pytest.raises(TableError, match=re.escape("entries[0]: " + message)):
        table.parse(doc({**GOOD, **change}))


def test_bad_files_are_refused():
    with pytest.raises(TableError, match="missing \\['write_threads'\\]"):
        table.parse(doc({k: v for k, v in GOOD.items() if k != "write_threads"}))
    with pytest.raises(TableError, match="repeats the key of entries\\[0\\]"):
        table.parse(doc(GOOD, {**GOOD, "decode_threads": 256}))
    with pytest.raises(TableError, match="version"):
        table.parse(json.dumps({"entries": []}))
    with pytest.raises(TableError, match="not JSON"):
        table.parse("{")


@needs_cuda_build
def test_heuristic_covers_every_accepted_shape():
    heads = list(table.SPECIALIZED_HEAD_SIZES) + [8, 24, 40, 136, 264, 512]
    blocks = list(table.SPECIALIZED_BLOCK_SIZES) + [1, 2, 5, 12, 64, 256]
    for head in heads:
        for dtype in table.DTYPES:
            for block in blocks:
                config, from_table = table.lookup("<a gpu not in the table>", head, dtype, block)
                assert not from_table
                assert config.error() is None, (head, dtype, block, config)


@needs_cuda_build
def test_python_and_cpp_rules_agree():
    base = LaunchConfig(128, 512, 128, 256)
    candidates = [base]
    for d in (32, 64, 96, 128, 192, 256, 512):
        candidates.append(LaunchConfig(d, 512, 128, 256))
    for p in (0, 32, 64, 100, 128, 960, 1024, 1088):
        candidates.append(LaunchConfig(128, p, 128, 256))
    for f in (32, 64, 128, 256, 512):
        candidates.append(LaunchConfig(128, 512, f, 256))
    for w in (32, 64, 80, 96, 512, 544, 1024):
        candidates.append(LaunchConfig(128, 512, 128, w))
    try:
        for c in candidates:
            try:
                torch.ops.pagedkv._set_launch_config("rules test", 64, "float16", 16,
                                                     c.decode_threads, c.partition_size,
                                                     c.prefill_threads, c.write_threads)
                cpp_ok = True
            except RuntimeError:
                cpp_ok = False
            assert cpp_ok == (c.error() is None), c
    finally:
        torch.ops.pagedkv._clear_launch_configs()
        table.install()


@needs_cuda_build
def test_applied_entries_are_used_and_keys_are_exact():
    entry = Entry("test GPU", 96, "float8_e4m3fn", 32, LaunchConfig(256, 1024, 64, 512))
    try:
        assert table.apply([entry]) == 1
        assert table.lookup("test GPU", 96, "float8_e4m3fn", 32) == (entry.config, True)
        assert table.lookup("test GPU", 96, "float8_e5m2", 32)[1] is False
        assert table.lookup("test GPU", 96, "float8_e4m3fn", 16)[1] is False
        assert table.lookup("other GPU", 96, "float8_e4m3fn", 32)[1] is False
    finally:
        torch.ops.pagedkv._clear_launch_configs()
        table.install()


# What a fresh process installs, through the lazy path of a CUDA build (the first
# launch-config lookup runs table.install()) or, without CUDA kernels, by calling it.
FIRST_LOOKUP = """
import torch_pagedkv as pk
from torch_pagedkv.tuning import table
if pk.HAS_CUDA_KERNELS:
    print(table.lookup('env GPU', 128, 'bfloat16', 16))
else:
    print(table.install())
"""


def test_user_table_from_environment(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(doc({**GOOD, "gpu": "env GPU", "decode_threads": 64}))
    run = subprocess.run([sys.executable, "-c", FIRST_LOOKUP], capture_output=True, text=True,
                         env={**os.environ, table.ENV_PATH: str(path)})
    assert run.returncode == 0, run.stderr
    if pk.HAS_CUDA_KERNELS:
        assert "decode_threads=64" in run.stdout and "True" in run.stdout
    path.write_text("{ broken")
    run = subprocess.run([sys.executable, "-c", FIRST_LOOKUP], capture_output=True, text=True,
                         env={**os.environ, table.ENV_PATH: str(path)})
    assert run.returncode == 0 and "ignored" in run.stderr


LAZY_INSTALL = """
import torch, torch_pagedkv
from torch_pagedkv.tuning import table
calls = []
install = table.install
table.install = lambda: calls.append(1) or install()
for _ in range(2):
    from_table = torch.ops.pagedkv._launch_config('env GPU', 128, 'bfloat16', 16)[4]
    print(f"installs={len(calls)} from_table={from_table}")
"""


@needs_cuda_build
def test_first_lookup_installs_the_table_once(tmp_path):
    """The first lookup installs the table (a launch looks up the same way), so import did
    not, and later lookups do not again. The shipped table is empty today, so the entry
    comes from a user file, installed by the same call."""
    path = tmp_path / "mine.json"
    path.write_text(doc({**GOOD, "gpu": "env GPU"}))
    run = subprocess.run([sys.executable, "-c", LAZY_INSTALL], capture_output=True, text=True,
                         env={**os.environ, table.ENV_PATH: str(path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["installs=1 from_table=1"] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("command", ["tune", "occupancy"])
def test_commands_without_gpu_exit_nonzero_with_a_message(command):
    run = subprocess.run([sys.executable, "-m", "torch_pagedkv.cli", command],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert f"pagedkv {command}: no CUDA device" in run.stderr
    assert "Traceback" not in run.stderr
