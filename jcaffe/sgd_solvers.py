"""Caffe's update rules (``sgd_solvers.cpp``, ``solvers/*.cpp``) as optax transformations,
with Caffe's float32 numerics. The loop that drives them (Solve / Step / TestAll / Snapshot) is
``jcaffe.solver.Solver``.

Parameters are a pytree ``{layer_name: [blob0, blob1, ...]}`` of float32 arrays. The per-blob
``lr_mult`` / ``decay_mult`` of Caffe's ``ParamSpec`` come as pytrees of the same structure
holding plain Python floats (static: read on the host when the solver is built; ``None`` means
1 everywhere).

One Caffe iteration (``SGDSolver::ApplyUpdate``) is the chain built by :func:`build_solver`::

    zero_frozen_grads(lr_mults)             # lr_mult 0: Caffe computes no gradient (diff = 0)
    clip_by_caffe_global_norm(clip)         # on the gradient summed over iter_size
    scale_by_iter_size(iter_size)           # Normalize: g *= 1/iter_size
    add_caffe_decay(wd, decay_mults, type)  # Regularize: g += wd*decay_mult*(w | sign(w))
    caffe_<type>(..., lr_policy, lr_mults)  # ComputeUpdateValue with local_lr = rate*lr_mult
    optax.scale(-1)                         # Net::Update: w -= update

so ``updates, state = tx.update(grads, state, params)`` takes the gradient **summed** over the
``iter_size`` passes (Caffe's accumulated diff) and ``optax.apply_updates(params, updates)`` is
Caffe's ``w -= diff``.

Where the rate comes from: the history transformation (the only piece whose numerics depend on
the rate) owns Caffe's counters. Its state :class:`CaffeHistoryState` holds ``iter`` (updates
applied so far, Caffe's ``iter_``), ``current_step`` (Caffe's ``current_step_``, advanced by the
``step`` / ``multistep`` policies) and the history blobs. Each update evaluates an
:data:`LrPolicy` ``(iter, current_step) -> (rate, new current_step)`` on the counters it holds,
forms ``local_lr = rate * lr_mult`` per blob, updates the history and increments ``iter``. So a
run resumed from a ``.solverstate`` (:func:`history_from_caffe`) continues exactly as Caffe
does, including a ``multistep`` run whose stored ``current_step`` lags its iteration.

Numerics: every piece computes in the parameters' dtype (float32) with Caffe's operations in
Caffe's order (e.g. ``Normalize`` multiplies by the float32 ``1/iter_size``). Rates on the
device are float32; Caffe evaluates ``pow`` / ``exp`` in double and rounds once to float, so
they can differ by an ulp or two. XLA on CPU contracts ``a*b + c`` into fused multiply-adds, so
elementwise results may differ from a non-FMA Caffe build in the last bits. The policies'
formulas are written once (``_rate``) and evaluated on the device (float32: the rate an update
applies, which the logs print) or on the host (:func:`learning_rate`: Caffe's float / double
evaluation exactly).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcaffe.errors import ModelError, SolverError
from jcaffe.proto import caffe_pb2

__all__ = [
    "CaffeHistoryState", "LrPolicy", "SOLVER_TYPES", "LR_POLICIES",
    "solver_type", "validate_solver", "build_solver", "solver_summary",
    "lr_policy", "lr_schedule", "learning_rate",
    "zero_frozen_grads", "clip_by_caffe_global_norm", "scale_by_iter_size", "add_caffe_decay",
    "caffe_sgd", "caffe_nesterov", "caffe_adagrad", "caffe_rmsprop", "caffe_adadelta",
    "caffe_adam",
    "history_state", "history_to_caffe", "history_from_caffe", "get_iter", "get_current_step",
    "applied_rate", "param_mults", "check_iter_size",
]

# Caffe's registered solver names, and the number of history blobs each keeps per learnable
# blob (SGDSolver::PreSolve makes one set; AdaDeltaPreSolve / AdamPreSolve append a second).
SOLVER_TYPES = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2, "Adam": 2}
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

# The pre-2015 enum field `solver_type` (UpgradeSolverType's mapping).
_LEGACY_TYPES = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}

_F32 = np.float32

# (iter, current_step) -> (rate, new current_step): Caffe's GetLearningRate as a pure function.
# `iter` is the number of updates applied before this one; `current_step` is Caffe's
# current_step_ as it stands before this iteration (what a .solverstate stores).
LrPolicy = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def check_iter_size(iter_size: int) -> int:
    """Caffe's ``iter_size``: forward/backward passes accumulated per update; must be >= 1."""
    if int(iter_size) < 1:
        raise SolverError(f"solver field 'iter_size' must be >= 1 (got {iter_size})")
    return int(iter_size)


