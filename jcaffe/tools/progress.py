"""Progress bars a person can watch: tqdm on stderr, only when stderr is a terminal.

A log written to a file (``2> train.log``) gets no bar, so Caffe's log tools read it unchanged;
on a terminal the bar is redrawn in place and removed when done (``leave=False``).
"""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total: int | None = None, desc: str = "", unit: str = "it", stream=None):
    """A tqdm bar on ``stream`` (default: the current ``sys.stderr``) when it is a terminal,
    else an object with the same ``update`` / ``close`` / context-manager surface that draws
    nothing."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still runs, without a bar
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
