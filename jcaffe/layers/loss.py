"""Loss layers and Accuracy, with Caffe's normalizations, clamps and backward passes.

Every loss's top 0 is a scalar of shape ``()`` (Caffe's 0-axis blob). Labels arrive as float
arrays, as Caffe stores them, and are truncated to int32 like Caffe's ``static_cast<int>``.
Gradients come from JAX autodiff of the forward formula; where Caffe's hand-written backward
is not the exact derivative of its forward (clamped logs, ContrastiveLoss's ``1e-4``), the
forward is written so that autodiff yields Caffe's backward while the value stays Caffe's.
Labels, infogain matrices and the probability tops receive no gradient, as in Caffe (whose
backward refuses label inputs and ignores the diff of the probability top).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf.message import DecodeError

from jcaffe.layers.base import Layer, Shape, count, register
from jcaffe.proto import caffe_pb2

_LP = caffe_pb2.LossParameter

FLT_MIN = float(np.finfo(np.float32).tiny)
# Caffe's kLOG_THRESHOLD (loss_layer.hpp).
kLOG_THRESHOLD = 1e-20

_MODE_NAMES = {_LP.FULL: "FULL", _LP.VALID: "VALID", _LP.BATCH_SIZE: "BATCH_SIZE",
               _LP.NONE: "NONE"}


def _labels(label: jax.Array) -> jax.Array:
    # float -> int32 truncates toward zero, as static_cast<int> does.
    return jax.lax.stop_gradient(label).astype(jnp.int32)


def _clamped_log(logp: jax.Array, floor: float) -> jax.Array:
    """``log(max(p, floor))`` in value, with the gradient of ``log p`` everywhere.

    Caffe clamps the probability only in its forward pass; its backward uses the unclamped
    formula, so a clamped entry must keep the gradient of ``log p``.
    """
    log_floor = math.log(floor)
    return jnp.where(logp >= log_floor, logp,
                     log_floor + (logp - jax.lax.stop_gradient(logp)))


class _LossLayer(Layer):
    """Caffe's LossLayer: two or more bottoms whose first dims agree; a scalar top 0."""

    is_loss = True

    def _check_first_dims(self, bottom_shapes: list[Shape]) -> None:
        a, b = bottom_shapes[0], bottom_shapes[1]
        if len(a) < 1 or len(b) < 1:
            raise self.shape_error("bottoms need at least one axis")
        if a[0] != b[0]:
            raise self.shape_error(
                f"the data and label must have the same first dimension ({a[0]} vs {b[0]})")

    def _read_ignore_label(self) -> None:
        lp = self.param.loss_param
        self.has_ignore_label = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)

    def _read_normalization(self, default_mode: int) -> None:
        lp = self.param.loss_param
        if lp.HasField("normalization"):
            self.normalization = lp.normalization
        elif lp.HasField("normalize"):
            self.normalization = _LP.VALID if lp.normalize else _LP.BATCH_SIZE
        else:
            self.normalization = default_mode

    def _valid(self, label: jax.Array) -> jax.Array:
        if self.has_ignore_label:
            return label != self.ignore_label
        return jnp.ones(label.shape, bool)

    def _normalizer(self, outer: int, inner: int, valid_count: jax.Array, dtype) -> jax.Array:
        """Caffe's get_normalizer, never below 1 (a batch without labels gives loss 0, not NaN)."""
        mode = self.normalization
        if mode == _LP.FULL:
            n = jnp.asarray(outer * inner, dtype)
        elif mode == _LP.VALID:
            n = valid_count.astype(dtype)
        elif mode == _LP.BATCH_SIZE:
            n = jnp.asarray(outer, dtype)
        elif mode == _LP.NONE:
            n = jnp.asarray(1, dtype)
        else:
            raise self.error(f"unknown normalization mode {mode}")
        return jnp.maximum(n, jnp.asarray(1, dtype))

    def _softmax_geometry(self, bottom_shapes: list[Shape], axis_param: int, what: str):
        shape = bottom_shapes[0]
        self.axis = self.canonical_axis(axis_param, len(shape))
        self.outer_num = count(shape, 0, self.axis)
        self.inner_num = count(shape, self.axis + 1)
        self.num_labels = shape[self.axis]
        if self.outer_num * self.inner_num != count(bottom_shapes[1]):
            raise self.shape_error(
                f"number of labels ({count(bottom_shapes[1])}) must match the number of "
                f"predictions ({self.outer_num * self.inner_num}): with {what} axis "
                f"{self.axis} and prediction shape {list(shape)} the label count is "
                f"{self.outer_num}*{self.inner_num}")


