"""Resident memory over a whole LeNet training run: does it grow with iterations?

    python datasets/mnist/prepare_mnist.py        # once
    python benchmarks/memory.py                   # 10 000 iterations (about 3 minutes on 2 cores)
    python benchmarks/memory.py --iterations 2000 # shorter

Runs ``python -m jcaffe.train prototxt/lenet_solver.prototxt --cpu`` in a child process (in a
temporary folder laid out like the repository, so snapshots land there) and samples the child's
resident set size (psutil, every 0.1 s, on a thread) for the whole run. Reports RSS at the start
of training (the first ``Iteration 0`` line), the peak, the end (``Optimization Done.``),
and at each test pass (``Iteration N, Testing net``), plus the slope of a least-squares line
through the test-pass samples after the first 2000 iterations (MB per 1000 iterations: ~0 when
memory does not grow) and the change between the test passes of the second half (which a
one-off step, such as the first snapshot's buffers, does not inflate). Writes ``benchmarks/results/memory-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def _workdir() -> str:
    work = tempfile.mkdtemp(prefix="jcaffe-memory-")
    os.symlink(os.path.join(REPO, "prototxt"), os.path.join(work, "prototxt"))
    mnist = os.path.join(REPO, "datasets", "mnist")
    if not os.path.exists(os.path.join(mnist, "mnist_train", "jcaffe_dataset.json")):
        sys.exit("memory.py: MNIST is not prepared: run python datasets/mnist/prepare_mnist.py")
    os.makedirs(os.path.join(work, "datasets"))
    os.symlink(mnist, os.path.join(work, "datasets", "mnist"))
    return work


class _Sampler:
    """RSS of a process (and its children) every ``period`` seconds, on a thread."""

    def __init__(self, pid: int, period: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> float | None:
        import psutil

        try:
            total = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            return total / MB
        except psutil.Error:
            return None

    def _run(self):
        while not self._stop.is_set():
            r = self.rss()
            if r is None:
                return
            self.samples.append((time.monotonic() - self.t0, r))
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()
        self._thread.join()


def measure(iterations: int, solver: str) -> dict:
    work = _workdir()
    cmd = [sys.executable, "-m", "jcaffe.train", solver, "--cpu", "--iterations", str(iterations)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    sampler = _Sampler(proc.pid)
    events: list[dict] = []  # log events with the RSS sampled when they were read
    start = None
    end = None
    tail: list[str] = []
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-5:]
        m = re.search(r"\] Iteration (\d+), Testing net \(#0\)", line)
        if m:
            events.append({"iteration": int(m.group(1)), "rss_mb": sampler.rss(),
                           "t": time.monotonic() - t0})
        elif start is None and re.search(r"\] Iteration 0 \(", line):
            start = {"rss_mb": sampler.rss(), "t": time.monotonic() - t0}
        elif "Optimization Done." in line:
            end = sampler.rss()
    rc = proc.wait()
    sampler.stop()
    wall = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"memory.py: training failed (exit {rc}): {' | '.join(tail)}")
    rss = [r for _, r in sampler.samples if r > 0]  # an exited child reads as 0
    late = [(e["iteration"], e["rss_mb"]) for e in events
            if e["rss_mb"] is not None and e["iteration"] >= 2000]
    slope = None
    if len(late) >= 3:
        n = len(late)
        mx = sum(i for i, _ in late) / n
        my = sum(r for _, r in late) / n
        sxx = sum((i - mx) ** 2 for i, _ in late)
        slope = 1000 * sum((i - mx) * (r - my) for i, r in late) / sxx
    half = [e["rss_mb"] for e in events
            if e["rss_mb"] is not None and e["iteration"] >= iterations // 2]
    return {
        "second_half_change_mb": round(half[-1] - half[0], 1) if len(half) >= 2 else None,
        "command": " ".join(["python", "-m", "jcaffe.train", solver, "--cpu", "--iterations",
                             str(iterations)]),
        "iterations": iterations, "wall_s": round(wall, 1), "samples": len(rss),
        "sample_period_s": sampler.period,
        "start_mb": round(start["rss_mb"], 1) if start and start["rss_mb"] else None,
        "first_sample_mb": round(rss[0], 1), "peak_mb": round(max(rss), 1),
        "end_mb": round(end if end else rss[-1], 1),
        "test_passes": [{"iteration": e["iteration"], "rss_mb": round(e["rss_mb"], 1),
                         "t_s": round(e["t"], 1)} for e in events if e["rss_mb"] is not None],
        "slope_mb_per_1000_iter_after_2000": None if slope is None else round(slope, 3),
        "trace": [(round(t, 1), round(r, 1)) for t, r in sampler.samples[::10] if r > 0],
    }


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Resident memory over a whole LeNet run ({res['iterations']} iterations)", "",
             f"Measured on: {m['cpu']}, {m['cores']} cores; Python {m['python']}, "
             f"{m['date']}.", "",
             f"`{res['command']}`: {res['wall_s']} s wall, RSS sampled every "
             f"{res['sample_period_s']} s ({res['samples']} samples).", "",
             "| start of training | peak | end | trend after iteration 2000 | change over the "
             "second half |",
             "|---|---|---|---|---|",
             f"| {res['start_mb']} MB | {res['peak_mb']} MB | {res['end_mb']} MB | "
             f"{res['slope_mb_per_1000_iter_after_2000']} MB per 1000 iterations | "
             f"{res.get('second_half_change_mb')} MB |", "",
             "RSS at each test pass:", "", "| iteration | RSS MB |", "|---|---|"]
    if res.get("note"):
        lines[6:6] = [res["note"], ""]
    lines += [f"| {p['iteration']} | {p['rss_mb']} |" for p in res["test_passes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=10000)
    p.add_argument("--solver", default="prototxt/lenet_solver.prototxt")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--name", default=f"{os.cpu_count()}core-cpu")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of a saved run")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            res = json.load(f)
        tp = res["test_passes"]
        half = [t["rss_mb"] for t in tp if t["iteration"] >= res["iterations"] // 2]
        res.setdefault("second_half_change_mb",
                       round(half[-1] - half[0], 1) if len(half) >= 2 else None)
        with open(a.render, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(os.path.splitext(a.render)[0] + ".md", "w") as f:
            f.write(to_markdown(res))
        print(to_markdown(res))
        return 0
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = found.group(1) if found else cpu
    except OSError:
        pass
    res = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                       "date": datetime.datetime.now().isoformat(timespec="seconds")}}
    res.update(measure(a.iterations, a.solver))
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"memory-{a.name}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    md = to_markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
