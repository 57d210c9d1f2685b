"""``caffe.coord_map``: how coordinates of one NetSpec top relate to another's, to crop and
align feature maps (pycaffe's ``coord_map``, e.g. for FCN's score crops).

A layer's map is ``(axis, a, b)``: along the spatial axes from ``axis`` on, input coordinate
``x`` lands at output ``a·x + b``. For a Convolution / Pooling / Im2col with stride ``s``,
effective kernel ``k = (kernel - 1)·dilation + 1`` and padding ``p``: ``a = 1/s``,
``b = (p - (k - 1)/2)/s``; a Deconvolution is its inverse, ``a = s``, ``b = (k - 1)/2 - p``;
point-wise layers are the identity ``(None, 1, 0)`` (any axis); a Crop at ``axis`` with
``offset`` shifts by ``-offset`` from axis ``axis - 1``. Maps compose as affine maps
(``a1·(a2·x + b2) + b1``); ``coord_map_from_to(top_from, top_to)`` walks both tops' bottoms to
a common ancestor and returns ``(axis, a, b)`` taking ``top_to`` coordinates to ``top_from``'s
(``a``, ``b`` arrays, one entry per spatial axis). ``crop(top_from, top_to)`` makes the Crop
layer that aligns ``top_from`` to ``top_to``.
"""

from __future__ import annotations

import numpy as np

from caffe.net_spec import layers as L

__all__ = ["coord_map", "coord_map_from_to", "crop", "compose", "inverse", "conv_params",
           "crop_params", "UndefinedMapException", "AxisMismatchException",
           "PASS_THROUGH_LAYERS"]

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale",
                       "Sigmoid", "Split", "TanH", "Threshold"]

_IDENTITY = (None, 1, 0)


class UndefinedMapException(Exception):
    """The layer type has no coordinate map."""


class AxisMismatchException(Exception):
    """Two maps act on different axes."""


def _vec(value) -> np.ndarray:
    return np.array(value, ndmin=1)


def conv_params(fn):
    """``(axis, stride, effective kernel, pad)`` of a Convolution / Deconvolution / Im2col
    (``convolution_param``) or Pooling layer, as arrays."""
    p = fn.params.get("convolution_param", fn.params)
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}
    assert not legacy & set(fn.params), "cropping does not support legacy _h/_w params"
    kernel = _vec(p["kernel_size"])
    dilation = _vec(p.get("dilation", 1))
    return (p.get("axis", 1), _vec(p.get("stride", 1)), (kernel - 1) * dilation + 1,
            _vec(p.get("pad", 0)))


def crop_params(fn):
    """``(axis, offset)`` of a Crop layer (defaults: axis 2, offset 0)."""
    p = fn.params.get("crop_param", fn.params)
    return p.get("axis", 2), _vec(p.get("offset", 0))


def coord_map(fn):
    """The ``(axis, a, b)`` map of one layer (see the module doc)."""
    kind = fn.type_name
    if kind in ("Convolution", "Pooling", "Im2col"):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if kind == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return _IDENTITY
    if kind == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset
    raise UndefinedMapException(f"no coordinate map for layer type {kind}")


def compose(base_map, next_map):
    """``base ∘ next``: ``x -> a1·(a2·x + b2) + b1``; an axis of None takes the other's."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"maps on axes {ax1} and {ax2}")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(map_):
    """The inverse map: ``x -> (x - b)/a``."""
    ax, a, b = map_
    return ax, 1 / a, -b / a


def _mappable_bottoms(top):
    """The bottoms a walk follows: all of them, but only the first of a Crop (the second
    gives just a size)."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _maps_to_ancestors(start):
    """``{top: map}`` for ``start`` and every top reachable through mapped layers."""
    maps = {start: _IDENTITY}
    todo = [start]
    while todo:
        top = todo.pop()
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            maps[bottom] = compose(maps[top], step)
            todo.append(bottom)
    return maps


def coord_map_from_to(top_from, top_to):
    """The map from ``top_to``'s coordinates to ``top_from``'s, through their nearest common
    ancestor; a RuntimeError when they share none through mapped layers."""
    from_maps = _maps_to_ancestors(top_from)
    to_maps = {top_to: _IDENTITY}
    todo = [top_to]
    while todo:
        top = todo.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            to_maps[bottom] = compose(to_maps[top], step)
            todo.append(bottom)
    raise RuntimeError("Could not compute map between tops; are they connected by spatial "
                       "layers?")


def crop(top_from, top_to):
    """A Crop layer cropping ``top_from`` to align with ``top_to`` (same scale, a
    non-positive integer shift; otherwise an AssertionError says which)."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    assert (a == 1).all(), f"scale mismatch on crop (a = {a})"
    assert (b <= 0).all(), f"cannot crop negative offset (b = {b})"
    assert (np.round(b) == b).all(), f"cannot crop noninteger offset (b = {b})"
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=ax + 1, offset=list(-np.round(b).astype(int))))
