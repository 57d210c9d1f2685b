"""The README's Python examples run as written (from the repository root)."""

import pathlib
import re


REPO = pathlib.Path(__file__).resolve().parents[1]


def test_python_examples_run(monkeypatch, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(REPO)
    if not (REPO / "datasets" / "mnist" / "mnist_train").exists():
        from jcaffe.data import mnist
        mnist.create(str(REPO / "datasets" / "mnist"), log=lambda *a: None)
    code = "\n".join(blocks).replace('"lenet.caffemodel"', repr(str(tmp_path / "lenet.caffemodel")))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["blobs"]["prob"].shape == (64, 10)
    assert set(namespace["params"]) == {"conv1", "conv2", "ip1", "ip2"}
