"""Caffe's Solver (``solver.cpp``): ``Solve``, ``Step(n)``, ``TestAll``, ``Snapshot``,
``Restore`` around the pure step, on one or many devices.

Data flow: the solver prototxt → the train net and test nets (``Net``; test nets share the
train net's weights by layer name, as Caffe does) → the update rule (``jcaffe.sgd_solvers``,
an optax chain) → the pure step (``jcaffe.train_step``) → the compiled programs
(``jcaffe.programs``), built once each net's batches exist (``jcaffe.data.netfeed``) → this
loop, which wakes only at Caffe's events (one :class:`Schedule` says what is due at an
iteration), logs like Caffe and snapshots (``jcaffe.snapshot``).

``Solver.step(n)`` is Caffe's ``Solver::Step``: a test pass when one is due at the start of an
iteration, display lines, snapshots, stop requests; iterations between events run fused in
one dispatch. Any split of a run into ``step`` calls gives the weights, history and logged
numbers of one ``solve()``, bit for bit.

The update rules used to live here; their names stay importable from this module.
"""

from __future__ import annotations

import collections
import os
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log, parallel, sgd_solvers, snapshot as snapshot_mod
from jcaffe.config import Config
from jcaffe.data.netfeed import batch_index
from jcaffe.errors import SolverError
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2
from jcaffe.sgd_solvers import *  # noqa: F401,F403  (the update rules' names, as before)
from jcaffe.solver_init import SolverInit, log_outputs
from jcaffe.train_step import TrainState, make_train_step, step_key

_log = log.get_logger("solver")


class Schedule(NamedTuple):
    """What is due at an iteration: Caffe's conditions in ``Solver::Step`` and ``Solve``, the
    one rule the loop, ``solve``'s end and ``restore`` read. ``test_interval`` is 0 when the
    solver has no test nets."""

    display: int
    test_interval: int
    test_initialization: bool
    snapshot: int

    @classmethod
    def of(cls, sp: caffe_pb2.SolverParameter, n_test_nets: int) -> "Schedule":
        return cls(int(sp.display), int(sp.test_interval) if n_test_nets else 0,
                   bool(sp.test_initialization), int(sp.snapshot))

    def test_due(self, it: int, *, final: bool = False) -> bool:
        """A test pass before iteration ``it`` (at iteration 0 only with
        ``test_initialization``); ``final``: Solve's test after the last iteration."""
        ti = self.test_interval
        return bool(ti) and it % ti == 0 and (final or it > 0 or self.test_initialization)

    def display_due(self, it: int) -> bool:
        return bool(self.display) and it % self.display == 0

    def snapshot_due(self, it: int) -> bool:
        """A snapshot once ``it`` iterations are done."""
        return bool(self.snapshot) and it % self.snapshot == 0

    def tests_before(self, it: int) -> int:
        """Test passes a run from iteration 0 has made before iteration ``it``."""
        ti = self.test_interval
        return sum(1 for m in range(0, it, ti) if self.test_due(m)) if ti else 0

    def chunk(self, it: int, stop: int, cap: int) -> int:
        """Iterations from ``it`` to run in one dispatch: up to ``cap``, ending at ``stop`` or
        at the next display, test or snapshot iteration."""
        n = min(cap, stop - it)
        for every in (self.display, self.test_interval, self.snapshot):
            if every > 0:
                n = min(n, every - it % every)
        return max(1, n)


def test_means(total, n: int) -> tuple[dict[str, np.ndarray], float]:
    """A test pass's output means and loss mean (Caffe's ``Test loss``) from its sums over
    ``n`` (test_iter) batches. A DetectionEvaluate output (its batches' tops, a list) gives
    the SSD fork's ``detection_eval``: the mAP of its rows, with the fork's default
    ``ap_version`` "Integral" (the fork's solver field cannot be read: its number is BVLC's
    ``weights``)."""
    from jcaffe.layers.detection import average_precisions

    outputs, loss = jax.device_get(total)
    return {k: np.float32(average_precisions(v)[0]) if isinstance(v, list) else
            np.asarray(v) / n for k, v in outputs.items()}, float(loss) / n


