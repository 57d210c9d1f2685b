"""The import structure of the jcaffe package.

* Every module imports on its own, in a process where no other jcaffe module was loaded first
  (an import cycle or a missing import shows up as an ImportError / AttributeError there).
* A static walk of every ``import`` statement under ``jcaffe/`` (module level and inside
  functions alike) finds no cycle among jcaffe modules: each dependency points one way.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "jcaffe"


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root/package``."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root / package):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            path = Path(dirpath) / f
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules``."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, within ``package``.

    Counts ``import a.b``, ``from a.b import c`` (the submodule ``a.b.c`` when it exists, else
    ``a.b``), relative imports, and ``importlib.import_module("a.b")`` with a literal name,
    wherever they stand (module level, functions, ``if TYPE_CHECKING`` blocks). The implicit
    import of a module's parent packages is not an edge, nor are the packages' lazy attribute
    maps (``jcaffe._lazy``: a name's module is imported on first attribute access, never while
    the package itself is being imported).
    """
    modules = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}

        def add(target: str | None, line: int) -> None:
            if target is not None and target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_resolve(alias.name, modules), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    add(sub if sub in modules else _resolve(src, modules), node.lineno)
            elif (isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
                add(_resolve(node.args[0].value, modules), node.lineno)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(graph, cycles) -> str:
    lines = []
    for comp in cycles:
        members = set(comp)
        for m in comp:
            for t, line in sorted(graph[m].items()):
                if t in members:
                    lines.append(f"  {m} -> {t} (line {line})")
    return "\n".join(lines)


def test_no_import_cycles_among_jcaffe_modules():
    graph = import_graph(ROOT)
    assert len(graph) > 20  # the walk found the package
    assert "jcaffe.layers.base" in graph["jcaffe.layers.data"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among jcaffe modules:\n" + _describe(graph, cycles)


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.mark.parametrize("b_text, cycle", [
    # A function-level import back is still a cycle.
    ("def f():\n    from pkg import a\n    return a\n", ["pkg.a", "pkg.b"]),
    ("from . import a\n", ["pkg.a", "pkg.b"]),
    ("import pkg.a.x\n", ["pkg.a", "pkg.b"]),  # no module pkg.a.x: the edge is to pkg.a
    ("from pkg.c import thing\n", None),
    ("import importlib\nM = importlib.import_module('pkg.a')\n", ["pkg.a", "pkg.b"]),
])
def test_cycle_finder_on_a_deliberate_package(tmp_path, b_text, cycle):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import helper\n",
        "pkg/b.py": b_text,
        "pkg/c.py": "thing = 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 1}
    found = find_cycles(graph)
    assert found == ([] if cycle is None else [cycle])


def test_cycle_finder_three_module_ring(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from .. import c\n",
        "pkg/a.py": "import pkg.sub\n",
        "pkg/c.py": "from pkg import a\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert find_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub"]]


_ISOLATED_IMPORTS = r"""
import importlib, os, sys, traceback
# Third-party libraries are loaded once; each jcaffe module is then imported in its own forked
# child, in which no jcaffe module has been imported yet.
for lib in ("numpy", "jax", "jax.numpy", "google.protobuf.text_format", "optax", "h5py",
            "PIL.Image"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "jcaffe" or m.startswith("jcaffe.")]
failed = []
for mod in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(mod)
        except BaseException:
            sys.stderr.write(f"--- {mod}\n" + traceback.format_exc())
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(mod)
print("FAILED:" + ",".join(failed))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_in_isolation():
    # Script entry points that run on import are not imported here.
    mods = [m for m in module_files(ROOT) if m not in ("jcaffe.__main__",)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _ISOLATED_IMPORTS, *mods], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "FAILED:", proc.stdout + proc.stderr[-6000:]


# The training stack, bottom up: each module may import those before it, never those after
# (prototxt -> Net -> update rules -> pure step -> programs -> snapshots -> Solver -> command
# line), so a reader can go through it top down.
TRAINING_LAYERS = [
    "jcaffe.net", "jcaffe.sgd_solvers", "jcaffe.train_step", "jcaffe.programs",
    "jcaffe.snapshot", "jcaffe.solver_init", "jcaffe.solver", "jcaffe.commands", "jcaffe.train",
]


def test_training_stack_points_one_way():
    graph = import_graph(ROOT)
    rank = {m: i for i, m in enumerate(TRAINING_LAYERS)}
    assert set(rank) <= set(graph)
    upward = [f"{m} -> {t} (line {line})" for m in TRAINING_LAYERS
              for t, line in graph[m].items() if t in rank and rank[t] > rank[m]]
    assert not upward, "modules importing a later layer of the training stack:\n" + \
        "\n".join(upward)
    # The pure step and the update rules know nothing of the loop around them.
    for low in ("jcaffe.sgd_solvers", "jcaffe.train_step"):
        assert not {"jcaffe.data.netfeed", "jcaffe.parallel"} & set(graph[low]), low
