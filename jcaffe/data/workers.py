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

Order and determinism. :meth:`DecodePool.run` has the workers claim records one at a time
and each decoded record written into its own slot of an array the caller allocated: batch
``i`` holds the same records, bit for bit, whatever the worker count (which worker decodes a
record changes nothing it computes). When records fail, the error raised is the one of the
first failing record in record order, the same message a single worker gives.

Overlap and bounded memory. A reader with several workers decodes the next
``READ_AHEAD_BATCHES`` batches while its caller (the prefetch thread of ``jcaffe.data.feed``)
puts the current one on the device (:class:`ReadAhead`, dropped by ``seek``): their records
wait on the workers' queue behind the current batch's, so no worker idles between batches
(one batch ahead left a worker idle at each batch's end and while the caller took the
batch). Host memory stays at ``prefetch`` finished batches, the one being put on the device
and ``READ_AHEAD_BATCHES`` being decoded; their arrays are reused from batch to batch
(:class:`BatchArrays`) rather than asked of the allocator anew.

The worker count. ``workers=None`` (or 0) is the number of cores this process may run on
(``os.sched_getaffinity``), Caffe's users' machines having many; ``workers=1`` decodes in the
calling thread, without a pool. A net takes it from ``Config.decode_workers``; the command line
sets it with ``--decode_workers N`` (or ``JCAFFE_DECODE_WORKERS``).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from jcaffe.errors import DataError

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
READ_AHEAD_BATCHES = 2  # batches a reader with several workers decodes ahead
# Batch arrays a reader keeps for reuse: data_param's default prefetch (4) waiting, the batches
# read ahead, the one being put on the device and the one its consumer holds.
KEPT_BATCHES = 4 + READ_AHEAD_BATCHES + 2


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


ALIGNMENT = 64  # bytes: what XLA's CPU client needs to use a host array in place


def aligned_empty(shape, dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a ``ALIGNMENT``-byte boundary. ``jax.device_put``
    on a CPU device then uses the array's memory in place instead of copying it (numpy's own
    large arrays start 16 bytes into a page, and a copy of a batch of 256 colour 256x256
    records took 30 ms, against 0.1 ms in place); the device array holds a reference to it
    for as long as it lives."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class BatchArrays:
    """Host arrays for batches, reused once nothing but this keeper refers to them.

    Why: a batch of ImageNet-sized records is tens of MiB, and glibc serves allocations that
    large with fresh pages from the kernel (``mmap``; its threshold grows to 32 MiB at most),
    which are zeroed and faulted in one page at a time on first write: measured at batch 256
    of 256x256 colour records, about 0.2 ms of CPU per record, a third of its JPEG decode.

    Arrays are made by :func:`aligned_empty`, so that a CPU device uses them in place.
    ``empty(shape, dtype)`` returns a kept array of that shape and type that is free (its
    reference count shows no holder outside this object: no batch dict, view, queue entry or
    ``jax.device_put`` in flight, which all hold references), else a new one, kept when fewer
    than ``keep`` are. Free arrays of other shapes are dropped on the way (a reader's batches
    share one shape; a one-off read of another size is not kept alive). Thread-safe."""

    # References to a free array: the keeper's entry, the loop variable and getrefcount's
    # argument; to its memory's owner (views of the array name the owner as their base): the
    # same three and the array's own ``base``.
    _FREE_REFS = 3
    _FREE_OWNER_REFS = 4

    def __init__(self, keep: int):
        self.keep = int(keep)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] = []  # (array, its memory's owner)
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        shape, dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        with self._lock:
            found, kept = None, []
            for entry in self._arrays:
                array, owner = entry
                free = (sys.getrefcount(array) <= self._FREE_REFS
                        and sys.getrefcount(owner) <= self._FREE_OWNER_REFS)
                if array.shape == shape and array.dtype == dtype:
                    if free and found is None:
                        found = array
                    kept.append(entry)
                elif not free:
                    kept.append(entry)
            self._arrays = kept
            if found is None:
                found = aligned_empty(shape, dtype)
                if len(self._arrays) < self.keep:
                    self._arrays.append((found, found.base))
            return found


