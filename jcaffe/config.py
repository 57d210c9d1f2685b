"""How a net runs: one frozen value handed down from the command line to every layer.

A ``Config`` never changes what a net computes (Caffe's numbers, up to float rounding), only
how: the internal layout of 4-axis blobs, the formulation of convolution and pooling, the
matmul precision, and where datasets live. ``Net(..., config=Config(...))`` resolves it once
for the device the net is built for (``Config.resolved``) and hands the resolved value to each
layer (``layer.config``). Nothing below the command line reads flags or environment variables:
``Config.from_env`` is for the CLI only.

Fields (``"auto"`` picks what is fastest on ``platform``):

* ``platform``: ``"cpu"``, ``"gpu"``, ``"tpu"``; ``None`` is JAX's default backend.
* ``layout``: ``"NCHW"`` or ``"NHWC"``; auto is channels-last on CPU (im2col GEMMs with
  contiguous rows), NCHW elsewhere. Every interface stays Caffe's NCHW either way.
* ``conv``: ``"onednn"``, ``"im2col"`` or ``"xla"`` (``lax.conv_general_dilated``). ``onednn``
  runs 2-D channels-last float32 convolutions as oneDNN kernels called from XLA
  (``jcaffe.onednn``; CPU only, when the package's extension is built); ``im2col`` is the
  pure-JAX GEMM formulation. Auto on CPU is onednn where it applies and can run (not in bf16
  precision, whose products it does not round), else im2col (XLA's CPU convolution is slow in
  the weight gradient); xla elsewhere. Forced, onednn falls back to im2col for the layers it
  does not cover (channels-first, 1-D/3-D, Deconvolution).
* ``pool``: ``"slices"`` or ``"reduce_window"``; auto is slices on CPU, reduce_window elsewhere.
* ``precision``: how every matmul and convolution of every layer multiplies (see below);
  ``"float32"`` (default, Caffe's numbers), ``"tf32"`` or ``"bf16"`` (opt-in speed on GPUs).
* ``data_on_device``: ``True`` / ``False`` forces where datasets live; ``None`` decides by size.
* ``decode_workers``: threads that decode and crop host-fed records (``jcaffe.data.workers``);
  ``None`` or 0 is one per core available to the process, 1 decodes on the prefetch thread
  alone. Batches are the same records, bit for bit, whatever the count.
* ``im2col_max_elems``: the channels-first im2col materialises its whole column matrix;
  above this many elements auto uses XLA's convolution there.
* ``chunk_cols_elems``: channels-last convolutions loop over batch pieces whose columns
  stay below this many elements (cache-sized).
* ``scan``: whether the train step may run many iterations inside one ``lax.scan`` per
  dispatch; ``None`` lets each layer decide (``Layer.scan_ok``: not XLA's convolution on CPU,
  which falls back to slow kernels inside loops), ``True`` / ``False`` forces it (tests run
  the GPU combination, XLA convolutions inside ``lax.scan``, on the CPU this way).

Precision. Every ``dot_general`` and ``conv_general_dilated`` of the layers goes through
``Config.dot_general`` / ``Config.conv_general_dilated`` and so carries an explicit choice
(never JAX's unspecified default, which on Ampere and later NVIDIA GPUs is TF32). For
products ``y = sum_k a_k b_k`` of float32 blobs:

* ``"float32"``: ``precision=lax.Precision.HIGHEST`` on both operands: every ``a_k b_k`` and
  the sum in IEEE float32 (24-bit significand, relative rounding unit ``u = 2^-24``), as
  Caffe's cuBLAS/cuDNN calls compute; results agree with Caffe's to float32 rounding of the
  summation order. The same on every backend.
* ``"tf32"``: ``precision=lax.Precision.HIGH`` (JAX's alias ``"tensorfloat32"``). On NVIDIA
  GPUs with tensor cores the operands are rounded to TF32 (10-bit mantissa, ``u = 2^-11``)
  and the products summed in float32: ``|y - y_f32| <~ 2^-10 sum_k |a_k b_k|``. On CPU
  ``HIGH`` computes in full float32, so there tf32 gives float32's numbers. (XLA's
  ``DotAlgorithmPreset.TF32_TF32_F32`` says the same but is refused by the CPU backend, and
  convolutions cannot carry an algorithm at all, hence the precision enum.)
* ``"bf16"``: mixed precision, which Caffe never offered. Parameters, their gradients as
  the solver sees them and the solver history stay float32 ("master weights"); each matmul
  and convolution casts both operands to bfloat16 (8-bit significand, ``u = 2^-9``), and
  multiplies them with float32 accumulation and a float32 result
  (``preferred_element_type=float32``): ``|y - y_f32| <~ 2^-8 sum_k |a_k b_k|``. Backward,
  the incoming gradient is cast to bfloat16 too, so the two gradient products (with respect
  to the input and to the weight) are also bfloat16 x bfloat16 products with float32
  accumulation, rounded to bfloat16 and handed back as float32 (the scheme of mixed-precision
  training elsewhere); elementwise layers, softmax, losses and the solver stay float32. No
  loss scaling is needed: bfloat16 has float32's exponent range. The bf16 products are a
  ``jax.custom_vjp``, so forward-mode differentiation (``jax.jvp``) is float32/tf32 only. On
  CPU the casts happen as on a GPU, so bf16 numbers (not speed) are testable there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from jcaffe.errors import JcaffeError

LAYOUTS = ("NCHW", "NHWC")
CONV_IMPLS = ("xla", "im2col", "onednn")
POOL_IMPLS = ("reduce_window", "slices")
PRECISIONS = ("float32", "tf32", "bf16")

# Environment variables the CLI reads into a Config (field -> variable).
ENV = {"layout": "JCAFFE_LAYOUT", "conv": "JCAFFE_CONV_IMPL", "pool": "JCAFFE_POOL_IMPL",
       "precision": "JCAFFE_PRECISION", "data_on_device": "JCAFFE_DATA_ON_DEVICE",
       "decode_workers": "JCAFFE_DECODE_WORKERS"}


class ConfigError(JcaffeError):
    """An execution setting has a value jcaffe does not know (names the setting)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Execution choices for a net and its train step. See the module docstring."""

    platform: str | None = None
    layout: str = "auto"
    conv: str = "auto"
    pool: str = "auto"
    precision: str = "float32"
    data_on_device: bool | None = None
    decode_workers: int | None = None
    im2col_max_elems: int = 4_000_000
    chunk_cols_elems: int = 1_000_000
    scan: bool | None = None

    def __post_init__(self):
        _check("layout", self.layout, LAYOUTS)
        _check("conv", self.conv, CONV_IMPLS)
        _check("pool", self.pool, POOL_IMPLS)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: unknown value {self.precision!r} "
                              f"(known: {', '.join(PRECISIONS)})")
        if self.decode_workers is not None and (isinstance(self.decode_workers, bool) or
                                                not isinstance(self.decode_workers, int) or
                                                self.decode_workers < 0):
            raise ConfigError(f"decode_workers: expected an integer >= 0 (0: one per core), "
                              f"got {self.decode_workers!r}")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def is_resolved(self) -> bool:
        return self.platform is not None and "auto" not in (self.layout, self.pool)

    def resolved(self, platform: str | None = None) -> "Config":
        """The config with ``platform`` fixed (argument, then field, then JAX's default
        backend) and ``layout``/``pool`` decided for it. ``conv`` may stay ``"auto"``: its
        choice depends on each layer's size (``conv_for``)."""
        import jax

        platform = platform or self.platform or jax.default_backend()
        cpu = platform == "cpu"
        layout = self.layout if self.layout != "auto" else ("NHWC" if cpu else "NCHW")
        pool = self.pool if self.pool != "auto" else ("slices" if cpu else "reduce_window")
        return dataclasses.replace(self, platform=platform, layout=layout, pool=pool)

    def conv_for(self, cols_elems: int | None = None, onednn_ok: bool = False) -> str:
        """The convolution formulation of a layer whose channels-first column matrix has
        ``cols_elems`` elements (``None``: no size limit applies, e.g. channels-last);
        ``onednn_ok``: the layer is one the oneDNN kernels cover (2-D, channels-last)."""
        if self.conv == "onednn":
            if not onednn_ok:
                return "im2col"
            status = _onednn_status()
            if not status.ok:
                raise ConfigError(f"conv: onednn cannot run here: {status.detail}")
            return "onednn"
        if self.conv != "auto":
            return self.conv
        if self.platform != "cpu":
            return "xla"
        if onednn_ok and self.precision != "bf16" and _onednn_status().ok:
            return "onednn"
        if cols_elems is not None and cols_elems > self.im2col_max_elems:
            return "xla"
        return "im2col"

    @property
    def dot_precision(self):
        """The ``precision=`` of every matmul and convolution: Caffe's full float32
        (``HIGHEST``) unless TF32 (``HIGH``) or bf16 (operands cast to bfloat16, where
        ``DEFAULT`` is bfloat16 x bfloat16 with float32 accumulation) was chosen."""
        return _LAX_PRECISION[self.precision]()

    def dot_general(self, lhs, rhs, dimension_numbers):
        """``lax.dot_general`` in this config's precision (module docstring)."""
        from jax import lax

        op = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers)
        return _bilinear(self.precision, op, lhs, rhs)

    def dot(self, lhs, rhs):
        """``lhs [..., K] x rhs [K, N]`` in this config's precision."""
        return self.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())))

    def conv_general_dilated(self, lhs, rhs, window_strides, padding, **kwargs):
        """``lax.conv_general_dilated`` in this config's precision (module docstring)."""
        from jax import lax

        op = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                               padding=padding, **kwargs)
        return _bilinear(self.precision, op, lhs, rhs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides) -> "Config":
        """For the command line: the ``JCAFFE_*`` variables (see ``ENV``), then ``overrides``
        (flags; ``None`` values are ignored)."""
        values: dict = {}
        for field, var in ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            if field == "data_on_device":
                values[field] = _parse_bool(var, raw)
            elif field == "decode_workers":
                values[field] = _parse_count(var, raw)
            elif field in ("layout",):
                values[field] = raw.upper() if raw.lower() != "auto" else "auto"
            else:
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ConfigError as e:
            bad = next((ENV[f] for f in ENV if str(e).startswith(f + ":") and f in values
                        and f not in overrides), None)
            raise ConfigError(f"{bad}: {e}" if bad else str(e)) from None


