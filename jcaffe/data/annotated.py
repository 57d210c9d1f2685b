"""The SSD fork's annotated data: ``AnnotatedDatum`` LMDBs (as the fork's ``create_annoset``
writes them) and its training-time transforms, on the host.

An item goes through the fork's ``AnnotatedDataLayer::load_batch``: ``distort_param``
(brightness, contrast, saturation, hue, channel order, in the fork's two orders), then
``expand_param`` (the image placed at a random spot of a canvas up to ``max_expand_ratio``
times larger, filled with the mean), then one crop drawn from the boxes every
``batch_sampler`` proposes (scale / aspect ranges, Jaccard / coverage constraints,
``max_trials``, ``max_sample``), then the DataTransformer: ``resize_param`` (WARP, the
interpolation drawn from ``interp_mode``), ``crop_size`` / ``crop_h`` / ``crop_w`` (random in
TRAIN, centred in TEST), ``mirror``, ``mean_value`` and ``scale``. Boxes follow each step
(the fork's TransformAnnotation: a box is kept when ``emit_constraint`` holds for it and it
overlaps the crop, then it is projected into the crop and clipped to [0, 1]).

Random numbers, per item: the item at stream position ``q`` (``jcaffe.data.readers``: record
``q % count``) draws every random number of its transform, in the order above, from its own
generator ``numpy.random.default_rng([seed, 5, q])`` (``seed``: the reader's). An item's
pixels and boxes are therefore a function of ``(seed, q)`` alone: reproducible, resumable
from any position, the same whichever batch (or process's share of one) the item falls in,
and the same whatever the number of decode workers, which transform the items of a batch in
parallel (``jcaffe.data.workers``), each into its own slot.

Differences from the fork: the images stay decoded between the steps (the fork re-encodes
each distorted / expanded / cropped image as JPEG, a lossy round trip); random numbers come
from numpy as above, not from Caffe's RNG. Not supported (an error naming the field):
``noise_param``, resize modes other than WARP, ``mean_file``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jcaffe.data.image import decode_image
from jcaffe.data.readers import BatchReader, ReaderOwner
from jcaffe.data.sources import LMDB_HANDLES
from jcaffe.errors import DataError
from jcaffe.proto import ssd_pb2

_INTERP = {1: "INTER_LINEAR", 2: "INTER_AREA", 3: "INTER_NEAREST", 4: "INTER_CUBIC",
           5: "INTER_LANCZOS4"}


def _cv2(where: str):
    try:
        import cv2
    except ImportError:
        raise DataError(f"{where}needs OpenCV for its image transforms: pip install "
                        f"'opencv-python-headless'") from None
    return cv2


# -- boxes (the fork's bbox_util on [xmin, ymin, xmax, ymax] float32 arrays) ---------------
def _size(b) -> float:
    w, h = b[2] - b[0], b[3] - b[1]
    return 0.0 if w < 0 or h < 0 else float(np.float32(w) * np.float32(h))


def _intersect(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return np.zeros(4, np.float32)
    return np.asarray([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])],
                      np.float32)


def jaccard(a, b) -> float:
    i = _intersect(a, b)
    iw, ih = i[2] - i[0], i[3] - i[1]
    if iw > 0 and ih > 0:
        inter = float(np.float32(iw) * np.float32(ih))
        return inter / (_size(a) + _size(b) - inter)
    return 0.0


def coverage(a, b) -> float:
    """The fork's BBoxCoverage: the part of ``a`` inside ``b``."""
    inter = _size(_intersect(a, b))
    return inter / _size(a) if inter > 0 else 0.0


def clip(b):
    return np.clip(np.asarray(b, np.float32), 0.0, 1.0)


def project(src, b):
    """The fork's ProjectBBox: ``b`` in the coordinates of ``src``, clipped; None when it does
    not overlap ``src`` or is empty after clipping."""
    if b[0] >= src[2] or b[2] <= src[0] or b[1] >= src[3] or b[3] <= src[1]:
        return None
    w, h = src[2] - src[0], src[3] - src[1]
    p = clip([(b[0] - src[0]) / w, (b[1] - src[1]) / h, (b[2] - src[0]) / w,
              (b[3] - src[1]) / h])
    return p if _size(p) > 0 else None


