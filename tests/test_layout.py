"""The package's shape: one place writes and attends, its imports only point down, and
`import torch_pagedkv` is light."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "torch_pagedkv"
# Files that may call the ops directly: the wrappers themselves (and the emulated CUDA
# kernels' wrappers), the plain-PyTorch reference, and the tools that exercise the ops on
# their own (tuning, showcase, the CPU tuning table's measurements).
OP_CALLERS_ALLOWED = {"ops.py", "emulation.py", "reference.py", "showcase.py", "tuning",
                      "cpu_tuning"}


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


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement in the
    file, at module level or inside a function (a deferred import is still a dependency).
    `from .a import b` points at module a.b when that is a module, else at a; an import
    of a package points at its __init__ (the parents a submodule import runs are not
    counted)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + [base]).rstrip(".")
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while component[-1:] != [v]:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_import_graph_finds_edges_both_ways():
    """The check sees what it must: a deferred (function-level) import, a relative
    `from .. import`, and a package's __init__ (so an empty result below means something)."""
    graph = import_graph()
    assert "torch_pagedkv.distributed" in graph["torch_pagedkv.engine.llm"]  # in __init__
    assert "torch_pagedkv.engine.model_source" in graph["torch_pagedkv.distributed.tensor_parallel"]
    assert "torch_pagedkv._load" in graph["torch_pagedkv.tuning.table"]
    assert "torch_pagedkv.tuning.table" in graph["torch_pagedkv._launch_configs"]
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_only_point_down():
    """No circle of imports between the package's modules: the engine builds on
    distributed/ (which is handed the engine class rather than importing it) and the
    library loader (_load.py) imports nothing of the package above it."""
    assert import_circles(import_graph()) == []


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
