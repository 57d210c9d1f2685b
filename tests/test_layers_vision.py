"""Vision layers (Convolution, Deconvolution, Pooling, LRN) against numpy loop references
written from Caffe's definitions, hand-computed shapes, numerical gradients and bad input.

Every formulation (conv: xla / im2col; pooling: slices / reduce_window) runs the same tests.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layer_utils
from jcaffe import onednn
from jcaffe.config import Config
from jcaffe.errors import JcaffeError, LayerError
from jcaffe.layers import vision
from jcaffe.layers.base import Context
from layer_utils import check_gradient, make_layer, run

# The channels-first formulations; the oneDNN kernels (channels-last only) have their own tests
# in test_onednn.py.
CONV_IMPLS = [impl for impl in vision.CONV_IMPLS if impl != "onednn"]
POOL_IMPLS = list(vision.POOL_IMPLS)


@pytest.fixture(params=CONV_IMPLS)
def conv_impl(request, monkeypatch):
    monkeypatch.setattr(layer_utils, "CONFIG", Config(conv=request.param))
    return request.param


@pytest.fixture(params=POOL_IMPLS)
def pool_impl(request, monkeypatch):
    monkeypatch.setattr(layer_utils, "CONFIG", Config(pool=request.param))
    return request.param


def jrun(layer, blobs, bottoms, train=True, key=None):
    """Like layer_utils.run, under jax.jit (one compile instead of many eager ops)."""
    ctx = Context(train=train, key=key if key is not None else jax.random.key(0))
    f = jax.jit(lambda b, x: layer.apply(b, x, ctx))
    return [np.asarray(t) for t in f([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms])]


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(shape, seed=0):
    """Values with gaps of 0.1, so that no max ties and finite differences never flip one."""
    n = math.prod(shape)
    return (np.random.default_rng(seed).permutation(n) * 0.1 - n * 0.05).reshape(shape)


# ------------------------------------------------------------------------------------------
# numpy references, straight from Caffe's definitions
# ------------------------------------------------------------------------------------------

def conv_ref(x, w, b, stride, pad, dil, group):
    n_, c_ = x.shape[:2]
    o_ = w.shape[0]
    ks = w.shape[2:]
    nsp = len(ks)
    sp = x.shape[2:]
    out = tuple((sp[i] + 2 * pad[i] - (dil[i] * (ks[i] - 1) + 1)) // stride[i] + 1
                for i in range(nsp))
    cg, og = c_ // group, o_ // group
    y = np.zeros((n_, o_) + out)
    for n in range(n_):
        for o in range(o_):
            g = o // og
            for pos in np.ndindex(*out):
                acc = b[o] if b is not None else 0.0
                for c in range(cg):
                    for k in np.ndindex(*ks):
                        idx = tuple(pos[i] * stride[i] - pad[i] + k[i] * dil[i] for i in range(nsp))
                        if all(0 <= idx[i] < sp[i] for i in range(nsp)):
                            acc += w[(o, c) + k] * x[(n, g * cg + c) + idx]
                y[(n, o) + pos] = acc
    return y


def deconv_ref(x, w, b, stride, pad, dil, group):
    n_, c_ = x.shape[:2]
    og = w.shape[1]
    o_ = og * group
    ks = w.shape[2:]
    nsp = len(ks)
    sp = x.shape[2:]
    out = tuple(stride[i] * (sp[i] - 1) + dil[i] * (ks[i] - 1) + 1 - 2 * pad[i]
                for i in range(nsp))
    cg = c_ // group
    y = np.zeros((n_, o_) + out)
    for n in range(n_):
        for c in range(c_):
            g = c // cg
            for pos in np.ndindex(*sp):
                for o in range(og):
                    for k in np.ndindex(*ks):
                        idx = tuple(pos[i] * stride[i] - pad[i] + k[i] * dil[i] for i in range(nsp))
                        if all(0 <= idx[i] < out[i] for i in range(nsp)):
                            y[(n, g * og + o) + idx] += w[(c, o) + k] * x[(n, c) + pos]
    if b is not None:
        y += b.reshape((1, o_) + (1,) * nsp)
    return y


def pool_out(size, k, s, p, ceil=True):
    span = size + 2 * p - k
    o = (math.ceil(span / s) if ceil else math.floor(span / s)) + 1
    if p and (o - 1) * s >= size + p:
        o -= 1
    return o


def pool_ref(x, method, kernel, stride, pad, ceil=True):
    """Caffe's Forward_cpu loops: returns (top, mask) (mask None for AVE)."""
    n_, c_, h_, w_ = x.shape
    kh, kw = kernel
    sh, sw = stride
    ph_, pw_ = pad
    oh, ow = pool_out(h_, kh, sh, ph_, ceil), pool_out(w_, kw, sw, pw_, ceil)
    top = np.zeros((n_, c_, oh, ow))
    mask = np.full((n_, c_, oh, ow), -1.0)
    for n, c, ph, pw in itertools.product(range(n_), range(c_), range(oh), range(ow)):
        hs, ws = ph * sh - ph_, pw * sw - pw_
        if method == "MAX":
            he, we = min(hs + kh, h_), min(ws + kw, w_)
            hs, ws = max(hs, 0), max(ws, 0)
            best = -np.inf
            for h in range(hs, he):
                for w in range(ws, we):
                    if x[n, c, h, w] > best:
                        best = x[n, c, h, w]
                        mask[n, c, ph, pw] = h * w_ + w
            top[n, c, ph, pw] = best
        else:
            he, we = min(hs + kh, h_ + ph_), min(ws + kw, w_ + pw_)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h_), min(we, w_)
            top[n, c, ph, pw] = x[n, c, hs:he, ws:we].sum() / size
    return top, (mask if method == "MAX" else None)


