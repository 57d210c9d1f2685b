"""The Caffe-style commands: train (both spellings), test, time, device_query."""

import logging
import subprocess
import sys

import pytest

from jcaffe import cli, log
from jcaffe.caffemodel import read_solverstate
from jcaffe.data.dataset import write_dataset
from tests.test_train import NET, SOLVER, make_data


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmd")
    write_dataset(str(d / "train"), *make_data(64, 0))
    write_dataset(str(d / "test"), *make_data(40, 1))
    (d / "net.prototxt").write_text(NET % {"train": d / "train", "test": d / "test"})
    (d / "solver.prototxt").write_text(
        SOLVER + f'net: "{d / "net.prototxt"}"\nsnapshot_prefix: "{d / "snap" / "t"}"\n')
    return d


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    logging.getLogger("jcaffe").handlers.clear()
    log.setup()


def run_cli(args, capfd):
    rc = cli.main(args)
    out, err = capfd.readouterr()
    return rc, out, err


def test_train_with_caffe_flags_and_resume(work, capfd):
    rc, _, err = run_cli(["train", f"-solver={work / 'solver.prototxt'}", "--iterations", "10"],
                         capfd)
    assert rc == 0, err
    assert "Solving tiny" in err and "Optimization Done." in err
    state = read_solverstate(str(work / "snap" / "t_iter_10.solverstate"))
    assert state.iter == 10
    rc, _, err = run_cli(["train", "--solver", str(work / "solver.prototxt"),
                          f"--snapshot={work / 'snap' / 't_iter_10.solverstate'}",
                          "--iterations=15"], capfd)
    assert rc == 0, err
    assert "Restoring previous solver status" in err
    assert read_solverstate(str(work / "snap" / "t_iter_15.solverstate")).iter == 15


def test_finetune_weights_and_score(work, capfd):
    model = work / "snap" / "t_iter_10.caffemodel"
    if not model.exists():
        pytest.skip("needs the training test's snapshot")
    rc, _, err = run_cli(["test", f"--model={work / 'net.prototxt'}", f"--weights={model}",
                          "--iterations=2"], capfd)
    assert rc == 0, err
    assert "Batch 0, accuracy = " in err and "Batch 1, loss = " in err
    assert "] accuracy = " in err and "loss = " in err and "(* 1 = " in err
    rc, _, err = run_cli(["train", f"--solver={work / 'solver.prototxt'}",
                          f"--weights={model}", "--iterations=2"], capfd)
    assert rc == 0, err
    assert f"Finetuning from {model}" in err


def test_test_command_scores_a_net_that_mirrors_at_test(work, capfd):
    """mirror: true mirrors at random in TEST too (Caffe's DataTransformer ignores the phase):
    `test` draws those flips from a key rather than failing. With every InnerProduct weight
    equal the logits are equal whatever the flips, so each batch's loss is ln 3."""
    net = work / "mirror.prototxt"
    net.write_text(f"""
name: "mirror"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
        transform_param {{ mirror: true scale: 0.00390625 }}
        data_param {{ source: "{work / 'test'}" batch_size: 20 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "constant" value: 0.01 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
""")
    rc, _, err = run_cli(["test", f"--model={net}", "--iterations=2"], capfd)
    assert rc == 0, err
    assert "Loss: 1.09861" in err, err  # ln 3 = 1.098612


def test_weights_and_snapshot_together_is_an_error(work, capfd):
    rc, _, err = run_cli(["train", f"--solver={work / 'solver.prototxt'}", "--weights=a",
                          "--snapshot=b"], capfd)
    assert rc == 1
    assert err.strip().startswith("jcaffe: error:") and "not both" in err
    assert "Traceback" not in err


def test_time_reports_layers_and_fused_step(work, capfd):
    rc, _, err = run_cli(["time", f"--model={work / 'net.prototxt'}", "--iterations=2"], capfd)
    assert rc == 0, err
    for needle in ("conv\tforward:", "conv\tbackward:", "Average Forward pass:",
                   "Average Backward pass:", "Average Forward-Backward:", "fused train step"):
        assert needle in err, needle


def test_device_query(capfd):
    rc, _, err = run_cli(["device_query"], capfd)
    assert rc == 0 and "Platform: cpu" in err


def test_python_m_jcaffe_train_missing_solver_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jcaffe.train", str(tmp_path / "nope.prototxt")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.prototxt" in lines[0], proc.stderr


def test_device_query_rejects_flags_it_does_not_take(capfd):
    rc, _, err = run_cli(["device_query", "--gpu", "0"], capfd)
    assert rc == 1 and "unrecognized arguments: --gpu 0" in err
    assert len(err.strip().splitlines()) == 1


def test_train_level_and_stage_select_the_train_net(work, tmp_path, capfd):
    """`caffe train --level --stage` set the train net's NetState: a layer included only for
    stage 'big' at level >= 1 joins the net (its log line names it)."""
    text = (work / "net.prototxt").read_text().replace(
        'layer { name: "loss"',
        'layer { name: "extra" type: "ReLU" bottom: "ip" top: "ip" '
        'include { phase: TRAIN stage: "big" min_level: 1 } }\nlayer { name: "loss"')
    (tmp_path / "net.prototxt").write_text(text)
    (tmp_path / "solver.prototxt").write_text(
        SOLVER.replace("test_interval: 10", "test_interval: 0").replace("test_iter: 3\n", "")
        + f'net: "{tmp_path / "net.prototxt"}"\nsnapshot_prefix: "{tmp_path / "s"}"\n')
    args = ["train", f"--solver={tmp_path / 'solver.prototxt'}", "--iterations=1"]
    rc, _, err = run_cli(args, capfd)
    assert rc == 0, err
    assert "Creating Layer extra" not in err
    rc, _, err = run_cli(args + ["--level=1", "--stage=big"], capfd)
    assert rc == 0, err
    assert "Creating Layer extra" in err


DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "prob" type: "Softmax" bottom: "conv1" top: "prob" }
"""


def test_time_a_net_fed_by_input_layers(tmp_path, capfd):
    """A net fed by Input layers (as the shipped LeNet deploy net) is timed on synthetic data."""
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    rc, _, err = run_cli(["time", f"--model={tmp_path / 'deploy.prototxt'}", "--iterations=1",
                          "--phase=TEST"], capfd)
    assert rc == 0, err
    assert "conv1\tforward:" in err and "Average Forward pass:" in err
