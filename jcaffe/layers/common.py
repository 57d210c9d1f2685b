"""Common layers: fully connected, softmax, and the layers that move, combine or reduce blobs
(Concat, Slice, Split, Eltwise, Flatten, Reshape, Crop, ArgMax, Silence, Reduction, Tile, Embed)
plus the host-fed Input and the generated DummyData.

Shape rules follow Caffe's ``Reshape`` methods exactly (legacy ``concat_dim`` / ``slice_dim``,
Reshape's 0 / -1 / axis / num_axes, ArgMax's 3-axis minimum); every rule Caffe enforces with a
CHECK is a ``LayerError`` here, raised when the net is built.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from jcaffe.fillers import fill
from jcaffe.layers.base import Context, Layer, Shape, count, register
from jcaffe.proto import caffe_pb2


def _fmt(shape) -> str:
    return str(list(shape))


@register("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected: ``top = bottom_(M x K) · Wᵀ + b`` with ``M = count(:axis)``,
    ``K = count(axis:)``; the top is ``shape[:axis] + [num_output]``.

    Blob 0 is the weight ``[num_output, K]`` (``[K, num_output]`` when ``transpose``, then
    ``top = bottom · W``); blob 1 the bias ``[num_output]`` when ``bias_term``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.inner_product_param
        if not p.HasField("num_output") or p.num_output == 0:
            raise self.error("inner_product_param.num_output must be set to a positive number")
        shape = bottom_shapes[0]
        self.num_output = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.K = count(shape, self.axis)
        self.weight_filler = p.weight_filler
        self.bias_filler = p.bias_filler
        N, K = self.num_output, self.K
        self.blob_shapes = [(K, N) if self.transpose else (N, K)]
        if self.bias_term:
            self.blob_shapes.append((N,))
        return [shape[:self.axis] + (N,)]

    def init(self, key):
        return self.init_weight_bias(key, self.weight_filler, self.bias_filler)

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        lead = x.shape[:self.axis]
        x2 = x.reshape((-1, self.K))
        w = blobs[0].astype(x.dtype)
        dims = (((1,), (0,)), ((), ())) if self.transpose else (((1,), (1,)), ((), ()))
        y = self.config.dot_general(x2, w, dims)
        if self.bias_term:
            y = y + blobs[1].astype(x.dtype).reshape((1, self.num_output))
        return [y.reshape(lead + (self.num_output,))]


@register("Softmax")
class SoftmaxLayer(Layer):
    """``y_i = exp(x_i - max_j x_j) / Σ_j exp(x_j - max_j x_j)`` along ``axis`` (default 1)."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        self.axis = self.canonical_axis(self.param.softmax_param.axis, len(bottom_shapes[0]))
        return [bottom_shapes[0]]

    def apply(self, blobs, bottoms, ctx):
        return [jax.nn.softmax(bottoms[0], axis=self.axis)]


def _legacy_axis(layer: Layer, msg, axis_field: str, legacy_field: str, num_axes: int) -> int:
    """The axis of Concat / Slice: ``axis`` (may be negative) or the legacy unsigned ``*_dim``;
    Caffe rejects both at once."""
    if msg.HasField(axis_field) and msg.HasField(legacy_field):
        raise layer.error(f"give either {axis_field} or {legacy_field}, not both")
    if msg.HasField(legacy_field):
        dim = int(getattr(msg, legacy_field))
        if dim >= num_axes:
            raise layer.shape_error(f"{legacy_field} {dim} out of range for a {num_axes}-axis blob")
        return dim
    return layer.canonical_axis(int(getattr(msg, axis_field)), num_axes)


@register("Concat")
class ConcatLayer(Layer):
    """Joins the bottoms along ``axis`` (legacy ``concat_dim``; default 1). All other axes must
    agree. The gradient of each bottom is its slice of the top's."""

    min_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        first = bottom_shapes[0]
        self.axis = _legacy_axis(self, self.param.concat_param, "axis", "concat_dim", len(first))
        top = list(first)
        for i, s in enumerate(bottom_shapes[1:], 1):
            if len(s) != len(first) or any(a != b for j, (a, b) in enumerate(zip(s, first))
                                           if j != self.axis):
                raise self.shape_error(
                    f"bottom {i} {_fmt(s)} does not match bottom 0 {_fmt(first)} on the axes "
                    f"other than the concat axis {self.axis}")
            top[self.axis] += s[self.axis]
        return [tuple(top)]

    def apply(self, blobs, bottoms, ctx):
        if len(bottoms) == 1:
            return [bottoms[0]]
        return [jnp.concatenate(bottoms, axis=self.axis)]


