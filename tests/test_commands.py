"""The README's commands: `make build` leaves a working `pagedkv` in .venv/bin (a checkout's
own small environment over the shared one), the build prints a short summary, and a
compiled engine on a machine without a GPU does not warn "No CUDA runtime is found"."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def shared_env_prefix() -> pathlib.Path:
    """The prefix of the environment torch is installed in (.../lib/pythonX.Y/site-packages)."""
    return pathlib.Path(torch.__file__).resolve().parents[4]


def test_checkout_venv_gives_a_pagedkv_command_over_the_shared_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, SCRIPTS / "checkout_venv.py", venv, shared_env_prefix(),
                    ROOT], check=True, timeout=120)
    help_ = subprocess.run([venv / "bin" / "pagedkv", "--help"], capture_output=True,
                           text=True, check=True, cwd=tmp_path, timeout=60)
    assert "demo" in help_.stdout and "trace" in help_.stdout
    where = subprocess.run([venv / "bin" / "python", "-c",
                            "import torch_pagedkv, torch; print(torch_pagedkv.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, timeout=120)
    assert where.stdout.strip() == str(ROOT / "torch_pagedkv" / "__init__.py")


FAKE_BUILD = r"""
import sys
print("W1201 cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME='/usr/local'")
print("[1/2] c++ -MMD -MF x.o.d -O3 -I/usr/include -c -c /src/csrc/cpu/a.cpp -o x.o -mavx2")
print("/src/csrc/cpu/a.cpp:3:5: warning: unused variable 'x' [-Wunused-variable]")
print("[2/2] /usr/local/cuda/bin/nvcc -O3 -c /src/csrc/cuda/b.cu -o b.o")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_build_output_is_a_summary_with_warnings_kept(tmp_path, exit_code):
    run = subprocess.run([sys.executable, SCRIPTS / "quiet_build.py", sys.executable, "-c",
                          FAKE_BUILD.replace("/src", str(tmp_path)), str(exit_code)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode == exit_code
    lines = run.stdout.splitlines()
    assert lines[:3] == ["[1/2] csrc/cpu/a.cpp",
                         f"{tmp_path}/csrc/cpu/a.cpp:3:5: warning: unused variable 'x' "
                         "[-Wunused-variable]",
                         "[2/2] csrc/cuda/b.cu"]
    assert "No CUDA runtime" not in run.stdout
    log = (tmp_path / "build" / "build.log").read_text()
    assert "-mavx2" in log and "No CUDA runtime" in log  # the log keeps everything
    if exit_code:  # a failure shows the raw tail
        assert "build failed (exit 3)" in run.stderr and "-mavx2" in run.stderr
    else:
        assert run.stderr == ""


NO_GPU_ENGINE = """
from torch_pagedkv.engine import LLM
from torch_pagedkv.models import LlamaConfig, TinyLlama
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_size=16)
LLM(TinyLlama(cfg), num_blocks=4, compile=True)
import torch.utils.cpp_extension  # as inductor's C++ backend does when it compiles
"""


def test_a_compiled_engine_without_a_gpu_does_not_warn_about_cuda(tmp_path):
    if not torch.backends.cuda.is_built():
        pytest.skip("a CPU-only torch never looks for a CUDA toolkit")
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert "No CUDA runtime is found" in plain.stderr  # what torch says on its own
    engine = subprocess.run([sys.executable, "-c", NO_GPU_ENGINE], capture_output=True,
                            text=True, env=env, timeout=120)
    assert engine.returncode == 0, engine.stderr
    assert "No CUDA runtime is found" not in engine.stderr
