"""Caffe's weight fillers (``include/caffe/filler.hpp``), deterministic from a JAX key.

For a blob of shape ``s`` with ``count = prod(s)``: ``fan_in = count / s[0]`` and
``fan_out = count / s[1]`` (so a convolution weight ``[O, I, kh, kw]`` has fan_in ``I*kh*kw``
and fan_out ``O*kh*kw``); ``n`` is fan_in, fan_out or their mean per ``variance_norm``.

* constant:          ``value``
* uniform:           U(min, max)
* gaussian:          N(mean, std²); with ``sparse >= 0`` each entry is kept with probability
                     ``sparse / s[0]`` and zeroed otherwise
* xavier:            U(-sqrt(3/n), sqrt(3/n))
* msra:              N(0, 2/n)
* positive_unitball: U(0, 1), then each of the ``s[0]`` rows scaled to sum to 1
* bilinear:          the bilinear upsampling kernel for a 4-d Deconvolution weight
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe.errors import NetError
from jcaffe.proto import caffe_pb2

_FP = caffe_pb2.FillerParameter


def _fan(filler: caffe_pb2.FillerParameter, shape) -> float:
    count = math.prod(shape)
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    if filler.variance_norm == _FP.FAN_IN:
        return fan_in
    if filler.variance_norm == _FP.FAN_OUT:
        return fan_out
    return (fan_in + fan_out) / 2.0


def _flat(draw, key, shape, *args):
    """``draw(key, shape, *args)`` computed on the flattened shape and reshaped: the same
    numbers (JAX's partitionable threefry counts elements in row-major order), but XLA's CPU
    compiler takes about a second per 4-d random array and a few milliseconds per flat one."""
    return draw(key, (math.prod(shape),), *args).reshape(shape)


def fill(filler: caffe_pb2.FillerParameter, shape, key: jax.Array,
         dtype=jnp.float32, where: str = "") -> jax.Array:
    """Returns a blob of ``shape`` filled as Caffe's ``filler`` would (in distribution).

    ``where`` names the layer / blob for error messages.
    """
    shape = tuple(int(d) for d in shape)
    kind = filler.type
    if kind == "constant":
        return jnp.full(shape, filler.value, dtype)
    if kind == "uniform":
        return _flat(jax.random.uniform, key, shape, dtype, filler.min, filler.max)
    if kind == "gaussian":
        k1, k2 = jax.random.split(key)
        x = filler.mean + filler.std * _flat(jax.random.normal, k1, shape, dtype)
        if filler.sparse >= 0:
            if len(shape) < 1 or shape[0] == 0:
                raise NetError(f"{where}: a sparse gaussian filler needs a blob with at least one axis")
            p = filler.sparse / shape[0]
            x = x * _flat(lambda k, s: jax.random.bernoulli(k, p, s), k2, shape).astype(dtype)
        return x
    if kind in ("xavier", "msra") and math.prod(shape) == 0:
        raise NetError(f"{where}: the {kind} filler needs a non-empty blob, got shape {list(shape)}")
    if filler.sparse >= 0 and kind != "gaussian":
        raise NetError(f"{where}: `sparse` is only supported by the gaussian filler, not {kind}")
    if kind == "xavier":
        scale = math.sqrt(3.0 / _fan(filler, shape))
        return _flat(jax.random.uniform, key, shape, dtype, -scale, scale)
    if kind == "msra":
        std = math.sqrt(2.0 / _fan(filler, shape))
        return std * _flat(jax.random.normal, key, shape, dtype)
    if kind == "positive_unitball":
        x = _flat(jax.random.uniform, key, shape, dtype)
        num = shape[0] if shape else 1
        rows = x.reshape(num, -1)
        return (rows / jnp.sum(rows, axis=1, keepdims=True)).reshape(shape)
    if kind == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise NetError(f"{where}: the bilinear filler needs a 4-d blob with equal kernel "
                           f"height and width, got shape {list(shape)}")
        return jnp.asarray(bilinear_kernel(shape), dtype)
    raise NetError(f"{where}: unknown filler type '{kind}' (known: constant, uniform, gaussian, "
                   f"xavier, msra, positive_unitball, bilinear)")


def bilinear_kernel(shape) -> np.ndarray:
    """Caffe's BilinearFiller as numpy: every [kh, kw] slice is the same bilinear kernel."""
    kh, kw = shape[2], shape[3]
    f = math.ceil(kw / 2.0)
    c = (kw - 1) / (2.0 * f)
    y = np.arange(kh)[:, None]
    x = np.arange(kw)[None, :]
    k = (1 - np.abs(x / f - c)) * (1 - np.abs(y / f - c))
    return np.broadcast_to(k, shape).astype(np.float32).copy()
