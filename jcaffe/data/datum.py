"""Caffe ``Datum`` records <-> numpy arrays.

A Datum holds one image and its label: ``channels``/``height``/``width`` and either ``data``
(uint8 bytes in CHW order), ``float_data`` (float32, CHW), or, with ``encoded: true``, the bytes of
an image file (PNG, JPEG, ...). Encoded images are decoded like Caffe: in OpenCV's BGR order, as
colour or grey when the Datum's ``channels`` says 3 or 1 (or when the reader forces colour), else in
the image's native channel count (Caffe's ``DecodeDatumNative``). See ``jcaffe.data.image``.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from jcaffe.data.image import decode_image
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2


def parse_datum(value: bytes, where: str) -> caffe_pb2.Datum:
    """Parses serialized Datum bytes; ``where`` names the record in the error."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise DataError(f"{where}: not a Caffe Datum ({len(value)} bytes): {e}") from None
    return datum


def datum_to_array(datum: caffe_pb2.Datum | bytes, where: str, *,
                   force_color: bool = False) -> tuple[np.ndarray, int]:
    """Returns ``(array [C, H, W], label)``: uint8 for ``data`` / encoded images, float32 for
    ``float_data``. ``force_color`` decodes encoded images as colour (Caffe's ``force_color``;
    raw records are returned as stored). Raises ``DataError`` naming ``where`` when the record is
    inconsistent."""
    arr, label = datum_to_view(datum, where, force_color=force_color)
    return np.ascontiguousarray(arr), label


def datum_to_view(datum: caffe_pb2.Datum | bytes, where: str, *,
                  force_color: bool = False) -> tuple[np.ndarray, int]:
    """``datum_to_array`` without its final copy: a decoded image comes back as a ``[C, H, W]``
    view of the decoder's ``[H, W, C]`` array (copy it once, where it is to be stored)."""
    if isinstance(datum, (bytes, bytearray, memoryview)):
        datum = parse_datum(bytes(datum), where)
    label = int(datum.label)
    if datum.encoded:
        if not datum.data:
            raise DataError(f"{where}: encoded Datum has no image bytes")
        if force_color or datum.channels == 3:
            color: bool | None = True
        elif datum.channels == 1:
            color = False
        else:
            color = None
        return np.transpose(decode_image(datum.data, color, where=where), (2, 0, 1)), label
    c, h, w = int(datum.channels), int(datum.height), int(datum.width)
    if c <= 0 or h <= 0 or w <= 0:
        raise DataError(f"{where}: Datum has shape channels={c} height={h} width={w}; "
                        "all must be positive")
    size = c * h * w
    if datum.data:
        if len(datum.data) != size:
            raise DataError(f"{where}: Datum data has {len(datum.data)} bytes, but "
                            f"{c}x{h}x{w} needs {size}")
        arr = np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    elif len(datum.float_data):
        if len(datum.float_data) != size:
            raise DataError(f"{where}: Datum float_data has {len(datum.float_data)} values, but "
                            f"{c}x{h}x{w} needs {size}")
        arr = np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)
    else:
        raise DataError(f"{where}: Datum has neither data nor float_data")
    return arr, label


def array_to_datum(chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """A raw Datum of a ``[C, H, W]`` array: uint8 -> ``data`` bytes, float -> ``float_data``."""
    arr = np.asarray(chw)
    if arr.ndim != 3:
        raise ValueError(f"a Datum holds a [C, H, W] array, got shape {arr.shape}")
    datum = caffe_pb2.Datum(channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2],
                            label=int(label))
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    elif np.issubdtype(arr.dtype, np.floating):
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    else:
        raise ValueError(f"a Datum holds uint8 or float data, got {arr.dtype}")
    return datum


def encoded_datum(image_bytes: bytes, label: int, shape: tuple[int, int, int] | None = None
                  ) -> caffe_pb2.Datum:
    """An encoded Datum of image file bytes; ``shape`` (C, H, W), when given, is recorded too."""
    datum = caffe_pb2.Datum(data=bytes(image_bytes), label=int(label), encoded=True)
    if shape is not None:
        datum.channels, datum.height, datum.width = (int(v) for v in shape)
    return datum


__all__ = ["parse_datum", "datum_to_array", "datum_to_view", "array_to_datum", "encoded_datum"]
