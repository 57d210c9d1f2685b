"""jcaffe's dataset format: a directory of two zarr (v3) arrays and a metadata file.

Layout of a dataset directory ``PATH``::

    PATH/jcaffe_dataset.json   metadata (below); its presence marks a complete jcaffe dataset
    PATH/data/                 zarr v3 array [N, C, H, W], uint8 (byte images) or float32
    PATH/label/                zarr v3 array [N], int32

``data`` is chunked along N only (``chunk_records`` records per chunk, whole C, H, W; about 2 MiB
per chunk, at most 1024 records), zstd-compressed and followed by a CRC32C of the stored chunk
(zarr v3's ``crc32c`` codec), so reading a batch of consecutive records touches one or two chunks
and every chunk read is checked; ``label`` likewise. Records are in index order, which is the order Caffe
would read them from the database they came from.

``jcaffe_dataset.json``::

    {"format": "jcaffe-dataset", "version": 1, "count": N, "shape": [C, H, W], "dtype": "uint8",
     "label_dtype": "int32", "chunk_records": K, "zarr_format": 3, "source": "<free text>",
     "checksum": {"algorithm": "sha256", "data": "<hex>", "label": "<hex>"}, "created_by": "..."}

``checksum.data`` is the SHA-256 of all records' data bytes in index order (C order, little
endian); ``checksum.label`` that of the labels as little-endian int32. ``verify_dataset`` (and
``jcaffe verify_dataset DB``) recomputes both.

Integrity: a chunk whose CRC32C does not match (a flipped bit, a torn write) fails its read with a
``DataError`` naming the dataset, the array and the chunk's records, before any record of the read
is used. Datasets written before chunks carried checksums still open, with one warning per dataset
and process; only ``verify_dataset`` can check them (rewriting them adds the checksums). A chunk
file that is missing altogether reads as zeros (zarr's fill value): only ``verify_dataset``
catches that.

Writing (``write_dataset``) is atomic: the dataset is built in a hidden temporary directory beside
``PATH`` (``.NAME.tmp-*``) and renamed into place only when complete; with ``overwrite=True`` an
existing dataset is replaced only then. A failure, an interrupt included, removes the temporary and
leaves any existing dataset untouched; a process killed outright (``kill -9``) leaves its hidden
``.NAME.tmp-*`` directory behind, which readers never see (``PATH`` does not exist until the
rename) and the next ``write_dataset`` of ``PATH`` removes.

Reading: ``read_dataset(PATH)`` returns a ``jcaffe.data.sources.Source`` (kind "tensorstore").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from typing import Any, Iterable

import numpy as np

from jcaffe._atomic import atomic_dir
from jcaffe.data.source_base import METADATA_FILE, Source, replaceable
from jcaffe.errors import DataError

FORMAT = "jcaffe-dataset"
VERSION = 1
_CHUNK_TARGET_BYTES = 2 << 20
_MAX_CHUNK_RECORDS = 1024
_LABEL_CHUNK = 1 << 16
_FLUSH_BYTES = 16 << 20
CHUNK_CHECKSUM = "crc32c"


def default_chunk_records(shape: tuple[int, int, int], dtype) -> int:
    """Records per chunk: about 2 MiB of data, between 1 and 1024 records."""
    record_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return int(max(1, min(_MAX_CHUNK_RECORDS, _CHUNK_TARGET_BYTES // max(1, record_bytes))))


def _zarr_spec(path: str, shape, dtype: str, chunks, *, create: bool, compress: bool = True,
               checksum: bool = True):
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    if create:
        codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if compress:
            codecs.append({"name": "zstd", "configuration": {"level": 3}})
        if checksum:
            # Last in the chain: the CRC32C covers the stored (compressed) bytes, so a damaged
            # chunk fails its read instead of decompressing into wrong records.
            codecs.append({"name": CHUNK_CHECKSUM})
        spec["metadata"] = {
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "codecs": codecs, "fill_value": 0,
        }
        spec["create"] = True
    else:
        spec["open"] = True
    return spec


def _as_data_batch(data, where: str) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise DataError(f"{where}: data has shape {list(arr.shape)}; expected [n, C, H, W]")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise DataError(f"{where}: data has dtype {arr.dtype}; expected uint8 (bytes) or float32")


def _as_label_batch(labels, n: int, where: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{where}: labels have shape {list(arr.shape)}; expected [{n}] to match "
                        "the data")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise DataError(f"{where}: labels have dtype {arr.dtype}; expected integers")
    if arr.size and (int(arr.min()) < -2**31 or int(arr.max()) >= 2**31):
        raise DataError(f"{where}: labels outside the int32 range")
    return arr.astype(np.int32)


class _Writer:
    """Appends batches to the zarr arrays of a dataset under construction (chunk-aligned writes,
    growing the arrays as records arrive) while hashing them."""

    def __init__(self, tmp: str, path: str, chunk_records: int | None):
        self.tmp, self.path = tmp, path
        self.chunk_records = chunk_records
        self.count = 0            # records received
        self.written = 0          # records written to the arrays
        self.shape: tuple[int, int, int] | None = None
        self.dtype = None
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_n = 0
        self.data_hash = hashlib.sha256()
        self.label_hash = hashlib.sha256()

    def _open(self, first: np.ndarray) -> None:
        import tensorstore as ts

        self.shape = tuple(int(v) for v in first.shape[1:])
        self.dtype = first.dtype
        if min(self.shape) <= 0:
            raise DataError(f"{self.path}: records have shape {list(self.shape)}; "
                            "C, H and W must be positive")
        if self.chunk_records is None:
            self.chunk_records = default_chunk_records(self.shape, self.dtype)
        k = self.chunk_records
        self.flush_records = k * max(1, _FLUSH_BYTES // (k * first[0].nbytes))
        dname = "uint8" if self.dtype == np.uint8 else "float32"
        self.data = ts.open(_zarr_spec(os.path.join(self.tmp, "data"), (0, *self.shape), dname,
                                       (k, *self.shape), create=True)).result()
        self.label = ts.open(_zarr_spec(os.path.join(self.tmp, "label"), (0,), "int32",
                                        (_LABEL_CHUNK,), create=True)).result()

    def append(self, data, labels) -> None:
        where = f"{self.path}: records from {self.count}"
        d = _as_data_batch(data, where)
        lab = _as_label_batch(labels, d.shape[0], where)
        if d.shape[0] == 0:
            return
        if self.shape is None:
            self._open(d)
        if tuple(d.shape[1:]) != self.shape:
            raise DataError(f"{where}: records have shape {list(d.shape[1:])}, but the first "
                            f"have {list(self.shape)}")
        if d.dtype != self.dtype:
            raise DataError(f"{where}: data is {d.dtype}, but the first records are {self.dtype}")
        d = np.array(d, dtype=d.dtype.newbyteorder("<"), order="C", copy=True)
        self.data_hash.update(memoryview(d).cast("B"))
        self.label_hash.update(np.ascontiguousarray(lab, dtype="<i4").tobytes())
        self.pending.append((d, lab))
        self.pending_n += d.shape[0]
        self.count += d.shape[0]
        if self.pending_n >= self.flush_records:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.pending_n:
            return
        if len(self.pending) > 1:
            d = np.concatenate([p[0] for p in self.pending])
            lab = np.concatenate([p[1] for p in self.pending])
        else:
            d, lab = self.pending[0]
        n = d.shape[0] if final else (d.shape[0] // self.chunk_records) * self.chunk_records
        if n == 0:
            return
        a, b = self.written, self.written + n
        try:
            self.data = self.data.resize(exclusive_max=[b, None, None, None],
                                         expand_only=True).result()
            self.label = self.label.resize(exclusive_max=[b], expand_only=True).result()
            wd = self.data[a:b].write(d[:n])
            wl = self.label[a:b].write(lab[:n])
            wd.result()
            wl.result()
        except ValueError as e:
            raise DataError(f"{self.path}: writing records [{a}, {b}) failed: {e}") from None
        self.written = b
        self.pending = [(d[n:], lab[n:])] if n < d.shape[0] else []
        self.pending_n = d.shape[0] - n

    def finish(self, source: str) -> dict:
        if self.count == 0:
            raise DataError(f"{self.path}: no records to write")
        self._flush(final=True)
        from jcaffe import __version__

        meta = {
            "format": FORMAT, "version": VERSION, "count": self.count,
            "shape": list(self.shape), "dtype": np.dtype(self.dtype).name,
            "label_dtype": "int32", "chunk_records": self.chunk_records, "zarr_format": 3,
            "source": source,
            "checksum": {"algorithm": "sha256", "data": self.data_hash.hexdigest(),
                         "label": self.label_hash.hexdigest()},
            "created_by": f"jcaffe {__version__}",
        }
        with open(os.path.join(self.tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return meta


def write_dataset(path: str, data, labels=None, *, source: str = "", overwrite: bool = False,
                  chunk_records: int | None = None) -> dict:
    """Writes a jcaffe dataset at ``path`` atomically and returns its metadata.

    ``data``/``labels``: arrays ``[N, C, H, W]`` (uint8, or float -> float32) and ``[N]``
    (integers -> int32); or ``data`` an iterable of ``(data_batch, label_batch)`` pairs and
    ``labels`` None. ``source`` describes where the records came from. An existing ``path`` is an
    error unless ``overwrite`` (then it must be a dataset, and is replaced once the new one is
    complete). Raises ``DataError`` on bad input; nothing is left behind on failure.
    """
    path = os.path.abspath(os.fspath(path))
    if labels is not None:
        arr = data if hasattr(data, "shape") else np.asarray(data)
        lab = np.asarray(labels)
        if getattr(arr, "ndim", 0) < 1 or lab.ndim != 1 or arr.shape[0] != lab.shape[0]:
            raise DataError(f"{path}: data shape {list(getattr(arr, 'shape', []))} and labels "
                            f"shape {list(lab.shape)} do not match")
        step = 8192
        batches: Iterable = ((arr[i:i + step], lab[i:i + step])
                             for i in range(0, int(arr.shape[0]), step))
    else:
        if isinstance(data, np.ndarray):
            raise DataError(f"{path}: labels are missing (pass labels, or an iterable of "
                            "(data, labels) batches)")
        batches = data
    with atomic_dir(path, overwrite=overwrite, replaceable=replaceable) as tmp:
        writer = _Writer(tmp, path, chunk_records)
        for i, item in enumerate(batches):
            try:
                batch_data, batch_labels = item
            except (TypeError, ValueError):
                raise DataError(f"{path}: batch {i} is not a (data, labels) pair") from None
            writer.append(batch_data, batch_labels)
        return writer.finish(source)


# --------------------------------------------------------------------------------------------
# Reading

def _one_line(e) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def read_metadata(path: str) -> dict:
    """The validated contents of ``path``'s ``jcaffe_dataset.json``."""
    mpath = os.path.join(path, METADATA_FILE)
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not a jcaffe dataset (no {METADATA_FILE})") from None
    except OSError as e:
        raise DataError(f"{mpath}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{mpath}: not a jcaffe dataset metadata file (format is not '{FORMAT}')")
    def is_int(v) -> bool:  # JSON true/false are not numbers here
        return isinstance(v, int) and not isinstance(v, bool)

    version = meta.get("version")
    if not is_int(version) or version < 1:
        raise DataError(f"{mpath}: bad format version {version!r}")
    if version > VERSION:
        raise DataError(f"{mpath}: format version {version} is newer than this jcaffe reads "
                        f"({VERSION})")
    count, shape, dtype = meta.get("count"), meta.get("shape"), meta.get("dtype")
    if not is_int(count) or count < 1:
        raise DataError(f"{mpath}: bad record count {count!r}")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(is_int(v) and v > 0 for v in shape)):
        raise DataError(f"{mpath}: bad record shape {shape!r}; expected [C, H, W]")
    if dtype not in ("uint8", "float32"):
        raise DataError(f"{mpath}: bad dtype {dtype!r}; expected 'uint8' or 'float32'")
    chunk = meta.get("chunk_records", 1)
    if not is_int(chunk) or not 1 <= chunk < 2**31:
        raise DataError(f"{mpath}: bad chunk_records {chunk!r}; expected a positive integer")
    if not isinstance(meta.get("checksum", {}), dict):
        raise DataError(f"{mpath}: bad checksum {meta['checksum']!r}; expected an object "
                        f"{{\"algorithm\": \"sha256\", \"data\": ..., \"label\": ...}}")
    return meta


