"""The small ``caffe`` module that pycaffe Python layers import when no ``caffe`` package is
importable (jcaffe's own ``caffe/`` package, pycaffe's whole interface, uses this module's
``Layer`` and supersedes the rest).

jcaffe runs Caffe's ``Python`` layers (``jcaffe.layers.python``) on the host. Their modules do
``import caffe`` and subclass ``caffe.Layer``; when the real pycaffe is not importable, jcaffe
registers this package as ``sys.modules["caffe"]`` (once, just before it imports the first
layer module) so such files run unchanged. It provides what layer code touches, with the
behaviour of BVLC's ``python/caffe/_caffe.cpp``:

* ``Layer``: the base class (``setup``, ``reshape``, ``forward``, ``backward``; ``param_str``,
  ``phase``, ``blobs``, ``type``);
* ``Blob``: ``data`` / ``diff`` (numpy arrays, written in place), ``reshape(*shape)``,
  ``shape``, ``count``, ``num`` / ``channels`` / ``height`` / ``width`` (Caffe's legacy
  accessors: an axis the blob lacks reads as 1);
* ``BlobVec`` (``layer.blobs``, with ``add_blob(*shape)``), ``TRAIN`` / ``TEST``,
  ``proto.caffe_pb2`` (jcaffe's copy of Caffe's schema), and ``set_mode_cpu`` /
  ``set_mode_gpu`` / ``set_device`` / ``set_random_seed``, which do nothing (jcaffe picks the
  device; host layers seed their own generators).
"""

from __future__ import annotations

import math

import numpy as np

from jcaffe.proto.caffe_pb2 import TEST, TRAIN

__all__ = ["Layer", "Blob", "BlobVec", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu",
           "set_device", "set_random_seed"]

# Caffe's Dtype: every blob holds float32.
DTYPE = np.float32


class Blob:
    """Caffe's Blob as pycaffe shows it: ``data`` and ``diff`` of one shape."""

    def __init__(self, shape=None, dtype=DTYPE):
        self._dtype = np.dtype(dtype)
        self._shape: tuple[int, ...] | None = None
        self._data = self._diff = np.zeros((0,), self._dtype)
        if shape is not None:
            self.reshape(*shape)

    def reshape(self, *shape, **kwargs) -> None:
        """``blob.reshape(n, c, h, w)``: new zero-filled data and diff when the shape changes
        (Caffe reallocates; contents after a reshape are unspecified there)."""
        if kwargs:
            raise TypeError("Blob.reshape takes no kwargs")
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"Blob.reshape: negative dimension in {list(dims)}")
        if dims != self._shape:
            self._shape = dims
            self._data = np.zeros(dims, self._dtype)
            self._diff = np.zeros(dims, self._dtype)

    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @property
    def shape(self) -> tuple[int, ...]:
        return () if self._shape is None else self._shape

    @property
    def count(self) -> int:
        return 0 if self._shape is None else int(math.prod(self._shape))

    def _legacy(self, index: int) -> int:
        shape = self.shape
        if len(shape) > 4:
            raise ValueError("Cannot use legacy accessors on Blobs with > 4 axes.")
        return shape[index] if index < len(shape) else 1

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)

    # jcaffe's side: values in and out of the host layer.
    def _set(self, values: np.ndarray, which: str = "data") -> None:
        values = np.asarray(values)
        if which == "data" and values.dtype != self._dtype:
            # float64 bottoms (gradient checks) stay float64 on the host too.
            self._dtype = values.dtype
            self._shape = None
        self.reshape(*values.shape)
        target = self._data if which == "data" else self._diff
        target[...] = values

    def __repr__(self) -> str:
        return f"<caffe.Blob shape={list(self.shape)}>"


class BlobVec(list):
    """``layer.blobs``: a list of Blobs; ``add_blob(*shape)`` appends a zero-filled one."""

    def add_blob(self, *shape, **kwargs) -> None:
        if kwargs:
            raise TypeError("BlobVec.add_blob takes no kwargs")
        self.append(Blob(shape))


class Layer:
    """Base class of pycaffe Python layers (Caffe's ``PythonLayer``).

    jcaffe sets ``param_str`` (``python_param.param_str``) and ``phase`` (``TRAIN`` / ``TEST``)
    before calling ``setup(bottom, top)`` once, then ``reshape(bottom, top)`` and
    ``forward(bottom, top)`` at every forward pass and ``backward(top, propagate_down,
    bottom)`` at every backward pass, as Caffe does.
    """

    def __init__(self, *args, **kwargs):
        # Caffe's Layer(LayerParameter): the parameter is not kept by pycaffe layers.
        self.param_str = ""
        self.phase = TRAIN
        self._blobs = BlobVec()

    @property
    def blobs(self) -> BlobVec:
        if "_blobs" not in self.__dict__:  # a subclass __init__ that skipped ours
            self.__dict__["_blobs"] = BlobVec()
        return self.__dict__["_blobs"]

    @property
    def type(self) -> str:
        return "Python"

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        pass

    def forward(self, bottom, top) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define forward(bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define "
                                  f"backward(top, propagate_down, bottom)")


def set_mode_cpu() -> None:
    """No-op: jcaffe chooses the device (``--cpu`` / ``--gpu``, ``solver_mode``)."""


def set_mode_gpu() -> None:
    """No-op: jcaffe chooses the device (``--cpu`` / ``--gpu``, ``solver_mode``)."""


def set_device(device_id: int) -> None:
    """No-op: jcaffe chooses the device (``--gpu N``, ``device_id``)."""


def set_random_seed(seed: int) -> None:
    """No-op: jcaffe seeds from the solver's ``random_seed``."""
