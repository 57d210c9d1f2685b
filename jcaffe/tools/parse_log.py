"""parse_log: a Caffe training log -> ``LOG.train`` and ``LOG.test`` CSV tables, as Caffe's
``tools/extra/parse_log.py``.

    jcaffe parse_log [--delimiter=,] [--verbose] LOG OUTDIR

The columns are ``NumIters,Seconds,LearningRate`` and then one column per net output
(``Train net output #k: NAME = V`` / ``Test net output #k: NAME = V``), in the order the log
first prints them. It reads the logs jcaffe writes (``jcaffe.log``'s glog lines) and those real
Caffe writes, with Caffe's regular expressions and rules:

* a row is started by the first output line of an iteration (the last ``Iteration N`` seen)
  and is complete once it has as many columns as the first row of its run;
* ``LearningRate`` is the last ``lr = X`` seen (NaN before the first one); a run's first row
  takes its second row's rate, since Caffe prints the rate only after the first test and step;
* lines before the first ``Solving ...`` line and the set-up lines of a run (before its first
  ``Iteration N``) are skipped.

Every line is read through its glog prefix, in either form glog writes: ``I1125 17:40:41.796981
9508 solver.cpp:289] ...`` (glog < 0.6: month and day) or ``I20261125 17:40:41.796981 9508
solver.cpp:289] ...`` (glog >= 0.6, current distributions' Caffe: year, month and day). A
year-less stamp takes the year of the line before it, and the next year when its month is
smaller than that line's (Caffe's rule); the first one takes the year the log file was created.
``Seconds`` is the solver's running time: the time since the ``Solving`` line of the row's run,
plus the length of the earlier runs (each from its ``Solving`` line to its last line with an
``Iteration N``, a net output or a rate: the next run's set-up lines come before its
``Solving`` line and do not count), so a log
of a resumed run appended to its first run's log (``2>> run.log``), or several logs
concatenated, reads as one time line without the pauses between runs. Each ``Solving`` line
starts a run: the iteration and rate are forgotten, and a row is never continued across runs.

Unlike Caffe's script:

* a line without a glog prefix (a blank line, the continuation of a multi-line message, the
  output of another program writing to the same file) is skipped whatever it contains
  (Caffe's script reads ``Iteration N`` even there, and crashes on the glog >= 0.6 prefix,
  whose characters 1-2 it reads as the month);
* a run's only row is kept (Caffe drops it: it pushes a first row only when a second one
  starts); an incomplete last row of a run is dropped, as Caffe drops one at the end of the log;
* a table's columns are those of all its rows (a row without an output leaves its cell empty),
  where Caffe's writer fails on a column its first row lacks;
* what was skipped, and why, is said in one line (:meth:`ParsedLog.summary`, printed on stderr
  by the commands); a log without a ``Solving`` line is a one-line error.

Numbers are written as Caffe's script writes them (Python floats: ``100.0``, ``0.9815``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import re
import sys
from typing import Iterable, NamedTuple, Sequence

from jcaffe.errors import DataError, JcaffeError

# Caffe's tools/extra/parse_log.py expressions, verbatim.
REGEX_ITERATION = re.compile(r"Iteration (\d+)")
REGEX_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
REGEX_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")

# glog's line prefix: severity, [yyyy]mmdd, hh:mm:ss.uuuuuu, thread id, file:line]. The year is
# there from glog 0.6 on.
REGEX_GLOG_PREFIX = re.compile(
    r"[IWEF](\d{4})?(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) +\S+ +[^\s\]]+\](?: |$)")
GLOG_FORMS = "'I1125 17:40:41.796981 9508 solver.cpp:289] ' or 'I20261125 17:40:41.796981 ...'"

Row = dict  # insertion-ordered: NumIters, Seconds, LearningRate, outputs...


class GlogStamp(NamedTuple):
    """A glog prefix: ``year`` is None in the year-less (glog < 0.6) form; ``message`` is the
    text after ``file:line] ``."""
    year: int | None
    month: int
    day: int
    hour: int
    minute: int
    second: int
    microsecond: int
    message: str


def glog_stamp(line: str) -> GlogStamp | None:
    """The glog prefix of ``line`` (either form), or None for a line without one."""
    line = line.strip()
    m = REGEX_GLOG_PREFIX.match(line)
    if not m:
        return None
    year, *rest = m.groups()
    return GlogStamp(None if year is None else int(year), *(int(x) for x in rest),
                     line[m.end():])


def stamp_datetime(stamp: GlogStamp, year: int) -> datetime.datetime:
    """The stamp's time; ``year`` is used when the stamp has none. ``ValueError`` for an
    impossible date (month 13, February 30, ...)."""
    return datetime.datetime(stamp.year if stamp.year is not None else year, stamp.month,
                             stamp.day, stamp.hour, stamp.minute, stamp.second,
                             stamp.microsecond)


def extract_datetime_from_line(line: str, year: int) -> datetime.datetime:
    """The time of a glog line in either form (Caffe's extract_seconds.py function, which reads
    only the year-less form); ``year`` is used when the line has none. ``ValueError`` for a
    line that is not a glog line or has an impossible date."""
    stamp = glog_stamp(line)
    if stamp is None:
        raise ValueError("not a glog line")
    return stamp_datetime(stamp, year)


class _Table:
    """One table (train or test) being filled, with Caffe's row rules applied per run."""

    def __init__(self, regex: re.Pattern, name: str):
        self.regex, self.name = regex, name
        self.rows: list[Row] = []
        self.row: Row | None = None
        self.run_start = 0          # index in rows of the current run's first row
        self.first_len: int | None = None  # columns of the run's first pushed row
        self.dropped: list[float] = []

    def _push(self, row: Row) -> None:
        self.rows.append(row)
        if self.first_len is None:
            self.first_len = len(row)

    def feed(self, line: str, iteration: float, seconds: float, learning_rate: float) -> None:
        match = self.regex.search(line)
        if match:
            if self.row is None or self.row["NumIters"] != iteration:
                if self.row is not None:
                    self._push(self.row)
                self.row = {"NumIters": iteration, "Seconds": seconds,
                            "LearningRate": learning_rate}
            self.row[match.group(2)] = float(match.group(3))
        if self.row is not None and self.first_len is not None and \
                len(self.row) == self.first_len:
            self._push(self.row)
            self.row = None

    def end_run(self) -> None:
        if self.row is not None:
            if self.first_len is None:
                self._push(self.row)   # the run's only row (Caffe's script drops it)
            else:
                self.dropped.append(self.row["NumIters"])
        self.row = None
        # Caffe's fix_initial_nan_learning_rate, for each run
        if len(self.rows) - self.run_start > 1:
            self.rows[self.run_start]["LearningRate"] = \
                self.rows[self.run_start + 1]["LearningRate"]
        self.run_start, self.first_len = len(self.rows), None


