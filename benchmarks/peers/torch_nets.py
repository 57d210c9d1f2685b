"""PyTorch peer for jcaffe's benchmarks: Caffe's LeNet and CIFAR-10 quick nets, trained with
Caffe's SGD solver written by hand in torch ops.

The nets, fillers and solver settings follow prototxt/lenet_train_test.prototxt,
prototxt/lenet_solver.prototxt, prototxt/cifar10_quick_train_test.prototxt and
prototxt/cifar10_quick_solver.prototxt:

* Caffe's SGD: ``v = momentum*v + lr*lr_mult*(g + weight_decay*decay_mult*w); w -= v``.
  torch.optim.SGD puts the learning rate outside the momentum buffer, which is not Caffe's form,
  so the update is written with ``torch._foreach_*`` ops.
* lr_mult 2 on every bias, decay_mult 1 everywhere (neither prototxt sets it).
* Pooling sizes round up, as Caffe's do (``ceil_mode=True``). Caffe's AVE pooling divides by the
  part of the window inside the (unpadded) input: ``count_include_pad=False`` with pad 0 (see
  ``_caffe_ave_pool`` for why it is spelled out).
* SoftmaxWithLoss averages over the batch, as ``F.cross_entropy`` does.

PyTorch is an optional benchmark extra: jcaffe never imports this module.

Standalone:  python benchmarks/peers/torch_nets.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

THREADS = 2
MNIST_SCALE = 0.00390625  # transform_param.scale in lenet_train_test.prototxt: 1/256

# Solver settings, per net (lenet_solver.prototxt, cifar10_quick_solver.prototxt).
SOLVERS = {
    "lenet": dict(base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
                  gamma=0.0001, power=0.75),
    "cifar10_quick": dict(base_lr=0.001, momentum=0.9, weight_decay=0.004, lr_policy="fixed",
                          gamma=0.0, power=0.0),
}
DEFAULT_BATCH = {"lenet": 64, "cifar10_quick": 100}
INPUT_SHAPE = {"lenet": (1, 28, 28), "cifar10_quick": (3, 32, 32)}
BIAS_LR_MULT = 2.0
DECAY_MULT = 1.0


# ----------------------------------------------------------------------------------------------
# Fillers

def _xavier_(w: torch.Tensor) -> None:
    """Caffe's XavierFiller (variance_norm FAN_IN): U(-a, a), a = sqrt(3 / fan_in), with
    fan_in = count / num_output."""
    fan_in = w.numel() / w.shape[0]
    a = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        w.uniform_(-a, a)


def _gaussian_(w: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        w.normal_(0.0, std)


# ----------------------------------------------------------------------------------------------
# Nets

class LeNet(nn.Module):
    """Caffe's LeNet (examples/mnist): conv20 -> max2/2 -> conv50 -> max2/2 -> ip500 -> relu ->
    ip10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.ip1 = nn.Linear(50 * 4 * 4, 500)
        self.ip2 = nn.Linear(500, 10)
        for layer in (self.conv1, self.conv2, self.ip1, self.ip2):
            _xavier_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        x = F.relu(self.ip1(x.flatten(1)))
        return self.ip2(x)


def _caffe_ave_pool(x: torch.Tensor) -> torch.Tensor:
    """Caffe's AVE pooling, kernel 3 stride 2 pad 0, rounding the output size up: an overhanging
    last window is divided by the number of its elements inside the input. With pad 0 that is
    count_include_pad=False; it must be said explicitly, because with the default (True)
    Inductor's avg_pool2d backward divides those windows by the full 9 (pytorch/pytorch#198119:
    the compiled gradient is silently wrong, the forward and eager are right)."""
    return F.avg_pool2d(x, 3, 2, ceil_mode=True, count_include_pad=False)


