"""Regenerates ``caffe_pb2.py`` from ``caffe.proto`` and ``ssd_pb2.py`` from ``ssd.proto`` (the
SSD fork's fields, package ``caffe.ssd``) with the pinned protoc (grpcio-tools).

    pip install -e '.[dev]' && python -m jcaffe.proto.regenerate

The generated module is committed so that installing jcaffe needs no compiler; the test
suite checks that it describes exactly the schema in ``caffe.proto``.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


PROTOS = ("caffe.proto", "ssd.proto")
# protoc writes ``import caffe_pb2``; inside the package the module is jcaffe.proto.caffe_pb2.
_PLAIN_IMPORT = "import caffe_pb2 as caffe__pb2"
_PACKAGE_IMPORT = "from jcaffe.proto import caffe_pb2 as caffe__pb2"


def compile_descriptor(proto_dir: pathlib.Path = HERE, name: str = "caffe.proto") -> bytes:
    """The serialized FileDescriptorProto that protoc makes of ``name`` (caffe.proto or
    ssd.proto)."""
    import tempfile

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "caffe.desc"
        rc = protoc.main(["protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}", name])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / name} (exit {rc})")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return next(f for f in fds.file if f.name == name).SerializeToString()


def main() -> int:
    from grpc_tools import protoc

    for name in PROTOS:
        rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", name])
        if rc != 0:
            return rc
        out = HERE / name.replace(".proto", "_pb2.py")
        text = out.read_text()
        if _PLAIN_IMPORT in text:
            out.write_text(text.replace(_PLAIN_IMPORT, _PACKAGE_IMPORT))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
