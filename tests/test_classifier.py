"""Deployment: Classifier (pycaffe's classifier.py + io.Transformer), `jcaffe classify` and
`jcaffe extract_features`, with a LeNet trained here on MNIST digits."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from jcaffe import cli
from jcaffe.classifier import (Classifier, Transformer, load_image, oversample, resize_image)
from jcaffe.data import mnist
from jcaffe.data.dataset import read_dataset, write_dataset
from jcaffe.errors import JcaffeError
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "prototxt" / "lenet.prototxt"
SCALE = 0.00390625  # LeNet's transform_param scale (1/256)

SOLVER = """net: "%(net)s"
test_iter: 1
test_interval: 100000
test_initialization: false
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: 200
snapshot_prefix: "%(dir)s/lenet"
solver_mode: CPU
random_seed: 1
"""


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A LeNet trained for 200 iterations on 3000 MNIST digits; 40 test digits as PNG files."""
    from jcaffe.train import Trainer

    d = tmp_path_factory.mktemp("lenet_deploy")
    root = REPO / "datasets" / "mnist"
    images, labels = mnist.read_split(str(root / "train-images-idx3-ubyte.gz"),
                                      str(root / "train-labels-idx1-ubyte.gz"), limit=3000)
    write_dataset(str(d / "train"), images, labels)
    timages, tlabels = mnist.read_split(str(root / "t10k-images-idx3-ubyte.gz"),
                                        str(root / "t10k-labels-idx1-ubyte.gz"), limit=200)
    write_dataset(str(d / "test"), timages, tlabels)
    net = (REPO / "prototxt" / "lenet_train_test.prototxt").read_text()
    net = net.replace("datasets/mnist/mnist_train", str(d / "train"))
    net = net.replace("datasets/mnist/mnist_test", str(d / "test"))
    (d / "net.prototxt").write_text(net)
    (d / "solver.prototxt").write_text(SOLVER % {"net": d / "net.prototxt", "dir": d})
    t = Trainer(str(d / "solver.prototxt"))
    t.solve()
    t.close()
    weights = d / "lenet_iter_200.caffemodel"
    assert weights.exists()
    png = d / "digits"
    png.mkdir()
    for i in range(40):
        Image.fromarray(timages[i, 0]).save(png / f"{i:03d}.png")
    return {"dir": d, "weights": weights, "png": png, "images": timages, "labels": tlabels}


def load_net(path, weights):
    """A TEST net with every parameter blob from ``weights`` (Caffe's CopyTrainedLayersFrom onto
    zeros: the fillers' values are all replaced) and its jitted forward pass."""
    from jcaffe.caffemodel import load_caffemodel

    net = Net(str(path), "TEST", verbose=False)
    shapes = jax.eval_shape(net.init, jax.random.key(0))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = net.copy_from(zeros, load_caffemodel(str(weights)))
    return net, params, jax.jit(lambda p, x: net.apply(p, x))


@pytest.fixture(scope="module")
def deploy_net(lenet):
    return load_net(DEPLOY, lenet["weights"])


@pytest.fixture(scope="module")
def clf(lenet):
    return Classifier(str(DEPLOY), str(lenet["weights"]), raw_scale=255, input_scale=SCALE)


def reference_probs(deploy_net, chw_batch):
    """The deploy net's `prob` for already preprocessed N x 1 x 28 x 28 inputs (net.apply)."""
    net, params, forward = deploy_net
    out = []
    for k in range(0, len(chw_batch), 64):
        x = chw_batch[k:k + 64]
        pad = np.zeros((64 - len(x),) + x.shape[1:], np.float32)
        out.append(np.asarray(forward(params, {"data": np.concatenate([x, pad])})["prob"])[:len(x)])
    return np.concatenate(out)


