"""jcaffe.netstate: Caffe's Net::FilterNet / StateMeetsRule and NetState merging.

The filter cases are those of Caffe's test_net.cpp FilterNetTest, used as facts.
"""

import os

import pytest
from google.protobuf import text_format

from jcaffe import netstate
from jcaffe.errors import NetError, SolverError
from jcaffe.prototxt import read_net, read_solver
from jcaffe.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET = """
name: 'TestNetwork'
layer {{ name: 'data' type: 'Data' top: 'data' top: 'label' {data} }}
layer {{ name: 'innerprod' type: 'InnerProduct' bottom: 'data' top: 'innerprod' {ip} }}
layer {{ name: 'loss' type: 'SoftmaxWithLoss' bottom: 'innerprod' bottom: 'label' {loss} }}
"""


def make(state="", data="", ip="", loss=""):
    text = (f"state: {{ {state} }} " if state else "") + NET.format(data=data, ip=ip, loss=loss)
    return text_format.Parse(text, caffe_pb2.NetParameter())


def kept(net, state=None):
    out = netstate.filter_net(net, state)
    # Filtering is idempotent (Caffe's RunFilterNetTest checks it too); the result carries
    # the state it was filtered for.
    assert netstate.filter_net(out) == out
    return [layer.name for layer in out.layer]


ALL = ["data", "innerprod", "loss"]


@pytest.mark.parametrize("state, rules, expected", [
    # TestNoFilter
    ("", {}, ALL),
    # TestFilterOutByStage / Stage2
    ("", {"data": "include: { stage: 'mystage' }"}, ["innerprod", "loss"]),
    ("", {"ip": "include: { stage: 'mystage' }"}, ["data", "loss"]),
    # TestFilterInByStage / Stage2
    ("stage: 'mystage'", {"ip": "include: { stage: 'mystage' }"}, ALL),
    ("", {"ip": "exclude: { stage: 'mystage' }"}, ALL),
    # TestFilterOutByMultipleStage: the state must hold every stage of a rule.
    ("stage: 'mystage'", {"ip": "include: { stage: 'mystage' stage: 'myotherstage' }",
                          "loss": "include: { stage: 'mystage' }"}, ["data", "loss"]),
    # TestFilterInByMultipleStage: any include rule suffices.
    ("stage: 'mystage'", {"ip": "include: { stage: 'myotherstage' } include: { stage: 'mystage' }",
                          "loss": "include: { stage: 'mystage' }"}, ALL),
    # TestFilterInByMultipleStage2
    ("stage: 'mystage' stage: 'myotherstage'",
     {"ip": "include: { stage: 'mystage' stage: 'myotherstage' }",
      "loss": "include: { stage: 'mystage' }"}, ALL),
    # TestFilterInByNotStage / TestFilterOutByNotStage
    ("stage: 'mystage'", {"ip": "include: { not_stage: 'myotherstage' }",
                          "loss": "include: { not_stage: 'myotherstage' }"}, ALL),
    ("stage: 'mystage'", {"ip": "include: { not_stage: 'mystage' }",
                          "loss": "include: { not_stage: 'mystage' }"}, ["data"]),
    # TestFilterOutByMinLevel / MaxLevel (the default level is 0)
    ("", {"ip": "include: { min_level: 3 }"}, ["data", "loss"]),
    ("", {"ip": "include: { max_level: -3 }"}, ["data", "loss"]),
    # TestFilterInByMinLevel / MinLevel2 / MaxLevel / MaxLevel2
    ("", {"ip": "include: { min_level: 0 }"}, ALL),
    ("level: 7", {"ip": "include: { min_level: 3 }"}, ALL),
    ("", {"ip": "include: { max_level: 0 }"}, ALL),
    ("level: -7", {"ip": "include: { max_level: -3 }"}, ALL),
    # TestFilterInOutByIncludeMultiRule
    ("level: 4 phase: TRAIN", {"ip": "include: { min_level: 2 phase: TRAIN }",
                               "loss": "include: { min_level: 2 phase: TEST }"},
     ["data", "innerprod"]),
    ("level: 4 phase: TEST", {"ip": "include: { min_level: 2 phase: TRAIN }",
                              "loss": "include: { min_level: 2 phase: TEST }"}, ["data", "loss"]),
    # TestFilterInByIncludeMultiRule
    ("level: 2 phase: TRAIN", {"ip": "include: { min_level: 2 phase: TRAIN } "
                                     "include: { phase: TEST }",
                               "loss": "include: { min_level: 2 phase: TEST } "
                                       "include: { phase: TRAIN }"}, ALL),
    ("level: 2 phase: TEST", {"ip": "include: { min_level: 2 phase: TRAIN } "
                                    "include: { phase: TEST }",
                              "loss": "include: { min_level: 2 phase: TEST } "
                                      "include: { phase: TRAIN }"}, ALL),
    # TestFilterInOutByExcludeMultiRule
    ("level: 4 phase: TRAIN", {"ip": "exclude: { min_level: 2 phase: TRAIN }",
                               "loss": "exclude: { min_level: 2 phase: TEST }"},
     ["data", "loss"]),
    ("level: 4 phase: TEST", {"ip": "exclude: { min_level: 2 phase: TRAIN }",
                              "loss": "exclude: { min_level: 2 phase: TEST }"},
     ["data", "innerprod"]),
])
def test_filter_net_caffe_cases(state, rules, expected):
    assert kept(make(state, **rules)) == expected


