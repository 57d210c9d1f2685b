"""Shared helpers for the tools' tests: a tiny real jcaffe training run and its log."""

import os
import subprocess
import sys

import numpy as np

from jcaffe.data.dataset import write_dataset

NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
        transform_param { scale: 0.00390625 } data_param { source: "%(train)s" batch_size: 16 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
        transform_param { scale: 0.00390625 } data_param { source: "%(test)s" batch_size: 20 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """net: "%(net)s"
test_iter: 3
test_interval: 10
base_lr: 0.05
momentum: 0.9
lr_policy: "inv"
gamma: 0.001
power: 0.75
display: 5
max_iter: 20
snapshot: 0
snapshot_after_train: false
snapshot_prefix: "%(dir)s/tiny"
solver_mode: CPU
random_seed: 7
"""


def make_data(n, seed):
    """Three classes told apart by where a bright bar sits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    data = rng.integers(0, 60, (n, 1, 6, 6)).astype(np.uint8)
    for i, c in enumerate(labels):
        data[i, 0, 2 * c:2 * c + 2, 1:5] = 250
    return data, labels


def training_log(d, name="tiny.log"):
    """Trains the tiny net for 20 iterations with ``python -m jcaffe.train`` in a subprocess;
    returns ``(log path, log text)``."""
    write_dataset(str(d / "train"), *make_data(64, 0))
    write_dataset(str(d / "test"), *make_data(60, 1))
    (d / "net.prototxt").write_text(NET % {"train": d / "train", "test": d / "test"})
    (d / "solver.prototxt").write_text(SOLVER % {"net": d / "net.prototxt", "dir": d})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "jcaffe.train", str(d / "solver.prototxt"), "--cpu"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    path = d / name
    path.write_text(r.stderr)
    return path, r.stderr
