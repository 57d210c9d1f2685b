"""MultiBoxLoss against a numpy re-implementation of the fork's code (weiliu89/caffe ssd
branch: multibox_loss_layer.cpp and bbox_util.cpp's GetGroundTruth, MatchBBox, FindMatches,
MineHardExamples, EncodeBBox, EncodeLocPrediction, EncodeConfPrediction), loss and gradients
(the fork's Backward_cpu: the sub-losses' gradients scattered back to the matched / mined
priors), on fixed inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe.layers.base import Context, layer_class
from jcaffe.proto import caffe_pb2, ssd_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)


def make(text, shapes):
    lp = text_format.Parse(text, ssd_pb2.LayerParameter())
    lp = caffe_pb2.LayerParameter.FromString(lp.SerializeToString())
    lp.name, lp.type = "mbox_loss", "MultiBoxLoss"
    lp.bottom.extend(["loc", "conf", "prior", "label"])
    lp.top.append("loss")
    return layer_class(lp)(lp, shapes, caffe_pb2.TRAIN)


# -- the fork's algorithm, loop by loop (overlaps in float32, as the fork's floats) ----------
def size(b):
    return np.float32(0) if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def jaccard(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / (size(a) + size(b) - iw * ih)


def match_bbox(gts, priors, match_type, thr, ignore_cross):
    n = len(priors)
    idx, ovl = [-1] * n, [0.0] * n
    overlaps = {}
    for i, p in enumerate(priors):
        if ignore_cross and any(v < 0 or v > 1 for v in p):
            idx[i] = -2
            continue
        for j, g in enumerate(gts):
            o = jaccard(p, g["box"])
            if o > 1e-6:
                ovl[i] = max(ovl[i], o)
                overlaps.setdefault(i, {})[j] = o
    pool = list(range(len(gts)))
    while pool:
        best = (-1, -1, -1.0)
        for i in sorted(overlaps):
            if idx[i] != -1:
                continue
            for j in pool:
                if j in overlaps[i] and overlaps[i][j] > best[2]:
                    best = (i, j, overlaps[i][j])
        if best[0] == -1:
            break
        idx[best[0]], ovl[best[0]] = best[1], best[2]
        pool.remove(best[1])
    if match_type == "PER_PREDICTION":
        for i in sorted(overlaps):
            if idx[i] != -1:
                continue
            bj, bo = -1, -1.0
            for j in range(len(gts)):
                if j in overlaps[i] and overlaps[i][j] >= thr and overlaps[i][j] > bo:
                    bj, bo = j, overlaps[i][j]
            if bj != -1:
                idx[i], ovl[i] = bj, bo
    return idx, ovl


def encode(prior, var, g, code, var_in_target):
    v = [1.0] * 4 if var_in_target else var
    if code == "CORNER":
        return [(g[k] - prior[k]) / v[k] for k in range(4)]
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code == "CORNER_SIZE":
        s = [pw, ph, pw, ph]
        return [(g[k] - prior[k]) / s[k] / v[k] for k in range(4)]
    pcx, pcy = (prior[0] + prior[2]) / 2, (prior[1] + prior[3]) / 2
    gw, gh = g[2] - g[0], g[3] - g[1]
    gcx, gcy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
    return [(gcx - pcx) / pw / v[0], (gcy - pcy) / ph / v[1], math.log(gw / pw) / v[2],
            math.log(gh / ph) / v[3]]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def logistic(x, t):
    return -(x * (t - (x >= 0)) - np.log(1 + np.exp(x - 2 * x * (x >= 0))))


def multibox_ref(loc, conf, prior, label, *, C, match_type="PER_PREDICTION", thr=0.5,
                 bg=0, use_difficult=True, mining=True, neg_pos=3.0, neg_overlap=0.5,
                 code="CENTER_SIZE", var_in_target=False, ignore_cross=False, bp_inside=False,
                 loc_type="SMOOTH_L1", conf_type="SOFTMAX", loc_weight=1.0,
                 normalization="VALID"):
    """(loss, dloss/dloc, dloss/dconf) as the fork's Forward_cpu and Backward_cpu."""
    num, P = loc.shape[0], prior.shape[2] // 4
    pb = prior[0, 0].reshape(P, 4).astype(np.float64)
    pv = prior[0, 1].reshape(P, 4).astype(np.float64)
    gts = {}
    for r in label.reshape(-1, 8):
        if int(r[0]) == -1 or (not use_difficult and bool(r[7])):
            continue
        gts.setdefault(int(r[0]), []).append({"label": int(r[1]), "box": list(r[3:7])})
    matches, overlaps = [], []
    for i in range(num):
        if i in gts:
            m, o = match_bbox(gts[i], pb, match_type, thr, ignore_cross)
        else:
            m, o = None, None
        matches.append(m)
        overlaps.append(o)
    conf3 = conf.reshape(num, P, C).astype(np.float64)
    negs = [[] for _ in range(num)]
    if mining:
        for i in range(num):
            if matches[i] is None:
                continue
            losses = []
            for p in range(P):
                lab = gts[i][matches[i][p]]["label"] if matches[i][p] > -1 else bg
                if conf_type == "SOFTMAX":
                    losses.append(-math.log(max(softmax(conf3[i, p])[lab], FLT_MIN)))
                else:
                    t = np.zeros(C)
                    t[lab] = 1
                    losses.append(logistic(conf3[i, p], t).sum())
            elig = [(losses[p], p) for p in range(P)
                    if matches[i][p] == -1 and overlaps[i][p] < neg_overlap]
            num_pos = sum(1 for m in matches[i] if m > -1)
            num_sel = min(int(np.float32(num_pos) * np.float32(neg_pos)), len(elig))
            elig.sort(key=lambda t: -t[0])
            sel = {p for _, p in elig[:num_sel]}
            negs[i] = [p for p in range(P) if matches[i][p] == -1 and p in sel]
    num_matches = sum(1 for m in matches if m is not None for x in m if x > -1)
    n = {"FULL": num * P, "VALID": num_matches, "BATCH_SIZE": num, "NONE": 1}[normalization]
    n = max(1.0, n)
    loss, dloc, dconf = 0.0, np.zeros(loc.shape), np.zeros(conf.shape)
    dloc3, dconf3 = dloc.reshape(num, P, 4), dconf.reshape(num, P, C)
    # Localization: EncodeLocPrediction over the matches, SmoothL1Loss / EuclideanLoss.
    for i in range(num):
        for p in range(P if matches[i] is not None else 0):
            if matches[i][p] <= -1:
                continue
            g = encode(pb[p], pv[p], gts[i][matches[i][p]]["box"], code, var_in_target)
            pred = list(loc.reshape(num, P, 4)[i, p].astype(np.float64))
            grad_ok = [True] * 4
            if bp_inside:
                for k in range(4):
                    if pb[p][k] < 0 or pb[p][k] > 1:
                        pred[k], grad_ok[k] = g[k], False
            scale = [1 / pv[p][k] if var_in_target else 1.0 for k in range(4)]
            for k in range(4):
                d = (pred[k] - g[k]) * scale[k]
                if loc_type == "SMOOTH_L1":
                    loss += loc_weight * (0.5 * d * d if abs(d) < 1 else abs(d) - 0.5) / n
                    gd = d if abs(d) < 1 else np.sign(d)
                else:
                    loss += loc_weight * 0.5 * d * d / n
                    gd = d
                if grad_ok[k]:
                    dloc3[i, p, k] = loc_weight * gd * scale[k] / n
    # Confidence: EncodeConfPrediction, SoftmaxWithLoss (NONE) / SigmoidCrossEntropyLoss.
    flat_t = np.full(num * P * C, float(bg)) if (conf_type == "LOGISTIC" and not mining) else None
    for i in range(num):
        rows = []
        if mining:
            if matches[i] is not None:
                rows = [(p, gts[i][matches[i][p]]["label"]) for p in range(P)
                        if matches[i][p] > -1] + [(p, None) for p in negs[i]]
        else:
            rows = [(p, gts[i][matches[i][p]]["label"] if matches[i] is not None and
                     matches[i][p] > -1 else None) for p in range(P)]
        for p, lab in rows:
            x = conf3[i, p]
            if conf_type == "SOFTMAX":
                t = bg if lab is None else lab
                prob = softmax(x)
                loss += -math.log(max(prob[t], FLT_MIN)) / n
                g = prob.copy()
                g[t] -= 1
                dconf3[i, p] = g / n
            elif mining:
                t = np.full(C, float(bg))
                if lab is not None:
                    t[lab] = 1
                elif 0 <= bg < C:
                    t[bg] = 1
                loss += logistic(x, t).sum() / n
                dconf3[i, p] = (1 / (1 + np.exp(-x)) - t) / n
            elif lab is not None:
                flat_t[i * P + p * C + lab] = 1
    if flat_t is not None:
        x = conf.reshape(-1).astype(np.float64)
        loss += logistic(x, flat_t).sum() / n
        dconf = ((1 / (1 + np.exp(-x)) - flat_t) / n).reshape(conf.shape)
    return loss, dloc, dconf


