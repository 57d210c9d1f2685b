"""Neuron layers: one bottom, one top of the same shape, applied element by element.

Each layer reproduces Caffe's forward formula and, where Caffe's hand-written backward pass picks
a value at a kink (x == 0 for ReLU, the clip bounds, ...), the same one-sided derivative, so
gradients match Caffe's element by element. In-place use (top == bottom) is resolved by the Net.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jcaffe.fillers import fill
from jcaffe.layers.base import Context, Layer, Shape, register
from jcaffe.proto import caffe_pb2


class NeuronLayer(Layer):
    """Base of element-wise layers: the top has the bottom's shape."""

    exact_bottoms = 1
    exact_tops = 1
    # Element-wise with no per-channel parameters: the same on any internal layout.
    layout_agnostic = True

    def setup(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.read_params(bottom_shapes[0])
        return [bottom_shapes[0]]

    def read_params(self, shape: Shape) -> None:
        """Reads and checks the layer's hyperparameters (none by default)."""

    def apply(self, blobs, bottoms, ctx: Context):
        return [self.forward(bottoms[0])]

    def forward(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


def _sigmoid(x: jax.Array) -> jax.Array:
    # Caffe's sigmoid is 0.5 * tanh(0.5 x) + 0.5: exact in both tails, never overflows.
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


@register("ReLU")
class ReLULayer(NeuronLayer):
    """``y = x if x > 0 else negative_slope * x`` (leaky when ``negative_slope`` != 0).

    Caffe's backward uses ``negative_slope`` at x == 0; the ``where`` on ``x > 0`` does the same.
    """

    def read_params(self, shape):
        self.negative_slope = float(self.param.relu_param.negative_slope)

    def forward(self, x):
        if self.negative_slope == 0.0:
            return jnp.where(x > 0, x, jnp.zeros_like(x))
        return jnp.where(x > 0, x, self.negative_slope * x)


@register("PReLU")
class PReLULayer(NeuronLayer):
    """``y = x if x > 0 else a_c * x`` with a learned slope per channel (axis 1), or one shared
    slope when ``channel_shared``. Blob 0 holds the slopes: ``[C]``, or a 0-axis ``[]`` when shared;
    Caffe's default filler is constant 0.25. The slope gradient is ``x`` where ``x <= 0``.
    """

    layout_agnostic = False  # its slopes run along the channel axis

    def read_params(self, shape):
        if len(shape) < 2:
            raise self.shape_error(f"needs a bottom with at least 2 axes, got {len(shape)}")
        p = self.param.prelu_param
        self.channel_shared = bool(p.channel_shared)
        if p.HasField("filler"):
            self.filler = p.filler
        else:
            self.filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        # Caffe gives the shared slope a 0-axis blob (one value, shape []).
        self.blob_shapes = [() if self.channel_shared else (shape[1],)]

    def init(self, key):
        return [fill(self.filler, self.blob_shapes[0], key, jnp.float32,
                     where=f"layer '{self.name}' slope")]

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        ndim = x.ndim
        a = blobs[0].astype(x.dtype)
        if self.channel_shared:
            a = a.reshape((1,) * ndim)
        else:
            a = a.reshape((1, x.shape[1]) + (1,) * (ndim - 2))
        return [jnp.where(x > 0, x, jnp.broadcast_to(a, x.shape) * x)]


@register("ELU")
class ELULayer(NeuronLayer):
    """``y = x if x > 0 else alpha * (exp(x) - 1)``; the gradient at 0 is ``alpha`` as in Caffe.
    The exp only sees ``x <= 0``, so the unused branch never overflows into the gradient."""

    def read_params(self, shape):
        self.alpha = float(self.param.elu_param.alpha)

    def forward(self, x):
        # where rather than minimum: minimum's derivative at 0 is 1/2, Caffe's is 1 (alpha + y).
        xn = jnp.where(x > 0, jnp.zeros_like(x), x)
        return jnp.where(x > 0, x, self.alpha * (jnp.exp(xn) - 1))


@register("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """``y = 1 / (1 + exp(-x))``, computed as Caffe does: ``0.5 * tanh(0.5 x) + 0.5``."""

    def forward(self, x):
        return _sigmoid(x)


@register("TanH")
class TanHLayer(NeuronLayer):
    """``y = tanh(x)``."""

    def forward(self, x):
        return jnp.tanh(x)


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    """``y = |x|``; the gradient is ``sign(x)``, 0 at x == 0 as in Caffe."""

    def forward(self, x):
        # x * sign(x) rather than jnp.abs: abs's derivative at 0 is 1, Caffe's is sign(0) = 0.
        return x * lax.stop_gradient(jnp.sign(x))


@register("Power")
class PowerLayer(NeuronLayer):
    """``y = (shift + scale * x) ^ power``.

    As in Caffe, when ``power * scale == 0`` the top is the constant ``1`` (power 0) or
    ``shift ^ power`` (scale 0) and the gradient is zero. Integral powers use repeated
    multiplication, so negative bases are fine and the gradient at 0 is finite.
    """

    def read_params(self, shape):
        p = self.param.power_param
        self.power = float(p.power)
        self.scale = float(p.scale)
        self.shift = float(p.shift)

    def _constant(self) -> float:
        if self.power == 0.0:
            return 1.0
        # C's pow: NaN for a negative base with a fractional power, inf for 0 to a negative one.
        if self.shift == 0.0 and self.power < 0.0:
            return math.inf
        try:
            return math.pow(self.shift, self.power)
        except ValueError:
            return math.nan

    def forward(self, x):
        if self.power * self.scale == 0.0:
            return jnp.full(x.shape, self._constant(), x.dtype)
        u = x
        if self.scale != 1.0:
            u = self.scale * u
        if self.shift != 0.0:
            u = u + self.shift
        if self.power == 1.0:
            return u
        if self.power.is_integer() and abs(self.power) <= 64:
            return lax.integer_pow(u, int(self.power))
        return jnp.power(u, jnp.asarray(self.power, x.dtype))


@register("Exp")
class ExpLayer(NeuronLayer):
    """``y = base ^ (shift + scale * x)``, base -1 meaning e; computed as Caffe does,
    ``base^shift * exp(ln(base) * scale * x)``. ``base`` must be positive (or -1)."""

    def read_params(self, shape):
        p = self.param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        if base != -1.0 and not base > 0.0:
            raise self.error(f"exp_param.base must be positive (or -1 for e), got {base:g}")
        log_base = 1.0 if base == -1.0 else math.log(base)
        self.inner_scale = log_base * scale
        self.outer_scale = 1.0 if shift == 0.0 else math.exp(log_base * shift)

    def forward(self, x):
        y = jnp.exp(x if self.inner_scale == 1.0 else self.inner_scale * x)
        return y if self.outer_scale == 1.0 else self.outer_scale * y


@register("Log")
class LogLayer(NeuronLayer):
    """``y = log_base(shift + scale * x)``, base -1 meaning e. ``base`` must be positive and
    not 1 (Caffe rejects an infinite ``1 / ln(base)``)."""

    def read_params(self, shape):
        p = self.param.log_param
        base = float(p.base)
        if base != -1.0 and not base > 0.0:
            raise self.error(f"log_param.base must be positive (or -1 for e), got {base:g}")
        if base == 1.0:
            raise self.error("log_param.base must not be 1 (log base 1 is undefined)")
        self.base_scale = 1.0 if base == -1.0 else 1.0 / math.log(base)
        self.scale = float(p.scale)
        self.shift = float(p.shift)

    def forward(self, x):
        u = x
        if self.scale != 1.0:
            u = self.scale * u
        if self.shift != 0.0:
            u = u + self.shift
        y = jnp.log(u)
        return y if self.base_scale == 1.0 else self.base_scale * y


@register("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood ``y = log(1 + exp(x))``, computed stably as Caffe does
    (``x + log(1 + exp(-x))`` for x > 0); the gradient is ``sigmoid(x)``."""

    def forward(self, x):
        # logaddexp(x, 0) = max(x, 0) + log1p(exp(-|x|)): Caffe's two-branch form, and its
        # derivative exp(x - y) is the sigmoid without overflow on either side.
        return jnp.logaddexp(x, jnp.zeros_like(x))


@register("Threshold")
class ThresholdLayer(NeuronLayer):
    """``y = 1 if x > threshold else 0``. Caffe has no backward pass; the gradient is zero."""

    def read_params(self, shape):
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, x):
        return lax.stop_gradient((x > self.threshold).astype(x.dtype))


@register("Clip")
class ClipLayer(NeuronLayer):
    """``y = max(min, min(x, max))``; the gradient passes where ``min <= x <= max`` (bounds
    included, as Caffe's backward)."""

    def read_params(self, shape):
        p = self.param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param needs both min and max")
        self.min, self.max = float(p.min), float(p.max)
        if self.min > self.max:
            raise self.error(f"clip_param.min ({self.min:g}) is greater than max ({self.max:g})")

    def forward(self, x):
        lo = jnp.full(x.shape, self.min, x.dtype)
        hi = jnp.full(x.shape, self.max, x.dtype)
        return jnp.where(x < self.min, lo, jnp.where(x > self.max, hi, x))


@register("Swish")
class SwishLayer(NeuronLayer):
    """``y = x * sigmoid(beta * x)``."""

    def read_params(self, shape):
        self.beta = float(self.param.swish_param.beta)

    def forward(self, x):
        return x * _sigmoid(self.beta * x)


@register("Dropout")
class DropoutLayer(NeuronLayer):
    """Training: ``y = x * mask / (1 - dropout_ratio)`` with ``mask ~ Bernoulli(1 -
    dropout_ratio)`` drawn from the context key; otherwise the identity (Caffe's inverted
    dropout, so nothing is rescaled at test time)."""

    layout_agnostic = False  # the mask is drawn in NCHW order, so the key means one mask

    needs_key = True

    def read_params(self, shape):
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1), got {self.ratio:g}")
        self.scale = 1.0 / (1.0 - self.ratio)

    def apply(self, blobs, bottoms, ctx):
        x = bottoms[0]
        if not ctx.train or self.ratio == 0.0:
            return [x]
        key = ctx.require_key(self, "for its dropout mask in training mode")
        mask = jax.random.bernoulli(key, 1.0 - self.ratio, x.shape)
        return [jnp.where(mask, x * self.scale, jnp.zeros_like(x))]
