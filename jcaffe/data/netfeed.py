"""Raw batches for all data layers of one net, addressed by batch index, on one or N devices.

Batch ``b`` of a data layer with ``batch_size`` B, trained on N devices, is the N·B records of
the layer's stream from position ``start + b·N·B`` (``start`` includes ``rand_skip``): exactly
the batch a single device with batch N·B would read. Device r of N gets the records whose
offset is r modulo N (Caffe's ``DataLayer`` with ``solver_count`` N and ``solver_rank`` r).
Both placements give identical batches:

* device-resident: the raw dataset is put on the devices once and ``batch_at`` cuts a
  device's records inside the jitted (and scanned) step. Device r's i-th record of batch b is
  record ``(c0 + r + N·(b·B + i)) mod C`` (c0: the start cursor, C: the record count): when
  N divides C that is always one of the C/N records ``≡ c0 + r (mod N)``, so each device
  holds only those (``jcaffe.data.feed.DeviceResident``'s split layout) and each process
  reads only its own devices' records; otherwise every device holds the whole dataset;
* host-fed: prefetching readers deliver the N reader batches of a global batch; ``chunk``
  stacks the global batches of ``n`` iterations (each split over the devices, device r's
  records in block r) for one scanned dispatch.

In a run over several processes each process reads only its own devices' records
(``jcaffe.data.readers.ShardReader``): the host-fed path reads ``len(L)·B`` of the N·B records
of a global batch (L: the mesh ranks of the process's devices), and ``chunk`` returns global
arrays whose pieces on this process's devices come from those records.

A resumed run finds its place from the iteration alone: iteration ``i`` reads batches
``i·iter_size + s`` (``batch_index``), and batch ``b`` starts at stream position
``start + b·N·B`` (``batch_position``) on both placements: the cursor arithmetic lives here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import parallel
from jcaffe.errors import DataError


def batch_index(it, s: int, iter_size: int):
    """The batch of iteration ``it``'s sub-batch ``s``: ``it·iter_size + s`` (Caffe's data
    layers advance once per forward pass; host or traced ints)."""
    return it * iter_size + s


def batch_position(start: int, b, per_batch: int, rank=0, count: int | None = None):
    """Stream position of batch ``b``'s first record (device ``rank``'s: ``+ rank``):
    ``start + b·per_batch + rank``; with ``count``, as an int32 cursor modulo ``count``
    (traced ``b``, no overflow of the sum)."""
    if count is None:
        return start + b * per_batch + rank
    c = jnp.int32(count)
    step = jnp.int32(per_batch % count)
    return jnp.remainder(jnp.int32(start % count) + jnp.remainder(
        jnp.asarray(b, jnp.int32) * step, c) + jnp.asarray(rank, jnp.int32), c)


class NetFeed:
    """The data layers of ``net`` feeding ``ranks`` devices.

    ``placement``: a ``jax.Device`` (one device) or a replicated sharding over a mesh;
    ``on_device``: True / False / None (decide by size, ``Config.data_on_device``);
    ``seeds``: one int per data layer (shuffled readers draw their order from it).
    ``local``: the mesh ranks whose records this process reads (default: those of its own
    devices); fewer than ``ranks`` makes the host-fed path read only those. ``own``: the
    mesh ranks of this process's devices (a device-resident copy split over the devices
    holds theirs); ``own[0]``'s batch is the one ``Solver.batch`` returns."""

    def __init__(self, net, placement: Any, on_device: bool | None, seeds, *, ranks: int = 1,
                 local=None):
        from jcaffe.data import feed as feed_mod
        from jcaffe.data.readers import ShardReader

        self.ranks = int(ranks)
        self._placement = placement
        self.own = list(range(self.ranks)) if self.ranks == 1 else local_ranks(placement)
        host_only = self.ranks > 1  # global batches are assembled on the host, then split
        self.local = list(range(self.ranks)) if local is None and self.ranks == 1 else \
            [int(r) for r in (local if local is not None else local_ranks(placement))]
        # Python data layers make whole batches in their own order: no share can be read
        # alone, so a net with one reads every record (and keeps its devices' share).
        python = any(layer.type == "Python" for layer in net.data_layers)
        self.sharded = len(self.local) < self.ranks and not python
        if not self.sharded:
            self.local = list(range(self.ranks))
        # Host-side batches hold this many device blocks (all N, or this process's).
        self.host_blocks = len(self.local)
        # On several devices a reader reads the global batch's device blocks straight into
        # one array, in block order (ShardReader), rather than N batches interleaved after.
        self.blocked = self.ranks > 1 and not python
        shard = (lambda reader: ShardReader(reader, self.ranks, self.local)) \
            if self.blocked else None

        def make(choice):
            return [feed_mod.choose_feeder(layer, on_device=choice, device=placement,
                                           seed=int(seed), to_device=not host_only,
                                           wrap=shard, ranks=self.ranks, local=self.own)
                    for layer, seed in zip(net.data_layers, seeds)]

        self.feeders = make(on_device)
        self.on_device = all(isinstance(f, feed_mod.DeviceResident) for f in self.feeders)
        if not self.on_device and any(isinstance(f, feed_mod.DeviceResident)
                                      for f in self.feeders):
            # Mixed placement: keep one path (the host one) so batches stay aligned.
            for f in self.feeders:
                f.close()
            self.feeders = make(False)
        self.arrays = [f.arrays for f in self.feeders] if self.on_device else None
        self._start = [f.cursor0 if self.on_device else f.position for f in self.feeders]
        self._mesh = getattr(placement, "mesh", None)
        self._next = [0] * len(self.feeders)
        self._label_rules = label_rules(net)
        self.layers = list(net.data_layers)
        if self.on_device:
            # The labels this process holds: every record, or its devices' shares.
            for f, layer, arrays in zip(self.feeders, net.data_layers, self.arrays):
                for top in f.tops:
                    if top not in self._label_rules:
                        continue
                    for r in (self.own if f.sharded else [self.own[0]]):
                        held = np.asarray(jax.device_get(f.rank_view({top: arrays[top]}, r)[top]))
                        check_labels(held, 0, self._label_rules[top], layer,
                                     positions=f.records_of(r) if f.sharded else None)

    # -- device-resident ---------------------------------------------------------------------
    def batch_at(self, arrays, batch_index, rank=0):
        """Device ``rank``'s records of batch ``batch_index`` (traced ints), sliced from the
        device-resident ``arrays`` (the global arrays, or, inside ``shard_map``, what device
        ``rank`` holds: ``array_specs``)."""
        out = {}
        n = self.ranks
        for f, a, start in zip(self.feeders, arrays, self._start):
            cursor = batch_position(start, batch_index, n * f.batch_size, rank, f.count)
            out.update(f.batch_at(a, cursor, stride=n))
        return out

    def array_specs(self):
        """``shard_map`` in_specs of ``arrays``: a split layer's arrays split over the data
        axis (device r gets its ``[1, S, ...]`` piece), the others replicated."""
        P = jax.sharding.PartitionSpec
        return [P(parallel.DATA_AXIS) if f.sharded else P() for f in self.feeders]

    def root_arrays(self):
        """What device ``own[0]`` (this process's first; the root device on process 0) holds
        of ``arrays``: ``batch_at(root_arrays(), b, own[0])`` is its batch b."""
        return [f.rank_view(a, self.own[0]) for f, a in zip(self.feeders, self.arrays)]

    # -- host-fed ------------------------------------------------------------------------------
    def _read(self, i: int, position: int):
        f = self.feeders[i]
        if position != self._next[i]:
            f.seek(position)
        batch = next(f)
        self._next[i] = position + f.reader.batch_size
        return batch

    def host_batch(self, batch_index: int) -> dict:
        """The global batch ``batch_index``: N·B records per layer (device r's in block r);
        when sharded, this process's blocks only (device ``local[i]``'s in block i)."""
        if self.blocked:
            return self._local_batch(batch_index)
        out = {}
        for i, (f, start) in enumerate(zip(self.feeders, self._start)):
            b = f.reader.batch_size
            first = batch_position(start, batch_index, self.ranks * b)
            parts = [self._read(i, first + m * b) for m in range(self.ranks)]
            for top in parts[0]:
                if self.ranks == 1:
                    x = parts[0][top]
                else:
                    x = np.concatenate([np.asarray(p[top]) for p in parts])
                if top in self._label_rules:
                    check_labels(np.asarray(x), first, self._label_rules[top], f.reader.layer,
                                 count=f.reader.count)
                if self.ranks > 1:
                    # Stream order -> device blocks: device r takes records r, r+N, r+2N...
                    x = x.reshape((b, self.ranks) + x.shape[1:]).swapaxes(0, 1)
                    x = x.reshape((self.ranks * b,) + x.shape[2:])
                out[top] = x
        return out

    def _local_batch(self, batch_index: int) -> dict:
        out = {}
        for i, (f, start) in enumerate(zip(self.feeders, self._start)):
            # The global batch's start (f.reader, a ShardReader, counts all N·B records).
            first = batch_position(start, batch_index, f.reader.batch_size)
            part = self._read(i, first)
            for top, x in part.items():
                if top in self._label_rules:
                    check_labels(np.asarray(x), first, self._label_rules[top], f.reader.layer,
                                 count=f.reader.count, positions=f.reader.positions(first))
                out[top] = x
        return out

    def chunk(self, it: int, n: int, iter_size: int):
        """The batches of ``n`` iterations from iteration ``it``: arrays
        ``[n, (iter_size,) N·B, ...]``, host arrays when N > 1 (the caller splits them);
        when sharded, global arrays split over the mesh, each process filling its devices'
        pieces from the records it read."""
        its = []
        for j in range(n):
            subs = [self.host_batch(batch_index(it + j, s, iter_size)) for s in range(iter_size)]
            its.append(subs[0] if iter_size == 1 else _stack(subs))
        out = _stack(its)
        if self.sharded:
            axis = 2 if iter_size > 1 else 1
            out = {k: self._global(v, axis) for k, v in out.items()}
        return out

    def _global(self, x: np.ndarray, axis: int) -> jax.Array:
        """This process's device blocks ``x`` (along ``axis``) as the global array of all N
        devices' blocks, split over the mesh's data axis."""
        b = x.shape[axis] // len(self.local)
        shape = x.shape[:axis] + (self.ranks * b,) + x.shape[axis + 1:]
        block = {r: i for i, r in enumerate(self.local)}

        def piece(index):
            start = index[axis].start or 0
            i = block[start // b]
            index = list(index)
            index[axis] = slice(i * b, (i + 1) * b)
            return x[tuple(index)]

        return jax.make_array_from_callback(shape, parallel.batch_sharded(self._mesh, axis),
                                            piece)

    def close(self):
        for f in self.feeders:
            f.close()


def _stack(batches: list[dict]) -> dict:
    first = batches[0]
    if all(isinstance(v, np.ndarray) for v in first.values()):
        if len(batches) == 1:  # a view: the reader's array goes on to the devices uncopied
            return {k: v[None] for k, v in first.items()}
        return {k: np.stack([b[k] for b in batches]) for k in first}
    return {k: jnp.stack([b[k] for b in batches]) for k in first}


_LABEL_LAYERS = ("SoftmaxWithLoss", "Accuracy", "MultinomialLogisticLoss", "InfogainLoss",
                 "HingeLoss")


def label_rules(net) -> dict[str, tuple[str, int, int | None]]:
    """Data tops used directly as class labels: top → (layer, number of classes, ignore)."""
    fed = {t for l in net.data_layers for t, _, _ in l.input_specs()}
    rules = {}
    for layer in net.layers:
        if layer.type in _LABEL_LAYERS and len(layer.bottom_names) > 1 \
                and layer.bottom_names[1] in fed and hasattr(layer, "num_labels"):
            ignore = layer.ignore_label if getattr(layer, "has_ignore_label", False) else None
            top = layer.bottom_names[1]
            prev = rules.get(top)
            classes = layer.num_labels if prev is None else min(prev[1], layer.num_labels)
            rules[top] = (layer.name, classes, ignore)
    return rules


def local_ranks(placement: Any) -> list[int]:
    """The mesh ranks of this process's devices (all of them for a single device)."""
    mesh = getattr(placement, "mesh", None)
    if mesh is None:
        return [0]
    me = jax.process_index()
    return [r for r, d in enumerate(mesh.devices.flat) if d.process_index == me]


def check_labels(labels: np.ndarray, first_position: int, rule, data_layer, count=None,
                 positions=None) -> None:
    """A label outside [0, classes) would silently index out of range inside the program
    (Caffe aborts there): fail on the host, naming the dataset record. ``positions``: the
    stream positions of ``labels`` when they are not consecutive from ``first_position``."""
    name, classes, ignore = rule
    lab = labels.reshape(-1).astype(np.int64)
    bad = (lab < 0) | (lab >= classes)
    if ignore is not None:
        bad &= lab != ignore
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        record = first_position + j if positions is None else int(positions[j])
        if count:
            record %= count
        source = data_layer.param.data_param.source or data_layer.name
        raise DataError(f"{source}: record {record}: label {int(lab[j])} is out of range for "
                        f"layer '{name}', which has {classes} classes (0..{classes - 1})")


def _int_seed(key: jax.Array) -> int:
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def solver_feeds(net, test_nets, data_key: jax.Array, on_device: bool | None, *, mesh,
                 root_device, ranks: int) -> dict:
    """A solver's batches: ``{"train": NetFeed, i: NetFeed of test net i}``. Data layer
    ``l`` of net ``k`` (0: train, i+1: test net i) shuffles with seed
    ``fold_in(data_key, 1000·k + l)``. The train net feeds every device of ``mesh``; test
    nets run on the root device only (Caffe's root solver tests)."""
    def seeds(n, k):
        return [_int_seed(jax.random.fold_in(data_key, 1000 * k + i))
                for i in range(len(n.data_layers))]

    placement = parallel.replicated(mesh) if mesh is not None else root_device
    feeds = {"train": NetFeed(net, placement, on_device, seeds(net, 0), ranks=ranks)}
    for i, tn in enumerate(test_nets):
        feeds[i] = NetFeed(tn, root_device, on_device, seeds(tn, i + 1))
    return feeds
