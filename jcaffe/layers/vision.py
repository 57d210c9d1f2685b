"""Vision layers: Convolution, Deconvolution, Pooling, LRN.

Shapes, blob layouts, output-size rules and numerics are Caffe's. Two interchangeable
formulations exist for convolution and pooling, chosen statically when a layer is built:

* convolution: ``"xla"`` (``lax.conv_general_dilated``), ``"im2col"`` (one strided slice per
  kernel offset stacked into columns, then one ``dot_general`` per group, as Caffe's own CPU
  path does) or, for 2-d channels-last float32 convolutions on CPU, ``"onednn"`` (oneDNN's
  JIT-compiled convolution kernels called from XLA, ``jcaffe.onednn``). XLA's CPU convolutions
  are slow in the weight gradient, im2col is about twice as fast there, and oneDNN's kernels
  2.5x faster again on CIFAR-10 quick (``benchmarks/README.md``).
* pooling: ``"slices"`` (one strided slice per window offset; a running strict ``>`` max picks
  the first maximum of a window like Caffe, and the running sum adds in Caffe's order) or
  ``"reduce_window"`` (``lax.reduce_window``). On CPU the slices are the faster of the two.

On CPU the Net runs 4-axis blobs channels-last (``apply_nhwc``): convolution is then one
``[N*OH*OW, kh*kw*C] x [kh*kw*C, O]`` GEMM per group, and for one group its backward pass is
written by hand (weight gradient against the saved columns, input gradient as a GEMM and a
col2im), because XLA fuses the autodiff of the column stacking poorly. Non-overlapping MAX
pooling is a reshape + max whose hand-written gradient goes to the first maximum of each
window, as Caffe's mask does.

The formulations come from the layer's ``config`` (``jcaffe.config.Config``: ``conv`` and
``pool``, ``"auto"`` meaning onednn where it applies and was built, else im2col, and slices on
the CPU backend, xla and reduce_window elsewhere); a built layer keeps its choice in
``layer.impl``. Every convolution and GEMM
multiplies in ``config.precision`` (``Config.dot_general`` / ``Config.conv_general_dilated``:
full float32 by default, as Caffe).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcaffe import onednn
from jcaffe.config import CONV_IMPLS, POOL_IMPLS  # noqa: F401  (re-exported)
from jcaffe.layers.base import Layer, Shape, count, register
from jcaffe.proto import caffe_pb2

def _offsets(kernel):
    """Kernel offsets in Caffe's row-major window order."""
    return list(itertools.product(*(range(k) for k in kernel)))


def _window_slices(x, kernel, stride, dilation, out_sp):
    """For each kernel offset, the strided slice of ``x`` [N, C, *spatial] that the offset
    reads in every output position (``x`` already padded)."""
    lead = x.shape[:2]
    pieces = []
    for off in _offsets(kernel):
        start = tuple(o * d for o, d in zip(off, dilation))
        limit = tuple(s0 + st * (n - 1) + 1 for s0, st, n in zip(start, stride, out_sp))
        pieces.append(lax.slice(x, (0, 0) + start, lead + limit, (1, 1) + tuple(stride)))
    return pieces


# ------------------------------------------------------------------------------------------
# Channels-last im2col convolution with a hand-written backward pass
# ------------------------------------------------------------------------------------------
# XLA's CPU fusion of a concatenate with kh*kw operands materialises every slice on its own
# and then copies them again; stacking one kernel row at a time (kw slices, then kh rows) is
# one fused pass per level and 5-8x faster. Autodiff of that im2col gives a col2im that XLA
# fuses just as badly, so the backward pass is written out: the weight gradient is one GEMM
# against the saved columns, the input gradient one GEMM and a col2im that adds the kernel
# offsets of one row at a time.

def _im2col_nhwc(x, kernel, stride, dilation, out_sp):
    """[N, H, W, C] (already padded) → columns [N*OH*OW, kh*kw*C], (ky, kx, c) order."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_sp
    n, c = x.shape[0], x.shape[3]
    rows = []
    for i in range(kh):
        pieces = [lax.slice(x, (0, i * dh, j * dw, 0),
                            (n, i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1, c),
                            (1, sh, sw, 1)) for j in range(kw)]
        rows.append(jnp.stack(pieces, axis=3))  # [N, OH, OW, kw, C]
    return jnp.stack(rows, axis=3).reshape(n * oh * ow, kh * kw * c)


def _col2im_nhwc(dcols, x_shape, kernel, stride, dilation, out_sp):
    """The adjoint of :func:`_im2col_nhwc`: each column entry is added back to the input
    position it was read from."""
    (kh, kw), (oh, ow) = kernel, out_sp
    n, c = x_shape[0], x_shape[3]
    d = dcols.reshape(n, oh, ow, kh, kw, c)
    return _col2im_pieces(lambda i, j: d[:, :, :, i, j, :], x_shape, kernel, stride,
                          dilation, out_sp)


def _col2im_pieces(piece, x_shape, kernel, stride, dilation, out_sp):
    """Adds ``piece(i, j)`` [N, OH, OW, C], the cotangent of kernel offset (i, j), back to
    the [N, H, W, C] positions that offset reads."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_sp
    h, w = x_shape[1], x_shape[2]
    if (sh > 1 or sw > 1) and dh == dw == 1:
        return _col2im_phases(piece, x_shape, kernel, stride, out_sp)
    total = None
    for i in range(kh):
        row = None
        for j in range(kw):
            lo = j * dw
            hi = w - (lo + sw * (ow - 1) + 1)
            p = piece(i, j)
            p = lax.pad(p, jnp.zeros((), p.dtype), [(0, 0, 0), (0, 0, 0), (lo, hi, sw - 1),
                                                    (0, 0, 0)])
            row = p if row is None else row + p
        # Without the barrier XLA fuses all kh*kw pads into one loop that tests every
        # offset for every output element.
        row = lax.optimization_barrier(row)
        lo = i * dh
        hi = h - (lo + sh * (oh - 1) + 1)
        p = lax.pad(row, jnp.zeros((), row.dtype),
                    [(0, 0, 0), (lo, hi, sh - 1), (0, 0, 0), (0, 0, 0)])
        total = p if total is None else total + p
    return total


