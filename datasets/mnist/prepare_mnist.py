#!/usr/bin/env python3
"""Prepare MNIST for jcaffe: verify (or download) the four IDX files in this folder and convert them
to the jcaffe datasets mnist_train / mnist_test beside them.

    python datasets/mnist/prepare_mnist.py                  # get + create (fast when done before)
    python datasets/mnist/prepare_mnist.py --format lmdb    # also mnist_train_lmdb, mnist_test_lmdb
    python datasets/mnist/prepare_mnist.py --get-only | --create-only | --root DIR | --force

The work is done by jcaffe.data.mnist.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import jcaffe.data.mnist as mnist
except ImportError:  # run from a checkout without installing jcaffe
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import jcaffe.data.mnist as mnist

if __name__ == "__main__":
    sys.exit(mnist.main(sys.argv[1:], default_root=HERE))
