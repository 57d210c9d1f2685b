"""Regenerates ``caffe_pb2.py`` from ``caffe.proto`` with the pinned protoc (grpcio-tools).

    pip install -e '.[dev]' && python -m jcaffe.proto.regenerate

The generated module is committed so that installing jcaffe needs no compiler; the test
suite checks that it describes exactly the schema in ``caffe.proto``.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def compile_descriptor(proto_dir: pathlib.Path = HERE) -> bytes:
    """The serialized FileDescriptorProto that protoc makes of caffe.proto."""
    import tempfile

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "caffe.desc"
        rc = protoc.main(["protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}", "caffe.proto"])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / 'caffe.proto'} (exit {rc})")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0].SerializeToString()


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", "caffe.proto"])
    if rc == 0:
        print(f"wrote {HERE / 'caffe_pb2.py'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
