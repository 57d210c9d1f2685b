"""The pure train step: Caffe's SGD against a numpy reference, jit/vmap/shard_map, no
recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from jcaffe import sgd_solvers as solver
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2
from jcaffe.train_step import TrainState, init_state, make_train_step, prng_streams

LINEAR = """
name: "linreg"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: %(n)d dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: %(n)d dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "y" top: "loss" }
"""

SOLVER = """
base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 2
max_iter: 10
"""

CLASSIFIER = """
name: "tiny"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: %(n)d dim: 1 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: %(n)d } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def net_of(text, n, phase="TRAIN"):
    return Net(text_format.Parse(text % {"n": n}, caffe_pb2.NetParameter()), phase, verbose=False)


def solver_of(extra=""):
    return text_format.Parse(SOLVER + extra, caffe_pb2.SolverParameter())


def caffe_sgd_reference(w, b, batches, sp):
    """Caffe's SGDSolver on the linear net, in float64 numpy: EuclideanLoss
    ``1/(2N)·Σ(Wx+b−y)²``, gradient summed, L2 decay on W only (decay_mult 0 on b),
    ``lr = base·γ^floor(i/stepsize)``, history ``h = μh + lr·lr_mult·(g + wd·decay·w)``."""
    hw, hb = np.zeros_like(w), np.zeros_like(b)
    for i, (x, y) in enumerate(batches):
        n = x.shape[0]
        diff = x @ w.T + b - y                         # [N, 2]
        gw = diff.T @ x / n
        gb = diff.sum(0) / n
        lr = sp.base_lr * sp.gamma ** (i // sp.stepsize)
        hw = sp.momentum * hw + lr * 1 * (gw + sp.weight_decay * 1 * w)
        hb = sp.momentum * hb + lr * 2 * (gb + sp.weight_decay * 0 * b)
        w, b = w - hw, b - hb
    return w, b


def linear_batches(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, 3)).astype(np.float32),
             rng.standard_normal((n, 2)).astype(np.float32)) for _ in range(steps)]


def test_step_is_caffes_sgd_against_numpy():
    net, sp = net_of(LINEAR, 5), solver_of()
    tx = solver.build_solver(sp, net)
    state = init_state(net, tx, jax.random.key(3))
    w0, b0 = (np.asarray(a, np.float64) for a in state.params["ip"])
    assert np.allclose(b0, 0.1)
    batches = linear_batches(5, 5)
    step = jax.jit(make_train_step(net, tx), donate_argnums=0)
    rates = []
    for x, y in batches:
        state, metrics = step(state, {"x": x, "y": y})
        rates.append(float(metrics["lr"]))
    w, b = caffe_sgd_reference(w0, b0, [(x.astype(np.float64), y.astype(np.float64))
                                        for x, y in batches], sp)
    np.testing.assert_allclose(state.params["ip"][0], w, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["ip"][1], b, rtol=2e-5, atol=1e-6)
    assert int(state.iter) == 5
    # The logged rate is the one applied: step policy, stepsize 2, gamma 0.5.
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-6)
    assert step._cache_size() == 1  # five calls, one compilation


def test_iter_size_takes_a_leading_axis():
    """iter_size 2 over two half batches: Caffe sums the gradients and divides by
    iter_size, which for a mean loss is one step on the whole batch."""
    big, half = net_of(LINEAR, 6), net_of(LINEAR, 3)
    sp = solver_of()
    state = init_state(big, solver.build_solver(sp, big), jax.random.key(1))
    (x, y), = linear_batches(6, 1)
    s1, m1 = make_train_step(big, solver.build_solver(sp, big))(state, {"x": x, "y": y})
    sp2 = solver_of("iter_size: 2")
    s2, m2 = make_train_step(half, solver.build_solver(sp2, half), iter_size=2)(
        state, {"x": x.reshape(2, 3, 3), "y": y.reshape(2, 3, 2)})
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


def classifier_batches(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 1, 6, 6)).astype(np.float32),
             "label": rng.integers(0, 4, n).astype(np.float32)} for _ in range(steps)]


