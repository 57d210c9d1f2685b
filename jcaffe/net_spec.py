"""Nets written in Python, as pycaffe's ``caffe.net_spec``: ``NetSpec``, ``layers`` (``L``),
``params`` (``P``), ``to_proto``.

    from jcaffe.net_spec import NetSpec, layers as L, params as P

    n = NetSpec()
    n.data, n.label = L.Data(batch_size=64, backend=P.Data.LMDB, source="mnist_train_lmdb",
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.conv1, n.label)
    net_param = n.to_proto()          # a caffe_pb2.NetParameter

The semantics are pycaffe's:

* ``L.<Type>(*bottoms, **kwargs)`` is a layer of that type; it returns its top (``ntop=1``, the
  default), a tuple of tops (``ntop>1``) or the layer itself (``ntop=0``). ``in_place=True``
  makes the tops the bottoms.
* A keyword ending in ``param`` (``transform_param``, ``param``, ``include`` is not one) is a
  LayerParameter field; any other keyword goes to the type's own ``<type>_param`` message when
  that has the field, and to LayerParameter otherwise (``include``, ``loss_weight``, ``name``).
* Values: a dict fills a message, a list fills a repeated field (a list of dicts adds one
  message each), a scalar given to a repeated field is a one-element list.
* Names: a top assigned to a ``NetSpec`` attribute is named after it, and a layer after its
  first top; other tops and top-less layers are named ``<Type><k>`` (k counting per type from
  1 in the order ``to_proto`` meets them). ``to_proto`` emits each layer once, bottoms first,
  in the order of the ``NetSpec``'s assignments.
* ``P.<Type>.<CONSTANT>`` is the enum value of ``<Type>Parameter`` (``P.Pooling.MAX``).

Unlike pycaffe, a keyword that is no field of either message, or a value of the wrong kind, is
a one-line :class:`~jcaffe.errors.NetError` naming the layer type and the field.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from google.protobuf import message as pb_message

from jcaffe.errors import NetError
from jcaffe.proto import caffe_pb2

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "assign_proto",
           "param_name_dict"]


def param_name_dict() -> dict[str, str]:
    """``{"Convolution": "convolution", ...}``: a layer type's ``<type>_param`` field, found from
    the parameter messages' type names (``ConvolutionParameter`` -> ``convolution_param``)."""
    out = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return out


_PARAM_NAMES = param_name_dict()


def _has_field(msg: pb_message.Message, name: str) -> bool:
    return name in msg.DESCRIPTOR.fields_by_name


def assign_proto(proto: pb_message.Message, name: str, val: Any, where: str = "") -> None:
    """Sets field ``name`` of ``proto`` from a Python value (dicts -> messages, lists ->
    repeated fields; a scalar for a repeated field is a one-element list)."""
    what = f"{where}: " if where else ""
    field = proto.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise NetError(f"{what}{proto.DESCRIPTOR.name} has no field '{name}'")
    here = f"{where}.{name}" if where else name
    try:
        if field.is_repeated:
            items = val if isinstance(val, (list, tuple)) else [val]
            target = getattr(proto, name)
            if field.message_type is not None:
                for item in items:
                    if not isinstance(item, dict):
                        raise NetError(f"{here}: expected a dict for each message, got "
                                       f"{type(item).__name__}")
                    sub = target.add()
                    for k, v in item.items():
                        assign_proto(sub, k, v, here)
            else:
                target.extend(items)
        elif field.message_type is not None:
            if not isinstance(val, dict):
                raise NetError(f"{here}: expected a dict for message {field.message_type.name}, "
                               f"got {type(val).__name__}")
            sub = getattr(proto, name)
            for k, v in val.items():
                assign_proto(sub, k, v, here)
        else:
            setattr(proto, name, val)
    except (TypeError, ValueError) as e:
        raise NetError(f"{here}: bad value {val!r}: {e}") from None


class Top:
    """One output blob of a layer (the ``n``-th top of ``fn``)."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with every layer this top needs."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: its type, its bottoms (``Top``s) and its parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise NetError(f"{type_name} input {index} is not a Top "
                               f"(type is {type(inp).__name__})")
        self.type_name = type_name
        self.inputs = tuple(inputs)
        params = dict(params)
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        self.params = params
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _name(self, names, autonames) -> str:
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        bottoms = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottoms.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._top_name(top, names, autonames))
        layer.name = self._name(names, autonames)
        where = f"layer '{layer.name}' (type {self.type_name})"
        own = _PARAM_NAMES.get(self.type_name)
        for k, v in self.params.items():
            if k.endswith("param"):
                assign_proto(layer, k, v, where)
            elif own is not None and _has_field(getattr(layer, own + "_param"), k):
                assign_proto(getattr(layer, own + "_param"), k, v, f"{where} {own}_param")
            else:
                assign_proto(layer, k, v, where)
        layers[self] = layer


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """A NetParameter with every layer needed to compute ``tops`` (blobs named automatically)."""
    layers: dict[Function, caffe_pb2.LayerParameter] = {}
    autonames: Counter = Counter()
    for top in tops:
        top._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops assigned as attributes (or items) are named after them; :meth:`to_proto` gives
    the layers needed for all of them, in assignment order."""

    def __init__(self):
        super().__setattr__("tops", {})

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.tops[item]

    def to_proto(self) -> caffe_pb2.NetParameter:
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: dict[Function, caffe_pb2.LayerParameter] = {}
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``layers.<Type>(*bottoms, **params)``: a layer of that type (see the module doc)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        return layer_fn


class _ParamConstants:
    def __init__(self, type_name: str):
        self._type_name = type_name

    def __getattr__(self, const: str):
        msg = getattr(caffe_pb2, self._type_name + "Parameter", None)
        if msg is None:
            raise AttributeError(f"caffe.proto has no message {self._type_name}Parameter")
        try:
            return getattr(msg, const)
        except AttributeError:
            raise AttributeError(f"{self._type_name}Parameter has no constant {const}") from None


class Parameters:
    """``params.<Type>.<CONSTANT>``: an enum value of ``<Type>Parameter``
    (``params.Pooling.MAX``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _ParamConstants(name)


layers = Layers()
params = Parameters()