def stochastic_test_ref(x, kernel, stride, ceil=True):
    n_, c_, h_, w_ = x.shape
    oh, ow = pool_out(h_, kernel[0], stride[0], 0, ceil), pool_out(w_, kernel[1], stride[1], 0, ceil)
    top = np.zeros((n_, c_, oh, ow))
    for n, c, ph, pw in itertools.product(range(n_), range(c_), range(oh), range(ow)):
        win = x[n, c, ph * stride[0]:ph * stride[0] + kernel[0], pw * stride[1]:pw * stride[1] + kernel[1]]
        s = win.sum()
        top[n, c, ph, pw] = (win ** 2).sum() / s if s > 0 else 0.0
    return top


def lrn_ref(x, region, size, alpha, beta, k):
    n_, c_, h_, w_ = x.shape
    p = (size - 1) // 2
    y = np.zeros_like(x)
    for n, c, h, w in itertools.product(range(n_), range(c_), range(h_), range(w_)):
        if region == "ACROSS_CHANNELS":
            s = sum(x[n, cc, h, w] ** 2 for cc in range(c - p, c + p + 1) if 0 <= cc < c_)
            scale = k + alpha / size * s
        else:
            # Caffe's AVE pooling (pad p, kernel size, stride 1) of x^2, then power layer.
            hs, ws = h - p, w - p
            he, we = min(hs + size, h_ + p), min(ws + size, w_ + p)
            pool_size = (he - hs) * (we - ws)
            win = x[n, c, max(hs, 0):min(he, h_), max(ws, 0):min(we, w_)]
            scale = 1 + alpha * (win ** 2).sum() / pool_size
        y[n, c, h, w] = x[n, c, h, w] * scale ** (-beta)
    return y


def test_reference_pool_by_hand():
    # The reference itself on a 4x4 ramp, k3 s2 p1, CEIL: 3x3 outputs; window rows (and
    # columns) [-1, 2), [1, 4), [3, 6). AVE divides by the window clipped to [-1, 5).
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    top, mask = pool_ref(x, "MAX", (3, 3), (2, 2), (1, 1))
    np.testing.assert_array_equal(top[0, 0], [[5, 7, 7], [13, 15, 15], [13, 15, 15]])
    np.testing.assert_array_equal(mask[0, 0], top[0, 0])
    top, _ = pool_ref(x, "AVE", (3, 3), (2, 2), (1, 1))
    np.testing.assert_allclose(top[0, 0], AVE_4X4)


AVE_4X4 = [[10 / 9, 24 / 9, 10 / 6], [51 / 9, 90 / 9, 33 / 6], [25 / 6, 42 / 6, 15 / 4]]


# ------------------------------------------------------------------------------------------
# Convolution
# ------------------------------------------------------------------------------------------

# (convolution_param body, bottom shape, kernel, stride, pad, dilation, group, bias)
CONV_CASES = [
    ("num_output: 3 kernel_size: 3", (2, 2, 5, 5), (3, 3), (1, 1), (0, 0), (1, 1), 1, True),
    ("num_output: 2 kernel_size: 3 pad: 1 stride: 2", (2, 3, 7, 6), (3, 3), (2, 2), (1, 1), (1, 1), 1, True),
    ("num_output: 2 kernel_size: 3 pad: 2 dilation: 2", (1, 2, 7, 7), (3, 3), (1, 1), (2, 2), (2, 2), 1, True),
    ("num_output: 6 kernel_size: 3 group: 2 pad: 1", (2, 4, 5, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2, True),
    ("num_output: 3 kernel_size: 2 group: 3", (1, 3, 4, 5), (2, 2), (1, 1), (0, 0), (1, 1), 3, True),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
     (1, 2, 5, 6), (2, 3), (1, 2), (1, 0), (1, 1), 1, True),
    ("num_output: 2 kernel_size: 3 kernel_size: 1 stride: 2 stride: 1 pad: 1 pad: 0 "
     "dilation: 1 dilation: 2", (1, 2, 6, 5), (3, 1), (2, 1), (1, 0), (1, 2), 1, True),
    ("num_output: 3 kernel_size: 3 bias_term: false", (1, 2, 4, 4), (3, 3), (1, 1), (0, 0), (1, 1), 1, False),
    ("num_output: 4 kernel_size: 1", (2, 3, 3, 4), (1, 1), (1, 1), (0, 0), (1, 1), 1, True),
    ("num_output: 2 kernel_size: 3 stride: 3", (1, 2, 8, 7), (3, 3), (3, 3), (0, 0), (1, 1), 1, True),
]


def _conv_blobs(layer, seed=1):
    return [rand(s, seed + i) for i, s in enumerate(layer.blob_shapes)]


