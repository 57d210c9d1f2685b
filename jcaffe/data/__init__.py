"""Datasets for jcaffe's data layers.

* ``jcaffe.data.dataset``: jcaffe's own format (zarr arrays + ``jcaffe_dataset.json``);
  ``write_dataset`` / ``read_dataset``.
* ``jcaffe.data.sources``: ``open_source`` over jcaffe datasets and Caffe's LMDB / LevelDB
  databases of ``Datum`` records; ``write_lmdb`` / ``write_leveldb``.
* ``jcaffe.data.mnist`` / ``jcaffe.data.cifar10``: fetching and converting the standard datasets
  (scripts in ``datasets/``); ``jcaffe.data.mean``: Caffe's mean image (``mean.binaryproto``).
* ``jcaffe.data.image`` / ``jcaffe.data.datum``: OpenCV-compatible image decoding, Datum records.
* ``jcaffe.data.readers``: the host readers of the data layers behind one ``Reader`` protocol
  (Caffe's record order, ``rand_skip``, ``shuffle``, resume); ``jcaffe.data.windows``: WindowData's
  window files, fg/bg sampling and warped crops; ``jcaffe.data.feed``: how batches reach the step.
* ``jcaffe.data.source_base``: the ``Source`` interface under ``sources`` and ``dataset``.

Names below are imported on first use, so ``import jcaffe.data`` stays cheap.
"""

from __future__ import annotations

from jcaffe._lazy import lazy_attributes

_LAZY = {
    "open_source": "jcaffe.data.sources",
    "Source": "jcaffe.data.sources",
    "write_lmdb": "jcaffe.data.sources",
    "write_leveldb": "jcaffe.data.sources",
    "write_dataset": "jcaffe.data.dataset",
    "read_dataset": "jcaffe.data.dataset",
    "verify_dataset": "jcaffe.data.dataset",
    "image_mean": "jcaffe.data.mean",
    "write_mean_binaryproto": "jcaffe.data.mean",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