def meets_emit_constraint(src, b, emit) -> bool:
    """The fork's MeetEmitConstraint: CENTER (the box centre inside ``src``) or MIN_OVERLAP
    (more than ``emit_overlap`` of the box inside ``src``)."""
    if emit is None:
        return True
    if emit.emit_type == ssd_pb2.EmitConstraint.CENTER:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return src[0] <= cx <= src[2] and src[1] <= cy <= src[3]
    return coverage(b, src) > emit.emit_overlap


# SampleConstraint's bounded measures, in the fork's order: (sample, object) -> jaccard,
# the sample's part inside the object, the object's part inside the sample.
_MEASURES = ("jaccard_overlap", "sample_coverage", "object_coverage")


def _sizes(b: np.ndarray) -> np.ndarray:
    """``_size`` over boxes ``[..., 4]`` float32: the float32 product as a double, 0 when
    the box is inverted."""
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.where((w < 0) | (h < 0), 0.0, (w * h).astype(np.float64))


def _intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_intersect`` over broadcast boxes ``a [..., 4]`` and ``b [..., 4]``."""
    apart = (b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0]) | \
        (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1])
    inside = np.concatenate([np.maximum(a[..., :2], b[..., :2]),
                             np.minimum(a[..., 2:], b[..., 2:])], axis=-1)
    return np.where(apart[..., None], np.float32(0), inside).astype(np.float32)


def _measure(name: str, samples: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """One of ``_MEASURES`` for every (sample, object) pair: ``[T, O]`` doubles, each equal
    to the scalar :func:`jaccard` / :func:`coverage`'s (the same float32 / double steps in
    the same order)."""
    a, b = samples[:, None, :], objects[None, :, :]
    if name == "object_coverage":
        a, b = b, a
    inter = _intersections(a, b)
    if name == "jaccard_overlap":
        iw, ih = inter[..., 2] - inter[..., 0], inter[..., 3] - inter[..., 1]
        area = (iw * ih).astype(np.float64)
        overlap = (iw > 0) & (ih > 0)
        union = _sizes(a) + _sizes(b) - area
        return np.where(overlap, area / np.where(overlap, union, 1.0), 0.0)
    area = _sizes(inter)
    return np.where(area > 0, area / np.where(area > 0, _sizes(a), 1.0), 0.0)


def satisfied(samples: np.ndarray, objects: np.ndarray, c) -> np.ndarray:
    """The fork's SatisfySampleConstraint for each of ``samples [T, 4]`` (bool ``[T]``).

    The fork loops over the objects; for each it tests the bounded measures in order,
    ``continue``-ing to the next object at the first that fails and setting ``found`` at
    each that passes, and returns ``found`` after an object's tests (or at the end). So an
    object passing the first bounded measure is enough (a later measure failing for it does
    not clear ``found``), and one failing it is skipped before any other is looked at: a
    sample satisfies when some object passes the first bounded measure (always, with none
    bounded; never, with objects none)."""
    active = [name for name in _MEASURES
              if c.HasField("min_" + name) or c.HasField("max_" + name)]
    if not active:
        return np.ones(len(samples), bool)
    if not len(objects):
        return np.zeros(len(samples), bool)
    name = active[0]
    v = _measure(name, samples, np.asarray(objects, np.float32).reshape(-1, 4))
    ok = np.ones(v.shape, bool)
    if c.HasField("min_" + name):
        ok &= ~(v < getattr(c, "min_" + name))
    if c.HasField("max_" + name):
        ok &= ~(v > getattr(c, "max_" + name))
    return ok.any(axis=1)


def sample_boxes(rng, objects, samplers) -> list[np.ndarray]:
    """The fork's GenerateBatchSamples: for each batch_sampler (``use_original_image``), up to
    ``max_trials`` boxes of scale in [min_scale, max_scale] and aspect ratio in
    [min_aspect_ratio, max_aspect_ratio] (clamped to [scale^2, 1/scale^2]) at a uniform
    offset, kept when they meet ``sample_constraint``, at most ``max_sample`` of them.

    A sampler's trials are drawn and judged together, as arrays: trial t takes the next four
    uniforms of ``rng`` (scale, aspect ratio, x and y offset), as a trial-by-trial loop would,
    and ``rng`` is left where that loop would stop (after the trial that found the
    ``max_sample``-th box, else after the last), so every box, and every number drawn after,
    is the loop's."""
    objects = np.asarray(objects, np.float32).reshape(-1, 4)
    out = []
    f = np.float32
    for bs in samplers:
        if not bs.use_original_image:
            continue
        s, trials = bs.sampler, int(bs.max_trials)
        if trials <= 0:
            continue
        state = rng.bit_generator.state
        u = rng.random((trials, 4))
        # rng.uniform(lo, hi) is lo + (hi - lo) * u in doubles; then the fork's float32 steps.
        scale = (s.min_scale + (s.max_scale - s.min_scale) * u[:, 0]).astype(f)
        ar = (s.min_aspect_ratio + (s.max_aspect_ratio - s.min_aspect_ratio)
              * u[:, 1]).astype(f)
        sq = scale ** 2
        ar = np.minimum(np.maximum(ar, sq), f(1) / sq)
        w, h = scale * np.sqrt(ar), scale / np.sqrt(ar)
        # float32 rounding can put a full-size box a hair past 1: offset 0 then.
        x0 = (np.maximum(f(0), f(1) - w).astype(np.float64) * u[:, 2]).astype(f)
        y0 = (np.maximum(f(0), f(1) - h).astype(np.float64) * u[:, 3]).astype(f)
        boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
        ok = satisfied(boxes, objects, bs.sample_constraint)
        used = trials
        if bs.HasField("max_sample"):
            # Trial t runs while fewer than max_sample boxes were found before it.
            before = np.concatenate([[0], np.cumsum(ok)])
            full = np.flatnonzero(before >= bs.max_sample)
            used = min(trials, int(full[0])) if len(full) else trials
            if used < trials:
                rng.bit_generator.state = state
                rng.random(4 * used)
        out.extend(boxes[:used][ok[:used]])
    return out


