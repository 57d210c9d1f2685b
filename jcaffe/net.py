"""The Net: a Caffe NetParameter as a pure function over a ``{layer name: [blobs]}`` pytree.

Construction happens once on the host, like Caffe's ``Net::Init``: the NetParameter is
filtered for the NetState (phase, level, stages), every layer is built in file order from its
bottoms' shapes (shape inference before any compute, logged like Caffe), loss weights and
parameter specs (``lr_mult``, ``decay_mult``, sharing by ``param { name }``) are resolved.

After that the Net is pure:

* ``params = net.init(key)``: Caffe's fillers; ``params[layer] = [blob0, blob1, ...]`` in Caffe's
  order and layout, so ``.caffemodel`` blobs map 1:1. A blob shared from an earlier layer is
  ``None`` in the sharing layer's list (the owner holds it, as in Caffe's learnable_params).
* ``blobs = net.apply(params, inputs, train=..., key=...)``: every blob by name. ``inputs`` maps
  each data layer's top to the raw array the host feeds (see ``net.input_specs``).
* ``loss, aux = net.loss(params, inputs, ...)``: Caffe's objective ``Σ loss_weight·Σ top``.

All three work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. State updated by the forward
pass (BatchNorm's running sums) is explicit: ``apply(..., mutable=True)`` returns
``(blobs, new_params)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.config import DEFAULT as DEFAULT_CONFIG
from jcaffe.config import Config
from jcaffe.errors import ModelError, NetError
from jcaffe.layers.base import Context, Layer, Shape, layer_class
from jcaffe.proto import caffe_pb2

_log = log.get_logger("net")

_PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One learnable blob: where it lives and how the solver treats it (Caffe's ParamSpec)."""

    layer: str
    index: int
    shape: Shape
    lr_mult: float
    decay_mult: float
    name: str = ""


def _phase(phase) -> int:
    if isinstance(phase, str):
        try:
            return _PHASES[phase.upper()]
        except KeyError:
            raise NetError(f"unknown phase {phase!r}: use TRAIN or TEST") from None
    return int(phase)


def _shape_str(shape: Shape) -> str:
    if len(shape) == 0:
        return "(1)"
    return " ".join(str(d) for d in shape) + f" ({int(np.prod(shape))})"