class Cifar10Quick(nn.Module):
    """Caffe's cifar10_quick: conv32 -> max3/2 -> relu -> conv32 -> relu -> ave3/2 -> conv64 ->
    relu -> ave3/2 -> ip64 -> ip10 (no nonlinearity between the inner products, as in Caffe)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1 = nn.Linear(64 * 4 * 4, 64)
        self.ip2 = nn.Linear(64, 10)
        for layer, std in ((self.conv1, 0.0001), (self.conv2, 0.01), (self.conv3, 0.01),
                           (self.ip1, 0.1), (self.ip2, 0.1)):
            _gaussian_(layer.weight, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
        x = _caffe_ave_pool(F.relu(self.conv2(x)))
        x = _caffe_ave_pool(F.relu(self.conv3(x)))
        return self.ip2(self.ip1(x.flatten(1)))


NETS = {"lenet": LeNet, "cifar10_quick": Cifar10Quick}


# ----------------------------------------------------------------------------------------------
# Caffe's SGD solver

def caffe_lr(solver: dict, it: int) -> float:
    """Caffe's learning-rate policies used here: 'fixed' and 'inv'."""
    if solver["lr_policy"] == "fixed":
        return solver["base_lr"]
    if solver["lr_policy"] == "inv":
        return solver["base_lr"] * (1.0 + solver["gamma"] * it) ** (-solver["power"])
    raise ValueError(f"unsupported lr_policy {solver['lr_policy']!r}")


def _sgd_update(weights, biases, v_weights, v_biases, w_grads, b_grads, lr, momentum: float,
                weight_decay: float) -> None:
    """In place: for each group (lr_mult 1 on weights, 2 on biases, decay_mult 1 on both)
    v = momentum*v + lr*lr_mult*(g + wd*w);  w -= v.  ``lr`` is a 0-d tensor so that a compiled
    update is not specialised on the value (the 'inv' policy changes it every iteration)."""
    for params, vels, grads, mult in ((weights, v_weights, w_grads, 1.0),
                                      (biases, v_biases, b_grads, BIAS_LR_MULT)):
        step = torch._foreach_add(grads, params, alpha=weight_decay * DECAY_MULT)
        torch._foreach_mul_(step, lr * mult)
        torch._foreach_mul_(vels, momentum)
        torch._foreach_add_(vels, step)
        torch._foreach_sub_(params, vels)