@pytest.mark.parametrize("body,shape,kernel,stride,pad,dil,group,bias", CONV_CASES)
def test_convolution_forward(conv_impl, body, shape, kernel, stride, pad, dil, group, bias):
    layer = make_layer(f"type: 'Convolution' convolution_param {{ {body} }}", [shape])
    assert layer.impl == conv_impl
    assert (layer.kernel, layer.stride, layer.pad, layer.dilation) == (kernel, stride, pad, dil)
    x = rand(shape)
    blobs = _conv_blobs(layer)
    expect = conv_ref(x, blobs[0], blobs[1] if bias else None, stride, pad, dil, group)
    (y,) = jrun(layer, blobs, [x])
    assert layer.top_shapes[0] == expect.shape == y.shape
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("body,shape,stride,pad,dil", [
    ("num_output: 3 kernel_size: 3 stride: 2", (2, 3, 8), (2,), (0,), (1,)),
    ("num_output: 2 kernel_size: 2 stride: 1 stride: 2 stride: 1 pad: 1 dilation: 1 dilation: 1 "
     "dilation: 2", (1, 2, 3, 5, 4), (1, 2, 1), (1, 1, 1), (1, 1, 2)),
])
def test_convolution_nd_forward(conv_impl, body, shape, stride, pad, dil):
    layer = make_layer(f"type: 'Convolution' convolution_param {{ {body} }}", [shape])
    x = rand(shape)
    blobs = _conv_blobs(layer)
    (y,) = jrun(layer, blobs, [x])
    np.testing.assert_allclose(y, conv_ref(x, blobs[0], blobs[1], stride, pad, dil, 1),
                               rtol=1e-10, atol=1e-10)


def test_convolution_axis_and_multiple_bottoms(conv_impl):
    # axis 2: the first two axes are batch axes; two bottoms share the weights.
    shape = (2, 2, 3, 5, 4)
    layer = make_layer("type: 'Convolution' convolution_param { num_output: 2 kernel_size: 2 "
                       "axis: 2 }", [shape, shape], tops=["t0", "t1"])
    assert layer.top_shapes == [(2, 2, 2, 4, 3)] * 2
    x0, x1 = rand(shape, 0), rand(shape, 5)
    blobs = _conv_blobs(layer)
    y0, y1 = jrun(layer, blobs, [x0, x1])
    for x, y in ((x0, y0), (x1, y1)):
        ref = conv_ref(x.reshape(4, 3, 5, 4), blobs[0], blobs[1], (1, 1), (0, 0), (1, 1), 1)
        np.testing.assert_allclose(y, ref.reshape(2, 2, 2, 4, 3), rtol=1e-10, atol=1e-10)


def test_convolution_by_hand(conv_impl):
    # A 2x2 all-ones kernel sums each 2x2 window; bias 1 is added.
    layer = make_layer("type: 'Convolution' convolution_param { num_output: 1 kernel_size: 2 }",
                       [(1, 1, 3, 3)])
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    (y,) = run(layer, [np.ones((1, 1, 2, 2)), np.ones(1)], [x])
    np.testing.assert_array_equal(y[0, 0], [[0 + 1 + 3 + 4 + 1, 1 + 2 + 4 + 5 + 1],
                                            [3 + 4 + 6 + 7 + 1, 4 + 5 + 7 + 8 + 1]])


@pytest.mark.parametrize("h,k,s,p,d,expect", [
    (28, 5, 1, 0, 1, 24), (227, 11, 4, 0, 1, 55), (7, 3, 2, 1, 1, 4), (7, 3, 2, 1, 2, 3),
    (6, 3, 2, 0, 1, 2), (5, 1, 1, 0, 1, 5),
])
def test_convolution_top_shape_rounds_down(h, k, s, p, d, expect):
    layer = make_layer(f"type: 'Convolution' convolution_param {{ num_output: 7 kernel_size: {k} "
                       f"stride: {s} pad: {p} dilation: {d} }}", [(3, 2, h, h + 1)])
    w_out = (h + 1 + 2 * p - (d * (k - 1) + 1)) // s + 1
    assert layer.top_shapes == [(3, 7, expect, w_out)]


@pytest.mark.parametrize("body,shape", [
    ("num_output: 6 kernel_size: 3 group: 2 pad: 1 stride: 2", (2, 4, 5, 5)),
    ("num_output: 2 kernel_h: 2 kernel_w: 3 dilation: 2 bias_term: false", (1, 2, 6, 7)),
])
def test_convolution_gradient(conv_impl, body, shape):
    layer = make_layer(f"type: 'Convolution' convolution_param {{ {body} }}", [shape])
    check_gradient(layer, _conv_blobs(layer), [rand(shape)], max_elems=25)


# ------------------------------------------------------------------------------------------
# Deconvolution
# ------------------------------------------------------------------------------------------

DECONV_CASES = [
    ("num_output: 3 kernel_size: 3 stride: 2 pad: 1", (2, 2, 3, 4), (3, 3), (2, 2), (1, 1), (1, 1), 1, True),
    ("num_output: 4 kernel_size: 2 stride: 2 group: 2", (1, 4, 3, 3), (2, 2), (2, 2), (0, 0), (1, 1), 2, True),
    ("num_output: 2 kernel_size: 3 dilation: 2 pad: 1", (1, 2, 3, 3), (3, 3), (1, 1), (1, 1), (2, 2), 1, True),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 bias_term: false",
     (1, 3, 3, 4), (3, 2), (2, 3), (1, 0), (1, 1), 1, False),
    # pad beyond the kernel extent: the output crops the scattered columns.
    ("num_output: 2 kernel_size: 1 stride: 3 pad: 1", (1, 2, 4, 4), (1, 1), (3, 3), (1, 1), (1, 1), 1, True),
]


@pytest.mark.parametrize("body,shape,kernel,stride,pad,dil,group,bias", DECONV_CASES)
def test_deconvolution_forward(conv_impl, body, shape, kernel, stride, pad, dil, group, bias):
    layer = make_layer(f"type: 'Deconvolution' convolution_param {{ {body} }}", [shape])
    assert layer.impl == conv_impl
    num_output = layer.num_output
    assert layer.blob_shapes[0] == (shape[1], num_output // group) + kernel
    x = rand(shape)
    blobs = _conv_blobs(layer)
    expect = deconv_ref(x, blobs[0], blobs[1] if bias else None, stride, pad, dil, group)
    (y,) = jrun(layer, blobs, [x])
    assert layer.top_shapes[0] == expect.shape == y.shape
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-10)


