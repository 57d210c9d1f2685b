"""Host readers for the data layers: raw batches in Caffe's order, behind one protocol.

A data layer (``jcaffe.layers.data``) keeps Caffe's parameters, its shapes, ``input_specs()`` and
the on-device transform; ``layer.make_reader(seed)`` returns one of the readers here, which does
all the reading on the host. Every reader satisfies :class:`Reader`, the one surface the feeders
(``jcaffe.data.feed``) and the solver (``jcaffe.solver``) use.

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

Readers and what they read:

* :class:`SourceReader` (Data): a ``jcaffe.data.sources.Source`` (LMDB / LevelDB / jcaffe dataset).
* :class:`ImageReader` (ImageData): an :class:`ImageList` (Caffe's ``<path> <label>`` list).
* :class:`HDF5Reader` (HDF5Data): :class:`HDF5Files` (Caffe's list of ``.h5`` files).
* :class:`MemoryReader` (MemoryData): an :class:`ArrayStore` filled by ``set_input_arrays``.
* ``jcaffe.data.windows.WindowReader`` (WindowData): R-CNN windows cropped on the host.

Decoding runs on worker threads (``jcaffe.data.workers``): ``workers`` (default: the layer's
``config.decode_workers``, else one per core) threads decode the records of a batch, each into
its own slot, so a batch is the same records, bit for bit, whatever the worker count. Readers
count the records they read (``records_read``).

One process's share (:class:`ShardReader`): in a run over N devices, the global batch at
stream position ``q`` is the N·B records ``q .. q + N·B - 1`` and device ``r`` takes those at
offsets ``r, r + N, r + 2N, ...`` (Caffe's rule). A process owning devices ``L`` reads only
those devices' records, ``len(L)·B`` of every N·B.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from jcaffe import log
from jcaffe.data.image import copy_chw, read_image_file, resize_linear
from jcaffe.data.workers import DecodePool, ReadAhead
from jcaffe.errors import DataError, LayerError

_log = log.get_logger("data")

Spec = tuple[str, tuple[int, ...], Any]  # (top name, batch shape, dtype)


class ReaderOwner(Protocol):
    """What a reader takes from its data layer: names for messages and Caffe's parameters."""

    name: str
    type: str
    batch_size: int
    prefetch: int
    rand_skip: int

    def input_specs(self) -> Sequence[Spec]: ...


