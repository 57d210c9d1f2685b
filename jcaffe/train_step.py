"""The pure train step: what one Caffe iteration computes (``Net::ForwardBackward`` over
``iter_size`` sub-batches, then ``ApplyUpdate``).

    state = init_state(net, tx, key)                      # TrainState(params, opt_state, iter, key)
    step = make_train_step(net, tx, iter_size=sp.iter_size)
    state, metrics = jax.jit(step, donate_argnums=0)(state, batch)

``step`` closes over nothing mutable: it works under ``jax.jit`` (with donation), ``jax.vmap``
(many nets, seeds or learning rates in one program) and ``shard_map`` (``axis_name``: data
parallel, gradients averaged over the axis as Caffe's multi-GPU sums and scales by 1/N).
``tx`` is one of Caffe's update rules as an optax chain (``jcaffe.sgd_solvers``); how the step
runs on one or N devices is ``jcaffe.programs``; the loop around it is ``jcaffe.solver``.

Reproducibility: one root key ``key(random_seed)`` is split into streams for initialisation,
train steps, test nets and data order (``prng_streams``); iteration ``i`` draws from
``step_key(key, i)`` and reads data batch ``i · iter_size`` of the stream, so a resumed run
continues to exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jcaffe import sgd_solvers


class TrainState(NamedTuple):
    """Everything one iteration reads and writes: a pytree.

    ``params``: ``{layer: [blobs]}`` in Caffe's layout; ``opt_state``: the solver's state
    (Caffe's history, ``iter_`` and ``current_step_``); ``iter``: int32, iterations done (the
    run's one iteration count: the Solver, its schedule and snapshots read it);
    ``key``: the train-step PRNG stream (iteration ``i`` uses ``step_key(key, i)``)."""

    params: Any
    opt_state: Any
    iter: jax.Array
    key: jax.Array


class PRNGStreams(NamedTuple):
    """Independent PRNG streams split from one root key."""

    init: jax.Array   # parameter fillers of the train net
    step: jax.Array   # Dropout and random transforms, folded with the iteration
    test: jax.Array   # fillers of test-net layers the train net lacks
    data: jax.Array   # host-side data order (shuffling readers)


def prng_streams(key: jax.Array) -> PRNGStreams:
    """The four streams of a run from its root key (``jax.random.split``)."""
    return PRNGStreams(*jax.random.split(key, 4))


def step_key(key: jax.Array, it, rank=None) -> jax.Array:
    """The PRNG key of iteration ``it``: ``fold_in(key, it)``; under data parallelism device
    ``rank`` folds its rank in too (Caffe: one RNG per solver). Sub-batch ``s`` of the
    iteration (``iter_size``) draws from ``fold_in(step_key(...), s)``."""
    k = jax.random.fold_in(key, it)
    return k if rank is None else jax.random.fold_in(k, rank)


def init_state(net, tx: optax.GradientTransformation, key: jax.Array, *,
               params=None) -> TrainState:
    """A fresh ``TrainState``: the net's fillers (``prng_streams(key).init``) or ``params``,
    the solver's initial state, iteration 0. Works under ``jax.vmap`` over ``key``."""
    streams = prng_streams(key)
    if params is None:
        params = net.init(streams.init)
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), streams.step)


def make_train_step(net, tx: optax.GradientTransformation, *, iter_size: int = 1,
                    axis_name: str | None = None):
    """Caffe's iteration as a pure ``step(state, batch) -> (state, metrics)``.

    ``batch`` maps the net's data tops to raw arrays (``net.input_specs()``), with a leading
    axis of ``iter_size`` when ``iter_size > 1``: forward/backward runs on each sub-batch
    (``lax.scan``), gradients are summed and the solver divides by ``iter_size`` (Caffe's
    accumulation). Under ``axis_name`` (``shard_map``/``vmap`` axis) the summed gradients are
    averaged over the axis — Caffe's multi-GPU sum scaled by 1/N — and so are the logged loss
    and outputs; state updated by the forward pass (BatchNorm statistics) stays per device.

    ``metrics``: ``{"loss": mean loss over iter_size, "lr": the rate the solver applied,
    "outputs": the train net's output blobs (of the last sub-batch)}``.
    """
    iter_size = sgd_solvers.check_iter_size(iter_size)
    grad_fn = jax.value_and_grad(net.loss, has_aux=True)

    def forward_backward(params, batch, key):
        (loss, (blobs, new_params)), grads = grad_fn(params, batch, train=True, key=key)
        # new_params: running statistics (BatchNorm) advance per forward pass.
        return new_params, grads, loss, net.outputs(blobs)

    def step(state: TrainState, batch):
        rank = None if axis_name is None else jax.lax.axis_index(axis_name)
        key = step_key(state.key, state.iter, rank)
        if iter_size == 1:
            params, grads, loss, outputs = forward_backward(state.params, batch,
                                                            jax.random.fold_in(key, 0))
        else:
            first = jax.tree.map(lambda x: x[0], batch)
            rest = jax.tree.map(lambda x: x[1:], batch)
            params, grads, loss, outputs = forward_backward(state.params, first,
                                                            jax.random.fold_in(key, 0))

            # The other sub-batches in a loop, not unrolled: compile time stays that of one.
            def body(carry, xs):
                params, grads, total, _ = carry
                k, sub = xs
                params, g, l, out = forward_backward(params, sub, jax.random.fold_in(key, k))
                return (params, jax.tree.map(jnp.add, grads, g), total + l, out), None

            (params, grads, loss, outputs), _ = jax.lax.scan(
                body, (params, grads, loss, outputs),
                (jnp.arange(1, iter_size, dtype=jnp.int32), rest))
            loss = loss / iter_size  # Caffe logs the mean loss over iter_size
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss, outputs = jax.lax.pmean((loss, outputs), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "lr": sgd_solvers.applied_rate(opt_state), "outputs": outputs}
        return TrainState(params, opt_state, state.iter + 1, state.key), metrics

    return step


def scan_steps(step, state: TrainState, batches):
    """``step`` over the leading axis of ``batches`` (``lax.scan``): the final state and the
    stacked metrics."""
    return jax.lax.scan(step, state, batches)
