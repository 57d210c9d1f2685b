"""Training: Caffe's ``Solver::Solve`` around one pure, jit-compiled train step.

    python -m jcaffe.train prototxt/lenet_solver.prototxt [--weights W] [--snapshot S] [--cpu]

Data flow: the solver prototxt → the train net and test nets (``Net``; test nets share the
train net's weights by layer name, as Caffe does) → ``solver.build_solver(sp, net)`` (Caffe's
update rule as an optax chain) → the pure step of this module::

    state = init_state(net, tx, key)                      # TrainState(params, opt_state, iter, key)
    step = make_train_step(net, tx, iter_size=sp.iter_size)
    state, metrics = jax.jit(step, donate_argnums=0)(state, batch)

``step`` closes over nothing mutable: it works under ``jax.jit`` (with donation), ``jax.vmap``
(many nets, seeds or learning rates in one program) and ``shard_map`` (``axis_name``: data
parallel, gradients averaged over the axis as Caffe's multi-GPU sums and scales by 1/N).

``Trainer`` is Caffe's Solve loop built from these pieces: it feeds (device-resident datasets
sliced inside the program, or stacked host batches), runs ``lax.scan`` over many iterations per
dispatch, and only wakes at Caffe's events (display, test, snapshot), where it logs like Caffe.
On N devices the same program runs under ``shard_map`` over a one-axis mesh (``parallel``).

Reproducibility: one root key ``key(random_seed)`` is split into streams for initialisation,
train steps, test nets and data order (``prng_streams``); iteration ``i`` uses
``fold_in(step_key, i)`` and reads data batch ``i · iter_size`` of the stream, so resuming from
``<prefix>_iter_N.solverstate`` continues to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import sys
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcaffe import log, parallel
from jcaffe.config import Config
from jcaffe.errors import JcaffeError, SolverError, reworded
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2

_log = log.get_logger("solver")

_SP = caffe_pb2.SolverParameter


# ---------------------------------------------------------------------------------------------
# The pure step
# ---------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    """Everything one iteration reads and writes: a pytree.

    ``params``: ``{layer: [blobs]}`` in Caffe's layout; ``opt_state``: the solver's state
    (Caffe's history, ``iter_`` and ``current_step_``); ``iter``: int32, iterations done;
    ``key``: the train-step PRNG stream (iteration ``i`` uses ``fold_in(key, i)``)."""

    params: Any
    opt_state: Any
    iter: jax.Array
    key: jax.Array


class PRNGStreams(NamedTuple):
    """Independent PRNG streams split from one root key."""

    init: jax.Array   # parameter fillers of the train net
    step: jax.Array   # Dropout and random transforms, folded with the iteration
    test: jax.Array   # fillers of test-net layers the train net lacks
    data: jax.Array   # host-side data order (shuffling readers)


def prng_streams(key: jax.Array) -> PRNGStreams:
    """The four streams of a run from its root key (``jax.random.split``)."""
    return PRNGStreams(*jax.random.split(key, 4))


def init_state(net: Net, tx: optax.GradientTransformation, key: jax.Array, *,
               params=None) -> TrainState:
    """A fresh ``TrainState``: the net's fillers (``prng_streams(key).init``) or ``params``,
    the solver's initial state, iteration 0. Works under ``jax.vmap`` over ``key``."""
    streams = prng_streams(key)
    if params is None:
        params = net.init(streams.init)
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), streams.step)