class ParsedLog(NamedTuple):
    """What :func:`read_log` found: the two tables, the number of runs (``Solving`` lines),
    the lines skipped by reason (``{reason: (count, first line number)}``) and the incomplete
    rows dropped (``{"train"|"test": [iteration, ...]}``)."""
    train: list[Row]
    test: list[Row]
    runs: int
    lines: int
    skipped: dict
    dropped: dict

    def summary(self) -> str:
        """One line saying what was skipped and why ("" when nothing was)."""
        parts = []
        for reason, (count, first) in self.skipped.items():
            where = f" (first: line {first})" if reason in (_NO_PREFIX, _BAD_DATE) else ""
            parts.append(f"{count} {reason}{where}")
        total = sum(c for c, _ in self.skipped.values())
        text = f"skipped {total} of {self.lines} lines: " + ", ".join(parts) if total else ""
        for table, iters in self.dropped.items():
            if iters:
                its = ", ".join(f"{i:g}" for i in iters)
                text += ("; " if text else "") + \
                    f"dropped {len(iters)} incomplete {table} row{'s' * (len(iters) > 1)} " \
                    f"at the end of a run (iteration {its})"
        if text and self.runs > 1:
            text = f"{self.runs} runs ('Solving' lines); " + text
        return text


# reasons, in the order the summary names them
_BEFORE_SOLVING = "before the first 'Solving' line"
_SET_UP = "of set-up (before a run's first 'Iteration N')"
_NO_PREFIX = ("without a glog prefix (blank, a message's continuation or another program's "
              "output)")
_BAD_DATE = "with an impossible glog date"


