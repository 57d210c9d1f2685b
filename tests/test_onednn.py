"""The oneDNN convolution kernels (``jcaffe.onednn``, ``jcaffe/csrc/onednn_conv.cc``) against
numpy re-implementations of Caffe's convolution and of its two gradients, over the geometries
Caffe allows (stride, zero padding, dilation, groups, rectangular kernels, padding past the
kernel, outputs that round down); through the Convolution layer; under jit, vmap, grad and
lax.scan; and the formulation choice and its fallbacks.

The references are written from Caffe's definition, in float64:
``y[n, p, q, o] = sum_{c in group(o), i, j} w[o, c, i, j] * xpad[n, p*s + i*d, q*s + j*d, c]``,
``dw[o, c, i, j] = sum_{n, p, q} xpad[n, p*s + i*d, q*s + j*d, c] * dy[n, p, q, o]``, and
``dx`` the scatter-add of ``dy[n, p, q, o] * w[o, c, i, j]`` back to the same positions.
"""

import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcaffe import onednn
from jcaffe.config import Config, ConfigError
from jcaffe.layers.base import Context
from tests.layer_utils import make_layer

STATUS = onednn.available()
needs_onednn = pytest.mark.skipif(not STATUS.ok, reason=f"oneDNN kernels: {STATUS.detail}")
LINUX_X86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _windows(geo, h, w):
    """Per kernel offset (i, j): the padded input's rows and columns it meets."""
    (sh, sw), (dh, dw), (kh, kw) = geo["stride"], geo["dil"], geo["kernel"]
    oh, ow = out_hw(geo, h, w)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            yield i, j, rows, cols


