"""The PyTorch peer (``torch_nets``) on a CUDA device: the same nets, fillers and Caffe SGD,
with the model, momentum history, learning rate and batches on the GPU, timed with
``torch.cuda.synchronize``. PyTorch's own default precision is kept (full float32
convolutions and matmuls: ``torch.backends.cuda.matmul.allow_tf32`` is False by default; cuDNN
convolutions may use TF32, ``torch.backends.cudnn.allow_tf32`` is True by default); the
result records both flags.

    python benchmarks/peers/torch_gpu.py step lenet eager
    python benchmarks/peers/torch_gpu.py full eager --mnist-dir datasets/mnist
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.peers import torch_nets  # noqa: E402


class CudaTrainer(torch_nets.Trainer):
    def __init__(self, net: str, mode: str, seed: int = 0, device: str = "cuda") -> None:
        super().__init__(net, mode, seed)
        self.device = torch.device(device)
        self.model.to(self.device)  # in place: self.weights / self.biases stay the parameters
        self.v_weights = [torch.zeros_like(p) for p in self.weights]
        self.v_biases = [torch.zeros_like(p) for p in self.biases]
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)


def _flags() -> dict:
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def step_benchmark(net: str = "lenet", mode: str = "eager", warmup: int = 20,
                   iters: int = 200, windows: int = 10, device: str = "cuda") -> dict:
    """Steady-state ms per training step on random batches (as ``torch_nets.step_benchmark``)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    batch = torch_nets.DEFAULT_BATCH[net]
    with torch_nets.inductor_cache(mode == "compile"):
        trainer = CudaTrainer(net, mode, device=device)
        data = [(x.to(device), y.to(device)) for x, y in
                torch_nets._random_batches(net, batch, 8, torch.Generator().manual_seed(1))]
        it = 0

        def run(n):
            nonlocal it
            for _ in range(n):
                x, y = data[it % len(data)]
                trainer.step(x, y, it)
                it += 1
            sync()

        t0 = time.perf_counter()
        run(1)
        compile_s = time.perf_counter() - t0
        run(warmup)
        per_window = max(1, iters // windows)
        ms = []
        for _ in range(windows):
            t0 = time.perf_counter()
            run(per_window)
            ms.append((time.perf_counter() - t0) * 1e3 / per_window)
    med = statistics.median(ms)
    return dict(_flags(), net=net, mode=mode, device=device, batch=batch, compile_s=compile_s,
                ms_per_iter_median=med, ms_per_iter_min=min(ms), ms_per_iter_max=max(ms),
                images_per_s=batch / (med / 1e3), torch_version=torch.__version__)


def full_lenet_run(mode: str = "eager", mnist_dir: str = "datasets/mnist",
                   max_iter: int = 10000, device: str = "cuda") -> dict:
    """Caffe's LeNet schedule (``torch_nets.full_lenet_run``) with the data on the GPU."""
    (tx, ty), (vx, vy) = torch_nets.load_mnist(mnist_dir)
    data = ((tx.to(device), ty.to(device)), (vx.to(device), vy.to(device)))
    saved = torch_nets.Trainer
    torch_nets.Trainer = lambda net, m: CudaTrainer(net, m, device=device)
    try:
        with torch_nets.inductor_cache(mode == "compile"):
            out = torch_nets._full_lenet_run(data, mode, max_iter, 500, 100, True)
    finally:
        torch_nets.Trainer = saved
    return dict(out, **_flags(), device=device)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    kind = argv[0]
    if kind == "step":
        kw = json.loads(argv[3]) if len(argv) > 3 else {}
        print(json.dumps(step_benchmark(argv[1], argv[2], **kw)))
    elif kind == "full":
        kw = json.loads(argv[2]) if len(argv) > 2 else {}
        print(json.dumps(full_lenet_run(argv[1], **kw)))
    else:
        raise SystemExit(f"unknown kind {kind!r}: step NET MODE [JSON] | full MODE [JSON]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
