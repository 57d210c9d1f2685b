"""Caffe's ``Solver::Init``: the devices, PRNG streams, train and test nets (test nets share
the train net's weights by layer name), the update rule, fine-tuning weights and the first
``TrainState`` of a solver; and the log lines the solver writes about its nets.
"""

from __future__ import annotations

import os
import secrets
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import execution, log, parallel, sgd_solvers
from jcaffe.config import Config
from jcaffe.errors import SolverError
from jcaffe.net import Net
from jcaffe.programs import share_params
from jcaffe.proto import caffe_pb2
from jcaffe.train_step import TrainState, prng_streams

_log = log.get_logger("solver")


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


def choose_devices(sp, devices, device) -> list[jax.Device]:
    """The run's devices: ``devices``, ``[device]`` or the solver's (one platform)."""
    if device is not None and devices is not None:
        raise SolverError("give device or devices, not both")
    chosen = list(devices if devices is not None else
                  [device] if device is not None else parallel.select_devices(sp))
    platforms = {d.platform for d in chosen}
    if len(platforms) != 1:
        raise SolverError(f"devices of one platform only, got {sorted(platforms)}")
    return chosen


def root_seed(sp, verbose: bool) -> int:
    """``random_seed``, or (-1) a drawn seed every process agrees on, logged."""
    seed = int(sp.random_seed)
    if seed < 0:
        seed = secrets.randbits(31)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
        if verbose:
            _log.info("random_seed is -1: using root seed %d (set random_seed: %d to "
                      "repeat this run)", seed, seed)
    return seed


def _weights_list(sp, weights) -> list[str]:
    if weights is None:
        return list(sp.weights)
    return [w for w in weights.split(",") if w] if isinstance(weights, str) else list(weights)


