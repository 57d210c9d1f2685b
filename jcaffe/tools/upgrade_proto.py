"""Caffe's proto upgrade tools (tools/upgrade_net_proto_text.cpp, upgrade_net_proto_binary.cpp,
upgrade_solver_proto_text.cpp) over ``jcaffe.upgrade``'s functions.

They read a file without upgrading it (``jcaffe.prototxt``'s raw readers), upgrade it here so
that incompatibilities are logged at ERROR level as Caffe's tools log them, and write the result
atomically. Each returns False when the upgrade met incompatibilities (the output is still
written, as Caffe's tools do); ``jcaffe upgrade_* IN OUT`` exits 1 then.
"""

from __future__ import annotations

from jcaffe import prototxt
from jcaffe.upgrade import (log, net_needs_upgrade, solver_needs_upgrade, upgrade_net_as_needed,
                            upgrade_solver_as_needed)


def upgrade_net_proto_text(in_path: str, out_path: str) -> bool:
    """Reads a text net in any format, writes it in the current format. Returns False when the
    upgrade met incompatibilities (the output is still written, as Caffe's tool does)."""
    net = prototxt.read_net_raw(in_path, binary=False)
    return _upgrade_and_write_net(net, in_path, out_path, prototxt.write_text, "text")


def upgrade_net_proto_binary(in_path: str, out_path: str) -> bool:
    """Reads a binary net (e.g. a V1 .caffemodel), writes it upgraded in binary form."""
    net = prototxt.read_net_raw(in_path, binary=True)
    return _upgrade_and_write_net(net, in_path, out_path, prototxt.write_binary, "binary")


def _upgrade_and_write_net(net, in_path, out_path, write, kind) -> bool:
    problems: list[str] = []
    if net_needs_upgrade(net):
        net, problems = upgrade_net_as_needed(net, in_path)
        for problem in problems:
            log.error("%s: %s", in_path, problem)
    else:
        log.warning("%s is already in the current net format", in_path)
    write(out_path, net)
    log.info("Wrote upgraded NetParameter %s proto to %s", kind, out_path)
    return not problems


def upgrade_solver_proto_text(in_path: str, out_path: str) -> bool:
    """Reads a text solver, writes it with ``solver_type`` upgraded to ``type``."""
    solver = prototxt.read_solver_raw(in_path)
    problems: list[str] = []
    if solver_needs_upgrade(solver):
        solver, problems = upgrade_solver_as_needed(solver, in_path)
        for problem in problems:
            log.error("%s: %s", in_path, problem)
    else:
        log.warning("%s is already in the current solver format", in_path)
    prototxt.write_text(out_path, solver)
    log.info("Wrote upgraded SolverParameter text proto to %s", out_path)
    return not problems


__all__ = ["upgrade_net_proto_text", "upgrade_net_proto_binary", "upgrade_solver_proto_text"]
