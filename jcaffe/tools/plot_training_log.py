"""plot_training_log: curves of one or more training logs on one chart, as Caffe's
``tools/extra/plot_training_log.py.example``.

    jcaffe plot_training_log CHART_TYPE OUT.png LOG [LOG ...]

Chart types (Caffe's numbering)::

    0: Test accuracy  vs. Iters        4: Train learning rate  vs. Iters
    1: Test accuracy  vs. Seconds      5: Train learning rate  vs. Seconds
    2: Test loss  vs. Iters            6: Train loss  vs. Iters
    3: Test loss  vs. Seconds          7: Train loss  vs. Seconds

Each log is read with :mod:`jcaffe.tools.parse_log` (Caffe's parse_log.py rules, both glog
prefixes, several runs in one log; what a log's reading skipped is said in one line); a log's
line is labelled with its file name less a ``.log`` suffix. "accuracy" is the test output named
``accuracy`` (else the first whose name contains ``acc``), "loss" the output named ``loss``
(else the first whose name contains ``loss``). The axes are labelled as Caffe's (``Iters`` /
``Seconds`` and the field), the title is the chart type, and the legend sits where Caffe puts it
(lower right for accuracy, upper right for loss and learning rate).

Unlike Caffe's example script, colours and markers are a fixed cycle instead of random ones,
logs need not end in ``.log``, and OUT may be any format matplotlib writes (.png, .svg, .pdf).
matplotlib comes with ``pip install 'jcaffe[tools]'``.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from jcaffe.errors import DataError, JcaffeError
from jcaffe.tools.parse_log import Row, read_log, report_skipped

SEPARATOR = "  vs. "
X_FIELDS = ("Iters", "Seconds")
_FIELDS = {"Train": ("Iters", "Seconds", "Train loss", "Train learning rate"),
           "Test": ("Iters", "Seconds", "Test accuracy", "Test loss")}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def supported_chart_types() -> list[str]:
    """Caffe's list: every (y field, x field) pair, y fields in sorted order."""
    fields = sorted({f for fs in _FIELDS.values() for f in fs})
    return [f"{y}{SEPARATOR}{x}" for y in fields if y not in X_FIELDS
            for x in fields if x in X_FIELDS]


def chart_fields(chart_type: int) -> tuple[str, str, str]:
    """``(table, x field, y field)`` of a chart type, e.g. ``("Test", "Iters", "Test accuracy")``."""
    types = supported_chart_types()
    if not 0 <= chart_type < len(types):
        raise JcaffeError(f"{chart_type} is not a valid chart type: 0-{len(types) - 1} "
                          f"({'; '.join(f'{i}: {t}' for i, t in enumerate(types))})")
    y, x = types[chart_type].split(SEPARATOR)
    return y.split()[0], x, y


def _output_column(rows: Sequence[Row], what: str, path: str, table: str) -> str:
    names = [k for k in rows[0] if k not in ("NumIters", "Seconds", "LearningRate")]
    if what in names:
        return what
    key = "acc" if what == "accuracy" else what
    for n in names:
        if key in n.lower():
            return n
    raise DataError(f"{path}: the {table.lower()} net has no {what} output "
                    f"(outputs: {', '.join(names) or 'none'})")


def chart_data(chart_type: int, log_path: str | os.PathLike, report: bool = False
               ) -> tuple[list[float], list[float]]:
    """The (x, y) points a chart type plots for one log; with ``report``, what the log's
    reading skipped is said on stderr (one line)."""
    table, x_field, y_field = chart_fields(chart_type)
    path = os.fspath(log_path)
    parsed = read_log(path)
    if report:
        report_skipped("plot_training_log", path, parsed)
    train, test = parsed.train, parsed.test
    rows = train if table == "Train" else test
    if not rows:
        raise DataError(f"{path}: no {table.lower()} net output lines "
                        f"('{table} net output #k: NAME = VALUE') to plot")
    x_key = "NumIters" if x_field == "Iters" else "Seconds"
    if y_field.endswith("learning rate"):
        y_key = "LearningRate"
    else:
        y_key = _output_column(rows, y_field.split()[1], path, table)
    # a row cut short (e.g. a run stopped during a test) has no value to plot
    rows = [r for r in rows if y_key in r]
    return [r[x_key] for r in rows], [r[y_key] for r in rows]


def data_label(log_path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(log_path))
    return name[:-len(".log")] if name.endswith(".log") else name


def plot_chart(chart_type: int, out_path: str | os.PathLike | None,
               log_paths: Sequence[str | os.PathLike], report: bool = False):
    """Draws the chart of ``log_paths`` and saves it to ``out_path`` (when given); returns the
    matplotlib Figure. ``report``: say on stderr what each log's reading skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise JcaffeError("plot_training_log needs matplotlib: pip install 'jcaffe[tools]'") \
            from None
    if not log_paths:
        raise JcaffeError("plot_training_log needs at least one log")
    _, x_field, y_field = chart_fields(chart_type)
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, path in enumerate(log_paths):
        x, y = chart_data(chart_type, path, report)
        ax.plot(x, y, label=data_label(path), linewidth=0.75, marker=_MARKERS[i % len(_MARKERS)],
                markersize=4, markevery=max(1, len(x) // 25))
    loc = "upper right" if ("loss" in y_field or "learning rate" in y_field) else "lower right"
    ax.legend(loc=loc, ncol=1)
    ax.set_title(supported_chart_types()[chart_type])
    ax.set_xlabel(x_field)
    ax.set_ylabel(y_field)
    ax.grid(True, alpha=0.3)
    if out_path is not None:
        out_path = os.fspath(out_path)
        root, ext = os.path.splitext(out_path)
        tmp = f"{root}.tmp{ext}"
        try:
            fig.savefig(tmp, bbox_inches="tight")
            os.replace(tmp, out_path)
        except (OSError, ValueError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise JcaffeError(f"{out_path}: cannot write the chart: {e}") from None
    return fig


def _usage() -> str:
    types = supported_chart_types()
    return "chart types:\n" + "\n".join(f"    {i}: {t}" for i, t in enumerate(types))


def main(argv: Sequence[str] | None = None) -> int:
    from jcaffe.cli import parse_flags

    p = argparse.ArgumentParser(
        prog="jcaffe plot_training_log",
        description="Plot one or more training logs on one chart.", epilog=_usage(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chart_type", metavar="CHART_TYPE", type=int, help="0-7, see below")
    p.add_argument("output", metavar="OUT.png", help="the chart image (.png, .svg, .pdf)")
    p.add_argument("logs", metavar="LOG", nargs="+", help="training logs")
    args = parse_flags(list(argv or []), p)
    for path in args.logs:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such log file")
    plot_chart(args.chart_type, args.output, args.logs, report=True)
    return 0