def _has_chunk_checksum(store) -> bool:
    try:
        codecs = store.codec.to_json().get("codecs") or []
    except (AttributeError, ValueError):
        return False
    return any(isinstance(c, dict) and c.get("name") == CHUNK_CHECKSUM for c in codecs)


class TensorstoreSource(Source):
    """A jcaffe dataset opened for reading (see the module docstring).

    Every chunk read is checked against its CRC32C (datasets written before chunks carried one
    open with a warning, and are checked only by ``verify``); a damaged chunk raises
    ``DataError`` naming the dataset, the array and the records, before any of them is used.
    """

    def __init__(self, path: str):
        import tensorstore as ts

        super().__init__(path, "tensorstore")
        self.metadata = read_metadata(path)
        self.count = self.metadata["count"]
        self.datum_shape = tuple(self.metadata["shape"])
        self.dtype = np.dtype(self.metadata["dtype"]).type
        record_bytes = int(np.prod(self.datum_shape)) * np.dtype(self.dtype).itemsize
        chunk = int(self.metadata.get("chunk_records") or 1)
        cache = max(64 << 20, 4 * chunk * record_bytes)
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache}})
        try:
            self._data = ts.open(_zarr_spec(os.path.join(path, "data"), None, None, None,
                                            create=False), read=True, write=False,
                                 context=ctx).result()
            self._label = ts.open(_zarr_spec(os.path.join(path, "label"), None, None, None,
                                             create=False), read=True, write=False,
                                  context=ctx).result()
        except ValueError as e:
            raise DataError(f"{path}: dataset arrays are missing or damaged: "
                            f"{_one_line(e)}") from None
        want = (self.count, *self.datum_shape)
        if tuple(self._data.shape) != want or self._data.dtype.numpy_dtype != np.dtype(self.dtype):
            raise DataError(f"{path}: 'data' array is {list(self._data.shape)} "
                            f"{self._data.dtype.numpy_dtype}, but the metadata says {list(want)} "
                            f"{np.dtype(self.dtype).name}")
        if tuple(self._label.shape) != (self.count,) or self._label.dtype.numpy_dtype != np.int32:
            raise DataError(f"{path}: 'label' array is {list(self._label.shape)} "
                            f"{self._label.dtype.numpy_dtype}, but the metadata says "
                            f"[{self.count}] int32")
        unchecked = [name for name, store in (("data", self._data), ("label", self._label))
                     if not _has_chunk_checksum(store)]
        self.chunk_checksums = not unchecked
        if unchecked:
            # The warnings machinery shows this once per dataset per process (the CLI logs it
            # as one line), however often the data layers reopen the source.
            warnings.warn(f"{path}: dataset written without chunk checksums (by an older "
                          f"jcaffe; arrays {', '.join(repr(n) for n in unchecked)}): damaged "
                          f"chunks are not detected when read; check it with `jcaffe "
                          f"verify_dataset {path}` or recreate it", UserWarning, stacklevel=3)

    def _read_failure(self, name: str, store, start: int, n: int, e: Exception) -> str:
        text = _one_line(e)
        records = f"records [{start}, {start + n})"
        keys = re.findall(re.escape(name) + r"[/\\]c[/\\](\d+)\b", text)
        if keys:
            try:
                k = int(store.chunk_layout.read_chunk.shape[0])
                a = int(keys[-1]) * k
                records = f"records [{a}, {min(a + k, self.count)}) (chunk {keys[-1]})"
            except (AttributeError, TypeError, ValueError):
                pass
        low = text.lower()
        if any(w in low for w in ("data_loss", "digest", "checksum", "decompress", "decod")):
            return (f"{self.path}: array '{name}', {records}: damaged chunk ({text}); recreate "
                    f"the dataset (`jcaffe verify_dataset {self.path}` checks it whole)")
        return f"{self.path}: array '{name}', {records}: read failed: {text}"

    def _read(self, start: int, n: int):
        return self._read_both(slice(start, start + n), start, n)

    def _read_both(self, index, start: int, n: int):
        """Data and labels at ``index`` (a slice or an index array within records
        ``[start, start + n)``): both reads are issued before either is awaited; each failure
        names its own array."""
        pending = [(name, store, store[index].read())
                   for name, store in (("data", self._data), ("label", self._label))]
        out = []
        for name, store, future in pending:
            try:
                out.append(np.asarray(future.result()))
            except ValueError as e:
                raise DataError(self._read_failure(name, store, start, n, e)) from None
        return out[0], out[1].astype(np.int32, copy=False)

    def read_records(self, records, pool=None):
        """Records ``records`` (any indices, in the order given) in one index-array read of
        each array: only those records are read out (whole chunks are still decompressed, as
        for any read). Nothing to decode here, so ``pool`` is unused."""
        records = np.asarray(records, dtype=np.int64).reshape(-1)
        if len(records) == 0:
            return (np.empty((0, *self.datum_shape), self.dtype), np.empty((0,), np.int32))
        lo, hi = int(records.min()), int(records.max())
        self._check_range(lo, hi - lo + 1)
        return self._read_both(records, lo, hi - lo + 1)

    def verify(self) -> None:
        """Recomputes the content checksums; raises ``DataError`` on a mismatch."""
        want = self.metadata.get("checksum") or {}
        if want.get("algorithm") != "sha256":
            raise DataError(f"{self.path}: metadata has no sha256 checksum to verify")
        dh, lh = hashlib.sha256(), hashlib.sha256()
        step = int(self.metadata.get("chunk_records") or 1024) * 8
        for a in range(0, self.count, step):
            d, lab = self.read(a, min(step, self.count - a))
            dh.update(np.ascontiguousarray(d, dtype=d.dtype.newbyteorder("<")).tobytes())
            lh.update(np.ascontiguousarray(lab, dtype="<i4").tobytes())
        if dh.hexdigest() != want.get("data") or lh.hexdigest() != want.get("label"):
            raise DataError(f"{self.path}: content checksum mismatch (the dataset was modified "
                            "or damaged); recreate it")


def has_chunk_checksums(path: str) -> bool:
    """Whether both arrays of the dataset at ``path`` carry a checksum per chunk (datasets
    written by jcaffe before chunk checksums do not; rewriting them adds it)."""
    for name in ("data", "label"):
        try:
            with open(os.path.join(os.fspath(path), name, "zarr.json")) as f:
                codecs = json.load(f).get("codecs") or []
        except (OSError, ValueError, AttributeError):
            return False
        if not any(isinstance(c, dict) and c.get("name") == CHUNK_CHECKSUM for c in codecs):
            return False
    return True


def read_dataset(path: str) -> TensorstoreSource:
    """Opens the jcaffe dataset at ``path`` for reading."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset not found")
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a jcaffe dataset (not a directory)")
    return TensorstoreSource(path)


def verify_dataset(path: str) -> dict:
    """Checks the dataset at ``path`` against its checksums; returns its metadata."""
    with read_dataset(path) as src:
        src.verify()
        return src.metadata


__all__ = ["write_dataset", "read_dataset", "read_metadata", "verify_dataset",
           "has_chunk_checksums", "TensorstoreSource", "default_chunk_records", "FORMAT", "VERSION"]