@register("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along ``axis`` (legacy ``slice_dim``; default 1) at the ``slice_point``s
    (strictly increasing, one fewer than the tops), or into equal parts when none are given."""

    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.slice_param
        self.axis = _legacy_axis(self, p, "axis", "slice_dim", len(shape))
        dim = shape[self.axis]
        n = len(self.top_names)
        points = [int(v) for v in p.slice_point]
        if points:
            if len(points) != n - 1:
                raise self.error(f"has {n} tops, so it needs {n - 1} slice_point(s), "
                                 f"got {len(points)}")
            prev = 0
            for v in points:
                if not prev < v < dim:
                    raise self.shape_error(
                        f"slice_point {points} must be strictly increasing and inside "
                        f"(0, {dim}) on axis {self.axis}")
                prev = v
            bounds = [0] + points + [dim]
        else:
            if dim % n:
                raise self.shape_error(
                    f"{n} tops do not evenly divide axis {self.axis} of size {dim}")
            bounds = [i * (dim // n) for i in range(n + 1)]
        self.bounds = bounds
        tops = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            s = list(shape)
            s[self.axis] = hi - lo
            tops.append(tuple(s))
        return tops

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        return [lax.slice_in_dim(x, lo, hi, axis=self.axis)
                for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]


@register("Split")
class SplitLayer(Layer):
    """Copies the bottom to every top; the bottom's gradient is the sum of the tops'."""

    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom_shapes):
        return [bottom_shapes[0]] * len(self.top_names)

    def apply(self, blobs, bottoms, ctx):
        return [bottoms[0]] * len(self.top_names)


@register("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise over same-shaped bottoms: PROD ``Π x_i``; SUM ``Σ coeff_i · x_i`` (one
    ``coeff`` per bottom, default all 1); MAX ``max_i x_i``.

    MAX routes the gradient to one bottom per element, chosen as Caffe's forward does: bottom 1
    wins a tie with bottom 0 (Caffe compares ``x0 > x1``), and any later bottom takes over only
    when strictly greater — so on other ties the earliest maximal bottom gets it. PROD's gradient
    is the product of the other bottoms (Caffe's ``stable_prod_grad``, which is also exact when a
    bottom is 0; the flag is accepted and has no other effect).
    """

    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.eltwise_param
        self.op = p.operation
        n = len(bottom_shapes)
        if len(p.coeff) not in (0, n):
            raise self.error(f"takes one coeff per bottom: {n} bottoms, {len(p.coeff)} coeffs")
        if self.op == caffe_pb2.EltwiseParameter.PROD and len(p.coeff):
            raise self.error("coeff applies to SUM only, not PROD")
        self.coeffs = [float(c) for c in p.coeff] if len(p.coeff) else [1.0] * n
        first = bottom_shapes[0]
        for i, s in enumerate(bottom_shapes[1:], 1):
            if s != first:
                raise self.shape_error(f"bottom {i} {_fmt(s)} differs from bottom 0 {_fmt(first)}")
        return [first]

    def apply(self, blobs, bottoms, ctx):
        xs = bottoms
        if self.op == caffe_pb2.EltwiseParameter.PROD:
            return [functools.reduce(operator.mul, xs)]
        if self.op == caffe_pb2.EltwiseParameter.SUM:
            terms = [x if c == 1.0 else c * x for c, x in zip(self.coeffs, xs)]
            return [functools.reduce(operator.add, terms)]
        top = jnp.where(xs[0] > xs[1], xs[0], xs[1])
        for x in xs[2:]:
            top = jnp.where(x > top, x, top)
        return [top]


@register("Flatten")
class FlattenLayer(Layer):
    """Merges axes ``axis`` .. ``end_axis`` (inclusive; defaults 1 and -1) into one."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.flatten_param
        start = self.canonical_axis(p.axis, len(shape))
        end = self.canonical_axis(p.end_axis, len(shape))
        if end < start:
            raise self.shape_error(f"end_axis {p.end_axis} comes before axis {p.axis}")
        return [shape[:start] + (count(shape, start, end + 1),) + shape[end + 1:]]

    def apply(self, blobs, bottoms, ctx):
        return [bottoms[0].reshape(self.top_shapes[0])]


@register("Reshape")
class ReshapeLayer(Layer):
    """Replaces axes ``[axis, axis + num_axes)`` (all from ``axis`` when ``num_axes`` is -1;
    a negative ``axis`` counts from past the end, -1 meaning after the last axis) with
    ``shape``. A 0 in ``shape`` copies the bottom's dim at the same position; one -1 is inferred
    so the count is unchanged. The data are not reordered."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        nd = len(shape)
        p = self.param.reshape_param
        dims = [int(d) for d in p.shape.dim]
        copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"shape {dims} has more than one -1; at most one dim can be inferred")
        if any(d < -1 for d in dims):
            raise self.error(f"shape {dims} has a dim below -1")
        start = p.axis if p.axis >= 0 else nd + p.axis + 1
        if not 0 <= start <= nd:
            raise self.shape_error(f"axis {p.axis} out of range for a {nd}-axis blob")
        if p.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all, got {p.num_axes}")
        end = nd if p.num_axes == -1 else start + p.num_axes
        if end > nd:
            raise self.shape_error(f"axis + num_axes = {end} is past the bottom's {nd} axes")
        top = list(shape[:start]) + dims + list(shape[end:])
        for i in copy_axes:
            if start + i >= nd:
                raise self.shape_error(f"shape dim {i} is 0 but the bottom has no axis "
                                       f"{start + i} to copy")
            top[start + i] = shape[start + i]
        total = count(shape)
        if inferred:
            known = count(top[:start + inferred[0]]) * count(top[start + inferred[0] + 1:])
            if known == 0 or total % known:
                raise self.shape_error(f"cannot infer the -1 in shape {dims}: the bottom's count "
                                       f"{total} is not divisible by {known}")
            top[start + inferred[0]] = total // known
        if count(top) != total:
            raise self.shape_error(f"shape {dims} gives top {_fmt(top)} of count {count(top)}, "
                                   f"but the bottom's count is {total}")
        return [tuple(top)]

    def apply(self, blobs, bottoms, ctx):
        return [bottoms[0].reshape(self.top_shapes[0])]


