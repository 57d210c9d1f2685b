"""The SSD fork's detection layers (weiliu89/caffe, ``ssd`` branch): Normalize, Permute,
PriorBox and DetectionOutput, with the fork's formulas.

Their hyperparameters are the fork's fields (``norm_param``, ``permute_param``,
``prior_box_param``, ``detection_output_param``) from ``jcaffe/proto/ssd.proto``; a net read by
:mod:`jcaffe.prototxt` carries them inside BVLC's ``LayerParameter`` and
:func:`jcaffe.proto.ssd_layer` reads them back.

Boxes are ``[xmin, ymin, xmax, ymax]`` in coordinates normalized to the image (the fork's
``NormalizedBBox``).
"""

from __future__ import annotations

import math
from typing import Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import fillers
from jcaffe.layers.base import Layer, count, register
from jcaffe.layers.data import DataLayerBase
from jcaffe.proto import caffe_pb2, ssd_layer, ssd_pb2

CodeType = ssd_pb2.PriorBoxParameter.CodeType


@register("Normalize")
class Normalize(Layer):
    """L2 normalization with a learned scale (SSD's ``conv4_3_norm``).

    ``across_spatial`` (default): one norm per item, ``y = s * x / sqrt(sum_{c,h,w} x^2 +
    eps)``; otherwise one norm per position, ``y[n,c,h,w] = s_c * x[n,c,h,w] /
    sqrt(sum_c x[n,c,h,w]^2 + eps)``. The scale blob is one scalar (shape ``[]``) when
    ``channel_shared`` (default), else ``[C]``; ``scale_filler`` defaults to constant 1.
    The gradient is that of this formula (the fork's backward).
    """

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = ssd_layer(self.param).norm_param
        shape = bottom_shapes[0]
        if not 2 <= len(shape) <= 4:
            raise self.shape_error("needs a bottom with 2 to 4 axes (N, C[, H[, W]])")
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        self.scale_filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        if p.HasField("scale_filler"):
            self.scale_filler.CopyFrom(p.scale_filler)
        self.blob_shapes = [() if self.channel_shared else (shape[1],)]
        return [shape]

    def init(self, key):
        return [fillers.fill(self.scale_filler, self.blob_shapes[0], key, jnp.float32,
                             f"layer '{self.name}' (type Normalize) scale")]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        x4 = x.reshape(x.shape[:2] + (-1,))  # [N, C, H*W]
        axes = (1, 2) if self.across_spatial else (1,)
        norm = jnp.sqrt(jnp.sum(x4 * x4, axis=axes, keepdims=True) + self.eps)
        scale = blobs[0].astype(x.dtype)
        scale = scale if self.channel_shared else scale.reshape(1, -1, 1)
        return [(x4 / norm * scale).reshape(x.shape)]


@register("Permute")
class Permute(Layer):
    """Reorders axes: top axis ``i`` is bottom axis ``order[i]``; axes ``permute_param``
    leaves out follow in their own order (the fork's PermuteLayer)."""

    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        order = []
        for o in ssd_layer(self.param).permute_param.order:
            if o >= len(shape):
                raise self.shape_error(f"order {o} is not an axis of a {len(shape)}-axis bottom")
            if o in order:
                raise self.error(f"permute_param repeats order {o}")
            order.append(int(o))
        order += [i for i in range(len(shape)) if i not in order]
        self.order = tuple(order)
        return [tuple(shape[i] for i in self.order)]

    def apply(self, blobs, bottoms, ctx):
        return [jnp.transpose(bottoms[0], self.order)]


