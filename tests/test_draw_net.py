"""draw_net: Caffe's caffe.draw graph of a net (nodes, edges, labels), as DOT / PNG / SVG."""

import pathlib
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from jcaffe import cli
from jcaffe.errors import JcaffeError
from jcaffe.prototxt import read_net
from jcaffe.tools import draw_net

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENET = ROOT / "prototxt/lenet_train_test.prototxt"

_NODE = re.compile(r'^\s*"([^"]+)" \[(.*)\];$')
_EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[label="([^"]*)"\];$')
_ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_dot(text):
    """{node: {attr: value}}, [(src, dst, label)] from the DOT text."""
    nodes, edges = {}, []
    for line in text.splitlines():
        if m := _EDGE.match(line):
            edges.append(m.groups())
        elif m := _NODE.match(line):
            nodes[m.group(1)] = dict(_ATTR.findall(m.group(2)))
    return nodes, edges


def lenet_dot(tmp_path, *flags):
    out = tmp_path / "lenet.dot"
    assert cli.main(["draw_net", str(LENET), str(out), *flags]) == 0
    return parse_dot(out.read_text())


# The LeNet graph of Caffe's draw.py, by hand: (src, dst, edge label).
LENET_TEST_EDGES = [
    ("mnist_Data", "data_blob", "Batch 100"), ("mnist_Data", "label_blob", "Batch 100"),
    ("data_blob", "conv1_Convolution", ""), ("conv1_Convolution", "conv1_blob", "20"),
    ("conv1_blob", "pool1_Pooling", ""), ("pool1_Pooling", "pool1_blob", ""),
    ("pool1_blob", "conv2_Convolution", ""), ("conv2_Convolution", "conv2_blob", "50"),
    ("conv2_blob", "pool2_Pooling", ""), ("pool2_Pooling", "pool2_blob", ""),
    ("pool2_blob", "ip1_InnerProduct", ""), ("ip1_InnerProduct", "ip1_blob", "500"),
    ("ip1_blob", "relu1_ReLU", ""), ("relu1_ReLU", "ip1_blob", ""),
    ("ip1_blob", "ip2_InnerProduct", ""), ("ip2_InnerProduct", "ip2_blob", "10"),
    ("ip2_blob", "accuracy_Accuracy", ""), ("label_blob", "accuracy_Accuracy", ""),
    ("accuracy_Accuracy", "accuracy_blob", ""),
    ("ip2_blob", "loss_SoftmaxWithLoss", ""), ("label_blob", "loss_SoftmaxWithLoss", ""),
    ("loss_SoftmaxWithLoss", "loss_blob", ""),
]


def test_lenet_test_phase_graph(tmp_path):
    nodes, edges = lenet_dot(tmp_path, "--phase", "TEST")
    assert edges == LENET_TEST_EDGES
    blobs = {"data", "label", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "accuracy", "loss"}
    assert {n for n in nodes if n.endswith("_blob")} == {b + "_blob" for b in blobs}
    for b in blobs:
        assert nodes[b + "_blob"] == {"label": b, "shape": "octagon", "fillcolor": "#E0E0E0",
                                      "style": "filled"}
    assert len(nodes) == len(blobs) + 10
    assert nodes["conv1_Convolution"]["label"] == \
        r"conv1\n(Convolution)\nkernel size: 5\nstride: 1\npad: 0"
    assert nodes["pool2_Pooling"]["label"] == r"pool2\n(Pooling MAX)\nkernel size: 2\nstride: 2\npad: 0"
    assert nodes["ip1_InnerProduct"]["label"] == r"ip1\n(InnerProduct)"
    colors = {n: a["fillcolor"] for n, a in nodes.items() if a["shape"] == "record"}
    assert colors == {"mnist_Data": "#6495ED", "conv1_Convolution": "#FF5050",
                      "conv2_Convolution": "#FF5050", "pool1_Pooling": "#FF9900",
                      "pool2_Pooling": "#FF9900", "ip1_InnerProduct": "#CC33FF",
                      "ip2_InnerProduct": "#CC33FF", "relu1_ReLU": "#90EE90",  # in place
                      "accuracy_Accuracy": "#6495ED", "loss_SoftmaxWithLoss": "#6495ED"}


def test_phases_and_rankdir(tmp_path):
    nodes, edges = lenet_dot(tmp_path, "--phase=TRAIN", "--rankdir=TB")
    assert "accuracy_Accuracy" not in nodes and "accuracy_blob" not in nodes
    assert [e for e in edges if e[0] == "mnist_Data"] == [
        ("mnist_Data", "data_blob", "Batch 64"), ("mnist_Data", "label_blob", "Batch 64")]
    # vertical layouts separate the words with spaces, as Caffe
    assert nodes["conv2_Convolution"]["label"] == \
        "conv2 (Convolution) kernel size: 5 stride: 1 pad: 0"
    nodes, edges = lenet_dot(tmp_path)  # ALL: both data layers, one node, four edges
    assert [e[2] for e in edges if e[0] == "mnist_Data"] == ["Batch 64"] * 2 + ["Batch 100"] * 2
    assert "accuracy_Accuracy" in nodes


def test_display_lrm():
    net = read_net(str(LENET))
    nodes, _ = parse_dot(draw_net.net_to_dot(net, "LR", display_lrm=True))
    assert nodes["ip2_InnerProduct"]["label"] == r"ip2\n(InnerProduct)\nlr mult: 1.0, 2.0"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_png_and_svg(tmp_path):
    png, svg = tmp_path / "lenet.png", tmp_path / "lenet.svg"
    assert cli.main(["draw_net", str(LENET), str(png)]) == 0
    assert cli.main(["draw_net", "-rankdir", "TB", str(LENET), str(svg)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.load()
        assert im.width > im.height > 50  # left to right: wide
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"conv1 (Convolution) kernel size: 5 stride: 1 pad: 0", "relu1 (ReLU)", "ip1",
            "Batch 64", "Batch 100", "500"} <= texts


def test_errors(tmp_path, capsys, monkeypatch):
    assert cli.main(["draw_net", str(LENET), str(tmp_path / "x.png"), "--phase", "VAL"]) == 1
    assert "unknown phase" in capsys.readouterr().err
    assert cli.main(["draw_net", str(LENET), str(tmp_path / "x.png"), "--rankdir", "UP"]) == 1
    assert "--rankdir must be one of" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(["draw_net", str(LENET), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Graphviz" in err[0] and "apt-get install graphviz" in err[0]
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(JcaffeError, match="dot"):
        draw_net.render("digraph { a }", "png")
