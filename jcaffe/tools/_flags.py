"""gflags-style spellings for argparse: ``-flag`` / ``--flag=true|false`` / ``--noflag``."""

from __future__ import annotations

from typing import Iterable, Sequence

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def normalize(argv: Sequence[str], bool_flags: Iterable[str],
              value_flags: Iterable[str]) -> list[str]:
    """Rewrites Caffe-style flags into the ``--flag`` / ``--no-flag`` / ``--flag=V`` argparse
    forms; other arguments are left as they are."""
    bools, values = set(bool_flags), set(value_flags)
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            out.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            out.append(arg)
            continue
        body = arg.lstrip("-")
        name, eq, val = body.partition("=")
        if name in bools:
            if not eq or val.lower() in _TRUE:
                out.append(f"--{name}")
            elif val.lower() in _FALSE:
                out.append(f"--no-{name}")
            else:
                out.append(arg)  # argparse reports it
        elif name.startswith("no") and name[2:] in bools and not eq:
            out.append(f"--no-{name[2:]}")
        elif name in values:
            out.append(f"--{name}{eq}{val}")
        else:
            out.append(arg)
    return out
