"""Data layers: records in Caffe's order (wrap-around, rand_skip, resume), the on-device
DataTransformer against a numpy transcription of Caffe's per-element loop, random crops and
mirrors against every valid candidate, ImageData / HDF5Data / MemoryData, and bad input."""

from __future__ import annotations

import itertools
import os

import h5py
import jax
import jax.numpy as jnp
import lmdb
import numpy as np
import pytest
from PIL import Image

from jcaffe.data.transform import Transformer
from jcaffe.errors import DataError, LayerError
from jcaffe.layers.base import Context
from jcaffe.proto import caffe_pb2
from tests.layer_utils import make_layer

RNG = np.random.default_rng(1234)


# -- fixtures written by the tests ------------------------------------------------------------

def write_lmdb(path, images, labels):
    """A Caffe LMDB of raw Datums keyed %08d (what convert_imageset writes)."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            d = caffe_pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2],
                                label=int(lab))
            if img.dtype == np.uint8:
                d.data = img.tobytes()
            else:
                d.float_data.extend(img.ravel().tolist())
            txn.put(b"%08d" % i, d.SerializeToString())
    env.close()
    return str(path)


def write_mean(path, mean):
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend(mean.shape)
    bp.data.extend(mean.astype(np.float32).ravel().tolist())
    with open(path, "wb") as f:
        f.write(bp.SerializeToString())
    return str(path)


@pytest.fixture
def db(tmp_path):
    images = RNG.integers(0, 256, (10, 3, 6, 7), dtype=np.uint8)
    labels = np.arange(10) * 3 + 1
    return write_lmdb(tmp_path / "db", images, labels), images, labels


def data_layer(source, batch, phase="TEST", extra="", transform="", tops=("data", "label")):
    text = (f'type: "Data" name: "d" data_param {{ source: "{source}" batch_size: {batch} '
            f'backend: LMDB {extra} }}')
    if transform:
        text += f" transform_param {{ {transform} }}"
    return make_layer(text, [], phase, tops=list(tops))


# -- a numpy transcription of Caffe's DataTransformer::Transform(Datum) -----------------------

def caffe_transform(raw, h_off, w_off, flip, crop, scale=1.0, mean_file=None, mean_values=None):
    """One image: Caffe's loop over (c, h, w) with data_index / top_index as in the C++."""
    c_n, h_n, w_n = raw.shape
    height = crop or h_n
    width = crop or w_n
    out = np.zeros(c_n * height * width, np.float32)
    flat = raw.ravel()
    mean = None if mean_file is None else mean_file.ravel()
    for c in range(c_n):
        for h in range(height):
            for w in range(width):
                data_index = (c * h_n + h_off + h) * w_n + w_off + w
                top_index = ((c * height + h) * width + (width - 1 - w) if flip
                             else (c * height + h) * width + w)
                e = np.float32(flat[data_index])
                if mean is not None:
                    out[top_index] = (e - mean[data_index]) * np.float32(scale)
                elif mean_values is not None:
                    out[top_index] = (e - np.float32(mean_values[c])) * np.float32(scale)
                else:
                    out[top_index] = e * np.float32(scale)
    return out.reshape(c_n, height, width)


# -- Data: order, wrap-around, rand_skip, resume ----------------------------------------------

def test_data_layer_shapes_and_specs(db):
    src, images, _ = db
    layer = data_layer(src, 4, transform="crop_size: 5")
    assert layer.top_shapes == [(4, 3, 5, 5), (4,)]
    assert layer.input_specs() == [("data", (4, 3, 6, 7), np.dtype(np.uint8)),
                                   ("label", (4,), np.dtype(np.int32))]
    assert layer.is_data and layer.needs_key
    assert not data_layer(src, 4).needs_key


def test_data_reader_order_wraps_across_the_end(db):
    src, images, labels = db
    layer = data_layer(src, 4)
    with layer.make_reader(seed=0) as r:
        got = [r.next_batch() for _ in range(4)]
    expect = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    for b, idx in zip(got, expect):
        np.testing.assert_array_equal(b["data"], images[idx])
        np.testing.assert_array_equal(b["label"], labels[idx])
        assert b["data"].dtype == np.uint8 and b["label"].dtype == np.int32


