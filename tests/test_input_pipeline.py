"""The parallel host pipeline: batches are the records (checked against the images written),
the same bit for bit with 1 and several decode workers, resumable by position; decode errors
name database, key and record; the worker count from Config, the environment and the command
line; each process reads only its own devices' records (Caffe's rule: record j of a global
batch of N·B goes to device j mod N), counted per source kind, and once across two real
processes."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from jcaffe.config import Config, ConfigError
from jcaffe.data.datum import encoded_datum
from jcaffe.data.image import encode_image
from jcaffe.data.readers import ShardReader
from jcaffe.data.sources import write_leveldb, write_lmdb
from jcaffe.data.dataset import write_dataset
from jcaffe.data.workers import READ_AHEAD_BATCHES, available_cores
from jcaffe.errors import DataError
from tests.layer_utils import CONFIG, make_layer

ROOT = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(21)
COUNT = 23
SHAPE = (3, 9, 7)  # C, H, W


@pytest.fixture(scope="module")
def images():
    """COUNT random BGR images [C, H, W] and labels; PNG keeps them exactly."""
    chw = RNG.integers(0, 256, (COUNT, *SHAPE), dtype=np.uint8)
    labels = (np.arange(COUNT) * 7) % 10
    return chw, labels


def png_datums(chw, labels):
    return [encoded_datum(encode_image(np.transpose(x, (1, 2, 0)), "png"), int(y), SHAPE)
            for x, y in zip(chw, labels)]


@pytest.fixture(scope="module")
def sources(images, tmp_path_factory):
    """The same records as an encoded LMDB, an encoded LevelDB, a jcaffe dataset, an image
    list of PNG files and an HDF5 file."""
    d = tmp_path_factory.mktemp("inputs")
    chw, labels = images
    write_lmdb(str(d / "lmdb"), png_datums(chw, labels))
    write_leveldb(str(d / "leveldb"), png_datums(chw, labels))
    write_dataset(str(d / "dataset"), chw, labels)
    (d / "png").mkdir()
    lines = []
    for i, (x, y) in enumerate(zip(chw, labels)):
        (d / "png" / f"{i}.png").write_bytes(encode_image(np.transpose(x, (1, 2, 0)), "png"))
        lines.append(f"{i}.png {y}\n")
    (d / "list.txt").write_text("".join(lines))
    with h5py.File(d / "rows.h5", "w") as f:
        f["data"] = chw.astype(np.float32)
        f["label"] = labels.astype(np.float32)
    (d / "h5list.txt").write_text(str(d / "rows.h5") + "\n")
    return d


def layer_for(kind, d, batch, workers=None, extra=""):
    config = CONFIG.replace(decode_workers=workers)
    if kind in ("lmdb", "leveldb", "dataset"):
        text = (f'type: "Data" name: "data" data_param {{ source: "{d / kind}" '
                f'batch_size: {batch} {extra} }}')
    elif kind == "images":
        text = (f'type: "ImageData" name: "data" image_data_param {{ source: "{d}/list.txt" '
                f'root_folder: "{d}/png/" batch_size: {batch} {extra} }}')
    else:
        text = (f'type: "HDF5Data" name: "data" hdf5_data_param {{ source: "{d}/h5list.txt" '
                f'batch_size: {batch} {extra} }}')
    return make_layer(text, [], "TRAIN", tops=["data", "label"], config=config)


def expected(images, positions):
    chw, labels = images
    idx = np.asarray(positions) % COUNT
    return chw[idx], labels[idx]


@pytest.mark.parametrize("kind", ["lmdb", "leveldb", "images"])
@pytest.mark.parametrize("workers", [1, 3])
def test_batches_are_the_records_with_any_worker_count_and_resume(kind, workers, sources,
                                                                   images):
    """Batch k is records (5k + i) mod 23 as written (PNG: exact), over several wraps, and a
    reader sought to a batch's position continues with the same bytes."""
    layer = layer_for(kind, sources, 5, workers)
    with layer.make_reader(seed=0) as r:
        assert r.workers == workers
        got = [r.next_batch() for _ in range(7)]  # 35 records: wraps past the end
        for k, b in enumerate(got):
            data, labels = expected(images, range(5 * k, 5 * k + 5))
            np.testing.assert_array_equal(b["data"], data)
            np.testing.assert_array_equal(b["label"], labels)
        r.seek(15)
        again = [r.next_batch() for _ in range(4)]
    # Several workers decode READ_AHEAD_BATCHES ahead (dropped by the seek, and at the close).
    assert r.records_read == 5 * (7 + 4 + (2 * READ_AHEAD_BATCHES if workers > 1 else 0))
    for a, b in zip(again, got[3:]):
        assert a["data"].tobytes() == b["data"].tobytes()
        assert a["label"].tobytes() == b["label"].tobytes()


