"""The layer contract and the registry from Caffe type name to layer class.

A layer is built once, on the host, from its ``LayerParameter`` and the shapes of its bottoms
(Caffe's ``LayerSetUp`` + ``Reshape``). Building reads every hyperparameter into plain Python
attributes (static: never traced), checks them, records the shapes of the layer's parameter
blobs in Caffe's order and layout, and returns the top shapes. After that a layer is a pure
pair:

* ``init(key) -> [blob0, blob1, ...]``: the parameter blobs, float32, filled as Caffe's fillers.
* ``apply(blobs, bottoms, ctx) -> [top0, ...]``: a pure JAX function (jit / grad / vmap safe).
  Stateful layers (``stateful = True``, e.g. BatchNorm) return ``(tops, new_blobs)``.

Shapes are Caffe's NCHW shapes; a layer may compute in any internal layout as long as bottoms,
tops and blobs keep Caffe's semantics. ``apply`` keeps the bottoms' dtype (float32 in training,
float64 in gradient checks) and never relies on implicit rank promotion.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from jcaffe.config import DEFAULT as DEFAULT_CONFIG
from jcaffe.config import Config
from jcaffe.errors import LayerError, NetError
from jcaffe.proto import caffe_pb2

Shape = tuple[int, ...]

REGISTRY: dict[str, type["Layer"]] = {}
# Resolvers ``type name -> class | None`` asked when REGISTRY has no entry (the python family
# registers the entry-point lookup here, as families register their classes in REGISTRY).
FALLBACKS: list = []


def register(*type_names: str):
    """Class decorator: registers a Layer subclass under one or more Caffe type names."""

    def deco(cls):
        for name in type_names:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise ValueError(f"layer type {name!r} registered twice")
            REGISTRY[name] = cls
        cls.type_names = tuple(type_names)
        return cls

    return deco


def layer_class(param: caffe_pb2.LayerParameter) -> type["Layer"]:
    """Looks up a layer type; the error names the layer and lists the known types."""
    _load_families()
    cls = REGISTRY.get(param.type)
    for resolve in FALLBACKS:
        if cls is not None:
            break
        # Third-party types (entry-point group ``jcaffe.layers``), looked up only on a miss so
        # built-in types always win and no distribution is imported unless a net uses it.
        cls = resolve(param.type)
    if cls is None:
        known = ", ".join(known_types())
        raise NetError(
            f"layer '{param.name}': unknown layer type '{param.type}'. Known types: {known}"
        )
    return cls


def known_types() -> list[str]:
    """Built-in type names and those registered by entry points (group ``jcaffe.layers``)."""
    from importlib.metadata import entry_points

    _load_families()
    return sorted(set(REGISTRY) | {ep.name for ep in entry_points(group="jcaffe.layers")})


_FAMILIES = ("vision", "neuron", "common", "loss", "norm", "data", "recurrent", "spatial",
             "detection", "python")


def _load_families() -> None:
    # Imported lazily so that `jcaffe.layers.base` itself has no import cycle with the families.
    import importlib

    for fam in _FAMILIES:
        try:
            importlib.import_module(f"jcaffe.layers.{fam}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != f"jcaffe.layers.{fam}":
                raise


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call runtime inputs of ``apply``: the mode and the PRNG key (Dropout, random crops)."""

    train: bool
    key: jax.Array | None = None

    def require_key(self, layer: "Layer", purpose: str) -> jax.Array:
        """The key, or an error naming the layer and ``purpose``: what the key is for and in
        which mode it is drawn from (e.g. "for its dropout mask in training mode")."""
        if self.key is None:
            mode = "train=True" if self.train else "train=False"
            raise layer.error(f"needs a PRNG key {purpose}; it was applied with {mode} and no "
                              f"key: pass key= to Net.apply")
        return self.key


