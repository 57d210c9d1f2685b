"""jcaffe's dataset format and the record sources (jcaffe datasets, Caffe LMDB / LevelDB)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import lmdb
import numpy as np
import plyvel
import pytest
from PIL import Image

from jcaffe.data import image as jimage
from jcaffe.data.dataset import read_dataset, read_metadata, verify_dataset, write_dataset
from jcaffe.data.sources import (detect_kind, open_source, prepare_command, write_leveldb,
                                 write_lmdb)
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2


def _records(n=37, shape=(3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(-3, 1000, n).astype(np.int32))


def _raw_datum(arr, label):
    c, h, w = arr.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=arr.tobytes(), label=int(label))


def _png(hwc_rgb, mode=None):
    buf = io.BytesIO()
    Image.fromarray(hwc_rgb, mode).save(buf, format="PNG")
    return buf.getvalue()


def _leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n or ".old" in n]


# ------------------------------------------------------------------------------------------
# jcaffe dataset format

def test_dataset_roundtrip_exact_records_and_metadata(tmp_path):
    x, y = _records()
    path = tmp_path / "ds"
    meta = write_dataset(path, x, y, source="unit test", chunk_records=8)
    on_disk = json.loads((path / "jcaffe_dataset.json").read_text())
    assert on_disk == meta
    assert (meta["count"], meta["shape"], meta["dtype"]) == (37, [3, 4, 5], "uint8")
    assert meta["source"] == "unit test" and meta["chunk_records"] == 8
    assert meta["checksum"]["data"] == hashlib.sha256(x.tobytes()).hexdigest()
    assert meta["checksum"]["label"] == hashlib.sha256(y.astype("<i4").tobytes()).hexdigest()
    with open_source(str(path)) as src:
        assert (src.kind, src.count, src.datum_shape, src.dtype) == ("tensorstore", 37, (3, 4, 5),
                                                                     np.uint8)
        for start, n in [(0, 37), (5, 11), (7, 9), (36, 1), (3, 0)]:  # across chunk edges
            d, lab = src.read(start, n)
            assert d.dtype == np.uint8 and lab.dtype == np.int32
            np.testing.assert_array_equal(d, x[start:start + n])
            np.testing.assert_array_equal(lab, y[start:start + n])
        with pytest.raises(IndexError):
            src.read(30, 8)  # no wrap-around
    verify_dataset(path)
    assert _leftovers(tmp_path) == []


def test_dataset_from_uneven_batches_float32(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((k, 2, 3, 3)).astype(np.float32) for k in (5, 1, 13, 0, 4)]
    labels = [np.arange(len(p)) + 100 * i for i, p in enumerate(parts)]
    write_dataset(tmp_path / "f", iter(list(zip(parts, labels))), chunk_records=4)
    src = read_dataset(tmp_path / "f")
    d, lab = src.read_all()
    assert src.dtype == np.float32 and d.dtype == np.float32
    np.testing.assert_array_equal(d, np.concatenate(parts))
    np.testing.assert_array_equal(lab, np.concatenate(labels))
    src.close()


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((4, 3, 2), np.uint8), np.zeros(4, int), "expected [n, C, H, W]"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(3, int), "do not match"),
    (np.zeros((4, 1, 2, 2), np.int64), np.zeros(4, int), "dtype int64"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, np.float32), "expected integers"),
    (np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 2, 2**31]), "int32 range"),
    (np.zeros((0, 1, 2, 2), np.uint8), np.zeros(0, int), "no records"),
    (np.zeros((2, 0, 2, 2), np.uint8), np.zeros(2, int), "must be positive"),
])
def test_dataset_bad_input(tmp_path, data, labels, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        write_dataset(tmp_path / "bad", data, labels)
    assert str(tmp_path / "bad") in str(e.value)
    assert os.listdir(tmp_path) == []


def test_dataset_batches_that_change_shape_or_dtype(tmp_path):
    a = np.zeros((2, 1, 2, 2), np.uint8)
    with pytest.raises(DataError, match="records from 2: records have shape"):
        write_dataset(tmp_path / "s", [(a, [0, 1]), (np.zeros((1, 1, 3, 2), np.uint8), [2])])
    with pytest.raises(DataError, match="records from 2: data is float32"):
        write_dataset(tmp_path / "s", [(a, [0, 1]), (np.zeros((1, 1, 2, 2), np.float32), [2])])
    with pytest.raises(DataError, match="batch 0 is not a"):
        write_dataset(tmp_path / "s", [(a,)])
    assert os.listdir(tmp_path) == []


def test_dataset_existing_path_and_failed_overwrite_keep_the_old_one(tmp_path):
    x, y = _records(10)
    path = tmp_path / "ds"
    write_dataset(path, x, y, source="first")
    with pytest.raises(DataError, match="already exists"):
        write_dataset(path, x[:3], y[:3])

    def failing():
        yield x[:4], y[:4]
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        write_dataset(path, failing(), overwrite=True, source="second")
    assert _leftovers(tmp_path) == []
    assert read_metadata(path)["source"] == "first"
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read_all()[0], x)
    # a complete overwrite replaces it
    write_dataset(path, x[:3] + 1, y[:3], overwrite=True, source="second")
    with open_source(path) as src:
        assert src.count == 3
        np.testing.assert_array_equal(src.read_all()[0], x[:3] + 1)
    assert _leftovers(tmp_path) == []
    # an unrelated folder is never replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(DataError, match="not a dataset"):
        write_dataset(tmp_path / "notes", x, y, overwrite=True)
    assert (tmp_path / "notes" / "a.txt").read_text() == "keep"


def test_dataset_checksum_detects_changed_records(tmp_path):
    import tensorstore as ts

    x, y = _records(20)
    write_dataset(tmp_path / "ds", x, y)
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                  "path": str(tmp_path / "ds" / "data")}}).result()
    arr[7, 0, 0, 0].write(np.uint8(x[7, 0, 0, 0] ^ 1)).result()
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_dataset(tmp_path / "ds")


def test_dataset_damaged_metadata_or_arrays(tmp_path):
    x, y = _records(6)
    path = tmp_path / "ds"
    write_dataset(path, x, y)
    meta_file = path / "jcaffe_dataset.json"
    good = meta_file.read_text()
    meta_file.write_text("{not json")
    with pytest.raises(DataError, match="jcaffe_dataset.json: not valid JSON"):
        open_source(path)
    meta_file.write_text(good.replace('"version": 1', '"version": 99'))
    with pytest.raises(DataError, match="version 99 is newer"):
        open_source(path)
    meta_file.write_text(good.replace('"count": 6', '"count": 7'))
    with pytest.raises(DataError, match="metadata says"):
        open_source(path)
    meta_file.write_text(good)
    os.rename(path / "label", path / "label_gone")
    with pytest.raises(DataError, match="missing or damaged"):
        open_source(path)


# ------------------------------------------------------------------------------------------
# Caffe LMDB / LevelDB

def _lmdb_by_hand(path, items):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, datum in items:
            txn.put(key.encode(), datum.SerializeToString())
    env.close()


def _leveldb_by_hand(path, items):
    db = plyvel.DB(str(path), create_if_missing=True)
    for key, datum in items:
        db.put(key.encode(), datum.SerializeToString())
    db.close()


@pytest.mark.parametrize("by_hand", [_lmdb_by_hand, _leveldb_by_hand])
def test_caffe_db_raw_bytes_in_key_order(tmp_path, by_hand):
    x, y = _records(12, (1, 3, 2))
    keys = [f"{i:08d}" for i in range(12)]
    order = np.random.default_rng(3).permutation(12)  # inserted shuffled; read in key order
    by_hand(tmp_path / "db", [(keys[i], _raw_datum(x[i], y[i])) for i in order])
    with open_source(str(tmp_path / "db")) as src:
        assert src.kind == ("lmdb" if by_hand is _lmdb_by_hand else "leveldb")
        assert (src.count, src.datum_shape, src.dtype) == (12, (1, 3, 2), np.uint8)
        d, lab = src.read(4, 5)
        np.testing.assert_array_equal(d, x[4:9])
        np.testing.assert_array_equal(lab, y[4:9])
        d, lab = src.read_all()
        np.testing.assert_array_equal(d, x)
        np.testing.assert_array_equal(lab, y)


@pytest.mark.parametrize("by_hand", [_lmdb_by_hand, _leveldb_by_hand])
def test_two_readers_of_one_db_in_one_process(tmp_path, by_hand):
    """A train and a test net on one database (LMDB and LevelDB each allow one open handle per
    process): both read, and the one left open still reads after the other closes."""
    x, y = _records(6, (1, 2, 2))
    by_hand(tmp_path / "db", [(f"{i:08d}", _raw_datum(x[i], y[i])) for i in range(6)])
    first = open_source(str(tmp_path / "db"))
    with open_source(str(tmp_path / "db")) as second:
        np.testing.assert_array_equal(first.read(0, 3)[0], x[:3])
        np.testing.assert_array_equal(second.read(3, 3)[0], x[3:])
    np.testing.assert_array_equal(first.read(1, 4)[1], y[1:5])
    first.close()


@pytest.mark.parametrize("writer", [write_lmdb, write_leveldb])
def test_caffe_db_float_data_via_writers(tmp_path, writer):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 2, 2, 3)).astype(np.float32)
    datums = []
    for i in range(5):
        d = caffe_pb2.Datum(channels=2, height=2, width=3, label=i * 10)
        d.float_data.extend(x[i].ravel().tolist())
        datums.append(d)
    assert writer(tmp_path / "db", datums) == 5
    assert _leftovers(tmp_path) == []
    with open_source(tmp_path / "db") as src:
        assert src.dtype == np.float32
        d, lab = src.read_all()
        np.testing.assert_array_equal(d, x)
        np.testing.assert_array_equal(lab, [0, 10, 20, 30, 40])
    if writer is write_lmdb:  # Caffe's key format
        env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
        with env.begin() as txn:
            assert [k for k, _ in txn.cursor()] == [b"%08d" % i for i in range(5)]
        env.close()
    with pytest.raises(DataError, match="already exists"):
        writer(tmp_path / "db", datums)
    with pytest.raises(DataError, match="appears twice"):
        writer(tmp_path / "dup", [("a", datums[0]), ("a", datums[1])])
    assert not (tmp_path / "dup").exists() and _leftovers(tmp_path) == []


def test_encoded_png_colour_is_bgr_grey_is_native(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 7     # R, G, B
    rgb[1, 2] = (1, 2, 3)
    grey = np.array([[0, 50, 100], [150, 200, 250]], np.uint8)
    rgba = np.dstack([rgb, np.full((2, 3), 9, np.uint8)])
    items = [
        ("00000000", caffe_pb2.Datum(encoded=True, data=_png(rgb), label=1)),
        ("00000001", caffe_pb2.Datum(encoded=True, data=_png(grey), label=2)),
        ("00000002", caffe_pb2.Datum(encoded=True, data=_png(grey), label=3, channels=3)),
        ("00000003", caffe_pb2.Datum(encoded=True, data=_png(rgba), label=4)),
    ]
    _lmdb_by_hand(tmp_path / "db", items)
    with open_source(tmp_path / "db") as src:
        assert (src.count, src.datum_shape, src.dtype) == (4, (3, 2, 3), np.uint8)
        d, lab = src.read(0, 1)
        np.testing.assert_array_equal(d[0], rgb[..., ::-1].transpose(2, 0, 1))  # B, G, R planes
        assert d[0, 0, 1, 2] == 3 and d[0, 2, 1, 2] == 1
        assert lab.tolist() == [1]
        d, _ = src.read(2, 1)  # channels: 3 decodes the grey PNG as colour (replicated)
        np.testing.assert_array_equal(d[0], np.stack([grey] * 3))
        with pytest.raises(DataError, match=r"record 1 \(key '00000001'\): shape \(1, 2, 3\) "
                                            r"differs from record 0's \(3, 2, 3\)"):
            src.read(0, 2)
    # native decoding: grey stays 1 channel, RGBA becomes BGRA
    assert jimage.decode_image(_png(grey), None).shape == (2, 3, 1)
    np.testing.assert_array_equal(jimage.decode_image(_png(rgba), None)[1, 2], [3, 2, 1, 9])
    with open_source(tmp_path / "db", force_color=True) as src:
        d, _ = src.read_all()
        np.testing.assert_array_equal(d[1], np.stack([grey] * 3))
        np.testing.assert_array_equal(d[3], rgb[..., ::-1].transpose(2, 0, 1))


def test_shape_mismatch_names_record_index_and_key(tmp_path):
    x, y = _records(6, (1, 2, 2))
    items = [(f"{i:08d}_img{i}.png", _raw_datum(x[i], y[i])) for i in range(6)]
    items[4] = (items[4][0], _raw_datum(np.zeros((1, 2, 3), np.uint8), 0))
    write_leveldb(tmp_path / "db", items)
    with open_source(tmp_path / "db") as src:
        np.testing.assert_array_equal(src.read(0, 4)[0], x[:4])
        with pytest.raises(DataError, match=r"db: record 4 \(key '00000004_img4.png'\): shape"):
            src.read(2, 3)


@pytest.mark.parametrize("datum, message", [
    (caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc"), "data has 3 bytes, but 1x2x2"),
    (caffe_pb2.Datum(channels=1, height=2, width=2), "neither data nor float_data"),
    (caffe_pb2.Datum(channels=0, height=2, width=2, data=b""), "must be positive"),
    (caffe_pb2.Datum(channels=1, height=1, width=2, float_data=[1.0]), "float_data has 1 values"),
    (caffe_pb2.Datum(encoded=True, data=b"not an image"), "cannot decode image"),
])
def test_bad_datum_names_record(tmp_path, datum, message):
    good = _raw_datum(np.zeros((1, 2, 2), np.uint8), 0)
    write_lmdb(tmp_path / "db", [("a", good), ("b", datum)])
    with open_source(tmp_path / "db") as src:
        with pytest.raises(DataError, match=r"record 1 \(key 'b'\): .*" + message):
            src.read_all()
    write_lmdb(tmp_path / "first", [("k", datum)])
    with pytest.raises(DataError, match=r"record 0 \(key 'k'\)"):
        open_source(tmp_path / "first")


def test_value_that_is_not_a_datum(tmp_path):
    write_lmdb(tmp_path / "db", [("x", b"\xff\xff\xff")])
    with pytest.raises(DataError, match=r"record 0 \(key 'x'\): not a Caffe Datum"):
        open_source(tmp_path / "db")


def test_corrupt_lmdb_and_empty_dbs(tmp_path):
    bad = tmp_path / "bad_lmdb"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(os.urandom(3) + b"garbage" * 2000)
    with pytest.raises(DataError, match=f"{bad}: cannot read LMDB"):
        open_source(bad)
    _lmdb_by_hand(tmp_path / "empty", [])
    with pytest.raises(DataError, match="LMDB holds no records"):
        open_source(tmp_path / "empty")


def test_lmdb_single_file_is_detected(tmp_path):
    x, y = _records(3, (1, 1, 2))
    env = lmdb.open(str(tmp_path / "one.mdb"), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(3):
            txn.put(b"%08d" % i, _raw_datum(x[i], y[i]).SerializeToString())
    env.close()
    assert detect_kind(str(tmp_path / "one.mdb")) == "lmdb"
    with open_source(str(tmp_path / "one.mdb")) as src:
        np.testing.assert_array_equal(src.read_all()[0], x)


def test_locked_leveldb(tmp_path):
    _leveldb_by_hand(tmp_path / "db", [("0", _raw_datum(np.zeros((1, 1, 1), np.uint8), 0))])
    holder = plyvel.DB(str(tmp_path / "db"))
    try:
        with pytest.raises(DataError, match="LevelDB is locked by another process"):
            open_source(tmp_path / "db")
    finally:
        holder.close()
    # two sources of one process share the database
    a, b = open_source(tmp_path / "db"), open_source(tmp_path / "db")
    a.close()
    assert b.read_all()[1].tolist() == [0]
    b.close()
    with pytest.raises(ValueError, match="closed"):
        b.read(0, 1)


def test_corrupt_leveldb(tmp_path):
    _leveldb_by_hand(tmp_path / "db", [("0", _raw_datum(np.zeros((1, 1, 1), np.uint8), 0))])
    (tmp_path / "db" / "CURRENT").write_text("MANIFEST-999999\n")
    with pytest.raises(DataError, match=f"{tmp_path / 'db'}: cannot read LevelDB"):
        open_source(tmp_path / "db")


def test_missing_and_unknown_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        open_source("datasets/mnist/mnist_train_nonexistent_for_test")
    assert "datasets/mnist/mnist_train_nonexistent_for_test: dataset not found" in str(e.value)
    assert "python datasets/mnist/prepare_mnist.py" in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="create it with: python datasets/mnist/prepare_mnist.py "
                                        "--format lmdb"):
        open_source("datasets/mnist/mnist_train_lmdb")
    with pytest.raises(DataError, match=r"prepare_cifar10.py --from DIR"):
        open_source(str(tmp_path / "datasets" / "cifar10" / "cifar10_train"))
    with pytest.raises(DataError) as e:
        open_source(str(tmp_path / "elsewhere"))
    assert str(e.value) == f"{tmp_path / 'elsewhere'}: dataset not found"
    assert prepare_command("somewhere/else") is None
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: not a dataset: .*backend LMDB"):
        open_source(str(tmp_path / "folder"), caffe_pb2.DataParameter.LMDB)


# ------------------------------------------------------------------------------------------
# OpenCV conventions of the image helpers

def test_resize_follows_opencv_linear():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    np.testing.assert_array_equal(jimage.resize_linear(img, 4, 4), img)
    # exact halving: OpenCV takes the area path, the rounded mean of 2x2 blocks
    half = jimage.resize_linear(img, 2, 2)[..., 0]
    blocks = img[..., 0].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)
    np.testing.assert_array_equal(half, np.floor(blocks.mean(-1) + 0.5).astype(np.uint8))
    # doubling [0, 100]: half-pixel centres give 0, 25, 75, 100 (clamped at the borders)
    row = np.array([[[0], [100]]], np.uint8)
    np.testing.assert_array_equal(jimage.resize_linear(row, 1, 4)[0, :, 0], [0, 25, 75, 100])


def test_grey_conversion_of_colour_png():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)
    grey = jimage.decode_image(_png(rgb), False)[0, :, 0]
    # libpng rgb_to_gray with weights 0.299 / 0.587 (1/32768 units), truncated
    assert grey.tolist() == [(9797 * 255) >> 15, (19234 * 255) >> 15, (3737 * 255) >> 15, 90]


def test_unsupported_image_modes_raise(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint16) + 300).save(buf, format="PNG")
    with pytest.raises(DataError, match="only 8-bit"):
        jimage.decode_image(buf.getvalue(), True, where="x.png")
    with pytest.raises(DataError, match="x.png: cannot decode image"):
        jimage.decode_image(b"\x89PNG\r\n\x1a\n broken", True, where="x.png")
