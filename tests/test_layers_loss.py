"""Loss layers and Accuracy against numpy re-implementations of Caffe's Forward_cpu/Backward_cpu."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcaffe.errors import JcaffeError, LayerError
from jcaffe.layers.base import Context
from jcaffe.proto import caffe_pb2
from layer_utils import check_gradient, make_layer, run

FLT_MIN = np.float32(np.finfo(np.float32).tiny)
LOG_THRESHOLD = 1e-20
CTX = Context(train=True, key=jax.random.key(0))


def top0_and_grads(layer, bottoms, argnums=(0,)):
    """Top 0 (top diff 1) and the gradients of it wrt the given bottoms, in float64."""
    bottoms = [jnp.asarray(b, jnp.float64) for b in bottoms]

    def f(*diff_bottoms):
        bo = list(bottoms)
        for i, b in zip(argnums, diff_bottoms):
            bo[i] = b
        return layer.apply([], bo, CTX)[0]

    value, grads = jax.value_and_grad(f, argnums=tuple(range(len(argnums))))(
        *[bottoms[i] for i in argnums])
    return float(value), [np.asarray(g) for g in grads]


# -- numpy references, written from Caffe's loops -----------------------------------------

def normalizer(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))


def np_softmax(x3):
    e = np.exp(x3 - x3.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_softmax_loss(x, label, axis, ignore, mode):
    axis = axis % x.ndim
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    p = np_softmax(x.reshape(outer, c, inner))
    lab = label.reshape(outer, inner).astype(int)
    loss, n, diff = 0.0, 0, p.copy()
    for i in range(outer):
        for j in range(inner):
            l = lab[i, j]
            if ignore is not None and l == ignore:
                diff[i, :, j] = 0
                continue
            loss -= np.log(max(p[i, l, j], FLT_MIN))
            diff[i, l, j] -= 1
            n += 1
    z = normalizer(mode, outer, inner, n)
    return loss / z, (diff / z).reshape(x.shape), p.reshape(x.shape)


def ref_sigmoid_ce(x, t, ignore, mode):
    outer, inner = x.shape[0], x.size // x.shape[0]
    x, t = x.reshape(-1), t.reshape(-1)
    loss, n, diff = 0.0, 0, np.zeros_like(x)
    for i in range(x.size):
        if ignore is not None and int(t[i]) == ignore:
            continue
        pos = float(x[i] >= 0)
        loss -= x[i] * (t[i] - pos) - np.log(1 + np.exp(x[i] - 2 * x[i] * pos))
        diff[i] = 1 / (1 + np.exp(-x[i])) - t[i]
        n += 1
    z = normalizer(mode, outer, inner, n)
    return loss / z, diff / z


def ref_hinge(x, label, norm):
    num = x.shape[0]
    x2 = x.reshape(num, -1).copy()
    for i in range(num):
        x2[i, int(label[i])] *= -1
    v = np.maximum(0, 1 + x2)
    sign = np.ones_like(x2)
    for i in range(num):
        sign[i, int(label[i])] = -1
    if norm == "L1":
        return v.sum() / num, (sign * (v > 0) / num).reshape(x.shape)
    return (v * v).sum() / num, (2 * sign * v / num).reshape(x.shape)


def ref_multinomial(p, label):
    num = p.shape[0]
    p2 = p.reshape(num, -1)
    loss, diff = 0.0, np.zeros_like(p2)
    for i in range(num):
        l = int(label[i])
        prob = max(p2[i, l], LOG_THRESHOLD)
        loss -= np.log(prob)
        diff[i, l] = -1 / (num * prob)
    return loss / num, diff.reshape(p.shape)


def ref_infogain(x, label, H, axis, ignore, mode):
    axis = axis % x.ndim
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    p = np_softmax(x.reshape(outer, c, inner))
    lab = label.reshape(outer, inner).astype(int)
    H = H.reshape(c, c)
    rowsum = H.sum(axis=1)
    loss, n, diff = 0.0, 0, np.zeros_like(p)
    for i in range(outer):
        for j in range(inner):
            l = lab[i, j]
            if ignore is not None and l == ignore:
                continue
            for k in range(c):
                loss -= H[l, k] * np.log(max(p[i, k, j], LOG_THRESHOLD))
                diff[i, k, j] = p[i, k, j] * rowsum[l] - H[l, k]
            n += 1
    z = normalizer(mode, outer, inner, n)
    return loss / z, (diff / z).reshape(x.shape), p.reshape(x.shape)


def ref_contrastive(a, b, y, margin, legacy):
    num = a.shape[0]
    a2, b2 = a.reshape(num, -1), b.reshape(num, -1)
    loss, ga = 0.0, np.zeros_like(a2)
    for i in range(num):
        d = a2[i] - b2[i]
        dsq = d @ d
        if int(y.reshape(-1)[i]):
            loss += dsq
            ga[i] = d / num
        elif legacy:
            loss += max(margin - dsq, 0)
            ga[i] = -d / num if margin - dsq > 0 else 0
        else:
            dist = np.sqrt(dsq)
            md = margin - dist
            loss += max(md, 0) ** 2
            ga[i] = -(md / (dist + 1e-4)) * d / num if md > 0 else 0
    return loss / num / 2, ga.reshape(a.shape)


def ref_accuracy(x, label, axis, top_k, ignore):
    axis = axis % x.ndim
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, c, inner)
    lab = label.reshape(outer, inner).astype(int)
    acc, n = 0, 0
    per_n, per_ok = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            l = lab[i, j]
            if ignore is not None and l == ignore:
                continue
            per_n[l] += 1
            better = -1
            for k in range(c):
                better += x3[i, k, j] >= x3[i, l, j]
            if better < top_k:
                acc += 1
                per_ok[l] += 1
            n += 1
    per = np.where(per_n > 0, per_ok / np.maximum(per_n, 1), 0)
    return (acc / n if n else 0.0), per


# -- SoftmaxWithLoss -----------------------------------------------------------------------

MODES = {
    "default": ("", "VALID"),
    "VALID": ("normalization: VALID", "VALID"),
    "FULL": ("normalization: FULL", "FULL"),
    "BATCH_SIZE": ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    "NONE": ("normalization: NONE", "NONE"),
    "legacy_false": ("normalize: false", "BATCH_SIZE"),
    "legacy_true": ("normalize: true", "VALID"),
    "normalization_wins": ("normalize: false normalization: FULL", "FULL"),
}


def spatial_labels(rng, n, c, h, w, ignore=None):
    lab = rng.integers(0, c, size=(n, 1, h, w)).astype(np.float32)
    if ignore is not None:
        lab.reshape(-1)[[0, 3, 7]] = ignore
    return lab


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ignore", [None, 255, 2])
def test_softmax_loss_normalizations(mode, ignore):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 2, 3))
    label = spatial_labels(rng, 2, 4, 2, 3, ignore)
    text, ref_mode = MODES[mode]
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = make_layer(f'type: "SoftmaxWithLoss" loss_param {{ {text} {ig} }}',
                       [x.shape, label.shape])
    assert layer.is_loss and layer.top_shapes == [()]
    want, want_grad, _ = ref_softmax_loss(x, label, 1, ignore, ref_mode)
    got, (grad,) = top0_and_grads(layer, [x, label])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
    top = run(layer, [], [x.astype(np.float32), label])[0]
    assert top.shape == () and top.dtype == np.float32
    np.testing.assert_allclose(top, want, rtol=1e-5)


@pytest.mark.parametrize("axis, shape, label_shape", [
    (2, (2, 3, 5), (2, 3)),
    (-1, (3, 2, 4), (3, 2, 1)),
    (0, (4, 3), (3,)),
])
def test_softmax_loss_axis(axis, shape, label_shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    c = shape[axis]
    label = rng.integers(0, c, size=label_shape).astype(np.float32)
    # Caffe's LossLayer checks the first dims; with axis 0 they differ, so only when they agree.
    if shape[0] != label_shape[0]:
        with pytest.raises(LayerError, match="same first dimension"):
            make_layer(f'type: "SoftmaxWithLoss" softmax_param {{ axis: {axis} }}',
                       [shape, label_shape])
        return
    layer = make_layer(f'type: "SoftmaxWithLoss" softmax_param {{ axis: {axis} }}',
                       [shape, label_shape])
    want, want_grad, _ = ref_softmax_loss(x, label, axis, None, "VALID")
    got, (grad,) = top0_and_grads(layer, [x, label])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_softmax_loss_prob_top_has_no_gradient():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5))
    label = np.array([0, 4, 2], np.float32)
    layer = make_layer('type: "SoftmaxWithLoss"', [x.shape, label.shape], tops=["loss", "prob"])
    assert layer.top_shapes == [(), (3, 5)]
    loss, prob = run(layer, [], [x, label])
    _, _, want_prob = ref_softmax_loss(x, label, 1, None, "VALID")
    np.testing.assert_allclose(prob, want_prob, rtol=1e-12)
    w = jnp.asarray(rng.standard_normal(x.shape))
    g = jax.grad(lambda v: jnp.sum(layer.apply([], [v, jnp.asarray(label)], CTX)[1] * w))(
        jnp.asarray(x))
    assert np.all(np.asarray(g) == 0)


def test_softmax_loss_all_ignored_is_zero():
    x = np.ones((2, 3))
    label = np.array([1, 1], np.float32)
    layer = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }',
                       [x.shape, label.shape])
    got, (grad,) = top0_and_grads(layer, [x, label])
    assert got == 0.0 and np.all(grad == 0)


def test_softmax_loss_clamps_at_flt_min_but_keeps_caffe_gradient():
    # p(label) = exp(-200) underflows float32: Caffe's loss is -log(FLT_MIN), gradient p - onehot.
    x = np.array([[0.0, 200.0]], np.float32)
    label = np.array([0.0], np.float32)
    layer = make_layer('type: "SoftmaxWithLoss"', [x.shape, label.shape])
    loss = run(layer, [], [x, label])[0]
    np.testing.assert_allclose(loss, -np.log(FLT_MIN), rtol=1e-6)
    g = jax.grad(lambda v: layer.apply([], [v, jnp.asarray(label)], CTX)[0])(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), [[-1.0, 1.0]], atol=1e-6)


def test_softmax_loss_jit():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(2, 2)).astype(np.float32)
    layer = make_layer('type: "SoftmaxWithLoss"', [x.shape, label.shape])
    f = jax.jit(lambda a, b: layer.apply([], [a, b], CTX)[0])
    np.testing.assert_allclose(f(x, label), ref_softmax_loss(x, label, 1, None, "VALID")[0],
                               rtol=1e-5)


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------

@pytest.mark.parametrize("text, mode", [
    ("", "BATCH_SIZE"),  # Caffe's default for this layer
    ("normalization: VALID", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: NONE", "NONE"),
    ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
])
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy(text, mode, ignore):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 2)) * 3
    x.reshape(-1)[0] = 0.0  # the kink of the stable formula: gradient must still be 1/2 - t
    x.reshape(-1)[1] = 60.0
    x.reshape(-1)[2] = -60.0
    t = rng.uniform(0, 1, size=(2, 6)).astype(np.float32)
    if ignore is not None:
        t.reshape(-1)[[3, 5]] = ignore
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = make_layer(f'type: "SigmoidCrossEntropyLoss" loss_param {{ {text} {ig} }}',
                       [x.shape, t.shape])
    want, want_grad = ref_sigmoid_ce(x, t.astype(np.float64), ignore, mode)
    got, (grad,) = top0_and_grads(layer, [x, t])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(grad.reshape(-1), want_grad, rtol=1e-9, atol=1e-12)


def test_sigmoid_cross_entropy_float32_extremes_are_finite():
    x = np.array([[-200.0, 200.0, 0.0]], np.float32)
    t = np.array([[1.0, 0.0, 1.0]], np.float32)
    layer = make_layer('type: "SigmoidCrossEntropyLoss"', [x.shape, t.shape])
    np.testing.assert_allclose(run(layer, [], [x, t])[0], 400 + np.log(2), rtol=1e-6)


# -- Euclidean, Hinge, MultinomialLogistic -------------------------------------------------

def test_euclidean_loss_both_bottoms():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 2, 2))
    b = rng.standard_normal((3, 4))  # same count per example, other shape
    layer = make_layer('type: "EuclideanLoss"', [a.shape, b.shape])
    got, (ga, gb) = top0_and_grads(layer, [a, b], argnums=(0, 1))
    d = a - b.reshape(a.shape)
    np.testing.assert_allclose(got, np.sum(d * d) / 3 / 2, rtol=1e-12)
    np.testing.assert_allclose(ga, d / 3, rtol=1e-12)
    np.testing.assert_allclose(gb, -d.reshape(b.shape) / 3, rtol=1e-12)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5)) * 2
    label = np.array([0, 3, 4, 1], np.float32)
    layer = make_layer(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}',
                       [x.shape, label.shape])
    want, want_grad = ref_hinge(x, label, norm)
    got, (grad,) = top0_and_grads(layer, [x, label])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12)


def test_hinge_loss_hand_value():
    x = np.array([[0.5, -2.0, 0.0]])  # label 0: margins max(0, 1-0.5), max(0, 1-2), max(0, 1+0)
    layer = make_layer('type: "HingeLoss"', [x.shape, (1,)])
    assert float(run(layer, [], [x, np.array([0.0])])[0]) == pytest.approx(1.5)


def test_multinomial_logistic_loss():
    rng = np.random.default_rng(7)
    p = rng.uniform(0.05, 1, size=(4, 3, 1, 1))
    p[2, 1] = 0.0  # clamped at 1e-20; Caffe's gradient is still -1 / (N * 1e-20)
    label = np.array([[0], [2], [1], [1]], np.float32)
    layer = make_layer('type: "MultinomialLogisticLoss"', [p.shape, label.shape])
    want, want_grad = ref_multinomial(p, label.reshape(-1))
    got, (grad,) = top0_and_grads(layer, [p, label])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12)


# -- InfogainLoss --------------------------------------------------------------------------

def write_blob(path, H, legacy=False, double=False):
    blob = caffe_pb2.BlobProto()
    if legacy:
        blob.num, blob.channels, blob.height, blob.width = 1, 1, H.shape[0], H.shape[1]
    else:
        blob.shape.dim.extend(H.shape)
    (blob.double_data if double else blob.data).extend(H.reshape(-1).tolist())
    path.write_bytes(blob.SerializeToString())
    return str(path)


@pytest.mark.parametrize("text, mode", [("", "VALID"), ("normalization: FULL", "FULL"),
                                        ("normalization: BATCH_SIZE", "BATCH_SIZE"),
                                        ("normalization: NONE", "NONE")])
@pytest.mark.parametrize("ignore", [None, 1])
def test_infogain_loss_bottom_H(text, mode, ignore):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 2, 2))
    label = spatial_labels(rng, 2, 3, 2, 2)
    H = rng.uniform(0, 2, size=(1, 1, 3, 3))
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = make_layer(f'type: "InfogainLoss" loss_param {{ {text} {ig} }}',
                       [x.shape, label.shape, H.shape], tops=["loss", "prob"])
    want, want_grad, want_prob = ref_infogain(x, label, H, 1, ignore, mode)
    got, (grad,) = top0_and_grads(layer, [x, label, H])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(run(layer, [], [x, label, H])[1], want_prob, rtol=1e-12)
    gH = jax.grad(lambda h: layer.apply([], [jnp.asarray(x), jnp.asarray(label), h], CTX)[0])(
        jnp.asarray(H))
    assert np.all(np.asarray(gH) == 0)  # Caffe cannot backpropagate to the infogain matrix
    w = jnp.asarray(rng.standard_normal(x.shape))
    gp = jax.grad(lambda v: jnp.sum(
        layer.apply([], [v, jnp.asarray(label), jnp.asarray(H)], CTX)[1] * w))(jnp.asarray(x))
    assert np.all(np.asarray(gp) == 0)  # nor through the probability top


@pytest.mark.parametrize("legacy, double", [(False, False), (True, False), (False, True)])
def test_infogain_loss_source_and_axis(tmp_path, legacy, double):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2, 4))
    label = rng.integers(0, 4, size=(2, 2)).astype(np.float32)
    H = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
    src = write_blob(tmp_path / "H.binaryproto", H, legacy, double)
    layer = make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{src}" axis: 2 }}',
                       [x.shape, label.shape])
    want, want_grad, _ = ref_infogain(x, label, H.astype(np.float64), 2, None, "VALID")
    got, (grad,) = top0_and_grads(layer, [x, label])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


def test_infogain_identity_equals_softmax_loss():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4))
    label = np.array([1, 0, 3], np.float32)
    info = make_layer('type: "InfogainLoss"', [x.shape, label.shape, (4, 4)])
    soft = make_layer('type: "SoftmaxWithLoss"', [x.shape, label.shape])
    a, (ga,) = top0_and_grads(info, [x, label, np.eye(4)])
    b, (gb,) = top0_and_grads(soft, [x, label])
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-14)


# -- ContrastiveLoss -----------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("margin", [1.0, 4.0])
def test_contrastive_loss(legacy, margin):
    rng = np.random.default_rng(11)
    a = rng.standard_normal((6, 3, 1, 1))
    b = rng.standard_normal((6, 3, 1, 1))
    b[5] = a[5]  # an identical dissimilar pair: Caffe's gradient stays finite (zero)
    y = np.array([1, 0, 1, 0, 0, 0], np.float32).reshape(6, 1, 1, 1)
    layer = make_layer(
        f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: {margin} '
        f'legacy_version: {str(legacy).lower()} }}', [a.shape, b.shape, y.shape])
    want, want_ga = ref_contrastive(a, b, y, margin, legacy)
    got, (ga, gb) = top0_and_grads(layer, [a, b, y], argnums=(0, 1))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(ga, want_ga, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gb, -want_ga, rtol=1e-10, atol=1e-14)
    assert np.all(np.isfinite(ga))


# -- numerical gradients of every loss wrt its predictions ---------------------------------

def _grad_cases():
    rng = np.random.default_rng(12)
    x4 = rng.standard_normal((2, 3, 2, 1))
    lab4 = rng.integers(0, 3, size=(2, 1, 2, 1)).astype(np.float64)
    lab4.reshape(-1)[1] = 5
    x2 = rng.standard_normal((3, 4))
    lab2 = np.array([0.0, 3.0, 1.0])
    far = rng.standard_normal((4, 2)) * 3  # keeps every dissimilar pair's d away from margin
    return [
        ('type: "SoftmaxWithLoss" loss_param { ignore_label: 5 }', [x4, lab4], [0], {}),
        ('type: "SoftmaxWithLoss" loss_param { normalization: FULL } softmax_param { axis: 2 }',
         [x4, rng.integers(0, 2, size=(2, 3, 1)).astype(np.float64)], [0], {}),
        ('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 }',
         [x2, np.array([[0.2, 1, -1, 0], [1, 0.7, 0, 0], [0, 0, 1, -1]])], [0], {}),
        ('type: "EuclideanLoss"', [x2, rng.standard_normal((3, 4))], [0, 1], {}),
        ('type: "HingeLoss"', [x2, lab2], [0], {}),
        ('type: "HingeLoss" hinge_loss_param { norm: L2 }', [x2, lab2], [0], {}),
        ('type: "MultinomialLogisticLoss"', [rng.uniform(0.1, 1, (3, 4)), lab2], [0], {}),
        ('type: "InfogainLoss"', [x4, np.abs(lab4 % 3), rng.uniform(0, 1, (3, 3))], [0], {}),
        ('type: "ContrastiveLoss" contrastive_loss_param { legacy_version: true margin: 3 }',
         [far, rng.standard_normal((4, 2)), np.array([1.0, 0, 0, 1])], [0, 1], {}),
        # Caffe's non-legacy gradient divides by d + 1e-4 instead of d: ~1e-4 relative.
        ('type: "ContrastiveLoss" contrastive_loss_param { margin: 8 }',
         [far, rng.standard_normal((4, 2)), np.array([1.0, 0, 0, 1])], [0, 1], {"rtol": 1e-3}),
    ]


@pytest.mark.parametrize("case", range(len(_grad_cases())))
def test_loss_numerical_gradient(case):
    text, bottoms, check, tol = _grad_cases()[case]
    layer = make_layer(text, [b.shape for b in bottoms])
    check_gradient(layer, [], bottoms, check_bottoms=check, **tol)


# -- Accuracy ------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("ignore", [None, 0])
def test_accuracy_random(top_k, ignore):
    rng = np.random.default_rng(13)
    x = np.round(rng.standard_normal((3, 5, 2, 2)), 0)  # rounding makes ties common
    label = spatial_labels(rng, 3, 5, 2, 2)
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = make_layer(f'type: "Accuracy" accuracy_param {{ top_k: {top_k} {ig} }}',
                       [x.shape, label.shape], tops=["acc", "per_class"])
    assert not layer.is_loss and layer.top_shapes == [(), (5,)]
    acc, per = run(layer, [], [x, label])
    want, want_per = ref_accuracy(x, label, 1, top_k, ignore)
    np.testing.assert_allclose(acc, want, rtol=1e-12)
    np.testing.assert_allclose(per, want_per, rtol=1e-12)
    if ignore is not None:
        assert per[ignore] == 0


def test_accuracy_hand_values_with_ties():
    x = np.array([[1.0, 1.0, 0.0],   # tie between the true class 0 and class 1: wrong at top 1
                  [0.2, 0.5, 0.3],   # label 1: right
                  [0.9, 0.1, 0.4],   # label 2: second best, right only at top 2
                  [0.0, 0.0, 0.0]])  # label 2, all tied: wrong at top 1 and top 2
    label = np.array([0.0, 1.0, 2.0, 2.0])
    for k, want, want_per in [(1, 0.25, [0, 1, 0]), (2, 0.75, [1, 1, 0.5]), (3, 1.0, [1, 1, 1])]:
        layer = make_layer(f'type: "Accuracy" accuracy_param {{ top_k: {k} }}', [(4, 3), (4,)],
                           tops=["a", "p"])
        acc, per = run(layer, [], [x, label])
        assert float(acc) == pytest.approx(want)
        np.testing.assert_allclose(per, want_per)


def test_accuracy_axis_and_nothing_counted():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 4))
    label = rng.integers(0, 4, size=(2, 3)).astype(np.float32)
    layer = make_layer('type: "Accuracy" accuracy_param { axis: -1 }', [x.shape, label.shape])
    np.testing.assert_allclose(run(layer, [], [x, label])[0],
                               ref_accuracy(x, label, 2, 1, None)[0])
    ign = make_layer('type: "Accuracy" accuracy_param { ignore_label: 7 }', [(2, 3), (2,)])
    assert float(run(ign, [], [np.ones((2, 3)), np.array([7.0, 7.0])])[0]) == 0.0
    g = jax.grad(lambda v: layer.apply([], [v, jnp.asarray(label)], CTX)[0])(jnp.asarray(x))
    assert np.all(np.asarray(g) == 0)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, shapes, match", [
    ('type: "SoftmaxWithLoss"', [(2, 3, 2), (2, 3)], "number of labels"),
    ('type: "SoftmaxWithLoss"', [(2, 3), (3,)], "same first dimension"),
    ('type: "SoftmaxWithLoss" softmax_param { axis: 3 }', [(2, 3), (2,)], "axis 3 out of range"),
    ('type: "SoftmaxWithLoss"', [(2, 3)], "exactly 2 bottom"),
    ('type: "SigmoidCrossEntropyLoss"', [(2, 3), (2, 4)], "same count"),
    ('type: "EuclideanLoss"', [(2, 3), (2, 4)], "same dimension"),
    ('type: "EuclideanLoss"', [(2, 3), (3, 2)], "same first dimension"),
    ('type: "HingeLoss"', [(2, 3), (2, 2)], "one label per example"),
    ('type: "MultinomialLogisticLoss"', [(2, 3), (2, 3)], "one label per example"),
    ('type: "InfogainLoss"', [(2, 3), (2,), (2, 2)], "must be 3x3"),
    ('type: "InfogainLoss"', [(2, 3), (2,)], "needs the infogain matrix"),
    ('type: "InfogainLoss"', [(2, 3, 2), (2, 3), (3, 3)], "number of labels"),
    ('type: "InfogainLoss" loss_param { normalize: true }', [(2, 3), (2,), (3, 3)], "deprecated"),
    ('type: "InfogainLoss" infogain_loss_param { source: "/nonexistent/H.binaryproto" }',
     [(2, 3), (2,)], "cannot read"),
    ('type: "ContrastiveLoss"', [(2, 3), (2, 4), (2,)], "same number of channels"),
    ('type: "ContrastiveLoss"', [(2, 3, 2, 1), (2, 3, 2, 1), (2,)], "N x C"),
    ('type: "ContrastiveLoss"', [(2, 3), (2, 3), (3,)], "one similarity label"),
    ('type: "Accuracy" accuracy_param { top_k: 4 }', [(2, 3), (2,)], "top_k"),
    ('type: "Accuracy"', [(2, 3, 2), (2, 3)], "number of labels"),
])
def test_bad_input(text, shapes, match):
    with pytest.raises(JcaffeError, match=match) as e:
        make_layer(text, shapes)
    assert "\n" not in str(e.value) and "'layer'" in str(e.value)


def test_infogain_source_wrong_size_and_garbage(tmp_path):
    src = write_blob(tmp_path / "H.binaryproto", np.eye(2, dtype=np.float32))
    with pytest.raises(LayerError, match="must be 3x3"):
        make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{src}" }}',
                   [(2, 3), (2,)])
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(LayerError, match="not a binary BlobProto"):
        make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{bad}" }}',
                   [(2, 3), (2,)])
