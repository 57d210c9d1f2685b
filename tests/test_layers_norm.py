"""BatchNorm, Scale, Bias and MVN against numpy re-implementations of Caffe's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcaffe.errors import JcaffeError, LayerError
from jcaffe.layers.base import Context
from layer_utils import check_gradient, make_layer, run

CTX = Context(train=True, key=jax.random.key(0))


def apply_full(layer, blobs, bottoms):
    """(tops, new_blobs) of a stateful layer, as numpy."""
    tops, new = layer.apply([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms], CTX)
    return [np.asarray(t) for t in tops], [np.asarray(b) for b in new]


# -- BatchNorm -----------------------------------------------------------------------------

def ref_bn_batch(x, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps), mean, var


def ref_bn_backward_batch(x, dy, eps):
    """Caffe's Backward_cpu: (dy - mean(dy) - mean(dy*y)*y) / sqrt(var + eps)."""
    y, _, var = ref_bn_batch(x, eps)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    m = lambda v: v.mean(axis=axes).reshape(shape)
    return (dy - m(dy) - m(dy * y) * y) / np.sqrt(var.reshape(shape) + eps)


def test_batchnorm_batch_mode_and_running_sums():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((3, 2, 2, 2)) * 2 + 1
    x2 = rng.standard_normal((3, 2, 2, 2)) - 3
    layer = make_layer('type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }',
                       [x1.shape], phase="TRAIN")
    assert layer.stateful and not layer.use_global_stats
    assert layer.blob_shapes == [(2,), (2,), (1,)]
    blobs = [np.asarray(b) for b in layer.init(jax.random.key(0))]
    assert all(np.all(b == 0) for b in blobs) and all(b.dtype == np.float32 for b in blobs)
    eps = float(np.float32(1e-5))
    maf = float(np.float32(0.9))
    m = 3 * 2 * 2
    want = [np.zeros(2), np.zeros(2), np.zeros(1)]
    for x in (x1, x2):
        (y,), blobs = apply_full(layer, blobs, [x])
        ref_y, mean, var = ref_bn_batch(x, eps)
        np.testing.assert_allclose(y, ref_y, rtol=1e-10, atol=1e-12)
        want = [want[0] * maf + mean, want[1] * maf + var * m / (m - 1), want[2] * maf + 1]
        for got, w in zip(blobs, want):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, w, rtol=1e-6)
    # Two updates: the scale factor is 0.9 * 1 + 1.
    np.testing.assert_allclose(blobs[2], [1.9], rtol=1e-6)


def test_batchnorm_global_stats():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2))
    blobs = [np.array([2.0, -4.0, 1.0], np.float32), np.array([8.0, 2.0, 0.5], np.float32),
             np.array([2.0], np.float32)]
    layer = make_layer('type: "BatchNorm" batch_norm_param { eps: 0.001 }', [x.shape], phase="TEST")
    assert layer.use_global_stats
    (y,), new = apply_full(layer, blobs, [x])
    mean, var = blobs[0] / 2, blobs[1] / 2
    eps = float(np.float32(0.001))
    want = (x - mean.reshape(1, 3, 1)) / np.sqrt(var.reshape(1, 3, 1) + eps)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    for a, b in zip(new, blobs):
        np.testing.assert_array_equal(a, b)
    # The gradient is only the scaling by 1/sqrt(var + eps).
    dy = rng.standard_normal(x.shape)
    g = jax.grad(lambda v: jnp.sum(layer.apply([jnp.asarray(b) for b in blobs], [v], CTX)[0][0]
                                   * dy))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), dy / np.sqrt(var.reshape(1, 3, 1) + eps), rtol=1e-6)


def test_batchnorm_zero_scale_factor_means_zero_statistics():
    x = np.array([[1.0, -2.0], [3.0, 0.5]])
    layer = make_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [x.shape])
    blobs = [np.array([5.0, 5.0], np.float32), np.array([9.0, 9.0], np.float32),
             np.zeros(1, np.float32)]
    (y,), _ = apply_full(layer, blobs, [x])
    np.testing.assert_allclose(y, x / np.sqrt(float(np.float32(1e-5))), rtol=1e-6)