# -- fixed inputs ---------------------------------------------------------------------------
def fixed_inputs(C=4):
    rng = np.random.default_rng(7)
    boxes = []
    for cy in np.linspace(0.1, 0.9, 4):       # a 4x4 grid of priors, 3 shapes each, some
        for cx in np.linspace(0.1, 0.9, 4):   # reaching past the image border
            for w, h in ((0.3, 0.3), (0.45, 0.2), (0.2, 0.45)):
                boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    P = len(boxes)
    prior = np.stack([np.asarray(boxes).reshape(-1),
                      np.tile([0.1, 0.1, 0.2, 0.2], P)])[None].astype(np.float32)
    label = np.full((1, 1, 7, 8), -1, np.float32)
    gt = [(0, 1, [0.05, 0.1, 0.4, 0.45], 0), (0, 2, [0.5, 0.5, 0.95, 0.7], 0),
          (0, 3, [0.3, 0.6, 0.5, 0.95], 1), (0, 1, [0.6, 0.05, 0.8, 0.4], 0),
          (1, 2, [0.2, 0.2, 0.7, 0.6], 0), (1, 3, [0.7, 0.7, 0.9, 0.9], 1)]
    for r, (item, lab, b, diff) in enumerate(gt):
        label[0, 0, r] = [item, lab, 0, *b, diff]           # row 6 stays padding (-1)
    loc = rng.normal(0, 1.0, (2, P * 4)).astype(np.float32)
    conf = rng.normal(0, 2.0, (2, P * C)).astype(np.float32)
    return loc, conf, prior, label


