"""The host input pipeline: decode rate against the worker count, and whether a step starves.

    python benchmarks/input_pipeline.py                  # short run (about a minute on 2 cores)
    python benchmarks/input_pipeline.py --records 1024 --batch 256 --seconds 5   # ImageNet-like
    python benchmarks/input_pipeline.py --workers 1,2,4,8,16 --net my_train.prototxt

It makes its own data in a temporary folder (or ``--data DIR``, kept and reused): ``--records``
JPEG images of ``--size``² pixels (smooth random scenes with noise, quality 95, as
``convert_imageset --encoded`` stores them) as an LMDB of encoded Datums, and the same files
with an ``ImageData`` list. Then, in one run:

1. **decoder**: the chosen decoder's raw single-core rate (``jcaffe.data.image.decode_image``
   on the JPEG bytes, one thread, nothing else: OpenCV's ``imdecode`` for these JPEGs), and
   Pillow's for comparison;
2. **Data (LMDB)** and **ImageData**: records/s of the whole host pipeline of a data layer
   (``crop_size``/``mirror``/mean values as AlexNet's; the prefetching feeder, read ahead,
   decoded on W workers, put on the device) for each worker count W (default 1, 2, ... the
   cores available), with the ratios the targets name: W=1 against the decoder's single-core
   rate (target >= 0.8), W workers against W x that rate (target >= 0.7, up to the cores).
   Each row alternates ``--rounds`` windows of the decoder alone and of the pipeline, and
   takes each round's ratio of its two windows (the median is the row's): a shared machine's
   speed drifts within minutes, two windows a second apart see the same machine;
3. **one process, N devices** (``--devices``, 4 virtual CPU devices): the host side of a
   data-parallel run's global batches (``NetFeed.chunk``: each device's records read and
   decoded in device blocks into one array; ``parallel.put_sharded``), records/s and CPU per
   record against the decoder's rate;
4. **two processes**: two processes on this host, each owning one of 2 devices, read the
   same LMDB as a 2-device run does (``jcaffe.data.readers.ShardReader``, what a multi-process
   run uses), with half the cores each: how many records each decodes (target: half of those
   the run consumes) and their combined rate;
5. **starvation**: the train step of ``--net`` (default: AlexNet's first stage, conv1 + relu +
   pool + a classifier, on the 227² crops) fed by the real pipeline (W = all cores), against
   the same step on a device-resident synthetic batch of the same shape. ``starved`` when the
   fed step is more than 10 % slower than the synthetic one; on a CPU device, than the
   synthetic one plus the pipeline's own CPU time per step spread over the cores (there the
   decoders and the step share the cores, and the step waiting for data is what is asked).

Numbers vary with the machine's load (printed with the table): compare ratios within one run.
``--json FILE`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STARVED_MARGIN = 1.10

DEFAULT_NET = """
name: "alexnet_stage1"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ mirror: true crop_size: {crop} mean_value: 104 mean_value: 117
                     mean_value: 123 }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB prefetch: 4 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 96 kernel_size: 11 stride: 4
                       weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
