"""The SSD fork's training side end to end: VOC-style XML annotations of a handful of
synthetic images -> ``create_annoset`` -> an AnnotatedDatum LMDB -> AnnotatedData ->
a small SSD trained with MultiBoxLoss (its loss falls) and tested with DetectionOutput +
DetectionEvaluate. References: the XML's own numbers, OpenCV's resize, the fork's
sampling constraints."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jcaffe import cli
from jcaffe.proto import ssd_pb2

cv2 = pytest.importorskip("cv2")

LABELMAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "red" label: 1 display_name: "red" }
item { name: "blue" label: 2 display_name: "blue" }
"""
XML = """<annotation><filename>{name}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>
"""
OBJECT = """<object><name>{cls}</name><difficult>{diff}</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""
COLORS = {"red": (40, 40, 220), "blue": (220, 60, 40)}  # BGR


def make_set(root, n=8, seed=0):
    """``n`` images 64x48 (w x h) of grey noise with one or two filled rectangles, their VOC
    XML, a label map and a list file; returns the per-image boxes (pixels)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir()
    (root / "xml").mkdir()
    truth, lines = [], []
    for i in range(n):
        img = rng.integers(90, 140, (48, 64, 3)).astype(np.uint8)
        objs = []
        for k in range(1 + i % 2):
            cls = ("red", "blue")[(i + k) % 2]
            w, h = rng.integers(14, 30), rng.integers(12, 26)
            x0, y0 = rng.integers(0, 64 - w), rng.integers(0, 48 - h)
            img[y0:y0 + h, x0:x0 + w] = COLORS[cls]
            objs.append((cls, int(x0), int(y0), int(x0 + w), int(y0 + h), int(k == 1 and i == 3)))
        cv2.imwrite(str(root / "img" / f"{i}.png"), img)
        (root / "xml" / f"{i}.xml").write_text(XML.format(name=f"{i}.png", w=64, h=48, objects="".join(
            OBJECT.format(cls=c, diff=d, x0=a, y0=b, x1=e, y1=f) for c, a, b, e, f, d in objs)))
        truth.append(objs)
        lines.append(f"img/{i}.png xml/{i}.xml\n")
    (root / "list.txt").write_text("".join(lines))
    (root / "labelmap.prototxt").write_text(LABELMAP)
    return truth


@pytest.fixture(scope="module")
def annoset(tmp_path_factory):
    from jcaffe.tools.create_annoset import create_annoset

    root = tmp_path_factory.mktemp("annoset")
    truth = make_set(root)
    n = create_annoset(str(root), str(root / "list.txt"), str(root / "lmdb"),
                       str(root / "labelmap.prototxt"), log=lambda *a: None)
    assert n == 8
    return root, truth


