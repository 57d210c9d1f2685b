"""Caffe's binary model formats: .caffemodel (binary and HDF5), .binaryproto, .solverstate."""

import os
import stat

import h5py
import numpy as np
import pytest

from jcaffe import caffemodel as cm
from jcaffe.errors import JcaffeError, ModelError
from jcaffe.proto import caffe_pb2


def _f32(*bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


# float32 values whose bits a lossy path would change: -0.0, subnormals, extremes, infinities,
# the default quiet NaN and a NaN with a payload.
SPECIAL = _f32(0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,
               0x7F800000, 0xFF800000, 0x7FC00000, 0x7FA00001, 0x3F800000, 0xBEAAAAAB)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.array_equal(a.view(np.uint32 if a.dtype == np.float32 else np.uint64),
                       b.view(np.uint32 if b.dtype == np.float32 else np.uint64))


def _layer(name, type_, bottom=(), top=(), params=()):
    lp = caffe_pb2.LayerParameter(name=name, type=type_, bottom=list(bottom), top=list(top))
    for pname, lr in params:
        p = lp.param.add(lr_mult=lr)
        if pname:
            p.name = pname
    return lp


class FakeNet:
    """What save_caffemodel needs from a Net: ``name`` and ``export_blobs(params)``."""

    def __init__(self, name, layers):
        self.name = name
        self._layers = layers

    def export_blobs(self, params):
        return [(lp, params.get(lp.name, [])) for lp in self._layers]


def _write(path, msg_or_bytes):
    data = msg_or_bytes if isinstance(msg_or_bytes, bytes) else msg_or_bytes.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, (n, msg)


# -- BlobProto wire form ----------------------------------------------------------------------

def test_blob_bytes_match_hand_encoding():
    # data: field 5 packed (tag 0x2a), 2 floats (8 bytes): 1.0 = 0x3f800000, -2.0 = 0xc0000000
    # shape: field 7 (tag 0x3a), 4 bytes: BlobShape.dim field 1 packed (0x0a), 2 varints 1, 2
    blob = cm.array_to_blob(np.array([[1.0, -2.0]], np.float32))
    assert blob.SerializeToString() == (b"\x2a\x08\x00\x00\x80\x3f\x00\x00\x00\xc0"
                                        b"\x3a\x04\x0a\x02\x01\x02")
    # float64 goes to double_data (field 8, tag 0x42), so after the shape; 0.5 = 0x3fe0000000000000
    blob = cm.array_to_blob(np.array([0.5], np.float64))
    assert blob.SerializeToString() == b"\x3a\x03\x0a\x01\x01\x42\x08" + b"\x00" * 6 + b"\xe0\x3f"
    # A 0-d blob still carries an (empty) shape message, as Caffe's ToProto writes one.
    blob = cm.array_to_blob(np.float32(3.0))
    assert blob.SerializeToString() == b"\x2a\x04\x00\x00\x40\x40\x3a\x00"
    # write_diff: diff is field 6 (tag 0x32), written after data.
    blob = cm.array_to_blob(np.array([1.0], np.float32), write_diff=True,
                            diff=np.array([-2.0], np.float32))
    assert blob.SerializeToString() == (b"\x2a\x04\x00\x00\x80\x3f\x32\x04\x00\x00\x00\xc0"
                                        b"\x3a\x03\x0a\x01\x01")


def test_blob_from_hand_encoded_legacy_bytes():
    # num=1 channels=2 height=1 width=2 (varint fields 1..4), then 4 packed floats.
    raw = (b"\x08\x01\x10\x02\x18\x01\x20\x02\x2a\x10"
           + np.array([1, 2, 3, 4], "<f4").tobytes())
    arr = cm.blob_to_array(caffe_pb2.BlobProto.FromString(raw))
    assert arr.shape == (1, 2, 1, 2) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr.ravel(), [1, 2, 3, 4])


