#!/usr/bin/env python3
"""Runs your own copy of BVLC Caffe's ``examples/01-learning-lenet.ipynb`` on jcaffe's ``caffe``
package, then times the notebook's Python training loop against ``solver.step(n)``.

    python benchmarks/pycaffe_notebook.py --notebook PATH/TO/01-learning-lenet.ipynb
        [--work DIR] [--figures DIR] [--limit N] [--bench-iters 50] [--json OUT]

No notebook ships with jcaffe: pass the file from a Caffe checkout. Its code cells are read
with ``json`` and run in order in one namespace (as one kernel would), from
``WORK/examples`` (the notebook's working folder; ``caffe_root = '../'`` is then ``WORK``),
with matplotlib on the Agg backend. The edits, made to the cells' text by ``edit_cell`` (the
whole list):

1. Shell lines ``!cmd`` become ``_jcaffe_shell('cmd')``: ``cat FILE...`` prints the files;
   Caffe's MNIST scripts (``get_mnist.sh``, ``create_mnist.sh``) print what replaced them:
   ``prepare()`` wrote MNIST as LMDBs, from this repository's IDX files with
   ``jcaffe.data.mnist``, before the cells ran; any other command is printed, not run.
2. IPython line magics (``%matplotlib inline``) are dropped; a cell magic's first line
   (``%%time``, ``%%timeit``, ``%%capture``) is dropped and its body runs (every cell is
   timed); a cell under any other cell magic (``%%bash``, ...) is dropped.
3. Python 2 ``print`` statements become calls: ``print a, b`` -> ``print(a, b)``, a trailing
   comma -> ``end=' '``, ``print >>f, a`` -> ``print(a, file=f)``.
4. The data paths: the string literals ``'mnist/mnist_train_lmdb'`` and
   ``'mnist/mnist_test_lmdb'`` become the paths of the LMDBs ``prepare()`` wrote.
5. ``caffe.set_mode_gpu()`` becomes ``caffe.set_mode_cpu()`` when JAX has no GPU.

How the cells run, beyond the text (IPython's and Python 2's semantics, not edits): a cell's
last expression is displayed (its ``repr`` printed, when not None); figures are closed after
each cell (saved as PNGs under ``--figures`` when given), as the inline backend does; and when
the notebook's kernel is Python 2, ``a / b`` between integers floors (``py2_div``), so
``test_interval = niter / 10`` stays an integer index. The solver file the notebook loads,
``mnist/lenet_auto_solver.prototxt``, is copied from beside the notebook (a Caffe checkout's
``examples/mnist``) or, when absent, written from ``prototxt/lenet_solver.prototxt`` (the same
SGD settings) with the notebook's train and test nets.

Reported (JSON, also on a ``RESULTS`` line): each cell's seconds, every ``test_acc`` array a
cell left (``loops``: the LeNet loop's, about 0.94 at its last test after 200 iterations in the
notebook, then the logistic-regression variant's, about 0.88 after 250), and, on a new LeNet
solver from the notebook's files, ms per iteration of four forms: the notebook's loop body
(``step(1)``, reading the loss, the test net's ``forward(start='conv1')`` and scores),
``step(1)`` alone, ``step(n)`` (jcaffe's fused iterations) and ``jcaffe.Solver.step(n)``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Edit 4: the notebook's LMDB paths (relative to its examples folder) -> prepare()'s keys.
DATA_PATHS = {"mnist/mnist_train_lmdb": "mnist_train_lmdb",
              "mnist/mnist_test_lmdb": "mnist_test_lmdb"}
MNIST_SCRIPTS = ("get_mnist.sh", "create_mnist.sh")
BODY_CELL_MAGICS = ("%%time", "%%timeit", "%%capture")

_PRINT = re.compile(r"^(\s*)print(\s+(?![\s(=.,\[]).*|\s*)$")


# ---------------------------------------------------------------------------------------------
# the edits


def _print_call(indent: str, rest: str) -> str:
    """Edit 3 on one statement: ``rest`` is what followed ``print``."""
    rest = rest.strip()
    args, kw = rest, []
    if args.startswith(">>"):
        target, _, args = args[2:].partition(",")
        kw.append(f"file={target.strip()}")
        args = args.strip()
    if args.endswith(","):
        args = args[:-1].rstrip()
        kw.append("end=' '")
    return f"{indent}print({', '.join([a for a in [args] if a] + kw)})"


def edit_cell(source: str, paths: dict[str, str], gpu: bool) -> str | None:
    """The cell's code after edits 1-5 (see the module's docstring), or None when the cell is
    dropped. ``paths`` maps the notebook's data paths (``DATA_PATHS``' keys) to the prepared
    ones; ``gpu``: whether JAX has a GPU."""
    lines = source.splitlines()
    if lines and lines[0].lstrip().startswith("%%"):
        if lines[0].split()[0] not in BODY_CELL_MAGICS:
            return None
        lines = lines[1:]
    out = []
    for line in lines:
        stripped = line.lstrip()
        indent = line[:len(line) - len(stripped)]
        if stripped.startswith("!"):
            out.append(f"{indent}_jcaffe_shell({stripped[1:].strip()!r})")
            continue
        if stripped.startswith("%"):
            continue
        m = _PRINT.match(line)
        if m:
            line = _print_call(m.group(1), m.group(2))
        for old, new in paths.items():
            line = re.sub(r"(['\"])" + re.escape(old) + r"\1", lambda _: repr(new), line)
        if not gpu:
            line = line.replace("caffe.set_mode_gpu()", "caffe.set_mode_cpu()")
        out.append(line)
    return "\n".join(out)


def read_code_cells(path: str) -> tuple[list[str], bool]:
    """The notebook's code cells (source text, in order) and whether its kernel is Python 2."""
    from jcaffe.errors import JcaffeError

    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
        cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
        sources = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                   for c in cells]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JcaffeError(f"{path}: not a readable Jupyter notebook (nbformat 4): {e}") from None
    meta = nb.get("metadata", {})
    kernel = str(meta.get("kernelspec", {}).get("name", ""))
    version = str(meta.get("language_info", {}).get("version", ""))
    return sources, kernel == "python2" or version.startswith("2.")


