"""User-facing errors.

Every error a user can cause by bad input (a prototxt, a caffemodel, a dataset, a flag) is a
``JcaffeError`` whose message is one line naming the file / line / layer / record and the
problem. The CLI prints it without a traceback (``--debug`` shows one).
"""

from __future__ import annotations


class JcaffeError(Exception):
    """Base class of errors caused by the user's input."""


class ProtoError(JcaffeError):
    """A prototxt / binary proto could not be read (names file:line:col)."""


class NetError(JcaffeError):
    """A net could not be built (names the layer)."""


class LayerError(NetError):
    """A layer's parameters or bottoms are invalid."""

    def __init__(self, layer_name: str, layer_type: str, message: str):
        self.layer_name = layer_name
        self.layer_type = layer_type
        super().__init__(f"layer '{layer_name}' (type {layer_type}): {message}")


class ModelError(JcaffeError):
    """A .caffemodel / .solverstate / .binaryproto does not fit (names file, layer, blob)."""


class DataError(JcaffeError):
    """A dataset could not be read or written (names the path and record)."""


class SolverError(JcaffeError):
    """A solver definition or training run failed (names the field or iteration)."""


def read_bytes(path: str, error: type[JcaffeError], what: str = "") -> bytes:
    """The contents of ``path``; OS errors become one-line ``error``s naming the path (and
    the kind of file, ``what``, when given)."""
    kind = f"{what} file" if what else "file"
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{path}: {kind} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {kind}") from None
    except OSError as e:
        raise error(f"{path}: cannot read {kind}: {e.strerror or e}") from None


def reworded(error: JcaffeError, message: str) -> JcaffeError:
    """An error of the same kind as ``error`` (when its class takes one message) with a new
    message, e.g. the original one with more context."""
    cls = type(error)
    try:
        return cls(message)
    except TypeError:  # a class with a structured constructor (LayerError)
        return JcaffeError(message)
