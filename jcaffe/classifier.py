"""Deployment: pycaffe's ``caffe.Classifier`` and ``caffe.io`` (``Transformer``, ``load_image``,
``resize_image``, ``oversample``) on jcaffe's Net.

    clf = jcaffe.Classifier("lenet.prototxt", "lenet_iter_10000.caffemodel",
                            raw_scale=255, input_scale=0.00390625)
    probs = clf.predict([jcaffe.classifier.load_image("digit.png", color=False)],
                        oversample=False)            # [N, classes]

The semantics are pycaffe's:

* images are ``H x W x K`` float arrays (``load_image``: RGB, or one grey channel, in [0, 1]);
* ``predict`` resizes every image to ``image_dims`` (default: the net's input size), then takes
  the centre crop of the net's input size (``oversample=False``) or the 10 crops of
  :func:`oversample` (four corners and centre, and their mirror images) whose predictions are
  averaged;
* :class:`Transformer` ``preprocess``: to float32, resize to the input size if needed, transpose
  ``H x W x K`` -> ``K x H x W``, reorder channels (``channel_swap``, e.g. RGB -> BGR), multiply
  by ``raw_scale``, subtract ``mean`` (per channel, or a ``K x H x W`` image, resized when its size
  differs), multiply by ``input_scale``;
* the net runs in the TEST phase in batches of its input blob's batch size (the last batch
  padded), and ``predict`` returns the first output blob (e.g. ``prob``).

``resize_image`` interpolates bilinearly (pixel centres aligned, edges clamped: OpenCV's
``INTER_LINEAR`` on floats); pycaffe uses scikit-image's order-1 resize, which differs only at
the borders.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from jcaffe.errors import DataError, JcaffeError, NetError


# ---------------------------------------------------------------------------------------------
# caffe.io
# ---------------------------------------------------------------------------------------------


def load_image(filename: str | os.PathLike, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1], ``H x W x 3`` RGB (``color``) or ``H x W x 1`` grey
    (pycaffe's ``caffe.io.load_image``; an alpha channel is dropped)."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(filename)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = (arr / peak).astype(np.float32)
                img = np.repeat(img[:, :, None], 3, axis=2) if color else img[:, :, None]
            else:
                img = np.asarray(im.convert("RGB" if color else "L"), dtype=np.float32) / 255.0
    except OSError as e:
        if isinstance(e, UnidentifiedImageError):
            raise DataError(f"{path}: not an image file PIL can decode") from None
        raise DataError(f"{path}: cannot read image: {e.strerror or e}") from None
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img, dtype=np.float32)


def _linear_axis(src: int, dst: int):
    f = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    f = np.clip(f, 0.0, src - 1)
    i0 = np.floor(f).astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (f - i0)


def resize_image(im: np.ndarray, new_dims: Sequence[int]) -> np.ndarray:
    """``H x W x K`` -> ``new_dims[0] x new_dims[1] x K``, bilinear (see the module doc)."""
    im = np.asarray(im)
    if im.ndim != 3:
        raise JcaffeError(f"resize_image expects an H x W x K image, got shape {im.shape}")
    h, w = int(new_dims[0]), int(new_dims[1])
    if h <= 0 or w <= 0:
        raise JcaffeError(f"resize_image: target size must be positive, got {h}x{w}")
    if im.shape[:2] == (h, w):
        return im.astype(np.float32)
    x = im.astype(np.float64)
    y0, y1, fy = _linear_axis(im.shape[0], h)
    x0, x1, fx = _linear_axis(im.shape[1], w)
    rows = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return out.astype(np.float32)


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """pycaffe's 10 crops per image: corners (top-left, top-right, bottom-left, bottom-right)
    and centre, then the same five mirrored left-right; ``[10 N, h, w, K]``."""
    images = [np.asarray(im) for im in images]
    shape = np.array(images[0].shape)
    ch, cw = int(crop_dims[0]), int(crop_dims[1])
    if ch > shape[0] or cw > shape[1]:
        raise JcaffeError(f"oversample: crop {ch}x{cw} larger than the images "
                          f"({shape[0]}x{shape[1]})")
    corners = [(i, j) for i in (0, shape[0] - ch) for j in (0, shape[1] - cw)]
    # pycaffe: centre +- crop/2 in floats, truncated to int
    centre = (int(shape[0] / 2.0 - ch / 2.0), int(shape[1] / 2.0 - cw / 2.0))
    boxes = corners + [centre]
    crops = np.empty((10 * len(images), ch, cw, shape[-1]), dtype=np.float32)
    k = 0
    for im in images:
        if im.shape != images[0].shape:
            raise JcaffeError(f"oversample: images of different shapes {images[0].shape} "
                              f"and {im.shape}")
        for mirror in (False, True):
            for i, j in boxes:
                crop = im[i:i + ch, j:j + cw, :]
                crops[k] = crop[:, ::-1, :] if mirror else crop
                k += 1
    return crops


# predict()'s ``oversample`` flag shadows the function's name there.
_ten_crops = oversample


class Transformer:
    """pycaffe's ``caffe.io.Transformer``: per-input preprocessing for a net (see the module
    doc for the order of the steps). ``inputs``: ``{input name: (N, K, H, W)}``."""

    def __init__(self, inputs: Mapping[str, Sequence[int]]):
        self.inputs = {k: tuple(int(d) for d in v) for k, v in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise JcaffeError(f"{in_} is not one of the net inputs: {sorted(self.inputs)}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """``H' x W' x K`` image -> ``K x H x W`` net input."""
        self._check_input(in_)
        x = np.asarray(data).astype(np.float32, copy=True)
        in_dims = self.inputs[in_][2:]
        if x.shape[:2] != tuple(in_dims):
            x = resize_image(x, in_dims)
        if in_ in self.transpose:
            x = x.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            x = x[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            x = x * np.float32(self.raw_scale[in_])
        if in_ in self.mean:
            x = x - self.mean[in_]
        if in_ in self.input_scale:
            x = x * np.float32(self.input_scale[in_])
        return x.astype(np.float32, copy=False)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`preprocess` (without the resize)."""
        self._check_input(in_)
        x = np.array(data, dtype=np.float32).squeeze()
        if in_ in self.input_scale:
            x = x / np.float32(self.input_scale[in_])
        if in_ in self.mean:
            x = x + self.mean[in_]
        if in_ in self.raw_scale:
            x = x / np.float32(self.raw_scale[in_])
        if in_ in self.channel_swap:
            x = x[np.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            x = x.transpose(np.argsort(self.transpose[in_]))
        return x

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise JcaffeError("Transpose order needs to have the same number of dimensions as "
                              "the input.")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise JcaffeError(f"Channel swap needs to have the same number of dimensions as the "
                              f"input channels ({self.inputs[in_][1]}), got {list(order)}")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        self._check_input(in_)
        self.raw_scale[in_] = float(scale)

    def set_input_scale(self, in_: str, scale: float) -> None:
        self._check_input(in_)
        self.input_scale[in_] = float(scale)

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """A per-channel mean (``K``) or a mean image (``K x H x W`` / ``H x W``), resized to
        the input size when it differs (pycaffe's rule)."""
        self._check_input(in_)
        mean = np.asarray(mean, dtype=np.float32)
        k, h, w = self.inputs[in_][1:]
        if mean.ndim == 1:
            if mean.shape[0] != k:
                raise JcaffeError(f"Mean channels ({mean.shape[0]}) incompatible with input "
                                  f"({k}).")
            mean = mean[:, None, None]
        else:
            if mean.ndim == 2:
                mean = mean[None]
            if mean.ndim != 3:
                raise JcaffeError(f"Mean shape invalid: {list(mean.shape)}")
            if mean.shape[0] != k:
                raise JcaffeError(f"Mean channels ({mean.shape[0]}) incompatible with input "
                                  f"({k}).")
            if mean.shape[1:] != (h, w):
                mean = resize_image(mean.transpose(1, 2, 0), (h, w)).transpose(2, 0, 1)
        self.mean[in_] = np.ascontiguousarray(mean, dtype=np.float32)


def image_transformer(in_: str, shape, mean=None, input_scale=None, raw_scale=None,
                      channel_swap=None) -> Transformer:
    """pycaffe's Classifier / Detector set-up of the input ``in_`` of ``shape``: images
    ``H x W x K`` in, ``K x H x W`` out, with the given mean, scales and channel order."""
    t = Transformer({in_: shape})
    t.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        t.set_mean(in_, mean)
    if input_scale is not None:
        t.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        t.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        t.set_channel_swap(in_, channel_swap)
    return t


def load_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean file: a ``.npy`` array (pycaffe's classify.py) or a Caffe ``.binaryproto``
    (``K x H x W``)."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        try:
            return np.load(path).astype(np.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the mean .npy: {e}") from None
    from jcaffe.caffemodel import read_binaryproto

    mean = read_binaryproto(path)
    return mean[0] if mean.ndim == 4 and mean.shape[0] == 1 else mean


# ---------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------


def trained_params(net, weights: str | os.PathLike | None, key=None):
    """``net``'s parameters with the blobs of the ``weights`` caffemodel copied in (Caffe's
    ``Net(...)`` + ``CopyTrainedLayersFrom``). When the model covers every parameter blob the
    fillers are not run (their compiled program costs seconds); otherwise the blobs it lacks
    keep their filler values, as in Caffe."""
    import jax
    import jax.numpy as jnp

    from jcaffe.caffemodel import load_caffemodel

    key = jax.random.key(0) if key is None else key
    if weights is None:
        return net.init(key)
    weights = os.fspath(weights)
    source = load_caffemodel(weights)
    shapes = jax.eval_shape(net.init, key)
    covered = all(name in source and j < len(source[name]) and source[name][j] is not None
                  for name, blobs in shapes.items() for j, b in enumerate(blobs) if b is not None)
    if covered:
        start = {name: [None if b is None else jnp.zeros(b.shape, b.dtype) for b in blobs]
                 for name, blobs in shapes.items()}
    else:
        start = net.init(key)
    return net.copy_from(start, source, filename=weights)


class Classifier:
    """pycaffe's ``caffe.Classifier``: a TEST-phase net with trained weights and the
    preprocessing of its (first) input blob."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        import jax

        from jcaffe.net import Net

        self.net = Net(model_file, "TEST", verbose=False)
        specs = self.net.input_specs()
        if not specs:
            raise NetError(f"{model_file}: the net has no input blob (an Input layer) to feed "
                           f"images to")
        self.inputs = list(specs)
        self.outputs = list(self.net.output_names)
        if not self.outputs:
            raise NetError(f"{model_file}: the net has no output blob")
        self.params = trained_params(self.net, pretrained_file)
        in_ = self.inputs[0]
        shape = specs[in_][0]
        if len(shape) != 4:
            raise NetError(f"{model_file}: input '{in_}' has shape {list(shape)}; a classifier "
                           f"needs N x K x H x W")
        self.transformer = image_transformer(in_, shape, mean, input_scale, raw_scale,
                                             channel_swap)
        self.crop_dims = np.array(shape[2:])
        self.image_dims = np.array(self.crop_dims if image_dims is None or len(image_dims) == 0
                                   else image_dims, dtype=int)
        if np.any(self.image_dims < self.crop_dims):
            raise JcaffeError(f"image_dims {list(self.image_dims)} smaller than the net's input "
                              f"{list(self.crop_dims)}")
        # A key per forward pass: Caffe's TEST net draws at every pass too (DummyData's random
        # fillers, mirror: true).
        self._forward = jax.jit(lambda p, x, k: self.net.apply(p, x, train=False, key=k))
        self._key, self._passes = jax.random.key(0), 0

    def _next_key(self):
        """The PRNG key of the next forward pass (one per pass, as Caffe draws at each)."""
        import jax

        key = jax.random.fold_in(self._key, self._passes)
        self._passes += 1
        return key

    @property
    def batch_size(self) -> int:
        return int(self.transformer.inputs[self.inputs[0]][0])

    def forward_all(self, **inputs) -> dict[str, np.ndarray]:
        """The net's output blobs for inputs of any count N (run in batches of the net's batch
        size; the last one padded with zeros)."""
        in_ = self.inputs[0]
        x = np.asarray(inputs[in_], dtype=np.float32)
        n, b = x.shape[0], self.batch_size
        expected = self.transformer.inputs[in_][1:]
        if tuple(x.shape[1:]) != tuple(expected):
            raise JcaffeError(f"input '{in_}': got {list(x.shape[1:])} per item, the net takes "
                              f"{list(expected)}")
        outs: dict[str, list[np.ndarray]] = {k: [] for k in self.outputs}
        for start in range(0, n, b):
            chunk = x[start:start + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:],
                                                        np.float32)])
            blobs = self._forward(self.params, {in_: chunk}, self._next_key())
            for k in self.outputs:
                outs[k].append(np.asarray(blobs[k]))
        return {k: np.concatenate(v)[:n] for k, v in outs.items()}

    def preprocess_batch(self, inputs: Sequence[np.ndarray], oversample: bool = True
                         ) -> np.ndarray:
        """The ``N x K x H x W`` (``10N`` with oversampling) batch :meth:`predict` feeds."""
        if len(inputs) == 0:
            raise JcaffeError("predict needs at least one image")
        k = np.asarray(inputs[0]).shape[2]
        input_ = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], k), np.float32)
        for ix, in_ in enumerate(inputs):
            in_ = np.asarray(in_)
            if in_.ndim != 3 or in_.shape[2] != k:
                raise JcaffeError(f"image {ix}: shape {list(in_.shape)}; all images must be "
                                  f"H x W x {k}")
            input_[ix] = resize_image(in_, self.image_dims)
        if oversample:
            input_ = _ten_crops(input_, self.crop_dims)
        else:
            centre = np.array(self.image_dims) / 2.0
            crop = np.concatenate([centre - self.crop_dims / 2.0,
                                   centre + self.crop_dims / 2.0]).astype(int)
            input_ = input_[:, crop[0]:crop[2], crop[1]:crop[3], :]
        name = self.inputs[0]
        return np.stack([self.transformer.preprocess(name, im) for im in input_])

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """Class probabilities ``[N, C]`` (the first output blob) of ``H x W x K`` images."""
        caffe_in = self.preprocess_batch(inputs, oversample)
        out = self.forward_all(**{self.inputs[0]: caffe_in})[self.outputs[0]]
        predictions = out.reshape(len(out), -1)
        if oversample:
            predictions = predictions.reshape(len(predictions) // 10, 10, -1).mean(1)
        return predictions


class Detector(Classifier):
    """An SSD-style detector (the SSD fork's ``examples/ssd/ssd_detect.py``): a TEST-phase net
    whose output is a DetectionOutput top. Images (``H x W x K`` floats in [0, 1], as
    :func:`load_image` reads them) are warped to the net's input size and preprocessed as
    :class:`Classifier` does (``mean``, ``raw_scale``, ``input_scale``, ``channel_swap``).

    ``detect(images)`` returns one array per image of its detections ``[n, 7]``: ``[image,
    label, score, xmin, ymin, xmax, ymax]`` with corners normalized to the image (multiply by
    its width / height for pixels), in the fork's order, ``score >= threshold``. The
    DetectionOutput top is fixed-size (``keep_top_k`` rows per image, padded with label -1
    rows): :func:`jcaffe.layers.detection.detections` drops the padding.
    """

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, output=None):
        super().__init__(model_file, pretrained_file, mean=mean, input_scale=input_scale,
                         raw_scale=raw_scale, channel_swap=channel_swap)
        outs = [l.top_names[0] for l in self.net.layers if l.type == "DetectionOutput"]
        self.output = output or (outs[-1] if outs else None)
        if self.output is None or self.output not in self.outputs:
            raise NetError(f"{model_file}: the net has no DetectionOutput output blob")

    def detect(self, images: Sequence[np.ndarray], threshold: float = 0.0) -> list[np.ndarray]:
        from jcaffe.layers.detection import detections

        batch = self.preprocess_batch(images, oversample=False)
        b = self.batch_size
        found: list[np.ndarray] = []
        for start in range(0, len(batch), b):
            chunk = batch[start:start + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], np.float32)])
            top = self._forward(self.params, {self.inputs[0]: chunk}, self._next_key())[self.output]
            for i, rows in enumerate(detections(top)[:n]):
                rows = rows[rows[:, 2] >= threshold].copy()
                rows[:, 0] = start + i
                found.append(rows)
        return found
