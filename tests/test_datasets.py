"""Dataset preparation: MNIST (IDX), CIFAR-10 (binary batches), convert_imageset and
compute_image_mean."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from jcaffe.data import cifar10, mnist
from jcaffe.data.dataset import read_metadata
from jcaffe.data.sources import open_source, write_lmdb
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2
from jcaffe.tools import compute_image_mean as cim
from jcaffe.tools import convert_imageset as cis

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "datasets" / "mnist"


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n or ".old" in n)


def _idx(magic, dims, payload):
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + bytes(payload)


def _quiet(_msg):
    pass


# ------------------------------------------------------------------------------------------
# IDX parsing

def test_idx_parsing_of_hand_made_files(tmp_path):
    pixels = np.arange(2 * 3 * 2, dtype=np.uint8)
    (tmp_path / "img").write_bytes(_idx(0x803, [2, 3, 2], pixels.tobytes()))
    with gzip.open(tmp_path / "lab.gz", "wb") as f:
        f.write(_idx(0x801, [2], [7, 3]))
    images, labels = mnist.read_split(str(tmp_path / "img"), str(tmp_path / "lab.gz"))
    np.testing.assert_array_equal(images, pixels.reshape(2, 1, 3, 2))
    assert labels.dtype == np.int32 and labels.tolist() == [7, 3]


@pytest.mark.parametrize("content, message", [
    (_idx(0x801, [2, 3, 2], bytes(12)), r"wrong magic number 0x00000801; expected 0x00000803"),
    (_idx(0x803, [2, 3, 2], bytes(11)), r"truncated: dimensions 2x3x2 need 12 bytes of data, "
                                        r"the file has 11"),
    (_idx(0x803, [2, 3, 2], b"")[:10], r"truncated: header declares 3 dimensions"),
    (b"\x00\x00", r"truncated: 2 bytes, too short for an IDX header"),
    (_idx(0x803, [2, 3, 2], bytes(13)), r"1 unexpected bytes after the 2x3x2 data"),
    (b"\x1f\x8b\x08\x00garbage", r"corrupt gzip data"),
])
def test_idx_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}: {message}"):
        mnist.read_idx(str(path), mnist.IMAGE_MAGIC)


def test_idx_image_and_label_counts_must_agree(tmp_path):
    (tmp_path / "i").write_bytes(_idx(0x803, [3, 1, 1], bytes(3)))
    (tmp_path / "l").write_bytes(_idx(0x801, [2], bytes(2)))
    with pytest.raises(DataError, match="3 images but .* has 2 labels"):
        mnist.read_split(str(tmp_path / "i"), str(tmp_path / "l"))


# ------------------------------------------------------------------------------------------
# MNIST get

def test_mnist_get_verifies_the_shipped_files():
    paths = mnist.get(str(SHIPPED), download=False, log=_quiet)
    assert sorted(paths) == sorted(mnist.FILES)


def test_mnist_get_rejects_a_tampered_copy(tmp_path):
    for name in mnist.FILES:
        os.symlink(SHIPPED / name, tmp_path / name)
    name = "t10k-labels-idx1-ubyte.gz"
    os.unlink(tmp_path / name)
    raw = bytearray(gzip.decompress((SHIPPED / name).read_bytes()))
    raw[100] ^= 1  # one label changed, still a well-formed IDX file
    (tmp_path / name).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=f"{tmp_path / name}: SHA-256 does not match"):
        mnist.get(str(tmp_path), download=False, log=_quiet)
    # a faithful re-compression (other mirrors' bytes) is accepted by its contents
    (tmp_path / name).write_bytes(gzip.compress(gzip.decompress((SHIPPED / name).read_bytes()),
                                                mtime=0))
    mnist.get(str(tmp_path), download=False, log=_quiet)


def test_mnist_get_downloads_missing_files_or_says_what_it_tried(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    for other in mnist.FILES:
        if other != name:
            os.symlink(SHIPPED / other, tmp_path / other)
    with pytest.raises(DataError) as e:
        mnist.get(str(tmp_path), mirrors=["http://127.0.0.1:9/mnist/"], timeout=2, log=_quiet)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and f"http://127.0.0.1:9/mnist/{name}" in msg
    assert not (tmp_path / name).exists()
    bad_mirror = tmp_path / "bad_mirror"
    bad_mirror.mkdir()
    (bad_mirror / name).write_bytes(b"not the file")
    paths = mnist.get(str(tmp_path), mirrors=[bad_mirror.as_uri() + "/", SHIPPED.as_uri() + "/"],
                      log=_quiet)
    assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes()
    assert paths[name] == str(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted(list(mnist.FILES) + ["bad_mirror"])


# ------------------------------------------------------------------------------------------
# MNIST create (the real files, converted once per test session)

@pytest.fixture(scope="module")
def mnist_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    mnist.create(str(SHIPPED), out_dir=str(out), log=_quiet)
    return out


def test_mnist_create_on_the_shipped_files(mnist_out):
    raw = gzip.decompress((SHIPPED / "t10k-images-idx3-ubyte.gz").read_bytes())
    test_images = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 1, 28, 28)
    with open_source(str(mnist_out / "mnist_train")) as train:
        assert (train.count, train.datum_shape, train.dtype) == (60000, (1, 28, 28), np.uint8)
        assert train.read(0, 5)[1].tolist() == [5, 0, 4, 1, 9]
        assert np.bincount(train.read_all()[1]).tolist() == [
            5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    with open_source(str(mnist_out / "mnist_test")) as test:
        assert test.count == 10000 and test.read(0, 5)[1].tolist() == [7, 2, 1, 0, 4]
        np.testing.assert_array_equal(test.read_all()[0], test_images)
    meta = read_metadata(str(mnist_out / "mnist_train"))
    assert mnist.FILES["train-images-idx3-ubyte.gz"].sha256 in meta["source"]
    assert _leftovers(mnist_out) == []


def test_mnist_second_create_does_not_rewrite(mnist_out):
    files = [mnist_out / n / "jcaffe_dataset.json" for n in ("mnist_train", "mnist_test")]
    before = [os.stat(f).st_mtime_ns for f in files]
    lines = []
    mnist.create(str(SHIPPED), out_dir=str(mnist_out), log=lines.append)
    assert [os.stat(f).st_mtime_ns for f in files] == before
    assert all("is up to date" in line for line in lines) and len(lines) == 2


def test_mnist_failed_create_keeps_the_existing_dataset(mnist_out, monkeypatch):
    from jcaffe.data import dataset

    before = read_metadata(str(mnist_out / "mnist_test"))
    real_append = dataset._Writer.append
    calls = []

    def failing_append(self, data, labels):
        calls.append(len(data))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if interrupted half way
        return real_append(self, data, labels)

    monkeypatch.setattr(dataset._Writer, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        mnist.create(str(SHIPPED), out_dir=str(mnist_out), force=True, log=_quiet)
    assert len(calls) == 2
    assert read_metadata(str(mnist_out / "mnist_train")) is not None
    assert read_metadata(str(mnist_out / "mnist_test")) == before
    assert _leftovers(mnist_out) == []


def test_mnist_subset_in_caffe_formats(tmp_path):
    mnist.create(str(SHIPPED), out_dir=str(tmp_path), formats=["tensorstore", "lmdb", "leveldb"],
                 limit=30, log=_quiet)
    with open_source(str(tmp_path / "mnist_train")) as ts_src:
        want = ts_src.read_all()
    for fmt in ("lmdb", "leveldb"):
        with open_source(str(tmp_path / f"mnist_train_{fmt}")) as src:
            assert src.kind == fmt and src.count == 30
            got = src.read_all()
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    env = lmdb.open(str(tmp_path / "mnist_test_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        keys = [k for k, _ in txn.cursor()]
        first = caffe_pb2.Datum.FromString(txn.get(b"00000000"))
    env.close()
    assert keys == [b"%08d" % i for i in range(30)]
    assert (first.channels, first.height, first.width, first.label) == (1, 28, 28, 7)


def test_prepare_mnist_script(tmp_path):
    for name in mnist.FILES:
        os.symlink(SHIPPED / name, tmp_path / name)
    cmd = [sys.executable, "datasets/mnist/prepare_mnist.py", "--root", str(tmp_path),
           "--limit", "20", "--format", "lmdb"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "writing" in r.stdout and (tmp_path / "mnist_test_lmdb" / "data.mdb").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "writing" not in r.stdout and "up to date" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "datasets/mnist/prepare_mnist.py", "--root", str(empty),
                        "--create-only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("prepare_mnist: error: ")
    assert "MNIST files missing: train-images-idx3-ubyte.gz" in r.stderr
    assert "Traceback" not in r.stderr and os.listdir(empty) == []


# ------------------------------------------------------------------------------------------
# CIFAR-10 from tiny fake batches

def _fake_cifar(folder, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in cifar10.TRAIN_BATCHES + cifar10.TEST_BATCHES:
        labels = rng.integers(0, 10, per_batch).astype(np.uint8)
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())
        batches[name] = (pixels.reshape(-1, 3, 32, 32), labels.astype(np.int32))
    return batches


def test_cifar10_create(tmp_path):
    batches = _fake_cifar(tmp_path / "cifar-10-batches-bin")
    out = tmp_path / "out"
    cifar10.create(str(tmp_path), str(out), formats=["lmdb"], log=_quiet)  # finds the subfolder
    train_x = np.concatenate([batches[n][0] for n in cifar10.TRAIN_BATCHES])
    train_y = np.concatenate([batches[n][1] for n in cifar10.TRAIN_BATCHES])
    for name in ("cifar10_train", "cifar10_train_lmdb"):
        with open_source(str(out / name)) as src:
            assert (src.count, src.datum_shape) == (15, (3, 32, 32))
            x, y = src.read_all()
            np.testing.assert_array_equal(x, train_x)  # stored as in the file (RGB planes)
            np.testing.assert_array_equal(y, train_y)
    with open_source(str(out / "cifar10_test")) as src:
        np.testing.assert_array_equal(src.read_all()[0], batches["test_batch.bin"][0])
    env = lmdb.open(str(out / "cifar10_test_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"00000", b"00001", b"00002"]
    env.close()
    blob = caffe_pb2.BlobProto.FromString((out / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 32, 32)
    want = (train_x.sum(0, dtype=np.int64) / 15).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(blob.data, np.float32).reshape(3, 32, 32), want)
    mtime = os.stat(out / "mean.binaryproto").st_mtime_ns
    lines = []
    cifar10.create(str(tmp_path / "cifar-10-batches-bin"), str(out), formats=["lmdb"],
                   log=lines.append)
    assert all("up to date" in line for line in lines) and len(lines) == 5
    assert os.stat(out / "mean.binaryproto").st_mtime_ns == mtime


def test_cifar10_from_the_archive(tmp_path):
    batches = _fake_cifar(tmp_path / "cifar-10-batches-bin", per_batch=2, seed=1)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    out = tmp_path / "out"
    assert cifar10.main(["--from", str(archive), "--out", str(out)]) == 0
    with open_source(str(out / "cifar10_test")) as src:
        np.testing.assert_array_equal(src.read_all()[1], batches["test_batch.bin"][1])


def test_cifar10_bad_batches(tmp_path):
    src = tmp_path / "src"
    _fake_cifar(src)
    with open(src / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match=f"{src / 'data_batch_3.bin'}: 9229 bytes is not a whole "
                                        "number of CIFAR-10 records"):
        cifar10.create(str(src), str(tmp_path / "out"), log=_quiet)
    _fake_cifar(src)
    content = bytearray((src / "test_batch.bin").read_bytes())
    content[3073] = 10
    (src / "test_batch.bin").write_bytes(bytes(content))
    with pytest.raises(DataError, match="test_batch.bin: record 1 has label 10"):
        cifar10.create(str(src), str(tmp_path / "out"), log=_quiet)
    os.unlink(src / "data_batch_5.bin")
    with pytest.raises(DataError, match="batch files missing: data_batch_5.bin"):
        cifar10.create(str(src), str(tmp_path / "out"), log=_quiet)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------
# convert_imageset

@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    pics = {"a.png": rng.integers(0, 256, (4, 6, 3), dtype=np.uint8),
            "sub/b c.png": rng.integers(0, 256, (4, 6, 3), dtype=np.uint8),
            "g.png": rng.integers(0, 256, (4, 6), dtype=np.uint8)}
    for name, arr in pics.items():
        Image.fromarray(arr).save(root / name)
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 3\nsub/b c.png 1\n\ng.png 7\n")
    return root, listing, pics


def _chw_bgr(arr):
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return arr[..., ::-1].transpose(2, 0, 1)


def test_convert_imageset_tensorstore(images, tmp_path):
    root, listing, pics = images
    lines = []
    n = cis.convert_imageset(str(root) + "/", str(listing), str(tmp_path / "ds"), log=lines.append)
    assert n == 3 and "A total of 3 images." in lines and "Processed 3 files." in lines
    with open_source(str(tmp_path / "ds")) as src:
        x, y = src.read_all()
    assert y.tolist() == [3, 1, 7]
    for i, name in enumerate(["a.png", "sub/b c.png", "g.png"]):
        np.testing.assert_array_equal(x[i], _chw_bgr(pics[name]))


def test_convert_imageset_lmdb_keys_gray_resize_shuffle(images, tmp_path):
    root, listing, pics = images
    db = tmp_path / "db"
    assert cis.main([str(root), str(listing), str(db), "-backend=lmdb", "--gray",
                     "--resize_height=2", "--resize_width=3", "--shuffle", "--seed=7"]) == 0
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    order = np.random.default_rng(7).permutation(3)
    names = [["a.png", "sub/b c.png", "g.png"][i] for i in order]
    assert [k for k, _ in items] == [f"{i:08d}_{name}" for i, name in enumerate(names)]
    for (_, d), name in zip(items, names):
        assert (d.channels, d.height, d.width) == (1, 2, 3)
        pic = pics[name].astype(np.int64)
        if pic.ndim == 3:  # libpng's rgb_to_gray (OpenCV's PNG reader): 0.299 / 0.587, truncated
            grey = (9797 * pic[..., 0] + 19234 * pic[..., 1] + 3737 * pic[..., 2]) >> 15
        else:
            grey = pic
        blocks = grey.reshape(2, 2, 3, 2).sum((1, 3))  # exact halving: rounded 2x2 block means
        np.testing.assert_array_equal(np.frombuffer(d.data, np.uint8).reshape(2, 3),
                                      (blocks + 2) >> 2)
        assert d.label == {"a.png": 3, "sub/b c.png": 1, "g.png": 7}[name]


def test_convert_imageset_encoded(images, tmp_path):
    root, listing, pics = images
    cis.convert_imageset(str(root), str(listing), str(tmp_path / "enc"), backend="leveldb",
                         encoded=True, log=_quiet)
    import plyvel

    db = plyvel.DB(str(tmp_path / "enc"))
    values = [caffe_pb2.Datum.FromString(v) for _, v in db]
    db.close()
    assert all(d.encoded for d in values)
    assert values[0].data == (root / "a.png").read_bytes()       # the file itself
    assert values[2].data != (root / "g.png").read_bytes()       # grey file re-encoded as colour
    with open_source(str(tmp_path / "enc")) as src:
        x, y = src.read_all()
    for i, name in enumerate(["a.png", "sub/b c.png", "g.png"]):
        np.testing.assert_array_equal(x[i], _chw_bgr(pics[name]))
    with pytest.raises(DataError, match="--encoded needs --backend lmdb or leveldb"):
        cis.convert_imageset(str(root), str(listing), str(tmp_path / "x"), encode_type="png")


def test_convert_imageset_errors(images, tmp_path, capsys):
    root, listing, pics = images
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 3\nsub/b c.png one\n")
    with pytest.raises(DataError, match=f"{bad}:2: expected 'FILENAME LABEL'"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), log=_quiet)
    bad.write_text("a.png 3\nmissing.png 1\n")
    with pytest.raises(DataError, match=f"{bad}:2: image 'missing.png': cannot read"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), log=_quiet)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    bad.write_text("broken.png 0\n")
    with pytest.raises(DataError, match=f"{bad}:1: image 'broken.png': cannot decode"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), backend="lmdb", log=_quiet)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "big.png")
    bad.write_text("a.png 0\nbig.png 1\n")
    with pytest.raises(DataError, match=f"{bad}:2: image 'big.png': size 3x5x5 differs"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), log=_quiet)
    with pytest.raises(DataError, match="big.png': size"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), backend="lmdb",
                             check_size=True, log=_quiet)
    with pytest.raises(DataError, match="unknown --encode_type 'xyz'"):
        cis.convert_imageset(str(root), str(listing), str(tmp_path / "o"), backend="lmdb",
                             encode_type="xyz", log=_quiet)
    with pytest.raises(DataError, match="unknown backend 'hdf5'"):
        cis.convert_imageset(str(root), str(listing), str(tmp_path / "o"), backend="hdf5")
    bad.write_text("\n\n")
    with pytest.raises(DataError, match=f"{bad}: the list holds no images"):
        cis.convert_imageset(str(root), str(bad), str(tmp_path / "o"), log=_quiet)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []
    cis.convert_imageset(str(root), str(listing), str(tmp_path / "ds"), log=_quiet)
    capsys.readouterr()
    assert cis.main([str(root), str(listing), str(tmp_path / "ds")]) == 1
    assert "convert_imageset: error: " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# compute_image_mean

def test_compute_image_mean_of_bytes(tmp_path, capsys):
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (11, 3, 4, 5), dtype=np.uint8)
    write_lmdb(tmp_path / "db", (caffe_pb2.Datum(channels=3, height=4, width=5,
                                                 data=x[i].tobytes(), label=0)
                                 for i in range(11)))
    out = tmp_path / "mean.binaryproto"
    assert cim.main(["-backend=lmdb", str(tmp_path / "db"), str(out)]) == 0
    blob = caffe_pb2.BlobProto.FromString(out.read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 5)
    want = x.mean(0, dtype=np.float64).astype(np.float32)
    got = np.asarray(blob.data, np.float32).reshape(3, 4, 5)
    np.testing.assert_array_equal(got, want)
    printed = capsys.readouterr().out
    assert "Number of channels: 3" in printed
    for c in range(3):
        assert f"mean_value channel [{c}]: {float(want[c].mean()):.6g}" in printed
    assert _leftovers(tmp_path) == []


def test_compute_image_mean_of_float_data(tmp_path):
    rng = np.random.default_rng(10)
    x = (rng.integers(-40, 40, (6, 1, 2, 3)) / 4).astype(np.float32)  # exact in float32
    datums = []
    for i in range(6):
        d = caffe_pb2.Datum(channels=1, height=2, width=3)
        d.float_data.extend(x[i].ravel().tolist())
        datums.append(d)
    write_lmdb(tmp_path / "db", datums)
    mean = cim.compute_image_mean(str(tmp_path / "db"), log=_quiet)
    np.testing.assert_array_equal(mean, (x.astype(np.float64).sum(0) / 6).astype(np.float32))
    with pytest.raises(DataError, match="dataset not found"):
        cim.compute_image_mean(str(tmp_path / "nothing"), log=_quiet)
