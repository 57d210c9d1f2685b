"""convert_imageset: a list of image files and labels -> a dataset, as Caffe's tool.

    python -m jcaffe.tools.convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE lines are ``relative/path/to/image LABEL`` (split at the last space; the path may contain
spaces); blank lines are ignored. Images are read as OpenCV would (``jcaffe.data.image``): colour
as BGR, or grey with ``--gray``; ``--resize_height`` and ``--resize_width`` (both > 0) resize with
OpenCV's bilinear rule. Records are stored in list order (``--shuffle``: a seeded shuffle first);
LMDB / LevelDB keys are ``%08d_<path>`` with the line's position, as Caffe.

``--backend``: ``tensorstore`` (a jcaffe dataset, the default; all images must then have one
size), ``lmdb`` or ``leveldb`` (Caffe Datums). ``--encoded`` stores the image file's bytes
(re-encoded as ``--encode_type``, or when resizing or converting colour, or when the file's own
channels differ from the requested ones, so that Caffe and jcaffe decode the same pixels);
``--encode_type`` implies ``--encoded``. ``--check_size`` requires one size for all images.

Unlike Caffe, a line that does not parse, or an image that is missing or cannot be decoded, is an
error naming the list file and line (Caffe logs it and skips the image); nothing is written then.
DB_NAME must not exist (``--overwrite`` replaces an existing dataset once the new one is done).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from jcaffe.errors import DataError, JcaffeError
from jcaffe.tools._flags import normalize

BACKENDS = ("tensorstore", "lmdb", "leveldb")
_LABEL = re.compile(r"[+-]?\d+")
_BATCH = 256


@dataclass(frozen=True)
class Entry:
    filename: str
    label: int
    lineno: int


def read_list(list_file: str) -> list[Entry]:
    """Parses LISTFILE; raises ``DataError`` naming ``file:line`` for a line that does not parse."""
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"{list_file}: cannot read the list file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{list_file}: not UTF-8 text: {e}") from None
    entries = []
    for lineno, line in enumerate(lines, 1):
        text = line.rstrip()
        if not text:
            continue
        name, sep, label = text.rpartition(" ")
        if not sep or not name or not _LABEL.fullmatch(label):
            raise DataError(f"{list_file}:{lineno}: expected 'FILENAME LABEL', got {line!r}")
        value = int(label)
        if not -2**31 <= value < 2**31:
            raise DataError(f"{list_file}:{lineno}: label {value} does not fit in int32")
        entries.append(Entry(name, value, lineno))
    return entries


def _join(root: str, name: str) -> str:
    if not root:
        return name
    return root + name if root.endswith(("/", os.sep)) else root + "/" + name


def _guess_encoding(filename: str) -> str:
    base = os.path.basename(filename)
    if "." not in base:
        return ""
    return base.rsplit(".", 1)[1].lower()


def _same_encoding(filename: str, enc: str) -> bool:
    ext = _guess_encoding(filename)
    enc = enc.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg") or (enc == "jpeg" and ext == "jpg")


@dataclass(frozen=True)
class _Options:
    """How each image becomes a record (the flags after their checks)."""

    root_folder: str
    list_file: str
    backend: str
    is_color: bool
    resize_height: int
    resize_width: int
    encoded: bool
    encode_type: str
    check_size: bool

    @property
    def resize(self) -> bool:
        return self.resize_height > 0 and self.resize_width > 0


def convert_imageset(root_folder: str, list_file: str, db_name: str, *, gray: bool = False,
                     shuffle: bool = False, seed: int | None = None, resize_height: int = 0,
                     resize_width: int = 0, backend: str = "tensorstore", encoded: bool = False,
                     encode_type: str = "", check_size: bool = False, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> int:
    """Converts the images of ``list_file`` (under ``root_folder``) into ``db_name``; returns the
    number of records. See the module docstring."""
    from jcaffe.data.image import pil_format_for

    if backend not in BACKENDS:
        raise DataError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if encode_type and not encoded:
        log("encode_type specified, assuming encoded=true.")
        encoded = True
    if encode_type and pil_format_for(encode_type) is None:
        raise DataError(f"unknown --encode_type '{encode_type}'")
    if encoded and backend == "tensorstore":
        raise DataError("--encoded needs --backend lmdb or leveldb (a jcaffe dataset stores "
                        "decoded pixels)")
    opts = _Options(root_folder, list_file, backend, not gray, max(0, resize_height),
                    max(0, resize_width), encoded, encode_type, check_size)
    entries = read_list(list_file)
    if not entries:
        raise DataError(f"{list_file}: the list holds no images")
    if shuffle:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**32))
        log(f"Shuffling data (seed {seed})")
        order = np.random.default_rng(seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    log(f"A total of {len(entries)} images.")
    flags = [f for f, on in (("gray", gray), ("resize", opts.resize)) if on]
    source = (f"convert_imageset {list_file} (root {root_folder}"
              + (f", {', '.join(flags)}" if flags else "")
              + (f", shuffled with seed {seed}" if shuffle else "") + ")")
    return _write(db_name, entries, opts, source, overwrite, log)


def _write(db_name: str, entries, opts: _Options, source: str, overwrite: bool, log) -> int:
    """Writes the records of ``entries`` to ``db_name``, logging Caffe's progress lines."""
    from jcaffe.data.dataset import write_dataset
    from jcaffe.data.sources import write_leveldb, write_lmdb
    from jcaffe.tools.progress import progress_iter

    counter = [0]

    def items():
        # a bar on a terminal; the "Processed N files." lines stay as Caffe's
        for item in progress_iter(_records(entries, opts), len(entries),
                                  os.path.basename(db_name.rstrip("/")), "img"):
            counter[0] += 1
            if counter[0] % 1000 == 0:
                log(f"Processed {counter[0]} files.")
            yield item

    if opts.backend == "tensorstore":
        def batches():
            buf_x, buf_y = [], []
            for _, _, chw, label in items():
                buf_x.append(chw)
                buf_y.append(label)
                if len(buf_x) == _BATCH:
                    yield np.stack(buf_x), np.asarray(buf_y, np.int32)
                    buf_x, buf_y = [], []
            if buf_x:
                yield np.stack(buf_x), np.asarray(buf_y, np.int32)

        write_dataset(db_name, batches(), overwrite=overwrite, source=source)
    else:
        writer = write_lmdb if opts.backend == "lmdb" else write_leveldb
        writer(db_name, ((key, datum) for key, datum, _, _ in items()), overwrite=overwrite)
    if counter[0] % 1000:
        log(f"Processed {counter[0]} files.")
    return counter[0]