@register("Crop")
class CropLayer(Layer):
    """Crops bottom 0 to bottom 1's shape on every axis from ``axis`` on (default 2), starting
    at ``offset`` (none: 0; one value: every cropped axis; else one per cropped axis). Axes
    before ``axis`` are kept. Bottom 1 only gives the shape and receives no gradient."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        src, ref = bottom_shapes
        nd = len(src)
        p = self.param.crop_param
        axis = self.canonical_axis(p.axis, nd)
        offsets = [int(o) for o in p.offset]
        if len(offsets) > 1 and len(offsets) != nd - axis:
            raise self.error(f"gives {len(offsets)} offsets; it needs one, or one per cropped "
                             f"axis ({nd - axis}: axes {axis}..{nd - 1})")
        if len(ref) < nd:
            raise self.shape_error(f"bottom 1 has {len(ref)} axes, fewer than bottom 0's {nd}")
        self.starts = []
        top = []
        for i in range(nd):
            off, size = 0, src[i]
            if i >= axis:
                size = ref[i]
                off = offsets[0] if len(offsets) == 1 else (offsets[i - axis] if offsets else 0)
                if off + size > src[i]:
                    raise self.shape_error(f"crop of axis {i} to size {size} at offset {off} "
                                           f"is out of bounds (bottom 0 has {src[i]})")
            self.starts.append(off)
            top.append(size)
        return [tuple(top)]

    def apply(self, blobs, bottoms, ctx):
        shape = self.top_shapes[0]
        limits = [s + n for s, n in zip(self.starts, shape)]
        return [lax.slice(bottoms[0], self.starts, limits)]


@register("ArgMax")
class ArgMaxLayer(Layer):
    """The indices (as floats) of the ``top_k`` largest values, and their values too when
    ``out_max_val``.

    With ``axis``: along that axis; the top is the bottom's shape with ``top_k`` at ``axis`` and
    holds the values instead of the indices when ``out_max_val``. Without: over each item's
    flattened ``count(1:)``; the top is ``[N, 1 (2 with out_max_val), top_k]`` padded with 1s
    to the bottom's rank (at least 3 axes), holding the indices then the values. Ties rank the
    higher index first, as Caffe's sort of (value, index) pairs does. No gradient (Caffe has no
    backward pass).
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        if self.top_k < 1:
            raise self.error("top_k must be at least 1")
        self.has_axis = p.HasField("axis")
        if self.has_axis:
            self.axis = self.canonical_axis(p.axis, len(shape))
            if self.top_k > shape[self.axis]:
                raise self.shape_error(f"top_k {self.top_k} exceeds the size {shape[self.axis]} "
                                       f"of axis {self.axis}")
            top = list(shape)
            top[self.axis] = self.top_k
        else:
            if self.top_k > count(shape, 1):
                raise self.shape_error(f"top_k {self.top_k} exceeds the {count(shape, 1)} "
                                       f"values per item")
            top = [1] * max(len(shape), 3)
            top[0] = shape[0]
            top[1] = 2 if self.out_max_val else 1
            top[2] = self.top_k
        return [tuple(top)]

    def _top_k(self, x):
        """lax.top_k along the last axis, with ties going to the higher index."""
        dim = x.shape[-1]
        vals, rev_idx = lax.top_k(jnp.flip(x, axis=-1), self.top_k)
        return vals, (dim - 1) - rev_idx

    def apply(self, blobs, bottoms, ctx):
        x = lax.stop_gradient(bottoms[0])
        if self.has_axis:
            vals, idx = self._top_k(jnp.moveaxis(x, self.axis, -1))
            out = vals if self.out_max_val else idx.astype(x.dtype)
            return [jnp.moveaxis(out, -1, self.axis)]
        vals, idx = self._top_k(x.reshape((x.shape[0], -1)))
        out = idx.astype(x.dtype)
        if self.out_max_val:
            out = jnp.concatenate([out, vals], axis=1)
        return [out.reshape(self.top_shapes[0])]


