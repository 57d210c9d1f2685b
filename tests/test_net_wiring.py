"""Caffe's Net::Init wiring rules that real nets rely on: anonymous loss tops, repeated layer
names, force_backward, inline blobs, ParamSpecs on sharing layers, propagate_down checks."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe.errors import JcaffeError, NetError
from jcaffe.net import AUTOMATIC, Net
from jcaffe.proto import caffe_pb2

DATA = pathlib.Path(__file__).resolve().parent / "data"


def parse(text):
    return text_format.Parse(text, caffe_pb2.NetParameter())


def net(text, phase="TRAIN", **kw):
    return Net(parse(text), phase, verbose=False, **kw)


def softmax_loss(z, label):
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(label)), label.astype(int)].mean()


# -- anonymous tops (Caffe's AutoTopBlobs) ----------------------------------------------------
NO_TOP = """
layer { name: "in" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" %s }
"""


def test_loss_layer_without_top_gets_an_anonymous_one():
    n = net(NO_TOP % "")
    (anon,) = n.layers[-1].top_names
    assert n.blob_display_name(anon) == AUTOMATIC == "(automatic)"
    assert n.loss_weights[-1] == [1.0]
    # Caffe appends anonymous tops without making them available: they are no net outputs
    # (the solver logs only "loss = ..."), and "ip" is consumed by the loss layer.
    assert n.output_names == []
    params = n.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 1], np.float32)
    loss, (blobs, _) = n.loss(params, {"x": x, "label": label})
    w, b = (np.asarray(a, np.float64) for a in params["ip"])
    np.testing.assert_allclose(float(loss), softmax_loss(x @ w.T + b, label), rtol=1e-5)
    assert blobs[anon].shape == ()


def test_anonymous_top_takes_an_explicit_loss_weight():
    n = net(NO_TOP % "loss_weight: 0.25")
    assert n.loss_weights[-1] == [0.25]
    with pytest.raises(NetError, match="loss_weight must be given once per top"):
        net(NO_TOP % "loss_weight: 1 loss_weight: 2 loss_weight: 3")


def test_anonymous_top_cannot_be_read():
    text = NO_TOP % "" + """layer { name: "s" type: "Silence" bottom: "(automatic)" }"""
    with pytest.raises(NetError, match="unknown bottom blob '\\(automatic\\)'"):
        net(text)


def test_v1_mnist_tutorial_form_builds():
    n = Net(str(DATA / "mnist_v1_no_top_loss.prototxt"), "TRAIN", verbose=False)
    assert [l.type for l in n.layers] == ["DummyData", "Convolution", "InnerProduct",
                                          "SoftmaxWithLoss"]
    assert n.output_names == []
    assert n.blob_display_name(n.layers[-1].top_names[0]) == "(automatic)"


def test_top_produced_twice_is_an_error():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "a" type: "ReLU" bottom: "x" top: "y" }
    layer { name: "b" type: "Sigmoid" bottom: "x" top: "y" }
    """
    with pytest.raises(NetError, match="layer 'b'.*top blob 'y' is produced by multiple sources"):
        net(text)


# -- repeated layer names ---------------------------------------------------------------------
DUP = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a"
        inner_product_param { num_output: 4 } }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b"
        inner_product_param { num_output: 2 } }
layer { name: "ip#2" type: "InnerProduct" bottom: "b" top: "c"
        inner_product_param { num_output: 5 } }
layer { name: "ip" type: "InnerProduct" bottom: "c" top: "d"
        inner_product_param { num_output: 6 } }