def test_shuffled_and_window_batches_do_not_depend_on_the_worker_count(sources, tmp_path):
    """ImageData shuffle and WindowData draw on the host; their batches are bit-identical
    with 1 and 4 workers."""
    def batches(layer, n=5):
        with layer.make_reader(seed=11) as r:
            return [r.next_batch() for _ in range(n)]

    one = batches(layer_for("images", sources, 4, 1, "shuffle: true rand_skip: 9"))
    four = batches(layer_for("images", sources, 4, 4, "shuffle: true rand_skip: 9"))
    for a, b in zip(one, four):
        assert a["data"].tobytes() == b["data"].tobytes() and \
            a["label"].tobytes() == b["label"].tobytes()
    windows = tmp_path / "windows.txt"
    windows.write_text("".join(f"# {i}\n{sources}/png/{i}.png\n3\n9\n7\n2\n"
                               f"1 0.9 0 0 5 6\n0 0.1 1 2 6 8\n" for i in range(6)))

    def window_layer(workers):
        return make_layer(f'type: "WindowData" name: "w" window_data_param {{ source: '
                          f'"{windows}" batch_size: 6 fg_threshold: 0.5 bg_threshold: 0.5 '
                          f'fg_fraction: 0.5 context_pad: 1 crop_mode: "square" }} '
                          f'transform_param {{ crop_size: 5 mirror: true }}', [], "TRAIN",
                          tops=["data", "label"], config=CONFIG.replace(decode_workers=workers))

    for a, b in zip(batches(window_layer(1), 3), batches(window_layer(4), 3)):
        assert a["data"].tobytes() == b["data"].tobytes()


def test_a_decode_error_names_database_key_and_record(images, tmp_path):
    """Two damaged records in one batch decoded by 3 workers: the error is one line and names
    the first of them, as one worker would."""
    chw, labels = images
    datums = png_datums(chw, labels)
    for bad in (13, 17):
        datums[bad].data = datums[bad].data[:40]  # a truncated PNG
    path = tmp_path / "broken"
    write_lmdb(str(path), [(f"{i:08d}_img{i}.png", d) for i, d in enumerate(datums)])
    layer = make_layer(f'type: "Data" name: "data" data_param {{ source: "{path}" '
                       f'batch_size: 10 }}', [], "TRAIN", tops=["data", "label"],
                       config=CONFIG.replace(decode_workers=3))
    with layer.make_reader(seed=0) as r:
        r.next_batch()
        with pytest.raises(DataError) as e:
            r.next_batch()
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg and "record 13" in msg and "00000013_img13.png" in msg, msg


def test_worker_count_from_config_environment_and_flag(sources):
    from jcaffe.commands import add_train_flags, config_from_flags
    import argparse

    layer = layer_for("lmdb", sources, 2, None)
    with layer.make_reader(seed=0) as r:
        assert r.workers == available_cores() == len(os.sched_getaffinity(0))
    assert Config.from_env({"JCAFFE_DECODE_WORKERS": "6"}).decode_workers == 6
    for bad in ("-1", "many"):
        with pytest.raises(ConfigError, match="JCAFFE_DECODE_WORKERS"):
            Config.from_env({"JCAFFE_DECODE_WORKERS": bad})
    with pytest.raises(ConfigError, match="decode_workers"):
        Config(decode_workers=-2)
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    args = parser.parse_args(["s.prototxt", "--decode_workers", "3"])
    assert config_from_flags(args, {"JCAFFE_DECODE_WORKERS": "6"}).decode_workers == 3
    assert config_from_flags(parser.parse_args(["s.prototxt"]), {}).decode_workers is None


