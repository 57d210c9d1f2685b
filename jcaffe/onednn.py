"""Convolution through oneDNN on the CPU: XLA FFI custom calls with a custom VJP.

XLA's CPU backend runs a convolution either as its own (slow) convolution kernel or, in
jcaffe's im2col formulation, as column copies around a GEMM. oneDNN (Intel's deep-learning
kernel library, the pip package ``onednn-cpu-gomp``) has direct and batch-reduce-GEMM
convolution kernels, JIT-compiled for the machine's vector ISA, that keep the columns in
registers and cache. ``jcaffe/csrc/onednn_conv.cc`` wraps its forward, backward-data and
backward-weights primitives as three XLA FFI handlers; the package's install compiles it into
``jcaffe/_onednn*.so`` (``setup.py``; optional: when the compiler or the headers are missing,
the install goes on without it and ``available()`` says why).

:func:`conv2d` is the convolution of channels-last ``x [N, H, W, C]`` with a Caffe-layout
weight ``w [O, C/group, kh, kw]``:

``y[n, p, q, o] = sum_{c in group(o), i, j} w[o, c, i, j] * xpad[n, p*sh + i*dh, q*sw + j*dw, c]``

(zero padding ``pad`` on both sides, output size rounded down as in Caffe), float32 in, float32
out, every product and sum in float32 (oneDNN's strict floating-point mode: Caffe's numbers).
Its VJP is the two backward primitives: ``dx`` from ``dy`` and ``w``, ``dw`` from ``x`` and ``dy``;
XLA drops the ``dx`` call where nothing uses it (a convolution on the data).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_TARGETS = ("jcaffe_conv_fwd", "jcaffe_conv_bwd_data", "jcaffe_conv_bwd_weights")
_DIST = "onednn-cpu-gomp"
_SONAME = "libdnnl.so.3"


class Status(NamedTuple):
    """Whether the kernels can run here: ``ok``, and ``detail`` (the oneDNN version, or why
    not)."""
    ok: bool
    detail: str


def _extension() -> pathlib.Path | None:
    # find_spec locates it both in an installed package and in an editable checkout.
    try:
        spec = importlib.util.find_spec("jcaffe._onednn")
    except (ImportError, ValueError):
        return None
    return pathlib.Path(spec.origin) if spec and spec.origin else None


def _libdnnl() -> pathlib.Path | None:
    try:
        files = importlib.metadata.distribution(_DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _SONAME:
            return pathlib.Path(f.locate())
    return None


@functools.cache
def _load() -> tuple[Status, ctypes.CDLL | None]:
    """Loads oneDNN and the extension and registers the custom calls with XLA, once per
    process (the cache is the one record of it). Never raises."""
    ext = _extension()
    if ext is None:
        return Status(False, "the extension jcaffe/_onednn was not built (reinstall jcaffe "
                             "with a C++ compiler: pip install -e .)"), None
    lib = _libdnnl()
    if lib is None:
        return Status(False, f"oneDNN ({_DIST}, {_SONAME}) is not installed"), None
    try:
        # The extension links against libdnnl by soname: loaded first (and globally), the
        # library is found without an rpath, wherever pip put it.
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        so = ctypes.CDLL(str(ext))
        so.jcaffe_onednn_version.restype = ctypes.c_char_p
        so.jcaffe_onednn_plans.restype = ctypes.c_char_p
        version = so.jcaffe_onednn_version().decode()
        for name in _TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(so, name)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        return Status(False, f"could not load {ext.name}: {e}"), None
    return Status(True, f"oneDNN {version}"), so


def available() -> Status:
    """Whether the kernels can run here (loading and registering them on the first call):
    a missing piece is a ``Status(False, why)``, never an exception."""
    return _load()[0]


def plans() -> list[str]:
    """The convolutions run so far in this process, one line each: pass, shape and the oneDNN
    implementation that runs it (oneDNN's first choice for this machine: deterministic)."""
    status, so = _load()
    return so.jcaffe_onednn_plans().decode().splitlines() if status.ok else []


class ConvSpec(NamedTuple):
    """Static geometry: (h, w) pairs; Caffe's dilation (1: none)."""
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    group: int

    def out_hw(self, h, w, kh, kw):
        ext = [d * (k - 1) + 1 for d, k in zip(self.dilation, (kh, kw))]
        return ((h + 2 * self.pad[0] - ext[0]) // self.stride[0] + 1,
                (w + 2 * self.pad[1] - ext[1]) // self.stride[1] + 1)

    def attrs(self):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dilation
        return dict(stride_h=np.int64(sh), stride_w=np.int64(sw), pad_h=np.int64(ph),
                    pad_w=np.int64(pw), dilation_h=np.int64(dh), dilation_w=np.int64(dw),
                    group=np.int64(self.group))


def _call(target, shape, spec, *args):
    # Research code vmaps the train step (seeds, learning rates): a batched call runs the
    # kernel once per element.
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **spec.attrs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x, w, spec: ConvSpec):
    """``x [N, H, W, C]`` float32, ``w [O, C/group, kh, kw]`` float32 → ``[N, OH, OW, O]``."""
    return _forward(x, w, spec)


def _forward(x, w, spec):
    n, h, wd, _ = x.shape
    o, _, kh, kw = w.shape
    with jax.named_scope("onednn_conv_fwd"):
        return _call("jcaffe_conv_fwd", (n,) + spec.out_hw(h, wd, kh, kw) + (o,), spec, x, w)


def _fwd(x, w, spec):
    return _forward(x, w, spec), (x, w)


def _bwd(spec, res, dy):
    x, w = res
    with jax.named_scope("onednn_conv_bwd_data"):
        dx = _call("jcaffe_conv_bwd_data", x.shape, spec, dy, w)
    with jax.named_scope("onednn_conv_bwd_weights"):
        dw = _call("jcaffe_conv_bwd_weights", w.shape, spec, x, dy)
    return dx, dw


conv2d.defvjp(_fwd, _bwd)
