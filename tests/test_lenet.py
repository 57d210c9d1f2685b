"""End to end: Caffe's MNIST tutorial with the shipped LeNet solver, shortened to 500 iterations.

Caffe reaches about 0.97 test accuracy after 500 iterations of lenet_solver.prototxt; jcaffe
must do the same from the shipped IDX files, through the Data layer and the fused step.
"""

import pathlib

import pytest

from jcaffe import prototxt
from jcaffe.data import mnist
from jcaffe.train import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("mnist_run")
    out = work / "datasets" / "mnist"
    mnist.create(str(REPO / "datasets" / "mnist"), out_dir=str(out), log=lambda *a: None)
    return work


def test_lenet_500_iterations_reach_caffes_accuracy(mnist_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped solver names prototxt/... like Caffe's examples
    sp = prototxt.read_solver("prototxt/lenet_solver.prototxt")
    assert sp.net == "prototxt/lenet_train_test.prototxt"
    sp.net = str(REPO / sp.net)
    monkeypatch.chdir(mnist_dir)  # ... and the net names datasets/mnist/...
    sp.max_iter = 500
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.test_initialization = False
    sp.display = 0
    t = Trainer(sp, verbose=False)
    results = t.solve()
    t.close()
    accuracy = float(results["test"][0]["accuracy"])
    loss = float(results["test"][0]["loss"])
    assert accuracy >= 0.96, accuracy  # Caffe: ~0.97 at iteration 500
    assert loss < 0.15, loss