def test_center_only_matches_net_apply(lenet, clf, deploy_net):
    files = sorted(lenet["png"].glob("*.png"))
    images = [load_image(f, color=False) for f in files]
    assert images[0].shape == (28, 28, 1) and images[0].dtype == np.float32
    np.testing.assert_allclose(images[3][:, :, 0], lenet["images"][3, 0] / 255.0, rtol=1e-6)
    probs = clf.predict(images, oversample=False)
    # numpy preprocessing as pycaffe's: [0,1] image * raw_scale * input_scale, H x W x 1 -> 1 x H x W
    x = np.stack([(im * np.float32(255)) * np.float32(SCALE) for im in images])
    x = x.transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_allclose(x[:, 0], lenet["images"][:40, 0] * SCALE, rtol=1e-6)
    want = reference_probs(deploy_net, x)
    assert probs.shape == (40, 10)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    accuracy = np.mean(probs.argmax(1) == lenet["labels"][:40])
    assert accuracy >= 0.85, accuracy  # 200 iterations on 3000 digits


def test_oversample_crops_and_average(lenet, clf, deploy_net):
    clf.image_dims = np.array([32, 32])  # as Classifier(..., image_dims=(32, 32))
    images = [lenet["images"][i, 0][:, :, None] / np.float32(255) for i in range(3)]
    batch = clf.preprocess_batch(images, oversample=True)
    assert batch.shape == (30, 1, 28, 28)
    # numpy reference: the 32x32 resize, then pycaffe's 10 crops (corners, centre, mirrored)
    for i, im in enumerate(images):
        r = resize_image(im, (32, 32))
        boxes = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
        crops = [r[a:a + 28, b:b + 28] for a, b in boxes]
        crops += [c[:, ::-1] for c in crops]
        want = np.stack([c.transpose(2, 0, 1) * np.float32(255) * np.float32(SCALE) for c in crops])
        np.testing.assert_allclose(batch[10 * i:10 * i + 10], want, rtol=1e-6)
    probs = clf.predict(images, oversample=True)
    clf.image_dims = clf.crop_dims
    crop_probs = reference_probs(deploy_net, batch)
    np.testing.assert_allclose(probs, crop_probs.reshape(3, 10, 10).mean(1), rtol=1e-5, atol=1e-6)


def test_oversample_reference():
    im = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    crops = oversample([im, im + 100], (3, 4))
    assert crops.shape == (20, 3, 4, 2)
    want = [im[0:3, 0:4], im[0:3, 2:6], im[2:5, 0:4], im[2:5, 2:6],
            im[int(2.5 - 1.5):int(2.5 - 1.5) + 3, 1:5]]
    want += [w[:, ::-1] for w in want]
    np.testing.assert_array_equal(crops[:10], np.stack(want))
    np.testing.assert_array_equal(crops[10:], np.stack(want) + 100)


def test_resize_image():
    # bilinear with aligned pixel centres: an exact halving averages 2x2 blocks, a ramp stays a ramp
    im = np.random.default_rng(0).random((8, 6, 3)).astype(np.float32)
    half = resize_image(im, (4, 3))
    np.testing.assert_allclose(half, im.reshape(4, 2, 3, 2, 3).mean(axis=(1, 3)), rtol=1e-6)
    ramp = np.tile(np.arange(4, dtype=np.float32)[None, :, None], (2, 1, 1))
    up = resize_image(ramp, (2, 8))[0, :, 0]
    # output centre j maps to source (j + 0.5) / 2 - 0.5, clamped to [0, 3]
    want = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(up, want, rtol=1e-6)


