"""``Solver.step(n)``: Caffe's Solver::Step, driven a few iterations at a time.

A loop of ``step(k)`` calls with uneven k (crossing test, display and snapshot iterations,
with ``test_initialization``) and then ``solve()`` gives one ``solve()``'s weights, solver
history, snapshots and logged numbers to the bit; the events fall on Caffe's iterations."""

import re

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe import caffemodel, log, sgd_solvers
from jcaffe.config import Config
from jcaffe.data.dataset import write_dataset
from jcaffe.proto import caffe_pb2
from jcaffe.solver import Schedule, Solver
from tests.test_train import NET, _Capture, make_data

SOLVER = """
test_iter: 2
test_interval: 4
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 6
display: 3
average_loss: 2
max_iter: 14
snapshot: 5
random_seed: 11
"""
STEPS = [2, 5, 1, 3]  # then solve() from iteration 11


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    write_dataset(str(d / "train"), *make_data(64, 4))
    write_dataset(str(d / "test"), *make_data(40, 5))
    (d / "net.prototxt").write_text(NET % {"train": d / "train", "test": d / "test"})
    return d


def make_solver(d, name, **kw):
    sp = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    sp.net = str(d / "net.prototxt")
    sp.snapshot_prefix = str(d / name / "s")
    return Solver(sp, devices=[jax.devices()[0]], verbose=False, config=Config(), **kw)


def numbers(text):
    """The logged numbers: losses, outputs, rates, test lines (timings dropped)."""
    out = []
    for line in text.splitlines():
        line = line.split("] ", 1)[-1]
        line = re.sub(r"\(\S+ iter/s, \S+s/\d+ iters\), ", "", line)
        if re.search(r"loss = |net output #|lr = |Testing net", line):
            out.append(line.strip())
    return out


def run(solver, drive):
    stream = _Capture()
    log.setup(stream=stream)
    try:
        drive(solver)
    finally:
        log.setup()
        solver.close()
    return stream.text


@pytest.fixture(scope="module")
def runs(workdir):
    one = make_solver(workdir, "one")
    text_one = run(one, lambda s: s.solve())
    steps = make_solver(workdir, "steps")
    seen = []

    def drive(s):
        for k in STEPS:
            s.step(k)
            seen.append(s.iter)
        s.solve()

    text_steps = run(steps, drive)
    return one, text_one, steps, text_steps, seen


def test_step_loop_equals_solve_to_the_bit(runs, workdir):
    one, text_one, steps, text_steps, seen = runs
    assert seen == [2, 7, 8, 11] and one.iter == steps.iter == 14
    for a, b in zip(jax.tree.leaves(jax.device_get(one.params)),
                    jax.tree.leaves(jax.device_get(steps.params))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    order = one.params_order()
    ha = sgd_solvers.history_to_caffe(jax.device_get(one.opt_state), order)
    hb = sgd_solvers.history_to_caffe(jax.device_get(steps.opt_state), order)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(ha, hb))
    assert numbers(text_one) == numbers(text_steps)
    # The same snapshots, at Caffe's iterations (every 5, and after training at 14).
    for it in (5, 10, 14):
        a = caffemodel.load_caffemodel(str(workdir / "one" / f"s_iter_{it}.caffemodel"))
        b = caffemodel.load_caffemodel(str(workdir / "steps" / f"s_iter_{it}.caffemodel"))
        assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                   for name in a for x, y in zip(a[name], b[name]))


