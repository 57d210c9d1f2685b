"""Common layers: top-shape rules (Caffe's Reshape methods, incl. its own test cases), forward
against numpy references, finite-difference gradients, and every bad-input check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe.errors import JcaffeError, LayerError
from jcaffe.layers.base import Context, known_types, layer_class
from jcaffe.proto import caffe_pb2
from tests.layer_utils import check_gradient, make_layer, run

def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def bad(text, shapes, match, **kw):
    with pytest.raises(LayerError, match=match) as e:
        make_layer(text, shapes, **kw)
    msg = str(e.value)
    assert msg.startswith("layer 'layer' (type ") and "\n" not in msg
    return msg


def test_types_registered():
    names = {"InnerProduct", "Softmax", "Concat", "Slice", "Split", "Eltwise", "Flatten", "Reshape",
             "Crop", "ArgMax", "Silence", "Reduction", "Tile", "Embed", "Input", "DummyData"}
    assert names <= set(known_types())


# -- InnerProduct -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis, transpose, bias", [
    ((2, 3, 2, 2), 1, False, True),
    ((2, 3, 2, 2), 1, True, True),
    ((2, 3, 4), 2, False, False),
    ((2, 3, 4), -1, True, True),
    ((3, 2, 2), 0, False, True),
])
def test_inner_product_forward(shape, axis, transpose, bias):
    text = (f'type: "InnerProduct" inner_product_param {{ num_output: 5 axis: {axis} '
            f'transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} }}')
    layer = make_layer(text, [shape])
    ax = axis % len(shape)
    M, K = int(np.prod(shape[:ax])), int(np.prod(shape[ax:]))
    assert layer.blob_shapes == [(K, 5) if transpose else (5, K)] + ([(5,)] if bias else [])
    assert layer.top_shapes == [shape[:ax] + (5,)]
    x = rand(*shape)
    blobs = [rand(*s, seed=i + 1) for i, s in enumerate(layer.blob_shapes)]
    w = blobs[0] if transpose else blobs[0].T
    expect = x.reshape(M, K) @ w + (blobs[1] if bias else 0)
    (y,) = run(layer, blobs, [x])
    np.testing.assert_allclose(y, expect.reshape(layer.top_shapes[0]), rtol=1e-12)
    (y32,) = run(layer, [b.astype(np.float32) for b in blobs], [x.astype(np.float32)])
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, expect.reshape(layer.top_shapes[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_gradient(transpose):
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 3 transpose: '
                       f'{str(transpose).lower()} }}', [(2, 2, 2)])
    blobs = [rand(*s, seed=i + 1) for i, s in enumerate(layer.blob_shapes)]
    check_gradient(layer, blobs, [rand(2, 2, 2)])


def test_inner_product_fillers():
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 4 '
                       'weight_filler { type: "constant" value: 0.5 } }', [(2, 3)])
    w, b = layer.init(jax.random.key(0))
    assert w.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w), np.full((4, 3), 0.5, np.float32))
    np.testing.assert_array_equal(np.asarray(b), np.zeros(4, np.float32))  # Caffe's default
    layer = make_layer('type: "InnerProduct" inner_product_param { num_output: 4 bias_term: false '
                       'weight_filler { type: "uniform" min: 2 max: 3 } }', [(2, 3)])
    (w,) = layer.init(jax.random.key(0))
    assert w.shape == (4, 3) and float(w.min()) >= 2 and float(w.max()) <= 3


def test_inner_product_bad():
    bad('type: "InnerProduct"', [(2, 3)], "num_output must be set")
    bad('type: "InnerProduct" inner_product_param { num_output: 0 }', [(2, 3)], "num_output")
    bad('type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }', [(2, 3)],
        "axis 3 out of range")


# -- Softmax ----------------------------------------------------------------------------------

def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 0, -1])
def test_softmax(axis):
    layer = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [(2, 3, 2)])
    x = rand(2, 3, 2) + 800.0  # overflows unless the max is subtracted
    (y,) = run(layer, [], [x])
    np.testing.assert_allclose(y, softmax_ref(x, axis), rtol=1e-12)
    check_gradient(layer, [], [rand(2, 3, 2)])


# -- Concat / Slice / Split -------------------------------------------------------------------

@pytest.mark.parametrize("param, shapes, axis", [
    ("", [(2, 3, 2), (2, 1, 2), (2, 2, 2)], 1),
    ("axis: 0", [(1, 3), (2, 3)], 0),
    ("axis: -1", [(2, 2), (2, 3)], 1),
    ("concat_dim: 0", [(1, 2, 2), (3, 2, 2)], 0),
    ("concat_dim: 2", [(1, 2, 2), (1, 2, 1)], 2),
])
def test_concat(param, shapes, axis):
    layer = make_layer(f'type: "Concat" concat_param {{ {param} }}', shapes)
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    expect = np.concatenate(xs, axis=axis)
    assert layer.top_shapes == [expect.shape]
    np.testing.assert_array_equal(run(layer, [], xs)[0], expect)
    check_gradient(layer, [], xs)


def test_concat_single_bottom():
    layer = make_layer('type: "Concat"', [(2, 3)])
    x = rand(2, 3)
    np.testing.assert_array_equal(run(layer, [], [x])[0], x)


def test_concat_bad():
    bad('type: "Concat"', [(2, 3, 4), (2, 3, 5)], "does not match bottom 0")
    bad('type: "Concat"', [(2, 3, 4), (2, 3)], "does not match bottom 0")
    bad('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 3), (2, 3)], "not both")
    bad('type: "Concat" concat_param { concat_dim: 2 }', [(2, 3), (2, 3)],
        "concat_dim 2 out of range")
    bad('type: "Concat" concat_param { axis: -3 }', [(2, 3), (2, 3)], "out of range")


@pytest.mark.parametrize("param, ntop, shape, axis, points", [
    ("slice_point: 1 slice_point: 3", 3, (2, 5, 2), 1, [1, 3]),
    ("", 3, (2, 6), 1, [2, 4]),
    ("slice_dim: 0", 2, (4, 3), 0, [2]),
    ("axis: -1 slice_point: 2", 2, (2, 3, 5), 2, [2]),
    ("", 1, (2, 3), 1, []),
])
def test_slice(param, ntop, shape, axis, points):
    layer = make_layer(f'type: "Slice" slice_param {{ {param} }}', [shape],
                       tops=[f"t{i}" for i in range(ntop)])
    x = rand(*shape)
    expect = np.split(x, points, axis=axis)
    assert layer.top_shapes == [e.shape for e in expect]
    tops = run(layer, [], [x])
    for t, e in zip(tops, expect):
        np.testing.assert_array_equal(t, e)
    check_gradient(layer, [], [x])


@pytest.mark.parametrize("param, ntop, match", [
    ("slice_point: 2", 3, "needs 2 slice_point"),
    ("slice_point: 3 slice_point: 2", 3, "strictly increasing"),
    ("slice_point: 0 slice_point: 2", 3, "strictly increasing"),
    ("slice_point: 5", 2, r"inside \(0, 5\)"),
    ("slice_point: 7", 2, r"inside \(0, 5\)"),
    ("", 2, "do not evenly divide"),
    ("axis: 1 slice_dim: 1", 2, "not both"),
    ("slice_dim: 3", 2, "slice_dim 3 out of range"),
])
def test_slice_bad(param, ntop, match):
    bad(f'type: "Slice" slice_param {{ {param} }}', [(2, 5, 2)], match,
        tops=[f"t{i}" for i in range(ntop)])


def test_split():
    layer = make_layer('type: "Split"', [(2, 3)], tops=["a", "b", "c"])
    assert layer.top_shapes == [(2, 3)] * 3
    x = rand(2, 3)
    for t in run(layer, [], [x]):
        np.testing.assert_array_equal(t, x)
    check_gradient(layer, [], [x])  # the bottom's gradient sums the three tops'


# -- Eltwise ----------------------------------------------------------------------------------

def caffe_eltwise_max_mask(xs):
    """Caffe's forward: a > b picks 0, else 1; later bottoms take over only when greater."""
    mask = np.where(xs[0] > xs[1], 0, 1)
    top = np.maximum(xs[0], xs[1])
    for i, x in enumerate(xs[2:], 2):
        mask = np.where(x > top, i, mask)
        top = np.maximum(top, x)
    return mask