def solver_type(solver_param: caffe_pb2.SolverParameter) -> str:
    """The solver's Caffe type name (``type``, or the legacy ``solver_type`` enum)."""
    has_type = solver_param.HasField("type")
    if solver_param.HasField("solver_type"):
        if has_type:
            raise SolverError(
                "solver: the old field 'solver_type' (enum) and the new field 'type' (string) "
                "cannot both be set")
        return _LEGACY_TYPES[solver_param.solver_type]
    kind = solver_param.type
    if kind not in SOLVER_TYPES:
        raise SolverError(
            f"solver field 'type': unknown solver type '{kind}'. "
            f"Known types: {', '.join(SOLVER_TYPES)}")
    return kind


def _check_lr_policy(sp: caffe_pb2.SolverParameter) -> str:
    policy = sp.lr_policy
    if not policy:
        raise SolverError(
            f"solver field 'lr_policy' is not set; one of: {', '.join(LR_POLICIES)}")
    if policy not in LR_POLICIES:
        raise SolverError(
            f"solver field 'lr_policy': unknown learning rate policy '{policy}'. "
            f"Known policies: {', '.join(LR_POLICIES)}")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and sp.gamma < 0:
        raise SolverError(
            f"solver field 'gamma' must be >= 0 for lr_policy '{policy}' (got {sp.gamma:g})")
    if policy in ("step", "sigmoid") and sp.stepsize <= 0:
        what = "is not set" if not sp.HasField("stepsize") else f"must be > 0 (got {sp.stepsize})"
        raise SolverError(f"solver field 'stepsize' {what}; lr_policy '{policy}' needs it")
    if policy == "multistep":
        values = list(sp.stepvalue)
        for prev, cur in zip(values, values[1:]):
            if cur <= prev:
                raise SolverError(
                    f"solver field 'stepvalue' must be strictly increasing for lr_policy "
                    f"'multistep' (got {values})")
    if policy == "poly" and sp.max_iter <= 0:
        raise SolverError(
            f"solver field 'max_iter' must be > 0 for lr_policy 'poly' (got {sp.max_iter})")
    return policy


def validate_solver(solver_param: caffe_pb2.SolverParameter) -> str:
    """Checks everything :func:`build_solver` reads; returns the solver type.

    Raises :class:`SolverError` naming the field: Caffe's own checks (momentum with AdaGrad /
    RMSProp, rms_decay in [0, 1), stepsize > 0 for step / sigmoid, gamma >= 0) and what would
    otherwise divide by zero or run silently wrong (iter_size < 1, poly without max_iter,
    non-increasing stepvalue, unknown regularization_type, Adam's betas outside [0, 1)).
    """
    sp = solver_param
    kind = solver_type(sp)
    _check_lr_policy(sp)
    check_iter_size(sp.iter_size)
    if sp.regularization_type not in ("L1", "L2"):
        raise SolverError(
            f"solver field 'regularization_type': unknown regularization type "
            f"'{sp.regularization_type}'; one of: L1, L2")
    if kind in ("AdaGrad", "RMSProp") and sp.momentum != 0:
        raise SolverError(
            f"solver field 'momentum' cannot be used with {kind} (got {sp.momentum:g}); "
            "remove it")
    if kind == "RMSProp" and not 0 <= sp.rms_decay < 1:
        raise SolverError(f"solver field 'rms_decay' must be in [0, 1) (got {sp.rms_decay:g})")
    if kind == "Adam":
        if not 0 <= sp.momentum < 1:
            raise SolverError(
                f"solver field 'momentum' (Adam's beta1) must be in [0, 1) "
                f"(got {sp.momentum:g})")
        if not 0 <= sp.momentum2 < 1:
            raise SolverError(
                f"solver field 'momentum2' (Adam's beta2) must be in [0, 1) "
                f"(got {sp.momentum2:g})")
    return kind


# ----------------------------------------------------------------------------------------------
# Learning rate policies
# ----------------------------------------------------------------------------------------------

def _multistep_taken(stepvalues: Sequence[int]) -> list[int]:
    """Iteration at which a run from iteration 0 takes each multistep step (one per iteration)."""
    taken, last = [], -1
    for value in stepvalues:
        last = max(int(value), last + 1)
        taken.append(last)
    return taken


def _true_divide(x: jax.Array, divisor: np.float32) -> jax.Array:
    """``x / divisor`` correctly rounded, as Caffe's float division (``x`` finite).

    XLA turns a division by a constant or by a broadcast scalar into a multiplication by the
    rounded reciprocal. A divisor of ``x``'s own shape (also under vmap), hidden behind an
    optimization barrier, keeps the true division.
    """
    full = x * jnp.zeros([], x.dtype) + jnp.asarray(divisor, x.dtype)
    return x / jax.lax.optimization_barrier(full)


