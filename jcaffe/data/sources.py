"""Record sources for the data layers: jcaffe datasets, Caffe LMDBs and Caffe LevelDBs.

``open_source(path)`` looks at what is on disk (not at the net's ``backend``, which is only a hint):

* a directory holding ``jcaffe_dataset.json``: a jcaffe dataset (``jcaffe.data.dataset``);
* a directory holding ``data.mdb``, or a single LMDB file: a Caffe LMDB of ``Datum`` records;
* a directory holding ``CURRENT`` and ``MANIFEST-*`` / ``*.ldb`` / ``*.log``: a Caffe LevelDB.

Every source gives ``count`` records of one ``datum_shape`` (C, H, W) and ``dtype`` (uint8 for byte
data and encoded images, float32 for ``float_data``); ``read(start, n)`` returns records
``[start, start + n)`` in Caffe's order (the databases' key order, the dataset's index order) as
``data [n, C, H, W]`` and ``labels [n]`` int32. The first record fixes shape and dtype; a record
that differs raises ``DataError`` naming its index and key. Databases are opened read-only (LMDB
without its lock file); the key index is built once on open, so ``read`` is a cursor range.

``write_lmdb`` / ``write_leveldb`` build Caffe databases atomically (temporary directory beside the
target, renamed into place when complete), keyed ``%08d`` or by the caller's keys.

A ``Source`` is not meant for concurrent use; its reads are serialised by a lock.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Iterable

import numpy as np

from jcaffe._atomic import atomic_dir
from jcaffe.data.datum import datum_to_array, datum_to_view
from jcaffe.data.image import copy_chw
from jcaffe.data.source_base import METADATA_FILE, Source, detect_kind, replaceable
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2

_COMMIT_EVERY = 1000  # records per write transaction, as Caffe's converters


class _DatumSource(Source):
    """Shared decoding for key-value databases of serialized Datums."""

    def __init__(self, path: str, kind: str, force_color: bool):
        super().__init__(path, kind)
        self._force_color = force_color
        self._keys: list[bytes] = []

    def _where(self, index: int, key: bytes) -> str:
        return f"{self.path}: record {index} (key '{key.decode('utf-8', 'replace')}')"

    def _init_from_first(self, first_value: bytes) -> None:
        self.count = len(self._keys)
        arr, _ = datum_to_array(first_value, self._where(0, self._keys[0]),
                                force_color=self._force_color)
        self.datum_shape = tuple(int(v) for v in arr.shape)
        self.dtype = arr.dtype.type

    def _decode(self, index: int, key: bytes, value: bytes) -> tuple[np.ndarray, int]:
        """Record ``index`` (stored under ``key``) decoded and checked against record 0 (a view:
        the caller copies it into its batch)."""
        where = self._where(index, key)
        arr, label = datum_to_view(value, where, force_color=self._force_color)
        if arr.shape != self.datum_shape:
            raise DataError(f"{where}: shape {tuple(arr.shape)} differs from record 0's "
                            f"{self.datum_shape}")
        if arr.dtype != self.dtype:
            raise DataError(f"{where}: holds {arr.dtype.name} data but record 0 holds "
                            f"{np.dtype(self.dtype).name}")
        if not -2**31 <= label < 2**31:
            raise DataError(f"{where}: label {label} does not fit in int32")
        return arr, label

    def _values(self, start: int, n: int) -> list[tuple[bytes, bytes]]:
        """The stored ``(key, value)`` pairs of records ``[start, start + n)`` (caller holds
        the lock)."""
        raise NotImplementedError

    def _take(self, start: int, n: int, values: Iterable[tuple[bytes, bytes]]
              ) -> list[tuple[bytes, bytes]]:
        got = list(itertools.islice(values, n))
        for i, (key, _) in enumerate(got):
            index = start + i
            if key != self._keys[index]:
                raise DataError(f"{self._where(index, self._keys[index])}: database changed "
                                f"while open (found key '{key.decode('utf-8', 'replace')}')")
        if len(got) != n:
            raise DataError(f"{self.path}: database changed while open (records "
                            f"[{start}, {start + n}) requested, {len(got)} found)")
        return got

    def _decode_into(self, indices, items, pool) -> tuple[np.ndarray, np.ndarray]:
        n = len(items)
        shape = (n, *self.datum_shape)
        data = np.empty(shape, self.dtype) if pool is None else pool.empty(shape, self.dtype)
        labels = np.empty((n,), dtype=np.int32)

        def one(i: int) -> None:
            key, value = items[i]
            arr, labels[i] = self._decode(int(indices[i]), key, value)
            copy_chw(data[i], arr)

        if pool is None:
            for i in range(n):
                one(i)
        else:
            pool.run(one, n)
        return data, labels

    def _read(self, start: int, n: int):
        if n == 0:
            return (np.empty((0, *self.datum_shape), self.dtype), np.empty((0,), np.int32))
        return self._decode_into(range(start, start + n), self._values(start, n), None)

    def read_records(self, records, pool=None) -> tuple[np.ndarray, np.ndarray]:
        """Records ``records`` (any indices, in the order given): the stored values are
        fetched in one pass under the source's lock, then decoded on ``pool``'s workers
        (``jcaffe.data.workers.DecodePool``; None: in this thread)."""
        records = np.asarray(records, dtype=np.int64).reshape(-1)
        if len(records) and (self._closed or records.min() < 0 or records.max() >= self.count):
            self._check_range(int(records.min()), int(records.max()) - int(records.min()) + 1)
        items: list[tuple[bytes, bytes]] = []
        with self._lock:
            for a, m in runs(records):
                items.extend(self._values(a, m))
        return self._decode_into(records, items, pool)


def runs(records: np.ndarray) -> list[tuple[int, int]]:
    """``records`` as ``(start, length)`` runs of consecutive indices, in order."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(records)
    while i < n:
        j = i + 1
        while j < n and records[j] == records[j - 1] + 1:
            j += 1
        out.append((int(records[i]), j - i))
        i = j
    return out


