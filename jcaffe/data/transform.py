"""Caffe's DataTransformer as a pure, jittable function over a batch.

The host feeds raw records (uint8 or float32, ``[N, C, H, W]``); ``Transformer.apply`` turns them
into the float32 blob Caffe's ``DataTransformer::Transform`` produces, on the device, inside the
jitted step. For every image and every element::

    top[n, c, h, w'] = (x[n, c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale

with ``w' = crop_w - 1 - w`` when the image is mirrored and ``w' = w`` otherwise. So the mean
(``mean_file``, read by ``jcaffe.caffemodel.read_binaryproto`` with Caffe's ``Blob::FromProto``
rules) is subtracted *before* the crop and the mirror, at the data's own pixel, then
the difference is scaled; ``mean_value`` is one value per channel (one value is repeated for
all channels). ``mean_file`` and ``mean_value`` exclude each other.

Random numbers (drawn from the key passed to ``apply``):

* crop offsets: with ``crop_size`` and ``train``, ``h_off`` and ``w_off`` are drawn uniformly
  from ``[0, H - crop]`` / ``[0, W - crop]`` independently for each image; otherwise the centre
  crop ``((H - crop) // 2, (W - crop) // 2)`` is taken.
* mirror: with ``mirror: true`` every image is flipped left-right with probability 1/2, in
  *both* phases, as Caffe does (its ``do_mirror = mirror() && Rand(2)`` ignores the phase; nets
  normally set ``mirror`` only in their TRAIN data layer). A mirroring transformer therefore
  needs a key at TEST as well.

``force_color`` / ``force_gray`` only concern encoded records (JPEG/PNG inside a Datum). They
act at decode time on the host: ``host_convert`` turns a decoded batch into 3 channels
(gray replicated, as OpenCV's gray-to-BGR) or 1 channel (OpenCV's fixed-point BGR-to-gray
weights 0.114 B + 0.587 G + 0.299 R). For raw (unencoded) records Caffe ignores them with an
error message; so do we (with a warning).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.caffemodel import read_binaryproto
from jcaffe.errors import DataError, JcaffeError, ModelError
from jcaffe.proto import caffe_pb2

_log = log.get_logger("data")

Shape3 = tuple[int, int, int]


def bgr_to_gray(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(BGR2GRAY)`` for uint8 ``[..., 3, H, W]`` (fixed point, 14 bits)."""
    x = x.astype(np.int32)
    g = (x[..., 0, :, :] * 1868 + x[..., 1, :, :] * 9617 + x[..., 2, :, :] * 4899 + (1 << 13)) >> 14
    return np.clip(g, 0, 255).astype(np.uint8)[..., None, :, :]


