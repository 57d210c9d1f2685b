"""Reading and writing Caffe's net and solver definitions (Caffe's ReadNetParamsFromTextFileOrDie,
ReadNetParamsFromBinaryFileOrDie, ReadSolverParamsFromTextFileOrDie, WriteProtoToTextFile).

Nets are returned in the current ("V2") format whatever format the file used: every reader runs
:func:`jcaffe.upgrade.upgrade_net`. A net file may be text or binary (a ``.caffemodel`` /
``.binaryproto``, or any file whose bytes are not text); a solver file must be text.

Paths named inside a solver (``net``, ``train_net``, ``test_net``) are resolved by
:func:`read_solver` and stored back into the returned message: as Caffe does, relative to the
current working directory, and, when nothing exists there, relative to the solver file's folder
(see :func:`resolve_path`). ``read_solver(path, resolve_paths=False)`` keeps them as written.

Every problem raises :class:`~jcaffe.errors.ProtoError` with a one-line message that starts with
``FILE:LINE:COL:`` (or ``FILE:`` when no position applies) and names the offending field.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings

from google.protobuf import message as pb_message
from google.protobuf import text_format

from jcaffe._atomic import atomic_write
from jcaffe.errors import ProtoError, read_bytes
from jcaffe.proto import caffe_pb2, ssd_pb2
from jcaffe.upgrade import upgrade_net, upgrade_solver

_BINARY_SUFFIXES = {".caffemodel", ".binaryproto", ".solverstate", ".protobin", ".pb"}
_TEXT_SUFFIXES = {".prototxt", ".pbtxt", ".txt", ".pt"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Bytes that never occur in a text prototxt (all C0 controls but tab, LF, VT, FF, CR).
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")

# Fields of SolverParameter that name the train net; Caffe requires exactly one.
TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _binary_position(data: bytes) -> tuple[int, int] | None:
    """(line, col) of the first byte that cannot be in a text prototxt; None when it is text."""
    idx = None
    m = _CONTROL.search(data)
    if m is not None:
        idx = m.start()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        idx = e.start if idx is None else min(idx, e.start)
    if idx is None:
        return None
    line = data.count(b"\n", 0, idx) + 1
    col = idx - (data.rfind(b"\n", 0, idx) + 1) + 1
    return line, col


def _is_binary(data: bytes, path: str) -> bool:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _BINARY_SUFFIXES:
        return True
    pos = _binary_position(data)
    if pos is None:
        return False
    # A text-named file that only fails UTF-8 (e.g. Latin-1 comments) is still read as text.
    return suffix not in _TEXT_SUFFIXES or _CONTROL.search(data) is not None


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def write_text(path: str, message: pb_message.Message) -> None:
    """Writes ``message`` in text format (Caffe's WriteProtoToTextFile), atomically: a reader
    never sees a half-written file. A net's SSD fork fields are written too."""
    if isinstance(message, caffe_pb2.NetParameter):
        message = ssd_pb2.NetParameter.FromString(message.SerializeToString())
    atomic_write(path, text_format.MessageToString(message).encode("utf-8"), error=ProtoError)


def write_binary(path: str, message: pb_message.Message) -> None:
    """Writes ``message`` in binary wire format (Caffe's WriteProtoToBinaryFile), atomically."""
    atomic_write(path, message.SerializeToString(), error=ProtoError)


def resolve_path(path: str, relative_to_file: str | None = None) -> str:
    """Where a path named inside a file points: as Caffe, relative to the current working
    directory; when nothing exists there, relative to the folder of ``relative_to_file``.
    Returns ``path`` unchanged when it exists as given (or is absolute, or exists nowhere),
    otherwise the normalized path next to ``relative_to_file``."""
    if not path or os.path.isabs(path) or os.path.exists(path) or not relative_to_file:
        return path
    beside = os.path.normpath(os.path.join(os.path.dirname(relative_to_file), path))
    return beside if os.path.exists(beside) else path


# ---------------------------------------------------------------------------------------------
# Text parsing and error messages
# ---------------------------------------------------------------------------------------------

_POS_PREFIX = re.compile(r"^(\d+):(\d+) : ")
_QUOTED_LINE = re.compile(
    r"^'.*': (?=(?:Couldn't|Enum|Expected|Value|String|Message|Invalid|Integer|Unknown|Field))",
    re.S)
_NO_FIELD = re.compile(r'^Message type "([\w.]+)" has no field named "(\w+)"\.?$')
_MULTIPLE = re.compile(r'^Message type "([\w.]+)" should not have multiple "(\w+)" fields\.?$')
_ENUM = re.compile(r'^Enum type "([\w.]+)" has no value (named|with number) (.+?)\.?$')
_COULDNT = re.compile(r"^Couldn't parse (\w+): (.*)$")
_GOT_CLOSE = re.compile(r"^Expected identifier or number, got ([}>])\.?$")
_KERNELSIZE = re.compile(
    r'^Message type "caffe\.(ConvolutionParameter|PoolingParameter)" has no field named '
    r'"kernelsize"')
_FIELD_BEFORE = re.compile(r"([A-Za-z_]\w*)\s*:?\s*$")

# The SSD fork's SolverParameter fields: eval_type = 41 and ap_version = 42 are BVLC's
# layer_wise_reduce and weights.
_SSD_SOLVER_FIELDS = ("eval_type", "ap_version", "show_per_class_result")

_ARTICLE = {"integer": "an integer", "float": "a float", "double": "a float", "bool": "a bool"}


def _short_type(full_name: str) -> str:
    for package in ("caffe.ssd.", "caffe."):
        if full_name.startswith(package):
            return full_name[len(package):]
    return full_name


def _field_before(lines: list[str], line: int, col: int) -> str | None:
    if not 1 <= line <= len(lines):
        return None
    m = _FIELD_BEFORE.search(lines[line - 1][:max(col - 1, 0)])
    return m.group(1) if m else None


def _scan_braces(text: str) -> tuple[int, int] | None:
    """(line, col) of the last opening brace that is never closed, skipping strings/comments."""
    stack: list[tuple[int, int]] = []
    line, col, i, n = 1, 0, 0, len(text)
    quote = None
    while i < n:
        c = text[i]
        col += 1
        if c == "\n":
            line, col, quote = line + 1, 0, None
        elif quote:
            if c == "\\":
                i += 1
                col += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            while i + 1 < n and text[i + 1] != "\n":
                i += 1
        elif c in "{<":
            stack.append((line, col))
        elif c in "}>" and stack:
            stack.pop()
        i += 1
    return stack[-1] if stack else None


def _enclosing_layer(text: str, lines: list[str], line: int, col: int) -> tuple[str, str]:
    """(name, type) given so far in the innermost message open at ``line:col`` (the layer
    holding an unknown field), read from its own fields only, not nested messages'."""
    if not 1 <= line <= len(lines):
        return "", ""
    offset = sum(len(l) + 1 for l in lines[:line - 1]) + max(col - 1, 0)
    prefix = text[:offset]
    opened = _scan_braces(prefix)
    if opened is None:
        return "", ""
    start = sum(len(l) + 1 for l in lines[:opened[0] - 1]) + opened[1]
    depth, own = 0, []
    for c in prefix[start:]:
        if c in "{<":
            depth += 1
        elif c in "}>":
            depth -= 1
        elif depth == 0:
            own.append(c)
    own_text = "".join(own)
    found = {}
    for key in ("name", "type"):
        m = re.search(rf"\b{key}\s*:\s*(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z_0-9]+))", own_text)
        found[key] = next((g for g in m.groups() if g is not None), "") if m else ""
    return found["name"], found["type"]


def _fork_message(field: str, lines: list[str], line: int, col: int, text: str) -> str | None:
    """The one-line message for a layer field a Caffe fork adds, or None for a plain typo."""
    from jcaffe.layers.catalog import fork_note

    name, layer_type = _enclosing_layer(text, lines, line, col)
    note = fork_note(layer_type, field)
    if note is None:
        return None
    where = f"layer '{name}'" if name else "a layer"
    if layer_type:
        where += f" (type {layer_type})"
    subject = f"field '{field}'"
    if layer_type and not fork_note(field=field) and fork_note(layer_type):
        subject = f"field '{field}' and its layer type"
    return (f"{where}: {subject} {note}; jcaffe reads BVLC Caffe's caffe.proto and the SSD "
            f"fork's fields (remove or replace the layer)")


def _rephrase(body: str, lines: list[str], line: int, col: int, text: str) -> str:
    """Protobuf's parse error text, restated to name the field and say what is wrong."""
    m = _NO_FIELD.match(body)
    if m:
        type_name, field = _short_type(m.group(1)), m.group(2)
        if type_name in ("LayerParameter", "V1LayerParameter"):
            fork = _fork_message(field, lines, line, col, text)
            if fork:
                return fork
        if type_name == "SolverParameter" and field in _SSD_SOLVER_FIELDS:
            return (f"field '{field}' belongs to a Caffe fork, SSD (weiliu89/caffe, ssd branch), "
                    f"not to BVLC Caffe: its field number clashes with BVLC's SolverParameter, "
                    f"so jcaffe cannot read it; remove it (`jcaffe test --ap_version` scores a "
                    f"DetectionEvaluate output as mAP)")
        msg = f"unknown field '{field}' in {type_name}"
        try:
            desc = caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(m.group(1))
            close = difflib.get_close_matches(field, list(desc.fields_by_name), n=1)
            if close:
                msg += f" (did you mean '{close[0]}'?)"
        except KeyError:
            pass
        return msg
    m = _MULTIPLE.match(body)
    if m:
        return (f"field '{m.group(2)}' of {_short_type(m.group(1))} is given more than once but "
                f"is not repeated")
    m = _GOT_CLOSE.match(body)
    if m:
        return f"unexpected '{m.group(1)}' with no matching opening brace (unbalanced braces)"
    if body.rstrip(".") in ('Expected "}"', 'Expected ">"'):
        opened = _scan_braces(text)
        if opened is not None:
            return (f"unexpected end of file: the '{{' opened at {opened[0]}:{opened[1]} is "
                    f"never closed (unbalanced braces)")
    field = _field_before(lines, line, col)
    subject = f"field '{field}'" if field else None
    m = _ENUM.match(body)
    if m:
        enum_name = m.group(1)
        what = m.group(3)
        valid = ""
        try:
            enum = caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName(enum_name)
            valid = f" (valid: {', '.join(v.name for v in enum.values)})"
        except KeyError:
            pass
        kind = "value" if m.group(2) == "named" else "value number"
        return (f"{subject + ': ' if subject else ''}{_short_type(enum_name)} has no {kind} "
                f"{what}{valid}")
    m = _COULDNT.match(body)
    if m:
        expected = _ARTICLE.get(m.group(1), f"a {m.group(1)}")
        return f"{subject or 'value'} expects {expected}, got {m.group(2)}"
    if body.startswith("Expected string but found:"):
        got = body.split(":", 1)[1].strip()
        return f"{subject or 'value'} expects a quoted string, got {got}"
    if body.rstrip(".") == 'Expected "true" or "false"':
        return f"{subject or 'value'} expects true or false"
    if body.rstrip(".") == 'Expected "{"':
        return f"{subject or 'field'} is a message: expected '{{' after it"
    if body.rstrip(".") == 'Expected ":"':
        return f"{subject or 'field'}: expected ':' after the field name"
    body = body[:1].lower() + body[1:]
    return f"{subject}: {body}" if subject else body


def _parse_text(text: str, msg: pb_message.Message, filename: str) -> pb_message.Message:
    """Parses ``text`` into ``msg``; accepts the tutorial's ``kernelsize`` spelling inside
    convolution_param / pooling_param (with a DeprecationWarning)."""
    # (line, col) of each 'kernelsize' rewritten to 'kernel_size' (one character longer).
    rewrites: list[tuple[int, int]] = []
    while True:
        msg.Clear()
        try:
            text_format.Parse(text, msg)
            return msg
        except text_format.ParseError as e:
            line, col = e.GetLine() or 0, e.GetColumn() or 0
            body = str(e)
            pm = _POS_PREFIX.match(body)
            if pm:
                body = body[pm.end():]
            body = _QUOTED_LINE.sub("", body, count=1).strip()
            lines = text.split("\n")
            if (_KERNELSIZE.match(body) and 1 <= line <= len(lines)
                    and lines[line - 1][col - 1:col - 1 + len("kernelsize")] == "kernelsize"):
                shift = sum(1 for r_line, r_col in rewrites if r_line == line and r_col < col)
                orig_col = col - shift
                rewrites.append((line, col))
                where = _short_type(_KERNELSIZE.match(body).group(1))
                warnings.warn(
                    f"{filename}:{line}:{orig_col}: 'kernelsize' is not a field of {where} "
                    f"(Caffe rejects it); read as 'kernel_size'", DeprecationWarning, stacklevel=4)
                fixed = lines[line - 1]
                lines[line - 1] = fixed[:col - 1] + "kernel_size" + fixed[col - 1 + 10:]
                text = "\n".join(lines)
                continue
            message = _rephrase(body, lines, line, col, text)
            # Report columns of the file as written, before any 'kernelsize' rewrite.
            col -= sum(1 for r_line, r_col in rewrites if r_line == line and r_col < col)
            pos = f"{line}:{col}" if line else "1:1"
            raise ProtoError(f"{filename}:{pos}: {message}") from None


def _field_position(text: str, field: str) -> tuple[int, int]:
    """(line, col) of the first top-level-looking ``field:`` outside comments and strings;
    (1, 1) when it cannot be found (e.g. the value came from elsewhere)."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(field)}\s*[:{{<]")
    for n, raw in enumerate(text.split("\n"), start=1):
        code = _strip_comment(raw)
        m = pattern.search(code)
        if m:
            return n, m.start() + 1
    return 1, 1


def _strip_comment(line: str) -> str:
    """``line`` without its ``#`` comment and with string contents blanked (same length up to
    the comment, so columns still match)."""
    out = []
    quote = None
    escaped = False
    for c in line:
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
                out.append(c)
                continue
            out.append(" ")
        elif c in "\"'":
            quote = c
            out.append(c)
        elif c == "#":
            break
        else:
            out.append(c)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Nets
# ---------------------------------------------------------------------------------------------


def _check_net(net: caffe_pb2.NetParameter, filename: str, empty_source: bool) -> None:
    if len(net.layer) == 0:
        if empty_source:
            raise ProtoError(f"{filename}:1:1: the file is empty: a net needs at least one layer")
        raise ProtoError(f"{filename}:1:1: the net defines no layers")


def _parse_net(text: str, filename: str) -> caffe_pb2.NetParameter:
    """A text NetParameter read with BVLC's fields and the SSD fork's (``ssd.proto``): the
    result is BVLC's message, the fork's fields kept in it as unknown fields (same wire bytes;
    :func:`jcaffe.proto.ssd_fields` reads them back)."""
    net = _parse_text(text, ssd_pb2.NetParameter(), filename)
    return caffe_pb2.NetParameter.FromString(net.SerializeToString())


def parse_net_text(text: str, filename: str = "<string>", upgrade: bool = True,
                   require_layers: bool = True) -> caffe_pb2.NetParameter:
    """Parses a text NetParameter and (by default) upgrades it to the current format."""
    net = _parse_net(text, filename)
    if upgrade:
        net = upgrade_net(net, filename)
    if require_layers:
        _check_net(net, filename, not re.sub(r"#[^\n]*", "", text).strip())
    return net


def parse_net_binary(data: bytes, filename: str = "<bytes>") -> caffe_pb2.NetParameter:
    """Parses a binary NetParameter (Caffe's ReadProtoFromBinaryFile), without upgrading."""
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except pb_message.DecodeError as e:
        raise ProtoError(f"{filename}: not a valid binary NetParameter ({e})") from None
    return net


def read_net_raw(path: str, binary: bool | None = None) -> caffe_pb2.NetParameter:
    """Reads a net file as written, without upgrading it. ``binary``: None detects the format
    from the file name and contents, True / False insists on one."""
    data = read_bytes(path, ProtoError, "net")
    if data.startswith(_HDF5_MAGIC):
        raise ProtoError(f"{path}: is an HDF5 file (a .caffemodel.h5?), not a NetParameter; "
                         f"load HDF5 weights with jcaffe.caffemodel")
    if binary is None:
        binary = _is_binary(data, path)
    if binary:
        try:
            return parse_net_binary(data, path)
        except ProtoError:
            if os.path.splitext(path)[1].lower() in _BINARY_SUFFIXES:
                raise
            pos = _binary_position(data) or (1, 1)
            raise ProtoError(f"{path}:{pos[0]}:{pos[1]}: neither a text prototxt (binary byte "
                             f"here) nor a valid binary NetParameter") from None
    return _parse_net(_decode_text(data), path)


def read_net(path: str) -> caffe_pb2.NetParameter:
    """Caffe's ReadNetParamsFromTextFileOrDie / ...BinaryFileOrDie: a net file (text or binary,
    detected) in any Caffe format, upgraded to the current one."""
    net = read_net_raw(path)
    net = upgrade_net(net, path)
    data_is_empty = len(net.layer) == 0 and os.path.getsize(path) == 0
    _check_net(net, path, data_is_empty)
    return net


def read_net_binary(path: str) -> caffe_pb2.NetParameter:
    """A binary net (a .caffemodel: definition and weights), upgraded to the current format."""
    net = upgrade_net(read_net_raw(path, binary=True), path)
    _check_net(net, path, os.path.getsize(path) == 0)
    return net


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


def _check_solver(solver: caffe_pb2.SolverParameter, text: str, filename: str) -> None:
    given = [f for f in TRAIN_NET_FIELDS if solver.HasField(f)]
    if not given:
        what = "the file is empty" if not re.sub(r"#[^\n]*", "", text).strip() \
            else "the solver names no net"
        raise ProtoError(f"{filename}:1:1: {what}: give one of "
                         f"{', '.join(TRAIN_NET_FIELDS)}")
    if len(given) > 1:
        line, col = _field_position(text, given[1])
        raise ProtoError(f"{filename}:{line}:{col}: the solver gives more than one train net "
                         f"({' and '.join(given)}); keep one of {', '.join(TRAIN_NET_FIELDS)}")


def parse_solver_text(text: str, filename: str = "<string>",
                      upgrade: bool = True) -> caffe_pb2.SolverParameter:
    """Parses a text SolverParameter, checks it names exactly one train net, and (by default)
    upgrades it (``solver_type`` enum -> ``type``, embedded nets to the current format)."""
    solver = _parse_text(text, caffe_pb2.SolverParameter(), filename)
    _check_solver(solver, text, filename)
    if upgrade:
        solver = upgrade_solver(solver, filename)
    return solver


def _read_solver_text(path: str) -> str:
    data = read_bytes(path, ProtoError, "solver")
    pos = _binary_position(data)
    if pos is not None and (_CONTROL.search(data) is not None
                            or os.path.splitext(path)[1].lower() in _BINARY_SUFFIXES):
        raise ProtoError(f"{path}:{pos[0]}:{pos[1]}: binary data where a text SolverParameter "
                         f"was expected (a solver must be a text prototxt)")
    if pos is None and os.path.splitext(path)[1].lower() in _BINARY_SUFFIXES:
        raise ProtoError(f"{path}:1:1: a binary file name where a text SolverParameter was "
                         f"expected (a solver must be a text prototxt)")
    return _decode_text(data)


def read_solver_raw(path: str) -> caffe_pb2.SolverParameter:
    """Reads a text solver as written: checked, not upgraded, paths untouched."""
    text = _read_solver_text(path)
    solver = _parse_text(text, caffe_pb2.SolverParameter(), path)
    _check_solver(solver, text, path)
    return solver


def default_snapshot_prefix(solver: caffe_pb2.SolverParameter,
                            solver_path: str) -> caffe_pb2.SolverParameter:
    """Caffe's UpgradeSnapshotPrefixProperty: no ``snapshot_prefix`` -> the solver file's path
    without its extension; a prefix naming a directory -> that directory / the solver's stem."""
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(solver)
    stem = os.path.splitext(solver_path)[0]
    if not out.HasField("snapshot_prefix"):
        out.snapshot_prefix = stem
    elif os.path.isdir(out.snapshot_prefix):
        out.snapshot_prefix = os.path.join(out.snapshot_prefix, os.path.basename(stem))
    return out


def resolve_solver_paths(solver: caffe_pb2.SolverParameter, solver_path: str,
                         text: str | None = None) -> caffe_pb2.SolverParameter:
    """A copy of ``solver`` whose ``net`` / ``train_net`` / ``test_net`` entries point at files
    that exist (see :func:`resolve_path`); a missing one raises naming the solver and the net."""
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(solver)
    if text is None:
        try:
            text = _decode_text(read_bytes(solver_path, ProtoError, "solver"))
        except ProtoError:
            text = ""

    def resolve(field: str, value: str) -> str:
        found = resolve_path(value, solver_path)
        if os.path.isfile(found):
            return found
        line, col = _field_position(text, field)
        looked = [os.path.abspath(value)]
        if not os.path.isabs(value):
            looked.append(os.path.abspath(os.path.join(os.path.dirname(solver_path), value)))
        what = "is a directory" if os.path.isdir(found) else "not found"
        raise ProtoError(f"{solver_path}:{line}:{col}: {field} file '{value}' {what} (looked "
                         f"for {' and '.join(dict.fromkeys(looked))})")

    for field in ("net", "train_net"):
        if out.HasField(field):
            setattr(out, field, resolve(field, getattr(out, field)))
    for i, value in enumerate(out.test_net):
        out.test_net[i] = resolve("test_net", value)
    return out


def read_solver(path: str, resolve_paths: bool = True) -> caffe_pb2.SolverParameter:
    """Caffe's ReadSolverParamsFromTextFileOrDie: a text solver, upgraded, with Caffe's default
    ``snapshot_prefix``; by default its net paths are resolved (see :func:`resolve_path`)."""
    text = _read_solver_text(path)
    solver = _parse_text(text, caffe_pb2.SolverParameter(), path)
    _check_solver(solver, text, path)
    solver = upgrade_solver(solver, path)
    solver = default_snapshot_prefix(solver, path)
    if resolve_paths:
        solver = resolve_solver_paths(solver, path, text)
    return solver
