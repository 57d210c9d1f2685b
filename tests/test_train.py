"""The trainer: Caffe's Solve loop, logs that Caffe's tools parse, snapshots, resume, divergence."""

import re

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe import log
from jcaffe.config import Config
from jcaffe.data.dataset import write_dataset
from jcaffe.errors import SolverError
from jcaffe.proto import caffe_pb2
from jcaffe.train import Trainer
from tests.layer_utils import CHOICES

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 } data_param { source: "%(train)s" batch_size: 16 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.00390625 } data_param { source: "%(test)s" batch_size: 20 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
test_iter: 3
test_interval: 10
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.001
power: 0.75
display: 5
max_iter: 20
snapshot: 10
solver_mode: CPU
random_seed: 7
"""


def make_data(n, seed):
    """Three classes told apart by where a bright square sits: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    data = rng.integers(0, 60, (n, 1, 8, 8)).astype(np.uint8)
    for i, c in enumerate(labels):
        data[i, 0, 2 * c:2 * c + 3, 2:6] = 250
    return data, labels


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_dataset(str(d / "train"), *make_data(96, 0))
    write_dataset(str(d / "test"), *make_data(60, 1))
    (d / "net.prototxt").write_text(NET % {"train": d / "train", "test": d / "test"})
    return d


@pytest.fixture(scope="module", params=sorted(CHOICES))
def choices(request):
    """The CPU's and a GPU's execution choices (``CHOICES``), for the tests that matter."""
    return request.param


def snap_dir(workdir, choices="cpu"):
    return workdir / ("snap" if choices == "cpu" else f"snap_{choices}")


def solver_param(workdir, extra="", choices="cpu", **fields):
    sp = text_format.Parse(SOLVER + extra, caffe_pb2.SolverParameter())
    sp.net = str(workdir / "net.prototxt")
    sp.snapshot_prefix = str(snap_dir(workdir, choices) / "tiny")
    for k, v in fields.items():
        setattr(sp, k, v)
    if sp.test_interval == 0:
        del sp.test_iter[:]  # no test nets (Caffe requires test_interval > 0 with test nets)
    return sp


def trainer(workdir, extra="", data_on_device=None, choices="cpu", **kw):
    fields = {k: kw.pop(k) for k in list(kw) if k not in ("iters_per_call", "devices")}
    if "devices" not in kw:  # the test platform's (JCAFFE_TEST_PLATFORM), not solver_mode's
        kw["devices"] = [jax.devices()[0]]
    return Trainer(solver_param(workdir, extra, choices, **fields), verbose=False,
                   config=CHOICES[choices].replace(data_on_device=data_on_device), **kw)


def params_np(params):
    return jax.tree.map(np.asarray, jax.device_get(params))


def assert_same_params(p, q, exact=True):
    """Every blob equal: bit for bit (``exact``), or to float32 rounding."""
    a, b = params_np(p), params_np(q)
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            if exact:
                assert x.tobytes() == y.tobytes(), name
            else:
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def full_run(workdir, choices):
    """One uninterrupted 20-iteration run (device-resident data), its log and results, with
    the CPU's and with a GPU's execution choices."""
    stream = _Capture()
    log.setup(stream=stream)
    try:
        t = trainer(workdir, choices=choices)
        results = t.solve()
        t.close()
    finally:
        log.setup()
    return t, results, stream.text


def test_choices_run_as_intended(full_run, choices):
    t = full_run[0]
    convs = {t.net.conv_formulation(l) for l in t.net.layers if l.type == "Convolution"}
    if choices == "gpu":  # XLA convolutions inside lax.scan, NCHW
        assert t.net.layout == "NCHW" and convs == {"xla"} and t.iters_per_call > 1
    elif choices == "cpu-onednn":  # oneDNN's kernels inside lax.scan
        assert t.net.layout == "NHWC" and convs == {"onednn"} and t.iters_per_call > 1
    else:
        assert t.net.layout == "NHWC" and convs == {"im2col"}


class _Capture:
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


def test_learns_and_tests(full_run):
    t, results, _ = full_run
    assert t.iter == 20
    acc = float(results["test"][0]["accuracy"])
    assert acc > 0.9, acc  # three well-separated classes


def test_log_parses_with_caffes_parse_log_regexes(full_run):
    _, _, text = full_run
    # The regular expressions of Caffe's tools/extra/parse_log.py.
    regex_iteration = re.compile(r"Iteration (\d+)")
    regex_train_output = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
    regex_test_output = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
    regex_learning_rate = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
    assert re.search(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] Solving tiny$", text, re.M)
    train, test, lrs = [], [], []
    iteration = -1
    for line in text.splitlines():
        m = regex_iteration.search(line)
        if m:
            iteration = int(m.group(1))
        m = regex_train_output.search(line)
        if m:
            train.append((iteration, m.group(2), float(m.group(3))))
        m = regex_test_output.search(line)
        if m:
            test.append((iteration, m.group(2), float(m.group(3))))
        m = regex_learning_rate.search(line)
        if m:
            lrs.append((iteration, float(m.group(1))))
    assert [i for i, name, _ in train] == [0, 5, 10, 15]
    assert {name for _, name, _ in train} == {"loss"}
    assert [(i, name) for i, name, _ in test] == [(0, "accuracy"), (0, "loss"), (10, "accuracy"),
                                                  (10, "loss"), (20, "accuracy"), (20, "loss")]
    sp = text_format.Parse(SOLVER, caffe_pb2.SolverParameter())
    for it, lr in lrs:
        expect = sp.base_lr * (1 + sp.gamma * it) ** -sp.power  # Caffe's inv policy
        assert lr == pytest.approx(expect, rel=1e-5)
    assert [i for i, _ in lrs] == [0, 5, 10, 15]
    # Caffe's order at a test+display iteration: test first, then loss, outputs, lr.
    block = text[text.index("Iteration 10, Testing net (#0)"):]
    order = [block.index(s) for s in ("Test net output #0", "Iteration 10 (", "Train net output #0",
                                      "Iteration 10, lr")]
    assert order == sorted(order)


def test_snapshot_files_are_caffe_protos(full_run, workdir, choices):
    t, _, _ = full_run
    state = caffe_pb2.SolverState()
    state.ParseFromString((snap_dir(workdir, choices) / "tiny_iter_20.solverstate").read_bytes())
    assert state.iter == 20
    assert state.learned_net.endswith("tiny_iter_20.caffemodel")
    assert len(state.history) == len(t.net.params_info)  # SGD: one history blob per param
    model = caffe_pb2.NetParameter()
    model.ParseFromString((snap_dir(workdir, choices) / "tiny_iter_20.caffemodel").read_bytes())
    blobs = {l.name: l.blobs for l in model.layer if l.blobs}
    np.testing.assert_array_equal(np.asarray(blobs["conv"][0].data, np.float32),
                                  np.ravel(params_np(t.params)["conv"][0]))
    assert list(blobs["conv"][0].shape.dim) == [4, 1, 3, 3]
    # The momentum history is Caffe's v (lr inside), so it matches the last update's size.
    assert (snap_dir(workdir, choices) / "tiny_iter_10.caffemodel").exists()


def test_resume_is_bit_exact(full_run, workdir, choices):
    t_full, _, _ = full_run
    resumed = trainer(workdir, choices=choices)
    resumed.restore(str(snap_dir(workdir, choices) / "tiny_iter_10.solverstate"))
    assert resumed.iter == 10
    resumed.solve()
    resumed.close()
    assert_same_params(t_full.params, resumed.params)


def test_host_fed_path_equals_device_resident(workdir, choices):
    kw = dict(snapshot=0, max_iter=10, test_interval=0, snapshot_after_train=False,
              choices=choices)
    host = trainer(workdir, data_on_device=False, **kw)
    dev = trainer(workdir, data_on_device=True, **kw)
    host.solve()
    dev.solve()
    host.close()
    dev.close()
    assert_same_params(host.params, dev.params, exact=False)


@pytest.mark.parametrize("choices_, on_device", [("cpu", True), ("cpu", False), ("gpu", True)])
def test_step_does_not_recompile(workdir, compiles, choices_, on_device):
    t = trainer(workdir, test_interval=0, snapshot=0, snapshot_after_train=False, display=0,
                iters_per_call=5, data_on_device=on_device, choices=choices_)
    t._setup_feeds()
    jax.block_until_ready(t.run_iterations(5))
    before = compiles.count
    jax.block_until_ready(t.run_iterations(5))
    jax.block_until_ready(t.run_iterations(5))
    assert compiles.count == before
    t.close()


def test_update_is_caffes_sgd(workdir):
    """One jcaffe iteration equals Caffe's SGD formula applied to JAX's gradient."""
    t = trainer(workdir, test_interval=0, snapshot=0, snapshot_after_train=False, display=0)
    t._setup_feeds()
    p0 = params_np(t.params)
    feed = t._feeds["train"]
    batch = feed.batch_at(feed.arrays, 0)
    key = jax.random.fold_in(t.state.key, 0)
    grads = jax.jit(jax.grad(lambda p: t.net.loss(p, batch, train=True,
                                                  key=jax.random.fold_in(key, 0))[0]))(t.params)
    t.run_iterations(1)
    p1 = params_np(t.params)
    g = params_np(grads)
    lr = 0.05
    for info in t.net.params_info:
        w = p0[info.layer][info.index]
        v = lr * info.lr_mult * (g[info.layer][info.index] + 0.0005 * info.decay_mult * w)
        np.testing.assert_allclose(p1[info.layer][info.index], w - v, rtol=2e-5, atol=1e-7)


def test_divergence_stops_with_the_iteration(workdir):
    t = trainer(workdir, base_lr=1e6, test_interval=0, snapshot=0, display=0,
                snapshot_after_train=False, lr_policy="fixed")
    with pytest.raises(SolverError, match=r"at iteration \d+: training diverged"):
        t.solve()
    t.close()


def test_stop_request_snapshots(workdir, tmp_path):
    t = trainer(workdir, test_interval=0, snapshot=0, display=0, iters_per_call=4,
                snapshot_prefix=str(tmp_path / "s"))
    t.request("stop")  # as SIGINT does
    t.solve()
    t.close()
    assert t.iter == 4
    assert (tmp_path / "s_iter_4.solverstate").exists()


def test_gpu_flag_without_gpu_is_an_error():
    from jcaffe.parallel import select_devices
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    with pytest.raises(SolverError, match="--gpu"):
        select_devices(gpu=[0])
    gpu_mode = caffe_pb2.SolverParameter(solver_mode=caffe_pb2.SolverParameter.GPU)
    assert [d.platform for d in select_devices(gpu_mode)] == ["cpu"]  # warns, falls back
    # An unset solver_mode means CPU (caffe train); --devices picks several of the platform.
    assert select_devices(caffe_pb2.SolverParameter()) == [jax.devices("cpu")[0]]
    assert select_devices(None, devices="all") == jax.devices("cpu")
    assert select_devices(None, devices=[1, 3]) == [jax.devices("cpu")[i] for i in (1, 3)]
    with pytest.raises(SolverError, match="CPU device 9 requested but only 4 exist"):
        select_devices(None, devices=[9])


@pytest.mark.parametrize("on_device", [True, False])
def test_label_out_of_range_names_the_record(tmp_path, on_device):
    from jcaffe.errors import DataError
    data, labels = make_data(40, 2)
    labels[17] = 3  # the net has 3 classes: 0, 1, 2
    write_dataset(str(tmp_path / "train"), data, labels)
    write_dataset(str(tmp_path / "test"), *make_data(20, 3))
    (tmp_path / "net.prototxt").write_text(NET % {"train": tmp_path / "train",
                                                  "test": tmp_path / "test"})
    t = trainer(tmp_path, data_on_device=on_device, test_interval=0, display=0, snapshot=0,
                snapshot_after_train=False, max_iter=3)
    with pytest.raises(DataError, match=r"record 17: label 3 is out of range for layer 'loss'"):
        t.solve()
    t.close()


def test_hdf5_snapshots_resume(workdir, tmp_path):
    prefix = str(tmp_path / "h")
    t = trainer(workdir, test_interval=0, display=0, snapshot=4, max_iter=8,
                snapshot_prefix=prefix, snapshot_format=caffe_pb2.SolverParameter.HDF5)
    t.solve()
    t.close()
    assert (tmp_path / "h_iter_4.caffemodel.h5").exists()
    assert (tmp_path / "h_iter_8.solverstate.h5").exists()
    r = trainer(workdir, test_interval=0, display=0, snapshot=0, max_iter=8,
                snapshot_after_train=False)
    r.restore(str(tmp_path / "h_iter_4.solverstate.h5"))
    r.solve()
    r.close()
    assert_same_params(t.params, r.params)


def test_one_step_per_dispatch_equals_scan(workdir):
    """Nets with XLA convolutions on CPU run one iteration per dispatch instead of lax.scan:
    both paths give the same weights."""
    kw = dict(test_interval=6, display=0, snapshot=0, snapshot_after_train=False, max_iter=6)
    a, b = trainer(workdir, **kw), trainer(workdir, **kw)
    assert a.iters_per_call > 1 and a._test_scan
    b.iters_per_call, b._test_scan = 1, False
    ra = a.solve()
    rb = b.solve()
    for name, value in ra["test"][0].items():
        np.testing.assert_allclose(value, rb["test"][0][name], rtol=1e-5)
    a.close()
    b.close()
    assert_same_params(a.params, b.params, exact=False)


@pytest.mark.parametrize("choices_", ["cpu", "gpu"])
def test_iter_size_accumulates_like_one_larger_batch(workdir, tmp_path, choices_):
    """iter_size 2 with batch 8 sums two sub-batch gradients (a loop in the step) and the
    solver divides by iter_size: the same weights as batch 16 (the same images, Caffe's
    data cursor)."""
    net8 = tmp_path / "net8.prototxt"
    net8.write_text((workdir / "net.prototxt").read_text().replace("batch_size: 16",
                                                                  "batch_size: 8"))
    kw = dict(test_interval=0, display=0, snapshot=0, snapshot_after_train=False, max_iter=6)
    big = trainer(workdir, choices=choices_, **kw)
    sp = solver_param(workdir, iter_size=2, **kw)
    sp.net = str(net8)
    small = Trainer(sp, verbose=False, config=CHOICES[choices_], devices=[jax.devices()[0]])
    big.solve()
    small.solve()
    big.close()
    small.close()
    assert_same_params(big.params, small.params, exact=False)


def test_logged_lr_is_the_rate_the_solver_applied(workdir, tmp_path):
    """A resumed multistep run whose stored current_step lags its iteration (Caffe takes at
    most one step per iteration) logs the rate it applies, not the rate of the iteration."""
    from jcaffe import caffemodel, sgd_solvers as solver_mod
    kw = dict(test_interval=0, snapshot=0, snapshot_after_train=False, display=1, max_iter=10,
              lr_policy="multistep", gamma=0.5, base_lr=0.04)
    sp_extra = "stepvalue: 3 stepvalue: 6\n"
    t = trainer(workdir, sp_extra, **kw)
    t.run_iterations(8)
    model, _ = t.snapshot()
    state = tmp_path / "lag.solverstate"
    history = solver_mod.history_to_caffe(jax.device_get(t.opt_state), t.params_order())
    caffemodel.write_solverstate(str(state), iter=8, learned_net=model, history=history,
                                 current_step=0)
    t.close()
    stream = _Capture()
    log.setup(stream=stream)
    try:
        r = trainer(workdir, sp_extra, **kw)
        r.restore(str(state))
        r.solve()
        r.close()
    finally:
        log.setup()
    logged = {int(i): float(v) for i, v in re.findall(r"Iteration (\d+), lr = (\S+)", stream.text)}
    # Iteration 8 applies one step (0.04·0.5), iteration 9 the second (0.04·0.25); the
    # iteration alone would say 0.01 for both.
    assert logged[8] == pytest.approx(0.02) and logged[9] == pytest.approx(0.01)
    assert solver_mod.learning_rate(r.sp, 8) == pytest.approx(0.01)


def test_solver_weights_test_compute_loss_and_debug_info(workdir, full_run, choices):
    """The solver's `weights` fine-tune the train net (and the test nets), `test_compute_loss`
    logs Caffe's `Test loss`, `debug_info` Caffe's per-layer means, `snapshot_diff` warns."""
    model = snap_dir(workdir, choices) / "tiny_iter_20.caffemodel"
    t_full, _, _ = full_run
    stream = _Capture()
    log.setup(stream=stream)
    try:
        t = trainer(workdir, f'weights: "{model}"\ntest_compute_loss: true\ndebug_info: true\n'
                    'snapshot_diff: true\n', choices=choices, max_iter=5, display=5,
                    test_interval=5,
                    snapshot=0, snapshot_after_train=False, base_lr=0.0, weight_decay=0.0)
        t.verbose = True
        assert_same_params(t.params, t_full.params)          # loaded before any iteration
        results = t.solve()
        t.close()
    finally:
        log.setup()
    text = stream.text
    assert "snapshot_diff: true is not supported" in text
    losses = re.findall(r"Test loss: (\S+)", text)
    assert losses
    np.testing.assert_allclose(float(losses[-1]), results["test"][0]["loss"], rtol=1e-5)
    assert re.search(r"\[Forward\] Layer conv, top blob conv data: \S+", text)
    assert re.search(r"\[Backward\] Layer ip, param blob 1 diff: \S+", text)
    # base_lr 0: the weights stay those of the file.
    assert_same_params(t.params, t_full.params)