def test_deconvolution_is_transpose_of_convolution(conv_impl):
    # <conv(x), y> == <x, deconv(y)> with the same weight blob (no bias).
    conv = make_layer("type: 'Convolution' convolution_param { num_output: 4 kernel_size: 3 "
                      "stride: 2 pad: 1 group: 2 bias_term: false }", [(2, 2, 7, 7)])
    deconv = make_layer("type: 'Deconvolution' convolution_param { num_output: 2 kernel_size: 3 "
                        "stride: 2 pad: 1 group: 2 bias_term: false }", [conv.top_shapes[0]])
    assert deconv.top_shapes[0] == (2, 2, 7, 7)
    assert deconv.blob_shapes == conv.blob_shapes
    w = rand(conv.blob_shapes[0], 3)
    x, y = rand((2, 2, 7, 7), 1), rand(conv.top_shapes[0], 2)
    lhs = np.sum(jrun(conv, [w], [x])[0] * y)
    rhs = np.sum(x * jrun(deconv, [w], [y])[0])
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)


@pytest.mark.parametrize("h,k,s,p,d,expect", [(4, 4, 2, 1, 1, 8), (5, 3, 2, 1, 2, 11), (3, 1, 1, 0, 1, 3)])
def test_deconvolution_top_shape(h, k, s, p, d, expect):
    layer = make_layer(f"type: 'Deconvolution' convolution_param {{ num_output: 5 kernel_size: {k} "
                       f"stride: {s} pad: {p} dilation: {d} }}", [(2, 3, h, h)])
    assert layer.top_shapes == [(2, 5, expect, expect)]
    assert layer.blob_shapes == [(3, 5, k, k), (5,)]


def test_deconvolution_gradient(conv_impl):
    layer = make_layer("type: 'Deconvolution' convolution_param { num_output: 4 kernel_size: 3 "
                       "stride: 2 pad: 1 group: 2 }", [(1, 4, 3, 3)])
    check_gradient(layer, _conv_blobs(layer), [rand((1, 4, 3, 3))], max_elems=25)


# ------------------------------------------------------------------------------------------
# Convolution parameters: blobs, fillers, dtypes, jit, the formulation switch
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ltype", ["Convolution", "Deconvolution"])
def test_conv_fillers(ltype):
    layer = make_layer(f"type: '{ltype}' convolution_param {{ num_output: 6 kernel_size: 3 group: 2 "
                       "weight_filler { type: 'xavier' } bias_filler { type: 'constant' value: 0.25 } }",
                       [(2, 4, 5, 5)])
    w, b = layer.init(jax.random.key(0))
    assert w.dtype == b.dtype == jnp.float32
    expect_w = (6, 2, 3, 3) if ltype == "Convolution" else (4, 3, 3, 3)
    assert w.shape == expect_w and b.shape == (6,)
    fan_in = math.prod(expect_w[1:])
    bound = math.sqrt(3.0 / fan_in)
    w = np.asarray(w)
    assert np.all(np.abs(w) <= bound) and w.std() > bound / 4
    np.testing.assert_array_equal(np.asarray(b), np.full(6, 0.25, np.float32))
    # No filler given: Caffe's default constant 0; no bias blob without bias_term.
    plain = make_layer(f"type: '{ltype}' convolution_param {{ num_output: 2 kernel_size: 1 "
                       "bias_term: false }", [(1, 2, 3, 3)])
    (w0,) = plain.init(jax.random.key(0))
    assert w0.shape == (2, 2, 1, 1) and not np.any(np.asarray(w0))


@pytest.mark.parametrize("ltype", ["Convolution", "Deconvolution"])
def test_conv_keeps_dtype_and_jits(conv_impl, ltype):
    layer = make_layer(f"type: '{ltype}' convolution_param {{ num_output: 2 kernel_size: 3 "
                       "stride: 2 pad: 1 weight_filler { type: 'gaussian' } }", [(1, 2, 5, 5)])
    blobs = layer.init(jax.random.key(0))
    x = jnp.asarray(rand((1, 2, 5, 5)), jnp.float32)
    f = jax.jit(lambda b, x: layer.apply(b, [x], Context(train=True)))
    (y,) = f(blobs, x)
    assert y.dtype == jnp.float32 and y.shape == layer.top_shapes[0]
    (y64,) = jrun(layer, [np.asarray(b, np.float64) for b in blobs], [np.asarray(x, np.float64)])
    np.testing.assert_allclose(np.asarray(y), y64, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda b, x: jnp.sum(f(b, x)[0] ** 2), argnums=(0, 1)))(blobs, x)
    assert [g.dtype for g in grads[0]] == [jnp.float32] * 2 and grads[1].dtype == jnp.float32


