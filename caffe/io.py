"""``caffe.io``: pycaffe's image and array helpers.

``Transformer``, ``load_image``, ``resize_image`` and ``oversample`` are jcaffe's
(``jcaffe.classifier``, pycaffe's semantics). The conversions between numpy arrays and Caffe's
``BlobProto`` / ``BlobProtoVector`` / ``Datum`` messages follow pycaffe's ``io.py``:

* ``blobproto_to_array(blob, return_diff=False)``: the values (``data`` or ``diff``) shaped by
  the legacy ``num/channels/height/width`` when any is set, else by ``shape.dim`` (no shape:
  a one-value blob is a 0-d array, more values are a ValueError, as numpy's reshape says);
* ``array_to_blobproto(arr, diff=None)``: ``shape`` and the values (and ``diff``);
* ``arraylist_to_blobprotovector_str`` / ``blobprotovector_str_to_arraylist``: a serialized
  ``BlobProtoVector``;
* ``array_to_datum(arr, label=None)``: a ``C x H x W`` array; uint8 to ``data`` bytes, other
  types to ``float_data``; the label only when given;
* ``datum_to_array(datum)``: ``C x H x W`` uint8 (from ``data``) or float (``float_data``).
"""

from __future__ import annotations

import numpy as np

from jcaffe.classifier import Transformer, load_image, oversample, resize_image
from jcaffe.proto import caffe_pb2

__all__ = ["Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
           "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array"]


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as an array of the blob's shape (see the module doc)."""
    values = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto of ``arr`` (and ``diff``, of the same shape)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """A serialized BlobProtoVector of the arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(arr) for arr in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """The arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=None) -> caffe_pb2.Datum:
    """A Datum of a ``C x H x W`` array (uint8 -> ``data``, else ``float_data``)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The ``C x H x W`` array of a raw Datum (uint8 from ``data``, else float)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    return np.array(datum.float_data).astype(float).reshape(shape)
