"""jcaffe.upgrade against Caffe's upgrade_proto.cpp semantics.

Expected protos are written by hand; the V0 cases are those of Caffe's test_upgrade_proto.cpp
(PaddingLayerUpgradeTest, NetUpgradeTest::TestSimple, SolverTypeUpgradeTest).
"""

import os

import pytest
from google.protobuf import text_format

from jcaffe import upgrade
from jcaffe.errors import ProtoError
from jcaffe.proto import caffe_pb2

DATA = os.path.join(os.path.dirname(__file__), "data")


def net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def v0_fixture() -> caffe_pb2.NetParameter:
    with open(os.path.join(DATA, "proto_v0_padding.prototxt")) as f:
        return net(f.read())


def assert_same(actual, expected):
    assert text_format.MessageToString(actual) == text_format.MessageToString(expected)
    assert actual == expected


V0_LAYER = """
layers {{
  layer {{ name: '{name}' type: '{type}' {extra} }}
  {wiring}
}}
"""

# Caffe's PaddingLayerUpgradeTest::TestSimple expected output: pad1 gone, conv1 padded and fed
# from 'data'.
V0_PADDED = """
name: 'CaffeNet'
layers {
  layer { name: 'data' type: 'data' source: '/home/jiayq/Data/ILSVRC12/train-leveldb'
          meanfile: '/home/jiayq/Data/ILSVRC12/image_mean.binaryproto' batchsize: 256
          cropsize: 227 mirror: true }
  top: 'data' top: 'label'
}
layers {
  layer { name: 'conv1' type: 'conv' num_output: 96 kernelsize: 11 stride: 4 pad: 2
          weight_filler { type: 'gaussian' std: 0.01 } bias_filler { type: 'constant' value: 0. }
          blobs_lr: 1. blobs_lr: 2. weight_decay: 1. weight_decay: 0. }
  bottom: 'data' top: 'conv1'
}
layers {
  layer { name: 'fc8' type: 'innerproduct' num_output: 1000
          weight_filler { type: 'gaussian' std: 0.01 } bias_filler { type: 'constant' value: 0 }
          blobs_lr: 1. blobs_lr: 2. weight_decay: 1. weight_decay: 0. }
  bottom: 'conv1' top: 'fc8'
}
layers { layer { name: 'loss' type: 'softmax_loss' } bottom: 'fc8' bottom: 'label' }
"""

# Caffe's NetUpgradeTest::TestSimple expected V1 and V2 nets.
V1_EXPECTED = """
name: 'CaffeNet'
layers {
  name: 'data' type: DATA
  data_param { source: '/home/jiayq/Data/ILSVRC12/train-leveldb' batch_size: 256 }
  transform_param { crop_size: 227 mirror: true
                    mean_file: '/home/jiayq/Data/ILSVRC12/image_mean.binaryproto' }
  top: 'data' top: 'label'
}
layers {
  name: 'conv1' type: CONVOLUTION
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 pad: 2
                      weight_filler { type: 'gaussian' std: 0.01 }
                      bias_filler { type: 'constant' value: 0. } }
  blobs_lr: 1. blobs_lr: 2. weight_decay: 1. weight_decay: 0.
  bottom: 'data' top: 'conv1'
}
layers {
  name: 'fc8' type: INNER_PRODUCT
  inner_product_param { num_output: 1000 weight_filler { type: 'gaussian' std: 0.01 }
                        bias_filler { type: 'constant' value: 0 } }
  blobs_lr: 1. blobs_lr: 2. weight_decay: 1. weight_decay: 0.
  bottom: 'conv1' top: 'fc8'
}
layers { name: 'loss' type: SOFTMAX_LOSS bottom: 'fc8' bottom: 'label' }
"""

V2_EXPECTED = """
name: 'CaffeNet'
layer {
  name: 'data' type: 'Data'
  data_param { source: '/home/jiayq/Data/ILSVRC12/train-leveldb' batch_size: 256 }
  transform_param { crop_size: 227 mirror: true
                    mean_file: '/home/jiayq/Data/ILSVRC12/image_mean.binaryproto' }
  top: 'data' top: 'label'
}
layer {
  name: 'conv1' type: 'Convolution'
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 pad: 2
                      weight_filler { type: 'gaussian' std: 0.01 }
                      bias_filler { type: 'constant' value: 0. } }
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  bottom: 'data' top: 'conv1'
}
layer {
  name: 'fc8' type: 'InnerProduct'
  inner_product_param { num_output: 1000 weight_filler { type: 'gaussian' std: 0.01 }
                        bias_filler { type: 'constant' value: 0 } }
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  bottom: 'conv1' top: 'fc8'
}
layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'fc8' bottom: 'label' }
"""