def _col2im_phases(piece, x_shape, kernel, stride, out_sp):
    """:func:`_col2im_pieces` for strides above 1, by phases: input row ``s*q + r`` only
    receives kernel rows ``k = s*a + r`` (from output row ``q - a``). Each of the s_h*s_w
    phases is a sum of shifted pieces without interior padding, and the phases interleave
    into the input with one stack and a reshape (CIFAR-10 quick pool1's backward: 11.7 ->
    2.2 ms against padding every piece with holes to the full input size)."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_sp
    n, h, w, c = x_shape
    qh, qw = -(-h // sh), -(-w // sw)
    dtype = piece(0, 0).dtype
    zero = jnp.zeros((), dtype)
    phase_rows = []
    for rh in range(sh):
        phases = []
        for rw in range(sw):
            acc = None
            for i in range(rh, kh, sh):
                for j in range(rw, kw, sw):
                    ah, aw = i // sh, j // sw
                    p = lax.pad(piece(i, j), zero, [(0, 0, 0), (ah, qh - ah - oh, 0),
                                                    (aw, qw - aw - ow, 0), (0, 0, 0)])
                    acc = p if acc is None else acc + p
            phases.append(jnp.zeros((n, qh, qw, c), dtype) if acc is None else acc)
        phase_rows.append(jnp.stack(phases, axis=3))             # [N, qh, qw, sw, C]
    full = jnp.stack(phase_rows, axis=2).reshape(n, qh * sh, qw * sw, c)
    return full[:, :h, :w, :]


class _ConvGeometry(NamedTuple):
    """Static geometry of a channels-last convolution (hashable, for custom_vjp)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int]
    out_sp: tuple[int, int]
    chunks: int  # batch pieces