class Layer:
    """Base of all layers. Subclasses override ``setup``, and ``init`` / ``apply`` as needed."""

    type_names: ClassVar[tuple[str, ...]] = ()
    # Caffe's ExactNumBottomBlobs / MinBottomBlobs / ... ; None: unchecked.
    exact_bottoms: ClassVar[int | None] = None
    min_bottoms: ClassVar[int | None] = None
    max_bottoms: ClassVar[int | None] = None
    exact_tops: ClassVar[int | None] = None
    min_tops: ClassVar[int | None] = None
    max_tops: ClassVar[int | None] = None
    # Loss layers get loss_weight 1 on top 0 when the prototxt gives none (Caffe's *Loss layers).
    is_loss: ClassVar[bool] = False
    # apply draws random numbers from ctx.key when ctx.train (Dropout, data transforms).
    needs_key: ClassVar[bool] = False
    # apply returns (tops, new_blobs): blobs updated by the forward pass (BatchNorm statistics).
    stateful: ClassVar[bool] = False
    # Tops come from arrays fed by the host (Input, Data, ...): see ``input_specs``.
    is_data: ClassVar[bool] = False
    # Internal layout (the Net decides; Caffe's semantics stay NCHW at every interface):
    # ``nhwc_ok``: ``apply_nhwc`` computes the same tops from channels-last 4-axis bottoms
    # (faster GEMM shapes for im2col on CPU); ``layout_agnostic``: elementwise, so ``apply``
    # works unchanged on either layout.
    nhwc_ok: bool = False
    layout_agnostic: ClassVar[bool] = False

    def __init__(self, param: caffe_pb2.LayerParameter, bottom_shapes: Sequence[Shape],
                 phase: int = caffe_pb2.TRAIN, *, config: Config | None = None,
                 net_source: str | None = None):
        # How the layer runs (formulation, precision), resolved for the net's device.
        self.config = config if config is not None and config.is_resolved else \
            (config or DEFAULT_CONFIG).resolved()
        # The prototxt the layer's net came from ("<NetParameter>" when built from a message).
        self.net_source = net_source
        self.param = param
        self.name = param.name
        self.type = param.type
        self.phase = phase
        self.bottom_names = list(param.bottom)
        self.top_names = list(param.top)
        self._check_counts(len(bottom_shapes), len(param.top))
        self.bottom_shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        # Parameter blob shapes in Caffe's order; set by setup().
        self.blob_shapes: list[Shape] = []
        top_shapes = self.setup(list(self.bottom_shapes))
        if len(top_shapes) != len(param.top):
            raise self.error(
                f"produces {len(top_shapes)} top(s) but the prototxt names {len(param.top)}")
        self.top_shapes = [tuple(int(d) for d in s) for s in top_shapes]

    # -- to override ------------------------------------------------------------------------
    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Reads hyperparameters, validates them, sets ``blob_shapes``, returns top shapes."""
        raise NotImplementedError

    def init(self, key: jax.Array) -> list[jax.Array]:
        """Initial parameter blobs (float32). Default: zeros, Caffe's default constant filler."""
        return [jnp.zeros(s, jnp.float32) for s in self.blob_shapes]

    def apply(self, blobs: list[jax.Array], bottoms: list[jax.Array], ctx: Context) -> Any:
        raise NotImplementedError

    def apply_nhwc(self, blobs: list[jax.Array], bottoms: list[jax.Array], ctx: Context) -> Any:
        """``apply`` on [N, H, W, C] bottoms, returning [N, H, W, C] tops (if ``nhwc_ok``)."""
        raise NotImplementedError

    def init_weight_bias(self, key: jax.Array, weight_filler, bias_filler) -> list[jax.Array]:
        """Caffe's weight-and-bias layers: blob 0 from ``weight_filler`` and, when the layer has
        a second blob (``bias_term``), blob 1 from ``bias_filler``."""
        from jcaffe.fillers import fill

        kw, kb = jax.random.split(key)
        where = f"layer '{self.name}' (type {self.type})"
        blobs = [fill(weight_filler, self.blob_shapes[0], kw, jnp.float32, where + " weight")]
        if len(self.blob_shapes) > 1:
            blobs.append(fill(bias_filler, self.blob_shapes[1], kb, jnp.float32, where + " bias"))
        return blobs

    def input_specs(self) -> list[tuple[str, Shape, Any]]:
        """For data layers: (top name, raw shape, raw dtype) of each array the host feeds."""
        return []

    def scan_ok(self, channels_last: bool) -> bool:
        """Whether this layer runs at full speed inside ``lax.scan`` (many iterations per
        dispatch); a formulation that does not (XLA's CPU convolution) says False.
        ``Config.scan`` overrides every layer's answer when set."""
        return True if self.config.scan is None else self.config.scan

    # -- helpers ----------------------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        return LayerError(self.name, self.type, message)

    def shape_error(self, message: str) -> LayerError:
        bottoms = ", ".join(f"{n} {list(s)}" for n, s in zip(self.bottom_names, self.bottom_shapes))
        return self.error(f"{message} (bottoms: {bottoms or 'none'})")

    def _check_counts(self, n_bottom: int, n_top: int) -> None:
        def check(kind, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {kind} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {kind} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {kind} blob(s), got {n}")

        check("bottom", n_bottom, self.exact_bottoms, self.min_bottoms, self.max_bottoms)
        check("top", n_top, self.exact_tops, self.min_tops, self.max_tops)

    def canonical_axis(self, axis: int, num_axes: int) -> int:
        """Caffe's Blob::CanonicalAxisIndex: negative axes count from the end."""
        if not -num_axes <= axis < max(num_axes, 1):
            raise self.error(f"axis {axis} out of range for a {num_axes}-axis blob")
        return axis + num_axes if axis < 0 else axis

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} bottoms={self.bottom_shapes} tops={self.top_shapes}>"


def count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's Blob::count(start, end): the product of dims in [start, end)."""
    return int(math.prod(shape[start:end]))