class _Arithmetic(NamedTuple):
    """Where a policy's rate is evaluated: the float operations that differ between the
    device (float32, traceable) and the host (Caffe's: float32 operands, ``pow`` / ``exp`` in
    double, one rounding to float). Integer logic uses ``xp`` (numpy or jax.numpy)."""

    xp: Any
    to_f32: Callable      # an int iteration as a float32 operand (Caffe: float(iter_))
    count: Callable       # an int as pow's exponent (Caffe: int, promoted to double)
    pow: Callable         # pow(float32, exponent)
    logistic: Callable    # 1 / (1 + exp(z))
    divide: Callable      # correctly rounded float32 division
    scaled: Callable      # base · factor, rounded to float32


_DEVICE = _Arithmetic(
    jnp, lambda i: jnp.asarray(i, jnp.int32).astype(jnp.float32),
    lambda i: jnp.asarray(i, jnp.int32).astype(jnp.float32), jnp.power,
    lambda z: _F32(1) / (_F32(1) + jnp.exp(z)), _true_divide,
    lambda base, r: (base * r).astype(jnp.float32))
_HOST = _Arithmetic(
    np, lambda i: _F32(int(i)), lambda i: np.float64(int(i)),
    lambda x, y: np.power(np.float64(x), np.float64(y)),
    lambda z: 1.0 / (1.0 + np.exp(np.float64(z))), lambda a, b: _F32(a) / _F32(b),
    lambda base, r: _F32(np.float64(base) * r))


def _rate(sp: caffe_pb2.SolverParameter, policy: str, base, it, cs, m: _Arithmetic):
    """Caffe's GetLearningRate, the one copy of its formulas (see :func:`lr_policy`), over
    the arithmetic ``m``: ``(rate, current_step)``."""
    gamma, power, one = _F32(sp.gamma), _F32(sp.power), _F32(1)
    if policy == "fixed":
        return m.scaled(base, _F32(1)), cs
    if policy == "step":
        cs = it // sp.stepsize
        return m.scaled(base, m.pow(gamma, m.count(cs))), cs
    if policy == "exp":
        return m.scaled(base, m.pow(gamma, m.count(it))), cs
    if policy == "inv":
        return m.scaled(base, m.pow(one + gamma * m.to_f32(it), -power)), cs
    if policy == "multistep":
        values = np.asarray(sp.stepvalue, np.int32)
        if values.size:
            nxt = m.xp.asarray(values)[m.xp.clip(cs, 0, values.size - 1)]
            cs = cs + ((cs < values.size) & (it >= nxt)).astype(np.int32)
        return m.scaled(base, m.pow(gamma, m.count(cs))), cs
    if policy == "poly":
        return m.scaled(base, m.pow(one - m.divide(m.to_f32(it), _F32(sp.max_iter)), power)), cs
    # sigmoid
    return m.scaled(base, m.logistic(-gamma * (m.to_f32(it) - _F32(sp.stepsize)))), cs


def lr_policy(solver_param: caffe_pb2.SolverParameter, base_lr=None) -> LrPolicy:
    """Caffe's ``GetLearningRate`` as a jittable ``(iter, current_step) -> (rate, current_step)``.

    ``rate`` is float32, ``current_step`` int32. With ``b = base_lr``, ``γ = gamma``,
    ``p = power``, ``i = iter`` and ``s`` the step count:

    * fixed: ``b``
    * step: ``s = i // stepsize``; ``b·γ^s``
    * exp: ``b·γ^i``
    * inv: ``b·(1 + γ·i)^(-p)``
    * multistep: ``s += 1`` if ``s < len(stepvalue)`` and ``i >= stepvalue[s]`` (at most one
      step per iteration); ``b·γ^s``
    * poly: ``b·(1 - i/max_iter)^p``
    * sigmoid: ``b / (1 + exp(-γ·(i - stepsize)))``

    Policies other than step / multistep return ``current_step`` unchanged. ``base_lr``
    replaces ``solver_param.base_lr`` and may be a traced float32 scalar (``jax.vmap`` over
    learning rates).
    """
    sp = solver_param
    policy = _check_lr_policy(sp)
    base = _F32(sp.base_lr) if base_lr is None else jnp.asarray(base_lr, jnp.float32)

    def rate_fn(it, cs):
        it = jnp.asarray(it, jnp.int32)
        cs = jnp.asarray(cs, jnp.int32)
        rate, cs = _rate(sp, policy, base, it, cs, _DEVICE)
        return jnp.asarray(rate, jnp.float32), jnp.asarray(cs, jnp.int32)

    return rate_fn


