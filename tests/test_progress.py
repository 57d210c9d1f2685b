"""Progress bars: drawn on a terminal only; the data written and the log lines unchanged."""

import io
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from jcaffe.data import mnist
from jcaffe.data.dataset import read_dataset
from jcaffe.tools import convert_imageset
from jcaffe.tools.progress import progress, progress_iter

REPO = pathlib.Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal():
    plain, tty = io.StringIO(), Terminal()
    assert list(progress_iter(range(7), 7, "x", stream=plain)) == list(range(7))
    assert plain.getvalue() == ""
    assert list(progress_iter(range(7), 7, "count", "rec", stream=tty, mininterval=0)) == \
        list(range(7))
    out = tty.getvalue()
    assert "count" in out and "3/7" in out and "7/7" in out and "\r" in out
    assert out.endswith("\r")  # removed when done (leave=False): the terminal's next line is clean
    with progress(total=2, stream=io.StringIO()) as bar:  # the no-bar stand-in has tqdm's surface
        bar.update(2)


@pytest.mark.parametrize("tty", [False, True])
def test_mnist_create(tmp_path, monkeypatch, tty):
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    logged = []
    mnist.create(str(REPO / "datasets" / "mnist"), out_dir=str(tmp_path), limit=300,
                 log=logged.append)
    assert [l.split(" (")[0] for l in logged if "writing" in l] == [
        f"MNIST: writing {tmp_path / 'mnist_train'}", f"MNIST: writing {tmp_path / 'mnist_test'}"]
    if tty:
        assert "mnist_train" in err.getvalue() and "0/300" in err.getvalue()
    else:
        assert err.getvalue() == ""
    images, labels = mnist.read_split(str(REPO / "datasets/mnist/train-images-idx3-ubyte.gz"),
                                      str(REPO / "datasets/mnist/train-labels-idx1-ubyte.gz"),
                                      limit=300)
    with read_dataset(str(tmp_path / "mnist_train")) as src:
        x, y = src.read(0, 300)
    np.testing.assert_array_equal(np.asarray(x), images)
    np.testing.assert_array_equal(np.asarray(y), labels)


@pytest.mark.parametrize("backend", ["tensorstore", "lmdb"])
def test_convert_imageset(tmp_path, monkeypatch, backend):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(3)))
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    logged = []
    n = convert_imageset.convert_imageset(str(tmp_path) + "/", str(tmp_path / "list.txt"),
                                          str(tmp_path / "db"), backend=backend,
                                          log=logged.append)
    assert n == 3 and "0/3" in err.getvalue()
    assert logged == ["A total of 3 images.", "Processed 3 files."]
    from jcaffe.data.sources import open_source

    with open_source(str(tmp_path / "db")) as src:
        x, y = src.read(0, 3)
    # colour images are stored BGR, channels first (OpenCV's / Caffe's order)
    np.testing.assert_array_equal(np.asarray(x), pixels[..., ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(y), [0, 1, 2])
