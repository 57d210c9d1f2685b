"""How the pure step runs on one or N devices: the compiled train chunks and test passes.

Built once a solver's batches exist (``jcaffe.data.netfeed.NetFeed``, one per net):

* a train chunk runs ``n`` iterations from the state's iteration in one dispatch. With
  ``iters_per_call > 1`` it is one ``lax.fori_loop`` whose trip count ``n`` is an argument: a
  device-resident dataset compiles one program for every chunk length (its batches are sliced
  inside the loop), host-fed batches one per stacked length; the loop body compiles the same
  whatever ``n`` is, so any split of a run into chunks (``Solver.step(k)`` in a loop, resume)
  gives bit-identical weights. With ``iters_per_call == 1`` (nets whose layers must not run
  inside a loop, ``Net.scan_ok``) a chunk is the step alone.
* on N devices the same programs run under ``shard_map`` over a one-axis mesh
  (``jcaffe.parallel``): state replicated, host batches split over the devices, a
  device-resident dataset replicated or split (``NetFeed.array_specs``).
* a test pass sums test net ``i``'s outputs and loss over ``test_iter`` batches (a
  ``lax.scan`` over device-resident batches, else one dispatch per batch), on the root device;
  the outputs of DetectionEvaluate layers are kept batch by batch instead (the SSD fork's
  ``TestDetection`` scores their rows together).

Every program is one ``jax.jit``; ``call`` logs when (and how long) one had to compile.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from jcaffe import log, parallel
from jcaffe.data.netfeed import batch_index

_log = log.get_logger("solver")


def share_params(train_params, own_params, mapping):
    """Caffe's ShareTrainedLayersWith: test layers take the train blobs of the same name
    (``mapping``: test params key -> train params key, ``Net.shared_layer_keys``)."""
    return {k: train_params[mapping[k]] if k in mapping else blobs
            for k, blobs in own_params.items()}


def detection_eval_outputs(net) -> frozenset[str]:
    """The net outputs a DetectionEvaluate layer makes: a test pass keeps each batch's rows."""
    return frozenset(t for layer in net.layers if layer.type == "DetectionEvaluate"
                     for t in layer.top_names if t in net.output_names)


def _stack(subs):
    return subs[0] if len(subs) == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *subs)