@pytest.mark.parametrize("param, ref", [
    ("operation: PROD", lambda xs: xs[0] * xs[1] * xs[2]),
    ("operation: SUM", lambda xs: xs[0] + xs[1] + xs[2]),
    ("", lambda xs: xs[0] + xs[1] + xs[2]),
    ("operation: SUM coeff: 1 coeff: -2 coeff: 0.5", lambda xs: xs[0] - 2 * xs[1] + 0.5 * xs[2]),
    ("operation: MAX", lambda xs: np.maximum(np.maximum(xs[0], xs[1]), xs[2])),
])
def test_eltwise(param, ref):
    shapes = [(2, 3, 2)] * 3
    layer = make_layer(f'type: "Eltwise" eltwise_param {{ {param} }}', shapes)
    xs = [rand(2, 3, 2, seed=i) for i in range(3)]
    assert layer.top_shapes == [(2, 3, 2)]
    np.testing.assert_allclose(run(layer, [], xs)[0], ref(xs), rtol=1e-12)
    check_gradient(layer, [], xs)


def test_eltwise_prod_gradient_with_zero():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: PROD }', [(3,)] * 2)
    a, b = jnp.asarray([0.0, 2.0, -1.0]), jnp.asarray([3.0, 0.0, 4.0])
    ga, gb = jax.grad(lambda a, b: jnp.sum(layer.apply([], [a, b], Context(True))[0]),
                      argnums=(0, 1))(a, b)
    np.testing.assert_array_equal(np.asarray(ga), b)
    np.testing.assert_array_equal(np.asarray(gb), a)