CASES = {
    "ssd-default": ("code_type: CENTER_SIZE", dict()),
    "bipartite-l2-logistic-full": (
        "match_type: BIPARTITE loc_loss_type: L2 conf_loss_type: LOGISTIC mining_type: NONE "
        "code_type: CORNER ignore_cross_boundary_bbox: true use_difficult_gt: false "
        "loc_weight: 2", dict(match_type="BIPARTITE", loc_type="L2", conf_type="LOGISTIC",
                              mining=False, code="CORNER", ignore_cross=True,
                              use_difficult=False, loc_weight=2.0, normalization="FULL")),
    "corner-size-no-mining": (
        "mining_type: NONE code_type: CORNER_SIZE encode_variance_in_target: true "
        "bp_inside: true overlap_threshold: 0.3",
        dict(mining=False, code="CORNER_SIZE", var_in_target=True, bp_inside=True, thr=0.3,
             normalization="BATCH_SIZE")),
    "logistic-mining": ("conf_loss_type: LOGISTIC neg_pos_ratio: 1.5 neg_overlap: 0.3 "
                        "code_type: CENTER_SIZE",
                        dict(conf_type="LOGISTIC", neg_pos=1.5, neg_overlap=0.3)),
}
NORMALIZATION = {"FULL": "loss_param { normalization: FULL }",
                 "BATCH_SIZE": "loss_param { normalization: BATCH_SIZE }"}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_forks(case):
    text, kw = CASES[case]
    C = 4
    loc, conf, prior, label = fixed_inputs(C)
    norm = NORMALIZATION.get(kw.get("normalization"), "")
    layer = make(f"multibox_loss_param {{ num_classes: {C} {text} }} {norm}",
                 [loc.shape, conf.shape, prior.shape, label.shape])
    want, want_dloc, want_dconf = multibox_ref(loc, conf, prior, label, C=C, **kw)

    def f(l, c):
        return layer.apply([], [l, c, jnp.asarray(prior), jnp.asarray(label)],
                           Context(train=True))[0]

    got, (dloc, dconf) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(loc, conf)
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(dloc), want_dloc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dconf), want_dconf, rtol=1e-4, atol=1e-7)
    assert np.any(want_dloc != 0) and np.any(want_dconf != 0)


@pytest.mark.parametrize("text, message", [
    ("share_location: false", "share_location: false is not supported"),
    ("mining_type: HARD_EXAMPLE", "HARD_EXAMPLE is not supported"),
    ("nms_param { nms_threshold: 0.5 }", "nms_param inside hard negative mining"),
])
def test_unsupported_options_are_clear_errors(text, message):
    loc, conf, prior, label = fixed_inputs()
    with pytest.raises(Exception, match=f"layer 'mbox_loss' .*{message}"):
        make(f"multibox_loss_param {{ num_classes: 4 {text} }}",
             [loc.shape, conf.shape, prior.shape, label.shape])