def test_data_batch_larger_than_dataset_wraps_twice(tmp_path):
    images = RNG.integers(0, 256, (3, 1, 2, 2), dtype=np.uint8)
    src = write_lmdb(tmp_path / "small", images, [7, 8, 9])
    with data_layer(src, 7).make_reader(seed=0) as r:
        b1, b2 = r.next_batch(), r.next_batch()
    np.testing.assert_array_equal(b1["label"], [7, 8, 9, 7, 8, 9, 7])
    np.testing.assert_array_equal(b2["label"], [8, 9, 7, 8, 9, 7, 8])
    np.testing.assert_array_equal(b2["data"], images[[1, 2, 0, 1, 2, 0, 1]])


def test_data_one_top_has_no_label(db):
    src, images, _ = db
    layer = data_layer(src, 2, tops=("data",))
    assert layer.top_shapes == [(2, 3, 6, 7)]
    with layer.make_reader(seed=0) as r:
        b = r.next_batch()
    assert list(b) == ["data"]
    tops = layer.apply([], [b["data"]], Context(train=False))
    assert len(tops) == 1
    np.testing.assert_array_equal(np.asarray(tops[0]), images[:2].astype(np.float32))


def test_data_rand_skip_is_seeded_and_in_range(db):
    src, images, labels = db
    layer = data_layer(src, 3, extra="rand_skip: 8")
    starts = []
    for seed in range(24):
        with layer.make_reader(seed=seed) as r:
            start = r.position
            b = r.next_batch()
        assert 0 <= start < 8
        np.testing.assert_array_equal(b["label"], labels[[(start + i) % 10 for i in range(3)]])
        starts.append(start)
        with layer.make_reader(seed=seed) as again:
            assert again.position == start
    assert len(set(starts)) > 2  # the skip is drawn, not fixed
    with data_layer(src, 3).make_reader(seed=5) as r:
        assert r.position == 0  # no rand_skip: no skip


def test_data_reader_seek_resumes(db):
    src, _, _ = db
    layer = data_layer(src, 4, extra="rand_skip: 5")
    with layer.make_reader(seed=3) as r:
        r.next_batch(), r.next_batch()
        pos = r.position
        rest = [r.next_batch()["label"] for _ in range(3)]
    with layer.make_reader(seed=99) as r2:
        r2.seek(pos)
        again = [r2.next_batch()["label"] for _ in range(3)]
    for a, b in zip(rest, again):
        np.testing.assert_array_equal(a, b)


def test_data_load_all_is_the_whole_source_in_order(db):
    src, images, labels = db
    everything = data_layer(src, 4, extra="rand_skip: 5").load_all()
    np.testing.assert_array_equal(everything["data"], images)
    np.testing.assert_array_equal(everything["label"], labels)


def test_data_float_records(tmp_path):
    images = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    src = write_lmdb(tmp_path / "f", images, [0, 1, 2, 3])
    layer = data_layer(src, 2, transform="scale: 0.5")
    assert layer.input_specs()[0][2] == np.float32
    with layer.make_reader(seed=0) as r:
        b = r.next_batch()
    out = np.asarray(layer.apply([], [b["data"], b["label"]], Context(train=False))[0])
    np.testing.assert_array_equal(out, images[:2] * np.float32(0.5))


def test_data_missing_source_names_the_layer(tmp_path):
    with pytest.raises(DataError, match=r"layer 'd'.*nope"):
        data_layer(str(tmp_path / "nope"), 2)


def test_data_zero_batch_size(db):
    with pytest.raises(LayerError, match="batch_size"):
        data_layer(db[0], 0)


# -- the transform at TEST: centre crop, mean file, mean values, scale -------------------------

