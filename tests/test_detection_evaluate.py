"""DetectionEvaluate against a numpy re-implementation of the fork's Forward_cpu
(detection_evaluate_layer.cpp), and the solver's mAP (Solver::TestDetection, ComputeAP)
against hand-computed precision-recall curves."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe.layers.base import layer_class
from jcaffe.layers.detection import average_precision, average_precisions
from jcaffe.proto import caffe_pb2, ssd_pb2


def make(text, shapes):
    lp = text_format.Parse(text, ssd_pb2.LayerParameter())
    lp = caffe_pb2.LayerParameter.FromString(lp.SerializeToString())
    lp.name, lp.type = "detection_eval", "DetectionEvaluate"
    lp.bottom.extend(["det", "label"])
    lp.top.append("eval")
    return layer_class(lp)(lp, shapes, caffe_pb2.TEST)


def jaccard(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return np.float32(0)
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return np.float32(0)
    size = lambda x: (x[2] - x[0]) * (x[3] - x[1])
    return iw * ih / (size(a) + size(b) - iw * ih)


def evaluate_ref(det, gt, num_classes, bg, thr, difficult_ok):
    """The fork's rows: per class [-1, c, num_pos, -1, -1], then per image / label (maps,
    ascending), detections by descending score with [image, label, score, tp, fp]."""
    gts = {}
    for r in gt.reshape(-1, 8):
        if int(r[0]) == -1:
            break
        gts.setdefault(int(r[0]), {}).setdefault(int(r[1]), []).append((r[3:7], bool(r[7])))
    dets = {}
    for r in det.reshape(-1, 7):
        if int(r[0]) == -1:
            continue
        dets.setdefault(int(r[0]), {}).setdefault(int(r[1]), []).append((r[2], r[3:7]))
    rows = []
    for c in range(num_classes):
        if c == bg:
            continue
        n = sum(1 for img in gts.values() for b, d in img.get(c, []) if difficult_ok or not d)
        rows.append([-1, c, n, -1, -1])
    for img in sorted(dets):
        for label in sorted(dets[img]):
            if label == -1:
                continue
            boxes = sorted(dets[img][label], key=lambda t: -t[0])
            truth = gts.get(img, {}).get(label)
            if truth is None:
                rows += [[img, label, s, 0, 1] for s, _ in boxes]
                continue
            visited = [False] * len(truth)
            for s, b in boxes:
                ovs = [jaccard(b, g) for g, _ in truth]
                j = int(np.argmax(ovs))
                tp = fp = 0
                if ovs[j] >= thr:
                    if difficult_ok or not truth[j][1]:
                        if not visited[j]:
                            tp, visited[j] = 1, True
                        else:
                            fp = 1
                else:
                    fp = 1
                rows.append([img, label, s, tp, fp])
    return np.asarray(rows, np.float32)


def random_case(rng):
    gt = np.full((1, 1, 10, 8), -1, np.float32)
    boxes = []
    for r in range(8):
        img, lab = r % 2, 1 + rng.integers(3)
        c = rng.uniform(0.2, 0.8, 2)
        s = rng.uniform(0.1, 0.3, 2)
        b = [c[0] - s[0], c[1] - s[1], c[0] + s[0], c[1] + s[1]]
        boxes.append((img, lab, b))
        gt[0, 0, r] = [img, lab, 0, *b, float(rng.random() < 0.25)]
    det = np.full((1, 1, 24, 7), -1, np.float32)
    for r in range(20):
        img, lab, b = boxes[rng.integers(len(boxes))]
        if rng.random() < 0.25:
            lab = 1 + rng.integers(3)
        jitter = rng.normal(0, 0.05, 4)
        det[0, 0, r] = [img, lab, rng.uniform(0.05, 1), *(np.asarray(b) + jitter)]
        if r == 19:
            det[0, 0, r, 0] = 2  # an image without ground truth
    det[0, 0, 20:, 0] = [0, 0, 1, 1]  # DetectionOutput's padding rows: label -1
    return det, gt


@pytest.mark.parametrize("difficult_ok", [True, False])
def test_detection_evaluate_matches_the_forks_rows(difficult_ok):
    det, gt = random_case(np.random.default_rng(11))
    text = (f"detection_evaluate_param {{ num_classes: 4 background_label_id: 0 "
            f"overlap_threshold: 0.5 evaluate_difficult_gt: {str(difficult_ok).lower()} }}")
    layer = make(text, [det.shape, gt.shape])
    top = np.asarray(jax.jit(lambda d, g: layer.apply([], [d, g], None)[0])(det, gt))
    assert top.shape == (1, 1, 3 + 24, 5)
    rows = top.reshape(-1, 5)
    want = evaluate_ref(det, gt, 4, 0, 0.5, difficult_ok)
    np.testing.assert_allclose(rows[:len(want)], want, rtol=1e-6)
    assert np.all(rows[len(want):] == [-2, -1, 0, 0, 0])
    assert want[3:, 3].sum() >= 3 and want[3:, 4].sum() >= 3  # true and false positives both


def test_average_precision_hand_computed():
    # Scores 0.9 .. 0.6 with tp 1 0 1 0 and 3 positives: precision 1, 1/2, 2/3, 1/2 at recall
    # 1/3, 1/3, 2/3, 2/3.
    tp, fp, s = [0, 1, 0, 1], [1, 0, 1, 0], [0.8, 0.9, 0.6, 0.7]
    assert average_precision(tp, fp, s, 3, "Integral") == pytest.approx(5 / 9, rel=1e-6)
    assert average_precision(tp, fp, s, 3, "MaxIntegral") == pytest.approx(5 / 9, rel=1e-6)
    # 11 points: recall 0 .. 0.3 -> 1, 0.4 .. 0.6 -> 2/3, 0.7 .. 1 -> 0.
    assert average_precision(tp, fp, s, 3, "11point") == pytest.approx(6 / 11, rel=1e-6)
    # The envelope differs from the integral: tp 0 1 with one positive.
    assert average_precision([0, 1], [1, 0], [0.9, 0.8], 1, "Integral") == pytest.approx(0.5)
    assert average_precision([0, 1], [1, 0], [0.9, 0.8], 1, "MaxIntegral") == \
        pytest.approx(0.5)
    assert average_precision([], [], [], 3) == 0.0


def test_map_over_test_iterations():
    # Two iterations: class 1 has 2 positives, found at ranks 1 and 3; class 2 has one
    # positive never found; class 3 has none. Padding rows are skipped.
    it1 = [[-1, 1, 1, -1, -1], [-1, 2, 1, -1, -1], [-1, 3, 0, -1, -1],
           [0, 1, 0.9, 1, 0], [0, 1, 0.5, 0, 1], [-2, -1, 0, 0, 0]]
    it2 = [[-1, 1, 1, -1, -1], [-1, 2, 0, -1, -1], [-1, 3, 0, -1, -1],
           [1, 1, 0.4, 1, 0], [1, 2, 0.3, 0, 1]]
    mean, aps = average_precisions([it1, it2], "Integral")
    # class 1: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2 + 2/3 * 1/2.
    assert aps[1] == pytest.approx(0.5 + 1 / 3, rel=1e-6)
    assert aps[2] == 0.0 and 3 not in aps
    assert mean == pytest.approx((0.5 + 1 / 3) / 3, rel=1e-6)