class DecodePool:
    """Runs per-record work on ``workers`` threads (see the module docstring); ``empty``
    gives the arrays a batch's records are decoded into (:class:`BatchArrays`)."""

    def __init__(self, workers: int | None = None, keep: int = KEPT_BATCHES):
        self.workers = resolve_workers(workers)
        self.empty = BatchArrays(keep).empty

    def run(self, fn: Callable[[int], None], n: int) -> None:
        """Calls ``fn(i)`` for every ``i`` in ``[0, n)``; returns when all are done.

        ``fn`` stores its result itself (into slot ``i`` of the caller's arrays). Each of
        ``min(workers, n)`` tasks claims the next unclaimed ``i`` until none is left, so the
        workers finish a batch together (within one record) whatever each record costs; with
        one worker (or one record) all run in the calling thread, in order. When records
        fail, every record is still tried and the failure of the lowest ``i`` is raised: the
        error one worker, going in order, would have met first."""
        n = int(n)
        if n <= 0:
            return
        if self.workers == 1 or n == 1:
            for i in range(n):
                fn(i)
            return
        claim = itertools.count()  # next() on it is atomic under the GIL
        failures: dict[int, BaseException] = {}

        def task() -> None:
            while True:
                i = next(claim)
                if i >= n:
                    return
                try:
                    fn(i)
                except BaseException as e:  # noqa: BLE001  (re-raised below, unchanged)
                    failures[i] = e

        ex = _shared_executor(self.workers)
        for f in [ex.submit(task) for _ in range(min(self.workers, n))]:
            f.result()
        if failures:
            raise failures[min(failures)]

    def __repr__(self) -> str:
        return f"<DecodePool workers={self.workers}>"


class ReadAhead:
    """The batches after the one handed out, computed ahead on their own threads.

    ``next(position, step, batch_at, ahead)`` returns ``batch_at(position)``: the batch
    computed ahead for that position if there is one (re-raising its exception, so an error
    surfaces for the batch it belongs to), else computed now (after dropping any others).
    With ``ahead`` it then has the ``depth`` following batches, at ``position + k·step``,
    computed in the background, in order: their records queue on the decode workers behind
    the current batch's, so the workers go from one batch to the next without waiting for
    the caller. ``cancel()`` drops them all once they are done; ``close()`` also
    ends the threads, made on first use and kept (``depth`` per reader)."""

    def __init__(self, depth: int = READ_AHEAD_BATCHES):
        self.depth = max(1, int(depth))
        self._futures: dict[int, Future] = {}  # position -> batch, in position order
        self._executor: ThreadPoolExecutor | None = None

    def next(self, position: int, step: int, batch_at: Callable[[int], object],
             ahead: bool = True):
        future = self._futures.pop(position, None)
        if future is None:
            self.cancel()
            out = batch_at(position)
            if ahead:
                self._fill(position, step, batch_at)
            return out
        if ahead:
            self._fill(position, step, batch_at)
        return future.result()  # raises the batch's own error

    def _fill(self, position: int, step: int, batch_at) -> None:
        want = [position + k * step for k in range(1, self.depth + 1)]
        for key in [k for k in self._futures if k not in want]:
            self._drop(self._futures.pop(key))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.depth,
                                                thread_name_prefix="jcaffe-read-ahead")
        for key in want:
            if key not in self._futures:
                self._futures[key] = self._executor.submit(batch_at, key)

    @staticmethod
    def _drop(future: Future) -> None:
        # Waited for, not cancelled: what a reader has read stays the same from run to run.
        try:
            future.result()
        except BaseException:  # noqa: BLE001  (the dropped batch's error is not ours)
            pass

    def cancel(self) -> None:
        futures, self._futures = list(self._futures.values()), {}
        for f in futures:
            self._drop(f)

    def close(self) -> None:
        self.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


__all__ = ["ALIGNMENT", "aligned_empty", "BatchArrays", "DecodePool", "ReadAhead", "available_cores", "resolve_workers",
           "READ_AHEAD_BATCHES", "KEPT_BATCHES"]
