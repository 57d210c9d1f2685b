"""pycaffe's ``Net`` and ``Blob`` on jcaffe's core.

Caffe's Net is a stateful object whose blobs live in memory a user reads and writes; jcaffe's
``jcaffe.Net`` is a pure function. This module keeps the state: each ``Blob`` owns its data
and diff, and every ``forward`` / ``backward`` runs a compiled program (``jcaffe.Net.apply_range``
over the layer range, ``jax.vjp`` of it backwards) on the values the blobs hold, then stores
the results back.

Where values live. A blob's data (and, separately, its diff) stays on the device until the
user touches ``blob.data`` (``.diff``): from then on it is *watched*, its numpy buffer is the
truth, uploaded to the device when a program reads it and overwritten in place when a program
writes it, so a view taken earlier sees the new values, as in Caffe's CPU mode. Unwatched blobs
never travel: only what the user reads or writes is copied between device and host.

Programs. One ``jax.jit`` per (kind, start layer, end layer) of each shape variant of the net;
JAX caches its compilations by input shapes, so a loop of ``forward()`` calls compiles once.

Semantics (Caffe's, see ``net.cpp`` / ``_caffe.cpp`` / ``pycaffe.py``):

* ``forward(start, end)`` runs ``ForwardFromTo``: layers in the range read whatever their
  bottoms hold. Data layers read their next batch on the host; ``Input`` tops and DummyData
  tops of a constant filler (Caffe fills those once) keep what the user wrote; random DummyData
  tops are redrawn.
* ``backward(start, end)`` runs ``BackwardFromTo``: top diffs are read from the blobs (a loss
  top's diff is its ``loss_weight``, set at construction), bottom diffs are overwritten,
  parameter diffs accumulate until ``clear_param_diffs()``. Only blobs Caffe's
  ``blob_need_backward`` marks get a diff (``force_backward`` marks the inputs too).
* A blob's shape follows its net: reshape an input blob and the next ``forward`` /
  ``reshape()`` rebuilds the net for the new input shapes (parameters are kept).
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.errors import JcaffeError, NetError
from jcaffe.proto import caffe_pb2

_log = log.get_logger("pycaffe")

# Blob fields.
_FIELDS = ("data", "diff")


class _Field:
    """One of a blob's two arrays: on the device (``dev``), or watched on the host (``host``)."""

    __slots__ = ("host", "dev")

    def __init__(self):
        self.host: np.ndarray | None = None
        self.dev = None


class Blob:
    """Caffe's Blob as pycaffe shows it: ``data`` and ``diff``, float32 numpy arrays of
    ``shape``, which the user may write into; ``num`` / ``channels`` / ``height`` / ``width``
    are Caffe's legacy accessors (an axis the blob lacks reads as 1)."""

    def __init__(self, shape=(), *, device=None):
        self._shape = tuple(int(d) for d in shape)
        self._device = device
        self._f = {k: _Field() for k in _FIELDS}

    # -- Caffe's accessors ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    def _legacy(self, axis: int) -> int:
        if len(self._shape) > 4:
            raise ValueError("Cannot use legacy accessors on Blobs with > 4 axes.")
        return self._shape[axis] if axis < len(self._shape) else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    @property
    def data(self) -> np.ndarray:
        return self._host("data")

    @property
    def diff(self) -> np.ndarray:
        return self._host("diff")

    def reshape(self, *shape) -> None:
        """``blob.reshape(n, c, h, w)``: a new shape; data and diff are zero-filled when it
        changes (Caffe reallocates; its contents are then unspecified)."""
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"Blob.reshape: negative dimension in {list(dims)}")
        if dims == self._shape:
            return
        self._shape = dims
        for f in self._f.values():
            f.dev = None
            if f.host is not None:
                f.host = np.zeros(dims, np.float32)

    def __repr__(self) -> str:
        return f"<caffe.Blob shape={list(self._shape)}>"

    # -- between the blob and the programs --------------------------------------------------
    # Set by a solver on its train net's blobs: brings the last iteration's values in first.
    _refresh = None

    def _host(self, which: str) -> np.ndarray:
        """The numpy buffer of ``which``; from now on the host holds its truth (watched)."""
        if self._refresh is not None:
            self._refresh()
        f = self._f[which]
        if f.host is None or f.host.shape != self._shape:
            f.host = (np.zeros(self._shape, np.float32) if f.dev is None
                      else np.array(f.dev, np.float32).reshape(self._shape))
            f.dev = None
        return f.host

    def _get(self, which: str):
        """The device value of ``which`` (uploading a watched buffer)."""
        if self._refresh is not None:
            self._refresh()
        f = self._f[which]
        if f.host is not None:
            return jax.device_put(np.array(f.host, np.float32), self._device)
        if f.dev is None:
            f.dev = jax.device_put(np.zeros(self._shape, np.float32), self._device)
        return f.dev

    def _put(self, which: str, value) -> None:
        """Stores a program's result (a device array) into ``which``: in place into a watched
        buffer (views taken earlier see it), by reference otherwise."""
        shape = tuple(value.shape)
        if shape != self._shape:
            self.reshape(*shape)
        f = self._f[which]
        if f.host is not None:
            np.copyto(f.host, np.asarray(value, np.float32))
        else:
            f.dev = value

    def _watched(self, which: str) -> bool:
        return self._f[which].host is not None


