"""Damaged datasets are detected when read: chunk checksums, ``verify_dataset``, old-format
datasets, and the one-line errors the command line gives for them."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jcaffe import cli
from jcaffe.data.dataset import (has_chunk_checksums, read_dataset, verify_dataset,
                                 write_dataset)
from jcaffe.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """
name: "probe"
layer { name: "data" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.00390625 } data_param { source: "%(db)s" batch_size: 8 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "%(net)s"
base_lr: 0.01
lr_policy: "fixed"
display: 1
max_iter: 6
solver_mode: CPU
snapshot_after_train: false
"""


def _records(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 1, 6, 6), dtype=np.uint8),
            rng.integers(0, 3, n).astype(np.int32))


def _flip_middle_byte(path: str) -> None:
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(raw)


def _chunk_file(db, array: str, index: int) -> str:
    # zarr v3's default chunk key encoding: <array>/c/<i>/<j>/...; records are chunked along N only.
    base = os.path.join(str(db), array, "c", str(index))
    files = [base] if os.path.isfile(base) else [
        f for f in glob.glob(os.path.join(base, "**"), recursive=True) if os.path.isfile(f)]
    assert len(files) == 1, files
    return files[0]


@pytest.fixture
def damaged(tmp_path):
    """A 40-record dataset (chunks of 8) whose data chunk 2 (records 16..23) has one byte flipped."""
    x, y = _records()
    db = tmp_path / "db"
    write_dataset(db, x, y, chunk_records=8)
    assert has_chunk_checksums(db)
    _flip_middle_byte(_chunk_file(db, "data", 2))
    return db, x, y


def test_flipped_byte_is_a_data_error_naming_dataset_array_records(damaged):
    db, x, y = damaged
    with read_dataset(db) as src:
        d, lab = src.read(0, 16)  # chunks 0 and 1 are intact
        np.testing.assert_array_equal(d, x[:16])
        np.testing.assert_array_equal(lab, y[:16])
        for start, n in [(16, 8), (10, 20), (20, 1), (0, 40)]:
            with pytest.raises(DataError) as e:
                src.read(start, n)
            msg = str(e.value)
            assert str(db) in msg and "array 'data'" in msg and "records [16, 24)" in msg, msg
            assert "\n" not in msg
        d, _ = src.read(24, 16)  # the reader keeps working past the damage
        np.testing.assert_array_equal(d, x[24:])


def test_flipped_byte_in_labels(tmp_path):
    x, y = _records()
    db = tmp_path / "db"
    write_dataset(db, x, y, chunk_records=8)
    _flip_middle_byte(_chunk_file(db, "label", 0))  # labels are one chunk of up to 65536
    with read_dataset(db) as src, pytest.raises(DataError, match=r"array 'label', records \[0, 40\)"):
        src.read(3, 2)


def test_verify_dataset_intact_and_damaged(damaged, tmp_path, capsys):
    db, x, y = damaged
    good = tmp_path / "good"
    meta = write_dataset(good, x, y, chunk_records=8)
    assert meta["checksum"]["data"] == hashlib.sha256(x.tobytes()).hexdigest()
    assert verify_dataset(good)["count"] == 40
    with pytest.raises(DataError, match="records \\[16, 24\\)"):
        verify_dataset(db)
    assert cli.main(["verify_dataset", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.startswith(f"{good}: OK: 40 records") and not err.strip()
    assert cli.main(["verify_dataset", str(db)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert not out and len(lines) == 1 and lines[0].startswith(f"jcaffe: error: {db}: ")


def _legacy_dataset(path, x, y, chunk=8):
    """A dataset as jcaffe wrote them before chunk checksums (bytes + zstd codecs only), built
    with tensorstore directly, with its metadata file and SHA-256s computed here."""
    import tensorstore as ts

    os.makedirs(path)
    for name, arr, chunks, dtype in (("data", x, [chunk, *x.shape[1:]], "uint8"),
                                     ("label", y, [65536], "int32")):
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                         "path": os.path.join(path, name)},
                         "metadata": {"shape": list(arr.shape), "data_type": dtype,
                                      "chunk_grid": {"name": "regular",
                                                     "configuration": {"chunk_shape": chunks}},
                                      "codecs": [{"name": "bytes",
                                                  "configuration": {"endian": "little"}},
                                                 {"name": "zstd",
                                                  "configuration": {"level": 3}}],
                                      "fill_value": 0},
                         "create": True}).result()
        store.write(arr).result()
    meta = {"format": "jcaffe-dataset", "version": 1, "count": int(x.shape[0]),
            "shape": list(x.shape[1:]), "dtype": "uint8", "label_dtype": "int32",
            "chunk_records": chunk, "zarr_format": 3, "source": "legacy",
            "checksum": {"algorithm": "sha256", "data": hashlib.sha256(x.tobytes()).hexdigest(),
                         "label": hashlib.sha256(y.astype("<i4").tobytes()).hexdigest()},
            "created_by": "jcaffe 0.1.0"}
    with open(os.path.join(path, "jcaffe_dataset.json"), "w") as f:
        json.dump(meta, f)


def test_old_format_dataset_opens_with_a_warning(tmp_path):
    x, y = _records()
    db = str(tmp_path / "old")
    _legacy_dataset(db, x, y)
    assert not has_chunk_checksums(db)
    with pytest.warns(UserWarning, match="without chunk checksums") as rec:
        src = read_dataset(db)
    assert len(rec) == 1 and db in str(rec[0].message)
    with src:
        d, lab = src.read_all()
    np.testing.assert_array_equal(d, x)
    np.testing.assert_array_equal(lab, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_dataset(db)
    # Damage goes unnoticed by reads of an old dataset (the reason for the warning), but not by
    # verify_dataset.
    _flip_middle_byte(_chunk_file(db, "data", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError):
            verify_dataset(db)
    # Rewriting (what prepare_mnist does for an old dataset) adds the checksums.
    write_dataset(db, x, y, overwrite=True)
    assert has_chunk_checksums(db)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_dataset(db).close()


def _cli(args, cwd, env=None):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=240)


def _only_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("jcaffe: ")]
    assert len(errors) == 1, proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("on_device", ["1", "0"])
def test_damaged_dataset_through_train_cli(damaged, tmp_path, on_device):
    db, _, _ = damaged
    (tmp_path / "net.prototxt").write_text(NET % {"db": db})
    (tmp_path / "solver.prototxt").write_text(SOLVER % {"net": tmp_path / "net.prototxt"})
    proc = _cli(["jcaffe.train", str(tmp_path / "solver.prototxt"), "--cpu"], REPO,
                {"JCAFFE_DATA_ON_DEVICE": on_device})
    line = _only_error_line(proc)
    assert line.startswith("jcaffe: error: ") and str(db) in line, line
    assert "array 'data'" in line and "records [16, 24)" in line, line
    if on_device == "0":  # the prefetcher read batches 0 and 1 (records 0..15) first
        assert "Iteration 0" in proc.stderr


def test_damaged_dataset_through_test_cli(damaged, tmp_path):
    db, _, _ = damaged
    (tmp_path / "net.prototxt").write_text(NET % {"db": db})
    proc = _cli(["jcaffe", "test", "--model", str(tmp_path / "net.prototxt"), "--iterations", "4",
                 "--cpu"], REPO)
    line = _only_error_line(proc)
    assert str(db) in line and "array 'data'" in line and "records [16, 24)" in line, line


def test_old_format_dataset_through_test_cli_warns_once(tmp_path):
    x, y = _records()
    db = str(tmp_path / "old")
    _legacy_dataset(db, x, y)
    (tmp_path / "net.prototxt").write_text(NET % {"db": db})
    proc = _cli(["jcaffe", "test", "--model", str(tmp_path / "net.prototxt"), "--iterations", "2",
                 "--cpu"], REPO)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if "without chunk checksums" in ln]
    assert len(warned) == 1 and db in warned[0] and warned[0].startswith("W"), proc.stderr


def test_prepare_paths_write_checksummed_datasets(tmp_path):
    """MNIST (and CIFAR-10) preparation write through write_dataset, so their chunks carry
    checksums; an old-format MNIST dataset is not 'up to date' and gets rewritten."""
    from jcaffe.data import mnist

    x = np.zeros((5, 1, 28, 28), np.uint8)
    y = np.arange(5, dtype=np.int32)
    path = str(tmp_path / "mnist_test")
    _legacy_dataset(path, x, y)
    meta = json.load(open(os.path.join(path, "jcaffe_dataset.json")))
    meta["source"] = mnist.source_description("test", 5)
    json.dump(meta, open(os.path.join(path, "jcaffe_dataset.json"), "w"))
    assert not mnist._up_to_date(path, "tensorstore", "test", 5, 5)
    mnist._write(path, "tensorstore", x, y, mnist.source_description("test", 5))
    assert has_chunk_checksums(path) and mnist._up_to_date(path, "tensorstore", "test", 5, 5)
