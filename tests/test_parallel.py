"""Data-parallel training through the command line, with Caffe's multi-GPU semantics: N
devices × batch B end at the weights of one device × batch N·B; many processes on one
machine (jax.distributed over 127.0.0.1) give the same weights; resume across device counts.

Each run is a subprocess with its own virtual CPU devices, bounded by a timeout."""

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from jcaffe.caffemodel import load_caffemodel
from jcaffe.data.dataset import write_dataset
from jcaffe.data.mnist import read_split

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = ROOT / "datasets" / "mnist"
ITERS = 30

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: {iters}
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 10
max_iter: {iters}
snapshot: {snapshot}
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 3
"""


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """LeNet (the shipped prototxt) on 2 000 MNIST training and 100 test digits."""
    d = tmp_path_factory.mktemp("parallel")
    x, y = read_split(str(MNIST / "train-images-idx3-ubyte.gz"),
                      str(MNIST / "train-labels-idx1-ubyte.gz"), limit=2000)
    write_dataset(str(d / "train"), x, y)
    x, y = read_split(str(MNIST / "t10k-images-idx3-ubyte.gz"),
                      str(MNIST / "t10k-labels-idx1-ubyte.gz"), limit=100)
    write_dataset(str(d / "test"), x, y)
    text = (ROOT / "prototxt" / "lenet_train_test.prototxt").read_text()
    text = re.sub(r'source: "[^"]*mnist_train[^"]*"', f'source: "{d / "train"}"', text)
    text = re.sub(r'source: "[^"]*mnist_test[^"]*"', f'source: "{d / "test"}"', text)
    assert str(d / "train") in text and str(d / "test") in text
    return d, text


def make_solver(d, text, name, batch, iters=ITERS, snapshot=0):
    net = d / f"{name}.prototxt"
    net.write_text(text.replace("batch_size: 64", f"batch_size: {batch}"))
    solver = d / f"{name}_solver.prototxt"
    solver.write_text(SOLVER.format(net=net, iters=iters, snapshot=snapshot,
                                    prefix=d / name / "snap"))
    return solver


def run(args, devices, timeout=240, extra_env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS="--xla_force_host_platform_device_count=%d" % devices)
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-m", "jcaffe.train", *args, "--cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(procs, timeout=240):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append(err)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def weights(d, name, it=ITERS):
    return load_caffemodel(str(d / name / f"snap_iter_{it}.caffemodel"))


def rel_diff(a, b):
    worst = 0.0
    assert a.keys() == b.keys()
    for layer in a:
        for x, y in zip(a[layer], b[layer]):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            worst = max(worst, np.linalg.norm(x - y) / np.linalg.norm(y))
    return worst


def logged_tests(log):
    return re.findall(r"Test net output #\d+: (\S+) = ([-\d.e+]+)", log)


@pytest.fixture(scope="module")
def runs(lenet):
    d, text = lenet
    four = make_solver(d, text, "four", 16, snapshot=ITERS // 2)
    one = make_solver(d, text, "one", 64)
    small = make_solver(d, text, "small", 16)
    logs = finish([run([str(four), "--devices", "all"], 4),
                   run([str(one)], 1), run([str(small)], 1)])
    return d, dict(zip(["four", "one", "small"], logs))


def test_four_devices_batch_16_equal_one_device_batch_64(runs):
    d, logs = runs
    four, one, small = weights(d, "four"), weights(d, "one"), weights(d, "small")
    assert rel_diff(four, one) <= 1e-4
    assert rel_diff(small, one) > 1e-2          # the per-device batch alone differs
    # The logs say so, and the test pass (on the root device, as Caffe) gives the same figures.
    assert "Data parallel on 4 devices" in logs["four"]
    # 2 000 records over 4 devices: each holds its 500 (netfeed's split layout).
    assert "layer 'mnist': dataset split over 4 devices, 1/4 on each" in logs["four"]
    got, want = logged_tests(logs["four"]), logged_tests(logs["one"])
    assert [n for n, _ in got] == [n for n, _ in want] == ["accuracy", "loss"] * 2
    np.testing.assert_allclose([float(v) for _, v in got], [float(v) for _, v in want],
                               rtol=1e-4)
    train_losses = lambda log: [float(v) for v in re.findall(r"Iteration \d+ .*loss = (\S+)", log)]  # noqa: E731
    np.testing.assert_allclose(train_losses(logs["four"]), train_losses(logs["one"]), rtol=1e-4)


def test_resume_data_parallel_and_across_device_counts(runs, lenet):
    """A data-parallel snapshot resumes bit-exactly on the same device count (the
    device-resident dataset split over the 4 devices), and one device with N times the batch
    continues it to the same weights."""
    d, _ = runs
    _, text = lenet
    state = d / "four" / f"snap_iter_{ITERS // 2}.solverstate"
    again = make_solver(d, text, "four_again", 16)
    wider = make_solver(d, text, "one_again", 64)
    logs = finish([run([str(again), "--devices", "all", "--snapshot", str(state)], 4),
                   run([str(wider), "--snapshot", str(state)], 1)])
    assert "dataset split over 4 devices" in logs[0]  # the resumed run cuts split shares
    full, resumed = weights(d, "four"), weights(d, "four_again")
    for layer in full:
        for x, y in zip(full[layer], resumed[layer]):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), layer
    assert rel_diff(weights(d, "one_again"), full) <= 1e-4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_weights_of_one(runs, lenet):
    """2 processes × 2 virtual devices on 127.0.0.1 train as 4 devices in one process (each
    holding only its devices' quarters of the device-resident dataset); only process 0 writes
    snapshots and logs at INFO."""
    d, _ = runs
    _, text = lenet
    solver = make_solver(d, text, "multi", 16)
    port = free_port()
    common = ["--devices", "all", "--coordinator_address", f"127.0.0.1:{port}",
              "--num_processes", "2", "--heartbeat_timeout", "20"]
    procs = [run([str(solver), *common, "--process_id", str(i)], 2) for i in range(2)]
    logs = finish(procs, timeout=240)
    # Float32 summation order differs between the layouts (the cross-process all-reduce, and
    # oneDNN's OpenMP-threaded reductions, whose split differs between one process driving 4
    # devices and two driving 2: 9.9e-5 after 30 iterations; 1e-5 with OMP_NUM_THREADS=1 or
    # im2col convolutions). A wrong split of the batch differs by more than 1e-2 (the 1 x 16
    # run of test_four_devices_batch_16_equal_one_device_batch_64).
    assert rel_diff(weights(d, "multi"), weights(d, "four")) <= 1e-3
    assert "Optimization Done" in logs[0] and "Optimization Done" not in logs[1]
    assert "dataset split over 4 devices" in logs[0]
    assert not list((d / "multi").glob("*.tmp*"))


def test_a_killed_process_stops_the_others(runs, lenet, tmp_path):
    """kill -9 of one process of a multi-process run: the other stops by itself within the
    heartbeat timeout with an error, never hangs."""
    import signal
    import time
    d, _ = runs
    _, text = lenet
    solver = make_solver(d, text, "killed", 16, iters=100000)
    port = free_port()
    common = ["--devices", "all", "--coordinator_address", f"127.0.0.1:{port}",
              "--num_processes", "2", "--heartbeat_timeout", "5", "--iters_per_call", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "jcaffe.train", str(solver), *common,
                               "--process_id", str(i), "--cpu"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(logs[i], "w"))
             for i in range(2)]
    try:
        deadline = time.monotonic() + 180
        while "Iteration 10 " not in logs[0].read_text() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-2000:]
            time.sleep(0.5)
        assert "Iteration 10 " in logs[0].read_text(), "training did not start"
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        procs[0].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    err = logs[0].read_text()
    # JAX's coordination service ends the survivor (SIGABRT) and says why.
    assert procs[0].returncode != 0
    assert "another task died" in err or "unhealthy" in err, err[-2000:]
    assert waited < 60, waited