def test_blob_legacy_fields_win_over_shape_and_unset_ones_count_zero():
    blob = caffe_pb2.BlobProto(num=2, channels=3)
    blob.shape.dim.extend([6])
    blob.data.extend([1.0] * 6)
    # Caffe's FromProto: any legacy field set selects (num, channels, height, width), count 0.
    with pytest.raises(ModelError, match=r"holds 6 value\(s\) in 'data' but its shape "
                                         r"\[2, 3, 0, 0\] needs 0"):
        cm.blob_to_array(blob, "m.caffemodel: layer 'x' blob 0")


def test_blob_double_data_preferred_and_precision_kept_on_request():
    blob = caffe_pb2.BlobProto(double_data=[0.1, 0.2], data=[9.0])
    blob.shape.dim.extend([2])
    a = cm.blob_to_array(blob)
    assert a.dtype == np.float32 and np.array_equal(a, np.array([0.1, 0.2], np.float32))
    d = cm.blob_to_array(blob, dtype=None)
    assert d.dtype == np.float64 and np.array_equal(d, [0.1, 0.2])


@pytest.mark.parametrize("blob, needle", [
    (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 3]), data=[0.0] * 5),
     "holds 5 value(s) in 'data' but its shape [2, 3] needs 6"),
    (caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2, data=[0.0] * 3),
     "its shape [1, 1, 2, 2] needs 4"),
    (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2]), double_data=[1.0] * 3),
     "holds 3 value(s) in 'double_data' but its shape [2] needs 2"),
    (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, -1])), "negative dimension"),
    (caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1] * 33), data=[0.0]), "33 axes"),
    (caffe_pb2.BlobProto(), "empty blob"),
])
def test_bad_blob(blob, needle):
    with pytest.raises(ModelError) as e:
        cm.blob_to_array(blob, "w.caffemodel: layer 'fc' blob 1")
    _one_line_error(e, "w.caffemodel: layer 'fc' blob 1", needle)


# -- binary caffemodel ------------------------------------------------------------------------

def _caffe_style_model():
    """A model laid out as Caffe writes it, one modern and one legacy-shaped layer."""
    net = caffe_pb2.NetParameter(name="tiny")
    conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    w = conv.blobs.add()
    w.shape.dim.extend([2, 1, 2, 2])
    w.data.extend(np.arange(8, dtype=np.float32) / 8)
    b = conv.blobs.add()
    b.shape.dim.extend([2])
    b.data.extend([0.5, -0.5])
    net.layer.add(name="relu1", type="ReLU", bottom=["conv1"], top=["conv1"])
    ip = net.layer.add(name="ip", type="InnerProduct", bottom=["conv1"], top=["ip"])
    ip.blobs.add(num=1, channels=1, height=3, width=4, data=list(range(12)))
    ip.blobs.add(num=1, channels=1, height=1, width=3, data=[7.0, 8.0, 9.0])
    return net


def test_load_caffemodel_modern_and_legacy_blobs(tmp_path):
    path = _write(tmp_path / "tiny.caffemodel", _caffe_style_model())
    model = cm.load_caffemodel(path)
    assert list(model) == ["conv1", "ip"]  # layers without blobs are left out
    w, b = model["conv1"]
    assert w.dtype == np.float32 and w.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(w.ravel(), np.arange(8) / 8)
    np.testing.assert_array_equal(b, [0.5, -0.5])
    ipw, ipb = model["ip"]
    assert ipw.shape == (1, 1, 3, 4) and ipb.shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(ipw.ravel(), np.arange(12))
    np.testing.assert_array_equal(ipb.ravel(), [7, 8, 9])