"""


def test_repeated_names_get_distinct_params_keys():
    n = net(DUP)
    # Later layers of a repeated name: name#k, k the occurrence, skipping names in use.
    assert [l.name for l in n.layers] == ["in", "ip", "ip#3", "ip#2", "ip#4"]
    assert [l.param.name for l in n.layers] == ["in", "ip", "ip", "ip#2", "ip"]
    params = n.init(jax.random.key(0))
    assert {k: [b.shape for b in v] for k, v in params.items()} == {
        "ip": [(4, 3), (4,)], "ip#3": [(2, 4), (2,)], "ip#2": [(5, 2), (5,)],
        "ip#4": [(6, 5), (6,)]}
    assert n.layer_keys_by_name()["ip"] == ["ip", "ip#3", "ip#4"]


def test_copy_from_fills_the_first_layer_of_a_name():
    n = net(DUP)
    params = n.init(jax.random.key(0))
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    new = n.copy_from(params, {"ip": [w, np.ones(4, np.float32)]})
    np.testing.assert_array_equal(new["ip"][0], w)
    for k in ("ip#3", "ip#4"):  # Caffe's CopyTrainedLayersFrom stops at the first match
        np.testing.assert_array_equal(new[k][0], params[k][0])


def test_shared_layer_keys_follow_share_trained_layers_with():
    train = net("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a"
            inner_product_param { num_output: 3 } }
    layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b"
            inner_product_param { num_output: 3 } }
    layer { name: "other" type: "InnerProduct" bottom: "b" top: "c"
            inner_product_param { num_output: 1 } }
    """)
    test = net("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a"
            inner_product_param { num_output: 3 } }
    layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b"
            inner_product_param { num_output: 3 } }
    layer { name: "own" type: "InnerProduct" bottom: "b" top: "c"
            inner_product_param { num_output: 1 } }
    """, "TEST")
    # Each train layer shares into the first test layer of its name: the later train "ip"
    # wins, the test net's second "ip" and "own" keep their own blobs.
    assert test.shared_layer_keys(train) == {"ip": "ip#2"}
    bad = net("""
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "a"
            inner_product_param { num_output: 7 } }
    """, "TEST")
    with pytest.raises(NetError, match="layer 'ip' blob 0: shape \\[3, 3\\] in the source net"):
        bad.shared_layer_keys(train)


@pytest.mark.parametrize("solver", ["autoencoder_dup_names_solver.prototxt",
                                    "mnist_v1_no_top_loss_solver.prototxt"])
def test_nets_caffe_accepts_train(solver, monkeypatch):
    from jcaffe.train import Trainer

    monkeypatch.chdir(DATA)
    t = Trainer(str(DATA / solver))
    try:
        before = jax.tree.map(np.asarray, t.params)
        t.run_iterations(3)
        assert t.iter == 3
        for k, blobs in before.items():
            for j, b in enumerate(blobs):
                after = np.asarray(t.params[k][j])
                assert np.all(np.isfinite(after))
                assert not np.array_equal(after, b), (k, j)
        if t.test_nets:
            out = t.test(0)
            assert set(out) == {"cross_entropy_loss", "l2_error"}
            assert all(np.isfinite(v).all() for v in out.values())
    finally:
        t.close()


# -- propagate_down ---------------------------------------------------------------------------
PD = """
force_backward: %s
layer { name: "in" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        %s }
"""


def test_propagate_down_of_the_wrong_length_names_the_layer():
    with pytest.raises(NetError, match="layer 'loss' .*propagate_down must be given 0 or 2 "
                                       "times .*got 1"):
        net(PD % ("false", "propagate_down: false"))


def _grads(n, params, batch):
    return jax.grad(lambda p, b: n.loss(p, b)[0], argnums=(0, 1))(params, batch)


@pytest.fixture
def pd_batch():
    rng = np.random.default_rng(1)
    return {"x": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
            "label": jnp.asarray([0., 1., 2., 1.])}


def test_propagate_down_false_stops_the_gradient(pd_batch):
    n = net(PD % ("false", "propagate_down: false propagate_down: false"))
    params = n.init(jax.random.key(0))
    gp, gb = _grads(n, params, pd_batch)
    assert not np.any(np.asarray(gb["x"]))
    assert not np.any(np.asarray(gp["ip"][0]))  # lr_mult 0: Caffe computes no diff


def test_force_backward_computes_every_gradient(pd_batch):
    n = net(PD % ("true", "propagate_down: false propagate_down: false"))
    params = n.init(jax.random.key(0))
    gp, gb = _grads(n, params, pd_batch)
    # Reference: d(mean cross-entropy)/dz = (softmax - onehot)/N, then through the IP.
    w = np.asarray(params["ip"][0], np.float64)
    x = np.asarray(pd_batch["x"], np.float64)
    z = x @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[[0, 1, 2, 1]]) / 4
    np.testing.assert_allclose(np.asarray(gp["ip"][0]), dz.T @ x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gb["x"]), dz @ w, rtol=1e-5, atol=1e-7)
    # The label bottom stays refused (LossLayer::AllowForceBackward(1) is false).
    assert n._stopped_bottoms["loss"] == frozenset({1})


# -- inline blobs -----------------------------------------------------------------------------
INLINE = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } }
        %s }
"""


def test_inline_blobs_replace_fillers():
    w = "blobs { shape { dim: 2 dim: 3 } data: 1 data: 2 data: 3 data: 4 data: 5 data: 6 }"
    b = "blobs { shape { dim: 2 } data: -1 data: 0.5 }"
    n = net(INLINE % (w + b))
    params = n.init(jax.random.key(0))
    np.testing.assert_array_equal(params["ip"][0], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(params["ip"][1], [-1, 0.5])
    y = n.apply(params, {"x": np.ones((2, 3), np.float32)})["y"]
    np.testing.assert_allclose(y, [[5, 15.5], [5, 15.5]])


@pytest.mark.parametrize("blobs,match", [
    ("blobs { shape { dim: 3 dim: 2 } data: 1 data: 2 data: 3 data: 4 data: 5 data: 6 }"
     "blobs { shape { dim: 2 } data: 0 data: 0 }", "inline blob 0 has shape \\[3, 2\\]"),
    ("blobs { shape { dim: 2 } data: 0 data: 0 }", "1 inline blob\\(s\\) given but the layer "
                                                   "has 2"),
    ("blobs { shape { dim: 2 dim: 3 } data: 1 } blobs { shape { dim: 2 } data: 0 data: 0 }",
     "holds 1 value"),
])
def test_bad_inline_blobs_are_one_line_errors(blobs, match):
    with pytest.raises(JcaffeError, match="layer 'ip'.*" + match):
        net(INLINE % blobs)


# -- ParamSpecs on sharing layers (Caffe's AppendParam) ----------------------------------------
SHARE = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "ya"
        param { name: "w" %s } inner_product_param { num_output: 3 bias_term: false } }