@pytest.mark.parametrize("kind", ["lmdb", "dataset", "images", "hdf5"])
def test_each_process_reads_only_its_devices_records(kind, sources, images):
    """4 devices × batch 3 over 2 processes (ranks 0, 1 and 2, 3). Process p's reader is asked
    for, and reads, only records q + r + 4i (r its ranks): half of every global batch of 12,
    in device blocks, and the two halves are the whole batch under Caffe's rule."""
    n, b, batches = 4, 3, 5  # 60 positions over 23 records: wraps
    shares = {}
    for local in ([0, 1], [2, 3]):
        reader = layer_for(kind, sources, b, 2).make_reader(seed=0)
        asked = []
        if kind in ("lmdb", "dataset"):  # count what the source itself returns
            inner = reader.source.read_records

            def counted(records, pool=None, inner=inner):
                asked.extend(int(x) for x in records)
                return inner(records, pool)
            reader.source.read_records = counted
        elif kind == "images":
            inner_load = reader.images.load

            def counted_load(i, check=True, inner=inner_load):
                asked.append(int(i))
                return inner(i, check)
            reader.images.load = counted_load
        with ShardReader(reader, n, local) as shard:
            assert shard.batch_size == n * b
            got = [shard.next_batch() for _ in range(batches)]
            assert shard.position == batches * n * b
        # Half of each global batch; with 2 workers READ_AHEAD_BATCHES more are decoded ahead
        # (except HDF5, which copies rows of files in memory and reads nothing ahead), on
        # several threads: compared as collections, order aside.
        read = batches + (READ_AHEAD_BATCHES if kind != "hdf5" else 0)
        assert shard.records_read == read * len(local) * b
        mine = [q + r + n * i for k in range(read) for q in [k * n * b]
                for r in local for i in range(b)]
        if kind != "hdf5":
            assert sorted(asked) == sorted(p % COUNT for p in mine)
        mine = mine[:batches * len(local) * b]
        data, labels = expected(images, mine)
        np.testing.assert_array_equal(np.concatenate([g["data"] for g in got]), data)
        np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), labels)
        shares[tuple(local)] = got
    # Together: global batch k, record j (position 12k + j) on device j mod 4.
    for k in range(batches):
        whole = np.concatenate([shares[(0, 1)][k]["data"], shares[(2, 3)][k]["data"]])
        for r in range(n):
            np.testing.assert_array_equal(
                whole[r * b:(r + 1) * b], expected(images, [k * n * b + j for j in
                                                             range(n * b) if j % n == r])[0])


# -- two processes ------------------------------------------------------------------------------

NET = """
name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "{db}" batch_size: 4 prefetch: 1 }}
  transform_param {{ scale: 0.00390625 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
base_lr: 0.1
lr_policy: "fixed"
momentum: 0.9
max_iter: 4
display: 1
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 1
"""

