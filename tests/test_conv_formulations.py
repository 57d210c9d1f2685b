"""Property test: every convolution formulation (XLA, im2col NCHW, channels-last im2col and
channels-last XLA) computes the same Caffe convolution, for random geometries."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

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
        with vision.conv_impl(impl):
            layer = make_layer(text, [shape])
        if blobs is None:
            blobs = [jnp.asarray(rng.standard_normal(s).astype(np.float32))
                     for s in layer.blob_shapes]
        y = layer.apply(blobs, [jnp.asarray(x)], ctx)[0]
        y_nhwc = layer.apply_nhwc(blobs, [jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))], ctx)[0]
        outputs.append((np.asarray(y), np.asarray(jnp.transpose(y_nhwc, (0, 3, 1, 2)))))
    reference = outputs[0][0]
    for y, y_nhwc in outputs:
        np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(y_nhwc, reference, rtol=1e-4, atol=1e-4)