def _records(entries, opts: _Options) -> Iterator[tuple[str, object, np.ndarray | None, int]]:
    """(key, datum or None, chw array or None, label) per entry, in order."""
    from jcaffe.data.datum import array_to_datum, encoded_datum
    from jcaffe.data.image import (decode_image, encode_image, hwc_to_chw, native_channels,
                                   pil_format_for, resize_linear)

    first_shape = None
    for line_id, e in enumerate(entries):
        where = f"{opts.list_file}:{e.lineno}: image '{e.filename}'"
        path = _join(opts.root_folder, e.filename)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise DataError(f"{where}: cannot read '{path}': {err.strerror or err}") from None
        img = decode_image(raw, opts.is_color, where=where)
        if opts.resize:
            img = resize_linear(img, opts.resize_height, opts.resize_width)
        shape = (img.shape[2], img.shape[0], img.shape[1])
        if first_shape is None:
            first_shape = shape
        elif (opts.check_size or opts.backend == "tensorstore") and shape != first_shape:
            hint = "" if opts.backend != "tensorstore" or opts.resize else (
                "; a jcaffe dataset needs one size: give --resize_height/--resize_width")
            raise DataError(f"{where}: size {shape[0]}x{shape[1]}x{shape[2]} differs from "
                            f"the first image's {'x'.join(map(str, first_shape))}{hint}")
        key = f"{line_id:08d}_{e.filename}"
        if opts.encoded:
            enc = opts.encode_type or _guess_encoding(e.filename)
            if not enc or pil_format_for(enc) is None:
                raise DataError(f"{where}: cannot tell the encoding from the file name; give "
                                "--encode_type")
            wanted = 3 if opts.is_color else 1
            if (not opts.resize and _same_encoding(e.filename, enc)
                    and native_channels(raw, where=where) == wanted):
                data = raw
            else:
                data = encode_image(img, enc, where=where)
            yield key, encoded_datum(data, e.label, shape), None, e.label
        elif opts.backend == "tensorstore":
            yield key, None, hwc_to_chw(img), e.label
        else:
            yield key, array_to_datum(hwc_to_chw(img), e.label), None, e.label


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_imageset",
        description="Convert a set of images to a jcaffe dataset or a Caffe LMDB/LevelDB.")
    p.add_argument("root_folder", metavar="ROOTFOLDER/")
    p.add_argument("list_file", metavar="LISTFILE")
    p.add_argument("db_name", metavar="DB_NAME")
    p.add_argument("--gray", action=argparse.BooleanOptionalAction, default=False,
                   help="treat images as grayscale ones")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=False,
                   help="randomly shuffle the order of images and their labels")
    p.add_argument("--seed", type=int, default=None, help="seed of --shuffle (default: random, "
                   "printed)")
    p.add_argument("--backend", default="tensorstore", choices=BACKENDS,
                   help="storage of the result (default: %(default)s)")
    p.add_argument("--resize_width", type=int, default=0, help="width images are resized to")
    p.add_argument("--resize_height", type=int, default=0, help="height images are resized to")
    p.add_argument("--check_size", action=argparse.BooleanOptionalAction, default=False,
                   help="check that all the images have the same size")
    p.add_argument("--encoded", action=argparse.BooleanOptionalAction, default=False,
                   help="store the encoded image in the Datum")
    p.add_argument("--encode_type", default="",
                   help="what type to encode the image as ('png', 'jpg', ...)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing DB_NAME")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = normalize(argv, ("gray", "shuffle", "check_size", "encoded", "overwrite"),
                     ("seed", "backend", "resize_width", "resize_height", "encode_type"))
    args = _parser().parse_args(argv)
    try:
        n = convert_imageset(args.root_folder, args.list_file, args.db_name, gray=args.gray,
                             shuffle=args.shuffle, seed=args.seed,
                             resize_height=args.resize_height, resize_width=args.resize_width,
                             backend=args.backend, encoded=args.encoded,
                             encode_type=args.encode_type, check_size=args.check_size,
                             overwrite=args.overwrite)
    except JcaffeError as e:
        print(f"convert_imageset: error: {e}", file=sys.stderr)
        return 1
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
