"""Caffe's mean image (``compute_image_mean``) and its ``.binaryproto`` file.

The mean is computed as Caffe does: a float32 running sum over the records in order, divided by the
count in float32. Byte data is summed exactly in integers while that equals Caffe's float sum
(fewer than 2**24 / 255 records), otherwise record by record in float32 like Caffe.
The file is a ``BlobProto`` with the legacy ``num=1, channels, height, width`` fields and float
``data``, as Caffe's tool writes it (``jcaffe.caffemodel.write_binaryproto``, jcaffe's one
``.binaryproto`` writer).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from jcaffe.caffemodel import array_to_blob, write_binaryproto
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2

_EXACT_LIMIT = (1 << 24) // 255  # below this many byte records, integer sums equal float sums


def image_mean(source, *, batch_records: int = 4096,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The mean ``[C, H, W]`` float32 of all records of a ``Source`` (Caffe's arithmetic)."""
    count = source.count
    shape = tuple(source.datum_shape)
    exact = np.dtype(source.dtype) == np.uint8 and count < _EXACT_LIMIT
    total = np.zeros(shape, np.int64 if exact else np.float32)
    done = 0
    for a in range(0, count, batch_records):
        data, _ = source.read(a, min(batch_records, count - a))
        if exact:
            total += data.sum(axis=0, dtype=np.int64)
        else:
            for rec in data:
                np.add(total, rec.astype(np.float32), out=total)
        done += data.shape[0]
        if progress is not None:
            progress(done)
    if exact:
        return (total / count).astype(np.float32)
    return (total / np.float32(count)).astype(np.float32)


def channel_means(mean: np.ndarray) -> list[float]:
    """Per-channel means of a ``[C, H, W]`` mean image, summed in float32 as Caffe's tool does."""
    m = np.asarray(mean, dtype=np.float32)
    m = m.reshape(m.shape[-3], -1)
    dim = np.float32(m.shape[1])
    return [float(np.cumsum(row, dtype=np.float32)[-1] / dim) for row in m]


def _mean_4d(mean: np.ndarray) -> np.ndarray:
    m = np.asarray(mean, dtype=np.float32)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 3:
        raise ValueError(f"a mean image is [C, H, W], got shape {list(m.shape)}")
    return m[None]


def mean_blobproto(mean: np.ndarray) -> caffe_pb2.BlobProto:
    """A ``BlobProto`` [1, C, H, W] of a ``[C, H, W]`` (or ``[1, C, H, W]``) mean."""
    return array_to_blob(_mean_4d(mean), legacy_dims=True)


def write_mean_binaryproto(path: str, mean: np.ndarray) -> None:
    """Writes the mean as Caffe's ``mean.binaryproto`` (``jcaffe.caffemodel.write_binaryproto``,
    atomic), creating missing folders."""
    m = _mean_4d(mean)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create the folder '{folder}': {e.strerror or e}") from None
    write_binaryproto(path, m, legacy_dims=True)


__all__ = ["image_mean", "channel_means", "mean_blobproto", "write_mean_binaryproto"]
