"""The ``caffe`` package (pycaffe's interface on jcaffe).

Caffe's own pycaffe tests (``../shared/pycaffe/caffe/python/caffe/test``, BVLC 9b891540,
unchanged) run in one bounded subprocess (``tests/pycaffe_runner.py``); each of their 52 test
methods is one case here: 51 pass, ``test_nccl`` is skipped (``has_nccl()`` is False). The
rest checks pycaffe semantics those tests leave open against hand-computed values and numpy:
Blob views, layer ranges, diff accumulation, reshaping, solver steps, compile counts.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "pycaffe", "caffe")
TEST_DIR = os.path.join(SHARED, "python", "caffe", "test")

# Caffe's 52 pycaffe test methods (python/caffe/test at 9b891540).
BVLC_TESTS = {
    "test_coord_map.TestCoordMap": ["test_catch_negative_crop", "test_catch_scale_mismatch",
                                    "test_catch_unconnected", "test_conv_pool_deconv",
                                    "test_crop_helper", "test_crop_of_crop", "test_multi_conv",
                                    "test_nd_conv", "test_padding", "test_pass", "test_rect"],
    "test_draw.TestDraw": ["test_draw_net"],
    "test_io.TestArrayToDatum": ["test_label_none_size"],
    "test_io.TestBlobProtoToArray": ["test_new_format", "test_no_shape", "test_old_format",
                                     "test_scalar"],
    "test_layer_type_list.TestLayerTypeList": ["test_standard_types"],
    "test_nccl.TestNCCL": ["test_newuid"],
    "test_net.TestAllInOne": ["test_deploy", "test_train", "test_val"],
    "test_net.TestLevels": ["test_0", "test_1"],
    "test_net.TestNet": ["test_backward_start_end", "test_clear_param_diffs",
                         "test_forward_backward", "test_forward_start_end",
                         "test_inputs_outputs", "test_layer_dict", "test_memory",
                         "test_save_and_read", "test_save_hdf5", "test_top_bottom_names"],
    "test_net.TestStages": ["test_A", "test_AandB", "test_B"],
    "test_net_spec.TestNetSpec": ["test_lenet", "test_type_error", "test_zero_tops"],
    "test_python_layer.TestPythonLayer": ["test_backward", "test_exception", "test_forward",
                                          "test_parameter", "test_phase", "test_reshape"],
    "test_python_layer_with_param_str.TestLayerWithParam": ["test_backward", "test_forward"],
    "test_solver.TestSolver": ["test_apply_update", "test_net_memory", "test_snapshot",
                               "test_solve"],
}
BVLC_IDS = [f"{cls}.{m}" for cls, ms in BVLC_TESTS.items() for m in ms]

needs_shared = pytest.mark.skipif(not os.path.isdir(TEST_DIR),
                                  reason="../shared/pycaffe (Caffe's pycaffe tests) is absent")


@pytest.fixture(scope="module")
def bvlc_results():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "pycaffe_runner.py"),
                            TEST_DIR], capture_output=True, text=True, timeout=420, env=env,
                           cwd=ROOT)
    lines = [l for l in r.stdout.splitlines() if l.startswith("PYCAFFE_RESULTS ")]
    assert r.returncode == 0 and lines, f"runner failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


@needs_shared
def test_bvlc_suite_is_complete(bvlc_results):
    assert os.path.samefile(bvlc_results["caffe"], os.path.join(ROOT, "caffe", "__init__.py"))
    assert sorted(bvlc_results["tests"]) == sorted(BVLC_IDS)


@needs_shared
@pytest.mark.parametrize("test_id", BVLC_IDS)
def test_bvlc_pycaffe(bvlc_results, test_id):
    got = bvlc_results["tests"].get(test_id)
    assert got is not None, f"{test_id} did not run"
    expected = "skipped" if test_id.startswith("test_nccl.") else "passed"
    assert got["outcome"] == expected, got["detail"]


# ---------------------------------------------------------------------------------------------
# pycaffe semantics, against numpy
# ---------------------------------------------------------------------------------------------
TINY = """name: 'tiny' force_backward: true
layer { name: 'x' type: 'Input' top: 'x' input_param { shape { dim: 4 dim: 3 } } }
layer { name: 'y' type: 'Input' top: 'y' input_param { shape { dim: 4 dim: 2 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 1 }
                        bias_filler { type: 'constant' value: 0.5 } } }