@pytest.mark.parametrize("phase, text, want_global", [
    ("TRAIN", "", False), ("TEST", "", True),
    ("TRAIN", "batch_norm_param { use_global_stats: true }", True),
    ("TEST", "batch_norm_param { use_global_stats: false }", False),
])
def test_batchnorm_use_global_stats_default(phase, text, want_global):
    layer = make_layer(f'type: "BatchNorm" {text}', [(2, 3)], phase=phase)
    assert layer.use_global_stats is want_global


def test_batchnorm_statistics_are_not_learned():
    layer = make_layer('type: "BatchNorm"', [(2, 3)])
    assert [p.lr_mult for p in layer.param.param] == [0, 0, 0]
    # The legacy three-param form is upgraded (lr_mult, decay_mult zeroed), as Caffe's upgrade.
    legacy = make_layer('type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } '
                        'param { lr_mult: 1 decay_mult: 1 }', [(2, 3)])
    assert [(p.lr_mult, p.decay_mult) for p in legacy.param.param] == [(0, 0)] * 3
    with pytest.raises(LayerError, match="lr_mult 1.*cannot be learned"):
        make_layer('type: "BatchNorm" param { lr_mult: 1 }', [(2, 3)])


def test_batchnorm_gradient_batch_mode():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 2))
    layer = make_layer('type: "BatchNorm"', [x.shape])
    blobs = [np.zeros(2), np.zeros(2), np.zeros(1)]
    check_gradient(layer, blobs, [x])
    dy = rng.standard_normal(x.shape)
    g = jax.grad(lambda v: jnp.sum(layer.apply([jnp.asarray(b) for b in blobs], [v], CTX)[0][0]
                                   * dy))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), ref_bn_backward_batch(x, dy, float(np.float32(1e-5))),
                               rtol=1e-9, atol=1e-12)
    # The updated statistics carry no gradient.
    gs = jax.grad(lambda v: sum(jnp.sum(b) for b in layer.apply(
        [jnp.asarray(b) for b in blobs], [v], CTX)[1]))(jnp.asarray(x))
    assert np.all(np.asarray(gs) == 0)


# -- Scale / Bias --------------------------------------------------------------------------

X_SHAPE = (2, 3, 4, 2)

# (axis, num_axes, expected learned-blob shape)
LEARNED = [(1, 1, (3,)), (1, 2, (3, 4)), (0, -1, X_SHAPE), (-2, 1, (4,)), (1, 0, ()),
           (2, -1, (4, 2)), (0, 1, (2,))]


def ref_affine(x, v, axis, op):
    if v.ndim == 0:
        return op(x, v)
    vb = v.reshape((1,) * axis + v.shape + (1,) * (x.ndim - axis - v.ndim))
    return op(x, vb)


@pytest.mark.parametrize("axis, num_axes, shape", LEARNED)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_learned(axis, num_axes, shape, bias_term):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(X_SHAPE)
    text = (f'type: "Scale" scale_param {{ axis: {axis} num_axes: {num_axes} '
            f'bias_term: {str(bias_term).lower()} bias_filler {{ type: "constant" value: 0.5 }} }}')
    layer = make_layer(text, [X_SHAPE])
    assert layer.blob_shapes == [shape] * (2 if bias_term else 1)
    init = layer.init(jax.random.key(0))
    np.testing.assert_array_equal(init[0], np.ones(shape, np.float32))  # Caffe's default filler
    if bias_term:
        np.testing.assert_array_equal(init[1], np.full(shape, 0.5, np.float32))
    blobs = [rng.standard_normal(shape) for _ in layer.blob_shapes]
    pos = axis % len(X_SHAPE) if shape else 0
    want = ref_affine(x, blobs[0], pos, np.multiply)
    if bias_term:
        want = ref_affine(want, blobs[1], pos, np.add)
    np.testing.assert_allclose(run(layer, blobs, [x])[0], want, rtol=1e-12)
    check_gradient(layer, blobs, [x], max_elems=12)