"""


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# -- data ---------------------------------------------------------------------------------------
def make_data(root: str, records: int, size: int) -> tuple[str, str, list[bytes]]:
    """``root/lmdb`` (encoded Datums), ``root/images/*.jpg`` with ``root/list.txt``; returns
    their paths and the JPEG bytes. Reused when already there with the same records."""
    import numpy as np

    from jcaffe.data.datum import encoded_datum
    from jcaffe.data.image import encode_image
    from jcaffe.data.sources import write_lmdb

    lmdb_path = os.path.join(root, "lmdb")
    list_path = os.path.join(root, "list.txt")
    folder = os.path.join(root, "images")
    stamp = os.path.join(root, "made.json")
    want = {"records": records, "size": size}
    names = [f"{i:06d}.jpg" for i in range(records)]
    if os.path.exists(stamp) and json.load(open(stamp)) == want:
        return lmdb_path, list_path, [open(os.path.join(folder, n), "rb").read() for n in names]
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    jpegs = []
    coarse = max(2, size // 32)
    for i in range(records):
        # A smooth scene (bilinear upsampled coarse colours) with fine noise: JPEG sizes and
        # decode times like photographs', not like pure noise or flat colour.
        base = rng.integers(0, 256, (coarse, coarse, 3)).astype(np.float32)
        ys = np.linspace(0, coarse - 1, size)
        y0 = np.floor(ys).astype(int).clip(0, coarse - 2)
        fy = (ys - y0)[:, None, None]
        rows = base[y0] * (1 - fy) + base[y0 + 1] * fy
        fx = (ys - y0)[None, :, None]
        img = rows[:, y0] * (1 - fx) + rows[:, y0 + 1] * fx
        img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        data = encode_image(img, "jpg")
        jpegs.append(data)
        with open(os.path.join(folder, names[i]), "wb") as f:
            f.write(data)
    write_lmdb(lmdb_path, [(f"{i:08d}_{n}", encoded_datum(b, i % 10))
                           for i, (n, b) in enumerate(zip(names, jpegs))])
    with open(list_path, "w") as f:
        f.writelines(f"{n} {i % 10}\n" for i, n in enumerate(names))
    json.dump(want, open(stamp, "w"))
    return lmdb_path, list_path, jpegs


# -- measurements -------------------------------------------------------------------------------
def decoder_rate(jpegs: list[bytes], seconds: float, pillow: bool = False) -> float:
    """Images/s of the decoder alone on one thread (``decode_image``, or Pillow's path),
    cycling through the same records the pipeline reads."""
    from jcaffe.data.image import decode_image, decode_image_pillow

    if pillow:
        decode_image = decode_image_pillow  # noqa: F811
    decode_image(jpegs[0], None)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for data in jpegs[n % len(jpegs):][:32]:
            decode_image(data, None)
            n += 1
    return n / (time.perf_counter() - t0)


def data_layer(kind: str, source: str, root: str, batch: int, crop: int, workers: int):
    from google.protobuf import text_format

    from jcaffe.config import Config
    from jcaffe.layers.base import layer_class
    from jcaffe.proto import caffe_pb2

    transform = (f"transform_param {{ mirror: true crop_size: {crop} mean_value: 104 "
                 f"mean_value: 117 mean_value: 123 }}")
    if kind == "lmdb":
        text = (f'name: "data" type: "Data" top: "data" top: "label" {transform} '
                f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }}')
    else:
        text = (f'name: "data" type: "ImageData" top: "data" top: "label" {transform} '
                f'image_data_param {{ source: "{source}" root_folder: "{root}/images/" '
                f'batch_size: {batch} }}')
    lp = text_format.Parse(text, caffe_pb2.LayerParameter())
    return layer_class(lp)(lp, [], caffe_pb2.TRAIN, config=Config(decode_workers=workers))


def cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_idle(feeder, timeout: float = 30.0) -> None:
    """Until the feeder has read ahead all it may (its queue is full, so its thread and the
    decode workers are idle, the batch read ahead by the reader finished)."""
    t0 = time.perf_counter()
    while feeder.waiting < feeder.prefetch and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)
    time.sleep(0.1)


def pipeline_rounds(layer, jpegs: list[bytes], window: float, rounds: int) -> dict:
    """The pipeline's rate measured side by side with the decoder's: ``rounds`` times, a
    ``window`` of the decoder alone on one thread (the pipeline idle), then a ``window`` of
    records/s through the prefetching feeder (read, decode on the workers, device_put) once
    the batches it had read ahead are taken (so the window times production, not the queue),
    with the process's CPU milliseconds per record meanwhile (which a busy machine does not
    inflate: equal figures across worker counts mean the threads cost no extra work).
    Returns the medians and each round's pipeline/decoder ratio: the machine's speed drifts by
    tens of percent within minutes, a round's two windows share its speed."""
    import statistics

    import jax

    from jcaffe.data.feed import PrefetchFeeder

    rates, decs, cpus = [], [], []
    with layer.make_reader(seed=0) as reader, PrefetchFeeder(reader) as feeder:
        # Warm up: new threads pay one-off costs (the decoders' per-thread set-up) for a few
        # batches; measure after them.
        t0, k = time.perf_counter(), 0
        while k < 3 or time.perf_counter() - t0 < min(1.0, window):
            jax.block_until_ready(next(feeder))
            k += 1
        for _ in range(rounds):
            wait_idle(feeder)
            decs.append(decoder_rate(jpegs, window))
            while feeder.waiting:  # take what was read ahead, and the batch in flight
                jax.block_until_ready(next(feeder))
            jax.block_until_ready(next(feeder))
            n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
            while time.perf_counter() - t0 < window or n < 2:
                jax.block_until_ready(next(feeder))
                n += 1
            records = n * layer.batch_size
            rates.append(records / (time.perf_counter() - t0))
            cpus.append((cpu_seconds() - c0) / records * 1e3)
    w = reader.workers
    ratios = [r / (w * d) for r, d in zip(rates, decs)]
    return {"records_per_s": statistics.median(rates), "decoder_per_s": statistics.median(decs),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "rounds": [{"records_per_s": r, "decoder_per_s": d}
                                                 for r, d in zip(rates, decs)],
            "cpu_ms_per_record": statistics.median(cpus)}


def shard_child(kind_source: str, root: str, batch: int, crop: int, workers: int,
                process: int, batches: int) -> dict:
    """One of two processes: process ``process`` of a 2-device run reads its device's
    records of ``batches`` global batches through the prefetching feeder. It says ``ready``
    once set up (imports, reader, a first batch, the queue filled) and starts timing when
    the parent writes a line, so that the two processes' windows coincide."""
    import jax

    from jcaffe.data.feed import PrefetchFeeder
    from jcaffe.data.readers import ShardReader

    layer = data_layer("lmdb", kind_source, root, batch, crop, workers)
    shard = ShardReader(layer.make_reader(seed=0), 2, [process])
    with shard, PrefetchFeeder(shard) as feeder:
        jax.block_until_ready(next(feeder))
        taken = 1
        wait_idle(feeder)
        print("ready", flush=True)
        sys.stdin.readline()
        while feeder.waiting:  # what was read ahead while waiting is not timed
            jax.block_until_ready(next(feeder))
            taken += 1
        t0 = time.perf_counter()
        for _ in range(batches):
            jax.block_until_ready(next(feeder))
        seconds = time.perf_counter() - t0
    return {"process": process, "decoded": shard.records_read,
            "consumed_global": (taken + batches) * 2 * batch,
            "records_per_s": batches * batch / seconds}


def two_processes(lmdb_path: str, root: str, batch: int, crop: int, workers: int,
                  batches: int) -> list[dict]:
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child_shard",
                               json.dumps([lmdb_path, root, batch, crop, workers, p, batches])],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for p in range(2)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a two-process child failed to start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p in procs:
            text, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"a two-process child failed (exit {p.returncode})")
            out.append(json.loads(text.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def devices_child(lmdb_path: str, batch: int, crop: int, workers: int, devices: int,
                  batches: int) -> dict:
    """One process with ``devices`` (virtual CPU) devices: records/s of the host side of a
    data-parallel run's global batches (``NetFeed.chunk``: read, decode, assemble in device
    blocks; ``parallel.put_sharded``: on the devices), and CPU ms per record."""
    import jax
    from google.protobuf import text_format

    from jcaffe import parallel
    from jcaffe.config import Config
    from jcaffe.data.netfeed import NetFeed
    from jcaffe.net import Net
    from jcaffe.proto import caffe_pb2

    text = DEFAULT_NET.format(crop=crop, source=lmdb_path, batch=batch)
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), "TRAIN",
              config=Config(decode_workers=workers), verbose=False)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    feed = NetFeed(net, parallel.replicated(mesh), False, [0], ranks=devices)
    try:
        for b in range(2):
            jax.block_until_ready(parallel.put_sharded(feed.chunk(b, 1, 1), mesh, 1))
        t0, c0 = time.perf_counter(), cpu_seconds()
        for b in range(2, 2 + batches):
            jax.block_until_ready(parallel.put_sharded(feed.chunk(b, 1, 1), mesh, 1))
        records = batches * devices * batch
        return {"devices": devices, "records_per_s": records / (time.perf_counter() - t0),
                "cpu_ms_per_record": (cpu_seconds() - c0) / records * 1e3}
    finally:
        feed.close()


def devices_run(lmdb_path: str, batch: int, crop: int, workers: int, devices: int,
                batches: int) -> dict:
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child_devices",
                        json.dumps([lmdb_path, batch, crop, workers, devices, batches])],
                       env=env, stdout=subprocess.PIPE, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"the {devices}-device child failed (exit {p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def step_times(net_text: str, workers: int, steps: int) -> dict:
    """Seconds per train step (forward, backward, SGD update) fed by the real pipeline, and
    on one device-resident synthetic batch of the same shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from google.protobuf import text_format

    from jcaffe.config import Config
    from jcaffe.data.feed import PrefetchFeeder
    from jcaffe.net import Net
    from jcaffe.proto import caffe_pb2

    param = text_format.Parse(net_text, caffe_pb2.NetParameter())
    net = Net(param, "TRAIN", config=Config(decode_workers=workers), verbose=False)
    layer = net.data_layers[0]
    params = net.init(jax.random.key(0))

    def step(params, batch, key):
        (loss, _), grads = jax.value_and_grad(
            lambda p: net.loss(p, batch, train=True, key=key), has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p if g is None else p - 0.001 * g, params, grads,
                              is_leaf=lambda x: x is None)
        return params, loss

    step = jax.jit(step, donate_argnums=(0,))
    key = jax.random.key(1)
    specs = {t: (s, d) for t, s, d in layer.input_specs()}
    rng = np.random.default_rng(0)
    synthetic = {t: jax.device_put(rng.integers(0, 10, s).astype(d)) for t, (s, d) in
                 specs.items()}

    def timed(next_batch) -> float:
        nonlocal params
        for _ in range(2):  # compile, warm up
            params, loss = step(params, next_batch(), key)
        jax.block_until_ready(loss)
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(steps):
            params, loss = step(params, next_batch(), key)
        jax.block_until_ready(loss)
        return (time.perf_counter() - t0) / steps, (cpu_seconds() - c0) / steps

    from jcaffe.data.workers import available_cores

    out = {}
    out["synthetic_s"], cpu_synthetic = timed(lambda: synthetic)
    with layer.make_reader(seed=0) as reader, PrefetchFeeder(reader) as feeder:
        out["pipeline_s"], cpu_fed = timed(lambda: next(feeder))
    out["batch"] = int(layer.batch_size)
    # The pipeline's own CPU seconds per step. On a CPU device they come out of the step's
    # cores: the fed step cannot be faster than the synthetic one plus that share.
    out["pipeline_cpu_s"] = max(0.0, cpu_fed - cpu_synthetic)
    on_cpu = jax.devices()[0].platform == "cpu"
    out["expected_s"] = out["synthetic_s"] + (
        out["pipeline_cpu_s"] / available_cores() if on_cpu else 0.0)
    out["starved"] = out["pipeline_s"] > STARVED_MARGIN * out["expected_s"]
    return out


# -- the run ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    from jcaffe.data.workers import available_cores

    cores = available_cores()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=256, help="JPEGs to make (default 256)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    ap.add_argument("--crop", type=int, default=227, help="crop_size (227)")
    ap.add_argument("--batch", type=int, default=64, help="batch_size (64; ImageNet: 256)")
    ap.add_argument("--workers", default="", help="comma-separated worker counts "
                    f"(default 1..{cores}, the cores available)")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="per measurement window (1)")
    ap.add_argument("--rounds", type=int, default=5, help="decoder/pipeline window pairs "
                    "per row (5)")
    ap.add_argument("--net", default="", help="a train prototxt whose first data layer is "
                    "the one measured (its source is replaced by the benchmark's LMDB); "
                    "default: AlexNet's first stage")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps (3)")
    ap.add_argument("--no_step", action="store_true", help="skip the starvation check")
    ap.add_argument("--no_processes", action="store_true", help="skip the two-process run")
    ap.add_argument("--process_batches", type=int, default=32,
                    help="global batches each of the two processes times (32)")
    ap.add_argument("--devices", type=int, default=4, help="devices of the one-process "
                    "data-parallel measurement (4 virtual CPU devices; 0 skips it)")
    ap.add_argument("--child_shard", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child_devices", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help="keep the generated data here (reused)")
    ap.add_argument("--json", default="", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.child_shard:
        print(json.dumps(shard_child(*json.loads(args.child_shard))))
        return 0
    if args.child_devices:
        print(json.dumps(devices_child(*json.loads(args.child_devices))))
        return 0
    workers = [int(w) for w in args.workers.split(",") if w] or list(range(1, cores + 1))

    root = args.data or tempfile.mkdtemp(prefix="jcaffe-input-")
    try:
        t0 = time.perf_counter()
        lmdb_path, list_path, jpegs = make_data(root, args.records, args.size)
        print(f"data: {args.records} JPEGs {args.size}x{args.size} "
              f"({sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB each) in "
              f"{time.perf_counter() - t0:.1f} s; {cores} cores; load average "
              f"{load_average()}", flush=True)
        result = {"cores": cores, "records": args.records, "size": args.size,
                  "batch": args.batch, "crop": args.crop, "load_before": load_average(),
                  "threads_before": threading.active_count()}
        single = decoder_rate(jpegs, args.seconds)
        pillow = decoder_rate(jpegs, args.seconds, pillow=True)
        result["decoder_single_core_per_s"] = single
        result["pillow_single_core_per_s"] = pillow
        print(f"decoder (decode_image, 1 thread): {single:.0f} images/s; Pillow alone: "
              f"{pillow:.0f} images/s", flush=True)
        rows = []
        print(f"each row: {args.rounds} rounds of {args.seconds:.1f} s of the decoder alone, "
              f"then {args.seconds:.1f} s of the pipeline; medians, and the ratio's range")
        print("| source | workers | records/s | decoder, 1 thread | / (W x decoder) | "
              "CPU ms / record |")
        print("|---|---:|---:|---:|---:|---:|")
        for kind, source in (("lmdb", lmdb_path), ("images", list_path)):
            for w in workers:
                m = pipeline_rounds(data_layer(kind, source, root, args.batch, args.crop, w),
                                    jpegs, args.seconds, args.rounds)
                rows.append({"source": kind, "workers": w, **m})
                name = "Data (LMDB, encoded)" if kind == "lmdb" else "ImageData (list)"
                print(f"| {name} | {w} | {m['records_per_s']:.0f} | {m['decoder_per_s']:.0f} | "
                      f"{m['ratio']:.2f} ({m['ratio_min']:.2f}-{m['ratio_max']:.2f}) | "
                      f"{m['cpu_ms_per_record']:.2f} |", flush=True)
        result["pipeline"] = rows
        if not args.no_processes:
            half = max(1, cores // 2)
            before = decoder_rate(jpegs, args.seconds)
            procs = two_processes(lmdb_path, root, args.batch, args.crop, half,
                                  args.process_batches)
            dec = (before + decoder_rate(jpegs, args.seconds)) / 2
            result["two_processes"] = procs
            total = sum(p["decoded"] for p in procs)
            for p in procs:
                print(f"two processes ({half} workers each), process {p['process']}: decoded "
                      f"{p['decoded']} of the {total} records both decoded "
                      f"({p['decoded'] / total:.2f}; the run consumed {p['consumed_global']}, "
                      f"the rest was read ahead), {p['records_per_s']:.0f} records/s",
                      flush=True)
            together = sum(p["records_per_s"] for p in procs)
            result["two_processes_decoder_per_s"] = dec
            print(f"two processes together: {together:.0f} records/s, "
                  f"{together / (2 * half * dec):.2f} x {2 * half} x the decoder's 1-thread "
                  f"rate ({dec:.0f}/s, measured just before and after)", flush=True)
        if args.devices > 1:
            before = decoder_rate(jpegs, args.seconds)
            dv = devices_run(lmdb_path, args.batch, args.crop, cores, args.devices,
                             args.process_batches // 2)
            dec = (before + decoder_rate(jpegs, args.seconds)) / 2
            dv["decoder_per_s"] = dec
            result["devices_one_process"] = dv
            print(f"one process, {args.devices} devices ({cores} workers): global batches of "
                  f"{args.devices} x {args.batch} assembled and put on the devices at "
                  f"{dv['records_per_s']:.0f} records/s, "
                  f"{dv['records_per_s'] / (cores * dec):.2f} x {cores} x the decoder's "
                  f"1-thread rate ({dec:.0f}/s), {dv['cpu_ms_per_record']:.2f} CPU ms / record",
                  flush=True)
        if not args.no_step:
            if args.net:
                from jcaffe import prototxt
                from google.protobuf import text_format

                param = prototxt.read_net(args.net)
                for lp in param.layer:
                    if lp.type == "Data":
                        lp.data_param.source = lmdb_path
                        break
                text = text_format.MessageToString(param)
            else:
                text = DEFAULT_NET.format(crop=args.crop, source=lmdb_path, batch=args.batch)
            st = step_times(text, max(workers), args.steps)
            result["step"] = st
            share = (f", + {st['pipeline_cpu_s'] * 1e3:.0f} ms of decoding CPU over {cores} "
                     f"cores = {st['expected_s'] * 1e3:.1f} ms when the device is the CPU"
                     if st["expected_s"] != st["synthetic_s"] else "")
            print(f"step (batch {st['batch']}): {st['pipeline_s'] * 1e3:.1f} ms fed by the "
                  f"pipeline ({max(workers)} workers), {st['synthetic_s'] * 1e3:.1f} ms on a "
                  f"device-resident synthetic batch{share}: "
                  f"{'STARVED' if st['starved'] else 'not starved'}", flush=True)
        result["load_after"] = load_average()
        print(f"load average after: {result['load_after']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
