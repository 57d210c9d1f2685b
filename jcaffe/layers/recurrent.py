"""Recurrent layers: LSTM, RNN and LSTMUnit, as Caffe defines them.

Caffe builds a recurrent layer as an *unrolled net* (``RecurrentLayer::LayerSetUp`` calls the
subclass's ``FillUnrolledNet``): one InnerProduct over all timesteps of ``x``, an optional
InnerProduct of the static input, and per timestep a Scale by ``cont_t``, an InnerProduct of
the previous hidden state and the cell. Here the projection of ``x`` is one matmul over all
``T·N`` rows and the timesteps run in a ``lax.scan`` (one loop body in the compiled step,
whatever ``T``); the numbers, the parameter blobs (order, shapes, fillers) and the gradients
are those of Caffe's unrolled net.

Bottoms of LSTM / RNN, in Caffe's order: ``x`` ``T×N×...`` (time-major, axes from 2 on
flattened to ``D``), ``cont`` ``T×N`` (sequence continuation: 0 starts a new sequence), an
optional static input ``x_static`` ``N×...`` (flattened from axis 1 to ``Ds``), then with
``recurrent_param.expose_hidden`` the initial state ``h_0`` (and ``c_0`` for LSTM), each
``1×N×num_output``. Tops: the outputs ``T×N×num_output``, then with ``expose_hidden`` the
final state ``h_T`` (and ``c_T``).

Where Caffe's behaviour is unusual and reproduced on purpose:

* Gradients never cross the exposed state, as in Caffe (its Reshape shares only the *data* of
  ``h_0``/``c_0`` and ``h_T``/``c_T`` with the unrolled net, and zeroes the recurrent
  outputs' diffs: "we can't backpropagate across batches"): ``h_0``/``c_0`` receive a zero
  gradient and whatever consumes ``h_T``/``c_T`` sends none back. ``cont`` gets no gradient.
* Without ``expose_hidden`` Caffe copies the last forward pass's ``h_T``/``c_T`` into
  ``h_0``/``c_0`` of the next pass (state carried across batches, visible where a batch starts
  with ``cont_1 = 1``). Layers here are pure functions, so each call starts from zero state —
  Caffe's state after ``SetUp`` / ``Reset``, and identical to Caffe whenever every batch starts
  its sequences with ``cont = 0`` (as the LRCN captioning example's aligned batches do). To
  carry state across calls (step-by-step decoding), set ``expose_hidden`` and feed
  ``h_T``/``c_T`` back as ``h_0``/``c_0``.

``recurrent_param.debug_info`` turns on Caffe's per-layer logging inside the unrolled net; there
is no unrolled net here, so it changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jcaffe.fillers import fill
from jcaffe.layers.base import Layer, Shape, count, register

# Caffe computes in full float32; on GPUs the default precision would round matmul inputs.
PRECISION = lax.Precision.HIGHEST


def _dot_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [M, K] · wᵀ`` for a Caffe InnerProduct weight ``w [N, K]``."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=PRECISION)


def lstm_unit(c_prev: jax.Array, gates: jax.Array, cont: jax.Array):
    """Caffe's LSTMUnit on ``c_prev [N, H]``, ``gates [N, 4H]`` (pre-activations in the order
    i, f, o, g) and ``cont [N]``; returns ``(c, h)``::

        i = σ(i'), f = σ(f'), o = σ(o'), g = tanh(g')
        c = cont · f ⊙ c_prev + i ⊙ g
        h = o ⊙ tanh(c)

    The gradient is the exact one (Caffe's GPU kernel). Caffe's CPU backward writes the
    forget-gate term as ``f̃(1 - f̃)`` with ``f̃ = cont·σ(f')``, which agrees with it only for
    binary ``cont`` (the only values Caffe's nets feed).
    """
    hdim = c_prev.shape[1]
    i = jax.nn.sigmoid(gates[:, :hdim])
    f = jax.nn.sigmoid(gates[:, hdim:2 * hdim])
    o = jax.nn.sigmoid(gates[:, 2 * hdim:3 * hdim])
    g = jnp.tanh(gates[:, 3 * hdim:])
    c = cont[:, None] * f * c_prev + i * g
    h = o * jnp.tanh(c)
    return c, h


class _Recurrent(Layer):
    """Shared set-up of LSTM and RNN (Caffe's RecurrentLayer). Subclasses give the number of
    gate rows per hidden unit, the recurrent state names and the blob layout."""

    min_bottoms = 2
    min_tops = 1
    # Names of the recurrent state (Caffe's RecurrentInputBlobNames order).
    state_names: tuple[str, ...] = ()
    gate_mult = 1

    def setup(self, bottom_shapes):
        rp = self.param.recurrent_param
        if rp.num_output <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.num_output = H = int(rp.num_output)
        self.expose_hidden = bool(rp.expose_hidden)
        self.weight_filler = rp.weight_filler
        self.bias_filler = rp.bias_filler
        n_state = len(self.state_names)
        n_exposed = n_state if self.expose_hidden else 0
        lo = 2 + n_exposed
        nb = len(bottom_shapes)
        what = (f" with expose_hidden (x, cont, [x_static], {', '.join(self.state_names)})"
                if self.expose_hidden else " (x, cont, [x_static])")
        if not lo <= nb <= lo + 1:
            raise self.error(f"takes {lo} or {lo + 1} bottom blobs{what}, got {nb}")
        n_tops = 1 + n_exposed
        if len(self.top_names) != n_tops:
            tops = (f" (the output, then {', '.join(n[:-1] + 'T' for n in self.state_names)})"
                    if self.expose_hidden else "")
            raise self.error(f"takes exactly {n_tops} top blob(s){tops}, got "
                             f"{len(self.top_names)}")
        x = bottom_shapes[0]
        # Caffe's unrolled net projects x with an InnerProduct at axis 2 and x_static at axis
        # 1, which need an axis there.
        if len(x) < 3:
            raise self.shape_error("bottom 0 (x) must have at least 3 axes -- "
                                   "(#timesteps, #streams, input dims...)")
        self.T, self.N = T, N = x[0], x[1]
        self.input_dim = count(x, 2)
        if tuple(bottom_shapes[1]) != (T, N):
            raise self.shape_error(f"bottom 1 (cont) must have shape [{T}, {N}] -- "
                                   f"(#timesteps, #streams) as x")
        self.static_input = nb > lo
        self.static_dim = 0
        if self.static_input:
            xs = bottom_shapes[2]
            if len(xs) < 2 or xs[0] != N:
                raise self.shape_error(f"bottom 2 (x_static) must have at least 2 axes -- "
                                       f"({N} streams, input dims...)")
            self.static_dim = count(xs, 1)
        state_shape = (1, N, H)
        first_state = 2 + int(self.static_input)
        for k, name in enumerate(self.state_names if self.expose_hidden else ()):
            s = tuple(bottom_shapes[first_state + k])
            if s != state_shape:
                raise self.shape_error(f"bottom {first_state + k} ({name}) must have shape "
                                       f"{list(state_shape)}, got {list(s)}")
        self.blob_names, self.blob_shapes = self.blob_layout()
        return [(T, N, H)] + [state_shape] * n_exposed

    def blob_layout(self) -> tuple[list[str], list[Shape]]:
        raise NotImplementedError

    def init(self, key):
        keys = jax.random.split(key, len(self.blob_shapes))
        where = f"layer '{self.name}' (type {self.type})"
        return [fill(self.bias_filler if name.startswith("b_") else self.weight_filler,
                     shape, k, jnp.float32, f"{where} {name}")
                for k, name, shape in zip(keys, self.blob_names, self.blob_shapes)]

    def _inputs(self, blobs, bottoms):
        """x projected over all timesteps (one matmul) plus the static projection, the cont
        indicators and the initial state, all in x's dtype."""
        x = bottoms[0]
        dt = x.dtype
        T, N, H = self.T, self.N, self.num_output
        w = [b.astype(dt) for b in blobs]
        gx = _dot_t(x.reshape(T * N, self.input_dim), w[0]) + w[1][None, :]
        gx = gx.reshape(T, N, self.gate_mult * H)
        if self.static_input:
            xs = bottoms[2].reshape(N, self.static_dim)
            gx = gx + _dot_t(xs, w[2])[None]
        cont = lax.stop_gradient(bottoms[1]).astype(dt)
        first = 2 + int(self.static_input)
        if self.expose_hidden:
            state = tuple(lax.stop_gradient(bottoms[first + k]).astype(dt).reshape(N, H)
                          for k in range(len(self.state_names)))
        else:
            state = tuple(jnp.zeros((N, H), dt) for _ in self.state_names)
        return w, gx, cont, state

    def _tops(self, out, final_state):
        if not self.expose_hidden:
            return [out]
        return [out] + [lax.stop_gradient(s)[None] for s in final_state]


@register("LSTM")
class LSTMLayer(_Recurrent):
    """Caffe's LSTM (``lstm_layer.cpp``), for each timestep t = 1..T::

        gate_t = W_hc · (cont_t · h_{t-1}) + W_xc · x_t + b_c (+ W_xc_static · x_static)
        [i', f', o', g'] = gate_t                    (4 blocks of num_output rows)
        c_t = cont_t · σ(f') ⊙ c_{t-1} + σ(i') ⊙ tanh(g')
        h_t = σ(o') ⊙ tanh(c_t)

    Top 0 is ``h`` ``T×N×H``. Blobs, in the order of Caffe's unrolled net: ``W_xc [4H, D]``,
    ``b_c [4H]``, ``W_xc_static [4H, Ds]`` (with a static input), ``W_hc [4H, H]``; weights
    from ``recurrent_param.weight_filler``, ``b_c`` from ``bias_filler`` (default constant 0).
    See the module docstring for the state semantics.
    """

    max_bottoms = 5
    max_tops = 3
    state_names = ("h_0", "c_0")
    gate_mult = 4

    def blob_layout(self):
        H4, H = 4 * self.num_output, self.num_output
        names, shapes = ["W_xc", "b_c"], [(H4, self.input_dim), (H4,)]
        if self.static_input:
            names.append("W_xc_static")
            shapes.append((H4, self.static_dim))
        names.append("W_hc")
        shapes.append((H4, H))
        return names, shapes

    def apply(self, blobs, bottoms, ctx):
        with jax.named_scope(self.name):
            w, gx, cont, (h0, c0) = self._inputs(blobs, bottoms)
            w_hc = w[-1]

            def step(carry, inp):
                h, c = carry
                gx_t, cont_t = inp
                gates = _dot_t(cont_t[:, None] * h, w_hc) + gx_t
                c, h = lstm_unit(c, gates, cont_t)
                return (h, c), h

            (h_T, c_T), hs = lax.scan(step, (h0, c0), (gx, cont))
            return self._tops(hs, (h_T, c_T))


@register("RNN")
class RNNLayer(_Recurrent):
    """Caffe's simple recurrent net (``rnn_layer.cpp``), for each timestep t = 1..T::

        h_t = tanh(W_hh · (cont_t · h_{t-1}) + W_xh · x_t + b_h (+ W_xh_static · x_static))
        o_t = tanh(W_ho · h_t + b_o)

    Top 0 is ``o`` ``T×N×H``. Blobs, in the order of Caffe's unrolled net: ``W_xh [H, D]``,
    ``b_h [H]``, ``W_xh_static [H, Ds]`` (with a static input), ``W_hh [H, H]``,
    ``W_ho [H, H]``, ``b_o [H]``. See the module docstring for the state semantics.
    """

    max_bottoms = 4
    max_tops = 2
    state_names = ("h_0",)
    gate_mult = 1

    def blob_layout(self):
        H = self.num_output
        names, shapes = ["W_xh", "b_h"], [(H, self.input_dim), (H,)]
        if self.static_input:
            names.append("W_xh_static")
            shapes.append((H, self.static_dim))
        names += ["W_hh", "W_ho", "b_o"]
        shapes += [(H, H), (H, H), (H,)]
        return names, shapes

    def apply(self, blobs, bottoms, ctx):
        with jax.named_scope(self.name):
            w, gx, cont, (h0,) = self._inputs(blobs, bottoms)
            w_hh, w_ho, b_o = w[-3], w[-2], w[-1]

            def step(h, inp):
                gx_t, cont_t = inp
                h = jnp.tanh(_dot_t(cont_t[:, None] * h, w_hh) + gx_t)
                return h, h

            h_T, hs = lax.scan(step, h0, (gx, cont))
            T, N, H = self.T, self.N, self.num_output
            o = jnp.tanh(_dot_t(hs.reshape(T * N, H), w_ho) + b_o[None, :]).reshape(T, N, H)
            return self._tops(o, (h_T,))


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step (Caffe's ``lstm_unit_layer.cpp``): bottoms ``c_prev [1, N, H]``, the gate
    pre-activations ``x [1, N, 4H]`` (blocks i, f, o, g) and ``cont [1, N]``; tops ``c`` and
    ``h``, both ``[1, N, H]``::

        c = cont · σ(f') ⊙ c_prev + σ(i') ⊙ tanh(g'),   h = σ(o') ⊙ tanh(c)

    Gradients flow to ``c_prev`` and ``x``; ``cont`` gets none (Caffe refuses to backpropagate
    to it). No parameter blobs.
    """

    exact_bottoms = 3
    exact_tops = 2

    def setup(self, bottom_shapes):
        c_prev, x, cont = (tuple(s) for s in bottom_shapes)
        if len(c_prev) != 3 or len(x) != 3 or len(cont) != 2:
            raise self.shape_error("bottoms must be c_prev [1, N, H], x [1, N, 4H] and "
                                   "cont [1, N]")
        n = c_prev[1]
        if c_prev[0] != 1 or x[0] != 1 or cont[0] != 1:
            raise self.shape_error("every bottom must have 1 on axis 0 (a single timestep)")
        if x[1] != n or cont[1] != n:
            raise self.shape_error(f"every bottom must have N = {n} on axis 1")
        self.hidden_dim = c_prev[2]
        if x[2] != 4 * self.hidden_dim:
            raise self.shape_error(f"x must have 4·H = {4 * self.hidden_dim} gate inputs on "
                                   f"axis 2, got {x[2]}")
        self.N = n
        return [c_prev, c_prev]

    def apply(self, blobs, bottoms, ctx):
        with jax.named_scope(self.name):
            c_prev, x, cont = bottoms
            dt = c_prev.dtype
            n, hdim = self.N, self.hidden_dim
            cont = lax.stop_gradient(cont).astype(dt).reshape(n)
            c, h = lstm_unit(c_prev.reshape(n, hdim), x.astype(dt).reshape(n, 4 * hdim), cont)
            return [c.reshape(1, n, hdim), h.reshape(1, n, hdim)]