class Solver(SolverInit):
    """Caffe's Solver over jcaffe nets on one or many devices.

    ``solver``: a solver prototxt path or a ``SolverParameter``; ``devices``: the devices to
    train on (default: what ``solver_mode`` / ``device_id`` say; several train data-parallel
    with Caffe's semantics); ``config``: how the nets run (``jcaffe.Config``); ``weights``:
    caffemodels to fine-tune from (default: the solver's ``weights``); ``iters_per_call``:
    iterations fused into one dispatch.

    Drive it as Caffe's: ``solve()``, ``step(n)``, ``test_all()``, ``snapshot()``,
    ``restore(path)``. Look inside: ``net``, ``test_nets``, ``tx`` (the optax update rule),
    ``state`` (the ``TrainState``), ``iter``, ``params``, ``test_params(i)``, ``outputs``,
    ``batch(it)``, ``step_key(it)``; ``train_step`` is the pure step to embed in your own JAX.
    """

    def __init__(self, solver: caffe_pb2.SolverParameter | str, *, solver_path: str | None = None,
                 devices: Sequence[jax.Device] | None = None, device: jax.Device | None = None,
                 config: Config | None = None, weights: Sequence[str] | str | None = None,
                 iters_per_call: int = 100, verbose: bool = True):
        super().__init__(solver, solver_path=solver_path, devices=devices, device=device,
                         config=config, weights=weights, verbose=verbose)
        self.train_step = make_train_step(self.net, self.tx, iter_size=self.sp.iter_size,
                                          axis_name=parallel.DATA_AXIS if self.mesh else None)
        # Nets whose layers must not run inside a loop run one iteration per dispatch.
        scan_ok = all(n.plan.scan_ok for n in [self.net, *self.test_nets])
        self.iters_per_call = max(1, int(iters_per_call)) if scan_ok else 1
        self._test_scan = scan_ok
        self.schedule = Schedule.of(self.sp, len(self.test_nets))
        self.tests_done = 0
        self.losses: collections.deque = collections.deque(maxlen=max(1, self.sp.average_loss))
        self._requested: str | None = None
        self.requested_early_exit = False
        self._feeds = None
        self._programs = None
        self._last: tuple | None = None  # the last chunk's (metrics, n)
        self._clock: tuple[float, int] | None = None
        self.last_snapshot: str | None = None
        self.last_tests: list | None = None

    # -- the state ---------------------------------------------------------------------------
    @property
    def iter(self) -> int:
        """Iterations done: ``TrainState.iter``."""
        return int(jax.device_get(parallel.root_view(self.state.iter)))

    def step_key(self, it: int) -> jax.Array:
        """The PRNG key of iteration ``it`` (``train_step.step_key``; device r folds r in)."""
        return step_key(self._step_key(), it)

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        """The train net's outputs of the last iteration run (root device), and under
        ``loss`` that iteration's loss (the mean over ``iter_size``; raw, not smoothed)."""
        if self._last is None:
            return {}
        metrics, n = self._last
        m = jax.device_get(parallel.root_view({"outputs": metrics["outputs"],
                                               "loss": metrics["loss"]}))
        out = {k: np.asarray(v[n - 1]) for k, v in m["outputs"].items()}
        out["loss"] = np.asarray(m["loss"][n - 1])
        return out

    def batch(self, it: int) -> dict[str, np.ndarray]:
        """The host batch the root device's train net reads at iteration ``it`` (a leading
        ``iter_size`` axis when ``iter_size > 1``)."""
        subs = [self._root_batch(batch_index(it, s, self.sp.iter_size))
                for s in range(self.sp.iter_size)]
        if len(subs) == 1:
            return subs[0]
        return {k: np.stack([s[k] for s in subs]) for k in subs[0]}

    def _root_batch(self, b: int) -> dict[str, np.ndarray]:
        self._setup_feeds()
        feed = self._feeds["train"]
        if feed.on_device:
            # Cut from what the root device (this process's first) holds.
            batch = self._programs.batch_at(feed.root_arrays(), jnp.int32(b),
                                            jnp.int32(feed.own[0]))
            return {k: np.asarray(v) for k, v in jax.device_get(batch).items()}
        # The root device's share of the global batch (block 0).
        return {k: np.asarray(v)[: np.asarray(v).shape[0] // feed.host_blocks]
                for k, v in feed.host_batch(b).items()}

    # -- data and programs -------------------------------------------------------------------
    def _setup_feeds(self):
        """Each net's batches, then the programs that read them."""
        if self._feeds is not None:
            return
        from jcaffe.data.netfeed import solver_feeds
        from jcaffe.programs import Programs

        self._feeds = solver_feeds(self.net, self.test_nets, self._streams.data,
                                   self.config.data_on_device, mesh=self.mesh,
                                   root_device=self.root_device, ranks=self.ranks)
        tests = [(tn, own, share, jax.random.fold_in(self._streams.test, 1_000_000 + i))
                 for i, (tn, own, share) in enumerate(zip(self.test_nets, self._test_own,
                                                          self._test_share))]
        self._programs = Programs(self.train_step, self.net, self._feeds, tests, mesh=self.mesh,
                                  iter_size=self.sp.iter_size, cap=self.iters_per_call,
                                  test_scan=self._test_scan, root_device=self.root_device,
                                  verbose=self.verbose)

    def run_iterations(self, n: int):
        """Runs ``n`` iterations (no tests, logs or snapshots) in dispatches of up to
        ``iters_per_call``; returns the stacked metrics (``loss``, ``lr``, ``outputs``), not
        yet synchronised."""
        if n < 1:
            raise SolverError(f"run_iterations needs n >= 1, got {n}")
        self._setup_feeds()
        it, parts = self.iter, []
        while n > 0:
            k = min(n, self._programs.cap)
            m = self._run(it, k)
            parts.append(jax.tree.map(lambda x: x[:k], m) if len(m["loss"]) != k else m)
            it, n = it + k, n - k
        return parts[0] if len(parts) == 1 else jax.tree.map(
            lambda *xs: jnp.concatenate(xs), *parts)

    def _run(self, it: int, n: int):
        self._setup_feeds()
        self._programs.verbose = self.verbose
        self.state, metrics = self._programs.train(self.state, it, n)
        self._last = (metrics, n)
        return metrics

    # -- the loop ----------------------------------------------------------------------------
    def request(self, action: str) -> None:
        """Asks the loop to 'stop' or 'snapshot' at the next chunk boundary (signals)."""
        self._requested = action

    def step(self, iters: int) -> None:
        """Caffe's Solver::Step: ``iters`` iterations with tests, displays, snapshots and stop
        requests as they fall due. The host runs one chunk behind the device: chunk k+1 (and
        any test pass) is queued before chunk k's losses are read and logged."""
        self._setup_feeds()
        it = self.iter
        stop = it + int(iters)
        if self._clock is None:
            self._clock = (time.perf_counter(), it)
        self.requested_early_exit = False
        pending = None
        while it < stop:
            tests = None
            if self.schedule.test_due(it):
                tests = (it, [self._dispatch_test(i) for i in range(len(self.test_nets))])
            n = self.schedule.chunk(it, stop, self._programs.cap)
            metrics = self._run(it, n)
            if pending:
                self._finish_chunk(*pending)
            if tests:
                self._log_tests(*tests)
            pending, it = (it, n, metrics), it + n
            snapshot_due = self.schedule.snapshot_due(it)
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
                    self.requested_early_exit = True
                    break
        if pending:
            self._finish_chunk(*pending)

    def solve(self, resume_file: str | None = None, *, max_iter: int | None = None) -> dict:
        """Caffe's Solver::Solve: restores ``resume_file`` if given, steps to ``max_iter``
        (default: the solver's), then Caffe's final display and test. Returns the tests of
        this call's last test pass (``{"test": [{output: mean}, ...]}``)."""
        sp = self.sp
        stop_iter = sp.max_iter if max_iter is None else max_iter
        _log.info("Solving %s", self.net.name)
        _log.info("Learning Rate Policy: %s", sp.lr_policy)
        if resume_file:
            self.restore(resume_file)
        tests_before = self.tests_done
        self._clock = None
        self.step(max(0, stop_iter - self.iter))
        it = self.iter
        results = {"test": self.last_tests} if self.tests_done > tests_before else {}
        if self.requested_early_exit:
            _log.info("Optimization stopped early at iteration %d.", it)
            return results
        if sp.snapshot_after_train and not self.schedule.snapshot_due(it):
            self.snapshot()
        if self.schedule.display_due(it) and it == stop_iter:
            self.losses.append(self.forward_loss())
            _log.info("Iteration %d, loss = %.6g", it, float(np.mean(self.losses)))
        if self.schedule.test_due(it, final=True):
            results["test"] = self.test_all()
        _log.info("Optimization Done.")
        return results

    def _finish_chunk(self, start: int, n: int, metrics) -> None:
        """Reads a finished chunk's losses: divergence check, smoothing, Caffe's display."""
        sp = self.sp
        losses = np.asarray(jax.device_get(parallel.root_view(metrics["loss"])))[:n]
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise SolverError(
                f"loss is {losses[bad[0]]} at iteration {start + int(bad[0])}: training "
                f"diverged (lower base_lr or set clip_gradients); last good snapshot: "
                f"{self.last_snapshot or 'none'}")
        shown = [j for j in range(n) if self.schedule.display_due(start + j)]
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
            log_outputs("Train", self.net, {k: v[j] for k, v in outputs.items()})
            # The rate the update of this iteration applied (the device's lr policy).
            _log.info("Iteration %d, lr = %.6g", it, float(rates[j]))
            self._clock = (now, it)
        if shown and sp.debug_info:
            self.log_debug_info()

    # -- testing -----------------------------------------------------------------------------
    def _dispatch_test(self, i: int):
        """Queues test net ``i``'s pass on the root device; as in Caffe only the root solver
        tests, and the test reader continues where the last pass stopped."""
        self._setup_feeds()
        n = int(self.sp.test_iter[i])
        return self._programs.test(i, parallel.root_view(self.params), self.tests_done * n, n)

    def test(self, i: int = 0) -> dict[str, np.ndarray]:
        """Caffe's Solver::Test: the mean of each output of test net ``i`` over test_iter
        batches (not logged; ``test_all`` logs)."""
        return test_means(self._dispatch_test(i), int(self.sp.test_iter[i]))[0]

    def test_all(self) -> list[dict[str, np.ndarray]]:
        """Caffe's Solver::TestAll: every test net's pass, logged."""
        return self._log_tests(self.iter, [self._dispatch_test(i)
                                           for i in range(len(self.test_nets))])

    def _log_tests(self, it: int, totals) -> list[dict[str, np.ndarray]]:
        results = []
        for i, total in enumerate(totals):
            _log.info("Iteration %d, Testing net (#%d)", it, i)
            means, loss = test_means(total, int(self.sp.test_iter[i]))
            if self.sp.test_compute_loss:
                _log.info("Test loss: %.6g", loss)
            log_outputs("Test", self.test_nets[i], means)
            results.append(means)
        self.tests_done += 1
        self.last_tests = results
        return results

    # -- probes at the current iteration -----------------------------------------------------
    def _probe_args(self):
        # Sub-batch 0 of the next iteration, with its key, on the root device.
        it = self.iter
        batch = self._root_batch(batch_index(it, 0, self.sp.iter_size))
        return (parallel.root_view(self.params), batch,
                jax.random.fold_in(self.step_key(it), 0))

    def forward_loss(self) -> float:
        """The train net's loss on the next batch (Caffe's final display after training)."""
        with jax.default_device(self.root_device):
            return float(self._programs.forward_loss(*self._probe_args()))

    def log_debug_info(self) -> None:
        """Caffe's ``debug_info``: mean absolute values of every layer's top data and of every
        parameter blob's data and gradient, on the next batch of the root device."""
        from jcaffe.solver_init import log_debug_info

        args = self._probe_args()
        with jax.default_device(self.root_device):
            (_, blobs), grads = self._programs.probe(*args)
            log_debug_info(self.net, *jax.device_get((blobs, grads, args[0])))

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str]:
        """Caffe's Snapshot: ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``
        (atomically); in a multi-process run only process 0 writes."""
        paths = snapshot_mod.save(self.sp, self.solver_path, self.net, self.state,
                                  last_good=self.last_snapshot)
        self.last_snapshot = paths[1]
        return paths

    def restore(self, state_path: str) -> None:
        """Caffe's Restore: resumes from a ``.solverstate`` (and the ``.caffemodel`` it
        names). Any device count can continue any snapshot."""
        with jax.default_device(self.root_device):
            state = snapshot_mod.restore(state_path, self.net, self.tx, self.params,
                                         self._step_key())
        self._set_state(state)
        self._last = None
        it = self.iter
        self.tests_done = self.schedule.tests_before(it)
        _log.info("Restoring previous solver status from %s (iteration %d)", state_path, it)

    def close(self) -> None:
        if self._feeds:
            for f in self._feeds.values():
                f.close()