# ---------------------------------------------------------------------------------------------
# V0
# ---------------------------------------------------------------------------------------------

def test_v0_padding_layer_folded_into_conv():
    src = v0_fixture()
    before = text_format.MessageToString(src)
    padded = upgrade.upgrade_v0_padding_layers(src)
    assert_same(padded, net(V0_PADDED))
    # Idempotent, and the input is left alone.
    assert_same(upgrade.upgrade_v0_padding_layers(padded), padded)
    assert text_format.MessageToString(src) == before


def test_v0_padding_layer_feeding_two_convs():
    # Caffe's PaddingLayerUpgradeTest::TestTwoTops: both consumers get the pad and the bottom.
    src = net(
        "input: 'data' "
        "layers { layer { name: 'pad1' type: 'padding' pad: 3 } bottom: 'data' top: 'pad1' } "
        "layers { layer { name: 'conv1' type: 'conv' kernelsize: 5 } bottom: 'pad1' top: 'c1' } "
        "layers { layer { name: 'pool2' type: 'pool' kernelsize: 2 } bottom: 'pad1' top: 'p2' }")
    expected = net(
        "input: 'data' "
        "layers { layer { name: 'conv1' type: 'conv' kernelsize: 5 pad: 3 } "
        "         bottom: 'data' top: 'c1' } "
        "layers { layer { name: 'pool2' type: 'pool' kernelsize: 2 pad: 3 } "
        "         bottom: 'data' top: 'p2' }")
    assert_same(upgrade.upgrade_v0_padding_layers(src), expected)


def test_v0_to_v1_to_v2_matches_caffes_test_simple():
    problems = []
    v1 = upgrade.upgrade_v0_net(v0_fixture(), problems)
    assert problems == []
    assert_same(v1, net(V1_EXPECTED))
    assert_same(upgrade.upgrade_v1_net(v1), net(V2_EXPECTED))
    # The whole chain in one call.
    out, problems = upgrade.upgrade_net_as_needed(v0_fixture(), "v0.prototxt")
    assert problems == []
    assert_same(out, net(V2_EXPECTED))


