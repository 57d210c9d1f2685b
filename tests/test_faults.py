"""Faults survived: ``kill -9`` while snapshotting or creating a dataset, a full disk during a
snapshot, SIGINT / SIGHUP in the middle of a fused chunk, weights from a different net.

Training runs through the command line (``python -m jcaffe.train``) in child processes, each
bounded by a timeout. Kill moments are drawn from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jcaffe.caffemodel import load_caffemodel, read_solverstate
from jcaffe.data.dataset import read_dataset, verify_dataset, write_dataset
from tests.test_train import make_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 180

NET = """
name: "faulty"
layer { name: "data" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.00390625 } data_param { source: "%(db)s" batch_size: 16 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: %(hidden)d weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "%(net)s"
base_lr: 0.02
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.001
power: 0.75
display: %(display)d
max_iter: %(max_iter)d
snapshot: %(snapshot)d
snapshot_prefix: "%(prefix)s"
solver_mode: CPU
random_seed: 11
"""

# Hidden temporaries of jcaffe's atomic file writer: ".<name>.<pid>.<hex>.tmp" (or
# ".<name>.tmp-[<pid>-]<hex>"): the target's name, and the writer's pid where it is given.
_FILE_TMP = re.compile(r"\.(.+?_iter_\d+\.(?:caffemodel|solverstate))\."
                       r"(?:(\d+)\.[0-9a-f]{8}\.tmp|tmp-(?:(\d+)-)?[0-9a-f]{12})")


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "train"
    write_dataset(path, *make_data(160, 0))
    return path


def _solver(folder, db, *, hidden=32, display=50, max_iter=300, snapshot=0, name="run"):
    folder = os.path.join(str(folder), name)
    os.makedirs(folder, exist_ok=True)
    net = os.path.join(folder, "net.prototxt")
    with open(net, "w") as f:
        f.write(NET % {"db": db, "hidden": hidden})
    solver = os.path.join(folder, "solver.prototxt")
    with open(solver, "w") as f:
        f.write(SOLVER % {"net": net, "display": display, "max_iter": max_iter,
                          "snapshot": snapshot, "prefix": os.path.join(folder, "snap", "f")})
    return solver, os.path.join(folder, "snap")


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", JCAFFE_DATA_ON_DEVICE="1", **extra)


def _train(args, env=None, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "jcaffe.train", *args, "--cpu"], cwd=REPO,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _error_line(proc) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("jcaffe: error: ") and sum(
        ln.startswith("jcaffe: ") for ln in proc.stderr.splitlines()) == 1, proc.stderr
    return last


def _snapshots(folder):
    """{iteration: (caffemodel or None, solverstate or None)} of the visible snapshot files."""
    out: dict[int, list] = {}
    for path in glob.glob(os.path.join(folder, "*_iter_*.*")):
        m = re.search(r"_iter_(\d+)\.(caffemodel|solverstate)$", path)
        if m:
            out.setdefault(int(m.group(1)), [None, None])[m.group(2) == "solverstate"] = path
    return out


def _check_snapshots_complete(folder, net_blobs):
    """Every visible snapshot file parses completely and has the net's blobs; every solverstate
    names a caffemodel that exists. Returns the iterations that have a solverstate."""
    resumable = []
    for it, (model, state) in sorted(_snapshots(folder).items()):
        if model:
            blobs = load_caffemodel(model)
            assert {k: [b.shape for b in v] for k, v in blobs.items()} == net_blobs, model
        if state:
            st = read_solverstate(state)
            assert st.iter == it and os.path.exists(st.learned_net), state
            assert len(st.history) == sum(len(v) for v in net_blobs.values())
            resumable.append(it)
    return resumable


def _leftover_temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".")] if os.path.isdir(folder) else []


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "jcaffe.train", *args, "--cpu"], cwd=REPO,
                            env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


class _Log:
    """Collects a child's stderr on a thread; ``wait_for(pattern)`` blocks until a line matches."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc):
        for line in proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait_for(self, pattern, timeout=TIMEOUT):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ln in self.lines:
                    if rx.search(ln):
                        return ln
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))
                self._cv.wait(min(left, 0.2))

    @property
    def text(self):
        self._thread.join(TIMEOUT)
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------
# kill -9 while snapshotting