def _onednn_status():
    from jcaffe import onednn
    return onednn.available()


def _highest():
    from jax import lax
    return lax.Precision.HIGHEST


def _high():
    from jax import lax
    return lax.Precision.HIGH


def _default():
    from jax import lax
    return lax.Precision.DEFAULT


_LAX_PRECISION = {"float32": _highest, "tf32": _high, "bf16": _default}


def _bilinear(precision: str, op, lhs, rhs) -> Any:
    """``op(lhs, rhs, precision=..., preferred_element_type=...)`` (a ``dot_general`` or a
    convolution with its static arguments bound) in the named precision."""
    if precision != "bf16":
        return op(lhs, rhs, precision=_LAX_PRECISION[precision]())
    return _bf16_bilinear(op, lhs, rhs)


def _bf16_bilinear(op, lhs, rhs):
    """Mixed precision: bfloat16 operands, float32 accumulation and result, forward and
    backward (module docstring). Without the custom VJP, JAX's transposes would multiply the
    float32 output gradient by a bfloat16 operand, a float32 product at the backend's default
    precision."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    bf16 = jnp.bfloat16
    out_dtype = lhs.dtype

    def run(a, b, out):
        return op(a, b, precision=lax.Precision.DEFAULT, preferred_element_type=out)

    @jax.custom_vjp
    def product(a, b):
        return run(a.astype(bf16), b.astype(bf16), out_dtype)

    def fwd(a, b):
        a16, b16 = a.astype(bf16), b.astype(bf16)
        return run(a16, b16, out_dtype), (a16, b16)

    def bwd(res, g):
        a16, b16 = res
        _, vjp = jax.vjp(lambda a, b: run(a, b, None), a16, b16)
        da, db = vjp(g.astype(bf16))
        return da.astype(lhs.dtype), db.astype(rhs.dtype)

    product.defvjp(fwd, bwd)
    return product(lhs, rhs)


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value != "auto" and value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r} (known: auto, {', '.join(choices)})")


def _parse_count(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{name}: expected an integer >= 0 (0: one per core), got {raw!r}")
    return value


def _parse_bool(name: str, raw: str) -> bool | None:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    if v == "auto":
        return None
    raise ConfigError(f"{name}: expected 0, 1 or auto, got {raw!r}")


DEFAULT = Config()