@register("Silence")
class SilenceLayer(Layer):
    """Consumes any bottoms and produces nothing (keeps unused tops from being reported as
    outputs); sends no gradient back."""

    min_bottoms = 1
    exact_tops = 0

    def setup(self, bottom_shapes):
        return []

    def apply(self, blobs, bottoms, ctx):
        return []


@register("Reduction")
class ReductionLayer(Layer):
    """Reduces all axes from ``axis`` on (default 0: to a scalar), times ``coeff``: SUM ``Σx``,
    ASUM ``Σ|x|``, SUMSQ ``Σx²``, MEAN ``Σx / count(axis:)``. The top is ``shape[:axis]``.
    ASUM's gradient is ``sign(x)`` (0 at 0, as Caffe)."""

    exact_bottoms = 1
    exact_tops = 1

    _OPS = {caffe_pb2.ReductionParameter.SUM, caffe_pb2.ReductionParameter.ASUM,
            caffe_pb2.ReductionParameter.SUMSQ, caffe_pb2.ReductionParameter.MEAN}

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.reduction_param
        if p.operation not in self._OPS:
            raise self.error(f"unknown reduction operation {p.operation}")
        self.op = p.operation
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.dim = count(shape, self.axis)
        self.coeff = float(p.coeff)
        if self.op == caffe_pb2.ReductionParameter.MEAN:
            self.coeff /= self.dim
        return [shape[:self.axis]]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        x = x.reshape(x.shape[:self.axis] + (self.dim,))
        R = caffe_pb2.ReductionParameter
        if self.op == R.ASUM:
            x = x * lax.stop_gradient(jnp.sign(x))
        elif self.op == R.SUMSQ:
            x = x * x
        y = jnp.sum(x, axis=-1)
        return [y if self.coeff == 1.0 else self.coeff * y]


