"""jcaffe.fillers.fill against Caffe's filler.hpp formulas.

Statistics use fixed keys and blobs large enough that every tolerance is at least six standard
errors of the estimate, so a change of random stream cannot make them flake.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcaffe.errors import JcaffeError
from jcaffe.fillers import fill
from jcaffe.proto import caffe_pb2

FP = caffe_pb2.FillerParameter
KEY = jax.random.PRNGKey(0)
# A convolution weight [O, I, kh, kw] with O != I, so that the three variance norms differ:
# fan_in = I*kh*kw = 1152, fan_out = O*kh*kw = 288, average = 720 (counted by hand).
CONV = (32, 128, 3, 3)
CONV_N = {FP.FAN_IN: 1152.0, FP.FAN_OUT: 288.0, FP.AVERAGE: 720.0}


def _fill(shape, key=KEY, dtype=jnp.float32, **kw):
    out = fill(FP(**kw), shape, key, dtype=dtype, where="layer 'w' blob 0")
    assert out.shape == tuple(shape) and out.dtype == dtype
    return np.asarray(out, dtype=np.float64)


def test_constant():
    x = _fill((3, 4, 5), type="constant", value=0.25)
    assert np.all(x == 0.25)
    # Caffe's default filler: type "constant", value 0.
    assert np.all(np.asarray(fill(FP(), (2, 3), KEY)) == 0.0)


def test_uniform_range_and_moments():
    x = _fill((200_000,), type="uniform", min=-2.0, max=3.0)
    assert x.min() >= -2.0 and x.max() < 3.0
    assert x.min() < -1.99 and x.max() > 2.99  # the whole range is used
    assert abs(x.mean() - 0.5) < 0.02           # SE 0.0032
    assert abs(x.var() / (25 / 12) - 1) < 0.02  # relative SE 0.0020


def test_gaussian_mean_std():
    x = _fill((400, 500), type="gaussian", mean=0.5, std=2.0)
    assert abs(x.mean() - 0.5) < 0.03   # SE 0.0045
    assert abs(x.std() / 2.0 - 1) < 0.01  # relative SE 0.0016
    assert np.all(x != 0.0)             # not sparse by default (sparse = -1)


def test_sparse_gaussian_keeps_sparse_over_num_outputs():
    # Caffe: each entry is kept with probability sparse / shape[0] = 3 / 10.
    x = _fill((10, 20_000), type="gaussian", std=1.5, sparse=3)
    zero = np.mean(x == 0.0)
    assert abs(zero - (1 - 3 / 10)) < 0.01  # SE 0.001
    kept = x[x != 0.0]
    assert abs(kept.std() / 1.5 - 1) < 0.02
    # sparse: 0 keeps nothing.
    assert np.all(_fill((10, 100), type="gaussian", sparse=0) == 0.0)


@pytest.mark.parametrize("norm", [FP.FAN_IN, FP.FAN_OUT, FP.AVERAGE])
def test_xavier_bounds_and_variance(norm):
    n = CONV_N[norm]
    bound = math.sqrt(3.0 / n)
    x = _fill(CONV, type="xavier", variance_norm=norm)
    assert np.abs(x).max() <= bound * (1 + 1e-6)
    assert np.abs(x).max() > 0.99 * bound
    assert abs(x.var() / (1.0 / n) - 1) < 0.05  # relative SE 0.0047
    assert abs(x.mean()) < 6 * math.sqrt(1.0 / n / x.size)


def test_xavier_default_norm_is_fan_in():
    assert np.array_equal(_fill(CONV, type="xavier"),
                          _fill(CONV, type="xavier", variance_norm=FP.FAN_IN))


def test_xavier_one_axis_blob():
    # Caffe (1-d blob handling): fan_in = count / shape[0] = 1, fan_out = count = 1000.
    x = _fill((1000,), type="xavier")
    assert np.abs(x).max() <= math.sqrt(3.0) * (1 + 1e-6) and np.abs(x).max() > 1.5
    y = _fill((1000,), type="xavier", variance_norm=FP.FAN_OUT)
    assert np.abs(y).max() <= math.sqrt(3.0 / 1000) * (1 + 1e-6)


@pytest.mark.parametrize("norm", [FP.FAN_IN, FP.FAN_OUT, FP.AVERAGE])
def test_msra_std(norm):
    std = math.sqrt(2.0 / CONV_N[norm])
    x = _fill(CONV, type="msra", variance_norm=norm)
    assert abs(x.std() / std - 1) < 0.03  # relative SE 0.0037
    assert abs(x.mean()) < 6 * std / math.sqrt(x.size)


def test_positive_unitball_rows_sum_to_one():
    x = _fill((8, 3, 4, 5), type="positive_unitball")
    assert np.all(x > 0.0)
    np.testing.assert_allclose(x.reshape(8, -1).sum(axis=1), np.ones(8), rtol=1e-5)
    # Rows are not all alike: the values are random, then normalized.
    assert np.unique(x).size > 400


def test_bilinear_4x4_hand_computed():
    # Caffe: f = ceil(4 / 2) = 2, c = (4 - 1) / (2 f) = 3/4; w(x) = 1 - |x/f - c| for x = 0..3
    # gives [1/4, 3/4, 3/4, 1/4]; the kernel is w(y) w(x), the same for every [out, in] pair.
    k = np.array([[1, 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]]) / 16.0
    x = _fill((2, 3, 4, 4), type="bilinear")
    for o in range(2):
        for i in range(3):
            np.testing.assert_array_equal(x[o, i], k)


@pytest.mark.parametrize("size, w", [
    (1, [1.0]),
    (4, [1 / 4, 3 / 4, 3 / 4, 1 / 4]),
    (5, [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]),
    # Sizes where Caffe's current centre c = (K - 1) / 2f differs from its original
    # c = (2f - 1 - f % 2) / 2f (off-centre for these sizes).
    (2, [1 / 2, 1 / 2]),
    (3, [1 / 2, 1, 1 / 2]),
    (6, [1 / 6, 1 / 2, 5 / 6, 5 / 6, 1 / 2, 1 / 6]),
    (7, [1 / 4, 1 / 2, 3 / 4, 1, 3 / 4, 1 / 2, 1 / 4]),
])
def test_bilinear_sizes_follow_caffe(size, w):
    # f = ceil(K / 2), c = (K - 1) / (2 f), w(x) = 1 - |x / f - c| (Caffe's BilinearFiller).
    x = _fill((1, 2, size, size), type="bilinear")
    np.testing.assert_allclose(x[0, 1], np.outer(w, w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 4)])
def test_bilinear_needs_square_4d(shape):
    with pytest.raises(JcaffeError, match=r"layer 'w' blob 0: the bilinear filler needs"):
        fill(FP(type="bilinear"), shape, KEY, where="layer 'w' blob 0")


RANDOM = [dict(type="uniform", min=-1.0, max=1.0), dict(type="gaussian", std=0.1),
          dict(type="gaussian", sparse=2), dict(type="xavier"), dict(type="msra"),
          dict(type="positive_unitball")]


@pytest.mark.parametrize("kw", RANDOM, ids=lambda kw: kw["type"] + str(kw.get("sparse", "")))
def test_deterministic_from_key(kw):
    a = _fill((6, 4, 3, 3), key=jax.random.PRNGKey(7), **kw)
    b = _fill((6, 4, 3, 3), key=jax.random.PRNGKey(7), **kw)
    c = _fill((6, 4, 3, 3), key=jax.random.PRNGKey(8), **kw)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dtype_is_honoured():
    x = fill(FP(type="gaussian"), (4, 4), KEY, dtype=jnp.float64)
    assert x.dtype == jnp.float64


def test_unknown_filler_type():
    with pytest.raises(JcaffeError) as e:
        fill(FP(type="glorot"), (2, 2), KEY, where="layer 'conv1' blob 0")
    msg = str(e.value)
    assert "unknown filler type 'glorot'" in msg and "layer 'conv1' blob 0" in msg
    assert "\n" not in msg