def test_events_fall_on_caffes_iterations(runs):
    _, text_one, _, text_steps, _ = runs
    for text in (text_one, text_steps):
        tests = [int(i) for i in re.findall(r"Iteration (\d+), Testing net", text)]
        assert tests == [0, 4, 8, 12]  # test_initialization; the last iteration, 14, is not
        shown = [int(i) for i in re.findall(r"Iteration (\d+), lr = ", text)]
        assert shown == [0, 3, 6, 9, 12]
        # Caffe's step policy: base_lr * gamma^floor(it / stepsize), the rate applied.
        for it, lr in re.findall(r"Iteration (\d+), lr = (\S+)", text):
            assert float(lr) == pytest.approx(0.05 * 0.5 ** (int(it) // 6), rel=1e-6)
        # Caffe's final display after training: max_iter 14 is not a display iteration.
        assert not re.search(r"Iteration 14, loss", text)


def test_smoothed_loss_is_the_mean_of_the_last_average_loss_iterations(runs, workdir):
    """Caffe's UpdateSmoothedLoss: the display line shows the mean of the last
    ``average_loss`` (2) iterations' losses; the raw losses come from ``outputs`` after each
    ``step(1)`` of a third run."""
    _, text, _, _, _ = runs
    smoothed = {int(i): float(v) for i, v in re.findall(r"Iteration (\d+) \(.*loss = (\S+)", text)}
    assert smoothed.keys() == {0, 3, 6, 9, 12}
    s = make_solver(workdir, "raw")
    raw = []
    for _ in range(13):
        s.step(1)
        raw.append(float(s.outputs["loss"]))
    s.close()
    assert smoothed[0] == pytest.approx(raw[0], rel=1e-5)
    for it in (3, 6, 9, 12):
        assert smoothed[it] == pytest.approx((raw[it - 1] + raw[it]) / 2, rel=1e-5), it
    # run_iterations(n) beyond iters_per_call runs in several dispatches, every iteration.
    short = make_solver(workdir, "short", iters_per_call=2)
    losses = np.asarray(short.run_iterations(5)["loss"])
    assert short.iter == 5
    short.close()
    np.testing.assert_allclose(losses, raw[:5], rtol=1e-6)


def test_outputs_batch_and_step_key_describe_the_last_iteration(workdir):
    s = make_solver(workdir, "probe")
    s.step(3)
    params = jax.device_get(s.params)
    it = s.iter
    batch, key = s.batch(it), s.step_key(it)
    s.step(1)
    out = s.outputs
    s.close()
    # The reference: the net's forward pass on that batch with that key, before the update.
    loss, (blobs, _) = s.net.loss(params, batch, train=True, key=jax.random.fold_in(key, 0))
    assert set(out) == {"loss"}
    np.testing.assert_allclose(out["loss"], float(loss), rtol=1e-5)
    np.testing.assert_allclose(out["loss"], np.asarray(blobs["loss"]), rtol=1e-5)
    assert batch["data"].shape == (16, 1, 8, 8) and batch["label"].shape == (16,)
    # Batch 3 of 64 records with batch 16: records 48..63, in the dataset's order.
    data, labels = make_data(64, 4)
    np.testing.assert_array_equal(batch["label"], labels[48:64])


def test_schedule_is_caffes_conditions():
    sp = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    sched = Schedule.of(sp, 1)
    assert [m for m in range(13) if sched.test_due(m)] == [0, 4, 8, 12]
    sp.test_initialization = False
    sched = Schedule.of(sp, 1)
    assert [m for m in range(13) if sched.test_due(m)] == [4, 8, 12]
    assert sched.test_due(0, final=True)  # Solve's last test ignores test_initialization
    assert sched.tests_before(9) == 2 and Schedule.of(sp, 0).tests_before(9) == 0
    assert [sched.chunk(i, 14, 100) for i in (0, 3, 4, 5, 12)] == [3, 1, 1, 1, 2]
    assert sched.snapshot_due(10) and not sched.snapshot_due(12)


def test_batch_on_two_devices_is_the_root_devices_share_of_the_split_dataset(workdir):
    """On 2 devices the 64 training records are split (32 on each); ``batch(it)`` is the root
    device's records of iteration it, Caffe's rule by hand: record (2·(16·it + i)) mod 64."""
    sp = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    sp.net = str(workdir / "net.prototxt")
    sp.snapshot_prefix = str(workdir / "two" / "s")
    s = Solver(sp, devices=jax.devices("cpu")[:2], verbose=False, config=Config())
    s.step(3)
    batch = s.batch(3)
    feed = s._feeds["train"]
    s.close()
    assert feed.feeders[0].sharded
    assert [x.data.shape[:2] for x in feed.arrays[0]["label"].addressable_shards] == [(1, 32)] * 2
    data, labels = make_data(64, 4)
    records = (2 * (16 * 3 + np.arange(16))) % 64
    np.testing.assert_array_equal(batch["label"], labels[records])
    np.testing.assert_array_equal(batch["data"], data[records])
