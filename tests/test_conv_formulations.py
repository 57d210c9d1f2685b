"""The formulations behind the layer registry agree: every convolution formulation (XLA,
im2col NCHW, channels-last im2col and channels-last XLA) computes the same Caffe convolution for
random geometries, and the channels-last kernels with hand-written backward passes (chunked
convolution, pooling) give autodiff's and Caffe's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jcaffe.config import Config
from jcaffe.layers import vision
from jcaffe.layers.base import Context
from tests.layer_utils import make_layer


@st.composite
def geometries(draw):
    group = draw(st.sampled_from([1, 2]))
    channels = group * draw(st.integers(1, 3))
    num_output = group * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 2))
    stride = draw(st.integers(1, 2))
    extent = dilation * (kernel - 1) + 1
    size = draw(st.integers(max(1, extent - 2 * pad), 7))
    return group, channels, num_output, kernel, dilation, pad, stride, size


@settings(max_examples=12, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_formulations_agree(geometry, seed):
    group, channels, num_output, kernel, dilation, pad, stride, size = geometry
    text = (f'type: "Convolution" convolution_param {{ num_output: {num_output} '
            f'kernel_size: {kernel} dilation: {dilation} pad: {pad} stride: {stride} '
            f'group: {group} }}')
    shape = (2, channels, size, size)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    ctx = Context(train=False)
    blobs = None
    outputs = []
    for impl in ("xla", "im2col"):
        layer = make_layer(text, [shape], config=Config(conv=impl))
        if blobs is None:
            blobs = [jnp.asarray(rng.standard_normal(s).astype(np.float32))
                     for s in layer.blob_shapes]
        # Each formulation as one compiled program (op by op, every new geometry compiles
        # each primitive alone).
        y = jax.jit(lambda b, v: layer.apply(b, [v], ctx)[0])(blobs, jnp.asarray(x))
        y_nhwc = jax.jit(lambda b, v: layer.apply_nhwc(b, [v], ctx)[0])(
            blobs, jnp.transpose(jnp.asarray(x), (0, 2, 3, 1)))
        outputs.append((np.asarray(y), np.asarray(jnp.transpose(y_nhwc, (0, 3, 1, 2)))))
    reference = outputs[0][0]
    for y, y_nhwc in outputs:
        np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y_nhwc, reference, rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_channels_last_gradients_match_xla_autodiff(geometry, seed):
    """The hand-written backward pass of the channels-last im2col convolution (weight
    gradient against the saved columns, col2im for the input gradient) against autodiff of
    XLA's own convolution, for random geometries (float64)."""
    group, channels, num_output, kernel, dilation, pad, stride, size = geometry
    text = (f'type: "Convolution" convolution_param {{ num_output: {num_output} '
            f'kernel_size: {kernel} dilation: {dilation} pad: {pad} stride: {stride} '
            f'group: {group} }}')
    shape = (2, channels, size, size + 1)
    rng = np.random.default_rng(seed)
    ref_layer = make_layer(text, [shape], config=Config(conv="xla"))
    layer = make_layer(text, [shape], config=Config(conv="im2col"))
    x = jnp.asarray(rng.standard_normal(shape))
    blobs = [jnp.asarray(rng.standard_normal(s)) for s in layer.blob_shapes]
    ctx = Context(train=True)
    top_shape = jax.eval_shape(lambda b, v: ref_layer.apply(b, [v], ctx)[0], blobs, x).shape
    probe = jnp.asarray(rng.standard_normal(top_shape))

    def ref_objective(blobs, x):
        return jnp.sum(ref_layer.apply(blobs, [x], ctx)[0] * probe)

    def nhwc_objective(blobs, x):
        y = layer.apply_nhwc(blobs, [jnp.transpose(x, (0, 2, 3, 1))], ctx)[0]
        return jnp.sum(jnp.transpose(y, (0, 3, 1, 2)) * probe)

    want = jax.jit(jax.grad(ref_objective, argnums=(0, 1)))(blobs, x)
    got = jax.jit(jax.grad(nhwc_objective, argnums=(0, 1)))(blobs, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)


def test_channels_last_convolution_numerical_gradient():
    """Finite differences of the channels-last convolution itself (stride 2, dilation 2,
    padding, a non-square kernel)."""
    from jax.test_util import check_grads

    text = ('type: "Convolution" convolution_param { num_output: 3 kernel_h: 2 kernel_w: 3 '
            'stride: 2 pad: 1 dilation: 2 }')
    shape = (2, 2, 7, 6)
    layer = make_layer(text, [shape], config=Config(conv="im2col"))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 2)))
    blobs = [jnp.asarray(rng.standard_normal(s)) for s in layer.blob_shapes]
    ctx = Context(train=True)
    check_grads(lambda w, b, x: layer.apply_nhwc([w, b], [x], ctx)[0], (*blobs, x),
                order=1, modes=["rev"], eps=1e-4)


