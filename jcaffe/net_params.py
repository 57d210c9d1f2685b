"""A net's parameter blobs by name: Caffe's ``Net::AppendParam`` (which blob each layer's
param is, shared ``ParamSpec.name`` blobs, the multipliers), ``ShareTrainedLayersWith`` and
``CopyTrainedLayersFrom`` (weights matched by layer name).

Params are ``{layer key: [blobs]}``; a blob a layer shares from an earlier one is ``None`` in
the sharing layer's list and ``sources[key][j] = (owner key, owner index)`` says where it is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jcaffe.errors import ModelError, NetError
from jcaffe.proto import caffe_pb2

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One learnable blob: where it lives and how the solver treats it (Caffe's ParamSpec)."""

    layer: str
    index: int
    shape: Shape
    lr_mult: float
    decay_mult: float
    name: str = ""


class ParamTable:
    """Caffe's AppendParam over a net's layers in order: ``info`` lists the learnable (owned)
    blobs in Caffe's ``learnable_params`` order, ``sources`` each layer's blobs' owners."""

    def __init__(self):
        self.info: list[ParamInfo] = []
        self.sources: dict[str, list[tuple[str, int]]] = {}
        self._names: dict[str, tuple[str, int, Shape]] = {}   # ParamSpec.name -> owner
        self._has_mult: list[list[bool]] = []  # per info entry: lr_mult, decay_mult given

    def add(self, lp, layer) -> list[tuple[str, int]]:
        """Registers ``layer``'s blobs (``lp``: its LayerParameter); returns their owners."""
        if len(lp.param) > len(layer.blob_shapes):
            raise NetError(f"layer '{lp.name}': {len(lp.param)} param specs given but the layer "
                           f"has {len(layer.blob_shapes)} parameter blob(s)")
        key = layer.name
        sources = []
        for j, shape in enumerate(layer.blob_shapes):
            spec = lp.param[j] if j < len(lp.param) else caffe_pb2.ParamSpec()
            if spec.name and spec.name in self._names:
                owner, idx, oshape = self._names[spec.name]
                strict = spec.share_mode != caffe_pb2.ParamSpec.PERMISSIVE
                if (strict and oshape != shape) or int(np.prod(oshape)) != int(np.prod(shape)):
                    raise NetError(f"layer '{lp.name}': shared param '{spec.name}' has shape "
                                   f"{list(shape)} here but {list(oshape)} in layer '{owner}'")
                self._share_mults(lp, spec, owner, idx)
                sources.append((owner, idx))
                continue
            if spec.name:
                self._names[spec.name] = (key, j, shape)
            sources.append((key, j))
            lr_mult, decay_mult = float(spec.lr_mult), float(spec.decay_mult)
            if layer.stateful:
                # Blobs the forward pass updates (BatchNorm's statistics) are never learned:
                # Caffe's BatchNormLayer forces their lr_mult/decay_mult to 0.
                lr_mult = decay_mult = 0.0
            self.info.append(ParamInfo(key, j, shape, lr_mult, decay_mult, spec.name))
            self._has_mult.append([spec.HasField("lr_mult") or layer.stateful,
                                   spec.HasField("decay_mult") or layer.stateful])
        self.sources[key] = sources
        return sources

    def _share_mults(self, lp, spec, owner: str, idx: int) -> None:
        """Caffe's AppendParam for a sharing layer: an lr_mult/decay_mult it sets must equal
        one the owner set; where the owner set none, the sharing layer's value applies to the
        shared blob."""
        k = next(i for i, p in enumerate(self.info) if (p.layer, p.index) == (owner, idx))
        info, has = self.info[k], self._has_mult[k]
        for field, slot in (("lr_mult", 0), ("decay_mult", 1)):
            if not spec.HasField(field):
                continue
            value, current = float(getattr(spec, field)), float(getattr(info, field))
            if has[slot]:
                if value != current:
                    raise NetError(f"layer '{lp.name}': shared param '{spec.name}' has "
                                   f"{field} {value:g} here but {current:g} in its owner, layer "
                                   f"'{owner}' (Caffe: mismatched {field})")
            else:
                has[slot] = True
                info = dataclasses.replace(info, **{field: value})
        self.info[k] = info


