#!/usr/bin/env python3
"""BVLC Caffe's notebook ``examples/01-learning-lenet.ipynb`` run as a script against jcaffe's
``caffe`` package, and what its Python training loop costs per iteration.

The notebook's code cells are below in order (Caffe's code, BSD 2-Clause, (c) the BVLC
contributors; see ../shared/pycaffe/caffe/LICENSE). Edited, as the notebook says to: the data
paths and the shell cells (``get_mnist.sh`` / ``create_mnist.sh`` become jcaffe's
``datasets/mnist/prepare_mnist.py --format lmdb`` on the MNIST files of this repository) and
Python 2's ``print`` statements; IPython's ``%matplotlib inline`` / ``%%time`` are gone (the
figures go to PNG files in the work folder), and ``caffe.set_mode_gpu()`` runs only when JAX
has a GPU. ``--niter`` / ``--test-batches`` / ``--limit`` shrink the run (the test suite's
reduced form); the defaults are the notebook's.

Printed: the test accuracy after the ``solver.step(1)`` loop of LeNet (the notebook shows
about 0.94 after 200 iterations) and of its logistic-regression variant (about 0.88 after 250),
and the per-iteration cost of the notebook's loop (``step(1)``, reading the loss,
``forward(start='conv1')`` on the test net) against ``solver.step(n)``'s fused iterations.

    python benchmarks/pycaffe_learning_lenet.py [--work DIR] [--niter 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_EXAMPLES = os.path.join(ROOT, "..", "shared", "pycaffe", "caffe", "examples")

# Caffe's examples/mnist/lenet_auto_solver.prototxt (used when ../shared is absent).
LENET_AUTO_SOLVER = """train_net: "mnist/lenet_auto_train.prototxt"
test_net: "mnist/lenet_auto_test.prototxt"
test_iter: 100
test_interval: 500
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: 10000
snapshot: 5000
snapshot_prefix: "mnist/lenet"
"""


def prepare(work: str, limit: int | None) -> None:
    """The shell cells: MNIST as LMDBs under ``work/examples/mnist`` (the notebook's paths)."""
    data = os.path.join(work, "data", "mnist")
    os.makedirs(data, exist_ok=True)
    for name in os.listdir(os.path.join(ROOT, "datasets", "mnist")):
        if name.endswith(".gz") and not os.path.exists(os.path.join(data, name)):
            os.symlink(os.path.join(ROOT, "datasets", "mnist", name), os.path.join(data, name))
    cmd = [sys.executable, os.path.join(ROOT, "datasets", "mnist", "prepare_mnist.py"),
           "--root", data, "--format", "lmdb", "--create-only"]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    mnist = os.path.join(work, "examples", "mnist")
    os.makedirs(mnist, exist_ok=True)
    for db in ("mnist_train_lmdb", "mnist_test_lmdb"):
        if not os.path.exists(os.path.join(mnist, db)):
            os.symlink(os.path.join(data, db), os.path.join(mnist, db))
    solver = os.path.join(SHARED_EXAMPLES, "mnist", "lenet_auto_solver.prototxt")
    if os.path.exists(solver):
        shutil.copy(solver, os.path.join(mnist, "lenet_auto_solver.prototxt"))
    else:
        with open(os.path.join(mnist, "lenet_auto_solver.prototxt"), "w") as f:
            f.write(LENET_AUTO_SOLVER)


def notebook(niter: int = 200, test_batches: int = 100, logreg_niter: int = 250,
             bench_iters: int = 50) -> dict:
    """The notebook's code cells (run from ``work/examples``)."""
    import matplotlib

    matplotlib.use("Agg")
    from pylab import (arange, axis, exp, figure, imshow, savefig, subplots, xlabel, ylabel,
                       zeros)
    import numpy as np

    sys.path.insert(0, ROOT)
    import caffe

    from caffe import layers as L, params as P

    def lenet(lmdb, batch_size):
        # our version of LeNet: a series of linear and simple nonlinear transformations
        n = caffe.NetSpec()

        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                                 transform_param=dict(scale=1./255), ntop=2)

        n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
        n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
        n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type='xavier'))
        n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
        n.fc1 =   L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type='xavier'))
        n.relu1 = L.ReLU(n.fc1, in_place=True)
        n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type='xavier'))
        n.loss =  L.SoftmaxWithLoss(n.score, n.label)

        return n.to_proto()

    with open('mnist/lenet_auto_train.prototxt', 'w') as f:
        f.write(str(lenet('mnist/mnist_train_lmdb', 64)))

    with open('mnist/lenet_auto_test.prototxt', 'w') as f:
        f.write(str(lenet('mnist/mnist_test_lmdb', 100)))

    import jax
    if jax.default_backend() == "gpu":  # edited: the GPU only where there is one
        caffe.set_device(0)
        caffe.set_mode_gpu()

    ### load the solver and create train and test nets
    solver = None  # ignore this workaround for lmdb data (can't instantiate two solvers on the same data)
    solver = caffe.SGDSolver('mnist/lenet_auto_solver.prototxt')

    # each output is (batch size, feature dim, spatial dim)
    print([(k, v.data.shape) for k, v in solver.net.blobs.items()])
    # just print the weight sizes (we'll omit the biases)
    print([(k, v[0].data.shape) for k, v in solver.net.params.items()])

    solver.net.forward()  # train net
    solver.test_nets[0].forward()  # test net (there can be more than one)

    # we use a little trick to tile the first eight images
    imshow(solver.net.blobs['data'].data[:8, 0].transpose(1, 0, 2).reshape(28, 8*28), cmap='gray'); axis('off')
    print('train labels:', solver.net.blobs['label'].data[:8])
    imshow(solver.test_nets[0].blobs['data'].data[:8, 0].transpose(1, 0, 2).reshape(28, 8*28), cmap='gray'); axis('off')
    print('test labels:', solver.test_nets[0].blobs['label'].data[:8])

    solver.step(1)

    imshow(solver.net.params['conv1'][0].diff[:, 0].reshape(4, 5, 5, 5)
           .transpose(0, 2, 1, 3).reshape(4*5, 5*5), cmap='gray'); axis('off')

    t0 = time.perf_counter()
    test_interval = 25
    # losses will also be stored in the log
    train_loss = zeros(niter)
    test_acc = zeros(int(np.ceil(niter / test_interval)))
    output = zeros((niter, 8, 10))

    # the main solver loop
    for it in range(niter):
        solver.step(1)  # SGD by Caffe

        # store the train loss
        train_loss[it] = solver.net.blobs['loss'].data

        # store the output on the first test batch
        # (start the forward pass at conv1 to avoid loading new data)
        solver.test_nets[0].forward(start='conv1')
        output[it] = solver.test_nets[0].blobs['score'].data[:8]

        # run a full test every so often
        # (Caffe can also do this for us and write to a log, but we show here
        #  how to do it directly in Python, where more complicated things are easier.)
        if it % test_interval == 0:
            print('Iteration', it, 'testing...')
            correct = 0
            for test_it in range(test_batches):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                               == solver.test_nets[0].blobs['label'].data)
            test_acc[it // test_interval] = correct / (test_batches * 100.)
    loop_seconds = time.perf_counter() - t0
    lenet_during = [float(a) for a in test_acc]

    _, ax1 = subplots()
    ax2 = ax1.twinx()
    ax1.plot(arange(niter), train_loss)
    ax2.plot(test_interval * arange(len(test_acc)), test_acc, 'r')
    ax1.set_xlabel('iteration')
    ax1.set_ylabel('train loss')
    ax2.set_ylabel('test accuracy')
    ax2.set_title('Test Accuracy: {:.2f}'.format(test_acc[-1]))
    savefig('lenet_curves.png')

    for i in range(2):
        figure(figsize=(2, 2))
        imshow(solver.test_nets[0].blobs['data'].data[i, 0], cmap='gray')
        figure(figsize=(10, 2))
        imshow(exp(output[:50, i].T) / exp(output[:50, i].T).sum(0), interpolation='nearest', cmap='gray')
        xlabel('iteration')
        ylabel('label')

    # A full test after the loop (the notebook's last test ran at iteration 175).
    correct = 0
    for test_it in range(test_batches):
        solver.test_nets[0].forward()
        correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                       == solver.test_nets[0].blobs['label'].data)
    lenet_final = correct / (test_batches * 100.)

    # Not in the notebook: the loop's per-iteration cost against step(n)'s fused iterations.
    bench = {}
    if bench_iters:
        for _ in range(2):
            solver.step(1); solver.net.blobs['loss'].data; solver.test_nets[0].forward(start='conv1')
        t = time.perf_counter()
        for _ in range(bench_iters):
            solver.step(1)
            float(solver.net.blobs['loss'].data)
            solver.test_nets[0].forward(start='conv1')
            solver.test_nets[0].blobs['score'].data[:8]
        bench["loop_ms_per_iter"] = (time.perf_counter() - t) / bench_iters * 1e3
        t = time.perf_counter()
        for _ in range(bench_iters):
            solver.step(1)
        float(solver.net.params['conv1'][1].data[0])
        bench["step1_ms_per_iter"] = (time.perf_counter() - t) / bench_iters * 1e3
        solver.step(bench_iters)  # compiles the fused chunk
        t = time.perf_counter()
        solver.step(bench_iters)
        float(solver.net.params['conv1'][1].data[0])
        bench["fused_ms_per_iter"] = (time.perf_counter() - t) / bench_iters * 1e3
        # The same fused chunks driven by jcaffe's Solver directly (what `jcaffe train` runs).
        core = solver._core
        t = time.perf_counter()
        core.step(bench_iters)
        jax.block_until_ready(core.params)
        bench["core_fused_ms_per_iter"] = (time.perf_counter() - t) / bench_iters * 1e3

    out = {"lenet_niter": len(output), "lenet_loop_seconds": loop_seconds,
           "lenet_test_acc_during": lenet_during, "lenet_test_acc": float(lenet_final), **bench}
    if not logreg_niter:
        return out

    # -- the logistic-regression variant (the notebook's last cell) --
    train_net_path = 'mnist/custom_auto_train.prototxt'
    test_net_path = 'mnist/custom_auto_test.prototxt'
    solver_config_path = 'mnist/custom_auto_solver.prototxt'

    ### define net
    def custom_net(lmdb, batch_size):
        # define your own net!
        n = caffe.NetSpec()

        # keep this data layer for all networks
        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb,
                                 transform_param=dict(scale=1./255), ntop=2)

        # EDIT HERE to try different networks
        # this single layer defines a simple linear classifier
        # (in particular this defines a multiway logistic regression)
        n.score =   L.InnerProduct(n.data, num_output=10, weight_filler=dict(type='xavier'))

        # keep this loss layer for all networks
        n.loss =  L.SoftmaxWithLoss(n.score, n.label)

        return n.to_proto()

    with open(train_net_path, 'w') as f:
        f.write(str(custom_net('mnist/mnist_train_lmdb', 64)))
    with open(test_net_path, 'w') as f:
        f.write(str(custom_net('mnist/mnist_test_lmdb', 100)))

    ### define solver
    from caffe.proto import caffe_pb2
    s = caffe_pb2.SolverParameter()

    # Set a seed for reproducible experiments:
    # this controls for randomization in training.
    s.random_seed = 0xCAFFE

    # Specify locations of the train and (maybe) test networks.
    s.train_net = train_net_path
    s.test_net.append(test_net_path)
    s.test_interval = 500  # Test after every 500 training iterations.
    s.test_iter.append(100) # Test on 100 batches each time we test.

    s.max_iter = 10000     # no. of times to update the net (training iterations)

    # EDIT HERE to try different solvers
    # solver types include "SGD", "Adam", and "Nesterov" among others.
    s.type = "SGD"

    # Set the initial learning rate for SGD.
    s.base_lr = 0.01  # EDIT HERE to try different learning rates
    # Set momentum to accelerate learning by
    # taking weighted average of current and previous updates.
    s.momentum = 0.9
    # Set weight decay to regularize and prevent overfitting
    s.weight_decay = 5e-4

    # Set `lr_policy` to define how the learning rate changes during training.
    # This is the same policy as our default LeNet.
    s.lr_policy = 'inv'
    s.gamma = 0.0001
    s.power = 0.75

    # Display the current training loss and accuracy every 1000 iterations.
    s.display = 1000

    # Snapshots are files used to store networks we've trained.
    # We'll snapshot every 5K iterations -- twice during training.
    s.snapshot = 5000
    s.snapshot_prefix = 'mnist/custom_net'

    # Train on the GPU
    s.solver_mode = caffe_pb2.SolverParameter.GPU

    # Write the solver to a temporary file and return its filename.
    with open(solver_config_path, 'w') as f:
        f.write(str(s))

    ### load the solver and create train and test nets
    solver = None  # ignore this workaround for lmdb data (can't instantiate two solvers on the same data)
    solver = caffe.get_solver(solver_config_path)

    ### solve
    niter = logreg_niter  # EDIT HERE increase to train for longer
    test_interval = niter / 10
    # losses will also be stored in the log
    train_loss = zeros(niter)
    test_acc = zeros(int(np.ceil(niter / test_interval)))

    # the main solver loop
    for it in range(niter):
        solver.step(1)  # SGD by Caffe

        # store the train loss
        train_loss[it] = solver.net.blobs['loss'].data

        # run a full test every so often
        # (Caffe can also do this for us and write to a log, but we show here
        #  how to do it directly in Python, where more complicated things are easier.)
        if it % test_interval == 0:
            print('Iteration', it, 'testing...')
            correct = 0
            for test_it in range(test_batches):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                               == solver.test_nets[0].blobs['label'].data)
            test_acc[int(it // test_interval)] = correct / (test_batches * 100.)

    _, ax1 = subplots()
    ax2 = ax1.twinx()
    ax1.plot(arange(niter), train_loss)
    ax2.plot(test_interval * arange(len(test_acc)), test_acc, 'r')
    ax1.set_xlabel('iteration')
    ax1.set_ylabel('train loss')
    ax2.set_ylabel('test accuracy')
    ax2.set_title('Custom Test Accuracy: {:.2f}'.format(test_acc[-1]))
    savefig('logreg_curves.png')
    correct = 0
    for test_it in range(test_batches):
        solver.test_nets[0].forward()
        correct += sum(solver.test_nets[0].blobs['score'].data.argmax(1)
                       == solver.test_nets[0].blobs['label'].data)
    logreg_final = correct / (test_batches * 100.)
    return {**out, "logreg_niter": niter, "logreg_test_acc": float(logreg_final)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="work folder (default: a temporary one)")
    p.add_argument("--niter", type=int, default=200, help="LeNet loop iterations (200)")
    p.add_argument("--logreg-niter", type=int, default=250,
                   help="logistic regression iterations (250; 0: skip that part)")
    p.add_argument("--test-batches", type=int, default=100, help="test batches of 100 (100)")
    p.add_argument("--limit", type=int, default=None, help="records per LMDB (all)")
    p.add_argument("--bench-iters", type=int, default=50, help="iterations timed per form")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="learning_lenet_")
    prepare(work, args.limit)
    os.chdir(os.path.join(work, "examples"))
    out = notebook(args.niter, args.test_batches, args.logreg_niter, args.bench_iters)
    out = {k: v for k, v in out.items() if v is not None}
    print("RESULTS " + json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
