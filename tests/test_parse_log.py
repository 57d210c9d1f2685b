"""parse_log: Caffe's tools/extra/parse_log.py tables from Caffe's and jcaffe's logs."""

import csv
import datetime
import math
import re
import numpy as np
import pytest

from tests import tool_utils

from jcaffe import cli
from jcaffe.errors import DataError
from jcaffe.tools.parse_log import (extract_datetime_from_line, parse_log, parse_log_lines,
                                    read_log_lines)

# A log in real Caffe's format (solver.cpp / sgd_solver.cpp lines, newer "iter/s" form and
# the older form), crossing a year boundary, with a multi-line message and a blank line.
CAFFE_LOG = """\
I1231 23:59:00.000000 28410 caffe.cpp:218] Using GPUs 0
I1231 23:59:00.100000 28410 solver.cpp:44] Initializing solver from parameters:
test_iter: 100
test_interval: 200
base_lr: 0.01
I1231 23:59:10.500000 28410 solver.cpp:289] Solving LeNet
I1231 23:59:10.500010 28410 solver.cpp:290] Learning Rate Policy: inv
I1231 23:59:10.600000 28410 solver.cpp:347] Iteration 0, Testing net (#0)
I1231 23:59:11.750000 28410 solver.cpp:414]     Test net output #0: accuracy = 0.0779
I1231 23:59:11.750100 28410 solver.cpp:414]     Test net output #1: loss = 2.41246 (* 1 = 2.41246 loss)
I1231 23:59:11.800000 28410 solver.cpp:237] Iteration 0, loss = 2.39463
I1231 23:59:11.800100 28410 solver.cpp:253]     Train net output #0: loss = 2.39463 (* 1 = 2.39463 loss)
I1231 23:59:11.800200 28410 sgd_solver.cpp:106] Iteration 0, lr = 0.01

I1231 23:59:59.250000 28410 solver.cpp:218] Iteration 100 (52.7 iter/s, 1.897s/100 iters), loss = 0.206419
I1231 23:59:59.250100 28410 solver.cpp:237]     Train net output #0: loss = 0.206419 (* 1 = 0.206419 loss)
I1231 23:59:59.250200 28410 sgd_solver.cpp:105] Iteration 100, lr = 0.00992565
I0101 00:00:02.000000 28410 solver.cpp:347] Iteration 200, Testing net (#0)
I0101 00:00:03.125000 28410 solver.cpp:414]     Test net output #0: accuracy = 0.9712
I0101 00:00:03.125100 28410 solver.cpp:414]     Test net output #1: loss = 8.8e-02 (* 1 = 0.088 loss)
I0101 00:00:03.200000 28410 solver.cpp:218] Iteration 200 (51.2 iter/s, 1.953s/100 iters), loss = 0.1212
I0101 00:00:03.200100 28410 solver.cpp:237]     Train net output #0: loss = 0.1212 (* 1 = 0.1212 loss)
I0101 00:00:03.200200 28410 sgd_solver.cpp:105] Iteration 200, lr = 0.00985258
I0101 00:00:05.000000 28410 solver.cpp:464] Snapshotting to binary proto file lenet_iter_200.caffemodel
I0101 00:00:05.100000 28410 solver.cpp:326] Optimization Done.
"""