def _pad_hw(x, lo_hi):
    return lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in lo_hi] + [(0, 0, 0)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_nhwc(x, wm, geo, config):
    """Convolution of [N, H, W, C] ``x`` with ``wm`` [kh*kw*C, O] → [N, OH, OW, O].

    Columns are built per batch piece (``geo`` chunks), so that each piece's columns stay in
    cache instead of streaming through memory. The backward pass is written out: the weight
    gradient is a GEMM against the columns (kept when the batch is one piece, rebuilt per
    piece otherwise), the input gradient a GEMM to column gradients and a col2im.

    (Measured and not kept: the input gradient of stride-1 "same" convolutions as a
    convolution of the padded output gradient with the flipped kernel, the same FLOPs with
    an im2col instead of a col2im, was 10 % slower on CIFAR-10 quick.)

    ``config`` gives the GEMMs' precision (``Config.dot``)."""
    return _conv_nhwc_fwd(x, wm, geo, config)[0]


def _conv_columns(x, geo):
    """im2col of the zero-padded [N, H, W, C] ``x``."""
    return _im2col_nhwc(_pad_hw(x, [(q, q) for q in geo.pad]), geo.kernel, geo.stride,
                        geo.dilation, geo.out_sp)


def _conv_nhwc_fwd(x, wm, geo, config):
    n, o, out_sp, chunks = x.shape[0], wm.shape[1], geo.out_sp, geo.chunks

    def forward(xc):
        cols = _conv_columns(xc, geo)
        return config.dot(cols, wm), cols

    if chunks == 1:
        y, cols = forward(x)
        return y.reshape((n,) + out_sp + (o,)), (x, wm, cols)
    y = lax.map(lambda xc: forward(xc)[0], x.reshape((chunks, n // chunks) + x.shape[1:]))
    return y.reshape((n,) + out_sp + (o,)), (x, wm, None)


def _conv_nhwc_bwd(geo, config, res, dy):
    kernel, stride, dilation, pad, out_sp, chunks = geo
    x, wm, cols = res
    n, h, w, c = x.shape
    o = wm.shape[1]

    def grads(cols, dyc):
        dyc = dyc.reshape(-1, o)
        dwm = config.dot_general(cols, dyc, (((0,), (0,)), ((), ())))
        dcols = config.dot_general(dyc, wm, (((1,), (1,)), ((), ())))
        b = dcols.shape[0] // (out_sp[0] * out_sp[1])
        dxp = _col2im_nhwc(dcols, (b, h + 2 * pad[0], w + 2 * pad[1], c), kernel, stride,
                           dilation, out_sp)
        return dwm, dxp[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w, :]

    if cols is not None:
        dwm, dx = grads(cols, dy)
        return dx, dwm

    # One pass over the batch pieces: columns rebuilt, weight gradient accumulated, the
    # piece's input gradient.
    def body(dwm, xs):
        xc, dyc = xs
        dw_piece, dx_piece = grads(_conv_columns(xc, geo), dyc)
        return dwm + dw_piece, dx_piece

    b = n // chunks
    dwm, dx = lax.scan(body, jnp.zeros_like(wm), (x.reshape((chunks, b, h, w, c)),
                                                  dy.reshape((chunks, b) + dy.shape[1:])))
    return dx.reshape(x.shape), dwm


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def _conv_geometry(n, c, kernel, stride, dilation, pad, out_sp, chunk_limit) -> _ConvGeometry:
    chunks = _batch_chunks(n, out_sp[0] * out_sp[1] * kernel[0] * kernel[1] * c, chunk_limit)
    return _ConvGeometry(kernel, stride, dilation, pad, out_sp, chunks)


def _batch_chunks(n: int, cols_per_image: int, limit: int) -> int:
    """The fewest equal pieces of a batch of ``n`` whose columns fit ``limit`` elements
    (``Config.chunk_cols_elems``: 4 MB of float32 stay in cache; LeNet conv2 9.8 -> 9.5 ms
    per train step, CIFAR-10 quick 113 -> 98 ms, on 2 cores)."""
    for chunks in range(1, n + 1):
        if n % chunks == 0 and (n // chunks) * cols_per_image <= limit:
            return chunks
    return max(n, 1)  # an empty batch is one (empty) piece



@jax.custom_vjp
def _tiled_max_nhwc(x6):
    """Max over the window axes of ``x6`` [N, PH, kh, PW, kw, C] (non-overlapping windows).

    The gradient goes to the first maximum of each window in Caffe's row-major scan order,
    as Caffe's mask does; autodiff of ``max`` would split it between exact ties."""
    return _tiled_max_nhwc_fwd(x6)[0]


def _tiled_max_nhwc_fwd(x6):
    y = jnp.max(x6, axis=(2, 4))
    return y, (x6, y)


def _first_maximum_grads(piece, kernel, y, dy):
    """{(i, j): the gradient window offset (i, j) receives}: ``dy`` where ``piece(i, j)`` is
    the first element equal to the window's maximum ``y`` in row-major scan order (Caffe's
    mask), zero elsewhere."""
    zero = jnp.zeros((), dy.dtype)
    grads, taken = {}, None
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            hit = piece(i, j) == y
            if taken is not None:
                hit = hit & ~taken
            taken = hit if taken is None else taken | hit
            grads[i, j] = jnp.where(hit, dy, zero)
    return grads


def _tiled_max_nhwc_bwd(res, dy):
    x6, y = res
    kh, kw = x6.shape[2], x6.shape[4]
    g = _first_maximum_grads(lambda i, j: x6[:, :, i, :, j, :], (kh, kw), y, dy)
    rows = [jnp.stack([g[i, j] for j in range(kw)], axis=3) for i in range(kh)]
    return (jnp.stack(rows, axis=2),)  # [N, PH, kh, PW, kw, C]


_tiled_max_nhwc.defvjp(_tiled_max_nhwc_fwd, _tiled_max_nhwc_bwd)


def _pool_pieces(xp, kernel, stride, out_sp):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, out_sp
    n, c = xp.shape[0], xp.shape[3]
    return [[lax.slice(xp, (0, i, j, 0), (n, i + sh * (ph - 1) + 1, j + sw * (pw - 1) + 1, c),
                       (1, sh, sw, 1)) for j in range(kw)] for i in range(kh)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _window_pool_nhwc(xp, kernel, stride, out_sp, is_max):
    """MAX (``is_max``) or SUM over (possibly overlapping) windows of padded [N, H, W, C]
    ``xp``. MAX scans each window in Caffe's row-major order with a strict ``>``, and its
    gradient goes to that first maximum, as Caffe's mask does; SUM's gradient adds the output
    gradient to every element of the window. Both backward passes are a col2im written out
    (autodiff of the slices fuses into one slow loop per offset on CPU)."""
    pieces = [p for row in _pool_pieces(xp, kernel, stride, out_sp) for p in row]
    acc = pieces[0]
    for p in pieces[1:]:
        acc = jnp.where(p > acc, p, acc) if is_max else acc + p
    return acc


def _window_pool_nhwc_fwd(xp, kernel, stride, out_sp, is_max):
    y = _window_pool_nhwc(xp, kernel, stride, out_sp, is_max)
    return y, (xp, y)


def _window_pool_nhwc_bwd(kernel, stride, out_sp, is_max, res, dy):
    xp, y = res
    if is_max:
        pieces = _pool_pieces(xp, kernel, stride, out_sp)
        grads = _first_maximum_grads(lambda i, j: pieces[i][j], kernel, y, dy)
        piece = lambda i, j: grads[i, j]  # noqa: E731
    else:
        piece = lambda i, j: dy  # noqa: E731
    return (_col2im_pieces(piece, xp.shape, kernel, stride, (1, 1), out_sp),)


_window_pool_nhwc.defvjp(_window_pool_nhwc_fwd, _window_pool_nhwc_bwd)


# ------------------------------------------------------------------------------------------
# Convolution / Deconvolution
# ------------------------------------------------------------------------------------------

class _BaseConvolution(Layer):
    """Shared setup of Convolution and Deconvolution (Caffe's BaseConvolutionLayer)."""

    min_bottoms = 1
    min_tops = 1
    # Deconvolution swaps the roles of input and output channels in the weight blob.
    reverse = False

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        p = self.param.convolution_param
        if len(bottom_shapes) != len(self.top_names):
            raise self.error(f"needs one top per bottom, got {len(bottom_shapes)} bottom(s) "
                             f"and {len(self.top_names)} top(s)")
        shape = bottom_shapes[0]
        for i, s in enumerate(bottom_shapes[1:], 1):
            if s != shape:
                raise self.shape_error(f"all bottoms must have the same shape; bottom {i} "
                                       f"{list(s)} differs from bottom 0 {list(shape)}")
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.num_spatial = len(shape) - self.axis - 1
        if self.num_spatial < 1:
            raise self.shape_error(f"needs at least one spatial axis after the channel axis "
                                   f"{self.axis}")
        nsp = self.num_spatial

        self.kernel = self._kernel(p, nsp)
        self.stride = self._spatial(p, "stride", nsp, 1)
        self.pad = self._spatial(p, "pad", nsp, 0)
        self.dilation = self._spatial(p, "dilation", nsp, 1)
        if any(s <= 0 for s in self.stride):
            raise self.error(f"stride must be positive, got {list(self.stride)}")
        if any(d <= 0 for d in self.dilation):
            raise self.error(f"dilation must be positive, got {list(self.dilation)}")

        self.channels = shape[self.axis]
        if not p.HasField("num_output") or p.num_output <= 0:
            raise self.error("convolution_param.num_output must be given and positive")
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if self.group <= 0:
            raise self.error(f"group must be positive, got {self.group}")
        if self.channels % self.group:
            raise self.shape_error(f"input channels ({self.channels}) must be divisible by "
                                   f"group ({self.group})")
        if self.num_output % self.group:
            raise self.error(f"num_output ({self.num_output}) must be divisible by group "
                             f"({self.group})")
        self.bias_term = bool(p.bias_term)

        conv_out, conv_in = ((self.channels, self.num_output) if self.reverse
                             else (self.num_output, self.channels))
        self.blob_shapes = [(conv_out, conv_in // self.group) + self.kernel]
        if self.bias_term:
            self.blob_shapes.append((self.num_output,))

        self.in_spatial = tuple(shape[self.axis + 1:])
        self.out_spatial = self._output_spatial()
        if any(n <= 0 for n in self.out_spatial):
            raise self.shape_error(
                f"output would be empty (spatial size {list(self.out_spatial)} from input "
                f"{list(self.in_spatial)}, kernel {list(self.kernel)}, stride "
                f"{list(self.stride)}, pad {list(self.pad)}, dilation {list(self.dilation)})")
        cols_elems = (count(shape[:self.axis]) * count(self.out_spatial)
                      * (self.channels // self.group) * count(self.kernel))
        # Channels-last im2col turns each convolution into one [N*P, K] x [K, O] GEMM with
        # contiguous rows (2-3x faster on CPU than the channels-first column layout).
        self.nhwc_ok = (not self.reverse and self.axis == 1 and self.num_spatial == 2
                        and len(shape) == 4)
        # `impl` is the layer's formulation; `nchw_impl` the one its channels-first path
        # uses, which falls back to XLA's convolution for large column matrices (XLA's CPU
        # convolution is only fast outside loops: see `scan_ok`).
        self.impl = self.config.conv_for(None if self.nhwc_ok or self.reverse else cols_elems,
                                         onednn_ok=self.nhwc_ok)
        self.nchw_impl = self.config.conv_for(None if self.reverse else cols_elems)
        top = tuple(shape[:self.axis]) + (self.num_output,) + self.out_spatial
        return [top] * len(bottom_shapes)

    def formulation(self, channels_last: bool) -> str:
        """The formulation this layer runs with channels-last or channels-first bottoms."""
        return self.impl if channels_last else self.nchw_impl

    def scan_ok(self, channels_last: bool) -> bool:
        if self.config.scan is not None:
            return self.config.scan
        # XLA's CPU convolution falls back to naive kernels inside loops.
        return not (self.formulation(channels_last) == "xla" and self.config.platform == "cpu")

    def _kernel(self, p, nsp) -> tuple[int, ...]:
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            if nsp != 2:
                raise self.error("kernel_h / kernel_w can only be used for 2-d convolution")
            if len(p.kernel_size):
                raise self.error("give either kernel_size or kernel_h and kernel_w, not both")
            if not (p.HasField("kernel_h") and p.HasField("kernel_w")):
                raise self.error("kernel_h and kernel_w must be given together")
            kernel = (int(p.kernel_h), int(p.kernel_w))
        else:
            n = len(p.kernel_size)
            if n == 0:
                raise self.error("kernel_size (or kernel_h and kernel_w) is required")
            if n not in (1, nsp):
                raise self.error(f"kernel_size must be given once or once per spatial axis "
                                 f"({nsp}), got {n} values")
            kernel = tuple(int(p.kernel_size[0 if n == 1 else i]) for i in range(nsp))
        if any(k <= 0 for k in kernel):
            raise self.error(f"kernel size must be positive, got {list(kernel)}")
        return kernel

    def _spatial(self, p, field, nsp, default) -> tuple[int, ...]:
        if field != "dilation" and (p.HasField(field + "_h") or p.HasField(field + "_w")):
            if nsp != 2:
                raise self.error(f"{field}_h / {field}_w can only be used for 2-d convolution")
            if len(getattr(p, field)):
                raise self.error(f"give either {field} or {field}_h and {field}_w, not both")
            # Caffe reads both, an unset one taking the field's proto default.
            return (int(getattr(p, field + "_h")), int(getattr(p, field + "_w")))
        values = list(getattr(p, field))
        if len(values) not in (0, 1, nsp):
            raise self.error(f"{field} must be given once or once per spatial axis ({nsp}), "
                             f"got {len(values)} values")
        if not values:
            return (default,) * nsp
        return tuple(int(values[0 if len(values) == 1 else i]) for i in range(nsp))

    def _extent(self, i):
        return self.dilation[i] * (self.kernel[i] - 1) + 1

    def init(self, key: jax.Array) -> list[jax.Array]:
        p = self.param.convolution_param
        return self.init_weight_bias(key, p.weight_filler, p.bias_filler)

    def apply(self, blobs, bottoms, ctx):
        tops = []
        for x in bottoms:
            lead = x.shape[:self.axis]
            x4 = x.reshape((count(lead), self.channels) + self.in_spatial)
            w = blobs[0].astype(x.dtype)
            y = self._forward(x4, w)
            if self.bias_term:
                b = blobs[1].astype(x.dtype)
                y = y + b.reshape((1, self.num_output) + (1,) * self.num_spatial)
            tops.append(y.reshape(tuple(lead) + (self.num_output,) + self.out_spatial))
        return tops


@register("Convolution")
class Convolution(_BaseConvolution):
    """Caffe's ConvolutionLayer (cross-correlation, like Caffe):

    ``top[n, o, y] = bias[o] + sum_{c in group(o), k} weight[o, c, k] * xpad[n, c, y*s + k*d]``

    (s = stride, d = dilation)
    with the input zero-padded by ``pad`` on both sides of each spatial axis. Weight blob
    ``[num_output, channels/group, *kernel]``, bias ``[num_output]``. Each spatial output size
    rounds down: ``(in + 2*pad - (dilation*(k-1)+1)) // stride + 1``. Several bottoms share the
    weights, one top each. Axes before ``axis`` are batch axes; any number of spatial axes.
    """

    def _output_spatial(self):
        return tuple((n + 2 * self.pad[i] - self._extent(i)) // self.stride[i] + 1
                     for i, n in enumerate(self.in_spatial))

    def _forward(self, x, w):
        if self.nchw_impl == "xla":
            return self.config.conv_general_dilated(
                x, w, self.stride, [(q, q) for q in self.pad], rhs_dilation=self.dilation,
                feature_group_count=self.group)
        return self._im2col(x, w)

    def _im2col(self, x, w):
        n, c = x.shape[:2]
        g, o = self.group, self.num_output
        if any(self.pad):
            x = lax.pad(x, jnp.zeros((), x.dtype),
                        [(0, 0, 0)] * 2 + [(q, q, 0) for q in self.pad])
        pieces = _window_slices(x, self.kernel, self.stride, self.dilation, self.out_spatial)
        kk = len(pieces)
        p = count(self.out_spatial)
        # Column rows in the weight's (channel, *kernel) order.
        cols = pieces[0] if kk == 1 else jnp.stack(pieces, axis=2)
        kdim = c // g * kk
        if g == 1:
            y = self.config.dot_general(w.reshape(o, kdim), cols.reshape(n, kdim, p),
                                        (((1,), (1,)), ((), ())))  # [O, N, P]
            y = jnp.transpose(y, (1, 0, 2))
        else:
            y = self.config.dot_general(w.reshape(g, o // g, kdim), cols.reshape(n, g, kdim, p),
                                        (((2,), (2,)), ((0,), (1,))))  # [G, O/G, N, P]
            y = jnp.transpose(y, (2, 0, 1, 3))
        return y.reshape((n, o) + self.out_spatial)


    def apply_nhwc(self, blobs, bottoms, ctx):
        """The same convolution on [N, H, W, C] bottoms: columns ``[N*OH*OW, kh*kw*C/g]``
        (kernel offset major, channel minor) times the weight as ``[kh*kw*C/g, O/g]``, or
        oneDNN's kernels, or XLA's convolution (``self.impl``)."""
        tops = []
        for x in bottoms:
            y = self._product_nhwc(x, blobs[0].astype(x.dtype))
            if self.bias_term:
                y = y + blobs[1].astype(x.dtype).reshape(1, 1, 1, self.num_output)
            tops.append(y)
        return tops

    def _product_nhwc(self, x, w):
        g, o = self.group, self.num_output
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        (oh, ow) = self.out_spatial
        n, _, _, c = x.shape
        if self.impl == "onednn" and x.dtype == jnp.float32:
            return onednn.conv2d(x, w, onednn.ConvSpec(self.stride, self.pad, self.dilation, g))
        if self.impl == "xla":
            return self.config.conv_general_dilated(
                x, jnp.transpose(w, (2, 3, 1, 0)), self.stride, [(q, q) for q in self.pad],
                rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=g)
        if g == 1:
            wm = jnp.transpose(w, (2, 3, 1, 0)).reshape(kh * kw * c, o)
            geo = _conv_geometry(n, c, self.kernel, self.stride, self.dilation, self.pad,
                                 self.out_spatial, self.config.chunk_cols_elems)
            return _conv_nhwc(x, wm, geo, self.config)
        if any(self.pad):
            x = lax.pad(x, jnp.zeros((), x.dtype),
                        [(0, 0, 0)] + [(q, q, 0) for q in self.pad] + [(0, 0, 0)])
        pieces = [lax.slice(x, (0, i * dh, j * dw, 0),
                            (n, i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1, c),
                            (1, sh, sw, 1))
                  for i in range(kh) for j in range(kw)]
        cols = pieces[0] if len(pieces) == 1 else jnp.stack(pieces, axis=3)
        kk, cg, og = kh * kw, c // g, o // g
        cols = jnp.transpose(cols.reshape(n * oh * ow, kk, g, cg), (2, 0, 1, 3))
        wm = jnp.transpose(w.reshape(g, og, cg, kh, kw), (0, 3, 4, 2, 1))
        y = self.config.dot_general(cols.reshape(g, n * oh * ow, kk * cg),
                                    wm.reshape(g, kk * cg, og),
                                    (((2,), (1,)), ((0,), (0,))))  # [G, N*P, O/G]
        return jnp.transpose(y, (1, 0, 2)).reshape(n, oh, ow, o)


@register("Deconvolution")
class Deconvolution(_BaseConvolution):
    """Caffe's DeconvolutionLayer, the transpose of Convolution (its backward-data pass):

    ``top[n, o, y*stride + k*dilation - pad] += weight[c, o, k] * x[n, c, y]`` for c in o's group,

    plus ``bias[o]``. Weight blob ``[channels, num_output/group, *kernel]`` (input channels
    first, the reverse of Convolution), bias ``[num_output]``. Each spatial output size is
    ``stride*(in-1) + dilation*(k-1)+1 - 2*pad``.
    """

    reverse = True

    def _output_spatial(self):
        return tuple(self.stride[i] * (n - 1) + self._extent(i) - 2 * self.pad[i]
                     for i, n in enumerate(self.in_spatial))

    def _forward(self, x, w):
        if self.impl == "xla":
            return self._xla(x, w)
        return self._col2im(x, w)

    def _xla(self, x, w):
        g, c, o, nsp = self.group, self.channels, self.num_output, self.num_spatial
        # As a convolution over the stride-dilated input: per group, swap the weight's in/out
        # channels and flip it spatially.
        wc = w.reshape((g, c // g, o // g) + self.kernel)
        wc = jnp.swapaxes(wc, 1, 2).reshape((o, c // g) + self.kernel)
        wc = jnp.flip(wc, axis=tuple(range(2, 2 + nsp)))
        pads = [(self._extent(i) - 1 - self.pad[i],) * 2 for i in range(nsp)]
        return self.config.conv_general_dilated(
            x, wc, (1,) * nsp, pads, lhs_dilation=self.stride, rhs_dilation=self.dilation,
            feature_group_count=g)

    def _col2im(self, x, w):
        n, c = x.shape[:2]
        g, o, nsp = self.group, self.num_output, self.num_spatial
        offs = _offsets(self.kernel)
        kk = len(offs)
        p = count(self.in_spatial)
        cols = self.config.dot_general(w.reshape(g, c // g, o // g * kk),
                                       x.reshape(n, g, c // g, p), (((1,), (2,)), ((0,), (1,))))
        # [G, O/G*kk, N, P] -> [N, O, kk, *in_spatial]
        cols = jnp.transpose(cols.reshape(g, o // g, kk, n, p), (3, 0, 1, 2, 4))
        cols = cols.reshape((n, o, kk) + self.in_spatial)
        zero = jnp.zeros((), x.dtype)
        out = None
        for j, off in enumerate(offs):
            # Scatter this offset's column into the output: stride-1 zeros between inputs,
            # shifted by k*dilation - pad (negative edge padding crops).
            cfg = [(0, 0, 0), (0, 0, 0)]
            for i in range(nsp):
                lo = off[i] * self.dilation[i] - self.pad[i]
                hi = self.out_spatial[i] - 1 - (lo + self.stride[i] * (self.in_spatial[i] - 1))
                cfg.append((lo, hi, self.stride[i] - 1))
            part = lax.pad(cols[:, :, j], zero, cfg)
            out = part if out is None else out + part
        return out


# ------------------------------------------------------------------------------------------
# Pooling
# ------------------------------------------------------------------------------------------

_PP = caffe_pb2.PoolingParameter


@register("Pooling")
class Pooling(Layer):
    """Caffe's PoolingLayer on [N, C, H, W] bottoms.

    Window (ph, pw) starts at ``ph*stride - pad`` and spans ``kernel``; output size
    ``round((H + 2*pad - kernel) / stride) + 1`` with round_mode CEIL (default) or FLOOR; with
    padding a last window starting at or beyond ``H + pad`` is dropped.

    * MAX: the maximum over the window clipped to the image (padding never wins). The gradient
      goes to one element per window, the first maximum in row-major order, as in Caffe (ties
      included). An optional second top is Caffe's argmax mask: float ``h*W + w`` in the
      unpadded input.
    * AVE: the sum over the window clipped to the image, divided by the window's area clipped
      to ``[-pad, H + pad)`` (padding counts, the CEIL overhang beyond ``H + pad`` does not).
    * STOCHASTIC (Caffe's GPU-only method; no padding allowed): in training (``ctx.train``) each
      window samples one element with probability proportional to its value (inputs are
      expected nonnegative) and passes gradient to it; in testing the output is the
      probability-weighted average ``sum(x^2) / sum(x)`` (0 when the sum is not positive).

    ``global_pooling``: kernel = input size, no kernel_size, pad 0, stride 1. Configurations
    in which a window lies entirely outside the input (stride > kernel without padding, where
    Caffe reads out of bounds) are rejected.
    """

    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        p = self.param.pooling_param
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis (num, channels, height, width) bottom, "
                                   f"got {len(shape)} axes")
        self.pool = p.pool
        if self.pool not in (_PP.MAX, _PP.AVE, _PP.STOCHASTIC):
            raise self.error(f"unknown pooling method {self.pool}")
        self.method = _PP.PoolMethod.Name(self.pool)
        n, c, h, w = shape
        self.global_pooling = bool(p.global_pooling)
        has_k = p.HasField("kernel_size")
        has_kh, has_kw = p.HasField("kernel_h"), p.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                raise self.error("global_pooling takes the kernel from the input; do not give "
                                 "kernel_size / kernel_h / kernel_w")
            kernel = (h, w)
        else:
            if has_k and (has_kh or has_kw):
                raise self.error("give either kernel_size or kernel_h and kernel_w, not both")
            if not has_k and not (has_kh and has_kw):
                raise self.error("kernel_size (or both kernel_h and kernel_w) is required")
            kernel = ((p.kernel_size, p.kernel_size) if has_k else (p.kernel_h, p.kernel_w))
        if p.HasField("pad") and (p.HasField("pad_h") or p.HasField("pad_w")):
            raise self.error("give either pad or pad_h and pad_w, not both")
        if p.HasField("pad_h") != p.HasField("pad_w"):
            raise self.error("pad_h and pad_w must be given together")
        if p.HasField("stride") and (p.HasField("stride_h") or p.HasField("stride_w")):
            raise self.error("give either stride or stride_h and stride_w, not both")
        if p.HasField("stride_h") != p.HasField("stride_w"):
            raise self.error("stride_h and stride_w must be given together")
        pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        self.kernel = tuple(int(k) for k in kernel)
        self.pad = tuple(int(q) for q in pad)
        self.stride = tuple(int(s) for s in stride)
        if any(k <= 0 for k in self.kernel):
            raise self.error(f"kernel size must be positive, got {list(self.kernel)}")
        if any(s <= 0 for s in self.stride):
            raise self.error(f"stride must be positive, got {list(self.stride)}")
        if self.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.error("global_pooling allows only pad 0 and stride 1")
        if any(self.pad):
            if self.pool == _PP.STOCHASTIC:
                raise self.error("padding is implemented only for MAX and AVE pooling")
            if self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]:
                raise self.error(f"pad {list(self.pad)} must be smaller than the kernel "
                                 f"{list(self.kernel)}")
        if len(self.top_names) == 2 and self.pool != _PP.MAX:
            raise self.error(f"{self.method} pooling has one top; only MAX pooling can output "
                             f"a second (mask) top")

        ceil = p.round_mode == _PP.CEIL
        self.in_size = (h, w)
        out = []
        for i, name in enumerate(("height", "width")):
            span = self.in_size[i] + 2 * self.pad[i] - self.kernel[i]
            o = (-(-span // self.stride[i]) if ceil else span // self.stride[i]) + 1
            if self.pad[i] and (o - 1) * self.stride[i] >= self.in_size[i] + self.pad[i]:
                o -= 1
            if o <= 0:
                raise self.shape_error(f"kernel {self.kernel[i]} is larger than the padded input "
                                       f"{name} {self.in_size[i] + 2 * self.pad[i]}")
            if (o - 1) * self.stride[i] - self.pad[i] >= self.in_size[i]:
                raise self.shape_error(
                    f"the last pooling window along the {name} starts at "
                    f"{(o - 1) * self.stride[i] - self.pad[i]}, outside the input of size "
                    f"{self.in_size[i]} (stride {self.stride[i]} > kernel {self.kernel[i]}); "
                    f"use round_mode: FLOOR or a smaller stride")
            out.append(o)
        self.out_size = tuple(out)
        if self.pool == _PP.STOCHASTIC:
            self.needs_key = True
        self.impl = self.config.pool
        self.nhwc_ok = self.pool in (_PP.MAX, _PP.AVE) and len(self.top_names) == 1
        top = (n, c) + self.out_size
        return [top] * len(self.top_names)

    # -- static window geometry ---------------------------------------------------------------
    def _starts(self, i):
        return np.arange(self.out_size[i]) * self.stride[i] - self.pad[i]

    def _high_pad(self, i):
        """Padding after the input so that every (CEIL-overhanging) window fits."""
        need = (self.out_size[i] - 1) * self.stride[i] + self.kernel[i]
        return max(0, need - self.in_size[i] - self.pad[i])

    def _padded(self, x, value):
        cfg = [(0, 0, 0), (0, 0, 0)] + [(self.pad[i], self._high_pad(i), 0) for i in range(2)]
        if not any(lo or hi for lo, hi, _ in cfg):
            return x
        return lax.pad(x, jnp.asarray(value, x.dtype), cfg)

    def _is_tiled(self):
        """Windows tile the input exactly: kernel == stride, no padding, sizes divide."""
        return (self.kernel == self.stride and not any(self.pad)
                and all(self.in_size[i] == self.out_size[i] * self.kernel[i] for i in range(2)))

    def _is_global(self):
        return self.out_size == (1, 1) and self.kernel == self.in_size and not any(self.pad)

    def _pieces(self, x, value):
        """One [N, C, PH, PW] array per window offset, in Caffe's row-major window order."""
        if self._is_tiled():
            n, c = x.shape[:2]
            (kh, kw), (ph, pw) = self.kernel, self.out_size
            x6 = x.reshape(n, c, ph, kh, pw, kw)
            return [x6[:, :, :, i, :, j] for i in range(kh) for j in range(kw)]
        return _window_slices(self._padded(x, value), self.kernel, self.stride, (1, 1),
                              self.out_size)

    def _divisor(self, dtype):
        """Caffe's AVE pool_size per output: the window clipped to [-pad, size + pad)."""
        sizes = []
        for i in range(2):
            start = self._starts(i)
            end = np.minimum(start + self.kernel[i], self.in_size[i] + self.pad[i])
            sizes.append(end - start)
        return jnp.asarray(np.outer(sizes[0], sizes[1]).reshape((1, 1) + self.out_size), dtype)

    def _mask_index(self, dh, dw, dtype):
        """Input index h*W + w that window offset (dh, dw) reads, per output position."""
        hs = self._starts(0) + dh
        ws = self._starts(1) + dw
        idx = hs.reshape(-1, 1) * self.in_size[1] + ws.reshape(1, -1)
        return jnp.asarray(idx.reshape((1, 1) + self.out_size), dtype)

    # -- forward ----------------------------------------------------------------------------
    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        if self.pool == _PP.MAX:
            return self._max(x, want_mask=len(self.top_names) == 2)
        if self.pool == _PP.AVE:
            return [self._ave(x)]
        return [self._stochastic(x, ctx)]

    def _max(self, x, want_mask):
        n, c = x.shape[:2]
        if self._is_global():
            flat = x.reshape(n, c, -1)
            # argmax returns the first maximum, Caffe's strict-'>' scan order.
            arg = jnp.argmax(flat, axis=2, keepdims=True)
            top = jnp.take_along_axis(flat, arg, axis=2).reshape(n, c, 1, 1)
            tops = [top]
            if want_mask:
                tops.append(lax.stop_gradient(arg.astype(x.dtype).reshape(n, c, 1, 1)))
            return tops
        if self.impl == "reduce_window" and not want_mask:
            xp = self._padded(x, -jnp.inf)
            # A numpy init value keeps this the differentiable max-window primitive under jit.
            top = lax.reduce_window(xp, np.array(-np.inf, x.dtype), lax.max,
                                    (1, 1) + self.kernel, (1, 1) + self.stride, "VALID")
            return [top]
        pieces = self._pieces(x, -jnp.inf)
        offs = _offsets(self.kernel)
        best = pieces[0]
        mask = None
        if want_mask:
            mask = jnp.broadcast_to(self._mask_index(*offs[0], x.dtype), best.shape)
        for (dh, dw), piece in zip(offs[1:], pieces[1:]):
            # Strict '>': an equal later value does not replace the first maximum (Caffe), and
            # jnp.where sends the gradient to the kept element only.
            take = piece > best
            best = jnp.where(take, piece, best)
            if want_mask:
                mask = jnp.where(take, self._mask_index(dh, dw, x.dtype), mask)
        tops = [best]
        if want_mask:
            tops.append(lax.stop_gradient(mask))
        return tops

    def _ave(self, x):
        n, c = x.shape[:2]
        if self._is_global():
            return jnp.sum(x, axis=(2, 3), keepdims=True) / float(self.kernel[0] * self.kernel[1])
        if self.impl == "reduce_window":
            total = lax.reduce_window(self._padded(x, 0), np.array(0, x.dtype), lax.add,
                                      (1, 1) + self.kernel, (1, 1) + self.stride, "VALID")
        else:
            pieces = self._pieces(x, 0)
            total = pieces[0]
            for piece in pieces[1:]:
                total = total + piece
        if self._is_tiled():
            return total / float(self.kernel[0] * self.kernel[1])
        return total / self._divisor(x.dtype)

    def apply_nhwc(self, blobs, bottoms, ctx):
        """MAX / AVE pooling of [N, H, W, C] bottoms, the same windows as ``apply``."""
        x = bottoms[0]
        n, h, w, c = x.shape
        (kh, kw), (ph, pw) = self.kernel, self.out_size
        is_max = self.pool == _PP.MAX
        if self._is_global():
            flat = x.reshape(n, h * w, c)
            if is_max:
                arg = jnp.argmax(flat, axis=1, keepdims=True)  # the first maximum, as Caffe
                return [jnp.take_along_axis(flat, arg, axis=1).reshape(n, 1, 1, c)]
            return [jnp.sum(flat, axis=1).reshape(n, 1, 1, c) / float(kh * kw)]
        if self._is_tiled():
            x6 = x.reshape(n, ph, kh, pw, kw, c)
            if is_max:
                # One reduction, not a chain of selects: fused into the neighbouring GEMMs'
                # im2col the chain costs ~2x the whole step on CPU.
                return [_tiled_max_nhwc(x6)]
            return [jnp.sum(x6, axis=(2, 4)) / float(kh * kw)]
        fill = -jnp.inf if is_max else 0
        cfg = [(0, 0, 0)] + [(self.pad[i], self._high_pad(i), 0) for i in range(2)] + [(0, 0, 0)]
        if any(lo or hi for lo, hi, _ in cfg):
            x = lax.pad(x, jnp.asarray(fill, x.dtype), cfg)
        y = _window_pool_nhwc(x, self.kernel, self.stride, self.out_size, is_max)
        if is_max:
            return [y]
        return [y / self._divisor(x.dtype).reshape(1, ph, pw, 1)]

    def _stochastic(self, x, ctx):
        # No padding for STOCHASTIC: the zero fill only covers the CEIL overhang, and zeros
        # change neither the sums nor (placed after real elements) which element is sampled.
        pieces = self._pieces(x, 0)
        if not ctx.train:
            total = pieces[0]
            squares = pieces[0] * pieces[0]
            for piece in pieces[1:]:
                total = total + piece
                squares = squares + piece * piece
            positive = total > 0
            return jnp.where(positive, squares / jnp.where(positive, total, 1), 0)
        key = ctx.require_key(self, "for stochastic pooling's sampling in training mode")
        stacked = jnp.stack(pieces, axis=0)
        data = lax.stop_gradient(stacked)
        running, cums = jnp.zeros_like(data[0]), []
        for piece in data:
            running = running + piece
            cums.append(running)
        cum = jnp.stack(cums, axis=0)
        # Caffe draws u in (0, 1] and takes the first element whose running sum reaches u*sum.
        u = 1 - jax.random.uniform(key, data.shape[1:], x.dtype)
        hit = cum >= (u * cums[-1]).reshape((1,) + data.shape[1:])
        choice = jnp.argmax(hit, axis=0, keepdims=True)
        return jnp.take_along_axis(stacked, choice, axis=0)[0]


# ------------------------------------------------------------------------------------------
# LRN
# ------------------------------------------------------------------------------------------

_LRN = caffe_pb2.LRNParameter


@register("LRN")
class LRN(Layer):
    """Caffe's LRNLayer (local response normalization) on [N, C, H, W] bottoms.

    * ACROSS_CHANNELS: ``y = x * (k + alpha/local_size * sum_{c'} x[c']^2)^(-beta)`` over the
      ``local_size`` channels centred on c, zero-padded at the channel ends.
    * WITHIN_CHANNEL: ``y = x * (1 + alpha * avg)^(-beta)`` where ``avg`` is Caffe's AVE
      pooling of x^2 over a local_size x local_size window with pad (local_size-1)/2, stride 1.
      With that geometry every window's Caffe divisor (padding counted) is local_size^2, so
      ``avg = (zero-padded window sum of x^2) / local_size^2``. ``k`` is unused, as in Caffe.

    ``local_size`` must be odd.
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        p = self.param.lrn_param
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis (num, channels, height, width) bottom, "
                                   f"got {len(shape)} axes")
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.pre_pad = (self.size - 1) // 2
        self.alpha = float(p.alpha)
        self.beta = float(p.beta)
        self.k = float(p.k)
        self.region = p.norm_region
        if self.region not in (_LRN.ACROSS_CHANNELS, _LRN.WITHIN_CHANNEL):
            raise self.error(f"unknown norm_region {self.region}")
        return [shape]

    def _window_sum(self, sq, axis):
        """Zero-padded sum of local_size neighbours along ``axis``."""
        if self.size == 1:
            return sq
        cfg = [(0, 0, 0)] * 4
        cfg[axis] = (self.pre_pad, self.pre_pad, 0)
        padded = lax.pad(sq, jnp.zeros((), sq.dtype), cfg)
        n = sq.shape[axis]
        total = None
        for j in range(self.size):
            part = lax.slice_in_dim(padded, j, j + n, axis=axis)
            total = part if total is None else total + part
        return total

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        sq = x * x
        if self.region == _LRN.ACROSS_CHANNELS:
            scale = self.k + (self.alpha / self.size) * self._window_sum(sq, 1)
        else:
            avg = self._window_sum(self._window_sum(sq, 2), 3) / float(self.size * self.size)
            scale = 1.0 + self.alpha * avg
        return [x * jnp.power(scale, -self.beta)]
