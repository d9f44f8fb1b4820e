"""Every benchmark names the machine it ran on as probed, never a fixed string (issue 25).

The benchmarks are not run here (they take minutes); their sources are checked: each
prints and records `benchmarks.machine.line(...)`, and no string a benchmark prints or
writes names an ISA or CPU model literally (docstrings and comments, which explain
behaviour, may)."""
from __future__ import annotations

import ast
import glob
import json
import os
import re

import pytest

from benchmarks import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))
FIXED_NAME = re.compile(r"\b(AVX2|AVX-?512\w*|AMX|EPYC|Xeon|Zen ?\d)\b", re.I)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are module, class or function docstrings."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _strings(path: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant in the file (f-string parts included) that
    is not a docstring."""
    tree = ast.parse(open(path).read(), path)
    skip = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_there_are_benchmarks():
    assert len(BENCHES) >= 10


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_benchmark_names_the_probed_machine(path):
    assert "machine.line(" in open(path).read(), \
        f"{os.path.basename(path)} never prints benchmarks.machine.line(threads)"


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_no_fixed_isa_or_cpu_name_in_output_strings(path):
    bad = [(line, s) for line, s in _strings(path) if FIXED_NAME.search(s)]
    assert not bad, f"{os.path.basename(path)} writes a fixed ISA/CPU name: {bad}"


def test_the_scan_catches_a_fixed_name(tmp_path):
    f = tmp_path / "bench_x.py"
    f.write_text('"""Docstring may say AVX2."""\nprint(f"machine: {1} cores, AVX2")\n')
    assert [s for _, s in _strings(str(f)) if FIXED_NAME.search(s)] == [" cores, AVX2"]


def test_line_names_threads_and_the_probed_model():
    d = machine.as_dict(3)
    line = machine.line(3)
    assert line.startswith("Machine: ")
    assert "3 threads" in line and d["model"] in line and f"{d['cores']} cores" in line
    assert machine.line(1).endswith("1 thread")
    for flag in d["flags"]:
        assert flag in line


def test_as_dict_is_json_and_complete():
    d = json.loads(json.dumps(machine.as_dict(2)))
    assert {"model", "cpu_id", "flags", "cores", "torch", "threads"} <= set(d)
    assert d["threads"] == 2 and isinstance(d["flags"], list)
