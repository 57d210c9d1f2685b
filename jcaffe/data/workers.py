"""Parallel decoding on the host: worker threads behind every host-fed data layer.

Why threads. What costs time on the host is decoding (``jcaffe.data.image``): JPEGs in
OpenCV's ``cv2.imdecode``, which releases the GIL for the whole call; other formats in Pillow,
which releases it around the decoder call itself (``ImagingSectionEnter`` in its ``decode.c``
wraps ``decoder->decode`` for every decoder that does not pull from a file, PNG included) but
keeps it while parsing headers and packing pixels; OpenCV-style resizes and window warps in
numpy, which releases it inside its array loops. So W threads decode about W images at a time;
what stays under the GIL (parsing the Datum protobuf, a few Python calls per record) is a small
part of each record (``benchmarks/input_pipeline.py`` measures the decoder's single-core rate
and the rate against the worker count in the same run). Threads share the reader's open
database and its file handles, need no copies between processes and no shared memory, and
keep decode errors as ordinary exceptions that name their record.

Order and determinism. :meth:`DecodePool.run` splits ``n`` records into contiguous pieces,
decodes each piece in record order on some worker, and writes every record into its own slot
of an array the caller allocated: batch ``i`` holds the same records, bit for bit, whatever the
worker count (which worker decodes a record changes nothing it computes). When records fail,
the error raised is the one of the first failing record in record order, the same message a
single worker gives.

Overlap and bounded memory. A reader with several workers decodes the next batch while its
caller (the prefetch thread of ``jcaffe.data.feed``) puts the current one on the device
(:class:`ReadAhead`: one batch, on its own thread, started when a batch is handed out, and
dropped by ``seek``). Work is submitted one batch at a time; the pool holds no queue of its
own beyond that batch's pieces, so host memory stays at ``prefetch`` finished batches, the one
being put on the device and the one being decoded.

The worker count. ``workers=None`` (or 0) is the number of cores this process may run on
(``os.sched_getaffinity``), Caffe's users' machines having many; ``workers=1`` decodes in the
calling thread, without a pool. A net takes it from ``Config.decode_workers``; the command line
sets it with ``--decode_workers N`` (or ``JCAFFE_DECODE_WORKERS``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from jcaffe.errors import DataError

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
PIECES_PER_WORKER = 4  # pieces per worker and batch: balance against per-task overhead


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None) -> int:
    """The worker count to use: ``None`` or 0 means :func:`available_cores`."""
    if workers is None or int(workers) == 0:
        return available_cores()
    workers = int(workers)
    if workers < 0:
        raise DataError(f"decode workers must be >= 0 (0: one per core), got {workers}")
    return workers


def _shared_executor(workers: int) -> ThreadPoolExecutor:
    # One executor per worker count and process, shared by every reader that asks for it (a
    # train net and its test nets do not multiply the threads).
    with _POOLS_LOCK:
        ex = _POOLS.get(workers)
        if ex is None:
            ex = _POOLS[workers] = ThreadPoolExecutor(workers,
                                                      thread_name_prefix="jcaffe-decode")
        return ex


class DecodePool:
    """Runs per-record work on ``workers`` threads (see the module docstring)."""

    def __init__(self, workers: int | None = None):
        self.workers = resolve_workers(workers)

    def run(self, fn: Callable[[int], None], n: int) -> None:
        """Calls ``fn(i)`` for every ``i`` in ``[0, n)``; returns when all are done.

        ``fn`` stores its result itself (into slot ``i`` of the caller's arrays). Pieces of
        consecutive ``i`` run in order on one worker; with one worker (or one record) all run
        in the calling thread. The first failure in ``i`` order is raised."""
        n = int(n)
        if n <= 0:
            return
        if self.workers == 1 or n == 1:
            for i in range(n):
                fn(i)
            return
        pieces = min(n, self.workers * PIECES_PER_WORKER)
        bounds = [n * k // pieces for k in range(pieces + 1)]

        def piece(k: int) -> None:
            for i in range(bounds[k], bounds[k + 1]):
                fn(i)

        ex = _shared_executor(self.workers)
        futures = [ex.submit(piece, k) for k in range(pieces)]
        first: BaseException | None = None
        for f in futures:  # in piece order: the first failing piece holds the first failure
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001  (re-raised below, unchanged)
                if first is None:
                    first = e
        if first is not None:
            raise first

    def __repr__(self) -> str:
        return f"<DecodePool workers={self.workers}>"


class ReadAhead:
    """One value computed ahead on its own thread, handed out if asked for under its key.

    ``start(key, fn)`` runs ``fn()`` in the background (after dropping any earlier one);
    ``take(key, fn)`` returns that value when ``key`` matches (re-raising its exception, so
    an error surfaces for the batch it belongs to), else drops it and returns ``fn()``.
    ``cancel()`` waits for a running one and drops it; ``close()`` also ends the thread. The
    thread is made on first use and kept (one per reader), not made per batch."""

    def __init__(self):
        self._key = None
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self, key, fn: Callable[[], object]) -> None:
        self.cancel()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="jcaffe-read-ahead")
        self._key, self._future = key, self._executor.submit(fn)

    def take(self, key, fn: Callable[[], object]):
        if self._future is not None and self._key == key:
            future = self._future
            self._future, self._key = None, None
            return future.result()  # raises the batch's own error
        self.cancel()
        return fn()

    def cancel(self) -> None:
        if self._future is not None:
            try:
                self._future.result()
            except BaseException:  # noqa: BLE001  (the dropped batch's error is not ours)
                pass
        self._future, self._key = None, None

    def close(self) -> None:
        self.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


__all__ = ["DecodePool", "ReadAhead", "available_cores", "resolve_workers", "PIECES_PER_WORKER"]
