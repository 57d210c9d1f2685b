"""Neuron layers: forward against numpy versions of Caffe's formulas, the gradient against
numpy versions of Caffe's hand-written backward passes (kinks included) and against finite
differences, Dropout's mask statistics, and bad parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcaffe.errors import JcaffeError, LayerError
from jcaffe.layers.base import REGISTRY, Context, known_types
from tests.layer_utils import check_gradient, make_layer, run


def f32(v):
    """A prototxt float as the float32 Caffe stores."""
    return float(np.float32(v))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bnll(x):
    # Caffe's two branches, each evaluated only where it is used.
    out = np.empty_like(x)
    pos = x > 0
    out[pos] = x[pos] + np.log1p(np.exp(-x[pos]))
    out[~pos] = np.log1p(np.exp(x[~pos]))
    return out


# Each case: prototxt, forward reference f(x), Caffe's backward d top / d x as g(x, top),
# points to include where Caffe's backward picks a one-sided value, and the input domain of
# the smooth gradient check ("any": |x| in [0.3, 2], "pos": x in [0.3, 2]).
S, A, B = f32(0.1), f32(0.5), f32(2.0)
CASES = {
    "relu": ('type: "ReLU"', lambda x: np.maximum(x, 0), lambda x, y: (x > 0) * 1.0,
             [0.0], "any"),
    "leaky_relu": ('type: "ReLU" relu_param { negative_slope: 0.1 }',
                   lambda x: np.where(x > 0, x, S * x),
                   lambda x, y: (x > 0) + S * (x <= 0), [0.0], "any"),
    "elu": ('type: "ELU"', lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
            lambda x, y: (x > 0) + (1 + y) * (x <= 0), [0.0], "any"),
    "elu_alpha": ('type: "ELU" elu_param { alpha: 0.5 }',
                  lambda x: np.where(x > 0, x, A * np.expm1(np.minimum(x, 0))),
                  lambda x, y: (x > 0) + (A + y) * (x <= 0), [0.0], "any"),
    "sigmoid": ('type: "Sigmoid"', sigmoid, lambda x, y: y * (1 - y), [], "any"),
    "tanh": ('type: "TanH"', np.tanh, lambda x, y: 1 - y * y, [], "any"),
    "absval": ('type: "AbsVal"', np.abs, lambda x, y: np.sign(x), [0.0], "any"),
    "power_square": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
                     lambda x: (1 + A * x) ** 2, lambda x, y: 2 * A * (1 + A * x), [], "any"),
    "power_cube_negative_base": ('type: "Power" power_param { power: 3 shift: -1 }',
                                 lambda x: (x - 1) ** 3, lambda x, y: 3 * (x - 1) ** 2, [],
                                 "any"),
    "power_sqrt": ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.5 }',
                   lambda x: np.sqrt(0.5 + B * x), lambda x, y: 0.5 * B / np.sqrt(0.5 + B * x),
                   [], "pos"),
    "power_inverse": ('type: "Power" power_param { power: -1 }', lambda x: 1 / x,
                      lambda x, y: -1 / x ** 2, [], "any"),
    "power_linear": ('type: "Power" power_param { scale: 2 shift: -1 }', lambda x: B * x - 1,
                     lambda x, y: np.full_like(x, B), [], "any"),
    "power_zero_power": ('type: "Power" power_param { power: 0 scale: 3 }',
                         lambda x: np.ones_like(x), lambda x, y: np.zeros_like(x), [0.0], "any"),
    "power_zero_scale": ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }',
                         lambda x: np.full_like(x, 8.0), lambda x, y: np.zeros_like(x), [0.0],
                         "any"),
    "exp": ('type: "Exp"', np.exp, lambda x, y: y, [], "any"),
    "exp_base2": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }',
                  lambda x: 2.0 ** (1 + A * x), lambda x, y: y * np.log(2) * A, [], "any"),
    "log": ('type: "Log"', np.log, lambda x, y: 1 / x, [], "pos"),
    "log_base10": ('type: "Log" log_param { base: 10 scale: 2 shift: 3 }',
                   lambda x: np.log10(3 + B * x), lambda x, y: B / np.log(10) / (3 + B * x),
                   [], "pos"),
    "bnll": ('type: "BNLL"', bnll, lambda x, y: sigmoid(x), [0.0, -80.0, 80.0], "any"),
    "threshold": ('type: "Threshold" threshold_param { threshold: 0.5 }',
                  lambda x: (x > A) * 1.0, lambda x, y: np.zeros_like(x), [0.5], "any"),
    "clip": ('type: "Clip" clip_param { min: -1 max: 1.5 }', lambda x: np.clip(x, -1, 1.5),
             lambda x, y: ((x >= -1) & (x <= 1.5)) * 1.0, [-1.0, 1.5], "any"),
    "swish": ('type: "Swish"', lambda x: x * sigmoid(x),
              lambda x, y: y + sigmoid(x) * (1 - y), [0.0], "any"),
    "swish_beta": ('type: "Swish" swish_param { beta: 2 }', lambda x: x * sigmoid(B * x),
                   lambda x, y: B * y + sigmoid(B * x) * (1 - B * y), [0.0], "any"),
}
IDS = list(CASES)
SHAPE = (2, 3, 2)


def sample(domain, shape=SHAPE, seed=0, kinks=()):
    """Values with |x| in [0.3, 2] (away from every kink above) and the kinks themselves."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.3, 2.0, shape)
    x = mag if domain == "pos" else mag * rng.choice([-1.0, 1.0], shape)
    flat = x.reshape(-1)
    # Keep the clip bounds and the threshold off the smooth samples.
    for edge in (-1.0, 1.5, 0.5):
        flat[np.abs(flat - edge) < 0.05] += 0.1
    flat[:len(kinks)] = kinks
    return x