# -- items ------------------------------------------------------------------------------------
class Item:
    """A decoded image ``uint8 [H, W, C]`` (BGR) and its boxes: ``boxes [n, 4]`` normalized,
    ``labels``, ``instances``, ``difficult`` (the AnnotationGroups, in order)."""

    def __init__(self, image, boxes, labels, instances, difficult):
        self.image = image
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(labels, np.int64)
        self.instances = np.asarray(instances, np.int64)
        self.difficult = np.asarray(difficult, bool)

    def reframe(self, frame, emit=None) -> "Item":
        """The fork's TransformAnnotation for an image cut to ``frame`` (normalized, may reach
        outside [0, 1] for an expansion): boxes meeting ``emit`` and overlapping the frame,
        projected into it and clipped."""
        keep, boxes = [], []
        for k, b in enumerate(self.boxes):
            if not meets_emit_constraint(frame, b, emit):
                continue
            p = project(frame, b)
            if p is not None:
                keep.append(k)
                boxes.append(p)
        k = np.asarray(keep, np.int64)
        return Item(self.image, boxes, self.labels[k], self.instances[k], self.difficult[k])


def parse_annotated(value: bytes, where: str, force_color: bool, force_gray: bool) -> Item:
    """One LMDB record: an ``AnnotatedDatum`` (encoded image or raw ``C x H x W`` bytes)."""
    ad = ssd_pb2.AnnotatedDatum()
    try:
        ad.ParseFromString(value)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise DataError(f"{where}: not an AnnotatedDatum ({e})") from None
    d = ad.datum
    if d.encoded:
        color = True if force_color else (False if force_gray else None)
        img = decode_image(d.data, color, where=where)
    elif d.data:
        n = d.channels * d.height * d.width
        if len(d.data) != n:
            raise DataError(f"{where}: datum holds {len(d.data)} bytes, its shape "
                            f"{d.channels}x{d.height}x{d.width} needs {n}")
        img = np.frombuffer(d.data, np.uint8).reshape(d.channels, d.height, d.width)
        img = np.ascontiguousarray(img.transpose(1, 2, 0))
    else:
        raise DataError(f"{where}: the datum has no image data")
    if img.ndim == 2:
        img = img[:, :, None]
    boxes, labels, inst, diff = [], [], [], []
    for g in ad.annotation_group:
        for a in g.annotation:
            b = a.bbox
            boxes.append([b.xmin, b.ymin, b.xmax, b.ymax])
            labels.append(g.group_label)
            inst.append(a.instance_id)
            diff.append(b.difficult)
    return Item(img, boxes, labels, inst, diff)


