"""plot_training_log: Caffe's eight chart types, the plotted data checked point by point."""

import pathlib
import re

import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from jcaffe import cli  # noqa: E402
from jcaffe.errors import JcaffeError  # noqa: E402
from jcaffe.tools.plot_training_log import plot_chart, supported_chart_types  # noqa: E402
from tests.test_parse_log import CAFFE_LOG, EXPECTED_TEST, EXPECTED_TRAIN  # noqa: E402

# Caffe's plot_training_log.py.example numbering.
CAFFE_TYPES = ["Test accuracy  vs. Iters", "Test accuracy  vs. Seconds",
               "Test loss  vs. Iters", "Test loss  vs. Seconds",
               "Train learning rate  vs. Iters", "Train learning rate  vs. Seconds",
               "Train loss  vs. Iters", "Train loss  vs. Seconds"]


def test_chart_types():
    assert supported_chart_types() == CAFFE_TYPES


def _column(table, j):
    return [float(r[j]) for r in table]


# chart type -> (x, y) from the hand-computed tables of the Caffe log
EXPECTED = {
    0: (_column(EXPECTED_TEST, 0), _column(EXPECTED_TEST, 3)),
    1: (_column(EXPECTED_TEST, 1), _column(EXPECTED_TEST, 3)),
    2: (_column(EXPECTED_TEST, 0), _column(EXPECTED_TEST, 4)),
    3: (_column(EXPECTED_TEST, 1), _column(EXPECTED_TEST, 4)),
    4: (_column(EXPECTED_TRAIN, 0), _column(EXPECTED_TRAIN, 2)),
    5: (_column(EXPECTED_TRAIN, 1), _column(EXPECTED_TRAIN, 2)),
    6: (_column(EXPECTED_TRAIN, 0), _column(EXPECTED_TRAIN, 3)),
    7: (_column(EXPECTED_TRAIN, 1), _column(EXPECTED_TRAIN, 3)),
}


@pytest.fixture
def two_logs(tmp_path):
    a = tmp_path / "run_a.log"
    a.write_text(CAFFE_LOG)
    # a second run: the same log with every output value doubled
    b = tmp_path / "run_b.log"
    lines = []
    for line in CAFFE_LOG.splitlines():
        if "net output #" in line:
            head, value = line.rsplit(" = ", 1) if "(*" not in line else line.split(" (*")[0].rsplit(" = ", 1)
            line = f"{head} = {2 * float(value)}"
        lines.append(line)
    b.write_text("\n".join(lines) + "\n")
    return a, b


@pytest.mark.parametrize("chart_type", range(8))
def test_plotted_data(two_logs, tmp_path, chart_type):
    out = tmp_path / f"chart{chart_type}.png"
    assert cli.main(["plot_training_log", str(chart_type), str(out), *map(str, two_logs)]) == 0
    fig = plot_chart(chart_type, None, two_logs)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ["run_a", "run_b"]
    x, y = EXPECTED[chart_type]
    scale = 1.0 if chart_type in (4, 5) else 2.0  # run_b's outputs doubled, its rates not
    for line, factor in zip(lines, (1.0, scale)):
        assert list(line.get_xdata()) == pytest.approx(x)
        assert list(line.get_ydata()) == pytest.approx([factor * v for v in y])
    y_field, x_field = CAFFE_TYPES[chart_type].split("  vs. ")
    assert ax.get_title() == CAFFE_TYPES[chart_type]
    assert (ax.get_xlabel(), ax.get_ylabel()) == (x_field, y_field)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run_a", "run_b"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_real_lenet_log():
    # tests/data/lenet_2000.log: `python -m jcaffe.train prototxt/lenet_solver.prototxt
    # --iterations 2000 --cpu` on MNIST (the run behind docs/lenet_*.png).
    log = pathlib.Path(__file__).parent / "data" / "lenet_2000.log"
    text = log.read_text()
    acc = [float(v) for v in re.findall(r"Test net output #0: accuracy = (\S+)", text)]
    loss = [float(v) for v in re.findall(r"Train net output #0: loss = (\S+)", text)]
    line = plot_chart(0, None, [log]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 500, 1000, 1500, 2000]
    assert list(line.get_ydata()) == acc and acc[-1] > 0.97
    line = plot_chart(6, None, [log]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == list(range(0, 2000, 100))
    assert list(line.get_ydata()) == loss
    assert line.get_label() == "lenet_2000"


def test_errors(tmp_path, two_logs, capsys):
    assert cli.main(["plot_training_log", "8", str(tmp_path / "x.png"), str(two_logs[0])]) == 1
    assert "not a valid chart type" in capsys.readouterr().err
    assert cli.main(["plot_training_log", "0", str(tmp_path / "x.png"), "missing.log"]) == 1
    assert "missing.log" in capsys.readouterr().err
    no_test = tmp_path / "no_test.log"
    no_test.write_text("".join(l + "\n" for l in CAFFE_LOG.splitlines() if "Test net" not in l))
    with pytest.raises(JcaffeError, match="no test net output"):
        plot_chart(0, None, [no_test])
    assert not (tmp_path / "x.png").exists()


def test_glog06_and_resumed_logs(tmp_path, capsys):
    # glog >= 0.6's prefix (a day change) and a resumed run appended to its first run's log:
    # the points are the hand-written rows of tests/test_parse_log.py.
    from tests.test_parse_log import (GLOG06_LOG, GLOG06_SKIPPED, GLOG06_TEST, RESUMED_LOG,
                                      RESUMED_SKIPPED, RESUMED_TRAIN)
    new, resumed = tmp_path / "glog06.log", tmp_path / "resumed.log"
    new.write_text(GLOG06_LOG)
    resumed.write_text(RESUMED_LOG)
    out = tmp_path / "acc.png"
    assert cli.main(["plot_training_log", "1", str(out), str(new)]) == 0
    assert out.exists()
    assert capsys.readouterr().err.splitlines() == [f"plot_training_log: {new}: {GLOG06_SKIPPED}"]
    line = plot_chart(1, None, [new]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == pytest.approx(_column(GLOG06_TEST, 1))
    assert list(line.get_ydata()) == pytest.approx(_column(GLOG06_TEST, 3))
    assert cli.main(["plot_training_log", "7", str(tmp_path / "loss.png"), str(resumed)]) == 0
    assert capsys.readouterr().err.splitlines() == \
        [f"plot_training_log: {resumed}: {RESUMED_SKIPPED}"]
    line = plot_chart(7, None, [resumed]).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == pytest.approx(_column(RESUMED_TRAIN, 1))
    assert list(line.get_ydata()) == pytest.approx(_column(RESUMED_TRAIN, 3))