def test_formulation_comes_from_the_config():
    body = "type: 'Convolution' convolution_param { num_output: 1 kernel_size: 1 }"
    pool = "type: 'Pooling' pooling_param { kernel_size: 2 }"
    # auto: oneDNN's kernels (im2col where they were not built) and slices on the CPU
    # backend, xla and reduce_window elsewhere.
    cpu, gpu = Config(platform="cpu"), Config(platform="gpu")
    cpu_conv = "onednn" if onednn.available().ok else "im2col"
    assert make_layer(body, [(1, 1, 2, 2)], config=cpu).impl == cpu_conv
    assert make_layer(pool, [(1, 1, 2, 2)], config=cpu).impl == "slices"
    assert make_layer(body, [(1, 1, 2, 2)], config=gpu).impl == "xla"
    assert make_layer(pool, [(1, 1, 2, 2)], config=gpu).impl == "reduce_window"
    assert make_layer(body, [(1, 1, 2, 2)], config=cpu.replace(conv="xla")).impl == "xla"
    assert make_layer(pool, [(1, 1, 2, 2)],
                      config=cpu.replace(pool="reduce_window")).impl == "reduce_window"
    with pytest.raises(JcaffeError, match="conv: unknown value 'winograd'"):
        Config(conv="winograd")
    with pytest.raises(JcaffeError, match="pool: unknown value 'fast'"):
        Config(pool="fast")


def test_config_from_the_environment():
    env = {"JCAFFE_CONV_IMPL": "xla", "JCAFFE_LAYOUT": "nchw", "JCAFFE_DATA_ON_DEVICE": "0"}
    c = Config.from_env(env)
    assert (c.conv, c.layout, c.data_on_device, c.pool) == ("xla", "NCHW", False, "auto")
    assert Config.from_env(env, conv="im2col").conv == "im2col"   # a flag wins
    with pytest.raises(JcaffeError, match="JCAFFE_CONV_IMPL: conv: unknown value 'winograd'"):
        Config.from_env({"JCAFFE_CONV_IMPL": "winograd"})
    with pytest.raises(JcaffeError, match="JCAFFE_DATA_ON_DEVICE: expected 0, 1 or auto"):
        Config.from_env({"JCAFFE_DATA_ON_DEVICE": "maybe"})


CONV_ERRORS = [
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5), "input channels \\(3\\) must be divisible by group \\(2\\)"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "num_output \\(3\\) must be divisible by group"),
    ("num_output: 2", (1, 1, 5, 5), "kernel_size .* is required"),
    ("kernel_size: 3", (1, 1, 5, 5), "num_output must be given"),
    ("num_output: 0 kernel_size: 3", (1, 1, 5, 5), "num_output must be given and positive"),
    ("num_output: 2 kernel_size: 0", (1, 1, 5, 5), "kernel size must be positive"),
    ("num_output: 2 kernel_h: 3", (1, 1, 5, 5), "kernel_h and kernel_w must be given together"),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 1, 5, 5), "either kernel_size or kernel_h"),
    ("num_output: 2 kernel_size: 1 kernel_size: 2 kernel_size: 3", (1, 1, 5, 5), "kernel_size must be given once"),
    ("num_output: 2 kernel_size: 3 stride: 0", (1, 1, 5, 5), "stride must be positive"),
    ("num_output: 2 kernel_size: 3 dilation: 0", (1, 1, 5, 5), "dilation must be positive"),
    ("num_output: 2 kernel_size: 3 pad: 1 pad_h: 1", (1, 1, 5, 5), "either pad or pad_h"),
    ("num_output: 2 kernel_h: 3 kernel_w: 3", (1, 1, 5, 5, 5), "kernel_h / kernel_w can only be used for 2-d"),
    ("num_output: 2 kernel_size: 7", (1, 1, 5, 5), "output would be empty"),
    ("num_output: 2 kernel_size: 1 axis: 3", (1, 1, 5, 5), "needs at least one spatial axis"),
    ("num_output: 2 kernel_size: 1 axis: 4", (1, 1, 5, 5), "axis 4 out of range"),
]


@pytest.mark.parametrize("body,shape,message", CONV_ERRORS)
def test_convolution_bad_input(body, shape, message):
    with pytest.raises(LayerError, match=f"layer 'layer' \\(type Convolution\\): .*{message}"):
        make_layer(f"type: 'Convolution' convolution_param {{ {body} }}", [shape])


def test_conv_bad_bottoms():
    with pytest.raises(LayerError, match="same shape"):
        make_layer("type: 'Convolution' convolution_param { num_output: 1 kernel_size: 1 }",
                   [(1, 1, 3, 3), (1, 1, 3, 4)], tops=["a", "b"])
    with pytest.raises(LayerError, match="one top per bottom"):
        make_layer("type: 'Convolution' convolution_param { num_output: 1 kernel_size: 1 }",
                   [(1, 1, 3, 3), (1, 1, 3, 3)], tops=["a"])
    with pytest.raises(LayerError, match="type Deconvolution.*divisible by group"):
        make_layer("type: 'Deconvolution' convolution_param { num_output: 2 kernel_size: 2 group: 2 }",
                   [(1, 3, 3, 3)])
    with pytest.raises(LayerError, match="type Deconvolution.*output would be empty"):
        make_layer("type: 'Deconvolution' convolution_param { num_output: 2 kernel_size: 1 pad: 1 }",
                   [(1, 2, 1, 3)])


# ------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------