@runtime_checkable
class Reader(Protocol):
    """The host side of a data layer, as ``jcaffe.data.feed`` and ``jcaffe.solver`` use it.

    Attributes: ``layer`` (the owning data layer: ``name``, ``type``, ``param`` for messages),
    ``tops`` (top names in ``input_specs`` order), ``batch_size``, ``prefetch`` (batches a
    feeder may read ahead: ``data_param.prefetch``), ``seed`` (the host seed in use), ``count``
    (records in one pass), ``shuffled`` (whether a pass is a permutation drawn on the host:
    such a source cannot be cut on the device), ``position`` (stream position of the next
    batch), ``cursor`` (``position % count``), ``nbytes`` (the whole raw dataset's size),
    ``workers`` (decode threads), ``records_read`` (records read so far, read-ahead included).
    """

    layer: Any
    tops: list[str]
    batch_size: int
    prefetch: int
    seed: int
    count: int
    shuffled: bool

    @property
    def position(self) -> int: ...

    @property
    def cursor(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def next_batch(self) -> dict[str, np.ndarray]:
        """The raw arrays (top -> ``[batch, ...]``) of the next batch; advances ``position``."""

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """The raw batch whose first record is at stream ``position`` (does not move)."""

    def seek(self, position: int) -> None:
        """Makes ``position`` the next batch's first stream position (resume)."""

    def load_all(self) -> dict[str, np.ndarray]:
        """Every record, raw, in the source's order (what a device-resident copy holds)."""

    def close(self) -> None:
        """Releases files and databases; the reader is not used afterwards."""

    def __enter__(self) -> "Reader": ...

    def __exit__(self, *exc) -> bool: ...


def fresh_seed() -> int:
    """A seed drawn from the OS (Caffe without ``random_seed``)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])


def layer_where(layer: ReaderOwner) -> str:
    return f"layer '{layer.name}' (type {layer.type})"


class BatchReader:
    """The record stream of :class:`Reader` over a source of ``count`` records.

    Subclasses implement ``_read(start, n)`` (records ``[start, start + n)`` of the source's
    order, no wrap) and, when shuffling, ``_records(positions)``.
    """

    shuffled: bool = False
    # Whether next_batch decodes the following batch ahead (with more than one worker).
    read_ahead: bool = True

    def __init__(self, layer: ReaderOwner, seed: int | None, count: int,
                 workers: int | None = None):
        self.layer = layer
        if workers is None:
            workers = getattr(getattr(layer, "config", None), "decode_workers", None)
        self.pool = DecodePool(workers)
        self.workers = self.pool.workers
        self.records_read = 0  # records read (and decoded) so far, load_all included
        self._read_lock = threading.Lock()
        self.tops = [t for t, _, _ in layer.input_specs()]
        self.specs = {t: (tuple(s[1:]), np.dtype(d)) for t, s, d in layer.input_specs()}
        self.batch_size = int(layer.batch_size)
        self.prefetch = int(layer.prefetch)
        self.seed = fresh_seed() if seed is None else int(seed)
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
        self._ahead.cancel()
        self._position = position

    def next_batch(self) -> dict[str, np.ndarray]:
        self._check_nonempty()
        here = self._position
        out = self._ahead.next(here, self.batch_size, self.batch_at,
                               self.read_ahead and self.workers > 1)
        self._position = here + self.batch_size
        return out

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """The raw batch whose first record is at stream ``position`` (does not move)."""
        return self.read_positions(np.arange(position, position + self.batch_size,
                                             dtype=np.int64))

    def read_positions(self, positions) -> dict[str, np.ndarray]:
        """The raw records at stream ``positions`` (any, in the order given): one batch, one
        process's share of a global batch (``ShardReader``)."""
        self._check_nonempty()
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = self._gather(self._records(positions))
        self.count_read(len(positions))
        return out

    def count_read(self, n: int) -> None:
        """Adds ``n`` to ``records_read`` (batches read ahead run on several threads)."""
        with self._read_lock:
            self.records_read += int(n)

    def _check_nonempty(self) -> None:
        if self.count <= 0:
            raise DataError(f"{layer_where(self.layer)}: the data source holds no records")

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
        out = {t: self._cast(t, a) for t, a in self._read(0, self.count).items()
               if t in self.specs}
        self.count_read(self.count)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the whole raw dataset (what a device-resident copy takes)."""
        total = 0
        for shape, dtype in self.specs.values():
            total += self.count * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return total

    @property
    def _ahead(self) -> ReadAhead:
        # Made on first use: readers that keep their own stream (and skip this __init__,
        # like Python data layers') have one too.
        ahead = self.__dict__.get("_read_ahead_state")
        if ahead is None:
            ahead = self.__dict__["_read_ahead_state"] = ReadAhead()
        return ahead

    def close(self) -> None:
        self._ahead.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} layer={self.layer.name!r} count={self.count} "
                f"batch={self.batch_size} position={self._position}>")


class PermutedReader(BatchReader):
    """A reader whose pass ``e`` visits records in a permutation drawn from ``(seed, e)``."""

    def __init__(self, layer, seed, count, shuffle: bool, workers: int | None = None):
        self.shuffled = bool(shuffle)
        self._perms: dict[int, np.ndarray] = {}
        super().__init__(layer, seed, count, workers)

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


class ShardReader:
    """One process's share of a data layer's global batches over ``ranks`` devices.

    Wraps ``reader`` (batch B). Global batch ``k`` starts at stream position ``q = start +
    k·N·B`` (N = ``ranks``) and holds positions ``q .. q + N·B - 1``; device ``r`` takes those
    at offsets ``r, r + N, ..., r + (B-1)·N`` (Caffe's rule: record ``j`` of the global batch
    goes to device ``j mod N``). ``next_batch`` reads only the devices in ``local`` (mesh
    ranks, in the order given) and returns their blocks one after the other, ``len(local)·B``
    records, device ``local[i]``'s in block ``i``. ``position`` / ``seek`` / ``batch_size``
    are in the global stream (``batch_size`` = N·B), so a resumed run finds its place as an
    unsharded one does. Shuffled readers and WindowData work the same way: positions are
    mapped to records by the wrapped reader.
    """

    def __init__(self, reader, ranks: int, local):
        self.reader = reader
        self.ranks = int(ranks)
        self.local = [int(r) for r in local]
        if not self.local or any(not 0 <= r < self.ranks for r in self.local) \
                or len(set(self.local)) != len(self.local):
            raise ValueError(f"local ranks {self.local} must be distinct ranks of "
                             f"0..{self.ranks - 1}")
        self.layer = reader.layer
        self.tops = reader.tops
        self.prefetch = reader.prefetch
        self.seed = reader.seed
        self.shuffled = reader.shuffled
        self.device_batch = int(reader.batch_size)
        self.batch_size = self.ranks * self.device_batch
        self._position = reader.position
        self._ahead = ReadAhead()
        self._read_ahead = getattr(reader, "read_ahead", False) and reader.workers > 1

    @property
    def count(self) -> int:
        return self.reader.count

    @property
    def records_read(self) -> int:
        return self.reader.records_read

    @property
    def position(self) -> int:
        return self._position

    @property
    def cursor(self) -> int:
        return self._position % self.count if self.count else 0

    @property
    def nbytes(self) -> int:
        return self.reader.nbytes

    def positions(self, first: int) -> np.ndarray:
        """The stream positions this process reads of the global batch at ``first``, in
        block order: ``first + r + N·i`` for ``r`` in ``local``, ``i < B``."""
        steps = np.arange(self.device_batch, dtype=np.int64) * self.ranks
        return np.concatenate([int(first) + r + steps for r in self.local])

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        return self.reader.read_positions(self.positions(position))

    def next_batch(self) -> dict[str, np.ndarray]:
        here = self._position
        out = self._ahead.next(here, self.batch_size, self.batch_at, self._read_ahead)
        self._position = here + self.batch_size
        return out

    def seek(self, position: int) -> None:
        self._ahead.cancel()
        self.reader.seek(position)
        self._position = int(position)

    def load_all(self):
        return self.reader.load_all()

    def close(self) -> None:
        self._ahead.close()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------------------------
# Data: LMDB / LevelDB / jcaffe datasets
# ---------------------------------------------------------------------------------------------

def open_layer_source(layer: ReaderOwner, path: str, backend_hint: int | None,
                      force_color: bool):
    """``jcaffe.data.sources.open_source`` with errors naming the layer."""
    from jcaffe.data.sources import open_source

    try:
        return open_source(path, backend_hint, force_color=force_color)
    except DataError as e:
        raise DataError(f"{layer_where(layer)}: {e}") from e


class SourceReader(BatchReader):
    """Data: records of an LMDB / LevelDB / jcaffe dataset (``jcaffe.data.sources``).

    ``convert`` is applied to each decoded data batch (force_color / force_gray on the host).
    The stored values of a batch are fetched in one pass, then decoded on the workers.
    """

    def __init__(self, layer: ReaderOwner, seed: int | None, path: str,
                 backend_hint: int | None = None, *, force_color: bool = False,
                 convert: Callable[[np.ndarray], np.ndarray] | None = None,
                 workers: int | None = None):
        self.source = open_layer_source(layer, path, backend_hint, force_color)
        self._convert = convert
        try:
            super().__init__(layer, seed, self.source.count, workers)
        except BaseException:
            self.source.close()
            raise

    def _gather(self, records):
        return {t: self._cast(t, a) for t, a in self._decoded(records).items()}

    def _read(self, start, n):
        return self._decoded(np.arange(start, start + n, dtype=np.int64))

    def _decoded(self, records):
        data, labels = self.source.read_records(records, self.pool)
        data = np.asarray(data)
        out = {self.tops[0]: data if self._convert is None else self._convert(data)}
        if len(self.tops) > 1:
            out[self.tops[1]] = np.asarray(labels)
        return out

    def close(self):
        super().close()
        if self.source is not None:
            self.source.close()
            self.source = None


# ---------------------------------------------------------------------------------------------
# ImageData: a list of image files
# ---------------------------------------------------------------------------------------------

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


def root_path(root_folder: str, rel: str) -> str:
    """Caffe's ``root_folder + path`` (a plain string concatenation); a missing separator is
    added when the concatenation does not exist but the joined path does."""
    path = root_folder + rel
    if root_folder and not os.path.exists(path):
        joined = os.path.join(root_folder, rel)
        if os.path.exists(joined):
            return joined
    return path


class ImageList:
    """The images of an ImageData source: decoded as Caffe's OpenCV does (``jcaffe.data.image``:
    BGR, uint8, INTER_LINEAR resize to ``new_height`` x ``new_width`` when both are set), as
    ``[C, H, W]``. Without a resize, every image must have the first image's shape."""

    def __init__(self, source: str, root_folder: str = "", *, is_color: bool = True,
                 new_height: int = 0, new_width: int = 0, where: str = ""):
        self.source = source
        self.root_folder = root_folder
        self.is_color = bool(is_color)
        self.new_height, self.new_width = int(new_height), int(new_width)
        self.where = where
        self.lines = read_image_list(source, where)
        self.image_shape = tuple(self.load(0, check=False).shape)

    def __len__(self) -> int:
        return len(self.lines)

    def label(self, i: int) -> int:
        return self.lines[i][1]

    def path(self, i: int) -> str:
        return root_path(self.root_folder, self.lines[i][0])

    def load(self, i: int, check: bool = True) -> np.ndarray:
        """Image ``i`` as a ``[C, H, W]`` view of its decoded ``[H, W, C]`` array."""
        path = self.path(i)
        img = read_image_file(path, self.is_color, where=f"{self.where}image '{path}'")
        if self.new_height > 0:
            img = resize_linear(img, self.new_height, self.new_width)
        img = np.transpose(img, (2, 0, 1))  # a view: the caller copies it (copy_chw)
        if check and tuple(img.shape) != self.image_shape:
            raise DataError(f"{self.where}image '{path}' ({self.source} entry {i + 1}) "
                            f"has shape {list(img.shape)} but the first image has "
                            f"{list(self.image_shape)}: set new_height/new_width to resize")
        return img