def test_eltwise_max_ties_follow_caffe():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', [(5,)] * 3)
    xs = [np.array([1.0, 0.0, 2.0, 5.0, 1.0]),
          np.array([1.0, 3.0, 1.0, 5.0, 1.0]),
          np.array([0.0, 3.0, 2.0, 5.0, 1.0])]
    mask = caffe_eltwise_max_mask(xs)
    # Ties: 0 vs 1 -> bottom 1; 1 vs 2 -> bottom 1; 0 vs 2 -> bottom 0; all equal -> bottom 1.
    np.testing.assert_array_equal(mask, [1, 1, 0, 1, 1])
    w = np.arange(1.0, 6.0)
    grads = jax.grad(lambda *b: jnp.sum(layer.apply([], list(b), Context(True))[0] * w),
                     argnums=(0, 1, 2))(*[jnp.asarray(x) for x in xs])
    for i, g in enumerate(grads):
        np.testing.assert_array_equal(np.asarray(g), w * (mask == i))


def test_eltwise_bad():
    bad('type: "Eltwise"', [(2, 3), (2, 4)], r"bottom 1 \[2, 4\] differs")
    bad('type: "Eltwise" eltwise_param { coeff: 1 }', [(2, 3), (2, 3)], "one coeff per bottom")
    bad('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [(2, 3), (2, 3)],
        "SUM only")
    with pytest.raises(JcaffeError, match="at least 2 bottom"):
        make_layer('type: "Eltwise"', [(2, 3)])


# -- Flatten / Reshape ------------------------------------------------------------------------

@pytest.mark.parametrize("param, top", [
    ("", (2, 60)),
    ("axis: 2", (2, 3, 20)),
    ("axis: 1 end_axis: 2", (2, 12, 5)),
    ("axis: 0 end_axis: -2", (24, 5)),
    ("axis: -1", (2, 3, 4, 5)),
])
def test_flatten(param, top):
    layer = make_layer(f'type: "Flatten" flatten_param {{ {param} }}', [(2, 3, 4, 5)])
    assert layer.top_shapes == [top]
    x = rand(2, 3, 4, 5)
    np.testing.assert_array_equal(run(layer, [], [x])[0], x.reshape(top))


def test_flatten_gradient_and_bad():
    layer = make_layer('type: "Flatten"', [(2, 2, 3)])
    check_gradient(layer, [], [rand(2, 2, 3)])
    bad('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [(2, 3, 4)], "comes before")
    bad('type: "Flatten" flatten_param { axis: 3 }', [(2, 3, 4)], "out of range")


# Caffe's test_reshape_layer.cpp cases, on its (2, 3, 6, 5) bottom.
@pytest.mark.parametrize("param, top", [
    ("shape { dim: 0 dim: -1 dim: 1 dim: 1 }", (2, 90, 1, 1)),              # FlattenOutputSizes
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5)),                # CopyDimensions
    ("shape { dim: 0 dim: 3 dim: 10 dim: -1 }", (2, 3, 10, 3)),             # InferenceOfUnspecified
    ("axis: 1 shape { dim: 3 dim: 10 dim: -1 }", (2, 3, 10, 3)),            # ...WithStartAxis
    ("axis: 0 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (1, 1, 1, 2, 3, 6, 5)),  # SingletonStart
    ("axis: 2 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 1, 1, 1, 6, 5)),  # ...Middle
    ("axis: -1 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 6, 5, 1, 1, 1)),  # ...End
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 18, 5)),                   # FlattenMiddle
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (6, 2, 3, 5)),                 # Forward
    # A negative axis counts from past the end: -2 starts at axis 3, -3 at axis 2.
    ("axis: -2 num_axes: 1 shape { dim: -1 dim: 5 }", (2, 3, 6, 1, 5)),
    ("axis: -3 num_axes: 1 shape { dim: 2 dim: 3 }", (2, 3, 2, 3, 5)),
    ("axis: 1 num_axes: 1 shape { dim: 0 }", (2, 3, 6, 5)),
    ("shape { dim: -1 }", (180,)),
])
def test_reshape_shapes_and_values(param, top):
    layer = make_layer(f'type: "Reshape" reshape_param {{ {param} }}', [(2, 3, 6, 5)])
    assert layer.top_shapes == [top]
    x = rand(2, 3, 6, 5)
    # Reshape never reorders: the top holds the bottom's values in the same (row-major) order.
    np.testing.assert_array_equal(run(layer, [], [x])[0], x.reshape(top))