def _loss_and_prob(layer, loss_sum, valid, x3, x):
    """The normalized loss top and, when asked for, the softmax probabilities as a second top
    (no gradient flows back through it, as in Caffe)."""
    loss = loss_sum / layer._normalizer(layer.outer_num, layer.inner_num, jnp.sum(valid), x.dtype)
    tops = [loss]
    if len(layer.top_names) >= 2:
        tops.append(jax.lax.stop_gradient(jax.nn.softmax(x3, axis=1)).reshape(x.shape))
    return tops


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_LossLayer):
    """Softmax over ``softmax_param.axis`` followed by the multinomial logistic loss.

    ``loss = -sum_{i,j valid} log(max(p[i, label_ij, j], FLT_MIN)) / normalizer`` with ``p`` the
    softmax over the class axis, valid = label != ``loss_param.ignore_label``, normalizer per
    ``loss_param.normalization`` (VALID: valid count, BATCH_SIZE: outer count, FULL:
    outer*inner, NONE: 1; at least 1; legacy ``normalize: false`` = BATCH_SIZE). Backward is
    Caffe's ``(p - onehot(label)) / normalizer`` with ignored positions zero. Optional top 1 is
    the probabilities (no gradient flows back through it, as in Caffe).
    """

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        self._read_ignore_label()
        self._read_normalization(_LP.VALID)
        self._softmax_geometry(bottom_shapes, self.param.softmax_param.axis, "softmax")
        tops = [()]
        if len(self.param.top) >= 2:
            tops.append(bottom_shapes[0])
        return tops

    def apply(self, blobs, bottoms, ctx):
        x, label = bottoms[0], bottoms[1]
        x3 = x.reshape(self.outer_num, self.num_labels, self.inner_num)
        lab = _labels(label).reshape(self.outer_num, 1, self.inner_num)
        valid = self._valid(lab)
        logp = jax.nn.log_softmax(x3, axis=1)
        picked = jnp.take_along_axis(logp, jnp.clip(lab, 0, self.num_labels - 1), axis=1)
        picked = _clamped_log(picked, FLT_MIN)
        loss_sum = -jnp.sum(jnp.where(valid, picked, jnp.zeros_like(picked)))
        return _loss_and_prob(self, loss_sum, valid, x3, x)


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(_LossLayer):
    """Cross-entropy of ``sigmoid(x)`` against targets ``t`` in [0, 1], computed stably.

    ``loss = -sum_valid [x (t - [x>=0]) - log(1 + exp(x - 2x[x>=0]))] / normalizer``; valid =
    ``int(t) != ignore_label``. Caffe's default normalization for this layer is BATCH_SIZE
    (``N = shape[0]``) unless ``normalization`` or the legacy ``normalize`` is given (VALID
    and FULL count elements). Backward: ``(sigmoid(x) - t) / normalizer``, zero where ignored.
    """

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        self._read_ignore_label()
        self._read_normalization(_LP.BATCH_SIZE)
        x, t = bottom_shapes
        if count(x) != count(t):
            raise self.shape_error(
                f"prediction and target must have the same count ({count(x)} vs {count(t)})")
        self.outer_num = x[0]
        self.inner_num = count(x, 1)
        return [()]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        target = jax.lax.stop_gradient(bottoms[1]).reshape(x.shape).astype(x.dtype)
        valid = self._valid(_labels(target))
        # The indicator is a constant of x, so autodiff of this exact expression yields
        # sigmoid(x) - t everywhere, including x == 0.
        pos = (x >= 0).astype(x.dtype)
        term = x * (target - pos) - jnp.log1p(jnp.exp(x - 2 * x * pos))
        loss_sum = -jnp.sum(jnp.where(valid, term, jnp.zeros_like(term)))
        return [loss_sum / self._normalizer(self.outer_num, self.inner_num,
                                            jnp.sum(valid), x.dtype)]