@pytest.mark.parametrize("axis, s_shape", [(0, (2, 3)), (1, (3,)), (1, (3, 4, 2)), (-1, (2,)),
                                           (2, ())])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_second_bottom(axis, s_shape, bias_term):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(X_SHAPE)
    s = rng.standard_normal(s_shape)
    layer = make_layer(f'type: "Scale" scale_param {{ axis: {axis} '
                       f'bias_term: {str(bias_term).lower()} }}', [X_SHAPE, s_shape])
    pos = axis % len(X_SHAPE) if s_shape else 0
    assert layer.blob_shapes == ([s_shape] if bias_term else [])
    blobs = [rng.standard_normal(s_shape)] if bias_term else []
    want = ref_affine(x, s, pos, np.multiply)
    if bias_term:
        want = ref_affine(want, blobs[0], pos, np.add)
    np.testing.assert_allclose(run(layer, blobs, [x, s])[0], want, rtol=1e-12)
    check_gradient(layer, blobs, [x, s], max_elems=12)


def test_scale_custom_filler():
    layer = make_layer('type: "Scale" scale_param { filler { type: "constant" value: 3 } }',
                       [(2, 3)])
    np.testing.assert_array_equal(layer.init(jax.random.key(0))[0], np.full(3, 3, np.float32))


@pytest.mark.parametrize("axis, num_axes, shape", LEARNED)
def test_bias_learned(axis, num_axes, shape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(X_SHAPE)
    layer = make_layer(f'type: "Bias" bias_param {{ axis: {axis} num_axes: {num_axes} }}',
                       [X_SHAPE])
    assert layer.blob_shapes == [shape]
    np.testing.assert_array_equal(layer.init(jax.random.key(0))[0], np.zeros(shape, np.float32))
    b = rng.standard_normal(shape)
    pos = axis % len(X_SHAPE) if shape else 0
    np.testing.assert_allclose(run(layer, [b], [x])[0], ref_affine(x, b, pos, np.add), rtol=1e-12)
    check_gradient(layer, [b], [x], max_elems=12)


@pytest.mark.parametrize("axis, b_shape", [(0, (2, 3)), (1, (3, 4)), (-1, (2,)), (1, ())])
def test_bias_second_bottom(axis, b_shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(X_SHAPE)
    b = rng.standard_normal(b_shape)
    layer = make_layer(f'type: "Bias" bias_param {{ axis: {axis} }}', [X_SHAPE, b_shape])
    assert layer.blob_shapes == [] and layer.init(jax.random.key(0)) == []
    pos = axis % len(X_SHAPE) if b_shape else 0
    np.testing.assert_allclose(run(layer, [], [x, b])[0], ref_affine(x, b, pos, np.add),
                               rtol=1e-12)
    check_gradient(layer, [], [x, b], max_elems=12)


def test_bias_filler():
    layer = make_layer('type: "Bias" bias_param { filler { type: "constant" value: -2 } }',
                       [(2, 3)])
    np.testing.assert_array_equal(layer.init(jax.random.key(0))[0], np.full(3, -2, np.float32))


# -- MVN -----------------------------------------------------------------------------------

def ref_mvn(x, normalize_variance, across_channels, eps):
    x4 = x.reshape(x.shape + (1,) * (4 - x.ndim))
    rows = x4.shape[0] if across_channels else x4.shape[0] * x4.shape[1]
    x2 = x4.reshape(rows, -1)
    y = x2 - x2.mean(axis=1, keepdims=True)
    if normalize_variance:
        y = y / (np.sqrt((y ** 2).mean(axis=1, keepdims=True)) + eps)
    return y.reshape(x4.shape)


def ref_mvn_backward(x, dy, across_channels, eps):
    """Caffe's Backward_cpu with normalize_variance: (dy - mean(dy) - mean(dy*y)*y)/(std+eps)."""
    y = ref_mvn(x, True, across_channels, eps)
    rows = y.shape[0] if across_channels else y.shape[0] * y.shape[1]
    y2, d2, x2 = y.reshape(rows, -1), dy.reshape(rows, -1), x.reshape(rows, -1)
    std = np.sqrt(((x2 - x2.mean(axis=1, keepdims=True)) ** 2).mean(axis=1, keepdims=True))
    g = (d2 - d2.mean(axis=1, keepdims=True) - (d2 * y2).mean(axis=1, keepdims=True) * y2)
    return (g / (std + eps)).reshape(x.shape)


@pytest.mark.parametrize("normalize_variance", [True, False])
@pytest.mark.parametrize("across_channels", [False, True])
@pytest.mark.parametrize("eps", [None, 0.5])
def test_mvn(normalize_variance, across_channels, eps):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 2, 3)) * 2 + 1
    eps_text = f"eps: {eps}" if eps is not None else ""
    layer = make_layer(f'type: "MVN" mvn_param {{ normalize_variance: '
                       f'{str(normalize_variance).lower()} across_channels: '
                       f'{str(across_channels).lower()} {eps_text} }}', [x.shape])
    eps_val = float(np.float32(eps if eps is not None else 1e-9))
    want = ref_mvn(x, normalize_variance, across_channels, eps_val)
    np.testing.assert_allclose(run(layer, [], [x])[0], want, rtol=1e-10, atol=1e-12)
    if eps is None:
        check_gradient(layer, [], [x], max_elems=20)
    if normalize_variance:
        dy = rng.standard_normal(x.shape)
        g = jax.grad(lambda v: jnp.sum(layer.apply([], [v], CTX)[0] * dy))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(g), ref_mvn_backward(x, dy, across_channels, eps_val),
                                   rtol=1e-9, atol=1e-12)


