"""``caffe.net_spec``: nets written in Python (``NetSpec``, ``layers``, ``params``,
``to_proto``), jcaffe's ``jcaffe.net_spec`` with pycaffe's exception for a bottom that is not
a ``Top``: ``TypeError("<Type> input <i> is not a Top (type is <class ...>)")``."""

from __future__ import annotations

from jcaffe.net_spec import (Function, NetSpec, Parameters, Top, assign_proto,
                             param_name_dict, to_proto)

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "assign_proto",
           "param_name_dict"]


class Layers:
    """``layers.<Type>(*bottoms, **params)``: a layer of that type; returns its top, a tuple
    of tops (``ntop > 1``) or the layer (``ntop=0``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            for index, arg in enumerate(args):
                if not isinstance(arg, Top):
                    raise TypeError(f"{name} input {index} is not a Top "
                                    f"(type is {type(arg)})")
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        return layer_fn


layers = Layers()
params = Parameters()