def test_kill_9_while_snapshotting_leaves_complete_files_and_resumes(db, tmp_path):
    # ip1 of 64 x 4096 weights: each snapshot is ~2 MB of caffemodel and ~2 MB of solverstate,
    # written every 2 iterations, so most of the run is spent inside the atomic writer.
    hidden = 4096
    solver, snap = _solver(tmp_path, db, hidden=hidden, display=2, max_iter=400, snapshot=2)
    net_blobs = {"ip1": [(hidden, 64), (hidden,)], "ip2": [(3, hidden), (3,)]}
    rng = random.Random(20261201)
    kills = 0
    killed: set[int] = set()
    for k in range(3):
        proc = _start([solver])
        log = _Log(proc)
        try:
            log.wait_for(r"Snapshotting solver state")
            if k == 1:
                # This kill waits for a writer's temporary to appear: it lands inside a write.
                seen = set(_leftover_temporaries(snap))
                deadline = time.monotonic() + 20
                while (set(_leftover_temporaries(snap)) <= seen
                       and time.monotonic() < deadline and proc.poll() is None):
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        killed.add(proc.pid)
        resumable = _check_snapshots_complete(snap, net_blobs)
        assert resumable, log.text
        for name in _leftover_temporaries(snap):
            # A killed writer's temporary: hidden, named after its target and the dead pid.
            m = _FILE_TMP.fullmatch(name)
            pid = m and (m.group(2) or m.group(3))
            assert m and (pid is None or int(pid) in killed), name
        for it in sorted(_snapshots(snap))[:-2]:  # keep the disk small
            for p in _snapshots(snap)[it]:
                if p:
                    os.unlink(p)
    newest = max(_check_snapshots_complete(snap, net_blobs))
    state = _snapshots(snap)[newest][1]
    proc = _train([solver, "--snapshot", state, "--iterations", str(newest + 4)])
    assert proc.returncode == 0, proc.stderr
    assert f"Restoring previous solver status from {state} (iteration {newest})" in proc.stderr
    assert f"Iteration {newest + 4}, loss = " in proc.stderr
    assert newest + 4 in _check_snapshots_complete(snap, net_blobs)
    mid_write = len(_leftover_temporaries(snap))
    print(f"kill -9 during snapshots: {kills} kills, {mid_write} inside a file write")


# ---------------------------------------------------------------------------------------------
# kill -9 while creating a dataset

_WRITER = """
import sys, numpy as np
from jcaffe.data.dataset import write_dataset
rng = np.random.default_rng(5)
x = rng.integers(0, 256, (int(sys.argv[2]), 1, 28, 28), dtype=np.uint8)
y = (np.arange(x.shape[0]) % 10).astype(np.int32)
print("start", flush=True)
write_dataset(sys.argv[1], x, y, overwrite=True)
print("done", flush=True)
"""


def _expected_records(n):
    rng = np.random.default_rng(5)
    return (rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8),
            (np.arange(n) % 10).astype(np.int32))


