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

import functools
import os
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import execution, log
from jcaffe.config import DEFAULT as DEFAULT_CONFIG
from jcaffe.config import Config
from jcaffe.errors import NetError
from jcaffe.layers.base import Context, Layer, Shape, layer_class
from jcaffe.net_params import ParamInfo, ParamTable, legacy_equal  # noqa: F401 (ParamInfo: public)
from jcaffe.proto import caffe_pb2

_log = log.get_logger("net")


def _shape_str(shape: Shape) -> str:
    if len(shape) == 0:
        return "(1)"
    return " ".join(str(d) for d in shape) + f" ({int(np.prod(shape))})"


class Net:
    """A Caffe net for one NetState. See the module docstring for the API.

    Params keys: ``params`` (and ``ParamInfo.layer``, ``layer.name``) use a net-unique key per
    layer. It is the prototxt's layer name, except for later layers of a repeated name (Caffe
    accepts those, e.g. two "loss" layers): they get ``name#2``, ``name#3``, ... by occurrence,
    skipping any key another layer of the net is named. ``layer.param.name`` keeps the
    prototxt's name; ``.caffemodel`` files are written with it. Lookups by name follow Caffe:
    ``copy_from`` fills the first layer of a name, ``shared_layer_keys`` maps a test net's
    layers to the train net's as ``ShareTrainedLayersWith`` does.

    Anonymous tops: a loss layer given no top gets one, as Caffe's ``AutoTopBlobs``; its
    internal blob name is ``(automatic):<layer key>:<index>`` and ``blob_display_name`` shows it
    as Caffe does, ``(automatic)``. It adds to the loss but is no net output.
    """

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
            state = netstate.net_state_for(net_param, netstate.phase_value(phase), level, stages)
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
        """Caffe's ``Net::Init``: each layer in file order, then the outputs and the plan."""
        self._info("Initializing net from parameters: %s (phase %s)", self.name or "(unnamed)",
                   "TRAIN" if self.phase == caffe_pb2.TRAIN else "TEST")
        self.blob_shapes: dict[str, Shape] = {}
        self.layers: list[Layer] = []
        self.loss_weights: list[list[float]] = []
        table = ParamTable()
        self.params_info = table.info  # learnable (owned) params, Caffe's order
        self._blob_source = table.sources
        self._inline_blobs: dict[str, list[np.ndarray]] = {}
        self.force_backward = bool(self.net_param.force_backward)
        self._stopped_bottoms: dict[str, frozenset[int]] = {}
        # Layers whose LayerParameter.phase differs from the net's: their fixed train flag.
        self._layer_train: dict[str, bool] = {}
        if self.net_param.debug_info:
            _log.warning("%s: debug_info: true is not implemented (Caffe logs every layer's data "
                         "and gradient norms per pass); the net runs without it", self.source)
        keys = _layer_keys([lp.name for lp in self.net_param.layer])
        for lp, key in zip(self.net_param.layer, keys):
            layer = self._add_layer(lp, key)
            table.add(lp, layer)
            if len(lp.blobs):
                self._inline_blobs[key] = _inline_blobs(lp, layer, self.source)
            self._stopped_bottoms[key] = _stopped(lp, layer, self.force_backward)
        self.output_names = _outputs(self.net_param)
        self.data_layers = [l for l in self.layers if l.is_data]
        if self.force_backward:
            self._info("force_backward: gradients reach every parameter (lr_mult 0 included) "
                       "and every bottom Caffe allows, propagate_down: false notwithstanding")
        # Params whose gradient Caffe never computes (lr_mult 0): ``apply(frozen=True)``
        # stops theirs. force_backward makes Caffe compute all of them.
        self._frozen_params = (frozenset() if self.force_backward else
                               frozenset((p.layer, p.index) for p in self.params_info
                                         if p.lr_mult == 0))
        # How each layer runs (layout, formulation, scan): one frozen table.
        self.plan = execution.resolve(self.layers, self.layout)
        self._info("Network initialization done.")

    def _add_layer(self, lp, key: str) -> Layer:
        """Checks ``lp``'s wiring against the blobs so far, builds the layer (params keyed
        ``key``), records its tops and loss weights."""
        shapes = self.blob_shapes
        for b in lp.bottom:
            if b not in shapes:
                known = ", ".join(self.blob_display_name(s) for s in shapes
                                  if not _is_automatic(s)) or "none"
                raise NetError(f"layer '{lp.name}' (type {lp.type}): unknown bottom blob "
                               f"'{b}' (no earlier layer produces it; available: {known})")
        if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
            raise NetError(f"layer '{lp.name}' (type {lp.type}): propagate_down must be "
                           f"given 0 or {len(lp.bottom)} times (once per bottom), got "
                           f"{len(lp.propagate_down)}")
        cls = _layer_class(lp, self.source)
        self._info("Creating Layer %s", lp.name)
        for b in lp.bottom:
            self._info("%s <- %s", lp.name, b)
        # A layer's own ``phase`` wins over the net's (Caffe: inherited only when unset).
        phase = lp.phase if lp.HasField("phase") else self.phase
        if phase != self.phase:
            self._layer_train[key] = phase == caffe_pb2.TRAIN
        layer = cls(_with_automatic_tops(lp, cls, key), [shapes[b] for b in lp.bottom], phase,
                    config=self.config, net_source=self.source)
        # The layer keeps the prototxt's LayerParameter (an anonymous top is not part of
        # it, as in Caffe) and the net-unique name that keys its params.
        layer.param = lp
        layer.name = key
        for i, (t, s) in enumerate(zip(layer.top_names, layer.top_shapes)):
            in_place = i < len(lp.bottom) and lp.bottom[i] == t
            if t in shapes and not in_place:
                raise NetError(f"layer '{lp.name}' (type {lp.type}): top blob '{t}' is "
                               f"produced by multiple sources (an earlier layer already "
                               f"produces it; only an in-place top may reuse a bottom)")
            self._info("%s -> %s%s", lp.name, self.blob_display_name(t),
                       " (in-place)" if in_place else "")
            shapes[t] = s
        for s in layer.top_shapes:
            self._info("Top shape: %s", _shape_str(s))
        self.layers.append(layer)
        self.loss_weights.append(_loss_weights(lp, layer))
        for t, w in zip(layer.top_names, self.loss_weights[-1]):
            if w:
                self._info("    with loss weight %g", w)
        return layer

    def blob_display_name(self, name: str) -> str:
        """The name Caffe shows for a blob: ``(automatic)`` for an anonymous top (a loss layer
        given no top), the blob's own name otherwise."""
        return AUTOMATIC if _is_automatic(name) else name

    def layer_keys_by_name(self) -> dict[str, list[str]]:
        """Prototxt layer name → the params keys of the layers of that name, in file order."""
        out: dict[str, list[str]] = {}
        for layer in self.layers:
            out.setdefault(layer.param.name, []).append(layer.name)
        return out

    def shared_layer_keys(self, source: "Net") -> dict[str, str]:
        """Caffe's ``ShareTrainedLayersWith(source)``: params key here → params key in
        ``source`` whose blobs this net uses.

        Caffe walks the source's layers in order and shares each into the *first* layer here
        of the same name, so a later source layer of a repeated name wins and later layers
        here of a repeated name keep their own blobs. Layers without blobs are skipped; a
        blob count or shape mismatch is a NetError naming the layer.
        """
        from jcaffe.net_params import shared_layer_keys

        return shared_layer_keys(self.layers, source.layers)

    # -- the pure API -----------------------------------------------------------------------
    def init(self, key: jax.Array, skip: Collection[str] = ()) -> dict[str, list[jax.Array | None]]:
        """Fresh parameters from the layers' fillers, one key per layer (fold_in by index).

        Layers (params keys) in ``skip`` get ``None`` blobs: a test net's layers that take the
        train net's blobs (``shared_layer_keys``) need no filling of their own."""
        skip = frozenset(skip)
        if all(layer.name in skip for layer in self.layers if layer.blob_shapes):
            return self._init(key, skip)
        # One compiled program for all fillers: op by op, each filler would compile on its own
        # (seconds of start-up for LeNet).
        return jax.jit(functools.partial(self._init, skip=skip))(key)

    def _init(self, key: jax.Array, skip: frozenset = frozenset()) -> dict[str, list[jax.Array | None]]:
        from jcaffe.net_params import fill_params

        return fill_params(self.layers, self._blob_source, self._inline_blobs, key, skip)

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
        return self.apply_range(params, {}, 0, len(self.layers) - 1, inputs=inputs, train=train,
                                key=key, mutable=mutable, frozen=frozen)

    def apply_range(self, params, blobs: Mapping[str, Any], start: int, end: int, *,
                    inputs: Mapping[str, Any] | None = None, fixed: Collection[str] = (),
                    taps: Mapping[str, Any] | None = None, train: bool | None = None,
                    key: jax.Array | None = None, mutable: bool = False, frozen: bool = False):
        """Caffe's ``ForwardFromTo(start, end)``: runs ``layers[start..end]`` (inclusive).

        ``blobs`` holds the values (Caffe's NCHW) of blobs the range reads but does not produce
        first; the result is ``blobs`` updated with every top the range produces. ``fixed``
        names tops that keep their value from ``blobs`` instead of the layer's (a layer all of
        whose tops are fixed is not run: pycaffe's Input blobs, DummyData tops of a constant
        filler, which Caffe fills once). ``taps`` maps a blob name to an array added to the
        first value the range produces for it: with zeros, the gradient with respect to the
        tap is the gradient Caffe's backward pass leaves in that blob's diff (in-place layers
        later overwrite the value, not the tap). Layer ``i`` draws from ``fold_in(key, i)``
        whatever the range, so a range repeats the full pass's random numbers. ``apply`` is
        the full range from no blobs.
        """
        train = (self.phase == caffe_pb2.TRAIN) if train is None else train
        inputs = inputs or {}
        fixed = frozenset(fixed)
        taps = dict(taps or {})
        blobs: dict[str, jax.Array] = dict(blobs)
        # Blobs held channels-last inside the program (see ``layout``); every interface,
        # including the returned dict, stays Caffe's NCHW.
        nhwc: set[str] = set()
        new_params = dict(params) if mutable else None
        frozen_set = self._frozen_params if frozen else frozenset()
        for i in range(start, end + 1):
            layer = self.layers[i]
            if layer.top_names and all(t in fixed for t in layer.top_names):
                for t in layer.top_names:
                    nhwc.discard(t)
                continue
            lkey = jax.random.fold_in(key, i) if (key is not None and layer.needs_key) else None
            ctx = Context(train=self._layer_train.get(layer.name, train), key=lkey)
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
                stopped = self._stopped_bottoms[layer.name]
                if stopped:
                    bottoms = [jax.lax.stop_gradient(b) if k in stopped else b
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
                last = channels_last and v.ndim == 4
                if t in fixed:
                    v, last = blobs[t], False
                elif t in taps:
                    tap = taps.pop(t)
                    v = v + (_to_nhwc(tap) if last else tap).astype(v.dtype)
                blobs[t] = v
                if last:
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
        """Whether this net runs ``layer`` on channels-last bottoms (its ``apply_nhwc``):
        ``plan``'s layout."""
        return self.plan[layer.name].channels_last

    def conv_formulation(self, layer) -> str:
        """The formulation a (De)Convolution layer of this net runs (``plan``): ``"im2col"``,
        ``"onednn"`` or ``"xla"`` (the channels-first path may differ from the layer's own
        choice)."""
        return self.plan[layer.name].formulation

    @property
    def scan_ok(self) -> bool:
        """Whether every layer's formulation runs at full speed inside ``lax.scan``, so the
        train step may fuse many iterations into one dispatch (``plan.scan_ok``)."""
        return self.plan.scan_ok

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
        from jcaffe.net_params import copy_trained_layers

        return copy_trained_layers(self.layers, self._blob_source, params, source, filename,
                                   self._info)

    def __repr__(self) -> str:
        return f"<Net {self.name!r} phase={self.phase} layers={len(self.layers)}>"


def _to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def _to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def _stopped(lp, layer: Layer, force_backward: bool) -> frozenset[int]:
    """Bottom indices whose gradient is stopped: Caffe's ``propagate_down: false``, which
    ``force_backward`` overrides wherever the layer's ``AllowForceBackward`` holds."""
    stopped = {k for k, flag in enumerate(lp.propagate_down) if not flag}
    if force_backward:
        stopped &= _no_force_backward(layer)
    return frozenset(stopped)


def _loss_weights(lp, layer: Layer) -> list[float]:
    """Caffe's SetLossWeights: one per top (anonymous tops counted), 1 on a loss layer's
    first top when the prototxt gives none."""
    n = len(layer.top_names)
    if len(lp.loss_weight):
        if len(lp.loss_weight) != n:
            raise NetError(f"layer '{lp.name}': loss_weight must be given once per top "
                           f"({n}), got {len(lp.loss_weight)}")
        return [float(w) for w in lp.loss_weight]
    return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(n)]