layer { name: "b" type: "InnerProduct" bottom: "ya" top: "yb"
        param { name: "w" %s } inner_product_param { num_output: 3 bias_term: false } }
"""


@pytest.mark.parametrize("owner,sharer,expected", [
    ("", "", (1.0, 1.0)),                       # defaults
    ("lr_mult: 2", "", (2.0, 1.0)),             # the owner's mults stand
    ("", "lr_mult: 3 decay_mult: 0", (3.0, 0.0)),  # owner gave none: the sharer's apply
    ("lr_mult: 2 decay_mult: 0", "lr_mult: 2 decay_mult: 0", (2.0, 0.0)),  # equal: fine
])
def test_sharing_layer_param_spec(owner, sharer, expected):
    n = net(SHARE % (owner, sharer))
    assert [(p.layer, p.index, p.lr_mult, p.decay_mult) for p in n.params_info] == [
        ("a", 0) + expected]


@pytest.mark.parametrize("owner,sharer,field", [
    ("lr_mult: 2", "lr_mult: 1", "lr_mult"),
    ("decay_mult: 0", "decay_mult: 1", "decay_mult"),
])
def test_sharing_layer_mismatched_mult_is_an_error(owner, sharer, field):
    with pytest.raises(NetError, match=f"layer 'b': shared param 'w' has {field} 1 here but "
                                       f".* in its owner, layer 'a'"):
        net(SHARE % (owner, sharer))


# -- nets from Caffe forks --------------------------------------------------------------------
FORK_FIELD = """name: "frcnnish"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer {
  name: "roi_pool5"
  type: "ROIPooling"
  bottom: "x"
  top: "n"
  roi_pooling_param { pooled_w: 6 pooled_h: 6 }
}
"""


def test_fork_field_is_one_line_naming_file_line_layer_and_fork(tmp_path):
    from jcaffe import prototxt
    from jcaffe.errors import ProtoError

    path = tmp_path / "frcnnish.prototxt"
    path.write_text(FORK_FIELD)
    with pytest.raises(ProtoError) as e:
        prototxt.read_net(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:8:3: layer 'roi_pool5' (type ROIPooling): field "
                          f"'roi_pooling_param' belongs to a Caffe fork, Fast/Faster R-CNN")
    assert "not to BVLC Caffe" in msg


def test_typo_field_still_gets_a_suggestion(tmp_path):
    from jcaffe import prototxt
    from jcaffe.errors import ProtoError

    path = tmp_path / "typo.prototxt"
    path.write_text('layer { name: "c" type: "Convolution" convolutoin_param { } }')
    with pytest.raises(ProtoError, match="unknown field 'convolutoin_param' in LayerParameter "
                                         "\\(did you mean 'convolution_param'\\?\\)"):
        prototxt.read_net(str(path))


@pytest.mark.parametrize("layer_type,why", [
    ("VideoData", "belongs to a Caffe fork, SSD"),
    ("ROIPooling", "belongs to a Caffe fork, Fast/Faster R-CNN"),
    ("MyOwnLayer", "is not BVLC Caffe's \\(the net probably comes from a Caffe fork\\)"),
])
def test_fork_layer_type_is_named_as_such(layer_type, why):
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }'
            f'layer {{ name: "p" type: "{layer_type}" bottom: "x" top: "y" }}')
    with pytest.raises(NetError, match=f"layer 'p': unknown layer type '{layer_type}': it {why}"):
        net(text)


# -- a layer's own phase, debug_info ----------------------------------------------------------
def test_layer_phase_overrides_the_nets():
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 50 } } }
    layer { name: "drop" type: "Dropout" bottom: "x" top: "y" phase: %s
            dropout_param { dropout_ratio: 0.5 } }
    """
    x = {"x": np.ones((2, 50), np.float32)}
    # Caffe's Dropout in a TRAIN net but with phase: TEST is the identity.
    n = net(text % "TEST")
    np.testing.assert_array_equal(n.apply({}, x, key=jax.random.key(0))["y"], x["x"])
    # And with phase: TRAIN in a TEST net it drops (values 0 or 1/(1-0.5) = 2).
    t = net(text % "TRAIN", "TEST")
    y = np.asarray(t.apply({}, x, key=jax.random.key(0))["y"])
    assert set(np.unique(y)) == {0.0, 2.0}


def test_debug_info_is_not_silently_ignored(caplog):
    import logging

    from jcaffe import log

    log.setup()
    logging.getLogger("jcaffe").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="jcaffe"):
            net("debug_info: true\n" + NO_TOP % "")
    finally:
        logging.getLogger("jcaffe").propagate = False
    assert "debug_info: true is not implemented" in caplog.text
