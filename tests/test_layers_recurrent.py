"""Recurrent layers (LSTM, RNN, LSTMUnit) against numpy step-by-step references written from
Caffe's equations, finite-difference gradients, Caffe's blob layout (including the zoo's LRCN
captioning net) and a small end-to-end training run.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

import jcaffe
from jcaffe.errors import LayerError
from jcaffe.layers.base import Context
from jcaffe.proto import caffe_pb2
from layer_utils import check_gradient, make_layer, run

ZOO = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "zoo"


# ------------------------------------------------------------------------------------------
# numpy references: Caffe's equations, one timestep and one stream at a time
# ------------------------------------------------------------------------------------------

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_ref(x, cont, w_xc, b_c, w_hc, x_static=None, w_static=None, h0=None, c0=None):
    """LSTM with gates (i, f, o, g): returns h [T, N, H], h_T [1, N, H], c_T [1, N, H]."""
    T, N = cont.shape
    H = w_hc.shape[1]
    xf = x.reshape(T, N, -1)
    h = np.zeros((N, H)) if h0 is None else h0[0].copy()
    c = np.zeros((N, H)) if c0 is None else c0[0].copy()
    out = np.zeros((T, N, H))
    for t in range(T):
        h_new, c_new = np.zeros((N, H)), np.zeros((N, H))
        for n in range(N):
            a = w_xc @ xf[t, n] + b_c + w_hc @ (cont[t, n] * h[n])
            if x_static is not None:
                a = a + w_static @ x_static[n].reshape(-1)
            i, f, o, g = (sigmoid(a[:H]), sigmoid(a[H:2 * H]), sigmoid(a[2 * H:3 * H]),
                          np.tanh(a[3 * H:]))
            c_new[n] = cont[t, n] * f * c[n] + i * g
            h_new[n] = o * np.tanh(c_new[n])
        h, c = h_new, c_new
        out[t] = h
    return out, h[None], c[None]


def rnn_ref(x, cont, w_xh, b_h, w_hh, w_ho, b_o, x_static=None, w_static=None, h0=None):
    """RNN: returns o [T, N, H] and h_T [1, N, H]."""
    T, N = cont.shape
    H = w_hh.shape[0]
    xf = x.reshape(T, N, -1)
    h = np.zeros((N, H)) if h0 is None else h0[0].copy()
    out = np.zeros((T, N, H))
    for t in range(T):
        h_new = np.zeros((N, H))
        for n in range(N):
            a = w_hh @ (cont[t, n] * h[n]) + w_xh @ xf[t, n] + b_h
            if x_static is not None:
                a = a + w_static @ x_static[n].reshape(-1)
            h_new[n] = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h_new[n] + b_o)
        h = h_new
    return out, h[None]


def lstm_unit_ref(c_prev, x, cont):
    N, H = c_prev.shape[1], c_prev.shape[2]
    c, h = np.zeros((1, N, H)), np.zeros((1, N, H))
    for n in range(N):
        for d in range(H):
            i = sigmoid(x[0, n, d])
            f = sigmoid(x[0, n, H + d])
            o = sigmoid(x[0, n, 2 * H + d])
            g = np.tanh(x[0, n, 3 * H + d])
            c[0, n, d] = cont[0, n] * f * c_prev[0, n, d] + i * g
            h[0, n, d] = o * np.tanh(c[0, n, d])
    return c, h


# ------------------------------------------------------------------------------------------
# building test cases
# ------------------------------------------------------------------------------------------

T, N, H = 5, 3, 4
X_SHAPE = (T, N, 2, 3)          # flattened to D = 6, as Caffe's InnerProduct(axis 2)
XS_SHAPE = (N, 5)
# cont: streams 0 and 2 start a sequence at t = 0 and restart mid-sequence; stream 1 continues
# from the initial state (h_0 / c_0 with expose_hidden) and restarts at t = 2.
CONT = np.array([[0, 1, 0],
                 [1, 1, 0],
                 [1, 0, 1],
                 [0, 1, 1],
                 [1, 1, 1]], np.float64)


def recurrent_text(kind, expose=False, num_output=H, fillers=True):
    filler = ('weight_filler { type: "uniform" min: -0.5 max: 0.5 } '
              'bias_filler { type: "uniform" min: -0.3 max: 0.3 }' if fillers else "")
    return (f'type: "{kind}" recurrent_param {{ num_output: {num_output} {filler} '
            f'expose_hidden: {"true" if expose else "false"} }}')


def case(kind, static, expose, seed=0, x_shape=X_SHAPE, cont=CONT):
    """Builds the layer and float64 bottoms/blobs; returns (layer, blobs, bottoms)."""
    rng = np.random.default_rng(seed)
    t, n = cont.shape
    shapes = [x_shape, (t, n)]
    bottoms = [rng.standard_normal(x_shape), cont.copy()]
    if static:
        shapes.append((n,) + XS_SHAPE[1:])
        bottoms.append(rng.standard_normal(shapes[-1]))
    n_state = 2 if kind == "LSTM" else 1
    if expose:
        for _ in range(n_state):
            shapes.append((1, n, H))
            bottoms.append(0.5 * rng.standard_normal((1, n, H)))
    tops = ["out"] + (["h_T", "c_T"][:n_state] if expose else [])
    layer = make_layer(recurrent_text(kind, expose), shapes, tops=tops)
    blobs = [0.4 * rng.standard_normal(s) for s in layer.blob_shapes]
    return layer, blobs, bottoms


def reference(kind, layer, blobs, bottoms):
    static = layer.static_input
    x, cont = bottoms[0], bottoms[1]
    xs = bottoms[2] if static else None
    state = bottoms[2 + int(static):] if layer.expose_hidden else []
    if kind == "LSTM":
        w_xc, b_c = blobs[0], blobs[1]
        w_s = blobs[2] if static else None
        out, h_T, c_T = lstm_ref(x, cont, w_xc, b_c, blobs[-1], xs, w_s, *state)
        return [out, h_T, c_T] if layer.expose_hidden else [out]
    w_s = blobs[2] if static else None
    out, h_T = rnn_ref(x, cont, blobs[0], blobs[1], blobs[-3], blobs[-2], blobs[-1], xs, w_s,
                       *state)
    return [out, h_T] if layer.expose_hidden else [out]


def jrun(layer, blobs, bottoms):
    ctx = Context(train=True)
    f = jax.jit(lambda b, x: layer.apply(b, x, ctx))
    return [np.asarray(t) for t in f([jnp.asarray(b) for b in blobs],
                                      [jnp.asarray(b) for b in bottoms])]


CASES = [(kind, static, expose) for kind in ("LSTM", "RNN")
         for static in (False, True) for expose in (False, True)]
CASE_IDS = [f"{k}-{'static' if s else 'nostatic'}-{'expose' if e else 'hidden'}"
            for k, s, e in CASES]


# ------------------------------------------------------------------------------------------
# forward against the references
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,static,expose", CASES, ids=CASE_IDS)
def test_forward_matches_reference(kind, static, expose):
    layer, blobs, bottoms = case(kind, static, expose)
    expected = reference(kind, layer, blobs, bottoms)
    got = jrun(layer, blobs, bottoms)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert [tuple(s) for s in layer.top_shapes] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_float32_stays_float32(kind):
    layer, blobs, bottoms = case(kind, True, True)
    expected = reference(kind, layer, blobs, bottoms)
    got = jrun(layer, [b.astype(np.float32) for b in blobs],
               [b.astype(np.float32) for b in bottoms])
    for g, e in zip(got, expected):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_cont_zero_resets_state(kind):
    """A 0 in cont makes that stream's step independent of everything before it: the same
    suffix after a reset gives the same outputs whatever came earlier."""
    layer, blobs, bottoms = case(kind, False, False)
    cont = np.ones((T, N))
    cont[0] = 0
    cont[2] = 0                          # every stream restarts at t = 2
    other = [bottoms[0].copy(), cont]
    other[0][:2] = np.random.default_rng(7).standard_normal(other[0][:2].shape)
    a = jrun(layer, blobs, [bottoms[0], cont])[0]
    b = jrun(layer, blobs, other)[0]
    assert not np.allclose(a[:2], b[:2])
    np.testing.assert_allclose(a[2:], b[2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_step_by_step_equals_full_sequence(kind):
    """Caffe's TestForward: the sequence in one call equals one timestep per call with the
    state carried (here explicitly, through expose_hidden); with cont = 0 at every step only
    the first timestep agrees."""
    starts = np.ones((T, N))
    starts[0] = 0
    full, blobs, bottoms = case(kind, True, False, cont=starts)
    expected = jrun(full, blobs, bottoms)[0]
    n_state = 2 if kind == "LSTM" else 1
    shapes = [(1,) + X_SHAPE[1:], (1, N), XS_SHAPE] + [(1, N, H)] * n_state
    step = make_layer(recurrent_text(kind, expose=True), shapes,
                      tops=["out", "h_T", "c_T"][:1 + n_state])
    assert step.blob_shapes == full.blob_shapes
    ctx = Context(train=True)
    step_fn = jax.jit(lambda b, x: step.apply(b, x, ctx))
    for reset in (False, True):
        state = [np.zeros((1, N, H))] * n_state
        for t in range(T):
            cont_t = np.full((1, N), 0.0 if (t == 0 or reset) else 1.0)
            out, *state = step_fn(blobs, [bottoms[0][t:t + 1], cont_t, bottoms[2]] + state)
            out = np.asarray(out)
            if t == 0 or not reset:
                np.testing.assert_allclose(out[0], expected[t], rtol=1e-12, atol=1e-12)
            else:
                assert not np.allclose(out[0], expected[t])


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------

class FirstTop:
    """The layer's top 0 alone: Caffe sends no gradient back from the exposed h_T / c_T, so
    finite differences of those tops are not what its backward computes."""

    stateful = False

    def __init__(self, layer):
        self.layer, self.type, self.name = layer, layer.type, layer.name

    def apply(self, blobs, bottoms, ctx):
        return self.layer.apply(blobs, bottoms, ctx)[:1]


GRAD_CASES = [("LSTM", True, True), ("LSTM", False, False), ("RNN", True, False),
              ("RNN", False, True)]


@pytest.mark.parametrize("kind,static,expose", GRAD_CASES,
                         ids=[CASE_IDS[CASES.index(c)] for c in GRAD_CASES])
def test_gradient(kind, static, expose):
    cont = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], np.float64)
    layer, blobs, bottoms = case(kind, static, expose, seed=3, x_shape=(4, 2, 3), cont=cont)
    check = [0, 2] if static else [0]            # x and x_static; cont gets no gradient
    check_gradient(FirstTop(layer) if expose else layer, blobs, bottoms, check_bottoms=check,
                   max_elems=25)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_no_gradient_through_exposed_state(kind):
    """Caffe shares only the data of h_0/c_0 and h_T/c_T with its unrolled net: the initial
    state gets a zero gradient (although the outputs depend on it), and a loss on h_T / c_T
    reaches neither the parameters nor x. cont gets no gradient either."""
    layer, blobs, bottoms = case(kind, False, True, cont=np.ones((T, N)))
    ctx = Context(train=True)
    first_state = 2

    def loss_out(bl, bo):
        return jnp.sum(layer.apply(bl, bo, ctx)[0] ** 2)

    def loss_state(bl, bo):
        return sum(jnp.sum(t ** 2) for t in layer.apply(bl, bo, ctx)[1:])

    loss_out, loss_state = jax.jit(loss_out), jax.jit(loss_state)
    jb = [jnp.asarray(b) for b in blobs]
    jx = [jnp.asarray(b) for b in bottoms]
    g_blobs, g_bottoms = jax.jit(jax.grad(loss_out, argnums=(0, 1)))(jb, jx)
    for k in range(first_state, len(bottoms)):
        assert np.all(np.asarray(g_bottoms[k]) == 0)
        moved = [b.copy() for b in bottoms]
        moved[k] = moved[k] + 0.1
        assert float(loss_out(jb, [jnp.asarray(b) for b in moved])) != float(loss_out(jb, jx))
    assert np.all(np.asarray(g_bottoms[1]) == 0)
    assert np.any(np.asarray(g_bottoms[0]) != 0)
    g_blobs, g_bottoms = jax.jit(jax.grad(loss_state, argnums=(0, 1)))(jb, jx)
    assert float(loss_state(jb, jx)) > 0
    for g in list(g_blobs) + list(g_bottoms):
        assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------------------------------
# LSTMUnit
# ------------------------------------------------------------------------------------------

def unit_case(cont, seed=0, n=3, hdim=4):
    rng = np.random.default_rng(seed)
    layer = make_layer('type: "LSTMUnit"', [(1, n, hdim), (1, n, 4 * hdim), (1, n)],
                       tops=["c", "h"])
    bottoms = [rng.uniform(-1, 1, (1, n, hdim)), rng.uniform(-1, 1, (1, n, 4 * hdim)),
               np.asarray(cont, np.float64).reshape(1, n)]
    return layer, bottoms


@pytest.mark.parametrize("cont", [[0, 0, 0], [1, 0, 1], [1, 1, 1]])
def test_lstm_unit_forward(cont):
    layer, bottoms = unit_case(cont)
    assert layer.blob_shapes == []
    assert layer.top_shapes == [(1, 3, 4), (1, 3, 4)]
    c, h = run(layer, [], bottoms)
    c_ref, h_ref = lstm_unit_ref(*bottoms)
    np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cont", [[0, 0, 0], [1, 0, 1], [0.5, 0.25, 1]])
def test_lstm_unit_gradient(cont):
    # Non-binary cont: the exact gradient (Caffe's GPU kernel; its CPU backward differs there).
    layer, bottoms = unit_case(cont, seed=1)
    check_gradient(layer, [], bottoms, check_bottoms=[0, 1], max_elems=48)


def test_lstm_unit_is_the_lstm_cell():
    """The LSTM layer's step is LSTMUnit applied to W_hc·(cont·h) + W_xc·x + b_c (Caffe's
    unrolled net), checked for one timestep with expose_hidden."""
    rng = np.random.default_rng(5)
    d = 3
    lstm = make_layer(recurrent_text("LSTM", expose=True), [(1, N, d), (1, N), (1, N, H),
                                                            (1, N, H)], tops=["h", "hT", "cT"])
    unit = make_layer('type: "LSTMUnit"', [(1, N, H), (1, N, 4 * H), (1, N)], tops=["c", "h"])
    w_xc, b_c, w_hc = (rng.standard_normal(s) for s in lstm.blob_shapes)
    x, h0, c0 = rng.standard_normal((1, N, d)), rng.standard_normal((1, N, H)), \
        rng.standard_normal((1, N, H))
    cont = np.array([[1.0, 0.0, 1.0]])
    h, h_T, c_T = run(lstm, [w_xc, b_c, w_hc], [x, cont, h0, c0])
    gates = x @ w_xc.T + b_c + (cont[..., None] * h0) @ w_hc.T
    c_u, h_u = run(unit, [], [c0, gates, cont])
    np.testing.assert_allclose(c_T, c_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_T, h_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h, h_u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_time_loop_is_one_scan(kind):
    """The program does not grow with T: one scan body, whatever the sequence length."""
    def n_eqns(t):
        layer = make_layer(recurrent_text(kind), [(t, 2, 3), (t, 2)], tops=["out"])
        blobs = [jnp.zeros(s) for s in layer.blob_shapes]
        jaxpr = jax.make_jaxpr(lambda b, x, c: layer.apply(b, [x, c], Context(train=True)))(
            blobs, jnp.zeros((t, 2, 3)), jnp.zeros((t, 2)))
        assert any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns)
        return len(jaxpr.jaxpr.eqns)

    assert n_eqns(3) == n_eqns(40)


DECODE_TEXT = """
name: "decode"
layer { name: "input" type: "Input" top: "x" top: "cont" top: "h0" top: "c0"
        input_param { shape { dim: 1 dim: 2 dim: 3 } shape { dim: 1 dim: 2 }
                      shape { dim: 1 dim: 2 dim: 4 } shape { dim: 1 dim: 2 dim: 4 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" bottom: "h0" bottom: "c0"
        top: "h" top: "h_T" top: "c_T"
        recurrent_param { num_output: 4 expose_hidden: true
          weight_filler { type: "uniform" min: -0.5 max: 0.5 }
          bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
"""


def test_net_decodes_step_by_step_with_expose_hidden():
    """The README's decoding loop: a T = 1 net fed its own h_T / c_T reproduces the numpy
    reference of the whole sequence."""
    net = jcaffe.Net(text_format.Parse(DECODE_TEXT, caffe_pb2.NetParameter()), phase="TEST",
                     verbose=False)
    params = net.init(jax.random.key(3))
    step = jax.jit(net.apply)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 2, 3)).astype(np.float32)
    cont = np.ones((6, 2), np.float32)
    cont[0] = 0
    cont[4, 1] = 0
    state = [np.zeros((1, 2, 4), np.float32)] * 2
    outs = []
    for t in range(6):
        blobs = step(params, {"x": xs[t:t + 1], "cont": cont[t:t + 1], "h0": state[0],
                              "c0": state[1]})
        state = [blobs["h_T"], blobs["c_T"]]
        outs.append(np.asarray(blobs["h"][0]))
    w = [np.asarray(b, np.float64) for b in params["lstm"]]
    expected, h_T, c_T = lstm_ref(xs.astype(np.float64), cont.astype(np.float64), *w)
    np.testing.assert_allclose(np.stack(outs), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state[1]), c_T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# blobs: Caffe's order, shapes, fillers, caffemodel loading
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
def test_blob_layout(static):
    # D = 6 (x is T×N×2×3), Ds = 5, H = 4: every blob shape differs.
    shapes = [X_SHAPE, (T, N)] + ([XS_SHAPE] if static else [])
    lstm = make_layer(recurrent_text("LSTM"), shapes, tops=["h"])
    rnn = make_layer(recurrent_text("RNN"), shapes, tops=["o"])
    mid = [(4 * H, 5)] if static else []
    assert lstm.blob_shapes == [(4 * H, 6), (4 * H,)] + mid + [(4 * H, H)]
    mid = [(H, 5)] if static else []
    assert rnn.blob_shapes == [(H, 6), (H,)] + mid + [(H, H), (H, H), (H,)]
    assert lstm.top_shapes == [(T, N, H)] and rnn.top_shapes == [(T, N, H)]


def test_fillers_follow_recurrent_param():
    text = ('type: "RNN" recurrent_param { num_output: 4 weight_filler { type: "constant" '
            'value: 0.5 } bias_filler { type: "constant" value: -0.25 } }')
    layer = make_layer(text, [X_SHAPE, (T, N), XS_SHAPE], tops=["o"])
    blobs = jax.jit(layer.init)(jax.random.key(0))
    expected = [0.5, -0.25, 0.5, 0.5, 0.5, -0.25]         # W_xh b_h W_xh_static W_hh W_ho b_o
    assert [b.dtype for b in blobs] == [jnp.float32] * 6
    for b, v, s in zip(blobs, expected, layer.blob_shapes):
        assert b.shape == s
        np.testing.assert_array_equal(np.asarray(b), np.full(s, v, np.float32))
    # Caffe's default filler is constant 0.
    plain = make_layer(recurrent_text("LSTM", fillers=False), [X_SHAPE, (T, N)], tops=["h"])
    assert all(np.all(np.asarray(b) == 0) for b in jax.jit(plain.init)(jax.random.key(0)))
    uni = make_layer(recurrent_text("LSTM"), [X_SHAPE, (T, N)], tops=["h"])
    w = [np.asarray(b) for b in jax.jit(uni.init)(jax.random.key(1))]
    assert all(np.abs(b).max() <= 0.5 for b in w) and np.abs(w[1]).max() <= 0.3
    assert len({float(b.reshape(-1)[0]) for b in w}) == len(w)   # independent draws


NET_TEXT = """
name: "seq"
layer { name: "input" type: "Input" top: "x" top: "cont" top: "label"
        input_param { shape { dim: 6 dim: 4 dim: 3 } shape { dim: 6 dim: 4 }
                      shape { dim: 6 dim: 4 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 8
          weight_filler { type: "uniform" min: -0.3 max: 0.3 }
          bias_filler { type: "constant" value: 0 } } }
layer { name: "predict" type: "InnerProduct" bottom: "h" top: "predict"
        inner_product_param { num_output: 2 axis: 2
          weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "predict" bottom: "label" top: "loss"
        softmax_param { axis: 2 } }
"""


def seq_net():
    return jcaffe.Net(text_format.Parse(NET_TEXT, caffe_pb2.NetParameter()), phase="TRAIN",
                      verbose=False)


def test_caffemodel_blobs_load_in_caffe_order(tmp_path):
    """A caffemodel written with Caffe's layout (LSTM blobs W_xc, b_c, W_hc) loads 1:1."""
    net = seq_net()
    rng = np.random.default_rng(0)
    arrays = {"lstm": [rng.standard_normal(s).astype(np.float32) for s in
                       [(32, 3), (32,), (32, 8)]],
              "predict": [rng.standard_normal(s).astype(np.float32) for s in [(2, 8), (2,)]]}
    model = caffe_pb2.NetParameter(name="seq")
    for name, blobs in arrays.items():
        lp = model.layer.add(name=name, type="LSTM" if name == "lstm" else "InnerProduct")
        for a in blobs:
            bp = lp.blobs.add()
            bp.shape.dim.extend(a.shape)
            bp.data.extend(a.reshape(-1).tolist())
    path = tmp_path / "seq.caffemodel"
    path.write_bytes(model.SerializeToString())
    params = net.copy_from(net.init(jax.random.key(0)), jcaffe.load_caffemodel(path))
    for name, blobs in arrays.items():
        for got, want in zip(params[name], blobs):
            np.testing.assert_array_equal(np.asarray(got), want)
    swapped = {"lstm": [arrays["lstm"][0], arrays["lstm"][2], arrays["lstm"][1]]}
    with pytest.raises(jcaffe.errors.ModelError, match="layer 'lstm' blob 1"):
        net.copy_from(params, swapped)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,shapes,tops,message", [
    ('type: "LSTM" recurrent_param { }', [(2, 3, 4), (2, 3)], ["h"], "num_output must be positive"),
    (recurrent_text("LSTM"), [(2, 3), (2, 3)], ["h"], r"\(x\) must have at least 3 axes"),
    (recurrent_text("LSTM"), [(2, 3, 4), (3, 2)], ["h"], r"cont\) must have shape \[2, 3\]"),
    (recurrent_text("LSTM"), [(2, 3, 4), (2, 3, 1)], ["h"], r"cont\) must have shape"),
    (recurrent_text("RNN"), [(2, 3, 4), (2, 3), (4, 5)], ["o"], r"x_static\) must .*3 streams"),
    (recurrent_text("RNN"), [(2, 3, 4), (2, 3), (3,)], ["o"], r"x_static\) must have at least 2"),
    (recurrent_text("LSTM"), [(2, 3, 4)], ["h"], "takes at least 2 bottom"),
    (recurrent_text("LSTM", expose=True), [(2, 3, 4), (2, 3), (1, 3, H)], ["h", "a", "b"],
     "takes 4 or 5 bottom blobs with expose_hidden"),
    (recurrent_text("LSTM", expose=True), [(2, 3, 4), (2, 3), (1, 3, H), (1, 3, H + 1)],
     ["h", "a", "b"], r"bottom 3 \(c_0\) must have shape \[1, 3, 4\]"),
    (recurrent_text("LSTM", expose=True), [(2, 3, 4), (2, 3), (1, 3, H), (1, 3, H)], ["h"],
     "takes exactly 3 top blob"),
    (recurrent_text("RNN"), [(2, 3, 4), (2, 3)], ["o", "hT"], "takes exactly 1 top blob"),
    ('type: "LSTMUnit"', [(1, 3, 4), (1, 3, 15), (1, 3)], ["c", "h"], "4·H = 16"),
    ('type: "LSTMUnit"', [(2, 3, 4), (2, 3, 16), (2, 3)], ["c", "h"], "1 on axis 0"),
    ('type: "LSTMUnit"', [(1, 3, 4), (1, 2, 16), (1, 3)], ["c", "h"], "N = 3 on axis 1"),
    ('type: "LSTMUnit"', [(1, 3, 4), (1, 3, 16), (1, 3, 1)], ["c", "h"], r"cont \[1, N\]"),
])
def test_bad_input(text, shapes, tops, message):
    with pytest.raises(LayerError, match=message) as e:
        make_layer(text, shapes, tops=tops)
    assert "\n" not in str(e.value) and "'layer'" in str(e.value)


# ------------------------------------------------------------------------------------------
# the zoo's LRCN captioning net (BVLC/caffe PR #2033)
# ------------------------------------------------------------------------------------------

def _lrcn_with_inputs(path, batch_images=100, T_=20, N_=100):
    """The LRCN prototxt with its data layers replaced by Input layers of the shapes they
    imply: ImageData batch 100 cropped to 227 (data, label); HDF5Data batch 20 of 100-stream
    sentences (cont/input/target_sentence T×N = 20×100); include rules kept."""
    net = jcaffe.prototxt.read_net(str(path))
    for lp in net.layer:
        if lp.type == "ImageData":
            c = lp.transform_param.crop_size
            dims = [[lp.image_data_param.batch_size, 3, c, c], [lp.image_data_param.batch_size]]
        elif lp.type == "HDF5Data":
            dims = [[T_, N_]] * len(lp.top)
        else:
            continue
        assert (lp.image_data_param.batch_size if lp.type == "ImageData"
                else lp.hdf5_data_param.batch_size) == (batch_images if lp.type == "ImageData"
                                                       else T_)
        keep = caffe_pb2.LayerParameter()
        # Both data layers are named "data" (Caffe allows duplicate layer names; jcaffe's Net
        # does not): the replacements get distinct names.
        keep.name, keep.type = f"{lp.name}_{lp.top[0]}", "Input"
        keep.top.extend(lp.top)
        keep.include.extend(lp.include)
        keep.exclude.extend(lp.exclude)
        for d in dims:
            keep.input_param.shape.add().dim.extend(d)
        lp.CopyFrom(keep)
    return net


@pytest.mark.parametrize("stages,statics", [
    (["freeze-convnet", "factored", "2-layer"], {"lstm1": False, "lstm2": True}),
    (["freeze-convnet", "unfactored", "2-layer"], {"lstm1": True, "lstm2": False}),
    (["unfactored"], {"lstm1": True}),
])
def test_zoo_lrcn_builds_with_caffe_lstm_blobs(stages, statics):
    path = ZOO / "coco_lrcn_caffenet_train.prototxt"
    if not path.exists():
        pytest.skip("../shared/zoo is absent")
    entry = next(e for e in json.loads((ZOO / "MANIFEST.json").read_text())
                 if e["file"] == path.name)
    assert "LSTM" in entry["layer_types"]
    net = jcaffe.Net(_lrcn_with_inputs(path), phase="TRAIN", stages=stages, verbose=False)
    layers = {l.name: l for l in net.layers}
    assert {n for n, l in layers.items() if l.type == "LSTM"} == set(statics)
    # Caffe's FillUnrolledNet with num_output 1000: W_xc [4000, D], b_c [4000],
    # W_xc_static [4000, 1000] (fc8 is 100×1000), W_hc [4000, 1000]; D = 1000 (the 1000-d
    # word embedding, or lstm1's 1000-d output).
    for name, static in statics.items():
        expected = [(4000, 1000), (4000,)] + [(4000, 1000)] * static + [(4000, 1000)]
        assert layers[name].blob_shapes == expected, name
        assert layers[name].top_shapes == [(20, 100, 1000)]
        assert len(layers[name].bottom_names) == 2 + static
    published = entry["expected"].get("param_shapes", {})
    for name, shapes in published.items():
        if name in layers:
            assert [list(s) for s in layers[name].blob_shapes] == shapes, name
    assert net.blob_shapes["predict"] == (20, 100, 8801)
    assert net.blob_shapes["embedded_input_sentence"] == (20, 100, 1000)
    lstm_params = [p for p in net.params_info if p.layer in statics]
    assert sum(int(np.prod(p.shape)) for p in lstm_params) == sum(
        4000 * 1000 * (2 + s) + 4000 for s in statics.values())


# ------------------------------------------------------------------------------------------
# end to end: a Net with Input + LSTM + InnerProduct + SoftmaxWithLoss learns a memory task
# ------------------------------------------------------------------------------------------

def toy_batch(rng, t=6, n=4):
    """label_t = [x_{t-1, 0} > 0] (needs the recurrent state); cont restarts mid-sequence,
    and after a restart the label is [x_t,0 > 0] (no previous step to remember)."""
    x = rng.standard_normal((t, n, 3))
    cont = np.ones((t, n))
    cont[0] = 0
    cont[3, :2] = 0
    prev = np.concatenate([x[:1, :, 0], x[:-1, :, 0]], axis=0)
    label = np.where(cont == 0, x[:, :, 0] > 0, prev > 0).astype(np.float32)
    return {"x": x.astype(np.float32), "cont": cont.astype(np.float32), "label": label}


def test_end_to_end_sgd_lowers_loss():
    net = seq_net()
    assert net.blob_shapes["h"] == (6, 4, 8) and net.blob_shapes["predict"] == (6, 4, 2)
    params = net.init(jax.random.key(0))
    assert [p.shape for p in net.params_info][:3] == [(32, 3), (32,), (32, 8)]

    def loss_fn(p, batch):
        return net.loss(p, batch)[0]

    @jax.jit
    def sgd(p, batch):
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        return jax.tree.map(lambda w, d: w - 2.0 * d, p, g), g

    rng = np.random.default_rng(0)
    held = toy_batch(np.random.default_rng(123))
    loss_j = jax.jit(loss_fn)
    before = float(loss_j(params, held))
    params, g = sgd(params, held)
    assert all(np.all(np.isfinite(np.asarray(b))) for b in g["lstm"])
    assert np.any(np.asarray(g["lstm"][2]) != 0)        # W_hc gets a gradient
    for _ in range(80):
        params, _ = sgd(params, toy_batch(rng))
    after = float(loss_j(params, held))
    # Half the labels need the previous step: only the recurrent state gets them right.
    assert after < 0.5 * before, (before, after)