def make_train_step(net: Net, tx: optax.GradientTransformation, *, iter_size: int = 1,
                    axis_name: str | None = None):
    """Caffe's iteration as a pure ``step(state, batch) -> (state, metrics)``.

    ``batch`` maps the net's data tops to raw arrays (``net.input_specs()``), with a leading
    axis of ``iter_size`` when ``iter_size > 1``: forward/backward runs on each sub-batch
    (``lax.scan``), gradients are summed and the solver divides by ``iter_size`` (Caffe's
    accumulation). Under ``axis_name`` (``shard_map``/``vmap`` axis) the summed gradients are
    averaged over the axis — Caffe's multi-GPU sum scaled by 1/N — and so are the logged loss
    and outputs; state updated by the forward pass (BatchNorm statistics) stays per device.

    ``metrics``: ``{"loss": mean loss over iter_size, "lr": the rate the solver applied,
    "outputs": the train net's output blobs (of the last sub-batch)}``.
    """
    from jcaffe import solver as solver_mod

    if iter_size < 1:
        raise SolverError(f"iter_size must be >= 1, got {iter_size}")
    grad_fn = jax.value_and_grad(net.loss, has_aux=True)

    def forward_backward(params, batch, key):
        (loss, (blobs, new_params)), grads = grad_fn(params, batch, train=True, key=key)
        # new_params: running statistics (BatchNorm) advance per forward pass.
        return new_params, grads, loss, net.outputs(blobs)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(state.key, state.iter)
        if axis_name is not None:
            # Each device draws its own Dropout masks (Caffe: one RNG per solver).
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        if iter_size == 1:
            params, grads, loss, outputs = forward_backward(state.params, batch,
                                                            jax.random.fold_in(key, 0))
        else:
            first = jax.tree.map(lambda x: x[0], batch)
            rest = jax.tree.map(lambda x: x[1:], batch)
            params, grads, loss, outputs = forward_backward(state.params, first,
                                                            jax.random.fold_in(key, 0))

            # The other sub-batches in a loop, not unrolled: compile time stays that of one.
            def body(carry, xs):
                params, grads, total, _ = carry
                k, sub = xs
                params, g, l, out = forward_backward(params, sub, jax.random.fold_in(key, k))
                return (params, jax.tree.map(jnp.add, grads, g), total + l, out), None

            (params, grads, loss, outputs), _ = jax.lax.scan(
                body, (params, grads, loss, outputs),
                (jnp.arange(1, iter_size, dtype=jnp.int32), rest))
            loss = loss / iter_size  # Caffe logs the mean loss over iter_size
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss, outputs = jax.lax.pmean((loss, outputs), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "lr": solver_mod.applied_rate(opt_state), "outputs": outputs}
        return TrainState(params, opt_state, state.iter + 1, state.key), metrics

    return step


def scan_steps(step, state: TrainState, batches):
    """``step`` over the leading axis of ``batches`` (``lax.scan``): the final state and the
    stacked metrics."""
    return jax.lax.scan(step, state, batches)


# ---------------------------------------------------------------------------------------------
# Nets of a solver
# ---------------------------------------------------------------------------------------------
def solver_nets(sp: caffe_pb2.SolverParameter):
    """Caffe's Solver::InitTrainNet / InitTestNets: ``(train, [test, ...])``, each a
    ``(NetParameter, NetState, file)`` triple (``file``: the prototxt's path, or None for a
    net given inline). Net paths were resolved by ``read_solver``."""
    from jcaffe import netstate, prototxt

    def load(source):
        return source if isinstance(source, caffe_pb2.NetParameter) else prototxt.read_net(source)

    def path(source):
        return None if isinstance(source, caffe_pb2.NetParameter) else source

    given = [f for f in ("train_net_param", "train_net", "net_param", "net") if sp.HasField(f)]
    if not given:
        raise SolverError("the solver names no net: set `net`, `net_param`, `train_net` or "
                          "`train_net_param`")
    if len(given) > 1:
        raise SolverError(f"the solver gives {', '.join(given)}: give exactly one train net")
    train_src = getattr(sp, given[0])
    train = load(train_src)
    sources = [src for _, src in netstate.test_net_sources(sp)]
    tests = [load(src) for src in sources]
    return ((train, netstate.train_net_state(sp, train), path(train_src)),
            [(t, netstate.test_net_state(sp, t, i), path(src))
             for i, (t, src) in enumerate(zip(tests, sources))])


def _share(train_params, own_params, mapping):
    """Caffe's ShareTrainedLayersWith: test layers take the train blobs of the same name
    (``mapping``: test params key -> train params key, ``Net.shared_layer_keys``)."""
    return {k: train_params[mapping[k]] if k in mapping else blobs
            for k, blobs in own_params.items()}


def _int_seed(key: jax.Array) -> int:
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


