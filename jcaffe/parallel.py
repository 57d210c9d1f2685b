"""Devices, meshes and processes: Caffe's ``solver_mode`` / ``--gpu`` on XLA devices.

Caffe's multi-GPU training (``docs/multigpu.md``) runs the prototxt's ``batch_size`` on each
of N devices, sums the gradients and scales them by 1/N, gives device r the records whose
offset is r modulo N, and leaves the learning rate alone: N devices × batch B update exactly
as one device with batch N·B over the same records. jcaffe declares this on JAX's SPMD
machinery: a one-axis :class:`jax.sharding.Mesh` (axis ``"data"``) over the chosen devices,
the train step under ``shard_map`` with a ``pmean`` of the gradients, parameters and solver
history replicated. Many hosts join through ``jax.distributed`` (``initialize``); the mesh then
spans every process's devices, process 0 logs and writes snapshots.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from jcaffe import log
from jcaffe.errors import SolverError
from jcaffe.proto import caffe_pb2

_log = log.get_logger("solver")

DATA_AXIS = "data"
_SP = caffe_pb2.SolverParameter


def parse_ids(value: str, flag: str) -> str | list[int]:
    """``"all"`` or a comma-separated list of device ids (Caffe's ``--gpu 0,2``)."""
    value = value.strip()
    if value == "all":
        return "all"
    try:
        ids = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SolverError(f"--{flag}: expected 'all' or comma-separated device ids, "
                          f"got {value!r}") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise SolverError(f"--{flag}: expected distinct device ids >= 0, got {value!r}")
    return ids


def _platform_devices(platform: str) -> list[jax.Device]:
    try:
        return jax.devices(platform)
    except RuntimeError:
        return []


def _pick(devices: list[jax.Device], ids, what: str) -> list[jax.Device]:
    """Devices ``ids`` of each process (ids are local to a machine, as Caffe's)."""
    by_process: dict[int, list[jax.Device]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    chosen = []
    for p in sorted(by_process):
        local = by_process[p]
        if ids == "all":
            chosen.extend(local)
            continue
        for i in ids:
            if not 0 <= i < len(local):
                raise SolverError(f"{what} {i} requested but only {len(local)} exist"
                                  + (f" on process {p}" if len(by_process) > 1 else ""))
            chosen.append(local[i])
    return chosen


def select_devices(solver_param: caffe_pb2.SolverParameter | None = None, *,
                   gpu: str | list[int] | None = None, devices: str | list[int] | None = None,
                   force_cpu: bool = False) -> list[jax.Device]:
    """The devices a run trains on, as ``caffe train`` picks them.

    ``--gpu`` (``gpu``) wins and is an error without a GPU; otherwise the solver's
    ``solver_mode: GPU`` picks GPU ``device_id`` (falling back to the CPU with a warning when
    JAX has no GPU); an unset ``solver_mode`` means CPU, as in ``caffe train``. ``--cpu``
    (``force_cpu``) forces the CPU. ``devices`` (``"all"`` or ids) chooses several devices of
    the chosen platform, e.g. virtual CPU devices (``JAX_NUM_CPU_DEVICES``)."""
    if gpu is not None and force_cpu:
        raise SolverError("give --gpu or --cpu, not both")
    if gpu is not None and devices is not None:
        raise SolverError("give --gpu or --devices, not both")
    if force_cpu:
        platform, ids = "cpu", devices if devices is not None else [0]
    elif gpu is not None:
        if not _platform_devices("gpu"):
            raise SolverError("--gpu was given but no GPU is available to JAX (install "
                              "jcaffe[gpu] on a machine with a CUDA GPU, or use --cpu)")
        platform, ids = "gpu", gpu
    else:
        sp = solver_param
        wants_gpu = sp is not None and sp.HasField("solver_mode") and sp.solver_mode == _SP.GPU
        if wants_gpu and not _platform_devices("gpu"):
            _log.warning("solver_mode is GPU but no GPU is available: running on CPU")
            wants_gpu = False
        platform = "gpu" if wants_gpu else "cpu"
        if devices is not None:
            ids = devices
        else:
            ids = [int(sp.device_id) if (sp is not None and wants_gpu) else 0]
    what = "GPU" if platform == "gpu" else f"{platform.upper()} device"
    return _pick(_platform_devices(platform), ids, what)


def make_mesh(devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """A one-axis mesh (``"data"``) over ``devices``, in the order given."""
    return jax.sharding.Mesh(np.asarray(list(devices), dtype=object), (DATA_AXIS,))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh, axis: int = 0) -> jax.sharding.NamedSharding:
    spec = [None] * axis + [DATA_AXIS]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def put_global(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every process) as a global array of ``sharding``; each
    process fills only its own devices' pieces."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_replicated(tree, mesh: jax.sharding.Mesh):
    """Host (or single-device) arrays replicated on every device of ``mesh``."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return put_global(np.asarray(jax.device_get(root_view(x))), sharding)

    return jax.tree.map(put, tree)


def put_sharded(tree, mesh: jax.sharding.Mesh, axis: int = 0):
    """Host arrays (the global batch) split along ``axis`` over the mesh's data axis; arrays
    already split that way (each process's share, ``jcaffe.data.netfeed``) pass as they are."""
    sharding = batch_sharded(mesh, axis)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return put_global(np.asarray(x), sharding)

    return jax.tree.map(put, tree)


def root_view(tree):
    """(Replicated) arrays as this process's first device's copy, without copying: the root
    solver's values, which Caffe tests, logs and snapshots."""
    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_shards[0].data
        return x

    return jax.tree.map(one, tree)


def local_copy(tree):
    """Host (numpy) copies of ``root_view(tree)``."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), root_view(tree))


def is_main_process() -> bool:
    return jax.process_index() == 0


def core_key() -> list[int]:
    """This process's host and the cores it may run on, as two int31s (a SHA-256 of both:
    stable across processes, unlike ``hash``)."""
    import hashlib
    import os
    import socket

    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = list(range(os.cpu_count() or 1))
    digest = hashlib.sha256(f"{socket.gethostname()}|{cores}".encode()).digest()
    return [int.from_bytes(digest[:4], "little") >> 1, int.from_bytes(digest[4:8], "little") >> 1]


def sharing_cores(keys, mine) -> int:
    """How many of the processes' ``keys`` (``core_key`` of each) equal ``mine``: the
    processes on this host that run on the same cores as this one (this one included)."""
    mine = [int(v) for v in mine]
    return max(1, sum(1 for k in keys if [int(v) for v in k] == mine))


def processes_sharing_cores() -> int:
    """The processes of this run on this host with this process's cores (1 when alone):
    two processes started on one host without CPU binding share every core; processes that a
    launcher bound to their own cores (SLURM's ``--cpu-bind``, ``taskset``) do not count."""
    if jax.process_count() == 1:
        return 1
    from jax.experimental import multihost_utils

    mine = core_key()
    keys = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32)))
    return sharing_cores(keys.reshape(-1, 2), mine)


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, *, timeout_s: int = 120,
               heartbeat_timeout_s: int = 30) -> None:
    """Joins a multi-process run through ``jax.distributed`` (before any device is used).

    With no flags, JAX's own cluster auto-detection applies (SLURM, Cloud TPU, ...) when it
    finds a cluster; otherwise the run is single-process."""
    flags = (coordinator_address, num_processes, process_id)
    if all(f is None for f in flags):
        return
    if any(f is None for f in flags):
        raise SolverError("multi-process training needs --coordinator_address HOST:PORT, "
                          "--num_processes N and --process_id I together")
    if not 0 <= process_id < num_processes:
        raise SolverError(f"--process_id {process_id} must be in [0, {num_processes})")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, initialization_timeout=timeout_s,
                  # A process that dies stops the others within about this long, not a hang.
                  heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=min(timeout_s, 60))
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001  (JAX raises plain RuntimeErrors here)
        raise SolverError(f"cannot join the run at {coordinator_address} as process "
                          f"{process_id} of {num_processes}: {e}") from None