def _outputs(net_param) -> list[str]:
    """Caffe's net outputs: blobs no later layer consumes (an in-place top re-produces its
    bottom). Caffe keeps them in a std::set, so they come out sorted by name. Anonymous tops
    (loss layers given no top) are never outputs: Caffe appends them without making them
    available."""
    available: set[str] = set()
    for lp in net_param.layer:
        available.difference_update(lp.bottom)
        available.update(lp.top)
    return sorted(available)


AUTOMATIC = "(automatic)"
_AUTOMATIC_PREFIX = "(automatic):"


def _is_automatic(blob_name: str) -> bool:
    return blob_name.startswith(_AUTOMATIC_PREFIX)


def _layer_class(lp, source: str):
    """The layer class, or a NetError saying whether the type is a fork's or BVLC Caffe's."""
    from jcaffe.layers.base import known_types
    from jcaffe.layers.catalog import BVLC_LAYER_TYPES, fork_note

    known = known_types()
    if lp.type in known:
        return layer_class(lp)
    where = f"{source}: layer '{lp.name}'"
    if lp.type in BVLC_LAYER_TYPES:
        why = "a BVLC Caffe layer type jcaffe does not implement"
    else:
        why = f"it {fork_note(lp.type)}"
    raise NetError(f"{where}: unknown layer type '{lp.type}': {why}. Known types: "
                   f"{', '.join(known)}")