class SolverInit:
    """The parts of a solver fixed at construction (see the module docstring): ``sp``,
    ``devices``, ``mesh``, ``root_device``, ``config``, ``seed``, ``net``, ``test_nets``,
    ``tx``, and the ``state`` with its views ``params`` and ``opt_state``."""

    def __init__(self, solver, *, solver_path, devices, device, config, weights, verbose):
        from jcaffe import prototxt

        if isinstance(solver, (str, os.PathLike)):
            solver_path = os.fspath(solver)
            solver = prototxt.read_solver(solver_path)
        self.sp = sp = solver
        self.solver_path = solver_path
        self.verbose = verbose
        if sp.max_iter < 0:
            raise SolverError("max_iter must be >= 0")
        self.devices = choose_devices(sp, devices, device)
        self.ranks = len(self.devices)
        self.mesh = parallel.make_mesh(self.devices) if self.ranks > 1 else None
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        if not local:
            raise SolverError(f"process {jax.process_index()} owns none of the devices")
        self.root_device = local[0]
        self.config = (config or Config()).resolved(self.devices[0].platform)
        self._share_decode_cores(verbose)
        if verbose:
            _log.info("Using %s", ", ".join(str(d) for d in self.devices) if self.ranks < 9
                      else f"{self.ranks} {self.devices[0].platform} devices")
            _log.info("Initializing solver from parameters:\n%s", _short_text(sp))
        _warn_fields(sp)
        self.seed = root_seed(sp, verbose)
        self._streams = streams = prng_streams(jax.random.key(self.seed))
        # The step stream's key lives in the (donated) state; keep a host copy to rebuild it.
        self._step_key_data = np.asarray(jax.random.key_data(streams.step))
        with jax.default_device(self.root_device):
            self._init_nets()
            self.tx = sgd_solvers.build_solver(sp, self.net)
            params = self.net.init(streams.init)
            self._test_own = [tn.init(jax.random.fold_in(streams.test, i), skip=share)
                              for i, (tn, share) in enumerate(zip(self.test_nets,
                                                                  self._test_share))]
            weights = _weights_list(sp, weights)
            if weights:
                params = self.load_weights(params, weights)
            # One compiled program for all history buffers (op by op, each shape compiles
            # alone); committed to the device like the step's outputs, so nothing recompiles.
            state = TrainState(params, jax.jit(self.tx.init)(params), jnp.zeros((), jnp.int32),
                               self._step_key())
        self._set_state(state)
        if self.mesh is not None and verbose:
            _log.info("Data parallel on %d devices: batch %s per device; gradients averaged "
                      "over devices (layer_wise_reduce: XLA schedules the all-reduce)",
                      self.ranks, [l.batch_size for l in self.net.data_layers
                                   if hasattr(l, "batch_size")] or "?")

    def _share_decode_cores(self, verbose: bool) -> None:
        """Decode workers by default: the cores available, divided among the run's processes
        that share them on this host (two processes on one host would each start one per
        core); ``decode_workers`` set explicitly is kept."""
        if self.config.decode_workers or jax.process_count() == 1:
            return
        from jcaffe.data.workers import available_cores

        sharers = parallel.processes_sharing_cores()
        if sharers > 1:
            cores = available_cores()
            workers = max(1, cores // sharers)
            self.config = self.config.replace(decode_workers=workers)
            if verbose:
                _log.info("Decode workers: %d per process (%d cores shared by %d processes of "
                          "this run on this host; --decode_workers sets it)", workers, cores,
                          sharers)

    def _init_nets(self) -> None:
        (train_param, train_state, train_file), tests = solver_nets(self.sp)
        self.net = Net(train_param, state=train_state, config=self.config, verbose=self.verbose,
                       source=train_file)
        self.test_nets = [Net(p, state=st, config=self.config, verbose=self.verbose, source=f)
                          for p, st, f in tests]
        # Which train layer each test layer shares with (a NetError names a layer whose
        # blob counts or shapes differ).
        self._test_share = [tn.shared_layer_keys(self.net) for tn in self.test_nets]
        if self.verbose:
            execution.log_formulation(self.net.plan, self.config.platform)

    def _step_key(self) -> jax.Array:
        return jax.random.wrap_key_data(jnp.asarray(self._step_key_data))

    def _set_state(self, state: TrainState) -> None:
        if self.mesh is not None:
            state = parallel.put_replicated(state, self.mesh)
        else:
            state = jax.device_put(state, self.root_device)
        self.state = state

    @property
    def params(self):
        return self.state.params

    @property
    def opt_state(self):
        return self.state.opt_state

    def params_order(self) -> list[tuple[str, int]]:
        """Caffe's learnable_params order: owned blobs in layer order."""
        from jcaffe.snapshot import params_order

        return params_order(self.net)

    def load_weights(self, params, weights: Sequence[str]):
        """Caffe's CopyTrainedLayersFrom for each file: the train net's params, and the test
        nets' own layers too."""
        from jcaffe.caffemodel import load_caffemodel

        for w in weights:
            if self.verbose:
                _log.info("Finetuning from %s", w)
            source = load_caffemodel(w)
            params = self.net.copy_from(params, source, filename=w)
            self._test_own = [tn.copy_from(own, source, filename=w)
                              for tn, own in zip(self.test_nets, self._test_own)]
        return params

    def test_params(self, i: int, params=None):
        """Test net ``i``'s params: the train net's blobs for layers of the same name."""
        train = parallel.root_view(self.params if params is None else params)
        return share_params(train, self._test_own[i], self._test_share[i])


def _warn_fields(sp) -> None:
    if sp.snapshot_diff:
        _log.warning("snapshot_diff: true is not supported: snapshots hold weights only "
                     "(gradients are not kept between iterations)")
    if sp.debug_info:
        _log.info("debug_info: per-layer data/diff norms are logged at display iterations")


def _short_text(msg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg, as_one_line=False).rstrip()


def log_outputs(kind: str, net: Net, values: dict) -> None:
    """Caffe's ``Train net output #k: name = v (* w = v·w loss)`` lines (and ``Test``)."""
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


def log_debug_info(net: Net, blobs, grads, params) -> None:
    """Caffe's ``debug_info`` lines from host copies of the blobs, gradients and params."""
    asum = lambda x: float(np.mean(np.abs(np.asarray(x, np.float64))))  # noqa: E731
    for layer in net.layers:
        for t in layer.top_names:
            _log.info("    [Forward] Layer %s, top blob %s data: %.6g", layer.name, t,
                      asum(blobs[t]))
    for p in net.params_info:
        _log.info("    [Backward] Layer %s, param blob %d diff: %.6g", p.layer, p.index,
                  asum(grads[p.layer][p.index]))
        _log.info("    [Update] Layer %s, param blob %d data: %.6g", p.layer, p.index,
                  asum(params[p.layer][p.index]))