def test_v0_all_layer_parameters():
    src = net("""
      input: 'x' input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8 force_backward: true
      layers { layer { name: 'p' type: 'pool' pool: AVE kernelsize: 3 stride: 2 pad: 1 }
               bottom: 'x' top: 'p' }
      layers { layer { name: 'c' type: 'conv' num_output: 4 biasterm: false group: 2
                       kernelsize: 3 stride: 1 pad: 1 } bottom: 'p' top: 'c' }
      layers { layer { name: 'n' type: 'lrn' local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }
               bottom: 'c' top: 'n' }
      layers { layer { name: 'd' type: 'dropout' dropout_ratio: 0.3 } bottom: 'n' top: 'n' }
      layers { layer { name: 'cat' type: 'concat' concat_dim: 1 } bottom: 'n' bottom: 'c'
               top: 'cat' }
      layers { layer { name: 'img' type: 'images' source: 'list.txt' batchsize: 5 rand_skip: 2
                       shuffle_images: true new_height: 10 new_width: 12 scale: 0.5 } top: 'i' }
      layers { layer { name: 'win' type: 'window_data' source: 'w.txt' batchsize: 4
                       det_fg_threshold: 0.6 det_bg_threshold: 0.4 det_fg_fraction: 0.3
                       det_context_pad: 16 det_crop_mode: 'square' } top: 'w' }
      layers { layer { name: 'h' type: 'hdf5_data' source: 'h.txt' batchsize: 7 } top: 'h' }
      layers { layer { name: 'o' type: 'hdf5_output'
                       hdf5_output_param { file_name: 'out.h5' } } bottom: 'h' }
      layers { layer { name: 'ig' type: 'infogain_loss' source: 'H.binaryproto' }
               bottom: 'c' bottom: 'h' }
    """)
    expected = net("""
      layer { name: 'input' type: 'Input' top: 'x'
              input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
      force_backward: true
      layer { name: 'p' type: 'Pooling' bottom: 'x' top: 'p'
              pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
      layer { name: 'c' type: 'Convolution' bottom: 'p' top: 'c'
              convolution_param { num_output: 4 bias_term: false group: 2 kernel_size: 3
                                  stride: 1 pad: 1 } }
      layer { name: 'n' type: 'LRN' bottom: 'c' top: 'n'
              lrn_param { local_size: 3 alpha: 0.5 beta: 0.25 k: 2 } }
      layer { name: 'd' type: 'Dropout' bottom: 'n' top: 'n'
              dropout_param { dropout_ratio: 0.3 } }
      layer { name: 'cat' type: 'Concat' bottom: 'n' bottom: 'c' top: 'cat'
              concat_param { concat_dim: 1 } }
      layer { name: 'img' type: 'ImageData' top: 'i'
              image_data_param { source: 'list.txt' batch_size: 5 rand_skip: 2 shuffle: true
                                 new_height: 10 new_width: 12 }
              transform_param { scale: 0.5 } }
      layer { name: 'win' type: 'WindowData' top: 'w'
              window_data_param { source: 'w.txt' batch_size: 4 fg_threshold: 0.6
                                  bg_threshold: 0.4 fg_fraction: 0.3 context_pad: 16
                                  crop_mode: 'square' } }
      layer { name: 'h' type: 'HDF5Data' top: 'h'
              hdf5_data_param { source: 'h.txt' batch_size: 7 } }
      layer { name: 'o' type: 'HDF5Output' bottom: 'h'
              hdf5_output_param { file_name: 'out.h5' } }
      layer { name: 'ig' type: 'InfogainLoss' bottom: 'c' bottom: 'h'
              infogain_loss_param { source: 'H.binaryproto' } }
    """)
    out, problems = upgrade.upgrade_net_as_needed(src)
    assert problems == []
    assert_same(out, expected)


def test_every_v0_field_is_handled():
    handled = (set(upgrade._V0_TYPED_FIELDS) | set(upgrade._V0_TRANSFORM_FIELDS)
               | upgrade._V0_OTHER_FIELDS)
    assert set(caffe_pb2.V0LayerParameter.DESCRIPTOR.fields_by_name) == handled


def test_v0_parameter_on_wrong_layer_type_is_a_logged_problem(caplog):
    src = net("layers { layer { name: 'r' type: 'relu' num_output: 3 kernelsize: 2 } "
              "         bottom: 'x' top: 'x' } input: 'x'")
    out, problems = upgrade.upgrade_net_as_needed(src)
    assert len(problems) == 2
    assert all("layer 'r'" in p and "'relu'" in p for p in problems)
    assert {"num_output" in p for p in problems} == {True, False}
    assert out.layer[0].type == "ReLU"
    assert not out.layer[0].HasField("convolution_param")
    with caplog.at_level("ERROR", logger="jcaffe.upgrade"):
        upgrade.upgrade_net(src, "old.prototxt")
    assert "old.prototxt" in caplog.text and "num_output" in caplog.text


@pytest.mark.parametrize("text, layer, words", [
    # Padding into a non conv/pool layer (Caffe's CHECK in UpgradeV0PaddingLayers).
    ("input: 'x' layers { layer { name: 'pad' type: 'padding' pad: 1 } bottom: 'x' top: 'p' } "
     "layers { layer { name: 'fc' type: 'innerproduct' } bottom: 'p' top: 'y' }", "fc",
     "conv or pool"),
    # The consumer of a padding layer must take a single bottom.
    ("input: 'x' layers { layer { name: 'pad' type: 'padding' pad: 1 } bottom: 'x' top: 'p' } "
     "layers { layer { name: 'c' type: 'conv' } bottom: 'p' bottom: 'x' top: 'y' }", "c",
     "one bottom"),
    # The padding layer must have one bottom and one top.
    ("input: 'x' input: 'z' "
     "layers { layer { name: 'pad' type: 'padding' pad: 1 } bottom: 'x' bottom: 'z' top: 'p' } "
     "layers { layer { name: 'c' type: 'conv' } bottom: 'p' top: 'y' }", "pad", "one bottom"),
    ("input: 'x' layers { layer { name: 'c' type: 'conv' } bottom: 'nowhere' top: 'y' }", "c",
     "unknown bottom blob 'nowhere'"),
    ("input: 'x' layers { layer { name: 'w' type: 'warp' } bottom: 'x' top: 'y' }", "w",
     "unknown V0 layer type 'warp'"),
])
def test_v0_impossible_upgrades_name_the_layer(text, layer, words):
    with pytest.raises(ProtoError) as e:
        upgrade.upgrade_net(net(text), "bad.prototxt")
    msg = str(e.value)
    assert msg.startswith("bad.prototxt: ")
    assert f"layer '{layer}'" in msg and words in msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# V1 -> V2
