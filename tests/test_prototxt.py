"""jcaffe.prototxt: reading nets and solvers, the shipped prototxts, and every bad-input case."""

import glob
import os
import re

import pytest
from google.protobuf import text_format

from jcaffe import prototxt
from jcaffe.errors import JcaffeError, ProtoError
from jcaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "prototxt")
V1_NET = os.path.join(SHIPPED, "lenet_train_test_v1.prototxt")

SOLVERS = sorted(glob.glob(os.path.join(SHIPPED, "*solver*.prototxt")))
NETS = sorted(set(glob.glob(os.path.join(SHIPPED, "*.prototxt"))) - set(SOLVERS))


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def read_net_quiet(path):
    # The shipped V1 net uses the tutorial's 'kernelsize' on purpose.
    with pytest.warns(DeprecationWarning) if "v1" in os.path.basename(path) else _nothing():
        return prototxt.read_net(path)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Shipped prototxts
# ---------------------------------------------------------------------------------------------

def test_shipped_files_present():
    names = {os.path.basename(p) for p in NETS + SOLVERS}
    assert {"lenet_train_test.prototxt", "lenet.prototxt", "lenet_solver.prototxt",
            "lenet_solver_adam.prototxt", "lenet_solver_rmsprop.prototxt",
            "lenet_adadelta_solver.prototxt", "lenet_solver_nesterov.prototxt",
            "lenet_multistep_solver.prototxt", "mnist_autoencoder.prototxt",
            "mnist_autoencoder_solver.prototxt", "cifar10_quick_train_test.prototxt",
            "cifar10_quick_solver.prototxt", "cifar10_quick.prototxt",
            "lenet_train_test_v1.prototxt", "lenet_solver_v1.prototxt"} <= names


@pytest.mark.parametrize("path", NETS, ids=os.path.basename)
def test_shipped_net_parses(path):
    net = read_net_quiet(path)
    assert len(net.layer) > 0 and len(net.layers) == 0
    assert all(layer.type for layer in net.layer)
    for layer in net.layer:
        if layer.type == "Data":
            assert layer.data_param.source.startswith("datasets/")
            # The source kind is detected from the data, never named in the file.
            assert not layer.data_param.HasField("backend")


@pytest.mark.parametrize("path", SOLVERS, ids=os.path.basename)
def test_shipped_solver_parses_and_its_net_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    solver = prototxt.read_solver(os.path.relpath(path, ROOT))
    assert solver.snapshot_prefix.startswith("snapshots/")
    assert not solver.HasField("solver_type")
    assert os.path.isfile(solver.net)
    net = read_net_quiet(solver.net)
    assert len(net.layer) > 0


