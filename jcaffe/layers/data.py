"""Data layers: Data (LMDB / LevelDB), ImageData, HDF5Data, MemoryData, WindowData.

A data layer has two halves.

* Device side (the layer proper, ``is_data = True``): Caffe's parameters and shapes;
  ``input_specs()`` lists the *raw* arrays the host feeds for one batch (``data``
  ``[batch, C, H, W]`` uint8 or float32, ``label`` ``[batch]``); the Net hands them to ``apply``
  as ``bottoms``, and ``apply`` runs Caffe's DataTransformer on them inside the jitted step
  (random crops / mirrors from ``ctx.key``) and returns Caffe's tops: data float32 and labels
  float32 (Caffe stores labels as Dtype).
* Host side: ``make_reader(seed)`` returns a reader (``jcaffe.data.readers.Reader``) whose
  ``next_batch()`` gives the raw arrays of the next batch, read in Caffe's order. The record
  stream (wrap-around, ``rand_skip``, ``shuffle``, resume by ``seek``) is described in
  ``jcaffe.data.readers``; all file reading lives there (and in ``jcaffe.data.windows``).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.caffemodel import read_binaryproto
from jcaffe.data.readers import (ArrayStore, BatchReader, HDF5Files, HDF5Reader, ImageList,
                                 ImageReader, MemoryReader, Reader, SourceReader,
                                 open_layer_source, read_hdf5_list, read_image_list)
from jcaffe.data.transform import Transformer
from jcaffe.data.windows import CHANNELS, WindowFile, WindowReader
from jcaffe.errors import DataError, ModelError
from jcaffe.layers.base import Context, Layer, register
from jcaffe.proto import caffe_pb2

_log = log.get_logger("data")

_LEGACY_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


class DataLayerBase(Layer):
    """Shared parts of the data layers: raw input specs, the reader, ``load_all``."""

    is_data = True
    exact_bottoms = 0
    batch_size: int = 0
    rand_skip: int = 0
    prefetch: int = 4
    shuffle: bool = False

    def make_reader(self, seed: int | None = None) -> Reader:
        raise NotImplementedError

    def load_all(self) -> dict[str, np.ndarray]:
        """The whole dataset, raw, in the source's order (top name → array)."""
        with self.make_reader(seed=0) as r:
            return r.load_all()

    def input_specs(self):
        return list(self._specs)

    def _check_batch_size(self, value: int) -> int:
        if value <= 0:
            raise self.error("batch_size must be positive")
        return int(value)

    def _transform_param(self, legacy: Any | None) -> caffe_pb2.TransformationParameter:
        tp = self.param.transform_param
        if legacy is not None:
            given = [f for f in _LEGACY_TRANSFORM if legacy.HasField(f)]
            if given:
                # Caffe reads only transform_param for current-format layers; V1 nets are
                # upgraded (jcaffe.upgrade) before they get here.
                _log.warning("layer '%s': %s inside %s are ignored, as in Caffe: put them in "
                             "transform_param", self.name, "/".join(given),
                             legacy.DESCRIPTOR.name)
        return tp


def _label_top(label) -> Any:
    return jnp.asarray(label).astype(jnp.float32)