def first_of_each_name(layers) -> dict:
    """Prototxt layer name -> the first layer of that name (Caffe's lookups by name)."""
    firsts: dict = {}
    for layer in layers:
        firsts.setdefault(layer.param.name, layer)
    return firsts


def shared_layer_keys(layers, source_layers) -> dict[str, str]:
    """Caffe's ``ShareTrainedLayersWith``: layer key here -> the source layer key whose blobs
    it uses (see ``Net.shared_layer_keys``)."""
    firsts = first_of_each_name(layers)
    out: dict[str, str] = {}
    for src in source_layers:
        target = firsts.get(src.param.name)
        if target is None:
            continue
        if len(target.blob_shapes) != len(src.blob_shapes):
            raise NetError(f"layer '{src.param.name}': {len(src.blob_shapes)} blob(s) in "
                           f"the source net but {len(target.blob_shapes)} here; Caffe "
                           f"shares weights by layer name")
        if not src.blob_shapes:
            continue
        for j, (a, b) in enumerate(zip(src.blob_shapes, target.blob_shapes)):
            if tuple(a) != tuple(b):
                raise NetError(f"layer '{src.param.name}' blob {j}: shape {list(a)} in the "
                               f"source net but {list(b)} here; Caffe shares weights by "
                               f"layer name (rename the layer to keep its own)")
        out[target.name] = src.name
    return out


def copy_trained_layers(layers, sources, params, source: Mapping[str, Sequence[np.ndarray]],
                        filename: str, info: Callable[..., None]) -> dict[str, list]:
    """Caffe's ``CopyTrainedLayersFrom`` (see ``Net.copy_from``)."""
    new = {k: list(v) for k, v in params.items()}
    # Caffe copies into the first layer of the name (a repeated name's later layers keep
    # their own blobs).
    by_name = first_of_each_name(layers)
    for name, blobs in source.items():
        layer = by_name.get(name)
        if layer is None:
            info("Ignoring source layer %s", name)
            continue
        key = layer.name
        owned = [src == (key, j) for j, src in enumerate(sources[key])]
        # HDF5 models store a shared blob only with its owner: those may be absent here.
        short_ok = len(blobs) < len(owned) and not any(owned[len(blobs):])
        if len(blobs) != len(layer.blob_shapes) and not short_ok:
            raise ModelError(f"{filename}: layer '{name}' has {len(blobs)} blob(s) but the "
                             f"net expects {len(layer.blob_shapes)}")
        info("Copying source layer %s", name)
        for j, (blob, shape) in enumerate(zip(blobs, layer.blob_shapes)):
            if blob is None:
                continue
            arr = np.asarray(blob)
            if tuple(arr.shape) != tuple(shape):
                if legacy_equal(arr.shape, shape):
                    arr = arr.reshape(shape)
                else:
                    raise ModelError(f"{filename}: layer '{name}' blob {j}: shape "
                                     f"{list(arr.shape)} does not match the net's "
                                     f"{list(shape)}")
            owner, idx = sources[key][j]
            new[owner][idx] = jnp.asarray(arr, jnp.float32)
    return new


def legacy_equal(found, expected) -> bool:
    """Caffe's legacy 4-d blobs (num, channels, height, width) pad the real shape with 1s."""
    strip = lambda s: tuple(s)[next((i for i, d in enumerate(s) if d != 1), len(s)):]  # noqa: E731
    return len(found) == 4 and strip(found) == strip(expected)


def fill_params(layers, sources, inline_blobs, key, skip=frozenset()) -> dict[str, list]:
    """Fresh params: each layer's fillers with ``fold_in(key, layer index)``, or the blobs its
    LayerParameter gives (Caffe's Layer constructor); shared blobs and layers in ``skip``
    hold ``None``."""
    import jax

    params: dict[str, list] = {}
    for i, layer in enumerate(layers):
        if not layer.blob_shapes:
            continue
        if layer.name in skip:
            params[layer.name] = [None] * len(layer.blob_shapes)
            continue
        blobs = layer.init(jax.random.fold_in(key, i))
        if layer.name in inline_blobs:
            blobs = [jnp.asarray(b, jnp.float32) for b in inline_blobs[layer.name]]
        owned = sources[layer.name]
        params[layer.name] = [b if src == (layer.name, j) else None
                              for j, (b, src) in enumerate(zip(blobs, owned))]
    return params