def test_default_state_is_test_phase():
    # NetState's phase defaults to TEST: a TRAIN-only layer is out of a net with no state.
    net = make(ip="include: { phase: TRAIN }")
    assert kept(net) == ["data", "loss"]
    assert kept(net, netstate.make_state("TRAIN")) == ALL


def test_filter_lenet_train_and_test():
    # Caffe's TestFilterLeNetTrainTest, on our shipped LeNet.
    net = read_net(os.path.join(ROOT, "prototxt", "lenet_train_test.prototxt"))
    train = netstate.filter_net(net, netstate.make_state("TRAIN"))
    test = netstate.filter_net(net, netstate.make_state("TEST"))
    body = ["conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2"]
    assert [l.name for l in train.layer] == ["mnist"] + body + ["loss"]
    assert [l.name for l in test.layer] == ["mnist"] + body + ["accuracy", "loss"]
    assert train.layer[0].data_param.source == "datasets/mnist/mnist_train"
    assert test.layer[0].data_param.source == "datasets/mnist/mnist_test"
    assert train.state.phase == caffe_pb2.TRAIN and test.state.phase == caffe_pb2.TEST


def test_include_and_exclude_together_is_an_error():
    net = make(ip="include: { phase: TRAIN } exclude: { phase: TEST }")
    with pytest.raises(NetError, match="layer 'innerprod'.*include.*exclude"):
        netstate.filter_net(net)


def test_state_meets_rule_conditions():
    state = netstate.make_state("TEST", level=2, stages=["a", "b"])
    rule = caffe_pb2.NetStateRule
    assert netstate.state_meets_rule(state, rule())
    assert netstate.state_meets_rule(state, rule(phase=caffe_pb2.TEST, min_level=2, max_level=2,
                                                 stage=["a", "b"], not_stage=["c"]))
    assert not netstate.state_meets_rule(state, rule(phase=caffe_pb2.TRAIN))
    assert not netstate.state_meets_rule(state, rule(min_level=3))
    assert not netstate.state_meets_rule(state, rule(max_level=1))
    assert not netstate.state_meets_rule(state, rule(stage=["a", "c"]))
    assert not netstate.state_meets_rule(state, rule(not_stage=["b"]))


def test_make_state():
    s = netstate.make_state("train", 3, ["x", "y"])
    assert (s.phase, s.level, list(s.stage)) == (caffe_pb2.TRAIN, 3, ["x", "y"])
    assert netstate.make_state(caffe_pb2.TEST).phase == caffe_pb2.TEST
    assert list(netstate.make_state(stages="one").stage) == ["one"]
    with pytest.raises(NetError, match="phase 'VAL'"):
        netstate.make_state("VAL")