def test_reshape_gradient():
    layer = make_layer('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }', [(2, 3, 2)])
    assert layer.top_shapes == [(6, 2)]
    check_gradient(layer, [], [rand(2, 3, 2)])


@pytest.mark.parametrize("param, match", [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 7 dim: 3 }", "count 21, but the bottom's count is 180"),
    ("shape { dim: 7 dim: -1 }", "not divisible by 7"),
    ("shape { dim: 0 dim: -3 }", "below -1"),
    ("axis: -1 num_axes: 0 shape { dim: 0 }", "no axis 4 to copy"),
    ("axis: 5 shape { dim: 1 }", "axis 5 out of range"),
    ("axis: -6 shape { dim: 1 }", "axis -6 out of range"),
    ("num_axes: -2 shape { dim: 1 }", "num_axes must be >= 0"),
    ("axis: 2 num_axes: 3 shape { dim: -1 }", "past the bottom's 4 axes"),
])
def test_reshape_bad(param, match):
    bad(f'type: "Reshape" reshape_param {{ {param} }}', [(2, 3, 6, 5)], match)


# -- Crop -------------------------------------------------------------------------------------

@pytest.mark.parametrize("param, ref_shape, index", [
    ("", (2, 3, 4, 5), np.s_[:, :, 0:4, 0:5]),
    ("offset: 2", (2, 3, 4, 5), np.s_[:, :, 2:6, 2:7]),
    ("offset: 1 offset: 3", (1, 1, 4, 5), np.s_[:, :, 1:5, 3:8]),
    ("axis: 1 offset: 1 offset: 0 offset: 2", (9, 2, 6, 3), np.s_[:, 1:3, 0:6, 2:5]),
    ("axis: -1 offset: 4", (2, 3, 6, 4), np.s_[:, :, :, 4:8]),
    ("axis: 0", (1, 2, 3, 4), np.s_[0:1, 0:2, 0:3, 0:4]),
])
def test_crop(param, ref_shape, index):
    src = (2, 3, 6, 8)
    layer = make_layer(f'type: "Crop" crop_param {{ {param} }}', [src, ref_shape])
    x = rand(*src)
    expect = x[index]
    assert layer.top_shapes == [expect.shape]
    np.testing.assert_array_equal(run(layer, [], [x, rand(*ref_shape)])[0], expect)


def test_crop_gradient_goes_to_bottom0_only():
    layer = make_layer('type: "Crop" crop_param { offset: 1 }', [(1, 2, 4, 4), (1, 2, 2, 3)])
    x, ref = rand(1, 2, 4, 4), rand(1, 2, 2, 3)
    check_gradient(layer, [], [x, ref], check_bottoms=[0])
    g = jax.grad(lambda a, b: jnp.sum(layer.apply([], [a, b], Context(True))[0]), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(ref))
    expect = np.zeros_like(x)
    expect[:, :, 1:3, 1:4] = 1
    np.testing.assert_array_equal(np.asarray(g[0]), expect)
    np.testing.assert_array_equal(np.asarray(g[1]), np.zeros_like(ref))


@pytest.mark.parametrize("param, ref_shape, match", [
    ("", (2, 3, 7, 8), "axis 2 to size 7 at offset 0 is out of bounds"),
    ("offset: 3", (2, 3, 4, 5), "axis 2 to size 4 at offset 3 is out of bounds"),
    ("offset: 0 offset: 4", (2, 3, 4, 5), "axis 3 to size 5 at offset 4 is out of bounds"),
    ("offset: 1 offset: 1 offset: 1", (2, 3, 4, 5), "gives 3 offsets"),
    ("axis: 4", (2, 3, 4, 5), "axis 4 out of range"),
    ("", (2, 3, 4), "fewer than bottom 0's 4"),
])
def test_crop_bad(param, ref_shape, match):
    bad(f'type: "Crop" crop_param {{ {param} }}', [(2, 3, 6, 8), ref_shape], match)


# -- ArgMax -----------------------------------------------------------------------------------

