"""parse_log: a Caffe training log -> ``LOG.train`` and ``LOG.test`` CSV tables, as Caffe's
``tools/extra/parse_log.py``.

    jcaffe parse_log [--delimiter=,] [--verbose] LOG OUTDIR

The columns are ``NumIters,Seconds,LearningRate`` and then one column per net output
(``Train net output #k: NAME = V`` / ``Test net output #k: NAME = V``), in the order the log
first prints them. It reads the logs jcaffe writes (``jcaffe.log``'s glog lines) and those real
Caffe writes, with Caffe's regular expressions and rules:

* a row is started by the first output line of an iteration (the last ``Iteration N`` seen)
  and is complete once it has as many columns as the first row;
* ``Seconds`` is the line's time minus the time of the ``Solving ...`` line; the year is the
  log file's creation year, and a month smaller than the previous line's starts the next year;
* ``LearningRate`` is the last ``lr = X`` seen (NaN before the first one); the first row takes
  the second row's rate, since Caffe prints the rate only after the first test and step;
* lines before the first ``Iteration N``, and lines without a glog time stamp (e.g. the
  continuation lines of a multi-line message), are skipped.

Numbers are written as Caffe's script writes them (Python floats: ``100.0``, ``0.9815``).
Unlike Caffe's script, a table's only row is kept (Caffe drops it: it pushes a first row only
when a second one starts), blank lines are skipped (they stop Caffe's script) and a log without
a ``Solving`` line is a one-line error instead of a traceback.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import re
from typing import Iterable, Sequence

from jcaffe.errors import DataError, JcaffeError

# Caffe's tools/extra/parse_log.py expressions, verbatim.
REGEX_ITERATION = re.compile(r"Iteration (\d+)")
REGEX_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")

Row = dict  # insertion-ordered: NumIters, Seconds, LearningRate, outputs...


def extract_datetime_from_line(line: str, year: int) -> datetime.datetime:
    """The time stamp of a glog line ``I0210 13:39:22.381027 ...`` (Caffe's
    extract_seconds.py rule); ``ValueError`` for a line that is not one."""
    fields = line.strip().split()
    if len(fields) < 2:
        raise ValueError("not a glog line")
    head, timestamp = fields[0], fields[1]
    month, day = int(head[1:3]), int(head[3:])
    pos = timestamp.rfind(".")
    hour, minute, second = (int(x) for x in timestamp[:pos].split(":"))
    return datetime.datetime(year, month, day, hour, minute, second, int(timestamp[pos + 1:]))


def _start_time(lines: Sequence[str], year: int, path: str) -> datetime.datetime:
    for lineno, line in enumerate(lines, 1):
        if "Solving" in line:
            try:
                return extract_datetime_from_line(line, year)
            except ValueError:
                raise DataError(f"{path}:{lineno}: the 'Solving' line has no glog time stamp: "
                                f"{line.strip()!r}") from None
    raise DataError(f"{path}: no 'Solving ...' line: not a Caffe/jcaffe training log "
                    f"(the Seconds column counts from that line)")


def _net_output(regex: re.Pattern, row: Row | None, rows: list[Row], line: str,
                iteration: float, seconds: float, learning_rate: float) -> Row | None:
    match = regex.search(line)
    if match:
        if not row or row["NumIters"] != iteration:
            if row:
                rows.append(row)
            row = {"NumIters": iteration, "Seconds": seconds, "LearningRate": learning_rate}
        row[match.group(2)] = float(match.group(3))
    if row and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return row


def parse_log_lines(lines: Iterable[str], year: int, path: str = "<log>"
                    ) -> tuple[list[Row], list[Row]]:
    """:func:`parse_log` on the lines of a log whose first line dates from ``year``."""
    lines = list(lines)
    start = _start_time(lines, year, path)
    last = start
    iteration = -1.0
    learning_rate = float("nan")
    train: list[Row] = []
    test: list[Row] = []
    train_row = test_row = None
    for line in lines:
        match = REGEX_ITERATION.search(line)
        if match:
            iteration = float(match.group(1))
        if iteration == -1:
            continue
        try:
            time = extract_datetime_from_line(line, year)
        except ValueError:
            continue
        if time.month < last.month:
            year += 1
            time = extract_datetime_from_line(line, year)
        last = time
        seconds = (time - start).total_seconds()
        match = REGEX_LEARNING_RATE.search(line)
        if match:
            learning_rate = float(match.group(1))
        train_row = _net_output(REGEX_TRAIN_OUTPUT, train_row, train, line, iteration, seconds,
                                learning_rate)
        test_row = _net_output(REGEX_TEST_OUTPUT, test_row, test, line, iteration, seconds,
                               learning_rate)
    # Caffe's script keeps a table's first row pending until a second row starts, so a log with
    # one test (or one display) would give an empty table: that lone row is kept here.
    for rows, row in ((train, train_row), (test, test_row)):
        if row and not rows:
            rows.append(row)
    for rows in (train, test):
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train, test


def parse_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """``(train_rows, test_rows)``: the tables of a training log, each row a dict
    ``{"NumIters", "Seconds", "LearningRate", <output name>: value, ...}``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    except OSError as e:
        raise DataError(f"{path}: cannot read the log: {e.strerror or e}") from None
    return parse_log_lines(lines, year, path)


def csv_text(rows: Sequence[Row], delimiter: str = ",") -> str:
    """The CSV table Caffe's script writes for ``rows`` (header from the first row)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0].keys()), delimiter=delimiter,
                            lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def save_csv_files(log_path: str | os.PathLike, output_dir: str | os.PathLike,
                   train: Sequence[Row], test: Sequence[Row], delimiter: str = ",",
                   verbose: bool = False) -> list[str]:
    """Writes ``OUTDIR/<basename of LOG>.train`` and ``.test`` (a table without rows is not
    written, as Caffe); returns the paths written."""
    base = os.path.basename(os.fspath(log_path))
    written = []
    for suffix, rows in ((".train", train), (".test", test)):
        target = os.path.join(os.fspath(output_dir), base + suffix)
        if not rows:
            if verbose:
                print(f"Not writing {target}; no lines to write")
            continue
        try:
            # newline="" keeps csv's \r\n line ends (Caffe's csv.excel dialect) as they are.
            with open(target + ".tmp", "w", newline="", encoding="utf-8") as f:
                f.write(csv_text(rows, delimiter))
            os.replace(target + ".tmp", target)
        except OSError as e:
            raise DataError(f"{target}: cannot write: {e.strerror or e}") from None
        written.append(target)
        if verbose:
            print(f"Wrote {target}")
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jcaffe parse_log",
        description="Parse a Caffe training log into two CSV files containing training and "
                    "testing information (LOG.train, LOG.test in OUTDIR).")
    p.add_argument("logfile_path", metavar="LOG", help="path to the log file")
    p.add_argument("output_dir", metavar="OUTDIR", help="directory in which to place the CSV files")
    p.add_argument("--verbose", action="store_true", help="print the output file names")
    p.add_argument("--delimiter", default=",", help="column delimiter (default: ',')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from jcaffe.cli import parse_flags

    args = parse_flags(list(argv or []), _parser())
    if len(args.delimiter) != 1:
        raise JcaffeError(f"--delimiter must be one character, got {args.delimiter!r}")
    if not os.path.isdir(args.output_dir):
        raise DataError(f"{args.output_dir}: output directory does not exist")
    train, test = parse_log(args.logfile_path)
    save_csv_files(args.logfile_path, args.output_dir, train, test, args.delimiter, args.verbose)
    return 0