def _layer_keys(names: Sequence[str]) -> list[str]:
    """Net-unique params keys: a layer's own name, or for a later layer of a repeated name
    ``name#2``, ``name#3``, ... (the occurrence number, skipping any key another layer is
    named)."""
    taken = set(names)
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        n = seen.get(name, 0) + 1
        seen[name] = n
        if n == 1:
            keys.append(name)
            continue
        while f"{name}#{n}" in taken:
            n += 1
        key = f"{name}#{n}"
        taken.add(key)
        keys.append(key)
    return keys


def _with_automatic_tops(lp, cls, key: str):
    """Caffe's ``AutoTopBlobs``: a loss layer given fewer tops than it needs gets anonymous
    ones (``Net::AppendTop`` names them ``(automatic)``). Internally each gets a unique name,
    ``(automatic):<layer key>:<top index>``; no other layer can read it."""
    if not cls.is_loss:
        return lp
    needed = max(cls.exact_tops or 0, cls.min_tops or 0)
    if len(lp.top) >= needed:
        return lp
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(lp)
    out.top.extend(f"{_AUTOMATIC_PREFIX}{key}:{i}" for i in range(len(lp.top), needed))
    return out


# AllowForceBackward: loss layers refuse gradients into their label bottom (index 1), except
# EuclideanLoss (both bottoms are data) and ContrastiveLoss (the similarity, index 2).
_FORCE_BACKWARD_REFUSED = {"EuclideanLoss": frozenset(), "ContrastiveLoss": frozenset({2}),
                           "LSTM": frozenset({1}), "RNN": frozenset({1})}


