"""Training: Caffe's ``Solver::Solve`` as one jit-compiled, fused train step.

    python -m jcaffe.train prototxt/lenet_solver.prototxt [--weights W] [--snapshot S] [--cpu]

Data flow: the solver prototxt → the train net and test nets (``Net``; test nets share the
train net's weights by layer name, as Caffe does) → ``build_solver`` (Caffe's update rule as
an optax chain) → ``Trainer.step_fn``: forward, backward (``iter_size`` accumulated) and the
solver update of one iteration in one XLA program; when the dataset lives on the device,
``lax.scan`` runs many iterations per dispatch, slicing batches inside the program. The host
only wakes at Caffe's events (display, test, snapshot), where it logs like Caffe.

Reproducibility: the PRNG key of iteration ``i`` is ``fold_in(key(random_seed), i)`` and the
data cursor of iteration ``i`` is ``(i · iter_size · batch_size) mod count``, so resuming from
``<prefix>_iter_N.solverstate`` continues to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcaffe import log
from jcaffe.errors import DataError, SolverError
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2

_log = log.get_logger("solver")

_SP = caffe_pb2.SolverParameter


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def select_device(solver_mode: int | None = None, device_id: int = 0, *, explicit_gpu=None,
                  force_cpu: bool = False) -> jax.Device:
    """solver_mode → an XLA device. GPU from the solver file falls back to CPU with a warning;
    GPU from an explicit ``--gpu`` flag is an error when no GPU exists."""
    if force_cpu:
        return jax.devices("cpu")[0]
    want_gpu = explicit_gpu is not None or solver_mode == _SP.GPU
    if not want_gpu:
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    ids = explicit_gpu if explicit_gpu is not None else [device_id]
    if not gpus:
        if explicit_gpu is not None:
            raise SolverError("--gpu was given but no GPU is available to JAX "
                              "(install jcaffe[gpu] on a machine with a CUDA GPU, or use --cpu)")
        _log.warning("solver_mode is GPU but no GPU is available: running on CPU")
        return jax.devices("cpu")[0]
    if ids == "all":
        ids = [0]
    if len(ids) > 1:
        _log.warning("several GPUs requested (%s): this version trains on one, GPU %d", ids, ids[0])
    gid = ids[0]
    if not 0 <= gid < len(gpus):
        raise SolverError(f"GPU {gid} requested but only {len(gpus)} GPU(s) exist")
    return gpus[gid]


# ---------------------------------------------------------------------------------------------
# Nets of a solver
# ---------------------------------------------------------------------------------------------
def solver_nets(sp: caffe_pb2.SolverParameter):
    """Caffe's Solver::InitTrainNet / InitTestNets: ``(train, [test, ...])``, each a
    ``(NetParameter, NetState)`` pair. Net paths were resolved by ``read_solver``."""
    from jcaffe import netstate, prototxt

    def load(source):
        return source if isinstance(source, caffe_pb2.NetParameter) else prototxt.read_net(source)

    given = [f for f in ("train_net_param", "train_net", "net_param", "net") if sp.HasField(f)]
    if not given:
        raise SolverError("the solver names no net: set `net`, `net_param`, `train_net` or "
                          "`train_net_param`")
    if len(given) > 1:
        raise SolverError(f"the solver gives {', '.join(given)}: give exactly one train net")
    train = load(getattr(sp, given[0]))
    tests = [load(src) for _, src in netstate.test_net_sources(sp)]
    return ((train, netstate.train_net_state(sp, train)),
            [(t, netstate.test_net_state(sp, t, i)) for i, t in enumerate(tests)])


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Caffe's SGDSolver over jcaffe nets. ``solve()`` runs to ``max_iter``.

    Research code can use the pieces directly: ``trainer.net``, ``trainer.params``,
    ``trainer.opt_state``, ``trainer.tx`` (the optax solver) and ``trainer.step_fn``
    (``(params, opt_state, batches, it) -> (params, opt_state, loss, outputs)``, jitted).
    """

    def __init__(self, solver: caffe_pb2.SolverParameter | str, *, solver_path: str | None = None,
                 device: jax.Device | None = None, weights: Sequence[str] | str | None = None,
                 data_on_device: bool | None = None, iters_per_call: int = 100,
                 verbose: bool = True):
        from jcaffe import prototxt
        from jcaffe import solver as solver_mod

        if isinstance(solver, (str, os.PathLike)):
            solver_path = os.fspath(solver)
            solver = prototxt.read_solver(solver_path)
        self.sp = sp = solver
        self.solver_path = solver_path
        self.verbose = verbose
        self.device = device or select_device(sp.solver_mode if sp.HasField("solver_mode")
                                              else _SP.GPU, sp.device_id)
        if sp.max_iter < 0:
            raise SolverError("max_iter must be >= 0")
        if sp.iter_size < 1:
            raise SolverError("iter_size must be >= 1")
        if verbose:
            _log.info("Using device %s", self.device)
            _log.info("Initializing solver from parameters:\n%s", _short_text(sp))

        (train_param, train_state), tests = solver_nets(sp)
        with jax.default_device(self.device):
            platform = self.device.platform
            self.net = Net(train_param, state=train_state, platform=platform, verbose=verbose)
            self.test_nets = [Net(p, state=st, platform=platform, verbose=verbose)
                              for p, st in tests]
            seed = sp.random_seed if sp.random_seed >= 0 else int(time.time_ns() % (2**31))
            self.key = jax.random.key(seed)
            params = self.net.init(jax.random.fold_in(self.key, 0x7FFFFFFF))
            if weights:
                params = self.load_weights(params, weights)
            self.params = jax.device_put(params, self.device)
            self.lr_mults, self.decay_mults = self._param_mults()
            self.tx = solver_mod.build_solver(sp, self.lr_mults, self.decay_mults)
            # One program for all history buffers (op by op, each shape compiles alone).
            # (device_put commits it to the device, like the step's outputs: no recompile.)
            self.opt_state = jax.device_put(jax.jit(self.tx.init)(self.params), self.device)
        self._check_test_sharing()
        # XLA's CPU convolution falls back to naive kernels inside loops: nets that use it
        # (see vision.IM2COL_MAX_ELEMS) run one iteration per dispatch.
        self.use_scan = not (self.device.platform == "cpu" and any(
            n.conv_formulation(l) == "xla" for n in [self.net] + self.test_nets
            for l in n.layers if l.type in ("Convolution", "Deconvolution")))
        self.iter = 0
        self.tests_done = 0
        self.losses: collections.deque = collections.deque(maxlen=max(1, sp.average_loss))
        self.iters_per_call = max(1, int(iters_per_call))
        self._requested: str | None = None
        self._feeds = None
        self._data_on_device = data_on_device
        self._compiled: dict[Any, Callable] = {}
        self.last_snapshot: str | None = None

    # -- parameters --------------------------------------------------------------------------
    def _param_mults(self):
        lr = {k: [None] * len(v) for k, v in self.params.items()}
        dm = {k: [None] * len(v) for k, v in self.params.items()}
        for p in self.net.params_info:
            lr[p.layer][p.index] = p.lr_mult
            dm[p.layer][p.index] = p.decay_mult
        return lr, dm

    def params_order(self) -> list[tuple[str, int]]:
        """Caffe's learnable_params order: owned blobs in layer order."""
        return [(p.layer, p.index) for p in self.net.params_info]

    def load_weights(self, params, weights):
        from jcaffe.caffemodel import load_caffemodel

        if isinstance(weights, str):
            weights = [w for w in weights.split(",") if w]
        for w in weights:
            if self.verbose:
                _log.info("Finetuning from %s", w)
            params = self.net.copy_from(params, load_caffemodel(w), filename=w)
        return params

    def _check_test_sharing(self) -> None:
        train_shapes = {l.name: l.blob_shapes for l in self.net.layers}
        for i, tn in enumerate(self.test_nets):
            for l in tn.layers:
                if l.name in train_shapes and l.blob_shapes and train_shapes[l.name] != l.blob_shapes:
                    raise SolverError(
                        f"test net #{i} layer '{l.name}': blob shapes {l.blob_shapes} differ from "
                        f"the train net's {train_shapes[l.name]}; Caffe shares weights by layer name")

    def test_params(self, i: int, params=None):
        """The test net's params: the train net's blobs for layers of the same name."""
        self._setup_feeds()
        return _share(self.params if params is None else params, self._test_own[i])

    # -- data --------------------------------------------------------------------------------
    def _setup_feeds(self):
        if self._feeds is not None:
            return
        self._test_own = [tn.init(jax.random.fold_in(self.key, 1000 + i))
                          for i, tn in enumerate(self.test_nets)]
        seed = max(0, int(self.sp.random_seed))
        self._feeds = {"train": _NetFeed(self.net, self.device, self._data_on_device, seed)}
        for i, tn in enumerate(self.test_nets):
            self._feeds[i] = _NetFeed(tn, self.device, self._data_on_device, seed + 100 * (i + 1))

    # -- the fused step ----------------------------------------------------------------------
    def _grads(self, params, batches, key):
        """Forward/backward over iter_size batches: mean loss, summed gradients, outputs."""
        net = self.net
        grad_fn = jax.value_and_grad(net.loss, has_aux=True)

        def sub_batch(params, batch, k):
            (loss, (blobs, new_params)), g = grad_fn(params, batch, train=True,
                                                     key=jax.random.fold_in(key, k))
            # new_params: running statistics (BatchNorm) advance per forward pass.
            return new_params, g, loss, net.outputs(blobs)

        params, grads, total_loss, outputs = sub_batch(params, batches[0], 0)
        if len(batches) > 1:
            # The other sub-batches in a loop, not unrolled: compile time stays that of one.
            def body(carry, xs):
                params, grads, total_loss, _ = carry
                params, g, loss, outputs = sub_batch(params, xs[1], xs[0])
                return (params, jax.tree.map(jnp.add, grads, g), total_loss + loss,
                        outputs), None

            rest = jax.tree.map(lambda *xs: jnp.stack(xs), *batches[1:])
            (params, grads, total_loss, outputs), _ = jax.lax.scan(
                body, (params, grads, total_loss, outputs),
                (jnp.arange(1, len(batches), dtype=jnp.int32), rest))
        # Caffe logs the mean loss over iter_size; gradients are summed (the solver divides).
        return total_loss / len(batches), grads, outputs, params

    def step_fn(self, params, opt_state, batches, it):
        """One Caffe iteration: (params, opt_state, [iter_size raw batches], it) → new state."""
        key = jax.random.fold_in(self.key, it)
        loss, grads, outputs, params = self._grads(params, batches, key)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, outputs

    def _multi_step(self, n: int):
        """A jitted program running ``n`` iterations (lax.scan) on device-resident data."""
        key = ("train", n)
        if key in self._compiled:
            return self._compiled[key]
        feed = self._feeds["train"]

        def run(params, opt_state, arrays, it0):
            def body(carry, i):
                params, opt_state = carry
                it = it0 + i
                batches = [feed.batch_at(arrays, it * self.sp.iter_size + k)
                           for k in range(self.sp.iter_size)]
                params, opt_state, loss, outputs = self.step_fn(params, opt_state, batches, it)
                return (params, opt_state), (loss, outputs)

            (params, opt_state), (losses, outputs) = jax.lax.scan(
                body, (params, opt_state), jnp.arange(n, dtype=jnp.int32))
            return params, opt_state, losses, outputs

        fn = jax.jit(run, donate_argnums=(0, 1))
        self._compiled[key] = fn
        return fn

    def _resident_step(self):
        """One iteration per dispatch, slicing its batch from device-resident data."""
        key = ("train", "resident1")
        if key not in self._compiled:
            feed = self._feeds["train"]

            def run(params, opt_state, arrays, it):
                batches = [feed.batch_at(arrays, it * self.sp.iter_size + k)
                           for k in range(self.sp.iter_size)]
                params, opt_state, loss, outputs = self.step_fn(params, opt_state, batches, it)
                return params, opt_state, loss[None], jax.tree.map(lambda x: x[None], outputs)

            self._compiled[key] = jax.jit(run, donate_argnums=(0, 1))
        return self._compiled[key]

    def _host_step(self):
        key = ("train", "host")
        if key not in self._compiled:
            def run(params, opt_state, batches, it):
                params, opt_state, loss, outputs = self.step_fn(params, opt_state, batches, it)
                return params, opt_state, loss[None], jax.tree.map(lambda x: x[None], outputs)

            self._compiled[key] = jax.jit(run, donate_argnums=(0, 1))
        return self._compiled[key]

    def run_iterations(self, n: int):
        """Runs ``n`` iterations from ``self.iter``; returns per-iteration losses and outputs."""
        self._setup_feeds()
        feed = self._feeds["train"]
        with jax.default_device(self.device):
            if feed.on_device and self.use_scan:
                fn = self._multi_step(n)
                self.params, self.opt_state, losses, outputs = fn(
                    self.params, self.opt_state, feed.arrays, jnp.int32(self.iter))
            elif feed.on_device:
                fn = self._resident_step()
                loss_list, out_list = [], []
                for i in range(n):
                    self.params, self.opt_state, l, o = fn(self.params, self.opt_state,
                                                           feed.arrays, jnp.int32(self.iter + i))
                    loss_list.append(l)
                    out_list.append(o)
                losses = jnp.concatenate(loss_list)
                outputs = jax.tree.map(lambda *xs: jnp.concatenate(xs), *out_list)
            else:
                fn = self._host_step()
                loss_list, out_list = [], []
                for i in range(n):
                    it = self.iter + i
                    batches = [feed.host_batch(it * self.sp.iter_size + k)
                               for k in range(self.sp.iter_size)]
                    self.params, self.opt_state, l, o = fn(self.params, self.opt_state, batches,
                                                           jnp.int32(it))
                    loss_list.append(l)
                    out_list.append(o)
                losses = jnp.concatenate(loss_list)
                outputs = jax.tree.map(lambda *xs: jnp.concatenate(xs), *out_list)
        self.iter += n
        return losses, outputs

    # -- testing -----------------------------------------------------------------------------
    def _test_fn(self, i: int, n: int):
        key = ("test", i, n)
        if key in self._compiled:
            return self._compiled[key]
        tn = self.test_nets[i]
        feed = self._feeds[i]

        def scores(params, batch):
            blobs = tn.apply(params, batch, train=False)
            return {k: jnp.asarray(v, jnp.float32) for k, v in tn.outputs(blobs).items()}

        if feed.on_device and not self.use_scan:
            def run(train_params, arrays, b):
                params = _share(train_params, self._test_own[i])
                return scores(params, feed.batch_at(arrays, b))
        elif feed.on_device:
            def run(train_params, arrays, b0):
                params = _share(train_params, self._test_own[i])

                def body(acc, j):
                    s = scores(params, feed.batch_at(arrays, b0 + j))
                    return jax.tree.map(jnp.add, acc, s), None

                zero = jax.tree.map(jnp.zeros_like,
                                    jax.eval_shape(scores, params, feed.batch_at(arrays, b0)))
                total, _ = jax.lax.scan(body, zero, jnp.arange(n, dtype=jnp.int32))
                return total
        else:
            def run(train_params, batch):
                return scores(_share(train_params, self._test_own[i]), batch)
        fn = jax.jit(run)
        self._compiled[key] = fn
        return fn

    def test(self, i: int = 0) -> dict[str, np.ndarray]:
        """Caffe's Solver::Test: the mean of each output of test net ``i`` over test_iter
        batches (not logged; ``test_all`` logs)."""
        return self._test_means(i, self._dispatch_test(i))

    def _dispatch_test(self, i: int):
        """Queues test net ``i``'s pass on the device; returns the (unsynchronised) sums."""
        self._setup_feeds()
        n = int(self.sp.test_iter[i])
        feed = self._feeds[i]
        b0 = self.tests_done * n  # Caffe's test reader continues where the last test stopped
        with jax.default_device(self.device):
            if feed.on_device and self.use_scan:
                return self._test_fn(i, n)(self.params, feed.arrays, jnp.int32(b0))
            if feed.on_device:
                fn = self._test_fn(i, 1)
                total = None
                for j in range(n):
                    s = fn(self.params, feed.arrays, jnp.int32(b0 + j))
                    total = s if total is None else jax.tree.map(jnp.add, total, s)
                return total
            fn = self._test_fn(i, 1)
            total = None
            for j in range(n):
                s = fn(self.params, feed.host_batch(b0 + j))
                total = s if total is None else jax.tree.map(jnp.add, total, s)
            return total

    def _test_means(self, i: int, total) -> dict[str, np.ndarray]:
        n = int(self.sp.test_iter[i])
        return {k: np.asarray(v) / n for k, v in jax.device_get(total).items()}

    def test_all(self) -> list[dict[str, np.ndarray]]:
        return self._log_tests(self.iter, [self._dispatch_test(i)
                                           for i in range(len(self.test_nets))])

    def _log_tests(self, it: int, totals) -> list[dict[str, np.ndarray]]:
        results = []
        for i, total in enumerate(totals):
            _log.info("Iteration %d, Testing net (#%d)", it, i)
            means = self._test_means(i, total)
            k = 0
            for name in self.test_nets[i].output_names:
                w = self.test_nets[i].output_loss_weight(name)
                for v in np.ravel(means[name]):
                    if w:
                        _log.info("    Test net output #%d: %s = %.6g (* %g = %.6g loss)",
                                  k, name, v, w, v * w)
                    else:
                        _log.info("    Test net output #%d: %s = %.6g", k, name, v)
                    k += 1
            results.append(means)
        self.tests_done += 1
        return results

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> tuple[str, str]:
        """Writes ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (atomically)."""
        from jcaffe import caffemodel
        from jcaffe import solver as solver_mod

        fmt = "hdf5" if self.sp.snapshot_format == _SP.HDF5 else "binaryproto"
        prefix = self.sp.snapshot_prefix
        if not prefix:
            prefix = os.path.splitext(self.solver_path or "jcaffe")[0]
        model_path, state_path = caffemodel.snapshot_filenames(prefix, self.iter, fmt)
        os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
        params, opt_state = jax.device_get((self.params, self.opt_state))
        kind = "HDF5" if fmt == "hdf5" else "binary proto"
        _log.info("Snapshotting to %s file %s", kind, model_path)
        caffemodel.save_caffemodel(model_path, self.net, params, fmt=fmt)
        _log.info("Snapshotting solver state to %s file %s", kind, state_path)
        history = solver_mod.history_to_caffe(opt_state, self.params_order())
        caffemodel.write_solverstate(state_path, iter=self.iter, learned_net=model_path,
                                     history=history,
                                     current_step=int(solver_mod.get_current_step(opt_state)),
                                     fmt=fmt)
        self.last_snapshot = state_path
        return model_path, state_path

    def restore(self, state_path: str) -> None:
        """Resumes from a ``.solverstate`` (and the ``.caffemodel`` it names), like Caffe."""
        from jcaffe import caffemodel
        from jcaffe import solver as solver_mod

        st = caffemodel.read_solverstate(state_path)
        model = st.learned_net
        if model and not os.path.exists(model):
            alt = os.path.join(os.path.dirname(state_path), os.path.basename(model))
            model = alt if os.path.exists(alt) else model
        params = jax.device_get(self.params)
        if model:
            params = self.net.copy_from(params, caffemodel.load_caffemodel(model), filename=model)
        with jax.default_device(self.device):
            self.params = jax.device_put(params, self.device)
            template = self.tx.init(self.params)
            self.opt_state = jax.device_put(solver_mod.history_from_caffe(
                template, st.history, self.params_order(), st.iter, st.current_step), self.device)
        self.iter = int(st.iter)
        sp = self.sp
        if sp.test_interval and len(self.test_nets):
            self.tests_done = sum(1 for m in range(0, self.iter, sp.test_interval)
                                  if m > 0 or sp.test_initialization)
        _log.info("Restoring previous solver status from %s (iteration %d)", state_path, self.iter)

    # -- the loop ----------------------------------------------------------------------------
    def request(self, action: str) -> None:
        """Asks the loop to 'stop' or 'snapshot' at the next iteration boundary (signals)."""
        self._requested = action

    def _chunk(self, stop_iter: int) -> int:
        sp = self.sp
        it = self.iter
        n = min(self.iters_per_call, stop_iter - it)
        for every in (sp.display, sp.test_interval if self.test_nets else 0, sp.snapshot):
            if every > 0:
                n = min(n, every - it % every)
        return max(1, n)

    def _test_due(self) -> bool:
        sp = self.sp
        return bool(sp.test_interval and self.test_nets and self.iter % sp.test_interval == 0
                    and (self.iter > 0 or sp.test_initialization))

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
        self._clock = (time.perf_counter(), self.iter)
        pending = None
        while self.iter < stop_iter:
            tests = None
            if self._test_due():
                tests = (self.iter, [self._dispatch_test(i) for i in range(len(self.test_nets))])
            start, n = self.iter, self._chunk(stop_iter)
            losses, outputs = self.run_iterations(n)
            if pending:
                self._finish_chunk(*pending)
            if tests:
                results["test"] = self._log_tests(*tests)
            pending = (start, n, losses, outputs)
            snapshot_due = sp.snapshot and self.iter % sp.snapshot == 0
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
                    _log.info("Optimization stopped early at iteration %d.", self.iter)
                    return results
        if pending:
            self._finish_chunk(*pending)
        if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0):
            self.snapshot()
        if sp.display and self.iter % sp.display == 0 and self.iter == stop_iter:
            self.losses.append(self.forward_loss())
            _log.info("Iteration %d, loss = %.6g", self.iter, float(np.mean(self.losses)))
        if sp.test_interval and self.test_nets and self.iter % sp.test_interval == 0:
            results["test"] = self.test_all()
        _log.info("Optimization Done.")
        return results

    def _finish_chunk(self, start: int, n: int, losses, outputs) -> None:
        """Reads a finished chunk's losses: divergence check, smoothing, Caffe's display."""
        from jcaffe import solver as solver_mod

        sp = self.sp
        losses = np.asarray(jax.device_get(losses))
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise SolverError(
                f"loss is {losses[bad[0]]} at iteration {start + int(bad[0])}: training "
                f"diverged (lower base_lr or set clip_gradients); last good snapshot: "
                f"{self.last_snapshot or 'none'}")
        shown = [j for j in range(n) if sp.display and (start + j) % sp.display == 0]
        if shown:
            outputs = jax.device_get(outputs)
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
            self._log_train_outputs({k: v[j] for k, v in outputs.items()})
            _log.info("Iteration %d, lr = %.6g", it, solver_mod.learning_rate(sp, it))
            self._clock = (now, it)

    def forward_loss(self) -> float:
        """The train net's loss on the next batch (Caffe's final display after training)."""
        feed = self._feeds["train"]
        key = ("train", "loss")
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                lambda p, b, it: self.net.loss(p, b, train=True,
                                               key=jax.random.fold_in(self.key, it))[0])
        batch = (feed.host_batch(self.iter * self.sp.iter_size) if not feed.on_device else
                 jax.jit(feed.batch_at)(feed.arrays, jnp.int32(self.iter * self.sp.iter_size)))
        return float(self._compiled[key](self.params, batch, jnp.int32(self.iter)))

    def _log_train_outputs(self, outputs: dict) -> None:
        k = 0
        for name in self.net.output_names:
            w = self.net.output_loss_weight(name)
            for v in np.ravel(outputs[name]):
                if w:
                    _log.info("    Train net output #%d: %s = %.6g (* %g = %.6g loss)", k, name, v,
                              w, v * w)
                else:
                    _log.info("    Train net output #%d: %s = %.6g", k, name, v)
                k += 1

    def close(self) -> None:
        if self._feeds:
            for f in self._feeds.values():
                f.close()