def prior_boxes(layer_h: int, layer_w: int, img_h: int, img_w: int, min_sizes, max_sizes,
                aspect_ratios, clip: bool, variances, step_h: float, step_w: float,
                offset: float) -> np.ndarray:
    """The fork's PriorBoxLayer::Forward_cpu as numpy: ``[1, 2, H*W*num_priors*4]`` float32.

    ``aspect_ratios`` is the expanded list (1 first, then each ratio and, with flip, its
    inverse). At each position ``(h, w)``, centre ``((w + offset) * step_w, (h + offset) *
    step_h)`` and for each min size ``m`` (truncated to an integer, as the fork does): a
    square of side ``m``; with max sizes a square of side ``sqrt(m * M)``; then a box
    ``m*sqrt(ar) x m/sqrt(ar)`` for each ratio ``ar != 1``. Corners are divided by the image
    size, clipped to [0, 1] with ``clip``; channel 1 holds the variances (one value for all
    four coordinates, or four).
    """
    boxes = []
    for h in range(layer_h):
        for w in range(layer_w):
            cx = np.float32((w + offset) * np.float32(step_w))
            cy = np.float32((h + offset) * np.float32(step_h))
            for s, m in enumerate(min_sizes):
                m = int(m)
                sides = [(m, m)]
                if max_sizes:
                    side = math.sqrt(m * int(max_sizes[s]))
                    sides.append((side, side))
                for ar in aspect_ratios:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    r = math.sqrt(ar)
                    sides.append((m * r, m / r))
                for bw, bh in sides:
                    bw, bh = float(np.float32(bw)), float(np.float32(bh))
                    boxes.append(((cx - bw / 2.0) / img_w, (cy - bh / 2.0) / img_h,
                                  (cx + bw / 2.0) / img_w, (cy + bh / 2.0) / img_h))
    top = np.asarray(boxes, np.float64).astype(np.float32).reshape(-1)
    if clip:
        top = np.clip(top, 0.0, 1.0)
    var = np.tile(np.asarray(variances, np.float32), top.size // len(variances))
    return np.stack([top, var])[None]


@register("PriorBox")
class PriorBox(Layer):
    """The fork's default boxes for one feature map: bottom 0 is the feature map
    ``[N, C, H, W]`` (its H, W), bottom 1 the image ``[N, C, img_h, img_w]`` (its size, unless
    ``img_size`` / ``img_h`` / ``img_w`` give it). Top ``[1, 2, 4 * H * W * num_priors]``:
    channel 0 the boxes, channel 1 their variances (see :func:`prior_boxes`). ``step`` /
    ``step_h`` / ``step_w`` default to image size / feature size. The top depends only on the
    shapes: it is computed once, on the host, and is a constant of the compiled program."""

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = ssd_layer(self.param).prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param needs at least one min_size")
        mins = [float(m) for m in p.min_size]
        if any(m <= 0 for m in mins):
            raise self.error(f"min_size must be positive, got {mins}")
        ratios = [1.0]
        for ar in p.aspect_ratio:
            ar = float(ar)
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(ar)
            if p.flip:
                ratios.append(float(np.float32(1.0 / ar)))
        num_priors = len(ratios) * len(mins)
        maxs = [float(m) for m in p.max_size]
        if maxs:
            if len(maxs) != len(mins):
                raise self.error(f"prior_box_param gives {len(mins)} min_size but {len(maxs)} "
                                 f"max_size: give as many of each")
            for lo, hi in zip(mins, maxs):
                if hi <= lo:
                    raise self.error(f"max_size {hi:g} must be greater than min_size {lo:g}")
            num_priors += len(maxs)
        var = [float(v) for v in p.variance] or [0.1]
        if len(var) not in (1, 4):
            raise self.error(f"prior_box_param gives {len(var)} variances: give 1 or 4")
        if any(v <= 0 for v in var):
            raise self.error(f"variance must be positive, got {var}")
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("give either img_size or img_h/img_w, not both")
            img_h, img_w = int(p.img_h), int(p.img_w)
            if img_h <= 0 or img_w <= 0:
                raise self.error("img_h and img_w must be larger than 0")
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("img_size must be larger than 0")
            img_h = img_w = int(p.img_size)
        else:
            img_h = img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("give either step or step_h/step_w, not both")
            step_h, step_w = float(p.step_h), float(p.step_w)
            if step_h <= 0 or step_w <= 0:
                raise self.error("step_h and step_w must be larger than 0")
        elif p.HasField("step"):
            if p.step <= 0:
                raise self.error("step must be larger than 0")
            step_h = step_w = float(p.step)
        else:
            step_h = step_w = 0.0
        feat, image = bottom_shapes
        if len(feat) != 4 or len(image) != 4:
            raise self.shape_error("needs a 4-axis feature map and a 4-axis image")
        layer_h, layer_w = feat[2], feat[3]
        if img_h == 0 or img_w == 0:
            img_h, img_w = image[2], image[3]
        if step_h == 0 or step_w == 0:
            step_w = float(np.float32(img_w) / np.float32(layer_w))
            step_h = float(np.float32(img_h) / np.float32(layer_h))
        self.num_priors = num_priors
        self.aspect_ratios = ratios
        dim = layer_h * layer_w * num_priors * 4
        if dim <= 0:
            raise self.shape_error("gives no prior boxes (empty feature map)")
        self.priors = prior_boxes(layer_h, layer_w, img_h, img_w, mins, maxs, ratios,
                                  bool(p.clip), var, step_h, step_w, float(p.offset))
        return [(1, 2, dim)]

    def apply(self, blobs, bottoms, ctx):
        return [jnp.asarray(self.priors, bottoms[0].dtype)]


def decode_boxes(loc: jax.Array, priors: jax.Array, variances: jax.Array, code_type: int,
                 variance_encoded_in_target: bool) -> jax.Array:
    """The fork's DecodeBBox: predictions ``loc [L, P, 4]`` against priors / variances
    ``[P, 4]``, giving boxes ``[L, P, 4]``.

    CORNER: ``prior + v * loc`` per corner. CENTER_SIZE: centre ``v0 * l0 * pw + pcx``,
    ``v1 * l1 * ph + pcy``, size ``exp(v2 * l2) * pw``, ``exp(v3 * l3) * ph``. CORNER_SIZE:
    ``prior + v * loc * (pw or ph)``. With ``variance_encoded_in_target`` every ``v`` is 1.
    """
    priors = priors[None]
    v = jnp.ones_like(priors) if variance_encoded_in_target else variances[None]
    if code_type == CodeType.CORNER:
        return priors + v * loc
    pw = priors[..., 2] - priors[..., 0]
    ph = priors[..., 3] - priors[..., 1]
    if code_type == CodeType.CORNER_SIZE:
        return priors + v * loc * jnp.stack([pw, ph, pw, ph], axis=-1)
    pcx = (priors[..., 0] + priors[..., 2]) / 2
    pcy = (priors[..., 1] + priors[..., 3]) / 2
    cx = v[..., 0] * loc[..., 0] * pw + pcx
    cy = v[..., 1] * loc[..., 1] * ph + pcy
    w = jnp.exp(v[..., 2] * loc[..., 2]) * pw
    h = jnp.exp(v[..., 3] * loc[..., 3]) * ph
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_size(b: jax.Array) -> jax.Array:
    """The fork's BBoxSize (normalized): ``w * h``, 0 for a box with ``xmax < xmin`` or
    ``ymax < ymin``."""
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return jnp.where((w < 0) | (h < 0), 0.0, w * h).astype(b.dtype)


def jaccard(a: jax.Array, b: jax.Array) -> jax.Array:
    """The fork's JaccardOverlap of boxes ``a [..., 4]`` and ``b [..., 4]`` (broadcast):
    intersection over union, 0 when the intersection has no positive width and height."""
    iw = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
    ih = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
    inter = iw * ih
    union = box_size(a) + box_size(b) - inter
    ok = (iw > 0) & (ih > 0)
    return jnp.where(ok, inter / jnp.where(ok, union, 1), 0.0)


def nms(boxes: jax.Array, scores: jax.Array, score_threshold: float, nms_threshold: float,
        eta: float, top_k: int):
    """The fork's ApplyNMSFast for one class, with static shapes.

    Candidates are the ``top_k`` best scores (stable: ties keep index order) above
    ``score_threshold``; visited best first, one is kept when its overlap with every box kept
    so far is ``<= threshold``, and after each kept box the threshold becomes ``threshold *
    eta`` while ``eta < 1`` and it is above 0.5. Returns ``(keep [T], score [T], index [T])``
    over the ``T = top_k`` candidates in visiting order. Runs as one ``fori_loop`` of vector
    steps (one overlap row per step): no host callback, no ``T x T`` matrix.
    """
    n = scores.shape[0]
    t = n if top_k < 0 else min(top_k, n)
    masked = jnp.where(scores > score_threshold, scores, -jnp.inf)
    top, idx = jax.lax.top_k(masked, t)
    cand = boxes[idx]
    valid = top > -jnp.inf

    def step(i, state):
        keep, thr = state
        ov = jaccard(jnp.broadcast_to(cand[i], cand.shape), cand)
        ok = valid[i] & jnp.all(~keep | (ov <= thr))
        keep = keep.at[i].set(ok)
        if eta < 1:
            thr = jnp.where(ok & (thr > 0.5), thr * eta, thr)
        return keep, thr

    keep, _ = jax.lax.fori_loop(
        0, t, step, (jnp.zeros((t,), bool), jnp.asarray(nms_threshold, boxes.dtype)))
    return keep, top, idx


@register("DetectionOutput")
class DetectionOutput(Layer):
    """The fork's detection output (inference): bottoms ``mbox_loc [N, P*L*4]``,
    ``mbox_conf [N, P*C]`` (probabilities), ``mbox_priorbox [1, 2, P*4]``.

    Boxes are decoded (:func:`decode_boxes`, ``code_type``, ``variance_encoded_in_target``;
    ``L = 1`` with ``share_location``, else one set per class); for each class but
    ``background_label_id``, :func:`nms` keeps boxes scoring above ``confidence_threshold``
    (``nms_param``: ``nms_threshold``, ``top_k``, ``eta``); of all kept, the ``keep_top_k``
    best scores per image remain.

    Top: a fixed-size ``[1, 1, N*K, 7]`` (the fork's is ``[1, 1, n, 7]`` with ``n`` found at
    run time): ``K = keep_top_k``, or ``(classes - background) * top_k`` candidates when
    ``keep_top_k`` is -1. Image ``i`` owns rows ``i*K .. i*K+K-1``: its detections first,
    ``[i, label, score, xmin, ymin, xmax, ymax]`` in the fork's order (label ascending, best
    score first within a label), then padding rows ``[i, -1, -1, -1, -1, -1, -1]`` (label -1:
    the fork's own "no detection" row). Read the detections as the rows with ``label >= 0``.
    """

    exact_bottoms = 3
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = ssd_layer(self.param).detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param needs num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        self.code_type = int(p.code_type)
        self.variance_encoded_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (float(p.confidence_threshold)
                                     if p.HasField("confidence_threshold") else -np.inf)
        self.nms_threshold = float(p.nms_param.nms_threshold)
        if self.nms_threshold < 0:
            raise self.error(f"nms_threshold must be non-negative, got {self.nms_threshold:g}")
        self.eta = float(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta:g}")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        so = p.save_output_param
        if so.output_directory or p.visualize:
            what = "save_output_param.output_directory" if so.output_directory else "visualize"
            warnings.warn(f"layer '{self.name}' (type DetectionOutput): {what} is not "
                          f"supported and is ignored: the detections are the layer's top",
                          stacklevel=2)
        loc, conf, prior = bottom_shapes
        if loc[0] != conf[0]:
            raise self.shape_error("mbox_loc and mbox_conf disagree on the batch size")
        if len(prior) != 3 or prior[:2] != (1, 2) or prior[2] % 4:
            raise self.shape_error("the prior boxes must be [1, 2, 4 * num_priors]")
        self.num_priors = prior[2] // 4
        if count(loc, 1) != self.num_priors * self.num_loc_classes * 4:
            raise self.shape_error(f"{self.num_priors} priors need "
                                   f"{self.num_priors * self.num_loc_classes * 4} location "
                                   f"predictions per item")
        if count(conf, 1) != self.num_priors * self.num_classes:
            raise self.shape_error(f"{self.num_priors} priors x {self.num_classes} classes "
                                   f"need {self.num_priors * self.num_classes} confidences "
                                   f"per item")
        self.classes = [c for c in range(self.num_classes) if c != self.background_label_id]
        if not self.classes:
            raise self.error("no class but the background to detect")
        t = self.num_priors if self.top_k < 0 else min(self.top_k, self.num_priors)
        self.candidates = t
        total = len(self.classes) * t
        self.rows = total if self.keep_top_k < 0 else self.keep_top_k
        self.num = loc[0]
        return [(1, 1, self.num * self.rows, 7)]

    def detect(self, loc: jax.Array, conf: jax.Array, priors: jax.Array) -> jax.Array:
        """Rows ``[K, 7]`` of one image (image id column 0) from ``loc [P*L*4]``, ``conf
        [P*C]`` and the prior blob ``[2, P*4]``."""
        p = self.num_priors
        prior_boxes_ = priors[0].reshape(p, 4)
        variances = priors[1].reshape(p, 4)
        loc = loc.reshape(p, self.num_loc_classes, 4).transpose(1, 0, 2)
        boxes = decode_boxes(loc, prior_boxes_, variances, self.code_type,
                             self.variance_encoded_in_target)  # [L, P, 4]
        scores = conf.reshape(p, self.num_classes).T  # [C, P]
        cls = np.asarray(self.classes)
        cls_boxes = boxes[0][None].repeat(len(cls), 0) if self.share_location else boxes[cls]
        keep, top, idx = jax.vmap(
            lambda b, s: nms(b, s, self.confidence_threshold, self.nms_threshold, self.eta,
                             self.top_k))(cls_boxes, scores[cls])  # [C', T] each
        flat_score = jnp.where(keep, top, -jnp.inf).reshape(-1)
        k = min(self.rows, flat_score.shape[0])
        best, pos = jax.lax.top_k(flat_score, k)
        ok = best > -jnp.inf
        ci = pos // self.candidates
        label = jnp.asarray(cls)[ci]
        # The fork's order: label ascending, best score first within a label (stable sort).
        order = jnp.argsort(jnp.where(ok, label, self.num_classes), stable=True)
        ok, ci, label, best = ok[order], ci[order], label[order], best[order]
        prior_i = idx.reshape(-1)[pos[order]]
        box = cls_boxes[ci, prior_i]
        dt = loc.dtype
        rows = jnp.concatenate([label[:, None].astype(dt), best[:, None].astype(dt), box],
                               axis=1)
        rows = jnp.where(ok[:, None], rows, jnp.asarray(-1, dt))
        if k < self.rows:
            rows = jnp.concatenate([rows, jnp.full((self.rows - k, 6), -1, dt)])
        return rows

    def apply(self, blobs, bottoms, ctx):
        loc, conf, priors = bottoms
        n = loc.shape[0]
        rows = jax.vmap(lambda l, c: self.detect(l, c, priors[0]))(
            loc.reshape(n, -1), conf.reshape(n, -1))  # [N, K, 6]
        image = jnp.broadcast_to(jnp.arange(n, dtype=rows.dtype)[:, None, None],
                                 (n, self.rows, 1))
        out = jnp.concatenate([image, rows], axis=2)
        return [jax.lax.stop_gradient(out).reshape(1, 1, n * self.rows, 7)]


def detections(top) -> list[np.ndarray]:
    """A DetectionOutput top ``[1, 1, N*K, 7]`` as the fork's rows per image: a list of ``N``
    arrays ``[n_i, 7]`` (``[image, label, score, xmin, ymin, xmax, ymax]``), padding dropped."""
    rows = np.asarray(top).reshape(-1, 7)
    n = int(rows[:, 0].max()) + 1 if rows.size else 0
    return [rows[(rows[:, 0] == i) & (rows[:, 1] >= 0)] for i in range(n)]


# -- training: MultiBoxLoss ---------------------------------------------------------------
MBL = ssd_pb2.MultiBoxLossParameter
_FLT_MIN = float(np.finfo(np.float32).tiny)


def encode_boxes(gt: jax.Array, priors: jax.Array, variances: jax.Array, code_type: int,
                 encode_variance_in_target: bool) -> jax.Array:
    """The fork's EncodeBBox (the inverse of :func:`decode_boxes`): ground-truth boxes ``gt
    [..., P, 4]`` as targets relative to priors ``[P, 4]``. The variances divide the target
    unless ``encode_variance_in_target``."""
    v = jnp.ones_like(variances) if encode_variance_in_target else variances
    if code_type == CodeType.CORNER:
        return (gt - priors) / v
    pw = priors[..., 2] - priors[..., 0]
    ph = priors[..., 3] - priors[..., 1]
    if code_type == CodeType.CORNER_SIZE:
        return (gt - priors) / jnp.stack([pw, ph, pw, ph], axis=-1) / v
    pcx = (priors[..., 0] + priors[..., 2]) / 2
    pcy = (priors[..., 1] + priors[..., 3]) / 2
    gw = gt[..., 2] - gt[..., 0]
    gh = gt[..., 3] - gt[..., 1]
    gcx = (gt[..., 0] + gt[..., 2]) / 2
    gcy = (gt[..., 1] + gt[..., 3]) / 2
    return jnp.stack([(gcx - pcx) / pw / v[..., 0], (gcy - pcy) / ph / v[..., 1],
                      jnp.log(gw / pw) / v[..., 2], jnp.log(gh / ph) / v[..., 3]], axis=-1)


def match_priors(priors: jax.Array, gt: jax.Array, gt_valid: jax.Array, match_type: int,
                 overlap_threshold: float, ignore_cross_boundary: bool):
    """The fork's MatchBBox (label -1, priors as the predictions) for one image.

    ``gt [G, 4]`` with ``gt_valid [G]`` (the image's boxes; padding rows invalid). First a
    greedy bipartite matching: repeatedly the (prior, box) pair of largest overlap among
    unmatched priors and unused boxes (first in prior-then-box order on ties); then, with
    PER_PREDICTION, each prior still unmatched takes its best box of overlap
    ``>= overlap_threshold``. Overlaps ``<= 1e-6`` never match. With
    ``ignore_cross_boundary`` a prior reaching outside [0, 1] is index -2 (never a positive
    nor a negative). Returns ``(match [P] int32: box index or -1 / -2, overlap [P])``, the
    overlap being the matched box's, else the best one.
    """
    p, g = priors.shape[0], gt.shape[0]
    ov = jaccard(jnp.broadcast_to(priors[:, None, :], (p, g, 4)),
                 jnp.broadcast_to(gt[None, :, :], (p, g, 4)))
    stored = gt_valid[None, :] & (ov > 1e-6)
    match = jnp.full((p,), -1, jnp.int32)
    if ignore_cross_boundary:
        cross = jnp.any((priors < 0) | (priors > 1), axis=1)
        match = jnp.where(cross, -2, match)
        stored = stored & ~cross[:, None]
    best = jnp.max(jnp.where(stored, ov, 0.0), axis=1)

    def step(_, state):
        match, overlap, pool = state
        cand = stored & (match == -1)[:, None] & pool[None, :]
        flat = jnp.argmax(jnp.where(cand, ov, -1.0).reshape(-1))
        i, j = flat // g, flat % g
        ok = cand.reshape(-1)[flat]
        match = jnp.where(ok, match.at[i].set(j.astype(jnp.int32)), match)
        overlap = jnp.where(ok, overlap.at[i].set(ov[i, j]), overlap)
        pool = jnp.where(ok, pool.at[j].set(False), pool)
        return match, overlap, pool

    match, overlap, _ = jax.lax.fori_loop(0, g, step, (match, best, jnp.ones((g,), bool)))
    if match_type == MBL.PER_PREDICTION:
        ok = stored & (ov >= overlap_threshold)
        j = jnp.argmax(jnp.where(ok, ov, -1.0), axis=1)
        take = (match == -1) & jnp.any(ok, axis=1)
        match = jnp.where(take, j.astype(jnp.int32), match)
        overlap = jnp.where(take, jnp.take_along_axis(ov, j[:, None], 1)[:, 0], overlap)
    return match, overlap


@register("MultiBoxLoss")
class MultiBoxLoss(Layer):
    """The fork's MultiBoxLoss: bottoms ``loc [N, P*4]``, ``conf [N, P*C]`` (scores before
    the softmax / sigmoid), ``priors [1, 2, P*4]``, ``label [1, 1, G, 8]`` (the fork's
    ground truth rows ``[item_id, label, instance_id, xmin, ymin, xmax, ymax, difficult]``);
    top the scalar loss.

    Static shapes: ``G`` is fixed by the data layer; rows with ``item_id == -1`` are padding
    and ignored (the fork's own marker for "no box"), so a batch with fewer boxes pads with
    them. Difficult boxes are left out unless ``use_difficult_gt``.

    Per image, priors are matched to boxes (:func:`match_priors`). Positives: the matched
    priors, their loc target :func:`encode_boxes` of the box (``bp_inside``: coordinates of a
    prior outside [0, 1] take the target as prediction), their class the box's label. With
    MAX_NEGATIVE mining, negatives are the ``min(int(num_pos * neg_pos_ratio), eligible)``
    unmatched priors (best overlap ``< neg_overlap``) of largest background confidence loss;
    without mining every unmatched prior of the batch is a negative. ``loss = loc_weight *
    L_loc / n + L_conf / n`` with ``L_loc`` the SmoothL1 sum (``0.5 d^2`` for ``|d| < 1``,
    else ``|d| - 0.5``) or half the squared L2 sum over the positives, ``L_conf`` the softmax
    (``-log max(p, FLT_MIN)``) or logistic cross-entropy sum over positives and negatives, and
    ``n`` from ``loss_param.normalization`` (VALID: the number of positives; never below 1).
    Matching and mining are index choices without gradient: the gradient flows into ``loc``
    and ``conf`` only, as the fork's backward.

    Not supported (an error when the net is built): ``share_location: false``,
    ``use_prior_for_matching: false``, HARD_EXAMPLE mining, NMS inside mining
    (``nms_param``), ``map_object_to_agnostic``.
    """

    exact_bottoms = 4
    exact_tops = 1
    is_loss = True

    def setup(self, bottom_shapes):
        p = ssd_layer(self.param).multibox_loss_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("multibox_loss_param needs num_classes >= 1")
        self.num_classes = int(p.num_classes)
        for field, bad, why in (("share_location", False, "share_location: false"),
                                ("use_prior_for_matching", False,
                                 "use_prior_for_matching: false"),
                                ("map_object_to_agnostic", True, "map_object_to_agnostic")):
            if getattr(p, field) == bad:
                raise self.error(f"{why} is not supported")
        self.mining = int(p.mining_type)
        if p.HasField("do_neg_mining") and p.do_neg_mining != (self.mining != MBL.NONE):
            raise self.error("do_neg_mining disagrees with mining_type (do_neg_mining is "
                             "deprecated: use mining_type)")
        if self.mining == MBL.HARD_EXAMPLE:
            raise self.error("mining_type HARD_EXAMPLE is not supported (use MAX_NEGATIVE)")
        if self.mining != MBL.NONE and p.HasField("nms_param") and p.nms_param.nms_threshold > 0:
            raise self.error("nms_param inside hard negative mining is not supported")
        self.background_label_id = int(p.background_label_id)
        self.conf_loss_type = int(p.conf_loss_type)
        if self.conf_loss_type == MBL.SOFTMAX and not (
                0 <= self.background_label_id < self.num_classes):
            raise self.error("background_label_id must be within [0, num_classes) for SOFTMAX")
        self.loc_loss_type = int(p.loc_loss_type)
        self.loc_weight = float(p.loc_weight)
        self.match_type = int(p.match_type)
        self.overlap_threshold = float(p.overlap_threshold)
        self.use_difficult_gt = bool(p.use_difficult_gt)
        self.neg_pos_ratio = float(p.neg_pos_ratio)
        self.neg_overlap = float(p.neg_overlap)
        self.code_type = int(p.code_type)
        self.encode_variance_in_target = bool(p.encode_variance_in_target)
        self.ignore_cross_boundary = bool(p.ignore_cross_boundary_bbox)
        self.bp_inside = bool(p.bp_inside)
        lp = self.param.loss_param
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = (caffe_pb2.LossParameter.VALID if lp.normalize
                                  else caffe_pb2.LossParameter.BATCH_SIZE)
        else:
            self.normalization = int(lp.normalization)
        pd = list(self.param.propagate_down)
        self.use_loc = bool(pd[0]) if pd else True
        self.use_conf = bool(pd[1]) if len(pd) > 1 else True
        loc, conf, prior, label = bottom_shapes
        if loc[0] != conf[0]:
            raise self.shape_error("loc and conf disagree on the batch size")
        if len(prior) != 3 or prior[:2] != (1, 2) or prior[2] % 4:
            raise self.shape_error("the prior boxes must be [1, 2, 4 * num_priors]")
        self.num = loc[0]
        self.num_priors = prior[2] // 4
        if count(loc, 1) != self.num_priors * 4:
            raise self.shape_error(f"{self.num_priors} priors need {self.num_priors * 4} "
                                   f"location predictions per item")
        if count(conf, 1) != self.num_priors * self.num_classes:
            raise self.shape_error(f"{self.num_priors} priors x {self.num_classes} classes "
                                   f"need {self.num_priors * self.num_classes} confidences "
                                   f"per item")
        if count(label) % 8 or (len(label) == 4 and label[3] != 8):
            raise self.shape_error("the label blob must be [1, 1, num_gt, 8]")
        self.num_gt = count(label) // 8
        return [()]

    def targets(self, conf, priors, label):
        """Matching and mining (no gradient): ``(match [N, P], box [N, P, 4], cls [N, P],
        neg [N, P])``: each prior's box row or -1 / -2, that row's corners and label, and
        whether it is a mined negative."""
        p = self.num_priors
        pb, pv = priors[0, 0].reshape(p, 4), priors[0, 1].reshape(p, 4)
        rows = label.reshape(self.num_gt, 8)
        item = rows[:, 0].astype(jnp.int32)
        keep = item != -1
        if not self.use_difficult_gt:
            keep = keep & (rows[:, 7] == 0)
        boxes = rows[:, 3:7]
        labels = rows[:, 1].astype(jnp.int32)
        conf = conf.reshape(self.num, p, self.num_classes)

        def one(i, conf_i):
            valid = keep & (item == i)
            match, overlap = match_priors(pb, boxes, valid, self.match_type,
                                          self.overlap_threshold, self.ignore_cross_boundary)
            pos = match > -1
            j = jnp.maximum(match, 0)
            if self.mining == MBL.NONE:
                return match, boxes[j], labels[j], jnp.zeros((p,), bool)
            # Background confidence loss ranks the eligible negatives (descending).
            bg = self.background_label_id
            if self.conf_loss_type == MBL.SOFTMAX:
                mine_loss = -jnp.maximum(jax.nn.log_softmax(conf_i, axis=-1)[:, bg],
                                         math.log(_FLT_MIN))
            else:
                t = (jnp.arange(self.num_classes, dtype=jnp.int32) == bg).astype(conf_i.dtype)
                mine_loss = jnp.sum(_logistic_loss(conf_i, t[None, :]), axis=-1)
            eligible = (match == -1) & (overlap < self.neg_overlap)
            num_pos = jnp.sum(pos, dtype=jnp.int32)
            num_sel = jnp.minimum(
                jnp.floor(num_pos.astype(jnp.float32) * np.float32(self.neg_pos_ratio)
                          ).astype(jnp.int32), jnp.sum(eligible, dtype=jnp.int32))
            order = jnp.argsort(jnp.where(eligible, -mine_loss, jnp.inf), stable=True)
            rank = jnp.zeros((p,), jnp.int32).at[order].set(jnp.arange(p, dtype=jnp.int32))
            neg = eligible & (rank < num_sel)
            return match, boxes[j], labels[j], neg

        return jax.vmap(one)(jnp.arange(self.num, dtype=jnp.int32), conf)

    def apply(self, blobs, bottoms, ctx):
        loc, conf, priors, label = bottoms
        dt = loc.dtype
        p, c = self.num_priors, self.num_classes
        match, box, cls, neg = jax.lax.stop_gradient(
            self.targets(jax.lax.stop_gradient(conf), jax.lax.stop_gradient(priors),
                         jax.lax.stop_gradient(label)))
        pos = match > -1
        num_matches = jnp.sum(pos, dtype=jnp.int32)
        normalizer = self._normalizer(num_matches, dt)
        pb = jax.lax.stop_gradient(priors[0, 0].reshape(p, 4))
        pv = jax.lax.stop_gradient(priors[0, 1].reshape(p, 4))
        loss = jnp.zeros((), dt)
        if self.use_loc:
            pred = loc.reshape(self.num, p, 4)
            safe_box = jnp.where(pos[..., None], box, pb[None])  # finite targets off the matches
            gt = encode_boxes(safe_box, pb[None], pv[None], self.code_type,
                              self.encode_variance_in_target)
            if self.bp_inside:
                outside = (pb < 0) | (pb > 1)
                pred = jnp.where(outside[None], gt, pred)
            if self.encode_variance_in_target:
                pred, gt = pred / pv[None], gt / pv[None]
            d = pred - jax.lax.stop_gradient(gt)
            if self.loc_loss_type == MBL.SMOOTH_L1:
                per = jnp.where(jnp.abs(d) < 1, 0.5 * d * d, jnp.abs(d) - 0.5)
            else:
                per = 0.5 * d * d
            loc_loss = jnp.sum(jnp.where(pos[..., None], per, 0))
            loss = loss + np.asarray(self.loc_weight, dt) * loc_loss / normalizer
        if self.use_conf:
            x = conf.reshape(self.num, p, c)
            bg = self.background_label_id
            counted = pos | neg if self.mining != MBL.NONE else jnp.ones_like(pos)
            target_cls = jnp.where(pos, cls, bg)
            if self.conf_loss_type == MBL.SOFTMAX:
                from jcaffe.layers.loss import _clamped_log

                logp = jax.nn.log_softmax(x, axis=-1)
                picked = jnp.take_along_axis(logp, target_cls[..., None], -1)[..., 0]
                per = -_clamped_log(picked, _FLT_MIN)
                conf_loss = jnp.sum(jnp.where(counted, per, 0))
            else:
                t = self._logistic_targets(pos, neg, cls, dt)
                conf_loss = jnp.sum(jnp.where(counted[..., None], _logistic_loss(x, t), 0))
            loss = loss + conf_loss / normalizer
        return [loss]

    def _logistic_targets(self, pos, neg, cls, dt):
        """The fork's conf_gt for the LOGISTIC loss: filled with ``background_label_id``'s
        value, 1 at a positive's label; with mining, 1 at a negative's background class.
        Without mining the fork steps through the targets by ``P`` (not ``P * C``) per image,
        so image ``i``'s ones land at flat index ``i*P + j*C + label``: reproduced."""
        n, p, c = self.num, self.num_priors, self.num_classes
        bg = self.background_label_id
        onehot = jnp.arange(c, dtype=jnp.int32)[None, None, :]
        if self.mining != MBL.NONE:
            t = jnp.where(pos[..., None] & (onehot == cls[..., None]), 1.0,
                          float(bg)).astype(dt)
            if 0 <= bg < c:
                t = jnp.where(neg[..., None] & (onehot == bg), jnp.asarray(1, dt), t)
            return t
        flat = jnp.full((n * p * c,), float(bg), dt)
        i = jnp.arange(n, dtype=jnp.int32)[:, None]
        j = jnp.arange(p, dtype=jnp.int32)[None, :]
        where = jnp.where(pos, i * p + j * c + cls, n * p * c)  # out of range: dropped
        return flat.at[where.reshape(-1)].set(1, mode="drop").reshape(n, p, c)

    def _normalizer(self, num_matches, dt):
        """LossLayer::GetNormalizer(normalization, N, P, num_matches), never below 1."""
        mode = self.normalization
        lp = caffe_pb2.LossParameter
        if mode == lp.FULL:
            n = jnp.asarray(self.num * self.num_priors, dt)
        elif mode == lp.VALID:
            n = num_matches.astype(dt)
        elif mode == lp.BATCH_SIZE:
            n = jnp.asarray(self.num, dt)
        else:
            n = jnp.asarray(1, dt)
        return jnp.maximum(n, jnp.asarray(1, dt))


def _logistic_loss(x, t):
    """Caffe's SigmoidCrossEntropyLoss term: ``-(x (t - [x >= 0]) - log(1 + exp(x - 2x[x >=
    0])))``, elementwise."""
    pos = (x >= 0).astype(x.dtype)
    return -(x * (t - pos) - jnp.log1p(jnp.exp(x - 2 * x * pos)))


# -- test nets: DetectionEvaluate and the solver's mAP ------------------------------------
@register("DetectionEvaluate")
class DetectionEvaluate(Layer):
    """The fork's DetectionEvaluate: bottoms the detections ``[1, 1, D, 7]`` (a DetectionOutput
    top) and the ground truth ``[1, 1, G, 8]`` (the data layer's label rows; the rows from the
    first with ``item_id == -1`` on are ignored, as the fork's GetGroundTruth stops there).

    Top ``[1, 1, C' + D, 5]`` (``C'`` the classes but the background), rows ``[image, label,
    score, tp, fp]``: first one row per class ``[-1, c, num_pos_c, -1, -1]`` (its ground-truth
    count, difficult boxes included only with ``evaluate_difficult_gt``); then each detection
    in the fork's order (image, label ascending, best score first). Within an image and label,
    best score first, a detection is a true positive when its largest overlap with that
    label's boxes is ``>= overlap_threshold`` and that box is not taken yet, else a false
    positive; matched to a difficult box without ``evaluate_difficult_gt`` it is neither
    (tp = fp = 0, which the solver skips). The fork's top has one row per valid detection;
    this one is fixed-size: rows of detections with label -1 (DetectionOutput's padding) are
    ``[-2, -1, 0, 0, 0]``, skipped by the solver's accumulation (tp = fp = 0) as the fork's
    would. See :func:`average_precisions` for the mAP the solver logs.
    """

    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = ssd_layer(self.param).detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("detection_evaluate_param needs num_classes")
        self.num_classes = int(p.num_classes)
        self.background_label_id = int(p.background_label_id)
        self.overlap_threshold = float(p.overlap_threshold)
        if self.overlap_threshold <= 0:
            raise self.error("overlap_threshold must be positive")
        self.evaluate_difficult_gt = bool(p.evaluate_difficult_gt)
        if p.name_size_file or p.HasField("resize_param"):
            raise self.error("name_size_file / resize_param (evaluation in pixel "
                             "coordinates) are not supported: boxes are compared normalized")
        det, gt = bottom_shapes
        if count(det) % 7 or (len(det) == 4 and (det[:2] != (1, 1) or det[3] != 7)):
            raise self.shape_error("the detections must be [1, 1, D, 7]")
        if count(gt) % 8 or (len(gt) == 4 and (gt[:2] != (1, 1) or gt[3] != 8)):
            raise self.shape_error("the ground truth must be [1, 1, G, 8]")
        self.num_det = count(det) // 7
        self.num_gt = count(gt) // 8
        self.classes = [c for c in range(self.num_classes) if c != self.background_label_id]
        return [(1, 1, len(self.classes) + self.num_det, 5)]

    def apply(self, blobs, bottoms, ctx):
        det = jax.lax.stop_gradient(bottoms[0]).reshape(self.num_det, 7)
        gt = jax.lax.stop_gradient(bottoms[1]).reshape(self.num_gt, 8)
        dt = det.dtype
        g_item = gt[:, 0].astype(jnp.int32)
        g_ok = jnp.cumprod((g_item != -1).astype(jnp.int32)) > 0
        g_label = gt[:, 1].astype(jnp.int32)
        g_diff = gt[:, 7] != 0
        counted = g_ok & (self.evaluate_difficult_gt | ~g_diff)
        cls = jnp.asarray(self.classes, jnp.int32)
        num_pos = jnp.sum(counted[None, :] & (g_label[None, :] == cls[:, None]), axis=1)
        head = jnp.stack([jnp.full(cls.shape, -1, dt), cls.astype(dt), num_pos.astype(dt),
                          jnp.full(cls.shape, -1, dt), jnp.full(cls.shape, -1, dt)], axis=1)

        d_item = det[:, 0].astype(jnp.int32)
        d_label = det[:, 1].astype(jnp.int32)
        d_ok = (d_item != -1) & (d_label != -1)
        # The fork's order: image, label ascending, score descending (stable on ties).
        big = jnp.iinfo(jnp.int32).max
        order = jnp.lexsort((-det[:, 2], jnp.where(d_ok, d_label, big),
                             jnp.where(d_ok, d_item, big)))
        det, d_item, d_label, d_ok = det[order], d_item[order], d_label[order], d_ok[order]

        def step(k, state):
            visited, tp, fp = state
            same = g_ok & (g_item == d_item[k]) & (g_label == d_label[k])
            ov = jaccard(jnp.broadcast_to(det[k, 3:7], (self.num_gt, 4)), gt[:, 3:7])
            ov = jnp.where(same, ov, -1.0)
            j = jnp.argmax(ov)
            hit = same[j] & (ov[j] >= self.overlap_threshold)
            scored = ~hit | self.evaluate_difficult_gt | ~g_diff[j]
            new = hit & scored & ~visited[j]
            tp = tp.at[k].set(jnp.where(d_ok[k] & new, 1, 0))
            fp = fp.at[k].set(jnp.where(d_ok[k] & scored & ~new, 1, 0))
            visited = jnp.where(d_ok[k] & new, visited.at[j].set(True), visited)
            return visited, tp, fp

        zeros = jnp.zeros((self.num_det,), jnp.int32)
        _, tp, fp = jax.lax.fori_loop(0, self.num_det, step,
                                      (jnp.zeros((self.num_gt,), bool), zeros, zeros))
        rows = jnp.stack([det[:, 0], det[:, 1], det[:, 2], tp.astype(dt), fp.astype(dt)], axis=1)
        pad = jnp.asarray([-2, -1, 0, 0, 0], dt)
        rows = jnp.where(d_ok[:, None], rows, pad[None, :])
        return [jnp.concatenate([head, rows]).reshape(self.top_shapes[0])]


def average_precision(tp: Sequence, fp: Sequence, scores: Sequence, num_pos: int,
                      ap_version: str = "Integral") -> float:
    """The fork's ComputeAP: detections sorted by score (stable, descending), cumulative
    true / false positives, precision ``tp / (tp + fp)``, recall ``tp / num_pos``; AP as
    ``11point`` (VOC2007: mean over recall 0, 0.1, ..., 1 of the best precision at recall >=
    r), ``MaxIntegral`` (VOC2012: area under the monotone precision envelope) or ``Integral``
    (the natural integral, sum of precision x recall step). 0 without detections or
    positives."""
    eps = 1e-6
    if len(tp) == 0 or num_pos == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    tpc = np.cumsum(np.asarray(tp, np.int64)[order])
    fpc = np.cumsum(np.asarray(fp, np.int64)[order])
    prec = (tpc / (tpc + fpc)).astype(np.float32)
    rec = (tpc / num_pos).astype(np.float32)
    n = len(prec)
    ap = np.float32(0)
    if ap_version == "11point":
        max_precs = [np.float32(0)] * 11
        start = n - 1
        for j in range(10, -1, -1):
            for i in range(start, -1, -1):
                if rec[i] < j / 10.0:
                    start = i
                    if j > 0:
                        max_precs[j - 1] = max_precs[j]
                    break
                if max_precs[j] < prec[i]:
                    max_precs[j] = prec[i]
        for j in range(10, -1, -1):
            ap += np.float32(max_precs[j] / np.float32(11))
    elif ap_version == "MaxIntegral":
        cur_rec, cur_prec = rec[-1], prec[-1]
        for i in range(n - 2, -1, -1):
            cur_prec = max(prec[i], cur_prec)
            if abs(cur_rec - rec[i]) > eps:
                ap += cur_prec * abs(cur_rec - rec[i])
            cur_rec = rec[i]
        ap += cur_rec * cur_prec
    elif ap_version == "Integral":
        prev = np.float32(0)
        for i in range(n):
            if abs(rec[i] - prev) > eps:
                ap += prec[i] * abs(rec[i] - prev)
            prev = rec[i]
    else:
        raise ValueError(f"unknown ap_version '{ap_version}' (11point, MaxIntegral, Integral)")
    return float(ap)


def average_precisions(results: Sequence, ap_version: str = "Integral"
                       ) -> tuple[float, dict[int, float]]:
    """The fork's Solver::TestDetection over the DetectionEvaluate tops of the test
    iterations: ``(mAP, {label: AP})``. Rows with image -1 add to a class's positives; other
    rows add ``(score, tp, fp)`` to their label's list unless tp = fp = 0. The mAP is the sum
    of the APs over the number of classes with a positives row (a class without any
    detection adds 0)."""
    num_pos: dict[int, int] = {}
    found: dict[int, list] = {}
    for top in results:
        for item, label, score, tp, fp in np.asarray(top, np.float32).reshape(-1, 5):
            item, label = int(item), int(label)
            if item == -1:
                num_pos[label] = num_pos.get(label, 0) + int(score)
            elif int(tp) or int(fp):
                found.setdefault(label, []).append((score, int(tp), int(fp)))
    aps = {}
    for label, n in sorted(num_pos.items()):
        if label not in found:
            continue
        s, tp, fp = zip(*found[label])
        aps[label] = average_precision(tp, fp, s, n, ap_version)
    mean = sum(aps.values()) / len(num_pos) if num_pos else 0.0
    return mean, aps


# -- training data: AnnotatedData ---------------------------------------------------------
@register("AnnotatedData")
class AnnotatedData(DataLayerBase):
    """The fork's AnnotatedData: ``AnnotatedDatum`` records of an LMDB (``data_param``:
    ``source``, ``batch_size``; the fork's ``create_annoset`` or
    ``jcaffe.tools.create_annoset`` writes them), transformed on the host as the fork's
    ``load_batch`` does (:mod:`jcaffe.data.annotated`: ``distort_param``, ``expand_param``,
    ``annotated_data_param.batch_sampler``, ``resize_param``, crop, mirror, mean,
    ``emit_constraint``).

    Tops: data ``[B, C, H, W]`` (the size ``resize_param`` / ``crop_size`` give) and the
    label ``[1, 1, G, 8]``: the fork's rows ``[item, label, instance, xmin, ymin, xmax, ymax,
    difficult]``. The fork's label blob has as many rows as the batch has boxes; a compiled
    step needs a static ``G``, so ``G = batch_size x`` the most boxes any record holds (read
    once at setup), and the rows past the batch's boxes are -1 (MultiBoxLoss and
    DetectionEvaluate skip them, as the fork's "no box" row).
    """

    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes):
        from jcaffe.data.annotated import AnnotatedLMDB, AnnotatedTransform, parse_annotated

        dp = self.param.data_param
        if not dp.source:
            raise self.error("data_param.source is not set")
        self.batch_size = self._check_batch_size(dp.batch_size)
        self.prefetch = max(1, int(dp.prefetch))
        sp = ssd_layer(self.param)
        ap, tp = sp.annotated_data_param, sp.transform_param
        self.where = f"layer '{self.name}' (type AnnotatedData): "
        if ap.HasField("anno_type") and ap.anno_type != ssd_pb2.AnnotatedDatum.BBOX:
            raise self.error("only anno_type BBOX is supported")
        self.source_path = dp.source
        self.transform = AnnotatedTransform(tp, ap.batch_sampler,
                                            self.phase == caffe_pb2.TRAIN, self.where)
        self.force = (bool(tp.force_color), bool(tp.force_gray))
        db = AnnotatedLMDB(dp.source, self.where)
        try:
            first = parse_annotated(db.value(0), db.record_where(0), *self.force)
            most = 0
            for i in range(len(db)):
                rec = ssd_pb2.AnnotatedDatum.FromString(db.value(i))
                most = max(most, sum(len(g.annotation) for g in rec.annotation_group))
        finally:
            db.close()
        self.num_gt = max(1, most * self.batch_size)
        h, w = self.transform.output_hw(first.image.shape[:2])
        c = first.image.shape[2]
        b = self.batch_size
        self._specs = [(self.top_names[0], (b, c, h, w), np.dtype(np.float32))]
        tops = [(b, c, h, w)]
        if len(self.top_names) > 1:
            self._specs.append((self.top_names[1], (1, 1, self.num_gt, 8), np.dtype(np.float32)))
            tops.append((1, 1, self.num_gt, 8))
        return tops

    def make_reader(self, seed=None):
        from jcaffe.data.annotated import AnnotatedLMDB, AnnotatedReader

        return AnnotatedReader(self, seed, AnnotatedLMDB(self.source_path, self.where),
                               self.transform, self.num_gt, *self.force)

    def apply(self, blobs, bottoms, ctx):
        return [jnp.asarray(b).astype(jnp.float32) for b in bottoms]
