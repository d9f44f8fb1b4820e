"""The package's shape: one place writes and attends, and `import torch_pagedkv` is light."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "torch_pagedkv"
# Files that may call the ops directly: the wrappers themselves (and the emulated CUDA
# kernels' wrappers), the plain-PyTorch reference, and the tools that exercise the ops on
# their own (tuning, showcase).
OP_CALLERS_ALLOWED = {"ops.py", "emulation.py", "reference.py", "showcase.py", "tuning"}


def calls_of(name: str) -> set[str]:
    """Files of the package (outside OP_CALLERS_ALLOWED) that call `name`."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in OP_CALLERS_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    found.add(str(rel))
    return found


def test_one_place_writes_and_attends():
    """The engine's layer, and the vLLM backend, which vLLM drives through two hooks (the KV
    update and the attention are separate calls there)."""
    assert calls_of("reshape_and_cache") == calls_of("paged_attention") == \
        {"layers/attention.py", "vllm/backend.py"}
    # Cascade attention lives beside it: write_and_attend's cascade_attention.
    assert calls_of("paged_attention_lse") == calls_of("merge_attn_states") == \
        {"layers/attention.py"}


LIGHT_IMPORT = """
import sys, torch_pagedkv as pk
heavy = ('torch_pagedkv.engine', 'torch_pagedkv.integrations', 'torch_pagedkv.tuning',
         'transformers')
print(sorted(m for m in sys.modules if m.startswith(heavy)))
pk.engine.LLM
print('torch_pagedkv.engine.llm' in sys.modules)
"""


def test_import_is_light_and_heavy_parts_load_on_first_use():
    """`import torch_pagedkv` loads no engine, integration, tuning or transformers (one
    process for both checks: each costs a torch import)."""
    out = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_cli_help_imports_no_torch():
    probe = ("import sys, pagedkv_cli\ntry:\n    pagedkv_cli.main(['--help'])\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert "demo" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "False"