class Transformer:
    """Caffe's DataTransformer for one data layer.

    ``param``: the layer's TransformationParameter; ``datum_shape``: ``(C, H, W)`` of one record
    as the source stores it; ``phase``: the layer's phase (caffe_pb2.TRAIN / TEST); ``where``:
    the owning layer (parameter errors become its LayerError) or a string naming it;
    ``encoded``: whether the records are encoded images (True / False / None for unknown;
    enables the host side of force_color / force_gray, see ``host_convert``).

    Attributes: ``input_shape`` (C, H, W) of the raw records fed to ``apply`` (after
    force_color / force_gray), ``output_shape`` (C, crop, crop) or (C, H, W), ``needs_key``.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, datum_shape: Sequence[int],
                 phase: int = caffe_pb2.TRAIN, where: Any = "data layer", *,
                 encoded: bool | None = False):
        self.where = where
        self.phase = int(phase)
        self.scale = float(param.scale)
        self.mirror = bool(param.mirror)
        self.crop = int(param.crop_size)
        c, h, w = (int(d) for d in datum_shape)
        if min(c, h, w) <= 0:
            raise self._error(f"records have an empty shape {[c, h, w]}")
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise self._error("cannot set both force_color and force_gray")
        # Whether the host converts decoded images: force_color only for records known to be
        # encoded (a source that decodes with force_color itself already gives 3 channels);
        # force_gray unless the records are known to be raw (``encoded=None``: unknown).
        self.forced_channels: int | None = None
        if self.force_color or self.force_gray:
            if encoded is False:
                _log.warning("%s: force_color and force_gray only apply to encoded records; "
                             "ignored", self._name())
            elif self.force_gray or encoded:
                if c not in (1, 3):
                    raise self._error(f"force_color/force_gray need 1- or 3-channel images, "
                                      f"the records have {c}")
                self.forced_channels = 3 if self.force_color else 1
                c = self.forced_channels
        self.input_shape: Shape3 = (c, h, w)
        if self.crop and (self.crop > h or self.crop > w):
            raise self._error(f"crop_size {self.crop} is larger than the records ({h}x{w})")
        self.output_shape: Shape3 = (c, self.crop, self.crop) if self.crop else (c, h, w)

        self.mean: np.ndarray | None = None  # [C, H, W] float32 (mean_file) or [C, 1, 1]
        self.mean_file = param.mean_file if param.HasField("mean_file") else None
        if self.mean_file is not None and len(param.mean_value):
            raise self._error("cannot specify mean_file and mean_value at the same time")
        if self.mean_file is not None:
            try:
                m = read_binaryproto(self.mean_file)
            except ModelError as e:
                raise DataError(f"{self._name()}: mean_file: {e}") from None
            if m.ndim < 3 or m.shape[-3:] != (c, h, w) or int(np.prod(m.shape[:-3])) < 1:
                raise DataError(
                    f"{self._name()}: mean file '{self.mean_file}' has shape {list(m.shape)}, "
                    f"which does not match the records' shape {[1, c, h, w]}")
            self.mean = np.ascontiguousarray(m.reshape((-1, c, h, w))[0])
        elif len(param.mean_value):
            mv = [float(v) for v in param.mean_value]
            if len(mv) not in (1, c):
                raise self._error(f"give either 1 mean_value or as many as channels ({c}), "
                                  f"got {len(mv)}")
            if len(mv) == 1:
                mv = mv * c
            self.mean = np.asarray(mv, np.float32).reshape(c, 1, 1)
        self.needs_key = bool(self.mirror or self.crop)

    # -- errors -----------------------------------------------------------------------------
    def _name(self) -> str:
        w = self.where
        if isinstance(w, str):
            return w
        return f"layer '{getattr(w, 'name', '?')}' (type {getattr(w, 'type', '?')})"

    def _error(self, message: str) -> JcaffeError:
        if hasattr(self.where, "error"):
            return self.where.error(message)
        return DataError(f"{self._name()}: {message}")

    # -- host side --------------------------------------------------------------------------
    def host_convert(self, batch: np.ndarray) -> np.ndarray:
        """force_color / force_gray on a decoded uint8 batch ``[N, C, H, W]`` (identity if off)."""
        if self.forced_channels is None or batch.shape[1] == self.forced_channels:
            return batch
        if self.forced_channels == 3:
            return np.repeat(batch, 3, axis=1)
        return bgr_to_gray(batch)

    def crop_offsets(self, n: int, key: jax.Array | None, train: bool):
        """``(h_off, w_off)``: int32 ``[n]`` arrays (random at train) or Python ints (centre)."""
        _, h, w = self.input_shape
        if not self.crop:
            return 0, 0
        if not train:
            return (h - self.crop) // 2, (w - self.crop) // 2
        kh, kw = jax.random.split(jax.random.fold_in(key, 1))
        h_off = jax.random.randint(kh, (n,), 0, h - self.crop + 1, dtype=jnp.int32)
        w_off = jax.random.randint(kw, (n,), 0, w - self.crop + 1, dtype=jnp.int32)
        return h_off, w_off

    def mirror_flags(self, n: int, key: jax.Array | None):
        """bool ``[n]``: which images are flipped (None when ``mirror`` is off)."""
        if not self.mirror:
            return None
        return jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (n,))

    # -- device side ------------------------------------------------------------------------
    def apply(self, raw: jax.Array, key: jax.Array | None = None, train: bool = False) -> jax.Array:
        """The transformed float32 batch ``[N, C, crop, crop]`` (or ``[N, C, H, W]``).

        Pure and jittable; ``key`` is required when ``train`` and ``crop_size`` is set, or when
        ``mirror`` is set (any phase).
        """
        raw = jnp.asarray(raw)
        if raw.ndim != 4 or tuple(raw.shape[1:]) != self.input_shape:
            raise self._error(f"expects raw batches of shape [N, {', '.join(map(str, self.input_shape))}], "
                              f"got {list(raw.shape)}")
        if key is None and self.mirror:
            raise self._error("needs a PRNG key for random mirroring (mirror: true mirrors at "
                              "random in either phase, as Caffe)")
        if key is None and train and self.crop:
            raise self._error("needs a PRNG key for random crops in training mode (crop_size; "
                              "train=False takes the centre crop)")
        n = raw.shape[0]
        x = raw.astype(jnp.float32)
        if self.mean is not None:
            mean = jnp.asarray(self.mean)
            x = x - mean[None]  # the mean is indexed at the data's own pixel (before the crop)
        if self.crop:
            cs = self.crop
            h_off, w_off = self.crop_offsets(n, key, train)
            if isinstance(h_off, int):
                x = x[:, :, h_off:h_off + cs, w_off:w_off + cs]
            else:
                c = self.input_shape[0]

                def one(img, ho, wo):
                    zero = jnp.zeros((), jnp.int32)
                    return jax.lax.dynamic_slice(img, (zero, ho, wo), (c, cs, cs))

                x = jax.vmap(one)(x, h_off, w_off)
        if self.scale != 1.0:
            x = x * jnp.float32(self.scale)
        flips = self.mirror_flags(n, key)
        if flips is not None:
            x = jnp.where(flips[:, None, None, None], x[:, :, :, ::-1], x)
        return x


__all__ = ["Transformer", "bgr_to_gray"]
