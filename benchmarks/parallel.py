"""Data-parallel steps and the single-device step against an earlier revision, in one run.

    python benchmarks/parallel.py                      # LeNet on 1, 2 and 4 virtual CPU devices
    python benchmarks/parallel.py --baseline REV       # also: this tree vs REV, interleaved

For N devices each runs the prototxt's batch (64): N×64 images per iteration. The bytes
all-reduced per iteration are read from the compiled program (the operands of its
all-reduce ops). With ``--baseline`` the single-device LeNet and CIFAR-10 quick steps of this
tree and of revision REV (a temporary git worktree) are measured alternately, each in its own
process, so both see the same machine load; the ratio is REV's time over this tree's.
Virtual CPU devices share the machine's cores: their step time says nothing about GPUs, only
that the program runs and what it moves.

Writes ``benchmarks/results/parallel-<machine>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "bf16": 2, "f16": 2, "pred": 1,
          "u8": 1, "s8": 1}


def allreduce_bytes(hlo: str) -> int:
    """Bytes of the results of every all-reduce in an HLO module's text (per device)."""
    total = 0
    for line in hlo.splitlines():
        if " all-reduce(" not in line and " all-reduce-start(" not in line:
            continue
        lhs = line.split("=", 1)[1] if "=" in line else line
        head = lhs.split("all-reduce", 1)[0]
        for dtype, dims in re.findall(r"\b(f32|s32|u32|f64|s64|bf16|f16|pred|u8|s8)\[([\d,]*)\]",
                                      head):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES[dtype]
    return total


def child(net: str, devices: int, windows: int, per_call: int, repo: str) -> dict:
    """Runs inside a subprocess (its own device count and revision on sys.path)."""
    sys.path.insert(0, repo)
    import jax

    # jcaffe from `repo` first: run.py puts this tree on sys.path when it is imported.
    from jcaffe import prototxt
    from jcaffe.train import Trainer

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import run as suite  # the main suite's dataset helpers (this tree's)

    assert os.path.dirname(os.path.dirname(os.path.abspath(prototxt.__file__))) == \
        os.path.abspath(repo), prototxt.__file__

    os.chdir(suite._workdir_for(net))
    sp = prototxt.read_solver(suite.SOLVERS[net])
    sp.snapshot, sp.snapshot_after_train, sp.display = 0, False, 0
    devs = jax.devices("cpu")[:devices]
    try:
        t = Trainer(sp, devices=devs, verbose=False, iters_per_call=per_call)
        new_api = True
    except TypeError:  # an earlier revision: one device only
        t = Trainer(sp, device=devs[0], verbose=False, iters_per_call=per_call)
        new_api = False
    t._setup_feeds()

    def chunk():
        out = t.run_iterations(per_call)
        jax.block_until_ready(out["loss"] if isinstance(out, dict) else out[0])

    t0 = time.perf_counter()
    chunk()
    first = time.perf_counter() - t0
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        chunk()
        times.append((time.perf_counter() - t0) / per_call * 1e3)
    med = statistics.median(times)
    res = {"net": net, "devices": devices, "ms_per_iter": med, "min": min(times),
           "max": max(times), "compile_s": max(0.0, first - med * per_call / 1e3),
           "images_per_iter": devices * sum(getattr(l, "batch_size", 0)
                                            for l in t.net.data_layers)}
    if new_api and devices > 1:
        feed = t._feeds["train"]
        hlo = t._run_resident.lower(t.state, feed.arrays, per_call).compile().as_text()
        res["allreduce_bytes_per_iter"] = allreduce_bytes(hlo)
        res["param_bytes"] = int(sum(x.size * 4 for x in jax.tree.leaves(t.params)))
    t.close()
    return res


def spawn(net, devices, windows, per_call, repo) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = json.dumps([net, devices, windows, per_call, repo])
    out = subprocess.run([sys.executable, __file__, "--child", args], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--baseline", default="", help="a git revision to compare the 1-device step with")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternations with --baseline")
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--name", default="2core-cpu")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    res: dict = {"dp": [], "baseline": []}
    for n in [int(v) for v in args.devices.split(",")]:
        r = spawn("lenet", n, args.windows, 50, REPO)
        print(r, flush=True)
        res["dp"].append(r)
    if args.baseline:
        base = tempfile.mkdtemp(prefix="jcaffe-base-")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", base, args.baseline],
                       check=True, capture_output=True)
        try:
            for net in ("lenet", "cifar10_quick"):
                per_call = 50 if net == "lenet" else 10
                for _ in range(args.rounds):
                    for label, repo in (("baseline", base), ("this tree", REPO)):
                        r = spawn(net, 1, args.windows, per_call, repo)
                        r["tree"] = label
                        print(r, flush=True)
                        res["baseline"].append(r)
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", base])
        res["baseline_rev"] = args.baseline
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"parallel-{args.name}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = ["#### Data-parallel LeNet step on N virtual CPU devices (one process)", "",
             "| devices | images/iter | ms/iter median (min–max) | compile s | all-reduced per iter | params |",
             "|---|---|---|---|---|---|"]
    def mb(v):
        return "–" if v is None else f"{v / 1e6:.3f} MB"

    for r in res["dp"]:
        lines.append(f"| {r['devices']} | {r['images_per_iter']} | {r['ms_per_iter']:.2f} "
                     f"({r['min']:.2f}–{r['max']:.2f}) | {r['compile_s']:.2f} | "
                     f"{mb(r.get('allreduce_bytes_per_iter'))} | {mb(r.get('param_bytes'))} |")
    if res.get("baseline"):
        lines += ["", f"#### Single-device step: this tree vs {res['baseline_rev']} "
                  "(alternating processes, same run)", "",
                  "| net | tree | ms/iter medians | median of medians |", "|---|---|---|---|"]
        ratios = []
        for net in ("lenet", "cifar10_quick"):
            meds = {}
            for label in ("baseline", "this tree"):
                ms = [r["ms_per_iter"] for r in res["baseline"]
                      if r["net"] == net and r["tree"] == label]
                if ms:
                    meds[label] = statistics.median(ms)
                    lines.append(f"| {net} | {label} | {', '.join(f'{m:.2f}' for m in ms)} | "
                                 f"{meds[label]:.2f} |")
            if len(meds) == 2:
                ratios.append(f"- {net}: baseline / this tree = "
                              f"{meds['baseline'] / meds['this tree']:.3f}x")
        lines += [""] + ratios
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