def test_mvn_eps_is_added_to_the_std():
    x = np.array([[[[1.0, 3.0]]]])  # mean 2, std 1
    layer = make_layer('type: "MVN" mvn_param { eps: 1 }', [x.shape])
    np.testing.assert_allclose(run(layer, [], [x])[0], [[[[-0.5, 0.5]]]])  # not 1/sqrt(2)


def test_mvn_constant_input_and_legacy_shape():
    x = np.full((2, 3), 4.0)
    layer = make_layer('type: "MVN"', [x.shape])
    assert layer.top_shapes == [(2, 3, 1, 1)]
    y = run(layer, [], [x])[0]
    assert y.shape == (2, 3, 1, 1) and np.all(y == 0)
    layer = make_layer('type: "MVN" mvn_param { across_channels: true }', [(2, 2, 2)])
    g = jax.grad(lambda v: jnp.sum(layer.apply([], [v], CTX)[0] * jnp.arange(8.0).reshape(
        2, 2, 2, 1)))(jnp.full((2, 2, 2), 4.0))
    assert np.all(np.isfinite(np.asarray(g)))


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, shapes, match", [
    ('type: "Scale"', [(2, 3), (4,)], "does not match"),
    ('type: "Scale" scale_param { axis: 0 }', [(2, 3, 4), (2, 4)], "does not match"),
    ('type: "Scale" scale_param { axis: 2 }', [(2, 3, 4), (4, 5)], "extends past"),
    ('type: "Scale" scale_param { num_axes: -2 }', [(2, 3)], "num_axes"),
    ('type: "Scale" scale_param { axis: 1 num_axes: 3 }', [(2, 3)], "extends past"),
    ('type: "Scale" scale_param { axis: 4 }', [(2, 3)], "axis 4 out of range"),
    ('type: "Scale"', [(2, 3), (3,), (3,)], "at most 2 bottom"),
    ('type: "Bias"', [(2, 3, 4), (4,)], "does not match"),
    ('type: "Bias" bias_param { num_axes: 5 }', [(2, 3)], "extends past"),
    ('type: "MVN"', [(1, 2, 3, 4, 5)], "1 to 4 axes"),
    ('type: "BatchNorm"', [(2, 3), (2, 3)], "exactly 1 bottom"),
])
def test_bad_input(text, shapes, match):
    with pytest.raises(JcaffeError, match=match) as e:
        make_layer(text, shapes)
    assert "\n" not in str(e.value) and "'layer'" in str(e.value)
