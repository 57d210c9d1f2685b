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


# -- the SSD fork's schema (ssd.proto, package caffe.ssd) -------------------------------------
def _normalized(fdp):
    for msg in _all_messages(fdp.message_type):
        for f in msg.field:
            f.ClearField("json_name")
            if f.HasField("default_value") and f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
                f.default_value = repr(float(np.float32(float(f.default_value))))
    return fdp


def test_ssd_module_matches_proto():
    regenerate = pytest.importorskip("jcaffe.proto.regenerate")
    pytest.importorskip("grpc_tools")
    from jcaffe.proto import ssd_pb2

    compiled = _normalized(descriptor_pb2.FileDescriptorProto.FromString(
        regenerate.compile_descriptor(name="ssd.proto")))
    committed = _normalized(descriptor_pb2.FileDescriptorProto.FromString(
        ssd_pb2.DESCRIPTOR.serialized_pb))
    assert committed.package == "caffe.ssd"
    assert list(committed.message_type) == list(compiled.message_type), \
        "ssd_pb2.py is stale: run `python -m jcaffe.proto.regenerate`"


def test_bvlc_schema_is_untouched_by_the_fork():
    # BVLC's LayerParameter has exactly BVLC's fields; none of the fork's numbers 200-207.
    numbers = {f.number for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields}
    assert not numbers & set(range(200, 208))
    assert "norm_param" not in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("name", ["NetParameter", "LayerParameter", "TransformationParameter"])
def test_ssd_copies_hold_every_bvlc_field_unchanged(name):
    from jcaffe.proto import ssd_pb2

    bvlc = getattr(caffe_pb2, name).DESCRIPTOR
    fork = getattr(ssd_pb2, name).DESCRIPTOR
    for f in bvlc.fields:
        g = fork.fields_by_name[f.name]
        assert (g.number, g.type, g.is_repeated, g.default_value) == \
            (f.number, f.type, f.is_repeated, f.default_value), f.name
        if f.message_type is not None and f.message_type.name not in (
                "LayerParameter", "TransformationParameter"):
            assert g.message_type is f.message_type, f.name


# Field numbers and defaults of weiliu89/caffe's ssd branch (src/caffe/proto/caffe.proto).
@pytest.mark.parametrize("message, field, number, default", [
    ("LayerParameter", "annotated_data_param", 200, None),
    ("LayerParameter", "multibox_loss_param", 201, None),
    ("LayerParameter", "permute_param", 202, None),
    ("LayerParameter", "prior_box_param", 203, None),
    ("LayerParameter", "detection_output_param", 204, None),
    ("LayerParameter", "detection_evaluate_param", 205, None),
    ("LayerParameter", "norm_param", 206, None),
    ("TransformationParameter", "resize_param", 8, None),
    ("TransformationParameter", "noise_param", 9, None),
    ("TransformationParameter", "emit_constraint", 10, None),
    ("TransformationParameter", "crop_h", 11, 0),
    ("TransformationParameter", "distort_param", 13, None),
    ("TransformationParameter", "expand_param", 14, None),
    ("NormalizeParameter", "eps", 4, 1e-10),
    ("NormalizeParameter", "across_spatial", 1, True),
    ("PriorBoxParameter", "offset", 13, 0.5),
    ("PriorBoxParameter", "flip", 4, True),
    ("DetectionOutputParameter", "keep_top_k", 7, -1),
    ("DetectionOutputParameter", "variance_encoded_in_target", 8, False),
    ("DetectionOutputParameter", "code_type", 6, 1),
    ("NonMaximumSuppressionParameter", "nms_threshold", 1, 0.3),
    ("NonMaximumSuppressionParameter", "eta", 3, 1.0),
    ("MultiBoxLossParameter", "match_type", 6, 1),
    ("MultiBoxLossParameter", "neg_pos_ratio", 12, 3.0),
    ("MultiBoxLossParameter", "mining_type", 20, 1),
    ("MultiBoxLossParameter", "ignore_cross_boundary_bbox", 18, False),
    ("MultiBoxLossParameter", "sample_size", 22, 64),
    ("DetectionEvaluateParameter", "overlap_threshold", 3, 0.5),
    ("BatchSampler", "max_trials", 5, 100),
    ("AnnotatedDatum", "annotation_group", 3, None),
    ("NormalizedBBox", "difficult", 6, False),
    ("ExpansionParameter", "max_expand_ratio", 2, 1.0),
])
def test_ssd_field_numbers_and_defaults_are_the_forks(message, field, number, default):
    from jcaffe.proto import ssd_pb2

    f = getattr(ssd_pb2, message).DESCRIPTOR.fields_by_name[field]
    assert f.number == number
    if default is not None:
        assert f.default_value == pytest.approx(default, rel=1e-6)


def test_ssd_fields_survive_bvlc_message_and_text_writing(tmp_path):
    from jcaffe import prototxt
    from jcaffe.proto import ssd_layer

    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "n" type: "Normalize" bottom: "x" top: "y"\n'
            '        norm_param { across_spatial: false eps: 0.5 } }\n')
    net = prototxt.parse_net_text(text)
    assert isinstance(net, caffe_pb2.NetParameter)
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    p = ssd_layer(copy.layer[1]).norm_param
    assert (p.across_spatial, p.eps) == (False, 0.5)
    out = tmp_path / "n.prototxt"
    prototxt.write_text(str(out), net)
    assert "across_spatial: false" in out.read_text()
    again = prototxt.read_net(str(out))
    assert ssd_layer(again.layer[1]).norm_param.eps == 0.5


def test_ssd_solver_fields_get_the_fork_error(tmp_path):
    from jcaffe import prototxt
    from jcaffe.errors import ProtoError

    path = tmp_path / "solver.prototxt"
    path.write_text('net: "x.prototxt"\nbase_lr: 0.1\neval_type: "detection"\n')
    with pytest.raises(ProtoError) as e:
        prototxt.read_solver(str(path), resolve_paths=False)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3:1: field 'eval_type' belongs to a Caffe fork, SSD")
    assert "\n" not in msg and "remove it" in msg