def test_vmap_over_seeds_equals_separate_runs():
    net, sp = net_of(CLASSIFIER, 4), solver_of()
    tx = solver.build_solver(sp, net)
    step = make_train_step(net, tx)
    keys = jax.random.split(jax.random.key(0), 4)
    batches = classifier_batches(4, 3)
    states = jax.vmap(lambda k: init_state(net, tx, k))(keys)
    vstep = jax.jit(jax.vmap(step, in_axes=(0, None)))
    for batch in batches:
        states, metrics = vstep(states, batch)
    assert metrics["loss"].shape == (4,)
    for i, k in enumerate(keys):
        s = init_state(net, tx, k)
        for batch in batches:
            s, m = jax.jit(step)(s, batch)
        for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(states.params)):
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["loss"], metrics["loss"][i], rtol=1e-5)
    # Different seeds really are different nets.
    assert not np.allclose(states.params["ip"][0][0], states.params["ip"][0][1])


def test_vmap_over_learning_rates_equals_separate_runs():
    net, sp = net_of(LINEAR, 5), solver_of()
    lrs = jnp.asarray([0.01, 0.1, 0.3], jnp.float32)
    state = init_state(net, solver.build_solver(sp, net), jax.random.key(2))
    batches = linear_batches(5, 4, seed=1)

    def train(lr, batch_list):
        tx = solver.build_solver(sp, net, base_lr=lr)
        s = init_state(net, tx, jax.random.key(2))
        for x, y in batch_list:
            s, _ = make_train_step(net, tx)(s, {"x": x, "y": y})
        return s.params

    together = jax.jit(jax.vmap(train, in_axes=(0, None)))(lrs, batches)
    w0, b0 = (np.asarray(a, np.float64) for a in state.params["ip"])
    for i, lr in enumerate([0.01, 0.1, 0.3]):
        ref = solver_of()
        ref.base_lr = lr
        w, b = caffe_sgd_reference(w0, b0, [(x.astype(np.float64), y.astype(np.float64))
                                            for x, y in batches], ref)
        np.testing.assert_allclose(together["ip"][0][i], w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(together["ip"][1][i], b, rtol=2e-5, atol=1e-6)


def test_shard_map_data_parallel_equals_one_device_with_n_times_the_batch(compiles):
    """4 devices × batch 2 with averaged gradients update exactly as 1 device × batch 8
    (Caffe's multi-GPU: gradients summed and scaled by 1/N)."""
    P = jax.sharding.PartitionSpec
    devices = jax.devices("cpu")[:4]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    small, big, sp = net_of(CLASSIFIER, 2), net_of(CLASSIFIER, 8), solver_of()
    state = init_state(big, solver.build_solver(sp, big), jax.random.key(5))
    batches = classifier_batches(8, 3, seed=2)

    step = make_train_step(small, solver.build_solver(sp, small), axis_name="data")
    dp = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")),
                               out_specs=(P(), P()), check_vma=False))
    one = jax.jit(make_train_step(big, solver.build_solver(sp, big)))
    # Replicated from the start, as the step returns it: one compilation.
    s_dp = jax.device_put(state, jax.sharding.NamedSharding(mesh, P()))
    s_one = state
    for i, batch in enumerate(batches):
        s_dp, m_dp = dp(s_dp, batch)
        s_one, m_one = one(s_one, batch)
        if i == 0:
            after_first = compiles.count
    for a, b in zip(jax.tree.leaves(s_dp.params), jax.tree.leaves(s_one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_dp["loss"], m_one["loss"], rtol=1e-5)
    assert compiles.count == after_first  # later iterations compile nothing


def test_prng_streams_are_independent_and_state_is_a_pytree():
    s = prng_streams(jax.random.key(0))
    data = [np.asarray(jax.random.key_data(k)) for k in s]
    assert len({d.tobytes() for d in data}) == 4
    net, sp = net_of(LINEAR, 2), solver_of()
    state = init_state(net, solver.build_solver(sp, net), jax.random.key(0))
    assert isinstance(state, TrainState)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    with pytest.raises(Exception):
        make_train_step(net, solver.build_solver(sp, net), iter_size=0)
