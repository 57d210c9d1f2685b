"""net_spec: pycaffe's NetSpec / layers / params, checked against the shipped LeNet prototxt
and pycaffe's documented naming rules."""

import pathlib

import pytest
from google.protobuf import text_format

from jcaffe.errors import NetError
from jcaffe.net_spec import NetSpec, layers as L, params as P, to_proto
from jcaffe.proto import caffe_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def lenet_body(n):
    """The LeNet notebook's layers after the data layer (examples/01-learning-lenet)."""
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    n.conv1 = L.Convolution(n.data, param=lr, kernel_size=5, num_output=20, stride=1,
                            weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, param=lr, kernel_size=5, num_output=50, stride=1,
                            weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, param=lr, num_output=500, weight_filler=dict(type="xavier"),
                           bias_filler=dict(type="constant"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=lr, num_output=10, weight_filler=dict(type="xavier"),
                           bias_filler=dict(type="constant"))
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=caffe_pb2.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)


def data_layer(n, phase, source, batch_size):
    n.data, n.label = L.Data(name="mnist", include=dict(phase=phase), batch_size=batch_size,
                             source=source, transform_param=dict(scale=1. / 256), ntop=2)


def test_rebuilds_shipped_lenet():
    shipped = text_format.Parse((ROOT / "prototxt/lenet_train_test.prototxt").read_text(),
                                caffe_pb2.NetParameter())
    n = NetSpec()
    data_layer(n, caffe_pb2.TRAIN, "datasets/mnist/mnist_train", 64)
    lenet_body(n)
    t = NetSpec()
    data_layer(t, "TEST", "datasets/mnist/mnist_test", 100)
    net = n.to_proto()
    net.layer.insert(1, t.to_proto().layer[0])
    net.name = "LeNet"
    assert [l.name for l in net.layer] == [l.name for l in shipped.layer]
    for built, want in zip(net.layer, shipped.layer):
        # field by field, so that a difference names the layer and the field
        assert text_format.MessageToString(built) == text_format.MessageToString(want), want.name
        for field, value in want.ListFields():
            assert getattr(built, field.name) == value, (want.name, field.name)
        assert built.ListFields() == want.ListFields()
    assert net == shipped
    # the in-place ReLU: bottom and top are the blob it rewrites, the layer named as assigned
    relu = net.layer[7]
    assert (relu.name, list(relu.bottom), list(relu.top)) == ("relu1", ["ip1"], ["ip1"])


def test_auto_names_and_ntop():
    # pycaffe's rule: unnamed tops are <Type><k>, k counting per type in to_proto's visit order
    data, label = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)
    ip = L.InnerProduct(data, num_output=4)
    relu = L.ReLU(ip, in_place=True)
    loss = L.SoftmaxWithLoss(relu, label)
    net = to_proto(loss)
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in net.layer] == [
        ("DummyData1", "DummyData", [], ["DummyData1", "DummyData2"]),
        ("InnerProduct1", "InnerProduct", ["DummyData1"], ["InnerProduct1"]),
        ("ReLU1", "ReLU", ["InnerProduct1"], ["InnerProduct1"]),
        ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct1", "DummyData2"],
         ["SoftmaxWithLoss1"]),
    ]
    # repeated messages from a list of dicts; a scalar for a repeated field is one element
    assert [list(s.dim) for s in net.layer[0].dummy_data_param.shape] == [[2, 3], [2]]
    assert net.layer[1].inner_product_param.num_output == 4
    # ntop=0: the layer itself, named <Type><k>
    silence = L.Silence(data, ntop=0)
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.silence = L.Silence(n.data, ntop=0)
    net = n.to_proto()
    assert [(l.name, list(l.top)) for l in net.layer] == [("data", ["data"]), ("silence", [])]
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 2]
    assert to_proto(silence).layer[-1].name == "Silence1"


def test_param_routing():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 8, 8]))
    # kernel_size is repeated in ConvolutionParameter: a scalar becomes [5]; loss_weight and
    # propagate_down are LayerParameter fields; *param keywords go to the layer itself
    n.conv = L.Convolution(n.data, kernel_size=5, pad=[1, 2], num_output=3, loss_weight=0.5,
                           engine=P.Convolution.CAFFE, propagate_down=[False],
                           param=dict(lr_mult=0, decay_mult=0))
    layer = n.to_proto().layer[1]
    assert list(layer.convolution_param.kernel_size) == [5]
    assert list(layer.convolution_param.pad) == [1, 2]
    assert layer.convolution_param.engine == caffe_pb2.ConvolutionParameter.CAFFE == 1
    assert list(layer.loss_weight) == [0.5] and list(layer.propagate_down) == [False]
    assert [(p.lr_mult, p.decay_mult) for p in layer.param] == [(0, 0)]
    assert P.Pooling.AVE == caffe_pb2.PoolingParameter.AVE


@pytest.mark.parametrize("make, message", [
    (lambda d: L.Convolution(d, kernal_size=3), "no field 'kernal_size'"),
    (lambda d: L.Convolution(d, weight_filler="xavier"), "expected a dict"),
    (lambda d: L.Convolution(d, num_output="many"), "num_output"),
    (lambda d: L.Convolution("data"), "not a Top"),
])
def test_bad_specs(make, message):
    with pytest.raises(NetError, match=message):
        n = NetSpec()
        n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
        n.out = make(n.data)
        n.to_proto()


def test_lazy_export():
    import jcaffe
    import jcaffe.net_spec as module

    assert jcaffe.net_spec is module and jcaffe.net_spec.NetSpec is NetSpec