layer { name: 'relu' type: 'ReLU' bottom: 'ip' top: 'ip' }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip' bottom: 'y' top: 'loss' }
"""


def _reference(x, y, W, b):
    """ip (after ReLU), loss, and Caffe's diffs: ip (before ReLU: the in-place ReLU's bottom
    diff), x, W, b."""
    pre = x @ W.T + b
    ip = np.maximum(pre, 0)
    n = x.shape[0]
    loss = np.sum((ip - y) ** 2) / (2 * n)
    d_ip = (ip - y) / n * (pre > 0)
    return ip, loss, d_ip, d_ip @ W, d_ip.T @ x, d_ip.sum(0)


@pytest.fixture(scope="module")
def caffe_mod():
    """The package; importing it puts glog-style INFO lines on stderr (pycaffe's default), so
    the jcaffe logger's set-up is restored for the modules that run after this one."""
    import logging

    logger = logging.getLogger("jcaffe")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    sys.path.insert(0, ROOT)
    import caffe

    yield caffe
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture(scope="module")
def tiny_net(caffe_mod, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.prototxt"
    path.write_text(TINY)
    return caffe_mod.Net(str(path), caffe_mod.TRAIN)


@pytest.fixture
def tiny(tiny_net):
    """The module's net (built once: building compiles), reset to fresh values."""
    net = tiny_net
    net.blobs["x"].reshape(4, 3)
    net.blobs["y"].reshape(4, 2)
    net.reshape()
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.normal(size=(4, 3))
    net.blobs["y"].data[...] = rng.normal(size=(4, 2))
    net.params["ip"][0].data[...] = rng.normal(size=(2, 3))
    net.params["ip"][1].data[...] = 0.5
    net.clear_param_diffs()
    return net


def test_net_forward_backward_views_and_accumulation(tiny, caffe_mod):
    net = tiny
    ip_view, x_diff, w_diff = net.blobs["ip"].data, net.blobs["x"].diff, net.params["ip"][0].diff
    x, y = net.blobs["x"].data.copy(), net.blobs["y"].data.copy()
    W, b = net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()
    ip, loss, d_ip, d_x, d_W, d_b = _reference(x, y, W, b)
    out = net.forward()
    assert list(out) == ["loss"]
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(ip_view, ip, rtol=1e-5, atol=1e-6)   # a view taken before
    grads = net.backward()
    assert sorted(grads) == ["x", "y"]
    np.testing.assert_allclose(x_diff, d_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["ip"].diff, d_ip, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_diff, d_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][1].diff, d_b, rtol=1e-5, atol=1e-6)
    assert np.all(net.blobs["loss"].diff == 1)                      # the loss weight
    net.backward()                                                  # params accumulate,
    np.testing.assert_allclose(w_diff, 2 * d_W, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_diff, d_x, rtol=1e-5, atol=1e-6)   # bottoms are overwritten
    net.clear_param_diffs()
    assert not w_diff.any()
    # Writes persist: a new weight through the view the user holds.
    net.params["ip"][0].data[...] = 0
    np.testing.assert_allclose(net.forward()["loss"],
                               _reference(x, y, 0 * W, b)[1], rtol=1e-5)


def test_net_layer_ranges(tiny):
    net = tiny
    W, b = net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()
    # Only the ReLU and the loss run: they read whatever the 'ip' blob holds.
    net.blobs["ip"].data[...] = [[1, -1], [2, -2], [-3, 3], [0.5, 0.25]]
    out = net.forward(start="relu", blobs=["ip"])
    relu = np.maximum(np.array([[1, -1], [2, -2], [-3, 3], [0.5, 0.25]]), 0)
    np.testing.assert_allclose(out["ip"], relu)
    np.testing.assert_allclose(out["loss"], np.sum((relu - net.blobs["y"].data) ** 2) / 8,
                               rtol=1e-5)
    # Only 'ip' runs (end='ip'): its tops come back.
    out = net.forward(end="ip")
    assert list(out) == ["ip"]
    np.testing.assert_allclose(out["ip"], net.blobs["x"].data @ W.T + b, rtol=1e-5)
    # Backward through 'ip' alone, from a diff the user sets.
    net.blobs["ip"].diff[...] = 1
    grads = net.backward(start="ip", end="ip")
    np.testing.assert_allclose(grads["x"], np.ones((4, 2)) @ W, rtol=1e-5)


def test_net_programs_compile_once(tiny):
    net = tiny
    before = net._compiled()
    net.forward()
    net.backward()
    compiled = net._compiled()
    assert compiled - before <= 2   # the full forward and backward programs, at most
    for k in range(4):
        net.blobs["x"].data[...] = k
        net.forward()
        net.backward()
    assert net._compiled() == compiled


def test_net_reshape(tiny):
    net = tiny
    W, b = net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    net.blobs["x"].reshape(6, 3)
    net.blobs["y"].reshape(6, 2)
    net.reshape()
    assert net.blobs["ip"].shape == (6, 2)
    out = net.forward(x=x, y=y)
    np.testing.assert_allclose(out["loss"], _reference(x, y, W, b)[1], rtol=1e-5)
    with pytest.raises(Exception, match="do not match net inputs"):
        net.forward(x=x)


def test_net_errors_are_runtime_errors(caffe_mod, tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text(TINY.replace("bottom: 'x' top: 'ip'", "bottom: 'nope' top: 'ip'"))
    with pytest.raises(RuntimeError, match="unknown bottom blob 'nope'"):
        caffe_mod.Net(str(path), caffe_mod.TEST)
    with pytest.raises(RuntimeError, match="Could not open file"):
        caffe_mod.Net(str(tmp_path / "absent.prototxt"), caffe_mod.TEST)


def test_module_surface(caffe_mod):
    import jcaffe.proto.caffe_pb2 as pb2

    assert caffe_mod.proto.caffe_pb2 is pb2
    from caffe.proto import caffe_pb2

    assert caffe_pb2 is pb2 and caffe_mod.TRAIN == pb2.TRAIN and caffe_mod.TEST == pb2.TEST
    assert {"Python", "Convolution", "Data"} <= set(caffe_mod.layer_type_list())
    assert caffe_mod.has_nccl() is False
    t = caffe_mod.Timer()
    t.start()
    t.stop()
    assert t.ms >= 0
    assert caffe_mod.io.Transformer and caffe_mod.Classifier and caffe_mod.Detector


SOLVER_NET = """name: 'lin'
layer { name: 'data' type: 'DummyData' top: 'x' top: 'y'
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                     data_filler { type: 'constant' value: 0.5 }
                     data_filler { type: 'constant' value: 1 } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'x' top: 'ip'
  inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 1 } } }
layer { name: 'loss' type: 'EuclideanLoss' bottom: 'ip' bottom: 'y' top: 'loss' }
"""


def test_solver_step_semantics(caffe_mod, tmp_path):
    """step(n) trains as SGD does (numpy), the train net's blobs hold the last iteration's
    forward values, test nets share the parameter Blobs, and a step(1) + forward() loop
    compiles nothing after its first round."""
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f"net_param {{ {SOLVER_NET} }} base_lr: 0.1 lr_policy: 'fixed' "
                           f"max_iter: 100 display: 0 random_seed: 3 test_iter: 1 "
                           f"test_interval: 1000 snapshot_prefix: '{tmp_path}/s'")
    solver = caffe_mod.SGDSolver(str(solver_file))
    net, test = solver.net, solver.test_nets[0]
    assert test.params["ip"][0] is net.params["ip"][0]
    W0, b0 = net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()
    x, y = np.full((4, 3), 0.5), np.ones((4, 2))
    Ws, bs = [W0], [b0]
    for _ in range(3):
        d = (x @ Ws[-1].T + bs[-1] - y) / 4
        Ws.append(Ws[-1] - 0.1 * d.T @ x)
        bs.append(bs[-1] - 0.1 * d.sum(0))
    solver.step(3)
    assert solver.iter == 3
    np.testing.assert_allclose(net.params["ip"][0].data, Ws[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][1].data, bs[3], rtol=1e-5, atol=1e-6)
    # The last iteration (the third) ran forward with the parameters before its update.
    np.testing.assert_allclose(net.blobs["ip"].data, x @ Ws[2].T + bs[2], rtol=1e-5)
    ip_view = net.blobs["ip"].data
    np.testing.assert_allclose(test.forward()["loss"],
                               np.sum((x @ Ws[3].T + bs[3] - y) ** 2) / 8, rtol=1e-5)
    for _ in range(2):
        solver.step(1)
        test.forward(start="ip")
    programs = solver._core._programs
    sizes = (test._compiled(), net._compiled(), programs._resident._cache_size(),
             programs._host._cache_size())
    for _ in range(3):
        solver.step(1)
        test.forward(start="ip")
    assert (test._compiled(), net._compiled(), programs._resident._cache_size(),
            programs._host._cache_size()) == sizes
    assert solver.iter == 8
    W, b = Ws[3], bs[3]
    for _ in range(5):
        prev = (W, b)
        d = (x @ W.T + b - y) / 4
        W, b = W - 0.1 * d.T @ x, b - 0.1 * d.sum(0)
    np.testing.assert_allclose(net.params["ip"][0].data, W, rtol=1e-5, atol=1e-6)
    # The view taken after step(3) shows the eighth iteration's forward values.
    np.testing.assert_allclose(ip_view, x @ prev[0].T + prev[1], rtol=1e-5)
    solver.snapshot()
    assert (tmp_path / "s_iter_8.caffemodel").exists()
    assert (tmp_path / "s_iter_8.solverstate").exists()


PYCAFFE_EXAMPLES = os.path.join(SHARED, "examples", "pycaffe")


@pytest.mark.skipif(not os.path.isdir(PYCAFFE_EXAMPLES),
                    reason="../shared/pycaffe (Caffe's examples) is absent")
def test_linreg_example_with_pyloss(caffe_mod, tmp_path, monkeypatch, request):
    """Caffe's examples/pycaffe/linreg.prototxt (a Python Euclidean loss, pyloss.py): the
    loss and its gradients match numpy, and an SGD solver over it trains (its loss falls and
    is, after each step, the numpy loss of the blobs the last iteration left)."""
    monkeypatch.syspath_prepend(os.path.join(PYCAFFE_EXAMPLES, "layers"))
    # Caffe's pyloss, not a same-named module another test imported (tests/data has one); and
    # gone again afterwards.
    monkeypatch.delitem(sys.modules, "pyloss", raising=False)
    request.addfinalizer(lambda: sys.modules.pop("pyloss", None))
    model = os.path.join(PYCAFFE_EXAMPLES, "linreg.prototxt")
    net = caffe_mod.Net(model, caffe_mod.TRAIN)
    loss = net.forward()["loss"]
    x, y = net.blobs["x"].data.reshape(10, -1), net.blobs["y"].data.reshape(10, -1)
    (wx, bx), (wy, by) = [[b.data for b in net.params[k]] for k in ("ipx", "ipy")]
    d = (x @ wx.T + bx) - (y @ wy.T + by)
    np.testing.assert_allclose(loss, np.sum(d ** 2) / 10 / 2, rtol=1e-5)
    net.backward()
    np.testing.assert_allclose(net.params["ipx"][0].diff, (d / 10).T @ x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.params["ipy"][0].diff, -(d / 10).T @ y, rtol=1e-4,
                               atol=1e-6)
    solver_file = tmp_path / "linreg_solver.prototxt"
    solver_file.write_text(f'net: "{model}" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 '
                           f'max_iter: 1000 display: 0 random_seed: 5 '
                           f'snapshot_prefix: "{tmp_path}/linreg"')
    solver = caffe_mod.SGDSolver(str(solver_file))
    losses = []
    for _ in range(4):
        solver.step(50)
        n = solver.net
        losses.append(n.blobs["loss"].data.item())
        # The blobs are the last iteration's: its loss is that of its ipx and ipy blobs.
        d = n.blobs["ipx"].data - n.blobs["ipy"].data
        assert losses[-1] == pytest.approx(float(np.sum(d ** 2) / 20), rel=1e-5)
    assert solver.iter == 200
    assert losses[-1] < 0.2 * losses[0]


@pytest.fixture(scope="module")
def mnist_lmdb(tmp_path_factory):
    """The first 1000 records of each MNIST split as LMDBs (from the repository's IDX files),
    and the test split's first 400 labels read from the IDX file itself."""
    from jcaffe.data import mnist

    root = os.path.join(ROOT, "datasets", "mnist")
    made = mnist.create(root, out_dir=str(tmp_path_factory.mktemp("mnist")), formats=("lmdb",),
                        limit=1000, log=lambda msg: None)
    with gzip.open(os.path.join(root, "t10k-labels-idx1-ubyte.gz")) as f:
        raw = f.read()
    assert raw[:4] == b"\0\0\x08\x01"   # IDX: unsigned bytes, one dimension; 8-byte header
    return made["mnist_train_lmdb"], made["mnist_test_lmdb"], np.frombuffer(raw[8:408], np.uint8)


def _lenet_spec(caffe, source, batch):
    """LeNet as a NetSpec over an MNIST LMDB: two 5x5 convolutions (20 and 50 filters), each
    max-pooled 2x2, a 500-unit ReLU layer, 10 scores, softmax loss."""
    from caffe import layers as L, params as P

    xavier = dict(type="xavier")
    n = caffe.NetSpec()
    n.data, n.label = L.Data(source=source, backend=P.Data.LMDB, batch_size=batch, ntop=2,
                             transform_param=dict(scale=1 / 256))
    bottom = n.data
    for k, filters in ((1, 20), (2, 50)):
        setattr(n, f"conv{k}", L.Convolution(bottom, num_output=filters, kernel_size=5,
                                             weight_filler=xavier))
        bottom = L.Pooling(getattr(n, f"conv{k}"), pool=P.Pooling.MAX, kernel_size=2,
                           stride=2)
        setattr(n, f"pool{k}", bottom)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=xavier)
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=xavier)
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