class AnnotatedTransform:
    """The fork's annotated DataTransformer steps for one layer (see the module doc).

    ``transform(rng, item)`` returns ``(float32 [C, H, W], Item)``; every random number comes
    from ``rng``. The object holds only its parameters, set here and never changed, and each
    call builds new arrays and Items (the input item is not modified), so several threads may
    transform items with one object at once."""

    def __init__(self, tp, samplers: Sequence, train: bool, where: str):
        self.where = where
        if tp.HasField("noise_param"):
            raise DataError(f"{where}transform_param.noise_param is not supported")
        if tp.HasField("mean_file"):
            raise DataError(f"{where}transform_param.mean_file is not supported with "
                            f"AnnotatedData: give mean_value")
        if tp.HasField("resize_param") and tp.resize_param.resize_mode != \
                ssd_pb2.ResizeParameter.WARP:
            raise DataError(f"{where}resize_param.resize_mode "
                            f"{ssd_pb2.ResizeParameter.Resize_mode.Name(tp.resize_param.resize_mode)}"
                            f" is not supported (WARP is)")
        self.tp = tp
        self.samplers = list(samplers)
        self.train = train
        self.emit = tp.emit_constraint if tp.HasField("emit_constraint") else None
        self.mean = np.asarray(tp.mean_value, np.float32) if len(tp.mean_value) else None
        self.crop_h = int(tp.crop_size or tp.crop_h)
        self.crop_w = int(tp.crop_size or tp.crop_w)

    def output_hw(self, image_hw) -> tuple[int, int]:
        if self.crop_h and self.crop_w:
            return self.crop_h, self.crop_w
        if self.tp.HasField("resize_param"):
            rp = self.tp.resize_param
            return int(rp.height), int(rp.width)
        return tuple(image_hw)

    def distort(self, rng, img):
        """The fork's ApplyDistort."""
        if not self.tp.HasField("distort_param"):
            return img
        cv2 = _cv2(self.where)
        p = self.tp.distort_param

        def brightness(im):
            if rng.uniform() < p.brightness_prob:
                d = rng.uniform(-p.brightness_delta, p.brightness_delta)
                if abs(d) > 0:  # cv::Mat::convertTo(-1, 1, d): rounded, saturated
                    im = np.clip(np.round(im.astype(np.float32) + d), 0, 255).astype(np.uint8)
            return im

        def contrast(im):
            if rng.uniform() < p.contrast_prob:
                d = rng.uniform(p.contrast_lower, p.contrast_upper)
                if abs(d - 1) > 1e-3:
                    im = np.clip(np.round(im.astype(np.float32) * d), 0, 255).astype(np.uint8)
            return im

        def hsv(im, channel, fn):
            h = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
            h[:, :, channel] = fn(h[:, :, channel].astype(np.float32))
            return cv2.cvtColor(h, cv2.COLOR_HSV2BGR)

        def saturation(im):
            if rng.uniform() < p.saturation_prob:
                d = rng.uniform(p.saturation_lower, p.saturation_upper)
                if abs(d - 1) != 1e-3:
                    im = hsv(im, 1, lambda s: np.clip(np.round(s * d), 0, 255))
            return im

        def hue(im):
            if rng.uniform() < p.hue_prob:
                d = rng.uniform(-p.hue_delta, p.hue_delta)
                if abs(d) > 0:
                    im = hsv(im, 0, lambda s: np.clip(np.round(s + d), 0, 255))
            return im

        def order(im):
            if rng.uniform() < p.random_order_prob:
                im = np.ascontiguousarray(im[:, :, rng.permutation(im.shape[2])])
            return im

        if img.shape[2] != 3:
            raise DataError(f"{self.where}distort_param needs colour (3-channel) images")
        steps = ((brightness, contrast, saturation, hue, order) if rng.uniform() > 0.5
                 else (brightness, saturation, hue, contrast, order))
        for step in steps:
            img = step(img)
        return img

    def expand(self, rng, item: Item) -> Item:
        """The fork's ExpandImage: canvas ``int(H * r) x int(W * r)`` filled with the mean,
        the image at a floor'ed uniform offset, ``r`` uniform in [1, max_expand_ratio]."""
        if not self.tp.HasField("expand_param"):
            return item
        ep = self.tp.expand_param
        if rng.uniform() > ep.prob or abs(ep.max_expand_ratio - 1) < 1e-2:
            return item
        r = rng.uniform(1, ep.max_expand_ratio)
        h, w, c = item.image.shape
        eh, ew = int(h * r), int(w * r)
        h_off = float(np.floor(rng.uniform(0, eh - h)))
        w_off = float(np.floor(rng.uniform(0, ew - w)))
        canvas = np.zeros((eh, ew, c), np.uint8)
        if self.mean is not None and len(self.mean) in (1, c):
            canvas[:] = np.resize(self.mean, c).astype(np.uint8)  # the fork fills the mean
        canvas[int(h_off):int(h_off) + h, int(w_off):int(w_off) + w] = item.image
        frame = np.asarray([-w_off / w, -h_off / h, (ew - w_off) / w, (eh - h_off) / h],
                           np.float32)
        out = item.reframe(frame)
        out.image = canvas
        return out

    def sample(self, rng, item: Item) -> Item:
        """The fork's batch sampling and CropImage: one of the sampled boxes (uniform), the
        image cut to it (clipped, scaled, truncated to whole pixels)."""
        if not self.samplers:
            return item
        boxes = sample_boxes(rng, list(item.boxes), self.samplers)
        if not boxes:
            return item
        box = clip(boxes[int(rng.integers(len(boxes)))])
        h, w = item.image.shape[:2]
        x0, y0 = int(np.float32(box[0] * w)), int(np.float32(box[1] * h))
        cw = int(np.float32(box[2] * w) - np.float32(box[0] * w))
        ch = int(np.float32(box[3] * h) - np.float32(box[1] * h))
        out = item.reframe(box, self.emit)
        out.image = np.ascontiguousarray(item.image[y0:y0 + ch, x0:x0 + cw])
        return out

    def finish(self, rng, item: Item) -> tuple[np.ndarray, Item]:
        """The DataTransformer proper: resize, crop, mirror, mean and scale; returns the
        ``float32 [C, H, W]`` image and the boxes in it."""
        img = item.image
        if self.tp.HasField("resize_param"):
            rp = self.tp.resize_param
            cv2 = _cv2(self.where)
            modes = list(rp.interp_mode) or [ssd_pb2.ResizeParameter.LINEAR]
            mode = modes[int(rng.integers(len(modes)))]
            if rp.prob >= 1 or rng.uniform() <= rp.prob:
                img = cv2.resize(img, (int(rp.width), int(rp.height)),
                                 interpolation=getattr(cv2, _INTERP[mode]))
                if img.ndim == 2:
                    img = img[:, :, None]
        h, w = img.shape[:2]
        h_off = w_off = 0
        ch, cw = h, w
        if self.crop_h and self.crop_w:
            ch, cw = self.crop_h, self.crop_w
            if h < ch or w < cw:
                raise DataError(f"{self.where}image {h}x{w} is smaller than the crop {ch}x{cw}")
            if self.train:
                h_off, w_off = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            else:
                h_off, w_off = (h - ch) // 2, (w - cw) // 2
            img = img[h_off:h_off + ch, w_off:w_off + cw]
        frame = np.asarray([w_off / w, h_off / h, (w_off + cw) / w, (h_off + ch) / h],
                           np.float32)
        mirror = bool(self.tp.mirror) and bool(rng.integers(2))
        out = item.reframe(frame, self.emit)
        if mirror:
            img = img[:, ::-1]
            out.boxes = np.stack([1 - out.boxes[:, 2], out.boxes[:, 1], 1 - out.boxes[:, 0],
                                  out.boxes[:, 3]], axis=1) if len(out.boxes) else out.boxes
        x = img.astype(np.float32)
        if self.mean is not None:
            if len(self.mean) not in (1, x.shape[2]):
                raise DataError(f"{self.where}give 1 mean_value or as many as channels "
                                f"({x.shape[2]})")
            x = x - self.mean
        x = x * np.float32(self.tp.scale)
        return np.ascontiguousarray(x.transpose(2, 0, 1)), out

    def __call__(self, rng, item: Item) -> tuple[np.ndarray, Item]:
        item = Item(self.distort(rng, item.image), item.boxes, item.labels, item.instances,
                    item.difficult)
        item = self.expand(rng, item)
        item = self.sample(rng, item)
        return self.finish(rng, item)