def argmax_ref(x, top_k, out_max_val, axis=None):
    """Caffe's algorithm: sort (value, index) pairs descending per item."""
    if axis is None:
        flat = x.reshape(x.shape[0], -1)
        rows = []
        for r in flat:
            pairs = sorted(((v, j) for j, v in enumerate(r)), reverse=True)[:top_k]
            idx = [float(j) for _, j in pairs]
            rows.append(idx + [v for v, _ in pairs] if out_max_val else idx)
        return np.array(rows)
    moved = np.moveaxis(x, axis, -1)
    out = np.empty(moved.shape[:-1] + (top_k,))
    for pos in np.ndindex(moved.shape[:-1]):
        pairs = sorted(((v, j) for j, v in enumerate(moved[pos])), reverse=True)[:top_k]
        out[pos] = [v if out_max_val else j for v, j in pairs]
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("param, shape, top, axis", [
    ("", (3, 5), (3, 1, 1), None),
    ("top_k: 3", (2, 3, 2, 2), (2, 1, 3, 1), None),
    ("out_max_val: true", (3, 5), (3, 2, 1), None),
    ("out_max_val: true top_k: 2", (2, 2, 3), (2, 2, 2), None),
    ("axis: 1", (2, 4, 3), (2, 1, 3), 1),
    ("axis: -1 top_k: 2", (2, 4, 3), (2, 4, 2), 2),
    ("axis: 0 top_k: 2 out_max_val: true", (3, 2, 2), (2, 2, 2), 0),
])
def test_argmax(param, shape, top, axis):
    layer = make_layer(f'type: "ArgMax" argmax_param {{ {param} }}', [shape])
    assert layer.top_shapes == [top]
    # Few distinct values, so ties are common: Caffe ranks the higher index first.
    x = np.random.default_rng(1).integers(0, 3, shape).astype(np.float32)
    p = layer.param.argmax_param
    (y,) = run(layer, [], [x])
    assert y.dtype == np.float32
    expect = argmax_ref(x, p.top_k, p.out_max_val, axis)
    np.testing.assert_array_equal(y, expect.reshape(top))


def test_argmax_ties_and_no_gradient():
    layer = make_layer('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [(1, 5)])
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]])
    np.testing.assert_array_equal(run(layer, [], [x])[0], [[[4, 2, 1], [3, 3, 3]]])
    g = jax.grad(lambda b: jnp.sum(layer.apply([], [b], Context(True))[0]))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), np.zeros_like(x))


@pytest.mark.parametrize("param, match", [
    ("top_k: 5 axis: 1", "top_k 5 exceeds the size 4 of axis 1"),
    ("top_k: 13", "top_k 13 exceeds the 12 values"),
    ("top_k: 0", "at least 1"),
    ("axis: 3", "axis 3 out of range"),
])
def test_argmax_bad(param, match):
    bad(f'type: "ArgMax" argmax_param {{ {param} }}', [(2, 4, 3)], match)


# -- Silence ----------------------------------------------------------------------------------

def _silence(ntops):
    lp = text_format.Parse('name: "s" type: "Silence" bottom: "a" bottom: "b"',
                           caffe_pb2.LayerParameter())
    lp.top.extend([f"t{i}" for i in range(ntops)])
    return layer_class(lp)(lp, [(2, 3), (4,)])


def test_silence():
    layer = _silence(0)
    assert layer.top_shapes == []
    assert layer.apply([], [jnp.ones((2, 3)), jnp.ones(4)], Context(True)) == []
    with pytest.raises(JcaffeError, match="exactly 0 top"):
        _silence(1)


# -- Reduction --------------------------------------------------------------------------------

REDUCE = {"SUM": lambda v: v.sum(-1), "ASUM": lambda v: np.abs(v).sum(-1),
          "SUMSQ": lambda v: (v * v).sum(-1), "MEAN": lambda v: v.mean(-1)}


@pytest.mark.parametrize("op", list(REDUCE))
@pytest.mark.parametrize("axis, coeff", [(0, 1.0), (1, 2.5), (-1, -0.5), (2, 1.0)])
def test_reduction(op, axis, coeff):
    shape = (2, 3, 4)
    layer = make_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} '
                       f'coeff: {coeff} }}', [shape])
    ax = axis % 3
    assert layer.top_shapes == [shape[:ax]]
    x = rand(*shape)
    expect = coeff * REDUCE[op](x.reshape(shape[:ax] + (-1,)))
    (y,) = run(layer, [], [x])
    np.testing.assert_allclose(y, expect, rtol=1e-12)


@pytest.mark.parametrize("op", list(REDUCE))
def test_reduction_gradient(op):
    layer = make_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 '
                       'coeff: 1.5 }', [(2, 3, 2)])
    x = rand(2, 3, 2)
    x = np.where(np.abs(x) < 0.1, 0.5, x)  # ASUM's kink
    check_gradient(layer, [], [x])