def test_netspec_lenet_python_training_loop(caffe_mod, mnist_lmdb, tmp_path):
    """The learning-lenet notebook's workflow, in our own code: LeNet written by NetSpec, an
    SGDSolver over it, a Python loop of step(1) reading the train loss and running the test
    net from conv1 on the batch it holds, then accuracy counted in numpy over the next three
    test batches. The test net reads the IDX file's test images in order (its labels are the
    file's: records 0-99, then 100-399; no solver test runs in between, as in Caffe with
    test_initialization off), the forward from conv1 reads no new batch, the loss falls, and
    the trained net classifies far above chance (0.1)."""
    from google.protobuf import text_format

    from caffe.proto import caffe_pb2

    train_db, test_db, labels = mnist_lmdb
    for name, db, batch in (("train", train_db, 64), ("test", test_db, 100)):
        (tmp_path / f"{name}.prototxt").write_text(str(_lenet_spec(caffe_mod, db, batch)))
    sp = caffe_pb2.SolverParameter(
        train_net=str(tmp_path / "train.prototxt"), test_net=[str(tmp_path / "test.prototxt")],
        test_iter=[3], test_interval=10000, test_initialization=False, base_lr=0.01, momentum=0.9, weight_decay=5e-4,
        lr_policy="inv", gamma=1e-4, power=0.75, display=0, max_iter=1000, random_seed=7,
        snapshot_prefix=str(tmp_path / "lenet"))
    (tmp_path / "solver.prototxt").write_text(text_format.MessageToString(sp))
    solver = caffe_mod.SGDSolver(str(tmp_path / "solver.prototxt"))
    test = solver.test_nets[0]
    test.forward()
    first_batch = test.blobs["data"].data.copy()
    np.testing.assert_array_equal(test.blobs["label"].data, labels[:100])
    niter = 40
    train_loss = np.zeros(niter)
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
        test.forward(start="conv1")
        scores = test.blobs["score"].data
        assert scores.shape == (100, 10)
    np.testing.assert_array_equal(test.blobs["data"].data, first_batch)
    assert solver.iter == niter
    assert train_loss[-5:].mean() < 0.5 * train_loss[:5].mean(), train_loss
    correct = 0
    for batch in range(1, 4):
        test.forward()
        got = test.blobs["label"].data
        np.testing.assert_array_equal(got, labels[batch * 100:batch * 100 + 100])
        correct += int(np.sum(test.blobs["score"].data.argmax(1) == got))
    assert correct / 300 > 0.6, correct