# (pooling_param body without pool, bottom shape, kernel, stride, pad, ceil)
POOL_CASES = [
    ("kernel_size: 2 stride: 2", (2, 2, 6, 4), (2, 2), (2, 2), (0, 0), True),          # tiles
    ("kernel_size: 3 stride: 3", (1, 2, 6, 9), (3, 3), (3, 3), (0, 0), True),          # tiles
    ("kernel_size: 3 stride: 2", (1, 2, 7, 7), (3, 3), (2, 2), (0, 0), True),
    ("kernel_size: 3 stride: 2", (1, 2, 6, 6), (3, 3), (2, 2), (0, 0), True),          # overhang
    ("kernel_size: 3 stride: 2 round_mode: FLOOR", (1, 2, 6, 6), (3, 3), (2, 2), (0, 0), False),
    ("kernel_size: 3 stride: 2 pad: 1", (1, 2, 6, 6), (3, 3), (2, 2), (1, 1), True),
    ("kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (1, 2, 6, 6), (3, 3), (2, 2), (1, 1), False),
    ("kernel_size: 2 stride: 2 pad: 1", (1, 2, 5, 5), (2, 2), (2, 2), (1, 1), True),   # drops last
    ("kernel_size: 2 stride: 2", (1, 1, 5, 5), (2, 2), (2, 2), (0, 0), True),
    ("kernel_size: 3 stride: 1 pad: 1", (1, 2, 4, 5), (3, 3), (1, 1), (1, 1), True),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0", (1, 2, 7, 5), (3, 2), (2, 1), (1, 0), True),
    ("kernel_size: 3 stride: 2 pad_h: 2 pad_w: 1", (1, 1, 7, 6), (3, 3), (2, 2), (2, 1), True),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("body,shape,kernel,stride,pad,ceil", POOL_CASES)
def test_pooling_forward(pool_impl, method, body, shape, kernel, stride, pad, ceil):
    layer = make_layer(f"type: 'Pooling' pooling_param {{ pool: {method} {body} }}", [shape])
    assert layer.impl == pool_impl
    x = rand(shape)
    top, mask = pool_ref(x, method, kernel, stride, pad, ceil)
    (y,) = jrun(layer, [], [x])
    assert layer.top_shapes == [top.shape]
    np.testing.assert_allclose(y, top, rtol=1e-12, atol=1e-12)
    if method == "MAX":
        # With a second top: Caffe's argmax mask, float h*W + w in the unpadded input.
        masked = make_layer(f"type: 'Pooling' pooling_param {{ pool: MAX {body} }}", [shape],
                            tops=["out", "mask"])
        assert masked.top_shapes == [top.shape, top.shape]
        y, m = jrun(masked, [], [x])
        np.testing.assert_array_equal(y, top)
        assert m.dtype == x.dtype
        np.testing.assert_array_equal(m, mask)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(method):
    shape = (2, 3, 5, 4)
    layer = make_layer(f"type: 'Pooling' pooling_param {{ pool: {method} global_pooling: true }}",
                       [shape], tops=["out", "mask"] if method == "MAX" else None)
    assert layer.kernel == (5, 4)
    x = rand(shape)
    tops = jrun(layer, [], [x])
    assert layer.top_shapes[0] == (2, 3, 1, 1)
    if method == "MAX":
        np.testing.assert_array_equal(tops[0], x.max(axis=(2, 3), keepdims=True))
        np.testing.assert_array_equal(tops[1], x.reshape(2, 3, -1).argmax(-1).reshape(2, 3, 1, 1))
    else:
        np.testing.assert_allclose(tops[0], x.mean(axis=(2, 3), keepdims=True), rtol=1e-12)
    plain = make_layer(f"type: 'Pooling' pooling_param {{ pool: {method} global_pooling: true }}",
                       [(1, 2, 3, 3)])
    check_gradient(plain, [], [distinct((1, 2, 3, 3))], max_elems=20)


def test_pooling_by_hand(pool_impl):
    # 4x4 ramp, k3 s2 p1: MAX windows clip to the image (padding never wins, even over
    # negative values); AVE counts padding up to H + pad only.
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    mx = make_layer("type: 'Pooling' pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }",
                    [(1, 1, 4, 4)])
    np.testing.assert_array_equal(run(mx, [], [-x])[0][0, 0], -np.array([[0, 1, 3], [4, 5, 7], [12, 13, 15]]))
    av = make_layer("type: 'Pooling' pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }",
                    [(1, 1, 4, 4)])
    np.testing.assert_allclose(run(av, [], [x])[0][0, 0], AVE_4X4)
    # H=6, k3 s2 no pad, CEIL: the last window [4, 6) overhangs and is divided by its 2 rows.
    with pytest.raises(LayerError, match="kernel 3 is larger than the padded input width 1"):
        make_layer("type: 'Pooling' pooling_param { pool: AVE kernel_size: 3 stride: 2 }", [(1, 1, 6, 1)])
    av = make_layer("type: 'Pooling' pooling_param { pool: AVE kernel_h: 3 kernel_w: 1 stride: 2 }",
                    [(1, 1, 6, 1)])
    col = np.arange(6.0).reshape(1, 1, 6, 1)
    np.testing.assert_allclose(run(av, [], [col])[0][0, 0, :, 0], [1, 3, (4 + 5) / 2])


@pytest.mark.parametrize("h,k,s,p,mode,expect", [
    (6, 3, 2, 1, "CEIL", 4), (5, 2, 2, 1, "CEIL", 3), (7, 3, 2, 0, "CEIL", 3), (6, 3, 2, 0, "CEIL", 3),
    (6, 3, 2, 0, "FLOOR", 2), (6, 3, 2, 1, "FLOOR", 3), (5, 2, 2, 0, "CEIL", 3), (5, 2, 2, 0, "FLOOR", 2),
    (4, 4, 1, 0, "CEIL", 1), (13, 3, 2, 0, "CEIL", 6), (55, 3, 2, 0, "CEIL", 27), (24, 2, 2, 0, "CEIL", 12),
    (112, 3, 2, 0, "CEIL", 56), (7, 3, 3, 2, "CEIL", 3),
])
def test_pooling_top_shape(h, k, s, p, mode, expect):
    layer = make_layer(f"type: 'Pooling' pooling_param {{ kernel_size: {k} stride: {s} pad: {p} "
                       f"round_mode: {mode} }}", [(2, 3, h, h)])
    assert layer.top_shapes == [(2, 3, expect, expect)]


@pytest.mark.parametrize("body,shape", [
    ("kernel_size: 2 stride: 2", (1, 2, 4, 4)),
    ("kernel_size: 3 stride: 2 pad: 1", (1, 1, 5, 5)),
    ("kernel_size: 3 stride: 2", (1, 1, 6, 5)),
])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_gradient(pool_impl, method, body, shape):
    layer = make_layer(f"type: 'Pooling' pooling_param {{ pool: {method} {body} }}", [shape])
    check_gradient(layer, [], [distinct(shape)], max_elems=20)


@pytest.mark.parametrize("body", ["kernel_size: 2 stride: 2", "kernel_size: 3 stride: 1 pad: 1",
                                  "global_pooling: true"])
def test_max_pooling_ties_go_to_first(pool_impl, body):
    # Every value equal: Caffe's strict '>' scan keeps the first element of each window, and
    # the whole gradient of a window goes there.
    shape = (1, 1, 4, 4)
    layer = make_layer(f"type: 'Pooling' pooling_param {{ pool: MAX {body} }}", [shape])
    x = np.ones(shape)
    g = np.asarray(jax.jit(jax.grad(
        lambda x: jnp.sum(layer.apply([], [x], Context(train=True))[0])))(x))
    expect = np.zeros(shape)
    _, mask = pool_ref(x, "MAX", layer.kernel, layer.stride, layer.pad)
    for i in mask.reshape(-1).astype(int):
        expect.reshape(-1)[i] += 1
    np.testing.assert_array_equal(g, expect)
    masked = make_layer(f"type: 'Pooling' pooling_param {{ pool: MAX {body} }}", [shape],
                        tops=["out", "mask"])
    np.testing.assert_array_equal(run(masked, [], [x])[1], mask)


def test_pooling_keeps_dtype_and_jits(pool_impl):
    for method in ("MAX", "AVE"):
        layer = make_layer(f"type: 'Pooling' pooling_param {{ pool: {method} kernel_size: 3 stride: 2 "
                           "pad: 1 }", [(1, 2, 6, 6)])
        x = jnp.asarray(rand((1, 2, 6, 6)), jnp.float32)
        (y,) = jax.jit(lambda x: layer.apply([], [x], Context(train=False)))(x)
        assert y.dtype == jnp.float32
        g = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply([], [x], Context(train=True))[0])))(x)
        assert g.dtype == jnp.float32 and g.shape == x.shape
        np.testing.assert_allclose(np.asarray(y), pool_ref(np.asarray(x, np.float64), method, (3, 3),
                                                           (2, 2), (1, 1))[0], rtol=1e-6)