@register("Data")
class DataLayer(DataLayerBase):
    """Caffe's Data layer: Datum records from an LMDB / LevelDB, transformed on the device.

    ``data_param``: ``source``, ``batch_size``, ``rand_skip``, ``backend`` (a hint: the source's
    own format wins), ``prefetch`` (batches read ahead by ``PrefetchFeeder``). One top: data
    only; two tops: data and label. Top shapes come from the first record (Caffe's
    ``DataLayerSetUp``); all records must share it.
    """

    min_tops = 1
    max_tops = 2

    def setup(self, bottom_shapes):
        dp = self.param.data_param
        if not dp.source:
            raise self.error("data_param.source is not set")
        self.batch_size = self._check_batch_size(dp.batch_size)
        self.rand_skip = int(dp.rand_skip)
        self.prefetch = max(1, int(dp.prefetch))
        self.backend_hint = int(dp.backend) if dp.HasField("backend") else None
        self.source_path = dp.source
        # The source decodes encoded images in colour itself under force_color.
        self.force_color = bool(self.param.transform_param.force_color)
        src = self._open_source()
        try:
            self.datum_shape = tuple(int(d) for d in src.datum_shape)
            self.raw_dtype = np.dtype(src.dtype)
            self.count = int(src.count)
            encoded = getattr(src, "encoded", None)
        finally:
            src.close()
        if self.count <= 0:
            raise DataError(f"layer '{self.name}' (type {self.type}): source '{dp.source}' "
                            f"holds no records")
        self.transformer = Transformer(self._transform_param(dp), self.datum_shape, self.phase,
                                       self, encoded=encoded)
        self.needs_key = self.transformer.needs_key
        b = self.batch_size
        self._specs = [(self.top_names[0], (b,) + self.transformer.input_shape, self.raw_dtype)]
        tops = [(b,) + self.transformer.output_shape]
        if len(self.top_names) > 1:
            self._specs.append((self.top_names[1], (b,), np.dtype(np.int32)))
            tops.append((b,))
        _log.info("output data size: %s", ",".join(str(d) for d in tops[0]))
        return tops

    def _open_source(self):
        return open_layer_source(self, self.source_path, self.backend_hint, self.force_color)

    def make_reader(self, seed: int | None = None) -> Reader:
        return SourceReader(self, seed, self.source_path, self.backend_hint,
                            force_color=self.force_color, convert=self.transformer.host_convert)

    def apply(self, blobs, bottoms, ctx: Context):
        key = _transform_key(self, ctx)
        tops = [self.transformer.apply(bottoms[0], key, ctx.train)]
        if len(bottoms) > 1:
            tops.append(_label_top(bottoms[1]))
        return tops



def _transform_key(layer, ctx: Context):
    """The key a data layer's transform draws from: Caffe mirrors at random in either phase
    and crops at random in TRAIN (the centre in TEST)."""
    if layer.transformer.mirror:
        return ctx.require_key(layer, "for random mirroring (mirror: true mirrors at random in "
                                      "either phase, as Caffe)")
    if ctx.train and layer.transformer.crop:
        return ctx.require_key(layer, "for random crops in training mode (crop_size; "
                                      "train=False takes the centre crop)")
    return ctx.key

# -- ImageData --------------------------------------------------------------------------------

@register("ImageData")
class ImageDataLayer(DataLayerBase):
    """Caffe's ImageData layer: images named in a list file, with labels.

    ``image_data_param``: ``source`` (the list file), ``root_folder`` (prefixed to each path as
    a string, as Caffe does; a missing separator is added when the plain concatenation does
    not exist), ``batch_size``, ``rand_skip``, ``shuffle`` (reshuffled every pass, seeded by the
    reader's seed: see ``jcaffe.data.readers``), ``new_height`` / ``new_width`` (both or neither),
    ``is_color``. The host decodes images as Caffe's OpenCV does (``jcaffe.data.image``: BGR,
    uint8, INTER_LINEAR resize); the transform runs on the device.
    Without a resize, every image must have the first image's size.
    """

    exact_tops = 2

    def setup(self, bottom_shapes):
        ip = self.param.image_data_param
        if not ip.source:
            raise self.error("image_data_param.source is not set")
        self.batch_size = self._check_batch_size(ip.batch_size)
        self.rand_skip = int(ip.rand_skip)
        self.shuffle = bool(ip.shuffle)
        self.new_height, self.new_width = int(ip.new_height), int(ip.new_width)
        if (self.new_height > 0) != (self.new_width > 0):
            raise self.error("new_height and new_width must be set together")
        self.is_color = bool(ip.is_color)
        self.root_folder = ip.root_folder
        self.source_path = ip.source
        self.prefetch = 4
        self.images = ImageList(ip.source, self.root_folder, is_color=self.is_color,
                                new_height=self.new_height, new_width=self.new_width,
                                where=f"layer '{self.name}' (type {self.type}): ")
        _log.info("A total of %d images.", len(self.images))
        self.image_shape = self.images.image_shape
        self.transformer = Transformer(self._transform_param(ip), self.image_shape, self.phase,
                                       self)
        self.needs_key = self.transformer.needs_key
        b = self.batch_size
        self._specs = [(self.top_names[0], (b,) + self.image_shape, np.dtype(np.uint8)),
                       (self.top_names[1], (b,), np.dtype(np.int32))]
        return [(b,) + self.transformer.output_shape, (b,)]

    @property
    def lines(self) -> list[tuple[str, int]]:
        return self.images.lines

    def make_reader(self, seed: int | None = None) -> Reader:
        return ImageReader(self, seed, self.images, self.shuffle)

    def apply(self, blobs, bottoms, ctx: Context):
        key = _transform_key(self, ctx)
        return [self.transformer.apply(bottoms[0], key, ctx.train), _label_top(bottoms[1])]