def _load_notebook_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pycaffe_notebook", os.path.join(ROOT, "benchmarks", "pycaffe_notebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_runner_edits_cells(tmp_path, capsys, monkeypatch):
    """benchmarks/pycaffe_notebook.py's edits on a notebook written here (Python 2 kernel):
    shell lines, magics, print statements, the data paths and set_mode_gpu become exactly the
    code below; run, the cells print what a Python 2 kernel would (7 / 2 is 3) and the cat."""
    runner = _load_notebook_runner()
    cells = [
        "from pylab import *\n%matplotlib inline",
        "import os\n!cat notes.txt\n!data/mnist/get_mnist.sh",
        "source = 'mnist/mnist_train_lmdb'\nother = \"mnist/mnist_test_lmdb\"\n"
        "keep = 'mnist/mnist_train_lmdb_old'",
        "%%time\nfor i in range(2):\n    print 'i =', i, 7 / 2,\nprint\nprint(1.0 / 4)",
        "caffe.set_device(0)\ncaffe.set_mode_gpu()",
        "%%bash\nls",
        "x = 5 / 2\nx",
    ]
    nb = {"nbformat": 4, "nbformat_minor": 0,
          "metadata": {"kernelspec": {"name": "python2", "language": "python"}},
          "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]
          + [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
              "source": c.splitlines(keepends=True)} for c in cells]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    sources, py2 = runner.read_code_cells(str(path))
    assert sources == cells and py2 is True
    paths = {"mnist/mnist_train_lmdb": "/data/train_lmdb",
             "mnist/mnist_test_lmdb": "/data/test_lmdb"}
    edited = [runner.edit_cell(c, paths, gpu=False) for c in cells]
    assert edited == [
        "from pylab import *",
        "import os\n_jcaffe_shell('cat notes.txt')\n_jcaffe_shell('data/mnist/get_mnist.sh')",
        "source = '/data/train_lmdb'\nother = '/data/test_lmdb'\n"
        "keep = 'mnist/mnist_train_lmdb_old'",
        "for i in range(2):\n    print('i =', i, 7 / 2, end=' ')\nprint()\nprint(1.0 / 4)",
        "caffe.set_device(0)\ncaffe.set_mode_cpu()",
        None,
        "x = 5 / 2\nx",
    ]
    assert runner.edit_cell(cells[4], paths, gpu=True) == cells[4]
    assert runner.edit_cell("print >>sys.stderr, 'a', 1", {}, False) == \
        "print('a', 1, file=sys.stderr)"
    (tmp_path / "notes.txt").write_text("cat works\n")
    monkeypatch.chdir(tmp_path)
    ns = {"_jcaffe_shell": runner.make_shell(paths), "_jcaffe_py2_div": runner.py2_div}
    for k in (1, 3, 6):
        runner.run_cell(edited[k], ns, f"<cell {k}>", py2=True)
    out = capsys.readouterr().out
    assert out.startswith("cat works\n[jcaffe] data/mnist/get_mnist.sh: not run")
    assert out.endswith("i = 0 3 i = 1 3 \n0.25\n2\n"), out
    assert runner.py2_div(np.arange(5), 2).tolist() == [0, 0, 1, 1, 2]
    assert runner.py2_div(np.int64(7), 2) == 3 and runner.py2_div(7, 2.0) == 3.5


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "examples", "net_surgery")),
                    reason="../shared/pycaffe (Caffe's examples) is absent")