# -- STOCHASTIC -------------------------------------------------------------------------------

def test_stochastic_pooling_test_phase():
    shape = (2, 2, 5, 5)
    layer = make_layer("type: 'Pooling' pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }",
                       [shape], phase="TEST")
    x = np.abs(rand(shape))
    x[0, 0, :2, :2] = 0.0      # a window summing to 0 gives 0
    (y,) = jrun(layer, [], [x], train=False)
    np.testing.assert_allclose(y, stochastic_test_ref(x, (2, 2), (2, 2)), rtol=1e-12)
    assert y[0, 0, 0, 0] == 0.0
    check_gradient(layer, [], [np.abs(distinct(shape)) + 0.5], train=False, max_elems=20)


def test_stochastic_pooling_train_samples_by_value():
    # One 1x2 window per channel holding (1, 3): 3 is drawn with probability 3/4.
    c = 4000
    layer = make_layer("type: 'Pooling' pooling_param { pool: STOCHASTIC kernel_h: 1 kernel_w: 2 "
                       "stride: 2 }", [(1, c, 1, 2)])
    assert layer.needs_key
    x = np.tile(np.array([1.0, 3.0]), (1, c, 1, 1))
    (y,) = jrun(layer, [], [x], train=True, key=jax.random.key(7))
    assert set(np.unique(y)) == {1.0, 3.0}
    assert abs(np.mean(y == 3.0) - 0.75) < 0.04
    (y2,) = jrun(layer, [], [x], train=True, key=jax.random.key(8))
    assert np.any(y != y2)
    zero = jrun(layer, [], [np.zeros_like(x)], train=True)[0]
    assert not np.any(zero)


def test_stochastic_pooling_train_gradient_to_sample():
    shape = (1, 2, 5, 4)
    layer = make_layer("type: 'Pooling' pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }",
                       [shape])
    x = np.abs(distinct(shape)) + 0.1
    ctx = Context(train=True, key=jax.random.key(3))
    y = jrun(layer, [], [x], key=ctx.key)[0]
    g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(layer.apply([], [x], ctx)[0])))(x))
    # Each window passes its gradient to exactly the element it sampled (values are distinct).
    for n, ch, ph, pw in np.ndindex(*y.shape):
        win = (slice(2 * ph, 2 * ph + 2), slice(2 * pw, 2 * pw + 2))
        gw, xw = g[n, ch][win], x[n, ch][win]
        assert np.sum(gw) == 1 and np.count_nonzero(gw) == 1
        assert xw[gw == 1][0] == y[n, ch, ph, pw]
    with pytest.raises(LayerError, match="needs a PRNG key"):
        layer.apply([], [jnp.asarray(x)], Context(train=True, key=None))


