"""extract_features: blobs of a trained net over N batches of its data layer, written as
datasets, as Caffe's ``tools/extract_features.cpp``.

    jcaffe extract_features [--backend lmdb|leveldb|tensorstore] WEIGHTS NET \\
        BLOB[,BLOB...] DB[,DB...] NUM_BATCHES [DB_TYPE] [CPU|GPU] [DEVICE_ID]

NET is built in the TEST phase with WEIGHTS copied in (Caffe's ``CopyTrainedLayersFrom``) and
run forward NUM_BATCHES times, each time on the next batch of its data layer(s). Every item
``n`` of each named blob becomes one record of the matching DB, in order:

* ``lmdb`` / ``leveldb``: a Caffe ``Datum`` with ``channels``, ``height``, ``width`` the blob's
  legacy 4-axis shape (missing axes are 1), ``float_data`` the item's values and label 0,
  under the key ``%010d`` (the item's index), as Caffe writes them;
* ``tensorstore``: a jcaffe dataset of float32 ``[N, C, H, W]`` records (labels 0).

The backend is ``--backend`` or Caffe's positional DB_TYPE (``lmdb`` when neither is given);
``GPU [DEVICE_ID]`` / ``CPU`` pick the JAX device. Every DB must not exist yet (Caffe opens them
with ``NEW``); they are written once all batches have run, so a failure leaves none behind.
A progress bar shows on a terminal; the log lines are Caffe's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Sequence

import numpy as np

from jcaffe import log
from jcaffe.errors import DataError, JcaffeError, NetError

BACKENDS = ("lmdb", "leveldb", "tensorstore")
_log = log.get_logger("extract_features")


def _legacy_chw(shape: Sequence[int]) -> tuple[int, int, int]:
    """Caffe's Blob channels(), height(), width() for an item of a blob of ``shape``."""
    dims = list(shape[1:]) + [1] * max(0, 4 - len(shape))
    if len(shape) > 4:
        raise NetError(f"a blob of {len(shape)} axes has no legacy channels/height/width")
    return int(dims[0]), int(dims[1]), int(dims[2])


def feature_datums(features: np.ndarray):
    """``("%010d", Datum)`` records of an ``[N, ...]`` array, as Caffe's tool writes them."""
    from jcaffe.proto import caffe_pb2

    c, h, w = _legacy_chw(features.shape)
    for n, item in enumerate(features):
        d = caffe_pb2.Datum(channels=c, height=h, width=w)
        d.float_data.extend(np.asarray(item, np.float32).ravel().tolist())
        yield f"{n:010d}", d


def _progress(total: int, desc: str):
    from jcaffe.tools.progress import progress

    return progress(total=total, desc=desc, unit="batch")