# ---------------------------------------------------------------------------------------------
# running cells


def py2_div(a, b):
    """Python 2's ``a / b``: floor division ``a // b`` when both are integers (Python ints,
    numpy integer scalars or integer arrays), true division otherwise."""
    import numpy as np

    def integral(x):
        return (isinstance(x, (int, np.integer))
                or (isinstance(x, np.ndarray) and x.dtype.kind in "iub"))

    return a // b if integral(a) and integral(b) else a / b


class _Py2Division(ast.NodeTransformer):
    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return ast.copy_location(ast.Call(ast.Name("_jcaffe_py2_div", ast.Load()),
                                              [node.left, node.right], []), node)
        return node


def run_cell(code: str, ns: dict, name: str, py2: bool) -> None:
    """Runs ``code`` in ``ns`` as a notebook cell: its last expression, when not None, is
    displayed (printed with ``repr``)."""
    import linecache

    linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # for tracebacks
    tree = ast.parse(code, name)
    if py2:
        tree = ast.fix_missing_locations(_Py2Division().visit(tree))
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, name, "exec"), ns)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), name, "eval"), ns)
        if value is not None:
            print(repr(value))


def make_shell(paths: dict[str, str]):
    """Edit 1's ``_jcaffe_shell``."""
    import shlex

    def _jcaffe_shell(cmd: str) -> None:
        words = shlex.split(cmd)
        if words and os.path.basename(words[0]) in MNIST_SCRIPTS:
            print(f"[jcaffe] {cmd}: not run; MNIST was prepared from this repository's files: "
                  + ", ".join(paths.values()))
        elif words and words[0] == "cat":
            for name in words[1:]:
                with open(name, encoding="utf-8") as f:
                    print(f.read(), end="")
        else:
            print(f"[jcaffe] shell command not run: {cmd}")

    return _jcaffe_shell


def _number(x):
    """``x`` as a JSON number (None when it is not a number)."""
    import numbers

    if isinstance(x, numbers.Integral):
        return int(x)
    return float(x) if isinstance(x, numbers.Real) else None