class ImageReader(PermutedReader):
    """ImageData: the images of an :class:`ImageList` with their labels."""

    def __init__(self, layer: ReaderOwner, seed, images: ImageList, shuffle: bool = False,
                 workers: int | None = None):
        self.images = images
        super().__init__(layer, seed, len(images), shuffle, workers)

    def _read(self, start, n):
        return self._gather(np.arange(start, start + n, dtype=np.int64))

    def _gather(self, records):
        # Each image is read and decoded on a worker, into its own slot.
        data = self.pool.empty((len(records),) + tuple(self.images.image_shape), np.uint8)
        labels = np.asarray([self.images.label(int(i)) for i in records], np.int32)

        def one(k: int) -> None:
            copy_chw(data[k], self.images.load(int(records[k])))

        self.pool.run(one, len(records))
        return {self.tops[0]: self._cast(self.tops[0], data),
                self.tops[1]: self._cast(self.tops[1], labels)}


# ---------------------------------------------------------------------------------------------
# HDF5Data: a list of .h5 files
# ---------------------------------------------------------------------------------------------

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


class HDF5Files:
    """The files of an HDF5Data source: for each top, the dataset of the top's name.

    Datasets may have any number of axes (axis 0 counts rows, equal for all tops of a file) and
    any float or integer type; values are read as float32 (Caffe's Dtype). Row shapes must agree
    across files. ``files``: ``[(path, rows)]`` in list order; ``row_shapes``: top -> shape.
    """

    def __init__(self, source: str, tops: Sequence[str], where: str = ""):
        self.source = source
        self.tops = list(tops)
        self.where = where
        names = read_hdf5_list(source, where)
        _log.info("Number of HDF5 files: %d", len(names))
        self.files: list[tuple[str, int]] = []
        self.row_shapes: dict[str, tuple[int, ...]] = {}
        for fname in names:
            rows, shapes = self._inspect(fname)
            if not self.files:
                self.row_shapes = shapes
            elif shapes != self.row_shapes:
                t = next(t for t in self.tops if shapes[t] != self.row_shapes[t])
                raise DataError(f"{where}dataset '{t}' in '{fname}' has rows of shape "
                                f"{list(shapes[t])} but '{self.files[0][0]}' has "
                                f"{list(self.row_shapes[t])}")
            self.files.append((fname, rows))

    def _open(self, fname: str):
        import h5py

        try:
            return h5py.File(fname, "r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.where}failed opening HDF5 file '{fname}': {e}") from None

    def _dataset(self, f, fname: str, top: str):
        ds = f.get(top)
        if ds is None or not hasattr(ds, "shape"):
            raise DataError(f"{self.where}failed to find HDF5 dataset '{top}' in '{fname}'")
        if ds.ndim < 1:
            raise DataError(f"{self.where}dataset '{top}' in '{fname}' must have at least 1 axis")
        if ds.dtype.kind not in "fiub":
            raise DataError(f"{self.where}dataset '{top}' in '{fname}' has unsupported type "
                            f"{ds.dtype} (float or integer expected)")
        return ds

    def _inspect(self, fname: str):
        with self._open(fname) as f:
            shapes, rows = {}, None
            for t in self.tops:
                ds = self._dataset(f, fname, t)
                if rows is None:
                    rows = int(ds.shape[0])
                elif int(ds.shape[0]) != rows:
                    raise DataError(f"{self.where}'{fname}': dataset '{t}' has {ds.shape[0]} "
                                    f"rows but '{self.tops[0]}' has {rows}")
                shapes[t] = tuple(int(d) for d in ds.shape[1:])
        if rows == 0:
            raise DataError(f"{self.where}'{fname}' holds no rows")
        return rows, shapes

    def load(self, fname: str) -> dict[str, np.ndarray]:
        with self._open(fname) as f:
            return {t: np.asarray(self._dataset(f, fname, t)[...], dtype=np.float32)
                    for t in self.tops}