def lr_schedule(solver_param: caffe_pb2.SolverParameter) -> Callable[..., jax.Array]:
    """Jittable ``rate(count, current_step=None) -> float32``: the rate Caffe uses at ``count``.

    ``current_step`` is Caffe's ``current_step_`` before iteration ``count`` (only multistep
    depends on it); ``None`` means the value a run started at iteration 0 would hold.
    """
    policy = lr_policy(solver_param)
    taken = np.asarray(_multistep_taken(solver_param.stepvalue)
                       if solver_param.lr_policy == "multistep" else [], np.int32)

    def schedule(count, current_step=None):
        count = jnp.asarray(count, jnp.int32)
        if current_step is None:
            current_step = (jnp.sum((jnp.asarray(taken) < count).astype(jnp.int32))
                            if taken.size else jnp.zeros([], jnp.int32))
        return policy(count, current_step)[0]

    return schedule


def _host_rate(sp: caffe_pb2.SolverParameter, it: int, cs: int | None) -> tuple[np.float32, int]:
    """Caffe's GetLearningRate on the host: float32 operands, pow / exp in double, one rounding."""
    policy = _check_lr_policy(sp)
    it = int(it)
    if it < 0:
        raise SolverError(f"solver: iteration must be >= 0 (got {it})")
    if cs is None:
        taken = _multistep_taken(sp.stepvalue) if policy == "multistep" else []
        cs = sum(1 for t in taken if t < it)
    with np.errstate(all="ignore"):
        rate, cs = _rate(sp, policy, _F32(sp.base_lr), np.int64(it), np.int64(cs), _HOST)
    return _F32(rate), int(cs)


def learning_rate(solver_param: caffe_pb2.SolverParameter, it: int,
                  current_step: int | None = None) -> float:
    """The rate Caffe uses at iteration ``it`` (host, for logs): a float holding a float32.

    Evaluated as Caffe does (float32 operands, ``pow`` / ``exp`` in double, rounded once to
    float). ``current_step`` is Caffe's ``current_step_`` before iteration ``it`` (only multistep
    reads it); ``None`` means the value a run started at iteration 0 would hold.
    """
    return float(_host_rate(solver_param, it, current_step)[0])


# ----------------------------------------------------------------------------------------------
# Gradient pre-processing pieces
# ----------------------------------------------------------------------------------------------

def _leaf_values(name: str, values: Any, updates: Any) -> list[float]:
    """Per-leaf floats of a hyperparameter pytree (None: 1.0) matching the updates' structure."""
    treedef = jax.tree.structure(updates)
    if values is None:
        return [1.0] * treedef.num_leaves
    try:
        leaves = treedef.flatten_up_to(values)
    except (ValueError, TypeError) as exc:
        raise SolverError(f"solver: {name} do not match the parameters' structure: {exc}") from None
    try:
        return [float(v) for v in leaves]
    except (TypeError, ValueError):
        raise SolverError(
            f"solver: {name} must hold plain numbers, one per parameter blob") from None


def _map_leaves(fn, updates, *per_leaf):
    leaves, treedef = jax.tree.flatten(updates)
    return treedef.unflatten([fn(g, *extra) for g, *extra in zip(leaves, *per_leaf)])


