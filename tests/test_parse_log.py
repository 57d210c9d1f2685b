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
from jcaffe.tools.parse_log import parse_log, parse_log_lines

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