# -- HDF5Data ---------------------------------------------------------------------------------

@register("HDF5Data")
class HDF5DataLayer(DataLayerBase):
    """Caffe's HDF5Data layer: each top reads the dataset of its own name from the listed files.

    ``hdf5_data_param``: ``source`` (list file), ``batch_size``, ``shuffle``. Datasets may have
    any number of axes (axis 0 counts rows, equal for all tops of a file) and any float or
    integer type; values are converted to float32 (Caffe's Dtype). No transformation: a
    ``transform_param`` is an error, as in Caffe.
    """

    min_tops = 1

    def setup(self, bottom_shapes):
        hp = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data: remove transform_param")
        if not hp.source:
            raise self.error("hdf5_data_param.source is not set")
        self.batch_size = self._check_batch_size(hp.batch_size)
        self.shuffle = bool(hp.shuffle)
        self.source_path = hp.source
        self.h5 = HDF5Files(hp.source, self.top_names, f"layer '{self.name}' (type {self.type}): ")
        self.files = self.h5.files
        self.row_shapes = self.h5.row_shapes
        b = self.batch_size
        self._specs = [(t, (b,) + self.row_shapes[t], np.dtype(np.float32)) for t in self.top_names]
        return [(b,) + self.row_shapes[t] for t in self.top_names]

    def make_reader(self, seed: int | None = None) -> Reader:
        return HDF5Reader(self, seed, self.h5, self.shuffle)

    def apply(self, blobs, bottoms, ctx: Context):
        return [jnp.asarray(b).astype(jnp.float32) for b in bottoms]


# -- MemoryData -------------------------------------------------------------------------------

@register("MemoryData")
class MemoryDataLayer(DataLayerBase):
    """Caffe's MemoryData layer: batches of arrays handed in from Python.

    ``memory_data_param``: ``batch_size``, ``channels``, ``height``, ``width``. Call
    ``set_input_arrays(data, labels)`` (on the layer or its reader; Caffe's ``Reset``): data
    ``[n, C, H, W]``, labels ``[n]`` (or ``[n, 1, 1, 1]``), ``n`` a positive multiple of
    ``batch_size``; both are copied as float32. Batches are taken in order and wrap to the
    start. Like Caffe's Reset, the arrays are not transformed (a ``transform_param`` only
    draws a warning).
    """

    exact_tops = 2

    def setup(self, bottom_shapes):
        mp = self.param.memory_data_param
        self.batch_size = int(mp.batch_size)
        self.chw = (int(mp.channels), int(mp.height), int(mp.width))
        if self.batch_size <= 0 or min(self.chw) <= 0:
            raise self.error("batch_size, channels, height, and width must be specified and "
                             "positive in memory_data_param")
        if self.param.HasField("transform_param"):
            _log.warning("layer '%s': MemoryData does not transform array data", self.name)
        self.store = ArrayStore(self, self.chw)
        b = self.batch_size
        self._specs = [(self.top_names[0], (b,) + self.chw, np.dtype(np.float32)),
                       (self.top_names[1], (b,), np.dtype(np.float32))]
        return [(b,) + self.chw, (b,)]

    def set_input_arrays(self, data, labels) -> None:
        """Caffe's ``MemoryDataLayer::Reset`` (see ``jcaffe.data.readers.ArrayStore``)."""
        self.store.set_input_arrays(data, labels)

    def make_reader(self, seed: int | None = None) -> Reader:
        return MemoryReader(self, seed, self.store)

    def apply(self, blobs, bottoms, ctx: Context):
        return [jnp.asarray(b).astype(jnp.float32) for b in bottoms]