def test_reduction_asum_gradient_at_zero_is_zero():
    layer = make_layer('type: "Reduction" reduction_param { operation: ASUM }', [(3,)])
    g = jax.grad(lambda b: layer.apply([], [b], Context(True))[0])(jnp.asarray([-2.0, 0.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(g), [-1.0, 0.0, 1.0])


def test_reduction_bad():
    bad('type: "Reduction" reduction_param { axis: 3 }', [(2, 3, 4)], "axis 3 out of range")


# -- Tile -------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis, tiles", [(1, 3), (0, 2), (-1, 2)])
def test_tile(axis, tiles):
    layer = make_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', [(2, 3, 2)])
    x = rand(2, 3, 2)
    reps = [1, 1, 1]
    reps[axis] = tiles
    expect = np.tile(x, reps)
    assert layer.top_shapes == [expect.shape]
    np.testing.assert_array_equal(run(layer, [], [x])[0], expect)
    check_gradient(layer, [], [x])


def test_tile_bad():
    bad('type: "Tile"', [(2, 3)], "tiles must be given")
    bad('type: "Tile" tile_param { tiles: 0 }', [(2, 3)], "must be positive")
    bad('type: "Tile" tile_param { tiles: -2 }', [(2, 3)], "must be positive")


# -- Embed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_embed(bias):
    layer = make_layer(f'type: "Embed" embed_param {{ num_output: 3 input_dim: 5 '
                       f'bias_term: {str(bias).lower()} }}', [(2, 3)])
    assert layer.blob_shapes == [(5, 3)] + ([(3,)] if bias else [])
    assert layer.top_shapes == [(2, 3, 3)]
    blobs = [rand(*s, seed=i + 1) for i, s in enumerate(layer.blob_shapes)]
    # Float indices are truncated (Caffe's static_cast<int>); out-of-range ones are clamped.
    x = np.array([[0.0, 4.0, 2.7], [1.2, 9.0, -3.0]])
    idx = np.array([[0, 4, 2], [1, 4, 0]])
    expect = blobs[0][idx] + (blobs[1] if bias else 0)
    (y,) = run(layer, blobs, [x])
    np.testing.assert_allclose(y, expect, rtol=1e-12)
    (y32,) = run(layer, [b.astype(np.float32) for b in blobs], [x.astype(np.float32)])
    assert y32.dtype == np.float32
    check_gradient(layer, blobs, [x], check_bottoms=[])


def test_embed_weight_gradient_accumulates_repeats():
    layer = make_layer('type: "Embed" embed_param { num_output: 2 input_dim: 3 bias_term: false }',
                       [(4,)])
    w = jnp.zeros((3, 2))
    x = jnp.asarray([1.0, 1.0, 2.0, 1.0])
    g = jax.grad(lambda w: jnp.sum(layer.apply([w], [x], Context(True))[0]))(w)
    np.testing.assert_array_equal(np.asarray(g), [[0, 0], [3, 3], [1, 1]])


def test_embed_init_and_bad():
    layer = make_layer('type: "Embed" embed_param { num_output: 2 input_dim: 3 '
                       'weight_filler { type: "constant" value: 1 } }', [(4,)])
    w, b = layer.init(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(w), np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(b), np.zeros(2, np.float32))
    bad('type: "Embed" embed_param { input_dim: 3 }', [(4,)], "num_output must be set")
    bad('type: "Embed" embed_param { num_output: 3 }', [(4,)], "input_dim must be set")


# -- Input / DummyData ------------------------------------------------------------------------

def test_input():
    layer = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } }', [],
                       tops=["data", "label"])
    assert type(layer).is_data
    assert layer.top_shapes == [(2, 3), (2, 3)]
    assert layer.input_specs() == [("data", (2, 3), jnp.float32), ("label", (2, 3), jnp.float32)]
    a, b = rand(2, 3), rand(2, 3, seed=1)
    out = run(layer, [], [a, b])
    np.testing.assert_array_equal(out[0], a)
    np.testing.assert_array_equal(out[1], b)
    layer = make_layer('type: "Input" input_param { shape { dim: 4 dim: 1 dim: 2 dim: 2 } '
                       'shape { dim: 4 } }', [], tops=["data", "label"])
    assert layer.top_shapes == [(4, 1, 2, 2), (4,)]


def test_input_bad():
    bad('type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } shape { dim: 3 } }', [],
        "gives 3 shapes for 2 tops", tops=["a", "b"])
    bad('type: "Input"', [], "needs a shape")
    bad('type: "Input" input_param { shape { dim: 2 dim: -1 } }', [], "negative dim")


