"""``caffe``: pycaffe's interface on jcaffe, so ``import caffe`` scripts and notebooks run.

The names and semantics are BVLC pycaffe's (``python/caffe`` at Caffe 1.0): ``Net``, ``Blob``,
``Layer`` (Python layers), the solvers, ``io``, ``draw``, ``net_spec`` (``layers``,
``params``, ``NetSpec``, ``to_proto``), ``coord_map``, ``Classifier``, ``Detector``, and the
module functions. The nets are jcaffe's (``jcaffe.Net``), run as compiled JAX programs; see
``caffe.pycaffe`` for how blob values move between the device and numpy, and
``caffe._solver`` for the solvers. A real pycaffe earlier on ``sys.path`` wins over this
package: ``caffe.__file__`` says which one was imported.
"""

from __future__ import annotations

from jcaffe._lazy import lazy_attributes
from jcaffe.proto.caffe_pb2 import TEST, TRAIN
from jcaffe.pycaffe_shim import Layer

from caffe import proto
from caffe._state import (init_log, set_device, set_mode_cpu, set_mode_gpu,
                          set_random_seed)
from caffe._state import default_logging as _default_logging
from caffe._solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                           RMSPropSolver, SGDSolver, Solver, get_solver)
from caffe.pycaffe import Blob, Net

# The Caffe release whose Python interface this is.
__version__ = "1.0.0"

_default_logging()


def layer_type_list() -> list[str]:
    """Every registered layer type (Caffe's ``LayerRegistry::LayerTypeList``), sorted."""
    from jcaffe.layers.base import known_types

    return sorted(known_types())


def has_nccl() -> bool:
    """False: jcaffe trains data-parallel with ``jax.shard_map``, not NCCL solvers."""
    return False


class NCCL:
    """Caffe's NCCL multi-GPU helper: not available (``has_nccl()`` is False). For several
    devices use ``jcaffe train --gpu 0,1,...`` or ``jcaffe.Trainer(devices=...)``."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("caffe.NCCL: not available (has_nccl() is False); jcaffe trains on "
                           "several devices with `jcaffe train --gpu 0,1`")

    @staticmethod
    def new_uid():
        raise RuntimeError("caffe.NCCL: not available (has_nccl() is False)")


def solver_count() -> int:
    """Solvers in this process's data-parallel group: always 1 here."""
    return 1


def set_solver_count(count: int) -> None:
    if int(count) != 1:
        raise RuntimeError("set_solver_count: only 1 is supported (no NCCL)")


def solver_rank() -> int:
    return 0


def set_solver_rank(rank: int) -> None:
    if int(rank) != 0:
        raise RuntimeError("set_solver_rank: only rank 0 is supported (no NCCL)")


def set_multiprocess(multiprocess: bool) -> None:
    if multiprocess:
        raise RuntimeError("set_multiprocess(True): not supported (no NCCL)")


def log(message: str) -> None:
    """glog's ``LOG(INFO) << message``."""
    from jcaffe import log as _log

    _log.get_logger("pycaffe").info("%s", message)


class Timer:
    """Caffe's Timer: ``start()``, ``stop()``, ``ms`` (milliseconds between them; while
    running, until now)."""

    def __init__(self):
        self._t0 = None
        self._elapsed = 0.0
        self._running = False

    def start(self) -> None:
        import time

        if not self._running:
            self._t0 = time.perf_counter()
            self._running = True

    def stop(self) -> None:
        import time

        if self._running:
            self._elapsed = time.perf_counter() - self._t0
            self._running = False

    @property
    def ms(self) -> float:
        import time

        if self._running:
            return (time.perf_counter() - self._t0) * 1e3
        return self._elapsed * 1e3


_LAZY = {
    "io": "caffe.io",
    "draw": "caffe.draw",
    "coord_map": "caffe.coord_map",
    "net_spec": "caffe.net_spec",
    "layers": "caffe.net_spec",
    "params": "caffe.net_spec",
    "NetSpec": "caffe.net_spec",
    "to_proto": "caffe.net_spec",
    "Classifier": "caffe.classifier",
    "Detector": "caffe.detector",
    "classifier": "caffe.classifier",
    "detector": "caffe.detector",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