def extract_features(weights: str, net_file: str, blob_names: Sequence[str],
                     db_names: Sequence[str], num_batches: int, backend: str = "lmdb",
                     device=None) -> dict[str, np.ndarray]:
    """Runs the extraction and writes the DBs; returns ``{blob: [N, ...] features}``."""
    import jax

    from jcaffe.classifier import trained_params
    from jcaffe.data.feed import PrefetchFeeder
    from jcaffe.net import Net

    if backend not in BACKENDS:
        raise JcaffeError(f"unknown backend '{backend}': {', '.join(BACKENDS)}")
    if len(blob_names) != len(db_names):
        raise JcaffeError(f"the number of blob names ({len(blob_names)}) and dataset names "
                          f"({len(db_names)}) must be equal")
    if num_batches < 1:
        raise JcaffeError(f"NUM_BATCHES must be positive, got {num_batches}")
    for db in db_names:
        if os.path.exists(db):
            raise DataError(f"{db}: already exists (extract_features writes a new dataset)")
    ctx = jax.default_device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        net = Net(net_file, "TEST", verbose=False)
        blobs_known = {t for layer in net.layers for t in layer.top_names}
        for b in blob_names:
            if b not in blobs_known:
                raise NetError(f"Unknown feature blob name {b} in the network {net_file}")
        if not net.data_layers:
            raise NetError(f"{net_file}: the net has no data layer to read batches from")
        params = trained_params(net, weights)
        # A key per batch: Caffe's TEST nets draw at every forward pass too (mirror: true,
        # DummyData's random fillers).
        forward = jax.jit(lambda p, x, k: {b: v for b, v in net.apply(p, x, train=False, key=k)
                                           .items() if b in blob_names})
        root_key = jax.random.key(0)
        _log.info("Extracting Features")
        feeders = [PrefetchFeeder(layer, seed=0) for layer in net.data_layers]
        out: dict[str, list[np.ndarray]] = {b: [] for b in blob_names}
        try:
            with _progress(num_batches, "extract_features") as bar:
                for i in range(num_batches):
                    batch = {}
                    for f in feeders:
                        batch.update(next(f))
                    blobs = forward(params, batch, jax.random.fold_in(root_key, i))
                    for b in blob_names:
                        out[b].append(np.asarray(blobs[b], np.float32))
                    bar.update(1)
        finally:
            for f in feeders:
                f.close()
    features = {b: np.concatenate(v) for b, v in out.items()}
    for b, db in zip(blob_names, db_names):
        _log.info("Opening dataset %s", db)
        _write(db, backend, features[b])
        _log.info("Extracted features of %d query images for feature blob %s",
                  len(features[b]), b)
    _log.info("Successfully extracted the features!")
    return features


def _write(db: str, backend: str, features: np.ndarray) -> None:
    if backend == "tensorstore":
        from jcaffe.data.dataset import write_dataset

        c, h, w = _legacy_chw(features.shape)
        write_dataset(db, features.reshape(len(features), c, h, w).astype(np.float32),
                      np.zeros(len(features), np.int32), source="extract_features")
        return
    from jcaffe.data import sources

    writer = sources.write_lmdb if backend == "lmdb" else sources.write_leveldb
    writer(db, feature_datums(features))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jcaffe extract_features",
        description="Extract blobs of a trained net over N batches of its data layer into "
                    "datasets (Caffe's extract_features).")
    p.add_argument("weights", metavar="WEIGHTS", help="the trained .caffemodel")
    p.add_argument("net", metavar="NET", help="the net definition (with a data layer)")
    p.add_argument("blobs", metavar="BLOBS", help="blob names, comma-separated")
    p.add_argument("dbs", metavar="DBS", help="dataset names, one per blob, comma-separated")
    p.add_argument("num_batches", metavar="NUM_BATCHES", type=int)
    p.add_argument("rest", nargs="*", metavar="[DB_TYPE] [CPU|GPU] [DEVICE_ID]")
    p.add_argument("--backend", default=None, help="lmdb (default), leveldb or tensorstore")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from jcaffe.cli import parse_flags

    args = parse_flags(list(argv or []), _parser())
    rest = list(args.rest)
    backend = args.backend
    if rest and rest[0] not in ("CPU", "GPU"):
        db_type = rest.pop(0)
        if backend is not None and backend != db_type:
            raise JcaffeError(f"--backend={backend} and DB_TYPE {db_type} disagree")
        backend = db_type
    backend = backend or "lmdb"
    device = None
    if rest:
        mode = rest.pop(0)
        if mode == "GPU":
            ids = rest.pop(0) if rest else "0"
            try:
                device = jax.devices("gpu")[int(ids)]
            except (RuntimeError, IndexError, ValueError):
                raise JcaffeError(f"GPU {ids}: no such GPU visible to JAX") from None
        elif mode == "CPU":
            device = jax.devices("cpu")[0]
    if rest:
        raise JcaffeError(f"unexpected arguments: {' '.join(rest)}")
    extract_features(args.weights, args.net, args.blobs.split(","), args.dbs.split(","),
                     args.num_batches, backend, device)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