class AnnotatedLMDB:
    """The records of an AnnotatedDatum LMDB (key order), read on demand."""

    def __init__(self, path: str, where: str):
        import lmdb

        self.path = path
        self.where = where
        if not os.path.exists(path):
            raise DataError(f"{where}source '{path}' does not exist")
        self.env = None
        try:
            self.env = LMDB_HANDLES.acquire(path)
            with self.env.begin() as txn:
                self.keys = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as e:
            self.close()
            raise DataError(f"{where}{path}: cannot read LMDB: {type(e).__name__}: {e}") from None
        if not self.keys:
            self.close()
            raise DataError(f"{where}{path}: LMDB holds no records")

    def __len__(self) -> int:
        return len(self.keys)

    def value(self, i: int) -> bytes:
        """Record ``i``'s stored bytes, in a read transaction of its own. Safe from several
        threads at once: the environment is opened read-only with ``lock=False``
        (``jcaffe.data.sources``: no reader table, so no ``max_readers`` bound), and py-lmdb
        runs LMDB in ``MDB_NOTLS`` mode, where read transactions are not tied to a thread;
        each call begins and ends its transaction in the calling thread."""
        import lmdb

        try:
            with self.env.begin() as txn:
                return txn.get(self.keys[i])
        except lmdb.Error as e:
            raise DataError(f"{self.record_where(i)}: LMDB read failed: {type(e).__name__}: "
                            f"{e}") from None

    def record_where(self, i: int) -> str:
        return f"{self.path}: record {i} (key '{self.keys[i].decode('utf-8', 'replace')}')"

    def close(self) -> None:
        if self.env is not None:
            self.env = None
            LMDB_HANDLES.release(self.path)