def _share(train_params, own_params):
    """Caffe's ShareTrainedLayersWith: test layers take the train blobs of the same name."""
    out = {}
    for name, blobs in own_params.items():
        out[name] = train_params[name] if name in train_params else blobs
    return out


class _NetFeed:
    """Raw batches for all data layers of one net, addressed by batch index.

    Batch ``k`` of a layer starts at stream position ``start + k·batch_size`` (``start``
    includes ``rand_skip``), whether the dataset is device-resident (sliced inside the jitted
    program) or read ahead on the host: both paths give identical batches, and a resumed run
    finds its place from the iteration alone.
    """

    def __init__(self, net: Net, device, on_device, seed: int):
        from jcaffe.data import feed as feed_mod

        self.feeders = [feed_mod.choose_feeder(layer, on_device=on_device, device=device,
                                               seed=seed + i)
                        for i, layer in enumerate(net.data_layers)]
        self.on_device = all(isinstance(f, feed_mod.DeviceResident) for f in self.feeders)
        if not self.on_device and any(isinstance(f, feed_mod.DeviceResident)
                                      for f in self.feeders):
            # Mixed placement: keep one path (the host one) so batches stay aligned.
            for f in self.feeders:
                f.close()
            self.feeders = [feed_mod.choose_feeder(layer, on_device=False, device=device,
                                                   seed=seed + i)
                            for i, layer in enumerate(net.data_layers)]
        self.arrays = [f.arrays for f in self.feeders] if self.on_device else None
        self._start = [f.cursor0 if self.on_device else f.position for f in self.feeders]
        self._next = [0] * len(self.feeders)
        self._label_rules = label_rules(net)
        if self.on_device:
            for f, layer, arrays in zip(self.feeders, net.data_layers, self.arrays):
                for top in f.tops:
                    if top in self._label_rules:
                        check_labels(np.asarray(jax.device_get(arrays[top])), 0,
                                     self._label_rules[top], layer)

    def batch_at(self, arrays, batch_index):
        """Batch ``batch_index`` (a traced int) sliced from device-resident ``arrays``."""
        out = {}
        for f, a, start in zip(self.feeders, arrays, self._start):
            k = jnp.asarray(batch_index, jnp.int32)
            cursor = jnp.remainder(jnp.int32(start % f.count) +
                                   jnp.remainder(k * jnp.int32(f.batch_size), jnp.int32(f.count)),
                                   jnp.int32(f.count))
            out.update(f.batch_at(a, cursor))
        return out

    def host_batch(self, batch_index: int):
        """Batch ``batch_index`` from the prefetching host readers."""
        out = {}
        for i, (f, start) in enumerate(zip(self.feeders, self._start)):
            if batch_index != self._next[i]:
                f.seek(start + batch_index * f.reader.batch_size)
            batch = next(f)
            for top, rule in self._label_rules.items():
                if top in batch:
                    check_labels(np.asarray(batch[top]), start + batch_index * f.reader.batch_size,
                                 rule, f.reader.layer, count=f.reader.count)
            out.update(batch)
            self._next[i] = batch_index + 1
        return out

    def close(self):
        for f in self.feeders:
            f.close()


