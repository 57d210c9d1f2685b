"""Caffe's tool commands on jcaffe: ``train``, ``test``, ``time``, ``device_query``: the
command line of ``tools/caffe.cpp`` (with ``util/signal_handler.cpp``'s signal effects).

They mirror ``caffe <command>``: the same flags (``--solver``, ``--model``,
``--weights``, ``--snapshot``, ``--iterations``, ``--gpu``, ``--cpu``, ``--phase``) and the same
log lines, so scripts written for Caffe keep working.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jcaffe import log
from jcaffe.cli import parse_flags, register_command
from jcaffe.config import Config
from jcaffe.errors import JcaffeError, SolverError

_log = log.get_logger("caffe")


def _device_from_flags(args):
    """``--gpu`` / ``--cpu`` as ``caffe test`` / ``caffe time`` read them: one device."""
    from jcaffe import parallel

    gpu = parallel.parse_ids(args.gpu, "gpu") if getattr(args, "gpu", "") else None
    devices = parallel.select_devices(gpu=gpu, force_cpu=getattr(args, "cpu", False))
    if len(devices) > 1:
        _log.warning("several devices given: %s uses the first, %s", "this command", devices[0])
    return devices[0]


# ---------------------------------------------------------------------------------------------
# train: flags, signals, train_main
# ---------------------------------------------------------------------------------------------
def install_signal_handlers(solver, sigint_effect: str, sighup_effect: str):
    """Caffe's SignalHandler: SIGINT / SIGHUP ask the solver to 'stop' or 'snapshot' at its
    next chunk boundary (or nothing: 'none')."""
    def handler(effect):
        def h(signum, frame):
            if effect == "none":
                return
            _log.info("Signal %d received: %s", signum, effect)
            solver.request(effect)
        return h

    signal.signal(signal.SIGINT, handler(sigint_effect))
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler(sighup_effect))


def config_from_flags(args, environ=None) -> Config:
    """The execution config of a command: ``JCAFFE_*`` variables, then flags."""
    return Config.from_env(os.environ if environ is None else environ,
                           precision=getattr(args, "precision", None) or None,
                           decode_workers=getattr(args, "decode_workers", None))


def train_main(args) -> int:
    """Runs ``caffe train`` from parsed flags (solver, weights, snapshot, gpu, cpu, devices,
    iterations, level, stage, multi-process flags)."""
    import logging

    from jcaffe import parallel, prototxt
    from jcaffe.solver import Solver

    parallel.initialize(args.coordinator_address, args.num_processes, args.process_id,
                        heartbeat_timeout_s=args.heartbeat_timeout)
    log.setup(level=logging.INFO if parallel.is_main_process() else logging.WARNING)
    if args.weights and args.snapshot:
        raise SolverError("give --weights or --snapshot, not both (as Caffe)")
    sp = prototxt.read_solver(args.solver)
    if args.level or args.stage:
        # Caffe's `caffe train --level --stage`: they select the train net's layers.
        sp.train_state.level = args.level
        sp.train_state.stage.extend([s for s in args.stage.split(",") if s])
    gpu = parallel.parse_ids(args.gpu, "gpu") if args.gpu else None
    devs = parallel.parse_ids(args.devices, "devices") if args.devices else None
    devices = parallel.select_devices(sp, gpu=gpu, devices=devs, force_cpu=args.cpu)
    if args.iterations is not None:
        sp.max_iter = args.iterations
    solver = Solver(sp, solver_path=args.solver, devices=devices,
                    config=config_from_flags(args),
                    weights=[w for w in args.weights.split(",") if w] or None,
                    iters_per_call=args.iters_per_call)
    if args.snapshot:
        solver.restore(args.snapshot)
    install_signal_handlers(solver, args.sigint_effect, args.sighup_effect)
    try:
        solver.solve()
    finally:
        solver.close()
    return 0


def add_train_flags(parser) -> None:
    parser.add_argument("solver", nargs="?", help="the solver prototxt")
    parser.add_argument("--solver", dest="solver_flag", metavar="SOLVER", help="the solver prototxt")
    parser.add_argument("--weights", default="", help="caffemodel(s) to fine-tune from, "
                        "comma-separated (replaces the solver's `weights`)")
    parser.add_argument("--snapshot", default="", help="a .solverstate to resume from")
    parser.add_argument("--gpu", default="", help="GPU ids (comma-separated) or 'all'")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU whatever the solver says")
    parser.add_argument("--devices", default="", help="device ids of the chosen platform "
                        "(comma-separated) or 'all': data-parallel training")
    parser.add_argument("--iterations", type=int, default=None, help="override max_iter")
    parser.add_argument("--level", type=int, default=0, help="the train net's NetState level")
    parser.add_argument("--stage", default="", help="the train net's NetState stages, "
                        "comma-separated")
    parser.add_argument("--precision", default="", choices=["", "float32", "tf32", "bf16"],
                        help="matmul/convolution precision (default float32, Caffe's numbers)")
    parser.add_argument("--decode_workers", type=int, default=None, metavar="N",
                        help="threads decoding host-fed records (default: one per core)")
    parser.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
    parser.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
    parser.add_argument("--iters_per_call", type=int, default=100,
                        help="iterations fused into one device program")
    parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                        help="multi-process training: process 0's address")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--heartbeat_timeout", type=int, default=30, metavar="SECONDS",
                        help="multi-process: a process silent this long fails the run")


@register_command("train", "train or fine-tune a model (--solver, --weights, --snapshot)")
def train_command(argv) -> int:
    parser = argparse.ArgumentParser(prog="jcaffe train")
    add_train_flags(parser)
    args = parse_flags(argv, parser)
    args.solver = args.solver_flag or args.solver
    if not args.solver:
        raise JcaffeError("train needs --solver=SOLVER.prototxt")
    return train_main(args)


def _net_and_feed(args, phase):
    from jcaffe.caffemodel import load_caffemodel
    from jcaffe.net import Net
    from jcaffe.data.netfeed import NetFeed

    device = _device_from_flags(args)
    with jax.default_device(device):
        net = Net(args.model, phase, level=args.level,
                  stages=[s for s in args.stage.split(",") if s],
                  config=config_from_flags(args).replace(platform=device.platform))
        params = net.init(jax.random.key(0))
        if args.weights:
            for w in args.weights.split(","):
                params = net.copy_from(params, load_caffemodel(w), filename=w)
        # Input layers have no dataset: such nets get synthetic batches.
        fed = net.data_layers and all(hasattr(l, "make_reader") for l in net.data_layers)
        feed = NetFeed(net, device, False, list(range(len(net.data_layers)))) if fed else None
    return net, params, feed, device


def _synthetic_inputs(net, rng):
    inputs = {}
    for top, (shape, dtype) in net.input_specs().items():
        if np.issubdtype(np.dtype(dtype), np.integer):
            inputs[top] = rng.integers(0, 2, shape).astype(dtype)
        else:
            inputs[top] = rng.standard_normal(shape).astype(np.float32)
    return inputs


@register_command("test", "score a model: --model M --weights W --iterations N")
def test_command(argv) -> int:
    args = _model_command_args("test", argv)
    net, params, feed, device = _net_and_feed(args, args.phase or "TEST")
    if not args.weights:
        _log.warning("no --weights given: testing freshly initialised parameters")
    # Random transforms at TEST (Caffe's mirror: true mirrors in either phase) draw from a
    # fixed key, one per batch: a score is reproducible.
    key = jax.random.key(0)
    fn = jax.jit(lambda p, b, i: net.loss(p, b, train=False, frozen=False,
                                          key=jax.random.fold_in(key, i)))
    totals: dict[str, np.ndarray] = {}
    loss_sum = 0.0
    # SSD test nets: a DetectionEvaluate output is scored as the fork's solver does (mAP).
    evals = {t: [] for l in net.layers if l.type == "DetectionEvaluate" for t in l.top_names
             if t in net.output_names}
    for i in range(args.iterations):
        batch = feed.host_batch(i) if feed else _synthetic_inputs(net, np.random.default_rng(i))
        loss, (blobs, _) = fn(params, batch, i)
        loss_sum += float(loss)
        k = 0
        for name in net.output_names:
            if name in evals:
                evals[name].append(np.asarray(blobs[name]))
                continue
            vals = np.ravel(np.asarray(blobs[name], np.float64))
            totals[name] = totals.get(name, 0) + vals
            for v in vals:
                _log.info("Batch %d, %s = %.6g", i, name, v)
                k += 1
    _log.info("Loss: %.6g", loss_sum / args.iterations)
    for name, tops in evals.items():
        from jcaffe.layers.detection import average_precisions

        _log.info("%s = %.6g (mAP, %s)", name, average_precisions(tops, args.ap_version)[0],
                  args.ap_version)
    for name in net.output_names:
        if name in evals:
            continue
        w = net.output_loss_weight(name)
        for v in totals[name] / args.iterations:
            if w:
                _log.info("%s = %.6g (* %g = %.6g loss)", name, v, w, v * w)
            else:
                _log.info("%s = %.6g", name, v)
    if feed:
        feed.close()
    return 0


def _model_command_args(name: str, argv):
    """Parses the flags shared by ``test`` and ``time``; ``--model`` is required."""
    parser = argparse.ArgumentParser(prog=f"jcaffe {name}")
    _model_flags(parser)
    args = parse_flags(argv, parser)
    if not args.model:
        raise JcaffeError(f"{name} needs --model=NET.prototxt")
    log.setup()
    return args


def _model_flags(parser):
    parser.add_argument("--model", default="", help="the net prototxt")
    parser.add_argument("--weights", default="", help="caffemodel(s), comma-separated")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--gpu", default="")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--phase", default="", choices=["", "TRAIN", "TEST"])
    parser.add_argument("--level", type=int, default=0)
    parser.add_argument("--stage", default="")
    parser.add_argument("--ap_version", default="Integral",
                        choices=["11point", "MaxIntegral", "Integral"],
                        help="how test scores a DetectionEvaluate output (the SSD fork's "
                             "solver ap_version)")


def _timeit(fn, *args, iterations: int):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.mean(times)


def _time_backward(f, blobs, bottoms, floats, rng, iterations):
    """Time of ``f``'s backward pass alone, as Caffe's Backward: the forward pass and its
    residuals are computed once (jax.vjp), then only the jitted VJP is timed, with random
    top gradients (constant ones would let XLA turn the GEMMs into reductions)."""
    def fd(bl, float_bottoms):
        bo = list(bottoms)
        for k, v in zip(floats, float_bottoms):
            bo[k] = v
        return [o for o in f(bl, bo) if jnp.issubdtype(o.dtype, jnp.floating)]

    outs, vjp_fn = jax.vjp(fd, blobs, [bottoms[k] for k in floats])
    cts = [jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in outs]
    backward = jax.jit(lambda vjp_fn, cts: vjp_fn(cts))
    return _timeit(backward, vjp_fn, cts, iterations=iterations)


@register_command("time", "benchmark the execution time of a model (per layer and fused)")
def time_command(argv) -> int:
    from jcaffe.layers.base import Context

    args = _model_command_args("time", argv)
    phase = args.phase or "TRAIN"
    net, params, feed, device = _net_and_feed(args, phase)
    train = phase == "TRAIN"
    key = jax.random.key(0)
    with jax.default_device(device):
        batch = feed.host_batch(0) if feed else _synthetic_inputs(net, np.random.default_rng(0))
        if feed:
            feed.close()
        batch = jax.device_put(batch, device)
        n = args.iterations
        _log.info("Performing Forward")
        fwd = jax.jit(lambda p, b: net.loss(p, b, train=train, key=key)[0])
        _log.info("Initial loss: %.6g", float(fwd(params, batch)))
        grad = jax.jit(jax.grad(lambda p, b: net.loss(p, b, train=train, key=key)[0]))
        _log.info("*** Benchmark begins ***")
        _log.info("Testing for %d iterations.", n)
        t_fwd = _timeit(fwd, params, batch, iterations=n)
        t_fb = _timeit(grad, params, batch, iterations=n)
        blobs = net.apply(params, batch, train=train, key=key)
        data_tops = {t for layer in net.layers if layer.is_data for t in layer.top_names}
        for i, layer in enumerate(net.layers):
            lblobs = net._layer_blobs(params, layer)
            if layer.is_data:
                bottoms = [batch[t] for t, _, _ in layer.input_specs()]
            else:
                bottoms = [blobs[b] for b in layer.bottom_names]
            ctx = Context(train=train, key=jax.random.fold_in(key, i) if layer.needs_key else None)
            # Time the formulation the net runs: channels-last where the net keeps it.
            channels_last = net.plan[layer.name].channels_last and not layer.layout_agnostic
            if channels_last:
                bottoms = [jnp.transpose(b, (0, 2, 3, 1)) for b in bottoms]

            def f(bl, bo, layer=layer, ctx=ctx, channels_last=channels_last):
                out = (layer.apply_nhwc if channels_last else layer.apply)(bl, bo, ctx)
                return out[0] if layer.stateful else out

            lf = jax.jit(f)
            tf = _timeit(lf, lblobs, bottoms, iterations=n)
            _log.info("%15s\tforward: %.4f ms.", layer.name, tf)
            # Like Caffe, no gradient for bottoms that come straight from a data layer.
            floats = [] if layer.is_data else [
                k for k, b in enumerate(bottoms)
                if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating)
                and layer.bottom_names[k] not in data_tops]
            if (lblobs or floats) and not layer.is_data:
                tb = _time_backward(f, lblobs, bottoms, floats, np.random.default_rng(i), n)
                _log.info("%15s\tbackward: %.4f ms.", layer.name, tb)
        _log.info("Average Forward pass: %.4f ms.", t_fwd)
        _log.info("Average Backward pass: %.4f ms.", t_fb - t_fwd)
        _log.info("Average Forward-Backward: %.4f ms.", t_fb)
        if train:
            import optax
            tx = optax.sgd(0.01, momentum=0.9)
            opt = tx.init(params)

            def step(p, o, b):
                g = jax.grad(lambda p: net.loss(p, b, train=True, key=key)[0])(p)
                u, o = tx.update(g, o, p)
                return optax.apply_updates(p, u), o

            step = jax.jit(step)
            t_step = _timeit(lambda p, o, b: step(p, o, b), params, opt, batch, iterations=n)
            _log.info("Average fused train step (forward + backward + SGD update, one XLA "
                      "program): %.4f ms.", t_step)
        _log.info("*** Benchmark ends ***")
    return 0


@register_command("device_query", "show the devices JAX can run on")
def device_query_command(argv) -> int:
    parse_flags(argv, argparse.ArgumentParser(prog="jcaffe device_query",
                                              description="show the devices JAX can run on"))
    log.setup()
    _log.info("JAX %s, default backend: %s", jax.__version__, jax.default_backend())
    for d in jax.devices() + ([] if jax.default_backend() == "cpu" else jax.devices("cpu")):
        _log.info("Device id: %d", d.id)
        _log.info("Platform: %s", d.platform)
        _log.info("Kind: %s", d.device_kind)
        try:
            stats = d.memory_stats() or {}
        except Exception:  # not every backend reports memory
            stats = {}
        if "bytes_limit" in stats:
            _log.info("Total memory: %d", stats["bytes_limit"])
    return 0


@register_command("convert_imageset", "convert a list of images into a dataset (tensorstore/LMDB/LevelDB)")
def convert_imageset_command(argv) -> int:
    from jcaffe.tools import convert_imageset

    return convert_imageset.main(list(argv))


@register_command("compute_image_mean", "compute the mean image of a dataset into a .binaryproto")
def compute_image_mean_command(argv) -> int:
    from jcaffe.tools import compute_image_mean

    return compute_image_mean.main(list(argv))