def test_dummy_data_constant():
    layer = make_layer('type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                       'shape { dim: 4 } data_filler { type: "constant" value: 3 } }', [],
                       tops=["a", "b"])
    assert not layer.needs_key
    assert layer.top_shapes == [(2, 3), (4,)]
    a, b = layer.apply([], [], Context(train=False, key=None))
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(np.asarray(b), np.full((4,), 3.0))


def test_dummy_data_legacy_dims_default_zero():
    layer = make_layer('type: "DummyData" dummy_data_param { num: 2 channels: 3 channels: 1 '
                       'height: 4 width: 5 }', [], tops=["a", "b"])
    assert layer.top_shapes == [(2, 3, 4, 5), (2, 1, 4, 5)]
    assert not layer.needs_key
    for t in run(layer, [], []):
        np.testing.assert_array_equal(t, 0)


def test_dummy_data_random_fillers():
    layer = make_layer('type: "DummyData" dummy_data_param { shape { dim: 100 dim: 100 } '
                       'data_filler { type: "gaussian" std: 2 } }', [], tops=["a", "b"])
    assert layer.needs_key
    a, b = run(layer, [], [], key=jax.random.key(5))
    a2, _ = run(layer, [], [], key=jax.random.key(5))
    a3, _ = run(layer, [], [], key=jax.random.key(6))
    np.testing.assert_array_equal(a, a2)       # deterministic given the key
    assert not np.array_equal(a, b)            # one key per top
    assert not np.array_equal(a, a3)           # redrawn with a new key
    assert abs(a.mean()) < 0.1 and abs(a.std() - 2.0) < 0.1
    with pytest.raises(LayerError, match="PRNG key"):
        layer.apply([], [], Context(train=True, key=None))


def test_dummy_data_refills_in_either_phase():
    # Caffe's DummyDataLayer refills a non-constant top at every Forward, whatever the phase:
    # applied with train=False it draws from the key, and without one the error says so.
    layer = make_layer('type: "DummyData" dummy_data_param { shape { dim: 20 dim: 20 } '
                       'data_filler { type: "uniform" min: 1 max: 2 } }', [], phase="TEST",
                       tops=["a"])
    a1, = run(layer, [], [], train=False, key=jax.random.key(1))
    a2, = run(layer, [], [], train=False, key=jax.random.key(2))
    assert 1 <= a1.min() and a1.max() <= 2 and not np.array_equal(a1, a2)
    with pytest.raises(LayerError) as e:
        layer.apply([], [], Context(train=False, key=None))
    msg = str(e.value)
    assert "training mode" not in msg
    assert "refill its randomly filled tops (fillers uniform)" in msg
    assert "either phase" in msg and "train=False" in msg and "key=" in msg


def test_dummy_data_filler_per_top():
    layer = make_layer('type: "DummyData" dummy_data_param { shape { dim: 50 dim: 40 } '
                       'data_filler { type: "constant" value: -1 } '
                       'data_filler { type: "uniform" min: 2 max: 4 } }', [], tops=["a", "b"])
    a, b = run(layer, [], [], key=jax.random.key(0))
    np.testing.assert_array_equal(a, -1)
    assert b.min() >= 2 and b.max() <= 4 and abs(b.mean() - 3) < 0.1


@pytest.mark.parametrize("param, ntop, match", [
    ("shape { dim: 2 } num: 2 channels: 1 height: 1 width: 1", 1, "both shape and the legacy"),
    ("shape { dim: 2 } shape { dim: 3 }", 3, "gives 2 shapes for 3 tops"),
    ("num: 2 num: 3 channels: 1 height: 1 width: 1", 3, "gives num 2 times"),
    ("num: 2 height: 1 width: 1", 1, "gives channels 0 times"),
    ("shape { dim: 2 } data_filler {} data_filler {}", 3, "2 data_fillers for 3 tops"),
    ("shape { dim: 2 } data_filler { type: 'nope' }", 1, None),
    ("shape { dim: 2 dim: 2 } data_filler { type: 'bilinear' }", 1, None),
])
def test_dummy_data_bad(param, ntop, match):
    tops = [f"t{i}" for i in range(ntop)]
    if match is None:  # a filler's own error, raised at build time and naming the layer
        with pytest.raises(JcaffeError, match="layer 'layer'"):
            make_layer(f'type: "DummyData" dummy_data_param {{ {param} }}', [], tops=tops)
    else:
        bad(f'type: "DummyData" dummy_data_param {{ {param} }}', [], match, tops=tops)


