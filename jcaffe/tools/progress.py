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


def progress(total: int | None = None, desc: str = "", unit: str = "it", stream=None,
             **options):
    """A tqdm bar on ``stream`` (default: the current ``sys.stderr``) when it is a terminal,
    else an object with the same ``update`` / ``close`` / context-manager surface that draws
    nothing. ``options`` go to tqdm (e.g. ``mininterval``)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still runs, without a bar
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=stream,
                **{"leave": False, "dynamic_ncols": True, **options})


def progress_iter(iterable, total: int, desc: str = "", unit: str = "it", size=None,
                  stream=None, **options):
    """Yields ``iterable``'s items, advancing a :func:`progress` bar by ``size(item)`` (default
    1) after each; the bar closes when the iteration ends or stops."""
    bar = progress(total=total, desc=desc, unit=unit, stream=stream, **options)
    try:
        for item in iterable:
            yield item
            bar.update(1 if size is None else int(size(item)))
    finally:
        bar.close()


def batch_size(item) -> int:
    """The record count of an ``(images, labels)`` pair (for ``progress_iter``'s ``size``)."""
    return len(item[0])


def chunks(images, labels, size: int = 4096):
    """``(images[i:i+size], labels[i:i+size])`` pairs: whole arrays written batch by batch, so a
    progress bar can follow them."""
    for i in range(0, len(images), size):
        yield images[i:i + size], labels[i:i + size]
