"""Caffe's solvers: jcaffe's optax chains against an independent float32 numpy re-implementation of
Caffe's SGDSolver::ApplyUpdate loop (sgd_solver.cpp and the per-type solver files), hand-computed
learning rates, Caffe's SolverState history layout, exact resume, and bad-input errors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from google.protobuf import text_format

from jcaffe import sgd_solvers as S
from jcaffe.errors import ModelError, SolverError
from jcaffe.proto import caffe_pb2

F = np.float32
TYPES = ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]


def solver_param(text: str) -> caffe_pb2.SolverParameter:
    return text_format.Parse(text, caffe_pb2.SolverParameter())


# ------------------------------------------------------------------------------------------------
# Independent reference: Caffe's update loop in float32 numpy, written from Caffe's C++.
# ------------------------------------------------------------------------------------------------

class CaffeRef:
    """SGDSolver<float> and subclasses on flat lists in learnable_params order."""

    def __init__(self, sp, params, lr_mults, decay_mults):
        self.sp = sp
        self.kind = sp.type
        self.w = [np.array(p, F) for p in params]
        self.lr_mults = [F(m) for m in lr_mults]
        self.decay_mults = [F(m) for m in decay_mults]
        n_sets = 2 if self.kind in ("AdaDelta", "Adam") else 1
        # SGDSolver::PreSolve + AdaDeltaPreSolve / AdamPreSolve: history_[0:N], then [N:2N].
        self.history = [np.zeros_like(p) for _ in range(n_sets) for p in self.w]
        self.iter = 0
        self.current_step = 0
        self.clipped = []

    def get_learning_rate(self):
        sp, it = self.sp, self.iter
        base, gamma, power = F(sp.base_lr), F(sp.gamma), F(sp.power)
        pol = sp.lr_policy
        # C++: float operands; pow/exp are C's double functions; the result is stored as float.
        if pol == "fixed":
            return base
        if pol == "step":
            self.current_step = it // sp.stepsize
            return F(float(base) * float(gamma) ** self.current_step)
        if pol == "exp":
            return F(float(base) * float(gamma) ** it)
        if pol == "inv":
            return F(float(base) * float(F(1) + gamma * F(it)) ** (-float(power)))
        if pol == "multistep":
            if self.current_step < len(sp.stepvalue) and it >= sp.stepvalue[self.current_step]:
                self.current_step += 1
            return F(float(base) * float(gamma) ** self.current_step)
        if pol == "poly":
            return F(float(base) * float(F(1) - F(it) / F(sp.max_iter)) ** float(power))
        if pol == "sigmoid":
            z = float(-gamma * (F(it) - F(sp.stepsize)))
            return F(float(base) * (1.0 / (1.0 + math.exp(z))))
        raise AssertionError(pol)

    def apply_update(self, diffs):
        sp, n = self.sp, len(self.w)
        # lr_mult 0: Net::Init turns off the param's backward, its diff stays cleared (0).
        diff = [np.array(d, F) if m != 0 else np.zeros_like(d)
                for d, m in zip(diffs, self.lr_mults)]
        rate = self.get_learning_rate()
        clip = F(sp.clip_gradients)
        if clip >= 0:
            sumsq = F(0)
            for d in diff:
                sumsq = F(sumsq + F(np.dot(d.ravel(), d.ravel())))
            l2 = F(np.sqrt(sumsq))
            self.clipped.append(bool(l2 > clip))
            if l2 > clip:
                factor = F(clip / l2)
                diff = [d * factor for d in diff]
        for i in range(n):
            d, w = diff[i], self.w[i]
            if sp.iter_size != 1:                                  # Normalize
                d = d * (F(1) / F(sp.iter_size))
            local_decay = F(sp.weight_decay) * self.decay_mults[i]  # Regularize
            if local_decay:
                if sp.regularization_type == "L2":
                    d = local_decay * w + d
                else:
                    d = local_decay * np.sign(w).astype(F) + d
            diff[i] = self.compute_update_value(i, d, rate)
        for i in range(n):                                         # Net::Update
            self.w[i] = self.w[i] + F(-1) * diff[i]
        self.iter += 1

    def compute_update_value(self, i, g, rate):
        sp, n, h = self.sp, len(self.w), self.history
        local_rate = rate * self.lr_mults[i]
        delta, mom = F(sp.delta), F(sp.momentum)
        if self.kind == "SGD":
            h[i] = mom * h[i]
            h[i] = local_rate * g + h[i]
            return h[i].copy()
        if self.kind == "Nesterov":
            update = h[i].copy()
            h[i] = local_rate * g + mom * h[i]
            update = -mom * update
            return (F(1) + mom) * h[i] + update
        if self.kind == "AdaGrad":
            update = g * g
            h[i] = update + h[i]
            update = np.sqrt(h[i]) + delta
            return local_rate * (g / update)
        if self.kind == "RMSProp":
            rms = F(sp.rms_decay)
            h[i] = (F(1) - rms) * (g * g) + rms * h[i]
            update = np.sqrt(h[i]) + delta
            return local_rate * (g / update)
        if self.kind == "AdaDelta":
            h[i] = (F(1) - mom) * (g * g) + mom * h[i]
            update = delta + h[n + i]
            temp = delta + h[i]
            update = np.sqrt(update / temp)
            g = g * update
            h[n + i] = (F(1) - mom) * (g * g) + mom * h[n + i]
            return local_rate * g
        if self.kind == "Adam":
            b1, b2 = F(sp.momentum), F(sp.momentum2)
            t = self.iter + 1
            correction = F(math.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
            h[i] = (F(1) - b1) * g + b1 * h[i]
            h[n + i] = (F(1) - b2) * (g * g) + b2 * h[n + i]
            val = h[i] / (np.sqrt(h[n + i]) + delta)
            return (local_rate * correction) * val
        raise AssertionError(self.kind)


# ------------------------------------------------------------------------------------------------
# A small net's learnable params: Caffe's order (conv, bn, fc) is not the pytree's (sorted keys).
# ------------------------------------------------------------------------------------------------

ORDER = [("conv", 0), ("conv", 1), ("bn", 0), ("bn", 1), ("bn", 2), ("fc", 0), ("fc", 1)]
SHAPES = {("conv", 0): (3, 2, 2, 2), ("conv", 1): (3,), ("bn", 0): (3,), ("bn", 1): (3,),
          ("bn", 2): (1,), ("fc", 0): (4, 6), ("fc", 1): (4,)}
LR_MULTS = {"conv": [1.0, 2.0], "bn": [0.0, 0.0, 0.0], "fc": [0.5, 0.0]}
DECAY_MULTS = {"conv": [1.0, 0.0], "bn": [0.0, 0.0, 0.0], "fc": [2.0, 1.0]}
N_ITERS = 5
GRAD_SCALES = [1.0, 4.0, 0.25, 3.0, 0.5]   # with clip_gradients 10: clips at 4.0 and 3.0 only


def to_tree(flat):
    tree = {"conv": [None, None], "bn": [None, None, None], "fc": [None, None]}
    for (layer, idx), a in zip(ORDER, flat):
        tree[layer][idx] = a
    return tree


def from_tree(tree):
    return [np.asarray(tree[layer][idx]) for layer, idx in ORDER]


def initial_params():
    rng = np.random.default_rng(0)
    return [rng.normal(size=SHAPES[k]).astype(F) for k in ORDER]


def grad_sequence(iter_size):
    """Per iteration: the gradient summed over iter_size passes (float32), non-zero everywhere,
    also for lr_mult 0 blobs (whose gradient Caffe never computes)."""
    rng = np.random.default_rng(1)
    seq = []
    for scale in GRAD_SCALES:
        total = [np.zeros(SHAPES[k], F) for k in ORDER]
        for _ in range(iter_size):
            total = [t + (F(scale) * rng.normal(size=t.shape).astype(F)) for t in total]
        seq.append(total)
    return seq


HYPER = {  # per type: everything but the lr policy and the regularization / clip / iter_size
    "SGD": 'type: "SGD" momentum: 0.9',
    "Nesterov": 'type: "Nesterov" momentum: 0.8',
    "AdaGrad": 'type: "AdaGrad" delta: 0.001',
    "RMSProp": 'type: "RMSProp" rms_decay: 0.9 delta: 0.0001',
    "AdaDelta": 'type: "AdaDelta" momentum: 0.95 delta: 1e-6',
    "Adam": 'type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8',
}
# "inv": a rate that changes ~30% per iteration (where SGD's lr-inside-the-history matters),
# L2, no clipping, iter_size 1. "other": each type gets another policy, L1, clipping that
# triggers on some iterations, iter_size 2.
OTHER_POLICY = {
    "SGD": 'lr_policy: "step" gamma: 0.5 stepsize: 2',
    "Nesterov": 'lr_policy: "multistep" gamma: 0.3 stepvalue: 1 stepvalue: 3',
    "AdaGrad": 'lr_policy: "exp" gamma: 0.8',
    "RMSProp": 'lr_policy: "poly" power: 1.5 max_iter: 8',
    "AdaDelta": 'lr_policy: "sigmoid" gamma: 0.7 stepsize: 2',
    "Adam": 'lr_policy: "fixed"',
}
CONFIGS = {
    "inv": lambda kind: ('lr_policy: "inv" gamma: 0.5 power: 0.75 weight_decay: 0.01 '
                         'regularization_type: "L2"'),
    "other": lambda kind: (OTHER_POLICY[kind] + ' weight_decay: 0.02 regularization_type: "L1" '
                           'clip_gradients: 10 iter_size: 2'),
}


def make_sp(kind, config):
    base_lr = 1.0 if kind == "AdaDelta" else 0.1
    return solver_param(f"{HYPER[kind]} base_lr: {base_lr} {CONFIGS[config](kind)}")


@functools.lru_cache(maxsize=None)
def compiled(kind, config):
    """(solver, jitted update): one compilation per (type, config) for the whole module."""
    tx = S.build_solver(make_sp(kind, config), LR_MULTS, DECAY_MULTS)
    return tx, jax.jit(tx.update)


def run(kind, config, n, state=None, params=None):
    """n jitted iterations from (state, params), starting at the state's iteration."""
    tx, update = compiled(kind, config)
    iter_size = make_sp(kind, config).iter_size
    params = to_tree([jnp.asarray(p) for p in initial_params()]) if params is None else params
    state = tx.init(params) if state is None else state
    seq = grad_sequence(iter_size)
    trace = []
    for _ in range(n):
        g = to_tree([jnp.asarray(a) for a in seq[S.get_iter(state)]])
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        trace.append(from_tree(params))
    return params, state, trace