# ---------------------------------------------------------------------------------------------
# The trainer: Caffe's Solve loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Caffe's Solver over jcaffe nets on one or many devices. ``solve()`` runs to ``max_iter``.

    ``devices``: the devices to train on (default: what the solver's ``solver_mode`` /
    ``device_id`` say; several devices train data-parallel with Caffe's semantics);
    ``config``: how the nets run (``jcaffe.config.Config``); ``weights``: caffemodels to
    fine-tune from (default: the solver's ``weights`` field); ``iters_per_call``: iterations
    fused into one dispatch.

    The pieces are public: ``net``, ``test_nets``, ``tx`` (the optax solver), ``state`` (the
    ``TrainState``; ``params`` / ``opt_state`` / ``iter`` read it) and ``step`` (the pure
    ``make_train_step`` function, to embed in your own JAX code).
    """

    def __init__(self, solver: caffe_pb2.SolverParameter | str, *, solver_path: str | None = None,
                 devices: Sequence[jax.Device] | None = None, device: jax.Device | None = None,
                 config: Config | None = None, weights: Sequence[str] | str | None = None,
                 iters_per_call: int = 100, verbose: bool = True):
        from jcaffe import prototxt
        from jcaffe import solver as solver_mod

        if isinstance(solver, (str, os.PathLike)):
            solver_path = os.fspath(solver)
            solver = prototxt.read_solver(solver_path)
        self.sp = sp = solver
        self.solver_path = solver_path
        self.verbose = verbose
        if sp.max_iter < 0:
            raise SolverError("max_iter must be >= 0")
        if sp.iter_size < 1:
            raise SolverError("iter_size must be >= 1")
        if device is not None and devices is not None:
            raise SolverError("give device or devices, not both")
        self.devices = list(devices if devices is not None else
                            [device] if device is not None else parallel.select_devices(sp))
        platforms = {d.platform for d in self.devices}
        if len(platforms) != 1:
            raise SolverError(f"devices of one platform only, got {sorted(platforms)}")
        self.ranks = len(self.devices)
        self.mesh = parallel.make_mesh(self.devices) if self.ranks > 1 else None
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        if not local:
            raise SolverError(f"process {jax.process_index()} owns none of the devices")
        self.root_device = local[0]
        self.config = (config or Config()).resolved(self.devices[0].platform)
        if verbose:
            _log.info("Using %s", ", ".join(str(d) for d in self.devices) if self.ranks < 9
                      else f"{self.ranks} {self.devices[0].platform} devices")
            _log.info("Initializing solver from parameters:\n%s", _short_text(sp))
        self._warn_fields()

        self.seed = self._root_seed()
        streams = prng_streams(jax.random.key(self.seed))
        self._streams = streams
        # The step stream's key lives in the (donated) state; keep a host copy to rebuild it.
        self._step_key_data = np.asarray(jax.random.key_data(streams.step))
        (train_param, train_state, train_file), tests = solver_nets(sp)
        with jax.default_device(self.root_device):
            self.net = Net(train_param, state=train_state, config=self.config, verbose=verbose,
                           source=train_file)
            self.test_nets = [Net(p, state=st, config=self.config, verbose=verbose, source=f)
                              for p, st, f in tests]
            # Which train layer each test layer shares with (a NetError names a layer whose
            # blob counts or shapes differ).
            self._test_share = [tn.shared_layer_keys(self.net) for tn in self.test_nets]
            if verbose:
                self._log_formulation()
            self.tx = solver_mod.build_solver(sp, self.net)
            weights = list(sp.weights) if weights is None else (
                [w for w in weights.split(",") if w] if isinstance(weights, str) else list(weights))
            params = self.net.init(streams.init)
            self._test_own = [tn.init(jax.random.fold_in(streams.test, i), skip=share)
                              for i, (tn, share) in enumerate(zip(self.test_nets,
                                                                  self._test_share))]
            if weights:
                params = self.load_weights(params, weights)
            # One compiled program for all history buffers (op by op, each shape compiles
            # alone); committed to the device like the step's outputs, so nothing recompiles.
            state = TrainState(params, jax.jit(self.tx.init)(params), jnp.zeros((), jnp.int32),
                               self._step_key())
        self._set_state(state)
        self.step = make_train_step(self.net, self.tx, iter_size=sp.iter_size,
                                    axis_name=parallel.DATA_AXIS if self.mesh else None)
        # XLA's CPU convolution is naive inside loops: such nets run one iteration per dispatch.
        scan_ok = self.net.scan_ok and all(tn.scan_ok for tn in self.test_nets)
        self.iters_per_call = max(1, int(iters_per_call)) if scan_ok else 1
        self._test_scan = scan_ok
        self.tests_done = 0
        self.losses: collections.deque = collections.deque(maxlen=max(1, sp.average_loss))
        self._requested: str | None = None
        self._feeds = None
        self.last_snapshot: str | None = None
        self._announced: set[str] = set()
        self._test_fns: dict[int, Any] = {}  # test net index -> its jitted pass
        self._programs()
        if self.mesh is not None and verbose:
            _log.info("Data parallel on %d devices: batch %s per device; gradients averaged "
                      "over devices (layer_wise_reduce: XLA schedules the all-reduce)",
                      self.ranks, [l.batch_size for l in self.net.data_layers
                                   if hasattr(l, "batch_size")] or "?")

    # -- set-up ------------------------------------------------------------------------------
    def _root_seed(self) -> int:
        seed = int(self.sp.random_seed)
        if seed < 0:
            seed = secrets.randbits(31)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
            if self.verbose:
                _log.info("random_seed is -1: using root seed %d (set random_seed: %d to "
                          "repeat this run)", seed, seed)
        return seed

    def _warn_fields(self) -> None:
        sp = self.sp
        if sp.snapshot_diff:
            _log.warning("snapshot_diff: true is not supported: snapshots hold weights only "
                         "(gradients are not kept between iterations)")
        if sp.debug_info:
            _log.info("debug_info: per-layer data/diff norms are logged at display iterations")

    def _step_key(self) -> jax.Array:
        return jax.random.wrap_key_data(jnp.asarray(self._step_key_data))

    def _set_state(self, state: TrainState) -> None:
        if self.mesh is not None:
            state = parallel.put_replicated(state, self.mesh)
        else:
            state = jax.device_put(state, self.root_device)
        self.state = state
        self._iter = int(jax.device_get(parallel.root_view(state.iter)))

    @property
    def params(self):
        return self.state.params

    @property
    def opt_state(self):
        return self.state.opt_state

    @property
    def iter(self) -> int:
        return self._iter

    def params_order(self) -> list[tuple[str, int]]:
        """Caffe's learnable_params order: owned blobs in layer order."""
        return [(p.layer, p.index) for p in self.net.params_info]

    def load_weights(self, params, weights: Sequence[str]):
        from jcaffe.caffemodel import load_caffemodel

        for w in weights:
            if self.verbose:
                _log.info("Finetuning from %s", w)
            source = load_caffemodel(w)
            params = self.net.copy_from(params, source, filename=w)
            # Caffe copies the weights into the test nets too (their own layers included).
            self._test_own = [tn.copy_from(own, source, filename=w)
                              for tn, own in zip(self.test_nets, self._test_own)]
        return params

    def _log_formulation(self) -> None:
        """Says how the convolutions run, and on CPU why not as oneDNN kernels if not."""
        from jcaffe import onednn

        convs = sorted({self.net.conv_formulation(l) for l in self.net.layers
                        if l.type in ("Convolution", "Deconvolution")})
        if not convs:
            return
        status = onednn.available() if self.config.platform == "cpu" else None
        why = ""
        if "onednn" in convs:
            why = f" ({status.detail})"
        elif status is not None and not status.ok:
            why = f" (oneDNN kernels not used: {status.detail})"
        _log.info("Convolutions run as %s%s", ", ".join(convs), why)

    def test_params(self, i: int, params=None):
        """The test net's params: the train net's blobs for layers of the same name."""
        return _share(parallel.root_view(self.params if params is None else params), self._test_own[i],
                      self._test_share[i])

    # -- data --------------------------------------------------------------------------------
    def _setup_feeds(self):
        if self._feeds is not None:
            return
        from jcaffe.data.netfeed import NetFeed

        on_device = self.config.data_on_device
        data = self._streams.data

        def seeds(net, k):
            return [_int_seed(jax.random.fold_in(data, 1000 * k + i))
                    for i in range(len(net.data_layers))]

        placement = parallel.replicated(self.mesh) if self.mesh is not None else self.root_device
        self._feeds = {"train": NetFeed(self.net, placement, on_device, seeds(self.net, 0),
                                        ranks=self.ranks)}
        for i, tn in enumerate(self.test_nets):
            self._feeds[i] = NetFeed(tn, self.root_device, on_device, seeds(tn, i + 1))

    # -- compiled programs -------------------------------------------------------------------
    def _programs(self) -> None:
        """The jitted programs: train chunks from device-resident data or stacked host
        batches, and the test pass. Each is one ``jax.jit``; JAX caches its compilations."""
        iter_size = self.sp.iter_size
        step = self.step
        P = jax.sharding.PartitionSpec

        def resident(state, arrays, n):
            feed = self._feeds["train"]
            rank = jax.lax.axis_index(parallel.DATA_AXIS) if self.mesh is not None else 0

            def body(state, i):
                it = state.iter
                subs = [feed.batch_at(arrays, it * iter_size + s, rank)
                        for s in range(iter_size)]
                batch = subs[0] if iter_size == 1 else jax.tree.map(
                    lambda *xs: jnp.stack(xs), *subs)
                return step(state, batch)

            return jax.lax.scan(body, state, jnp.arange(n, dtype=jnp.int32))

        def host(state, batches):
            return scan_steps(step, state, batches)

        if self.mesh is not None:
            mesh = self.mesh
            batch_axis = 2 if iter_size > 1 else 1
            resident_fn = lambda state, arrays, n: jax.shard_map(  # noqa: E731
                lambda s, a: resident(s, a, n), mesh=mesh, in_specs=(P(), P()),
                out_specs=(P(), P()), check_vma=False)(state, arrays)
            host_fn = jax.shard_map(host, mesh=mesh,
                                    in_specs=(P(), P(*([None] * batch_axis + ["data"]))),
                                    out_specs=(P(), P()), check_vma=False)
        else:
            resident_fn, host_fn = resident, host
        self._run_resident = jax.jit(resident_fn, static_argnums=(2,), donate_argnums=(0,))
        self._run_host = jax.jit(host_fn, donate_argnums=(0,))
        net = self.net

        def probe(params, batch, key):
            loss, (blobs, _) = net.loss(params, batch, train=True, key=key)
            return loss, blobs

        # The end-of-training display and debug_info, on the root device's share of a batch.
        self._forward_loss_fn = jax.jit(lambda p, b, k: probe(p, b, k)[0])
        self._probe_fn = jax.jit(jax.value_and_grad(probe, has_aux=True))
        self._batch_at_fn = jax.jit(lambda arrays, b: self._feeds["train"].batch_at(arrays, b, 0))

    def _call(self, fn, what: str, *args):
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

    def run_iterations(self, n: int):
        """Runs ``n`` iterations from ``self.iter`` in one dispatch; returns the stacked
        metrics (``loss``, ``lr``, ``outputs``), not yet synchronised."""
        self._setup_feeds()
        feed = self._feeds["train"]
        what = f"the train step ({n} iteration{'s' if n > 1 else ''} per dispatch)"
        with jax.default_device(self.root_device):
            if feed.on_device:
                self.state, metrics = self._call(self._run_resident, what, self.state,
                                                 feed.arrays, n)
            else:
                batches = feed.chunk(self._iter * self.sp.iter_size, n, self.sp.iter_size)
                if self.mesh is not None:
                    axis = 2 if self.sp.iter_size > 1 else 1
                    batches = parallel.put_sharded(batches, self.mesh, axis)
                self.state, metrics = self._call(self._run_host, what, self.state, batches)
        self._iter += n
        return metrics

    # -- testing -----------------------------------------------------------------------------
    def _test_fn(self, i: int):
        if i in self._test_fns:
            return self._test_fns[i]
        tn = self.test_nets[i]
        feed = self._feeds[i]
        own = self._test_own[i]
        share = self._test_share[i]
        test_key = jax.random.fold_in(self._streams.test, 1_000_000 + i)

        def scores(params, batch, b):
            # Random test-phase layers (DummyData fillers) draw from the test stream.
            loss, (blobs, _) = tn.loss(params, batch, train=False, frozen=False,
                                       key=jax.random.fold_in(test_key, b))
            out = {k: jnp.asarray(v, jnp.float32) for k, v in tn.outputs(blobs).items()}
            return out, loss.astype(jnp.float32)

        if feed.on_device:
            def run(train_params, arrays, b0, n):
                params = _share(train_params, own, share)

                def body(acc, j):
                    s = scores(params, feed.batch_at(arrays, b0 + j), b0 + j)
                    return jax.tree.map(jnp.add, acc, s), None

                zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                    scores, params, feed.batch_at(arrays, b0), b0))
                return jax.lax.scan(body, zero, jnp.arange(n, dtype=jnp.int32))[0]

            fn = jax.jit(run, static_argnums=(3,))
        else:
            fn = jax.jit(lambda train_params, batch, b: scores(_share(train_params, own, share),
                                                               batch, b))
        self._test_fns[i] = fn
        return fn

    def test(self, i: int = 0) -> dict[str, np.ndarray]:
        """Caffe's Solver::Test: the mean of each output of test net ``i`` over test_iter
        batches (not logged; ``test_all`` logs)."""
        return self._test_means(i, self._dispatch_test(i))[0]

    def _dispatch_test(self, i: int):
        """Queues test net ``i``'s pass on the root device; returns the (unsynchronised)
        sums. As in Caffe, only the root solver tests."""
        self._setup_feeds()
        n = int(self.sp.test_iter[i])
        feed = self._feeds[i]
        fn = self._test_fn(i)
        b0 = self.tests_done * n  # Caffe's test reader continues where the last test stopped
        params = parallel.root_view(self.params)
        what = f"test net #{i}"
        with jax.default_device(self.root_device):
            if feed.on_device and self._test_scan:
                return self._call(fn, what, params, feed.arrays, jnp.int32(b0), n)
            total = None
            for j in range(n):
                if feed.on_device:
                    s = self._call(fn, what, params, feed.arrays, jnp.int32(b0 + j), 1)
                else:
                    s = self._call(fn, what, params, feed.host_batch(b0 + j), jnp.int32(b0 + j))
                total = s if total is None else jax.tree.map(jnp.add, total, s)
            return total

    def _test_means(self, i: int, total) -> tuple[dict[str, np.ndarray], float]:
        """The outputs' means and the loss's (Caffe's ``Test loss``) over test_iter batches."""
        n = int(self.sp.test_iter[i])
        outputs, loss = jax.device_get(total)
        return {k: np.asarray(v) / n for k, v in outputs.items()}, float(loss) / n

    def test_all(self) -> list[dict[str, np.ndarray]]:
        return self._log_tests(self._iter, [self._dispatch_test(i)
                                            for i in range(len(self.test_nets))])

    def _log_tests(self, it: int, totals) -> list[dict[str, np.ndarray]]:
        results = []
        for i, total in enumerate(totals):
            _log.info("Iteration %d, Testing net (#%d)", it, i)
            means, loss = self._test_means(i, total)
            if self.sp.test_compute_loss:
                _log.info("Test loss: %.6g", loss)
            self._log_outputs("Test", self.test_nets[i], means)
            results.append(means)
        self.tests_done += 1
        return results

    def _log_outputs(self, kind: str, net: Net, values: dict) -> None:
        k = 0
        for name in net.output_names:
            w = net.output_loss_weight(name)
            shown = net.blob_display_name(name)
            for v in np.ravel(values[name]):
                if w:
                    _log.info("    %s net output #%d: %s = %.6g (* %g = %.6g loss)", kind, k,
                              shown, v, w, v * w)
                else:
                    _log.info("    %s net output #%d: %s = %.6g", kind, k, shown, v)
                k += 1

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str]:
        """Writes ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (atomically); in a
        multi-process run only process 0 writes (the root solver's weights)."""
        from jcaffe import caffemodel
        from jcaffe import solver as solver_mod

        fmt = "hdf5" if self.sp.snapshot_format == _SP.HDF5 else "binaryproto"
        prefix = self.sp.snapshot_prefix
        if not prefix:
            prefix = os.path.splitext(self.solver_path or "jcaffe")[0]
        model_path, state_path = caffemodel.snapshot_filenames(prefix, self._iter, fmt)
        if not parallel.is_main_process():
            self.last_snapshot = state_path
            return model_path, state_path
        os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
        params, opt_state = parallel.local_copy((self.params, self.opt_state))
        kind = "HDF5" if fmt == "hdf5" else "binary proto"
        try:
            _log.info("Snapshotting to %s file %s", kind, model_path)
            caffemodel.save_caffemodel(model_path, self.net, params, fmt=fmt)
            _log.info("Snapshotting solver state to %s file %s", kind, state_path)
            history = solver_mod.history_to_caffe(opt_state, self.params_order())
            caffemodel.write_solverstate(
                state_path, iter=self._iter, learned_net=model_path, history=history,
                current_step=int(solver_mod.get_current_step(opt_state)), fmt=fmt)
        except JcaffeError as e:
            # A full disk or a vanished folder: say which snapshot a resume can still use.
            raise reworded(e, f"{e} (last good snapshot: {self.last_snapshot or 'none'})") \
                from None
        self.last_snapshot = state_path
        return model_path, state_path

    def restore(self, state_path: str) -> None:
        """Resumes from a ``.solverstate`` (and the ``.caffemodel`` it names), like Caffe.
        Any device count can continue any snapshot."""
        from jcaffe import caffemodel
        from jcaffe import solver as solver_mod

        st = caffemodel.read_solverstate(state_path)
        model = st.learned_net
        if model and not os.path.exists(model):
            alt = os.path.join(os.path.dirname(state_path), os.path.basename(model))
            model = alt if os.path.exists(alt) else model
        params = parallel.local_copy(self.params)
        if model:
            params = self.net.copy_from(params, caffemodel.load_caffemodel(model), filename=model)
        with jax.default_device(self.root_device):
            template = self.tx.init(params)
            try:
                opt_state = solver_mod.history_from_caffe(template, st.history,
                                                          self.params_order(), st.iter,
                                                          st.current_step)
            except JcaffeError as e:
                raise reworded(e, f"{state_path}: {e}") from None
            state = TrainState(params, opt_state, jnp.asarray(int(st.iter), jnp.int32),
                               self._step_key())
        self._set_state(state)
        sp = self.sp
        if sp.test_interval and len(self.test_nets):
            self.tests_done = sum(1 for m in range(0, self._iter, sp.test_interval)
                                  if m > 0 or sp.test_initialization)
        _log.info("Restoring previous solver status from %s (iteration %d)", state_path,
                  self._iter)

    # -- the loop ----------------------------------------------------------------------------
    def request(self, action: str) -> None:
        """Asks the loop to 'stop' or 'snapshot' at the next chunk boundary (signals)."""
        self._requested = action

    def _chunk(self, stop_iter: int) -> int:
        sp = self.sp
        it = self._iter
        n = min(self.iters_per_call, stop_iter - it)
        for every in (sp.display, sp.test_interval if self.test_nets else 0, sp.snapshot):
            if every > 0:
                n = min(n, every - it % every)
        return max(1, n)

    def _test_due(self) -> bool:
        sp = self.sp
        return bool(sp.test_interval and self.test_nets and self._iter % sp.test_interval == 0
                    and (self._iter > 0 or sp.test_initialization))

    def solve(self, max_iter: int | None = None) -> dict:
        """Caffe's Solver::Solve from ``self.iter`` to ``max_iter``; returns the last tests.

        The host runs one chunk behind the device: chunk k+1 (and any test pass) is queued
        before chunk k's losses are read and logged, so logging never idles the device.
        """
        sp = self.sp
        stop_iter = sp.max_iter if max_iter is None else max_iter
        _log.info("Solving %s", self.net.name)
        _log.info("Learning Rate Policy: %s", sp.lr_policy)
        self._setup_feeds()
        results: dict = {}
        self._clock = (time.perf_counter(), self._iter)
        pending = None
        while self._iter < stop_iter:
            tests = None
            if self._test_due():
                tests = (self._iter, [self._dispatch_test(i) for i in range(len(self.test_nets))])
            start, n = self._iter, self._chunk(stop_iter)
            metrics = self.run_iterations(n)
            if pending:
                self._finish_chunk(*pending)
            if tests:
                results["test"] = self._log_tests(*tests)
            pending = (start, n, metrics)
            snapshot_due = sp.snapshot and self._iter % sp.snapshot == 0
            if snapshot_due or self._requested:
                self._finish_chunk(*pending)
                pending = None
            if snapshot_due:
                self.snapshot()
            if self._requested:
                action, self._requested = self._requested, None
                if action in ("snapshot", "stop") and not snapshot_due:
                    self.snapshot()
                if action == "stop":
                    _log.info("Optimization stopped early at iteration %d.", self._iter)
                    return results
        if pending:
            self._finish_chunk(*pending)
        if sp.snapshot_after_train and (not sp.snapshot or self._iter % sp.snapshot != 0):
            self.snapshot()
        if sp.display and self._iter % sp.display == 0 and self._iter == stop_iter:
            self.losses.append(self.forward_loss())
            _log.info("Iteration %d, loss = %.6g", self._iter, float(np.mean(self.losses)))
        if sp.test_interval and self.test_nets and self._iter % sp.test_interval == 0:
            results["test"] = self.test_all()
        _log.info("Optimization Done.")
        return results

    def _finish_chunk(self, start: int, n: int, metrics) -> None:
        """Reads a finished chunk's losses: divergence check, smoothing, Caffe's display."""
        sp = self.sp
        losses = np.asarray(jax.device_get(parallel.root_view(metrics["loss"])))
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise SolverError(
                f"loss is {losses[bad[0]]} at iteration {start + int(bad[0])}: training "
                f"diverged (lower base_lr or set clip_gradients); last good snapshot: "
                f"{self.last_snapshot or 'none'}")
        shown = [j for j in range(n) if sp.display and (start + j) % sp.display == 0]
        if shown:
            outputs, rates = jax.device_get(parallel.root_view((metrics["outputs"], metrics["lr"])))
        for j in range(n):
            it = start + j
            self.losses.append(float(losses[j]))
            if j not in shown:
                continue
            now = time.perf_counter()
            t_last, it_last = self._clock
            dt = now - t_last
            rate = (it - it_last) / dt if it > it_last and dt > 0 else 0.0
            _log.info("Iteration %d (%.4g iter/s, %.4gs/%d iters), loss = %.6g", it, rate, dt,
                      sp.display, float(np.mean(self.losses)))
            self._log_outputs("Train", self.net, {k: v[j] for k, v in outputs.items()})
            _log.info("Iteration %d, lr = %.6g", it, float(rates[j]))
            self._clock = (now, it)
        if shown and sp.debug_info:
            self.log_debug_info()

    def _next_batch(self):
        feed = self._feeds["train"]
        b = self._iter * self.sp.iter_size
        if not feed.on_device:
            batch = feed.host_batch(b)
        else:
            batch = self._batch_at_fn(parallel.root_view(feed.arrays), jnp.int32(b))
        if self.ranks > 1 and not feed.on_device:
            # The root device's share of the global batch (block 0).
            batch = {k: np.asarray(v)[: np.asarray(v).shape[0] // feed.host_blocks]
                     for k, v in batch.items()}
        return batch

    def forward_loss(self) -> float:
        """The train net's loss on the next batch (Caffe's final display after training)."""
        batch = self._next_batch()
        key = jax.random.fold_in(jax.random.fold_in(self._step_key(), self._iter), 0)
        with jax.default_device(self.root_device):
            return float(self._forward_loss_fn(parallel.root_view(self.params), batch, key))

    def log_debug_info(self) -> None:
        """Caffe's ``debug_info``: mean absolute values of every layer's top data and of every
        parameter blob's data and gradient, on the next batch of the root device."""
        batch = self._next_batch()
        params = parallel.root_view(self.params)
        key = jax.random.fold_in(jax.random.fold_in(self._step_key(), self._iter), 0)

        with jax.default_device(self.root_device):
            (_, blobs), grads = self._probe_fn(params, batch, key)
            blobs, grads, params = jax.device_get((blobs, grads, params))
        asum = lambda x: float(np.mean(np.abs(np.asarray(x, np.float64))))  # noqa: E731
        for layer in self.net.layers:
            for t in layer.top_names:
                _log.info("    [Forward] Layer %s, top blob %s data: %.6g", layer.name, t,
                          asum(blobs[t]))
        for p in self.net.params_info:
            _log.info("    [Backward] Layer %s, param blob %d diff: %.6g", p.layer, p.index,
                      asum(grads[p.layer][p.index]))
            _log.info("    [Update] Layer %s, param blob %d data: %.6g", p.layer, p.index,
                      asum(params[p.layer][p.index]))

    def close(self) -> None:
        if self._feeds:
            for f in self._feeds.values():
                f.close()


def _short_text(msg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg, as_one_line=False).rstrip()


# ---------------------------------------------------------------------------------------------
# The command line: python -m jcaffe.train SOLVER [flags]
# ---------------------------------------------------------------------------------------------
def install_signal_handlers(trainer: Trainer, sigint_effect: str, sighup_effect: str):
    def handler(effect):
        def h(signum, frame):
            if effect == "none":
                return
            _log.info("Signal %d received: %s", signum, effect)
            trainer.request(effect)
        return h

    signal.signal(signal.SIGINT, handler(sigint_effect))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler(sighup_effect))


