"""How raw batches reach the jitted train step.

Two ways, both yielding exactly the same batches (the reader's stream, see
``jcaffe.layers.data``):

* ``PrefetchFeeder``: a host thread reads ``prefetch`` batches ahead (``data_param.prefetch``,
  Caffe's default 4) and ``jax.device_put``s them, so the step finds its batch already on the
  device. Works for every data layer (shuffled ones included) and any dataset size.
* ``DeviceResident``: the whole raw dataset is put on the device once; ``batch_at(arrays,
  cursor)`` is a pure function that gathers records ``(cursor + i) % count`` for ``i`` in
  ``[0, batch)``, and ``next_cursor`` advances the cursor the way the reader does, so batches
  can be cut inside a jitted (and ``lax.scan``-ned) train step with no host round trip.
  Unshuffled sources only (a shuffled order is drawn on the host). On N devices whose count
  divides the dataset's, each device holds only the C/N records it will ever read, and each
  process reads only its own devices' records (``DeviceResident``'s split layout).

``choose_feeder`` picks one: device-resident when the dataset is unshuffled and fits
(``fits_on_device``), else prefetching; the ``on_device`` argument (``Config.data_on_device``)
overrides the choice.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.errors import DataError
from jcaffe.parallel import batch_sharded, put_global

_log = log.get_logger("data")

CPU_RESIDENT_LIMIT = 1 << 30  # bytes: below this a CPU "device" always holds the data
GPU_RESIDENT_FRACTION = 0.25  # of the accelerator's memory


def _as_reader(layer_or_reader, seed: int | None):
    if hasattr(layer_or_reader, "next_batch"):
        return layer_or_reader, False
    if hasattr(layer_or_reader, "make_reader"):
        return layer_or_reader.make_reader(seed), True
    raise TypeError(f"expected a data layer or a BatchReader, got {type(layer_or_reader).__name__}")


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stop:
    pass


class PrefetchFeeder:
    """Iterates device-resident batches (``dict[top, jax.Array]``) read ahead by a host thread.

    ``reader``: a ``BatchReader`` (or a data layer: its reader is made with ``seed``);
    ``prefetch``: how many batches may wait on the device (default: the reader's
    ``prefetch``, i.e. ``data_param.prefetch``); ``device``: a ``jax.Device`` or sharding for
    ``jax.device_put`` (default device when None).

    An exception in the thread is raised again, the same object with its message, by the
    ``next()`` that would have returned the failed batch. ``position`` is the stream position
    of the next batch ``next()`` returns (store it to resume; ``seek`` restarts there).
    ``close()`` (or leaving the ``with`` block) stops the thread; a feeder that made its own
    reader closes it too.
    """

    def __init__(self, reader, prefetch: int | None = None, device: Any = None, *,
                 seed: int | None = None, to_device: bool = True):
        self.reader, self._owns_reader = _as_reader(reader, seed)
        # to_device=False yields host numpy batches (assembled into sharded arrays later).
        self.to_device = to_device
        if prefetch is None:
            prefetch = getattr(self.reader, "prefetch", 4)
        self.prefetch = max(1, int(prefetch))
        self.device = device
        self._position = self.reader.position
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start()

    # -- the thread ---------------------------------------------------------------------------
    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop),
                                        name="jcaffe-prefetch", daemon=True)
        self._thread.start()

    def _put(self, q: queue.Queue, stop: threading.Event, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self.reader.next_batch()
                after = self.reader.position
                dev = ({k: jax.device_put(v, self.device) for k, v in batch.items()}
                       if self.to_device else batch)
                if not self._put(q, stop, (dev, after)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(q, stop, _Failure(e))

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None

    # -- consumer -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._closed:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    try:  # it may have queued its last item just before ending
                        item = self._queue.get_nowait()
                        break
                    except queue.Empty:
                        raise DataError("the prefetch thread stopped without a batch") from None
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        batch, after = item
        self._position = after
        return batch

    def next(self) -> dict[str, jax.Array]:
        return self.__next__()

    @property
    def position(self) -> int:
        return self._position

    @property
    def waiting(self) -> int:
        """Batches read ahead and waiting for ``next()`` (at most ``prefetch``)."""
        return self._queue.qsize() if self._thread is not None else 0

    def seek(self, position: int) -> None:
        """Drops the batches read ahead and restarts the stream at ``position``."""
        self._halt()
        self.reader.seek(position)
        self._position = self.reader.position
        if not self._closed:
            self._start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._halt()
        if self._owns_reader:
            self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class DeviceResident:
    """The raw dataset on the device(s), cut into batches by a pure function.

    ``source``: a data layer or a ``BatchReader`` (unshuffled). ``arrays`` is the dict of device
    arrays; ``cursor0`` (c0) the first batch's cursor (the reader's position, which includes
    ``rand_skip``). Inside a jitted step::

        batch = feed.batch_at(arrays, cursor)     # records (cursor + i) % count
        cursor = feed.next_cursor(cursor)         # (cursor + batch) % count

    ``batch_at`` and ``next_cursor`` depend on ``arrays`` / ``cursor`` only (``count`` and
    ``batch_size`` are static). ``cursor_at(k)`` is the cursor of the k-th batch (host ints).
    Iterating the object yields the same batches as a ``PrefetchFeeder`` over the same reader.

    Two layouts. Replicated (one device, or ``device`` a replicated sharding): ``arrays[t]``
    is the whole dataset ``[C, ...]``, record p at row p, on every device.

    Split (``ranks`` N > 1 on a mesh and N divides the count C; ``sharded`` is True): device r
    of N reads, in global batch b (batch B per device), the records
    ``(c0 + r + N·(b·B + i)) mod C``, ``i < B`` (Caffe's rule, ``jcaffe.data.netfeed``). With
    N | C these all lie in one residue class, ``base_r = (c0 + r) mod N``: device r only ever
    needs the S = C/N records ``base_r + N·k``, ``k < S``, and its i-th record of batch b is
    its ``k = (q_r + b·B + i) mod S`` with ``q_r = (c0 + r) // N``. So ``arrays[t]`` is a
    global ``[N, S, ...]`` array split over the mesh's data axis: row ``[r, k]`` is record
    ``base_r + N·k``, held by device r alone. Each process reads only the records of its own
    devices (``local``: their mesh ranks) with ``reader.read_positions`` and fills only their
    pieces. When N does not divide C a device's records change from pass to pass (record
    ``(c0 + r + N·j) mod C`` runs through every residue class), so the dataset stays
    replicated. ``nbytes``: what one device holds.
    """

    def __init__(self, source, device: Any = None, *, seed: int | None = None,
                 ranks: int = 1, local=None):
        reader, owns = _as_reader(source, seed)
        try:
            if getattr(reader, "shuffled", False):
                raise DataError(f"layer '{reader.layer.name}': a shuffled source cannot be "
                                f"device-resident (its order is drawn on the host); use the "
                                f"prefetch feeder")
            self.tops = list(reader.tops)
            self.count = int(reader.count)
            self.batch_size = int(reader.batch_size)
            self.cursor0 = int(reader.cursor)
            self.ranks = int(ranks)
            self.sharded = split_on_device(reader, device, self.ranks)
            if not self.sharded and self.ranks > 1 and self.count % self.ranks:
                _log.info("layer '%s': %d records do not split evenly over %d devices (records "
                          "would move between devices from pass to pass): each device holds "
                          "the whole dataset", reader.layer.name, self.count, self.ranks)
            self.local = [int(r) for r in (local if local is not None else range(self.ranks))]
            if self.sharded:
                host = {r: reader.read_positions(self.records_of(r)) for r in self.local}
                self.nbytes = int(sum(a.nbytes for a in next(iter(host.values())).values()))
            else:
                host = reader.load_all()
                self.nbytes = int(sum(a.nbytes for a in host.values()))
        finally:
            if owns:
                reader.close()
        self.device = device
        if self.sharded:
            self.arrays = {t: self._put_split(host, t, device) for t in self.tops}
        else:
            self.arrays = {t: _put(host[t], device) for t in self.tops}
        self._cursor = self.cursor0
        self._jit_batch_at = jax.jit(self.batch_at)

    # -- the split layout --------------------------------------------------------------------
    @property
    def share(self) -> int:
        """Records on each device: C/N when split, else C."""
        return self.count // self.ranks if self.sharded else self.count

    def records_of(self, rank: int) -> np.ndarray:
        """The records device ``rank`` holds when split, row k first: ``base_r + N·k``,
        ``base_r = (c0 + rank) mod N``, ``k < C/N``."""
        n = self.ranks
        return np.arange((self.cursor0 + int(rank)) % n, self.count, n, dtype=np.int64)

    def _put_split(self, host: dict, top: str, sharding) -> jax.Array:
        first = host[self.local[0]][top]
        shape = (self.ranks,) + first.shape

        def piece(index):
            r = index[0].start or 0
            return host[r][top][None]

        return jax.make_array_from_callback(shape, batch_sharded(sharding.mesh, 0), piece)

    def rank_view(self, arrays: dict[str, jax.Array], rank: int) -> dict[str, jax.Array]:
        """What device ``rank`` holds of ``arrays`` (one of this process's devices), without
        copying: its ``[1, S, ...]`` piece when split, else one (replicated) copy; ``batch_at``
        cuts device ``rank``'s records from it."""
        out = {}
        for t, a in arrays.items():
            if self.sharded:
                a = next(s.data for s in a.addressable_shards if (s.index[0].start or 0) == rank)
            elif isinstance(a, jax.Array) and len(a.sharding.device_set) > 1:
                a = a.addressable_shards[0].data
            out[t] = a
        return out

    # -- cutting batches -----------------------------------------------------------------------
    def batch_at(self, arrays: dict[str, jax.Array], cursor, stride: int = 1
                 ) -> dict[str, jax.Array]:
        """Records ``p_i = (cursor + stride·i) % count``, ``i < batch_size``: pure and jittable.
        ``stride`` N with ``cursor`` advanced by r gives device r of N its records, Caffe's
        offset ≡ r (mod N).

        Split layout: record p is row ``[(p - c0) mod N, p // N]`` of the global ``[N, S, ...]``
        arrays. Inside ``shard_map`` a device holds its ``[1, S, ...]`` piece only, and its
        records (``stride`` N, cursor ≡ ``base_r``) are all in it: row ``[0, p // N]``, i.e.
        ``k = (cursor // N + i) mod S``."""
        cursor = jnp.asarray(cursor, jnp.int32)
        steps = jnp.arange(self.batch_size, dtype=jnp.int32) * jnp.int32(stride)
        idx = jnp.remainder(cursor + jnp.remainder(steps, jnp.int32(self.count)),
                            jnp.int32(self.count))
        if not self.sharded:
            return {t: jnp.take(arrays[t], idx, axis=0) for t in self.tops}
        n = jnp.int32(self.ranks)
        k = idx // n
        out = {}
        for t in self.tops:
            a = arrays[t]
            if a.shape[0] == 1:  # one device's piece
                out[t] = jnp.take(a[0], k, axis=0)
            else:
                block = jnp.remainder(idx - jnp.int32(self.cursor0 % self.ranks), n)
                out[t] = a[block, k]
        return out

    def next_cursor(self, cursor):
        """The cursor after one batch: ``(cursor + batch_size) % count`` (jittable)."""
        cursor = jnp.asarray(cursor, jnp.int32)
        return jnp.remainder(cursor + jnp.int32(self.batch_size), jnp.int32(self.count))

    def cursor_at(self, k: int) -> int:
        """Cursor of the k-th batch from the start (host side, for resuming)."""
        return (self.cursor0 + int(k) * self.batch_size) % self.count

    @staticmethod
    def cursor_of(position: int, count: int) -> int:
        """A reader's stream position as a device cursor."""
        return int(position) % int(count)

    # -- iteration (host-driven use and tests) -----------------------------------------------
    @property
    def cursor(self) -> int:
        return self._cursor

    def seek(self, position: int) -> None:
        self._cursor = self.cursor_of(position, self.count)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self._jit_batch_at(self.arrays, np.int32(self._cursor))
        self._cursor = (self._cursor + self.batch_size) % self.count
        return batch

    def close(self) -> None:
        self.arrays = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def split_on_device(reader, device: Any, ranks: int) -> bool:
    """Whether a device-resident copy of ``reader``'s records is split over ``ranks`` devices
    (``DeviceResident``'s split layout): N > 1 devices of a mesh, N dividing the record count,
    and a reader that reads a list of records (``read_positions``)."""
    count = int(reader.count)
    return (ranks > 1 and getattr(device, "mesh", None) is not None and count > 0
            and count % ranks == 0 and hasattr(reader, "read_positions"))


def _put(x: np.ndarray, device: Any) -> jax.Array:
    if isinstance(device, jax.sharding.Sharding):
        # Also for a mesh spanning processes: each fills its own devices from its copy.
        return put_global(x, device)
    return jax.device_put(x, device)


def _device_of(device: Any):
    if device is None:
        return jax.devices()[0]
    if hasattr(device, "platform"):
        return device
    devs = getattr(device, "device_set", None)  # a sharding
    if devs:
        return next(iter(devs))
    return jax.devices()[0]


def fits_on_device(nbytes: int, device: Any = None) -> bool:
    """Whether a raw dataset of ``nbytes`` should live on the device: on CPU when below 1 GiB;
    on an accelerator when below 25% of its memory (False when the memory is unknown)."""
    dev = _device_of(device)
    if dev.platform == "cpu":
        return nbytes < CPU_RESIDENT_LIMIT
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    if not limit:
        return False
    return nbytes < GPU_RESIDENT_FRACTION * float(limit)


def choose_feeder(source, *, on_device: bool | None = None, device: Any = None,
                  prefetch: int | None = None, seed: int | None = None,
                  to_device: bool = True, wrap=None, ranks: int = 1, local=None):
    """A ``DeviceResident`` or a ``PrefetchFeeder`` for a data layer (or reader).

    ``on_device``: True / False forces the choice; None decides automatically:
    device-resident when the source is unshuffled and ``fits_on_device`` (what one device
    holds: C/N records when the copy is split over ``ranks`` devices). Forcing a shuffled
    source onto the device is an error. ``device`` may be a sharding (replicated on a mesh);
    ``ranks`` > 1 on a mesh splits a device-resident copy over the devices when it can
    (``DeviceResident``; ``local``: this process's mesh ranks). ``to_device=False``: a
    prefetching feeder yields host arrays. ``wrap``: applied to the reader of a prefetching
    feeder (one process's share: ``readers.ShardReader``).
    """
    reader, owns = _as_reader(source, seed)
    try:
        choice = on_device
        shuffled = bool(getattr(reader, "shuffled", False))
        split = not shuffled and split_on_device(reader, device, ranks)
        share = reader.nbytes // ranks if split else reader.nbytes
        if choice is None:
            choice = (not shuffled) and fits_on_device(share, device)
        name = getattr(getattr(reader, "layer", None), "name", "?")
        if choice:
            if split:
                _log.info("layer '%s': dataset split over %d devices, 1/%d on each (%.1f MB "
                          "per device)", name, ranks, ranks, share / 1e6)
            else:
                _log.info("layer '%s': whole dataset on the device (%.1f MB)", name,
                          reader.nbytes / 1e6)
            return DeviceResident(reader, device, ranks=ranks, local=local)
        _log.info("layer '%s': prefetching %s batches from the host", name,
                  prefetch if prefetch is not None else getattr(reader, "prefetch", 4))
        feeder = PrefetchFeeder(reader if wrap is None else wrap(reader), prefetch, device,
                                to_device=to_device)
        feeder._owns_reader = owns
        owns = False
        return feeder
    finally:
        if owns:
            reader.close()


__all__ = ["PrefetchFeeder", "DeviceResident", "fits_on_device", "choose_feeder",
           "split_on_device"]
