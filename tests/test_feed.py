"""Feeding batches to the step: the prefetch thread and the device-resident slicer give the same
batches as the reader over several wrap-arounds (also inside jit + lax.scan), errors in the thread
reach the consumer, shutdown is clean, and choose_feeder's overrides."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import lmdb
import numpy as np
import pytest

from jcaffe.data.feed import (DeviceResident, PrefetchFeeder, choose_feeder, fits_on_device)
from jcaffe.errors import DataError
from jcaffe.proto import caffe_pb2
from tests.layer_utils import make_layer

RNG = np.random.default_rng(99)


def write_lmdb(path, images, labels):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (img, lab) in enumerate(zip(images, labels)):
            d = caffe_pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2],
                                label=int(lab), data=img.tobytes())
            txn.put(b"%08d" % i, d.SerializeToString())
    env.close()
    return str(path)


@pytest.fixture
def layer(tmp_path):
    images = RNG.integers(0, 256, (7, 1, 3, 3), dtype=np.uint8)
    src = write_lmdb(tmp_path / "db", images, np.arange(7) + 100)
    return make_layer(f'type: "Data" name: "d" data_param {{ source: "{src}" batch_size: 3 '
                      f'rand_skip: 6 prefetch: 2 }}', [], "TRAIN", tops=["data", "label"])


def reference(layer, seed, n):
    with layer.make_reader(seed=seed) as r:
        return [r.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg=k)


def test_prefetch_and_device_resident_agree_over_wraps(layer):
    n = 12  # 36 records from a 7-record source: five wrap-arounds
    ref = reference(layer, 5, n)
    with PrefetchFeeder(layer, seed=5) as feeder:
        assert feeder.prefetch == 2  # data_param.prefetch
        pre = [next(feeder) for _ in range(n)]
    res = DeviceResident(layer, seed=5)
    dev = [next(res) for _ in range(n)]
    for a, b, c in zip(ref, pre, dev):
        assert_same(a, b)
        assert_same(a, c)
    assert isinstance(pre[0]["data"], jax.Array)


def test_device_resident_batch_at_inside_jit_and_scan(layer):
    res = DeviceResident(layer, seed=2)
    ref = reference(layer, 2, 9)

    @jax.jit
    def run(arrays, cursor):
        def step(c, _):
            b = res.batch_at(arrays, c)
            return res.next_cursor(c), (b["data"], b["label"])
        return jax.lax.scan(step, cursor, None, length=9)

    last, (data, labels) = run(res.arrays, jnp.int32(res.cursor0))
    for k in range(9):
        np.testing.assert_array_equal(np.asarray(data[k]), ref[k]["data"])
        np.testing.assert_array_equal(np.asarray(labels[k]), ref[k]["label"])
    assert int(last) == res.cursor_at(9)


def test_prefetch_position_and_seek_resume(layer):
    with PrefetchFeeder(layer, seed=1) as f:
        for _ in range(4):
            next(f)
        pos = f.position
        after = [next(f) for _ in range(3)]
        f.seek(pos)
        again = [next(f) for _ in range(3)]
    for a, b in zip(after, again):
        assert_same(a, b)
    res = DeviceResident(layer, seed=1)
    res.seek(pos)
    assert_same(after[0], next(res))


class FailingReader:
    """Two good batches, then the error a broken record would raise."""

    prefetch = 2
    shuffled = False

    def __init__(self):
        self.position = 0
        self.closed = False

    def next_batch(self):
        if self.position >= 2:
            raise DataError("db: record 7 (key '00000007'): not a Caffe Datum")
        self.position += 1
        return {"x": np.full((2,), self.position, np.int32)}

    def seek(self, p):
        self.position = p

    def close(self):
        self.closed = True


def test_prefetch_thread_error_reaches_the_consumer():
    f = PrefetchFeeder(FailingReader())
    assert int(next(f)["x"][0]) == 1
    assert int(next(f)["x"][0]) == 2
    with pytest.raises(DataError, match=r"record 7 \(key '00000007'\): not a Caffe Datum"):
        next(f)
    assert f._thread is None  # the feeder shut itself down
    with pytest.raises(StopIteration):
        next(f)


class SlowReader:
    prefetch = 1
    shuffled = False

    def __init__(self):
        self.position = 0
        self.closed = False

    def next_batch(self):
        self.position += 1
        return {"x": np.zeros(1, np.float32)}

    def seek(self, p):
        self.position = p

    def close(self):
        self.closed = True


def test_close_stops_a_blocked_thread():
    reader = SlowReader()
    f = PrefetchFeeder(reader, prefetch=1)
    time.sleep(0.2)  # the thread fills the queue and blocks on put
    thread = f._thread
    t0 = time.time()
    f.close()
    assert time.time() - t0 < 2.0
    assert not thread.is_alive()
    assert not reader.closed  # a reader handed in stays the caller's
    names = [t.name for t in threading.enumerate()]
    assert "jcaffe-prefetch" not in names


def test_fits_on_device_cpu_rule():
    cpu = jax.devices("cpu")[0]
    assert fits_on_device(10 << 20, cpu)
    assert not fits_on_device(2 << 30, cpu)


def test_choose_feeder_auto_and_argument(layer):
    auto = choose_feeder(layer, seed=0)
    assert isinstance(auto, DeviceResident)  # a tiny dataset on CPU
    with choose_feeder(layer, seed=0, on_device=False) as f:
        assert isinstance(f, PrefetchFeeder)
    forced = choose_feeder(layer, seed=0, on_device=True)
    assert isinstance(forced, DeviceResident)


def test_strided_batches_give_device_r_the_records_r_mod_n(layer):
    """Device r of N reads the records whose offset is r modulo N (Caffe's solver_rank)."""
    feed = choose_feeder(layer, seed=0, on_device=True)
    whole = np.concatenate([np.asarray(jax.device_get(feed.batch_at(feed.arrays, c)["data"]))
                            for c in (0, feed.batch_size)])
    for r in range(2):
        got = np.asarray(feed.batch_at(feed.arrays, r, stride=2)["data"])
        np.testing.assert_array_equal(got, whole[r::2])


def test_shuffled_sources_stay_on_the_host(tmp_path, monkeypatch):
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(12, dtype=np.float32).reshape(6, 2)
    (tmp_path / "l.txt").write_text(str(tmp_path / "a.h5"))
    h5 = make_layer(f'type: "HDF5Data" name: "h" hdf5_data_param {{ source: "{tmp_path / "l.txt"}" '
                    f'batch_size: 2 shuffle: true }}', [], tops=["data"])
    with choose_feeder(h5, seed=0) as f:
        assert isinstance(f, PrefetchFeeder)
        assert next(f)["data"].shape == (2, 2)
    with pytest.raises(DataError, match="shuffled"):
        choose_feeder(h5, seed=0, on_device=True)


# -- a device-resident dataset split over the devices ---------------------------------------
# The conftest gives this process 4 CPU devices. Record i of these sources stores the value i
# (data and label), so a batch's labels are its record numbers.

SPLIT_NET = """
name: "split"
layer {{ name: "d" type: "Data" top: "data" top: "label"
  data_param {{ source: "{src}" batch_size: {batch} {extra} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: {classes} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def counting_net(tmp_path, count, batch, extra="", labels=None):
    """A net whose Data layer reads ``count`` records, record i holding value i (label i
    unless ``labels`` are given)."""
    from google.protobuf import text_format

    from jcaffe.net import Net

    src = write_lmdb(tmp_path / f"db{count}", np.arange(count, dtype=np.uint8)
                     .reshape(count, 1, 1, 1), np.arange(count) if labels is None else labels)
    text = SPLIT_NET.format(src=src, batch=batch, extra=extra, classes=count)
    return Net(text_format.Parse(text, caffe_pb2.NetParameter()), "TRAIN", verbose=False)


def cut_batches(feed, mesh, batches):
    """Labels ``[batches, N, B]``: device r's batch b as the train program cuts it (the arrays
    passed with ``feed.array_specs()``, device r at ``axis_index``)."""
    from jcaffe import parallel

    P = jax.sharding.PartitionSpec

    def cut(arrays, b):
        r = jax.lax.axis_index(parallel.DATA_AXIS)
        return feed.batch_at(arrays, b, r)["label"][None]

    fn = jax.jit(jax.shard_map(cut, mesh=mesh, in_specs=(feed.array_specs(), P()),
                               out_specs=P(parallel.DATA_AXIS), check_vma=False))
    return np.stack([np.asarray(fn(feed.arrays, jnp.int32(b))) for b in range(batches)])


def hand_records(c0, n, count, batch, batches):
    """Caffe's rule by hand: device r's i-th record of global batch b."""
    return np.array([[[(c0 + r + n * (b * batch + i)) % count for i in range(batch)]
                      for r in range(n)] for b in range(batches)])


@pytest.mark.parametrize("n", [2, 4])
def test_split_device_resident_holds_and_cuts_each_devices_records(tmp_path, monkeypatch, n):
    """12 records, batch 5 per device, a rand_skip start: each of N devices holds exactly its
    12/N records (c0 + r + N·k) mod 12, the loader read each record once, and device r's
    batches over several passes are records (c0 + r + N·(5b + i)) mod 12."""
    import jcaffe.data.sources as sources_mod
    from jcaffe import parallel
    from jcaffe.data.netfeed import NetFeed

    count, batch, batches = 12, 5, 7  # N·B·7 = 70 or 140 records: 5 to 11 passes
    asked = []
    inner = sources_mod._DatumSource.read_records

    def counted(self, records, pool=None):
        asked.extend(int(x) for x in records)
        return inner(self, records, pool)

    monkeypatch.setattr(sources_mod._DatumSource, "read_records", counted)
    net = counting_net(tmp_path, count, batch, "rand_skip: 11")
    with net.data_layers[0].make_reader(seed=4) as reader:
        c0 = int(reader.next_batch()["label"][0])  # the stream's first record
    assert c0 != 0
    mesh = parallel.make_mesh(jax.devices("cpu")[:n])
    asked.clear()
    feed = NetFeed(net, parallel.replicated(mesh), True, [4], ranks=n)
    f = feed.feeders[0]
    assert feed.on_device and f.sharded and f.cursor0 == c0
    # Each device holds its C/N records, no more.
    for top, record_shape in (("data", (1, 1, 1)), ("label", ())):
        shards = feed.arrays[0][top].addressable_shards
        assert len(shards) == n
        for s in shards:
            assert s.data.shape == (1, count // n) + record_shape
            r = list(mesh.devices.flat).index(s.device)
            want = [(c0 + r + n * k) % count for k in range(count // n)]
            assert sorted(np.asarray(s.data).reshape(-1).tolist()) == sorted(want)
    # Read once each, device by device (one process holds them all here).
    assert asked == [x for r in range(n) for x in sorted((c0 + r + n * k) % count
                                                          for k in range(count // n))]
    np.testing.assert_array_equal(cut_batches(feed, mesh, batches),
                                  hand_records(c0, n, count, batch, batches))
    # The global arrays also give the plain stream, batch k = records (c0 + 5k + i) mod 12.
    for k in range(4):
        np.testing.assert_array_equal(np.asarray(next(f)["label"]),
                                      (c0 + k * batch + np.arange(batch)) % count)


def test_split_layout_falls_back_to_replicated_when_n_does_not_divide_the_count(tmp_path):
    """7 records on 2 devices: a device's records change residue class from pass to pass, so
    every device holds all 7 (one INFO line says why), and batches still follow the rule."""
    import logging

    from jcaffe import parallel
    from jcaffe.data.netfeed import NetFeed

    net = counting_net(tmp_path, 7, 3, "rand_skip: 6")
    with net.data_layers[0].make_reader(seed=1) as reader:
        c0 = int(reader.next_batch()["label"][0])
    mesh = parallel.make_mesh(jax.devices("cpu")[:2])
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("jcaffe.data")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        feed = NetFeed(net, parallel.replicated(mesh), True, [1], ranks=2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert not feed.feeders[0].sharded
    assert any("7 records do not split evenly over 2 devices" in m for m in lines), lines
    assert [s.data.shape[0] for s in feed.arrays[0]["label"].addressable_shards] == [7, 7]
    np.testing.assert_array_equal(cut_batches(feed, mesh, 6), hand_records(c0, 2, 7, 3, 6))


def test_split_layout_checks_each_devices_labels_and_names_the_record(tmp_path):
    """A label out of range in device 1's share is found when the shares are loaded, and the
    error names the dataset record."""
    from jcaffe import parallel
    from jcaffe.data.netfeed import NetFeed
    from jcaffe.errors import DataError

    labels = np.arange(8) % 8
    labels[5] = 200  # num_output 8: classes 0..7
    net = counting_net(tmp_path, 8, 2, labels=labels)
    mesh = parallel.make_mesh(jax.devices("cpu")[:2])
    with pytest.raises(DataError, match=r"record 5: label 200 is out of range"):
        NetFeed(net, parallel.replicated(mesh), True, [0], ranks=2)


@pytest.mark.parametrize("n", [2, 4])
def test_host_fed_global_batch_is_read_in_device_blocks(tmp_path, n):
    """Host-fed on N devices of one process: global batch b holds device r's records
    (c0 + r + N·(B·b + i)) mod C in block r, read straight into one array in that order
    (12 records, batch 5 per device, a rand_skip start, several passes)."""
    from jcaffe import parallel
    from jcaffe.data.netfeed import NetFeed

    count, batch, batches = 12, 5, 6
    net = counting_net(tmp_path, count, batch, "rand_skip: 11")
    with net.data_layers[0].make_reader(seed=4) as reader:
        c0 = int(reader.next_batch()["label"][0])
    mesh = parallel.make_mesh(jax.devices("cpu")[:n])
    feed = NetFeed(net, parallel.replicated(mesh), False, [4], ranks=n)
    try:
        assert not feed.on_device and feed.host_blocks == n
        got = np.stack([feed.chunk(b, 1, 1)["label"][0].reshape(n, batch)
                        for b in range(batches)])
        np.testing.assert_array_equal(got, hand_records(c0, n, count, batch, batches))
        np.testing.assert_array_equal(feed.chunk(2, 1, 1)["data"][0].reshape(-1),
                                      hand_records(c0, n, count, batch, 3)[2].reshape(-1))
    finally:
        feed.close()
