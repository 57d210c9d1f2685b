"""Config.precision: every matmul and convolution of the shipped nets carries the chosen
precision (traced for a GPU, where an unspecified float32 product runs in TF32), and the
numbers of each choice against independent references."""

from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import text_format
from jax import lax

from jcaffe.config import Config
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2

ROOT = Path(__file__).resolve().parent.parent
# The shipped nets, their TRAIN data shape (channels, height, width) and batch size.
NETS = {"lenet": ("prototxt/lenet_train_test.prototxt", (1, 28, 28), 64),
        "cifar10_quick": ("prototxt/cifar10_quick_train_test.prototxt", (3, 32, 32), 100)}
PRODUCTS = ("dot_general", "conv_general_dilated")


def shipped_net_param(name: str, batch: int | None = None) -> caffe_pb2.NetParameter:
    """The shipped train/test net with each Data layer replaced by an Input layer of the
    shapes it would produce (datasets are not prepared in tests)."""
    path, chw, train_batch = NETS[name]
    param = text_format.Parse((ROOT / path).read_text(), caffe_pb2.NetParameter())
    for layer in param.layer:
        if layer.type != "Data":
            continue
        n = batch or layer.data_param.batch_size
        layer.type = "Input"
        layer.ClearField("data_param")
        layer.ClearField("transform_param")
        layer.input_param.shape.add().dim.extend((n,) + chw)
        layer.input_param.shape.add().dim.extend([n])
    return param


def batch_for(net: Net, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = {}
    for layer in net.layers:
        for top, shape, _ in layer.input_specs():
            if len(shape) == 1:
                out[top] = rng.integers(0, 10, shape).astype(dtype)
            else:
                out[top] = rng.uniform(0, 1, shape).astype(dtype)
    return out


def products(jaxpr):
    """Every dot_general / conv_general_dilated equation, recursively through sub-jaxprs
    (pjit, custom_vjp_call, scan, cond, ...)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PRODUCTS:
            yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from products(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from products(sub)


def violation(eqn, precision: str) -> str | None:
    """Why a product does not compute in ``precision`` (None when it does)."""
    got = eqn.params.get("precision")
    dtypes = tuple(str(v.aval.dtype) for v in eqn.invars[:2])
    if precision == "bf16":
        if dtypes != ("bfloat16", "bfloat16"):
            return f"operands {dtypes}, not bfloat16"
        return None if got == (lax.Precision.DEFAULT,) * 2 else f"precision {got}"
    want = {"float32": lax.Precision.HIGHEST, "tf32": lax.Precision.HIGH}[precision]
    if got != (want, want):
        return f"precision {got}, not {want} on both operands"
    return None


def grad_jaxpr(net: Net):
    """The gradient's program, traced from shapes alone (nothing computed)."""
    params = jax.eval_shape(net.init, jax.random.key(0))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_for(net).items()}
    return jax.make_jaxpr(jax.grad(net.loss, has_aux=True))(params, batch)


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_every_product_of_the_gradient_has_the_precision(name, precision):
    net = Net(shipped_net_param(name), "TRAIN", verbose=False,
              config=Config(platform="gpu", precision=precision))
    found = list(products(grad_jaxpr(net).jaxpr))
    # LeNet: 2 convolutions + 2 inner products forward, 7 products backward (conv1 has no
    # input gradient); CIFAR-10 quick: 3 + 2 forward, 9 backward.
    assert len(found) >= {"lenet": 11, "cifar10_quick": 14}[name]
    bad = [f"{e.primitive.name} {[str(v.aval) for v in e.invars[:2]]}: {why}"
           for e in found if (why := violation(e, precision))]
    assert not bad, f"{len(bad)} of {len(found)} products:\n" + "\n".join(bad)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_cpu_choices_carry_the_precision_too(precision):
    """The pure-JAX CPU formulation (channels-last im2col with its hand-written backward).
    (The oneDNN kernels are float32 only, in oneDNN's strict floating-point mode, and bf16
    never picks them: test_onednn.py.)"""
    net = Net(shipped_net_param("lenet", batch=4), "TRAIN", verbose=False,
              config=Config(platform="cpu", conv="im2col", precision=precision))
    found = list(products(grad_jaxpr(net).jaxpr))
    assert len(found) >= 8
    assert not [e for e in found if violation(e, precision)]


