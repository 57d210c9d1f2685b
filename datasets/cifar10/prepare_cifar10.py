#!/usr/bin/env python3
"""Prepare CIFAR-10 for jcaffe: convert the binary batches into the jcaffe datasets cifar10_train /
cifar10_test and the training mean mean.binaryproto, in this folder.

    python datasets/cifar10/prepare_cifar10.py --from DIR             # DIR: cifar-10-batches-bin
    python datasets/cifar10/prepare_cifar10.py --from cifar-10-binary.tar.gz --format lmdb

Get the binary version from https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (no download
is attempted). The work is done by jcaffe.data.cifar10.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import jcaffe.data.cifar10 as cifar10
except ImportError:  # run from a checkout without installing jcaffe
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import jcaffe.data.cifar10 as cifar10

if __name__ == "__main__":
    sys.exit(cifar10.main(sys.argv[1:], default_out=HERE))
