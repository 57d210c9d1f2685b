"""caffe.proto: Caffe's wire format, and the committed caffe_pb2 in sync with the schema."""

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from jcaffe.proto import caffe_pb2


def test_generated_module_matches_proto():
    regenerate = pytest.importorskip("jcaffe.proto.regenerate")
    pytest.importorskip("grpc_tools")
    compiled = descriptor_pb2.FileDescriptorProto.FromString(regenerate.compile_descriptor())
    committed = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    # protoc records json_name in descriptor sets but not in generated modules.
    for fdp in (compiled, committed):
        for msg in _all_messages(fdp.message_type):
            for f in msg.field:
                f.ClearField("json_name")
                # protoc prints float defaults at different precisions ("1e-08" vs
                # "9.99999994e-09"): compare them as the float32 the wire format holds.
                if f.HasField("default_value") and f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
                    f.default_value = repr(float(np.float32(float(f.default_value))))
    assert committed.package == "caffe"
    assert list(committed.message_type) == list(compiled.message_type), \
        "caffe_pb2.py is stale: run `python -m jcaffe.proto.regenerate`"
    assert list(committed.enum_type) == list(compiled.enum_type)


def _all_messages(messages):
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


@pytest.mark.parametrize("message, field, number", [
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2), ("NetParameter", "input_dim", 4),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "param", 6),
    ("V1LayerParameter", "blobs_lr", 7), ("V1LayerParameter", "layer", 1),
    ("V0LayerParameter", "kernelsize", 8), ("BlobProto", "shape", 7), ("BlobProto", "data", 5),
    ("SolverParameter", "solver_type", 30), ("SolverParameter", "type", 40),
    ("SolverState", "history", 3), ("Datum", "float_data", 6), ("PoolingParameter", "round_mode", 13),
])
def test_field_numbers_are_caffes(message, field, number):
    assert getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field].number == number


def test_wire_bytes_hand_encoded():
    # A BlobProto with shape {dim: 2} and data [1.0] as Caffe writes it (packed repeated fields).
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.append(2)
    blob.data.append(1.0)
    # data (field 5, packed float) precedes shape (field 7, a message holding packed dim).
    assert blob.SerializeToString() == b"\x2a\x04\x00\x00\x80\x3f\x3a\x03\x0a\x01\x02"
    assert caffe_pb2.BlobProto.FromString(blob.SerializeToString()) == blob