# Runs `jcaffe train` with the LMDB source counting the records it is asked for.
COUNTING = """
import json, sys
import jcaffe.data.sources as S
seen = []
inner = S._DatumSource.read_records
def counted(self, records, pool=None):
    seen.extend(int(r) for r in records)
    return inner(self, records, pool)
S._DatumSource.read_records = counted
from jcaffe.cli import main
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Five `jcaffe train` runs at once on an encoded LMDB (96 records, batch 4 per device):
    2 processes × 1 device host-fed, 2 processes × 1 device with the dataset on the devices,
    and one host-fed process with 2 devices, the reference. Returns the folder, each run's
    stderr and the records each process's source was asked for."""
    tmp_path = tmp_path_factory.mktemp("two_processes")
    chw = RNG.integers(0, 256, (96, 3, 6, 6), dtype=np.uint8)
    labels = np.arange(96) % 3
    db = tmp_path / "db"
    write_lmdb(str(db), [encoded_datum(encode_image(np.transpose(x, (1, 2, 0)), "png"),
                                       int(y), (3, 6, 6)) for x, y in zip(chw, labels)])
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(db=db))

    def start(name, devices, on_device, extra):
        solver = tmp_path / f"{name}.prototxt"
        if not solver.exists():
            solver.write_text(SOLVER.format(net=net, prefix=tmp_path / name / "snap"))
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JCAFFE_DATA_ON_DEVICE=on_device)
        out = tmp_path / f"{name}{extra[-1] if extra else ''}.json"
        return out, subprocess.Popen(
            [sys.executable, "-c", COUNTING, str(out), "train", "--solver", str(solver),
             "--cpu", "--devices", "all", *extra],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = {}
    for name, on_device in (("host-fed", "0"), ("device-resident", "1")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The two processes share this host's cores: by default each decodes on its half.
        runs[name] = [start(name, 1, on_device, [
            "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
            "--heartbeat_timeout", "20", "--process_id", str(p)]) for p in range(2)]
    runs["single"] = [start("single", 2, "0", ["--decode_workers", "2"])]
    try:
        out = {}
        for name, procs in runs.items():
            out[name] = []
            for path, p in procs:
                _, err = p.communicate(timeout=240)
                assert p.returncode == 0, err[-3000:]
                out[name].append((err, json.loads(path.read_text())))
    finally:
        for procs in runs.values():
            for _, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    return tmp_path, out


@pytest.mark.parametrize("run", ["host-fed", "device-resident"])
def test_two_processes_each_read_half_and_train_as_one(two_process_runs, run):
    """2 processes × 1 device. Host-fed: process p is asked only for records 8k + p + 2i.
    Device-resident: process p loads once exactly the 48 records p + 2k its device ever reads
    (Caffe's rule with 2 | 96: device r's records are ≡ r mod 2), and reads nothing more. Both
    end at the weights of one host-fed process with 2 devices, which reads every record."""
    tmp_path, out = two_process_runs
    errs = [err for err, _ in out[run]]
    seen = [records for _, records in out[run]]
    for p in range(2):
        if run == "device-resident":
            assert seen[p] == list(range(p, 96, 2)), seen[p]
            continue
        # Its own records only, each once; at least the 4 iterations' worth (read-ahead and
        # the final display may take a batch or two more; batches read ahead run side by
        # side, so in any order).
        assert sorted(seen[p]) == list(range(p, 2 * len(seen[p]), 2)), seen[p]
        assert len(seen[p]) >= 4 * 4
    if run == "device-resident":
        assert "dataset split over 2 devices, 1/2 on each" in errs[0]
    cores = available_cores()
    assert (f"Decode workers: {max(1, cores // 2)} per process ({cores} cores shared by 2 "
            f"processes of this run on this host" in errs[0]), errs[0][-3000:]
    whole = out["single"][0][1]
    assert sorted(whole) == list(range(len(whole))) and len(whole) >= 4 * 8

    from jcaffe.caffemodel import load_caffemodel
    a = load_caffemodel(str(tmp_path / run / "snap_iter_4.caffemodel"))
    b = load_caffemodel(str(tmp_path / "single" / "snap_iter_4.caffemodel"))
    for layer in b:
        for x, y in zip(a[layer], b[layer]):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_shards_of_shuffled_and_window_streams_are_the_global_batch(sources, tmp_path):
    """With shuffle and rand_skip (ImageData) and with WindowData's sampling, the two halves
    read by two processes are the global batch of one reader, device r taking offsets
    j ≡ r (mod 2)."""
    windows = tmp_path / "windows.txt"
    windows.write_text("".join(f"# {i}\n{sources}/png/{i}.png\n3\n9\n7\n2\n"
                               f"1 0.9 0 0 5 6\n0 0.1 1 2 6 8\n" for i in range(6)))
    layers = {
        "images": lambda: layer_for("images", sources, 3, 2, "shuffle: true rand_skip: 7"),
        "windows": lambda: make_layer(
            f'type: "WindowData" name: "w" window_data_param {{ source: "{windows}" '
            f'batch_size: 3 fg_threshold: 0.5 bg_threshold: 0.5 fg_fraction: 0.5 }} '
            f'transform_param {{ crop_size: 5 mirror: true }}', [], "TRAIN",
            tops=["data", "label"], config=CONFIG.replace(decode_workers=2)),
    }
    for name, make in layers.items():
        with make().make_reader(seed=5) as whole:
            stream = [whole.next_batch() for _ in range(8)]  # 4 global batches of 2 x 3
        data = np.concatenate([b["data"] for b in stream])
        halves = []
        for r in range(2):
            with ShardReader(make().make_reader(seed=5), 2, [r]) as shard:
                halves.append(np.concatenate([shard.next_batch()["data"] for _ in range(4)]))
        for k in range(4):
            glob = data[6 * k:6 * k + 6]
            for r in range(2):
                np.testing.assert_array_equal(halves[r][3 * k:3 * k + 3], glob[r::2],
                                              err_msg=name)


def test_training_resumes_bit_exactly_across_worker_counts(tmp_path, monkeypatch, images):
    """Host-fed training with random crops and mirrors: 6 iterations on 3 workers, and the
    same run stopped at iteration 3 and resumed on 1 worker, end at the same bytes."""
    from jcaffe.caffemodel import load_caffemodel
    from jcaffe.cli import main

    chw, labels = images
    db = tmp_path / "db"
    write_lmdb(str(db), png_datums(chw, labels % 3))
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(db=db).replace(
        "scale: 0.00390625", "scale: 0.00390625 crop_size: 5 mirror: true"))
    monkeypatch.setenv("JCAFFE_DATA_ON_DEVICE", "0")
    runs = {}
    for name, snapshot in (("full", 0), ("cut", 3)):
        solver = tmp_path / f"{name}.prototxt"
        solver.write_text(SOLVER.format(net=net, prefix=tmp_path / name / "snap")
                          .replace("max_iter: 4", f"max_iter: {6 if not snapshot else 3}")
                          + f"snapshot: {snapshot}\n")
        runs[name] = solver
    assert main(["train", "--solver", str(runs["full"]), "--cpu", "--decode_workers", "3"]) == 0
    assert main(["train", "--solver", str(runs["cut"]), "--cpu", "--decode_workers", "3"]) == 0
    assert main(["train", "--solver", str(runs["cut"]), "--cpu", "--decode_workers", "1",
                 "--iterations", "6",
                 "--snapshot", str(tmp_path / "cut" / "snap_iter_3.solverstate")]) == 0
    full = load_caffemodel(str(tmp_path / "full" / "snap_iter_6.caffemodel"))
    resumed = load_caffemodel(str(tmp_path / "cut" / "snap_iter_6.caffemodel"))
    for layer in full:
        for x, y in zip(full[layer], resumed[layer]):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), layer


