"""Data layers: Data (LMDB / LevelDB), ImageData, HDF5Data, MemoryData.

A data layer has two halves.

* Device side (the layer proper, ``is_data = True``): ``input_specs()`` lists the *raw* arrays
  the host feeds for one batch (``data`` ``[batch, C, H, W]`` uint8 or float32, ``label``
  ``[batch]``); the Net hands them to ``apply`` as ``bottoms``, and ``apply`` runs Caffe's
  DataTransformer on them inside the jitted step (random crops / mirrors from ``ctx.key``) and
  returns Caffe's tops: data float32 and labels float32 (Caffe stores labels as Dtype).
* Host side: ``make_reader(seed)`` returns a ``BatchReader`` whose ``next_batch()`` gives the
  raw arrays of the next batch, read in Caffe's order.

The record stream. Records are numbered ``0 .. count-1`` in the source's order. A reader walks
an endless stream: stream position ``p`` is record ``p % count`` of pass ``p // count``, so a
batch that crosses the end continues from record 0 (Caffe's cursor wrap) and a batch may wrap
more than once if it is larger than the dataset. ``reader.position`` is the stream position of
the next batch's first record; ``seek(position)`` restores it (resume). Unshuffled sources map
``p`` to record ``p % count``: the device-resident path keeps ``cursor = p % count`` on the
device and advances it by ``cursor = (cursor + batch) % count`` (``jcaffe.data.feed``).

Randomness on the host (``rand_skip``, ``shuffle``) comes from numpy generators seeded from the
``seed`` given to ``make_reader`` (the trainer passes the solver's ``random_seed``); with
``seed=None`` a fresh seed is drawn from the OS, like Caffe without ``random_seed``, and kept in
``reader.seed``. ``rand_skip``: the stream starts at a position drawn uniformly from
``[0, rand_skip)`` (wrapped modulo ``count``). ``shuffle`` (ImageData, HDF5Data): pass ``e`` uses
its own permutation drawn from ``(seed, e)``, so any position can be sought without replaying.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.data.image import hwc_to_chw, read_image_file, resize_linear
from jcaffe.data.transform import Transformer
from jcaffe.errors import DataError
from jcaffe.layers.base import Context, Layer, register
from jcaffe.proto import caffe_pb2

_log = log.get_logger("data")

_LEGACY_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


# ---------------------------------------------------------------------------------------------
# Host side: readers
# ---------------------------------------------------------------------------------------------

def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])


class BatchReader:
    """Reads raw batches for one data layer in Caffe's order (see the module doc).

    Subclasses implement ``_read(start, n)`` (records ``[start, start + n)`` of the source's
    order, no wrap) and, when shuffling, ``_records(positions)``.
    """

    shuffled: bool = False

    def __init__(self, layer: "DataLayerBase", seed: int | None, count: int):
        self.layer = layer
        self.tops = [t for t, _, _ in layer.input_specs()]
        self.specs = {t: (tuple(s[1:]), np.dtype(d)) for t, s, d in layer.input_specs()}
        self.batch_size = layer.batch_size
        self.prefetch = layer.prefetch
        self.seed = _fresh_seed() if seed is None else int(seed)
        self.count = int(count)
        self._position = self.start_position()

    # -- the stream -------------------------------------------------------------------------
    def start_position(self) -> int:
        skip = int(self.layer.rand_skip)
        if skip <= 0 or self.count <= 0:
            return 0
        drawn = int(np.random.default_rng([self.seed, 0]).integers(0, skip))
        if drawn:
            _log.info("layer '%s': skipping first %d data points", self.layer.name, drawn)
        return drawn % self.count

    @property
    def position(self) -> int:
        """Stream position of the next batch's first record."""
        return self._position

    @property
    def cursor(self) -> int:
        """Record index of the next batch's first record (unshuffled order)."""
        return self._position % self.count if self.count else 0

    def seek(self, position: int) -> None:
        position = int(position)
        if position < 0:
            raise DataError(f"layer '{self.layer.name}': cannot seek to position {position}")
        self._position = position

    def next_batch(self) -> dict[str, np.ndarray]:
        self._check_nonempty()
        out = self.batch_at(self._position)
        self._position += self.batch_size
        return out

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """The raw batch whose first record is at stream ``position`` (does not move)."""
        self._check_nonempty()
        positions = np.arange(position, position + self.batch_size, dtype=np.int64)
        return self._gather(self._records(positions))

    def _check_nonempty(self) -> None:
        if self.count <= 0:
            raise DataError(f"layer '{self.layer.name}' (type {self.layer.type}): "
                            f"the data source holds no records")

    def _records(self, positions: np.ndarray) -> np.ndarray:
        """Record indices (source order) of stream positions."""
        return positions % self.count

    def _gather(self, records: np.ndarray) -> dict[str, np.ndarray]:
        # Runs of consecutive records are read with one call each.
        parts: list[dict[str, np.ndarray]] = []
        i = 0
        n = len(records)
        while i < n:
            j = i + 1
            while j < n and records[j] == records[j - 1] + 1:
                j += 1
            parts.append(self._read(int(records[i]), j - i))
            i = j
        return {t: self._cast(t, np.concatenate([p[t] for p in parts], axis=0)) for t in self.tops}

    def _cast(self, top: str, a: np.ndarray) -> np.ndarray:
        shape, dtype = self.specs[top]
        a = np.ascontiguousarray(a, dtype=dtype)
        if tuple(a.shape[1:]) != shape:
            raise DataError(f"layer '{self.layer.name}': top '{top}' records have shape "
                            f"{list(a.shape[1:])}, expected {list(shape)}")
        return a

    def _read(self, start: int, n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- whole dataset ------------------------------------------------------------------------
    def load_all(self) -> dict[str, np.ndarray]:
        """Every record, raw, in the source's order (record 0 first)."""
        self._check_nonempty()
        return {t: self._cast(t, a) for t, a in self._read(0, self.count).items() if t in self.specs}

    @property
    def nbytes(self) -> int:
        """Bytes of the whole raw dataset (what a device-resident copy takes)."""
        total = 0
        for shape, dtype in self.specs.values():
            total += self.count * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return total

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} layer={self.layer.name!r} count={self.count} "
                f"batch={self.batch_size} position={self._position}>")


