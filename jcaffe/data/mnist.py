"""MNIST: the four official IDX files -> jcaffe datasets (and optionally Caffe's LMDB / LevelDB).

``get(root)`` makes sure the four files are in ``root`` and intact: a file present is checked by the
SHA-256 of its gzip bytes (the copies shipped in ``datasets/mnist``) or, failing that, of its
decompressed contents (copies from other mirrors, or the unzipped files Caffe's ``get_mnist.sh``
leaves); a missing file is downloaded from the usual public mirrors and checked the same way.

``create(root)`` parses the IDX files (big-endian header: magic ``0x00000803`` for images,
``0x00000801`` for labels, then the dimensions) and writes ``mnist_train`` (60000 x 1 x 28 x 28
uint8) and ``mnist_test`` (10000) with ``write_dataset``; with ``formats`` containing "lmdb" or
"leveldb" also ``mnist_train_lmdb`` etc. as Caffe's ``create_mnist.sh`` (Datums keyed ``%08d``).
Outputs that are already complete and come from the same files are left alone; everything is
written atomically. ``main`` is the command line of ``datasets/mnist/prepare_mnist.py``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from jcaffe._atomic import atomic_file
from jcaffe.errors import DataError, JcaffeError


@dataclass(frozen=True)
class _Known:
    gz_sha256: str   # the gzip file shipped in datasets/mnist
    sha256: str      # its decompressed contents (the same for every faithful mirror)
    size: int        # decompressed bytes


FILES = {
    "train-images-idx3-ubyte.gz": _Known(
        "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", 47040016),
    "train-labels-idx1-ubyte.gz": _Known(
        "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", 60008),
    "t10k-images-idx3-ubyte.gz": _Known(
        "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", 7840016),
    "t10k-labels-idx1-ubyte.gz": _Known(
        "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", 10008),
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
FORMATS = ("tensorstore", "lmdb", "leveldb")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# IDX files

def _file_bytes(path: str) -> bytes:
    """The file's contents, gunzipped when it is gzip data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data: {e}") from None
    return raw


