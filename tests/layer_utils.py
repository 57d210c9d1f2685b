"""Shared helpers for layer tests: build a layer from prototxt text, check gradients numerically.

``check_gradient`` is Caffe's GradientChecker in spirit: central finite differences in float64
of a scalar objective (each top contracted with a fixed random tensor), compared element by
element with JAX's gradient, for every bottom and parameter blob (or a random subset of
elements when a tensor is large).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf import text_format

from jcaffe import onednn
from jcaffe.config import Config
from jcaffe.layers.base import Context, layer_class
from jcaffe.proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}

# The execution choices of each platform, all run by the tests on the CPU: the CPU's own
# (channels-last convolutions as oneDNN kernels where the package built them, and in pure
# JAX's im2col formulation, its fallback; slice pooling) and a GPU's (NCHW, XLA convolutions
# and reduce_window pooling inside ``lax.scan``, many iterations per dispatch, which the CPU
# would not pick: only slower there, not different).
CHOICES = {"cpu": Config(layout="NHWC", conv="im2col", pool="slices"),
           "gpu": Config(layout="NCHW", conv="xla", pool="reduce_window", scan=True)}
if onednn.available().ok:
    CHOICES["cpu-onednn"] = Config(layout="NHWC", conv="onednn", pool="slices")

# The execution config layers are built with; formulation fixtures replace it (monkeypatch).
CONFIG = Config()


def make_layer(text: str, bottom_shapes, phase="TRAIN", bottoms=None, tops=None, config=None):
    """Builds a layer from LayerParameter prototxt text (name/bottom/top filled in if absent),
    with ``config`` (default: ``CONFIG``)."""
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not lp.name:
        lp.name = "layer"
    if not lp.bottom:
        lp.bottom.extend(bottoms if bottoms is not None else [f"b{i}" for i in range(len(bottom_shapes))])
    if not lp.top and tops is not None:
        lp.top.extend(tops)
    if not lp.top:
        lp.top.append("t0")
    cls = layer_class(lp)
    return cls(lp, bottom_shapes, PHASES.get(phase, phase),
               config=config if config is not None else CONFIG)


def run(layer, blobs, bottoms, train=True, key=None):
    """apply() with a context; returns the tops only (drops new blobs of stateful layers)."""
    ctx = Context(train=train, key=key if key is not None else jax.random.key(0))
    out = layer.apply([jnp.asarray(b) for b in blobs], [jnp.asarray(b) for b in bottoms], ctx)
    if layer.stateful:
        out = out[0]
    return [np.asarray(t) for t in out]


def check_gradient(layer, blobs, bottoms, *, train=True, key=None, check_bottoms=None,
                   eps=1e-5, rtol=1e-4, atol=1e-6, max_elems=60, seed=0):
    """Asserts that JAX's gradients of the layer match central finite differences (float64).

    ``check_bottoms``: indices of bottoms to check (default all floating bottoms); all blobs
    are checked. Integer bottoms (labels) are held fixed.
    """
    rng = np.random.default_rng(seed)
    key = key if key is not None else jax.random.key(1)
    with jax.enable_x64(True):
        blobs64 = [np.asarray(b, np.float64) for b in blobs]
        bottoms64 = [np.asarray(b, np.float64) if np.issubdtype(np.asarray(b).dtype, np.floating)
                     else np.asarray(b) for b in bottoms]
        ctx = Context(train=train, key=key)

        def tops_of(bl, bo):
            out = layer.apply(list(bl), list(bo), ctx)
            return out[0] if layer.stateful else out

        tops = tops_of([jnp.asarray(b) for b in blobs64], [jnp.asarray(b) for b in bottoms64])
        weights = [rng.standard_normal(np.shape(t)) for t in tops]

        def objective(bl, bo):
            out = tops_of(bl, bo)
            return sum(jnp.sum(t * w) for t, w in zip(out, weights) if jnp.issubdtype(t.dtype, jnp.floating))

        if check_bottoms is None:
            check_bottoms = [i for i, b in enumerate(bottoms64) if np.issubdtype(b.dtype, np.floating)]
        obj = jax.jit(objective)
        g_blobs, g_bottoms = jax.jit(jax.grad(objective, argnums=(0, 1)))(
            [jnp.asarray(b) for b in blobs64], [jnp.asarray(b) for b in bottoms64])

        def numeric(which, idx, flat_i):
            bl = [b.copy() for b in blobs64]
            bo = [b.copy() for b in bottoms64]
            arr = (bl if which == "blob" else bo)[idx]
            flat = arr.reshape(-1)
            orig = flat[flat_i]
            flat[flat_i] = orig + eps
            plus = float(obj(bl, bo))
            flat[flat_i] = orig - eps
            minus = float(obj(bl, bo))
            return (plus - minus) / (2 * eps)

        targets = [("blob", i, np.asarray(g_blobs[i])) for i in range(len(blobs64))]
        targets += [("bottom", i, np.asarray(g_bottoms[i])) for i in check_bottoms]
        for which, idx, analytic in targets:
            n = analytic.size
            picks = range(n) if n <= max_elems else rng.choice(n, max_elems, replace=False)
            for flat_i in picks:
                num = numeric(which, idx, int(flat_i))
                ana = float(analytic.reshape(-1)[flat_i])
                assert abs(num - ana) <= atol + rtol * max(abs(num), abs(ana)), (
                    f"{layer.type} '{layer.name}': d/d{which}[{idx}] element {flat_i}: "
                    f"analytic {ana:.8g} vs numeric {num:.8g}")