def assert_close(actual, expected, what):
    # Both sides are float32 IEEE arithmetic in the same order; they may differ by the last bits
    # of the rate (Caffe rounds pow in double, XLA in float) and of the clipping norm's sum.
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=2e-6 * scale + 1e-30,
                               err_msg=what)


CASES = [(kind, config) for config in CONFIGS for kind in TYPES]


@pytest.mark.parametrize("kind, config", CASES)
def test_update_loop_matches_caffe_reference(kind, config):
    sp = make_sp(kind, config)
    ref = CaffeRef(sp, initial_params(), [LR_MULTS[l][i] for l, i in ORDER],
                   [DECAY_MULTS[l][i] for l, i in ORDER])
    seq = grad_sequence(sp.iter_size)
    _, state, trace = run(kind, config, N_ITERS)
    for it in range(N_ITERS):
        ref.apply_update(seq[it])
        for k, (got, want) in enumerate(zip(trace[it], ref.w)):
            assert_close(got, want, f"{kind}/{config} iter {it} blob {ORDER[k]}")
    assert S.get_iter(state) == ref.iter == N_ITERS
    assert S.get_current_step(state) == ref.current_step
    history = S.history_to_caffe(state, ORDER)
    assert len(history) == len(ref.history) == (14 if kind in ("AdaDelta", "Adam") else 7)
    for k, (got, want) in enumerate(zip(history, ref.history)):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert_close(got, want, f"{kind}/{config} history blob {k}")
    # lr_mult 0 blobs (bn, fc bias) never move; their history stays zero unless decay feeds it.
    init = initial_params()
    for k, (layer, idx) in enumerate(ORDER):
        if LR_MULTS[layer][idx] == 0:
            assert np.array_equal(trace[-1][k], init[k])
    for k in (2, 3, 4):  # bn: lr_mult 0 and decay_mult 0
        assert not np.any(history[k])
    if config == "other":
        assert any(ref.clipped) and not all(ref.clipped)
    # The config is live: the lr-mult-2 conv bias moved, the lr_mult-0.5 fc weight moved.
    assert not np.allclose(trace[-1][1], init[1]) and not np.allclose(trace[-1][5], init[5])