class AnnotatedReader(BatchReader):
    """AnnotatedData batches: ``data float32 [B, C, H, W]`` and ``label float32 [1, 1, G, 8]``
    (the fork's rows ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]`` of the
    batch's boxes, then rows of -1 up to the static ``G``). Records in key order, wrapping.

    The item at stream position ``q`` is record ``q % count`` transformed with the random
    numbers of ``default_rng([seed, 5, q])`` (:meth:`item_rng`): it does not depend on the
    batch it falls in, on the other positions read with it, or on the worker count. Each item
    is read, decoded and transformed on a decode worker into its own slot; the label rows are
    built after, in item order."""

    shuffled = True  # random host transforms: never a device-resident copy

    def __init__(self, layer: ReaderOwner, seed, db: AnnotatedLMDB, transform, num_gt: int,
                 force_color: bool = False, force_gray: bool = False,
                 workers: int | None = None):
        self.db = db
        self.transform = transform
        self.num_gt = int(num_gt)
        self.force_color, self.force_gray = force_color, force_gray
        super().__init__(layer, seed, len(db), workers)

    def item(self, i: int) -> Item:
        return parse_annotated(self.db.value(i), self.db.record_where(i), self.force_color,
                               self.force_gray)

    def item_rng(self, position: int) -> np.random.Generator:
        """The generator of the item at stream ``position``: ``default_rng([seed, 5, q])``."""
        return np.random.default_rng([self.seed, 5, int(position)])

    def transformed(self, position: int) -> tuple[np.ndarray, Item]:
        """The item at stream ``position``: ``float32 [C, H, W]`` and its boxes."""
        return self.transform(self.item_rng(position), self.item(int(position % self.count)))

    def read_positions(self, positions) -> dict[str, np.ndarray]:
        """The items at stream ``positions`` (any, in the order given: a batch, or one
        process's share of a global batch); ``item`` in the label rows is the index in
        ``positions``."""
        self._check_nonempty()
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = len(positions)
        want = self.specs[self.tops[0]][0]
        data = self.pool.empty((n, *want), np.float32)
        items: list[Item | None] = [None] * n
        shapes: list[tuple | None] = [None] * n  # an item whose image is not the top's size

        def one(k: int) -> None:
            x, items[k] = self.transformed(int(positions[k]))
            if tuple(x.shape) != tuple(want):
                shapes[k] = tuple(x.shape)
            else:
                data[k] = x

        self.pool.run(one, n)
        rows = []
        for k, item in enumerate(items):
            for b, lab, inst, diff in zip(item.boxes, item.labels, item.instances,
                                          item.difficult):
                rows.append([k, lab, inst, *b, float(diff)])
        if len(rows) > self.num_gt:
            raise DataError(f"layer '{self.layer.name}': a batch holds {len(rows)} boxes, more "
                            f"than the label blob's {self.num_gt} rows")
        label = np.full((1, 1, self.num_gt, 8), -1, np.float32)
        if rows:
            label[0, 0, :len(rows)] = np.asarray(rows, np.float32)
        bad = next((s for s in shapes if s is not None), None)
        if bad is not None:
            raise DataError(f"layer '{self.layer.name}': transformed images are "
                            f"{list(bad)}, the top is {list(want)} (give resize_param "
                            f"or crop_size so every image has the same size)")
        out = {self.tops[0]: data}
        if len(self.tops) > 1:
            out[self.tops[1]] = label
        self.count_read(n)
        return out

    def load_all(self):
        raise DataError(f"layer '{self.layer.name}': AnnotatedData transforms at random; it "
                        f"has no fixed records to load whole")

    def close(self) -> None:
        super().close()  # the batch read ahead first: it reads the database
        self.db.close()


def label_map(path: str) -> dict[str, int]:
    """A LabelMap prototxt (the fork's ``labelmap_voc.prototxt``): name -> label."""
    from google.protobuf import text_format

    lm = ssd_pb2.LabelMap()
    try:
        with open(path, encoding="utf-8") as f:
            text_format.Parse(f.read(), lm)
    except OSError as e:
        raise DataError(f"{path}: cannot read the label map: {e.strerror or e}") from None
    except text_format.ParseError as e:
        raise DataError(f"{path}:{e}") from None
    return {item.name: int(item.label) for item in lm.item}


__all__ = ["AnnotatedLMDB", "AnnotatedReader", "AnnotatedTransform", "Item", "label_map",
           "parse_annotated", "sample_boxes"]