# ---------------------------------------------------------------------------------------------

# Caffe's UpgradeV1LayerType, written out independently of the module's table.
V1_TYPE_FACTS = [
    (0, ""), (35, "AbsVal"), (1, "Accuracy"), (30, "ArgMax"), (2, "BNLL"), (3, "Concat"),
    (37, "ContrastiveLoss"), (4, "Convolution"), (39, "Deconvolution"), (5, "Data"),
    (6, "Dropout"), (32, "DummyData"), (7, "EuclideanLoss"), (25, "Eltwise"), (38, "Exp"),
    (8, "Flatten"), (9, "HDF5Data"), (10, "HDF5Output"), (28, "HingeLoss"), (11, "Im2col"),
    (12, "ImageData"), (13, "InfogainLoss"), (14, "InnerProduct"), (15, "LRN"),
    (29, "MemoryData"), (16, "MultinomialLogisticLoss"), (34, "MVN"), (17, "Pooling"),
    (26, "Power"), (18, "ReLU"), (19, "Sigmoid"), (27, "SigmoidCrossEntropyLoss"),
    (36, "Silence"), (20, "Softmax"), (21, "SoftmaxWithLoss"), (22, "Split"), (33, "Slice"),
    (23, "TanH"), (24, "WindowData"), (31, "Threshold"),
]


def test_v1_layer_type_table_covers_every_enum_value():
    numbers = {v.number for v in caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR.values}
    assert numbers == {n for n, _ in V1_TYPE_FACTS}
    for number, name in V1_TYPE_FACTS:
        assert upgrade.upgrade_v1_layer_type(number) == name
        layer = upgrade.upgrade_v1_layer_parameter(caffe_pb2.V1LayerParameter(type=number))
        assert layer.HasField("type") and layer.type == name


def test_v1_layer_without_type_gets_none():
    layer = upgrade.upgrade_v1_layer_parameter(caffe_pb2.V1LayerParameter(name="x"))
    assert not layer.HasField("type")


def test_v1_every_param_submessage_is_copied():
    fields = [f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields
              if f.message_type is not None and f.name.endswith("_param")]
    assert len(fields) == 30
    for name in fields:
        v1 = caffe_pb2.V1LayerParameter(name="l")
        getattr(v1, name).SetInParent()
        out = upgrade.upgrade_v1_layer_parameter(v1)
        assert out.HasField(name), name
        assert [f.name for f, _ in out.ListFields()] == ["name", name]


def test_v1_param_specs_include_exclude_blobs_and_loss_weight():
    v1 = text_format.Parse("""
        name: 'ip' type: INNER_PRODUCT bottom: 'a' top: 'b'
        param: 'shared_w' param: 'shared_b'
        blob_share_mode: PERMISSIVE
        blobs_lr: 1 blobs_lr: 2 blobs_lr: 3
        weight_decay: 0.5
        loss_weight: 0.25
        include { phase: TEST stage: 's' } include { min_level: 2 }
        blobs { shape { dim: 2 } data: 1 data: 2 }
        inner_product_param { num_output: 7 }
    """, caffe_pb2.V1LayerParameter())
    expected = text_format.Parse("""
        name: 'ip' type: 'InnerProduct' bottom: 'a' top: 'b'
        param { name: 'shared_w' share_mode: PERMISSIVE lr_mult: 1 decay_mult: 0.5 }
        param { name: 'shared_b' lr_mult: 2 }
        param { lr_mult: 3 }
        loss_weight: 0.25
        include { phase: TEST stage: 's' } include { min_level: 2 }
        blobs { shape { dim: 2 } data: 1 data: 2 }
        inner_product_param { num_output: 7 }
    """, caffe_pb2.LayerParameter())
    assert_same(upgrade.upgrade_v1_layer_parameter(v1), expected)
    ex = caffe_pb2.V1LayerParameter(name="e", type=caffe_pb2.V1LayerParameter.RELU)
    ex.exclude.add(phase=caffe_pb2.TRAIN)
    assert list(upgrade.upgrade_v1_layer_parameter(ex).exclude) == list(ex.exclude)