@register("EuclideanLoss")
class EuclideanLoss(_LossLayer):
    """``loss = sum((a - b)^2) / (2 N)``, N = ``a.shape[0]``; both bottoms receive gradients
    ``±(a - b) / N`` (Caffe lets either input be a prediction)."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        a, b = bottom_shapes
        if count(a, 1) != count(b, 1):
            raise self.shape_error(
                f"inputs must have the same dimension per example ({count(a, 1)} vs {count(b, 1)})")
        self.num = a[0]
        return [()]

    def apply(self, blobs, bottoms, ctx):
        a, b = bottoms
        diff = a - b.reshape(a.shape)
        return [jnp.sum(diff * diff) / self.num / 2]


@register("HingeLoss")
class HingeLoss(_LossLayer):
    """One-vs-all hinge loss: with ``t_ij = -1`` for the true class and ``+1`` otherwise,
    ``v = max(0, 1 + t x)``; L1: ``sum(v) / N``, L2: ``sum(v^2) / N`` (``hinge_loss_param.norm``).
    Backward is Caffe's: L1 ``t [v > 0] / N``, L2 ``2 t v / N``."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        self.norm = self.param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown hinge_loss_param.norm {self.norm} (known: L1, L2)")
        x, label = bottom_shapes
        self.num = x[0]
        self.dim = count(x) // self.num if self.num else 0
        if count(label) != self.num:
            raise self.shape_error(
                f"needs one label per example: {self.num} expected, got {count(label)}")
        return [()]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0].reshape(self.num, self.dim)
        lab = _labels(bottoms[1]).reshape(self.num, 1)
        is_true = jnp.arange(self.dim, dtype=jnp.int32).reshape(1, self.dim) == lab
        t = jnp.where(is_true, -jnp.ones_like(x), jnp.ones_like(x))
        v = 1 + t * x
        v = jnp.where(v > 0, v, jnp.zeros_like(v))
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            return [jnp.sum(v) / self.num]
        return [jnp.sum(v * v) / self.num]


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(_LossLayer):
    """``loss = -sum_i log(max(p[i, label_i], 1e-20)) / N`` for probabilities ``p`` (N, C...).

    Backward is Caffe's ``-1 / (N max(p, 1e-20))`` at the label, also where clamped."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        x, label = bottom_shapes
        self.num = x[0]
        self.dim = count(x) // self.num if self.num else 0
        if count(label) != self.num:
            raise self.shape_error(
                f"needs one label per example (label channels, height, width of 1): "
                f"{self.num} expected, got {count(label)}")
        return [()]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0].reshape(self.num, self.dim)
        lab = jnp.clip(_labels(bottoms[1]).reshape(self.num, 1), 0, self.dim - 1)
        p = jnp.take_along_axis(x, lab, axis=1)
        clamped = jax.lax.stop_gradient(jnp.maximum(p, jnp.asarray(kLOG_THRESHOLD, x.dtype)))
        # Value log(clamped); gradient 1 / clamped, as Caffe's backward.
        term = jnp.log(clamped) + (p - jax.lax.stop_gradient(p)) / clamped
        return [-jnp.sum(term) / self.num]


def read_blob_proto(path: str, where: Layer) -> np.ndarray:
    """Reads a binary BlobProto (a ``.binaryproto``) into a float32 array of its shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise where.error(f"cannot read blob file '{path}': {e.strerror or e}") from None
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(raw)
    except DecodeError as e:
        raise where.error(f"'{path}' is not a binary BlobProto: {e}") from None
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    data = blob.double_data if len(blob.double_data) > 0 else blob.data
    if len(data) != math.prod(shape):
        raise where.error(f"'{path}': blob shape {list(shape)} holds {math.prod(shape)} values "
                          f"but the file has {len(data)}")
    return np.asarray(data, np.float32).reshape(shape)


