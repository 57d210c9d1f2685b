"""jcaffe._atomic, the one writer behind every file jcaffe writes: the target is either its old
content or the complete new one, never half-written, and no temporary is left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jcaffe import _atomic, caffemodel, prototxt
from jcaffe.data import mean as data_mean
from jcaffe.errors import DataError, JcaffeError, ModelError, ProtoError
from jcaffe.proto import caffe_pb2


def _listing(folder):
    return sorted(os.listdir(folder))


def test_atomic_file_publishes_only_on_success(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_file(path) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".")
            with open(tmp, "wb") as f:
                f.write(b"half")
            assert path.read_bytes() == b"old"  # not visible before the end
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["f.bin"]
    with _atomic.atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new" and _listing(tmp_path) == ["f.bin"]


def test_atomic_file_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    _atomic.atomic_write(tmp_path / "f", b"x")
    assert events[:2] == ["fsync", "replace"]


@pytest.mark.parametrize("error", [ModelError, ProtoError, DataError])
def test_os_errors_become_the_callers_one_line_error(tmp_path, error):
    path = tmp_path / "missing" / "f.bin"
    with pytest.raises(error) as e:
        _atomic.atomic_write(path, b"x", error=error)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_error_none_lets_os_errors_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        _atomic.atomic_write(tmp_path / "missing" / "f.bin", b"x", error=None)
    with pytest.raises(ConnectionResetError):
        with _atomic.atomic_file(tmp_path / "g", error=None):
            raise ConnectionResetError("peer went away")
    assert _listing(tmp_path) == []


def test_make_parents(tmp_path):
    _atomic.atomic_write(tmp_path / "a" / "b" / "f", b"x", make_parents=True)
    assert (tmp_path / "a" / "b" / "f").read_bytes() == b"x"


def test_every_writer_goes_through_it(tmp_path, monkeypatch):
    """caffemodel, prototxt and mean files: a failing rename leaves the old file, no temporary,
    and each caller's error class."""
    targets = {
        "m.binaryproto": (lambda p: caffemodel.write_binaryproto(p, np.ones((1, 1, 2, 2))),
                          ModelError),
        "net.prototxt": (lambda p: prototxt.write_text(p, caffe_pb2.NetParameter(name="n")),
                         ProtoError),
        "mean.binaryproto": (lambda p: data_mean.write_mean_binaryproto(p, np.ones((1, 2, 2))),
                             ModelError),
    }
    for name in targets:
        (tmp_path / name).write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    for name, (write, error) in targets.items():
        with pytest.raises(error) as e:
            write(str(tmp_path / name))
        assert isinstance(e.value, JcaffeError) and "No space left" in str(e.value)
        assert (tmp_path / name).read_bytes() == b"old"
    assert _listing(tmp_path) == sorted(targets)


def test_atomic_dir_keeps_the_old_directory_on_failure(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_dir(str(target), overwrite=True) as tmp:
            (open(os.path.join(tmp, "new"), "w")).close()
            raise RuntimeError("converter died")
    assert _listing(target) == ["old"] and _listing(tmp_path) == ["ds"]
    with _atomic.atomic_dir(str(target), overwrite=True) as tmp:
        (open(os.path.join(tmp, "new"), "w")).close()
    assert _listing(target) == ["new"] and _listing(tmp_path) == ["ds"]
    with pytest.raises(DataError, match="already exists"):
        with _atomic.atomic_dir(str(target), overwrite=False):
            pass