class BlobVec(list):
    """``layer.blobs``: a list of Blobs."""

    def add_blob(self, *shape) -> None:
        self.append(Blob(shape))


class LayerView:
    """``net.layers[i]``: Caffe's Layer as pycaffe shows it (``type``, ``blobs``, ``setup``,
    ``reshape``). For a Python layer, other attributes are the layer object's own."""

    def __init__(self, net: "Net", index: int, blobs: BlobVec):
        self._net = weakref.ref(net)
        self._index = index
        self.blobs = blobs

    @property
    def _core_layer(self):
        net = self._net()
        if net is None:
            raise RuntimeError("the layer's net no longer exists")
        return net._core.layers[self._index]

    @property
    def type(self) -> str:
        return self._core_layer.param.type

    def setup(self, bottom=None, top=None) -> None:
        """Caffe's ``LayerSetUp``: done when the net was built."""

    def reshape(self, bottom=None, top=None) -> None:
        """Caffe's ``Layer::Reshape``: jcaffe reshapes whole nets (``net.reshape()``)."""
        net = self._net()
        if net is not None:
            net.reshape()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        impl = getattr(self._core_layer, "impl", None)
        if impl is not None and hasattr(impl, name):
            return getattr(impl, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        return f"<caffe.Layer {self._core_layer.param.name!r} type={self.type!r}>"


def _lr_mults(lp, n: int) -> list[float]:
    return [float(lp.param[j].lr_mult) if j < len(lp.param) else 1.0 for j in range(n)]


class _Range:
    """What a layer range reads, produces and hands back (static per core net and range)."""

    def __init__(self, net: "Net", core, start: int, end: int, backward: bool):
        produced: list[str] = []
        reads: list[str] = []
        fixed: set[str] = set()
        last_read: dict[str, int] = {}
        last_made: dict[str, int] = {}
        made_count: dict[str, int] = {}
        for i in range(start, end + 1):
            layer = core.layers[i]
            fixed_here = net._fixed_tops(layer, backward)
            if layer.top_names and all(t in fixed_here for t in layer.top_names):
                fixed.update(layer.top_names)
                continue
            if not layer.is_data:
                for b in layer.bottom_names:
                    if b not in produced and b not in reads and b not in fixed:
                        reads.append(b)
                    last_read[b] = i
            for t in layer.top_names:
                if t in fixed_here:
                    fixed.add(t)
                    continue
                if t not in produced:
                    produced.append(t)
                last_made[t] = i
                made_count[t] = made_count.get(t, 0) + 1
        self.start, self.end = start, end
        self.fixed = fixed
        self.ext = reads + sorted(fixed - set(reads))
        self.produced = produced
        # Tops whose final value no later layer of the range reads: their diffs are the
        # cotangents a backward pass starts from.
        self.cots = [t for t in produced if last_read.get(t, -1) <= last_made[t]]
        self.made_once = {t for t, c in made_count.items() if c == 1}
        owners = []
        for i in range(start, end + 1):
            layer = core.layers[i]
            for src in core._blob_source[layer.name]:
                if src not in owners:
                    owners.append(src)
        self.owners = owners


class Net:
    """pycaffe's ``caffe.Net``.

    ``Net(network_file, phase, level=0, stages=None, weights=None)``, or the deprecated
    ``Net(network_file, pretrained_file, phase)``. ``phase`` is ``caffe.TRAIN`` or
    ``caffe.TEST``. See the module doc for how blobs and programs work.
    """

    def __init__(self, network_file, *args, level: int = 0, stages=None, weights=None,
                 phase=None, **kwargs):
        from caffe import _state

        if kwargs:
            raise TypeError(f"Net() got unexpected keyword arguments {sorted(kwargs)}")
        if args and isinstance(args[0], (str, bytes, os.PathLike)):
            # Caffe's deprecated Net(param_file, pretrained_param_file, phase).
            _log.warning("DEPRECATION WARNING - deprecated use of Python interface; use "
                         "caffe.Net('%s', caffe.%s, weights='%s')", network_file,
                         "TRAIN" if (args[1:] or [phase])[0] == caffe_pb2.TRAIN else "TEST",
                         args[0])
            weights = os.fsdecode(args[0])
            args = args[1:]
        if args:
            if phase is not None:
                raise TypeError("Net() got phase twice")
            phase, *rest = args
            if rest:
                level, *rest = rest
            if rest:
                stages, *rest = rest
            if rest:
                weights, *rest = rest
            if rest:
                raise TypeError("Net() takes at most 5 positional arguments")
        if phase is None:
            raise TypeError("Net() needs a phase: caffe.TRAIN or caffe.TEST")
        network_file = os.fsdecode(network_file)
        _check_file(network_file)
        stages = [str(s) for s in (stages or [])]
        with _state.caffe_errors():
            from jcaffe import Net as CoreNet

            core = CoreNet(network_file, int(phase), int(level), stages,
                           config=_state.config(), verbose=_state.verbose())
        self._setup(core, _state.device(), _state.next_key())
        if weights is not None:
            weights = os.fsdecode(weights)
            _check_file(weights)
            self.copy_from(weights)

    @classmethod
    def _from_core(cls, core, params=None, device=None, key=None, shared=None) -> "Net":
        """A Net around an already built core net (the solver's), with optional initial
        ``params`` (``{layer: [array|None]}``) and ``shared`` param Blobs (``(layer, j)`` ->
        Blob) it takes from another net."""
        from caffe import _state

        self = cls.__new__(cls)
        self._setup(core, device or _state.device(), key if key is not None else
                    _state.next_key(), params=params, shared=shared)
        return self

    # -- construction -----------------------------------------------------------------------
    def _setup(self, core, device, key, params=None, shared=None) -> None:
        self._core = core
        self._cores = {self._input_shapes_of(core): core}
        self._device = device
        self._key = key
        self._calls = itertools.count()
        self._last_key = None
        self._programs: dict = {}
        self._readers: dict = {}
        self._source = core.source
        self._layer_names = [l.param.name for l in core.layers]
        blob_names: list[str] = []
        for l in core.layers:
            for t in l.top_names:
                if t not in blob_names and not t.startswith("(automatic)"):
                    blob_names.append(t)
        self._blob_names = blob_names
        self._blobs = OrderedDict((b, Blob(core.blob_shapes[b], device=device))
                                  for b in blob_names)
        # Anonymous loss tops: kept apart (not in ``blobs``), still a backward pass's start.
        self._hidden = {t: Blob(core.blob_shapes[t], device=device)
                        for l in core.layers for t in l.top_names if t.startswith("(automatic)")}
        if params is None:
            with jax.default_device(device):
                params = core.init(key)
        shared = shared or {}
        self._param_blobs: dict[tuple[str, int], Blob] = {}
        for l in core.layers:
            for j, src in enumerate(core._blob_source[l.name]):
                if src in self._param_blobs:
                    continue
                if src in shared:
                    self._param_blobs[src] = shared[src]
                    continue
                value = params[src[0]][src[1]]
                blob = Blob(core.layers[[x.name for x in core.layers].index(src[0])]
                            .blob_shapes[src[1]], device=device)
                if value is not None:
                    blob._put("data", jax.device_put(value, device))
                self._param_blobs[src] = blob
        self.layers = [LayerView(self, i, BlobVec(self._param_blobs[src]
                                                  for src in core._blob_source[l.name]))
                       for i, l in enumerate(core.layers)]
        # Constant DummyData tops: filled once (Caffe's refill_ false), then the user's.
        for l in core.layers:
            if l.param.type == "DummyData":
                for t, f, s in zip(l.top_names, l.fillers, l.top_shapes):
                    if f.type == "constant":
                        self._blobs[t]._put("data", jax.device_put(
                            np.full(s, f.value, np.float32), device))
        # A loss top's diff is its loss weight (Caffe's SetLossWeights).
        for l, weights in zip(core.layers, core.loss_weights):
            for t, w in zip(l.top_names, weights):
                if w:
                    blob = self._hidden.get(t) or self._blobs[t]
                    blob._put("diff", jax.device_put(np.full(blob.shape, w, np.float32),
                                                     device))

    @staticmethod
    def _input_shapes_of(core) -> tuple:
        return tuple((t, tuple(s)) for l in core.layers if l.param.type == "Input"
                     for t, s in zip(l.top_names, l.top_shapes))

    def _fixed_tops(self, layer, backward: bool) -> set[str]:
        """Tops of ``layer`` a program takes from the blobs instead of computing."""
        t = layer.param.type
        if t == "Input":
            return set(layer.top_names)
        if t == "DummyData":
            if backward:
                return set(layer.top_names)
            return {n for n, f in zip(layer.top_names, layer.fillers) if f.type == "constant"}
        if layer.is_data and backward:
            # Backward passes take what the last forward pass read (no gradient flows there).
            return set(layer.top_names)
        return set()

    def _need_backward(self, core) -> set[str]:
        """Caffe's ``blob_need_backward_``: blobs a backward pass writes a diff into."""
        from jcaffe.net import _no_force_backward

        cached = getattr(core, "_pycaffe_need", None)
        if cached is not None:
            return cached
        need: set[str] = set()
        for l in core.layers:
            mults = _lr_mults(l.param, len(l.blob_shapes))
            lb = any(b in need for b in l.bottom_names) or any(m != 0 for m in mults)
            if core.force_backward and not l.is_data:
                lb = True
                refused = _no_force_backward(l)
                need.update(b for k, b in enumerate(l.bottom_names) if k not in refused)
            if lb:
                need.update(l.top_names)
        core._pycaffe_need = need
        return need

    # -- names ------------------------------------------------------------------------------
    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        return self._blobs

    @property
    def params(self) -> "OrderedDict[str, BlobVec]":
        return OrderedDict((name, layer.blobs) for name, layer in
                           zip(self._layer_names, self.layers) if len(layer.blobs))

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def inputs(self) -> list[str]:
        return [t for l in self._core.layers if l.param.type == "Input" for t in l.top_names]

    @property
    def outputs(self) -> list[str]:
        return list(self._core.output_names)

    @property
    def top_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, [t for t in l.top_names if not t.startswith("(automatic)")])
                           for n, l in zip(self._layer_names, self._core.layers))

    @property
    def bottom_names(self) -> "OrderedDict[str, list[str]]":
        return OrderedDict((n, list(l.bottom_names))
                           for n, l in zip(self._layer_names, self._core.layers))

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict((b, self._core.output_loss_weight(b)) for b in self._blob_names)

    @property
    def _blob_loss_weights(self) -> list[float]:
        return list(self.blob_loss_weights.values())

    @property
    def _inputs(self) -> list[int]:
        return [self._blob_names.index(b) for b in self.inputs]

    @property
    def _outputs(self) -> list[int]:
        return [self._blob_names.index(b) for b in self.outputs]

    def _layer_index(self, name, what: str) -> int:
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise ValueError(f"{name!r} is not in list: no layer of that name for {what} "
                             f"(layers: {', '.join(self._layer_names)})") from None

    # -- shapes -----------------------------------------------------------------------------
    def _current_core(self):
        """The core net for the input blobs' current shapes (built once per shape set)."""
        shapes = tuple((t, tuple(self._blobs[t].shape)) for t, _ in
                       self._input_shapes_of(self._core))
        core = self._cores.get(shapes)
        if core is None:
            from caffe import _state
            from jcaffe import Net as CoreNet

            npar = caffe_pb2.NetParameter()
            npar.CopyFrom(self._core.net_param)
            want = dict(shapes)
            for lp in npar.layer:
                if lp.type == "Input":
                    del lp.input_param.shape[:]
                    for t in lp.top:
                        lp.input_param.shape.add().dim.extend(want[t])
            with _state.caffe_errors():
                core = CoreNet(npar, state=self._core.state, config=self._core.config,
                               verbose=False, source=self._source)
            for src, blob in self._param_blobs.items():
                owner = next(l for l in core.layers if l.name == src[0])
                if tuple(owner.blob_shapes[src[1]]) != tuple(blob.shape):
                    raise RuntimeError(f"layer '{src[0]}' blob {src[1]}: the new input shapes "
                                       f"need shape {list(owner.blob_shapes[src[1]])}, but the "
                                       f"parameter has {list(blob.shape)}")
            self._cores[shapes] = core
        self._core = core
        return core

    def reshape(self) -> None:
        """Caffe's ``Net::Reshape``: every blob takes the shape the input blobs imply."""
        core = self._current_core()
        for name, blob in self._blobs.items():
            blob.reshape(*core.blob_shapes[name])

    # -- running ----------------------------------------------------------------------------
    def _params(self, which: str = "data"):
        core = self._core
        return {l.name: [self._param_blobs[src]._get(which) if src == (l.name, j) else None
                         for j, src in enumerate(core._blob_source[l.name])]
                for l in core.layers if l.blob_shapes}

    def _blob(self, name: str) -> Blob:
        return self._blobs[name] if name in self._blobs else self._hidden[name]

    def _reader(self, layer):
        reader = self._readers.get(layer.name)
        if reader is None or getattr(reader, "layer", layer) is not layer:
            from caffe import _state

            reader = layer.make_reader(_state.data_seed())
            self._readers[layer.name] = reader
        return reader

    # Set by a solver on its nets: ``fn(batch index) -> {top: raw array}`` for every data layer,
    # read from the solver's own feed (a database is opened once per process).
    _batch_source = None

    def _next_batch(self, layer) -> dict:
        """The raw arrays of the next batch of ``layer`` (its tops)."""
        if self._batch_source is None:
            return self._reader(layer).next_batch()
        count = self._batches_read = getattr(self, "_batches_read", {})
        if "pass" not in count or layer.name in count["pass"]:
            # A new forward pass: every data layer moves on to the next batch together.
            count["index"] = count.get("index", -1) + 1
            count["pass"] = set()
        count["pass"].add(layer.name)
        return self._batch_source(count["index"])

    def _program(self, kind: str, start: int, end: int):
        core = self._core
        key = (id(core), kind, start, end)
        prog = self._programs.get(key)
        if prog is not None:
            return prog
        rng = _Range(self, core, start, end, backward=(kind == "backward"))
        train = core.phase == caffe_pb2.TRAIN
        if kind == "forward":
            stateful = [l.name for l in core.layers[start:end + 1] if l.stateful]

            def run(params, ext, inputs, key):
                blobs, new_params = core.apply_range(params, ext, start, end, inputs=inputs,
                                                     fixed=rng.fixed, train=train, key=key,
                                                     mutable=True)
                return ({t: blobs[t] for t in rng.produced},
                        {k: new_params[k] for k in stateful})
        else:
            need = self._need_backward(core)
            taps_for = [t for t in rng.produced if t in need]
            ext_for = [b for b in rng.ext if b in need]
            owners = rng.owners

            def run(params, pdiffs, ext, key, cots):
                taps = {t: jnp.zeros(core.blob_shapes[t], jnp.float32) for t in taps_for}

                def f(params, ext, taps):
                    blobs, _ = core.apply_range(params, ext, start, end, fixed=rng.fixed,
                                                taps=taps, train=train, key=key, mutable=True,
                                                frozen=True)
                    return {t: blobs[t] for t in rng.cots}

                _, vjp = jax.vjp(f, params, ext, taps)
                g_params, g_ext, g_taps = vjp(cots)
                new_pdiffs = {f"{o[0]}\x00{o[1]}": pdiffs[f"{o[0]}\x00{o[1]}"]
                              + g_params[o[0]][o[1]] for o in owners}
                return (new_pdiffs, {b: g_ext[b] for b in ext_for},
                        {t: g_taps[t] for t in taps_for})

        prog = (jax.jit(run), rng)
        self._programs[key] = prog
        return prog

    def _compiled(self) -> int:
        """How many programs this net has compiled (all kinds, ranges and shapes)."""
        return sum(p[0]._cache_size() for p in self._programs.values())

    def _forward(self, start: int, end: int, *, params=None, key=None, inputs=None) -> None:
        """Caffe's ``ForwardFromTo(start, end)`` (layer indices, inclusive). A solver gives
        the ``params``, ``key`` and data-layer ``inputs`` of an iteration it ran."""
        from caffe import _state

        core = self._current_core()
        fn, rng = self._program("forward", start, end)
        feed = {}
        for l in core.layers[start:end + 1]:
            if l.is_data and l.param.type != "Input" and not (
                    l.top_names and all(t in rng.fixed for t in l.top_names)):
                if inputs is None:
                    with _state.caffe_errors():
                        batch = self._next_batch(l)
                else:
                    batch = inputs
                for t, _, _ in l.input_specs():
                    feed[t] = jax.device_put(batch[t], self._device)
        if key is None:
            key = jax.random.fold_in(self._key, next(self._calls))
        self._last_key = key
        ext = {b: self._blob(b)._get("data") for b in rng.ext}
        if params is None:
            params = self._params()
        with jax.default_device(self._device), _state.caffe_errors():
            produced, updated = fn(params, ext, feed, key)
        for t, v in produced.items():
            self._blob(t)._put("data", v)
        for k, blobs in updated.items():
            for j, v in enumerate(blobs):
                if v is not None:
                    self._param_blobs[(k, j)]._put("data", v)

    def _backward(self, start: int, end: int) -> None:
        """Caffe's ``BackwardFromTo(start, end)``, ``start >= end`` (layer indices)."""
        from caffe import _state

        if start < end:
            return
        core = self._current_core()
        fn, rng = self._program("backward", end, start)
        key = self._last_key if self._last_key is not None else self._key
        ext = {b: self._blob(b)._get("data") for b in rng.ext}
        cots = {t: self._blob(t)._get("diff") for t in rng.cots}
        pdiffs = {f"{o[0]}\x00{o[1]}": self._param_blobs[o]._get("diff") for o in rng.owners}
        with jax.default_device(self._device), _state.caffe_errors():
            new_pdiffs, g_ext, g_taps = fn(self._params(), pdiffs, ext, key, cots)
        for name, v in new_pdiffs.items():
            k, j = name.split("\x00")
            self._param_blobs[(k, int(j))]._put("diff", v)
        for b, v in g_ext.items():
            self._blob(b)._put("diff", v)
        for t, v in g_taps.items():
            if t in rng.cots and t in rng.made_once:
                continue  # its diff is what the pass started from
            self._blob(t)._put("diff", v)

    def forward(self, blobs=None, start=None, end=None, **kwargs) -> dict:
        """Runs layers ``start`` .. ``end`` (names, inclusive; default: all). ``kwargs`` set
        input blobs first (every input, batch-sized). Returns ``{blob: data}`` for the net's
        outputs (``end``'s tops when ``end`` is given) and ``blobs``."""
        blobs = list(blobs or [])
        start_ind = 0 if start is None else self._layer_index(start, "start")
        if end is not None:
            end_ind = self._layer_index(end, "end")
            outputs = set(self.top_names[end] + blobs)
        else:
            end_ind = len(self.layers) - 1
            outputs = set(self.outputs + blobs)
        if kwargs:
            if set(kwargs) != set(self.inputs):
                raise Exception("Input blob arguments do not match net inputs.")
            for name, value in kwargs.items():
                if value.shape[0] != self._blobs[name].shape[0]:
                    raise Exception("Input is not batch sized")
                self._blobs[name].data[...] = value
        if start_ind <= end_ind:
            self._forward(start_ind, end_ind)
        return {out: self._blobs[out].data for out in outputs}

    def backward(self, diffs=None, start=None, end=None, **kwargs) -> dict:
        """Runs the backward pass from layer ``start`` down to ``end`` (names, inclusive;
        default: all). ``kwargs`` set the output blobs' diffs first. Returns ``{blob: diff}``
        for the net's inputs (``end``'s bottoms when ``end`` is given) and ``diffs``."""
        diffs = list(diffs or [])
        start_ind = len(self.layers) - 1 if start is None else self._layer_index(start, "start")
        if end is not None:
            end_ind = self._layer_index(end, "end")
            outputs = set(self.bottom_names[end] + diffs)
        else:
            end_ind = 0
            outputs = set(self.inputs + diffs)
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise Exception("Top diff arguments do not match net outputs.")
            for name, value in kwargs.items():
                if value.shape[0] != self._blobs[name].shape[0]:
                    raise Exception("Diff is not batch sized")
                self._blobs[name].diff[...] = value
        self._backward(start_ind, end_ind)
        return {out: self._blobs[out].diff for out in outputs}

    def forward_all(self, blobs=None, **kwargs) -> dict:
        """``forward`` over inputs of any length, in batches (the last one padded with
        zeros, its padding dropped from the result)."""
        all_outs = {out: [] for out in set(self.outputs + list(blobs or []))}
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=blobs, **batch)
            for out, value in outs.items():
                all_outs[out].extend(value.copy())
        for out in all_outs:
            all_outs[out] = np.asarray(all_outs[out])
        pad = len(next(iter(all_outs.values()))) - len(next(iter(kwargs.values())))
        if pad:
            for out in all_outs:
                all_outs[out] = all_outs[out][:-pad]
        return all_outs

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """``forward`` then ``backward`` over inputs (and output diffs) of any length, in
        batches; returns ``(blobs, diffs)`` dicts."""
        all_outs = {out: [] for out in set(self.outputs + list(blobs or []))}
        all_diffs = {d: [] for d in set(self.inputs + list(diffs or []))}
        fwd = list(self._batch({k: kwargs[k] for k in self.inputs if k in kwargs}))
        bwd = list(self._batch({k: kwargs[k] for k in self.outputs if k in kwargs}))
        for fb, bb in itertools.zip_longest(fwd, bwd, fillvalue={}):
            outs = self.forward(blobs=blobs, **fb)
            grads = self.backward(diffs=diffs, **bb)
            for out, value in outs.items():
                all_outs[out].extend(value.copy())
            for d, value in grads.items():
                all_diffs[d].extend(value.copy())
        for out in all_outs:
            all_outs[out] = np.asarray(all_outs[out])
        for d in all_diffs:
            all_diffs[d] = np.asarray(all_diffs[d])
        pad = len(next(iter(all_outs.values()))) - len(next(iter(kwargs.values())))
        if pad:
            for out in all_outs:
                all_outs[out] = all_outs[out][:-pad]
            for d in all_diffs:
                all_diffs[d] = all_diffs[d][:-pad]
        return all_outs, all_diffs

    def _batch(self, blobs):
        """Batches of ``blobs`` (lists of equal length) of the net's batch size; the last is
        padded with zeros."""
        if not blobs:
            return
        num = len(next(iter(blobs.values())))
        batch_size = next(iter(self._blobs.values())).shape[0]
        for b in range(num // batch_size):
            i = b * batch_size
            yield {name: blobs[name][i:i + batch_size] for name in blobs}
        remainder = num % batch_size
        if remainder:
            padded = {}
            for name in blobs:
                value = np.asarray(blobs[name])
                padding = np.zeros((batch_size - remainder,) + value.shape[1:])
                padded[name] = np.concatenate([value[-remainder:], padding])
            yield padded

    def clear_param_diffs(self) -> None:
        """Caffe's ``ClearParamDiffs``: every parameter diff to zero."""
        for blob in self._param_blobs.values():
            blob._put("diff", jax.device_put(np.zeros(blob.shape, np.float32), self._device))

    def set_input_arrays(self, data, labels) -> None:
        """The arrays the first MemoryData layer reads (Caffe's ``MemoryDataLayer::Reset``):
        data ``[n, C, H, W]`` float32, C-contiguous; labels ``[n]`` (or ``[n, 1, 1, 1]``)."""
        layers = [l for l in self._core.layers if l.param.type == "MemoryData"]
        if not layers:
            raise RuntimeError("set_input_arrays may only be called if the first layer is a "
                               "MemoryDataLayer")
        data = np.asarray(data)
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, None, None, None])
        _check_contiguous(data, "data", *layers[0].chw)
        _check_contiguous(labels, "labels", 1, 1, 1)
        if labels.shape[0] != data.shape[0]:
            raise RuntimeError("data and labels must have the same first dimension")
        if data.shape[0] % layers[0].batch_size:
            raise RuntimeError("first dimensions of input arrays must be a multiple of batch "
                               "size")
        with _caffe_errors():
            for core in self._cores.values():
                for l in core.layers:
                    if l.param.type == "MemoryData" and l.name == layers[0].name:
                        l.set_input_arrays(data, labels)

    # -- weights ----------------------------------------------------------------------------
    def _host_params(self) -> dict:
        return {l.name: [np.array(self._param_blobs[src]._get("data")) if src == (l.name, j)
                         else None for j, src in enumerate(self._core._blob_source[l.name])]
                for l in self._core.layers if l.blob_shapes}

    def _load(self, source: dict, filename: str) -> None:
        params = self._host_params()
        with _caffe_errors():
            params = self._core.copy_from(params, source, filename=filename)
        for (k, j), blob in self._param_blobs.items():
            v = params[k][j]
            if v is not None:
                blob._put("data", jax.device_put(np.asarray(v, np.float32), self._device))

    def copy_from(self, filename) -> None:
        """Caffe's ``CopyTrainedLayersFrom``: blobs of same-named layers (binary or HDF5)."""
        from jcaffe.caffemodel import load_caffemodel

        filename = os.fsdecode(filename)
        with _caffe_errors():
            source = load_caffemodel(filename)
        self._load(source, filename)

    def load_hdf5(self, filename) -> None:
        """Caffe's ``CopyTrainedLayersFromHDF5``."""
        self.copy_from(filename)

    def save(self, filename) -> None:
        """Writes the weights as a binary ``.caffemodel`` (Caffe's ``Net::ToProto``)."""
        from jcaffe.caffemodel import save_caffemodel

        with _caffe_errors():
            save_caffemodel(os.fsdecode(filename), self._core, self._host_params())

    def save_hdf5(self, filename) -> None:
        """Writes the weights in Caffe's HDF5 layout (``Net::ToHDF5``)."""
        from jcaffe.caffemodel import save_caffemodel

        with _caffe_errors():
            save_caffemodel(os.fsdecode(filename), self._core, self._host_params(), fmt="hdf5")

    def share_with(self, other: "Net") -> None:
        """Caffe's ``ShareTrainedLayersWith(other)``: same-named layers here use ``other``'s
        parameter Blobs (the same objects: a write to one is a write to both)."""
        with _caffe_errors():
            mapping = self._core.shared_layer_keys(other._core)
        for mine, theirs in mapping.items():
            for j, src in enumerate(self._core._blob_source[mine]):
                if src != (mine, j):
                    continue
                other_src = other._core._blob_source[theirs][j]
                self._param_blobs[src] = other._param_blobs[other_src]
        for i, l in enumerate(self._core.layers):
            self.layers[i].blobs[:] = [self._param_blobs[src]
                                       for src in self._core._blob_source[l.name]]

    # -- callbacks (Caffe's Net::Callback) -----------------------------------------------------
    def before_forward(self, fn) -> None:
        raise NotImplementedError("Net.before_forward: per-layer callbacks are not supported "
                                  "(jcaffe runs a layer range as one compiled program)")

    after_forward = before_backward = after_backward = before_forward

    def __repr__(self) -> str:
        return f"<caffe.Net {self._core.name!r} layers={len(self.layers)}>"

    def __del__(self):
        for r in getattr(self, "_readers", {}).values():
            try:
                r.close()
            except Exception:
                pass


def _check_file(path: str) -> None:
    """pycaffe's ``CheckFile``: an unreadable file is a RuntimeError before anything runs."""
    try:
        with open(path, "rb"):
            pass
    except OSError:
        raise RuntimeError(f"Could not open file {path}") from None


def _check_contiguous(arr: np.ndarray, name: str, channels: int, height: int, width: int):
    if not arr.flags["C_CONTIGUOUS"]:
        raise RuntimeError(f"{name} must be C contiguous")
    if arr.ndim != 4:
        raise RuntimeError(f"{name} must be 4-d")
    if arr.dtype != np.float32:
        raise RuntimeError(f"{name} must be float32")
    if arr.shape[1] != channels:
        raise RuntimeError(f"{name} has wrong number of channels")
    if arr.shape[2] != height:
        raise RuntimeError(f"{name} has wrong height")
    if arr.shape[3] != width:
        raise RuntimeError(f"{name} has wrong width")


def _caffe_errors():
    from caffe import _state

    return _state.caffe_errors()


__all__ = ["Net", "Blob", "BlobVec", "LayerView"]
