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
* ``conv``: ``"im2col"`` or ``"xla"`` (``lax.conv_general_dilated``); auto is im2col on CPU
  (XLA's CPU convolution is slow in the weight gradient) and xla elsewhere.
* ``pool``: ``"slices"`` or ``"reduce_window"``; auto is slices on CPU, reduce_window elsewhere.
* ``precision``: ``"float32"`` (Caffe's numbers: full float32 in every matmul and convolution),
  ``"tf32"`` or ``"bf16"`` (opt-in speed on GPUs).
* ``data_on_device``: ``True`` / ``False`` forces where datasets live; ``None`` decides by size.
* ``im2col_max_elems``: the channels-first im2col materialises its whole column matrix;
  above this many elements auto uses XLA's convolution there.
* ``chunk_cols_elems``: channels-last convolutions loop over batch pieces whose columns
  stay below this many elements (cache-sized).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from jcaffe.errors import JcaffeError

LAYOUTS = ("NCHW", "NHWC")
CONV_IMPLS = ("xla", "im2col")
POOL_IMPLS = ("reduce_window", "slices")
PRECISIONS = ("float32", "tf32", "bf16")

# Environment variables the CLI reads into a Config (field -> variable).
ENV = {"layout": "JCAFFE_LAYOUT", "conv": "JCAFFE_CONV_IMPL", "pool": "JCAFFE_POOL_IMPL",
       "precision": "JCAFFE_PRECISION", "data_on_device": "JCAFFE_DATA_ON_DEVICE"}


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
    im2col_max_elems: int = 4_000_000
    chunk_cols_elems: int = 1_000_000

    def __post_init__(self):
        _check("layout", self.layout, LAYOUTS)
        _check("conv", self.conv, CONV_IMPLS)
        _check("pool", self.pool, POOL_IMPLS)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: unknown value {self.precision!r} "
                              f"(known: {', '.join(PRECISIONS)})")

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

    def conv_for(self, cols_elems: int | None = None) -> str:
        """The convolution formulation of a layer whose channels-first column matrix has
        ``cols_elems`` elements (``None``: no size limit applies, e.g. channels-last)."""
        if self.conv != "auto":
            return self.conv
        if self.platform != "cpu":
            return "xla"
        if cols_elems is not None and cols_elems > self.im2col_max_elems:
            return "xla"
        return "im2col"

    @property
    def dot_precision(self):
        """The ``precision=`` of every matmul and convolution: Caffe's full float32 unless
        TF32 or bf16 was chosen."""
        from jax import lax

        return {"float32": lax.Precision.HIGHEST, "tf32": lax.Precision.HIGH,
                "bf16": lax.Precision.DEFAULT}[self.precision]

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


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value != "auto" and value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r} (known: auto, {', '.join(choices)})")


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
