"""The Net: construction, Caffe's wiring rules, the pure API under jit/grad/vmap, caffemodel I/O."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe import caffemodel
from jcaffe.errors import ModelError, NetError
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2
from jcaffe import onednn
from tests.layer_utils import CHOICES

MLP = """
name: "mlp"
layer { name: "input" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
        include { phase: TEST } }
"""


def parse(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


@pytest.fixture(scope="module", params=sorted(CHOICES))
def choices(request):
    """The CPU's and a GPU's execution choices (``CHOICES``)."""
    return request.param


@pytest.fixture(scope="module")
def mlp(choices):
    return Net(parse(MLP), "TRAIN", verbose=False, config=CHOICES[choices])


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"data": rng.standard_normal((4, 3)).astype(np.float32),
            "label": np.array([0, 2, 1, 2], np.float32)}


def np_forward(params, batch):
    w1, b1 = (np.asarray(a, np.float64) for a in params["ip1"])
    w2, b2 = (np.asarray(a, np.float64) for a in params["ip2"])
    h = np.maximum(batch["data"] @ w1.T + b1, 0)
    z = h @ w2.T + b2
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    lab = batch["label"].astype(int)
    return -np.log(p[np.arange(4), lab]).mean(), z


def test_structure(mlp):
    assert [l.name for l in mlp.layers] == ["input", "ip1", "relu1", "ip2", "loss"]  # acc: TEST only
    assert mlp.blob_shapes["ip1"] == (4, 5)
    assert mlp.output_names == ["loss"]
    assert mlp.loss_weights[-1] == [1.0]  # *Loss layers default to loss_weight 1
    assert [(p.layer, p.index, p.lr_mult, p.decay_mult) for p in mlp.params_info] == [
        ("ip1", 0, 1.0, 1.0), ("ip1", 1, 2.0, 0.0), ("ip2", 0, 1.0, 1.0), ("ip2", 1, 1.0, 1.0)]


def test_init_layout_and_fillers(mlp):
    params = mlp.init(jax.random.key(0))
    assert [p.shape for p in params["ip1"]] == [(5, 3), (5,)]
    assert [p.shape for p in params["ip2"]] == [(3, 5), (3,)]
    assert all(p.dtype == jnp.float32 for ps in params.values() for p in ps)
    np.testing.assert_array_equal(params["ip1"][1], np.full(5, 0.1, np.float32))
    np.testing.assert_array_equal(params["ip2"][1], np.zeros(3, np.float32))  # default: constant 0


def test_loss_matches_numpy_and_is_jittable(mlp, batch):
    params = mlp.init(jax.random.key(1))
    loss, (blobs, _) = jax.jit(mlp.loss)(params, batch)
    ref, z = np_forward(params, batch)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert blobs["loss"].shape == ()


def test_gradient_matches_finite_differences(mlp, batch):
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mlp.init(jax.random.key(2)))
        b64 = {"data": batch["data"].astype(np.float64), "label": batch["label"]}
        f = jax.jit(lambda p: mlp.loss(p, b64)[0])
        grads = jax.grad(f)(params)
        eps = 1e-6
        for name in ("ip1", "ip2"):
            for j in range(2):
                base = np.asarray(params[name][j])
                for idx in list(np.ndindex(base.shape))[:6]:
                    plus = {k: list(v) for k, v in params.items()}
                    minus = {k: list(v) for k, v in params.items()}
                    d = np.zeros_like(base)
                    d[idx] = eps
                    plus[name][j] = jnp.asarray(base + d)
                    minus[name][j] = jnp.asarray(base - d)
                    num = (float(f(plus)) - float(f(minus))) / (2 * eps)
                    np.testing.assert_allclose(float(grads[name][j][idx]), num, rtol=1e-5, atol=1e-8)


def test_vmap_over_parameter_sets(mlp, batch):
    keys = jax.random.split(jax.random.key(3), 3)
    stacked = jax.vmap(mlp.init)(keys)
    losses = jax.vmap(lambda p: mlp.loss(p, batch)[0])(stacked)
    for i in range(3):
        single = jax.tree.map(lambda a: a[i], stacked)
        np.testing.assert_allclose(losses[i], np_forward(single, batch)[0], rtol=1e-5)


def test_test_phase_has_accuracy_outputs(batch):
    net = Net(parse(MLP), "TEST", verbose=False)
    assert net.output_names == ["acc", "loss"]
    params = net.init(jax.random.key(4))
    blobs = net.apply(params, batch)
    _, z = np_forward(params, batch)
    np.testing.assert_allclose(float(blobs["acc"]), np.mean(z.argmax(1) == batch["label"]))


def test_shape_logging(caplog):
    from jcaffe import log
    log.setup()
    logging.getLogger("jcaffe").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="jcaffe"):
            Net(parse(MLP), "TRAIN")
    finally:
        logging.getLogger("jcaffe").propagate = False
    text = caplog.text
    assert "Creating Layer ip1" in text
    assert "Top shape: 4 5 (20)" in text
    assert "Top shape: (1)" in text  # the scalar loss, as Caffe prints it
    assert "with loss weight 1" in text


SHARED = """
layer { name: "input" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ipa" type: "InnerProduct" bottom: "a" top: "ya"
        param { name: "w" } param { name: "bias" lr_mult: 0 }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ipb" type: "InnerProduct" bottom: "b" top: "yb"
        param { name: "w" } param { name: "bias" lr_mult: 0 }
        inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ya" bottom: "yb" top: "loss" }
"""


def test_param_sharing_and_frozen_params():
    net = Net(parse(SHARED), "TRAIN", verbose=False)
    params = net.init(jax.random.key(0))
    assert params["ipb"] == [None, None]  # owned by ipa
    assert [(p.layer, p.index) for p in net.params_info] == [("ipa", 0), ("ipa", 1)]
    rng = np.random.default_rng(1)
    inputs = {"a": rng.standard_normal((2, 3)).astype(np.float32),
              "b": rng.standard_normal((2, 3)).astype(np.float32)}
    grads = jax.grad(lambda p: net.loss(p, inputs)[0])(params)
    w = np.asarray(params["ipa"][0], np.float64)
    a, b = inputs["a"].astype(np.float64), inputs["b"].astype(np.float64)
    diff = (a - b) @ w.T  # biases cancel: shared
    # d/dW of sum((Wa - Wb)^2)/(2N) = (diff^T (a - b)) / N: both uses accumulate into one blob.
    np.testing.assert_allclose(grads["ipa"][0], diff.T @ (a - b) / 2, rtol=1e-5)
    np.testing.assert_array_equal(grads["ipa"][1], 0)  # lr_mult 0: no gradient at all


def test_propagate_down_false_stops_gradient():
    text = """
    layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" propagate_down: false
            inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
    layer { name: "loss" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 }
    """
    net = Net(parse(text), "TRAIN", verbose=False)
    params = net.init(jax.random.key(0))
    x = jnp.ones((2, 3), jnp.float32)
    gx = jax.grad(lambda x: net.loss(params, {"x": x})[0])(x)
    np.testing.assert_array_equal(gx, 0)
    gw = jax.grad(lambda p: net.loss(p, {"x": x})[0])(params)
    np.testing.assert_allclose(gw["ip"][0], np.full((1, 3), 2.0))


def test_implicit_split_sums_gradients():
    text = """
    layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 3 } } }
    layer { name: "e1" type: "Power" bottom: "x" top: "s1" power_param { scale: 2 } }
    layer { name: "e2" type: "Power" bottom: "x" top: "s2" power_param { scale: 3 } }
    layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s2" top: "s" }
    layer { name: "loss" type: "Reduction" bottom: "s" top: "loss" loss_weight: 1 }
    """
    net = Net(parse(text), "TRAIN", verbose=False)
    g = jax.grad(lambda x: net.loss({}, {"x": x})[0])(jnp.ones(3, jnp.float32))
    np.testing.assert_allclose(g, [5.0, 5.0, 5.0])


@pytest.mark.parametrize("text, match", [
    ('layer { name: "x" type: "NoSuchLayer" top: "t" }', r"layer 'x'.*unknown layer type 'NoSuchLayer'.*Known types:.*Convolution"),
    ('layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 } } }'
     'layer { name: "r" type: "ReLU" bottom: "y" top: "z" }', r"layer 'r'.*unknown bottom blob 'y'"),
    ('layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 } } }'
     'layer { name: "r" type: "ReLU" bottom: "x" bottom: "x" top: "z" }', r"layer 'r'.*bottom"),
    ('layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 } } }'
     'layer { name: "r" type: "ReLU" bottom: "x" top: "z" top: "w" }', r"layer 'r'.*top"),
])
def test_bad_nets(text, match):
    with pytest.raises(NetError, match=match):
        Net(parse(text), "TRAIN", verbose=False)


def test_caffemodel_round_trip_and_mismatch(mlp, tmp_path):
    params = mlp.init(jax.random.key(5))
    path = tmp_path / "m.caffemodel"
    caffemodel.save_caffemodel(str(path), mlp, params)
    loaded = caffemodel.load_caffemodel(str(path))
    assert set(loaded) == {"ip1", "ip2"}
    restored = mlp.copy_from(mlp.init(jax.random.key(6)), loaded, filename=str(path))
    for name in ("ip1", "ip2"):
        for a, b in zip(params[name], restored[name]):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bit-exact
    bad = {"ip1": [np.zeros((5, 4), np.float32), np.zeros(5, np.float32)]}
    with pytest.raises(ModelError, match=r"layer 'ip1' blob 0: shape \[5, 4\].*\[5, 3\]"):
        mlp.copy_from(params, bad, filename="bad.caffemodel")


def test_caffemodel_from_caffes_legacy_layout(mlp):
    # A Caffe-written V1 model: blobs with num/channels/height/width instead of shape.
    model = caffe_pb2.NetParameter(name="mlp")
    layer = model.layers.add(name="ip1", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    w = np.arange(15, dtype=np.float32).reshape(5, 3)
    blob = layer.blobs.add(num=1, channels=1, height=5, width=3)
    blob.data.extend(w.ravel())
    blob = layer.blobs.add(num=1, channels=1, height=1, width=5)
    blob.data.extend(np.ones(5, np.float32))
    blobs = {"ip1": [caffemodel.blob_to_array(b) for b in layer.blobs]}
    params = mlp.copy_from(mlp.init(jax.random.key(0)), blobs)
    np.testing.assert_array_equal(params["ip1"][0], w)
    np.testing.assert_array_equal(params["ip1"][1], np.ones(5))


def test_truncated_caffemodel(mlp, tmp_path):
    path = tmp_path / "m.caffemodel"
    caffemodel.save_caffemodel(str(path), mlp, mlp.init(jax.random.key(0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="m.caffemodel"):
        caffemodel.load_caffemodel(str(path))


LAYOUT_NET = """
layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 4 dim: 11 dim: 11 } } }
layer { name: "c1" type: "Convolution" bottom: "x" top: "c1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2
                            weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "p1" top: "c2"
        convolution_param { num_output: 4 kernel_size: 2 dilation: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "p2" type: "Pooling" bottom: "c2" top: "p2" pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "t" type: "TanH" bottom: "p2" top: "t" }
layer { name: "p3" type: "Pooling" bottom: "t" top: "p3" pooling_param { pool: MAX global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "p2" top: "ip" inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
"""


@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_channels_last_layout_matches_nchw(impl):
    """The NHWC internal layout (CPU default) gives Caffe's NCHW results and gradients."""
    from jcaffe.config import Config
    a = Net(parse(LAYOUT_NET), "TEST", config=Config(conv=impl, layout="NHWC"), verbose=False)
    b = Net(parse(LAYOUT_NET), "TEST", config=Config(conv=impl, layout="NCHW"), verbose=False)
    assert a.layout == "NHWC" and b.layout == "NCHW"
    assert any(l.nhwc_ok for l in a.layers)
    params = a.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 11, 11)), jnp.float32)
    ba, bb = jax.jit(a.apply)(params, {"x": x}), jax.jit(b.apply)(params, {"x": x})
    for name in bb:
        assert ba[name].shape == bb[name].shape, name
        np.testing.assert_allclose(ba[name], bb[name], rtol=1e-5, atol=1e-6, err_msg=name)

    def objective(net):
        return lambda p: sum(jnp.sum(v * v) for k, v in net.apply(p, {"x": x}).items()
                             if k in ("ip", "p3"))
    ga, gb = jax.jit(jax.grad(objective(a)))(params), jax.jit(jax.grad(objective(b)))(params)
    for name in gb:
        for u, v in zip(ga[name], gb[name]):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * float(np.abs(v).max()), err_msg=name)


