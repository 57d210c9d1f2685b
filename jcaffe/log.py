"""glog-style logging on stderr, so Caffe's log tools (parse_log.py, extract_seconds.py) read it.

A line looks like Caffe's: ``I1125 13:39:22.381027 25210 solver.py:204] Iteration 100, loss = 0.3``
(severity letter, month+day, wall time with microseconds, thread id, file:line, message).
"""

from __future__ import annotations

import datetime
import logging
import sys
import threading

LOGGER_NAME = "jcaffe"
_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
                 logging.ERROR: "E", logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        tid = threading.get_native_id() if record.thread == threading.get_ident() else record.thread
        head = f"{letter}{t:%m%d %H:%M:%S}.{t.microsecond:06d} {tid % 100000:5d} " \
               f"{record.filename}:{record.lineno}] "
        return head + record.getMessage()


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    logger = logging.getLogger(name if name.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{name}")
    return logger


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of each write (a caller or a test may
    swap it), not the stream that was current when logging was set up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup(level: int = logging.INFO, stream=None) -> None:
    """Installs the glog handler on the ``jcaffe`` logger (idempotent); it writes to
    ``stream``, by default to the ``sys.stderr`` of the moment of each line."""
    root = logging.getLogger(LOGGER_NAME)
    for h in list(root.handlers):
        if getattr(h, "_jcaffe", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else _CurrentStderr())
    handler.setFormatter(GlogFormatter())
    handler._jcaffe = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