_LABEL_LAYERS = ("SoftmaxWithLoss", "Accuracy", "MultinomialLogisticLoss", "InfogainLoss",
                 "HingeLoss")


def label_rules(net: Net) -> dict[str, tuple[str, int, int | None]]:
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


def check_labels(labels: np.ndarray, first_position: int, rule, data_layer, count=None) -> None:
    """A label outside [0, classes) would silently index out of range inside the program
    (Caffe aborts there): fail on the host, naming the dataset record."""
    name, classes, ignore = rule
    lab = labels.reshape(-1).astype(np.int64)
    bad = (lab < 0) | (lab >= classes)
    if ignore is not None:
        bad &= lab != ignore
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        record = first_position + j
        if count:
            record %= count
        source = data_layer.param.data_param.source or data_layer.name
        raise DataError(f"{source}: record {record}: label {int(lab[j])} is out of range for "
                        f"layer '{name}', which has {classes} classes (0..{classes - 1})")


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


def train_main(args) -> int:
    """Runs ``caffe train`` from parsed flags (solver, weights, snapshot, gpu, cpu, iterations)."""
    from jcaffe import prototxt

    log.setup()
    if args.weights and args.snapshot:
        raise SolverError("give --weights or --snapshot, not both (as Caffe)")
    sp = prototxt.read_solver(args.solver)
    gpu = None
    if args.gpu:
        gpu = "all" if args.gpu == "all" else [int(g) for g in args.gpu.split(",")]
    device = select_device(sp.solver_mode if sp.HasField("solver_mode") else _SP.GPU,
                           sp.device_id, explicit_gpu=gpu, force_cpu=args.cpu)
    if args.iterations is not None:
        sp.max_iter = args.iterations
    trainer = Trainer(sp, solver_path=args.solver, device=device, weights=args.weights or None,
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
    parser.add_argument("--weights", default="", help="caffemodel(s) to fine-tune from, comma-separated")
    parser.add_argument("--snapshot", default="", help="a .solverstate to resume from")
    parser.add_argument("--gpu", default="", help="GPU ids (comma-separated) or 'all'")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU whatever the solver says")
    parser.add_argument("--iterations", type=int, default=None, help="override max_iter")
    parser.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
    parser.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
    parser.add_argument("--iters_per_call", type=int, default=100,
                        help="iterations fused into one device program (device-resident data)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jcaffe.train SOLVER [flags]`` is ``jcaffe train --solver=SOLVER [flags]``."""
    from jcaffe.cli import main as cli_main

    return cli_main(["train"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
