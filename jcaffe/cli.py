"""The ``jcaffe`` command line: ``jcaffe <command> [flags]``, as Caffe's ``caffe`` tool and its
``upgrade_*`` tools.

Commands live in a table (:data:`COMMANDS`): a command is a function ``argv -> exit status``
registered with :func:`register_command`. Commands defined in other modules are found by
importing the modules listed in :data:`COMMAND_MODULES` (a module not written yet is skipped).

Flags are spelled as Caffe's gflags accept them: ``--flag=value``, ``--flag value``,
``-flag=value`` and ``-flag value`` (:func:`parse_flags` turns a single dash into two before
argparse sees it). The global ``--debug`` flag shows Python tracebacks; without it, a
:class:`~jcaffe.errors.JcaffeError` prints one line ``jcaffe: error: <message>`` on stderr and
the command exits with status 1 (an unexpected exception also prints one line, marked as an
internal error).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback
import warnings
from typing import Callable, Sequence

from jcaffe import __version__
from jcaffe.errors import JcaffeError

Command = Callable[[list[str]], int]

COMMANDS: dict[str, Command] = {}
COMMAND_HELP: dict[str, str] = {}
# Modules whose import registers more commands (train, test, time, device_query, ...).
COMMAND_MODULES: list[str] = ["jcaffe.commands", "jcaffe.tools.commands"]

_DEBUG_FLAGS = {"--debug", "-debug"}
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class UsageError(JcaffeError):
    """Bad command line: unknown command, missing or malformed flag."""


def register_command(name: str, help: str) -> Callable[[Command], Command]:
    """Decorator: registers ``fn(argv) -> int`` as ``jcaffe <name>``; ``help`` is the one-line
    summary ``jcaffe help`` lists."""

    def deco(fn: Command) -> Command:
        if name in COMMANDS and COMMANDS[name] is not fn:
            raise ValueError(f"command {name!r} registered twice")
        COMMANDS[name] = fn
        COMMAND_HELP[name] = help
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """Caffe-style single-dash long flags (``-solver=x``, ``-gpu 0``) as ``--solver=x``,
    ``--gpu 0``. One-letter flags (``-h``), negative numbers and everything after ``--`` are
    left alone."""
    out: list[str] = []
    rest = False
    for arg in argv:
        if rest:
            out.append(arg)
        elif arg == "--":
            rest = True
            out.append(arg)
        elif (arg.startswith("-") and not arg.startswith("--") and len(arg) > 2
              and (arg[1].isalpha() or arg[1] == "_") and arg[2] != "="):
            out.append("-" + arg)
        else:
            out.append(arg)
    return out


def flag_bool(value: str | bool) -> bool:
    """gflags' boolean spellings: true/false, t/f, yes/no, y/n, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got '{value}'")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool = False,
                  help: str = "") -> None:
    """A gflags-style boolean: ``--name`` (true), ``--name=false``, ``--name true``."""
    parser.add_argument(f"--{name}", nargs="?", const=True, default=default, type=flag_bool,
                        metavar="BOOL", help=help)


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``jcaffe <name>``, for use with :func:`parse_flags`."""
    return argparse.ArgumentParser(prog=f"jcaffe {name}", description=description)


def parse_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses ``argv`` with ``parser`` after :func:`normalize_flags`; a bad command line raises
    :class:`UsageError` (one line naming the command and the problem) instead of exiting."""

    def error(message: str):
        raise UsageError(f"{parser.prog}: {message} (see `{parser.prog} --help`)")

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(normalize_flags(argv))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    from jcaffe import log

    if not log.get_logger().handlers:
        log.setup()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from jcaffe import log

    log.get_logger().warning("%s", _one_line(str(message)))


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def _load_commands() -> None:
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command module not written yet
            if e.name != module:
                raise


def _usage() -> str:
    width = max((len(n) for n in COMMANDS), default=0)
    lines = [f"jcaffe {__version__}: Caffe's nets and solvers on JAX",
             "usage: jcaffe <command> [flags]   (flags: --flag=value, -flag value, ...)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {COMMAND_HELP[name]}" for name in sorted(COMMANDS)]
    lines += ["", "global flags:", "  --debug   show Python tracebacks on errors",
              "", "run `jcaffe help <command>` for a command's flags"]
    return "\n".join(lines)