def test_load_v1_and_v0_caffemodel(tmp_path):
    net = caffe_pb2.NetParameter(name="old")
    v1 = net.layers.add(name="fc", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    v1.blobs.add(num=1, channels=1, height=2, width=2, data=[1, 2, 3, 4])
    v1.blobs.add(num=1, channels=1, height=1, width=2, data=[5, 6])
    v0 = net.layers.add()
    v0.layer.name = "conv"
    v0.layer.type = "conv"
    v0.layer.blobs.add(num=1, channels=1, height=1, width=1, data=[42.0])
    net.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU)
    model = cm.load_caffemodel(_write(tmp_path / "old.caffemodel", net))
    assert list(model) == ["fc", "conv"]
    np.testing.assert_array_equal(model["fc"][0].reshape(2, 2), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(model["fc"][1].ravel(), [5, 6])
    assert model["conv"][0].shape == (1, 1, 1, 1) and model["conv"][0].item() == 42.0


def test_both_layer_fields_refused(tmp_path):
    net = _caffe_style_model()
    net.layers.add(name="x")
    path = _write(tmp_path / "mixed.caffemodel", net)
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(path)
    _one_line_error(e, path, "'layer' and legacy 'layers'")


def test_count_mismatch_names_file_layer_and_blob(tmp_path):
    net = _caffe_style_model()
    del net.layer[2].blobs[1].data[-1]
    path = _write(tmp_path / "bad.caffemodel", net)
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(path)
    _one_line_error(e, path, "layer 'ip' blob 1", "holds 2 value(s)", "[1, 1, 1, 3] needs 3")


def _special_params():
    rng = np.random.default_rng(0)
    # Every kind of float32 bit pattern, NaNs with payloads included.
    noise = rng.integers(0, 2**32, size=(3, 4, 5, 5), dtype=np.uint64).astype(np.uint32)
    return {
        "conv1": [noise.view(np.float32), SPECIAL.copy()],
        "ip": [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(2, np.float32)],
        "scale": [np.float32(2.5).reshape(())],
    }


def _fake_net():
    conv = _layer("conv1", "Convolution", ["data"], ["conv1"], [("", 1.0), ("", 2.0)])
    # A stale blob in the layer definition must be replaced, not kept.
    conv.blobs.add(data=[123.0])
    return FakeNet("fake", [
        _layer("data", "Input", top=["data"]),
        conv,
        _layer("ip", "InnerProduct", ["conv1"], ["ip"]),
        _layer("scale", "Scale", ["ip"], ["ip"]),
    ])


def test_save_load_round_trip_is_bit_exact(tmp_path):
    params = _special_params()
    path = str(tmp_path / "snap.caffemodel")
    assert cm.save_caffemodel(path, _fake_net(), params) == path
    loaded = cm.load_caffemodel(path)
    assert list(loaded) == ["conv1", "ip", "scale"]
    for name, blobs in params.items():
        assert len(loaded[name]) == len(blobs)
        for got, want in zip(loaded[name], blobs):
            assert _bits_equal(got, want), name


def test_saved_model_is_nettoproto_layout(tmp_path):
    path = cm.save_caffemodel(tmp_path / "snap.caffemodel", _fake_net(), _special_params())
    net = cm.parse_caffemodel(path)
    assert net.name == "fake" and not len(net.layers)
    # Every layer, in order, with its full definition (Caffe's Layer::ToProto copies it).
    assert [l.name for l in net.layer] == ["data", "conv1", "ip", "scale"]
    conv = net.layer[1]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    assert [p.lr_mult for p in conv.param] == [1.0, 2.0]
    assert len(conv.blobs) == 2 and list(conv.blobs[0].shape.dim) == [3, 4, 5, 5]
    assert not any(b.HasField("num") for b in conv.blobs)  # the current writer form
    assert len(net.layer[0].blobs) == 0
    assert list(net.layer[3].blobs[0].shape.dim) == [] and net.layer[3].blobs[0].HasField("shape")


def test_save_keeps_float64_as_double_data(tmp_path):
    net = FakeNet("d", [_layer("ip", "InnerProduct")])
    path = cm.save_caffemodel(tmp_path / "d.caffemodel", net, {"ip": [np.array([0.1, 0.2])]})
    blob = cm.parse_caffemodel(path).layer[0].blobs[0]
    assert list(blob.double_data) == [0.1, 0.2] and not len(blob.data)
    assert cm.load_caffemodel(path, dtype=None)["ip"][0].dtype == np.float64


def test_model_over_64mb(tmp_path):
    # Caffe's C++ reader once stopped at 64 MB; Python protobuf must read any size below 2 GB.
    big = np.arange(17 * 2**20, dtype=np.float32)  # 68 MiB of floats
    net = FakeNet("big", [_layer("fc", "InnerProduct")])
    path = cm.save_caffemodel(tmp_path / "big.caffemodel", net, {"fc": [big]})
    assert os.path.getsize(path) > 64 * 2**20
    got = cm.load_caffemodel(path)["fc"][0]
    assert got.shape == big.shape and np.array_equal(got, big)


def test_truncated_model(tmp_path):
    data = _caffe_style_model().SerializeToString()
    for cut in (len(data) - 1, len(data) - 20, len(data) // 2 + 3):
        path = _write(tmp_path / f"cut{cut}.caffemodel", data[:cut])
        with pytest.raises(ModelError) as e:
            cm.load_caffemodel(path)
        _one_line_error(e, path, "truncated or corrupt")


@pytest.mark.parametrize("content, needle", [
    (b"", "file is empty"),
    (b"name: 'lenet'\nlayer { name: 'x' }\n", "truncated or corrupt"),  # a prototxt
    (b"\x0a\x03abc", "holds no layers"),                         # a NetParameter, no layers
])
def test_not_a_caffemodel(tmp_path, content, needle):
    path = _write(tmp_path / "x.caffemodel", content)
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(path)
    _one_line_error(e, path, needle)


def test_invalid_utf8_layer_name(tmp_path):
    data = _caffe_style_model().SerializeToString().replace(b"conv1", b"co\xffv1")
    path = _write(tmp_path / "u.caffemodel", data)
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(path)
    _one_line_error(e, path, "not valid UTF-8")


@pytest.mark.parametrize("name", ["gone.caffemodel", "gone.caffemodel.h5"])
def test_missing_model(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(path)
    _one_line_error(e, path, "file not found")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        cm.parse_caffemodel(tmp_path)


# -- HDF5 caffemodel --------------------------------------------------------------------------

def test_hdf5_round_trip_and_layout(tmp_path):
    params = _special_params()
    path = cm.save_caffemodel(tmp_path / "snap.caffemodel.h5", _fake_net(), params, fmt="hdf5")
    with h5py.File(path, "r") as f:
        # Net::ToHDF5: a group per layer, even those without blobs; float32 datasets "0", "1".
        assert sorted(f["data"]) == ["conv1", "data", "ip", "scale"]
        assert len(f["data/data"]) == 0
        assert sorted(f["data/conv1"]) == ["0", "1"]
        assert f["data/conv1/0"].dtype == np.float32 and f["data/conv1/0"].shape == (3, 4, 5, 5)
    loaded = cm.load_caffemodel(path)
    assert sorted(loaded) == ["conv1", "ip", "scale"]
    for name, blobs in params.items():
        assert len(loaded[name]) == len(blobs)
        for got, want in zip(loaded[name], blobs):
            assert _bits_equal(got, want), name


def test_hdf5_shared_params_stored_with_owner_only(tmp_path):
    net = FakeNet("siamese", [
        _layer("ip_a", "InnerProduct", params=[("w", 1.0), ("b", 1.0)]),
        _layer("ip_b", "InnerProduct", params=[("w", 1.0), ("", 1.0)]),
        _layer("ip_c", "InnerProduct", params=[("", 1.0), ("b", 1.0)]),
    ])
    w, b = np.ones((2, 3), np.float32), np.full(2, 3.0, np.float32)
    own_b = np.full(2, 7.0, np.float32)
    params = {"ip_a": [w, b], "ip_b": [w, own_b], "ip_c": [2 * w, b]}
    path = cm.save_caffemodel(tmp_path / "s.caffemodel.h5", net, params, fmt="hdf5")
    with h5py.File(path, "r") as f:
        assert sorted(f["data/ip_a"]) == ["0", "1"]
        assert sorted(f["data/ip_b"]) == ["1"]
        assert sorted(f["data/ip_c"]) == ["0"]
    loaded = cm.load_caffemodel(path)
    assert loaded["ip_b"][0] is None and np.array_equal(loaded["ip_b"][1], own_b)
    assert len(loaded["ip_c"]) == 1 and np.array_equal(loaded["ip_c"][0], 2 * w)
    # The binary format writes every layer's blobs, shared ones included.
    bpath = cm.save_caffemodel(tmp_path / "s.caffemodel", net, params)
    assert [len(v) for v in cm.load_caffemodel(bpath).values()] == [2, 2, 2]


def test_hdf5_layer_names_with_slashes(tmp_path):
    net = FakeNet("g", [_layer("inception_3a", "Concat"),
                        _layer("inception_3a/1x1", "Convolution"),
                        _layer("inception_3a/3x3", "Convolution")])
    params = {"inception_3a/1x1": [np.ones((1, 1), np.float32)],
              "inception_3a/3x3": [np.zeros((2,), np.float32), np.ones(3, np.float32)]}
    path = cm.save_caffemodel(tmp_path / "g.caffemodel.h5", net, params, fmt="hdf5")
    loaded = cm.load_caffemodel(path)
    assert sorted(loaded) == sorted(params)
    assert [a.shape for a in loaded["inception_3a/3x3"]] == [(2,), (3,)]


def test_caffe_written_hdf5_model(tmp_path):
    # As Caffe's ToHDF5 leaves it, written without jcaffe; a float64 and an int dataset too
    # (Caffe's loader accepts float and integer classes).
    path = str(tmp_path / "c.caffemodel.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/fc/0", data=np.arange(6, dtype=np.float64).reshape(2, 3))
        f.create_dataset("data/fc/1", data=np.array([1, 2], np.int32))
        f.create_group("data/relu")
    loaded = cm.load_caffemodel(path)
    assert list(loaded) == ["fc"]
    assert all(a.dtype == np.float32 for a in loaded["fc"])
    np.testing.assert_array_equal(loaded["fc"][0], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(loaded["fc"][1], [1, 2])


def test_hdf5_model_under_binary_name_is_detected(tmp_path):
    path = cm.save_caffemodel(tmp_path / "m.caffemodel.h5", _fake_net(), _special_params(),
                              fmt="hdf5")
    renamed = str(tmp_path / "m.caffemodel")
    os.rename(path, renamed)
    assert sorted(cm.load_caffemodel(renamed)) == ["conv1", "ip", "scale"]
    with pytest.raises(ModelError) as e:
        cm.parse_caffemodel(renamed)
    _one_line_error(e, renamed, "is an HDF5 file")


def test_bad_hdf5_models(tmp_path):
    good = cm.save_caffemodel(tmp_path / "m.caffemodel.h5", _fake_net(), _special_params(),
                              fmt="hdf5")
    with open(good, "rb") as f:
        data = f.read()
    cut = _write(tmp_path / "cut.caffemodel.h5", data[: len(data) // 2])
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(cut)
    _one_line_error(e, cut)

    nodata = str(tmp_path / "nodata.caffemodel.h5")
    with h5py.File(nodata, "w") as f:
        f.create_dataset("weights", data=[1.0])
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(nodata)
    _one_line_error(e, nodata, "no group 'data'")

    odd = str(tmp_path / "odd.caffemodel.h5")
    with h5py.File(odd, "w") as f:
        f.create_dataset("data/fc/weights", data=[1.0])
        f.create_dataset("data/fc/0", data=["a"], dtype=h5py.string_dtype())
    with pytest.raises(ModelError) as e:
        cm.load_caffemodel(odd)
    _one_line_error(e, odd, "layer 'fc'")


def test_hdf5_duplicate_layer_name_keeps_old_file(tmp_path):
    path = str(tmp_path / "d.caffemodel.h5")
    _write(path, b"old contents")
    net = FakeNet("d", [_layer("fc", "InnerProduct"), _layer("fc", "InnerProduct")])
    ones = {"fc": [np.ones(2, np.float32)]}
    with pytest.raises(ModelError) as e:
        cm.save_caffemodel(path, net, ones, fmt="hdf5")
    _one_line_error(e, path, "'fc' appears twice")
    # The writer failed midway through its temporary file: no trace of it, old file intact.
    assert os.listdir(tmp_path) == ["d.caffemodel.h5"]
    with open(path, "rb") as f:
        assert f.read() == b"old contents"


# -- binaryproto / BlobProtoVector ------------------------------------------------------------

def test_mean_binaryproto_round_trip(tmp_path):
    mean = (np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5) * 1.7).astype(np.float32)
    mean.flat[0] = -0.0
    path = str(tmp_path / "mean.binaryproto")
    cm.write_binaryproto(path, mean)
    got = cm.read_binaryproto(path)
    assert _bits_equal(got, mean)
    blob = caffe_pb2.BlobProto.FromString(open(path, "rb").read())
    assert list(blob.shape.dim) == [1, 3, 4, 5]


def test_legacy_mean_binaryproto(tmp_path):
    # Older compute_image_mean wrote the 4-d legacy dims.
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2, data=list(range(12)))
    got = cm.read_binaryproto(_write(tmp_path / "mean.binaryproto", blob))
    assert got.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(got[0, 2], [[8, 9], [10, 11]])


def test_bad_binaryproto(tmp_path):
    missing = str(tmp_path / "none.binaryproto")
    with pytest.raises(ModelError) as e:
        cm.read_binaryproto(missing)
    _one_line_error(e, missing, "file not found")
    cut = _write(tmp_path / "cut.binaryproto",
                 cm.array_to_blob(np.ones((1, 3, 4, 4), np.float32)).SerializeToString()[:-30])
    with pytest.raises(ModelError) as e:
        cm.read_binaryproto(cut)
    _one_line_error(e, cut, "truncated or corrupt")


def _blob(**fields):
    b = caffe_pb2.BlobProto()
    for k, v in fields.items():
        if k == "dims":
            b.shape.dim.extend(v)
        elif k in ("data", "double_data"):
            getattr(b, k).extend(v)
        else:
            setattr(b, k, v)
    return b


# Caffe's Blob::FromProto(reshape=true): any of num/channels/height/width set -> the 4-d legacy
# shape (unset ones are 0) and shape.dim is ignored; values from double_data when it is
# non-empty, else from data; the value count must equal the shape's count.
@pytest.mark.parametrize("fields, shape, values", [
    (dict(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6]), (1, 2, 1, 3),
     [1, 2, 3, 4, 5, 6]),
    (dict(dims=[2, 3], data=[6, 5, 4, 3, 2, 1]), (2, 3), [6, 5, 4, 3, 2, 1]),
    # legacy fields win over shape.dim
    (dict(num=1, channels=1, height=2, width=2, dims=[4], data=[1, 2, 3, 4]), (1, 1, 2, 2),
     [1, 2, 3, 4]),
    # one legacy field alone: the others count as 0, so the blob is empty
    (dict(channels=3), (0, 3, 0, 0), []),
    # double_data wins over data, even when data's count would not fit
    (dict(dims=[1, 2], data=[9, 9, 9], double_data=[0.25, -1.5]), (1, 2), [0.25, -1.5]),
    (dict(num=1, channels=1, height=1, width=2, double_data=[1e-50, 3.0]), (1, 1, 1, 2),
     [0.0, 3.0]),
    (dict(dims=[], data=[7.5]), (), [7.5]),
])
def test_binaryproto_follows_caffe_from_proto(tmp_path, fields, shape, values):
    path = _write(tmp_path / "m.binaryproto", _blob(**fields))
    got = cm.read_binaryproto(path)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got.ravel(), np.asarray(values, np.float32))


@pytest.mark.parametrize("fields, needles", [
    (dict(num=1, channels=1, height=2, width=3, data=[1, 2, 3, 4, 5]), ["5 value", "'data'",
                                                                        "[1, 1, 2, 3]", "6"]),
    # double_data non-empty: it is the one checked, even though data would fit
    (dict(dims=[2], data=[1, 2], double_data=[1.0]), ["1 value", "'double_data'", "[2]"]),
    (dict(dims=[2, 2]), ["0 value", "[2, 2]", "4"]),
    (dict(channels=2, data=[1.0]), ["1 value", "[0, 2, 0, 0]"]),
])
def test_binaryproto_count_mismatch_is_one_line_model_error(tmp_path, fields, needles):
    path = _write(tmp_path / "bad_mean.binaryproto", _blob(**fields))
    with pytest.raises(ModelError) as e:
        cm.read_binaryproto(path)
    _one_line_error(e, path, *needles)


def test_legacy_dims_writer_is_compute_image_mean_form(tmp_path):
    mean = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) / 7
    path = str(tmp_path / "mean.binaryproto")
    cm.write_binaryproto(path, mean, legacy_dims=True)
    want = caffe_pb2.BlobProto(num=1, channels=2, height=3, width=4)
    want.data.extend(mean.ravel().tolist())
    got = caffe_pb2.BlobProto.FromString(open(path, "rb").read())
    assert got == want and not got.HasField("shape")
    with pytest.raises(ModelError) as e:
        cm.write_binaryproto(str(tmp_path / "x.binaryproto"), mean[0], legacy_dims=True)
    _one_line_error(e, "x.binaryproto", "4-d")
    assert sorted(os.listdir(tmp_path)) == ["mean.binaryproto"]


def test_blob_proto_vector_round_trip(tmp_path):
    arrays = [SPECIAL.reshape(3, 4), np.zeros((0, 5), np.float32), np.ones(3)]
    path = str(tmp_path / "v.binaryproto")
    cm.write_blob_proto_vector(path, arrays)
    vec = caffe_pb2.BlobProtoVector.FromString(open(path, "rb").read())
    assert [list(b.shape.dim) for b in vec.blobs] == [[3, 4], [0, 5], [3]]
    got = cm.read_blob_proto_vector(path)
    assert _bits_equal(got[0], arrays[0]) and got[1].shape == (0, 5)
    assert got[2].dtype == np.float32 and np.array_equal(got[2], [1, 1, 1])


# -- solver state -----------------------------------------------------------------------------

HISTORY = [SPECIAL.reshape(2, 6), np.arange(5, dtype=np.float32), np.float32(0.25).reshape(())]


def test_solverstate_round_trip(tmp_path):
    path = cm.write_solverstate(tmp_path / "s.solverstate", iter=1000,
                                learned_net="snap/net_iter_1000.caffemodel",
                                history=HISTORY, current_step=3)
    msg = caffe_pb2.SolverState.FromString(open(path, "rb").read())
    assert (msg.iter, msg.learned_net, msg.current_step) == \
        (1000, "snap/net_iter_1000.caffemodel", 3)
    assert [list(h.shape.dim) for h in msg.history] == [[2, 6], [5], []]
    st = cm.read_solverstate(path)
    assert isinstance(st, cm.SolverStateData)
    assert (st.iter, st.learned_net, st.current_step) == (1000, "snap/net_iter_1000.caffemodel", 3)
    assert len(st.history) == 3 and all(_bits_equal(a, b) for a, b in zip(st.history, HISTORY))


def test_solverstate_hdf5_round_trip_and_layout(tmp_path):
    path = cm.write_solverstate(tmp_path / "s.solverstate.h5", iter=7,
                                learned_net="m.caffemodel.h5",
                                history=HISTORY, current_step=1, fmt="hdf5")
    with h5py.File(path, "r") as f:
        # hdf5_save_int: a 1-element int dataset; hdf5_save_string: a NUL-terminated C string.
        assert f["iter"].shape == (1,) and f["iter"].dtype == np.int32 and f["iter"][0] == 7
        assert f["current_step"][0] == 1
        assert f["learned_net"].shape == ()
        assert f["learned_net"].id.get_type().get_strpad() == h5py.h5t.STR_NULLTERM
        assert f["learned_net"][()] == b"m.caffemodel.h5"
        assert sorted(f["history"]) == ["0", "1", "2"]
    st = cm.read_solverstate(path)
    assert (st.iter, st.learned_net, st.current_step) == (7, "m.caffemodel.h5", 1)
    assert all(_bits_equal(a, b) for a, b in zip(st.history, HISTORY))


def test_solverstate_without_learned_net(tmp_path):
    for fmt, name in (("binaryproto", "a.solverstate"), ("hdf5", "a.solverstate.h5")):
        path = cm.write_solverstate(tmp_path / name, iter=2, learned_net="", history=[], fmt=fmt)
        assert cm.read_solverstate(path) == cm.SolverStateData(2, "", [], 0)


@pytest.mark.parametrize("build, needle", [
    (lambda f: f.create_dataset("current_step", data=[0]), "no dataset 'iter'"),
    (lambda f: (f.create_dataset("iter", data=[1.5]), f.create_dataset("current_step", data=[0])),
     "'iter' must hold one integer"),
    (lambda f: (f.create_dataset("iter", data=[1]), f.create_dataset("current_step", data=[0])),
     "no group 'history'"),
    (lambda f: (f.create_dataset("iter", data=[1]), f.create_dataset("current_step", data=[0]),
                f.create_dataset("history/0", data=[1.0]),
                f.create_dataset("history/2", data=[1.0])),
     "history' must hold datasets 0..1"),
])
def test_bad_hdf5_solverstate(tmp_path, build, needle):
    path = str(tmp_path / "bad.solverstate.h5")
    with h5py.File(path, "w") as f:
        build(f)
    with pytest.raises(ModelError) as e:
        cm.read_solverstate(path)
    _one_line_error(e, path, needle)


def test_bad_binary_solverstate(tmp_path):
    state = caffe_pb2.SolverState(iter=3)
    state.history.add(shape=caffe_pb2.BlobShape(dim=[2]), data=[1.0, 2.0])
    state.history.add(shape=caffe_pb2.BlobShape(dim=[4]), data=[1.0])
    path = _write(tmp_path / "s.solverstate", state)
    with pytest.raises(ModelError) as e:
        cm.read_solverstate(path)
    _one_line_error(e, path, "history blob 1", "needs 4")
    noiter = _write(tmp_path / "n.solverstate", caffe_pb2.SolverState(learned_net="x"))
    with pytest.raises(ModelError) as e:
        cm.read_solverstate(noiter)
    _one_line_error(e, noiter, "no 'iter'")
    missing = str(tmp_path / "none.solverstate")
    with pytest.raises(ModelError, match="file not found"):
        cm.read_solverstate(missing)


# -- atomic writes ----------------------------------------------------------------------------

def test_atomic_write_replaces_with_umask_mode(tmp_path):
    path = str(tmp_path / "f.bin")
    cm.atomic_write(path, b"one")
    cm.atomic_write(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_atomic_write_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "model.caffemodel")
    cm.atomic_write(path, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cm.os, "replace", broken_replace)
    with pytest.raises(ModelError) as e:
        cm.save_caffemodel(path, _fake_net(), _special_params())
    _one_line_error(e, path, "No space left on device")
    assert os.listdir(tmp_path) == ["model.caffemodel"]
    assert open(path, "rb").read() == b"old"


def test_atomic_write_failing_writer_keeps_old_file(tmp_path):
    path = str(tmp_path / "f.bin")
    cm.atomic_write(path, b"old")
    with pytest.raises(TypeError):
        cm.atomic_write(path, "not bytes")  # fails inside the write, after the temp file exists
    assert os.listdir(tmp_path) == ["f.bin"]
    assert open(path, "rb").read() == b"old"


def test_atomic_write_into_missing_folder(tmp_path):
    path = str(tmp_path / "no" / "such" / "f.bin")
    with pytest.raises(ModelError) as e:
        cm.atomic_write(path, b"x")
    _one_line_error(e, path, "cannot write")
    assert isinstance(e.value, JcaffeError)


# -- snapshot names ---------------------------------------------------------------------------

def test_snapshot_filenames():
    assert cm.snapshot_filenames("snap/lenet", 10000, "binaryproto") == \
        ("snap/lenet_iter_10000.caffemodel", "snap/lenet_iter_10000.solverstate")
    assert cm.snapshot_filenames("snap/lenet", 5, "hdf5") == \
        ("snap/lenet_iter_5.caffemodel.h5", "snap/lenet_iter_5.solverstate.h5")
    # SolverParameter.snapshot_format values: HDF5 = 0, BINARYPROTO = 1 (the default).
    assert cm.snapshot_filenames("p", 0, caffe_pb2.SolverParameter.HDF5)[0] == \
        "p_iter_0.caffemodel.h5"
    assert cm.snapshot_filenames("p", 0, caffe_pb2.SolverParameter.BINARYPROTO)[1] == \
        "p_iter_0.solverstate"
    with pytest.raises(ValueError, match="snapshot format"):
        cm.snapshot_filenames("p", 1, "json")