class _PermutedReader(BatchReader):
    """A reader whose pass ``e`` visits records in a permutation drawn from ``(seed, e)``."""

    def __init__(self, layer, seed, count, shuffle: bool):
        self.shuffled = bool(shuffle)
        self._perms: dict[int, np.ndarray] = {}
        super().__init__(layer, seed, count)

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.count)
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = perm
        return perm

    def _records(self, positions):
        if not self.shuffled:
            return positions % self.count
        out = np.empty(len(positions), np.int64)
        for k, p in enumerate(positions):
            out[k] = self.permutation(int(p // self.count))[int(p % self.count)]
        return out


class SourceReader(BatchReader):
    """Data layer: records of an LMDB / LevelDB (``jcaffe.data.sources``)."""

    def __init__(self, layer: "DataLayer", seed: int | None):
        self.source = layer._open_source()
        try:
            super().__init__(layer, seed, self.source.count)
        except BaseException:
            self.source.close()
            raise

    def _read(self, start, n):
        data, labels = self.source.read(start, n)
        out = {self.tops[0]: self.layer.transformer.host_convert(np.asarray(data))}
        if len(self.tops) > 1:
            out[self.tops[1]] = np.asarray(labels)
        return out

    def close(self):
        if self.source is not None:
            self.source.close()
            self.source = None


class ImageReader(_PermutedReader):
    """ImageData: images listed in the source file, decoded with Pillow (BGR)."""

    def __init__(self, layer: "ImageDataLayer", seed):
        super().__init__(layer, seed, len(layer.lines), layer.shuffle)

    def _read(self, start, n):
        lay = self.layer
        data = np.stack([lay.load_image(i) for i in range(start, start + n)])
        labels = np.asarray([lay.lines[i][1] for i in range(start, start + n)], np.int32)
        return {self.tops[0]: data, self.tops[1]: labels}

    def _gather(self, records):
        # Images are decoded one by one anyway: no need to look for runs.
        lay = self.layer
        data = np.stack([lay.load_image(int(i)) for i in records])
        labels = np.asarray([lay.lines[int(i)][1] for i in records], np.int32)
        return {self.tops[0]: self._cast(self.tops[0], data),
                self.tops[1]: self._cast(self.tops[1], labels)}


class HDF5Reader(BatchReader):
    """HDF5Data: rows of the listed .h5 files, file after file (Caffe's order).

    Without shuffle record ``r`` is row ``r - offset[f]`` of the file ``f`` holding it (files
    in list order). With shuffle, pass ``e`` visits the files in a permutation drawn from
    ``(seed, e)`` and each file's rows in a permutation drawn from ``(seed, e, file)`` (Caffe
    reshuffles the files each pass and the rows each time a file is loaded).
    """

    def __init__(self, layer: "HDF5DataLayer", seed):
        self.shuffled = bool(layer.shuffle)
        self.files = layer.files  # [(path, rows)]
        self.offsets = np.cumsum([0] + [r for _, r in self.files])
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._orders: dict[tuple, Any] = {}
        super().__init__(layer, seed, int(self.offsets[-1]))

    def _file(self, f: int) -> dict[str, np.ndarray]:
        arrays = self._cache.get(f)
        if arrays is None:
            arrays = self.layer.load_file(self.files[f][0])
            if len(self._cache) >= 2:
                self._cache.clear()
            self._cache[f] = arrays
        return arrays

    def _records(self, positions):
        if not self.shuffled:
            return positions % self.count
        out = np.empty(len(positions), np.int64)
        for k, p in enumerate(positions):
            e, r = int(p // self.count), int(p % self.count)
            order, bounds = self._pass_order(e)
            slot = int(np.searchsorted(bounds, r, side="right"))
            f = int(order[slot])
            j = r - (int(bounds[slot - 1]) if slot else 0)
            out[k] = int(self.offsets[f]) + int(self._row_order(e, f)[j])
        return out

    def _pass_order(self, e: int):
        """Files of pass ``e`` in visiting order, and the cumulative row counts."""
        got = self._orders.get(("files", e))
        if got is None:
            order = np.random.default_rng([self.seed, 1, e]).permutation(len(self.files))
            got = (order, np.cumsum([self.files[f][1] for f in order]))
            self._remember(("files", e), got)
        return got

    def _row_order(self, e: int, f: int) -> np.ndarray:
        got = self._orders.get(("rows", e, f))
        if got is None:
            got = np.random.default_rng([self.seed, 2, e, f]).permutation(self.files[f][1])
            self._remember(("rows", e, f), got)
        return got

    def _remember(self, key, value) -> None:
        if len(self._orders) > 8:
            self._orders.clear()
        self._orders[key] = value

    def _gather(self, records):
        parts = {t: [] for t in self.tops}
        for rec in records:
            f = int(np.searchsorted(self.offsets, rec, side="right")) - 1
            arrays = self._file(f)
            row = int(rec - self.offsets[f])
            for t in self.tops:
                parts[t].append(arrays[t][row:row + 1])
        return {t: self._cast(t, np.concatenate(parts[t], axis=0)) for t in self.tops}

    def _read(self, start, n):
        return self._gather(np.arange(start, start + n, dtype=np.int64))

    def load_all(self):
        files = [self.layer.load_file(p) for p, _ in self.files]
        return {t: self._cast(t, np.concatenate([a[t] for a in files], axis=0)) for t in self.tops}


class MemoryReader(BatchReader):
    """MemoryData: the arrays last given to ``set_input_arrays`` (Caffe's Reset).

    A new ``set_input_arrays`` restarts the stream at 0, as Caffe's Reset sets ``pos_ = 0``.
    """

    def __init__(self, layer: "MemoryDataLayer", seed):
        self._generation = layer._generation
        super().__init__(layer, seed, layer._count())

    def set_input_arrays(self, data, labels) -> None:
        self.layer.set_input_arrays(data, labels)

    def _sync(self) -> None:
        if self._generation != self.layer._generation:
            self._generation = self.layer._generation
            self.count = self.layer._count()
            self._position = 0

    def _check_nonempty(self):
        self._sync()
        if self.count <= 0:
            raise self.layer.error("needs input arrays: call set_input_arrays(data, labels) first "
                                   "(Caffe's MemoryDataLayer::Reset)")

    @property
    def position(self):
        self._sync()
        return self._position

    def _read(self, start, n):
        data, labels = self.layer._arrays
        return {self.tops[0]: data[start:start + n], self.tops[1]: labels[start:start + n]}


# ---------------------------------------------------------------------------------------------
# Device side: the layers
# ---------------------------------------------------------------------------------------------

class DataLayerBase(Layer):
    """Shared parts of the data layers: raw input specs, the reader, ``load_all``."""

    is_data = True
    exact_bottoms = 0
    batch_size: int = 0
    rand_skip: int = 0
    prefetch: int = 4
    shuffle: bool = False

    def make_reader(self, seed: int | None = None) -> BatchReader:
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
        from jcaffe.data.sources import open_source

        try:
            return open_source(self.source_path, self.backend_hint, force_color=self.force_color)
        except DataError as e:
            raise DataError(f"layer '{self.name}' (type {self.type}): {e}") from e

    def make_reader(self, seed: int | None = None) -> BatchReader:
        return SourceReader(self, seed)

    def apply(self, blobs, bottoms, ctx: Context):
        key = ctx.key
        if self.transformer.mirror or (ctx.train and self.transformer.crop):
            key = ctx.require_key(self)
        tops = [self.transformer.apply(bottoms[0], key, ctx.train)]
        if len(bottoms) > 1:
            tops.append(_label_top(bottoms[1]))
        return tops


# -- ImageData --------------------------------------------------------------------------------

def read_image_list(path: str, where: str = "") -> list[tuple[str, int]]:
    """Caffe's ImageData source file: one ``<path> <label>`` per line, split at the last space
    (so paths may contain spaces). Blank lines are skipped."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{where}cannot open the image list '{path}': {e.strerror or e}") from None
    lines = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        pos = line.rfind(" ")
        if pos < 0:
            raise DataError(f"{where}{path}:{no}: expected '<image path> <label>', "
                            f"got {line!r}")
        try:
            label = int(line[pos + 1:])
        except ValueError:
            raise DataError(f"{where}{path}:{no}: label {line[pos + 1:]!r} is not an "
                            f"integer") from None
        lines.append((line[:pos], label))
    if not lines:
        raise DataError(f"{where}the image list '{path}' is empty")
    return lines


@register("ImageData")
class ImageDataLayer(DataLayerBase):
    """Caffe's ImageData layer: images named in a list file, with labels.

    ``image_data_param``: ``source`` (the list file), ``root_folder`` (prefixed to each path as
    a string, as Caffe does; a missing separator is added when the plain concatenation does
    not exist), ``batch_size``, ``rand_skip``, ``shuffle`` (reshuffled every pass, seeded by the
    reader's seed: see the module doc), ``new_height`` / ``new_width`` (both or neither),
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
        self._where = f"layer '{self.name}' (type {self.type}): "
        self.lines = read_image_list(ip.source, self._where)
        _log.info("A total of %d images.", len(self.lines))
        first = self.load_image(0, check=False)
        self.image_shape = tuple(first.shape)
        self.transformer = Transformer(self._transform_param(ip), self.image_shape, self.phase,
                                       self)
        self.needs_key = self.transformer.needs_key
        b = self.batch_size
        self._specs = [(self.top_names[0], (b,) + self.image_shape, np.dtype(np.uint8)),
                       (self.top_names[1], (b,), np.dtype(np.int32))]
        return [(b,) + self.transformer.output_shape, (b,)]

    def image_path(self, i: int) -> str:
        rel = self.lines[i][0]
        path = self.root_folder + rel
        if self.root_folder and not os.path.exists(path):
            joined = os.path.join(self.root_folder, rel)
            if os.path.exists(joined):
                return joined
        return path

    def load_image(self, i: int, check: bool = True) -> np.ndarray:
        path = self.image_path(i)
        img = read_image_file(path, self.is_color, where=f"{self._where}image '{path}'")
        if self.new_height > 0:
            img = resize_linear(img, self.new_height, self.new_width)
        img = hwc_to_chw(img)
        if check and tuple(img.shape) != self.image_shape:
            raise DataError(f"{self._where}image '{path}' ({self.source_path} entry {i + 1}) "
                            f"has shape {list(img.shape)} but the first image has "
                            f"{list(self.image_shape)}: set new_height/new_width to resize")
        return img

    def make_reader(self, seed: int | None = None) -> BatchReader:
        return ImageReader(self, seed)

    def apply(self, blobs, bottoms, ctx: Context):
        key = ctx.key
        if self.transformer.mirror or (ctx.train and self.transformer.crop):
            key = ctx.require_key(self)
        return [self.transformer.apply(bottoms[0], key, ctx.train), _label_top(bottoms[1])]


# -- HDF5Data ---------------------------------------------------------------------------------

def read_hdf5_list(path: str, where: str = "") -> list[str]:
    """Caffe's HDF5Data source: whitespace-separated .h5 file names. A relative name is taken
    relative to the working directory (Caffe) or, when not found there, to the list's folder."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            names = f.read().split()
    except OSError as e:
        raise DataError(f"{where}failed to open source file '{path}': {e.strerror or e}") from None
    if not names:
        raise DataError(f"{where}must have at least 1 HDF5 filename listed in '{path}'")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n in names:
        if not os.path.isabs(n) and not os.path.exists(n) and os.path.exists(os.path.join(base, n)):
            n = os.path.join(base, n)
        out.append(n)
    return out


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
        self._where = f"layer '{self.name}' (type {self.type}): "
        names = read_hdf5_list(hp.source, self._where)
        _log.info("Number of HDF5 files: %d", len(names))
        self.files: list[tuple[str, int]] = []
        self.row_shapes: dict[str, tuple[int, ...]] | None = None
        for fname in names:
            rows, shapes = self._inspect(fname)
            if self.row_shapes is None:
                self.row_shapes = shapes
            elif shapes != self.row_shapes:
                t = next(t for t in self.top_names if shapes[t] != self.row_shapes[t])
                raise DataError(f"{self._where}dataset '{t}' in '{fname}' has rows of shape "
                                f"{list(shapes[t])} but '{self.files[0][0]}' has "
                                f"{list(self.row_shapes[t])}")
            self.files.append((fname, rows))
        b = self.batch_size
        self._specs = [(t, (b,) + self.row_shapes[t], np.dtype(np.float32)) for t in self.top_names]
        return [(b,) + self.row_shapes[t] for t in self.top_names]

    def _open(self, fname: str):
        import h5py

        try:
            return h5py.File(fname, "r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self._where}failed opening HDF5 file '{fname}': {e}") from None

    def _dataset(self, f, fname: str, top: str):
        ds = f.get(top)
        if ds is None or not hasattr(ds, "shape"):
            raise DataError(f"{self._where}failed to find HDF5 dataset '{top}' in '{fname}'")
        if ds.ndim < 1:
            raise DataError(f"{self._where}dataset '{top}' in '{fname}' must have at least 1 axis")
        if ds.dtype.kind not in "fiub":
            raise DataError(f"{self._where}dataset '{top}' in '{fname}' has unsupported type "
                            f"{ds.dtype} (float or integer expected)")
        return ds

    def _inspect(self, fname: str):
        with self._open(fname) as f:
            shapes, rows = {}, None
            for t in self.top_names:
                ds = self._dataset(f, fname, t)
                if rows is None:
                    rows = int(ds.shape[0])
                elif int(ds.shape[0]) != rows:
                    raise DataError(f"{self._where}'{fname}': dataset '{t}' has {ds.shape[0]} "
                                    f"rows but '{self.top_names[0]}' has {rows}")
                shapes[t] = tuple(int(d) for d in ds.shape[1:])
        if rows == 0:
            raise DataError(f"{self._where}'{fname}' holds no rows")
        return rows, shapes

    def load_file(self, fname: str) -> dict[str, np.ndarray]:
        with self._open(fname) as f:
            return {t: np.asarray(self._dataset(f, fname, t)[...], dtype=np.float32)
                    for t in self.top_names}

    def make_reader(self, seed: int | None = None) -> BatchReader:
        return HDF5Reader(self, seed)

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
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._generation = 0
        b = self.batch_size
        self._specs = [(self.top_names[0], (b,) + self.chw, np.dtype(np.float32)),
                       (self.top_names[1], (b,), np.dtype(np.float32))]
        return [(b,) + self.chw, (b,)]

    def set_input_arrays(self, data, labels) -> None:
        data = np.asarray(data)
        labels = np.asarray(labels)
        if data.ndim != 4 or tuple(data.shape[1:]) != self.chw:
            raise self.error(f"data must have shape [n, {', '.join(map(str, self.chw))}], "
                             f"got {list(data.shape)}")
        n = data.shape[0]
        if labels.ndim == 4 and labels.shape[1:] == (1, 1, 1):
            labels = labels.reshape(-1)
        if labels.shape != (n,):
            raise self.error(f"labels must have shape [{n}] (one per image), "
                             f"got {list(labels.shape)}")
        if n == 0 or n % self.batch_size:
            raise self.error(f"the number of images ({n}) must be a positive multiple of "
                             f"batch_size {self.batch_size}")
        self._arrays = (np.array(data, np.float32, order="C"), np.array(labels, np.float32))
        self._generation += 1

    def _count(self) -> int:
        return 0 if self._arrays is None else int(self._arrays[0].shape[0])

    def make_reader(self, seed: int | None = None) -> BatchReader:
        return MemoryReader(self, seed)

    def apply(self, blobs, bottoms, ctx: Context):
        return [jnp.asarray(b).astype(jnp.float32) for b in bottoms]


@register("WindowData")
class WindowDataLayer(Layer):
    """Caffe's WindowData layer (R-CNN style windows): not supported yet."""

    exact_bottoms = 0
    is_data = True

    def setup(self, bottom_shapes):
        raise self.error("WindowData is not supported yet: convert the windows to an LMDB "
                         "(Data layer) or an ImageData list")


__all__ = ["BatchReader", "DataLayerBase", "DataLayer", "ImageDataLayer", "HDF5DataLayer",
           "MemoryDataLayer", "WindowDataLayer", "read_image_list", "read_hdf5_list"]


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
        from jcaffe.caffemodel import _atomic_target, _h5py

        h5py = _h5py()
        with _atomic_target(self.file_name) as tmp:
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
