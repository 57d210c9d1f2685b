"""CIFAR-10: the binary batches -> jcaffe datasets and Caffe's mean image.

Input: the folder of the "CIFAR-10 binary version" (``cifar-10-batches-bin``, from
https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz), the folder that contains it, or the
``.tar.gz`` itself. ``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin`` hold records
of 1 label byte (0..9) and 3072 image bytes (3 x 32 x 32, CHW, RGB as in the file; Caffe's
``convert_cifar_data`` stores them unchanged).

Output (``create``): ``cifar10_train`` (the five training batches in order, 50000 records),
``cifar10_test`` (10000) and ``mean.binaryproto`` (the training mean as a [1, 3, 32, 32] float
``BlobProto``, as Caffe's ``compute_image_mean``); with "lmdb" / "leveldb" in ``formats`` also
``cifar10_train_lmdb`` etc., keyed ``%05d`` as Caffe's converter. Complete outputs from the same
input bytes are left alone; everything is written atomically. ``main`` is the command line of
``datasets/cifar10/prepare_cifar10.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
import time
from typing import Callable, Sequence

import numpy as np

from jcaffe.errors import DataError, JcaffeError

TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_BATCHES = ("test_batch.bin",)
RECORD_BYTES = 1 + 3 * 32 * 32
SHAPE = (3, 32, 32)
NUM_CLASSES = 10
FORMATS = ("tensorstore", "lmdb", "leveldb")
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MEAN_FILE = "mean.binaryproto"

Log = Callable[[str], None]


def parse_batch(content: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Records of one batch file: images ``[n, 3, 32, 32]`` uint8 and labels ``[n]`` int32."""
    if len(content) == 0 or len(content) % RECORD_BYTES:
        raise DataError(f"{where}: {len(content)} bytes is not a whole number of CIFAR-10 "
                        f"records ({RECORD_BYTES} bytes each: 1 label + 3072 pixels)")
    rec = np.frombuffer(content, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = rec[:, 0].astype(np.int32)
    bad = np.nonzero(labels >= NUM_CLASSES)[0]
    if bad.size:
        raise DataError(f"{where}: record {int(bad[0])} has label {int(labels[bad[0]])}; "
                        f"CIFAR-10 labels are 0..{NUM_CLASSES - 1}")
    return rec[:, 1:].reshape(-1, *SHAPE), labels


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one binary batch file (see ``parse_batch``)."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_batch(content, path)


class _Inputs:
    """The batch files of a folder or of the release archive, by name."""

    def __init__(self, src: str):
        self.src = os.path.abspath(src)
        self._tar = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._dir = None
        if os.path.isdir(self.src):
            for cand in (self.src, os.path.join(self.src, "cifar-10-batches-bin")):
                if os.path.isfile(os.path.join(cand, TRAIN_BATCHES[0])):
                    self._dir = cand
                    break
            else:
                self._dir = self.src
        elif os.path.isfile(self.src):
            try:
                self._tar = tarfile.open(self.src, "r:*")
                for m in self._tar.getmembers():
                    if m.isfile():
                        self._members[os.path.basename(m.name)] = m
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{self.src}: not a readable tar archive: {e}") from None
        else:
            raise DataError(f"{self.src}: no such folder or archive (expected the "
                            f"cifar-10-batches-bin folder of {ARCHIVE_URL})")
        missing = [n for n in TRAIN_BATCHES + TEST_BATCHES if not self.has(n)]
        if missing:
            raise DataError(f"{self.src}: CIFAR-10 batch files missing: {', '.join(missing)} "
                            f"(expected the binary version, {ARCHIVE_URL})")

    def has(self, name: str) -> bool:
        if self._tar is not None:
            return name in self._members
        return os.path.isfile(os.path.join(self._dir, name))

    def where(self, name: str) -> str:
        if self._tar is not None:
            return f"{self.src}:{self._members[name].name}"
        return os.path.join(self._dir, name)

    def read(self, name: str) -> bytes:
        try:
            if self._tar is not None:
                f = self._tar.extractfile(self._members[name])
                return f.read()
            with open(os.path.join(self._dir, name), "rb") as f:
                return f.read()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{self.where(name)}: cannot read: {e}") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def output_name(split: str, fmt: str) -> str:
    """``cifar10_train`` (jcaffe dataset), ``cifar10_train_lmdb``, ``cifar10_train_leveldb``."""
    return f"cifar10_{split}" if fmt == "tensorstore" else f"cifar10_{split}_{fmt}"


def _describe(split: str, digests: dict[str, str]) -> str:
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    return f"CIFAR-10 {split}: " + ", ".join(f"{n} (sha256 {digests[n]})" for n in names)


def _up_to_date(path: str, fmt: str, source: str, count: int) -> bool:
    from jcaffe.data.dataset import has_chunk_checksums, read_metadata
    from jcaffe.data.datum import datum_to_array
    from jcaffe.data.sources import db_bounds, detect_kind

    if detect_kind(path) != fmt:
        return False
    try:
        if fmt == "tensorstore":
            meta = read_metadata(path)
            return (meta["source"] == source and meta["count"] == count
                    and has_chunk_checksums(path))
        first_key, last_key, first_value = db_bounds(path)
        arr, _ = datum_to_array(first_value, path)
        return (first_key == b"%05d" % 0 and last_key == b"%05d" % (count - 1)
                and arr.shape == SHAPE and arr.dtype == np.uint8)
    except DataError:
        return False


def _mean_ok(path: str) -> bool:
    from jcaffe.proto import caffe_pb2

    try:
        with open(path, "rb") as f:
            blob = caffe_pb2.BlobProto.FromString(f.read())
    except Exception:
        return False
    return (blob.num, blob.channels, blob.height, blob.width) == (1, *SHAPE) and \
        len(blob.data) == int(np.prod(SHAPE))


def create(src: str, out_dir: str, *, formats: Sequence[str] = ("tensorstore",),
           force: bool = False, log: Log = print) -> dict[str, str]:
    """Converts the batches at ``src`` into ``out_dir``; returns {output name: path}."""
    from jcaffe.data.dataset import read_dataset, write_dataset
    from jcaffe.data.datum import array_to_datum
    from jcaffe.data.mean import image_mean, write_mean_binaryproto
    from jcaffe.data.sources import write_leveldb, write_lmdb
    from jcaffe.tools.progress import batch_size, progress_iter

    for fmt in formats:
        if fmt not in FORMATS:
            raise DataError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    formats = list(dict.fromkeys(["tensorstore", *formats]))
    out_dir = os.path.abspath(out_dir)
    inputs = _Inputs(src)
    result: dict[str, str] = {}
    try:
        contents: dict[str, bytes] = {}
        digests: dict[str, str] = {}
        for name in TRAIN_BATCHES + TEST_BATCHES:
            contents[name] = inputs.read(name)
            digests[name] = hashlib.sha256(contents[name]).hexdigest()
        parsed = {n: parse_batch(contents[n], inputs.where(n)) for n in contents}
        del contents
        train_written = False
        for split, names in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
            count = sum(parsed[n][0].shape[0] for n in names)
            source = _describe(split, digests)
            for fmt in formats:
                path = os.path.join(out_dir, output_name(split, fmt))
                result[output_name(split, fmt)] = path
                if not force and _up_to_date(path, fmt, source, count):
                    log(f"CIFAR-10: {path} is up to date")
                    continue
                t0 = time.perf_counter()
                log(f"CIFAR-10: writing {path} ({count} records, {fmt})")
                if fmt == "tensorstore":
                    write_dataset(path, progress_iter((parsed[n] for n in names), count,
                                                      os.path.basename(path), "img", batch_size),
                                  source=source, overwrite=True)
                    train_written |= split == "train"
                else:
                    def datums():
                        i = 0
                        for n in names:
                            images, labels = parsed[n]
                            for k in range(images.shape[0]):
                                yield "%05d" % i, array_to_datum(images[k], labels[k])
                                i += 1
                    (write_lmdb if fmt == "lmdb" else write_leveldb)(
                        path, progress_iter(datums(), count, os.path.basename(path), "img"),
                        overwrite=True)
                log(f"CIFAR-10: {os.path.basename(path)} done in {time.perf_counter() - t0:.1f} s")
        mean_path = os.path.join(out_dir, MEAN_FILE)
        result[MEAN_FILE] = mean_path
        if force or train_written or not _mean_ok(mean_path):
            log(f"CIFAR-10: computing the training mean -> {mean_path}")
            with read_dataset(os.path.join(out_dir, output_name("train", "tensorstore"))) as s:
                write_mean_binaryproto(mean_path, image_mean(s))
        else:
            log(f"CIFAR-10: {mean_path} is up to date")
    finally:
        inputs.close()
    return result


def main(argv: Sequence[str] | None = None, *, default_out: str | None = None) -> int:
    """``prepare_cifar10.py --from DIR [--out DIR] [--format F ...] [--force]``."""
    p = argparse.ArgumentParser(
        prog="prepare_cifar10.py",
        description="Convert the CIFAR-10 binary batches to jcaffe datasets cifar10_train / "
                    "cifar10_test and the training mean mean.binaryproto.")
    p.add_argument("--from", dest="src", required=True,
                   help=f"the cifar-10-batches-bin folder (or {os.path.basename(ARCHIVE_URL)})")
    p.add_argument("--out", default=default_out,
                   help="output folder (default: %(default)s)")
    p.add_argument("--format", action="append", choices=FORMATS, default=[],
                   help="also write Caffe's formats (cifar10_train_lmdb, ...); repeatable")
    p.add_argument("--force", action="store_true", help="rewrite outputs that are up to date")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("--out is required")
    t0 = time.perf_counter()
    try:
        create(args.src, args.out, formats=args.format, force=args.force)
    except JcaffeError as e:
        print(f"prepare_cifar10: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_cifar10: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    print(f"CIFAR-10: ready in {time.perf_counter() - t0:.1f} s")
    return 0


__all__ = ["parse_batch", "read_batch", "create", "output_name", "main", "TRAIN_BATCHES",
           "TEST_BATCHES", "MEAN_FILE"]