# -- bad input --------------------------------------------------------------------------------

POOL_ERRORS = [
    ("kernel_size: 3 pad: 3", (1, 1, 6, 6), "pad \\[3, 3\\] must be smaller than the kernel"),
    ("kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2", (1, 1, 6, 6), "must be smaller than the kernel"),
    ("stride: 2", (1, 1, 6, 6), "kernel_size .* is required"),
    ("kernel_h: 3", (1, 1, 6, 6), "kernel_size \\(or both kernel_h and kernel_w\\) is required"),
    ("kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 1, 6, 6), "either kernel_size or kernel_h"),
    ("global_pooling: true kernel_size: 3", (1, 1, 6, 6), "global_pooling takes the kernel"),
    ("global_pooling: true stride: 2", (1, 1, 6, 6), "global_pooling allows only pad 0 and stride 1"),
    ("kernel_size: 0", (1, 1, 6, 6), "kernel size must be positive"),
    ("kernel_size: 2 stride: 0", (1, 1, 6, 6), "stride must be positive"),
    ("kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", (1, 1, 6, 6), "either pad or pad_h"),
    ("kernel_size: 2 pad_h: 1", (1, 1, 6, 6), "pad_h and pad_w must be given together"),
    ("kernel_size: 2 stride_w: 1", (1, 1, 6, 6), "stride_h and stride_w must be given together"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", (1, 1, 6, 6), "padding is implemented only for MAX and AVE"),
    ("kernel_size: 7", (1, 1, 6, 6), "kernel 7 is larger than the padded input height 6"),
    ("kernel_size: 1 stride: 3", (1, 1, 6, 6), "last pooling window along the height starts at 6"),
    ("kernel_size: 2", (1, 6, 6), "needs a 4-axis"),
]


@pytest.mark.parametrize("body,shape,message", POOL_ERRORS)
def test_pooling_bad_input(body, shape, message):
    with pytest.raises(LayerError, match=f"layer 'layer' \\(type Pooling\\): .*{message}"):
        make_layer(f"type: 'Pooling' pooling_param {{ {body} }}", [shape])


def test_pooling_bad_tops():
    with pytest.raises(LayerError, match="only MAX pooling can output a second"):
        make_layer("type: 'Pooling' pooling_param { pool: AVE kernel_size: 2 }", [(1, 1, 4, 4)],
                   tops=["a", "b"])
    with pytest.raises(LayerError, match="at most 2 top"):
        make_layer("type: 'Pooling' pooling_param { kernel_size: 2 }", [(1, 1, 4, 4)],
                   tops=["a", "b", "c"])


# ------------------------------------------------------------------------------------------
# LRN
# ------------------------------------------------------------------------------------------

LRN_CASES = [
    ("ACROSS_CHANNELS", 5, 1e-1, 0.75, 2.0, (2, 7, 3, 2)),
    ("ACROSS_CHANNELS", 3, 0.5, 0.6, 1.0, (1, 2, 2, 3)),      # window wider than the channels
    ("ACROSS_CHANNELS", 1, 0.3, 0.75, 1.5, (1, 3, 2, 2)),
    ("WITHIN_CHANNEL", 3, 0.5, 0.75, 7.0, (2, 2, 4, 5)),      # k is unused here
    ("WITHIN_CHANNEL", 5, 0.2, 0.5, 1.0, (1, 1, 3, 4)),
]


@pytest.mark.parametrize("region,size,alpha,beta,k,shape", LRN_CASES)
def test_lrn_forward(region, size, alpha, beta, k, shape):
    layer = make_layer(f"type: 'LRN' lrn_param {{ norm_region: {region} local_size: {size} "
                       f"alpha: {alpha} beta: {beta} k: {k} }}", [shape])
    x = 2 * rand(shape)
    (y,) = jrun(layer, [], [x])
    assert layer.top_shapes == [shape]
    # float32 proto fields: the reference uses the values as the layer reads them.
    a32, b32, k32 = (float(np.float32(v)) for v in (alpha, beta, k))
    np.testing.assert_allclose(y, lrn_ref(x, region, size, a32, b32, k32), rtol=1e-12)


def test_lrn_by_hand():
    # Defaults (size 5, alpha 1, beta 0.75, k 1) on one channel: y = x * (1 + x^2/5)^-0.75.
    layer = make_layer("type: 'LRN'", [(1, 1, 1, 2)])
    (y,) = run(layer, [], [np.array([[[[1.0, 2.0]]]])])
    np.testing.assert_allclose(y[0, 0, 0], [1.2 ** -0.75, 2 * 1.8 ** -0.75], rtol=1e-12)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn_gradient_and_dtype(region):
    shape = (1, 4, 3, 3)
    layer = make_layer(f"type: 'LRN' lrn_param {{ norm_region: {region} local_size: 3 alpha: 0.5 }}",
                       [shape])
    check_gradient(layer, [], [rand(shape)], max_elems=20)
    (y,) = layer.apply([], [jnp.asarray(rand(shape), jnp.float32)], Context(train=True))
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("body,shape,message", [
    ("lrn_param { local_size: 4 }", (1, 3, 2, 2), "local_size must be odd, got 4"),
    ("lrn_param { local_size: 0 }", (1, 3, 2, 2), "local_size must be odd, got 0"),
    ("", (3, 2, 2), "needs a 4-axis"),
])
def test_lrn_bad_input(body, shape, message):
    with pytest.raises(LayerError, match=f"layer 'layer' \\(type LRN\\): .*{message}"):
        make_layer(f"type: 'LRN' {body}", [shape])