def _no_force_backward(layer: Layer) -> frozenset[int]:
    if layer.type in _FORCE_BACKWARD_REFUSED:
        return _FORCE_BACKWARD_REFUSED[layer.type]
    return frozenset({1}) if layer.is_loss else frozenset()


def _inline_blobs(lp, layer: Layer, source: str) -> list[np.ndarray]:
    """The blobs a LayerParameter carries (Caffe initialises the layer from them instead of
    its fillers), checked against the layer's blob count and shapes."""
    from jcaffe.caffemodel import blob_to_array

    where = f"{source}: layer '{lp.name}' (type {lp.type})"
    if len(lp.blobs) != len(layer.blob_shapes):
        raise NetError(f"{where}: {len(lp.blobs)} inline blob(s) given but the layer has "
                       f"{len(layer.blob_shapes)} parameter blob(s) "
                       f"{[list(s) for s in layer.blob_shapes]}")
    out = []
    for j, (blob, shape) in enumerate(zip(lp.blobs, layer.blob_shapes)):
        arr = blob_to_array(blob, f"{where} inline blob {j}")
        if tuple(arr.shape) != tuple(shape):
            if not legacy_equal(arr.shape, shape):
                raise NetError(f"{where}: inline blob {j} has shape {list(arr.shape)} but the "
                               f"layer expects {list(shape)}")
            arr = arr.reshape(shape)
        out.append(arr)
    return out
