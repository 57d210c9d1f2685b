"""The common ground of jcaffe's record sources: the ``Source`` interface, the on-disk kinds.

``jcaffe.data.sources`` (Caffe's LMDB / LevelDB and ``open_source``) and ``jcaffe.data.dataset``
(jcaffe's own format) both build on this module, so neither needs the other's internals:
``sources`` opens datasets through ``dataset``, and ``dataset`` depends only on this module.
"""

from __future__ import annotations

import glob
import os
import threading

import numpy as np

METADATA_FILE = "jcaffe_dataset.json"


class Source:
    """A read-only sequence of (image, label) records (see ``jcaffe.data.sources``)."""

    path: str
    kind: str
    count: int
    datum_shape: tuple[int, int, int]
    dtype: np.dtype

    def __init__(self, path: str, kind: str):
        self.path = path
        self.kind = kind
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.kind} '{self.path}' count={self.count} "
                f"shape={self.datum_shape} dtype={np.dtype(self.dtype).name}>")

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_range(self, start: int, n: int) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: source is closed")
        if n < 0 or start < 0 or start + n > self.count:
            raise IndexError(f"{self.path}: records [{start}, {start + n}) outside "
                             f"[0, {self.count})")

    def read(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Records ``[start, start + n)``: ``(data [n, C, H, W] of dtype, labels [n] int32)``."""
        start, n = int(start), int(n)
        self._check_range(start, n)
        with self._lock:
            return self._read(start, n)

    def read_records(self, records, pool=None) -> tuple[np.ndarray, np.ndarray]:
        """Records ``records`` (any indices, in the order given), as ``read`` gives them.

        This default reads each run of consecutive records with ``read`` (``pool`` unused);
        sources that decode override it to decode on ``pool``'s workers."""
        records = np.asarray(records, dtype=np.int64).reshape(-1)
        if len(records) == 0:
            return (np.empty((0, *self.datum_shape), self.dtype), np.empty((0,), np.int32))
        parts = []
        i, n = 0, len(records)
        while i < n:
            j = i + 1
            while j < n and records[j] == records[j - 1] + 1:
                j += 1
            parts.append(self.read(int(records[i]), j - i))
            i = j
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All records, in order."""
        return self.read(0, self.count)

    def close(self) -> None:
        self._closed = True

    def _read(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def detect_kind(path: str) -> str | None:
    """"tensorstore", "lmdb" or "leveldb" from what ``path`` holds; None when none fits."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, METADATA_FILE)):
            return "tensorstore"
        if os.path.isfile(os.path.join(path, "data.mdb")):
            return "lmdb"
        if os.path.isfile(os.path.join(path, "CURRENT")) and any(
                glob.glob(os.path.join(path, pattern))
                for pattern in ("MANIFEST-*", "*.ldb", "*.log")):
            return "leveldb"
        return None
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                head = f.read(32)
        except OSError:
            return None
        # An LMDB file starts with a meta page whose magic 0xBEEFC0DE sits at offset 16.
        if len(head) >= 20 and head[16:20] == (0xBEEFC0DE).to_bytes(4, "little"):
            return "lmdb"
    return None


def replaceable(path: str) -> bool:
    """Whether an existing ``path`` is a dataset (or an empty folder) that may be overwritten."""
    return os.path.isdir(path) and (detect_kind(path) is not None or not os.listdir(path))


__all__ = ["Source", "METADATA_FILE", "detect_kind", "replaceable"]