def test_channels_last_max_pooling_gradient_goes_to_the_first_maximum():
    """Non-overlapping MAX pooling in the channels-last layout: Caffe's mask semantics for
    ties (the whole gradient to the first maximum in row-major window order) and the NCHW
    path's gradient on distinct values."""
    shape = (2, 3, 4, 6)
    layer = make_layer("type: 'Pooling' pooling_param { pool: MAX kernel_size: 2 stride: 2 }",
                       [shape])
    ctx = Context(train=True)
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal(shape), 0)  # few distinct values: ties in most windows
    x[0, 0] = 1.0                                 # one channel all tied
    probe = jnp.asarray(rng.standard_normal((2, 3, 2, 3)))

    def nhwc(x):
        y = layer.apply_nhwc([], [jnp.transpose(x, (0, 2, 3, 1))], ctx)[0]
        return jnp.sum(jnp.transpose(y, (0, 3, 1, 2)) * probe)

    def nchw(x):
        return jnp.sum(layer.apply([], [x], ctx)[0] * probe)

    g = np.asarray(jax.jit(jax.grad(nhwc))(jnp.asarray(x)))
    np.testing.assert_array_equal(g, np.asarray(jax.grad(nchw)(jnp.asarray(x))))
    # Hand-built expectation: each window's probe value lands on its first maximum.
    expect = np.zeros(shape)
    p = np.asarray(probe)
    for n, c, i, j in np.ndindex(2, 3, 2, 3):
        window = x[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        di, dj = np.unravel_index(np.argmax(window), (2, 2))
        expect[n, c, 2 * i + di, 2 * j + dj] = p[n, c, i, j]
    np.testing.assert_array_equal(g, expect)


def test_batch_chunks_pick_the_fewest_pieces_that_fit():
    assert vision._batch_chunks(64, 10, 100) == 8         # 8 images of 10 per piece
    assert vision._batch_chunks(6, 40, 100) == 3          # 2 per piece (4 would not divide 6)
    assert vision._batch_chunks(5, 500, 100) == 5         # never fewer than one image a piece
    assert vision._batch_chunks(4, 25, 100) == 1


def test_chunked_channels_last_convolution_matches_xla(monkeypatch):
    """A convolution too large for one piece loops over batch pieces; values and gradients
    stay those of XLA's convolution."""
    text = ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 stride: 2 '
            'pad: 1 dilation: 1 }')
    shape = (6, 2, 7, 5)
    ref_layer = make_layer(text, [shape], config=Config(conv="xla"))
    per_image = 4 * 3 * 9 * 2    # output positions x kernel taps x channels
    assert vision._batch_chunks(6, per_image, 2 * per_image) == 3
    layer = make_layer(text, [shape], config=Config(conv="im2col",
                                                    chunk_cols_elems=2 * per_image))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal(shape))
    blobs = [jnp.asarray(rng.standard_normal(s)) for s in layer.blob_shapes]
    ctx = Context(train=True)
    probe = jnp.asarray(rng.standard_normal((6, 3, 4, 3)))

    def nhwc(blobs, x):
        y = layer.apply_nhwc(blobs, [jnp.transpose(x, (0, 2, 3, 1))], ctx)[0]
        return jnp.transpose(y, (0, 3, 1, 2))

    y = jax.jit(nhwc)(blobs, x)
    np.testing.assert_allclose(y, ref_layer.apply(blobs, [x], ctx)[0], rtol=1e-10, atol=1e-10)
    got = jax.grad(lambda b, x: jnp.sum(nhwc(b, x) * probe), argnums=(0, 1))(blobs, x)
    want = jax.grad(lambda b, x: jnp.sum(ref_layer.apply(b, [x], ctx)[0] * probe),
                    argnums=(0, 1))(blobs, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("body,shape", [
    ("pool: MAX kernel_size: 3 stride: 2", (2, 3, 9, 8)),            # CIFAR's, CEIL overhang
    ("pool: MAX kernel_size: 3 stride: 1 pad: 1", (1, 2, 5, 6)),
    ("pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2", (1, 2, 5, 7)),
    ("pool: AVE kernel_size: 3 stride: 2", (2, 3, 9, 8)),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", (1, 2, 6, 7)),
])
def test_channels_last_overlapping_pooling_matches_nchw(body, shape):
    """Overlapping windows in the channels-last layout (hand-written col2im backward): the
    same values and gradients as the channels-first path, ties included (rounded inputs)."""
    layer = make_layer(f"type: 'Pooling' pooling_param {{ {body} }}", [shape])
    assert not layer._is_tiled()
    ctx = Context(train=True)
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.round(2 * rng.standard_normal(shape), 0))
    y_ref = layer.apply([], [x], ctx)[0]
    probe = jnp.asarray(rng.standard_normal(y_ref.shape))

    def nhwc(x):
        y = layer.apply_nhwc([], [jnp.transpose(x, (0, 2, 3, 1))], ctx)[0]
        return jnp.transpose(y, (0, 3, 1, 2))

    np.testing.assert_allclose(jax.jit(nhwc)(x), y_ref, rtol=1e-12)
    g = jax.jit(jax.grad(lambda x: jnp.sum(nhwc(x) * probe)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(layer.apply([], [x], ctx)[0] * probe))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("body,shape", [
    ("kernel_size: 5 pad: 2", (4, 3, 8, 7)),                         # CIFAR-10 quick's
    ("kernel_size: 3 pad: 2 dilation: 2", (2, 2, 6, 6)),
    ("kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0", (2, 2, 5, 4)),
    ("kernel_size: 5", (2, 2, 9, 9)),                                # LeNet's
    ("kernel_size: 3 stride: 2 pad: 1", (2, 2, 7, 7)),
])
@pytest.mark.parametrize("chunk_limit", [None, 1])
def test_padded_convolution_gradients_match_xla(monkeypatch, body, shape, chunk_limit):
    """Padding inside the hand-written convolution (the input gradient is cropped from the
    padded one), with and without batch pieces, against autodiff of XLA's convolution."""
    text = f'type: "Convolution" convolution_param {{ num_output: 4 {body} }}'
    ref_layer = make_layer(text, [shape], config=Config(conv="xla"))
    config = Config(conv="im2col")
    if chunk_limit:
        config = config.replace(chunk_cols_elems=chunk_limit)  # one image per piece
    layer = make_layer(text, [shape], config=config)
    geo = vision._conv_geometry(shape[0], shape[1], layer.kernel, layer.stride, layer.dilation,
                                layer.pad, layer.out_spatial, config.chunk_cols_elems)
    assert geo[5] == (shape[0] if chunk_limit else 1)
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal(shape))
    blobs = [jnp.asarray(rng.standard_normal(s)) for s in layer.blob_shapes]
    ctx = Context(train=True)
    probe = jnp.asarray(rng.standard_normal(ref_layer.apply(blobs, [x], ctx)[0].shape))

    def nhwc(b, x):
        y = layer.apply_nhwc(b, [jnp.transpose(x, (0, 2, 3, 1))], ctx)[0]
        return jnp.sum(jnp.transpose(y, (0, 3, 1, 2)) * probe)

    got = jax.jit(jax.grad(nhwc, argnums=(0, 1)))(blobs, x)
    want = jax.grad(lambda b, x: jnp.sum(ref_layer.apply(b, [x], ctx)[0] * probe),
                    argnums=(0, 1))(blobs, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel,stride,dilation,size", [
    ((3, 3), (2, 2), (1, 1), (9, 8)),     # CIFAR's pooling windows
    ((1, 1), (2, 2), (1, 1), (5, 5)),     # kernel < stride: some phases receive nothing
    ((2, 3), (3, 2), (1, 1), (8, 9)),
    ((3, 3), (1, 1), (2, 2), (7, 7)),     # stride 1, dilation: the row-by-row path
    ((3, 2), (2, 2), (2, 1), (9, 6)),     # stride and dilation: the padding path
])
def test_col2im_is_the_adjoint_of_im2col(kernel, stride, dilation, size):
    """col2im (by phases for strides above 1) against autodiff of the channels-last im2col."""
    out_sp = tuple((n - (d * (k - 1) + 1)) // s + 1
                   for n, k, s, d in zip(size, kernel, stride, dilation))
    x_shape = (2,) + size + (3,)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal(x_shape))
    cols, vjp = jax.vjp(lambda x: vision._im2col_nhwc(x, kernel, stride, dilation, out_sp), x)
    dcols = jnp.asarray(rng.standard_normal(cols.shape))
    got = vision._col2im_nhwc(dcols, x_shape, kernel, stride, dilation, out_sp)
    np.testing.assert_allclose(np.asarray(got), np.asarray(vjp(dcols)[0]), rtol=1e-12,
                               atol=1e-12)
