"""SPP and Im2col against numpy loop references written from Caffe's spp_layer.cpp /
pooling_layer.cpp and im2col.cpp, hand-computed values, numerical gradients and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jcaffe.errors import LayerError
from layer_utils import check_gradient, make_layer, run


# -- numpy references -------------------------------------------------------------------------
def np_pool(x, kernel, stride, pad, method):
    """Caffe's PoolingLayer Forward_cpu (CEIL rounding), MAX or AVE, on [N, C, H, W]."""
    n, c, h, w = x.shape
    size = []
    for i, s in enumerate((h, w)):
        o = int(math.ceil((s + 2 * pad[i] - kernel[i]) / stride[i])) + 1
        if pad[i] and (o - 1) * stride[i] >= s + pad[i]:
            o -= 1
        size.append(o)
    out = np.zeros((n, c, size[0], size[1]))
    for ph, pw in itertools.product(range(size[0]), range(size[1])):
        hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
        he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
        area = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
        win = x[:, :, hs:he, ws:we]
        out[:, :, ph, pw] = win.max((2, 3)) if method == "MAX" else win.sum((2, 3)) / area
    return out


def np_spp(x, height, method):
    """Caffe's SPPLayer: per level kernel = stride = ceil(size / 2^l), pad from the remainder."""
    n, c, h, w = x.shape
    outs = []
    for level in range(height):
        bins = 2 ** level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        outs.append(np_pool(x, (kh, kw), (kh, kw), (ph, pw), method))
    if height == 1:
        return outs[0]
    return np.concatenate([o.reshape(n, -1) for o in outs], axis=1)


def np_im2col(x, kernel, stride, pad, dilation):
    """Caffe's im2col_nd_cpu on one [C, S...] item: rows c * prod(K) + kernel offset (row-major),
    columns the output positions (row-major), zero outside the image."""
    c, spatial = x.shape[0], x.shape[1:]
    out = [(s + 2 * p - (d * (k - 1) + 1)) // st + 1
           for s, k, st, p, d in zip(spatial, kernel, stride, pad, dilation)]
    col = np.zeros((c * math.prod(kernel),) + tuple(out))
    for ch in range(c):
        for ki, offs in enumerate(itertools.product(*(range(k) for k in kernel))):
            for o in itertools.product(*(range(v) for v in out)):
                pos = [oo * st - p + kk * d
                       for oo, st, p, kk, d in zip(o, stride, pad, offs, dilation)]
                inside = all(0 <= q < s for q, s in zip(pos, spatial))
                col[(ch * math.prod(kernel) + ki,) + o] = x[(ch,) + tuple(pos)] if inside else 0
    return col


def spp(height, shape, pool="MAX"):
    return make_layer(f'type: "SPP" spp_param {{ pyramid_height: {height} pool: {pool} }}',
                      [shape])


# -- SPP --------------------------------------------------------------------------------------
def test_spp_hand_computed():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    layer = spp(2, x.shape)
    assert layer.top_shapes == [(1, 5)]
    # level 0: one 4x4 bin; level 1: the four 2x2 quadrants, row-major.
    np.testing.assert_array_equal(run(layer, [], [x])[0], [[15, 5, 7, 13, 15]])
    ave = spp(2, x.shape, "AVE")
    np.testing.assert_allclose(run(ave, [], [x])[0], [[7.5, 2.5, 4.5, 10.5, 12.5]])


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("height,shape", [(3, (2, 3, 9, 8)), (2, (1, 2, 6, 3)),
                                          (4, (1, 1, 16, 15))])