@pytest.mark.parametrize("case", IDS)
def test_forward_matches_caffe_formula(case):
    text, fwd, _, kinks, domain = CASES[case]
    layer = make_layer(text, [SHAPE])
    assert layer.top_shapes == [SHAPE]
    assert layer.blob_shapes == []
    x = sample(domain, kinks=kinks)
    (y,) = run(layer, [], [x])
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, fwd(x), rtol=1e-12, atol=1e-12)
    # float32 in, float32 out.
    (y32,) = run(layer, [], [x.astype(np.float32)])
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, fwd(x), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("case", IDS)
def test_gradient_matches_caffe_backward_including_kinks(case):
    text, _, bwd, kinks, domain = CASES[case]
    layer = make_layer(text, [SHAPE])
    x = sample(domain, seed=1, kinks=kinks)
    ctx = Context(train=True)
    top, vjp = jax.vjp(lambda b: layer.apply([], [b], ctx)[0], jnp.asarray(x))
    w = np.random.default_rng(2).standard_normal(SHAPE)
    (g,) = vjp(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(g), w * bwd(x, np.asarray(top)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", IDS)
def test_gradient_numerically(case):
    text, _, _, _, domain = CASES[case]
    layer = make_layer(text, [SHAPE])
    check_gradient(layer, [], [sample(domain, seed=3)])


def test_bnll_stable_in_the_tails():
    layer = make_layer('type: "BNLL"', [(4,)])
    x = np.array([-1000.0, -60.0, 60.0, 1000.0], np.float32)
    (y,) = run(layer, [], [x])
    np.testing.assert_allclose(y, [0.0, np.exp(-60.0), 60.0, 1000.0], rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda b: jnp.sum(layer.apply([], [b], Context(train=True))[0]))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), [0.0, np.exp(-60.0), 1.0, 1.0], atol=1e-7)


def test_elu_and_swish_finite_for_large_inputs():
    for text in ('type: "ELU"', 'type: "Swish"', 'type: "Sigmoid"'):
        layer = make_layer(text, [(2,)])
        x = jnp.asarray([-500.0, 500.0], jnp.float32)
        g = jax.grad(lambda b: jnp.sum(layer.apply([], [b], Context(train=True))[0]))(x)
        assert np.all(np.isfinite(np.asarray(g))), text
        assert np.all(np.isfinite(run(layer, [], [x])[0])), text


def test_jit_matches_eager():
    x = sample("pos", seed=4)
    for case in ("leaky_relu", "power_sqrt", "log_base10", "clip"):
        layer = make_layer(CASES[case][0], [SHAPE])
        ctx = Context(train=True)
        eager = np.asarray(layer.apply([], [jnp.asarray(x)], ctx)[0])
        jitted = np.asarray(jax.jit(lambda b: layer.apply([], [b], ctx)[0])(x))
        np.testing.assert_allclose(jitted, eager, rtol=1e-14)


# -- PReLU ------------------------------------------------------------------------------------

PRELU_SHAPE = (2, 3, 2, 2)


def prelu_ref(x, a, shared):
    a = np.reshape(a, (1, 1, 1, 1) if shared else (1, -1, 1, 1))
    return np.where(x > 0, x, a * x)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_blob_and_default_filler(shared):
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}',
                       [PRELU_SHAPE])
    assert layer.blob_shapes == [() if shared else (3,)]  # Caffe: a 0-axis blob when shared
    (a,) = layer.init(jax.random.key(0))
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.full(layer.blob_shapes[0], 0.25, np.float32))


def test_prelu_filler_is_used():
    layer = make_layer('type: "PReLU" prelu_param { filler { type: "constant" value: 0.7 } }',
                       [PRELU_SHAPE])
    np.testing.assert_allclose(np.asarray(layer.init(jax.random.key(0))[0]), [0.7] * 3, rtol=1e-7)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_forward_and_gradient(shared):
    layer = make_layer(f'type: "PReLU" prelu_param {{ channel_shared: {str(shared).lower()} }}',
                       [PRELU_SHAPE])
    x = sample("any", PRELU_SHAPE, seed=5)
    a = np.array(0.3) if shared else np.array([0.1, -0.2, 0.5])
    (y,) = run(layer, [a], [x])
    np.testing.assert_allclose(y, prelu_ref(x, a, shared), rtol=1e-12)
    (y32,) = run(layer, [a.astype(np.float32)], [x.astype(np.float32)])
    assert y32.dtype == np.float32
    check_gradient(layer, [a], [x])
    # Caffe's slope gradient: sum over the channel (or everything) of top_diff * x where x <= 0.
    w = np.random.default_rng(6).standard_normal(PRELU_SHAPE)
    ga = jax.grad(lambda s: jnp.sum(layer.apply([s], [jnp.asarray(x)], Context(True))[0] * w))(
        jnp.asarray(a))
    contrib = w * x * (x <= 0)
    expect = contrib.sum() if shared else contrib.sum(axis=(0, 2, 3))
    np.testing.assert_allclose(np.asarray(ga), expect, rtol=1e-12)