def test_v1_net_keeps_net_level_fields():
    src = net("name: 'n' force_backward: true state { phase: TRAIN level: 3 } "
              "layers { name: 'r' type: RELU bottom: 'x' top: 'x' } "
              "input: 'x' input_shape { dim: 2 dim: 5 }")
    out = upgrade.upgrade_net(src)
    expected = net("name: 'n' force_backward: true state { phase: TRAIN level: 3 } "
                   "layer { name: 'input' type: 'Input' top: 'x' "
                   "        input_param { shape { dim: 2 dim: 5 } } } "
                   "layer { name: 'r' type: 'ReLU' bottom: 'x' top: 'x' }")
    assert_same(out, expected)


def test_mixing_layer_and_layers_is_refused():
    src = net("layer { name: 'a' type: 'ReLU' } layers { name: 'b' type: RELU }")
    with pytest.raises(ProtoError, match=r"^mixed\.prototxt: .*'layer'.*'layers'"):
        upgrade.upgrade_net(src, "mixed.prototxt")


def test_data_transformation_fields_move_to_transform_param():
    src = net("""
      layers { name: 'd' type: DATA
               data_param { source: 's' batch_size: 2 scale: 0.5 mean_file: 'm' crop_size: 3
                            mirror: true } }
      layers { name: 'i' type: IMAGE_DATA image_data_param { source: 'l' mirror: false } }
      layers { name: 'w' type: WINDOW_DATA window_data_param { crop_size: 9 } }
      layers { name: 'h' type: HDF5_DATA hdf5_data_param { source: 'h' } }
    """)
    assert upgrade.net_needs_data_upgrade(src)
    out = upgrade.upgrade_net_data_transformation(src)
    assert not upgrade.net_needs_data_upgrade(out)
    expected = net("""
      layers { name: 'd' type: DATA data_param { source: 's' batch_size: 2 }
               transform_param { scale: 0.5 mean_file: 'm' crop_size: 3 mirror: true } }
      layers { name: 'i' type: IMAGE_DATA image_data_param { source: 'l' }
               transform_param { mirror: false } }
      layers { name: 'w' type: WINDOW_DATA window_data_param { }
               transform_param { crop_size: 9 } }
      layers { name: 'h' type: HDF5_DATA hdf5_data_param { source: 'h' } }
    """)
    assert_same(out, expected)


# ---------------------------------------------------------------------------------------------
# Inputs, BatchNorm, detection
# ---------------------------------------------------------------------------------------------

def test_input_dim_becomes_first_input_layer():
    src = net("input: 'data' input: 'label' "
              "input_dim: 10 input_dim: 3 input_dim: 227 input_dim: 227 "
              "input_dim: 10 input_dim: 1 input_dim: 1 input_dim: 1 "
              "layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'data' bottom: 'label' }")
    expected = net("layer { name: 'input' type: 'Input' top: 'data' top: 'label' "
                   "        input_param { shape { dim: 10 dim: 3 dim: 227 dim: 227 } "
                   "                      shape { dim: 10 dim: 1 dim: 1 dim: 1 } } } "
                   "layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'data' "
                   "        bottom: 'label' }")
    assert upgrade.net_needs_input_upgrade(src)
    assert_same(upgrade.upgrade_net(src), expected)


def test_input_without_shape_is_dropped():
    src = net("input: 'data' layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'data' }")
    assert_same(upgrade.upgrade_net(src),
                net("layer { name: 'r' type: 'ReLU' bottom: 'data' top: 'data' }"))


@pytest.mark.parametrize("text, words", [
    ("input: 'a' input: 'b' input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4",
     "8 'input_dim' values"),
    ("input: 'a' input: 'b' input_shape { dim: 1 }", "only 1 'input_shape'"),
])
def test_input_shape_count_mismatch(text, words):
    with pytest.raises(ProtoError, match=words):
        upgrade.upgrade_net(net(text + " layer { name: 'r' type: 'ReLU' }"), "in.prototxt")