def test_solver_net_found_beside_the_solver(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "net.prototxt").write_text("layer { name: 'r' type: 'ReLU' }")
    (conf / "solver.prototxt").write_text("net: 'net.prototxt'\ntest_net: 'net.prototxt'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    solver = prototxt.read_solver(str(conf / "solver.prototxt"))
    assert solver.net == str(conf / "net.prototxt")
    assert list(solver.test_net) == [str(conf / "net.prototxt")]
    # The shipped solvers name their net relative to the repository root (the CWD).
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / "prototxt"
    shipped.mkdir()
    for name in ("lenet_solver.prototxt", "lenet_train_test.prototxt"):
        (shipped / name).write_text(open(os.path.join(SHIPPED, name)).read())
    assert prototxt.read_solver("prototxt/lenet_solver.prototxt").net == \
        "prototxt/lenet_train_test.prototxt"


def test_lenet_solver_hyperparameters():
    solver = prototxt.read_solver(os.path.join(SHIPPED, "lenet_solver.prototxt"),
                                  resolve_paths=False)
    expected = text_format.Parse("""
        net: "prototxt/lenet_train_test.prototxt" test_iter: 100 test_interval: 500
        base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "inv" gamma: 0.0001
        power: 0.75 display: 100 max_iter: 10000 snapshot: 5000
        snapshot_prefix: "snapshots/lenet" solver_mode: CPU""", caffe_pb2.SolverParameter())
    assert solver == expected


def test_lenet_train_test_data_layers():
    net = prototxt.read_net(os.path.join(SHIPPED, "lenet_train_test.prototxt"))
    data = [l for l in net.layer if l.type == "Data"]
    assert [(l.data_param.source, l.data_param.batch_size, l.include[0].phase) for l in data] == \
        [("datasets/mnist/mnist_train", 64, caffe_pb2.TRAIN),
         ("datasets/mnist/mnist_test", 100, caffe_pb2.TEST)]
    assert all(l.transform_param.scale == pytest.approx(0.00390625) for l in data)
    deploy = prototxt.read_net(os.path.join(SHIPPED, "lenet.prototxt"))
    assert deploy.layer[0].type == "Input"
    assert list(deploy.layer[0].input_param.shape[0].dim) == [64, 1, 28, 28]


def test_v1_and_v2_lenet_upgrade_to_the_same_net():
    v2 = prototxt.read_net(os.path.join(SHIPPED, "lenet_train_test.prototxt"))
    with pytest.warns(DeprecationWarning, match=r"lenet_train_test_v1\.prototxt:\d+:\d+"):
        v1 = prototxt.read_net(V1_NET)
    assert len(v1.layer) == len(v2.layer) == 11
    for a, b in zip(v1.layer, v2.layer):
        assert text_format.MessageToString(a) == text_format.MessageToString(b), a.name
    assert v1 == v2


def test_v1_solver_upgrades_to_the_v2_solver():
    old = prototxt.read_solver(os.path.join(SHIPPED, "lenet_solver_v1.prototxt"),
                               resolve_paths=False)
    new = prototxt.read_solver(os.path.join(SHIPPED, "lenet_solver.prototxt"),
                               resolve_paths=False)
    assert old.type == "SGD" and old.HasField("type") and not old.HasField("solver_type")
    assert old.solver_mode == caffe_pb2.SolverParameter.CPU
    for field in ("net", "snapshot_prefix", "type"):
        old.ClearField(field)
        new.ClearField(field)
    assert old == new


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def test_resolve_path_prefers_cwd_then_the_files_folder(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "net.prototxt").write_text("x")
    (tmp_path / "net.prototxt").write_text("y")
    owner = str(tmp_path / "a" / "solver.prototxt")
    monkeypatch.chdir(tmp_path)
    assert prototxt.resolve_path("net.prototxt", owner) == "net.prototxt"
    (tmp_path / "net.prototxt").unlink()
    assert prototxt.resolve_path("net.prototxt", owner) == str(tmp_path / "a" / "net.prototxt")
    assert prototxt.resolve_path("gone.prototxt", owner) == "gone.prototxt"
    assert prototxt.resolve_path("/abs/x", owner) == "/abs/x"


def test_default_snapshot_prefix(tmp_path):
    solver = write(tmp_path, "my_solver.prototxt", "net_param { layer { name: 'r' } }")
    assert prototxt.read_solver(solver).snapshot_prefix == str(tmp_path / "my_solver")
    (tmp_path / "snaps").mkdir()
    solver = write(tmp_path, "s2.prototxt", f"net_param {{ layer {{ name: 'r' }} }} "
                   f"snapshot_prefix: '{tmp_path / 'snaps'}'")
    assert prototxt.read_solver(solver).snapshot_prefix == str(tmp_path / "snaps" / "s2")


# ---------------------------------------------------------------------------------------------
# kernelsize
# ---------------------------------------------------------------------------------------------

def test_kernelsize_accepted_in_conv_and_pooling_with_warning(tmp_path):
    lines = ["layer { name: 'c' type: 'Convolution'",
             "  convolution_param { kernelsize: 5 num_output: 2 }",
             "}",
             "layer { name: 'p' type: 'Pooling' pooling_param { kernelsize: 2 } }"]
    path = write(tmp_path, "k.prototxt", "\n".join(lines) + "\n")
    with pytest.warns(DeprecationWarning) as record:
        net = prototxt.read_net(path)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:2:{lines[1].index('kernelsize') + 1}: ")
    assert messages[1].startswith(f"{path}:4:{lines[3].index('kernelsize') + 1}: ")
    assert "kernel_size" in messages[0]
    assert list(net.layer[0].convolution_param.kernel_size) == [5]
    assert net.layer[1].pooling_param.kernel_size == 2


def test_kernelsize_elsewhere_stays_an_error(tmp_path):
    path = write(tmp_path, "k.prototxt",
                 "layer { name: 'ip' inner_product_param { kernelsize: 5 } }\n")
    with pytest.raises(ProtoError, match=re.escape(f"{path}:1:42: unknown field 'kernelsize' "
                                                   f"in InnerProductParameter")):
        prototxt.read_net(path)


def test_columns_after_a_kernelsize_rewrite_are_the_files(tmp_path):
    path = write(tmp_path, "k.prototxt",
                 "layer { convolution_param { kernelsize: 5 bogus: 1 } }\n")
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ProtoError, match=re.escape(f"{path}:1:43: unknown field 'bogus'")):
            prototxt.read_net(path)