# -- jit and dtype ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, shapes, nblobs", [
    ('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [(2, 3, 2)], 0),
    ('type: "Crop" crop_param { axis: 1 offset: 1 }', [(2, 4, 4), (2, 2, 3)], 0),
    ('type: "Embed" embed_param { num_output: 2 input_dim: 3 }', [(4,)], 2),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)], 0),
    ('type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3)] * 3, 0),
    ('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 }', [(2, 3)], 0),
    ('type: "InnerProduct" inner_product_param { num_output: 2 }', [(2, 3)], 2),
])
def test_jit_matches_eager_and_keeps_float32(text, shapes, nblobs):
    layer = make_layer(text, shapes)
    blobs = [jnp.asarray(rand(*s, seed=9), jnp.float32) for s in layer.blob_shapes]
    assert len(blobs) == nblobs
    bottoms = [jnp.asarray(np.abs(rand(*s, seed=i)) * 2, jnp.float32) for i, s in enumerate(shapes)]
    ctx = Context(train=True, key=jax.random.key(0))
    eager = layer.apply(blobs, bottoms, ctx)
    jitted = jax.jit(lambda bl, bo: layer.apply(bl, bo, ctx))(blobs, bottoms)
    for e, j, s in zip(eager, jitted, layer.top_shapes):
        assert e.dtype == j.dtype == jnp.float32 and e.shape == s
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-6)


# -- Parameter, BatchReindex, Filter ----------------------------------------------------------
def test_parameter_layer_exposes_its_blob():
    layer = make_layer('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [],
                       bottoms=[])
    assert layer.blob_shapes == [(2, 3)] and layer.top_shapes == [(2, 3)]
    init = layer.init(jax.random.key(0))
    np.testing.assert_array_equal(init[0], np.zeros((2, 3)))  # a fresh Caffe Blob is zero
    w = rand(2, 3)
    np.testing.assert_array_equal(run(layer, [w], [])[0], w)
    check_gradient(layer, [w], [])


def test_parameter_layer_learns_in_a_net():
    from jcaffe.net import Net

    net = Net(text_format.Parse("""
        layer { name: "p" type: "Parameter" top: "w" parameter_param { shape { dim: 3 } } }
        layer { name: "in" type: "Input" top: "t" input_param { shape { dim: 3 } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "w" bottom: "t" top: "loss" }
        """, caffe_pb2.NetParameter()), "TRAIN", verbose=False)
    params = net.init(jax.random.key(0))
    t = np.array([1.0, -2.0, 0.5], np.float32)
    g = jax.grad(lambda p: net.loss(p, {"t": t})[0])(params)
    # EuclideanLoss = sum((w - t)^2) / (2 N) with N = 3 (the first axis): d/dw = (w - t) / 3.
    np.testing.assert_allclose(g["p"][0], (0 - t) / 3, rtol=1e-6)


def np_batch_reindex(x, index):
    return np.stack([x[int(i)] for i in index])


def test_batch_reindex_gathers_and_scatter_adds():
    x = rand(4, 2, 3)
    index = np.array([3.0, 0.0, 3.0, 1.7, 2.0])  # 1.7 truncates to 1, as static_cast<int>
    layer = make_layer('type: "BatchReindex"', [x.shape, index.shape])
    assert layer.top_shapes == [(5, 2, 3)]
    np.testing.assert_array_equal(run(layer, [], [x, index])[0], np_batch_reindex(x, index))
    check_gradient(layer, [], [x, index], check_bottoms=[0])
    # Hand-computed scatter-add: item 3 is picked twice, item 2 once, item 1 once, 0 once.
    with jax.enable_x64(True):
        g = jax.grad(lambda a: jnp.sum(layer.apply([], [a, jnp.asarray(index)],
                                                   Context(train=True))[0]))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g)[:, 0, 0], [1, 1, 1, 2])


def test_batch_reindex_out_of_range_is_nan():
    x = rand(3, 2)
    layer = make_layer('type: "BatchReindex"', [x.shape, (2,)])
    top = run(layer, [], [x, np.array([1.0, 3.0])])[0]
    np.testing.assert_array_equal(top[0], x[1])
    assert np.all(np.isnan(top[1]))


def test_batch_reindex_bad_input():
    bad('type: "BatchReindex"', [(4, 2), (2, 1)], "the index bottom must have 1 axis")


def test_filter_is_rejected_with_the_reason():
    msg = bad('type: "Filter"', [(4, 3), (4, 1)], "not supported: its output batch size is the "
              "number of nonzero selectors")
    assert "ignore_label" in msg
    bad('type: "Filter" top: "a" top: "b"', [(4, 3), (4, 1)], "needs one top per data bottom")