def records(path):
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(k.decode(), ssd_pb2.AnnotatedDatum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    return out


def test_create_annoset_writes_the_forks_records(annoset):
    root, truth = annoset
    recs = records(root / "lmdb")
    assert [k for k, _ in recs] == [f"{i:08d}_img/{i}.png" for i in range(8)]
    for (_, ad), objs in zip(recs, truth):
        assert ad.type == ssd_pb2.AnnotatedDatum.BBOX and ad.datum.encoded
        assert ad.datum.data == (root / "img" / f"{recs.index((_, ad))}.png").read_bytes()
        got = [(g.group_label, a.instance_id, a.bbox.xmin, a.bbox.ymin, a.bbox.xmax,
                a.bbox.ymax, a.bbox.difficult) for g in ad.annotation_group for a in g.annotation]
        # One group per label in order of first appearance: here the XML's order (an image's
        # two objects have different classes).
        want = [({"red": 1, "blue": 2}[c], 0, x0 / 64, y0 / 48, x1 / 64, y1 / 48, bool(d))
                for c, x0, y0, x1, y1, d in objs]
        np.testing.assert_allclose([g[2:6] for g in got], [w[2:6] for w in want], rtol=1e-6)
        assert [g[:2] + g[6:] for g in got] == [w[:2] + w[6:] for w in want]


LAYER = """name: "d" type: "AnnotatedData" top: "data" top: "label"
include {{ phase: {phase} }}
data_param {{ source: "{source}" batch_size: {batch} }}
transform_param {{ {transform} }}
annotated_data_param {{ {sampler} label_map_file: "{labelmap}" }}
"""


def build_data(root, transform, sampler="", batch=4, phase="TRAIN", workers=None, source=None):
    from jcaffe.config import DEFAULT
    from jcaffe.net import Net
    from jcaffe.prototxt import parse_net_text

    text = "layer { " + LAYER.format(phase=phase, source=source or root / "lmdb", batch=batch,
                                     transform=transform, sampler=sampler,
                                     labelmap=root / "labelmap.prototxt") + " }"
    return Net(parse_net_text(text), phase, verbose=False,
               config=DEFAULT.replace(decode_workers=workers)).layers[0]


def test_annotated_data_resize_mean_and_label_rows(annoset):
    root, truth = annoset
    layer = build_data(root, 'mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 '
                       'resize_param { resize_mode: WARP height: 32 width: 40 '
                       'interp_mode: LINEAR }')
    assert layer.top_shapes == [(4, 3, 32, 40), (1, 1, 8, 8)]  # at most 2 boxes x batch 4
    with layer.make_reader(seed=1) as reader:
        batch = reader.next_batch()
        second = reader.next_batch()
    for k in range(4):
        img = cv2.imread(str(root / "img" / f"{k}.png"))
        want = (cv2.resize(img, (40, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32)
                - [104, 117, 123]) * 0.5
        np.testing.assert_allclose(batch["data"][k], want.transpose(2, 0, 1), atol=1e-4)
    rows = batch["label"].reshape(-1, 8)
    want = [[k, {"red": 1, "blue": 2}[c], 0, x0 / 64, y0 / 48, x1 / 64, y1 / 48, d]
            for k in range(4) for c, x0, y0, x1, y1, d in truth[k]]
    got = rows[rows[:, 0] >= 0]
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    want = np.asarray(sorted(want, key=lambda r: (r[0], r[1])), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(rows[len(got):] == -1)
    assert second["data"].shape == (4, 3, 32, 40)  # records 4..7


def test_batch_sampler_crops_meet_their_constraint_and_boxes_follow(annoset):
    from jcaffe.data.annotated import jaccard, sample_boxes

    root, _ = annoset
    layer = build_data(root, 'resize_param { resize_mode: WARP height: 24 width: 24 } '
                       'emit_constraint { emit_type: CENTER }',
                       sampler='batch_sampler { sampler { min_scale: 0.3 max_scale: 1 '
                       'min_aspect_ratio: 0.5 max_aspect_ratio: 2 } sample_constraint { '
                       'min_jaccard_overlap: 0.3 } max_sample: 1 max_trials: 50 }')
    rng = np.random.default_rng(0)
    objects = [np.asarray([0.2, 0.2, 0.5, 0.6], np.float32)]
    sampler = layer.transform.samplers
    for _ in range(20):
        for box in sample_boxes(rng, objects, sampler):
            assert jaccard(box, objects[0]) >= 0.3
            w, h = box[2] - box[0], box[3] - box[1]
            assert 0.3 - 1e-6 <= np.sqrt(w * h) <= 1 + 1e-6 and 0 <= box[0] and box[2] <= 1
    with layer.make_reader(seed=3) as reader:
        for _ in range(3):
            b = reader.next_batch()
            rows = b["label"].reshape(-1, 8)
            rows = rows[rows[:, 0] >= 0]
            assert np.all((rows[:, 3:7] >= 0) & (rows[:, 3:7] <= 1))
            assert np.all(rows[:, 5] > rows[:, 3]) and np.all(rows[:, 6] > rows[:, 4])


# Every random step on: distortion, expansion, batch sampling, random interpolation, mirror.
RANDOM = ('mirror: true mean_value: 104 mean_value: 117 mean_value: 123 resize_param { '
          'resize_mode: WARP height: 24 width: 24 interp_mode: LINEAR interp_mode: AREA '
          'interp_mode: NEAREST interp_mode: CUBIC } emit_constraint { emit_type: CENTER } '
          'distort_param { brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 '
          'contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 '
          'saturation_prob: 0.5 saturation_lower: 0.5 saturation_upper: 1.5 '
          'random_order_prob: 0.5 } expand_param { prob: 0.5 max_expand_ratio: 2 }')
RANDOM_SAMPLER = ('batch_sampler { max_trials: 1 } batch_sampler { sampler { min_scale: 0.3 '
                  'max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 } sample_constraint '
                  '{ min_jaccard_overlap: 0.3 } max_sample: 1 max_trials: 50 }')


def item_rows(batch, k):
    """The label rows of item ``k`` (without the item column), in order."""
    rows = batch["label"].reshape(-1, 8)
    n = int(np.sum(rows[:, 0] >= 0))
    assert np.all(rows[n:] == -1)  # the boxes first, in item order, then -1 padding
    assert np.all(np.diff(rows[:n, 0]) >= 0)
    return rows[:n][rows[:n, 0] == k, 1:]


def test_annotated_batches_are_bit_identical_with_1_and_3_workers(annoset):
    """Items are transformed on the decode workers; the worker count changes no bit (and the
    database is read from several threads at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from jcaffe.data.annotated import AnnotatedLMDB

    root, _ = annoset
    got = {}
    for workers in (1, 3):
        layer = build_data(root, RANDOM, RANDOM_SAMPLER, workers=workers)
        with layer.make_reader(seed=7) as r:
            assert r.workers == workers
            got[workers] = [r.next_batch() for _ in range(4)]  # 16 items: two passes
            assert r.records_read >= 16
    for one, three in zip(got[1], got[3]):
        for top in ("data", "label"):
            assert one[top].dtype == three[top].dtype == np.float32
            assert one[top].shape == three[top].shape
            assert one[top].tobytes() == three[top].tobytes()
    want = [v.SerializeToString() for _, v in records(root / "lmdb")]
    db = AnnotatedLMDB(str(root / "lmdb"), "")
    try:
        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(lambda i: db.value(i % 8), range(400))) == want * 50
    finally:
        db.close()


def test_annotated_item_q_is_record_q_transformed_with_the_generator_of_q(annoset):
    """The documented contract: the item at stream position q is record q % count put through
    the layer's transform with ``default_rng([seed, 5, q])``, whatever batch it falls in."""
    from jcaffe.data.annotated import parse_annotated

    root, _ = annoset
    values = [v.SerializeToString() for _, v in records(root / "lmdb")]
    layer = build_data(root, RANDOM, RANDOM_SAMPLER, workers=2)
    seed = 7
    with layer.make_reader(seed=seed) as r:
        batches = {p: r.batch_at(p) for p in (2, 5, 10)}  # 5 in both of the first two

    for p, batch in batches.items():
        for k in range(4):
            q = p + k
            item = parse_annotated(values[q % 8], f"record {q % 8}", False, False)
            x, boxes = layer.transform(np.random.default_rng([seed, 5, q]), item)
            assert batch["data"][k].tobytes() == x.astype(np.float32).tobytes(), (p, k)
            want = [[lab, inst, *b, float(d)] for b, lab, inst, d in
                    zip(boxes.boxes, boxes.labels, boxes.instances, boxes.difficult)]
            np.testing.assert_array_equal(item_rows(batch, k),
                                          np.asarray(want, np.float32).reshape(-1, 7))
    # Position 5 is item 3 of the batch at 2 and item 0 of the batch at 5: the same item.
    assert batches[2]["data"][3].tobytes() == batches[5]["data"][0].tobytes()
    np.testing.assert_array_equal(item_rows(batches[2], 3), item_rows(batches[5], 0))
    # Record 2 at positions 2 and 10 (one pass apart) draws different numbers.
    assert not np.array_equal(batches[2]["data"][0], batches[10]["data"][0])


def test_annotated_shard_reads_its_items_of_the_global_batch(annoset):
    """ShardReader over 2 devices, this process rank 1: of the global batch at q (8 items)
    it reads positions q+1, q+3, q+5, q+7 alone, and gets those items of the batches at q
    and q+4, pixels and boxes, the item column renumbered 0..3."""
    from jcaffe.data.readers import ShardReader

    root, _ = annoset
    layer = build_data(root, RANDOM, RANDOM_SAMPLER, workers=2)
    with ShardReader(layer.make_reader(seed=7), 2, [1]) as shard:
        whole = {p: shard.reader.batch_at(p) for p in (0, 4, 8, 12)}
        parts = [shard.next_batch() for _ in range(2)]
        assert shard.position == 16
    for g, part in enumerate(parts):
        q = 8 * g
        sources = [(whole[q], 1), (whole[q], 3), (whole[q + 4], 1), (whole[q + 4], 3)]
        assert part["data"].shape == (4, 3, 24, 24)
        for k, (batch, j) in enumerate(sources):
            assert part["data"][k].tobytes() == batch["data"][j].tobytes(), (g, k)
            np.testing.assert_array_equal(item_rows(part, k), item_rows(batch, j))
        n = int(np.sum(part["label"].reshape(-1, 8)[:, 0] >= 0))
        assert n == sum(len(item_rows(b, j)) for b, j in sources)


def test_annotated_decode_error_names_the_first_failing_record(annoset, tmp_path):
    """Records 5 and 6 hold truncated PNGs: reading the batch 4..7 fails with one line naming
    the database, record 5 and its key, the same with 1 and 3 workers."""
    from jcaffe.data.sources import write_lmdb
    from jcaffe.errors import DataError

    root, _ = annoset
    recs = records(root / "lmdb")
    for bad in (5, 6):
        recs[bad][1].datum.data = recs[bad][1].datum.data[:40]
    path = tmp_path / "broken"
    write_lmdb(str(path), [(k.encode(), v.SerializeToString()) for k, v in recs])
    messages = []
    for workers in (1, 3):
        layer = build_data(root, RANDOM, RANDOM_SAMPLER, workers=workers, source=path)
        with layer.make_reader(seed=0) as r:
            r.next_batch()
            with pytest.raises(DataError) as e:
                r.next_batch()
        messages.append(re.sub(r" at 0x[0-9a-f]+", "", str(e.value)))  # Pillow's BytesIO
    msg = messages[0]
    assert messages[1] == msg
    assert "\n" not in msg
    assert f"{path}: record 5 (key '{recs[5][0]}')" in msg and "cannot decode" in msg, msg


def conv(name, bottom, n, stride=1):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 stride: {stride} '
            f'weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" }} }} }}\n')


def ssd_net(root):
    """A small SSD: three stride-2 convolutions, heads on the 8x8 and 4x4 maps."""
    data = "\n".join("layer { " + LAYER.format(
        phase=ph, source=root / "lmdb", batch=4, labelmap=root / "labelmap.prototxt",
        transform=("mirror: true " if ph == "TRAIN" else "") +
        "mean_value: 127 scale: 0.0078125 resize_param { resize_mode: WARP height: 32 "
        "width: 32 interp_mode: LINEAR } emit_constraint { emit_type: CENTER }",
        sampler=("batch_sampler { max_trials: 1 } batch_sampler { sampler { min_scale: 0.5 "
                 "max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 } sample_constraint "
                 "{ min_jaccard_overlap: 0.5 } max_sample: 1 max_trials: 20 }")
        if ph == "TRAIN" else "") + " }" for ph in ("TRAIN", "TEST"))
    out = [f'name: "ssd_train"\n{data}\n']
    out += [conv("conv1", "data", 16, 2), 'layer { name: "r1" type: "ReLU" bottom: "conv1" top: "conv1" }\n',
            conv("conv2", "conv1", 24, 2), 'layer { name: "r2" type: "ReLU" bottom: "conv2" top: "conv2" }\n',
            conv("conv3", "conv2", 24, 2), 'layer { name: "r3" type: "ReLU" bottom: "conv3" top: "conv3" }\n']
    for src, mn, mx in (("conv2", 8, 18), ("conv3", 18, 30)):
        for kind, per in (("loc", 4), ("conf", 3)):
            nm = f"{src}_{kind}"
            out.append(conv(nm, src, 4 * per))
            out.append(f'layer {{ name: "{nm}_perm" type: "Permute" bottom: "{nm}" top: "{nm}_perm" '
                       f'permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                       f'layer {{ name: "{nm}_flat" type: "Flatten" bottom: "{nm}_perm" '
                       f'top: "{nm}_flat" flatten_param {{ axis: 1 }} }}\n')
        out.append(f'layer {{ name: "{src}_pb" type: "PriorBox" bottom: "{src}" bottom: "data" '
                   f'top: "{src}_pb" prior_box_param {{ min_size: {mn} max_size: {mx} '
                   f'aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 '
                   f'variance: 0.2 variance: 0.2 }} }}\n')
    for kind, axis, suffix in (("loc", 1, "_flat"), ("conf", 1, "_flat"), ("pb", 2, "")):
        out.append(f'layer {{ name: "mbox_{kind}" type: "Concat" bottom: "conv2_{kind}{suffix}" '
                   f'bottom: "conv3_{kind}{suffix}" top: "mbox_{kind}" '
                   f'concat_param {{ axis: {axis} }} }}\n')
    out.append('''layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "mbox_loc"
  bottom: "mbox_conf" bottom: "mbox_pb" bottom: "label" top: "mbox_loss"
  include { phase: TRAIN } propagate_down: true propagate_down: true
  propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param { loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1
    num_classes: 3 share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5
    use_prior_for_matching: true background_label_id: 0 use_difficult_gt: true
    neg_pos_ratio: 3 neg_overlap: 0.5 code_type: CENTER_SIZE mining_type: MAX_NEGATIVE } }
layer { name: "conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "conf_reshape"
  include { phase: TEST } reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax"
  include { phase: TEST } softmax_param { axis: 2 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_softmax" top: "conf_flat"
  include { phase: TEST } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "conf_flat"
  bottom: "mbox_pb" top: "detection_out" include { phase: TEST }
  detection_output_param { num_classes: 3 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 50 } code_type: CENTER_SIZE keep_top_k: 20
    confidence_threshold: 0.01 } }
layer { name: "detection_eval" type: "DetectionEvaluate" bottom: "detection_out"
  bottom: "label" top: "detection_eval" include { phase: TEST }
  detection_evaluate_param { num_classes: 3 background_label_id: 0 overlap_threshold: 0.5
    evaluate_difficult_gt: false } }
''')
    return "".join(out)


SOLVER = """net: "{net}"
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 25
max_iter: {iters}
snapshot: 0
snapshot_after_train: true
snapshot_prefix: "{prefix}"
random_seed: 1
test_iter: 2
test_interval: {iters}
test_initialization: false
"""


@pytest.fixture(scope="module")
def trained(annoset):
    root, _ = annoset
    (root / "net.prototxt").write_text(ssd_net(root))
    (root / "solver.prototxt").write_text(SOLVER.format(net=root / "net.prototxt", iters=300,
                                                        prefix=root / "ssd"))
    return root


def test_small_ssd_trains_its_multibox_loss_falls(trained, capfd):
    rc = cli.main(["train", f"--solver={trained / 'solver.prototxt'}"])
    _, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    losses = [float(v) for v in re.findall(r"Iteration \d+.*?, loss = ([\d.eE+-]+)", err)]
    assert len(losses) >= 10, err[-2000:]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    # The solver's test pass scores the DetectionEvaluate rows of its test_iter batches
    # together, as the fork's TestDetection: one mAP line (not one line per row element).
    found = re.findall(r"Iteration 300, Testing net \(#0\)\n.*Test net output #\d+: "
                       r"detection_eval = ([\d.eE+-]+)\n", err)
    assert len(found) == 1, err[-2000:]
    assert 0.5 < float(found[0]) <= 1, found


def test_jcaffe_test_prints_detection_eval(trained, capfd):
    """After training, ``jcaffe test`` scores the TEST net's DetectionEvaluate output as the
    fork's solver does: one ``detection_eval = <mAP>`` line, not one line per element. The 8
    training images, seen 300 times, are found again."""
    model = trained / "ssd_iter_300.caffemodel"
    assert model.exists()
    rc = cli.main(["test", f"--model={trained / 'net.prototxt'}", f"--weights={model}",
                   "--iterations=2", "--ap_version=11point"])
    _, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    found = re.findall(r"detection_eval = ([\d.eE+-]+) \(mAP, 11point\)", err)
    assert len(found) == 1, err[-2000:]
    assert "Batch 0, detection_eval" not in err
    assert 0.5 < float(found[0]) <= 1, found


def _satisfies_loop(sample, objects, c) -> bool:
    """The fork's SatisfySampleConstraint, its loop transcribed: per object, each bounded
    measure in order; the first that fails moves on to the next object (``continue``), each
    that passes sets ``found``; ``found`` is returned after an object's tests, or at the end."""
    from jcaffe.data.annotated import coverage, jaccard

    measures = (("jaccard_overlap", lambda s, o: jaccard(s, o)),
                ("sample_coverage", lambda s, o: coverage(s, o)),
                ("object_coverage", lambda s, o: coverage(o, s)))
    active = [(name, m) for name, m in measures
              if c.HasField("min_" + name) or c.HasField("max_" + name)]
    if not active:
        return True
    found = False
    for obj in objects:
        skipped = False
        for name, measure in active:
            v = measure(sample, obj)
            if (c.HasField("min_" + name) and v < getattr(c, "min_" + name)) or \
                    (c.HasField("max_" + name) and v > getattr(c, "max_" + name)):
                skipped = True  # the fork's `continue`: on to the next object
                break
            found = True
        if not skipped and found:
            return True
    return found


def test_sample_constraint_follows_the_forks_found_logic():
    """SatisfySampleConstraint by hand: sample S = [0, 0, .5, .5] and object B = [0, 0, 1, 1]
    have jaccard .25, sample coverage 1 and object coverage .25. A measure that fails moves on
    to the next object, but an earlier measure's pass still counts (the fork's ``found``).
    The library's constraint over arrays and the fork's loop both give the hand answers."""
    from jcaffe.data.annotated import satisfied

    s, b = [0, 0, .5, .5], [0, 0, 1, 1]

    def c(**bounds):
        return ssd_pb2.SampleConstraint(**bounds)

    def both(objects, constraint):
        got = satisfied(np.asarray([s], np.float32), np.asarray(objects, np.float32),
                        constraint)
        loop = _satisfies_loop(np.asarray(s, np.float32),
                               [np.asarray(o, np.float32) for o in objects], constraint)
        assert got.tolist() == [loop]
        return loop

    assert both([b], c())
    assert both([b], c(min_jaccard_overlap=.2))
    assert not both([b], c(min_jaccard_overlap=.5))
    assert not both([b], c(max_sample_coverage=.9))
    assert both([b, s], c(min_jaccard_overlap=.5))
    # Jaccard passes, object coverage (.25) fails: still True, as the fork's loop returns.
    assert both([b], c(min_jaccard_overlap=.2, min_object_coverage=.5))
    # Jaccard fails first: the object coverage is never looked at.
    assert not both([b], c(min_jaccard_overlap=.5, max_object_coverage=.5))
    assert not both([], c(min_jaccard_overlap=.1)) and both([], c())


def _sample_boxes_loop(rng, objects, samplers):
    """The fork's GenerateBatchSamples trial by trial (its loop, as jcaffe wrote it before
    drawing a sampler's trials together): four uniforms per trial, stop at max_sample."""
    out = []
    for bs in samplers:
        if not bs.use_original_image:
            continue
        s = bs.sampler
        found = 0
        for _ in range(bs.max_trials):
            if bs.HasField("max_sample") and found >= bs.max_sample:
                break
            f = np.float32
            scale = f(rng.uniform(s.min_scale, s.max_scale))
            ar = f(rng.uniform(s.min_aspect_ratio, s.max_aspect_ratio))
            ar = min(max(ar, f(scale ** 2)), f(1 / scale ** 2))
            w, h = f(scale * np.sqrt(ar)), f(scale / np.sqrt(ar))
            x0, y0 = rng.uniform(0, max(f(0), f(1) - w)), rng.uniform(0, max(f(0), f(1) - h))
            box = np.asarray([x0, y0, x0 + w, y0 + h], np.float32)
            if _satisfies_loop(box, objects, bs.sample_constraint):
                found += 1
                out.append(box)
    return out


def test_sample_boxes_are_the_trial_loops_boxes_and_leave_the_generator_where_it_would():
    """SSD300's seven batch samplers (and max_sample 0 / unset, no objects, an object at the
    border), over many generators: the trials drawn as arrays give the trial-by-trial loop's
    boxes bit for bit, and the generator ends in the loop's state (the numbers drawn after,
    the crop and the mirror, are the loop's too)."""
    from google.protobuf import text_format

    from jcaffe.data.annotated import satisfied, sample_boxes

    text = "".join(
        f"batch_sampler {{ sampler {{ min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5 "
        f"max_aspect_ratio: 2.0 }} sample_constraint {{ {c} }} max_sample: 1 "
        f"max_trials: 50 }} "
        for c in ("min_jaccard_overlap: 0.1", "min_jaccard_overlap: 0.3",
                  "min_jaccard_overlap: 0.5", "min_jaccard_overlap: 0.7",
                  "min_jaccard_overlap: 0.9", "max_jaccard_overlap: 1.0"))
    text = ("batch_sampler { max_sample: 1 max_trials: 1 } " + text +
            "batch_sampler { sampler { min_scale: 0.1 max_scale: 1 } sample_constraint { "
            "min_sample_coverage: 0.5 max_object_coverage: 0.9 } max_trials: 20 } "
            "batch_sampler { sampler { min_scale: 0.5 } max_sample: 0 max_trials: 5 } "
            "batch_sampler { sampler { min_scale: 0.5 } sample_constraint { "
            "min_object_coverage: 0.2 } max_sample: 3 max_trials: 30 }")
    samplers = list(text_format.Parse(text, ssd_pb2.AnnotatedDataParameter()).batch_sampler)
    pick = np.random.default_rng(9)
    for trial in range(60):
        n = int(pick.integers(0, 4))
        lo = pick.uniform(0, 0.7, (n, 2))
        objects = [np.asarray([*xy, *(xy + pick.uniform(0.05, 0.6, 2))], np.float32).clip(0, 1)
                   for xy in lo]
        if trial % 7 == 0:
            objects.append(np.asarray([0, 0, 1, 1], np.float32))
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        got, want = sample_boxes(a, objects, samplers), _sample_boxes_loop(b, objects, samplers)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert x.dtype == np.float32 and x.tobytes() == y.tobytes()
        assert a.random() == b.random()
        # The constraint over many samples at once is the scalar one, sample by sample.
        boxes = np.sort(pick.uniform(0, 1, (40, 2, 2)), axis=1).transpose(0, 2, 1)
        boxes = boxes.reshape(40, 4)[:, [0, 2, 1, 3]].astype(np.float32)
        for bs in samplers:
            c = bs.sample_constraint
            assert satisfied(boxes, np.asarray(objects, np.float32).reshape(-1, 4), c).tolist() \
                == [_satisfies_loop(x, objects, c) for x in boxes]