def run_notebook(cells: list[str], py2: bool, paths: dict[str, str], gpu: bool,
                 figures: str | None = None) -> dict:
    """Edits and runs the cells in the current folder; returns each code cell's seconds (by its
    index among the code cells) and each new ``test_acc`` array a cell left, with the
    namespace's ``niter`` and ``test_interval`` then."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ns = {"__name__": "__main__", "_jcaffe_shell": make_shell(paths),
          "_jcaffe_py2_div": py2_div}
    seconds, loops, seen = {}, [], None
    for i, source in enumerate(cells):
        code = edit_cell(source, paths, gpu)
        if code is None or not code.strip():
            continue
        print(f"---- code cell {i}", flush=True)
        t0 = time.perf_counter()
        try:
            run_cell(code, ns, f"<code cell {i}>", py2)
        except Exception as e:
            from jcaffe.errors import JcaffeError

            traceback.print_exc()
            raise JcaffeError(f"code cell {i} failed (traceback above): "
                              f"{type(e).__name__}: {e}") from None
        seconds[i] = round(time.perf_counter() - t0, 3)
        for k, num in enumerate(plt.get_fignums()):
            if figures:
                plt.figure(num).savefig(os.path.join(figures, f"cell{i:02d}_{k}.png"))
        plt.close("all")
        acc = ns.get("test_acc")
        if isinstance(acc, np.ndarray) and acc is not seen:
            seen = acc
            interval, niter = (_number(ns.get(k)) for k in ("test_interval", "niter"))
            loops.append({"cell": i, "niter": niter, "test_interval": interval,
                          "last_test_at": (len(acc) - 1) * interval if interval else None,
                          "test_acc": [round(float(a), 4) for a in acc]})
    return {"cell_seconds": seconds, "loops": loops}


# ---------------------------------------------------------------------------------------------
# the data and the solver file


def prepare(work: str, limit: int | None = None) -> dict[str, str]:
    """Replaces the notebook's shell cells: MNIST as LMDBs under ``work/lmdb`` (``limit``: the
    first records of each split); returns edit 4's map from the notebook's paths to them."""
    from jcaffe.data import mnist

    made = mnist.create(os.path.join(ROOT, "datasets", "mnist"),
                        out_dir=os.path.join(work, "lmdb"), formats=("lmdb",), limit=limit,
                        log=lambda msg: None)
    return {old: made[key] for old, key in DATA_PATHS.items()}


def write_solver(notebook: str, examples: str) -> str:
    """``examples/mnist/lenet_auto_solver.prototxt``: the one beside the notebook, else
    jcaffe's LeNet solver settings with the notebook's nets. Returns where it came from."""
    target = os.path.join(examples, "mnist", "lenet_auto_solver.prototxt")
    beside = os.path.join(os.path.dirname(os.path.abspath(notebook)), "mnist",
                          "lenet_auto_solver.prototxt")
    if os.path.exists(beside):
        shutil.copy(beside, target)
        return beside
    from google.protobuf import text_format

    from jcaffe.proto import caffe_pb2

    sp = caffe_pb2.SolverParameter()
    with open(os.path.join(ROOT, "prototxt", "lenet_solver.prototxt")) as f:
        text_format.Merge(f.read(), sp)
    for field in ("net", "solver_mode"):
        sp.ClearField(field)
    sp.train_net = "mnist/lenet_auto_train.prototxt"
    sp.test_net.append("mnist/lenet_auto_test.prototxt")
    sp.snapshot_prefix = "mnist/lenet"
    with open(target, "w") as f:
        f.write(text_format.MessageToString(sp))
    return os.path.join(ROOT, "prototxt", "lenet_solver.prototxt")


# ---------------------------------------------------------------------------------------------
# the loop's cost


def bench(solver_file: str, iters: int) -> dict:
    """ms per iteration of the notebook-shaped loop body, ``step(1)``, ``step(iters)`` and
    ``jcaffe.Solver.step(iters)``, each after a warm-up, on one new solver."""
    import jax

    import caffe

    solver = caffe.SGDSolver(solver_file)
    test = solver.test_nets[0]

    def loop_body():
        solver.step(1)
        float(solver.net.blobs["loss"].data)
        test.forward(start="conv1")
        test.blobs["score"].data[:8].copy()

    def timed(fn, n):
        t0 = time.perf_counter()
        fn()
        return round((time.perf_counter() - t0) / n * 1e3, 2)

    def sync():
        float(solver.net.params["conv1"][1].data[0])

    for _ in range(2):
        loop_body()
    out = {"bench_iters": iters,
           "loop_ms_per_iter": timed(lambda: [loop_body() for _ in range(iters)], iters)}
    solver.step(1)
    out["step1_ms_per_iter"] = timed(lambda: ([solver.step(1) for _ in range(iters)], sync()),
                                     iters)
    solver.step(iters)  # compiles the fused chunk
    out["fused_ms_per_iter"] = timed(lambda: (solver.step(iters), sync()), iters)
    core = solver._core
    out["core_fused_ms_per_iter"] = timed(
        lambda: (core.step(iters), jax.block_until_ready(core.params)), iters)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--notebook", required=True,
                   help="your copy of Caffe's examples/01-learning-lenet.ipynb")
    p.add_argument("--work", help="work folder (default: a temporary one)")
    p.add_argument("--figures", help="save each cell's figures here as PNGs")
    p.add_argument("--limit", type=int, default=None,
                   help="records per LMDB (default: all, as the notebook)")
    p.add_argument("--bench-iters", type=int, default=50,
                   help="iterations timed per form (0: no timing)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    from jcaffe.errors import JcaffeError

    try:
        cells, py2 = read_code_cells(args.notebook)
    except JcaffeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    import caffe  # jcaffe's, before the notebook's sys.path.insert(0, caffe_root + 'python')

    gpu = jax.default_backend() == "gpu"
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="pycaffe_notebook_"))
    examples = os.path.join(work, "examples")
    os.makedirs(os.path.join(examples, "mnist"), exist_ok=True)
    if args.figures:
        args.figures = os.path.abspath(args.figures)
        os.makedirs(args.figures, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(work, args.limit)
    out = {"notebook": os.path.abspath(args.notebook), "caffe": caffe.__file__,
           "backend": jax.default_backend(), "python2_kernel": py2,
           "prepare_seconds": round(time.perf_counter() - t0, 2),
           "solver_from": write_solver(args.notebook, examples)}
    os.chdir(examples)
    try:
        out.update(run_notebook(cells, py2, paths, gpu, args.figures))
    except JcaffeError as e:
        print(f"error: {args.notebook}: {e}", file=sys.stderr)
        return 1
    os.chdir(examples)  # the notebook chdirs; the bench reads its files from examples/
    if args.bench_iters:
        with contextlib.redirect_stdout(sys.stderr):
            out.update(bench("mnist/lenet_auto_solver.prototxt", args.bench_iters))
    print("RESULTS " + json.dumps(out))
    if args.json:
        from jcaffe._atomic import atomic_write

        atomic_write(args.json, json.dumps(out, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
