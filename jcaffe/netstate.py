"""Phases, levels and stages: which layers of a net exist in a given NetState.

Reproduces Caffe's ``Net::FilterNet`` / ``Net::StateMeetsRule`` (net.cpp) and the way Caffe
builds a net's state (``Net::Net(file, phase, level, stages)``, ``Solver::InitTrainNet``,
``Solver::InitTestNets``).

A layer with no ``include`` rule is in the net unless its state meets one of its ``exclude``
rules; a layer with ``include`` rules is in the net only if the state meets one of them. A state
meets a rule when every condition the rule sets holds: same phase, ``level >= min_level``,
``level <= max_level``, every ``stage`` of the rule among the state's stages, no ``not_stage``
of the rule among them.
"""

from __future__ import annotations

from typing import Iterable

from jcaffe.errors import NetError, SolverError
from jcaffe.proto import caffe_pb2

_PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}


def phase_value(phase: int | str) -> int:
    """``"TRAIN"`` / ``"TEST"`` (any case) or the Phase enum number -> the enum number."""
    if isinstance(phase, str):
        try:
            return _PHASES[phase.upper()]
        except KeyError:
            raise NetError(f"unknown phase '{phase}' (use TRAIN or TEST)") from None
    if phase not in _PHASES.values():
        raise NetError(f"unknown phase {phase} (use TRAIN or TEST)")
    return int(phase)


def make_state(phase: int | str = "TRAIN", level: int = 0,
               stages: Iterable[str] = ()) -> caffe_pb2.NetState:
    """A NetState with the given phase, level and stages (all fields set explicitly)."""
    if isinstance(stages, str):
        stages = [stages]
    return caffe_pb2.NetState(phase=phase_value(phase), level=int(level), stage=list(stages))


def merge_states(*states: caffe_pb2.NetState) -> caffe_pb2.NetState:
    """Protobuf MergeFrom of the states in order, as Caffe does: a later state's phase / level
    replace earlier ones only where it sets them; stages accumulate."""
    out = caffe_pb2.NetState()
    for state in states:
        out.MergeFrom(state)
    return out


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule,
                     layer_name: str = "") -> bool:
    """Caffe's Net::StateMeetsRule (``layer_name`` only serves messages)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    if any(stage in stages for stage in rule.not_stage):
        return False
    return True


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Whether ``layer`` is part of the net in ``state`` (Caffe's FilterNet decision)."""
    if len(layer.include) and len(layer.exclude):
        raise NetError(f"layer '{layer.name}': specify either include rules or exclude rules, "
                       f"not both")
    if len(layer.include) == 0:
        return not any(state_meets_rule(state, rule, layer.name) for rule in layer.exclude)
    return any(state_meets_rule(state, rule, layer.name) for rule in layer.include)


def filter_net(net: caffe_pb2.NetParameter,
               state: caffe_pb2.NetState | None = None) -> caffe_pb2.NetParameter:
    """Caffe's Net::FilterNet: a copy of ``net`` holding only the layers included in ``state``
    (default: the net's own ``state`` field). When ``state`` is given, the copy's ``state`` is
    set to it, as Caffe's net carries the state it was built for."""
    if state is None:
        state = net.state
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for layer in net.layer:
        if layer_included(layer, state):
            out.layer.add().CopyFrom(layer)
    if state is not net.state:
        out.state.CopyFrom(state)
    return out


def net_state_for(net: caffe_pb2.NetParameter, phase: int | str, level: int = 0,
                  stages: Iterable[str] = ()) -> caffe_pb2.NetState:
    """The state Caffe's ``Net(param_file, phase, level, stages)`` (used by ``caffe test`` /
    ``caffe time``) builds: the net's own state with the phase and level replaced and the
    stages appended."""
    if isinstance(stages, str):
        stages = [stages]
    out = caffe_pb2.NetState()
    out.CopyFrom(net.state)
    out.phase = phase_value(phase)
    out.stage.extend(stages)
    out.level = int(level)
    return out


def train_net_state(solver: caffe_pb2.SolverParameter,
                    net: caffe_pb2.NetParameter) -> caffe_pb2.NetState:
    """Caffe's Solver::InitTrainNet state: phase TRAIN, then the net's own ``state``, then the
    solver's ``train_state`` (highest precedence), merged in that order."""
    return merge_states(caffe_pb2.NetState(phase=caffe_pb2.TRAIN), net.state, solver.train_state)


def num_test_nets(solver: caffe_pb2.SolverParameter) -> int:
    """How many test nets Caffe's Solver::InitTestNets builds, with its checks: one per
    ``test_net_param`` and ``test_net``, then one per remaining ``test_iter`` when the test nets
    come from ``net`` / ``net_param``; ``test_state`` is absent or given once per test net."""
    has_generic = int(solver.HasField("net")) + int(solver.HasField("net_param"))
    if has_generic > 1:
        raise SolverError("the solver gives both 'net' and 'net_param'; keep one")
    specific = len(solver.test_net_param) + len(solver.test_net)
    n_iter = len(solver.test_iter)
    if has_generic:
        if n_iter < specific:
            raise SolverError(f"give one 'test_iter' per test net: {specific} test net(s), "
                              f"{n_iter} test_iter")
        count = n_iter
    else:
        if n_iter != specific:
            raise SolverError(f"give one 'test_iter' per test net: {specific} test net(s), "
                              f"{n_iter} test_iter")
        count = specific
    if len(solver.test_state) and len(solver.test_state) != count:
        raise SolverError(f"'test_state' must be absent or given once per test net: {count} "
                          f"test net(s), {len(solver.test_state)} test_state")
    if count and solver.test_interval <= 0:
        raise SolverError(f"test_interval must be positive when there are test nets, got "
                          f"{solver.test_interval}")
    return count


def test_net_sources(solver: caffe_pb2.SolverParameter
                     ) -> list[tuple[str, caffe_pb2.NetParameter | str]]:
    """Where each test net comes from, in Caffe's order (Solver::InitTestNets): every
    ``test_net_param``, every ``test_net`` file, then ``net_param`` / ``net`` once per remaining
    ``test_iter``. Items are (field name, NetParameter or file path)."""
    count = num_test_nets(solver)
    sources: list[tuple[str, caffe_pb2.NetParameter | str]] = []
    sources += [("test_net_param", p) for p in solver.test_net_param]
    sources += [("test_net", p) for p in solver.test_net]
    remaining = count - len(sources)
    if solver.HasField("net_param"):
        sources += [("net_param", solver.net_param)] * remaining
    elif solver.HasField("net"):
        sources += [("net", solver.net)] * remaining
    return sources


def test_net_state(solver: caffe_pb2.SolverParameter, net: caffe_pb2.NetParameter,
                   index: int) -> caffe_pb2.NetState:
    """Caffe's Solver::InitTestNets state of test net ``index``: phase TEST, then the net's own
    ``state``, then ``test_state[index]`` when the solver gives test states."""
    states = [caffe_pb2.NetState(phase=caffe_pb2.TEST), net.state]
    if len(solver.test_state):
        states.append(solver.test_state[index])
    return merge_states(*states)


# pytest must not collect these as tests when a test module imports them.
test_net_state.__test__ = False
test_net_sources.__test__ = False