class SharedHandles:
    """One open handle per database and process, shared by the process's readers (a train and
    a test net on one database, say): LMDB and LevelDB each admit one per process (py-lmdb
    refuses a second open, LevelDB's lock a second user). ``acquire(path)`` opens on first use
    and counts; each is paired with a ``release(path)``, and the last user's closes it."""

    def __init__(self, open_handle):
        self._open = open_handle
        self._guard = threading.Lock()
        self._handles: dict[str, list] = {}  # real path -> [handle, users]

    def acquire(self, path: str):
        key = os.path.realpath(path)
        with self._guard:
            entry = self._handles.get(key)
            if entry is None:
                entry = self._handles[key] = [self._open(path), 0]
            entry[1] += 1
            return entry[0]

    def release(self, path: str) -> None:
        key = os.path.realpath(path)
        with self._guard:
            entry = self._handles.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._handles[key]
                entry[0].close()


def _open_lmdb(path: str):
    import lmdb

    # lock=False: no reader table, so any thread may hold several read transactions.
    return lmdb.open(path, readonly=True, lock=False, subdir=os.path.isdir(path),
                     readahead=False)


def _open_leveldb(path: str):
    import plyvel

    return plyvel.DB(path, create_if_missing=False)


# Raise lmdb.Error / OSError and plyvel.Error as their libraries do.
LMDB_HANDLES = SharedHandles(_open_lmdb)
LEVELDB_HANDLES = SharedHandles(_open_leveldb)