# ---------------------------------------------------------------------------------------------
# Bad input: each error is one line and names file:line:col
# ---------------------------------------------------------------------------------------------

def raises_at(call, path, line, col, *words):
    with pytest.raises(ProtoError) as e:
        call(path)
    msg = str(e.value)
    assert isinstance(e.value, JcaffeError)
    assert msg.startswith(f"{path}:{line}:{col}: "), msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_unknown_field(tmp_path):
    path = write(tmp_path, "n.prototxt",
                 "name: 'n'\nlayer {\n  name: 'c'\n  convolution_param { num_ouput: 3 }\n}\n")
    raises_at(prototxt.read_net, path, 4, 23, "unknown field 'num_ouput'",
              "ConvolutionParameter", "did you mean 'num_output'")


def test_wrong_value_type(tmp_path):
    path = write(tmp_path, "s.prototxt", "net: 'x'\nbase_lr: \"fast\"\n")
    raises_at(prototxt.read_solver, path, 2, 10, "field 'base_lr'", "float", '"fast"')
    path = write(tmp_path, "s2.prototxt", "net: 'x'\nmax_iter: 1.5\n")
    raises_at(prototxt.read_solver, path, 2, 11, "field 'max_iter'", "integer", "1.5")
    path = write(tmp_path, "s3.prototxt", "net: x.prototxt\n")
    raises_at(prototxt.read_solver, path, 1, 6, "field 'net'", "string")


def test_unknown_enum_name(tmp_path):
    path = write(tmp_path, "s.prototxt", "net: 'x'\nsolver_mode: TPU\n")
    raises_at(prototxt.read_solver, path, 2, 14, "field 'solver_mode'", "TPU", "CPU, GPU")
    path = write(tmp_path, "n.prototxt", "layer {\n  include { phase: VALIDATE }\n}\n")
    raises_at(prototxt.read_net, path, 2, 20, "field 'phase'", "VALIDATE", "TRAIN, TEST")


def test_unbalanced_braces(tmp_path):
    path = write(tmp_path, "open.prototxt", "layer {\n  name: 'a'\n  include {\n    phase: TRAIN\n")
    raises_at(prototxt.read_net, path, 4, 12, "end of file", "'{' opened at 3:11",
              "unbalanced braces")
    path = write(tmp_path, "close.prototxt", "layer {\n  name: 'a'\n}\n}\n")
    raises_at(prototxt.read_net, path, 4, 1, "'}'", "unbalanced braces")


def test_empty_net_and_net_without_layers(tmp_path):
    path = write(tmp_path, "empty.prototxt", "")
    raises_at(prototxt.read_net, path, 1, 1, "empty", "at least one layer")
    path = write(tmp_path, "nolayers.prototxt", "name: 'n'\n")
    raises_at(prototxt.read_net, path, 1, 1, "no layers")
    with pytest.raises(ProtoError, match=r"^<string>:1:1: .*empty"):
        prototxt.parse_net_text("# nothing\n")


def test_empty_solver_and_solver_without_net(tmp_path):
    path = write(tmp_path, "empty_solver.prototxt", "")
    raises_at(prototxt.read_solver, path, 1, 1, "empty", "net, net_param, train_net")
    path = write(tmp_path, "nonet.prototxt", "base_lr: 0.1\n")
    raises_at(prototxt.read_solver, path, 1, 1, "names no net")