@register("WindowData")
class WindowDataLayer(DataLayerBase):
    """Caffe's WindowData layer (R-CNN): windows of images sampled as foreground / background.

    ``window_data_param``: ``source`` (the window file, format in ``jcaffe.data.windows``),
    ``batch_size``, ``fg_threshold`` / ``bg_threshold`` (a window is foreground, labelled with
    its class, when ``overlap >= fg_threshold``; background, labelled 0, when ``overlap <
    bg_threshold``), ``fg_fraction`` (``int(float(batch) * fg_fraction)`` foreground items per
    batch, after the background ones), ``context_pad``, ``crop_mode`` ("warp" or "square"),
    ``scale``, ``cache_images``, ``root_folder``. From ``transform_param`` (as Caffe reads
    them): ``crop_size`` (required), ``mirror``, ``mean_file`` or ``mean_value``; Caffe's
    WindowData reads ``scale`` from ``window_data_param`` only. ``data_param.prefetch`` sets the
    read-ahead, as for every Caffe prefetching layer.

    Tops: data ``[batch, 3, crop, crop]`` and label ``[batch]``. Caffe warps each window on the
    host (``WindowDataLayer::load_batch``), so the host reader does all of it, mean and scale
    included (``jcaffe.data.windows``: each output pixel is ``(pixel - mean) * scale`` inside
    the warped window, 0 in the padding); ``apply`` only casts. Sampling is random with
    replacement in both phases, seeded by the reader's seed.
    """

    exact_tops = 2

    def setup(self, bottom_shapes):
        wp = self.param.window_data_param
        tp = self.param.transform_param
        if not wp.source:
            raise self.error("window_data_param.source is not set")
        self.batch_size = self._check_batch_size(wp.batch_size)
        self.prefetch = max(1, int(self.param.data_param.prefetch))
        legacy = [f for f in ("mean_file", "crop_size", "mirror") if wp.HasField(f)]
        if legacy:
            _log.warning("layer '%s': %s inside window_data_param are ignored, as in Caffe: put "
                         "them in transform_param", self.name, "/".join(legacy))
        if tp.HasField("scale") and tp.scale != 1:
            _log.warning("layer '%s': WindowData ignores transform_param.scale, as Caffe does; "
                         "it uses window_data_param.scale (%g)", self.name, wp.scale)
        if tp.force_color or tp.force_gray:
            _log.warning("layer '%s': WindowData always reads images in colour; force_color / "
                         "force_gray are ignored, as in Caffe", self.name)
        self.crop_size = int(tp.crop_size)
        if self.crop_size <= 0:
            raise self.error("transform_param.crop_size must be set (positive) for WindowData")
        self.context_pad = int(wp.context_pad)
        if self.crop_size - 2 * self.context_pad <= 0:
            raise self.error(f"context_pad {self.context_pad} leaves no room in crop_size "
                             f"{self.crop_size} (need crop_size > 2 * context_pad)")
        if wp.crop_mode not in ("warp", "square"):
            raise self.error(f"crop_mode must be \"warp\" or \"square\", got {wp.crop_mode!r}")
        self.crop_mode = wp.crop_mode
        self.fg_fraction = float(wp.fg_fraction)
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise self.error(f"fg_fraction must be in [0, 1], got {self.fg_fraction:g}")
        self.fg_threshold, self.bg_threshold = float(wp.fg_threshold), float(wp.bg_threshold)
        self.scale = float(wp.scale)
        self.mirror = bool(tp.mirror)
        self.cache_images = bool(wp.cache_images)
        self.root_folder = wp.root_folder
        self.source_path = wp.source
        where = f"layer '{self.name}' (type {self.type}): "
        _log.info("Window data layer: foreground (object) overlap threshold: %g, background "
                  "(non-object) overlap threshold: %g, foreground sampling fraction: %g, "
                  "cache_images: %s, root_folder: %s", self.fg_threshold, self.bg_threshold,
                  self.fg_fraction, self.cache_images, self.root_folder)
        self.windows = WindowFile(wp.source, fg_threshold=wp.fg_threshold,
                                  bg_threshold=wp.bg_threshold, root_folder=wp.root_folder,
                                  where=where)
        c, crop = CHANNELS, self.crop_size
        self.mean: np.ndarray | None = None
        if tp.HasField("mean_file") and len(tp.mean_value):
            raise self.error("cannot specify mean_file and mean_value at the same time")
        if tp.HasField("mean_file"):
            try:
                m = read_binaryproto(tp.mean_file)
            except ModelError as e:
                raise DataError(f"{where}mean_file: {e}") from None
            off = (m.shape[-1] - crop) // 2 if m.ndim >= 3 else 0
            if (m.ndim < 3 or m.shape[-3] != c or m.shape[-1] < crop
                    or m.shape[-2] < off + crop or int(np.prod(m.shape[:-3])) < 1):
                raise DataError(f"{where}mean file '{tp.mean_file}' has shape {list(m.shape)}; "
                                f"WindowData needs [1, {c}, H, W] with W >= crop_size {crop} "
                                f"and H >= (W - crop_size) / 2 + crop_size")
            self.mean = np.ascontiguousarray(m.reshape((-1,) + m.shape[-3:])[0])
        elif len(tp.mean_value):
            mv = [float(v) for v in tp.mean_value]
            if len(mv) not in (1, c):
                raise self.error(f"give either 1 mean_value or as many as channels ({c}), "
                                 f"got {len(mv)}")
            self.mean = np.asarray(mv * c if len(mv) == 1 else mv, np.float32)
        b = self.batch_size
        self._specs = [(self.top_names[0], (b, c, crop, crop), np.dtype(np.float32)),
                       (self.top_names[1], (b,), np.dtype(np.int32))]
        _log.info("output data size: %d,%d,%d,%d", b, c, crop, crop)
        return [(b, c, crop, crop), (b,)]

    def make_reader(self, seed: int | None = None) -> Reader:
        return WindowReader(self, seed, self.windows, crop_size=self.crop_size,
                            context_pad=self.context_pad, square=self.crop_mode == "square",
                            mirror=self.mirror, fg_fraction=self.fg_fraction, scale=self.scale,
                            mean=self.mean, cache_images=self.cache_images,
                            where=f"layer '{self.name}' (type {self.type}): ")

    def apply(self, blobs, bottoms, ctx: Context):
        return [jnp.asarray(bottoms[0]).astype(jnp.float32), _label_top(bottoms[1])]