def test_transformer_preprocess():
    rng = np.random.default_rng(1)
    t = Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    mean = rng.random((3, 4, 5)).astype(np.float32) * 100
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    im = rng.random((4, 5, 3)).astype(np.float32)
    got = t.preprocess("data", im)
    want = ((im.transpose(2, 0, 1)[::-1] * 255.0) - mean) * 0.5
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(t.deprocess("data", got), im, rtol=1e-4, atol=1e-5)
    t.set_mean("data", np.array([1.0, 2.0, 3.0]))  # per channel
    np.testing.assert_allclose(t.preprocess("data", np.zeros((4, 5, 3)))[:, 0, 0], [-0.5, -1, -1.5])
    with pytest.raises(JcaffeError, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(JcaffeError, match="not one of the net inputs"):
        t.preprocess("image", im)


def test_forward_refills_random_dummy_data(tmp_path):
    # Caffe's TEST-phase forward refills a DummyData top with a random filler at every pass.
    net = tmp_path / "noise.prototxt"
    net.write_text("""
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
    layer { name: "noise" type: "DummyData" top: "noise"
            dummy_data_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } data_filler { type: "gaussian" std: 1 } } }
    layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "noise" top: "sum" }
    """)
    c = Classifier(str(net), None)
    a = c.forward_all(data=np.ones((2, 1, 8, 8), np.float32))["sum"]
    b = c.forward_all(data=np.ones((2, 1, 8, 8), np.float32))["sum"]
    assert not np.array_equal(a, b)
    assert abs(a.mean() - 1) < 0.4 and 0.6 < a.std() < 1.4


def test_classify_command(lenet, clf, tmp_path, capsys):
    out = tmp_path / "probs.npy"
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {k}\n" for k in range(10)))
    argv = ["classify", "--model_def", str(DEPLOY), "--pretrained_model", str(lenet["weights"]),
            "--center_only", f"--input_scale={SCALE}", "--ext", "png", "--labels", str(labels),
            "--top_k", "2", str(lenet["png"]), str(out)]
    assert cli.main(argv) == 0
    probs = np.load(out)
    files = sorted(lenet["png"].glob("*.png"))
    np.testing.assert_allclose(probs, clf.predict([load_image(f, False) for f in files], False),
                               rtol=1e-6)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.endswith(")")]
    assert len(lines) == 40
    first = lines[0]
    top = np.argsort(-probs[0])[:2]
    assert first == (f"{files[0]}: digit {top[0]} ({probs[0, top[0]]:.4f}), "
                     f"digit {top[1]} ({probs[0, top[1]]:.4f})")
    # one file, oversampled (10 crops of the 28x28 image itself: all the same crop or mirrored)
    assert cli.main(argv[:5] + [f"--input_scale={SCALE}", "--top_k", "0", str(files[0]),
                                str(tmp_path / "one.npy")]) == 0
    assert np.load(tmp_path / "one.npy").shape == (1, 10)