def test_spp_matches_caffe_reference(pool, height, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    layer = spp(height, shape, pool)
    ref = np_spp(x, height, pool)
    assert layer.top_shapes == [ref.shape]
    assert ref.shape[1] == shape[1] * sum(4 ** l for l in range(height))
    np.testing.assert_allclose(run(layer, [], [x.astype(np.float32)])[0], ref, rtol=1e-6,
                               atol=1e-6)


def test_spp_height_one_keeps_the_pooling_shape():
    # Caffe's pyramid_height 1 is the pooling layer alone: no flatten, a 4-axis top.
    layer = spp(1, (2, 3, 5, 5))
    assert layer.top_shapes == [(2, 3, 1, 1)]


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_gradient(pool):
    rng = np.random.default_rng(1)
    # Distinct values keep MAX's argmax away from ties (finite differences need that).
    x = rng.permutation(2 * 2 * 9 * 8).reshape(2, 2, 9, 8) / 7.0
    check_gradient(spp(3, x.shape, pool), [], [x])


@pytest.mark.parametrize("text,shape,match", [
    # Caffe's Pooling CHECK (pad < kernel) fails at a level with more bins than the input
    # can fill: 5 rows in 4 bins need kernel 2 and pad 2.
    ("spp_param { pyramid_height: 3 }", (1, 1, 5, 8), "pyramid level 2 .*pad .*smaller than"),
    ("spp_param { pyramid_height: 2 }", (1, 4, 4), "4-axis"),
    ("spp_param { pool: MAX }", (1, 1, 4, 4), "pyramid_height must be given"),
])
def test_spp_bad_input(text, shape, match):
    with pytest.raises(LayerError, match="layer 'layer' \\(type SPP\\): .*" + match):
        make_layer('type: "SPP" ' + text, [shape])


# -- Im2col -----------------------------------------------------------------------------------
def test_im2col_hand_computed():
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    layer = make_layer('type: "Im2col" convolution_param { kernel_size: 2 }', [x.shape])
    assert layer.top_shapes == [(1, 4, 2, 2)]
    top = run(layer, [], [x])[0]
    # Row (ki, kj) holds x[oh + ki, ow + kj] over the 2x2 output positions.
    np.testing.assert_array_equal(top[0, 0], [[0, 1], [3, 4]])
    np.testing.assert_array_equal(top[0, 3], [[4, 5], [7, 8]])


@pytest.mark.parametrize("conv,shape,kernel,stride,pad,dilation", [
    ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 7, 6), (3, 3), (2, 2), (1, 1), (1, 1)),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 2", (1, 2, 5, 6),
     (2, 3), (1, 2), (0, 2), (1, 1)),
    ("kernel_size: 2 dilation: 2 pad: 1", (1, 2, 6, 5), (2, 2), (1, 1), (1, 1), (2, 2)),
    ("kernel_size: 2 kernel_size: 1 kernel_size: 2 force_nd_im2col: true", (1, 2, 3, 4, 3),
     (2, 1, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1)),
])
def test_im2col_matches_caffe_reference(conv, shape, kernel, stride, pad, dilation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    layer = make_layer(f'type: "Im2col" convolution_param {{ {conv} }}', [shape])
    ref = np.stack([np_im2col(item, kernel, stride, pad, dilation) for item in x])
    assert layer.top_shapes == [ref.shape]
    np.testing.assert_array_equal(run(layer, [], [x])[0], ref)


def test_im2col_gradient_is_col2im():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 5, 4))
    layer = make_layer('type: "Im2col" convolution_param { kernel_size: 3 stride: 1 pad: 1 }',
                       [x.shape])
    check_gradient(layer, [], [x])


@pytest.mark.parametrize("conv,shape,match", [
    ("kernel_size: 3 kernel_size: 2", (1, 1, 4, 4, 4), "kernel_size must be specified once"),
    ("kernel_h: 2 kernel_w: 2", (1, 1, 4, 4, 4), "kernel_h & kernel_w can only be used"),
    ("kernel_size: 5", (1, 1, 3, 3), "kernel extent 5 is larger"),
    ("kernel_size: 2 stride: 0", (1, 1, 3, 3), "stride dimensions must be nonzero"),
])
def test_im2col_bad_input(conv, shape, match):
    with pytest.raises(LayerError, match="type Im2col.*" + match):
        make_layer(f'type: "Im2col" convolution_param {{ {conv} }}', [shape])