def test_kill_9_while_creating_a_dataset_then_rerun_finishes(tmp_path):
    n = 30000  # 23 MB: two flushes of the writer
    target = tmp_path / "mnistlike"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=REPO)

    def start():
        p = subprocess.Popen([sys.executable, str(script), str(target), str(n)], env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "start"
        return p, time.monotonic()

    p, t0 = start()  # one uninterrupted run times the write
    assert p.stdout.readline().strip() == "done"
    p.wait(TIMEOUT)
    duration = time.monotonic() - t0
    x, y = _expected_records(n)
    rng = random.Random(7)
    outcomes = []
    killed: set[str] = set()
    for _ in range(4):
        p, t0 = start()
        time.sleep(rng.uniform(0.0, duration))
        p.send_signal(signal.SIGKILL)
        p.wait(TIMEOUT)
        killed.add(str(p.pid))
        # The dataset (the previous complete one, or the new one if the kill came after the
        # rename) is always whole; the killed writer's temporaries are hidden beside it.
        meta = verify_dataset(target)
        assert meta["count"] == n
        left = [e for e in os.listdir(tmp_path) if e.startswith(".mnistlike.")]
        # (A writer killed before its first step cleaned nothing: earlier leftovers may remain.)
        assert all(re.fullmatch(r"\.mnistlike\.(tmp|old|del)-(\d+)-[0-9a-f]{12}", e)
                   and e.split("-")[1] in killed for e in left), left
        outcomes.append(bool(left))
    # A fresh start on an empty folder, killed, then re-run in this process.
    shutil.rmtree(target)
    p, t0 = start()
    time.sleep(duration * 0.3)
    p.send_signal(signal.SIGKILL)
    p.wait(TIMEOUT)
    assert not os.path.exists(target) or verify_dataset(target)["count"] == n
    write_dataset(target, x, y, overwrite=True)
    assert verify_dataset(target)["count"] == n
    with read_dataset(target) as src:
        d, lab = src.read_all()
    np.testing.assert_array_equal(d, x)
    np.testing.assert_array_equal(lab, y)
    assert [e for e in os.listdir(tmp_path) if e.startswith(".mnistlike.")] == []
    print(f"kill -9 during write_dataset: 5 kills, {sum(outcomes)} left a temporary")


def test_interrupted_replacement_is_put_back(tmp_path):
    """A writer killed between its two renames (old dataset moved aside, new one not yet in
    place) leaves no dataset at PATH: the next writer restores the old one before anything."""
    from jcaffe._atomic import remove_stale

    x, y = _expected_records(20)
    target = tmp_path / "ds"
    write_dataset(target, x, y)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    os.rename(target, tmp_path / f".ds.old-{dead}-0123456789ab")
    os.mkdir(tmp_path / f".ds.tmp-{dead}-ba9876543210")
    alive = tmp_path / f".ds.tmp-{os.getppid()}-aaaaaaaaaaaa"  # a live writer's: kept
    os.mkdir(alive)
    done = remove_stale(str(target))
    assert len(done) == 2 and verify_dataset(target)["count"] == 20
    assert sorted(os.listdir(tmp_path)) == sorted(["ds", alive.name])


# ---------------------------------------------------------------------------------------------
# A full disk during a snapshot

_ENOSPC_RUNNER = """
import builtins, errno, os, sys

victim = sys.argv[1]        # the target whose write fails: '..._iter_4.caffemodel' or '.solverstate'
real_open = builtins.open

class Full:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])   # half of it reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def open_(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    base = os.path.basename(str(file))
    if "w" in mode and base.startswith("." + victim + ".") and "tmp" in base:
        return Full(f)   # the atomic writer's temporary for the victim
    return f

builtins.open = open_
from jcaffe.train import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module", params=["caffemodel", "solverstate"])
def full_disk_run(db, tmp_path_factory, request):
    """A run whose write of ``f_iter_4.<victim>`` meets a full disk (half written, then ENOSPC)."""
    folder = tmp_path_factory.mktemp("enospc")
    solver, snap = _solver(folder, db, display=2, max_iter=8, snapshot=2)
    script = folder / "enospc.py"
    script.write_text(_ENOSPC_RUNNER)
    target = f"f_iter_4.{request.param}"
    proc = subprocess.run([sys.executable, str(script), target, solver, "--cpu"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return request.param, snap, target, proc


def test_full_disk_during_a_snapshot(full_disk_run):
    victim, snap, target, proc = full_disk_run
    line = _error_line(proc)
    assert os.path.join(snap, target) in line and "No space left on device" in line, line
    found = _snapshots(snap)
    assert sorted(found) == ([2, 4] if victim == "solverstate" else [2])
    assert not os.path.exists(os.path.join(snap, target)) and _leftover_temporaries(snap) == []
    assert _check_snapshots_complete(snap, {"ip1": [(32, 64), (32,)],
                                            "ip2": [(3, 32), (3,)]}) == [2]


def test_full_disk_names_the_last_good_snapshot(full_disk_run):
    _, snap, _, proc = full_disk_run
    assert os.path.join(snap, "f_iter_2.solverstate") in _error_line(proc)


def _mount_tmpfs(folder, size):
    os.makedirs(folder, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    return r.returncode == 0


def test_full_disk_on_a_real_small_filesystem(db, tmp_path):
    """A 1 MiB tmpfs holds a few snapshots of a ~100 KB net, then fills up (needs root to mount;
    skipped otherwise)."""
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        hidden = 128
        solver, _ = _solver(tmp_path, db, hidden=hidden, display=2, max_iter=200, snapshot=2)
        text = open(solver).read().replace(str(tmp_path / "run" / "snap"), str(mnt))
        open(solver, "w").write(text)
        proc = _train([solver])
        line = _error_line(proc)
        assert str(mnt) in line and "No space left on device" in line, line
        assert "_iter_" in line
        blobs = {"ip1": [(hidden, 64), (hidden,)], "ip2": [(3, hidden), (3,)]}
        resumable = _check_snapshots_complete(str(mnt), blobs)
        assert resumable and _leftover_temporaries(str(mnt)) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGHUP in the middle of a fused chunk

def _final_blobs(path):
    return {k: [np.asarray(b) for b in v] for k, v in load_caffemodel(path).items()}


def _assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def reference_run(db, tmp_path_factory):
    """An uninterrupted 1000-iteration run (chunks of 50 iterations, device-resident data)."""
    solver, snap = _solver(tmp_path_factory.mktemp("ref"), db, display=50, max_iter=1000)
    proc = _train([solver])
    assert proc.returncode == 0, proc.stderr
    return _final_blobs(os.path.join(snap, "f_iter_1000.caffemodel"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_signal_mid_chunk_snapshots_at_a_boundary_and_resumes_bit_exactly(db, tmp_path, sig,
                                                                          reference_run):
    solver, snap = _solver(tmp_path, db, display=50, max_iter=1000)
    proc = _start([solver])
    log = _Log(proc)
    try:
        log.wait_for(r"Iteration 50 \(")  # training is under way, inside a 50-iteration chunk
        proc.send_signal(getattr(signal, sig))
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.text
    assert proc.returncode == 0, text
    assert f"Signal {int(getattr(signal, sig))} received" in text
    taken = sorted(_snapshots(snap))
    if sig == "SIGINT":
        # Caffe: snapshot, then stop, at the iteration boundary after the signal.
        assert len(taken) == 1 and 50 <= taken[0] < 1000 and taken[0] % 50 == 0, taken
        assert f"Optimization stopped early at iteration {taken[0]}." in text
        assert f"Iteration {taken[0] + 1}" not in text
        state = _snapshots(snap)[taken[0]][1]
        proc2 = _train([solver, "--snapshot", state])
        assert proc2.returncode == 0, proc2.stderr
        assert f"(iteration {taken[0]})" in proc2.stderr
    else:
        # Caffe: snapshot and go on to the end (the snapshot changes nothing in the run).
        assert len(taken) == 2 and taken[-1] == 1000 and taken[0] % 50 == 0, taken
        assert "Optimization Done." in text
    _assert_bit_equal(_final_blobs(os.path.join(snap, "f_iter_1000.caffemodel")), reference_run)


# ---------------------------------------------------------------------------------------------
# Weights or solver state of a different net

@pytest.fixture(scope="module")
def snapshot_a(db, tmp_path_factory):
    """A 2-iteration run of the net with 32 hidden units: (solver, caffemodel, solverstate)."""
    folder = tmp_path_factory.mktemp("other")
    solver_a, snap_a = _solver(folder, db, hidden=32, display=2, max_iter=2, name="a")
    proc = _train([solver_a])
    assert proc.returncode == 0, proc.stderr
    return (folder, solver_a, os.path.join(snap_a, "f_iter_2.caffemodel"),
            os.path.join(snap_a, "f_iter_2.solverstate"))


def test_weights_and_solverstate_from_a_different_net(db, snapshot_a):
    folder, _, model_a, state_a = snapshot_a
    solver_b, _ = _solver(folder, db, hidden=48, display=2, max_iter=2, name="b")
    for flag, path in (("--weights", model_a), ("--snapshot", state_a)):
        line = _error_line(_train([solver_b, flag, path]))
        assert model_a in line and "layer 'ip1'" in line, line
        assert "[32, 64]" in line and "[48, 64]" in line, line


@pytest.fixture(scope="module")
def mixed_state_run(snapshot_a):
    """Resuming from a solverstate whose caffemodel fits but whose history is another net's."""
    from jcaffe.caffemodel import write_solverstate

    folder, solver_a, _, state_a = snapshot_a
    st = read_solverstate(state_a)
    bad = os.path.join(str(folder), "mixed.solverstate")
    history = [np.zeros((48, 64), np.float32)] + list(st.history[1:])
    write_solverstate(bad, iter=2, learned_net=st.learned_net, history=history)
    return bad, _train([solver_a, "--snapshot", bad])


def test_solverstate_history_from_a_different_net(mixed_state_run):
    _, proc = mixed_state_run
    line = _error_line(proc)
    assert "layer 'ip1'" in line and "(48, 64)" in line and "(32, 64)" in line, line


def test_solverstate_history_error_names_the_file(mixed_state_run):
    bad, proc = mixed_state_run
    assert bad in _error_line(proc)