class HDF5Reader(BatchReader):
    """HDF5Data: rows of the listed .h5 files, file after file (Caffe's order).

    Without shuffle record ``r`` is row ``r - offset[f]`` of the file ``f`` holding it (files
    in list order). With shuffle, pass ``e`` visits the files in a permutation drawn from
    ``(seed, e)`` and each file's rows in a permutation drawn from ``(seed, e, file)`` (Caffe
    reshuffles the files each pass and the rows each time a file is loaded).
    """

    read_ahead = False

    def __init__(self, layer: ReaderOwner, seed, h5: HDF5Files, shuffle: bool = False,
                 workers: int | None = None):
        self.shuffled = bool(shuffle)
        self.h5 = h5
        self.files = h5.files  # [(path, rows)]
        self.offsets = np.cumsum([0] + [r for _, r in self.files])
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._orders: dict[tuple, Any] = {}
        # Rows are copied out of whole files already in memory: nothing to decode, and h5py
        # serialises its calls under one lock, so the workers would not help here
        # (read_ahead is off).
        super().__init__(layer, seed, int(self.offsets[-1]), workers)

    def _file(self, f: int) -> dict[str, np.ndarray]:
        arrays = self._cache.get(f)
        if arrays is None:
            arrays = self.h5.load(self.files[f][0])
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
        files = [self.h5.load(p) for p, _ in self.files]
        self.count_read(self.count)
        return {t: self._cast(t, np.concatenate([a[t] for a in files], axis=0)) for t in self.tops}