@register("InfogainLoss")
class InfogainLoss(_LossLayer):
    """Softmax over ``infogain_loss_param.axis``, then the infogain-weighted log loss.

    ``loss = -sum_{i,j valid} sum_l H[label_ij, l] log(max(p[i, l, j], 1e-20)) / normalizer``
    with ``H`` (C x C) from bottom 2 or the BlobProto file ``infogain_loss_param.source``,
    ignore_label and normalization as SoftmaxWithLoss (default VALID; the legacy ``normalize``
    is refused, as Caffe). Backward is Caffe's ``(p * rowsum(H)[label] - H[label]) /
    normalizer``; ``H`` gets no gradient. Optional top 1: the probabilities.
    """

    min_bottoms = 2
    max_bottoms = 3
    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        self._read_ignore_label()
        if self.param.loss_param.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss: "
                             "use loss_param.normalization")
        self.normalization = self.param.loss_param.normalization
        ip = self.param.infogain_loss_param
        self._softmax_geometry(bottom_shapes, ip.axis, "infogain")
        c = self.num_labels
        self.H = None
        if len(bottom_shapes) < 3:
            if not ip.source:
                raise self.error("needs the infogain matrix: a third bottom or "
                                 "infogain_loss_param.source")
            self.H = read_blob_proto(ip.source, self)
            if self.H.size != c * c:
                raise self.error(f"infogain matrix from '{ip.source}' has {self.H.size} values; "
                                 f"must be {c}x{c}")
            self.H = self.H.reshape(c, c)
        elif count(bottom_shapes[2]) != c * c:
            raise self.shape_error(f"infogain matrix (bottom 2) must be {c}x{c}, "
                                   f"got {count(bottom_shapes[2])} values")
        tops = [()]
        if len(self.param.top) >= 2:
            tops.append(bottom_shapes[0])
        return tops

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        c = self.num_labels
        if self.H is not None:
            H = jnp.asarray(self.H, x.dtype)
        else:
            H = jax.lax.stop_gradient(bottoms[2]).reshape(c, c).astype(x.dtype)
        x3 = x.reshape(self.outer_num, c, self.inner_num)
        lab = _labels(bottoms[1]).reshape(self.outer_num, self.inner_num)
        valid = self._valid(lab)
        logp = _clamped_log(jax.nn.log_softmax(x3, axis=1), kLOG_THRESHOLD)
        rows = jnp.take(H, jnp.clip(lab, 0, c - 1), axis=0)  # (outer, inner, C)
        # sum_l H[label, l] log p_l per position: elementwise, as Caffe's loop (no matmul, so
        # float32 under every Config.precision).
        per_pos = jnp.sum(rows * jnp.swapaxes(logp, 1, 2), axis=2)
        loss_sum = -jnp.sum(jnp.where(valid, per_pos, jnp.zeros_like(per_pos)))
        return _loss_and_prob(self, loss_sum, valid, x3, x)


@register("ContrastiveLoss")
class ContrastiveLoss(_LossLayer):
    """Contrastive loss of feature pairs ``a, b`` (N, C[,1,1]) with similarity labels y.

    ``d^2 = ||a - b||^2``; ``loss = sum_i [y_i d^2 + (1-y_i) max(margin - d, 0)^2] / (2N)``;
    with ``legacy_version`` the dissimilar term is ``max(margin - d^2, 0)``. Backward is
    Caffe's, whose dissimilar non-legacy gradient divides by ``d + 1e-4`` (finite at d = 0)
    rather than ``d``. A pair is similar when ``int(y) != 0``.
    """

    exact_bottoms = 3
    exact_tops = 1

    def setup(self, bottom_shapes):
        self._check_first_dims(bottom_shapes)
        a, b, y = bottom_shapes
        for i, s in enumerate((a, b)):
            if len(s) > 4 or count(s, 2) != 1:
                raise self.shape_error(
                    f"bottom {i} must be N x C (x 1 x 1), got shape {list(s)}")
        if count(a, 1) != count(b, 1):
            raise self.shape_error("bottoms 0 and 1 must have the same number of channels")
        self.num, self.channels = a[0], count(a, 1)
        if count(y) != self.num:
            raise self.shape_error(
                f"needs one similarity label per pair: {self.num} expected, got {count(y)}")
        cp = self.param.contrastive_loss_param
        self.margin = float(cp.margin)
        self.legacy_version = bool(cp.legacy_version)
        return [()]

    def apply(self, blobs, bottoms, ctx):
        a = bottoms[0].reshape(self.num, self.channels)
        b = bottoms[1].reshape(self.num, self.channels)
        similar = _labels(bottoms[2]).reshape(self.num) != 0
        diff = a - b
        dist_sq = jnp.sum(diff * diff, axis=1)
        if self.legacy_version:
            mdist = self.margin - dist_sq
            dissimilar = jnp.where(mdist > 0, mdist, jnp.zeros_like(mdist))
        else:
            sg = jax.lax.stop_gradient
            dist_val = jnp.sqrt(sg(dist_sq))
            # Value sqrt(d^2); derivative 1 / (2 (d + 1e-4)) with respect to d^2, as
            # Caffe's backward (and finite for identical pairs).
            dist = dist_val + (dist_sq - sg(dist_sq)) / (2 * (dist_val + 1e-4))
            mdist = self.margin - dist
            clipped = jnp.where(mdist > 0, mdist, jnp.zeros_like(mdist))
            dissimilar = clipped * clipped
        per_pair = jnp.where(similar, dist_sq, dissimilar)
        return [jnp.sum(per_pair) / self.num / 2]


