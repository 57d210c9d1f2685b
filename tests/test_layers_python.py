"""Caffe's Python layer: pycaffe layers run unchanged (host callbacks in the jitted step),
Python data layers feeding a Trainer, native JaxLayers, and entry-point layer types.

References: numpy formulas of Caffe's EuclideanLoss (``sum((a-b)^2) / 2N``) and of SGD on a
linear regression, central finite differences, and Caffe's documented PythonLayer behaviour
(``loss_weight`` only from the prototxt, ``param_str`` / ``phase`` set before ``setup``).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcaffe
from jcaffe import prototxt
from jcaffe.errors import DataError, LayerError, NetError
from jcaffe.layers.base import Context, known_types
from jcaffe.train import Trainer
from layer_utils import check_gradient, make_layer, run

DATA = os.path.join(os.path.dirname(__file__), "data")
ZOO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                   "zoo")
LINREG = os.path.join(DATA, "linreg_pyloss.prototxt")


@pytest.fixture
def on_path(monkeypatch):
    """tests/data on sys.path (what PYTHONPATH does for Caffe users), and its pyloss imported
    afresh: another test module may have imported Caffe's own pyloss (examples/pycaffe/layers),
    whose backward ignores the top diff."""
    monkeypatch.syspath_prepend(DATA)
    for name in [m for m in sys.modules if m.split(".")[0] == "pyloss"]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "pyloss"]:
        del sys.modules[name]


def _euclidean_variant(text: str) -> str:
    return text.replace('type: "Python"', 'type: "EuclideanLoss"').replace(
        "type: 'Python'", "type: 'EuclideanLoss'")


def _inputs(shape=(4, 3, 2), seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(shape).astype(np.float32),
            "y": rng.standard_normal(shape).astype(np.float32)}


def _ip(params, name, x):
    w, b = (np.asarray(a, np.float64) for a in params[name])
    return x.reshape(x.shape[0], -1).astype(np.float64) @ w.T + b


# ---------------------------------------------------------------------------------------------
# pycaffe layers
# ---------------------------------------------------------------------------------------------

def _sgd(net, inputs, steps=5, lr=0.05, seed=5):
    """Plain SGD through one jitted forward + backward per step: the loss of each step, and
    the initial params with their gradient."""
    @jax.jit
    def step(p, key):
        loss, g = jax.value_and_grad(lambda q: net.loss(q, inputs, key=key)[0])(p)
        return jax.tree.map(lambda a, d: a - lr * d, p, g), loss, g

    p0 = p = net.init(jax.random.key(seed))
    losses, g0 = [], None
    for i in range(steps):
        p, loss, g = step(p, jax.random.key(100 + i))
        losses.append(float(loss))
        g0 = g if g0 is None else g0
    return losses, p0, g0


def test_pyloss_matches_numpy_and_euclidean_loss_and_trains_alike():
    # pyloss.py lies next to the prototxt: found through the prototxt's directory.
    net = jcaffe.Net(LINREG, verbose=False)
    ref = jcaffe.Net(prototxt.parse_net_text(_euclidean_variant(open(LINREG).read())),
                     verbose=False)
    assert net.blob_shapes["loss"] == (1,)  # pyloss's top[0].reshape(1)
    assert net.loss_weights[-1] == [1.0]
    inputs = _inputs()
    losses, params, grads = _sgd(net, inputs)
    losses_ref, _, grads_ref = _sgd(ref, inputs)

    a, b = _ip(params, "ipx", inputs["x"]), _ip(params, "ipy", inputs["y"])
    n = a.shape[0]
    np.testing.assert_allclose(losses[0], np.sum((a - b) ** 2) / n / 2, rtol=1e-5)
    r = (a - b) / n  # d loss / d ipx; d loss / d ipy = -r
    for name, sign, x in (("ipx", 1.0, inputs["x"]), ("ipy", -1.0, inputs["y"])):
        gw = sign * r.T @ x.reshape(n, -1).astype(np.float64)
        gb = sign * r.sum(axis=0)
        np.testing.assert_allclose(np.asarray(grads[name][0]), gw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[name][1]), gb, rtol=1e-4, atol=1e-6)
        for g, gr in zip(grads[name], grads_ref[name]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(gr), rtol=1e-5, atol=1e-7)
    # SGD steps through the jitted forward + backward: the same losses as EuclideanLoss.
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_loss_weight_comes_only_from_the_prototxt(on_path, tmp_path):
    # Caffe: a Python layer is not a loss layer; without loss_weight its top adds nothing.
    text = open(LINREG).read()
    inputs = _inputs()
    nets = {}
    for tag, replacement in (("none", ""), ("two", "loss_weight: 2")):
        path = tmp_path / f"{tag}.prototxt"
        path.write_text(text.replace("loss_weight: 1", replacement))
        nets[tag] = jcaffe.Net(str(path), verbose=False)
    params = nets["two"].init(jax.random.key(0))
    one = jcaffe.Net(LINREG, verbose=False)
    l1, g1 = jax.value_and_grad(lambda p: one.loss(p, inputs)[0])(params)
    l0 = nets["none"].loss(params, inputs)[0]
    l2, g2 = jax.value_and_grad(lambda p: nets["two"].loss(p, inputs)[0])(params)
    assert float(l0) == 0.0
    np.testing.assert_allclose(float(l2), 2 * float(l1), rtol=1e-6)
    # The top diff pyloss sees is the loss weight.
    np.testing.assert_allclose(np.asarray(g2["ipx"][0]), 2 * np.asarray(g1["ipx"][0]),
                               rtol=1e-5, atol=1e-7)


def _solver(tmp_path, net_path, iters, lr=0.05, name="solver"):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(textwrap.dedent(f"""\
        net: "{net_path}"
        base_lr: {lr}
        lr_policy: "fixed"
        momentum: 0
        weight_decay: 0
        max_iter: {iters}
        display: 0
        snapshot: 0
        snapshot_prefix: "{tmp_path}/snap"
        random_seed: 7
        solver_mode: CPU
        """))
    return str(path)


def test_zoo_linreg_builds_and_matches_numpy(on_path):
    zoo = os.path.join(ZOO, "pycaffe_linreg.prototxt")
    if not os.path.exists(zoo):
        pytest.skip("../shared/zoo absent")
    manifest = json.load(open(os.path.join(ZOO, "MANIFEST.json")))
    entry = next(e for e in manifest if e["file"] == "pycaffe_linreg.prototxt")
    net = jcaffe.Net(zoo, verbose=False)
    for blob, shape in entry["expected"]["blob_shapes"].items():
        if blob == "loss":
            continue  # pyloss reshapes its top to (1,): a 1-axis blob of count 1
        assert net.blob_shapes[blob] == tuple(shape), blob
    assert net.blob_shapes["loss"] == (1,)
    layer = net.layers[-1]
    assert layer.where == "pyloss.EuclideanLossLayer"
    assert net.loss_weights[-1] == [entry["expected"]["loss_weight"]]

    # One jitted forward + backward on DummyData's draws, against numpy on the same blobs.
    params = net.init(jax.random.key(0))
    (loss, (blobs, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: net.loss(p, {}, key=jax.random.key(1)), has_aux=True))(params)
    a, b = (np.asarray(blobs[k], np.float64) for k in ("ipx", "ipy"))
    n = a.shape[0]
    np.testing.assert_allclose(np.asarray(blobs["loss"]), [np.sum((a - b) ** 2) / n / 2],
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.sum((a - b) ** 2) / n / 2, rtol=1e-5)
    x = np.asarray(blobs["x"], np.float64).reshape(n, -1)
    np.testing.assert_allclose(np.asarray(grads["ipx"][0]), ((a - b) / n).T @ x, rtol=1e-4,
                               atol=1e-6)


def test_backward_reruns_forward_when_the_latest_forward_saw_other_inputs(on_path):
    layer = make_layer('type: "Python" python_param { module: "pyloss" '
                       'layer: "EuclideanLossLayer" }', [(3, 4), (3, 4)])
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4))
    f = lambda x, y: layer.apply([], [x, y], jcaffe.layers.Context(train=True))[0][0]
    _, vjp_ab = jax.vjp(f, jnp.asarray(a), jnp.asarray(b))
    jax.vjp(f, jnp.asarray(c), jnp.asarray(d))  # the instance's self.diff is now c - d
    ga, gb = vjp_ab(jnp.ones((), jnp.float32))
    np.testing.assert_allclose(np.asarray(ga), (a - b) / 3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), -(a - b) / 3, rtol=1e-6)


def test_pycaffe_blobs_are_learnable_and_match_finite_differences(on_path):
    layer = make_layer('type: "Python" python_param { module: "jcaffe_test_pylayers" '
                       'layer: "PyScale" param_str: "1.5" }', [(2, 3, 2, 2)])
    assert layer.blob_shapes == [(3,)]
    blobs = layer.init(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(blobs[0]), np.full(3, 1.5, np.float32))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2, 2))
    (top,) = run(layer, blobs, [x.astype(np.float32)])
    np.testing.assert_allclose(top, 1.5 * x, rtol=1e-6)
    w = rng.standard_normal(3)
    check_gradient(layer, [w], [x])


def test_phase_and_param_str_reach_the_layer(on_path):
    for phase, want in (("TRAIN", 0.0), ("TEST", 1.0)):
        layer = make_layer('type: "Python" python_param { module: "jcaffe_test_pylayers" '
                           'layer: "PhaseTop" }', [(2, 3)], phase=phase)
        (top,) = run(layer, [], [np.zeros((2, 3), np.float32)])
        np.testing.assert_array_equal(top, np.full(2, want, np.float32))


def test_callbacks_keep_the_bottom_dtype(on_path):
    layer = make_layer('type: "Python" python_param { module: "pyloss" '
                       'layer: "EuclideanLossLayer" }', [(2, 3), (2, 3)])
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.ones((2, 3), dtype)
        out = jax.jit(lambda a, b: layer.apply([], [a, b], jcaffe.layers.Context(True))[0])(
            x, 2 * x)
        assert out.dtype == dtype
        g = jax.grad(lambda a: jnp.sum(layer.apply([], [a, x], jcaffe.layers.Context(True))[0]))(
            x)
        assert g.dtype == dtype


def test_vmap_runs_the_host_layer_once_per_example(on_path):
    layer = make_layer('type: "Python" python_param { module: "pyloss" '
                       'layer: "EuclideanLossLayer" }', [(2, 3), (2, 3)])
    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((5, 2, 3)).astype(np.float32) for _ in range(2))
    f = lambda x, y: layer.apply([], [x, y], jcaffe.layers.Context(True))[0][0]
    got = jax.jit(jax.vmap(f))(a, b)
    np.testing.assert_allclose(np.asarray(got), np.sum((a - b) ** 2, axis=(1, 2)) / 2 / 2,
                               rtol=1e-6)
    ga = jax.vmap(jax.grad(f))(a, b)
    np.testing.assert_allclose(np.asarray(ga), (a - b) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("python_param,match", [
    ('module: "no_such_module_xyz" layer: "A"', r"python_param.module 'no_such_module_xyz' "
                                                r"not found"),
    ('module: "jcaffe_test_pylayers" layer: "Nope"', r"module 'jcaffe_test_pylayers' .*has no "
                                                     r"class 'Nope'"),
    ('module: "jcaffe_test_pylayers" layer: "RaisesInSetup" param_str: "abc"',
     r"jcaffe_test_pylayers.RaisesInSetup: setup raised ValueError: bad param_str: 'abc'"),
    ('module: "jcaffe_test_pylayers" layer: "NeverReshapes"', r"did not shape top 0"),
    ('module: "jcaffe_test_pylayers" layer: "WrongTops"', r"apply returned tops of shapes"),
    ('module: "jcaffe_test_pylayers" layer: "json"', r"is not a class"),
    ('layer: "A"', r"python_param.module is not set"),
    ('module: "jcaffe_test_pylayers"', r"python_param.layer \(the class name\) is not set"),
])
def test_errors_are_one_line_and_name_layer_module_class(on_path, python_param, match):
    with pytest.raises(LayerError, match=match) as e:
        make_layer(f'name: "mine" type: "Python" python_param {{ {python_param} }}', [(2, 3)])
    assert str(e.value).startswith("layer 'mine' (type Python): ")
    assert "\n" not in str(e.value)


def test_exception_in_forward_names_the_layer(on_path):
    # Raised inside the step's host callback: JAX reports it with the LayerError's line.
    layer = make_layer('name: "l" type: "Python" python_param { module: "pyloss" '
                       'layer: "EuclideanLossLayer" }', [(2, 3), (2, 3)])

    def fail(bottom, top):
        raise RuntimeError("boom")

    layer.impl.forward = fail
    x = jnp.ones((2, 3), jnp.float32)
    with pytest.raises(Exception, match=r"layer 'l' \(type Python\): pyloss.EuclideanLossLayer: "
                                        r"forward raised RuntimeError: boom"):
        jax.block_until_ready(layer.apply([], [x, x], jcaffe.layers.Context(True)))


def test_zoo_fcn_python_data_layer_without_its_module_is_a_clear_error():
    path = os.path.join(ZOO, "fcn32s_voc_train.prototxt")
    if not os.path.exists(path):
        pytest.skip("../shared/zoo absent")
    with pytest.raises(LayerError, match=r"layer 'data' \(type Python\): python_param.module "
                                         r"'voc_layers' not found"):
        jcaffe.Net(path, verbose=False)


# ---------------------------------------------------------------------------------------------
# Python data layers
# ---------------------------------------------------------------------------------------------

DATA_NET = """\
name: "PyDataLinReg"
layer {{
  name: "data" type: "Python" top: "x" top: "y"
  python_param {{ module: "{module}" layer: "LinRegData"
                 param_str: '{{"batch": {batch}, "dim": {dim}, "seed": {seed}}}' }}
}}
layer {{
  name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
  inner_product_param {{ num_output: 1 weight_filler {{ type: "constant" }} }}
}}
layer {{ name: "loss" type: "{loss}" bottom: "ip" bottom: "y" top: "loss" {extra} }}
"""
PYLOSS = ('python_param { module: "pyloss" layer: "EuclideanLossLayer" } '
          'loss_weight: 1').replace("{", "{{").replace("}", "}}")


@pytest.mark.parametrize("loss", ["EuclideanLoss", "Python"])
def test_python_data_layer_feeds_a_trainer_like_numpy_sgd(on_path, tmp_path, loss):
    # The data module lies next to the net prototxt only (found through the solver's net path).
    module = f"jcaffe_test_pydata_nextto_{loss.lower()}"
    src = open(os.path.join(DATA, "jcaffe_test_pylayers.py")).read()
    (tmp_path / f"{module}.py").write_text(src)
    batch, dim, seed, lr, iters = 8, 3, 11, 0.1, 12
    net_path = tmp_path / "net.prototxt"
    extra = PYLOSS if loss == "Python" else ""
    net_path.write_text(DATA_NET.format(module=module, batch=batch, dim=dim, seed=seed,
                                        loss=loss, extra=extra.format()))
    t = Trainer(_solver(tmp_path, str(net_path), iters, lr=lr), verbose=False)
    try:
        layer = t.net.layers[0]
        assert layer.is_data and layer.input_specs()[0][1] == (batch, dim)
        losses = t.run_iterations(iters)["loss"]
    finally:
        t.close()

    # numpy: the same generator, SGD on W [1, dim] and b [1] from zeros.
    rng = np.random.default_rng(seed)
    w_true = np.arange(1, dim + 1, dtype=np.float32) / dim
    w, b = np.zeros((1, dim)), np.zeros(1)
    want = []
    for _ in range(iters):
        x = rng.standard_normal((batch, dim)).astype(np.float32)
        y = (x @ w_true)[:, None].astype(np.float64)
        r = x @ w.T + b - y
        want.append(np.sum(r ** 2) / batch / 2)
        w -= lr * (r.T @ x) / batch
        b -= lr * r.sum(axis=0) / batch
    np.testing.assert_allclose(np.asarray(losses, np.float64), want, rtol=1e-4)
    assert want[-1] < want[0] / 4


def test_module_next_to_the_prototxt_is_found(tmp_path):
    module = "jcaffe_test_pylayers_nextto_net"
    (tmp_path / f"{module}.py").write_text(open(os.path.join(DATA, "pyloss.py")).read())
    text = open(LINREG).read().replace('module: "pyloss"', f'module: "{module}"')
    with pytest.raises(LayerError, match=f"'{module}' not found on sys.path/PYTHONPATH"):
        jcaffe.Net(prototxt.parse_net_text(text), verbose=False)  # no file: no directory
    (tmp_path / "net.prototxt").write_text(text)
    net = jcaffe.Net(str(tmp_path / "net.prototxt"), verbose=False)
    assert net.layers[-1].where == f"{module}.EuclideanLossLayer"


def test_python_data_reader_positions_and_seek(on_path):
    net = jcaffe.Net(prototxt.parse_net_text(DATA_NET.format(
        module="jcaffe_test_pylayers", batch=2, dim=3, seed=0, loss="EuclideanLoss",
        extra="")), verbose=False)
    layer = net.layers[0]
    reader = layer.make_reader(seed=0)
    rng = np.random.default_rng(0)
    first = [reader.next_batch() for _ in range(3)]
    for b in first:
        np.testing.assert_array_equal(b["x"], rng.standard_normal((2, 3)).astype(np.float32))
        assert b["x"].dtype == np.float32 and b["y"].shape == (2, 1)
    assert reader.position == 6
    reader.seek(2)  # kept batches come back unchanged
    np.testing.assert_array_equal(reader.next_batch()["x"], first[1]["x"])
    assert layer.impl.calls == 3
    reader.seek(10)  # forward: the layer makes (and keeps) the batches in between
    later = reader.next_batch()
    assert layer.impl.calls == 6
    np.testing.assert_array_equal(later["x"].shape, (2, 3))
    for _ in range(20):
        reader.next_batch()
    reader.seek(0)
    with pytest.raises(DataError, match="cannot go back to stream position 0"):
        reader.next_batch()


# ---------------------------------------------------------------------------------------------
# Native JaxLayer
# ---------------------------------------------------------------------------------------------

NATIVE = ('type: "Python" python_param { module: "jcaffe_test_pylayers" layer: "ScaleShift" '
          'param_str: "0.7" }')


def test_native_layer_matches_finite_differences(on_path):
    layer = make_layer(NATIVE, [(2, 3, 2, 2)])
    assert layer.kind == "jax" and layer.blob_shapes == [(3,), (1,)]
    blobs = layer.init(jax.random.key(0))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 2, 2))
    (top,) = run(layer, blobs, [x.astype(np.float32)])
    np.testing.assert_allclose(top, np.tanh(0.7 * x + 0.25), rtol=1e-5)
    check_gradient(layer, [rng.standard_normal(3), rng.standard_normal(1)], [x])


def test_native_layer_blobs_get_lr_mult_and_train(on_path):
    text = """\
    layer { name: "x" type: "Input" top: "x" top: "t"
            input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 } } }
    layer { name: "ss" type: "Python" bottom: "x" top: "h"
            python_param { module: "jcaffe_test_pylayers" layer: "ScaleShift" }
            param { lr_mult: 2 decay_mult: 0 } param { lr_mult: 0 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "t" top: "loss" }
    """
    net = jcaffe.Net(prototxt.parse_net_text(textwrap.dedent(text)), verbose=False)
    info = {(p.layer, p.index): (p.lr_mult, p.decay_mult) for p in net.params_info}
    assert info == {("ss", 0): (2.0, 0.0), ("ss", 1): (0.0, 1.0)}
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(3)
    inputs = {"x": rng.standard_normal((4, 3)).astype(np.float32),
              "t": rng.standard_normal((4, 3)).astype(np.float32)}
    g = jax.jit(jax.grad(lambda p: net.loss(p, inputs)[0]))(params)
    # numpy: h = tanh(0.5 x + 0.25); dL/dw_c = sum_n (h - t)/N (1 - h^2) x
    x, t = inputs["x"].astype(np.float64), inputs["t"].astype(np.float64)
    h = np.tanh(0.5 * x + 0.25)
    np.testing.assert_allclose(np.asarray(g["ss"][0]), np.sum((h - t) / 4 * (1 - h ** 2) * x, 0),
                               rtol=1e-4)
    # lr_mult 0 (Net.loss freezes it): no gradient for the bias blob.
    assert float(g["ss"][1][0]) == 0.0


def test_native_layer_key_only_in_training(tmp_path, monkeypatch):
    # A JaxLayer with needs_key = True gets a key in training mode; without one the error
    # says so, and at test time it runs with key None.
    (tmp_path / "jcaffe_keyed_layer.py").write_text(textwrap.dedent("""\
        import jax
        from jcaffe.layers.python import JaxLayer

        class Noise(JaxLayer):
            needs_key = True

            def setup(self, bottom_shapes):
                return [bottom_shapes[0]]

            def apply(self, blobs, bottoms, train, key):
                if not train:
                    return [bottoms[0]]
                return [bottoms[0] + jax.random.normal(key, bottoms[0].shape, bottoms[0].dtype)]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    layer = make_layer('type: "Python" python_param { module: "jcaffe_keyed_layer" '
                       'layer: "Noise" }', [(2, 3)])
    x = jnp.ones((2, 3))
    (y,) = layer.apply([], [x], Context(train=False, key=None))
    np.testing.assert_array_equal(y, 1)
    with pytest.raises(LayerError, match="needs a PRNG key in training mode .the class sets "
                                         "needs_key = True.; it was applied with train=True"):
        layer.apply([], [x], Context(train=True, key=None))


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def test_entry_point_layer_type_builds_and_runs(tmp_path, monkeypatch):
    dist = tmp_path / "jcaffe_ep_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jcaffe-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[jcaffe.layers]\nTimesTwoEP = jcaffe_ep_demo:TimesTwo\n"
        "PyScaleEP = jcaffe_ep_demo:PyScale\nNegEP = jcaffe_ep_demo:Neg\n"
        "BrokenEP = jcaffe_ep_demo:missing\n")
    (tmp_path / "jcaffe_ep_demo.py").write_text(textwrap.dedent("""\
        import jax.numpy as jnp
        from jcaffe.layers import Layer
        from jcaffe.layers.python import JaxLayer
        from jcaffe_test_pylayers import PyScale

        class Neg(Layer):
            def setup(self, bottom_shapes):
                return [bottom_shapes[0]]

            def apply(self, blobs, bottoms, ctx):
                return [-bottoms[0]]

        class TimesTwo(JaxLayer):
            def setup(self, bottom_shapes):
                self.factor = float(self.param_str or 2)
                return [bottom_shapes[0]]

            def apply(self, blobs, bottoms, train, key):
                return [bottoms[0] * jnp.asarray(self.factor, bottoms[0].dtype)]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(DATA)
    assert {"TimesTwoEP", "PyScaleEP", "NegEP"} <= set(known_types())
    text = """\
    layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "two" type: "TimesTwoEP" bottom: "x" top: "y" }
    layer { name: "three" type: "TimesTwoEP" bottom: "y" top: "z" python_param { param_str: "3" } }
    layer { name: "s" type: "PyScaleEP" bottom: "z" top: "w" python_param { param_str: "0.5" } }
    layer { name: "n" type: "NegEP" bottom: "w" top: "v" }
    """
    net = jcaffe.Net(prototxt.parse_net_text(textwrap.dedent(text)), verbose=False)
    assert [l.type for l in net.layers[1:]] == ["TimesTwoEP", "TimesTwoEP", "PyScaleEP", "NegEP"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    blobs = jax.jit(net.apply)(net.init(jax.random.key(0)), {"x": x})
    np.testing.assert_allclose(np.asarray(blobs["z"]), 6 * x)
    np.testing.assert_allclose(np.asarray(blobs["w"]), 3 * x)
    np.testing.assert_allclose(np.asarray(blobs["v"]), -3 * x)
    with pytest.raises(NetError, match=r"layer type 'BrokenEP': loading entry point "
                                       r"'jcaffe_ep_demo:missing' .*jcaffe-ep-demo"):
        jcaffe.Net(prototxt.parse_net_text(
            'layer { name: "b" type: "BrokenEP" top: "y" }'), verbose=False)


def test_exception_in_forward_during_training_is_one_line_at_the_cli(tmp_path, capfd):
    """Raised inside the compiled step's host callback, it reaches `jcaffe train` wrapped in
    JAX's runtime error; the command prints the layer's one line."""
    from jcaffe import cli

    src = open(os.path.join(DATA, "jcaffe_test_pylayers.py")).read()
    (tmp_path / "boom_layers.py").write_text(src)
    (tmp_path / "net.prototxt").write_text('''
layer { name: "x" type: "DummyData" top: "x" dummy_data_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param { num_output: 1 } }
layer { name: "boom" type: "Python" bottom: "ip" top: "loss" loss_weight: 1
        python_param { module: "boom_layers" layer: "RaisesInForward" } }
''')
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\n'
        f'snapshot_after_train: false\nsolver_mode: CPU\n')
    rc = cli.main(["train", f"--solver={tmp_path / 'solver.prototxt'}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("jcaffe: error: layer 'boom' (type Python): "), err[-1]
    assert "forward raised RuntimeError: boom at run time" in err[-1]
    assert "Traceback" not in "\n".join(err)