def config_from_flags(args, environ=None) -> Config:
    """The execution config of a command: ``JCAFFE_*`` variables, then flags."""
    return Config.from_env(os.environ if environ is None else environ,
                           precision=getattr(args, "precision", None) or None,
                           decode_workers=getattr(args, "decode_workers", None))


def train_main(args) -> int:
    """Runs ``caffe train`` from parsed flags (solver, weights, snapshot, gpu, cpu, devices,
    iterations, level, stage, multi-process flags)."""
    import logging

    from jcaffe import prototxt

    parallel.initialize(args.coordinator_address, args.num_processes, args.process_id,
                        heartbeat_timeout_s=args.heartbeat_timeout)
    log.setup(level=logging.INFO if parallel.is_main_process() else logging.WARNING)
    if args.weights and args.snapshot:
        raise SolverError("give --weights or --snapshot, not both (as Caffe)")
    sp = prototxt.read_solver(args.solver)
    if args.level or args.stage:
        # Caffe's `caffe train --level --stage`: they select the train net's layers.
        sp.train_state.level = args.level
        sp.train_state.stage.extend([s for s in args.stage.split(",") if s])
    gpu = parallel.parse_ids(args.gpu, "gpu") if args.gpu else None
    devs = parallel.parse_ids(args.devices, "devices") if args.devices else None
    devices = parallel.select_devices(sp, gpu=gpu, devices=devs, force_cpu=args.cpu)
    if args.iterations is not None:
        sp.max_iter = args.iterations
    trainer = Trainer(sp, solver_path=args.solver, devices=devices,
                      config=config_from_flags(args),
                      weights=[w for w in args.weights.split(",") if w] or None,
                      iters_per_call=args.iters_per_call)
    if args.snapshot:
        trainer.restore(args.snapshot)
    install_signal_handlers(trainer, args.sigint_effect, args.sighup_effect)
    try:
        trainer.solve()
    finally:
        trainer.close()
    return 0