def bf16(a):
    """Round to bfloat16 (round to nearest even) and back, in float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_dot_and_its_gradients_against_numpy():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 40)).astype(np.float32)
    b = rng.standard_normal((40, 5)).astype(np.float32)
    g = rng.standard_normal((6, 5)).astype(np.float32)
    cfg = Config(precision="bf16")
    y, vjp = jax.vjp(cfg.dot, jnp.asarray(a), jnp.asarray(b))
    da, db = vjp(jnp.asarray(g))
    assert y.dtype == da.dtype == db.dtype == jnp.float32
    # Products of bfloat16-rounded operands summed in float32.
    np.testing.assert_allclose(y, bf16(a) @ bf16(b), rtol=1e-5, atol=1e-5)
    # Backward: bfloat16 gradient times bfloat16 operand, rounded to bfloat16.
    # (one bfloat16 ulp of slack: another summation order may round the other way)
    np.testing.assert_allclose(da, bf16(bf16(g) @ bf16(b).T), rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(db, bf16(bf16(a).T @ bf16(g)), rtol=2 ** -8, atol=1e-6)
    # Not the float32 product: the rounding is really there.
    assert np.abs(np.asarray(y) - a.astype(np.float64) @ b).max() > 1e-3


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_float32_and_tf32_convolutions(precision):
    """HIGHEST is float32 everywhere; HIGH is TF32 on GPUs and full float32 on CPU (TF32 needs
    tensor cores)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    cfg = Config(precision=precision)
    y = cfg.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), (1, 1), "VALID")
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = np.zeros((2, 4, 7, 7))
    for i in range(3):
        for j in range(3):
            ref += np.einsum("nchw,oc->nohw", x64[:, :, i:i + 7, j:j + 7], w64[:, :, i, j])
    tf32 = precision == "tf32" and jax.default_backend() == "gpu"
    # TF32: operands rounded to 10 mantissa bits, |error| <~ 2^-10 sum |x w| (27 terms ~ 1 each)
    tol = 27 * 2 ** -10 if tf32 else 1e-5
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def lenet_results():
    """LeNet loss and gradients (batch 16, random weights, the same in both layouts) for each
    precision and the float64 reference (params and data in double precision)."""
    out = {}
    for layout in ("NHWC", "NCHW"):
        nets = {p: Net(shipped_net_param("lenet", batch=16), "TRAIN", verbose=False,
                       config=Config(platform="cpu", layout=layout,
                                     conv="im2col" if layout == "NHWC" else "xla",
                                     pool="slices" if layout == "NHWC" else "reduce_window",
                                     precision=p))
                for p in ("float32", "bf16")}
        params = nets["float32"].init(jax.random.key(7))
        batch = batch_for(nets["float32"], seed=1)
        grad = lambda net, ps, bt: jax.jit(jax.value_and_grad(net.loss, has_aux=True))(ps, bt)
        for p, net in nets.items():
            (loss, _), g = grad(net, params, batch)
            out[layout, p] = (float(loss), g)
        if layout == "NCHW":  # the reference: one layout suffices in float64
            p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
            b64 = {k: v.astype(np.float64) for k, v in batch.items()}
            (loss, _), g = grad(nets["float32"], p64, b64)
            out["float64"] = (float(loss), g)
    return out


def _rel(g, ref):
    num = sum(float(jnp.sum((a.astype(jnp.float64) - r) ** 2))
              for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
    den = sum(float(jnp.sum(r ** 2)) for r in jax.tree.leaves(ref))
    return (num / den) ** 0.5


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_float32_lenet_is_float32_accurate(lenet_results, layout):
    loss32, g32 = lenet_results[layout, "float32"]
    loss64, g64 = lenet_results["float64"]
    assert abs(loss32 - loss64) <= 1e-5 * abs(loss64)
    assert _rel(g32, g64) < 1e-5


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_bf16_lenet_is_close_within_bf16_tolerance(lenet_results, layout):
    loss16, g16 = lenet_results[layout, "bf16"]
    loss64, g64 = lenet_results["float64"]
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g16))
    # bfloat16 operands (u = 2^-9) over a few layers: ~1e-2 relative, and clearly rounded.
    assert abs(loss16 - loss64) <= 1e-2 * abs(loss64)
    assert 1e-4 < _rel(g16, g64) < 5e-2