def out_hw(geo, h, w):
    (sh, sw), (ph, pw), (dh, dw), (kh, kw) = geo["stride"], geo["pad"], geo["dil"], geo["kernel"]
    return ((h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
            (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)


def _setup(x, w, geo):
    """(groups, output channels per group, input channels per group, the zero-padded x)."""
    c, (o, cg) = x.shape[3], w.shape[:2]
    g = c // cg
    (ph, pw) = geo["pad"]
    return g, o // g, cg, np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))


def conv_ref(x, w, geo):
    """Caffe's convolution, channels-last, float64."""
    n, h, wd, _ = x.shape
    o = w.shape[0]
    g, og, cg, xp = _setup(x, w, geo)
    oh, ow = out_hw(geo, h, wd)
    y = np.zeros((n, oh, ow, o))
    for i, j, rows, cols in _windows(geo, h, wd):
        piece = xp[:, rows, cols, :]  # [n, oh, ow, c]
        for gi in range(g):
            y[..., gi * og:(gi + 1) * og] += np.einsum(
                "npqc,oc->npqo", piece[..., gi * cg:(gi + 1) * cg],
                w[gi * og:(gi + 1) * og, :, i, j].astype(np.float64))
    return y


def conv_vjp_ref(x, w, dy, geo):
    """(dx, dw) of Caffe's convolution for the output gradient ``dy``, float64."""
    h, wd = x.shape[1:3]
    (ph, pw) = geo["pad"]
    g, og, cg, xp = _setup(x, w, geo)
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    dy = dy.astype(np.float64)
    for i, j, rows, cols in _windows(geo, h, wd):
        for gi in range(g):
            cs, os_ = slice(gi * cg, (gi + 1) * cg), slice(gi * og, (gi + 1) * og)
            dw[os_, :, i, j] += np.einsum("npqc,npqo->oc", xp[:, rows, cols, cs], dy[..., os_])
            dxp[:, rows, cols, cs] += np.einsum("npqo,oc->npqc", dy[..., os_],
                                                w[os_, :, i, j].astype(np.float64))
    return dxp[:, ph:ph + h, pw:pw + wd, :], dw


def assert_f32_close(actual, expect, abs_sum):
    """``actual`` is a float32 sum of products whose exact value is ``expect``: within float32
    rounding, ``|actual - expect| <= 16 u sum_k |a_k b_k|`` (u = 2^-24; a K-term sum may err
    by up to K u in the worst case, by about sqrt(K) u in practice)."""
    err = np.abs(np.asarray(actual, np.float64) - expect)
    bound = 16 * 2.0 ** -24 * abs_sum + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (f"at {worst}: {actual[worst]} vs {expect[worst]}, error "
                                  f"{err[worst]:.3g} > float32 bound {bound[worst]:.3g}")


# (n, h, w, c, o, kernel, stride, pad, dilation, group)
GEOMETRIES = [
    (2, 7, 7, 3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1),        # plain
    (3, 9, 11, 6, 8, (3, 3), (2, 2), (1, 1), (1, 1), 2),       # stride, pad, groups
    (2, 10, 10, 3, 5, (5, 5), (1, 1), (2, 2), (2, 2), 1),      # dilation, "same"-ish pad
    (1, 8, 9, 4, 6, (2, 3), (3, 2), (1, 0), (1, 2), 2),        # rectangular everything
    (2, 6, 6, 2, 3, (1, 1), (3, 3), (1, 1), (1, 1), 1),        # pad past a 1x1 kernel
    (2, 7, 8, 4, 4, (3, 3), (2, 3), (0, 1), (1, 1), 4),        # depthwise; output rounds down
    (4, 28, 28, 1, 20, (5, 5), (1, 1), (0, 0), (1, 1), 1),     # LeNet conv1 (C = 1)
    (2, 12, 12, 20, 50, (5, 5), (1, 1), (0, 0), (1, 1), 1),    # LeNet conv2
    (2, 32, 32, 3, 32, (5, 5), (1, 1), (2, 2), (1, 1), 1),     # CIFAR-10 quick conv1
]
IDS = [f"n{g[0]}-{g[1]}x{g[2]}x{g[3]}-o{g[4]}-k{g[5]}-s{g[6]}-p{g[7]}-d{g[8]}-g{g[9]}"
       for g in GEOMETRIES]


def _case(geometry, seed=0):
    n, h, w, c, o, kernel, stride, pad, dil, group = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((o, c // group) + kernel).astype(np.float32)
    geo = dict(kernel=kernel, stride=stride, pad=pad, dil=dil)
    spec = onednn.ConvSpec(stride, pad, dil, group)
    return x, wt, geo, spec, rng


def test_kernels_are_built_where_the_package_promises_them():
    # The install builds them on Linux x86-64 (setup.py); a silently failed build would
    # leave every other test here skipped.
    if not LINUX_X86:
        pytest.skip("the oneDNN kernels are built on Linux x86-64 only")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the install went on without the kernels, as designed")
    assert STATUS.ok, STATUS.detail
    assert STATUS.detail.startswith("oneDNN 3.")


@needs_onednn
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_forward_matches_caffe(geometry):
    x, w, geo, spec, _ = _case(geometry)
    y = jax.jit(onednn.conv2d, static_argnums=2)(x, w, spec)
    expect = conv_ref(x, w, geo)
    assert y.shape == expect.shape and y.dtype == jnp.float32
    assert_f32_close(y, expect, conv_ref(np.abs(x), np.abs(w), geo))


@needs_onednn
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_gradients_match_caffe(geometry):
    x, w, geo, spec, rng = _case(geometry, seed=1)
    dy = rng.standard_normal(conv_ref(x, w, geo).shape).astype(np.float32)
    _, vjp = jax.vjp(lambda a, b: onednn.conv2d(a, b, spec), jnp.asarray(x), jnp.asarray(w))
    dx, dw = jax.jit(vjp)(jnp.asarray(dy))
    dx_ref, dw_ref = conv_vjp_ref(x, w, dy, geo)
    dx_abs, dw_abs = conv_vjp_ref(np.abs(x), np.abs(w), np.abs(dy), geo)
    assert_f32_close(dx, dx_ref, dx_abs)
    assert_f32_close(dw, dw_ref, dw_abs)


@needs_onednn
def test_float32_numerics():
    # Integers up to 2^24 are exact in float32: a product computed in any reduced precision
    # (TF32, bfloat16) would round 2^11 + 1 and miss this exact answer.
    x = np.full((1, 1, 2, 1), 2.0 ** 11 + 1, np.float32)
    w = np.full((1, 1, 1, 2), 2.0 ** 11 + 1, np.float32)
    y = onednn.conv2d(jnp.asarray(x), jnp.asarray(w), onednn.ConvSpec((1, 1), (0, 0), (1, 1), 1))
    assert float(y[0, 0, 0, 0]) == 2 * (2.0 ** 11 + 1) ** 2


@needs_onednn
def test_vmap_scan_and_no_recompile():
    x, w, geo, spec, rng = _case(GEOMETRIES[1], seed=2)
    ws = np.stack([w, -w, 2 * w])
    ys = jax.vmap(lambda b: onednn.conv2d(jnp.asarray(x), b, spec))(jnp.asarray(ws))
    for k in range(3):
        assert_f32_close(ys[k], conv_ref(x, ws[k], geo), conv_ref(np.abs(x), np.abs(ws[k]), geo))

    # Inside lax.scan (the fused multi-iteration train step): a few gradient steps on w.
    def step(wc, _):
        g = jax.grad(lambda b: jnp.sum(onednn.conv2d(jnp.asarray(x), b, spec) ** 2))(wc)
        return wc - 1e-3 * g, None

    run = jax.jit(lambda w0: jax.lax.scan(step, w0, None, length=3)[0])
    w_out = run(jnp.asarray(w))
    expect = w.astype(np.float64)
    for _ in range(3):
        y = conv_ref(x, expect, geo)
        expect = expect - 1e-3 * conv_vjp_ref(x, expect, 2 * y, geo)[1]
    np.testing.assert_allclose(np.asarray(w_out), expect, rtol=1e-4, atol=1e-4)
    run(jnp.asarray(2 * w))
    assert run._cache_size() == 1


@needs_onednn
@pytest.mark.parametrize("body,shape", [
    ("num_output: 6 kernel_size: 3 group: 2 pad: 1 stride: 2", (2, 4, 7, 7)),
    ("num_output: 5 kernel_h: 2 kernel_w: 3 dilation: 2 bias_term: false", (3, 2, 8, 9)),
])
def test_convolution_layer(body, shape):
    layer = make_layer(f"type: 'Convolution' convolution_param {{ {body} }}", [shape],
                       config=Config(platform="cpu", layout="NHWC", conv="onednn"))
    assert layer.impl == "onednn"
    rng = np.random.default_rng(3)
    blobs = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in layer.blob_shapes]
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32).transpose(0, 2, 3, 1))
    ctx = Context(train=True)
    p = layer.param.convolution_param
    geo = dict(kernel=layer.kernel, stride=layer.stride, pad=layer.pad, dil=layer.dilation)
    y = jax.jit(lambda b, x: layer.apply_nhwc(b, [x], ctx)[0])(blobs, x)
    x64, w64 = np.asarray(x, np.float64), np.asarray(blobs[0], np.float64)
    expect = conv_ref(x64, w64, geo)
    bound = conv_ref(np.abs(x64), np.abs(w64), geo)
    if p.bias_term:
        expect = expect + np.asarray(blobs[1])
        bound = bound + np.abs(np.asarray(blobs[1]))
    assert_f32_close(y, expect, bound)
    dy = rng.standard_normal(expect.shape).astype(np.float32)
    grads = jax.grad(lambda b, x: jnp.sum(layer.apply_nhwc(b, [x], ctx)[0] * dy),
                     argnums=(0, 1))(blobs, x)
    dx_ref, dw_ref = conv_vjp_ref(x64, w64, dy, geo)
    dx_abs, dw_abs = conv_vjp_ref(np.abs(x64), np.abs(w64), np.abs(dy), geo)
    assert_f32_close(grads[1], dx_ref, dx_abs)
    assert_f32_close(grads[0][0], dw_ref, dw_abs)
    if p.bias_term:
        np.testing.assert_allclose(np.asarray(grads[0][1]), dy.sum(axis=(0, 1, 2)), rtol=1e-4,
                                   atol=1e-4)


CONV = "type: 'Convolution' convolution_param { num_output: 2 kernel_size: 3 }"
DECONV = "type: 'Deconvolution' convolution_param { num_output: 2 kernel_size: 3 }"


@needs_onednn
def test_auto_picks_onednn_where_it_applies():
    cpu = Config(platform="cpu", layout="NHWC")
    assert make_layer(CONV, [(1, 3, 5, 5)], config=cpu).impl == "onednn"
    # bf16 products are rounded by the pure-JAX path only; GPUs keep XLA's convolutions.
    assert make_layer(CONV, [(1, 3, 5, 5)], config=cpu.replace(precision="bf16")).impl == "im2col"
    assert make_layer(CONV, [(1, 3, 5, 5)], config=Config(platform="gpu")).impl == "xla"
    # Not 2-d channels-last: Deconvolution and 3-d convolutions keep im2col, even forced.
    forced = cpu.replace(conv="onednn")
    assert make_layer(DECONV, [(1, 3, 5, 5)], config=forced).impl == "im2col"
    assert make_layer(CONV, [(1, 3, 5, 5, 5)], config=forced).impl == "im2col"


def test_unavailable_kernels_fall_back_or_say_why(monkeypatch):
    from jcaffe import config as config_mod

    monkeypatch.setattr(config_mod, "_onednn_status",
                        lambda: onednn.Status(False, "the extension jcaffe/_onednn was not built"))
    cpu = Config(platform="cpu", layout="NHWC")
    assert make_layer(CONV, [(1, 3, 5, 5)], config=cpu).impl == "im2col"
    with pytest.raises(ConfigError, match="conv: onednn cannot run here: the extension "
                                          "jcaffe/_onednn was not built"):
        make_layer(CONV, [(1, 3, 5, 5)], config=cpu.replace(conv="onednn"))


@needs_onednn
def test_plans_name_the_chosen_implementation():
    x, w, geo, spec, _ = _case(GEOMETRIES[0])
    jax.block_until_ready(onednn.conv2d(jnp.asarray(x), jnp.asarray(w), spec))
    lines = [l for l in onednn.plans() if l.startswith("forward n2 7x7x3 -> 4 k3x3")]
    assert len(lines) == 1, onednn.plans()
    # A JIT kernel for this machine, not oneDNN's reference loops (orders of magnitude slower).
    impl = lines[0].split(": ", 1)[1]
    assert impl and not impl.startswith("ref"), impl


@needs_onednn
def test_calls_from_many_threads():
    # XLA runs a custom call on whichever of its threads is free, and callers may dispatch
    # from several Python threads: plans made on one thread run on others (each with its own
    # scratchpad needs), and calls never interleave inside oneDNN.
    import concurrent.futures

    cases = [_case(g, seed=10 + i) for i, g in enumerate(GEOMETRIES[:6])]
    fns = [jax.jit(jax.value_and_grad(lambda w, x, s=spec: jnp.sum(onednn.conv2d(x, w, s) ** 2)))
           for _, _, _, spec, _ in cases]

    def work(k):
        x, w, geo, spec, _ = cases[k % len(cases)]
        value, grad = fns[k % len(cases)](jnp.asarray(w), jnp.asarray(x))
        return k, float(value), np.asarray(grad)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4 * len(cases))))
    for k, value, grad in results:
        x, w, geo, _, _ = cases[k % len(cases)]
        y = conv_ref(x, w, geo)
        np.testing.assert_allclose(value, np.sum(y ** 2), rtol=1e-4)
        np.testing.assert_allclose(grad, conv_vjp_ref(x, w, 2 * y, geo)[1], rtol=1e-3,
                                   atol=1e-3 * np.abs(y).max() * np.abs(x).max() * x.shape[0])