def test_train_and_test_state_merge_order():
    # Solver defaults < the net's own state < the solver's train_state / test_state.
    net = text_format.Parse("state { level: 5 stage: 'net' }", caffe_pb2.NetParameter())
    solver = text_format.Parse("train_state { stage: 'train' } "
                               "test_state { level: 1 } test_state { phase: TRAIN }",
                               caffe_pb2.SolverParameter())
    train = netstate.train_net_state(solver, net)
    assert (train.phase, train.level, list(train.stage)) == (caffe_pb2.TRAIN, 5, ["net", "train"])
    t0 = netstate.test_net_state(solver, net, 0)
    assert (t0.phase, t0.level, list(t0.stage)) == (caffe_pb2.TEST, 1, ["net"])
    t1 = netstate.test_net_state(solver, net, 1)
    assert (t1.phase, t1.level) == (caffe_pb2.TRAIN, 5)
    # The net's own phase overrides the solver default too.
    net_phase = text_format.Parse("state { phase: TRAIN }", caffe_pb2.NetParameter())
    assert netstate.test_net_state(caffe_pb2.SolverParameter(), net_phase, 0).phase == \
        caffe_pb2.TRAIN


def test_net_state_for_phase_level_stages():
    # Caffe's Net(file, phase, level, stages): phase and level replaced, stages appended.
    net = text_format.Parse("state { phase: TRAIN level: 4 stage: 'own' }",
                            caffe_pb2.NetParameter())
    s = netstate.net_state_for(net, "TEST", 1, ["extra"])
    assert (s.phase, s.level, list(s.stage)) == (caffe_pb2.TEST, 1, ["own", "extra"])


def test_autoencoder_test_nets_by_stage(monkeypatch):
    monkeypatch.chdir(ROOT)
    solver = read_solver("prototxt/mnist_autoencoder_solver.prototxt")
    sources = netstate.test_net_sources(solver)
    assert netstate.num_test_nets(solver) == 2
    assert [kind for kind, _ in sources] == ["net", "net"]
    net = read_net(sources[0][1])
    data_sources = []
    for i in range(2):
        state = netstate.test_net_state(solver, net, i)
        filtered = netstate.filter_net(net, state)
        data = [l for l in filtered.layer if l.type == "Data"]
        assert len(data) == 1
        data_sources.append(data[0].data_param.source)
    assert data_sources == ["datasets/mnist/mnist_train", "datasets/mnist/mnist_test"]
    train = netstate.filter_net(net, netstate.train_net_state(solver, net))
    assert [l.data_param.source for l in train.layer if l.type == "Data"] == \
        ["datasets/mnist/mnist_train"]


@pytest.mark.parametrize("text, words", [
    ("net: 'n' test_iter: 1", "test_interval"),
    ("test_net: 'a' test_net: 'b' test_iter: 1 test_interval: 5 train_net: 't'",
     "one 'test_iter' per test net"),
    ("net: 'n' test_iter: 1 test_iter: 2 test_state { } test_interval: 5", "test_state"),
    ("net: 'n' net_param { } test_iter: 1 test_interval: 5", "both 'net' and 'net_param'"),
])
def test_test_net_count_checks(text, words):
    with pytest.raises(SolverError, match=words):
        netstate.num_test_nets(text_format.Parse(text, caffe_pb2.SolverParameter()))


def test_test_net_sources_order():
    solver = text_format.Parse(
        "net_param { name: 'g' } test_net_param { name: 'p' } test_net: 'f.prototxt' "
        "test_iter: 1 test_iter: 2 test_iter: 3 test_iter: 4 test_interval: 10",
        caffe_pb2.SolverParameter())
    sources = netstate.test_net_sources(solver)
    assert [k for k, _ in sources] == ["test_net_param", "test_net", "net_param", "net_param"]
    assert sources[1][1] == "f.prototxt" and sources[2][1].name == "g"