# Seconds from "Solving" (Dec 31 23:59:10.5), by hand.
EXPECTED_TRAIN = [
    # NumIters, Seconds, LearningRate (row 0 takes row 1's rate), loss
    # the rate is the last "lr = " printed before the output line (Caffe prints it after)
    ("0.0", "1.3001", "0.01", "2.39463"),
    ("100.0", "48.7501", "0.01", "0.206419"),
    ("200.0", "52.7001", "0.00992565", "0.1212"),
]
EXPECTED_TEST = [
    ("0.0", "1.25", "0.00992565", "0.0779", "2.41246"),
    ("200.0", "52.625", "0.00992565", "0.9712", "0.088"),
]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_caffe_log_csv(tmp_path):
    log = tmp_path / "caffe.INFO"
    log.write_text(CAFFE_LOG)
    assert cli.main(["parse_log", str(log), str(tmp_path)]) == 0
    train = read_csv(tmp_path / "caffe.INFO.train")
    test = read_csv(tmp_path / "caffe.INFO.test")
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert test[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    for got, want in ((train[1:], EXPECTED_TRAIN), (test[1:], EXPECTED_TEST)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g[0] == w[0]  # Caffe writes the iteration as a float
            assert [float(x) for x in g] == pytest.approx([float(x) for x in w], abs=1e-9)
    # Caffe's csv.excel dialect ends rows with \r\n.
    assert (tmp_path / "caffe.INFO.train").read_bytes().startswith(
        b"NumIters,Seconds,LearningRate,loss\r\n")


def test_delimiter_and_missing_table(tmp_path):
    log = tmp_path / "only_train.log"
    log.write_text("".join(l + "\n" for l in CAFFE_LOG.splitlines() if "Test net" not in l))
    assert cli.main(["parse_log", "--delimiter= ", str(log), str(tmp_path)]) == 0
    assert (tmp_path / "only_train.log.train").read_text().splitlines()[0] == \
        "NumIters Seconds LearningRate loss"
    assert not (tmp_path / "only_train.log.test").exists()  # Caffe writes no empty table


def test_not_a_training_log(tmp_path, capsys):
    log = tmp_path / "x.log"
    log.write_text("I0101 00:00:00.000000 1 a.cpp:1] Iteration 3, loss = 1\n")
    with pytest.raises(DataError, match="Solving"):
        parse_log(log)
    assert cli.main(["parse_log", str(log), str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.log" in err[0]
    assert cli.main(["parse_log", str(tmp_path / "none.log"), str(tmp_path)]) == 1


def test_iteration_before_first_output_is_used(tmp_path):
    # A resumed run: the LR is known before the first output, and rows need not start at 0.
    lines = CAFFE_LOG.splitlines()
    start = lines.index(next(l for l in lines if "Iteration 100 (" in l))
    text = "\n".join(lines[:5] + [lines[5]] + lines[start:]) + "\n"
    train, test = parse_log_lines(text.splitlines(True), 2026)
    assert [r["NumIters"] for r in train] == [100.0, 200.0]
    assert train[0]["LearningRate"] == train[1]["LearningRate"] == 0.00992565
    assert [r["NumIters"] for r in test] == [200.0]
    assert math.isclose(test[0]["Seconds"], 52.625)


# ------------------------------------------------------------------------------------------
# A real jcaffe training log
# ------------------------------------------------------------------------------------------

def _glog_time(line, year):
    m = re.match(r"[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ", line)
    return datetime.datetime(year, *(int(g) for g in m.groups()))


@pytest.fixture(scope="module")
def jcaffe_training_log(tmp_path_factory):
    return tool_utils.training_log(tmp_path_factory.mktemp("trainlog"))


def test_jcaffe_training_log(jcaffe_training_log, tmp_path):
    log_path, text = jcaffe_training_log
    assert cli.main(["parse_log", str(log_path), str(tmp_path)]) == 0
    train = read_csv(tmp_path / (log_path.name + ".train"))
    test = read_csv(tmp_path / (log_path.name + ".test"))
    lines = text.splitlines()
    year = datetime.date.today().year
    start = _glog_time(next(l for l in lines if "Solving" in l), year)

    # Reference: the log read line by line with plain string splitting.
    want_train, want_test = [], []
    lr, it = math.nan, None
    for i, l in enumerate(lines):
        if "Iteration " in l:
            it = int(re.split(r"[ ,]", l.split("Iteration ")[1])[0])
        if "Train net output #0: loss = " in l:
            want_train.append([it, (_glog_time(l, year) - start).total_seconds(), lr,
                               float(l.split("loss = ")[1].split()[0])])
        if "Test net output #0: accuracy = " in l:
            loss = lines[i + 1]
            assert "Test net output #1: loss = " in loss
            want_test.append([it, (_glog_time(l, year) - start).total_seconds(), lr,
                              float(l.split("accuracy = ")[1]),
                              float(loss.split("loss = ")[1].split()[0])])
        if ", lr = " in l:
            lr = float(l.split("lr = ")[1])
    for rows in (want_train, want_test):
        rows[0][2] = rows[1][2]
    assert [r[0] for r in want_train] == [0, 5, 10, 15]
    assert [r[0] for r in want_test] == [0, 10, 20]
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert test[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    np.testing.assert_allclose([[float(x) for x in r] for r in train[1:]], want_train, rtol=1e-12)
    np.testing.assert_allclose([[float(x) for x in r] for r in test[1:]], want_test, rtol=1e-12)
    # The rate printed at iteration N is the solver's "inv" policy, by hand
    # base_lr * (1 + gamma * N) ** -power; a row carries the last one printed before it: base_lr * (1 + gamma * iter) ** -power.
    assert float(train[2][2]) == pytest.approx(0.05 * (1 + 0.001 * 0) ** -0.75, rel=1e-5)
    assert float(train[4][2]) == pytest.approx(0.05 * (1 + 0.001 * 10) ** -0.75, rel=1e-5)


# ------------------------------------------------------------------------------------------
# Both glog prefixes, day and year changes, several runs, other programs' lines
# ------------------------------------------------------------------------------------------

# glog >= 0.6 (what current distributions' Caffe links): the year in every prefix. The run
# crosses midnight (Nov 25 -> Nov 26).
GLOG06_LOG = """\
I20261125 17:40:30.100000  9508 caffe.cpp:204] Using GPUs 0
I20261125 17:40:30.200000  9508 solver.cpp:45] Initializing solver from parameters:
test_iter: 100
I20261125 17:40:41.796981  9508 solver.cpp:289] Solving LeNet
I20261125 17:40:41.796990  9508 solver.cpp:290] Learning Rate Policy: inv
I20261125 17:40:41.800000  9508 solver.cpp:347] Iteration 0, Testing net (#0)
I20261125 17:40:42.296981  9508 solver.cpp:414]     Test net output #0: accuracy = 0.1135
I20261125 17:40:42.296990  9508 solver.cpp:414]     Test net output #1: loss = 2.30259 (* 1 = 2.30259 loss)
I20261125 17:40:42.400000  9508 solver.cpp:239] Iteration 0 (0 iter/s, 0.6s/100 iters), loss = 2.31
I20261125 17:40:42.400010  9508 solver.cpp:258]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I20261125 17:40:42.400020  9508 sgd_solver.cpp:112] Iteration 0, lr = 0.01
I20261125 23:59:59.900000  9508 solver.cpp:239] Iteration 100 (0.0044 iter/s, 22637.5s/100 iters), loss = 0.25
I20261125 23:59:59.900010  9508 solver.cpp:258]     Train net output #0: loss = 0.25 (* 1 = 0.25 loss)
I20261125 23:59:59.900020  9508 sgd_solver.cpp:112] Iteration 100, lr = 0.00992565
I20261126 00:00:01.400000  9508 solver.cpp:347] Iteration 200, Testing net (#0)
I20261126 00:00:02.100000  9508 solver.cpp:414]     Test net output #0: accuracy = 0.9701
I20261126 00:00:02.100010  9508 solver.cpp:414]     Test net output #1: loss = 0.0912 (* 1 = 0.0912 loss)
I20261126 00:00:02.200000  9508 solver.cpp:239] Iteration 200 (66.7 iter/s, 1.5s/100 iters), loss = 0.12
I20261126 00:00:02.200010  9508 solver.cpp:258]     Train net output #0: loss = 0.12 (* 1 = 0.12 loss)
I20261126 00:00:02.200020  9508 sgd_solver.cpp:112] Iteration 200, lr = 0.00985258
I20261126 00:00:02.300000  9508 solver.cpp:464] Snapshotting to binary proto file lenet_iter_200.caffemodel
I20261126 00:00:02.400000  9508 solver.cpp:327] Optimization Done.
"""
# By hand, from "Solving" at 17:40:41.796981 (6 h 19 min 18.203019 s before midnight).
GLOG06_TRAIN = [
    ("0.0", "0.603029", "0.01", "2.31"),
    ("100.0", "22758.103029", "0.01", "0.25"),                  # 23:59:59.900010
    ("200.0", "22760.403029", "0.00992565", "0.12"),            # next day 00:00:02.200010
]
GLOG06_TEST = [
    ("0.0", "0.5", "0.00992565", "0.1135", "2.30259"),
    ("200.0", "22760.303019", "0.00992565", "0.9701", "0.0912"),
]
GLOG06_SKIPPED = ("skipped 5 of 22 lines: 2 before the first 'Solving' line, 2 of set-up "
                  "(before a run's first 'Iteration N'), 1 without a glog prefix (blank, a "
                  "message's continuation or another program's output) (first: line 3)")

# A year change in glog >= 0.6's form.
NEW_YEAR_LOG = """\
I20261231 23:59:58.000000  9508 solver.cpp:289] Solving LeNet
I20261231 23:59:59.000000  9508 solver.cpp:239] Iteration 0 (0 iter/s, 0s/100 iters), loss = 2.3
I20261231 23:59:59.000100  9508 solver.cpp:258]     Train net output #0: loss = 2.3 (* 1 = 2.3 loss)
I20261231 23:59:59.000200  9508 sgd_solver.cpp:112] Iteration 0, lr = 0.01
I20270101 00:00:01.500000  9508 solver.cpp:239] Iteration 100 (40 iter/s, 2.5s/100 iters), loss = 0.3
I20270101 00:00:01.500100  9508 solver.cpp:258]     Train net output #0: loss = 0.3 (* 1 = 0.3 loss)
"""
NEW_YEAR_TRAIN = [("0.0", "1.0001", "0.01", "2.3"), ("100.0", "3.5001", "0.01", "0.3")]

# Two runs in one file: a run with glog < 0.6, killed during the test at iteration 200, then
# the run resumed from its iteration-100 snapshot a day later by a Caffe built with glog 0.6,
# its log appended (`2>> lenet.log`). Lines of other programs are interleaved; line 10 would
# give Caffe's script an iteration 999 and a train row.
RESUMED_LOG = """\
nohup: ignoring input
I0301 09:00:00.000000  4242 caffe.cpp:218] Using GPUs 0
I0301 09:00:01.000000  4242 solver.cpp:289] Solving LeNet
I0301 09:00:01.100000  4242 solver.cpp:347] Iteration 0, Testing net (#0)
I0301 09:00:02.000000  4242 solver.cpp:414]     Test net output #0: accuracy = 0.1
I0301 09:00:02.000100  4242 solver.cpp:414]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)
I0301 09:00:02.500000  4242 solver.cpp:239] Iteration 0 (0 iter/s, 1.4s/100 iters), loss = 2.31
I0301 09:00:02.500100  4242 solver.cpp:258]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I0301 09:00:02.500200  4242 sgd_solver.cpp:112] Iteration 0, lr = 0.01
[monitor] Iteration 999 of another job, lr = 5: Train net output #0: loss = 99
I0301 09:00:12.500000  4242 solver.cpp:239] Iteration 100 (10 iter/s, 10s/100 iters), loss = 0.5
I0301 09:00:12.500100  4242 solver.cpp:258]     Train net output #0: loss = 0.5 (* 1 = 0.5 loss)
I0301 09:00:12.500200  4242 sgd_solver.cpp:112] Iteration 100, lr = 0.0099
I0301 09:00:22.000000  4242 solver.cpp:347] Iteration 200, Testing net (#0)
I0301 09:00:23.000000  4242 solver.cpp:414]     Test net output #0: accuracy = 0.9
*** Aborted at 1772355623 (unix time) try "date -d @1772355623" if you are using GNU date ***

I20260302 10:00:00.000000  5151 caffe.cpp:218] Using GPUs 0
I20260302 10:00:00.500000  5151 solver.cpp:289] Solving LeNet
I20260302 10:00:00.500100  5151 solver.cpp:291] Restoring previous solver status from lenet_iter_100.solverstate
I20260302 10:00:00.600000  5151 sgd_solver.cpp:318] SGDSolver: restoring history
I20260302 10:00:01.000000  5151 solver.cpp:239] Iteration 100 (0 iter/s, 0.5s/100 iters), loss = 0.48
I20260302 10:00:01.000100  5151 solver.cpp:258]     Train net output #0: loss = 0.48 (* 1 = 0.48 loss)
I20260302 10:00:01.000200  5151 sgd_solver.cpp:112] Iteration 100, lr = 0.0099
W20260302 10:00:05.000000  5160 data_reader.cpp:100] Restarting data prefetching from start.
I20260302 10:00:11.000000  5151 solver.cpp:347] Iteration 200, Testing net (#0)
I20260302 10:00:12.000000  5151 solver.cpp:414]     Test net output #0: accuracy = 0.95
I20260302 10:00:12.000100  5151 solver.cpp:414]     Test net output #1: loss = 0.15 (* 1 = 0.15 loss)
I20260302 10:00:12.100000  5151 solver.cpp:239] Iteration 200 (10 iter/s, 10s/100 iters), loss = 0.2
I20260302 10:00:12.100100  5151 solver.cpp:258]     Train net output #0: loss = 0.2 (* 1 = 0.2 loss)
I20260302 10:00:12.100200  5151 sgd_solver.cpp:112] Iteration 200, lr = 0.0098
I20260302 10:00:12.200000  5151 solver.cpp:327] Optimization Done.
"""
# By hand. Run 1: "Solving" at 09:00:01, its last progress line (15) at 09:00:23: 22 s long.
# Run 2: "Solving" at 10:00:00.5 the next day; its rows count 22 s + the time since then.
# The second run's first rows take its second row's rate (Caffe's rule, per run); run 1's test
# table has one complete row (its iteration-200 row lacks the loss), so its rate stays NaN.
RESUMED_TRAIN = [
    ("0.0", "1.5001", "0.01", "2.31"),
    ("100.0", "11.5001", "0.01", "0.5"),
    ("100.0", "22.5001", "0.0099", "0.48"),       # 22 + 10:00:01.0001 - 10:00:00.5
    ("200.0", "33.6001", "0.0099", "0.2"),        # 22 + 10:00:12.1001 - 10:00:00.5
]
RESUMED_TEST = [
    ("0.0", "1.0", "nan", "0.1", "2.3"),
    ("200.0", "33.5", "0.0099", "0.95", "0.15"),
]
RESUMED_SKIPPED = ("2 runs ('Solving' lines); skipped 9 of 32 lines: 1 before the first "
                   "'Solving' line, 4 of set-up (before a run's first 'Iteration N'), 4 without "
                   "a glog prefix (blank, a message's continuation or another program's output) "
                   "(first: line 1); dropped 1 incomplete test row at the end of a run "
                   "(iteration 200)")


def _assert_table(path, header, want):
    got = read_csv(path)
    assert got[0] == header
    assert len(got) - 1 == len(want)
    for g, w in zip(got[1:], want):
        assert g[0] == w[0]
        assert [float(x) for x in g] == pytest.approx([float(x) for x in w], abs=1e-9,
                                                        nan_ok=True)


def _year_less(text):
    """The same log as glog < 0.6 writes it: the year dropped from every prefix."""
    return re.sub(r"^([IWEF])\d{4}(\d{4} )", r"\1\2", text, flags=re.M)


@pytest.mark.parametrize("form", ["glog>=0.6", "glog<0.6"])
def test_both_glog_prefixes_day_change(tmp_path, capsys, form):
    log = tmp_path / "lenet.log"
    log.write_text(GLOG06_LOG if form == "glog>=0.6" else _year_less(GLOG06_LOG))
    assert form == "glog>=0.6" or "I1125 17:40:41.796981  9508" in log.read_text()
    assert cli.main(["parse_log", str(log), str(tmp_path)]) == 0
    _assert_table(tmp_path / "lenet.log.train", ["NumIters", "Seconds", "LearningRate", "loss"],
                  GLOG06_TRAIN)
    _assert_table(tmp_path / "lenet.log.test",
                  ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"], GLOG06_TEST)
    assert capsys.readouterr().err.splitlines() == [f"parse_log: {log}: {GLOG06_SKIPPED}"]


@pytest.mark.parametrize("form", ["glog>=0.6", "glog<0.6"])
def test_year_change(tmp_path, form):
    text = NEW_YEAR_LOG if form == "glog>=0.6" else _year_less(NEW_YEAR_LOG)
    # the year the file was created is used only by the year-less form, and only as a start
    for year in (1999, 2026):
        train, test = parse_log_lines(text.splitlines(True), year)
        assert test == []
        assert [list(r) for r in train] == [["NumIters", "Seconds", "LearningRate", "loss"]] * 2
        np.testing.assert_allclose([list(r.values()) for r in train],
                                   [[float(x) for x in row] for row in NEW_YEAR_TRAIN],
                                   rtol=0, atol=1e-9)


def test_resumed_run_other_programs_and_both_prefixes(tmp_path, capsys):
    log = tmp_path / "lenet.log"
    log.write_text(RESUMED_LOG)
    assert cli.main(["parse_log", str(log), str(tmp_path)]) == 0
    _assert_table(tmp_path / "lenet.log.train", ["NumIters", "Seconds", "LearningRate", "loss"],
                  RESUMED_TRAIN)
    _assert_table(tmp_path / "lenet.log.test",
                  ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"], RESUMED_TEST)
    assert capsys.readouterr().err.splitlines() == [f"parse_log: {log}: {RESUMED_SKIPPED}"]


def test_glog06_solving_line_and_impossible_dates(tmp_path):
    # The line: Caffe's extract_seconds.py reads characters 1-2 ("20") as the month.
    line = "I20261125 17:40:41.796981  9508 solver.cpp:289] Solving LeNet"
    assert extract_datetime_from_line(line, 1999) == \
        datetime.datetime(2026, 11, 25, 17, 40, 41, 796981)
    assert extract_datetime_from_line(line[:1] + line[5:], 1999) == \
        datetime.datetime(1999, 11, 25, 17, 40, 41, 796981)
    text = ("I0229 10:00:00.000000 1 solver.cpp:289] Solving LeNet\n"
            "I0229 10:00:01.000000 1 solver.cpp:239] Iteration 0, loss = 1\n"
            "I0229 10:00:01.000001 1 solver.cpp:258]     Train net output #0: loss = 1\n"
            "I1332 10:00:02.000000 1 solver.cpp:258]     Train net output #0: loss = 7\n")
    parsed = read_log_lines(text.splitlines(True), 2024)          # 2024 has a February 29
    assert [(r["NumIters"], r["Seconds"], r["loss"]) for r in parsed.train] == \
        [(0.0, pytest.approx(1.000001), 1.0)]
    assert parsed.summary() == ("skipped 2 of 4 lines: 1 of set-up (before a run's first "
                                "'Iteration N'), 1 with an impossible glog date (first: line 4)")
    log = tmp_path / "x.log"
    log.write_text("Solving LeNet\nI0101 00:00:00.000000 1 a.cpp:1] Iteration 3, loss = 1\n")
    with pytest.raises(DataError, match="line 1 has 'Solving' but no glog prefix"):
        parse_log(log)