def test_reference_detects_a_rate_outside_the_history():
    """The tolerance of the loop test is far below the effect of a misplaced rate."""
    seq = grad_sequence(1)
    _, _, trace = run("SGD", "inv", 3)
    # optax.sgd's form: trace = m*trace + g; w -= rate*trace.
    w = initial_params()
    mults = [LR_MULTS[l][i] for l, i in ORDER]
    decays = [DECAY_MULTS[l][i] for l, i in ORDER]
    trace_opt = [np.zeros_like(p) for p in w]
    for it in range(3):
        rate = F(0.1 * (1 + 0.5 * it) ** -0.75)
        for k in range(7):
            if mults[k] == 0:
                continue
            g = seq[it][k] + F(0.01 * decays[k]) * w[k]
            trace_opt[k] = F(0.9) * trace_opt[k] + g
            w[k] = w[k] - rate * F(mults[k]) * trace_opt[k]
    with pytest.raises(AssertionError):
        assert_close(trace[-1][0], w[0], "optax form")


# ------------------------------------------------------------------------------------------------
# SGD is not optax.sgd when the rate changes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["inv", "fixed"])
def test_sgd_differs_from_optax_sgd_only_when_the_rate_changes(policy):
    text = 'lr_policy: "inv" gamma: 0.5 power: 0.75' if policy == "inv" else 'lr_policy: "fixed"'
    sp = solver_param(f'type: "SGD" base_lr: 0.1 momentum: 0.9 {text}')
    tx = S.build_solver(sp)
    sched = S.lr_schedule(sp)
    opt = optax.sgd(learning_rate=lambda c: sched(c), momentum=0.9)
    params = {"w": [jnp.asarray(np.linspace(-1, 1, 6, dtype=F))]}
    p1, s1 = params, tx.init(params)
    p2, s2 = params, opt.init(params)
    ref = CaffeRef(sp, [np.asarray(params["w"][0])], [1.0], [1.0])
    grads = [np.full(6, v, F) for v in (1.0, -0.5, 2.0, 0.25)]
    for g in grads:
        u1, s1 = tx.update({"w": [jnp.asarray(g)]}, s1, p1)
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = opt.update({"w": [jnp.asarray(g)]}, s2, p2)
        p2 = optax.apply_updates(p2, u2)
        ref.apply_update([g])
    assert_close(p1["w"][0], ref.w[0], "jcaffe SGD vs Caffe")
    diff = float(np.max(np.abs(np.asarray(p1["w"][0]) - np.asarray(p2["w"][0]))))
    if policy == "inv":
        assert diff > 1e-2   # the rate inside the momentum history, not after it
    else:
        assert diff < 1e-6