class Net:
    """A Caffe net for one NetState. See the module docstring for the API."""

    def __init__(self, net_param: caffe_pb2.NetParameter | str | os.PathLike,
                 phase: str | int = "TRAIN", level: int = 0, stages: Sequence[str] = (),
                 *, state: caffe_pb2.NetState | None = None, config: Config | None = None,
                 verbose: bool = True, source: str | None = None):
        """Builds the net for ``phase``/``level``/``stages`` (Caffe's ``Net(file, phase, level,
        stages)``), or for an explicit, already merged ``state`` (as the solver builds it).

        ``config`` (``jcaffe.config.Config``) says how the net runs: the platform it is built
        for, the internal layout of 4-axis blobs (``"auto"``: channels-last on CPU, NCHW
        elsewhere), the convolution/pooling formulations and the matmul precision; it is
        resolved once here (``net.config``) and handed to every layer. The channels-last
        convolution and pooling kernels have hand-written backward passes
        (``jax.custom_vjp``), so they support reverse mode (``grad``, ``vjp``) but not forward
        mode; for ``jax.jvp``, ``jax.jacfwd`` or Hessians use ``Config(layout="NCHW")``.
        ``source`` names the file a given NetParameter was read from (errors and Python
        layers' module lookup use it)."""
        from jcaffe import netstate, prototxt, upgrade

        if isinstance(net_param, (str, os.PathLike)):
            self.source = os.fspath(net_param)
            net_param = prototxt.read_net(self.source)
        else:
            self.source = source or "<NetParameter>"
            net_param = upgrade.upgrade_net(net_param)
        if state is None:
            state = netstate.net_state_for(net_param, _phase(phase), level, stages)
        self.state = state
        self.phase = state.phase
        self.net_param = netstate.filter_net(net_param, state)
        self.name = self.net_param.name
        self._verbose = verbose
        # The platform ("cpu", "gpu", ...; default: JAX's default backend) picks each layer's
        # formulation and the internal layout for the device the net will run on.
        self.config = (config or DEFAULT_CONFIG).resolved()
        self.layout = self.config.layout
        self._build()

    # -- construction -----------------------------------------------------------------------
    def _info(self, msg: str, *args) -> None:
        if self._verbose:
            _log.info(msg, *args, stacklevel=2)

    def _build(self) -> None:
        self._info("Initializing net from parameters: %s (phase %s)", self.name or "(unnamed)",
                   "TRAIN" if self.phase == caffe_pb2.TRAIN else "TEST")
        shapes: dict[str, Shape] = {}
        self.layers: list[Layer] = []
        self.loss_weights: list[list[float]] = []
        self.params_info: list[ParamInfo] = []  # learnable (owned) params, Caffe's order
        self._blob_source: dict[str, list[tuple[str, int]]] = {}
        param_names: dict[str, tuple[str, int, Shape]] = {}
        names_seen: set[str] = set()

        for lp in self.net_param.layer:
            if lp.name in names_seen:
                raise NetError(f"layer '{lp.name}': duplicate layer name")
            names_seen.add(lp.name)
            for b in lp.bottom:
                if b not in shapes:
                    known = ", ".join(shapes) or "none"
                    raise NetError(f"layer '{lp.name}' (type {lp.type}): unknown bottom blob "
                                   f"'{b}' (no earlier layer produces it; available: {known})")
            cls = layer_class(lp)
            self._info("Creating Layer %s", lp.name)
            for b in lp.bottom:
                self._info("%s <- %s", lp.name, b)
            layer = cls(lp, [shapes[b] for b in lp.bottom], self.phase, config=self.config,
                        net_source=self.source)
            for t, s in zip(lp.top, layer.top_shapes):
                self._info("%s -> %s", lp.name, t)
                shapes[t] = s
            for s in layer.top_shapes:
                self._info("Top shape: %s", _shape_str(s))
            self.layers.append(layer)
            self.loss_weights.append(self._loss_weights(lp, layer))
            for t, w in zip(lp.top, self.loss_weights[-1]):
                if w:
                    self._info("    with loss weight %g", w)
            self._blob_source[lp.name] = self._resolve_params(lp, layer, param_names)

        self.blob_shapes = shapes
        # Caffe's net outputs: blobs no later layer consumes (an in-place top re-produces its
        # bottom). Caffe keeps them in a std::set, so they come out sorted by name.
        available: set[str] = set()
        for lp in self.net_param.layer:
            available.difference_update(lp.bottom)
            available.update(lp.top)
        self.output_names = sorted(available)
        self.data_layers = [l for l in self.layers if l.is_data]
        self._info("Network initialization done.")

    def _loss_weights(self, lp, layer: Layer) -> list[float]:
        n = len(lp.top)
        if len(lp.loss_weight):
            if len(lp.loss_weight) != n:
                raise NetError(f"layer '{lp.name}': loss_weight must be given once per top "
                               f"({n}), got {len(lp.loss_weight)}")
            return [float(w) for w in lp.loss_weight]
        return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(n)]

    def _resolve_params(self, lp, layer: Layer, param_names) -> list[tuple[str, int]]:
        if len(lp.param) > len(layer.blob_shapes):
            raise NetError(f"layer '{lp.name}': {len(lp.param)} param specs given but the layer "
                           f"has {len(layer.blob_shapes)} parameter blob(s)")
        sources = []
        for j, shape in enumerate(layer.blob_shapes):
            spec = lp.param[j] if j < len(lp.param) else caffe_pb2.ParamSpec()
            if spec.name and spec.name in param_names:
                owner, idx, oshape = param_names[spec.name]
                strict = spec.share_mode != caffe_pb2.ParamSpec.PERMISSIVE
                if (strict and oshape != shape) or int(np.prod(oshape)) != int(np.prod(shape)):
                    raise NetError(f"layer '{lp.name}': shared param '{spec.name}' has shape "
                                   f"{list(shape)} here but {list(oshape)} in layer '{owner}'")
                sources.append((owner, idx))
                continue
            if spec.name:
                param_names[spec.name] = (lp.name, j, shape)
            sources.append((lp.name, j))
            lr_mult, decay_mult = float(spec.lr_mult), float(spec.decay_mult)
            if layer.stateful:
                # Blobs the forward pass updates (BatchNorm's statistics) are never learned:
                # Caffe's BatchNormLayer forces their lr_mult/decay_mult to 0.
                lr_mult = decay_mult = 0.0
            self.params_info.append(ParamInfo(lp.name, j, shape, lr_mult, decay_mult, spec.name))
        return sources

    # -- the pure API -----------------------------------------------------------------------
    def init(self, key: jax.Array) -> dict[str, list[jax.Array | None]]:
        """Fresh parameters from the layers' fillers, one key per layer (fold_in by index)."""
        # One compiled program for all fillers: op by op, each filler would compile on its own
        # (seconds of start-up for LeNet).
        return jax.jit(self._init)(key)

    def _init(self, key: jax.Array) -> dict[str, list[jax.Array | None]]:
        params: dict[str, list[jax.Array | None]] = {}
        for i, layer in enumerate(self.layers):
            if not layer.blob_shapes:
                continue
            blobs = layer.init(jax.random.fold_in(key, i))
            owned = self._blob_source[layer.name]
            params[layer.name] = [b if src == (layer.name, j) else None
                                  for j, (b, src) in enumerate(zip(blobs, owned))]
        return params

    def input_specs(self) -> dict[str, tuple[Shape, Any]]:
        """Raw arrays the host feeds: top name → (shape, dtype), for every data layer."""
        specs = {}
        for layer in self.data_layers:
            for top, shape, dtype in layer.input_specs():
                specs[top] = (tuple(shape), dtype)
        return specs

    def _layer_blobs(self, params, layer: Layer) -> list:
        return [params[o][j] for o, j in self._blob_source[layer.name]]

    def apply(self, params, inputs: Mapping[str, Any] | None = None, *, train: bool | None = None,
              key: jax.Array | None = None, mutable: bool = False, frozen: bool = False):
        """Runs the forward pass; returns ``{blob name: array}`` (and new params if mutable).

        ``train`` defaults to the net's phase. ``key`` feeds Dropout and random data transforms.
        ``frozen=True`` stops gradients into params with ``lr_mult: 0`` (Caffe computes none).
        """
        train = (self.phase == caffe_pb2.TRAIN) if train is None else train
        inputs = inputs or {}
        blobs: dict[str, jax.Array] = {}
        # Blobs held channels-last inside the program (see ``layout``); every interface,
        # including the returned dict, stays Caffe's NCHW.
        nhwc: set[str] = set()
        new_params = dict(params) if mutable else None
        frozen_set = ({(p.layer, p.index) for p in self.params_info if p.lr_mult == 0}
                      if frozen else set())
        for i, layer in enumerate(self.layers):
            lkey = jax.random.fold_in(key, i) if (key is not None and layer.needs_key) else None
            ctx = Context(train=train, key=lkey)
            channels_last = False
            if layer.is_data:
                try:
                    bottoms = [inputs[t] for t, _, _ in layer.input_specs()]
                except KeyError as e:
                    raise NetError(f"layer '{layer.name}' (type {layer.type}): no input fed for "
                                   f"top {e.args[0]!r} (inputs given: {sorted(inputs)})") from None
            else:
                names = layer.bottom_names
                if self.runs_channels_last(layer):
                    channels_last = True
                    bottoms = [blobs[b] if b in nhwc else _to_nhwc(blobs[b]) for b in names]
                elif layer.layout_agnostic and names and all(b in nhwc for b in names):
                    channels_last = True
                    bottoms = [blobs[b] for b in names]
                else:
                    bottoms = [_to_nchw(blobs[b]) if b in nhwc else blobs[b] for b in names]
                pd = layer.param.propagate_down
                if len(pd):
                    bottoms = [b if pd[k] else jax.lax.stop_gradient(b)
                               for k, b in enumerate(bottoms)]
            lblobs = self._layer_blobs(params, layer)
            if frozen_set:
                lblobs = [jax.lax.stop_gradient(b) if src in frozen_set else b
                          for b, src in zip(lblobs, self._blob_source[layer.name])]
            if channels_last and not layer.layout_agnostic:
                out = layer.apply_nhwc(lblobs, bottoms, ctx)
            else:
                out = layer.apply(lblobs, bottoms, ctx)
            if layer.stateful:
                out, updated = out
                if mutable:
                    owned = self._blob_source[layer.name]
                    new_params[layer.name] = [u if src == (layer.name, j) else None
                                              for j, (u, src) in enumerate(zip(updated, owned))]
            for t, v in zip(layer.top_names, out):
                blobs[t] = v
                if channels_last and v.ndim == 4:
                    nhwc.add(t)
                else:
                    nhwc.discard(t)
        if nhwc:
            # Under jit, conversions of blobs nobody reads are dead code and vanish.
            blobs = {k: _to_nchw(v) if k in nhwc else v for k, v in blobs.items()}
        return (blobs, new_params) if mutable else blobs

    def loss(self, params, inputs=None, *, train: bool | None = None, key=None,
             frozen: bool = True):
        """Caffe's objective and the outputs: ``(loss, (blobs, new_params))``.

        ``loss = Σ_layers Σ_tops loss_weight · sum(top)``; differentiate it with ``jax.grad``
        (``has_aux=True``).
        """
        blobs, new_params = self.apply(params, inputs, train=train, key=key, mutable=True,
                                       frozen=frozen)
        terms = [w * jnp.sum(blobs[t])
                 for layer, weights in zip(self.layers, self.loss_weights)
                 for t, w in zip(layer.top_names, weights) if w]
        total = sum(terms[1:], terms[0]) if terms else jnp.zeros((), jnp.float32)
        return total, (blobs, new_params)

    def runs_channels_last(self, layer) -> bool:
        """Whether this net runs ``layer`` on channels-last bottoms (its ``apply_nhwc``)."""
        return self.layout == "NHWC" and layer.nhwc_ok and not layer.is_data

    def conv_formulation(self, layer) -> str:
        """The formulation a (De)Convolution layer of this net runs: ``"im2col"`` or
        ``"xla"`` (the channels-first path may differ from the layer's own choice)."""
        return layer.formulation(self.runs_channels_last(layer))

    @property
    def scan_ok(self) -> bool:
        """Whether every layer's formulation runs at full speed inside ``lax.scan``, so the
        train step may fuse many iterations into one dispatch."""
        return all(layer.scan_ok(self.runs_channels_last(layer)) for layer in self.layers)

    def outputs(self, blobs: Mapping[str, Any]) -> dict[str, Any]:
        """The net's output blobs (Caffe: tops no later layer reads), e.g. loss and accuracy."""
        return {name: blobs[name] for name in self.output_names}

    def output_loss_weight(self, name: str) -> float:
        for layer, weights in zip(self.layers, self.loss_weights):
            for t, w in zip(reversed(layer.top_names), reversed(weights)):
                if t == name and w:
                    return w
        return 0.0

    # -- caffemodel mapping -----------------------------------------------------------------
    def export_blobs(self, params) -> list[tuple[caffe_pb2.LayerParameter, list]]:
        """Every layer in file order with its blobs (shared ones resolved), for save_caffemodel."""
        return [(layer.param, [np.asarray(b) for b in self._layer_blobs(params, layer)])
                for layer in self.layers]

    def copy_from(self, params, source: Mapping[str, Sequence[np.ndarray]], *,
                  filename: str = "<weights>") -> dict[str, list]:
        """Caffe's ``CopyTrainedLayersFrom``: blobs of layers with the same name replace ours.

        Source layers the net lacks are ignored (logged); a blob count or shape mismatch is an
        error naming the layer, the blob and both shapes.
        """
        new = {k: list(v) for k, v in params.items()}
        by_name = {l.name: l for l in self.layers}
        for name, blobs in source.items():
            layer = by_name.get(name)
            if layer is None:
                self._info("Ignoring source layer %s", name)
                continue
            owned = [src == (name, j) for j, src in enumerate(self._blob_source[name])]
            # HDF5 models store a shared blob only with its owner: those may be absent here.
            short_ok = len(blobs) < len(owned) and not any(owned[len(blobs):])
            if len(blobs) != len(layer.blob_shapes) and not short_ok:
                raise ModelError(f"{filename}: layer '{name}' has {len(blobs)} blob(s) but the "
                                 f"net expects {len(layer.blob_shapes)}")
            self._info("Copying source layer %s", name)
            for j, (blob, shape) in enumerate(zip(blobs, layer.blob_shapes)):
                if blob is None:
                    continue
                arr = np.asarray(blob)
                if tuple(arr.shape) != tuple(shape):
                    if _legacy_equal(arr.shape, shape):
                        arr = arr.reshape(shape)
                    else:
                        raise ModelError(f"{filename}: layer '{name}' blob {j}: shape "
                                         f"{list(arr.shape)} does not match the net's "
                                         f"{list(shape)}")
                owner, idx = self._blob_source[name][j]
                new[owner][idx] = jnp.asarray(arr, jnp.float32)
        return new

    def __repr__(self) -> str:
        return f"<Net {self.name!r} phase={self.phase} layers={len(self.layers)}>"


def _to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def _to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def _legacy_equal(found, expected) -> bool:
    """Caffe's legacy 4-d blobs (num, channels, height, width) pad the real shape with 1s."""
    strip = lambda s: tuple(s)[next((i for i, d in enumerate(s) if d != 1), len(s)):]
    return len(found) == 4 and strip(found) == strip(expected)