def test_formulation_follows_the_target_platform():
    """A net built for a GPU uses XLA convolutions and NCHW, whatever machine builds it; the
    results are the same."""
    from jcaffe.config import Config
    gpu = Net(parse(LAYOUT_NET), "TEST", config=Config(platform="gpu"), verbose=False)
    cpu = Net(parse(LAYOUT_NET), "TEST", config=Config(platform="cpu"), verbose=False)
    assert gpu.layout == "NCHW" and cpu.layout == "NHWC"
    assert {l.impl for l in gpu.layers if l.type == "Convolution"} == {"xla"}
    cpu_conv = "onednn" if onednn.available().ok else "im2col"
    assert {l.impl for l in cpu.layers if l.type == "Convolution"} == {cpu_conv}
    params = cpu.init(jax.random.key(1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 11, 11)), jnp.float32)
    a, b = jax.jit(gpu.apply)(params, {"x": x}), jax.jit(cpu.apply)(params, {"x": x})
    np.testing.assert_allclose(a["ip"], b["ip"], rtol=1e-5, atol=1e-6)


def test_forward_mode_with_the_nchw_layout_matches_reverse_mode():
    """jax.jvp needs the NCHW layout (the channels-last kernels are custom_vjp, reverse mode
    only): its directional derivative equals the channels-last gradient dotted with the
    direction."""
    from jcaffe.config import Config
    a = Net(parse(LAYOUT_NET), "TEST", config=Config(layout="NHWC"), verbose=False)
    b = Net(parse(LAYOUT_NET), "TEST", config=Config(layout="NCHW"), verbose=False)
    params = a.init(jax.random.key(1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 11, 11)), jnp.float32)

    def objective(net):
        return lambda p: sum(jnp.sum(v * v) for k, v in net.apply(p, {"x": x}).items()
                             if k in ("ip", "p3"))
    direction = jax.tree.map(lambda v: jnp.asarray(
        np.random.default_rng(v.size).standard_normal(v.shape), v.dtype), params)
    _, forward = jax.jit(lambda p, t: jax.jvp(objective(b), (p,), (t,)))(params, direction)
    grads = jax.jit(jax.grad(objective(a)))(params)
    reverse = sum(jnp.sum(g * t) for g, t in zip(jax.tree.leaves(grads),
                                                 jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(forward), float(reverse), rtol=1e-4)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(objective(a), (params,), (direction,))


def test_conv_net_gradient_matches_finite_differences(choices):
    """Convolutions (grouped, strided, padded), MAX/AVE/global pooling and InnerProduct under
    each platform's choices: JAX's float64 gradient against central differences."""
    net = Net(parse(LAYOUT_NET), "TEST", config=CHOICES[choices], verbose=False)
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), net.init(jax.random.key(5)))
        x = jnp.asarray(rng.standard_normal((2, 4, 11, 11)))
        f = jax.jit(lambda p: sum(jnp.sum(v * v) for k, v in net.apply(p, {"x": x}).items()
                                  if k in ("ip", "p3")))
        grads = jax.grad(f)(params)
        eps = 1e-6
        for name in ("c1", "c2", "ip"):
            base = np.asarray(params[name][0])
            for idx in [tuple(rng.integers(0, d) for d in base.shape) for _ in range(3)]:
                d = np.zeros_like(base)
                d[idx] = eps
                plus = {k: list(v) for k, v in params.items()}
                minus = {k: list(v) for k, v in params.items()}
                plus[name][0], minus[name][0] = jnp.asarray(base + d), jnp.asarray(base - d)
                num = (float(f(plus)) - float(f(minus))) / (2 * eps)
                np.testing.assert_allclose(float(grads[name][0][idx]), num, rtol=1e-5,
                                           atol=1e-8, err_msg=f"{name}{idx}")