# The readers' names stay importable from here (they lived in this module before).
__all__ = ["Reader", "BatchReader", "DataLayerBase", "DataLayer", "ImageDataLayer",
           "HDF5DataLayer", "MemoryDataLayer", "WindowDataLayer", "read_image_list",
           "read_hdf5_list"]


# ---------------------------------------------------------------------------------------------
# HDF5Output
# ---------------------------------------------------------------------------------------------

@register("HDF5Output")
class HDF5OutputLayer(Layer):
    """Caffe's HDF5OutputLayer: each forward pass writes its two bottoms to the HDF5 file
    ``hdf5_output_param.file_name`` (relative to the working directory, as in Caffe) as
    float32 datasets ``data`` and ``label``, in Caffe's legacy 4-axis shape
    ``(num, channels, height, width)`` (missing trailing axes are 1; more than 4 axes is an
    error, as Caffe's ``LegacyShape``). No tops; no gradient flows back.

    The write is a host callback inside the compiled step (``jax.experimental.io_callback``,
    ordered, so writes happen in forward-pass order); the file is replaced atomically, so a
    reader never sees a half-written file. Differences from Caffe: the file is created at the
    first forward pass rather than when the net is built, and every pass rewrites it with
    the latest batch (Caffe creates the datasets once and fails on a second pass). Not usable
    under ``jax.vmap`` (ordered callbacks cannot be batched).
    """

    exact_bottoms = 2
    exact_tops = 0

    def setup(self, bottom_shapes):
        p = self.param.hdf5_output_param
        if not p.file_name:
            raise self.error("hdf5_output_param.file_name is required")
        self.file_name = p.file_name
        folder = os.path.dirname(os.path.abspath(self.file_name))
        if os.path.isdir(self.file_name):
            raise self.error(f"hdf5_output_param.file_name '{self.file_name}' is a directory")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise self.error(f"cannot write hdf5_output_param.file_name '{self.file_name}': "
                             f"folder '{folder}' does not exist or is not writable")
        data, label = bottom_shapes
        if not data or not label or data[0] != label[0]:
            raise self.shape_error("data and label must have the same batch size (first axis)")
        self.legacy_shapes = []
        for which, shape in (("data", data), ("label", label)):
            if len(shape) > 4:
                raise self.shape_error(f"the {which} bottom has {len(shape)} axes; Caffe's "
                                       f"HDF5Output stores (num, channels, height, width)")
            self.legacy_shapes.append(tuple(shape) + (1,) * (4 - len(shape)))
        return []

    def _write(self, data, label) -> None:
        from jcaffe._atomic import atomic_file
        from jcaffe.caffemodel import _h5py

        h5py = _h5py()
        with atomic_file(self.file_name, error=ModelError) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("data", data=np.asarray(data, np.float32))
                f.create_dataset("label", data=np.asarray(label, np.float32))
        _log.info("Successfully saved %d rows", int(np.shape(data)[0]))

    def apply(self, blobs, bottoms, ctx):
        from jax import lax
        from jax.experimental import io_callback

        data, label = (lax.stop_gradient(b).reshape(s)
                       for b, s in zip(bottoms, self.legacy_shapes))
        io_callback(self._write, None, data, label, ordered=True)
        return []