def test_solver_with_two_train_nets(tmp_path):
    path = write(tmp_path, "two.prototxt", "net: 'a'\n# comment net: 'c'\n  train_net: 'b'\n")
    raises_at(prototxt.read_solver, path, 3, 3, "more than one train net", "net and train_net")


def test_missing_file_names_its_path(tmp_path):
    path = str(tmp_path / "nowhere.prototxt")
    for read in (prototxt.read_net, prototxt.read_solver):
        with pytest.raises(ProtoError) as e:
            read(path)
        assert str(e.value).startswith(f"{path}: ") and "not found" in str(e.value)


def test_missing_net_of_a_solver_names_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "solver.prototxt", "base_lr: 0.1\nnet: 'nets/absent.prototxt'\n")
    raises_at(prototxt.read_solver, path, 2, 1, "net file 'nets/absent.prototxt' not found",
              str(tmp_path / "nets" / "absent.prototxt"))
    path = write(tmp_path, "solver2.prototxt",
                 "net: 'here.prototxt'\ntest_net: 'gone.prototxt'\n")
    write(tmp_path, "here.prototxt", "layer { name: 'r' }")
    raises_at(prototxt.read_solver, path, 2, 1, "test_net file 'gone.prototxt'")
    # Kept as written when asked.
    assert prototxt.read_solver(path, resolve_paths=False).test_net[0] == "gone.prototxt"


def test_binary_file_given_as_solver(tmp_path):
    binary = caffe_pb2.SolverParameter(net="x", base_lr=0.1).SerializeToString()
    path = write(tmp_path, "solver.prototxt", binary)
    raises_at(prototxt.read_solver, path, 1, 2, "binary", "text SolverParameter")
    path = write(tmp_path, "solver.solverstate", b"net: 'x'\n")
    raises_at(prototxt.read_solver, path, 1, 1, "binary", "text SolverParameter")


def test_duplicate_singular_field(tmp_path):
    path = write(tmp_path, "s.prototxt", "net: 'a'\nbase_lr: 0.1\nbase_lr: 0.2\n")
    raises_at(prototxt.read_solver, path, 3, 10, "'base_lr'", "more than once")


# ---------------------------------------------------------------------------------------------
# Binary nets and writing
# ---------------------------------------------------------------------------------------------

def test_binary_net_detected_and_upgraded(tmp_path):
    v1 = text_format.Parse("name: 'b' layers { name: 'ip' type: INNER_PRODUCT blobs_lr: 2 "
                           "blobs { data: 1.5 } }", caffe_pb2.NetParameter())
    for name in ("w.caffemodel", "weights.bin"):
        path = write(tmp_path, name, v1.SerializeToString())
        net = prototxt.read_net(path)
        assert net.layer[0].type == "InnerProduct"
        assert net.layer[0].param[0].lr_mult == 2
        assert list(net.layer[0].blobs[0].data) == [1.5]
    assert prototxt.read_net_binary(path) == net


def test_corrupt_binary_net(tmp_path):
    path = write(tmp_path, "bad.caffemodel", b"\x0a\xff\xff\xff")
    with pytest.raises(ProtoError, match=r"bad\.caffemodel: not a valid binary NetParameter"):
        prototxt.read_net(path)
    path = write(tmp_path, "bad.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 8)
    with pytest.raises(ProtoError, match="HDF5"):
        prototxt.read_net(path)


def test_write_text_round_trip_is_atomic(tmp_path):
    net = prototxt.read_net(os.path.join(SHIPPED, "lenet_train_test.prototxt"))
    out = str(tmp_path / "out.prototxt")
    prototxt.write_text(out, net)
    prototxt.write_text(out, net)  # overwriting works too
    assert prototxt.read_net(out) == net
    assert os.listdir(tmp_path) == ["out.prototxt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ProtoError, match="no_dir"):
        prototxt.write_text(str(tmp_path / "no_dir" / "x.prototxt"), net)


def test_parse_strings():
    net = prototxt.parse_net_text("layers { name: 'r' type: RELU }")
    assert net.layer[0].type == "ReLU"
    solver = prototxt.parse_solver_text("net: 'x' solver_type: ADAM")
    assert solver.type == "Adam"
    with pytest.raises(ProtoError, match=r"^my\.txt:1:10: "):
        prototxt.parse_solver_text("net: 'x' bogus: 1", "my.txt")
