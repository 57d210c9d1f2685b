"""Normalization and affine layers: BatchNorm, Scale, Bias, MVN."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jcaffe import fillers
from jcaffe.layers.base import Layer, Shape, count, register
from jcaffe.proto import caffe_pb2


def _at_axis(v: jax.Array, axis: int, ndim: int) -> jax.Array:
    """Reshapes ``v`` so that its axes line up with axes ``axis...`` of an ``ndim``-axis array."""
    return v.reshape((1,) * axis + tuple(v.shape) + (1,) * (ndim - axis - v.ndim))


@register("BatchNorm")
class BatchNorm(Layer):
    """Normalizes each channel (axis 1) to zero mean and unit variance: ``y = (x - mu) /
    sqrt(var + eps)``, statistics over N and all spatial axes (no learned scale/shift: Caffe
    pairs BatchNorm with a Scale layer).

    Blobs, as Caffe stores them: running mean *sum* ``[C]``, running variance *sum* ``[C]``
    and their scale factor ``[1]``, all starting at 0. With ``use_global_stats`` (default:
    phase TEST) ``mu = blob0 * s``, ``var = blob1 * s`` with ``s = 0 if blob2 == 0 else
    1/blob2``, and the gradient is ``dy / sqrt(var + eps)``. Otherwise ``mu``/``var`` are
    the batch's (biased variance), the gradient flows through them, and the blobs are
    updated: ``blob2 = maf*blob2 + 1``, ``blob0 = maf*blob0 + mu``, ``blob1 = maf*blob1 +
    var * m/(m-1)`` with ``m = count/C`` and ``maf = moving_average_fraction``. ``apply``
    returns ``(tops, new_blobs)``. The statistics are never learned: like Caffe's LayerSetUp,
    setup gives the layer one ``param { lr_mult: 0 }`` per blob and refuses a non-zero
    ``lr_mult`` (except the legacy three-``param`` form, which Caffe's upgrade zeroes).
    """

    exact_bottoms = 1
    exact_tops = 1
    stateful = True

    def setup(self, bottom_shapes):
        bp = self.param.batch_norm_param
        self.moving_average_fraction = float(bp.moving_average_fraction)
        self.use_global_stats = (bp.use_global_stats if bp.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        self.eps = float(bp.eps)
        shape = bottom_shapes[0]
        if len(shape) < 1:
            raise self.shape_error("needs a bottom with at least one axis")
        self.channels = shape[1] if len(shape) > 1 else 1
        self.num = shape[0]
        nc = self.num * self.channels
        self.spatial_dim = count(shape) // nc if nc else 0
        self.blob_shapes = [(self.channels,), (self.channels,), (1,)]
        specs = list(self.param.param)
        if len(specs) != 3:
            for i, spec in enumerate(specs[:3]):
                if spec.lr_mult != 0:
                    raise self.error(f"param {i} has lr_mult {spec.lr_mult:g}: batch "
                                     f"normalization statistics cannot be learned (use lr_mult: 0)")
        fixed = caffe_pb2.LayerParameter()
        fixed.CopyFrom(self.param)
        for spec in fixed.param:
            if len(specs) == 3:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
        while len(fixed.param) < 3:
            fixed.param.add().lr_mult = 0.0
        self.param = fixed
        return [shape]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        c, n, s = self.channels, self.num, self.spatial_dim
        x3 = x.reshape(n, c, s)
        sg = jax.lax.stop_gradient
        b0, b1, b2 = (sg(b) for b in blobs)
        if self.use_global_stats:
            f = b2[0]
            safe = jnp.where(f == 0, jnp.ones_like(f), f)
            factor = jnp.where(f == 0, jnp.zeros_like(f), 1 / safe)
            mean = (b0 * factor).astype(x.dtype)
            var = (b1 * factor).astype(x.dtype)
            xc = x3 - mean.reshape(1, c, 1)
            new_blobs = [b0, b1, b2]
        else:
            mean = jnp.mean(x3, axis=(0, 2))
            xc = x3 - mean.reshape(1, c, 1)
            var = jnp.mean(xc * xc, axis=(0, 2))
            maf = self.moving_average_fraction
            m = n * s
            correction = m / (m - 1) if m > 1 else 1.0
            new_blobs = [b0 * maf + sg(mean).astype(b0.dtype),
                         b1 * maf + sg(var).astype(b1.dtype) * correction,
                         b2 * maf + 1]
        y = xc / jnp.sqrt(var + self.eps).reshape(1, c, 1)
        return [y.reshape(x.shape)], new_blobs


def _affine_shape(layer: Layer, x: Shape, axis_param: int, num_axes: int, what: str) -> Shape:
    """The shape of a learned scale/bias blob: ``x[axis : axis + num_axes]`` (-1: to the end)."""
    axis = layer.canonical_axis(axis_param, len(x))
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of "
                          f"bottom 0 (got {num_axes})")
    if num_axes >= 0 and axis + num_axes > len(x):
        raise layer.shape_error(f"{what} blob's shape extends past bottom 0's shape when "
                                f"applied from axis {axis} with num_axes {num_axes}")
    return tuple(x[axis:]) if num_axes == -1 else tuple(x[axis:axis + num_axes])


def _operand_axis(layer: Layer, x: Shape, operand: Shape, axis_param: int, what: str) -> int:
    """Where ``operand`` lines up with ``x`` (Caffe's Scale/Bias Reshape): its dims must equal
    ``x[axis : axis + operand.ndim]``; a scalar operand applies everywhere (axis 0)."""
    if len(operand) == 0:
        return 0
    axis = layer.canonical_axis(axis_param, len(x))
    if axis + len(operand) > len(x):
        raise layer.shape_error(f"{what} shape {list(operand)} extends past bottom 0's shape "
                                f"when applied from axis {axis}")
    if tuple(x[axis:axis + len(operand)]) != tuple(operand):
        raise layer.shape_error(f"{what} shape {list(operand)} does not match bottom 0's "
                                f"dims {list(x[axis:axis + len(operand)])} from axis {axis}")
    return axis


@register("Scale")
class Scale(Layer):
    """``y = x * scale (+ bias)``, with ``scale`` broadcast along axes ``axis ...`` of x.

    The scale is bottom 1 when given (its shape must equal ``x.shape[axis : axis +
    bottom1.ndim]``; it receives a gradient), else a learned blob of shape ``x.shape[axis :
    axis + num_axes]`` (``num_axes`` -1: to the end; ``filler`` default constant 1).
    ``bias_term`` adds a learned bias blob (``bias_filler``, default constant 0) shaped like
    the scale; a scalar scale or bias applies to every element.
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        sp = self.param.scale_param
        x = bottom_shapes[0]
        self.blob_shapes = []
        if len(bottom_shapes) == 1:
            scale_shape = _affine_shape(self, x, sp.axis, sp.num_axes, "scale")
            self.blob_shapes.append(scale_shape)
        else:
            scale_shape = bottom_shapes[1]
        self.axis = _operand_axis(self, x, scale_shape, sp.axis, "scale")
        self.bias_term = bool(sp.bias_term)
        if self.bias_term:
            bias_num_axes = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else sp.num_axes
            bias_shape = _affine_shape(self, x, sp.axis, bias_num_axes, "bias")
            self.bias_axis = _operand_axis(self, x, bias_shape, sp.axis, "bias")
            self.blob_shapes.append(bias_shape)
        return [x]

    def init(self, key):
        sp = self.param.scale_param
        k_scale, k_bias = jax.random.split(key)
        blobs = []
        if len(self.bottom_shapes) == 1:
            if sp.HasField("filler"):
                filler = sp.filler
            else:
                filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
            blobs.append(fillers.fill(filler, self.blob_shapes[0], k_scale,
                                      where=f"layer '{self.name}' scale"))
        if self.bias_term:
            blobs.append(fillers.fill(sp.bias_filler, self.blob_shapes[-1], k_bias,
                                      where=f"layer '{self.name}' bias"))
        return blobs

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        scale = bottoms[1] if len(bottoms) > 1 else blobs[0]
        y = x * _at_axis(scale.astype(x.dtype), self.axis, x.ndim)
        if self.bias_term:
            y = y + _at_axis(blobs[-1].astype(x.dtype), self.bias_axis, x.ndim)
        return [y]


@register("Bias")
class Bias(Layer):
    """``y = x + bias``, with ``bias`` broadcast along axes ``axis ...`` of x: bottom 1 when
    given (shape ``x.shape[axis : axis + bottom1.ndim]``; it receives a gradient), else a
    learned blob of shape ``x.shape[axis : axis + num_axes]`` (``filler``, default constant 0).
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        bp = self.param.bias_param
        x = bottom_shapes[0]
        if len(bottom_shapes) == 1:
            bias_shape = _affine_shape(self, x, bp.axis, bp.num_axes, "bias")
            self.blob_shapes = [bias_shape]
        else:
            bias_shape = bottom_shapes[1]
        self.axis = _operand_axis(self, x, bias_shape, bp.axis, "bias")
        return [x]

    def init(self, key):
        if len(self.bottom_shapes) > 1:
            return []
        return [fillers.fill(self.param.bias_param.filler, self.blob_shapes[0], key,
                             where=f"layer '{self.name}' bias")]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        bias = bottoms[1] if len(bottoms) > 1 else blobs[0]
        return [x + _at_axis(bias.astype(x.dtype), self.axis, x.ndim)]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mvn_scaled(x2: jax.Array, eps: float) -> jax.Array:
    return _mvn_forward(x2, eps)[0]


def _mvn_forward(x2, eps):
    mean = jnp.mean(x2, axis=1, keepdims=True)
    xc = x2 - mean
    denom = jnp.sqrt(jnp.mean(xc * xc, axis=1, keepdims=True)) + eps
    y = xc / denom
    return y, (y, denom)


def _mvn_fwd(x2, eps):
    return _mvn_forward(x2, eps)


def _mvn_bwd(eps, res, g):
    y, denom = res
    # Caffe's MVN backward: the derivative with the eps inside the std treated as part of it,
    # finite even when a row is constant (std 0).
    gx = (g - jnp.mean(g, axis=1, keepdims=True)
          - y * jnp.mean(g * y, axis=1, keepdims=True)) / denom
    return (gx,)


_mvn_scaled.defvjp(_mvn_fwd, _mvn_bwd)


@register("MVN")
class MVN(Layer):
    """Mean-variance normalization per example and channel (``across_channels``: per
    example): ``y = x - mean``, and with ``normalize_variance`` (default) ``y = (x - mean) /
    (std + eps)`` with ``std = sqrt(mean((x - mean)^2))`` and ``eps`` (1e-9) added to the std,
    not the variance. The backward is Caffe's ``(dy - mean(dy) - y mean(dy y)) / (std + eps)``.
    Like Caffe's, the top has the legacy 4-axis shape (N, C, H, W) of the bottom (a 2-axis
    bottom gives N x C x 1 x 1); bottoms of more than 4 axes are refused.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        mp = self.param.mvn_param
        self.normalize_variance = bool(mp.normalize_variance)
        self.across_channels = bool(mp.across_channels)
        self.eps = float(mp.eps)
        shape = bottom_shapes[0]
        if not 1 <= len(shape) <= 4:
            raise self.shape_error(f"needs a bottom of 1 to 4 axes (N, C, H, W), got {len(shape)}")
        legacy = tuple(shape) + (1,) * (4 - len(shape))
        self.rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        self.dim = count(legacy) // self.rows if self.rows else 0
        return [legacy]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        x2 = x.reshape(self.rows, self.dim)
        if self.normalize_variance:
            y = _mvn_scaled(x2, self.eps)
        else:
            y = x2 - jnp.mean(x2, axis=1, keepdims=True)
        return [y.reshape(self.top_shapes[0])]