# ------------------------------------------------------------------------------------------------
# Learning-rate policies: hand-computed values
# ------------------------------------------------------------------------------------------------

POLICIES = {
    # Caffe's LeNet solver: base 0.01, inv, gamma 1e-4, power 0.75: 0.01*(1+1e-4*i)^-0.75.
    "inv": ('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75',
            {0: 0.01, 1: 0.009999250065618985, 100: 0.009925650290240803,
             9999: 0.005946258561103330}),
    "fixed": ('base_lr: 0.1 lr_policy: "fixed"', {0: 0.1, 1: 0.1, 12345: 0.1}),
    # 0.1 * 0.1^floor(i/100)
    "step": ('base_lr: 0.1 lr_policy: "step" gamma: 0.1 stepsize: 100',
             {0: 0.1, 99: 0.1, 100: 0.01, 199: 0.01, 250: 0.001}),
    # 0.1 * 0.99^i, with Caffe's float gamma 0.99f = 0.9900000095367431640625 (at i = 100 its
    # error is 100x larger than at i = 1: 0.1*0.99^100 in decimals is 0.036603234127).
    "exp": ('base_lr: 0.1 lr_policy: "exp" gamma: 0.99',
            {0: 0.1, 1: 0.099, 10: 0.09043821756049463, 100: 0.03660326993293693}),
    # 0.1 * 0.5^(number of stepvalues <= i)
    "multistep": ('base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 '
                  'stepvalue: 10 stepvalue: 20 stepvalue: 40',
                  {0: 0.1, 9: 0.1, 10: 0.05, 19: 0.05, 20: 0.025, 39: 0.025, 40: 0.0125,
                   1000: 0.0125}),
    # 0.1 * (1 - i/100)^2; Caffe computes 1 - i/100 in float: at i = 90, 1 - 0.9f =
    # 0.10000002384185791015625, so the rate is 0.0010000004917 (4 ulps above 0.001).
    "poly": ('base_lr: 0.1 lr_policy: "poly" power: 2 max_iter: 100',
             {0: 0.1, 50: 0.025, 90: 0.0010000004917383833, 100: 0.0}),
    # 0.1 / (1 + exp(-0.05*(i - 100)))
    "sigmoid": ('base_lr: 0.1 lr_policy: "sigmoid" gamma: 0.05 stepsize: 100',
                {0: 0.0006692850924284856, 100: 0.05, 200: 0.09933071490757151}),
}


