"""Spatial layers built from Caffe's vision primitives: SPP (spatial pyramid pooling) and Im2col
(the convolution's column buffer as a top).

Both are Caffe's ``vision_layers`` family; they live here, not in ``vision.py``, and reuse its
Pooling layer so that every pooling rule (CEIL rounding, padding, the AVE divisor, first-maximum
gradients) is the one the Pooling layer already reproduces.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
from jax import lax

from jcaffe.errors import LayerError
from jcaffe.layers.base import Layer, Shape, count, register
from jcaffe.proto import caffe_pb2

_SPP = caffe_pb2.SPPParameter
_PP = caffe_pb2.PoolingParameter


def spp_level_geometry(level: int, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Caffe's ``SPPLayer::GetPoolingParam``: (kernel, stride, pad) per spatial axis for pyramid
    level ``level`` (2**level bins per axis): ``kernel = stride = ceil(size / bins)``,
    ``pad = (kernel * bins - size + 1) // 2``."""
    bins = 2 ** level
    out = []
    for size in (height, width):
        kernel = math.ceil(size / bins)
        pad = (kernel * bins - size + 1) // 2
        out.append((kernel, pad))
    (kh, ph), (kw, pw) = out
    return (kh, kw), (kh, kw), (ph, pw)


@register("SPP")
class SPP(Layer):
    """Caffe's SPPLayer: ``pyramid_height`` poolings of the [N, C, H, W] bottom, level ``l``
    pooled into about ``2**l x 2**l`` bins (kernel/stride/pad from :func:`spp_level_geometry`,
    run by Caffe's Pooling layer with its default CEIL rounding), each flattened to
    [N, C * bins_h * bins_w] and concatenated along axis 1 in level order.

    As in Caffe, ``pyramid_height: 1`` skips the flatten and concat: the top is the pooling's
    own [N, C, 1, 1] output. ``pool`` is MAX (default), AVE or STOCHASTIC. Caffe's pooling
    checks apply per level: a level whose padding is not smaller than its kernel (inputs
    smaller than the level's bin count) is an error naming the level.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        from jcaffe.layers.vision import Pooling

        p = self.param.spp_param
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis (num, channels, height, width) bottom, got "
                                   f"{len(shape)} axes")
        n, c, h, w = shape
        if h <= 0 or w <= 0:
            raise self.shape_error("input dimensions cannot be zero")
        if not p.HasField("pyramid_height") or p.pyramid_height < 1:
            raise self.error("spp_param.pyramid_height must be given and at least 1")
        self.pyramid_height = int(p.pyramid_height)
        pool = {_SPP.MAX: _PP.MAX, _SPP.AVE: _PP.AVE, _SPP.STOCHASTIC: _PP.STOCHASTIC}.get(p.pool)
        if pool is None:
            raise self.error(f"unknown pooling method {p.pool}")
        self.levels: list[Pooling] = []
        for level in range(self.pyramid_height):
            kernel, stride, pad = spp_level_geometry(level, h, w)
            lp = caffe_pb2.LayerParameter(name=f"{self.name} level {level}", type="Pooling",
                                          bottom=["x"], top=["y"])
            pp = lp.pooling_param
            pp.pool = pool
            pp.kernel_h, pp.kernel_w = kernel
            pp.stride_h, pp.stride_w = stride
            pp.pad_h, pp.pad_w = pad
            try:
                self.levels.append(Pooling(lp, [shape], self.phase))
            except LayerError as e:
                raise self.shape_error(
                    f"pyramid level {level} (kernel {list(kernel)}, stride {list(stride)}, pad "
                    f"{list(pad)}): {str(e).split('): ', 1)[-1]}") from None
        self.needs_key = any(l.needs_key for l in self.levels)
        if self.pyramid_height == 1:
            return [self.levels[0].top_shapes[0]]
        return [(n, sum(count(l.top_shapes[0], 1) for l in self.levels))]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        pooled = [level.apply([], [x], ctx)[0] for level in self.levels]
        if self.pyramid_height == 1:
            return pooled
        n = x.shape[0]
        return [jnp.concatenate([y.reshape(n, -1) for y in pooled], axis=1)]


def _per_axis(layer: Layer, values, has_hw: bool, hw, name: str, n_axes: int,
              default: int | None, hw_name: str | None = None) -> tuple[int, ...]:
    """Caffe's ConvolutionParameter rule: ``name_h``/``name_w`` (2-D only) or the repeated field
    given once or once per spatial axis (or not at all, when there is a default)."""
    if has_hw:
        hw_name = hw_name or name
        if n_axes != 2:
            raise layer.error(f"{hw_name}_h & {hw_name}_w can only be used for 2D convolution")
        if len(values):
            raise layer.error(f"either {name} or {hw_name}_h/w should be specified; not both")
        return tuple(int(v) for v in hw)
    k = len(values)
    if k == 0 and default is not None:
        return (default,) * n_axes
    if k not in (1, n_axes):
        raise layer.error(f"{name} must be specified once, or once per spatial dimension "
                          f"({name} specified {k} times; {n_axes} spatial dims)")
    return tuple(int(values[0 if k == 1 else i]) for i in range(n_axes))


@register("Im2col")
class Im2col(Layer):
    """Caffe's Im2colLayer: the convolution's column buffer as a top, per item of the batch.

    For a bottom ``[N..., C, S_1, ..., S_k]`` (channel axis ``convolution_param.axis``, default 1)
    the top is ``[N..., C * K_1 * ... * K_k, O_1, ..., O_k]`` with
    ``O_i = (S_i + 2*pad_i - (dilation_i*(K_i - 1) + 1)) // stride_i + 1`` (rounded down, as
    convolution), and ``top[c*K_1*...*K_k + (k_1..k_k flattened row-major), o] =
    x[c, o*stride - pad + k*dilation]`` (zero outside the image): Caffe's ``im2col_cpu`` /
    ``im2col_nd_cpu`` order, channel-major, then kernel offsets. ``force_nd_im2col`` selects
    Caffe's N-D kernel, which gives the same numbers. The gradient is col2im (overlapping
    windows summed), which autodiff derives from the gather.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        p = self.param.convolution_param
        shape = bottom_shapes[0]
        self.axis = self.canonical_axis(p.axis, len(shape))
        n_axes = len(shape) - self.axis - 1
        if n_axes < 1:
            raise self.shape_error(f"needs at least one spatial axis after the channel axis "
                                   f"{self.axis}")
        self.kernel = _per_axis(self, p.kernel_size, p.HasField("kernel_h") or
                                p.HasField("kernel_w"), (p.kernel_h, p.kernel_w), "kernel_size",
                                n_axes, None, "kernel")
        if any(k <= 0 for k in self.kernel):
            raise self.error(f"filter dimensions must be nonzero, got {list(self.kernel)}")
        self.stride = _per_axis(self, p.stride, p.HasField("stride_h") or p.HasField("stride_w"),
                                (p.stride_h, p.stride_w), "stride", n_axes, 1)
        if any(s <= 0 for s in self.stride):
            raise self.error(f"stride dimensions must be nonzero, got {list(self.stride)}")
        self.pad = _per_axis(self, p.pad, p.HasField("pad_h") or p.HasField("pad_w"),
                             (p.pad_h, p.pad_w), "pad", n_axes, 0)
        self.dilation = _per_axis(self, p.dilation, False, (), "dilation", n_axes, 1)
        spatial = shape[self.axis + 1:]
        out = []
        for i, size in enumerate(spatial):
            extent = self.dilation[i] * (self.kernel[i] - 1) + 1
            o = (size + 2 * self.pad[i] - extent) // self.stride[i] + 1
            if o <= 0:
                raise self.shape_error(f"kernel extent {extent} is larger than the padded input "
                                       f"size {size + 2 * self.pad[i]} along spatial axis {i}")
            out.append(o)
        self.out = tuple(out)
        channels = shape[self.axis] * math.prod(self.kernel)
        return [tuple(shape[:self.axis]) + (channels,) + self.out]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        lead = x.shape[:self.axis]
        c = x.shape[self.axis]
        x = x.reshape((-1, c) + x.shape[self.axis + 1:])
        x = jnp.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in self.pad])
        cols = []
        # Kernel offsets in row-major order: Caffe's im2col row index is c * prod(K) + offset.
        for offs in itertools.product(*(range(kk) for kk in self.kernel)):
            start = [0, 0] + [o * d for o, d in zip(offs, self.dilation)]
            limit = ([x.shape[0], c] + [s + (o - 1) * st + 1
                                        for s, o, st in zip(start[2:], self.out, self.stride)])
            cols.append(lax.slice(x, start, limit, [1, 1] + list(self.stride)))
        col = jnp.stack(cols, axis=2)  # [M, C, prod(K), O...]
        col = col.reshape((col.shape[0], c * len(cols)) + self.out)
        return [col.reshape(lead + (c * len(cols),) + self.out)]