@contextlib.contextmanager
def inductor_cache(cold: bool):
    """With ``cold``, compile as a first run would: Inductor's on-disk caches (FX graphs, AOT
    autograd, compiled C++) go to a fresh temporary directory that is removed afterwards, and
    dynamo's in-memory state is reset. Otherwise the default cache is used, so compile times
    fall to what a warm cache gives on repeated runs."""
    if not cold:
        yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    tmp = tempfile.mkdtemp(prefix="jcaffe_torch_peer_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
    torch._dynamo.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


class Trainer:
    """A net, its momentum history and a training step (forward + backward + Caffe SGD)."""

    def __init__(self, net: str, mode: str, seed: int = 0) -> None:
        if net not in NETS:
            raise ValueError(f"net must be one of {sorted(NETS)}, got {net!r}")
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        torch.set_num_threads(THREADS)
        torch.manual_seed(seed)
        self.net_name, self.mode = net, mode
        self.solver = SOLVERS[net]
        self.model = NETS[net]()
        named = list(self.model.named_parameters())
        self.weights = [p for n, p in named if n.endswith("weight")]
        self.biases = [p for n, p in named if n.endswith("bias")]
        self.v_weights = [torch.zeros_like(p) for p in self.weights]
        self.v_biases = [torch.zeros_like(p) for p in self.biases]
        self.lr = torch.zeros((), dtype=torch.float32)

        def train_loss(x, y):
            return F.cross_entropy(self.model(x), y)

        def test_logits(x):
            return self.model(x)

        if mode == "compile":
            # dynamic=False: the train (64) and test (100) batch sizes each get a static graph
            # instead of one dynamic-shape graph.
            self._loss = torch.compile(train_loss, dynamic=False)
            self._logits = torch.compile(test_logits, dynamic=False)
            self._update = torch.compile(_sgd_update, dynamic=False)
        else:
            self._loss, self._logits, self._update = train_loss, test_logits, _sgd_update

    def step(self, x: torch.Tensor, y: torch.Tensor, it: int) -> torch.Tensor:
        """One Caffe training iteration at iteration number ``it``; returns the loss tensor."""
        for p in self.weights + self.biases:
            p.grad = None
        loss = self._loss(x, y)
        loss.backward()
        self.lr.fill_(caffe_lr(self.solver, it))
        with torch.no_grad():
            self._update(self.weights, self.biases, self.v_weights, self.v_biases,
                         [p.grad for p in self.weights], [p.grad for p in self.biases], self.lr,
                         self.solver["momentum"], self.solver["weight_decay"])
        return loss

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return int((self._logits(x).argmax(1) == y).sum())


# ----------------------------------------------------------------------------------------------
# Step benchmark on random data

def _random_batches(net: str, batch: int, count: int, gen: torch.Generator):
    """``count`` batches of uint8-range pixels transformed as Caffe's data layer does: scaled by
    1/256 for LeNet, minus the (here: the random pool's) mean image for CIFAR-10 quick."""
    raw = torch.randint(0, 256, (count, batch) + INPUT_SHAPE[net], generator=gen).float()
    if net == "lenet":
        xs = raw * MNIST_SCALE
    else:
        xs = raw - raw.mean(dim=(0, 1), keepdim=True)
    ys = torch.randint(0, 10, (count, batch), generator=gen)
    return [(xs[i].contiguous(), ys[i].contiguous()) for i in range(count)]


def step_benchmark(net: str = "lenet", mode: str = "eager", batch: int | None = None,
                   warmup: int = 20, iters: int = 200, windows: int = 10,
                   cold_cache: bool = True) -> dict:
    """Time Caffe training steps (forward + backward + SGD update) of ``net`` on random data.

    ``compile_s`` is the time of the first step (for ``mode='compile'`` it includes compiling the
    forward/backward graphs and the update; with ``cold_cache`` Inductor starts from an empty
    cache, see ``inductor_cache``). After ``warmup`` more steps, ``iters`` steps are timed in
    ``windows`` windows; the per-iteration time of each window gives the median, min and max.
    """
    with inductor_cache(cold_cache and mode == "compile"):
        out = _step_benchmark(net, mode, batch, warmup, iters, windows)
    out["cold_cache"] = bool(cold_cache and mode == "compile")
    return out


def _step_benchmark(net, mode, batch, warmup, iters, windows) -> dict:
    batch = DEFAULT_BATCH[net] if batch is None else batch
    if iters < windows or windows < 1:
        raise ValueError("need iters >= windows >= 1")
    trainer = Trainer(net, mode)
    data = _random_batches(net, batch, 8, torch.Generator().manual_seed(1))
    it = 0

    def run(n: int) -> None:
        nonlocal it
        loss = None
        for _ in range(n):
            x, y = data[it % len(data)]
            loss = trainer.step(x, y, it)
            it += 1
        if loss is not None:
            loss.item()  # CPU ops are synchronous; this only guards against lazy surprises

    t0 = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - t0
    run(warmup)
    per_window = iters // windows
    ms = []
    for _ in range(windows):
        t0 = time.perf_counter()
        run(per_window)
        ms.append((time.perf_counter() - t0) * 1e3 / per_window)
    med = statistics.median(ms)
    return {
        "net": net,
        "mode": mode,
        "batch": batch,
        "compile_s": compile_s,
        "ms_per_iter_median": med,
        "ms_per_iter_min": min(ms),
        "ms_per_iter_max": max(ms),
        "images_per_s": batch / (med / 1e3),
        "warmup": warmup,
        "iters": per_window * windows,
        "windows": windows,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# The whole LeNet schedule on MNIST

def read_idx(path: str) -> np.ndarray:
    """A gzipped IDX file: big-endian magic (2051 images, 2049 labels), then the dimensions."""
    with gzip.open(path, "rb") as f:
        buf = f.read()
    magic = int.from_bytes(buf[0:4], "big")
    if magic == 2051:
        n, rows, cols = (int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(buf, np.uint8, n * rows * cols, 16).reshape(n, 1, rows, cols)
    if magic == 2049:
        n = int.from_bytes(buf[4:8], "big")
        return np.frombuffer(buf, np.uint8, n, 8)
    raise ValueError(f"{path}: not an IDX image/label file (magic {magic})")


def load_mnist(mnist_dir: str):
    def part(prefix):
        images = read_idx(os.path.join(mnist_dir, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(mnist_dir, f"{prefix}-labels-idx1-ubyte.gz"))
        if len(images) != len(labels):
            raise ValueError(f"{mnist_dir}: {prefix} has {len(images)} images, {len(labels)} labels")
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    return part("train"), part("t10k")


def full_lenet_run(mode: str = "eager", max_iter: int = 10000, test_interval: int = 500,
                   test_iter: int = 100, mnist_dir: str = "datasets/mnist",
                   test_initialization: bool = True, cold_cache: bool = True) -> dict:
    """Caffe's LeNet solver on MNIST, in process: sequential training batches of 64 in file
    order, wrapping around as Caffe's Data layer does; ``test_iter`` test batches of 100 every
    ``test_interval`` iterations (and at iteration 0 when ``test_initialization``, as Caffe's
    default) and after the last iteration. Loading the files is not timed."""
    data = load_mnist(mnist_dir)
    with inductor_cache(cold_cache and mode == "compile"):
        out = _full_lenet_run(data, mode, max_iter, test_interval, test_iter,
                              test_initialization)
    out["cold_cache"] = bool(cold_cache and mode == "compile")
    return out


def _full_lenet_run(data, mode, max_iter, test_interval, test_iter, test_initialization) -> dict:
    (train_x, train_y), (test_x, test_y) = data
    train_bs, test_bs = 64, 100
    trainer = Trainer("lenet", mode)
    train_pos = test_pos = 0
    accuracy: dict[int, float] = {}
    first_step_s = first_test_batch_s = None

    def batch_of(xs, ys, pos, bs):
        n = len(xs)
        if pos + bs <= n:
            idx = slice(pos, pos + bs)
            x, y = xs[idx], ys[idx]
        else:
            idx = torch.arange(pos, pos + bs) % n
            x, y = xs[idx], ys[idx]
        return x.float().mul_(MNIST_SCALE), y, (pos + bs) % n

    def test(it):
        nonlocal test_pos, first_test_batch_s
        correct = 0
        for _ in range(test_iter):
            x, y, test_pos = batch_of(test_x, test_y, test_pos, test_bs)
            t0 = time.perf_counter()
            correct += trainer.correct(x, y)
            if first_test_batch_s is None:
                first_test_batch_s = time.perf_counter() - t0
        accuracy[it] = correct / (test_iter * test_bs)

    t_start = time.perf_counter()
    loss = None
    for it in range(max_iter):
        if test_interval and it % test_interval == 0 and (it > 0 or test_initialization):
            test(it)
        x, y, train_pos = batch_of(train_x, train_y, train_pos, train_bs)
        t0 = time.perf_counter()
        loss = trainer.step(x, y, it)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
    if test_interval:
        test(max_iter)
    final_loss = loss.detach().item() if loss is not None else float("nan")
    wall_s = time.perf_counter() - t_start
    return {
        "net": "lenet",
        "mode": mode,
        "max_iter": max_iter,
        "wall_s": wall_s,
        # first training step + first test batch: includes compiling both graphs in compile mode
        "compile_s": (first_step_s or 0.0) + (first_test_batch_s or 0.0),
        "final_accuracy": accuracy.get(max_iter),
        "accuracy_at_500": accuracy.get(500),
        "accuracy": {str(k): v for k, v in sorted(accuracy.items())},
        "final_train_loss": final_loss,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="PyTorch peer of jcaffe's benchmarks: Caffe's LeNet / CIFAR-10 quick with "
                    "Caffe's SGD. Prints JSON.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="time training steps on random data")
    s.add_argument("--net", choices=sorted(NETS), default="lenet")
    s.add_argument("--mode", choices=("eager", "compile"), default="eager")
    s.add_argument("--batch", type=int, default=None,
                   help="batch size (default: 64 for lenet, 100 for cifar10_quick)")
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--iters", type=int, default=200)
    s.add_argument("--windows", type=int, default=10)
    s.add_argument("--warm-cache", action="store_true",
                   help="compile mode: use Inductor's default on-disk cache instead of a fresh one")
    f = sub.add_parser("lenet", help="the whole Caffe LeNet schedule on MNIST")
    f.add_argument("--mode", choices=("eager", "compile"), default="eager")
    f.add_argument("--max-iter", type=int, default=10000)
    f.add_argument("--test-interval", type=int, default=500)
    f.add_argument("--test-iter", type=int, default=100)
    f.add_argument("--mnist-dir", default="datasets/mnist")
    f.add_argument("--no-test-initialization", action="store_true",
                   help="skip the test at iteration 0 (Caffe tests there by default)")
    f.add_argument("--warm-cache", action="store_true",
                   help="compile mode: use Inductor's default on-disk cache instead of a fresh one")
    a = ap.parse_args(argv)
    if a.cmd == "step":
        out = step_benchmark(a.net, a.mode, a.batch, a.warmup, a.iters, a.windows,
                             cold_cache=not a.warm_cache)
    else:
        out = full_lenet_run(a.mode, a.max_iter, a.test_interval, a.test_iter, a.mnist_dir,
                             test_initialization=not a.no_test_initialization,
                             cold_cache=not a.warm_cache)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
