"""Atomic creation of dataset directories and files: build under a temporary name beside the
target, then rename into place. A failure leaves the target as it was and removes the temporary."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from typing import Callable, Iterator

from jcaffe.errors import DataError


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str, tag: str = "tmp") -> str:
    """A fresh hidden name beside ``path``: ``.<name>.<tag>-<pid>-<random>`` (the writer's
    process id lets a later writer recognise the leftovers of a killed one)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def remove_stale(path: str) -> list[str]:
    """Removes what writers of ``path`` killed outright (``kill -9``, power loss) left beside it:
    their ``.tmp-`` and ``.del-`` directories; an ``.old-`` one (the whole dataset being
    replaced, when the kill fell between the two renames of a replacement) is put back if
    ``path`` itself is missing, else removed.
    Temporaries of live processes (another writer at work) are left alone. Returns what was
    removed or restored."""
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\." + re.escape(name) + r"\.(tmp|old|del)-(\d+)-[0-9a-f]{12}")
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return []
    done = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        full = os.path.join(parent, entry)
        if m.group(1) == "old" and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(full, path)
                done.append(full)
                continue
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)
        done.append(full)
    return done


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool,
               replaceable: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yields a new empty temporary directory; on a clean exit it becomes ``path``.

    Leftovers of a writer of ``path`` that was killed are cleaned up first (``remove_stale``).

    ``path`` may exist only with ``overwrite``, and then only if ``replaceable(path)`` agrees (a
    dataset, not some unrelated folder); it is replaced only after the new one is complete.
    """
    path = os.path.abspath(path)
    remove_stale(path)
    if os.path.lexists(path):
        if not overwrite:
            raise DataError(f"{path}: already exists (ask to overwrite it to replace it)")
        if not os.path.isdir(path) or (replaceable is not None and not replaceable(path)):
            raise DataError(f"{path}: exists and is not a dataset; not replacing it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = temp_name(path, "tmp")
        os.mkdir(tmp)
    except OSError as e:
        raise DataError(f"{path}: cannot create a directory in '{parent}': "
                        f"{e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _fsync_dir(tmp)
        if os.path.lexists(path):
            if not overwrite:
                raise DataError(f"{path}: appeared while it was being written; not replacing it")
            old = temp_name(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            # Renamed before the (slow, interruptible) removal: an ".old-" name always holds a
            # whole dataset, which remove_stale may put back; a ".del-" one is only removed.
            gone = temp_name(path, "del")
            os.rename(old, gone)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{path}: cannot move the finished dataset into place: "
                        f"{e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes a file through a temporary beside it, fsynced and renamed over ``path``."""
    path = os.path.abspath(path)
    tmp = temp_name(path, "tmp")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