def ulp_distance(a, b):
    a = np.asarray(a, F).reshape(-1).view(np.int32).astype(np.int64)
    b = np.asarray(b, F).reshape(-1).view(np.int32).astype(np.int64)
    return np.abs(a - b)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_learning_rate_hand_values(policy):
    text, expected = POLICIES[policy]
    sp = solver_param(text)
    iters = sorted(expected)
    want = np.array([expected[i] for i in iters], F)
    host = np.array([S.learning_rate(sp, i) for i in iters], F)
    device = np.asarray(jax.jit(jax.vmap(S.lr_schedule(sp)))(jnp.asarray(iters, jnp.int32)))
    assert device.dtype == np.float32
    # Caffe's float32 constants (0.01f, 1e-4f, ...) are not the decimals: allow 2 ulps.
    assert ulp_distance(host, want).max() <= 2, (host, want)
    assert ulp_distance(device, want).max() <= 2, (device, want)
    assert all(isinstance(S.learning_rate(sp, i), float) for i in iters)


AGREE = {  # realistic schedules over 12000 iterations
    "inv": 'base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75',
    "fixed": 'base_lr: 0.01 lr_policy: "fixed"',
    "step": 'base_lr: 0.01 lr_policy: "step" gamma: 0.1 stepsize: 1000',
    "exp": 'base_lr: 0.01 lr_policy: "exp" gamma: 0.9995',
    "multistep": 'base_lr: 0.01 lr_policy: "multistep" gamma: 0.1 stepvalue: 1000 '
                 'stepvalue: 5000 stepvalue: 9000',
    "poly": 'base_lr: 0.01 lr_policy: "poly" power: 0.9 max_iter: 12000',
    "sigmoid": 'base_lr: 0.01 lr_policy: "sigmoid" gamma: 0.001 stepsize: 6000',
}


@pytest.mark.parametrize("policy", list(AGREE))
def test_device_schedule_agrees_with_caffe_host_rate(policy):
    sp = solver_param(AGREE[policy])
    iters = np.arange(0, 12001, 7, dtype=np.int32)
    host = np.array([S.learning_rate(sp, int(i)) for i in iters], F)
    device = np.asarray(jax.jit(jax.vmap(S.lr_schedule(sp)))(jnp.asarray(iters)))
    assert np.all(np.isfinite(host)) and len(set(host.tolist())) >= (1 if policy == "fixed" else 4)
    # Caffe rounds pow/exp in double and multiplies in double; float32 rounds twice.
    assert ulp_distance(device, host).max() <= 2


def test_multistep_advances_one_step_per_iteration():
    sp = solver_param('base_lr: 0.1 lr_policy: "multistep" gamma: 0.5 '
                      'stepvalue: 10 stepvalue: 20 stepvalue: 40')
    # Resumed at iteration 50 with current_step 0: Caffe takes one step per iteration.
    assert S.learning_rate(sp, 50, current_step=0) == F(0.05)
    assert S.learning_rate(sp, 51, current_step=1) == F(0.025)
    assert S.learning_rate(sp, 52, current_step=2) == F(0.0125)
    assert S.learning_rate(sp, 50) == F(0.0125)
    schedule = jax.jit(S.lr_schedule(sp))
    assert float(schedule(50, 0)) == F(0.05)
    assert float(schedule(50)) == F(0.0125)
    # The solver: updates at iterations 50, 51, 52, 53 from current_step 0, momentum 0, g = 1:
    # each update is -rate, and current_step goes 1, 2, 3, 3.
    sp.type = "SGD"
    tx = S.build_solver(sp)
    params = {"w": [jnp.zeros((1,), jnp.float32)]}
    state = S.history_from_caffe(tx.init(params), [np.zeros(1, F)], [("w", 0)], 50, 0)
    update = jax.jit(tx.update)
    steps, rates = [], []
    for _ in range(4):
        u, state = update({"w": [jnp.ones((1,), jnp.float32)]}, state, params)
        rates.append(float(-u["w"][0][0]))
        steps.append(S.get_current_step(state))
    assert steps == [1, 2, 3, 3]
    assert rates == [F(0.05), F(0.025), F(0.0125), F(0.0125)]
    assert S.get_iter(state) == 54


def test_step_policy_current_step():
    sp = solver_param('type: "SGD" base_lr: 1 lr_policy: "step" gamma: 0.5 stepsize: 2')
    tx = S.build_solver(sp)
    params = {"w": [jnp.zeros((2,), jnp.float32)]}
    state, update = tx.init(params), jax.jit(tx.update)
    steps, rates = [], []
    for _ in range(5):
        u, state = update({"w": [jnp.ones((2,), jnp.float32)]}, state, params)
        steps.append(S.get_current_step(state))
        rates.append(float(-u["w"][0][0]))
    assert steps == [0, 0, 1, 1, 2]          # Caffe: current_step_ = iter / stepsize
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert S.learning_rate(sp, 250 * 2) == F(0.5 ** 250)


