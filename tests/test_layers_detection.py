"""The SSD fork's deploy layers (Normalize, Permute, PriorBox, DetectionOutput) against numpy
re-implementations of the fork's formulas (weiliu89/caffe ssd branch: normalize_layer.cpp,
permute_layer.cpp, prior_box_layer.cpp, detection_output_layer.cpp, bbox_util.cpp), and whole
SSD-shaped nets against OpenCV 4.x's dnn module, an independent implementation of the same
layers, on weights jcaffe wrote as a .caffemodel."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe.caffemodel import save_caffemodel
from jcaffe.layers.base import layer_class
from jcaffe.layers.detection import detections
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2, ssd_pb2
from layer_utils import check_gradient, run

DATA = pathlib.Path(__file__).parent / "data"
TINY = DATA / "ssd_tiny_deploy.prototxt"
MOBILENET = DATA / "mobilenet_ssd_tiny_deploy.prototxt"


def make(text, bottom_shapes, phase=caffe_pb2.TEST):
    """A layer from LayerParameter text that may use the fork's fields."""
    lp = text_format.Parse(text, ssd_pb2.LayerParameter())
    lp = caffe_pb2.LayerParameter.FromString(lp.SerializeToString())
    lp.name = lp.name or "layer"
    if not lp.bottom:
        lp.bottom.extend(f"b{i}" for i in range(len(bottom_shapes)))
    if not lp.top:
        lp.top.append("t0")
    return layer_class(lp)(lp, bottom_shapes, phase)


# -- Normalize ------------------------------------------------------------------------------
def normalize_ref(x, scale, across_spatial, eps):
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1).astype(np.float64)
    if across_spatial:
        norm = np.sqrt((x3 ** 2).sum(axis=(1, 2), keepdims=True) + eps)
    else:
        norm = np.sqrt((x3 ** 2).sum(axis=1, keepdims=True) + eps)
    s = np.asarray(scale, np.float64).reshape(1, -1, 1) if np.ndim(scale) else scale
    return (x3 / norm * s).reshape(x.shape)


@pytest.mark.parametrize("across_spatial", [True, False])
@pytest.mark.parametrize("channel_shared", [True, False])
def test_normalize_matches_the_forks_formula_and_gradient(across_spatial, channel_shared):
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across_spatial).lower()} '
            f'channel_shared: {str(channel_shared).lower()} eps: 0.01 '
            f'scale_filler {{ type: "constant" value: 20 }} }}')
    layer = make(text, [(2, 3, 4, 5)])
    assert layer.blob_shapes == [() if channel_shared else (3,)]
    blobs = [np.asarray(b) for b in layer.init(jax.random.key(0))]
    assert np.all(blobs[0] == 20)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    scale = np.float32(1.5) if channel_shared else np.array([1.0, 2.0, -0.5], np.float32)
    got = run(layer, [scale], [x], train=False)[0]
    np.testing.assert_allclose(got, normalize_ref(x, scale, across_spatial, 0.01), rtol=1e-5,
                               atol=1e-6)
    if across_spatial == channel_shared:  # two of the four cases: each costs seconds
        check_gradient(layer, [scale], [x], train=False,
                       max_elems=20)


def test_normalize_scale_defaults_to_one_and_eps_to_1e10():
    layer = make('type: "Normalize"', [(1, 2)])
    assert layer.eps == pytest.approx(1e-10) and layer.across_spatial and layer.channel_shared
    assert np.asarray(layer.init(jax.random.key(0))[0]) == 1.0
    x = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(run(layer, [np.float32(1)], [x])[0], [[0.6, 0.8]], rtol=1e-6)


