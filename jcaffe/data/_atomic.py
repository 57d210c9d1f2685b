"""The data modules' names for ``jcaffe._atomic`` (jcaffe's one atomic writer): dataset and
database directories (``atomic_dir``) and files (``atomic_write_bytes``: DataError on failure,
missing folders created)."""

from __future__ import annotations

from jcaffe._atomic import atomic_dir, atomic_write, remove_stale, temp_name
from jcaffe.errors import DataError


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes a file atomically (``jcaffe._atomic.atomic_write``), creating missing folders."""
    atomic_write(path, data, error=DataError, make_parents=True)


__all__ = ["atomic_dir", "atomic_write_bytes", "remove_stale", "temp_name"]
