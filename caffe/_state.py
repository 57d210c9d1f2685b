"""The module's settings (Caffe's ``Caffe`` singleton): mode and device for what is built next,
the random seed, logging, and how jcaffe's errors reach pycaffe code."""

from __future__ import annotations

import contextlib
import logging
import secrets

import jax

from jcaffe import log
from jcaffe.errors import JcaffeError

_mode = "cpu"
_device_id = 0
_seed: int | None = None
_keys = 0
_verbose = False


def set_mode_cpu() -> None:
    """Nets and solvers built from now on run on the CPU (Caffe's default)."""
    global _mode
    _mode = "cpu"


def set_mode_gpu() -> None:
    """Nets and solvers built from now on run on GPU ``set_device`` (default 0)."""
    global _mode
    _mode = "gpu"


def set_device(device_id: int) -> None:
    """The GPU that nets and solvers built from now on run on, in GPU mode."""
    global _device_id
    device_id = int(device_id)
    if device_id < 0:
        raise RuntimeError(f"set_device: device id must be >= 0, got {device_id}")
    _device_id = device_id


def device() -> jax.Device:
    """The device the mode and device id name (a RuntimeError when JAX has no such GPU)."""
    if _mode == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise RuntimeError("set_mode_gpu: JAX sees no GPU (install jcaffe[gpu] on a machine "
                           "with a CUDA GPU, or call caffe.set_mode_cpu())")
    if _device_id >= len(gpus):
        raise RuntimeError(f"set_device({_device_id}): JAX sees {len(gpus)} GPU(s)")
    return gpus[_device_id]


def config():
    """The ``jcaffe.Config`` for the current device."""
    from jcaffe.config import Config

    return Config().resolved(device().platform)


def set_random_seed(seed: int) -> None:
    """Caffe's ``set_random_seed``: fillers, Dropout and data order of what is built next
    repeat for a given seed."""
    global _seed, _keys
    _seed = int(seed)
    _keys = 0


def _root_seed() -> int:
    global _seed
    if _seed is None:
        _seed = secrets.randbits(31)  # Caffe without a seed: a fresh one per process
    return _seed


def next_key() -> jax.Array:
    """A key for the next net built (one stream per net, from the module's seed)."""
    global _keys
    _keys += 1
    return jax.random.fold_in(jax.random.key(_root_seed()), _keys)


def data_seed() -> int:
    """A host seed for a data layer's reader (shuffling)."""
    global _keys
    _keys += 1
    return (_root_seed() * 1_000_003 + _keys) % (2**31)


def init_log(level: int = 0, stderr: bool = True) -> None:
    """glog's ``InitGoogleLogging``: jcaffe's glog-style lines on stderr from ``level`` up
    (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL); at INFO, building a net logs its layers too."""
    global _verbose
    levels = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
    log.setup(levels.get(int(level), logging.INFO))
    _verbose = int(level) <= 0
    if not stderr:
        logging.getLogger(log.LOGGER_NAME).setLevel(logging.CRITICAL + 1)


def verbose() -> bool:
    return _verbose


def default_logging() -> None:
    """As glog before ``init_log``: INFO lines (solver progress) on stderr."""
    if not logging.getLogger(log.LOGGER_NAME).handlers:
        log.setup(logging.INFO)


@contextlib.contextmanager
def caffe_errors():
    """jcaffe's one-line input errors as the RuntimeError pycaffe code expects from Caffe."""
    try:
        yield
    except JcaffeError as e:
        raise RuntimeError(str(e)) from None