# -- Permute --------------------------------------------------------------------------------
def test_permute_follows_the_forks_index_arithmetic():
    layer = make('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }',
                 [(2, 3, 4, 5)])
    assert layer.top_shapes == [(2, 4, 5, 3)]
    x = np.arange(120, dtype=np.float32).reshape(2, 3, 4, 5)
    got = run(layer, [], [x])[0].reshape(-1)
    # The fork's Permute(): top[i] = bottom[sum_j (i / new_steps[j]) % ... * old_steps[order[j]]]
    old_steps, new_steps = [60, 20, 5, 1], [60, 15, 3, 1]
    order = [0, 2, 3, 1]
    want = []
    for i in range(120):
        idx, old = i, 0
        for j in range(4):
            old += (idx // new_steps[j]) * old_steps[order[j]]
            idx %= new_steps[j]
        want.append(x.reshape(-1)[old])
    np.testing.assert_array_equal(got, want)
    # Axes left out follow in order; a repeated axis is an error.
    assert make('type: "Permute" permute_param { order: 1 }', [(2, 3, 4)]).top_shapes == \
        [(3, 2, 4)]
    with pytest.raises(Exception, match="repeats order 1"):
        make('type: "Permute" permute_param { order: 1 order: 1 }', [(2, 3, 4)])


# -- PriorBox -------------------------------------------------------------------------------
def test_prior_box_hand_computed():
    # A 1x2 feature map of a 20x10 (w x h) image, min 4 max 9 aspect 2 with flip: per
    # position the squares of side 4 and sqrt(36) = 6, then 4*sqrt(2) x 4/sqrt(2) and its flip.
    layer = make('type: "PriorBox" prior_box_param { min_size: 4 max_size: 9 aspect_ratio: 2 '
                 'flip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }',
                 [(1, 8, 1, 2), (1, 3, 10, 20)])
    assert layer.top_shapes == [(1, 2, 2 * 4 * 4)]
    top = run(layer, [], [np.zeros((1, 8, 1, 2)), np.zeros((1, 3, 10, 20))])[0]
    step_w, step_h = 10.0, 10.0
    want = []
    for w in range(2):
        cx, cy = (w + 0.5) * step_w, 0.5 * step_h
        for bw, bh in [(4, 4), (6, 6), (4 * math.sqrt(2), 4 / math.sqrt(2)),
                       (4 * math.sqrt(0.5), 4 / math.sqrt(0.5))]:
            want += [(cx - bw / 2) / 20, (cy - bh / 2) / 10, (cx + bw / 2) / 20,
                     (cy + bh / 2) / 10]
    np.testing.assert_allclose(top[0, 0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(top[0, 1], [0.1, 0.1, 0.2, 0.2] * 8, rtol=1e-7)


def test_prior_box_step_img_size_offset_clip_and_one_variance():
    layer = make('type: "PriorBox" prior_box_param { min_size: 30.7 clip: true img_h: 100 '
                 'img_w: 50 step_h: 40 step_w: 20 offset: 0 variance: 0.3 }',
                 [(1, 8, 2, 2), (1, 3, 7, 7)])
    top = run(layer, [], [np.zeros((1, 8, 2, 2)), np.zeros((1, 3, 7, 7))])[0]
    want = []
    for h in range(2):
        for w in range(2):
            cx, cy = w * 20.0, h * 40.0
            # The fork truncates a min_size to an integer (int min_size_ = min_sizes_[s]).
            want += [(cx - 15) / 50, (cy - 15) / 100, (cx + 15) / 50, (cy + 15) / 100]
    np.testing.assert_allclose(top[0, 0], np.clip(want, 0, 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(top[0, 1], 0.3, rtol=1e-7)


@pytest.mark.parametrize("param, message", [
    ("", "at least one min_size"),
    ("min_size: 4 max_size: 3", "greater than min_size"),
    ("min_size: 4 variance: 0.1 variance: 0.2", "give 1 or 4"),
    ("min_size: 4 step: 2 step_h: 2 step_w: 2", "either step or step_h/step_w"),
])
def test_prior_box_errors_name_the_layer(param, message):
    with pytest.raises(Exception, match=f"layer 'layer' .*{message}"):
        make(f'type: "PriorBox" prior_box_param {{ {param} }}', [(1, 8, 2, 2), (1, 3, 8, 8)])


# -- DetectionOutput: numpy reference of the fork's Forward_cpu -----------------------------
def decode_ref(loc, prior, var, code_type, var_in_target):
    f = np.float32
    v = np.ones(4, f) if var_in_target else var
    if code_type == 1:  # CORNER
        return prior + v * loc
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code_type == 3:  # CORNER_SIZE
        return prior + v * loc * np.array([pw, ph, pw, ph], f)
    pcx, pcy = (prior[0] + prior[2]) / f(2), (prior[1] + prior[3]) / f(2)
    cx, cy = v[0] * loc[0] * pw + pcx, v[1] * loc[1] * ph + pcy
    w, h = np.exp(v[2] * loc[2]) * pw, np.exp(v[3] * loc[3]) * ph
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], f)


def size_ref(b):
    return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def iou_ref(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (size_ref(a) + size_ref(b) - inter)


def detection_output_ref(loc, conf, prior, *, num_classes, share_location=True, bg=0,
                         code_type=1, var_in_target=False, keep_top_k=-1, conf_thr=-np.inf,
                         nms_thr=0.3, eta=1.0, top_k=-1):
    num, p = loc.shape[0], prior.shape[2] // 4
    nl = 1 if share_location else num_classes
    pb, pv = prior[0, 0].reshape(p, 4), prior[0, 1].reshape(p, 4)
    out = []
    for i in range(num):
        lp = loc[i].reshape(p, nl, 4)
        cf = conf[i].reshape(p, num_classes)
        dec = {c: [decode_ref(lp[j, c], pb[j], pv[j], code_type, var_in_target)
                   for j in range(p)] for c in range(nl)}
        indices = {}
        for c in range(num_classes):
            if c == bg:
                continue
            boxes = dec[0 if share_location else c]
            scores = cf[:, c]
            order = sorted((j for j in range(p) if scores[j] > conf_thr), key=lambda j: -scores[j])
            if top_k > -1:
                order = order[:top_k]
            kept, thr = [], nms_thr
            for j in order:
                keep = all(iou_ref(boxes[j], boxes[k]) <= thr for k in kept)
                if keep:
                    kept.append(j)
                    if eta < 1 and thr > 0.5:
                        thr *= eta
            indices[c] = kept
        if keep_top_k > -1 and sum(map(len, indices.values())) > keep_top_k:
            pairs = sorted(((cf[j, c], c, j) for c, js in indices.items() for j in js),
                           key=lambda t: -t[0])[:keep_top_k]
            indices = {}
            for _, c, j in pairs:
                indices.setdefault(c, []).append(j)
        rows = []
        for c in sorted(indices):
            for j in indices[c]:
                rows.append([i, c, cf[j, c], *dec[0 if share_location else c][j]])
        out.append(np.asarray(rows, np.float32).reshape(-1, 7))
    return out


def random_detection_inputs(rng, num, p, num_classes, nl):
    centre = rng.uniform(0.1, 0.9, (p, 2))
    size = rng.uniform(0.05, 0.4, (p, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    prior = np.stack([boxes.reshape(-1), np.tile([0.1, 0.1, 0.2, 0.2], p)])[None]
    loc = rng.normal(0, 0.5, (num, p * nl * 4))
    logits = rng.normal(0, 1.5, (num, p, num_classes))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return (loc.astype(np.float32), conf.reshape(num, -1).astype(np.float32),
            prior.astype(np.float32))


DETECTION_CASES = [
    dict(num_classes=4, code_type=2, keep_top_k=15, conf_thr=0.2, nms_thr=0.45, top_k=30),
    dict(num_classes=3, share_location=False, code_type=1, conf_thr=0.3, nms_thr=0.3),
    dict(num_classes=3, bg=-1, code_type=3, var_in_target=True, eta=0.8, nms_thr=0.7,
         keep_top_k=25, top_k=40),
]


def _detection_text(num_classes, share_location=True, bg=0, code_type=1, var_in_target=False,
                    keep_top_k=-1, conf_thr=None, nms_thr=0.3, eta=1.0, top_k=-1):
    code = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}[code_type]
    nms = f"nms_threshold: {nms_thr} eta: {eta}" + (f" top_k: {top_k}" if top_k > -1 else "")
    thr = f" confidence_threshold: {conf_thr}" if conf_thr is not None else ""
    return (f'type: "DetectionOutput" detection_output_param {{ num_classes: {num_classes} '
            f'share_location: {str(share_location).lower()} background_label_id: {bg} '
            f'code_type: {code} variance_encoded_in_target: {str(var_in_target).lower()} '
            f'keep_top_k: {keep_top_k}{thr} nms_param {{ {nms} }} }}')


@pytest.mark.parametrize("case", DETECTION_CASES, ids=lambda c: f"code{c['code_type']}")
def test_detection_output_matches_the_forks_algorithm(case):
    rng = np.random.default_rng(3)
    p, num = 50, 2
    nl = 1 if case.get("share_location", True) else case["num_classes"]
    loc, conf, prior = random_detection_inputs(rng, num, p, case["num_classes"], nl)
    layer = make(_detection_text(**case), [loc.shape, conf.shape, prior.shape])
    top = np.asarray(jax.jit(lambda *b: layer.apply([], list(b), None)[0])(loc, conf, prior))
    assert top.shape == layer.top_shapes[0] == (1, 1, num * layer.rows, 7)
    want = detection_output_ref(loc, conf, prior, **case)
    got = detections(top)
    assert len(got) == num
    for g, w in zip(got, want):
        assert len(w) > 3
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Padding rows: [image, -1, -1, -1, -1, -1, -1] after each image's detections.
    rows = top.reshape(num, layer.rows, 7)
    for i in range(num):
        pad = rows[i, len(want[i]):]
        assert np.all(pad[:, 0] == i) and np.all(pad[:, 1:] == -1)


def test_detection_output_shape_checks():
    with pytest.raises(Exception, match="need 40 location predictions"):
        make(_detection_text(3), [(1, 44), (1, 30), (1, 2, 40)])
    with pytest.raises(Exception, match="needs num_classes"):
        make('type: "DetectionOutput"', [(1, 40), (1, 30), (1, 2, 40)])


# -- whole nets against OpenCV dnn ----------------------------------------------------------
cv2 = pytest.importorskip("cv2")


def assert_same_detections(ours, theirs, score_tol=1e-5, box_tol=1e-4):
    """Each row of ``ours`` pairs with its own row of ``theirs``: same image and label, scores
    within ``score_tol``, corners within ``box_tol`` (rows are matched, not compared in order:
    two scores a float32 rounding apart may come out in either order)."""
    ours = np.asarray(ours, np.float64).reshape(-1, 7)
    theirs = np.asarray(theirs, np.float64).reshape(-1, 7)
    theirs = theirs[theirs[:, 1] >= 0]
    assert len(ours) == len(theirs)
    free = np.ones(len(theirs), bool)
    for row in ours:
        close = (free & (theirs[:, 0] == row[0]) & (theirs[:, 1] == row[1])
                 & (np.abs(theirs[:, 2] - row[2]) <= score_tol)
                 & (np.abs(theirs[:, 3:] - row[3:]).max(axis=1) <= box_tol))
        assert close.any(), f"no OpenCV detection matches {row}"
        free[np.argmax(close)] = False


def compare_with_opencv(prototxt, tmp_path, x, key=0):
    net = Net(str(prototxt), "TEST", verbose=False)
    params = net.init(jax.random.key(key))
    rng = np.random.default_rng(key)
    for layer in net.layers:
        if layer.type == "BatchNorm":  # trained-looking statistics: mean, variance, factor 1
            c = layer.blob_shapes[0][0]
            params[layer.name] = [rng.normal(0, 0.2, c).astype(np.float32),
                                  rng.uniform(0.5, 2, c).astype(np.float32),
                                  np.ones(1, np.float32)]
    model = save_caffemodel(tmp_path / "w.caffemodel", net, params)
    out = jax.jit(lambda p, x: net.apply(p, {"data": x}))(params, x)
    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
    cvnet.setInput(x)
    names = ["mbox_priorbox", "mbox_loc", "mbox_conf_flatten", "detection_out"]
    cv_out = dict(zip(names, cvnet.forward(names)))
    return net, out, cv_out, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    return compare_with_opencv(TINY, tmp_path_factory.mktemp("tiny"), x)


def test_tiny_ssd_blobs_match_opencv(tiny):
    net, out, cv_out, _ = tiny
    assert net.blob_shapes["mbox_priorbox"] == (1, 2, 1408)  # 8*8*4 + 4*4*6 = 352 priors
    for name in ("mbox_priorbox", "mbox_loc", "mbox_conf_flatten"):
        np.testing.assert_allclose(np.asarray(out[name]), cv_out[name].reshape(out[name].shape),
                                   rtol=1e-5, atol=2e-6, err_msg=name)


def test_tiny_ssd_detections_match_opencv(tiny):
    net, out, cv_out, _ = tiny
    ours = np.concatenate(detections(out["detection_out"]))
    assert len(ours) > 20
    assert_same_detections(ours, cv_out["detection_out"])


def test_mobilenet_ssd_layout_matches_opencv(tmp_path):
    """Depthwise convolutions with BatchNorm + Scale, a PriorBox without max_size, one with
    img_h / img_w and step_h / step_w, clip, a non-square input (MobileNet-SSD's layout)."""
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 48)).astype(np.float32)
    net, out, cv_out, _ = compare_with_opencv(MOBILENET, tmp_path, x)
    assert net.blob_shapes["mbox_priorbox"] == (1, 2, 4 * (16 * 24 * 3 + 8 * 12 * 6))
    for name in ("mbox_priorbox", "mbox_loc", "mbox_conf_flatten"):
        ours, theirs = np.asarray(out[name]).reshape(-1), cv_out[name].reshape(-1)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max(),
                                   err_msg=name)
    ours = detections(out["detection_out"])[0]
    assert len(ours) >= 10
    assert_same_detections(ours, cv_out["detection_out"])


def test_detector_reads_the_padded_top_per_image(tiny):
    """jcaffe.Detector over 3 images with a batch-2 net: two forward passes, image ids 0..2,
    padding dropped; the detections are OpenCV's on the same preprocessed inputs."""
    import jcaffe

    _, _, _, model = tiny
    rng = np.random.default_rng(5)
    images = [rng.uniform(0, 1, (32, 32, 3)).astype(np.float32) for _ in range(3)]
    det = jcaffe.Detector(str(TINY), str(model), raw_scale=2.0, mean=np.ones(3))
    found = det.detect(images, threshold=0.35)
    assert [int(r[0, 0]) for r in found] == [0, 1, 2]
    assert all(np.all(r[:, 2] >= 0.35) for r in found)
    cvnet = cv2.dnn.readNetFromCaffe(str(TINY), str(model))
    x = np.stack([im.transpose(2, 0, 1) * 2.0 - 1.0 for im in images] + [np.zeros((3, 32, 32))])
    for start in (0, 2):
        cvnet.setInput(x[start:start + 2].astype(np.float32))
        theirs = cvnet.forward("detection_out").reshape(-1, 7).copy()
        theirs = theirs[(theirs[:, 0] == 0) | (start == 0)]
        theirs = theirs[theirs[:, 2] >= 0.35]
        theirs[:, 0] += start
        ours = np.concatenate(found[start:start + 2])
        assert len(ours) > 0
        assert_same_detections(ours, theirs)


ZOO_SSD300 = DATA.parents[1] / ".." / "shared" / "zoo" / "ssd300_voc0712_deploy.prototxt"


@pytest.fixture(scope="module")
def ssd300(tmp_path_factory):
    if not ZOO_SSD300.exists():
        pytest.skip("../shared/zoo is absent")
    # An image-like input (BGR minus the VOC mean: about -120 .. 130).
    x = np.random.default_rng(1).uniform(-120, 130, (1, 3, 300, 300)).astype(np.float32)
    with pytest.warns(UserWarning, match="save_output_param.output_directory is not supported"):
        return compare_with_opencv(ZOO_SSD300, tmp_path_factory.mktemp("ssd300"), x)


def test_ssd300_matches_opencv(ssd300):
    """The zoo's SSD300 (VGG-16, 8732 priors, 21 classes) on any weights: jcaffe and OpenCV
    give the same priors, loc / conf blobs (to float32 rounding over VGG-16's depth) and
    detections."""
    net, out, cv_out, _ = ssd300
    assert net.blob_shapes["mbox_priorbox"] == (1, 2, 4 * 8732)
    assert net.blob_shapes["mbox_conf_flatten"] == (1, 8732 * 21)
    assert net.blob_shapes["detection_out"] == (1, 1, 200, 7)  # keep_top_k 200
    for name, tol in (("mbox_priorbox", 1e-6), ("mbox_loc", 1e-4), ("mbox_conf_flatten", 1e-4)):
        ours, theirs = np.asarray(out[name]).reshape(-1), cv_out[name].reshape(-1)
        assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max(), name
    ours = detections(out["detection_out"])[0]
    assert len(ours) == 200
    assert_same_detections(ours, cv_out["detection_out"])
