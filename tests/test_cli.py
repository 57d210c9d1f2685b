"""The jcaffe command line: the command table, Caffe-style flags, errors, the upgrade tools."""

import argparse
import logging
import os
import subprocess
import sys

import pytest

from jcaffe import cli, prototxt
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "prototxt")
DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main installs the glog handler on the 'jcaffe' logger; undo it for other tests."""
    logger = logging.getLogger("jcaffe")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture
def scratch_command():
    """Registers throwaway commands and removes them afterwards."""
    names = []

    def add(name, fn, help="a test command"):
        names.append(name)
        return cli.register_command(name, help)(fn)

    yield add
    for name in names:
        cli.COMMANDS.pop(name, None)
        cli.COMMAND_HELP.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--solver=s.prototxt", "--iterations=5"],
    ["--solver", "s.prototxt", "--iterations", "5"],
    ["-solver=s.prototxt", "-iterations=5"],
    ["-solver", "s.prototxt", "-iterations", "5"],
])
def test_caffe_flag_spellings(argv):
    parser = argparse.ArgumentParser(prog="jcaffe x")
    parser.add_argument("--solver")
    parser.add_argument("--iterations", type=int, default=50)
    args = cli.parse_flags(argv, parser)
    assert (args.solver, args.iterations) == ("s.prototxt", 5)


def test_normalize_flags_leaves_short_flags_numbers_and_positionals():
    assert cli.normalize_flags(["-h", "-5", "-level", "-1", "a.txt", "--", "-x_y"]) == \
        ["-h", "-5", "--level", "-1", "a.txt", "--", "-x_y"]


def test_bool_flags_gflags_style():
    parser = argparse.ArgumentParser(prog="jcaffe x")
    cli.add_bool_flag(parser, "snapshot_on_exit", default=True)
    assert cli.parse_flags([], parser).snapshot_on_exit is True
    assert cli.parse_flags(["-snapshot_on_exit=false"], parser).snapshot_on_exit is False
    assert cli.parse_flags(["--snapshot_on_exit"], parser).snapshot_on_exit is True
    with pytest.raises(cli.UsageError, match="boolean"):
        cli.parse_flags(["--snapshot_on_exit=maybe"], parser)


def test_bad_flags_raise_usage_error():
    parser = cli.command_parser("x", "test")
    parser.add_argument("--n", type=int)
    with pytest.raises(cli.UsageError, match=r"^jcaffe x: .*--n"):
        cli.parse_flags(["--n=three"], parser)
    with pytest.raises(cli.UsageError, match="unrecognized"):
        cli.parse_flags(["--bogus=1"], parser)


# ---------------------------------------------------------------------------------------------
# Dispatch and errors
# ---------------------------------------------------------------------------------------------

def test_help_lists_commands(capsys, scratch_command):
    scratch_command("zz_probe", lambda argv: 0, "probe command for the tests")
    for argv in ([], ["help"], ["--help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "zz_probe" in out and "probe command for the tests" in out
        assert "upgrade_net_proto_text" in out and "upgrade_solver_proto_text" in out


def test_help_for_one_command(capsys):
    assert cli.main(["help", "upgrade_net_proto_binary"]) == 0
    assert "usage: jcaffe upgrade_net_proto_binary" in capsys.readouterr().out


def test_registered_command_gets_its_argv(scratch_command):
    seen = []
    scratch_command("zz_echo", lambda argv: seen.append(argv) or 3)
    assert cli.main(["zz_echo", "-a=1", "b"]) == 3
    assert seen == [["-a=1", "b"]]
    with pytest.raises(ValueError, match="twice"):
        cli.register_command("zz_echo", "again")(lambda argv: 0)


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err == "jcaffe: error: unknown command 'frobnicate'; run `jcaffe help` for the list\n"


def test_user_error_is_one_line_unless_debug(capsys, scratch_command):
    def fail(argv):
        raise DataError("data.lmdb: record 7: bad Datum")

    scratch_command("zz_fail", fail)
    assert cli.main(["zz_fail"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "jcaffe: error: data.lmdb: record 7: bad Datum\n"
    assert cli.main(["zz_fail", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("jcaffe: error: data.lmdb: record 7: bad Datum\n")


def test_internal_error_is_marked(capsys, scratch_command):
    def crash(argv):
        raise KeyError("oops")

    scratch_command("zz_crash", crash)
    assert cli.main(["zz_crash"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jcaffe: internal error: KeyError")
    assert "--debug" in err and "Traceback" not in err and err.count("\n") == 1
    assert cli.main(["-debug", "zz_crash"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Upgrade tools
# ---------------------------------------------------------------------------------------------

def test_upgrade_net_proto_text_round_trip(tmp_path, capsys):
    out = str(tmp_path / "lenet_upgraded.prototxt")
    v1 = os.path.join(SHIPPED, "lenet_train_test_v1.prototxt")
    assert cli.main(["upgrade_net_proto_text", v1, out]) == 0
    # The 'kernelsize' deprecation reaches the user as a glog warning line naming file:line.
    err = capsys.readouterr().err
    assert any(line.startswith("W") and f"] {v1}:40:5: 'kernelsize'" in line
               for line in err.splitlines()), err
    text = open(out).read()
    assert "layers" not in text and "blobs_lr" not in text and "kernelsize" not in text
    upgraded = prototxt.read_net_raw(out)
    assert upgraded == prototxt.read_net(os.path.join(SHIPPED, "lenet_train_test.prototxt"))


def test_upgrade_v0_fixture_via_cli(tmp_path):
    out = str(tmp_path / "v2.prototxt")
    assert cli.main(["upgrade_net_proto_text", os.path.join(DATA, "proto_v0_padding.prototxt"),
                     out]) == 0
    net = prototxt.read_net_raw(out)
    assert [(l.name, l.type) for l in net.layer] == [
        ("data", "Data"), ("conv1", "Convolution"), ("fc8", "InnerProduct"),
        ("loss", "SoftmaxWithLoss")]
    assert list(net.layer[1].convolution_param.pad) == [2]
    assert list(net.layer[1].bottom) == ["data"]


def test_upgrade_with_problems_exits_1_but_writes(tmp_path):
    src = tmp_path / "v0.prototxt"
    src.write_text("input: 'x' layers { layer { name: 'r' type: 'relu' num_output: 3 } "
                   "bottom: 'x' top: 'x' }")
    out = str(tmp_path / "out.prototxt")
    assert cli.main(["upgrade_net_proto_text", str(src), out]) == 1
    assert prototxt.read_net_raw(out).layer[0].type == "ReLU"


def test_upgrade_net_proto_binary(tmp_path):
    v1 = caffe_pb2.NetParameter(name="w")
    v1.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, blobs_lr=[1, 2])
    v1.layers[0].blobs.add(data=[0.5, -1.0])
    src = tmp_path / "old.caffemodel"
    src.write_bytes(v1.SerializeToString())
    out = str(tmp_path / "new.caffemodel")
    assert cli.main(["-debug", "upgrade_net_proto_binary", str(src), out]) == 0
    new = caffe_pb2.NetParameter.FromString(open(out, "rb").read())
    assert len(new.layers) == 0 and new.layer[0].type == "InnerProduct"
    assert [p.lr_mult for p in new.layer[0].param] == [1, 2]
    assert list(new.layer[0].blobs[0].data) == [0.5, -1.0]


def test_upgrade_solver_proto_text(tmp_path):
    out = str(tmp_path / "solver.prototxt")
    assert cli.main(["upgrade_solver_proto_text",
                     os.path.join(SHIPPED, "lenet_solver_v1.prototxt"), out]) == 0
    text = open(out).read()
    assert 'type: "SGD"' in text and "solver_type" not in text and "solver_mode: CPU" in text
    solver = prototxt.read_solver(out, resolve_paths=False)
    # Paths are written as they were, not resolved.
    assert solver.net == "prototxt/lenet_train_test_v1.prototxt"


def test_upgrade_bad_input_reports_file_line_col(tmp_path, capsys):
    src = tmp_path / "bad.prototxt"
    src.write_text("layers {\n  name: 'x'\n  type: CONVOLUTON\n}\n")
    assert cli.main(["upgrade_net_proto_text", str(src), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jcaffe: error: {src}:3:9: field 'type'")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_console_script_error_is_one_line(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "jcaffe")
    missing = str(tmp_path / "missing.prototxt")
    proc = subprocess.run([script, "upgrade_net_proto_text", missing, str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"jcaffe: error: {missing}: net file not found\n"
    assert "Traceback" not in proc.stdout + proc.stderr