def test_net_surgery_first_part(caffe_mod):
    """The first part of BVLC's net_surgery notebook on Caffe's net_surgery/conv.prototxt,
    with a random image for examples/images/cat_gray.jpg: reshape the input, forward, edit a
    bias and the filters through the param views; a view of the output taken earlier shows
    the new values; the filters' outputs match numpy's correlation."""
    net = caffe_mod.Net(os.path.join(SHARED, "examples", "net_surgery", "conv.prototxt"),
                        caffe_mod.TEST)
    assert list(net.blobs) == ["data", "conv"] and list(net.params) == ["conv"]
    im = np.random.default_rng(2).random((36, 48)).astype(np.float32)
    net.blobs["data"].reshape(1, 1, *im.shape)
    net.blobs["data"].data[...] = im[None, None]
    net.forward()
    conv0 = net.blobs["conv"].data[0, 0]
    pre = conv0.mean()
    net.params["conv"][1].data[0] = 1.
    net.forward()
    assert conv0.mean() == pytest.approx(pre + 1, abs=1e-5)
    sobel = np.array((-1, -2, -1, 0, 0, 0, 1, 2, 1), np.float32).reshape(3, 3)
    net.params["conv"][0].data[1:] = 0.
    net.params["conv"][0].data[1, 0, 1:-1, 1:-1] = sobel
    net.params["conv"][0].data[2, 0, 1:-1, 1:-1] = sobel.T
    net.forward()
    windows = np.lib.stride_tricks.sliding_window_view(im, (3, 3))[1:-1, 1:-1]
    for k, f in ((1, sobel), (2, sobel.T)):
        np.testing.assert_allclose(net.blobs["conv"].data[0, k],
                                   np.einsum("ijab,ab->ij", windows, f), rtol=1e-4, atol=1e-5)