class LMDBSource(_DatumSource):
    """A Caffe LMDB of Datums (a directory with ``data.mdb``, or an LMDB file)."""

    def __init__(self, path: str, *, force_color: bool = False):
        super().__init__(path, "lmdb", force_color)
        import lmdb

        self._env = None
        try:
            self._env = LMDB_HANDLES.acquire(path)
            self._txn = self._env.begin(buffers=False)
            cursor = self._txn.cursor()
            self._keys = list(cursor.iternext(keys=True, values=False))
            first = self._txn.get(self._keys[0]) if self._keys else None
        except lmdb.Error as e:
            self._close_env()
            raise DataError(f"{path}: cannot read LMDB (corrupt, locked or unreadable): "
                            f"{type(e).__name__}: {e}") from None
        except OSError as e:
            self._close_env()
            raise DataError(f"{path}: cannot read LMDB: {e.strerror or e}") from None
        if not self._keys:
            self._close_env()
            raise DataError(f"{path}: LMDB holds no records")
        try:
            self._init_from_first(first)
        except BaseException:
            self._close_env()
            raise

    def _close_env(self) -> None:
        if self._env is not None:
            self._env = None
            LMDB_HANDLES.release(self.path)

    def _values(self, start: int, n: int):
        import lmdb

        try:
            cursor = self._txn.cursor()
            if not cursor.set_key(self._keys[start]):
                raise DataError(f"{self._where(start, self._keys[start])}: key vanished "
                                "(database changed while open)")
            return self._take(start, n, cursor.iternext(keys=True, values=True))
        except lmdb.Error as e:
            raise DataError(f"{self.path}: LMDB read failed at records [{start}, {start + n}): "
                            f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        if not self._closed:
            super().close()
            try:
                self._txn.abort()
            except Exception:
                pass
            self._close_env()


class LevelDBSource(_DatumSource):
    """A Caffe LevelDB of Datums (read through ``plyvel`` and a snapshot)."""

    def __init__(self, path: str, *, force_color: bool = False):
        super().__init__(path, "leveldb", force_color)
        import plyvel

        self._db = None
        try:
            self._db = LEVELDB_HANDLES.acquire(path)
            self._snap = self._db.snapshot()
            self._keys = list(self._snap.iterator(include_value=False))
            first = self._snap.get(self._keys[0]) if self._keys else None
        except plyvel.IOError as e:
            self._close_db()
            msg = str(e)
            if "lock" in msg.lower():
                raise DataError(f"{path}: LevelDB is locked by another process (LevelDB allows "
                                f"one user at a time): {msg}") from None
            raise DataError(f"{path}: cannot read LevelDB: {msg}") from None
        except plyvel.Error as e:
            self._close_db()
            raise DataError(f"{path}: cannot read LevelDB (corrupt?): {type(e).__name__}: {e}"
                            ) from None
        if not self._keys:
            self._close_db()
            raise DataError(f"{path}: LevelDB holds no records")
        try:
            self._init_from_first(first)
        except BaseException:
            self._close_db()
            raise

    def _close_db(self) -> None:
        if self._db is not None:
            self._db = None
            LEVELDB_HANDLES.release(self.path)

    def _values(self, start: int, n: int):
        import plyvel

        try:
            it = self._snap.iterator(start=self._keys[start])
            try:
                return self._take(start, n, it)
            finally:
                it.close()
        except plyvel.Error as e:
            raise DataError(f"{self.path}: LevelDB read failed at records "
                            f"[{start}, {start + n}): {type(e).__name__}: {e}") from None

    def close(self) -> None:
        if not self._closed:
            super().close()
            try:
                self._snap.close()
            except Exception:
                pass
            self._close_db()


# --------------------------------------------------------------------------------------------
# Detection and opening

def prepare_command(path: str, backend_hint: int | None = None) -> str | None:
    """The command that creates a shipped dataset at ``path`` (under datasets/mnist or
    datasets/cifar10), or None."""
    parts = os.path.abspath(path).replace("\\", "/").split("/")
    name = parts[-1] if parts else ""
    fmt = ""
    if name.endswith("_lmdb"):
        fmt = " --format lmdb"
    elif name.endswith("_leveldb"):
        fmt = " --format leveldb"
    for i in range(len(parts) - 1):
        if parts[i] == "datasets" and parts[i + 1] == "mnist":
            return f"python datasets/mnist/prepare_mnist.py{fmt}"
        if parts[i] == "datasets" and parts[i + 1] == "cifar10":
            return (f"python datasets/cifar10/prepare_cifar10.py --from DIR{fmt} (DIR: the "
                    "cifar-10-batches-bin folder of https://www.cs.toronto.edu/~kriz/"
                    "cifar-10-binary.tar.gz)")
    return None


def open_source(path: str, backend_hint: int | None = None, *, force_color: bool = False) -> Source:
    """Opens the records at ``path`` (kind detected from its contents; see the module docstring).

    ``backend_hint`` (``DataParameter.DB``: 0 LEVELDB, 1 LMDB) only improves error messages;
    ``force_color`` decodes encoded colour-less images as BGR (Caffe's ``force_color``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        cmd = prepare_command(path, backend_hint)
        hint = f"; create it with: {cmd}" if cmd else ""
        raise DataError(f"{path}: dataset not found{hint}")
    kind = detect_kind(path)
    if kind == "tensorstore":
        from jcaffe.data.dataset import read_dataset

        return read_dataset(path)
    if kind == "lmdb":
        return LMDBSource(path, force_color=force_color)
    if kind == "leveldb":
        return LevelDBSource(path, force_color=force_color)
    said = ""
    if backend_hint is not None:
        try:
            said = f" (the net says backend {caffe_pb2.DataParameter.DB.Name(backend_hint)})"
        except ValueError:
            said = f" (the net says backend {backend_hint})"
    raise DataError(f"{path}: not a dataset: expected a jcaffe dataset ({METADATA_FILE}), a Caffe "
                    f"LMDB (data.mdb) or a Caffe LevelDB (CURRENT, MANIFEST-*){said}")


def db_bounds(path: str) -> tuple[bytes, bytes, bytes]:
    """(first key, last key, first value) of a Caffe LMDB or LevelDB, without indexing all keys
    (a quick completeness check for databases this module wrote). Raises ``DataError``."""
    kind = detect_kind(path)
    if kind == "lmdb":
        import lmdb

        try:
            env = LMDB_HANDLES.acquire(path)
            try:
                with env.begin() as txn:
                    cur = txn.cursor()
                    if not cur.first():
                        raise DataError(f"{path}: LMDB holds no records")
                    first_key, first_value = cur.key(), cur.value()
                    cur.last()
                    return first_key, cur.key(), first_value
            finally:
                LMDB_HANDLES.release(path)
        except lmdb.Error as e:
            raise DataError(f"{path}: cannot read LMDB: {type(e).__name__}: {e}") from None
    if kind == "leveldb":
        import plyvel

        try:
            db = LEVELDB_HANDLES.acquire(path)
        except plyvel.Error as e:
            raise DataError(f"{path}: cannot read LevelDB: {e}") from None
        try:
            with db.iterator() as it:
                first = next(it, None)
            if first is None:
                raise DataError(f"{path}: LevelDB holds no records")
            with db.iterator(reverse=True, include_value=False) as it:
                last_key = next(it)
            return first[0], last_key, first[1]
        finally:
            LEVELDB_HANDLES.release(path)
    raise DataError(f"{path}: not a Caffe LMDB or LevelDB")


# --------------------------------------------------------------------------------------------
# Writing Caffe databases

def _datum_items(datums) -> Iterable[tuple[bytes, bytes]]:
    for i, item in enumerate(datums):
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"item {i}: expected (key, datum), got a {len(item)}-tuple")
            key, datum = item
        else:
            key, datum = f"{i:08d}", item
        if isinstance(key, str):
            key = key.encode("utf-8")
        if isinstance(datum, caffe_pb2.Datum):
            value = datum.SerializeToString()
        elif isinstance(datum, (bytes, bytearray, memoryview)):
            value = bytes(datum)
        else:
            raise TypeError(f"item {i}: expected a caffe_pb2.Datum or its bytes, "
                            f"got {type(datum).__name__}")
        yield bytes(key), value


def write_lmdb(path: str, datums, *, overwrite: bool = False) -> int:
    """Writes Datums to a new Caffe LMDB at ``path``; returns the record count.

    ``datums`` yields ``caffe_pb2.Datum`` (or serialized bytes), keyed ``%08d`` by position, or
    ``(key, datum)`` pairs (convert_imageset's ``%08d_<filename>``). A repeated key is an error.
    """
    import lmdb

    path = os.path.abspath(os.fspath(path))
    count = 0
    with atomic_dir(path, overwrite=overwrite, replaceable=replaceable) as tmp:
        env = lmdb.open(tmp, map_size=64 << 20, subdir=True, max_dbs=0)
        try:
            def commit(batch):
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for key, value in batch:
                                if not txn.put(key, value, overwrite=False):
                                    shown = key.decode("utf-8", "replace")
                                    raise DataError(f"{path}: key '{shown}' appears twice")
                        return
                    except lmdb.MapFullError:
                        env.set_mapsize(env.info()["map_size"] * 2)

            batch = []
            for key, value in _datum_items(datums):
                if not 0 < len(key) <= env.max_key_size():
                    raise DataError(f"{path}: record {count}: key of {len(key)} bytes (LMDB "
                                    f"allows 1..{env.max_key_size()})")
                batch.append((key, value))
                count += 1
                if len(batch) == _COMMIT_EVERY:
                    commit(batch)
                    batch = []
            if batch:
                commit(batch)
            env.sync(True)
        except lmdb.Error as e:
            raise DataError(f"{path}: LMDB write failed: {type(e).__name__}: {e}") from None
        finally:
            env.close()
    return count


def write_leveldb(path: str, datums, *, overwrite: bool = False) -> int:
    """Writes Datums to a new Caffe LevelDB at ``path`` (Caffe's options: 64 KiB blocks); returns
    the record count. ``datums`` as for ``write_lmdb``."""
    import plyvel

    path = os.path.abspath(os.fspath(path))
    count = 0
    seen: set[bytes] = set()
    with atomic_dir(path, overwrite=overwrite, replaceable=replaceable) as tmp:
        db = plyvel.DB(tmp, create_if_missing=True, error_if_exists=False, block_size=65536,
                       write_buffer_size=64 << 20, max_open_files=100)
        try:
            wb = db.write_batch()
            pending = 0
            for key, value in _datum_items(datums):
                if not key:
                    raise DataError(f"{path}: record {count}: empty key")
                if key in seen:
                    raise DataError(f"{path}: key '{key.decode('utf-8', 'replace')}' appears twice")
                seen.add(key)
                wb.put(key, value)
                count += 1
                pending += 1
                if pending == _COMMIT_EVERY:
                    wb.write()
                    wb = db.write_batch()
                    pending = 0
            if pending:
                wb.write()
        except plyvel.Error as e:
            raise DataError(f"{path}: LevelDB write failed: {type(e).__name__}: {e}") from None
        finally:
            db.close()
    return count


__all__ = ["Source", "LMDBSource", "LevelDBSource", "open_source", "detect_kind", "db_bounds",
           "prepare_command", "write_lmdb", "write_leveldb", "METADATA_FILE"]
