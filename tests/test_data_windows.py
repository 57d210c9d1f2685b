"""WindowData (jcaffe.data.windows + the layer): Caffe's window file, fg/bg sampling, and the
warped crops against a numpy transcription of WindowDataLayer::load_batch (window_data_layer.cpp)
and hand-computed geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from jcaffe.data.image import resize_linear
from jcaffe.data.windows import Warp, warp_geometry
from jcaffe.errors import DataError, LayerError
from jcaffe.layers.base import Context
from jcaffe.proto import caffe_pb2
from tests.layer_utils import make_layer

RNG = np.random.default_rng(77)

# (height, width) of the images the window file names.
SIZES = [(10, 12), (9, 14), (16, 16)]
# (image, class, overlap, x1, y1, x2, y2) in file order; thresholds fg 0.5, bg 0.3.
WINDOWS = [
    (0, 1, 0.9, 1, 1, 6, 7),     # fg class 1
    (0, 2, 0.6, 3, 2, 9, 8),     # fg class 2
    (0, 0, 0.1, 0, 0, 4, 4),     # bg
    (0, 3, 0.4, 2, 2, 5, 5),     # between the thresholds: never used
    (1, 5, 0.2, 2, 1, 10, 7),    # bg although the file gives class 5: bg is labelled 0
    (1, 4, 0.75, 0, 0, 13, 8),   # fg class 4, the whole image
    (2, 1, 0.5, 10, 10, 15, 15),  # fg (overlap == fg_threshold), in the corner
    (2, 0, 0.0, 0, 0, 15, 15),   # bg
]
FG = [w for w in WINDOWS if w[2] >= 0.5]
BG = [w for w in WINDOWS if w[2] < 0.3]


@pytest.fixture
def window_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    bgrs = []
    for i, (h, w) in enumerate(SIZES):
        rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"img{i}.png")
        bgrs.append(rgb[:, :, ::-1])
    lines = []
    for i, (h, w) in enumerate(SIZES):
        mine = [x for x in WINDOWS if x[0] == i]
        lines += [f"# {i}", f"img{i}.png", "3", str(h), str(w), str(len(mine))]
        lines += [f"{c} {o} {x1} {y1} {x2} {y2}" for _, c, o, x1, y1, x2, y2 in mine]
    path = tmp_path / "windows.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(folder) + "/", bgrs


def window_layer(path, root, batch=10, extra="", transform="crop_size: 8", phase="TRAIN"):
    text = (f'type: "WindowData" name: "win" window_data_param {{ source: "{path}" '
            f'root_folder: "{root}" batch_size: {batch} fg_threshold: 0.5 bg_threshold: 0.3 '
            f'{extra} }} transform_param {{ {transform} }}')
    return make_layer(text, [], phase, tops=["data", "label"])


# -- a transcription of Caffe's load_batch for one window ------------------------------------

def c_round(x):
    return int(math.floor(abs(float(x)) + 0.5)) * (1 if x >= 0 else -1)


def caffe_window(img, box, crop, context_pad, square, mirror, scale=1.0, mean=None,
                 mean_values=None):
    """One item of WindowDataLayer::load_batch, line by line (float32 = Caffe's Dtype)."""
    f = np.float32
    x1, y1, x2, y2 = box
    rows, cols, channels = img.shape
    size_w = size_h = crop
    pad_w = pad_h = 0
    if context_pad > 0 or square:
        context_scale = f(crop) / f(crop - 2 * context_pad)
        half_height = f(f(y2 - y1 + 1) / 2.0)
        half_width = f(f(x2 - x1 + 1) / 2.0)
        center_x = f(x1) + half_width
        center_y = f(y1) + half_height
        if square:
            if half_height > half_width:
                half_width = half_height
            else:
                half_height = half_width
        x1 = c_round(center_x - half_width * context_scale)
        x2 = c_round(center_x + half_width * context_scale)
        y1 = c_round(center_y - half_height * context_scale)
        y2 = c_round(center_y + half_height * context_scale)
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        clipped_height, clipped_width = y2 - y1 + 1, x2 - x1 + 1
        scale_x = f(crop) / f(unclipped_width)
        scale_y = f(crop) / f(unclipped_height)
        size_w = c_round(f(clipped_width) * scale_x)
        size_h = c_round(f(clipped_height) * scale_y)
        pad_x1 = c_round(f(pad_x1) * scale_x)
        pad_x2 = c_round(f(pad_x2) * scale_x)
        pad_y1 = c_round(f(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1
        if pad_h + size_h > crop:
            size_h = crop - pad_h
        if pad_w + size_w > crop:
            size_w = crop - pad_w
    patch = resize_linear(img[y1:y2 + 1, x1:x2 + 1], size_h, size_w)  # cv::resize INTER_LINEAR
    if mirror:
        patch = patch[:, ::-1]
    top = np.zeros(channels * crop * crop, np.float32)
    if mean is not None:
        mean_height, mean_width = mean.shape[1], mean.shape[2]
        mean_off = (mean_width - crop) // 2
        mean_flat = mean.ravel()
    for h in range(patch.shape[0]):
        for w in range(patch.shape[1]):
            for c in range(channels):
                top_index = (c * crop + h + pad_h) * crop + w + pad_w
                pixel = f(patch[h, w, c])
                if mean is not None:
                    mean_index = (c * mean_height + h + mean_off + pad_h) * mean_width + \
                        w + mean_off + pad_w
                    top[top_index] = (pixel - mean_flat[mean_index]) * f(scale)
                elif mean_values is not None:
                    top[top_index] = (pixel - f(mean_values[c])) * f(scale)
                else:
                    top[top_index] = pixel * f(scale)
    return top.reshape(channels, crop, crop)


# -- geometry, hand-computed -----------------------------------------------------------------

@pytest.mark.parametrize("box, hw, crop, pad, square, mirror, want", [
    # context 2 in crop 8: scale 2; box 0..3 grows to -2..6 (9 px), clipped to 0..6 (7 px);
    # 7 * 8/9 = 6.22 -> 6 px placed after round(2 * 8/9) = 2 px of padding.
    ((0, 0, 3, 3), (10, 10), 8, 2, False, False, Warp(0, 0, 6, 6, 6, 6, 2, 2)),
    # mirrored: the left padding is the right one's, round(0 * 8/9) = 0
    ((0, 0, 3, 3), (10, 10), 8, 2, False, True, Warp(0, 0, 6, 6, 6, 6, 2, 0)),
    # square: the 4x8 box becomes 8x8 about its centre (4, 5): 0..8 x 1..9, 9 px -> 8
    ((2, 1, 5, 8), (10, 12), 8, 0, True, False, Warp(0, 1, 8, 9, 8, 8, 0, 0)),
    # C rounding, half away from zero: 2 - 1.5 = 0.5 -> 1, 2 + 1.5 = 3.5 -> 4
    ((1, 1, 2, 2), (10, 10), 6, 1, False, False, Warp(1, 1, 4, 4, 6, 6, 0, 0)),
    # plain warp: the box itself, resized to crop x crop
    ((3, 2, 9, 8), (10, 12), 5, 0, False, True, Warp(3, 2, 9, 8, 5, 5, 0, 0)),
])
def test_warp_geometry_by_hand(box, hw, crop, pad, square, mirror, want):
    assert warp_geometry(box, hw, crop, pad, square, mirror) == want


def test_warp_outside_the_image_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        warp_geometry((3, 2, 12, 8), (10, 12), 5, 0, False, False)


# -- the layer and its reader ----------------------------------------------------------------

def test_shapes_specs_and_fg_bg_counts(window_file):
    path, root, _ = window_file
    # Caffe: int(float(10) * 0.7f) = 7 foreground windows (a double product would give 6).
    layer = window_layer(path, root, batch=10, extra="fg_fraction: 0.7")
    assert layer.top_shapes == [(10, 3, 8, 8), (10,)]
    assert layer.input_specs() == [("data", (10, 3, 8, 8), np.dtype(np.float32)),
                                   ("label", (10,), np.dtype(np.int32))]
    assert not layer.needs_key
    fg_labels = {w[1] for w in FG}
    with layer.make_reader(seed=5) as r:
        assert r.shuffled and r.count == len(FG) + len(BG) and r.num_fg == 7
        seen = set()
        for _ in range(20):
            b = r.next_batch()
            labels = b["label"]
            assert labels.dtype == np.int32
            assert (labels[:3] == 0).all()  # background first, labelled 0
            assert set(labels[3:].tolist()) <= fg_labels and (labels[3:] > 0).all()
            seen |= set(labels.tolist())
    assert seen == fg_labels | {0}  # every fg class sampled; class 3 (dropped) never


@pytest.mark.parametrize("batch, fraction, n_fg", [(4, 0.25, 1), (5, 0.25, 1), (3, 0.0, 0),
                                                  (4, 1.0, 4), (20, 0.9, 18), (10, 0.9, 9)])
def test_foreground_count_per_batch(window_file, batch, fraction, n_fg):
    path, root, _ = window_file
    layer = window_layer(path, root, batch=batch, extra=f"fg_fraction: {fraction}")
    with layer.make_reader(seed=1) as r:
        for _ in range(3):
            labels = r.next_batch()["label"]
            assert int((labels > 0).sum()) == n_fg
            assert (labels[:batch - n_fg] == 0).all()


CONFIGS = {
    "warp": ("", "crop_size: 8", {}),
    "context_mirror_mean_value": ("context_pad: 2 scale: 0.5",
                                  "crop_size: 8 mirror: true mean_value: 10 mean_value: 20 "
                                  "mean_value: 30", {"mean_values": [10, 20, 30]}),
    "square_mean_file_cache": ('crop_mode: "square" context_pad: 1 cache_images: true '
                               'scale: 0.25', "crop_size: 6", {"mean": True}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_crops_match_caffe_load_batch(window_file, tmp_path, name):
    path, root, bgrs = window_file
    extra, transform, ref_kw = CONFIGS[name]
    mean = None
    if ref_kw.get("mean"):
        # off = (width 8 - crop 6) / 2 = 1 for rows too (Caffe takes it from the width)
        mean = RNG.uniform(0, 255, (1, 3, 10, 8)).astype(np.float32)
        bp = caffe_pb2.BlobProto(num=1, channels=3, height=10, width=8)
        bp.data.extend(mean.ravel().tolist())
        (tmp_path / "mean.binaryproto").write_bytes(bp.SerializeToString())
        transform += f' mean_file: "{tmp_path / "mean.binaryproto"}"'
    layer = window_layer(path, root, batch=6, extra=extra + " fg_fraction: 0.5",
                         transform=transform)
    crop = layer.crop_size
    scale = layer.scale
    with layer.make_reader(seed=11) as r:
        flips = []
        for k in range(3):
            picks = r.samples(r.position)
            batch = r.next_batch()
            tops = layer.apply([], [batch["data"], batch["label"]], Context(train=True))
            data = np.asarray(tops[0])
            np.testing.assert_array_equal(np.asarray(tops[1]),
                                          [p.window.label for p in picks])
            assert [p.foreground for p in picks] == [False] * 3 + [True] * 3
            for i, p in enumerate(picks):
                w = p.window
                ref = caffe_window(bgrs[w.image], (w.x1, w.y1, w.x2, w.y2), crop,
                                   layer.context_pad, layer.crop_mode == "square", p.mirror,
                                   scale, mean=None if mean is None else mean[0],
                                   mean_values=ref_kw.get("mean_values"))
                np.testing.assert_allclose(data[i], ref, rtol=0, atol=1e-5)
                flips.append(p.mirror)
    if "mirror" in transform:
        assert any(flips) and not all(flips)
    else:
        assert not any(flips)


def test_zero_outside_the_warped_window(window_file):
    # The corner window of image 2 with context 2 reaches past the image: its padding stays 0
    # even with a mean value subtracted (Caffe zeroes the batch before writing the windows).
    path, root, bgrs = window_file
    layer = window_layer(path, root, batch=4, extra="context_pad: 2 fg_fraction: 1",
                         transform="crop_size: 8 mean_value: 100")
    with layer.make_reader(seed=0) as r:
        for _ in range(10):
            picks = r.samples(r.position)
            data = r.next_batch()["data"]
            for i, p in enumerate(picks):
                if p.window.x1 == 10:  # (10, 10, 15, 15) in 16x16: grows to 7..18, clipped at 15
                    geo = warp_geometry((10, 10, 15, 15), (16, 16), 8, 2, False, False)
                    assert geo.pad_h == 0 and geo.height < 8 and geo.width < 8
                    assert (data[i][:, geo.height:, :] == 0).all()
                    assert (data[i][:, :, geo.width:] == 0).all()
                    assert (data[i][:, :geo.height, :geo.width] != 0).any()
                    return
    pytest.fail("the corner window was never drawn")


def test_deterministic_given_the_seed_and_seekable(window_file):
    path, root, _ = window_file
    layer = window_layer(path, root, batch=4, transform="crop_size: 8 mirror: true")
    with layer.make_reader(seed=3) as a, layer.make_reader(seed=3) as b, \
            layer.make_reader(seed=4) as c:
        xs = [a.next_batch() for _ in range(3)]
        ys = [b.next_batch() for _ in range(3)]
        zs = [c.next_batch() for _ in range(3)]
        for x, y in zip(xs, ys):
            np.testing.assert_array_equal(x["data"], y["data"])
            np.testing.assert_array_equal(x["label"], y["label"])
        assert any(not np.array_equal(x["data"], z["data"]) for x, z in zip(xs, zs))
        b.seek(4)
        np.testing.assert_array_equal(b.next_batch()["data"], xs[1]["data"])
        np.testing.assert_array_equal(a.batch_at(8)["data"], xs[2]["data"])


def test_prefetch_feeder_serves_window_batches(window_file):
    from jcaffe.data import feed

    path, root, _ = window_file
    layer = window_layer(path, root, batch=4)
    with layer.make_reader(seed=2) as r:
        want = [r.next_batch() for _ in range(2)]
    f = feed.choose_feeder(layer, seed=2)
    try:
        assert isinstance(f, feed.PrefetchFeeder)  # random sampling: never device-resident
        got = [next(iter(f)) for _ in range(2)]
    finally:
        f.close()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g["data"]), w["data"])


# -- bad input -------------------------------------------------------------------------------

GOOD_HEAD = "# 0\nimg0.png\n3\n10\n12\n2\n1 0.9 1 1 6 7\n0 0.1 0 0 4 4\n"


@pytest.mark.parametrize("text, line, needle", [
    ("", 1, "empty"),
    ("0\nimg0.png\n", 1, "expected '#'"),
    ("# 1\nimg0.png\n3 10 12 0\n", 1, "numbered 0, 1, 2"),
    ("# 0\nimg0.png\nthree 10 12 0\n", 3, "channels must be an integer"),
    ("# 0\nimg0.png\n1\n10\n12\n0\n", 3, "1 channels"),
    ("# 0\nimg0.png\n3\n10\n12\n2\n1 0.9 1 1 6 7\n", 7, "file ends"),
    ("# 0\nimg0.png\n3\n10\n12\n1\n1 high 1 1 6 7\n", 7, "overlap must be a number"),
    ("# 0\nimg0.png\n3\n10\n12\n1\n1 0.9 1 1 6.5 7\n", 7, "x2 must be an integer"),
    ("# 0\nimg0.png\n3\n10\n12\n1\n1 0.9 6 1 1 7\n", 7, "not a box"),
    ("# 0\nimg0.png\n3\n10\n12\n2\n1 0.1 0 0 4 4\n0 0.9 1 1 6 7\n", 8, "has class 0"),
    (GOOD_HEAD + "# 1\n", 9, "file ends"),
])
def test_malformed_window_files_name_file_and_line(window_file, tmp_path, text, line, needle):
    _, root, _ = window_file
    bad = tmp_path / "bad_windows.txt"
    bad.write_text(text)
    with pytest.raises(DataError) as e:
        window_layer(str(bad), root)
    msg = str(e.value)
    assert "\n" not in msg and "layer 'win'" in msg and needle in msg
    if needle != "empty":
        assert f"{bad}:{line}:" in msg, msg


@pytest.mark.parametrize("windows, needle", [
    ("1 0.9 1 1 6 7\n", "no background"),
    ("0 0.1 0 0 4 4\n", "no foreground"),
])
def test_needs_both_kinds_of_window(window_file, tmp_path, windows, needle):
    _, root, _ = window_file
    bad = tmp_path / "w.txt"
    bad.write_text(f"# 0\nimg0.png\n3 10 12\n1\n{windows}")
    with pytest.raises(DataError, match=needle):
        window_layer(str(bad), root)


def test_missing_files_and_windows_outside_the_image(window_file, tmp_path):
    path, root, _ = window_file
    with pytest.raises(DataError, match="failed to open window file"):
        window_layer(str(tmp_path / "none.txt"), root)
    gone = tmp_path / "gone.txt"
    gone.write_text("# 0\nmissing.png\n3 10 12\n2\n1 0.9 1 1 6 7\n0 0.1 0 0 4 4\n")
    layer = window_layer(str(gone), root, batch=2)
    with pytest.raises(DataError, match="missing.png"):
        layer.make_reader(seed=0).next_batch()
    with pytest.raises(DataError, match="missing.png"):
        window_layer(str(gone), root, batch=2, extra="cache_images: true").make_reader(seed=0)
    outside = tmp_path / "outside.txt"
    outside.write_text("# 0\nimg0.png\n3 10 12\n2\n1 0.9 1 1 60 7\n0 0.1 0 0 4 4\n")
    layer = window_layer(str(outside), root, batch=2, extra="fg_fraction: 1")
    with pytest.raises(DataError) as e:
        layer.make_reader(seed=0).next_batch()
    assert f"{outside}:5:" in str(e.value) and "outside" in str(e.value)


@pytest.mark.parametrize("extra, transform, needle", [
    ("", "mirror: true", "crop_size"),
    ("context_pad: 4", "crop_size: 8", "context_pad"),
    ('crop_mode: "stretch"', "crop_size: 8", "crop_mode"),
    ("fg_fraction: 1.5", "crop_size: 8", "fg_fraction"),
    ("", "crop_size: 8 mean_value: 1 mean_value: 2", "mean_value"),
])
def test_bad_parameters(window_file, extra, transform, needle):
    path, root, _ = window_file
    with pytest.raises(LayerError, match=needle):
        window_layer(path, root, extra=extra, transform=transform)


def test_mean_file_too_small_for_the_crop(window_file, tmp_path):
    path, root, _ = window_file
    bp = caffe_pb2.BlobProto(num=1, channels=3, height=5, width=5)
    bp.data.extend([0.0] * 75)
    mf = tmp_path / "small_mean.binaryproto"
    mf.write_bytes(bp.SerializeToString())
    with pytest.raises(DataError, match="small_mean.binaryproto"):
        window_layer(path, root, transform=f'crop_size: 8 mean_file: "{mf}"')