def test_classifier_center_crop(caffe_mod, tmp_path):
    """caffe.Classifier (a caffe.Net): predict(oversample=False) on 28 x 28 x 1 images is the
    net's forward pass on the images scaled by raw_scale * input_scale and transposed to
    K x H x W, batched by the net's batch size (the last batch padded)."""
    model = os.path.join(ROOT, "prototxt", "lenet.prototxt")
    weights = str(tmp_path / "lenet.caffemodel")
    net = caffe_mod.Net(model, caffe_mod.TEST)
    net.save(weights)
    clf = caffe_mod.Classifier(model, weights, raw_scale=255, input_scale=0.00390625)
    assert isinstance(clf, caffe_mod.Net) and clf.inputs == ["data"]
    images = [np.random.default_rng(i).random((28, 28, 1)).astype(np.float32) for i in range(3)]
    probs = clf.predict(images, oversample=False)
    assert probs.shape == (3, 10)
    batch = np.zeros(net.blobs["data"].shape, np.float32)
    batch[:3] = np.stack([im.transpose(2, 0, 1) * 255 * 0.00390625 for im in images])
    ref = net.forward(data=batch)["prob"][:3]
    np.testing.assert_allclose(probs, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_solver_callbacks_and_apply_update(caffe_mod, tmp_path):
    """With add_callback, iterations run through the Blobs: on_start before each, the
    gradient in the param diffs at on_gradients_ready (numpy's), then apply_update: the
    parameters follow numpy's SGD."""
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f"net_param {{ {SOLVER_NET} }} base_lr: 0.1 lr_policy: 'fixed' "
                           f"max_iter: 100 display: 0 random_seed: 3 "
                           f"snapshot_prefix: '{tmp_path}/s'")
    solver = caffe_mod.get_solver(str(solver_file))
    assert type(solver) is caffe_mod.SGDSolver
    net = solver.net
    x, y = np.full((4, 3), 0.5), np.ones((4, 2))
    Ws, bs = [net.params["ip"][0].data.copy()], [net.params["ip"][1].data.copy()]
    grads = []
    for _ in range(3):
        d = (x @ Ws[-1].T + bs[-1] - y) / 4
        grads.append(d.T @ x)
        Ws.append(Ws[-1] - 0.1 * d.T @ x)
        bs.append(bs[-1] - 0.1 * d.sum(0))
    calls = []
    solver.add_callback(lambda: calls.append(("start", solver.iter)),
                        lambda: calls.append(("ready", solver.iter,
                                              net.params["ip"][0].diff.copy())))
    solver.step(3)
    assert [c[:2] for c in calls] == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1),
                                      ("start", 2), ("ready", 2)]
    for c, g in zip(calls[1::2], grads):
        np.testing.assert_allclose(c[2], g, rtol=1e-5, atol=1e-7)
    assert solver.iter == 3
    np.testing.assert_allclose(net.params["ip"][0].data, Ws[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][1].data, bs[3], rtol=1e-5, atol=1e-6)


