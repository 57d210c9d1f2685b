"""What a solver puts on disk and takes back: Caffe's ``Solver::Snapshot`` / ``Restore``.

A snapshot at iteration N is ``<prefix>_iter_N.caffemodel`` (the train net's weights) and
``<prefix>_iter_N.solverstate`` (``SolverState``: ``iter``, ``learned_net``, the update rule's
history blobs in Caffe's ``learnable_params`` order, ``current_step``), or their HDF5 forms;
both are written atomically (``jcaffe._atomic``). ``TrainState.iter`` is the iteration count
written and restored; the update rule's own counters (``iter_``, ``current_step_``) come back
from the same record, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from jcaffe import caffemodel, log, parallel, sgd_solvers
from jcaffe.errors import JcaffeError, reworded
from jcaffe.proto import caffe_pb2
from jcaffe.train_step import TrainState

_log = log.get_logger("solver")


def params_order(net) -> list[tuple[str, int]]:
    """Caffe's learnable_params order: owned blobs in layer order."""
    return [(p.layer, p.index) for p in net.params_info]


def snapshot_format(sp: caffe_pb2.SolverParameter) -> str:
    return "hdf5" if sp.snapshot_format == caffe_pb2.SolverParameter.HDF5 else "binaryproto"


def snapshot_paths(sp: caffe_pb2.SolverParameter, solver_path: str | None,
                   it: int) -> tuple[str, str]:
    """Caffe's SnapshotFilename: ``snapshot_prefix`` (default: the solver file's stem)."""
    prefix = sp.snapshot_prefix or os.path.splitext(solver_path or "jcaffe")[0]
    return caffemodel.snapshot_filenames(prefix, it, snapshot_format(sp))


def save(sp: caffe_pb2.SolverParameter, solver_path: str | None, net, state: TrainState, *,
         last_good: str | None) -> tuple[str, str]:
    """Writes the snapshot of ``state`` (the root device's copy); returns ``(model, state)``
    paths. In a multi-process run only process 0 writes. ``last_good`` (the last snapshot
    written) is named when writing fails, for the resume."""
    params, opt_state, it = parallel.local_copy((state.params, state.opt_state, state.iter))
    it = int(it)
    model_path, state_path = snapshot_paths(sp, solver_path, it)
    if not parallel.is_main_process():
        return model_path, state_path
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    fmt = snapshot_format(sp)
    kind = "HDF5" if fmt == "hdf5" else "binary proto"
    try:
        _log.info("Snapshotting to %s file %s", kind, model_path)
        caffemodel.save_caffemodel(model_path, net, params, fmt=fmt)
        _log.info("Snapshotting solver state to %s file %s", kind, state_path)
        history = sgd_solvers.history_to_caffe(opt_state, params_order(net))
        caffemodel.write_solverstate(
            state_path, iter=it, learned_net=model_path, history=history,
            current_step=sgd_solvers.get_current_step(opt_state), fmt=fmt)
    except JcaffeError as e:
        # A full disk or a vanished folder: say which snapshot a resume can still use.
        raise reworded(e, f"{e} (last good snapshot: {last_good or 'none'})") from None
    return model_path, state_path


def restore(state_path: str, net, tx, params, key) -> TrainState:
    """The ``TrainState`` a ``.solverstate`` (and the ``.caffemodel`` it names) describes,
    on the default device; ``params``: those the model file leaves alone; ``key``: the run's
    step stream. Any device count can continue any snapshot."""
    st = caffemodel.read_solverstate(state_path)
    model = st.learned_net
    if model and not os.path.exists(model):
        # A moved snapshot folder: the model beside the solverstate.
        alt = os.path.join(os.path.dirname(state_path), os.path.basename(model))
        model = alt if os.path.exists(alt) else model
    params = parallel.local_copy(params)
    if model:
        params = net.copy_from(params, caffemodel.load_caffemodel(model), filename=model)
    template = tx.init(params)
    try:
        opt_state = sgd_solvers.history_from_caffe(template, st.history, params_order(net),
                                                   st.iter, st.current_step)
    except JcaffeError as e:
        raise reworded(e, f"{state_path}: {e}") from None
    return TrainState(params, opt_state, jnp.asarray(int(st.iter), jnp.int32), key)
