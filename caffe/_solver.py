"""pycaffe's solvers on jcaffe's core solver.

``SGDSolver(file)`` (and Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) reads a solver prototxt and
trains with jcaffe's fused step: ``step(n)`` runs ``n`` iterations with Caffe's ``Step``
semantics (tests at ``test_interval``, display lines, snapshots) as compiled, scanned chunks.

``net`` and ``test_nets`` are ``caffe.Net`` objects whose parameter Blobs *are* the solver's:
a test net's layer shared with the train net (Caffe's ``ShareTrainedLayersWith``) holds the
same Blob object. Before the core solver runs, parameters the user touched (watched Blobs) go
to it; afterwards its parameters come back (by reference, no copy, for Blobs the user never
touched). After ``step(n)``, the train net's blobs hold the last iteration's values, as in
Caffe: the last iteration's forward pass is recomputed, from the parameters before its update
and the batch and random key it used, when a train-net blob is first read (at once when one
is watched, so views taken earlier see them).

Data. A solver's nets read their batches from the core solver's feeds (one reader per
database, as LMDB allows one handle per process): ``net.forward()`` reads batch 0, 1, ... of
that net's stream, with its own count, so it does not move the batches ``step`` trains on or
``test_all`` tests on (in Caffe the user and the solver share one position).

Differences from Caffe: after ``step`` the parameter diffs are left as they were (Caffe
leaves the last update value there); the batch positions above.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.proto import caffe_pb2

from caffe import _state
from caffe.pycaffe import Net

_log = log.get_logger("pycaffe")


# ---------------------------------------------------------------------------------------------
# What the pycaffe solver asks of jcaffe's core Solver (``jcaffe.Solver``).
# ---------------------------------------------------------------------------------------------
def _make_core(sp: caffe_pb2.SolverParameter, path: str, device):
    from jcaffe.solver import Solver as CoreSolver

    return CoreSolver(sp, solver_path=path, device=device, verbose=True)


def _core_batch(core, it: int, sub: int = 0) -> dict:
    """The raw batch (top -> array) of sub-batch ``sub`` of iteration ``it``."""
    batch = core.batch(it)
    return batch if core.sp.iter_size == 1 else {k: v[sub] for k, v in batch.items()}


def _core_key(core, it: int, sub: int = 0) -> jax.Array:
    """The key the forward pass of sub-batch ``sub`` of iteration ``it`` drew from."""
    return jax.random.fold_in(core.step_key(it), sub)


def _core_feed_batches(core, net: int | str):
    """``fn(b) -> {top: array}``: batch ``b`` of the core solver's feed of ``net`` ("train"
    or a test net's index), the root device's share."""
    from jcaffe import parallel

    fns = {}

    def batch(b: int) -> dict:
        core._setup_feeds()
        feed = core._feeds[net]
        if net == "train":
            return core._root_batch(b)
        if not feed.on_device:
            return {k: np.asarray(v) for k, v in feed.host_batch(b).items()}
        if "fn" not in fns:
            fns["fn"] = jax.jit(lambda arrays, i: feed.batch_at(arrays, i, 0))
        return fns["fn"](parallel.root_view(feed.arrays), jnp.int32(b))

    return batch


def _core_set_params(core, params) -> None:
    from jcaffe.train_step import TrainState

    s = core.state
    core._set_state(TrainState(params, s.opt_state, s.iter, s.key))


# ---------------------------------------------------------------------------------------------
# The solvers
# ---------------------------------------------------------------------------------------------
class Solver:
    """pycaffe's Solver (``get_solver(file)`` picks the class the solver's ``type`` names)."""

    _type: str | None = None  # the Caffe type a subclass forces (SGDSolver -> "SGD")

    def __init__(self, filename):
        from jcaffe import prototxt

        filename = os.fsdecode(filename)
        _check_file(filename)
        with _state.caffe_errors():
            sp = prototxt.read_solver(filename)
            if self._type is not None:
                sp.ClearField("solver_type")
                sp.type = self._type
            device = _state.device()
            self._core = core = _make_core(sp, filename, device)
        self.param = sp
        train = Net._from_core(core.net, params=core.params, device=device)
        self._net = train
        self._test_nets = []
        for i, tn in enumerate(core.test_nets):
            shared = {}
            for mine, theirs in core._test_share[i].items():
                for j, src in enumerate(tn._blob_source[mine]):
                    if src == (mine, j):
                        shared[src] = train._param_blobs[core.net._blob_source[theirs][j]]
            self._test_nets.append(Net._from_core(tn, params=core._test_own[i], device=device,
                                                  shared=shared))
        train._batch_source = _core_feed_batches(core, "train")
        for i, tn in enumerate(self._test_nets):
            tn._batch_source = _core_feed_batches(core, i)
        self._callbacks: list = []
        # (params before the last update, its iteration, its batch): the train blobs' values.
        self._last = None
        for blob in list(train._blobs.values()) + list(train._hidden.values()):
            blob._refresh = self._refresh_train_blobs

    # -- Caffe's accessors ------------------------------------------------------------------
    @property
    def net(self) -> Net:
        return self._net

    @property
    def test_nets(self) -> list[Net]:
        return self._test_nets

    @property
    def iter(self) -> int:
        return self._core.iter

    @property
    def lr(self) -> float:
        """The learning rate of the current iteration (Caffe's ``GetLearningRate``)."""
        from jcaffe.sgd_solvers import learning_rate

        return float(learning_rate(self.param, self.iter))

    # -- parameters between the Blobs and the core solver -------------------------------------
    def _owners(self):
        return [(p.layer, p.index) for p in self._core.net.params_info] or [
            src for srcs in self._core.net._blob_source.values() for src in srcs]

    def _push(self) -> None:
        """The train net's parameter Blobs into the core solver's state."""
        core_net = self._core.net
        params = {l.name: [self._net._param_blobs[src]._get("data") if src == (l.name, j)
                           else None for j, src in enumerate(core_net._blob_source[l.name])]
                  for l in core_net.layers if l.blob_shapes}
        _core_set_params(self._core, params)

    def _pull(self) -> None:
        """The core solver's parameters into the train net's Blobs (shared by test nets)."""
        params = self._core.params
        for (k, j), blob in self._net._param_blobs.items():
            v = params[k][j]
            if v is not None:
                blob._put("data", v)

    def _refresh_train_blobs(self) -> None:
        """Recomputes the last iteration's forward pass into the train net's blobs."""
        last, self._last = self._last, None
        if last is None:
            return
        params, it, batch = last
        core = self._core
        net = self._net
        net._forward(0, len(net.layers) - 1, params=params,
                     key=_core_key(core, it, core.sp.iter_size - 1), inputs=batch)

    def _run(self, fn) -> None:
        self._push()
        try:
            with jax.default_device(self._net._device), _state.caffe_errors():
                fn()
        finally:
            self._pull()

    # -- Caffe's Solver ---------------------------------------------------------------------
    def step(self, iters: int) -> None:
        """Caffe's ``Step(iters)`` (``jcaffe.Solver.step``: tests at ``test_interval``,
        display lines, snapshots; iterations between events fused); afterwards the train net's
        blobs hold the last iteration's values."""
        iters = int(iters)
        if iters <= 0:
            return
        if self._callbacks:
            for _ in range(iters):
                self._step_with_callbacks()
            return
        core = self._core

        def run():
            if iters > 1:
                core.step(iters - 1)
            before = jax.tree.map(jnp.copy, core.params)
            it = core.iter
            # Read now: a stream that makes batches in order keeps only the latest few.
            batch = _core_batch(core, it, core.sp.iter_size - 1)
            core.step(1)
            self._last = (before, it, batch)

        self._run(run)
        if any(b._watched("data") for b in self._net._blobs.values()):
            self._refresh_train_blobs()

    def _step_with_callbacks(self) -> None:
        """One iteration as Caffe runs it with callbacks: ``on_start``, forward/backward into
        the Blobs, ``on_gradients_ready``, ``apply_update``."""
        core = self._core
        sp = self.param
        if sp.test_interval and core.test_nets and self.iter % sp.test_interval == 0 and (
                self.iter > 0 or sp.test_initialization):
            self._run(core.test_all)
        for on_start, _ in self._callbacks:
            on_start()
        net = self._net
        net.clear_param_diffs()
        loss = 0.0
        for sub in range(sp.iter_size):
            net._forward(0, len(net.layers) - 1, key=_core_key(core, self.iter, sub),
                         inputs=_core_batch(core, self.iter, sub))
            net._backward(len(net.layers) - 1, 0)
            loss += sum(float(np.sum(net._blob(t).data)) * w
                        for l, ws in zip(net._core.layers, net._core.loss_weights)
                        for t, w in zip(l.top_names, ws) if w)
        if sp.display and self.iter % sp.display == 0:
            _log.info("Iteration %d, loss = %.6g", self.iter, loss / sp.iter_size)
        for _, on_gradients_ready in self._callbacks:
            on_gradients_ready()
        self.apply_update()
        s = core.state
        from jcaffe.sgd_solvers import _find, _replace, history_state
        from jcaffe.train_step import TrainState

        hs = history_state(s.opt_state)
        opt = _replace(s.opt_state, _find(s.opt_state), hs._replace(iter=hs.iter + 1))
        core._set_state(TrainState(s.params, opt, s.iter + 1, s.key))
        if sp.snapshot and self.iter % sp.snapshot == 0:
            self.snapshot()

    def solve(self, resume_file=None) -> None:
        """Caffe's ``Solve``: restores ``resume_file`` if given, trains to ``max_iter``,
        snapshots (``snapshot_after_train``) and runs the final test."""
        if resume_file is not None:
            self.restore(resume_file)
        self._last = None
        self._run(self._core.solve)
        self._last = None

    def snapshot(self) -> None:
        """Writes ``<snapshot_prefix>_iter_<iter>.caffemodel`` and ``.solverstate``."""
        self._run(self._core.snapshot)

    def restore(self, state_file) -> None:
        """Resumes from a ``.solverstate`` (and the weights it names)."""
        state_file = os.fsdecode(state_file)
        _check_file(state_file)
        self._last = None
        self._run(lambda: self._core.restore(state_file))

    def apply_update(self) -> None:
        """Caffe's ``ApplyUpdate``: the update the solver computes from the parameter diffs at
        the current iteration (learning rate policy, regularization, history) is applied to
        the parameters; the diffs then hold the update value (``data -= diff``). The
        iteration count does not move."""
        import optax

        from jcaffe.sgd_solvers import _find, _replace, history_state
        from jcaffe.train_step import TrainState

        self._push()
        core = self._core
        net = self._net
        core_net = core.net
        grads = {l.name: [net._param_blobs[src]._get("diff") if src == (l.name, j) else None
                          for j, src in enumerate(core_net._blob_source[l.name])]
                 for l in core_net.layers if l.blob_shapes}
        s = core.state
        with jax.default_device(net._device):
            updates, opt = core.tx.update(grads, s.opt_state, s.params)
            params = optax.apply_updates(s.params, updates)
        hs = history_state(s.opt_state)
        opt = _replace(opt, _find(opt), history_state(opt)._replace(iter=hs.iter))
        core._set_state(TrainState(params, opt, s.iter, s.key))
        self._pull()
        for (k, j), blob in net._param_blobs.items():
            if updates[k][j] is not None:
                blob._put("diff", -updates[k][j])

    def add_callback(self, on_start, on_gradients_ready) -> None:
        """Caffe's solver callbacks: ``on_start()`` before each iteration's forward pass,
        ``on_gradients_ready()`` after its backward pass (the diffs are in the Blobs). With
        callbacks, iterations run one at a time through the Blobs instead of fused."""
        self._callbacks.append((on_start, on_gradients_ready))

    def share_weights(self, net: Net) -> None:
        """``net`` takes the train net's parameter Blobs (Caffe's ``ShareTrainedLayersWith``)."""
        net.share_with(self._net)

    def __repr__(self) -> str:
        return f"<caffe.{type(self).__name__} iter={self.iter}>"


class SGDSolver(Solver):
    _type = "SGD"


class NesterovSolver(Solver):
    _type = "Nesterov"


class AdaGradSolver(Solver):
    _type = "AdaGrad"


class RMSPropSolver(Solver):
    _type = "RMSProp"


class AdaDeltaSolver(Solver):
    _type = "AdaDelta"


class AdamSolver(Solver):
    _type = "Adam"


_BY_TYPE = {c._type: c for c in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                 AdaDeltaSolver, AdamSolver)}


def get_solver(filename) -> Solver:
    """The solver class the file's ``type`` (or legacy ``solver_type``) names."""
    from jcaffe import prototxt
    from jcaffe.sgd_solvers import solver_type

    filename = os.fsdecode(filename)
    _check_file(filename)
    with _state.caffe_errors():
        kind = solver_type(prototxt.read_solver(filename))
    return _BY_TYPE[kind](filename)


def _check_file(path: str) -> None:
    from caffe.pycaffe import _check_file as check

    check(path)


__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "get_solver"]