def test_classify_errors(lenet, tmp_path, capsys):
    base = ["classify", "--model_def", str(DEPLOY), "--pretrained_model", str(lenet["weights"])]
    assert cli.main(base + [str(tmp_path / "nothing_here")]) == 1
    assert cli.main(base + ["--ext", "bmp", str(lenet["png"])]) == 1
    assert cli.main(base + ["--channel_swap", "2,1,0", str(lenet["png"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [l.startswith("jcaffe: error: ") for l in err] == [True] * 3, err


@pytest.fixture(scope="module")
def test_net(lenet):
    return load_net(lenet["dir"] / "net.prototxt", lenet["weights"])


@pytest.mark.parametrize("backend", ["lmdb", "leveldb", "tensorstore"])
def test_extract_features(lenet, test_net, tmp_path, backend):
    d = lenet["dir"]
    dbs = [tmp_path / "ip2_db", tmp_path / "pool2_db"]
    argv = ["extract_features", str(lenet["weights"]), str(d / "net.prototxt"), "ip2,pool2",
            ",".join(map(str, dbs)), "3"]
    argv += ["lmdb"] if backend == "lmdb" else ["--backend", backend]
    assert cli.main(argv) == 0
    # reference: the TEST net (batch 100) on the first 300 test digits ... of which there are
    # 200: Caffe's data layer wraps around to the start
    net, params, forward = test_net
    imgs = lenet["images"]
    order = np.concatenate([imgs, imgs[:100]])
    want = {"ip2": [], "pool2": []}
    for k in range(3):
        x = order[100 * k:100 * k + 100]
        blobs = forward(params, {"data": x, "label": np.zeros(100, np.int32)})
        for b in want:
            want[b].append(np.asarray(blobs[b]))
    # the data layer's scale, by hand, gives the same conv input
    np.testing.assert_allclose(
        np.asarray(forward(params, {"data": imgs[:100], "label": np.zeros(100, np.int32)})["data"]),
        imgs[:100] * np.float32(SCALE), rtol=1e-6)
    for b, db, shape in (("ip2", dbs[0], (10, 1, 1)), ("pool2", dbs[1], (50, 4, 4))):
        ref = np.concatenate(want[b]).reshape(300, -1)
        if backend in ("lmdb", "leveldb"):
            if backend == "lmdb":
                import lmdb

                with lmdb.open(str(db), readonly=True, lock=False) as env, env.begin() as txn:
                    items = list(txn.cursor())
            else:
                import plyvel

                ldb = plyvel.DB(str(db))
                items = list(ldb.iterator())
                ldb.close()
            assert [k for k, _ in items] == [b"%010d" % i for i in range(300)]
            datums = [caffe_pb2.Datum.FromString(v) for _, v in items]
            assert {(x.channels, x.height, x.width, x.label) for x in datums} == {shape + (0,)}
            got = np.array([x.float_data for x in datums], np.float32)
        else:
            src = read_dataset(str(db))
            got = np.asarray(src.read(0, 300)[0])
            src.close()
            assert got.shape == (300,) + shape
            got = got.reshape(300, -1)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_extract_features_mirrors_at_test_time(lenet, tmp_path):
    # Caffe mirrors at random in the TEST phase too (do_mirror = mirror() && Rand(2)): the
    # TEST net is applied with a key, and each item is its digit, scaled, or its mirror image.
    d = lenet["dir"]
    net = (d / "net.prototxt").read_text()
    (tmp_path / "net.prototxt").write_text(
        net.replace("scale: 0.00390625", "scale: 0.00390625 mirror: true"))
    assert net.count("scale: 0.00390625") == 2
    db = tmp_path / "data_db"
    assert cli.main(["extract_features", str(lenet["weights"]), str(tmp_path / "net.prototxt"),
                     "data", str(db), "1", "--backend", "tensorstore"]) == 0
    src = read_dataset(str(db))
    got = np.asarray(src.read(0, 100)[0])
    src.close()
    x = lenet["images"][:100].astype(np.float32) * np.float32(SCALE)
    same = np.all(got == x, axis=(1, 2, 3))
    flipped = np.all(got == x[..., ::-1], axis=(1, 2, 3))
    assert np.all(same | flipped) and 20 < flipped.sum() < 80


def test_extract_features_errors(lenet, tmp_path, capsys):
    d = lenet["dir"]
    base = ["extract_features", str(lenet["weights"]), str(d / "net.prototxt")]
    assert cli.main(base + ["fc7", str(tmp_path / "a"), "1"]) == 1
    assert "Unknown feature blob name fc7" in capsys.readouterr().err
    assert cli.main(base + ["ip2,ip1", str(tmp_path / "a"), "1"]) == 1
    assert "must be equal" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli.main(base + ["ip2", str(tmp_path / "exists"), "1"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_trained_params_keep_fillers_for_missing_layers(tmp_path):
    from jcaffe.caffemodel import save_caffemodel
    from jcaffe.classifier import trained_params

    (tmp_path / "n.prototxt").write_text("""
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 }
                              bias_filler { type: "constant" value: 0.5 } } }""")
    net = Net(str(tmp_path / "n.prototxt"), "TEST", verbose=False)
    fresh = net.init(jax.random.key(0))
    trained = {"a": [np.full((4, 3), 2.0, np.float32), np.full(4, 3.0, np.float32)],
               "b": [np.full((2, 4), -1.0, np.float32), np.full(2, 7.0, np.float32)]}
    save_caffemodel(str(tmp_path / "all.caffemodel"), net, trained)
    got = trained_params(net, tmp_path / "all.caffemodel")
    for name in ("a", "b"):
        for g, w in zip(got[name], trained[name]):
            np.testing.assert_array_equal(np.asarray(g), w)
    # a model without layer b: b keeps its filler values (Caffe copies only the layers it has)
    only_a = Net(str(tmp_path / "n.prototxt"), "TEST", verbose=False)
    save_caffemodel(str(tmp_path / "a.caffemodel"), only_a, {"a": trained["a"], "b": fresh["b"]})
    from jcaffe.proto import caffe_pb2 as pb

    m = pb.NetParameter.FromString((tmp_path / "a.caffemodel").read_bytes())
    del m.layer[[l.name for l in m.layer].index("b")]
    (tmp_path / "a.caffemodel").write_bytes(m.SerializeToString())
    got = trained_params(net, tmp_path / "a.caffemodel")
    np.testing.assert_array_equal(np.asarray(got["a"][0]), trained["a"][0])
    np.testing.assert_array_equal(np.asarray(got["b"][0]), np.asarray(fresh["b"][0]))
    np.testing.assert_array_equal(np.asarray(got["b"][1]), np.full(2, 0.5, np.float32))