def zero_frozen_grads(lr_mults: Any) -> optax.GradientTransformation:
    """Sets the gradient of every blob with ``lr_mult == 0`` to zero.

    Caffe computes no gradient for such a blob (``Net::Init`` turns off its
    ``param_propagate_down``), so its diff is 0 in the clipping norm, in regularization and in
    the history updates. Its update is ``0·(...)`` = 0, so the blob never moves; as in Caffe,
    the adaptive solvers' histories of such a blob still absorb its weight-decay term when
    ``decay_mult != 0`` (they stay zero when it is 0, and always for SGD / Nesterov).
    """

    def update_fn(updates, state, params=None):
        del params
        mults = _leaf_values("lr_mults", lr_mults, updates)
        return _map_leaves(lambda g, m: jnp.zeros_like(g) if m == 0 else g, updates, mults), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_caffe_global_norm(clip_gradients: float) -> optax.GradientTransformation:
    """Caffe's ``ClipGradients``: ``g *= c/‖g‖`` when ``‖g‖ > c``; off when ``c < 0``.

    ``‖g‖ = sqrt(Σ_blobs Σ g²)`` over all learnable blobs, in float32, of the gradient summed
    over ``iter_size`` (before normalisation).
    """
    clip = _F32(clip_gradients)

    def update_fn(updates, state, params=None):
        del params
        if clip < 0:
            return updates, state
        leaves = jax.tree.leaves(updates)
        if not leaves:
            return updates, state
        sumsq = sum(jnp.sum(g * g).astype(jnp.float32) for g in leaves)
        norm = jnp.sqrt(sumsq)
        factor = jnp.where(norm > clip, clip / norm, _F32(1))
        updates = jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_iter_size(iter_size: int) -> optax.GradientTransformation:
    """Caffe's ``Normalize``: ``g *= 1/iter_size`` (the float32 reciprocal, as Caffe scales)."""
    factor = _F32(1) / _F32(check_iter_size(iter_size))

    def update_fn(updates, state, params=None):
        del params
        if iter_size == 1:
            return updates, state
        return jax.tree.map(lambda g: g * jnp.asarray(factor, g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def add_caffe_decay(weight_decay: float, decay_mults: Any = None,
                    regularization_type: str = "L2") -> optax.GradientTransformation:
    """Caffe's ``Regularize``, with ``λ = weight_decay·decay_mult`` (float32) per blob.

    L2: ``g += λ·w``; L1: ``g += λ·sign(w)``; blobs with ``λ == 0`` are left untouched.
    """
    if regularization_type not in ("L1", "L2"):
        raise SolverError(
            f"solver field 'regularization_type': unknown regularization type "
            f"'{regularization_type}'; one of: L1, L2")
    wd = _F32(weight_decay)

    def decay(g, w, mult):
        local = wd * _F32(mult)
        if local == 0:
            return g
        term = w if regularization_type == "L2" else jnp.sign(w)
        return g + jnp.asarray(local, g.dtype) * term

    def update_fn(updates, state, params=None):
        mults = _leaf_values("decay_mults", decay_mults, updates)
        if wd == 0 or all(m == 0 for m in mults):
            return updates, state
        if params is None:
            raise ValueError("add_caffe_decay needs the parameters: call update(g, state, params)")
        return _map_leaves(decay, updates, jax.tree.leaves(params), mults), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ----------------------------------------------------------------------------------------------
# History transformations (Caffe's ComputeUpdateValue)
# ----------------------------------------------------------------------------------------------

class CaffeHistoryState(NamedTuple):
    """Caffe's solver state: counters and history blobs.

    ``iter``: int32, updates applied so far (Caffe's ``iter_``). ``current_step``: int32,
    Caffe's ``current_step_``. ``history``: a tuple of 1 or 2 pytrees shaped like the
    parameters — Caffe's ``history_[0:N]`` and, for AdaDelta / Adam, ``history_[N:2N]``.
    ``rate``: float32, the learning rate the last update applied.
    """

    iter: jax.Array
    current_step: jax.Array
    history: tuple
    # float32: the rate the last update applied (0 before the first update of a run or a
    # resume): what logs print, so a log never shows a rate other than the one applied.
    rate: jax.Array = np.float32(0)


def _as_policy(learning_rate: float | LrPolicy) -> LrPolicy:
    if callable(learning_rate):
        return learning_rate
    rate = _F32(learning_rate)
    return lambda it, cs: (jnp.asarray(rate, jnp.float32), jnp.asarray(cs, jnp.int32))


def _history_transformation(n_sets: int, learning_rate: float | LrPolicy, lr_mults: Any,
                            compute: Callable) -> optax.GradientTransformation:
    """Builds a ComputeUpdateValue transformation.

    ``compute(g, hists, local_lr, it) -> (update, new_hists)`` runs per blob, with ``hists`` a
    tuple of ``n_sets`` history arrays, ``local_lr = rate·lr_mult`` in the blob's dtype and
    ``it`` the int32 iteration before the increment.
    """
    policy = _as_policy(learning_rate)

    def init_fn(params):
        _leaf_values("lr_mults", lr_mults, params)
        hist = tuple(jax.tree.map(jnp.zeros_like, params) for _ in range(n_sets))
        return CaffeHistoryState(iter=jnp.zeros([], jnp.int32),
                                 current_step=jnp.zeros([], jnp.int32), history=hist,
                                 rate=jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        mults = _leaf_values("lr_mults", lr_mults, updates)
        rate, current_step = policy(state.iter, state.current_step)
        leaves, treedef = jax.tree.flatten(updates)
        hist_leaves = [treedef.flatten_up_to(h) for h in state.history]
        out, new_hist = [], [[] for _ in range(n_sets)]
        for i, (g, mult) in enumerate(zip(leaves, mults)):
            local_lr = (rate * _F32(mult)).astype(g.dtype)
            upd, hs = compute(g, tuple(h[i] for h in hist_leaves), local_lr, state.iter)
            out.append(upd)
            for k in range(n_sets):
                new_hist[k].append(hs[k])
        new_state = CaffeHistoryState(
            iter=state.iter + jnp.int32(1),
            current_step=jnp.asarray(current_step, jnp.int32),
            history=tuple(treedef.unflatten(h) for h in new_hist),
            rate=jnp.asarray(rate, jnp.float32))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _c(value, like):
    """A float32 host constant as a scalar of ``like``'s dtype."""
    return jnp.asarray(value, like.dtype)


def caffe_sgd(momentum: float, learning_rate: float | LrPolicy,
              lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's SGD: ``h = μ·h + local_lr·g``; update ``= h``.

    The rate sits inside the history (unlike ``optax.sgd``, which scales after the trace), so
    the two differ whenever the rate changes.
    """
    mu = _F32(momentum)

    def compute(g, hists, local_lr, it):
        h = _c(mu, g) * hists[0] + local_lr * g
        return h, (h,)

    return _history_transformation(1, learning_rate, lr_mults, compute)


def caffe_nesterov(momentum: float, learning_rate: float | LrPolicy,
                   lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's Nesterov: ``h' = μ·h + local_lr·g``; update ``= (1+μ)·h' - μ·h``."""
    mu = _F32(momentum)
    one_plus = _F32(1) + mu

    def compute(g, hists, local_lr, it):
        prev = hists[0]
        h = _c(mu, g) * prev + local_lr * g
        return _c(one_plus, g) * h + _c(-mu, g) * prev, (h,)

    return _history_transformation(1, learning_rate, lr_mults, compute)


def caffe_adagrad(delta: float, learning_rate: float | LrPolicy,
                  lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's AdaGrad: ``h += g²``; update ``= local_lr·g/(sqrt(h) + δ)``."""
    eps = _F32(delta)

    def compute(g, hists, local_lr, it):
        h = g * g + hists[0]
        return local_lr * (g / (jnp.sqrt(h) + _c(eps, g))), (h,)

    return _history_transformation(1, learning_rate, lr_mults, compute)


def caffe_rmsprop(rms_decay: float, delta: float, learning_rate: float | LrPolicy,
                  lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's RMSProp: ``h = ρ·h + (1-ρ)·g²``; update ``= local_lr·g/(sqrt(h) + δ)``."""
    rho, eps = _F32(rms_decay), _F32(delta)
    one_minus = _F32(1) - rho

    def compute(g, hists, local_lr, it):
        h = _c(rho, g) * hists[0] + _c(one_minus, g) * (g * g)
        return local_lr * (g / (jnp.sqrt(h) + _c(eps, g))), (h,)

    return _history_transformation(1, learning_rate, lr_mults, compute)


def caffe_adadelta(momentum: float, delta: float, learning_rate: float | LrPolicy,
                   lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's AdaDelta (``momentum`` is the decay ``ρ``)::

        h  = ρ·h  + (1-ρ)·g²
        u  = g·sqrt((h2 + δ)/(h + δ))
        h2 = ρ·h2 + (1-ρ)·u²
        update = local_lr·u

    History sets: ``(h, h2)`` — Caffe's ``history_[i]`` and ``history_[N+i]``.
    """
    rho, eps = _F32(momentum), _F32(delta)
    one_minus = _F32(1) - rho

    def compute(g, hists, local_lr, it):
        h = _c(rho, g) * hists[0] + _c(one_minus, g) * (g * g)
        u = g * jnp.sqrt((_c(eps, g) + hists[1]) / (_c(eps, g) + h))
        h2 = _c(rho, g) * hists[1] + _c(one_minus, g) * (u * u)
        return local_lr * u, (h, h2)

    return _history_transformation(2, learning_rate, lr_mults, compute)


def caffe_adam(beta1: float, beta2: float, delta: float, learning_rate: float | LrPolicy,
               lr_mults: Any = None) -> optax.GradientTransformation:
    """Caffe's Adam, with ``t = iter + 1``::

        m = β1·m + (1-β1)·g
        v = β2·v + (1-β2)·g²
        update = (local_lr·sqrt(1-β2^t)/(1-β1^t))·m/(sqrt(v) + δ)

    History sets: ``(m, v)`` — Caffe's ``history_[i]`` and ``history_[N+i]``. ``1-β^t`` is
    evaluated as ``-expm1(t·log1p(β-1))``, accurate in float32 (Caffe uses double).
    """
    b1, b2, eps = _F32(beta1), _F32(beta2), _F32(delta)
    one_minus_b1, one_minus_b2 = _F32(1) - b1, _F32(1) - b2

    def one_minus_pow(beta, t):
        return -jnp.expm1(t * jnp.log1p(jnp.asarray(beta - _F32(1), jnp.float32)))

    def compute(g, hists, local_lr, it):
        t = (it + jnp.int32(1)).astype(jnp.float32)
        correction = jnp.sqrt(one_minus_pow(b2, t)) / one_minus_pow(b1, t)
        m = _c(b1, g) * hists[0] + _c(one_minus_b1, g) * g
        v = _c(b2, g) * hists[1] + _c(one_minus_b2, g) * (g * g)
        step = local_lr * correction.astype(g.dtype)
        return step * (m / (jnp.sqrt(v) + _c(eps, g))), (m, v)

    return _history_transformation(2, learning_rate, lr_mults, compute)


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------

def param_mults(net) -> tuple[Any, Any]:
    """``(lr_mults, decay_mults)`` of a ``jcaffe.Net``: pytrees shaped like its params, the
    ParamSpec multipliers of owned blobs and ``None`` where a blob is shared (the owner's
    entry counts, as in Caffe's learnable_params)."""
    lr = {l.name: [None] * len(l.blob_shapes) for l in net.layers if l.blob_shapes}
    dm = {k: list(v) for k, v in lr.items()}
    for p in net.params_info:
        lr[p.layer][p.index] = p.lr_mult
        dm[p.layer][p.index] = p.decay_mult
    return lr, dm


def build_solver(solver_param: caffe_pb2.SolverParameter, net_or_lr_mults: Any = None,
                 decay_mults: Any = None, *, base_lr=None) -> optax.GradientTransformation:
    """Caffe's solver for ``solver_param.type`` as one optax chain (see the module docstring).

    ``build_solver(sp, net)`` takes ``lr_mult`` / ``decay_mult`` from a ``jcaffe.Net``;
    ``build_solver(sp, lr_mults, decay_mults)`` takes them as pytrees (``None``: 1 everywhere).
    ``base_lr`` overrides the solver's (a float, or a traced scalar to ``jax.vmap`` over
    learning rates). ``update(grads, state, params)`` takes the gradient summed over
    ``iter_size`` passes and returns ``-update``; ``optax.apply_updates`` then performs
    Caffe's ``w -= update``.
    """
    sp = solver_param
    if hasattr(net_or_lr_mults, "params_info"):
        if decay_mults is not None:
            raise TypeError("build_solver(sp, net) takes the decay_mults from the net")
        lr_mults, decay_mults = param_mults(net_or_lr_mults)
    else:
        lr_mults = net_or_lr_mults
    kind = validate_solver(sp)
    rate = lr_policy(sp, base_lr)
    if kind == "SGD":
        history = caffe_sgd(sp.momentum, rate, lr_mults)
    elif kind == "Nesterov":
        history = caffe_nesterov(sp.momentum, rate, lr_mults)
    elif kind == "AdaGrad":
        history = caffe_adagrad(sp.delta, rate, lr_mults)
    elif kind == "RMSProp":
        history = caffe_rmsprop(sp.rms_decay, sp.delta, rate, lr_mults)
    elif kind == "AdaDelta":
        history = caffe_adadelta(sp.momentum, sp.delta, rate, lr_mults)
    else:
        history = caffe_adam(sp.momentum, sp.momentum2, sp.delta, rate, lr_mults)
    return optax.chain(
        zero_frozen_grads(lr_mults),
        clip_by_caffe_global_norm(sp.clip_gradients),
        scale_by_iter_size(sp.iter_size),
        add_caffe_decay(sp.weight_decay, decay_mults, sp.regularization_type),
        history,
        optax.scale(-1.0),
    )


def _fmt(value: float) -> str:
    return f"{float(_F32(value)):.6g}"


def solver_summary(solver_param: caffe_pb2.SolverParameter) -> str:
    """One log line: type, lr policy with its parameters, the solver's hyperparameters."""
    sp = solver_param
    kind = validate_solver(sp)
    policy = sp.lr_policy
    parts = [kind, f"lr_policy={policy}", f"base_lr={_fmt(sp.base_lr)}"]
    if policy in ("step", "exp", "inv", "multistep", "sigmoid"):
        parts.append(f"gamma={_fmt(sp.gamma)}")
    if policy in ("inv", "poly"):
        parts.append(f"power={_fmt(sp.power)}")
    if policy in ("step", "sigmoid"):
        parts.append(f"stepsize={sp.stepsize}")
    if policy == "multistep":
        parts.append(f"stepvalue={list(sp.stepvalue)}")
    if policy == "poly":
        parts.append(f"max_iter={sp.max_iter}")
    if kind in ("SGD", "Nesterov", "AdaDelta"):
        parts.append(f"momentum={_fmt(sp.momentum)}")
    if kind == "Adam":
        parts.append(f"beta1={_fmt(sp.momentum)} beta2={_fmt(sp.momentum2)}")
    if kind == "RMSProp":
        parts.append(f"rms_decay={_fmt(sp.rms_decay)}")
    if kind not in ("SGD", "Nesterov"):
        parts.append(f"delta={_fmt(sp.delta)}")
    parts.append(f"weight_decay={_fmt(sp.weight_decay)} ({sp.regularization_type})")
    parts.append(f"iter_size={sp.iter_size}")
    clip = sp.clip_gradients
    parts.append(f"clip_gradients={_fmt(clip) if clip >= 0 else 'off'}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Solver state <-> Caffe's SolverState
# ----------------------------------------------------------------------------------------------

def _find(state: Any, path: tuple = ()) -> tuple | None:
    if isinstance(state, CaffeHistoryState):
        return path
    if isinstance(state, (tuple, list)):
        for i, sub in enumerate(state):
            found = _find(sub, path + (i,))
            if found is not None:
                return found
    return None


def _replace(state: Any, path: tuple, new: CaffeHistoryState) -> Any:
    if not path:
        return new
    i, rest = path[0], path[1:]
    items = list(state)
    items[i] = _replace(items[i], rest, new)
    if hasattr(state, "_fields"):  # NamedTuple
        return type(state)(*items)
    return type(state)(items)


def history_state(opt_state: Any) -> CaffeHistoryState:
    """The :class:`CaffeHistoryState` inside a solver's (chain) state."""
    path = _find(opt_state)
    if path is None:
        raise SolverError("solver state holds no Caffe history (not built by jcaffe.sgd_solvers)")
    node = opt_state
    for i in path:
        node = node[i]
    return node


def get_iter(opt_state: Any) -> int:
    """Caffe's ``iter_``: the number of updates applied."""
    return int(history_state(opt_state).iter)


def get_current_step(opt_state: Any) -> int:
    """Caffe's ``current_step_``."""
    return int(history_state(opt_state).current_step)


def applied_rate(opt_state: Any) -> jax.Array:
    """The learning rate the last update applied (float32; traceable)."""
    return history_state(opt_state).rate


def _ordered_leaves(tree: Any, params_order: Sequence[tuple[str, int]]) -> list:
    n_leaves = len(jax.tree.leaves(tree))
    if len(params_order) != n_leaves:
        raise SolverError(
            f"solver: params_order names {len(params_order)} blobs but the solver holds "
            f"{n_leaves}")
    if len({tuple(key) for key in params_order}) != len(params_order):
        raise SolverError("solver: params_order names a blob twice")
    out = []
    for layer, index in params_order:
        try:
            out.append(tree[layer][index])
        except (KeyError, IndexError, TypeError):
            raise SolverError(
                f"solver: params_order names layer '{layer}' blob {index}, which the solver "
                "does not hold") from None
    return out


def history_to_caffe(opt_state: Any, params_order: Sequence[tuple[str, int]]) -> list[np.ndarray]:
    """The history blobs in Caffe's ``SolverState.history`` order.

    ``params_order`` lists ``(layer_name, blob_index)`` in the net's ``learnable_params`` order.
    SGD / Nesterov / AdaGrad / RMSProp: N blobs; AdaDelta: N of ``h`` (g² average) then N of
    ``h2`` (update² average); Adam: N of ``m`` then N of ``v``.
    """
    state = history_state(opt_state)
    return [np.asarray(leaf, dtype=np.float32)
            for hist in state.history for leaf in _ordered_leaves(hist, params_order)]


def history_from_caffe(opt_state_template: Any, history_list: Sequence[np.ndarray],
                       params_order: Sequence[tuple[str, int]], iter: int,
                       current_step: int) -> Any:
    """A solver state restored from Caffe's ``SolverState`` (history, iter, current_step).

    ``opt_state_template`` is the solver's ``init(params)``; each history blob is reshaped to
    its parameter's shape (Caffe's blob may carry legacy 4-D shapes) and must match its size.
    """
    state = history_state(opt_state_template)
    n_sets = len(state.history)
    n_blobs = len(params_order)
    if len(history_list) != n_sets * n_blobs:
        raise ModelError(
            f"solverstate: {len(history_list)} history blobs, but this solver needs "
            f"{n_sets * n_blobs} ({n_sets} per learnable blob, {n_blobs} learnable blobs)")
    if int(iter) < 0 or int(current_step) < 0:
        raise ModelError(
            f"solverstate: iter ({iter}) and current_step ({current_step}) must be >= 0")
    new_sets = []
    for k, hist in enumerate(state.history):
        templates = _ordered_leaves(hist, params_order)  # validates params_order
        restored = {}
        for i, (key, tmpl) in enumerate(zip(params_order, templates)):
            blob = np.asarray(history_list[k * n_blobs + i], dtype=np.float32)
            if blob.size != tmpl.size:
                raise ModelError(
                    f"solverstate: history blob {k * n_blobs + i} (layer '{key[0]}' blob "
                    f"{key[1]}) has shape {tuple(blob.shape)}, the parameter has "
                    f"{tuple(tmpl.shape)}")
            restored[tuple(key)] = jnp.asarray(blob.reshape(tmpl.shape), dtype=tmpl.dtype)

        def pick(path, leaf, restored=restored):
            return restored[(path[0].key, path[1].idx)]

        new_sets.append(jax.tree_util.tree_map_with_path(pick, hist))
    new = CaffeHistoryState(iter=jnp.asarray(int(iter), jnp.int32),
                            current_step=jnp.asarray(int(current_step), jnp.int32),
                            history=tuple(new_sets), rate=jnp.zeros([], jnp.float32))
    return _replace(opt_state_template, _find(opt_state_template), new)
