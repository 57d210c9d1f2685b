"""The stages of ``benchmarks/gpu_check.sh``, one per process (the script bounds each with
``timeout``): each writes ``$OUT/parts/<stage>.json``; ``report`` merges whatever parts exist
into ``$OUT/gpu_check.json``, ``.md`` and ``.png``.

    python benchmarks/gpu_check.py env | probe | report
    python benchmarks/gpu_check.py step NET PER_CALL PRECISION
    python benchmarks/gpu_check.py layers | full [ITERATIONS]
    python benchmarks/gpu_check.py torch-step NET MODE | torch-full MODE

``GPU_CHECK_BACKEND`` is the JAX backend measured (``gpu``; ``cpu`` for the smoke run of the
script itself), ``GPU_CHECK_SMOKE=1`` shrinks every count.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import run as bench  # noqa: E402

OUT = os.path.abspath(os.environ.get("OUT") or os.path.join(REPO, "gpu_check_out"))
PARTS = os.path.join(OUT, "parts")
BACKEND = os.environ.get("GPU_CHECK_BACKEND", "gpu")
SMOKE = os.environ.get("GPU_CHECK_SMOKE", "") not in ("", "0")


def _write(name: str, value) -> None:
    os.makedirs(PARTS, exist_ok=True)
    tmp = os.path.join(PARTS, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, os.path.join(PARTS, f"{name}.json"))
    print(json.dumps(value)[:2000], flush=True)


def stage_env() -> None:
    import jax

    info = bench.machine()
    info["devices"] = [str(d) for d in jax.devices()]
    info["default_backend"] = jax.default_backend()
    versions = {}
    for mod in ("jaxlib", "numpy", "optax", "tensorstore", "google.protobuf", "h5py", "PIL",
                "matplotlib", "torch", "pytest", "lmdb", "plyvel"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001  (absent or broken: recorded, not fatal)
            versions[mod] = f"unavailable ({type(e).__name__})"
    info["versions"] = versions
    _write("env", info)


def stage_probe() -> None:
    """What each ``Config.precision`` does on this backend: a GEMM and a convolution against a
    float64 reference (relative max error) and their throughput. On a GPU with tensor cores
    tf32 should show ~1e-3 and bf16 ~1e-2 relative error, float32 ~1e-6."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcaffe.config import Config

    n = 512 if SMOKE else 4096
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    x = rng.standard_normal((64, 64, 32, 32)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    xd, wd = jnp.asarray(x), jnp.asarray(w)
    out = {"gemm_n": n, "backend": jax.default_backend(), "precisions": {}}
    conv_ref = None
    for p in ("float32", "tf32", "bf16"):
        cfg = Config(precision=p)
        f = jax.jit(cfg.dot)
        ad, bd = jnp.asarray(a), jnp.asarray(b)
        y = np.asarray(f(ad, bd), np.float64)
        reps = 3 if SMOKE else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            r = f(ad, bd)
        r.block_until_ready()
        dt = (time.perf_counter() - t0) / reps
        c = jax.jit(lambda u, v, cfg=cfg: cfg.conv_general_dilated(u, v, (1, 1), "SAME"))
        yc = np.asarray(c(xd, wd), np.float64)
        if conv_ref is None:  # the float32 (HIGHEST) result, ~1e-6 of float64
            conv_ref = yc
        out["precisions"][p] = {
            "gemm_rel_max_err": float(np.abs(y - ref).max() / np.abs(ref).max()),
            "gemm_tflops": 2 * n ** 3 / dt / 1e12,
            "conv_rel_max_err_vs_float32": float(np.abs(yc - conv_ref).max()
                                                 / np.abs(conv_ref).max())}
    e = {p: v["gemm_rel_max_err"] for p, v in out["precisions"].items()}
    out["tf32_rounds"] = e["tf32"] > 20 * e["float32"]
    out["bf16_rounds"] = e["bf16"] > 20 * e["float32"]
    _write("probe", out)


def stage_step(net: str, per_call: str, precision: str) -> None:
    per_call_n = int(per_call)
    iters = 20 if SMOKE else (300 if net == "lenet" else 200)
    windows = max(2, min(20, iters // per_call_n))
    r = bench.child_step(net=net, backend=BACKEND, windows=windows, per_call=per_call_n,
                         precision=precision)
    _write(f"step-{net}-{per_call}-{precision}", r)


def stage_layers() -> None:
    _write("layers", bench.child_layer_times(BACKEND))


def stage_full(iterations: str = "") -> None:
    """The whole LeNet run (`python -m jcaffe.train prototxt/lenet_solver.prototxt`), with
    tests and snapshots; ``iterations`` shortens it (smoke)."""
    work = bench._workdir_for("lenet")
    snaps = os.path.join(work, "snapshots")
    import shutil

    shutil.rmtree(snaps, ignore_errors=True)
    cmd = [sys.executable, "-m", "jcaffe.train", "prototxt/lenet_solver.prototxt"]
    cmd += ["--gpu=0"] if BACKEND == "gpu" else ["--cpu"]
    if iterations:
        cmd += ["--iterations", iterations]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(OUT, "full_lenet_run.log"), "w") as f:
        f.write(proc.stderr)
    acc = [float(v) for v in re.findall(r"Test net output #0: accuracy = ([\d.]+)", proc.stderr)]
    r = {"backend": BACKEND, "returncode": proc.returncode, "wall_s": wall,
         "iterations": int(iterations) if iterations else 10000,
         "final_accuracy": acc[-1] if acc else None, "test_passes": len(acc),
         "snapshots": sorted(os.listdir(snaps)) if os.path.isdir(snaps) else []}
    if not iterations:
        r["accuracy_ok"] = bool(acc) and acc[-1] >= 0.99
    if proc.returncode:
        r["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
    _write("full", r)


def _torch_device() -> str:
    import torch

    return "cuda" if BACKEND == "gpu" and torch.cuda.is_available() else "cpu"


def stage_torch_step(net: str, mode: str) -> None:
    from benchmarks.peers import torch_gpu

    iters = 20 if SMOKE else 300
    r = torch_gpu.step_benchmark(net, mode, warmup=5 if SMOKE else 30, iters=iters,
                                 windows=2 if SMOKE else 10, device=_torch_device())
    _write(f"torch-step-{net}-{mode}", r)


def stage_torch_full(mode: str) -> None:
    from benchmarks.peers import torch_gpu

    work = bench._workdir_for("lenet")
    r = torch_gpu.full_lenet_run(mode, mnist_dir=os.path.join(work, "datasets", "mnist"),
                                 max_iter=200 if SMOKE else 10000, device=_torch_device())
    _write(f"torch-full-{mode}", r)


# ---------------------------------------------------------------------------------------------
def _parts() -> dict:
    parts = {}
    for path in sorted(glob.glob(os.path.join(PARTS, "*.json"))):
        with open(path) as f:
            parts[os.path.basename(path)[:-5]] = json.load(f)
    return parts


def _stages() -> list[dict]:
    path = os.path.join(OUT, "stages.tsv")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, rc, secs = line.rstrip("\n").split("\t")
                rows.append({"stage": name, "rc": int(rc), "seconds": float(secs)})
    return rows


def markdown(parts: dict, stages: list[dict]) -> str:
    env = parts.get("env", {})
    lines = [f"# jcaffe device check ({'smoke, ' if SMOKE else ''}backend {BACKEND})", "",
             f"Devices: {', '.join(env.get('devices', [])) or '?'}; JAX {env.get('jax', '?')}, "
             f"Python {env.get('python', '?')}, {env.get('date', '')}.", "",
             "## Stages", "", "| stage | exit | seconds |", "|---|---|---|"]
    for s in stages:
        status = "ok" if s["rc"] == 0 else ("timeout" if s["rc"] in (124, 137) else s["rc"])
        lines.append(f"| {s['stage']} | {status} | {s['seconds']:.0f} |")
    for name in ("pytest", "pytest-vision"):
        log = os.path.join(OUT, f"{name}.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                ends = [l.strip() for l in f if re.search(r"\d+ (passed|failed|error)", l)]
            lines += ["", f"## Tests on the device ({name}.log): "
                          f"{ends[-1] if ends else 'no summary (timed out?)'}"]
    probe = parts.get("probe")
    if probe:
        lines += ["", f"## Precision probe (GEMM {probe['gemm_n']}², conv 64x64x32x32 * 64x64x3x3)",
                  "", "| precision | GEMM rel. max error vs float64 | GEMM TFLOP/s | conv rel. "
                  "max error vs float32 |", "|---|---|---|---|"]
        for p, v in probe["precisions"].items():
            lines.append(f"| {p} | {v['gemm_rel_max_err']:.2e} | {v['gemm_tflops']:.1f} | "
                         f"{v['conv_rel_max_err_vs_float32']:.2e} |")
        lines.append(f"\ntf32 rounds (is TF32): {probe['tf32_rounds']}; bf16 rounds: "
                     f"{probe['bf16_rounds']}.")
    steps = [v for k, v in parts.items() if k.startswith("step-")]
    if steps:
        lines += ["", "## jcaffe train step (forward + backward + SGD), device-resident data", "",
                  "| net | precision | iters/dispatch | compile s | ms/iter median (min–max) | "
                  "images/s | test pass s |", "|---|---|---|---|---|---|---|"]
        for r in sorted(steps, key=lambda r: (r["net"], r["precision"], r["iters_per_call"])):
            lines.append(f"| {r['net']} | {r['precision']} | {r['iters_per_call']} | "
                         f"{r['compile_s']:.2f} | {r['ms_per_iter_median']:.3f} "
                         f"({r['ms_per_iter_min']:.3f}–{r['ms_per_iter_max']:.3f}) | "
                         f"{r['images_per_s']:.0f} | {r['test_pass_s']:.3f} |")
    torch_steps = [v for k, v in parts.items() if k.startswith("torch-step-")]
    if torch_steps:
        lines += ["", "## PyTorch peer, same nets and Caffe SGD", "",
                  "| net | mode | device | compile s | ms/iter median (min–max) | images/s |",
                  "|---|---|---|---|---|---|"]
        for r in torch_steps:
            lines.append(f"| {r['net']} | {r['mode']} | {r['device']} | {r['compile_s']:.2f} | "
                         f"{r['ms_per_iter_median']:.3f} ({r['ms_per_iter_min']:.3f}–"
                         f"{r['ms_per_iter_max']:.3f}) | {r['images_per_s']:.0f} |")
        best = {}
        for r in steps:
            if r["precision"] == "float32":
                cur = best.get(r["net"])
                if cur is None or r["ms_per_iter_median"] < cur["ms_per_iter_median"]:
                    best[r["net"]] = r
        for r in torch_steps:
            j = best.get(r["net"])
            if j:
                lines.append(f"\n{r['net']}: PyTorch {r['mode']} / jcaffe float32 (best "
                             f"dispatch) = {r['ms_per_iter_median'] / j['ms_per_iter_median']:.2f}x"
                             " (> 1: jcaffe faster)")
    fulls = [("jcaffe", parts["full"])] if "full" in parts else []
    fulls += [(f"PyTorch {v['mode']}", v) for k, v in parts.items() if k.startswith("torch-full-")]
    if fulls:
        lines += ["", "## Whole LeNet run (tests every 500 iterations, snapshots)", "",
                  "| system | iterations | wall s | final accuracy |", "|---|---|---|---|"]
        for name, r in fulls:
            lines.append(f"| {name} | {r.get('iterations', r.get('max_iter'))} | "
                         f"{r.get('wall_s', float('nan')):.1f} | {r.get('final_accuracy')} |")
    lt = parts.get("layers")
    if lt and lt.get("layers"):
        lines += ["", f"## `jcaffe time` LeNet per layer ({BACKEND}, ms)", "",
                  "| layer | forward | backward |", "|---|---|---|"]
        for name, t in lt["layers"].items():
            lines.append(f"| {name} | {t.get('forward', 0):.3f} | {t.get('backward', 0):.3f} |")
        for k, v in lt["summary"].items():
            lines.append(f"| **{k}** | {v:.3f} | |")
    return "\n".join(lines) + "\n"


def chart(parts: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [(f"jcaffe {r['precision']} x{r['iters_per_call']}", r["net"], r["ms_per_iter_median"])
            for k, r in parts.items() if k.startswith("step-")]
    rows += [(f"PyTorch {r['mode']}", r["net"], r["ms_per_iter_median"])
             for k, r in parts.items() if k.startswith("torch-step-")]
    if not rows:
        return
    nets = sorted({n for _, n, _ in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 0.35 * len(rows) + 1.5))
    axes = axes if len(nets) > 1 else [axes]
    for ax, net in zip(axes, nets):
        sub = sorted([(s, v) for s, n, v in rows if n == net])
        ax.barh([s for s, _ in sub], [v for _, v in sub], color="#4a7ab5")
        ax.set_title(f"{net}: ms per train iteration ({BACKEND})")
        for i, (_, v) in enumerate(sub):
            ax.text(v, i, f" {v:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stage_report() -> None:
    parts, stages = _parts(), _stages()
    res = {"smoke": SMOKE, "backend": BACKEND, "stages": stages, "parts": parts}
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(parts, stages)
    with open(os.path.join(OUT, "gpu_check.md"), "w") as f:
        f.write(md)
    chart(parts, os.path.join(OUT, "gpu_check.png"))
    print(md)


STAGES = {"env": stage_env, "probe": stage_probe, "step": stage_step, "layers": stage_layers,
          "full": stage_full, "torch-step": stage_torch_step, "torch-full": stage_torch_full,
          "report": stage_report}

if __name__ == "__main__":
    STAGES[sys.argv[1]](*sys.argv[2:])