@register("Accuracy")
class Accuracy(Layer):
    """Top-k classification accuracy over ``accuracy_param.axis`` (not a loss; no gradient).

    A position counts as correct when fewer than ``top_k`` classes *other than* the true one
    score ``>=`` the true class's score, so ties count against it (Caffe's rule).
    ``accuracy = correct / counted`` over positions whose label is not ``ignore_label``; 0
    when nothing is counted. Optional top 1: per-class accuracy ``[C]`` (0 for a class with
    no counted positions).
    """

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes):
        ap = self.param.accuracy_param
        self.top_k = int(ap.top_k)
        self.has_ignore_label = ap.HasField("ignore_label")
        self.ignore_label = int(ap.ignore_label)
        n_label = count(bottom_shapes[1])
        n_classes = count(bottom_shapes[0]) // n_label if n_label else 0
        if self.top_k > n_classes:
            raise self.shape_error(
                f"top_k ({self.top_k}) must be at most the number of classes ({n_classes})")
        shape = bottom_shapes[0]
        self.axis = self.canonical_axis(ap.axis, len(shape))
        self.outer_num = count(shape, 0, self.axis)
        self.inner_num = count(shape, self.axis + 1)
        self.num_labels = shape[self.axis]
        if self.outer_num * self.inner_num != n_label:
            raise self.shape_error(
                f"number of labels ({n_label}) must match the number of predictions "
                f"({self.outer_num * self.inner_num}): with label axis {self.axis} and "
                f"prediction shape {list(shape)} the label count is "
                f"{self.outer_num}*{self.inner_num}")
        tops = [()]
        if len(self.param.top) > 1:
            tops.append((self.num_labels,))
        return tops

    def apply(self, blobs, bottoms, ctx):
        x = jax.lax.stop_gradient(bottoms[0])
        c = self.num_labels
        x3 = x.reshape(self.outer_num, c, self.inner_num)
        lab = _labels(bottoms[1]).reshape(self.outer_num, 1, self.inner_num)
        valid = (lab != self.ignore_label) if self.has_ignore_label else jnp.ones(lab.shape, bool)
        true_score = jnp.take_along_axis(x3, jnp.clip(lab, 0, c - 1), axis=1)
        # The true class scores >= itself, hence "- 1" (a NaN score counts as correct, as Caffe).
        better = jnp.sum(x3 >= true_score, axis=1, keepdims=True) - 1
        correct = (better < self.top_k) & valid
        n_valid = jnp.sum(valid)
        acc = jnp.where(n_valid > 0,
                        jnp.sum(correct).astype(x.dtype)
                        / jnp.maximum(n_valid, 1).astype(x.dtype),
                        jnp.zeros((), x.dtype))
        tops = [acc]
        if len(self.top_names) > 1:
            onehot = jax.nn.one_hot(lab.reshape(-1), c, dtype=x.dtype)  # (P, C)
            per_count = jnp.sum(onehot * valid.reshape(-1, 1).astype(x.dtype), axis=0)
            per_correct = jnp.sum(onehot * correct.reshape(-1, 1).astype(x.dtype), axis=0)
            tops.append(jnp.where(per_count > 0,
                                  per_correct / jnp.maximum(per_count, jnp.ones_like(per_count)),
                                  jnp.zeros_like(per_count)))
        return tops