# ---------------------------------------------------------------------------------------------
# MemoryData: arrays handed in from Python
# ---------------------------------------------------------------------------------------------

class ArrayStore:
    """The arrays of a MemoryData layer (Caffe's ``MemoryDataLayer::Reset``).

    ``set_input_arrays(data, labels)``: data ``[n, C, H, W]``, labels ``[n]`` (or
    ``[n, 1, 1, 1]``), ``n`` a positive multiple of ``batch_size``; both are copied as float32.
    Each call bumps ``generation``, which restarts the readers' streams at 0.
    """

    def __init__(self, layer: ReaderOwner, chw: tuple[int, int, int]):
        self.layer = layer
        self.chw = tuple(int(d) for d in chw)
        self.batch_size = int(layer.batch_size)
        self.arrays: tuple[np.ndarray, np.ndarray] | None = None
        self.generation = 0

    def error(self, message: str) -> LayerError:
        return LayerError(self.layer.name, self.layer.type, message)

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
        self.arrays = (np.array(data, np.float32, order="C"), np.array(labels, np.float32))
        self.generation += 1

    @property
    def count(self) -> int:
        return 0 if self.arrays is None else int(self.arrays[0].shape[0])


class MemoryReader(BatchReader):
    """MemoryData: the arrays last given to ``set_input_arrays`` (Caffe's Reset).

    A new ``set_input_arrays`` restarts the stream at 0, as Caffe's Reset sets ``pos_ = 0``.
    Nothing is read ahead: new arrays may arrive between two batches.
    """

    read_ahead = False

    def __init__(self, layer: ReaderOwner, seed, store: ArrayStore):
        self.store = store
        self._generation = store.generation
        super().__init__(layer, seed, store.count)

    def set_input_arrays(self, data, labels) -> None:
        self.store.set_input_arrays(data, labels)

    def _sync(self) -> None:
        if self._generation != self.store.generation:
            self._generation = self.store.generation
            self.count = self.store.count
            self._position = 0

    def _check_nonempty(self):
        self._sync()
        if self.count <= 0:
            raise self.store.error("needs input arrays: call set_input_arrays(data, labels) "
                                   "first (Caffe's MemoryDataLayer::Reset)")

    @property
    def position(self):
        self._sync()
        return self._position

    def _read(self, start, n):
        data, labels = self.store.arrays
        return {self.tops[0]: data[start:start + n], self.tops[1]: labels[start:start + n]}


__all__ = ["Reader", "ReaderOwner", "BatchReader", "PermutedReader", "ShardReader", "SourceReader",
           "ImageReader", "ImageList", "HDF5Reader", "HDF5Files", "MemoryReader", "ArrayStore",
           "read_image_list", "read_hdf5_list", "root_path", "open_layer_source", "fresh_seed"]