@register("Tile")
class TileLayer(Layer):
    """Repeats the bottom ``tiles`` times along ``axis`` (default 1): each block
    ``x[..., :, ...]`` of axes ``axis:`` is copied whole, like ``numpy.tile``."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles must be given")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.tiles = int(p.tiles)
        top = list(shape)
        top[self.axis] *= self.tiles
        return [tuple(top)]

    def apply(self, blobs, bottoms, ctx):
        reps = [1] * bottoms[0].ndim
        reps[self.axis] = self.tiles
        return [jnp.tile(bottoms[0], reps)]


@register("Embed")
class EmbedLayer(Layer):
    """Lookup table: ``top[..., :] = W[int(bottom[...]), :] (+ b)``; the top is the bottom's
    shape plus ``[num_output]``. Blob 0 is ``W`` ``[input_dim, num_output]``, blob 1 the bias
    ``[num_output]``. Indices arrive as floats and are truncated toward zero (Caffe's cast).

    Caffe leaves out-of-range indices unchecked in release builds (undefined reads); here they
    are clamped to ``[0, input_dim - 1]``, since traced data cannot raise. The bottom gets no
    gradient (Caffe refuses to backpropagate to it).
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.embed_param
        if not p.num_output:
            raise self.error("embed_param.num_output must be set to a positive number")
        if not p.input_dim:
            raise self.error("embed_param.input_dim must be set to a positive number")
        self.num_output = int(p.num_output)
        self.input_dim = int(p.input_dim)
        self.bias_term = bool(p.bias_term)
        self.weight_filler = p.weight_filler
        self.bias_filler = p.bias_filler
        self.blob_shapes = [(self.input_dim, self.num_output)]
        if self.bias_term:
            self.blob_shapes.append((self.num_output,))
        return [bottom_shapes[0] + (self.num_output,)]

    def init(self, key):
        return self.init_weight_bias(key, self.weight_filler, self.bias_filler)

    def apply(self, blobs, bottoms, ctx):
        x = lax.stop_gradient(bottoms[0])
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else blobs[0].dtype
        if jnp.issubdtype(x.dtype, jnp.floating):
            # Clamp before the cast: out-of-range floats have no defined integer conversion.
            x = jnp.clip(x, 0, self.input_dim - 1)
        idx = x.astype(jnp.int32)
        y = jnp.take(blobs[0].astype(dtype), idx.reshape(-1), axis=0, mode="clip")
        if self.bias_term:
            y = y + blobs[1].astype(dtype).reshape((1, self.num_output))
        return [y.reshape(x.shape + (self.num_output,))]


def _shape_of(layer: Layer, blob_shape, which: str) -> Shape:
    dims = tuple(int(d) for d in blob_shape.dim)
    if any(d < 0 for d in dims):
        raise layer.error(f"{which} {list(dims)} has a negative dim")
    return dims


@register("Input")
class InputLayer(Layer):
    """The net's inputs: its tops are arrays fed by the host, of the ``input_param`` shapes
    (one shape for every top, or one per top). ``apply`` returns the fed arrays unchanged."""

    exact_bottoms = 0
    min_tops = 1
    is_data = True

    def setup(self, bottom_shapes):
        shapes = list(self.param.input_param.shape)
        n = len(self.top_names)
        if not shapes:
            raise self.error("input_param needs a shape for its tops")
        if len(shapes) not in (1, n):
            raise self.error(f"gives {len(shapes)} shapes for {n} tops: give one shape, "
                             f"or one per top")
        return [_shape_of(self, shapes[0 if len(shapes) == 1 else i], "shape") for i in range(n)]

    def input_specs(self):
        return [(name, shape, jnp.float32) for name, shape in zip(self.top_names, self.top_shapes)]

    def apply(self, blobs, bottoms, ctx):
        return list(bottoms)


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops generated by fillers at every forward pass: shapes from ``shape`` or the legacy
    ``num``/``channels``/``height``/``width`` (each given once for all tops or once per top);
    ``data_filler`` none (constant 0), one for all tops, or one per top. Constant tops are
    constants; random ones are redrawn each call from the context key, folded in per top."""

    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.dummy_data_param
        n = len(self.top_names)
        nf = len(p.data_filler)
        if nf not in (0, 1, n):
            raise self.error(
                f"gives {nf} data_fillers for {n} tops: give none, one, or one per top")
        legacy = {f: list(getattr(p, f)) for f in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise self.error("gives both shape and the legacy num/channels/height/width")
            for f, vals in legacy.items():
                if len(vals) not in (1, n):
                    raise self.error(f"gives {f} {len(vals)} times for {n} tops: give it once, "
                                     f"or once per top")
            shapes = [tuple(int(v[0 if len(v) == 1 else i]) for v in legacy.values())
                      for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(f"gives {len(p.shape)} shapes for {n} tops: give one shape, "
                                 f"or one per top")
            shapes = [_shape_of(self, p.shape[0 if len(p.shape) == 1 else i], "shape")
                      for i in range(n)]
        if nf == 0:
            self.fillers = [caffe_pb2.FillerParameter(type="constant", value=0.0)] * n
        else:
            self.fillers = [p.data_filler[0 if nf == 1 else i] for i in range(n)]
        self.needs_key = any(f.type != "constant" for f in self.fillers)
        # Run each filler abstractly now so a bad filler fails at build time, not at trace time.
        probe = jax.random.key(0)
        for i, (f, s) in enumerate(zip(self.fillers, shapes)):
            jax.eval_shape(lambda k, f=f, s=s, i=i: fill(f, s, k, jnp.float32, self._where(i)),
                           probe)
        return shapes

    def _where(self, i: int) -> str:
        return f"layer '{self.name}' (type {self.type}) top {i}"

    def apply(self, blobs, bottoms, ctx: Context):
        # Caffe refills a randomly filled top at every forward pass, in either phase.
        key = ctx.require_key(self, "to refill its randomly filled tops (fillers "
                              f"{', '.join(sorted({f.type for f in self.fillers} - {'constant'}))}"
                              "), which Caffe does at every forward pass in either phase"
                              ) if self.needs_key else None
        tops = []
        for i, (f, s) in enumerate(zip(self.fillers, self.top_shapes)):
            k = None if f.type == "constant" else jax.random.fold_in(key, i)
            tops.append(fill(f, s, k, jnp.float32, self._where(i)))
        return tops


@register("Parameter")
class ParameterLayer(Layer):
    """Caffe's ParameterLayer: one learnable blob of ``parameter_param.shape``, exposed as the
    top (``top = blobs[0]``, so the top's gradient is the blob's). No filler: the blob starts
    at zero, as a fresh Caffe Blob, unless inline ``blobs`` or a ``.caffemodel`` provide it."""

    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom_shapes):
        self.blob_shapes = [_shape_of(self, self.param.parameter_param.shape,
                                      "parameter_param.shape")]
        return list(self.blob_shapes)

    def apply(self, blobs, bottoms, ctx):
        return [blobs[0]]


@register("BatchReindex")
class BatchReindexLayer(Layer):
    """Caffe's BatchReindexLayer: ``top[i] = data[int(index[i])]`` along the first axis, for a
    1-axis index bottom (float values truncated toward zero, as ``static_cast<int>``); the top
    has ``len(index)`` items. The gradient into ``data`` is the scatter-add of the top's
    gradient (an item picked twice gets both); none flows into the index.

    Caffe CHECK-fails on an index outside ``[0, N)`` at run time; inside a compiled step
    jcaffe cannot stop, so such an item's top row is NaN (and gets no gradient)."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        data, index = bottom_shapes
        if len(index) != 1:
            raise self.shape_error(f"the index bottom must have 1 axis, got {len(index)}")
        if len(data) < 1:
            raise self.shape_error("the data bottom needs at least one axis")
        return [(index[0],) + tuple(data[1:])]

    def apply(self, blobs, bottoms, ctx):
        x, index = bottoms
        idx = lax.stop_gradient(index).astype(jnp.int32)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        return [jnp.take(x, idx, axis=0, mode="fill", fill_value=jnp.nan)]


@register("Filter")
class FilterLayer(Layer):
    """Caffe's FilterLayer (``top[k]`` = the items of ``bottom[k]`` whose selector, the last
    bottom, is nonzero) is not supported: its tops' batch size is the number of nonzero
    selectors in each batch, and Caffe reshapes the rest of the net on every forward pass. A
    compiled jcaffe step has static shapes, so no count fixed when the net is built can be
    right for every batch. The net is rejected when it is built, with the alternatives that
    keep shapes static."""

    min_bottoms = 2
    min_tops = 1

    def setup(self, bottom_shapes):
        if len(self.top_names) != len(bottom_shapes) - 1:
            raise self.error(f"needs one top per data bottom ({len(bottom_shapes) - 1}), got "
                             f"{len(self.top_names)}")
        raise self.error(
            "not supported: its output batch size is the number of nonzero selectors in each "
            "batch (data-dependent), and a compiled jcaffe step needs static shapes; to leave "
            "items out of a loss, give their labels the loss's ignore_label, or multiply by the "
            "selector (Eltwise PROD) instead")