def jpeg(array, mode="RGB", **save):
    import io
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_jpegs_decode_as_pillow_decodes_them():
    """OpenCV's JPEG path (colour, grey, native; every chroma subsampling, progressive, odd
    sizes, grey files, CMYK left to Pillow) gives Pillow's pixels exactly; EXIF orientation is
    not applied (as Caffe's OpenCV 2.4); a JPEG cut short is an error naming the image."""
    from PIL import Image

    from jcaffe.data.image import (_decode_jpeg_opencv, decode_image, decode_image_pillow,
                                   jpeg_components)

    pytest.importorskip("cv2")
    rgb = RNG.normal(128, 50, (37, 53, 3)).clip(0, 255).astype(np.uint8)
    files = {f"s{sub}p{int(prog)}": jpeg(rgb, subsampling=sub, progressive=prog)
             for sub in (0, 1, 2) for prog in (False, True)}
    files["grey"] = jpeg(rgb[:, :, 1], "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    files["exif"] = jpeg(rgb, exif=exif.tobytes())
    cmyk = __import__("io").BytesIO()
    Image.fromarray(rgb, "RGB").convert("CMYK").save(cmyk, "JPEG")
    files["cmyk"] = cmyk.getvalue()
    assert jpeg_components(files["s0p0"]) == 3 and jpeg_components(files["grey"]) == 1
    assert jpeg_components(files["cmyk"]) == 4 and jpeg_components(b"\x89PNG....") is None
    for name, data in files.items():
        for color in (True, False, None):
            got = decode_image(data, color, where=name)
            # OpenCV decodes all but the CMYK file (the comparison is of two decoders).
            assert (_decode_jpeg_opencv(data, color) is None) == (name == "cmyk"), name
            want = decode_image_pillow(data, color, where=name)
            assert got.shape == want.shape and got.shape[:2] == (37, 53), (name, color)
            assert got.tobytes() == want.tobytes(), (name, color)
    with pytest.raises(DataError, match="cut.jpg"):
        decode_image(files["s2p0"][:len(files["s2p0"]) // 2], True, where="cut.jpg")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_copy_chw_stores_the_image_transposed(channels):
    """An [H, W, C] decode stored into a [C, H, W] batch slot is the image with its channel
    axis first (indexed element by element, the reference), for OpenCV's plane split (2-4
    uint8 channels from a contiguous decode) and numpy's copy (1 channel, floats, a strided
    source); a slot of another shape is refused, nothing written."""
    from jcaffe.data.image import copy_chw

    hwc = RNG.integers(0, 256, (5, 6, channels), dtype=np.uint8)
    for src, dtype in ((hwc, np.uint8), (hwc[::-1], np.uint8), (hwc, np.float32)):
        batch = np.zeros((2, channels, 5, 6), dtype)
        copy_chw(batch[1], np.transpose(src, (2, 0, 1)).astype(dtype, copy=False))
        for c in range(channels):
            for y in range(5):
                for x in range(6):
                    assert batch[1, c, y, x] == src[y, x, c]
        assert not batch[0].any()
    slot = np.zeros((channels, 6, 5), np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        copy_chw(slot, np.transpose(hwc, (2, 0, 1)))
    assert not slot.any()


def test_decode_pool_runs_every_record_once_and_raises_the_first_failure_in_record_order():
    """Every index is run exactly once on the workers; when several fail, the lowest index's
    error is raised even when a later one fails first in time (record 2 fails at once, record
    1 only after a pause), as one worker going in order would have met it."""
    import threading
    import time

    from jcaffe.data.workers import DecodePool

    seen, lock = [], threading.Lock()

    def fn(i):
        with lock:
            seen.append(i)

    DecodePool(3).run(fn, 50)
    assert sorted(seen) == list(range(50))

    def failing(i):
        if i == 1:
            time.sleep(0.05)
            raise DataError("record 1 is bad")
        if i == 2:
            raise DataError("record 2 is bad")

    with pytest.raises(DataError, match="record 1 is bad"):
        DecodePool(2).run(failing, 8)


def test_batch_arrays_are_reused_only_when_nothing_else_holds_them():
    """A batch array comes back for the next batch only once every holder let it go (a batch
    dict, a view of it, an array put on the device from it); a free array of another shape
    is dropped, not kept; no more than ``keep`` are kept."""
    import gc

    import jax

    from jcaffe.data.workers import BatchArrays

    arrays = BatchArrays(keep=2)
    shape = (4, 3)
    a = arrays.empty(shape, np.uint8)
    first = id(a)
    held = {"data": a[1:]}  # a batch dict holding a view of it
    del a
    b = arrays.empty(shape, np.uint8)
    assert id(b) != first
    del held
    gc.collect()
    c = arrays.empty(shape, np.uint8)
    assert id(c) == first  # free again: reused
    assert c.ctypes.data % 64 == 0  # aligned: a CPU device uses it in place
    c[...] = 7
    on_device = jax.device_put(c)
    del c
    d = arrays.empty(shape, np.uint8)  # the first is held by the device array, b by us
    assert id(d) != first and d is not b
    d[...] = 9
    np.testing.assert_array_equal(np.asarray(on_device), np.full(shape, 7, np.uint8))
    assert len(arrays._arrays) == 2  # keep=2: d was made but not kept
    del on_device, d
    gc.collect()
    e = arrays.empty(shape, np.uint8)
    assert id(e) == first
    del b, e
    other = arrays.empty((5,), np.float32)
    assert other.shape == (5,) and other.dtype == np.float32
    assert [x.shape for x, _ in arrays._arrays] == [(5,)]  # the free (4, 3) arrays dropped


def test_processes_on_the_same_cores_share_them():
    """The default worker count of a multi-process run divides the cores among the processes
    started on the same host and cores (same key), not those elsewhere or bound to others."""
    from jcaffe.parallel import core_key, sharing_cores

    mine = core_key()
    assert len(mine) == 2 and all(0 <= v < 2**31 for v in mine)
    assert core_key() == mine  # stable
    other = [mine[0] ^ 1, mine[1]]
    assert sharing_cores([mine, mine, other], mine) == 2
    assert sharing_cores([other], mine) == 1