def add_train_flags(parser) -> None:
    parser.add_argument("solver", nargs="?", help="the solver prototxt")
    parser.add_argument("--solver", dest="solver_flag", metavar="SOLVER", help="the solver prototxt")
    parser.add_argument("--weights", default="", help="caffemodel(s) to fine-tune from, "
                        "comma-separated (replaces the solver's `weights`)")
    parser.add_argument("--snapshot", default="", help="a .solverstate to resume from")
    parser.add_argument("--gpu", default="", help="GPU ids (comma-separated) or 'all'")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU whatever the solver says")
    parser.add_argument("--devices", default="", help="device ids of the chosen platform "
                        "(comma-separated) or 'all': data-parallel training")
    parser.add_argument("--iterations", type=int, default=None, help="override max_iter")
    parser.add_argument("--level", type=int, default=0, help="the train net's NetState level")
    parser.add_argument("--stage", default="", help="the train net's NetState stages, "
                        "comma-separated")
    parser.add_argument("--precision", default="", choices=["", "float32", "tf32", "bf16"],
                        help="matmul/convolution precision (default float32, Caffe's numbers)")
    parser.add_argument("--decode_workers", type=int, default=None, metavar="N",
                        help="threads decoding host-fed records (default: one per core)")
    parser.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
    parser.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
    parser.add_argument("--iters_per_call", type=int, default=100,
                        help="iterations fused into one device program")
    parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                        help="multi-process training: process 0's address")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--heartbeat_timeout", type=int, default=30, metavar="SECONDS",
                        help="multi-process: a process silent this long fails the run")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jcaffe.train SOLVER [flags]`` is ``jcaffe train --solver=SOLVER [flags]``."""
    from jcaffe.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