# ------------------------------------------------------------------------------------------------
# The pieces, alone
# ------------------------------------------------------------------------------------------------

def _apply(tx, grads, params=None):
    return tx.update(grads, tx.init(params if params is not None else grads), params)[0]


def test_clip_by_caffe_global_norm():
    g = {"a": [jnp.asarray([3.0, 0.0], jnp.float32)], "b": [jnp.asarray([4.0], jnp.float32)]}
    out = _apply(S.clip_by_caffe_global_norm(1.0), g)           # norm 5 > 1: scale by 1/5
    np.testing.assert_allclose(out["a"][0], [0.6, 0.0], rtol=1e-7)
    np.testing.assert_allclose(out["b"][0], [0.8], rtol=1e-7)
    for clip in (5.0, 10.0, -1.0):                                # norm <= clip, or off
        out = _apply(S.clip_by_caffe_global_norm(clip), g)
        assert np.array_equal(out["a"][0], [3.0, 0.0]) and np.array_equal(out["b"][0], [4.0])
    big = {"a": [jnp.full((3,), 1e6, jnp.float32)]}
    assert np.array_equal(_apply(S.clip_by_caffe_global_norm(-1.0), big)["a"][0], big["a"][0])


def test_scale_by_iter_size_multiplies_by_the_float32_reciprocal():
    values = np.arange(1, 400, dtype=F) * F(0.37)
    out = np.asarray(_apply(S.scale_by_iter_size(3), {"g": [jnp.asarray(values)]})["g"][0])
    expected = values * (F(1) / F(3))
    assert np.array_equal(out, expected)
    assert not np.array_equal(expected, values / F(3))   # the two roundings do differ
    same = _apply(S.scale_by_iter_size(1), {"g": [jnp.asarray(values)]})["g"][0]
    assert np.array_equal(same, values)


@pytest.mark.parametrize("reg, expected", [("L2", [0.6, 1.0, 1.6]), ("L1", [0.8, 1.0, 1.2])])
def test_add_caffe_decay(reg, expected):
    w = {"l": [jnp.asarray([-2.0, 0.0, 3.0], jnp.float32), jnp.asarray([5.0], jnp.float32)]}
    g = {"l": [jnp.ones((3,), jnp.float32), jnp.ones((1,), jnp.float32)]}
    tx = S.add_caffe_decay(0.1, {"l": [2.0, 0.0]}, reg)
    out = tx.update(g, tx.init(w), w)[0]
    np.testing.assert_allclose(out["l"][0], expected, rtol=1e-6)
    assert np.array_equal(out["l"][1], [1.0])                    # decay_mult 0


def test_zero_frozen_grads():
    g = {"a": [jnp.ones((2,), jnp.float32), jnp.full((1,), 3.0, jnp.float32)]}
    out = _apply(S.zero_frozen_grads({"a": [0.0, 0.5]}), g)
    assert np.array_equal(out["a"][0], [0.0, 0.0]) and np.array_equal(out["a"][1], [3.0])