def test_prelu_needs_two_axes():
    with pytest.raises(LayerError, match="at least 2 axes"):
        make_layer('type: "PReLU"', [(5,)])


# -- Dropout ----------------------------------------------------------------------------------

def test_dropout_mask_statistics():
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [(200, 500)])
    assert type(layer).needs_key
    x = np.random.default_rng(0).uniform(1.0, 2.0, (200, 500)).astype(np.float32)
    (y,) = run(layer, [], [x], train=True, key=jax.random.key(7))
    assert y.dtype == np.float32
    kept = y != 0
    # 100000 Bernoulli(0.7) draws: standard deviation of the fraction is ~0.0015.
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(y[kept], x[kept] / np.float32(0.7), rtol=1e-6)


def test_dropout_default_ratio_and_determinism():
    layer = make_layer('type: "Dropout"', [(50, 40)])
    x = np.ones((50, 40))
    (a,) = run(layer, [], [x], key=jax.random.key(1))
    (b,) = run(layer, [], [x], key=jax.random.key(1))
    (c,) = run(layer, [], [x], key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) == {0.0, 2.0}
    assert abs((a != 0).mean() - 0.5) < 0.06


def test_dropout_identity_when_not_training():
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.9 }', [SHAPE])
    x = sample("any")
    for key in (jax.random.key(0), None):
        out = layer.apply([], [jnp.asarray(x)], Context(train=False, key=key))
        np.testing.assert_array_equal(np.asarray(out[0]), x)


def test_dropout_gradient_is_the_scaled_mask():
    layer = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', [(4, 5)])
    key = jax.random.key(3)
    x = sample("any", (4, 5))
    check_gradient(layer, [], [x], key=key)
    (y,) = run(layer, [], [x], key=key)
    g = jax.grad(lambda b: jnp.sum(layer.apply([], [b], Context(True, key))[0]))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), (y != 0) / f32(0.75), rtol=1e-12)


def test_dropout_requires_key_in_training():
    layer = make_layer('type: "Dropout"', [SHAPE])
    with pytest.raises(LayerError, match="PRNG key for its dropout mask in training mode; it "
                                         "was applied with train=True and no key"):
        layer.apply([], [jnp.ones(SHAPE)], Context(train=True, key=None))
    # at test time Dropout is the identity and needs no key
    (y,) = layer.apply([], [jnp.ones(SHAPE)], Context(train=False, key=None))
    np.testing.assert_array_equal(y, 1)


# -- registry and bad parameters ---------------------------------------------------------------

def test_all_neuron_types_registered():
    names = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
             "Threshold", "Clip", "Swish", "Dropout"}
    assert names <= set(known_types())
    for n in names:
        assert REGISTRY[n].exact_bottoms == 1 and REGISTRY[n].exact_tops == 1


@pytest.mark.parametrize("text, match", [
    ('type: "Exp" exp_param { base: -2 }', "base must be positive"),
    ('type: "Exp" exp_param { base: 0 }', "base must be positive"),
    ('type: "Log" log_param { base: 0 }', "base must be positive"),
    ('type: "Log" log_param { base: 1 }', "must not be 1"),
    ('type: "Clip" clip_param { min: 2 max: 1 }', "greater than max"),
    ('type: "Clip" clip_param { min: 0 }', "needs both min and max"),
    ('type: "Dropout" dropout_param { dropout_ratio: 1 }', r"dropout_ratio must be in \[0, 1\)"),
    ('type: "Dropout" dropout_param { dropout_ratio: -0.1 }', "dropout_ratio"),
])
def test_bad_parameters(text, match):
    with pytest.raises(LayerError, match=match) as e:
        make_layer(text, [SHAPE])
    assert "layer 'layer'" in str(e.value) and "\n" not in str(e.value)


def test_wrong_blob_counts():
    with pytest.raises(JcaffeError, match="exactly 1 bottom"):
        make_layer('type: "ReLU"', [SHAPE, SHAPE])
    with pytest.raises(JcaffeError, match="exactly 1 top"):
        make_layer('type: "Sigmoid"', [SHAPE], tops=["a", "b"])


def test_power_constant_edge_values():
    # scale 0: C's pow gives NaN for a negative base with a fractional power, inf for 0^-1.
    for text, value in (('power: 0.5 scale: 0 shift: -4', np.nan),
                        ('power: -1 scale: 0 shift: 0', np.inf)):
        layer = make_layer(f'type: "Power" power_param {{ {text} }}', [(2,)])
        np.testing.assert_array_equal(run(layer, [], [np.zeros(2)])[0], [value, value])