@register_command("help", "list the commands, or show one command's flags: help [COMMAND]")
def _cmd_help(argv: list[str]) -> int:
    if not argv:
        print(_usage())
        return 0
    name = argv[0]
    if name in ("help", "-h", "--help"):
        print(_usage())
        return 0
    if name not in COMMANDS:
        raise UsageError(f"unknown command '{name}'; run `jcaffe help` for the list")
    return COMMANDS[name](["--help"])


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    debug = False
    rest: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        key, eq, value = arg.partition("=")
        if key in _DEBUG_FLAGS:
            try:
                debug = flag_bool(value) if eq else True
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--debug: {e}") from None
        else:
            rest.append(arg)
    return rest, debug


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jcaffe <command> ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or "-debug" in argv
    try:
        argv, debug = _split_debug(argv)
        if argv and argv[0] in ("--version", "-version"):
            print(f"jcaffe {__version__}")
            return 0
        # Command modules (and the JAX import they bring) load only when needed: the upgrade
        # tools are defined here and run without them.
        if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
            _load_commands()
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        name, rest = argv[0], argv[1:]
        if name not in COMMANDS:
            raise UsageError(f"unknown command '{name}'; run `jcaffe help` for the list")
        _setup_logging()
        with warnings.catch_warnings():
            # Deprecations in the user's files (e.g. 'kernelsize') are worth showing on the CLI.
            warnings.simplefilter("default", DeprecationWarning)
            warnings.showwarning = _show_warning
            return int(COMMANDS[name](rest) or 0)
    except SystemExit as e:  # argparse --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("jcaffe: interrupted", file=sys.stderr)
        return 130
    except JcaffeError as e:
        if debug:
            traceback.print_exc()
        print(f"jcaffe: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        inner = _user_error_inside(e)
        if inner:
            print(f"jcaffe: error: {inner}", file=sys.stderr)
            return 1
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"jcaffe: internal error: {type(e).__name__}: {_one_line(str(e))}{hint}",
              file=sys.stderr)
        return 1


_INNER_ERROR = re.compile(r"\b(?:LayerError|NetError|DataError|ModelError|SolverError|"
                          r"JcaffeError): (.+)")


def _user_error_inside(e: BaseException) -> str | None:
    """A jcaffe error raised inside a host callback of a compiled step (a Python layer's
    forward) reaches the caller wrapped in JAX's runtime error: its one line, if any."""
    if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return None
    found = _INNER_ERROR.findall(str(e))
    return _one_line(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------
# Upgrade tools (Caffe's tools/upgrade_net_proto_text, upgrade_net_proto_binary,
# upgrade_solver_proto_text)
# ---------------------------------------------------------------------------------------------


def _in_out_command(name: str, description: str, run: Callable[[str, str], bool]) -> Command:
    def command(argv: list[str]) -> int:
        parser = command_parser(name, description)
        parser.add_argument("input", metavar="IN")
        parser.add_argument("output", metavar="OUT")
        args = parse_flags(argv, parser)
        # Caffe's tools exit with 1 when the upgrade met incompatibilities (output still written).
        return 0 if run(args.input, args.output) else 1

    return command


def _upgrade_net_text(in_path: str, out_path: str) -> bool:
    from jcaffe.tools.upgrade_proto import upgrade_net_proto_text

    return upgrade_net_proto_text(in_path, out_path)


def _upgrade_net_binary(in_path: str, out_path: str) -> bool:
    from jcaffe.tools.upgrade_proto import upgrade_net_proto_binary

    return upgrade_net_proto_binary(in_path, out_path)


def _upgrade_solver_text(in_path: str, out_path: str) -> bool:
    from jcaffe.tools.upgrade_proto import upgrade_solver_proto_text

    return upgrade_solver_proto_text(in_path, out_path)


register_command("upgrade_net_proto_text",
                 "rewrite a text net definition (V0/V1/old fields) in the current format: IN OUT")(
    _in_out_command("upgrade_net_proto_text",
                    "Reads a text NetParameter in any Caffe format and writes it in the current "
                    "format.", _upgrade_net_text))
register_command("upgrade_net_proto_binary",
                 "rewrite a binary net (e.g. an old .caffemodel) in the current format: IN OUT")(
    _in_out_command("upgrade_net_proto_binary",
                    "Reads a binary NetParameter (e.g. a .caffemodel) in any Caffe format and "
                    "writes it, binary, in the current format.", _upgrade_net_binary))
register_command("upgrade_solver_proto_text",
                 "rewrite a text solver (solver_type enum) in the current format: IN OUT")(
    _in_out_command("upgrade_solver_proto_text",
                    "Reads a text SolverParameter and writes it with 'solver_type' upgraded to "
                    "'type'.", _upgrade_solver_text))


@register_command("verify_dataset",
                  "check a jcaffe dataset against its recorded SHA-256 (one-line verdict): DB")
def _cmd_verify_dataset(argv: list[str]) -> int:
    parser = command_parser("verify_dataset", "Reads every record of a jcaffe dataset and "
                            "compares it with the SHA-256 recorded in its jcaffe_dataset.json "
                            "(chunk checksums are checked on the way). Prints one line; exits "
                            "1 when the dataset is damaged.")
    parser.add_argument("db", metavar="DB")
    args = parse_flags(argv, parser)
    from jcaffe.data.dataset import verify_dataset

    meta = verify_dataset(args.db)
    print(f"{args.db}: OK: {meta['count']} records {meta['shape']} {meta['dtype']} match their "
          f"sha256 (data {meta['checksum']['data'][:12]}..., label "
          f"{meta['checksum']['label'][:12]}...)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