def test_solver_snapshot_restore(caffe_mod, tmp_path):
    """snapshot() then restore() in a new solver: Caffe's iteration, the weights (read through
    the Blobs), and the momentum history, so both continue alike."""
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f"net_param {{ {SOLVER_NET} }} base_lr: 0.05 momentum: 0.9 "
                           f"lr_policy: 'fixed' max_iter: 100 display: 0 random_seed: 3 "
                           f"snapshot_prefix: '{tmp_path}/s'")
    a = caffe_mod.SGDSolver(str(solver_file))
    a.step(4)
    a.snapshot()
    b = caffe_mod.SGDSolver(str(solver_file))
    b.restore(str(tmp_path / "s_iter_4.solverstate"))
    assert b.iter == 4
    for k in range(2):
        np.testing.assert_array_equal(b.net.params["ip"][k].data, a.net.params["ip"][k].data)
    a.step(3)
    b.step(3)
    for k in range(2):
        np.testing.assert_allclose(b.net.params["ip"][k].data, a.net.params["ip"][k].data,
                                   rtol=1e-6, atol=1e-7)


def test_set_input_arrays_memory_data(caffe_mod, tmp_path):
    """set_input_arrays feeds a MemoryData layer: forward() reads its batches in order and
    wraps (Caffe's MemoryDataLayer), labels given as [n] are accepted."""
    path = tmp_path / "mem.prototxt"
    path.write_text("""layer { name: 'd' type: 'MemoryData' top: 'data' top: 'label'
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
    layer { name: 's' type: 'Power' bottom: 'data' top: 's' power_param { scale: 2 } }""")
    net = caffe_mod.Net(str(path), caffe_mod.TEST)
    data = np.arange(4 * 6, dtype=np.float32).reshape(4, 1, 2, 3)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    for batch in (0, 1, 0):
        out = net.forward()
        np.testing.assert_array_equal(out["s"], 2 * data[2 * batch:2 * batch + 2])
        np.testing.assert_array_equal(net.blobs["label"].data.ravel(), [2 * batch, 2 * batch + 1])
    with pytest.raises(RuntimeError, match="multiple of batch size"):
        net.set_input_arrays(data[:3], np.arange(3, dtype=np.float32))


