"""Plants three bugs in the CUDA kernels and shows that the emulated tests catch each one in
every thread order (issue 18: the emulator's teeth). For each mutant: copy the tree, apply
one edit, recompile the kernel files it touches with the flags of the last `make test`
build (build/temp*/build.ninja), link them with that build's other objects, and run a few
emulated tests against the mutant (PAGEDKV_SIMT_LIBRARY) in random, forward and reverse
order. Every run must fail; the report says which tests failed and how.

    make test   # or PAGEDKV_SIMT=1 make build: the objects this script reuses
    .venv/bin/python scripts/simt_teeth.py
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTANTS = [
    dict(name="decode kernel: the __syncthreads after staging the query and the running state "
              "removed",
         file="csrc/cuda/attention_decode.cuh",
         old="  __syncthreads();  // q_s, o_s, m_s, l_s are set\n", new="",
         rebuild=["kernels_decode_f32"],
         tests="test_decode_partition_edges or test_lse_of_split_k_rows or test_batch_kinds"),
    dict(name="prefill kernel: the key-validity flags placed one float further, so the last "
              "one lies past the launch's shared memory",
         file="csrc/cuda/attention_prefill.cuh",
         old="int* kval = reinterpret_cast<int*>(a_s + QV);",
         new="int* kval = reinterpret_cast<int*>(a_s + QV + 1);",
         rebuild=["kernels_prefill_f32"],
         tests="test_batch_kinds"),
    dict(name="split-K merge: the reduce kernel drops each row's last split",
         file="csrc/cuda/attention_decode.cuh",
         old="    for (int q = 0; q < active; ++q) {\n      if (!(ps[q] > 0.f)) continue;",
         new="    for (int q = 0; q < active - 1; ++q) {\n      if (!(ps[q] > 0.f)) continue;",
         rebuild=["kernels_decode_f32"],
         tests="test_decode_splits_walking_many_partitions or test_decode_partition_edges"),
]


def build_flags() -> tuple[list[str], str]:
    ninja = glob.glob(os.path.join(ROOT, "build", "temp*", "build.ninja"))
    if not ninja:
        sys.exit("no build/temp*/build.ninja: run `make test` (PAGEDKV_SIMT=1 make build) first")
    text = open(ninja[0]).read()
    if "-DPAGEDKV_SIMT" not in text:
        sys.exit("the last build was not the emulator's: run `PAGEDKV_SIMT=1 make build` first")
    get = lambda key: re.search(rf"^{key} = (.*)$", text, re.M).group(1)  # noqa: E731
    return shlex.split(get("cflags")) + shlex.split(get("post_cflags")), os.path.dirname(ninja[0])


def build_mutant(m: dict, flags: list[str], objdir: str, out: str) -> None:
    tree = os.path.join(out, "tree")
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
    path = os.path.join(tree, m["file"])
    src = open(path).read()
    assert src.count(m["old"]) == 1, f"{m['file']}: the text to mutate is not there once"
    open(path, "w").write(src.replace(m["old"], m["new"]))
    here = [f.replace(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc")) for f in flags]
    objects = {os.path.basename(o)[:-2]: o for o in glob.glob(os.path.join(objdir, "csrc", "simt", "*.o"))}
    for name in m["rebuild"]:
        obj = os.path.join(out, name + ".o")
        subprocess.run(["g++", *here, "-c", os.path.join(tree, "csrc", "simt", name + ".cpp"),
                        "-o", obj], check=True)
        objects[name] = obj
    torch_lib = os.path.join(os.path.dirname(cpp_extension.__file__), "..", "lib")
    subprocess.run(["g++", "-shared", "-o", os.path.join(out, "_simt.so"), *objects.values(),
                    f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
                    f"-Wl,-rpath,{torch_lib}"], check=True)


def run_tests(m: dict, lib: str, order: str) -> tuple[bool, str]:
    env = {**os.environ, "PAGEDKV_SIMT_LIBRARY": lib, "PAGEDKV_SIMT_ORDER": order}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_ops.py",
           "-k", f"simt and ({m['tests']})", "-o", "addopts=", "--tb=line"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = run.stdout.splitlines()
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in lines if ln.startswith("FAILED")]
    why = [ln for ln in lines if ln.startswith("E ") or "Error" in ln][:1]
    summary = lines[-1] if lines else run.stderr[-300:]
    return run.returncode != 0, f"{summary}; e.g. {failed[0] if failed else '-'}: {why[0].strip() if why else ''}"


def main() -> int:
    flags, objdir = build_flags()
    ok = True
    for m in MUTANTS:
        with tempfile.TemporaryDirectory() as out:
            build_mutant(m, flags, objdir, out)
            print(f"== {m['name']}")
            for order in ("random", "forward", "reverse"):
                caught, report = run_tests(m, os.path.join(out, "_simt.so"), order)
                ok &= caught
                print(f"   {order:8s} {'CAUGHT' if caught else 'MISSED'}: {report[:400]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
