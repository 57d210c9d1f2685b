"""jcaffe's benchmark suite: LeNet and CIFAR-10 quick on every backend, against PyTorch.

    python benchmarks/run.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/run.py --quick         # no whole-run trainings, fewer windows

Writes ``benchmarks/results/<machine>.json``, ``.md`` (the tables) and ``.png`` (a chart).
Each measurement runs in its own subprocess, one after another (never two at once), so
compile caches, memory peaks and thread pools do not leak between them. Compile time and
steady-state time are reported separately; steady state is the median (min, max) over windows
after warm-up. Ratios are only meaningful between numbers of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# ---------------------------------------------------------------------------------------------
# Measurements (each runs inside a child process: `run.py --child NAME ARGS_JSON`)
# ---------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _synthetic_dataset(root: str, name: str, n: int, shape, classes: int, seed: int) -> str:
    import numpy as np

    from jcaffe.data.dataset import write_dataset

    path = os.path.join(root, name)
    if not os.path.exists(path):
        rng = np.random.default_rng(seed)
        write_dataset(path, rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8),
                      rng.integers(0, classes, n).astype(np.int32), source="benchmark noise")
    return path


def _link(target: str, link: str) -> None:
    """``link`` -> ``target``, replacing a link left by another checkout."""
    if os.path.islink(link) and os.readlink(link) != target:
        os.unlink(link)
    if not os.path.lexists(link):
        os.symlink(target, link)


def _workdir_for(net: str) -> str:
    """A folder laid out like the repository (prototxt/, datasets/) for the shipped solvers."""
    import numpy as np

    work = os.path.join(tempfile.gettempdir(), "jcaffe-bench")
    os.makedirs(work, exist_ok=True)
    _link(os.path.join(REPO, "prototxt"), os.path.join(work, "prototxt"))
    if net == "lenet":
        mnist = os.path.join(REPO, "datasets", "mnist")
        if not os.path.exists(os.path.join(mnist, "mnist_train")):
            from jcaffe.data import mnist as mnist_mod
            mnist_mod.create(mnist, log=lambda *a: None)
        os.makedirs(os.path.join(work, "datasets"), exist_ok=True)
        _link(mnist, os.path.join(work, "datasets", "mnist"))
    else:
        root = os.path.join(work, "datasets", "cifar10")
        os.makedirs(root, exist_ok=True)
        _synthetic_dataset(root, "cifar10_train", 5000, (3, 32, 32), 10, 0)
        _synthetic_dataset(root, "cifar10_test", 1000, (3, 32, 32), 10, 1)
        mean = os.path.join(root, "mean.binaryproto")
        if not os.path.exists(mean):
            from jcaffe.caffemodel import write_binaryproto
            write_binaryproto(mean, np.full((1, 3, 32, 32), 127.5, np.float32))
    return work


SOLVERS = {"lenet": "prototxt/lenet_solver.prototxt",
           "cifar10_quick": "prototxt/cifar10_quick_solver.prototxt"}


def child_step(net: str, backend: str, windows: int, per_call: int,
               precision: str = "float32", conv: str = "auto") -> dict:
    """Steady-state train-step time of the shipped solver's net (device-resident data), its
    matmuls and convolutions in ``precision`` (``jcaffe.config.Config.precision``), its
    convolutions in the formulation ``conv`` (``Config.conv``)."""
    import jax

    from jcaffe import prototxt
    from jcaffe.config import Config
    from jcaffe.train import Trainer

    work = _workdir_for(net)
    os.chdir(work)
    sp = prototxt.read_solver(SOLVERS[net])
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.display = 0
    device = jax.devices(backend)[0]
    t = Trainer(sp, device=device, verbose=False, iters_per_call=per_call,
                config=Config(precision=precision, conv=conv))
    t._setup_feeds()
    t0 = time.perf_counter()
    jax.block_until_ready(t.run_iterations(per_call)["loss"])
    first = time.perf_counter() - t0
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        jax.block_until_ready(t.run_iterations(per_call)["loss"])
        times.append((time.perf_counter() - t0) / per_call * 1e3)
    med = statistics.median(times)
    compile_s = max(0.0, first - med * per_call / 1e3)
    t0 = time.perf_counter()
    t.test(0)
    first_test = time.perf_counter() - t0
    t0 = time.perf_counter()
    t.test(0)
    test_s = time.perf_counter() - t0
    batch = t.net.input_specs()["data"][0][0]
    flops = train_flops(t.net)
    return {"net": net, "backend": backend, "device": str(device), "batch": batch,
            "iters_per_call": t.iters_per_call, "precision": precision,
            "conv": sorted({t.net.conv_formulation(l) for l in t.net.layers
                            if l.type == "Convolution"}), "compile_s": compile_s,
            "ms_per_iter_median": med, "ms_per_iter_min": min(times),
            "ms_per_iter_max": max(times), "images_per_s": batch * 1e3 / med,
            "test_pass_s": test_s, "test_compile_s": max(0.0, first_test - test_s),
            "test_iter": int(sp.test_iter[0]), "peak_rss_mb": _peak_rss_mb(),
            "gflop_per_iter": flops / 1e9}


def train_flops(net) -> float:
    """FLOPs of one training iteration: forward 2·MACs of every Convolution / InnerProduct,
    backward twice that (weight and input gradients) except no input gradient for the first
    layer that reads the data."""
    total = 0.0
    first = True
    for layer in net.layers:
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        w = layer.blob_shapes[0]
        out = layer.top_shapes[0]
        if layer.type == "Convolution":
            macs = out[0] * int(__import__("math").prod(out[1:])) * int(
                __import__("math").prod(w[1:]))
        else:
            macs = int(__import__("math").prod(out)) * int(__import__("math").prod(w)) // w[0]
        fwd = 2.0 * macs
        total += fwd + (fwd if first else 2 * fwd)
        first = False
    return total


def child_data(batches: int = 2000) -> dict:
    """The data path alone, LeNet's train Data layer (MNIST, batch 64): batches per second of
    the host reader, of the prefetching feeder (read + device_put), and of device-resident
    slicing inside a jitted program; to compare with the train step's iterations per second."""
    import jax
    import jax.numpy as jnp

    from jcaffe import prototxt
    from jcaffe.data import feed
    from jcaffe.net import Net

    os.chdir(_workdir_for("lenet"))
    sp = prototxt.read_solver(SOLVERS["lenet"])
    net = Net(prototxt.read_net(sp.net), "TRAIN", verbose=False)
    layer = net.data_layers[0]
    out = {}
    reader = layer.make_reader(seed=0)
    t0 = time.perf_counter()
    for _ in range(batches):
        reader.next_batch()
    out["host_reader_batches_per_s"] = batches / (time.perf_counter() - t0)
    with feed.PrefetchFeeder(layer.make_reader(seed=0), prefetch=4) as f:
        next(f)
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(f)
        jax.block_until_ready(b)
        out["prefetch_feeder_batches_per_s"] = batches / (time.perf_counter() - t0)
    res = feed.DeviceResident(layer, seed=0)

    def many(arrays, c0):
        def body(c, _):
            b = res.batch_at(arrays, c)
            return res.next_cursor(c), jnp.sum(b["data"][:, 0, 0, 0].astype(jnp.int32))
        return jax.lax.scan(body, c0, None, length=100)[1]

    f = jax.jit(many)
    jax.block_until_ready(f(res.arrays, jnp.int32(0)))
    t0 = time.perf_counter()
    for _ in range(batches // 100):
        r = f(res.arrays, jnp.int32(0))
    jax.block_until_ready(r)
    out["device_resident_batches_per_s"] = (batches // 100) * 100 / (time.perf_counter() - t0)
    return out


def child_gemm_peak() -> dict:
    """This machine's float32 GEMM throughput (numpy's BLAS and XLA's dot), for the floor."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(_time(lambda: a @ a) for _ in range(5))
    x = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    f(x).block_until_ready()
    best_xla = min(_time(lambda: f(x).block_until_ready()) for _ in range(5))
    return {"numpy_gflops": 2 * n ** 3 / best / 1e9, "xla_gflops": 2 * n ** 3 / best_xla / 1e9}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child_torch(net: str, mode: str, windows: int) -> dict:
    from benchmarks.peers import torch_nets

    return torch_nets.step_benchmark(net=net, mode=mode, windows=windows)


def child_torch_full(mode: str) -> dict:
    from benchmarks.peers import torch_nets

    work = _workdir_for("lenet")
    return torch_nets.full_lenet_run(mode, mnist_dir=os.path.join(work, "datasets", "mnist"))


def child_layer_times(backend: str) -> dict:
    """`jcaffe time` on LeNet: per-layer forward/backward ms (parsed from its log)."""
    work = _workdir_for("lenet")
    # ("gpu" would also ask for ROCm and oneAPI, and fail where they are absent)
    env = dict(os.environ, JAX_PLATFORMS="cuda" if backend == "gpu" else backend)
    out = subprocess.run([sys.executable, "-m", "jcaffe", "time",
                          "--model=prototxt/lenet_train_test.prototxt", "--iterations=20"]
                         + (["--gpu=0"] if backend == "gpu" else []),
                         cwd=work, env=env, capture_output=True, text=True, check=True).stderr
    layers = {}
    for name, kind, ms in re.findall(r"\]\s+(\S+)\s+(forward|backward): ([\d.]+) ms", out):
        layers.setdefault(name, {})[kind] = float(ms)
    summary = {k: float(v) for k, v in re.findall(
        r"Average (Forward pass|Backward pass|Forward-Backward|fused train step)[^:]*: ([\d.]+) ms",
        out)}
    return {"layers": layers, "summary": summary}


def full_run(backend: str) -> dict:
    """`python -m jcaffe.train prototxt/lenet_solver.prototxt`, the whole process, timed."""
    work = _workdir_for("lenet")
    snaps = os.path.join(work, "snapshots")
    shutil.rmtree(snaps, ignore_errors=True)
    cmd = [sys.executable, "-m", "jcaffe.train", "prototxt/lenet_solver.prototxt"]
    if backend == "gpu":
        cmd.append("--gpu=0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    acc = [float(v) for v in re.findall(r"Test net output #0: accuracy = ([\d.]+)", proc.stderr)]
    tests = proc.stderr.count("Testing net (#0)")
    return {"backend": backend, "wall_s": wall, "final_accuracy": acc[-1] if acc else None,
            "accuracy_at_500": acc[1] if len(acc) > 1 else None, "test_passes": tests,
            "snapshots": sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []}


CHILDREN = {"step": child_step, "data": child_data, "gemm": child_gemm_peak, "torch": child_torch,
            "torch_full": child_torch_full, "layers": child_layer_times}


# ---------------------------------------------------------------------------------------------
# The parent: runs the children in sequence, writes JSON / Markdown / PNG
# ---------------------------------------------------------------------------------------------
def run_child(name: str, platform: str = "cpu", **kwargs) -> dict:
    env = dict(os.environ)
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, json.dumps(kwargs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    import jax

    gpus = []
    try:
        gpus = [d.device_kind for d in jax.devices("gpu")]
    except RuntimeError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "gpus": gpus, "platform": platform.platform(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="skip whole-run trainings")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--name", default="", help="results file name (default: from the machine)")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](**json.loads(a.args or "{}"))))
        return 0

    info = machine()
    backends = ["cpu"] + (["gpu"] if info["gpus"] else [])
    res: dict = {"machine": info, "gemm": run_child("gemm"), "jcaffe": [], "torch": [],
                 "full": [], "layers": {}, "data": {}}
    say = lambda *x: print(*x, flush=True)
    say(f"machine: {info['cpu']} x{info['cores']}, GPUs: {info['gpus'] or 'none'}")
    say(f"GEMM peak: {res['gemm']}")
    for backend in backends:
        for net in ("lenet", "cifar10_quick"):
            # On CPU the default (oneDNN's kernels where built) and the pure-JAX im2col
            # formulation, back to back: the speed-up of the custom calls, same run.
            for conv in ("auto", "im2col") if backend == "cpu" else ("auto",):
                r = run_child("step", backend, net=net, backend=backend, windows=a.windows,
                              per_call=100 if net == "lenet" else 20, conv=conv)
                say(f"jcaffe {net} {backend} conv={conv}: {r}")
                res["jcaffe"].append(dict(r, default=conv == "auto"))
        res["layers"][backend] = run_child("layers", backend, backend=backend)
    res["data"] = run_child("data")
    say(f"data path: {res['data']}")
    if has_torch() and not a.no_torch:
        for net in ("lenet", "cifar10_quick"):
            for mode in ("eager", "compile"):
                r = run_child("torch", net=net, mode=mode, windows=a.windows)
                r.update(net=net, mode=mode)
                say(f"torch {net} {mode}: {r}")
                res["torch"].append(r)
    if not a.quick:
        for backend in backends:
            r = full_run(backend)
            say(f"jcaffe full LeNet run {backend}: {r}")
            res["full"].append(dict(r, system=f"jcaffe {backend}"))
        if has_torch() and not a.no_torch:
            for mode in ("eager", "compile"):
                r = run_child("torch_full", mode=mode)
                say(f"torch full LeNet run {mode}: {r}")
                res["full"].append(dict(r, system=f"PyTorch {mode}"))
    name = a.name or re.sub(r"[^A-Za-z0-9]+", "-", f"{info['cores']}core-" + (
        info["gpus"][0] if info["gpus"] else info["cpu"])).strip("-").lower()
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, name)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    chart(res, base + ".png")
    say(md)
    say(f"wrote {base}.json, .md, .png")
    return 0


def _jcaffe_label(r: dict) -> str:
    return f"jcaffe ({'/'.join(r['conv'])})" if r.get("conv") else "jcaffe"


def markdown(res: dict) -> str:
    info, gemm = res["machine"], res.get("gemm", {})
    lines = [f"## {info['cpu']} ({info['cores']} cores)" + (f", GPU {info['gpus'][0]}"
                                                               if info["gpus"] else ""),
             f"JAX {info['jax']}, Python {info['python']}, {info['date']}.", ""]
    peak = gemm.get("numpy_gflops")
    lines += ["### Train step (forward + backward + solver update), steady state", "",
              "| system | net | backend | compile s | ms/iter median (min–max) | images/s | "
              "test pass s | peak RSS MB | floor ms | of floor |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["jcaffe"]:
        if "error" in r:
            lines.append(f"| jcaffe | ? | ? | error: {r['error']} |||||||")
            continue
        floor = r["gflop_per_iter"] / peak * 1e3 if peak and r["backend"] == "cpu" else None
        lines.append(
            f"| {_jcaffe_label(r)} | {r['net']} | {r['backend']} | {r['compile_s']:.2f} | "
            f"{r['ms_per_iter_median']:.2f} ({r['ms_per_iter_min']:.2f}–{r['ms_per_iter_max']:.2f})"
            f" | {r['images_per_s']:.0f} | {r['test_pass_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            + (f"{floor:.2f} | {floor / r['ms_per_iter_median']:.0%} |" if floor else "– | – |"))
    for r in res["torch"]:
        if "error" in r:
            lines.append(f"| PyTorch {r.get('mode')} | {r.get('net')} | cpu | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| PyTorch {r['torch_version']} {r['mode']} | {r['net']} | cpu | {r['compile_s']:.2f} | "
            f"{r['ms_per_iter_median']:.2f} ({r['ms_per_iter_min']:.2f}–{r['ms_per_iter_max']:.2f})"
            f" | {r['images_per_s']:.0f} | – | – | – | – |")
    jc = {(r.get("net"), r.get("backend")): r for r in res["jcaffe"]
          if "error" not in r and r.get("default", True)}
    ratios = []
    for r in res["jcaffe"]:
        j = jc.get((r.get("net"), r.get("backend")))
        if j and j is not r and "error" not in r:
            ratios.append(f"- {r['net']}: jcaffe {'/'.join(r['conv'])} / jcaffe "
                          f"{'/'.join(j['conv'])} = "
                          f"{r['ms_per_iter_median'] / j['ms_per_iter_median']:.2f}x")
    for r in res["torch"]:
        j = jc.get((r.get("net"), "cpu"))
        if j and "error" not in r:
            ratios.append(f"- {r['net']}: PyTorch {r['mode']} / jcaffe CPU = "
                          f"{r['ms_per_iter_median'] / j['ms_per_iter_median']:.2f}x")
    for net in ("lenet", "cifar10_quick"):
        peers = [r for r in res["torch"] if r.get("net") == net and "error" not in r]
        if (net, "cpu") in jc and peers:
            best = min(peers, key=lambda r: r["ms_per_iter_median"])
            ratios.append(f"- {net}: jcaffe CPU / the faster PyTorch ({best['mode']}) = "
                          f"{jc[(net, 'cpu')]['ms_per_iter_median'] / best['ms_per_iter_median']:.2f}"
                          f" (< 1 means jcaffe is faster)")
    for net in ("lenet", "cifar10_quick"):
        if (net, "cpu") in jc and (net, "gpu") in jc:
            ratios.append(f"- {net}: jcaffe CPU / GPU = {jc[(net, 'cpu')]['ms_per_iter_median'] / jc[(net, 'gpu')]['ms_per_iter_median']:.1f}x")
    if ratios:
        lines += ["", "Ratios (same run; > 1 means jcaffe is faster):", ""] + ratios
    if res["full"]:
        lines += ["", "### Whole LeNet run (10 000 iterations, 21 test passes, snapshots)", "",
                  "| system | wall s | final accuracy | accuracy at 500 |", "|---|---|---|---|"]
        for r in res["full"]:
            if "error" in r:
                lines.append(f"| {r.get('system')} | error: {r['error']} | | |")
                continue
            lines.append(f"| {r['system']} | {r['wall_s']:.1f} | {r['final_accuracy']} | "
                         f"{r.get('accuracy_at_500')} |")
    data = res.get("data", {})
    if data and "error" not in data:
        step = next((r for r in res["jcaffe"] if r.get("net") == "lenet"
                     and r.get("backend") == "cpu" and "error" not in r), None)
        lines += ["", "### Data path alone (LeNet train Data layer, MNIST, batch 64)", "",
                  "| path | batches/s |", "|---|---|",
                  f"| host reader (tensorstore) | {data['host_reader_batches_per_s']:.0f} |",
                  f"| prefetching feeder (read + device_put) | "
                  f"{data['prefetch_feeder_batches_per_s']:.0f} |",
                  f"| device-resident slicing (in the jitted program) | "
                  f"{data['device_resident_batches_per_s']:.0f} |"]
        if step:
            lines.append(f"| *train step, for comparison (iterations/s)* | "
                         f"{1e3 / step['ms_per_iter_median']:.0f} |")
    for backend, lt in res["layers"].items():
        if "error" in lt:
            continue
        lines += ["", f"### `jcaffe time` LeNet per layer ({backend}, ms)", "",
                  "| layer | forward | backward |", "|---|---|---|"]
        for name, t in lt["layers"].items():
            lines.append(f"| {name} | {t.get('forward', 0):.3f} | {t.get('backward', 0):.3f} |")
        for k, v in lt["summary"].items():
            lines.append(f"| **{k}** | {v:.3f} | |")
    if peak:
        lines += ["", f"GEMM peak on this machine: numpy {gemm['numpy_gflops']:.0f} GFLOP/s, "
                      f"XLA {gemm['xla_gflops']:.0f} GFLOP/s; the floor is the net's training "
                      f"FLOPs at numpy's peak."]
    return "\n".join(lines) + "\n"


def chart(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(f"{_jcaffe_label(r)} {r['backend']}", r["net"], r["ms_per_iter_median"])
            for r in res["jcaffe"] if "error" not in r]
    rows += [(f"PyTorch {r['mode']}", r["net"], r["ms_per_iter_median"])
             for r in res["torch"] if "error" not in r]
    if not rows:
        return
    nets = sorted({n for _, n, _ in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 3.2))
    axes = axes if len(nets) > 1 else [axes]
    for ax, net in zip(axes, nets):
        sub = [(s, v) for s, n, v in rows if n == net]
        ax.barh([s for s, _ in sub], [v for _, v in sub], color="#4a7ab5")
        ax.set_title(f"{net}: ms per train iteration")
        for i, (_, v) in enumerate(sub):
            ax.text(v, i, f" {v:.1f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