def parse_idx(content: bytes, where: str, expect_magic: int | None = None) -> np.ndarray:
    """Parses IDX bytes into an array of the declared shape; ``where`` names the file in errors."""
    if len(content) < 4:
        raise DataError(f"{where}: truncated: {len(content)} bytes, too short for an IDX header")
    magic = int.from_bytes(content[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        what = {IMAGE_MAGIC: "IDX images", LABEL_MAGIC: "IDX labels"}.get(expect_magic, "IDX")
        raise DataError(f"{where}: wrong magic number 0x{magic:08x}; expected "
                        f"0x{expect_magic:08x} ({what})")
    if content[0] != 0 or content[1] != 0 or content[2] not in _IDX_TYPES:
        raise DataError(f"{where}: wrong magic number 0x{magic:08x}; not an IDX file")
    dtype = np.dtype(_IDX_TYPES[content[2]])
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{where}: truncated: header declares {ndim} dimensions but the file "
                        f"has {len(content)} bytes")
    dims = [int.from_bytes(content[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(content) - header
    if have < need:
        raise DataError(f"{where}: truncated: dimensions {'x'.join(map(str, dims))} need {need} "
                        f"bytes of data, the file has {have}")
    if have > need:
        raise DataError(f"{where}: {have - need} unexpected bytes after the "
                        f"{'x'.join(map(str, dims))} data")
    return np.frombuffer(content, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str, expect_magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzipped or not)."""
    return parse_idx(_file_bytes(path), path, expect_magic)


def read_split(images_path: str, labels_path: str, *, limit: int | None = None,
               expect: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 1, H, W]`` uint8 and labels ``[N]`` int32 of an IDX pair (the first ``limit``).

    ``expect``: known SHA-256s of the two files' decompressed contents, checked when given.
    """
    out = []
    for path, magic, want in ((images_path, IMAGE_MAGIC, expect and expect[0]),
                              (labels_path, LABEL_MAGIC, expect and expect[1])):
        content = _file_bytes(path)
        if want and hashlib.sha256(content).hexdigest() != want:
            raise DataError(f"{path}: SHA-256 of the contents does not match the official MNIST "
                            "file (damaged or altered); delete it and run again to re-download")
        out.append(parse_idx(content, path, magic))
    images, labels = out
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected uint8 images [N, rows, cols], got "
                        f"{images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{labels_path}: expected uint8 labels [N], got {labels.dtype} "
                        f"{list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: {images.shape[0]} images but {labels_path} has "
                        f"{labels.shape[0]} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images[:, None, :, :], labels.astype(np.int32)


# --------------------------------------------------------------------------------------------
# get

def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate(root: str, name: str) -> str | None:
    """The path of ``name`` (``*.gz``) in ``root``, or of its unzipped form; None when absent."""
    for cand in (os.path.join(root, name), os.path.join(root, name[:-3])):
        if os.path.isfile(cand):
            return cand
    return None


def verify_file(path: str, name: str) -> None:
    """Checks ``path`` against the known checksums of MNIST file ``name``; raises ``DataError``."""
    known = FILES[name]
    try:
        if _sha256_file(path) == known.gz_sha256:
            return
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    content = _file_bytes(path)
    if len(content) == known.size and hashlib.sha256(content).hexdigest() == known.sha256:
        return
    raise DataError(f"{path}: SHA-256 does not match the official {name} (damaged or altered; "
                    f"{len(content)} bytes decompressed, expected {known.size}); delete it and "
                    "run again to re-download")


def _download(url: str, dest: str, name: str, timeout: float) -> None:
    # Network errors pass through unchanged (error=None): get() reports each mirror's reason.
    with atomic_file(dest, error=None) as tmp:
        req = urllib.request.Request(url, headers={"User-Agent": "jcaffe-prepare-mnist"})
        with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                block = r.read(1 << 20)
                if not block:
                    break
                f.write(block)
        verify_file(tmp, name)


def get(root: str, *, download: bool = True, mirrors: Sequence[str] = MIRRORS,
        timeout: float = 30.0, log: Log = print) -> dict[str, str]:
    """Ensures the four MNIST files are in ``root``, verified; returns {name: path}."""
    root = os.path.abspath(root)
    paths: dict[str, str] = {}
    missing = []
    for name in FILES:
        path = locate(root, name)
        if path is None:
            missing.append(name)
            continue
        verify_file(path, name)
        log(f"MNIST: {os.path.basename(path)} verified")
        paths[name] = path
    if missing and not download:
        raise DataError(f"{root}: MNIST files missing: {', '.join(missing)}")
    failures = []
    for name in missing:
        os.makedirs(root, exist_ok=True)
        dest = os.path.join(root, name)
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log(f"MNIST: downloading {url}")
            try:
                _download(url, dest, name, timeout)
            except (urllib.error.URLError, OSError, ValueError, DataError) as e:
                reason = getattr(e, "reason", None) or e
                failures.append(f"{url} ({reason})")
                continue
            log(f"MNIST: {name} downloaded and verified")
            paths[name] = dest
            break
    still = [n for n in missing if n not in paths]
    if still:
        raise DataError(f"{root}: cannot get MNIST file(s) {', '.join(still)}; tried "
                        f"{'; '.join(failures)}. Offline? Copy the official files into {root}")
    return paths


# --------------------------------------------------------------------------------------------
# create

def output_name(split: str, fmt: str) -> str:
    """``mnist_train`` (jcaffe dataset), ``mnist_train_lmdb``, ``mnist_train_leveldb``."""
    return f"mnist_{split}" if fmt == "tensorstore" else f"mnist_{split}_{fmt}"


def source_description(split: str, limit: int | None = None) -> str:
    images, labels, _ = SPLITS[split]
    desc = (f"MNIST {split}: {images} (contents sha256 {FILES[images].sha256}), "
            f"{labels} (contents sha256 {FILES[labels].sha256})")
    return desc + (f"; first {limit} records" if limit is not None else "")


def _up_to_date(path: str, fmt: str, split: str, count: int, limit: int | None) -> bool:
    from jcaffe.data.dataset import has_chunk_checksums, read_metadata
    from jcaffe.data.datum import datum_to_array
    from jcaffe.data.sources import db_bounds, detect_kind

    if detect_kind(path) != fmt:
        return False
    try:
        if fmt == "tensorstore":
            meta = read_metadata(path)
            return (meta["source"] == source_description(split, limit) and meta["count"] == count
                    and meta["shape"] == [1, 28, 28] and meta["dtype"] == "uint8"
                    and os.path.isdir(os.path.join(path, "data"))
                    and os.path.isdir(os.path.join(path, "label"))
                    and has_chunk_checksums(path))
        # Written atomically with keys 00000000 .. count-1: the bounds tell completeness.
        first_key, last_key, first_value = db_bounds(path)
        arr, _ = datum_to_array(first_value, path)
        return (first_key == b"%08d" % 0 and last_key == b"%08d" % (count - 1)
                and arr.shape == (1, 28, 28) and arr.dtype == np.uint8)
    except DataError:
        return False


def _write(path: str, fmt: str, images: np.ndarray, labels: np.ndarray, source: str) -> None:
    from jcaffe.data.dataset import write_dataset
    from jcaffe.data.datum import array_to_datum
    from jcaffe.data.sources import write_leveldb, write_lmdb
    from jcaffe.tools.progress import batch_size, chunks, progress_iter

    n = images.shape[0]
    desc = os.path.basename(path)
    if fmt == "tensorstore":
        write_dataset(path, progress_iter(chunks(images, labels), n, desc, "img", batch_size),
                      source=source, overwrite=True)
        return
    datums = (array_to_datum(images[i], labels[i]) for i in range(n))
    (write_lmdb if fmt == "lmdb" else write_leveldb)(
        path, progress_iter(datums, n, desc, "img"), overwrite=True)


def create(root: str, *, out_dir: str | None = None, formats: Sequence[str] = ("tensorstore",),
           limit: int | None = None, force: bool = False, log: Log = print) -> dict[str, str]:
    """Writes the MNIST datasets from the IDX files in ``root`` into ``out_dir`` (default
    ``root``); returns {output name: path}. ``limit`` keeps the first records of each split."""
    root = os.path.abspath(root)
    out_dir = os.path.abspath(out_dir or root)
    for fmt in formats:
        if fmt not in FORMATS:
            raise DataError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    result: dict[str, str] = {}
    for split, (img_name, lab_name, full) in SPLITS.items():
        count = full if limit is None else min(limit, full)
        todo = []
        for fmt in dict.fromkeys(formats):
            path = os.path.join(out_dir, output_name(split, fmt))
            result[output_name(split, fmt)] = path
            if not force and _up_to_date(path, fmt, split, count, limit):
                log(f"MNIST: {path} is up to date")
            else:
                todo.append((fmt, path))
        if not todo:
            continue
        img_path, lab_path = locate(root, img_name), locate(root, lab_name)
        absent = [n for n, p in ((img_name, img_path), (lab_name, lab_path)) if p is None]
        if absent:
            raise DataError(f"{root}: MNIST files missing: {', '.join(absent)} (get them first: "
                            "python datasets/mnist/prepare_mnist.py --get-only)")
        images, labels = read_split(img_path, lab_path, limit=limit,
                                    expect=(FILES[img_name].sha256, FILES[lab_name].sha256))
        for fmt, path in todo:
            t0 = time.perf_counter()
            log(f"MNIST: writing {path} ({images.shape[0]} records, {fmt})")
            _write(path, fmt, images, labels, source_description(split, limit))
            log(f"MNIST: {os.path.basename(path)} done in {time.perf_counter() - t0:.1f} s")
    return result


# --------------------------------------------------------------------------------------------
# command line

def main(argv: Sequence[str] | None = None, *, default_root: str | None = None) -> int:
    """``prepare_mnist.py [--get-only | --create-only] [--root DIR] [--format F ...]``."""
    p = argparse.ArgumentParser(
        prog="prepare_mnist.py",
        description="Get the MNIST IDX files (verified by SHA-256; downloaded when absent) and "
                    "convert them to jcaffe datasets mnist_train / mnist_test.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--get-only", action="store_true", help="only get and verify the files")
    mode.add_argument("--create-only", action="store_true",
                      help="only convert (the files must be present)")
    p.add_argument("--root", default=default_root,
                   help="folder of the IDX files and the datasets (default: %(default)s)")
    p.add_argument("--format", action="append", choices=FORMATS, default=[],
                   help="also write Caffe's formats (mnist_train_lmdb, ...); repeatable; the "
                        "jcaffe dataset is always written")
    p.add_argument("--force", action="store_true", help="rewrite datasets that are up to date")
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.root is None:
        p.error("--root is required")
    formats = ["tensorstore"] + [f for f in args.format if f != "tensorstore"]
    t0 = time.perf_counter()
    try:
        if not args.create_only:
            get(args.root)
        if not args.get_only:
            create(args.root, formats=formats, limit=args.limit, force=args.force)
    except JcaffeError as e:
        print(f"prepare_mnist: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_mnist: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    print(f"MNIST: ready in {time.perf_counter() - t0:.1f} s")
    return 0


__all__ = ["FILES", "SPLITS", "MIRRORS", "parse_idx", "read_idx", "read_split", "locate",
           "verify_file", "get", "create", "output_name", "source_description", "main"]