class Programs:
    """The compiled programs of one solver.

    ``step``: the pure step (``make_train_step``); ``feeds``: ``{"train": NetFeed, i:
    NetFeed}``; ``test_nets`` with their own params and sharing maps; ``mesh``: None on one
    device; ``cap``: the longest chunk (``iters_per_call``); ``test_scan``: scan test batches
    on the device."""

    def __init__(self, step, net, feeds, tests, *, mesh, iter_size: int, cap: int,
                 test_scan: bool, root_device, verbose: bool):
        self.net, self.feeds, self.tests = net, feeds, tests
        self.mesh, self.iter_size, self.cap = mesh, iter_size, cap
        self.test_scan, self.root_device, self.verbose = test_scan, root_device, verbose
        self._announced: set[str] = set()
        self._test_fns: dict[int, Any] = {}
        self._train_fns(step)
        train = feeds["train"]

        def probe(params, batch, key):
            loss, (blobs, _) = net.loss(params, batch, train=True, key=key)
            return loss, blobs

        # The end-of-training display and debug_info, on the root device's share of a batch.
        self.forward_loss = jax.jit(lambda p, b, k: probe(p, b, k)[0])
        self.probe = jax.jit(jax.value_and_grad(probe, has_aux=True))
        # Device `rank`'s batch from what that device holds (NetFeed.root_arrays).
        self.batch_at = jax.jit(lambda arrays, b, rank: train.batch_at(arrays, b, rank))

    # -- train chunks ------------------------------------------------------------------------
    def _train_fns(self, step) -> None:
        feed, iter_size, cap = self.feeds["train"], self.iter_size, self.cap
        P = jax.sharding.PartitionSpec
        mesh = self.mesh

        def resident_batch(arrays, it):
            rank = jax.lax.axis_index(parallel.DATA_AXIS) if mesh is not None else 0
            return _stack([feed.batch_at(arrays, batch_index(it, s, iter_size), rank)
                           for s in range(iter_size)])

        def loop(state, n, length, batch_of):
            # Trip count n is traced: no chunk length unrolls, every length runs this body.
            shapes = jax.eval_shape(lambda s: step(s, batch_of(s, 0))[1], state)
            buf = jax.tree.map(lambda x: jnp.zeros((length,) + x.shape, x.dtype), shapes)

            def body(j, carry):
                state, buf = carry
                state, m = step(state, batch_of(state, j))
                return state, jax.tree.map(lambda b, x: b.at[j].set(x), buf, m)

            return jax.lax.fori_loop(0, n, body, (state, buf))

        if cap > 1:
            def resident(state, arrays, n):
                return loop(state, n, cap, lambda s, j: resident_batch(arrays, s.iter))

            def host(state, batches, n):
                length = jax.tree.leaves(batches)[0].shape[0]
                return loop(state, n, length,
                            lambda s, j: jax.tree.map(lambda x: x[j], batches))
        else:
            def resident(state, arrays, n):
                state, m = step(state, resident_batch(arrays, state.iter))
                return state, jax.tree.map(lambda x: x[None], m)

            def host(state, batches, n):
                state, m = step(state, jax.tree.map(lambda x: x[0], batches))
                return state, jax.tree.map(lambda x: x[None], m)

        if mesh is not None:
            batch_axis = 2 if iter_size > 1 else 1
            # Device-resident arrays: replicated, or split so each device gets its own records.
            arrays_spec = feed.array_specs() if feed.on_device else P()
            resident = jax.shard_map(resident, mesh=mesh, in_specs=(P(), arrays_spec, P()),
                                     out_specs=(P(), P()), check_vma=False)
            host = jax.shard_map(host, mesh=mesh,
                                 in_specs=(P(), P(*([None] * batch_axis + ["data"])), P()),
                                 out_specs=(P(), P()), check_vma=False)
        self._resident = jax.jit(resident, donate_argnums=(0,))
        self._host = jax.jit(host, donate_argnums=(0,))

    def train(self, state, it: int, n: int):
        """``n`` iterations from iteration ``it`` (the state's) in one dispatch: the new state
        and the metrics (``loss``, ``lr``, ``outputs``) stacked on a leading axis whose first
        ``n`` entries are these iterations'; not yet synchronised."""
        feed = self.feeds["train"]
        what = (f"the train step (up to {self.cap} iterations per dispatch)" if self.cap > 1
                else "the train step (1 iteration per dispatch)")
        with jax.default_device(self.root_device):
            if feed.on_device:
                return self.call(self._resident, what, state, feed.arrays, jnp.int32(n))
            batches = feed.chunk(it, n, self.iter_size)
            if self.mesh is not None:
                batches = parallel.put_sharded(batches, self.mesh, 2 if self.iter_size > 1 else 1)
            return self.call(self._host, what, state, batches, jnp.int32(n))

    def call(self, fn, what: str, *args):
        """Calls a jitted program; logs when (and how long) it had to compile."""
        if self.verbose and what not in self._announced:
            # The first call of each program compiles it: say so before the silence.
            self._announced.add(what)
            _log.info("Compiling %s ...", what)
        before = fn._cache_size()
        t0 = time.perf_counter()
        out = fn(*args)
        if fn._cache_size() > before and self.verbose:
            # Dispatch is asynchronous: the call returns once compiled and queued.
            _log.info("Compiled %s in %.2f s", what, time.perf_counter() - t0)
        return out

    # -- test passes -------------------------------------------------------------------------
    def _test_fn(self, i: int):
        if i in self._test_fns:
            return self._test_fns[i]
        tn, own, share, test_key = self.tests[i]
        feed = self.feeds[i]

        def scores(params, batch, b):
            # Random test-phase layers (DummyData fillers) draw from the test stream.
            loss, (blobs, _) = tn.loss(params, batch, train=False, frozen=False,
                                       key=jax.random.fold_in(test_key, b))
            out = {k: jnp.asarray(v, jnp.float32) for k, v in tn.outputs(blobs).items()}
            return out, loss.astype(jnp.float32)

        if feed.on_device:
            def run(train_params, arrays, b0, n):
                params = share_params(train_params, own, share)

                def body(acc, j):
                    s = scores(params, feed.batch_at(arrays, b0 + j), b0 + j)
                    return jax.tree.map(jnp.add, acc, s), None

                zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                    scores, params, feed.batch_at(arrays, b0), b0))
                return jax.lax.scan(body, zero, jnp.arange(n, dtype=jnp.int32))[0]

            fn = jax.jit(run, static_argnums=(3,))
        else:
            fn = jax.jit(lambda train_params, batch, b: scores(
                share_params(train_params, own, share), batch, b))
        self._test_fns[i] = fn
        return fn

    def test(self, i: int, params, b0: int, n: int):
        """Queues test net ``i``'s pass over batches ``b0 .. b0+n-1`` on the root device
        (``params``: the root device's train params); returns the unsynchronised sums
        ``(outputs, loss)``; a DetectionEvaluate output is the list of its ``n`` batches' tops."""
        feed = self.feeds[i]
        fn = self._test_fn(i)
        what = f"test net #{i}"
        evals = detection_eval_outputs(self.tests[i][0])
        with jax.default_device(self.root_device):
            if feed.on_device and self.test_scan and not evals:
                return self.call(fn, what, params, feed.arrays, jnp.int32(b0), n)
            total, rows = None, {k: [] for k in evals}
            for j in range(n):
                if feed.on_device:
                    out, loss = self.call(fn, what, params, feed.arrays, jnp.int32(b0 + j), 1)
                else:
                    out, loss = self.call(fn, what, params, feed.host_batch(b0 + j),
                                          jnp.int32(b0 + j))
                out = dict(out)
                for k in evals:
                    rows[k].append(out.pop(k))
                total = (out, loss) if total is None else jax.tree.map(jnp.add, total,
                                                                       (out, loss))
            return {**total[0], **rows}, total[1]