def test_test_phase_centre_crop_mean_file_scale(db, tmp_path):
    src, images, labels = db
    mean = RNG.uniform(0, 255, (1, 3, 6, 7)).astype(np.float32)
    mf = write_mean(tmp_path / "mean.binaryproto", mean)
    layer = data_layer(src, 4, transform=f'crop_size: 4 mean_file: "{mf}" scale: 0.00390625')
    with layer.make_reader(seed=0) as r:
        b = r.next_batch()
    data, label = layer.apply([], [b["data"], b["label"]], Context(train=False))
    data = np.asarray(data)
    assert data.dtype == np.float32 and data.shape == (4, 3, 4, 4)
    for i in range(4):
        # Caffe's centre: ((6 - 4) / 2, (7 - 4) / 2) = (1, 1)
        ref = caffe_transform(images[i], 1, 1, False, 4, 0.00390625, mean_file=mean[0])
        np.testing.assert_array_equal(data[i], ref)
    np.testing.assert_array_equal(np.asarray(label), labels[:4].astype(np.float32))
    assert np.asarray(label).dtype == np.float32


@pytest.mark.parametrize("values", [[10.5], [1.0, 100.0, 200.25]])
def test_test_phase_mean_values(db, values):
    src, images, _ = db
    mv = " ".join(f"mean_value: {v}" for v in values)
    layer = data_layer(src, 3, transform=f"{mv} scale: 2")
    raw = images[:3]
    out = np.asarray(layer.apply([], [raw, np.zeros(3, np.int32)], Context(train=False))[0])
    per_channel = values * 3 if len(values) == 1 else values
    for i in range(3):
        np.testing.assert_array_equal(
            out[i], caffe_transform(raw[i], 0, 0, False, 0, 2.0, mean_values=per_channel))


