"""The real Caffe nets and solvers in ``../shared/zoo``: every net whose layers jcaffe implements
(BVLC Caffe's, and the SSD fork's for SSD300) reads, upgrades and builds with the shapes and parameter counts published for it
(``MANIFEST.json``), and every solver gives the published learning rates.

Data layers read datasets that are not there: each is replaced by an Input layer of the shape
its ``batch_size`` and ``transform_param.crop_size`` imply (keeping its name and include/exclude
rules), with the per-item shape of the dataset it reads where the prototxt cannot say (below).
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import pytest

from jcaffe import prototxt, upgrade
from jcaffe.errors import JcaffeError
from jcaffe.layers.base import known_types
from jcaffe.net import Net
from jcaffe.proto import caffe_pb2
from jcaffe.sgd_solvers import learning_rate

ZOO = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "zoo"
MANIFEST = ZOO / "MANIFEST.json"
ENTRIES = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else []

DATA_TYPES = {"Data", "ImageData", "WindowData", "HDF5Data", "MemoryData", "Python"}
BATCH_FIELDS = ("data_param", "image_data_param", "window_data_param", "hdf5_data_param",
                "memory_data_param")

# Per-item shapes (without the batch axis) of the datasets the nets read, where neither the
# prototxt nor a crop says it: CIFAR-10 is 3x32x32, MNIST 1x28x28 (the siamese pairs stack two
# digits as channels), the hdf5_classification example has 4 features, the LRCN HDF5 streams
# hold 100 parallel sentences ("buffer_100"), FCN's Python data layer gives one VOC image
# (500x500 at most, the size fcn8s's deploy net uses) and its label map.
ITEM_SHAPES = {
    "cifar10_full_train_test.prototxt": {"data": (3, 32, 32)},
    "cifar10_full_sigmoid_train_test_bn.prototxt": {"data": (3, 32, 32)},
    "mnist_siamese_train_test.prototxt": {"pair_data": (2, 28, 28)},
    "lenet_consolidated_solver_v1net.prototxt": {"data": (1, 28, 28)},
    "hdf5_nonlinear_train_val.prototxt": {"data": (4,)},
    "coco_lrcn_caffenet_train.prototxt": {"cont_sentence": (100,), "input_sentence": (100,),
                                          "target_sentence": (100,)},
    "fcn32s_voc_train.prototxt": {"data": (3, 500, 500), "label": (1, 500, 500)},
}
# Python data layers give no batch_size: their batch.
PYTHON_DATA_BATCH = {"fcn32s_voc_train.prototxt": 1}
# The NetStates a solver gives each net: (phase, stages) pairs. LRCN's solver (BVLC/caffe
# #2033, lrcn_solver.prototxt) trains the factored 2-layer model on a frozen convnet.
LRCN = ("freeze-convnet", "factored", "2-layer")
STATES = {
    "coco_lrcn_caffenet_train.prototxt": [("TRAIN", LRCN), ("TEST", LRCN + ("test-on-val",)),
                                          ("TEST", LRCN + ("test-on-train",))],
}
# Layers the zoo nets use that other work brings: until they are registered, these nets xfail.
PENDING = {"LSTM", "RNN", "LSTMUnit", "Python"}


def entry_id(e):
    return e["file"]


def builds(e):
    """Whether jcaffe implements every layer type of the entry, BVLC's or a fork's (the SSD
    fork's Normalize, Permute, PriorBox, DetectionOutput)."""
    return set(e["non_standard_layer_types"]) <= set(known_types())


def nets():
    return [e for e in ENTRIES if e["kind"] != "solver" and builds(e)]


def solvers():
    return [e for e in ENTRIES if e["kind"] == "solver"]


pytestmark = pytest.mark.skipif(not ENTRIES, reason="../shared/zoo is absent")


def item_shape(file, lp, top):
    shapes = ITEM_SHAPES.get(file, {})
    if top in shapes:
        return shapes[top]
    if top != lp.top[0]:
        return ()  # a label (Data: one scalar per item)
    crop = lp.transform_param.crop_size
    if crop:
        return (3, crop, crop)  # the ImageNet nets: colour images cropped square
    raise AssertionError(f"{file}: no item shape for top '{top}' of layer '{lp.name}'")


def batch_size(file, lp):
    if lp.type == "Python":
        return PYTHON_DATA_BATCH[file]
    for f in BATCH_FIELDS:
        if lp.HasField(f):
            return int(getattr(lp, f).batch_size)
    raise AssertionError(f"{file}: layer '{lp.name}' has no batch_size")


def with_inputs(file, net_param, batch=None):
    """The net with data layers replaced by Input layers (include/exclude kept); ``batch``
    also rebatches existing Input layers (a manifest shape given at another batch size)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    for lp in net_param.layer:
        is_python_data = lp.type == "Python" and not len(lp.bottom)
        if lp.type in DATA_TYPES and (lp.type != "Python" or is_python_data):
            new = out.layer.add(name=lp.name, type="Input")
            new.top.extend(lp.top)
            new.include.extend(lp.include)
            new.exclude.extend(lp.exclude)
            n = batch or batch_size(file, lp)
            for top in lp.top:
                new.input_param.shape.add(dim=(n,) + tuple(item_shape(file, lp, top)))
            continue
        new = out.layer.add()
        new.CopyFrom(lp)
        if lp.type == "Input" and batch:
            for s in new.input_param.shape:
                s.dim[0] = batch
    return out


def pending_types(net_param):
    have = set(known_types())
    return sorted({lp.type for lp in net_param.layer if lp.type in PENDING} - have)


def states_for(e, phase=None):
    if e["file"] in STATES:
        return [s for s in STATES[e["file"]] if phase is None or s[0] == phase]
    phases = ["TEST"] if e["kind"] == "deploy" else ["TRAIN", "TEST"]
    return [(p, ()) for p in phases if phase is None or p == phase]


def read(e):
    path = ZOO / e["file"]
    if e["kind"] == "solver":
        sp = prototxt.read_solver(str(path), resolve_paths=False)
        return upgrade.upgrade_net(sp.net_param, str(path))
    return prototxt.read_net(str(path))


def build(e, phase, stages=(), batch=None):
    net_param = with_inputs(e["file"], read(e), batch)
    missing = pending_types(net_param)
    if missing:
        pytest.xfail(f"layer type not registered: {', '.join(missing)}")
    for lp in net_param.layer:
        if lp.type == "Python" and lp.python_param.module == "pyloss":
            # Caffe imports a Python layer's module from sys.path; the zoo ships none. The
            # tests' own pyloss.py is BVLC's example layer written anew.
            monkeypatch = pytest.MonkeyPatch()
            monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent / "data"))
            try:
                return Net(net_param, phase, stages=list(stages), verbose=False)
            finally:
                monkeypatch.undo()
    return Net(net_param, phase, stages=list(stages), verbose=False)


def learnable_count(net):
    return sum(int(math.prod(p.shape)) for p, layer in
               ((p, next(l for l in net.layers if l.name == p.layer)) for p in net.params_info)
               if not layer.stateful)


def params_by_name(net):
    """Prototxt layer name → its blob shapes (the first layer of a name, as Caffe looks up)."""
    out = {}
    for layer in net.layers:
        if layer.blob_shapes:
            out.setdefault(layer.param.name, [list(s) for s in layer.blob_shapes])
    return out


@pytest.mark.parametrize("e", nets(), ids=entry_id)
def test_net_builds_with_published_shapes(e):
    ex = e["expected"]
    built = {}
    for phase, stages in states_for(e):
        built[phase, stages] = build(e, phase, stages)
    first = next(iter(built.values()))
    if "param_shapes" in ex:
        got = params_by_name(first)
        assert {k: got.get(k) for k in ex["param_shapes"]} == ex["param_shapes"]
    for key in ("learnable_param_count", "unique_learnable_param_count",
                "inline_net_learnable_param_count"):
        if key in ex:
            assert learnable_count(first) == ex[key], key
    if "prelu_param_shapes" in ex:
        got = params_by_name(first)
        assert {k: got.get(k) for k in ex["prelu_param_shapes"]} == {
            k: [v] for k, v in ex["prelu_param_shapes"].items()}
    if "input_shapes" in ex:
        for top, shape in ex["input_shapes"].items():
            assert list(first.blob_shapes[top]) == shape
    if "output_blobs" in ex:
        assert first.output_names == ex["output_blobs"]
    if "num_priors" in ex:
        priors = [l for l in first.layers if l.type == "PriorBox"]
        assert sum(l.top_shapes[0][2] for l in priors) == 4 * ex["num_priors"]
    if "detection_out" in ex:
        # The fork's [1, 1, K, 7] with K found at run time: jcaffe's fixed-size top has
        # keep_top_k rows per image (padded with label -1 rows).
        for layer in (l for l in first.layers if l.type == "DetectionOutput"):
            assert layer.top_shapes[0] == (1, 1, layer.num * layer.keep_top_k, 7)
    if "test_outputs" in ex:
        test = next(n for (p, _), n in built.items() if p == "TEST")
        assert test.output_names == ex["test_outputs"]
    if "loss_weights" in ex:
        train = next(n for (p, _), n in built.items() if p == "TRAIN")
        weights = {t: w for l, ws in zip(train.layers, train.loss_weights)
                   for t, w in zip(l.top_names, ws)}
        assert {k: weights.get(k) for k in ex["loss_weights"]} == pytest.approx(
            ex["loss_weights"])
    if "shared_params" in ex:
        train = next(n for (p, _), n in built.items() if p == "TRAIN")
        assert sorted(p.name for p in train.params_info if p.name) == sorted(ex["shared_params"])
    if "upgraded_param_specs" in ex:
        for name, spec in ex["upgraded_param_specs"].items():
            got = [(p.lr_mult, p.decay_mult) for p in first.params_info if p.layer == name]
            assert got == list(zip(spec["lr_mult"], spec["decay_mult"]))
    for key, shapes in ex.items():
        m = re.fullmatch(r"(?:inline_net_)?blob_shapes(?:_(TRAIN|TEST))?(?:_batch(\d+))?", key)
        if not m or not isinstance(shapes, dict):
            continue
        phase = m.group(1) or states_for(e)[0][0]
        stages = states_for(e, phase)[0][1]
        n = build(e, phase, stages, int(m.group(2)) if m.group(2) else None)
        # A Python layer's top shape is whatever its module's reshape() says: BVLC's pyloss.py
        # calls top[0].reshape(1), where the manifest lists [] (its provenance covers only the
        # InnerProducts), so those tops are left out.
        python_tops = {t for l in n.layers if l.type == "Python" for t in l.top_names}
        want = {k: list(v) for k, v in shapes.items() if k not in python_tops}
        got = {k: list(n.blob_shapes[k]) if k in n.blob_shapes else None for k in want}
        assert got == want, key


@pytest.mark.parametrize("e", [e for e in nets() if "batchnorm_params_learnable" in e["expected"]],
                         ids=entry_id)
def test_batch_norm_statistics_are_not_learnable(e):
    n = build(e, "TRAIN")
    bn = [l for l in n.layers if l.type == "BatchNorm"]
    assert bn
    for layer in bn:
        c = layer.bottom_shapes[0][1]
        assert layer.blob_shapes == [(c,), (c,), (1,)]
        assert all(p.lr_mult == 0 for p in n.params_info if p.layer == layer.name)


@pytest.mark.parametrize("e", solvers(), ids=entry_id)
def test_solver_reads_with_published_learning_rates(e):
    sp = prototxt.read_solver(str(ZOO / e["file"]), resolve_paths=False)
    ex = e["expected"]
    for it, rate in ex["lr_at_iter"].items():
        assert learning_rate(sp, int(it)) == pytest.approx(rate, rel=2e-6, abs=1e-12), it
    assert sp.lr_policy == ex["lr_policy"]
    if "max_iter" in ex:
        assert sp.max_iter == ex["max_iter"]
    for field in ("momentum", "weight_decay", "average_loss", "test_initialization",
                  "random_seed"):
        if field in ex:
            assert getattr(sp, field) == pytest.approx(ex[field]), field
    if "test_iter" in ex:
        assert list(sp.test_iter) == ex["test_iter"]
    if "test_state_stages" in ex:
        assert [s for st in sp.test_state for s in st.stage] == ex["test_state_stages"]
    if "snapshot_format" in ex:
        assert sp.snapshot_format == caffe_pb2.SolverParameter.SnapshotFormat.Value(
            ex["snapshot_format"])
    if sp.HasField("net_param"):
        # A solver with its net inline: the net builds for the train state and each test
        # state the solver gives, with the published shapes and count.
        net_param = upgrade.upgrade_net(sp.net_param, str(ZOO / e["file"]))
        train = Net(with_inputs(e["file"], net_param), "TRAIN", verbose=False)
        assert learnable_count(train) == ex["inline_net_learnable_param_count"]
        for key, shapes in ex.items():
            if key.startswith("inline_net_blob_shapes"):
                assert {k: list(train.blob_shapes[k]) for k in shapes} == shapes
        for state in sp.test_state:
            test = Net(with_inputs(e["file"], net_param), "TEST", stages=list(state.stage),
                       verbose=False)
            assert "accuracy" in test.output_names
            # Each test state picks its own data layer (by stage), not both.
            assert sum(l.type == "Input" for l in test.layers) == 1


def test_fork_net_is_one_clear_error():
    e = next((e for e in ENTRIES if not builds(e)), None)
    if e is None:
        pytest.skip("every fork net in the zoo builds (SSD's layers are implemented)")
    with pytest.raises(JcaffeError) as info:
        prototxt.read_net(str(ZOO / e["file"]))
    msg = str(info.value)
    assert "\n" not in msg
    assert e["file"] in msg and re.search(r":\d+", msg)
    assert "fork" in msg and "BVLC" in msg