def read_log_lines(lines: Iterable[str], year: int, path: str = "<log>") -> ParsedLog:
    """:func:`read_log` on the lines of a log; ``year`` is the year of its first year-less glog
    stamp."""
    lines = list(lines)
    skipped = {r: [0, 0] for r in (_BEFORE_SOLVING, _SET_UP, _NO_PREFIX, _BAD_DATE)}

    def skip(reason: str, lineno: int) -> None:
        s = skipped[reason]
        s[0] += 1
        s[1] = s[1] or lineno

    train = _Table(REGEX_TRAIN_OUTPUT, "train")
    test = _Table(REGEX_TEST_OUTPUT, "test")
    runs = 0
    start = last = None       # the run's Solving time, the last line's time
    progress = None           # the time of the run's last Iteration / output / rate line
    offset = 0.0              # the length of the earlier runs, in seconds
    iteration, learning_rate = -1.0, float("nan")
    unstamped_solving = 0
    for lineno, line in enumerate(lines, 1):
        stamp = glog_stamp(line)
        if stamp is None:
            skip(_NO_PREFIX, lineno)
            if "Solving" in line and not unstamped_solving:
                unstamped_solving = lineno
            continue
        if stamp.year is not None:
            year = stamp.year
        elif last is not None:
            year = last.year + 1 if stamp.month < last.month else last.year
        try:
            time = stamp_datetime(stamp, year)
        except ValueError:
            skip(_BAD_DATE, lineno)
            continue
        if stamp.message.startswith("Solving"):
            if runs:
                train.end_run()
                test.end_run()
                offset += (progress - start).total_seconds()
            runs += 1
            start = progress = time
            iteration, learning_rate = -1.0, float("nan")
        last = time
        if not runs:
            skip(_BEFORE_SOLVING, lineno)
            continue
        match = REGEX_ITERATION.search(line)
        if match:
            iteration = float(match.group(1))
        if iteration == -1:
            skip(_SET_UP, lineno)
            continue
        seconds = offset + (time - start).total_seconds()
        match = REGEX_LEARNING_RATE.search(line)
        if match:
            learning_rate = float(match.group(1))
        if match or REGEX_ITERATION.search(line) or "net output #" in line:
            progress = time
        train.feed(line, iteration, seconds, learning_rate)
        test.feed(line, iteration, seconds, learning_rate)
    if not runs:
        hint = (f"; line {unstamped_solving} has 'Solving' but no glog prefix ({GLOG_FORMS})"
                if unstamped_solving else "")
        raise DataError(f"{path}: no 'Solving ...' line: not a Caffe/jcaffe training log (the "
                        f"Seconds column counts from that line){hint}")
    train.end_run()
    test.end_run()
    return ParsedLog(train.rows, test.rows, runs, len(lines),
                     {r: tuple(v) for r, v in skipped.items() if v[0]},
                     {"train": train.dropped, "test": test.dropped})


def parse_log_lines(lines: Iterable[str], year: int, path: str = "<log>"
                    ) -> tuple[list[Row], list[Row]]:
    """``(train_rows, test_rows)`` of :func:`read_log_lines`."""
    parsed = read_log_lines(lines, year, path)
    return parsed.train, parsed.test


def read_log(path: str | os.PathLike) -> ParsedLog:
    """The tables of a training log (:class:`ParsedLog`); year-less glog stamps start in the
    year the file was created (Caffe's rule)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    except OSError as e:
        raise DataError(f"{path}: cannot read the log: {e.strerror or e}") from None
    return read_log_lines(lines, year, path)


def parse_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """``(train_rows, test_rows)``: the tables of a training log, each row a dict
    ``{"NumIters", "Seconds", "LearningRate", <output name>: value, ...}``."""
    parsed = read_log(path)
    return parsed.train, parsed.test


def report_skipped(command: str, path: str | os.PathLike, parsed: ParsedLog) -> None:
    """Prints :meth:`ParsedLog.summary` as one line on stderr (nothing when nothing was
    skipped)."""
    text = parsed.summary()
    if text:
        print(f"{command}: {os.fspath(path)}: {text}", file=sys.stderr)


def csv_text(rows: Sequence[Row], delimiter: str = ",") -> str:
    """The CSV table Caffe's script writes for ``rows``: the header is every column in the
    order the rows first have it (Caffe's: the first row's), a missing value an empty cell."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, delimiter=delimiter, lineterminator="\r\n")
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
    parsed = read_log(args.logfile_path)
    report_skipped("parse_log", args.logfile_path, parsed)
    save_csv_files(args.logfile_path, args.output_dir, parsed.train, parsed.test, args.delimiter,
                   args.verbose)
    return 0