def test_batch_norm_three_param_specs_get_zero_multipliers():
    src = net("""
      layer { name: 'bn' type: 'BatchNorm' param { lr_mult: 1 name: 'm' } param { lr_mult: 1 }
              param { decay_mult: 3 } }
      layer { name: 'bn2' type: 'BatchNorm' param { lr_mult: 1 } }
      layer { name: 'bn3' type: 'BatchNorm' }
      layer { name: 'sc' type: 'Scale' param { lr_mult: 1 } param { lr_mult: 1 }
              param { lr_mult: 1 } }
    """)
    expected = net("""
      layer { name: 'bn' type: 'BatchNorm' param { lr_mult: 0 decay_mult: 0 name: 'm' }
              param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 } }
      layer { name: 'bn2' type: 'BatchNorm' param { lr_mult: 1 } }
      layer { name: 'bn3' type: 'BatchNorm' }
      layer { name: 'sc' type: 'Scale' param { lr_mult: 1 } param { lr_mult: 1 }
              param { lr_mult: 1 } }
    """)
    assert upgrade.net_needs_batch_norm_upgrade(src)
    out = upgrade.upgrade_net(src)
    assert_same(out, expected)
    # As in Caffe, three specs still read as "needs upgrade"; upgrading again changes nothing.
    assert_same(upgrade.upgrade_net(out), out)


def test_current_net_is_unchanged_and_input_never_mutated():
    src = net("name: 'n' layer { name: 'r' type: 'ReLU' bottom: 'x' top: 'x' }")
    assert not upgrade.net_needs_upgrade(src)
    out, problems = upgrade.upgrade_net_as_needed(src)
    assert problems == [] and out == src and out is not src
    v1 = net("layers { name: 'r' type: RELU }")
    snapshot = v1.SerializeToString()
    upgrade.upgrade_net(v1)
    assert v1.SerializeToString() == snapshot


# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------

SOLVER_BASE = ("net: 'examples/mnist/lenet_train_test.prototxt' test_iter: 100 "
               "test_interval: 500 base_lr: 0.01 momentum: 0.0 weight_decay: 0.0005 "
               "lr_policy: 'inv' gamma: 0.0001 power: 0.75 solver_mode: GPU ")


@pytest.mark.parametrize("old, new", [
    ("SGD", "SGD"), ("ADAGRAD", "AdaGrad"), ("NESTEROV", "Nesterov"), ("RMSPROP", "RMSProp"),
    ("ADADELTA", "AdaDelta"), ("ADAM", "Adam"),
])
def test_solver_type_enum_becomes_string(old, new):
    src = text_format.Parse(SOLVER_BASE + f"solver_type: {old}", caffe_pb2.SolverParameter())
    expected = text_format.Parse(SOLVER_BASE + f"type: '{new}'", caffe_pb2.SolverParameter())
    assert upgrade.solver_needs_type_upgrade(src)
    assert_same(upgrade.upgrade_solver(src), expected)


def test_solver_with_both_type_fields_is_refused():
    src = caffe_pb2.SolverParameter(solver_type=caffe_pb2.SolverParameter.ADAM, type="Adam")
    with pytest.raises(ProtoError, match=r"^s\.prototxt: .*'solver_type'.*'type'"):
        upgrade.upgrade_solver(src, "s.prototxt")


def test_solver_mode_as_number_or_name():
    by_number = text_format.Parse("solver_mode: 0", caffe_pb2.SolverParameter())
    by_name = text_format.Parse("solver_mode: CPU", caffe_pb2.SolverParameter())
    assert by_number == by_name and by_number.solver_mode == caffe_pb2.SolverParameter.CPU


def test_solver_embedded_nets_are_upgraded():
    src = text_format.Parse(
        "train_net_param { layers { name: 'r' type: RELU } } "
        "test_net_param { layers { name: 't' type: TANH } }", caffe_pb2.SolverParameter())
    assert upgrade.solver_needs_upgrade(src)
    out = upgrade.upgrade_solver(src)
    assert [l.type for l in out.train_net_param.layer] == ["ReLU"]
    assert [l.type for l in out.test_net_param[0].layer] == ["TanH"]
    assert len(out.train_net_param.layers) == 0