def test_mean_file_shape_mismatch(db, tmp_path):
    mf = write_mean(tmp_path / "bad_mean.binaryproto", np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(DataError) as e:
        data_layer(db[0], 2, transform=f'mean_file: "{mf}"')
    msg = str(e.value)
    assert "bad_mean.binaryproto" in msg and "[1, 3, 5, 5]" in msg and "[1, 3, 6, 7]" in msg


def test_mean_file_unreadable(db, tmp_path):
    junk = tmp_path / "junk.binaryproto"
    junk.write_bytes(b"\xff\xff\xff\xff not a proto")
    with pytest.raises(DataError, match="junk.binaryproto"):
        data_layer(db[0], 2, transform=f'mean_file: "{junk}"')
    with pytest.raises(DataError, match="missing.binaryproto"):
        data_layer(db[0], 2, transform=f'mean_file: "{tmp_path / "missing.binaryproto"}"')


def test_mean_file_by_caffe_from_proto_rules(db, tmp_path):
    # Legacy dims win over shape.dim, and double_data over data (Caffe's Blob::FromProto).
    src, images, _ = db
    mean = RNG.uniform(0, 255, (1, 3, 6, 7))
    bp = caffe_pb2.BlobProto(num=1, channels=3, height=6, width=7)
    bp.shape.dim.extend([3, 42])
    bp.double_data.extend(mean.ravel().tolist())
    bp.data.extend([1.0, 2.0])
    mf = tmp_path / "mean.binaryproto"
    mf.write_bytes(bp.SerializeToString())
    layer = data_layer(src, 2, transform=f'mean_file: "{mf}"')
    out = np.asarray(layer.apply([], [images[:2], np.zeros(2, np.int32)], Context(False))[0])
    for i in range(2):
        np.testing.assert_array_equal(
            out[i], caffe_transform(images[i], 0, 0, False, 0,
                                    mean_file=mean[0].astype(np.float32)))


def test_mean_file_count_mismatch_names_layer_and_file(db, tmp_path):
    bp = caffe_pb2.BlobProto(num=1, channels=3, height=6, width=7)
    bp.data.extend([0.0] * 125)
    mf = tmp_path / "short_mean.binaryproto"
    mf.write_bytes(bp.SerializeToString())
    with pytest.raises(DataError) as e:
        data_layer(db[0], 2, transform=f'mean_file: "{mf}"')
    msg = str(e.value)
    assert "\n" not in msg and "layer 'd'" in msg and str(mf) in msg and "125 value" in msg


def test_bad_transform_params(db, tmp_path):
    src = db[0]
    mf = write_mean(tmp_path / "m.binaryproto", np.zeros((1, 3, 6, 7), np.float32))
    with pytest.raises(LayerError, match="mean_file and mean_value"):
        data_layer(src, 2, transform=f'mean_file: "{mf}" mean_value: 1')
    with pytest.raises(LayerError, match="mean_value"):
        data_layer(src, 2, transform="mean_value: 1 mean_value: 2")
    with pytest.raises(LayerError, match="crop_size 7"):
        data_layer(src, 2, transform="crop_size: 7")
    with pytest.raises(LayerError, match="force_color and force_gray"):
        data_layer(src, 2, transform="force_color: true force_gray: true")


# -- the transform at TRAIN: random crops and mirrors -----------------------------------------

def candidates(img, crop, mirror, mean=None, scale=1.0):
    c, h, w = img.shape
    out = []
    for ho, wo in itertools.product(range(h - crop + 1), range(w - crop + 1)):
        for flip in ([False, True] if mirror else [False]):
            out.append(((ho, wo, flip), caffe_transform(img, ho, wo, flip, crop, scale,
                                                        mean_file=mean)))
    return out


def test_train_crop_and_mirror_are_valid_and_keyed(tmp_path):
    images = RNG.integers(0, 256, (12, 2, 5, 6), dtype=np.uint8)
    mean = RNG.uniform(0, 255, (1, 2, 5, 6)).astype(np.float32)
    mf = write_mean(tmp_path / "mean.binaryproto", mean)
    src = write_lmdb(tmp_path / "db", images, range(12))
    layer = data_layer(src, 12, phase="TRAIN",
                       transform=f'crop_size: 3 mirror: true mean_file: "{mf}" scale: 0.5')
    key = jax.random.key(7)
    f = jax.jit(lambda raw, k: layer.apply([], [raw, jnp.zeros(12, jnp.int32)],
                                           Context(train=True, key=k))[0])
    out = np.asarray(f(images, key))
    chosen = []
    for i in range(12):
        matches = [p for p, cand in candidates(images[i], 3, True, mean[0], 0.5)
                   if np.array_equal(cand, out[i])]
        assert matches, f"image {i} is no valid crop/mirror of its record"
        chosen.append(matches[0])
    np.testing.assert_array_equal(np.asarray(f(images, key)), out)  # same key, same batch
    assert not np.array_equal(np.asarray(f(images, jax.random.key(8))), out)
    assert len({(h, w) for h, w, _ in chosen}) > 1  # offsets drawn per image
    assert len({flip for _, _, flip in chosen}) == 2  # some flipped, some not


def test_train_without_key_is_an_error(db):
    layer = data_layer(db[0], 2, phase="TRAIN", transform="crop_size: 3")
    with pytest.raises(LayerError, match="key for random crops in training mode"):
        layer.apply([], [db[1][:2], np.zeros(2, np.int32)], Context(train=True, key=None))
    # at test time the crop is the centre one: no key needed
    out = layer.apply([], [db[1][:2], np.zeros(2, np.int32)], Context(train=False, key=None))
    assert out[0].shape[-2:] == (3, 3)
    # mirroring is random in either phase (Caffe's do_mirror ignores the phase): the error
    # says so, and names the call's train=False
    layer = data_layer(db[0], 2, phase="TEST", transform="mirror: true")
    with pytest.raises(LayerError) as e:
        layer.apply([], [db[1][:2], np.zeros(2, np.int32)], Context(train=False, key=None))
    assert "random mirroring" in str(e.value) and "either phase" in str(e.value)
    assert "train=False" in str(e.value) and "training mode" not in str(e.value)


def test_mirror_applies_in_both_phases_as_caffe(db):
    # Caffe's do_mirror = mirror() && Rand(2) does not look at the phase.
    src, images, _ = db
    layer = data_layer(src, 10, phase="TEST", transform="mirror: true crop_size: 4")
    raw = images
    out = np.asarray(layer.apply([], [raw, np.zeros(10, np.int32)],
                                 Context(train=False, key=jax.random.key(3)))[0])
    flips = []
    for i in range(10):
        plain = caffe_transform(raw[i], 1, 1, False, 4)
        flipped = caffe_transform(raw[i], 1, 1, True, 4)
        assert np.array_equal(out[i], plain) or np.array_equal(out[i], flipped)
        flips.append(np.array_equal(out[i], flipped))
    assert len(set(flips)) == 2


def test_transformer_force_gray_on_host():
    tp = caffe_pb2.TransformationParameter(force_gray=True)
    t = Transformer(tp, (3, 2, 2), caffe_pb2.TEST, "test", encoded=True)
    assert t.input_shape == (1, 2, 2)
    bgr = np.array([[[[0, 255]], [[0, 0]]], [[[255, 0]], [[0, 0]]], [[[0, 0]], [[255, 0]]]],
                   np.uint8).reshape(1, 3, 2, 2)
    gray = t.host_convert(bgr)
    # OpenCV's BGR2GRAY: 0.114 B + 0.587 G + 0.299 R (rounded)
    expect = np.rint(0.114 * bgr[:, 0].astype(float) + 0.587 * bgr[:, 1] + 0.299 * bgr[:, 2])
    np.testing.assert_array_equal(gray[:, 0], expect.astype(np.uint8))
    raw = Transformer(tp, (3, 2, 2), caffe_pb2.TEST, "test", encoded=False)
    assert raw.input_shape == (3, 2, 2)  # raw records: ignored, as in Caffe


def test_encoded_records_force_color_and_force_gray(tmp_path):
    import io

    grays = [RNG.integers(0, 256, (3, 4), dtype=np.uint8) for _ in range(2)]
    env = lmdb.open(str(tmp_path / "enc"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, g in enumerate(grays):
            buf = io.BytesIO()
            Image.fromarray(g, "L").save(buf, format="PNG")
            txn.put(b"%08d" % i, caffe_pb2.Datum(encoded=True, data=buf.getvalue(),
                                                 label=i).SerializeToString())
    env.close()
    src = str(tmp_path / "enc")
    native = data_layer(src, 2)
    assert native.top_shapes[0] == (2, 1, 3, 4)
    color = data_layer(src, 2, transform="force_color: true")
    assert color.top_shapes[0] == (2, 3, 3, 4)
    with color.make_reader(seed=0) as r:
        b = r.next_batch()["data"]
    for i in range(2):
        for c in range(3):  # grey decoded as colour: the grey value in B, G and R
            np.testing.assert_array_equal(b[i, c], grays[i])
    gray = data_layer(src, 2, transform="force_gray: true")
    assert gray.top_shapes[0] == (2, 1, 3, 4)
    with gray.make_reader(seed=0) as r:
        np.testing.assert_array_equal(r.next_batch()["data"][:, 0], np.stack(grays))


# -- ImageData ---------------------------------------------------------------------------------

@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgbs = [RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    names = ["a.png", "b c.png", "d.png"]  # a space in a path: split at the last space
    for name, rgb in zip(names, rgbs):
        Image.fromarray(rgb, "RGB").save(folder / name)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n} {lab}\n" for n, lab in zip(names, [5, 0, 2])))
    return str(listing), str(folder) + "/", rgbs, [5, 0, 2]


def image_layer(listing, root, batch, extra="", transform="", phase="TEST"):
    text = (f'type: "ImageData" name: "img" image_data_param {{ source: "{listing}" '
            f'root_folder: "{root}" batch_size: {batch} {extra} }}')
    if transform:
        text += f" transform_param {{ {transform} }}"
    return make_layer(text, [], phase, tops=["data", "label"])


def test_image_data_bgr_order_labels_wrap(pngs):
    listing, root, rgbs, labels = pngs
    layer = image_layer(listing, root, 2)
    assert layer.top_shapes == [(2, 3, 4, 5), (2,)]
    bgr = [rgb[:, :, ::-1].transpose(2, 0, 1) for rgb in rgbs]
    with layer.make_reader(seed=0) as r:
        batches = [r.next_batch() for _ in range(3)]
    order = [[0, 1], [2, 0], [1, 2]]
    for b, idx in zip(batches, order):
        np.testing.assert_array_equal(b["data"], np.stack([bgr[i] for i in idx]))
        np.testing.assert_array_equal(b["label"], [labels[i] for i in idx])
    tops = layer.apply([], [batches[0]["data"], batches[0]["label"]], Context(train=False))
    np.testing.assert_array_equal(np.asarray(tops[0]), np.stack([bgr[0], bgr[1]]).astype(np.float32))


def test_image_data_gray_and_resize(pngs):
    listing, root, rgbs, _ = pngs
    layer = image_layer(listing, root, 1, extra="is_color: false new_height: 2 new_width: 3")
    assert layer.top_shapes == [(1, 1, 2, 3), (1,)]
    with layer.make_reader(seed=0) as r:
        assert r.next_batch()["data"].shape == (1, 1, 2, 3)


def test_image_data_shuffle_is_a_permutation_per_pass_and_seeded(pngs):
    listing, root, _, labels = pngs
    layer = image_layer(listing, root, 3, extra="shuffle: true")

    def passes(seed, n=6):
        with layer.make_reader(seed=seed) as r:
            assert r.shuffled
            return [tuple(r.next_batch()["label"]) for _ in range(n)]

    got = passes(11)
    for p in got:
        assert sorted(p) == sorted(labels)
    assert got == passes(11)
    assert len(set(got)) > 1  # reshuffled between passes


def test_image_data_errors(pngs, tmp_path):
    listing, root, _, _ = pngs
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png notanumber\n")
    with pytest.raises(DataError, match=r"bad.txt:1.*notanumber"):
        image_layer(str(bad), root, 1)
    missing = tmp_path / "missing.txt"
    missing.write_text("zzz.png 1\n")
    with pytest.raises(DataError, match="zzz.png"):
        image_layer(str(missing), root, 1)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(os.path.join(root, "big.png"))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.png 1\nbig.png 2\n")
    layer = image_layer(str(mixed), root, 2)
    with layer.make_reader(seed=0) as r, pytest.raises(DataError, match="big.png.*new_height"):
        r.next_batch()
    with pytest.raises(LayerError, match="new_height and new_width"):
        image_layer(listing, root, 1, extra="new_height: 3")


# -- HDF5Data ----------------------------------------------------------------------------------

@pytest.fixture
def h5list(tmp_path):
    rows = [3, 2]
    datas, labs, names = [], [], []
    for k, n in enumerate(rows):
        d = RNG.standard_normal((n, 2, 3))
        lab = np.arange(n, dtype=np.int64) + 10 * k
        name = tmp_path / f"part{k}.h5"
        with h5py.File(name, "w") as f:
            f["data"] = d  # float64 on disk: Caffe converts to float
            f["label"] = lab  # integers too
        datas.append(d)
        labs.append(lab)
        names.append(str(name))
    listing = tmp_path / "h5list.txt"
    listing.write_text("\n".join(names) + "\n")
    return str(listing), np.concatenate(datas).astype(np.float32), \
        np.concatenate(labs).astype(np.float32)


def h5_layer(listing, batch, extra="", more=""):
    return make_layer(f'type: "HDF5Data" name: "h" hdf5_data_param {{ source: "{listing}" '
                      f'batch_size: {batch} {extra} }} {more}', [], "TRAIN",
                      tops=["data", "label"])


def test_hdf5_order_across_files_and_wrap(h5list):
    listing, data, labels = h5list
    layer = h5_layer(listing, 4)
    assert layer.top_shapes == [(4, 2, 3), (4,)]
    assert layer.input_specs()[0][2] == np.float32
    with layer.make_reader(seed=0) as r:
        batches = [r.next_batch() for _ in range(3)]
    for b, idx in zip(batches, [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]]):
        np.testing.assert_array_equal(b["data"], data[idx])
        np.testing.assert_array_equal(b["label"], labels[idx])
    tops = layer.apply([], [batches[0]["data"], batches[0]["label"]], Context(train=True))
    np.testing.assert_array_equal(np.asarray(tops[0]), data[:4])
    everything = layer.load_all()
    np.testing.assert_array_equal(everything["label"], labels)


def test_hdf5_shuffle_permutes_each_pass(h5list):
    listing, _, labels = h5list
    layer = h5_layer(listing, 5, "shuffle: true")
    with layer.make_reader(seed=4) as r:
        seen = [tuple(r.next_batch()["label"]) for _ in range(5)]
    for p in seen:
        assert sorted(p) == sorted(labels)
    assert len(set(seen)) > 1


def test_hdf5_errors(h5list, tmp_path):
    listing, _, _ = h5list
    with pytest.raises(LayerError, match="does not transform"):
        h5_layer(listing, 2, more="transform_param { scale: 2 }")
    with pytest.raises(DataError, match="'other'.*part0.h5"):
        make_layer(f'type: "HDF5Data" name: "h" hdf5_data_param {{ source: "{listing}" '
                   f'batch_size: 2 }}', [], tops=["other"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="at least 1 HDF5"):
        h5_layer(str(empty), 2)
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as f:
        f["data"] = np.zeros((2, 3, 3))
        f["label"] = np.zeros(2)
    lst = tmp_path / "odd.txt"
    lst.write_text(f"{h5list[0].replace('h5list.txt', 'part0.h5')}\n{odd}\n")
    with pytest.raises(DataError, match=r"odd.h5.*\[3, 3\].*\[2, 3\]"):
        h5_layer(str(lst), 2)


# -- MemoryData -------------------------------------------------------------------------------

def memory_layer(batch=2):
    return make_layer(f'type: "MemoryData" name: "m" memory_data_param {{ batch_size: {batch} '
                      f'channels: 1 height: 2 width: 2 }}', [], tops=["data", "label"])


def test_memory_data_sequential_wrap_and_reset():
    layer = memory_layer()
    assert layer.top_shapes == [(2, 1, 2, 2), (2,)]
    data = np.arange(6 * 4, dtype=np.float64).reshape(6, 1, 2, 2)
    labels = np.arange(6)
    r = layer.make_reader()
    with pytest.raises(LayerError, match="set_input_arrays"):
        r.next_batch()
    layer.set_input_arrays(data, labels)
    got = [r.next_batch() for _ in range(4)]
    for b, idx in zip(got, [[0, 1], [2, 3], [4, 5], [0, 1]]):
        np.testing.assert_array_equal(b["data"], data[idx].astype(np.float32))
        np.testing.assert_array_equal(b["label"], labels[idx].astype(np.float32))
        assert b["data"].dtype == np.float32
    r.set_input_arrays(data[:2] + 100, labels[:2].reshape(2, 1, 1, 1))  # Reset: back to 0
    np.testing.assert_array_equal(r.next_batch()["data"], data[:2] + 100)
    tops = layer.apply([], [got[0]["data"], got[0]["label"]], Context(train=False))
    np.testing.assert_array_equal(np.asarray(tops[1]), [0, 1])


def test_memory_data_errors():
    layer = memory_layer(batch=4)
    with pytest.raises(LayerError, match="multiple of batch_size 4"):
        layer.set_input_arrays(np.zeros((6, 1, 2, 2)), np.zeros(6))
    with pytest.raises(LayerError, match=r"shape \[n, 1, 2, 2\]"):
        layer.set_input_arrays(np.zeros((4, 2, 2, 2)), np.zeros(4))
    with pytest.raises(LayerError, match="labels"):
        layer.set_input_arrays(np.zeros((4, 1, 2, 2)), np.zeros(3))
    with pytest.raises(LayerError, match="positive"):
        make_layer('type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 }', [],
                   tops=["data", "label"])


# -- the reader protocol ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["data", "image", "hdf5", "memory"])
def test_every_reader_satisfies_the_reader_protocol(kind, db, pngs, h5list):
    """What jcaffe.data.feed and jcaffe.train use, on every data layer's reader."""
    from jcaffe.data.readers import Reader

    if kind == "data":
        layer, count = data_layer(db[0], 4), 10
    elif kind == "image":
        layer, count = image_layer(pngs[0], pngs[1], 2), 3
    elif kind == "hdf5":
        layer, count = h5_layer(h5list[0], 2), 5
    else:
        layer, count = memory_layer(), 4
        layer.set_input_arrays(np.zeros((4, 1, 2, 2)), np.arange(4))
    with layer.make_reader(seed=3) as r:
        assert isinstance(r, Reader) and r.layer is layer
        assert r.tops == [t for t, _, _ in layer.input_specs()]
        assert (r.count, r.batch_size, r.seed, r.shuffled) == (count, layer.batch_size, 3, False)
        assert r.prefetch >= 1 and r.position == 0 and r.cursor == 0
        want = sum(count * int(np.prod(s[1:])) * np.dtype(d).itemsize
                   for _, s, d in layer.input_specs())
        assert r.nbytes == want
        first = r.next_batch()
        assert r.position == layer.batch_size
        for t, s, d in layer.input_specs():
            assert first[t].shape == tuple(s) and first[t].dtype == np.dtype(d)
        everything = r.load_all()
        assert all(a.shape[0] == count for a in everything.values())
        r.seek(count)  # one full pass later: the same records again
        again = r.batch_at(count)
        for t in r.tops:
            np.testing.assert_array_equal(again[t], first[t])
            np.testing.assert_array_equal(everything[t][:layer.batch_size], first[t])


def test_readers_do_not_import_the_layers():
    """The host side stands alone: jcaffe.data.readers imports nothing from jcaffe.layers."""
    from tests.test_imports import ROOT, import_graph

    graph = import_graph(ROOT)
    assert not [m for m in graph["jcaffe.data.readers"] if m.startswith("jcaffe.layers")]


# -- HDF5Output -------------------------------------------------------------------------------
def _hdf5_output_net(path, data_shape=(3, 2, 2), label_shape=(3,)):
    from google.protobuf import text_format

    from jcaffe.net import Net

    def dims(s):
        return " ".join(f"dim: {d}" for d in s)

    return Net(text_format.Parse(f"""
        layer {{ name: "in" type: "Input" top: "x" top: "y" top: "t"
                input_param {{ shape {{ {dims(data_shape)} }} shape {{ {dims(label_shape)} }}
                              shape {{ dim: 3 dim: 2 }} }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "z"
                inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "out" type: "HDF5Output" bottom: "z" bottom: "y"
                hdf5_output_param {{ file_name: "{path}" }} }}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "z" bottom: "t" top: "loss" }}
        """, caffe_pb2.NetParameter()), "TRAIN", verbose=False)


def test_hdf5_output_writes_data_and_label_from_the_step(tmp_path):
    path = tmp_path / "out.h5"
    net = _hdf5_output_net(path)
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    step = jax.jit(jax.grad(lambda p, b: net.loss(p, b)[0]))
    for i in range(2):
        x = rng.standard_normal((3, 2, 2)).astype(np.float32)
        y = np.array([0.0, 1.0, 2.0 + i], np.float32)
        grads = step(params, {"x": x, "y": y, "t": np.zeros((3, 2), np.float32)})
        jax.block_until_ready(grads)
        w = np.asarray(params["ip"][0], np.float64)
        z = x.reshape(3, 4) @ w.T + np.asarray(params["ip"][1], np.float64)
        with h5py.File(path, "r") as f:
            assert sorted(f) == ["data", "label"]
            # Caffe's legacy 4-axis (num, channels, height, width) shapes, float32.
            assert f["data"].shape == (3, 2, 1, 1) and f["data"].dtype == np.float32
            assert f["label"].shape == (3, 1, 1, 1)
            np.testing.assert_allclose(f["data"][:, :, 0, 0], z, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(f["label"][:, 0, 0, 0], y)  # the latest batch
    assert os.listdir(tmp_path) == ["out.h5"]  # no temporary file left behind


@pytest.mark.parametrize("file_name,shapes,match", [
    ("", None, "file_name is required"),
    ("/no/such/folder/out.h5", None, "folder '/no/such/folder' does not exist"),
    ("out.h5", ((3, 2), (4,)), "same batch size"),
    ("out.h5", ((3, 2, 1, 1, 1), (3,)), "data bottom has 5 axes"),
])
def test_hdf5_output_bad_input(tmp_path, monkeypatch, file_name, shapes, match):
    monkeypatch.chdir(tmp_path)
    shapes = shapes or ((3, 2), (3,))
    from google.protobuf import text_format

    from jcaffe.layers.base import layer_class

    lp = text_format.Parse(f'name: "out" type: "HDF5Output" bottom: "a" bottom: "b" '
                           f'hdf5_output_param {{ file_name: "{file_name}" }}',
                           caffe_pb2.LayerParameter())
    with pytest.raises(LayerError, match="layer 'out' \\(type HDF5Output\\): .*" + match):
        layer_class(lp)(lp, list(shapes))