def test_detector_windows(caffe_mod, tmp_path):
    """caffe.Detector.detect_windows: each (ymin, xmin, ymax, xmax) window of the image, mean
    subtracted and transposed, through the net (windows of the input size: no resizing)."""
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    model = tmp_path / "det.prototxt"
    model.write_text("""layer { name: 'data' type: 'Input' top: 'data'
      input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
    layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
      inner_product_param { num_output: 2 weight_filler { type: 'gaussian' std: 0.1 } } }""")
    net = caffe_mod.Net(str(model), caffe_mod.TEST)
    net.save(str(tmp_path / "det.caffemodel"))
    W, b = net.params["ip"][0].data, net.params["ip"][1].data
    det = caffe_mod.Detector(str(model), str(tmp_path / "det.caffemodel"),
                             mean=np.array([0.25, 0.5, 0.75]))
    windows = [(0, 0, 8, 8), (5, 7, 13, 15), (12, 16, 20, 24)]
    out = det.detect_windows([(str(tmp_path / "im.png"), windows)])
    assert [o["window"] for o in out] == windows
    for o, (y0, x0, y1, x1) in zip(out, windows):
        crop = pixels[y0:y1, x0:x1].astype(np.float64) / 255
        x = (crop.transpose(2, 0, 1) - np.array([0.25, 0.5, 0.75])[:, None, None]).ravel()
        np.testing.assert_allclose(o["prediction"], W @ x + b, rtol=1e-4, atol=1e-5)
