"""Caffe's ``Python`` layer: layers written in Python, named by ``python_param``.

``python_param { module: "pyloss" layer: "EuclideanLossLayer" param_str: "..." }`` names a
class in an importable module. What jcaffe does with it depends on the class:

* **pycaffe layers** (any class that is not a ``JaxLayer``; normally a ``caffe.Layer``
  subclass written for Caffe) run unchanged, on the host, over numpy blobs, exactly as Caffe's
  ``PythonLayer`` calls them: ``param_str`` and ``phase`` are set, ``setup(bottom, top)`` runs
  once, then ``reshape(bottom, top)`` + ``forward(bottom, top)`` at each forward pass and
  ``backward(top, propagate_down, bottom)`` at each backward pass. jcaffe learns the top
  shapes at build time by running ``setup`` + ``reshape`` on zero blobs of the bottom shapes
  (shapes are static: a later forward that reshapes a top differently is an error). Inside the
  jitted step ``forward`` and ``backward`` are host callbacks (``jax.pure_callback`` under a
  ``jax.custom_vjp``): ``backward`` receives the top diffs JAX's backward pass computes (for a
  loss top, its ``loss_weight``) and writes ``bottom[i].diff``. Each built layer owns its own
  instance, so a layer may keep state from ``forward`` for ``backward`` (``pyloss`` keeps
  ``self.diff``); if JAX ever asks for a backward pass whose inputs are not those of the
  instance's latest forward pass, jcaffe re-runs ``forward`` on them first. Blobs hold float32
  (Caffe's Dtype); bottoms given in float64 (gradient checks) arrive as float64. Blobs a layer
  adds in ``setup`` (``self.blobs.add_blob(*shape)``, filled there) are learnable parameters
  (``param { lr_mult }`` applies; their diffs are what ``backward`` writes into
  ``self.blobs[i].diff``).
  A Python layer is not a loss layer to Caffe: give ``loss_weight: 1`` in the prototxt (the
  pycaffe examples do), or its top adds nothing to the objective.
  ``propagate_down`` is the layer's ``propagate_down`` fields when given, else all True (the
  backward pass of a jitted step cannot tell which bottoms need no gradient).
* **Python data layers** (pycaffe layers without bottoms) feed like the other data layers:
  ``make_reader()`` returns a reader whose batches come from the layer's ``reshape`` +
  ``forward`` on the host (read ahead by the prefetch thread), in the order the layer makes
  them; tops are cast to float32. The layer's own randomness (seeds in ``param_str``) decides
  its order; the solver's ``random_seed`` does not reach it.
* **jcaffe-native layers** subclass :class:`JaxLayer`: pure JAX methods fused into the jitted
  step, gradients by autodiff, learnable blobs through the usual ``param { lr_mult
  decay_mult }`` (see :class:`JaxLayer`).

Module lookup. Caffe imports ``python_param.module`` from ``PYTHONPATH``. jcaffe imports it
with ``sys.path`` as it is (``PYTHONPATH`` included) and, when not found there, from the
directory of the net's prototxt and then the working directory (added for that import only;
the prototxt's directory is known when the net is built from a file, directly or through a
solver). A module, once imported, is shared by every net in the process (Python's
``sys.modules``). When the real pycaffe is not importable, ``import caffe`` inside the module
gets ``jcaffe.pycaffe_shim``. Failures (module not found, no such class, an exception raised in
``setup`` / ``reshape``) are one-line ``LayerError``s naming the layer, module and class.

Third-party layer types. A distribution can register Caffe type names with the entry-point
group ``jcaffe.layers`` (name = the prototxt's ``type``, value = ``module:Class``). The class is
a ``jcaffe.layers.Layer`` subclass (used as is), a :class:`JaxLayer` or a pycaffe-style class
(run as above, with ``param_str`` from ``python_param.param_str``). Built-in types win over an
entry point of the same name. See :func:`entry_point_layer`.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.errors import DataError, NetError
from jcaffe.layers import base
from jcaffe.layers.base import Context, Layer, Shape, register
from jcaffe.layers.data import BatchReader
from jcaffe.proto import caffe_pb2

_log = log.get_logger("python")

ENTRY_POINT_GROUP = "jcaffe.layers"


# ---------------------------------------------------------------------------------------------
# The native protocol
# ---------------------------------------------------------------------------------------------

class JaxLayer:
    """Base of jcaffe-native Python layers: pure JAX, fused into the jitted step.

    jcaffe creates the instance with ``cls()`` and sets, before ``setup``:

    * ``name`` (the layer's name), ``param_str`` (``python_param.param_str``, to parse as you
      like), ``phase`` (``caffe_pb2.TRAIN`` / ``TEST``).

    Then, once, on the host:

    * ``setup(bottom_shapes) -> top_shapes``: bottom shapes are tuples of ints (Caffe's NCHW);
      returns one shape per top; sets ``self.blob_shapes`` (learnable blobs, Caffe's order) if
      the layer has any. Raise ``ValueError`` (or anything) for bad input: it becomes a
      one-line ``LayerError``.

    And as pure functions (traced under ``jit`` / ``grad`` / ``vmap``):

    * ``init(key) -> [blob, ...]``: initial blobs (default: zeros of ``blob_shapes``, float32).
    * ``apply(blobs, bottoms, train, key) -> [top, ...]``: the forward pass. ``key`` is a PRNG
      key in training mode when ``needs_key = True`` (else None). Keep the bottoms' dtype
      (float32 in training, float64 in gradient checks) and cast blobs to it.

    Class attributes: ``needs_key`` (default False) and ``is_loss`` (default False; True
    makes top 0 a loss with weight 1 unless the prototxt gives ``loss_weight``). Gradients come
    from JAX autodiff; ``param { lr_mult decay_mult name }`` in the prototxt apply to the blobs
    as for any layer.

    Example::

        class Scale(JaxLayer):                     # top = bottom * w, one learnable scalar
            def setup(self, bottom_shapes):
                self.blob_shapes = [(1,)]
                return [bottom_shapes[0]]

            def init(self, key):
                return [jnp.full((1,), float(self.param_str or 1.0), jnp.float32)]

            def apply(self, blobs, bottoms, train, key):
                return [bottoms[0] * blobs[0].astype(bottoms[0].dtype)]
    """

    needs_key: bool = False
    is_loss: bool = False
    name: str = ""
    param_str: str = ""
    phase: int = caffe_pb2.TRAIN
    blob_shapes: Sequence[Shape] = ()

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        raise NotImplementedError(f"{type(self).__name__} must define setup(bottom_shapes)")

    def init(self, key: jax.Array) -> list[jax.Array]:
        return [jnp.zeros(tuple(s), jnp.float32) for s in self.blob_shapes]

    def apply(self, blobs, bottoms, train: bool, key) -> list[jax.Array]:
        raise NotImplementedError(f"{type(self).__name__} must define "
                                  f"apply(blobs, bottoms, train, key)")


# ---------------------------------------------------------------------------------------------
# Finding the class
# ---------------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def install_caffe_module() -> None:
    """Makes ``import caffe`` work for pycaffe layer modules: whatever ``caffe`` package is
    importable (jcaffe's own ``caffe/``, or a real pycaffe earlier on ``sys.path``), else
    ``jcaffe.pycaffe_shim`` (registered in ``sys.modules``)."""
    try:
        import caffe  # noqa: F401
        return
    except Exception:  # not installed, or a pycaffe build that fails to load
        sys.modules.pop("caffe", None)
    from jcaffe import pycaffe_shim
    from jcaffe.pycaffe_shim import proto

    sys.modules["caffe"] = pycaffe_shim
    sys.modules["caffe.proto"] = proto
    sys.modules["caffe.proto.caffe_pb2"] = proto.caffe_pb2


def _net_source_dirs(layer: Layer) -> list[str]:
    """The directory of the prototxt the layer's net was read from (``layer.net_source``)."""
    src = layer.net_source or ""
    return [os.path.dirname(os.path.abspath(src))] if os.path.isfile(src) else []


def import_module(layer: Layer, module: str):
    """Imports ``module`` from ``sys.path``, else from the prototxt's directory and the
    working directory (see the module doc)."""
    install_caffe_module()
    where = f"python_param.module '{module}'"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise layer.error(f"importing {where} failed: {_one_line(e)}") from None
    except Exception as e:
        raise layer.error(f"importing {where} failed: {_one_line(e)}") from None
    extra = []
    for d in _net_source_dirs(layer) + [os.getcwd()]:
        if d not in extra and d not in sys.path:
            extra.append(d)
    saved = list(sys.path)
    sys.path.extend(extra)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            looked = ", ".join(extra) or "nothing more"
            raise layer.error(f"{where} not found on sys.path/PYTHONPATH (also looked in "
                              f"{looked}): put its directory on PYTHONPATH") from None
        raise layer.error(f"importing {where} failed: {_one_line(e)}") from None
    except Exception as e:
        raise layer.error(f"importing {where} failed: {_one_line(e)}") from None
    finally:
        sys.path[:] = saved


def entry_point_layer(type_name: str) -> type[Layer] | None:
    """The layer class a distribution registered for ``type_name`` under the entry-point
    group ``jcaffe.layers``, or None. A ``Layer`` subclass is returned as is; a ``JaxLayer`` or
    a pycaffe-style class is wrapped in a ``PythonLayer`` subclass that runs it.

    In a distribution's ``pyproject.toml``::

        [project.entry-points."jcaffe.layers"]
        Swish2 = "mylayers.swish:Swish2"     # a JaxLayer subclass; prototxt: type: "Swish2"
    """
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
    if not found:
        return None
    ep = found[0]
    dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
    if len({e.value for e in found}) > 1:
        _log.warning("layer type '%s' is registered by %d entry points; using %s", type_name,
                     len(found), ep.value)
    try:
        obj = ep.load()
    except Exception as e:
        raise NetError(f"layer type '{type_name}': loading entry point '{ep.value}' (group "
                       f"{ENTRY_POINT_GROUP}, distribution {dist}) failed: "
                       f"{_one_line(e)}") from None
    if isinstance(obj, type) and issubclass(obj, Layer):
        return obj
    if not isinstance(obj, type):
        raise NetError(f"layer type '{type_name}': entry point '{ep.value}' (distribution "
                       f"{dist}) is not a class")
    return type(f"{obj.__name__}Layer", (PythonLayer,),
                {"target_class": obj, "type_names": (type_name,), "__doc__": obj.__doc__})


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

base.FALLBACKS.append(entry_point_layer)


@register("Python")
class PythonLayer(Layer):
    """Caffe's ``Python`` layer (see the module doc): a pycaffe layer run on the host inside
    the jitted step, a Python data layer, or a pure-JAX :class:`JaxLayer`."""

    # Set on subclasses made for entry points: the class to run, instead of python_param's.
    target_class: type | None = None

    def setup(self, bottom_shapes):
        pp = self.param.python_param
        cls = self.target_class
        if cls is None:
            if not pp.module:
                raise self.error("python_param.module is not set")
            if not pp.layer:
                raise self.error("python_param.layer (the class name) is not set")
            mod = import_module(self, pp.module)
            cls = getattr(mod, pp.layer, None)
            if cls is None:
                src = getattr(mod, "__file__", None) or pp.module
                raise self.error(f"module '{pp.module}' ({src}) has no class '{pp.layer}'")
            if not isinstance(cls, type):
                raise self.error(f"'{pp.module}.{pp.layer}' is not a class")
            self.where = f"{pp.module}.{pp.layer}"
        else:
            install_caffe_module()
            self.where = f"{cls.__module__}.{cls.__qualname__}"
        self.param_str = pp.param_str
        if isinstance(cls, type) and issubclass(cls, JaxLayer):
            self.kind = "jax"
            return self._setup_native(cls, bottom_shapes)
        self.kind = "data" if not bottom_shapes else "pycaffe"
        return self._setup_host(cls, bottom_shapes)

    def _fail(self, what: str, e: BaseException):
        return self.error(f"{self.where}: {what} raised {_one_line(e)}")

    def _new_instance(self, cls):
        try:
            inst = cls()
        except Exception as e:
            raise self._fail("creating the instance", e) from None
        try:
            inst.param_str = self.param_str
            inst.phase = int(self.phase)
        except AttributeError as e:
            raise self.error(f"{self.where}: cannot set param_str/phase on the instance "
                             f"({_one_line(e)}); if it subclasses the real pycaffe caffe.Layer, "
                             f"run jcaffe where pycaffe is not importable") from None
        return inst

    # -- native ------------------------------------------------------------------------------
    def _setup_native(self, cls, bottom_shapes):
        inst = self._new_instance(cls)
        inst.name = self.name
        try:
            tops = inst.setup([tuple(s) for s in bottom_shapes])
            tops = [tuple(int(d) for d in s) for s in tops]
            self.blob_shapes = [tuple(int(d) for d in s) for s in inst.blob_shapes]
        except Exception as e:
            raise self._fail("setup", e) from None
        self.impl = inst
        self.needs_key = bool(inst.needs_key)
        self.is_loss = bool(inst.is_loss)
        # Trace init and apply abstractly now: wrong counts, shapes or dtypes fail at build.
        key = jax.random.key(0)
        try:
            blobs = jax.eval_shape(inst.init, key)
        except Exception as e:
            raise self._fail("init", e) from None
        got = [tuple(b.shape) for b in blobs]
        if got != list(self.blob_shapes):
            raise self.error(f"{self.where}: init returned blobs of shapes {got}, but "
                             f"blob_shapes is {list(self.blob_shapes)}")
        bottoms = [jax.ShapeDtypeStruct(s, jnp.float32) for s in bottom_shapes]
        train = self.phase == caffe_pb2.TRAIN
        try:
            out = jax.eval_shape(lambda bl, bo: inst.apply(bl, bo, train,
                                                           key if self.needs_key else None),
                                 blobs, bottoms)
        except Exception as e:
            raise self._fail("apply", e) from None
        shapes = [tuple(t.shape) for t in out]
        if shapes != tops:
            raise self.error(f"{self.where}: apply returned tops of shapes {shapes}, but setup "
                             f"declared {tops}")
        return tops

    # -- host (pycaffe) ----------------------------------------------------------------------
    def _setup_host(self, cls, bottom_shapes):
        from jcaffe import pycaffe_shim

        for m in ("reshape", "forward"):
            if not callable(getattr(cls, m, None)):
                raise self.error(f"{self.where} is neither a JaxLayer nor a pycaffe layer "
                                 f"(no {m}(bottom, top) method)")
        inst = self._new_instance(cls)
        self.impl = inst
        # Caffe's PythonLayer runs Python code under the GIL; the prefetch thread and the
        # step's callbacks may both reach this instance.
        self._lock = threading.RLock()
        self._bottom = [pycaffe_shim.Blob(s) for s in bottom_shapes]
        self._top = [pycaffe_shim.Blob() for _ in self.top_names]
        try:
            if hasattr(inst, "setup"):
                inst.setup(self._bottom, self._top)
        except Exception as e:
            raise self._fail("setup", e) from None
        try:
            inst.reshape(self._bottom, self._top)
        except Exception as e:
            raise self._fail("reshape", e) from None
        for i, t in enumerate(self._top):
            if t._shape is None:
                raise self.error(f"{self.where}: reshape did not shape top {i} "
                                 f"('{self.top_names[i]}'): call top[{i}].reshape(...)")
        blobs = list(getattr(inst, "blobs", ()) or ())
        self.blob_shapes = [tuple(b.shape) for b in blobs]
        self._initial = [np.array(b.data, np.float32) for b in blobs]
        self._last_inputs: tuple | None = None
        tops = [tuple(t.shape) for t in self._top]
        if self.kind == "data":
            self.is_data = True
            self.batch_size = tops[0][0] if tops[0] else 1
            self.prefetch = 4
            self._specs = [(t, s, np.dtype(np.float32)) for t, s in zip(self.top_names, tops)]
            self._stream = _DataStream(self)
        else:
            self._fn = self._make_host_fn()
        return tops

    def init(self, key):
        if self.kind == "jax":
            blobs = self.impl.init(key)
            return [jnp.asarray(b) for b in blobs]
        return [jnp.asarray(b) for b in self._initial]

    def apply(self, blobs, bottoms, ctx: Context):
        with jax.named_scope(self.name):
            if self.kind == "jax":
                key = ctx.key
                if self.needs_key and ctx.train:
                    key = ctx.require_key(self, "in training mode (the class sets "
                                          "needs_key = True)")
                return list(self.impl.apply(list(blobs), list(bottoms), ctx.train, key))
            if self.kind == "data":
                return [jnp.asarray(b).astype(jnp.float32) for b in bottoms]
            return list(self._fn(tuple(blobs), tuple(bottoms)))

    # -- host callbacks ----------------------------------------------------------------------
    def _run_forward(self, blobs, bottoms) -> list[np.ndarray]:
        """Caffe's Forward: reshape then forward, on copies of the inputs (host side)."""
        inst = self.impl
        for blob, value in zip(inst.blobs, blobs):
            blob._set(value)
        for blob, value in zip(self._bottom, bottoms):
            blob._set(value)
        try:
            inst.reshape(self._bottom, self._top)
            inst.forward(self._bottom, self._top)
        except Exception as e:
            raise self._fail("forward", e) from None
        for i, (t, shape) in enumerate(zip(self._top, self.top_shapes)):
            if tuple(t.shape) != shape:
                raise self.error(f"{self.where}: top {i} has shape {list(t.shape)} after "
                                 f"forward, but setup gave {list(shape)} (jcaffe needs static "
                                 f"shapes)")
        self._last_inputs = (tuple(np.array(b) for b in blobs),
                             tuple(np.array(b) for b in bottoms))
        return [t.data for t in self._top]

    def _same_as_last(self, blobs, bottoms) -> bool:
        last = self._last_inputs
        if last is None:
            return False
        return all(a.shape == b.shape and np.array_equal(a, b)
                   for a, b in zip(last[0] + last[1], tuple(blobs) + tuple(bottoms)))

    def _host_forward(self, blobs, bottoms, dtypes):
        with self._lock:
            blobs = [np.asarray(b) for b in blobs]
            bottoms = [np.asarray(b) for b in bottoms]
            tops = self._run_forward(blobs, bottoms)
            return tuple(np.asarray(t, dtype=d).reshape(s)
                         for t, d, s in zip(tops, dtypes, self.top_shapes))

    def _host_backward(self, blobs, bottoms, tops, top_diffs):
        with self._lock:
            blobs = [np.asarray(b) for b in blobs]
            bottoms = [np.asarray(b) for b in bottoms]
            if not self._same_as_last(blobs, bottoms):
                self._run_forward(blobs, bottoms)
            for t, data, diff in zip(self._top, tops, top_diffs):
                t._set(np.asarray(data), "data")
                t._set(np.asarray(diff), "diff")
            for b in list(self._bottom) + list(self.impl.blobs):
                b.diff[...] = 0
            pd = list(self.param.propagate_down)
            propagate_down = [bool(p) for p in pd] if pd else [True] * len(bottoms)
            try:
                self.impl.backward(self._top, propagate_down, self._bottom)
            except Exception as e:
                raise self._fail("backward", e) from None
            return (tuple(np.asarray(b.diff, dtype=v.dtype).reshape(v.shape)
                          for b, v in zip(self.impl.blobs, blobs)),
                    tuple(np.asarray(b.diff, dtype=v.dtype).reshape(v.shape)
                          for b, v in zip(self._bottom, bottoms)))

    def _make_host_fn(self):
        layer = self

        def top_specs(bottoms):
            dtype = bottoms[0].dtype if bottoms else jnp.float32
            return tuple(jax.ShapeDtypeStruct(s, dtype) for s in layer.top_shapes)

        def forward(blobs, bottoms):
            specs = top_specs(bottoms)
            dtypes = [s.dtype for s in specs]
            return jax.pure_callback(lambda bl, bo: layer._host_forward(bl, bo, dtypes), specs,
                                     blobs, bottoms, vmap_method="sequential")

        @jax.custom_vjp
        def fn(blobs, bottoms):
            return forward(blobs, bottoms)

        def fn_fwd(blobs, bottoms):
            tops = forward(blobs, bottoms)
            return tops, (blobs, bottoms, tops)

        def fn_bwd(res, top_diffs):
            blobs, bottoms, tops = res
            specs = (tuple(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in blobs),
                     tuple(jax.ShapeDtypeStruct(b.shape, b.dtype) for b in bottoms))
            top_diffs = tuple(jnp.asarray(d).astype(t.dtype) for d, t in zip(top_diffs, tops))
            return jax.pure_callback(layer._host_backward, specs, blobs, bottoms, tops,
                                     top_diffs, vmap_method="sequential")

        fn.defvjp(fn_fwd, fn_bwd)
        return fn

    # -- data layers -------------------------------------------------------------------------
    rand_skip = 0
    shuffle = False

    def input_specs(self):
        return list(self._specs) if self.kind == "data" else []

    def make_reader(self, seed: int | None = None) -> "PythonDataReader":
        if self.kind != "data":
            raise self.error("has bottoms: it is not a data layer")
        return PythonDataReader(self, seed)

    def load_all(self):
        raise DataError(f"layer '{self.name}' (type {self.type}): a Python data layer makes its "
                        f"batches on the host: it cannot be loaded whole")

    def _host_batch(self) -> dict[str, np.ndarray]:
        """One batch from the layer's reshape + forward (no bottoms)."""
        with self._lock:
            tops = self._run_forward([], [])
            return {t: np.array(a, np.float32) for t, a in zip(self.top_names, tops)}


class _DataStream:
    """The batches a Python data layer has made, addressed by stream position.

    The layer makes batches only forwards, in its own order; the latest ``prefetch + 2`` are
    kept so a reader can go back that far (the prefetch thread reads ahead, and a feeder that
    seeks back to its consumer's position finds them again). Seeking forwards makes (and
    drops) the batches in between, so a resumed run sees the batches an uninterrupted run
    would have seen from a layer whose order depends only on its seed."""

    def __init__(self, layer: PythonLayer):
        self.layer = layer
        self.keep = max(2, int(layer.prefetch) + 2)
        self.made = 0  # stream position of the next batch the layer will make
        self.kept: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.lock = threading.Lock()

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        with self.lock:
            if position in self.kept:
                return self.kept[position]
            if position < self.made:
                first = next(iter(self.kept), self.made)
                raise DataError(f"layer '{self.layer.name}' (type Python, "
                                f"{self.layer.where}): cannot go back to stream position "
                                f"{position}: the layer makes batches in order and only "
                                f"positions from {first} on are kept")
            bs = self.layer.batch_size
            if (position - self.made) % bs:
                raise DataError(f"layer '{self.layer.name}': stream position {position} is "
                                f"not on a batch boundary (batch size {bs})")
            while True:
                batch = self.layer._host_batch()
                pos = self.made
                self.made += bs
                self.kept[pos] = batch
                while len(self.kept) > self.keep:
                    self.kept.popitem(last=False)
                if pos == position:
                    return batch


class PythonDataReader(BatchReader):
    """Batches of a Python data layer (see ``jcaffe.layers.data.BatchReader``): positions
    count records, ``batch_size`` per batch; ``count`` is 0 (the stream has no known end)."""

    # Batches are made on the host: never device-resident, always prefetched.
    shuffled = True

    def __init__(self, layer: PythonLayer, seed: int | None):
        self.layer = layer
        self.tops = list(layer.top_names)
        self.specs = {t: (tuple(s[1:]), np.dtype(d)) for t, s, d in layer.input_specs()}
        self.batch_size = layer.batch_size
        self.prefetch = layer.prefetch
        self.seed = 0 if seed is None else int(seed)
        self.count = 0
        self._position = 0

    @property
    def nbytes(self) -> int:
        return 0

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        return self.layer._stream.batch_at(int(position))

    def next_batch(self) -> dict[str, np.ndarray]:
        out = self.batch_at(self._position)
        self._position += self.batch_size
        return out

    def load_all(self):
        return self.layer.load_all()


__all__ = ["JaxLayer", "PythonLayer", "PythonDataReader", "entry_point_layer",
           "install_caffe_module", "import_module", "ENTRY_POINT_GROUP"]