def test_history_transforms_hand_values():
    g = {"w": [jnp.asarray([1.0, -2.0], jnp.float32)]}
    # SGD, lr 0.1, lr_mult 2, momentum 0.9: h1 = 0.2*g, h2 = 0.9*h1 + 0.2*g = 0.38*g.
    tx = S.caffe_sgd(0.9, 0.1, {"w": [2.0]})
    s = tx.init(g)
    u1, s = tx.update(g, s)
    u2, s = tx.update(g, s)
    np.testing.assert_allclose(u1["w"][0], [0.2, -0.4], rtol=1e-6)
    np.testing.assert_allclose(u2["w"][0], [0.38, -0.76], rtol=1e-6)
    # Nesterov, lr 0.1, momentum 0.5: h1 = 0.1g, u1 = 1.5*h1; h2 = 0.15g, u2 = 1.5*h2 - 0.5*h1.
    tx = S.caffe_nesterov(0.5, 0.1)
    s = tx.init(g)
    u1, s = tx.update(g, s)
    u2, s = tx.update(g, s)
    np.testing.assert_allclose(u1["w"][0], [0.15, -0.3], rtol=1e-6)
    np.testing.assert_allclose(u2["w"][0], [0.175, -0.35], rtol=1e-6)
    # Adam at t = 1: sqrt(1-b2)/(1-b1) * (1-b1)g / (sqrt(1-b2)|g| + eps) = lr*sign(g).
    tx = S.caffe_adam(0.9, 0.999, 1e-8, 0.01)
    u1, s = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u1["w"][0], [0.01, -0.01], rtol=1e-5)
    # AdaGrad: h = g^2, update = lr*g/(|g| + delta) ~ lr*sign(g) on the first step.
    tx = S.caffe_adagrad(1e-8, 0.5)
    u1, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u1["w"][0], [0.5, -0.5], rtol=1e-6)
    # AdaDelta, momentum 0.5, delta 1: h = 0.5 g^2, u = g*sqrt(1/(1+0.5g^2)), update = lr*u.
    tx = S.caffe_adadelta(0.5, 1.0, 2.0)
    u1, s = tx.update(g, tx.init(g))
    expected = 2.0 * np.array([1.0, -2.0]) * np.sqrt(1.0 / (1.0 + 0.5 * np.array([1.0, 4.0])))
    np.testing.assert_allclose(u1["w"][0], expected, rtol=1e-6)
    np.testing.assert_allclose(s.history[1]["w"][0], 0.5 * (expected / 2.0) ** 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# SolverState history: layout, round trip, exact resume, one compilation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TYPES)
def test_history_layout_round_trip_and_exact_resume(kind):
    tx, update = compiled(kind, "inv")
    _, full_state, full_trace = run(kind, "inv", N_ITERS)

    params, state, _ = run(kind, "inv", 3)
    history = S.history_to_caffe(state, ORDER)
    n_sets = 2 if kind in ("AdaDelta", "Adam") else 1
    assert len(history) == 7 * n_sets
    for k, blob in enumerate(history):        # Caffe: history_[k] is learnable param k % N
        assert blob.shape == SHAPES[ORDER[k % 7]] and blob.dtype == np.float32
    hist = S.history_state(state).history
    assert np.array_equal(history[5], hist[0]["fc"][0])
    if n_sets == 2:                            # AdaDelta: g^2 avg then update^2 avg; Adam: m then v
        assert np.array_equal(history[7 + 5], hist[1]["fc"][0])
        assert not np.array_equal(history[5], history[12])

    # Through Caffe's form (legacy 4-D shapes allowed) and back.
    legacy = [h.reshape((1,) * (4 - h.ndim) + h.shape) if h.ndim < 4 else h for h in history]
    restored = S.history_from_caffe(tx.init(params), legacy, ORDER, S.get_iter(state),
                                    S.get_current_step(state))
    # Everything a .solverstate holds comes back; the last applied rate is not stored.
    got, want = S.history_state(restored), S.history_state(state)
    for a, b in zip(jax.tree.leaves(got._replace(rate=None)),
                    jax.tree.leaves(want._replace(rate=None))):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert float(got.rate) == 0.0 and float(want.rate) > 0.0

    _, resumed_state, resumed_trace = run(kind, "inv", N_ITERS - 3, restored, params)
    for a, b in zip(resumed_trace[-1], full_trace[-1]):
        assert np.array_equal(a, b)                               # bit-exact
    resumed_history = S.history_to_caffe(resumed_state, ORDER)
    for a, b in zip(resumed_history, S.history_to_caffe(full_state, ORDER)):
        assert np.array_equal(a, b)
    assert S.get_iter(resumed_state) == N_ITERS
    assert update._cache_size() == 1                              # no retrace on any call


def test_adam_state_starts_at_the_restored_iteration():
    """Adam's bias correction uses t = iter + 1 from the restored counter."""
    sp = solver_param('type: "Adam" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9')
    tx = S.build_solver(sp)
    params = {"w": [jnp.zeros((1,), jnp.float32)]}
    m, v = np.full(1, 0.5, F), np.full(1, 0.25, F)
    state = S.history_from_caffe(tx.init(params), [m, v], [("w", 0)], 9, 0)
    u, _ = tx.update({"w": [jnp.ones((1,), jnp.float32)]}, state, params)
    ref = CaffeRef(sp, [np.zeros(1, F)], [1.0], [1.0])
    ref.history, ref.iter = [m.copy(), v.copy()], 9
    ref.apply_update([np.ones(1, F)])
    assert_close(-np.asarray(u["w"][0]), -ref.w[0], "Adam at t=10")


def test_history_from_caffe_rejects_bad_blobs():
    tx, _ = compiled("Adam", "inv")
    params = to_tree([jnp.asarray(p) for p in initial_params()])
    template = tx.init(params)
    good = [np.zeros(SHAPES[k], F) for k in ORDER] * 2
    with pytest.raises(ModelError, match="14"):
        S.history_from_caffe(template, good[:7], ORDER, 0, 0)
    bad = list(good)
    bad[5] = np.zeros((4, 5), F)
    with pytest.raises(ModelError, match="layer 'fc' blob 0"):
        S.history_from_caffe(template, bad, ORDER, 0, 0)
    with pytest.raises(SolverError, match="params_order"):
        S.history_from_caffe(template, good[:12], ORDER[:6], 0, 0)
    with pytest.raises(ModelError, match="iter"):
        S.history_from_caffe(template, good, ORDER, -1, 0)
    with pytest.raises(SolverError, match="no Caffe history"):
        S.get_iter(optax.sgd(0.1).init(params))


# ------------------------------------------------------------------------------------------------
# Solver types, legacy enum, summary, bad input
# ------------------------------------------------------------------------------------------------

def test_legacy_solver_type_enum():
    sp = solver_param('solver_type: ADAM base_lr: 0.1 lr_policy: "fixed" momentum: 0.9')
    assert S.solver_type(sp) == "Adam"
    params = {"w": [jnp.zeros((2,), jnp.float32)]}
    assert len(S.history_state(S.build_solver(sp).init(params)).history) == 2
    assert S.solver_type(solver_param('solver_type: NESTEROV')) == "Nesterov"
    assert S.solver_type(solver_param('')) == "SGD"


def test_solver_summary():
    sp = solver_param('type: "SGD" base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75 '
                      'momentum: 0.9 weight_decay: 0.0005')
    line = S.solver_summary(sp)
    assert "\n" not in line
    for part in ("SGD", "lr_policy=inv", "base_lr=0.01", "gamma=0.0001", "power=0.75",
                 "momentum=0.9", "weight_decay=0.0005 (L2)", "clip_gradients=off"):
        assert part in line


BAD = [
    ('type: "Sgd" lr_policy: "fixed"', "'type'"),
    ('type: "SGD" solver_type: SGD lr_policy: "fixed"', "solver_type"),
    ('lr_policy: "cosine"', "lr_policy"),
    ('base_lr: 0.1', "lr_policy"),
    ('lr_policy: "step" gamma: 0.1', "stepsize"),
    ('lr_policy: "sigmoid" gamma: 0.1 stepsize: 0', "stepsize"),
    ('lr_policy: "step" gamma: -0.1 stepsize: 10', "gamma"),
    ('lr_policy: "multistep" gamma: 0.1 stepvalue: 100 stepvalue: 50', "stepvalue"),
    ('lr_policy: "multistep" gamma: 0.1 stepvalue: 100 stepvalue: 100', "stepvalue"),
    ('lr_policy: "poly" power: 1', "max_iter"),
    ('type: "AdaGrad" lr_policy: "fixed" momentum: 0.9', "momentum"),
    ('type: "RMSProp" lr_policy: "fixed" momentum: 0.9', "momentum"),
    ('type: "RMSProp" lr_policy: "fixed" rms_decay: 1.0', "rms_decay"),
    ('type: "Adam" lr_policy: "fixed" momentum: 1.0', "momentum"),
    ('type: "Adam" lr_policy: "fixed" momentum: 0.9 momentum2: 1.5', "momentum2"),
    ('lr_policy: "fixed" regularization_type: "L3"', "regularization_type"),
    ('lr_policy: "fixed" iter_size: 0', "iter_size"),
]


@pytest.mark.parametrize("text, field", BAD)
def test_bad_solver_parameters(text, field):
    sp = solver_param(text)
    with pytest.raises(SolverError, match=field):
        S.build_solver(sp)


@pytest.mark.parametrize("text, field", [t for t in BAD if "lr_policy" in t[1] or
                                         "step" in t[1] or t[1] in ("max_iter", "gamma")])
def test_bad_lr_policy_in_learning_rate(text, field):
    with pytest.raises(SolverError, match=field):
        S.learning_rate(solver_param(text), 0)


def test_bad_multiplier_trees():
    sp = solver_param('lr_policy: "fixed" base_lr: 0.1 weight_decay: 0.1')
    params = {"w": [jnp.zeros((2,), jnp.float32)]}
    with pytest.raises(SolverError, match="lr_mults"):
        S.build_solver(sp, {"w": [1.0, 1.0]}).init(params)
    with pytest.raises(SolverError, match="decay_mults"):
        S.build_solver(sp, None, {"v": [1.0]}).update(params, S.build_solver(sp).init(params),
                                                       params)
    with pytest.raises(SolverError, match="regularization_type"):
        S.add_caffe_decay(0.1, None, "L0")
    with pytest.raises(SolverError, match="iter_size"):
        S.scale_by_iter_size(0)
