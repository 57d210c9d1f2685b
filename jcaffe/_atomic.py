"""jcaffe's one way of writing files and directories: never a half-written result.

Everything is built under a fresh hidden name beside the target (``.<name>.tmp-<random>``, same
folder, so the final rename stays on one file system), flushed to disk (``fsync`` of the file or
the directory), then renamed over the target; the parent directory is fsynced after the rename
(best effort: not every file system allows it). A failure at any point removes the temporary and
leaves the target exactly as it was. A reader sees either the old content or the new, never a mix.

* :func:`atomic_file`: a context manager yielding the temporary path for a writer that needs a
  file name (HDF5, a download); :func:`atomic_write`: bytes.
* :func:`atomic_dir`: the same for a directory (datasets, LMDB / LevelDB databases).

``OSError`` becomes the caller's error class (``ModelError``, ``ProtoError``, ``DataError``) with
one line naming the target; ``error=None`` lets it through for callers that report it themselves.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from typing import Callable, Iterator

from jcaffe.errors import DataError, JcaffeError


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
    their ``.tmp-`` and ``.del-`` entries; an ``.old-`` one (the whole dataset being replaced,
    when the kill fell between the two renames of a replacement) is put back if ``path``
    itself is missing, else removed. Temporaries of live processes (another writer at work)
    are left alone. Returns what was removed or restored."""
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


def fsync_dir(path: str) -> None:
    """fsyncs a directory's entries (best effort: some file systems refuse)."""
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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, error: type[JcaffeError] | None = JcaffeError,
                make_parents: bool = False) -> Iterator[str]:
    """Yields a new empty temporary file's path; on a clean exit it replaces ``path``.

    The body writes the temporary (any way it likes: ``open``, h5py, a download); it is then
    fsynced and renamed over ``path`` with ``os.replace``. ``make_parents`` creates missing
    folders first (otherwise a missing folder is an error, as for Caffe's writers).
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    tmp = temp_name(path, "tmp")
    try:
        if make_parents:
            os.makedirs(folder, exist_ok=True)
        # O_EXCL: never write into someone else's file; 0o666 lets the umask decide the mode, as
        # for a file created the ordinary way.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and error is not None:
            raise error(f"{path}: cannot write: {e.strerror or e}") from None
        raise
    fsync_dir(folder)


def atomic_write(path: str | os.PathLike, data: bytes, *,
                 error: type[JcaffeError] | None = JcaffeError, make_parents: bool = False) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    with atomic_file(path, error=error, make_parents=make_parents) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool,
               replaceable: Callable[[str], bool] | None = None,
               error: type[JcaffeError] = DataError) -> Iterator[str]:
    """Yields a new empty temporary directory; on a clean exit it becomes ``path``.

    ``path`` may exist only with ``overwrite``, and then only if ``replaceable(path)`` agrees (a
    dataset, not some unrelated folder); it is replaced only after the new one is complete (the
    old one is first renamed aside, and put back if the second rename fails). Leftovers of a
    writer of ``path`` that was killed are cleaned up first (``remove_stale``).
    """
    path = os.path.abspath(path)
    remove_stale(path)
    if os.path.lexists(path):
        if not overwrite:
            raise error(f"{path}: already exists (ask to overwrite it to replace it)")
        if not os.path.isdir(path) or (replaceable is not None and not replaceable(path)):
            raise error(f"{path}: exists and is not a dataset; not replacing it")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = temp_name(path, "tmp")
        os.mkdir(tmp)
    except OSError as e:
        raise error(f"{path}: cannot create a directory in '{parent}': "
                    f"{e.strerror or e}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_dir(tmp)
        if os.path.lexists(path):
            if not overwrite:
                raise error(f"{path}: appeared while it was being written; not replacing it")
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
        fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"{path}: cannot move the finished dataset into place: "
                    f"{e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_file", "atomic_write", "atomic_dir", "temp_name", "fsync_dir", "remove_stale"]
