"""A Euclidean loss written as a pycaffe Python layer, in the style of Caffe's
examples/pycaffe/layers/pyloss.py (used by tests/test_layers_python.py and by the zoo's
pycaffe_linreg.prototxt, whose python_param names module 'pyloss')."""

import caffe
import numpy as np


class EuclideanLossLayer(caffe.Layer):
    """loss = sum((a - b)^2) / N / 2 over two bottoms of equal count (N = bottom[0].num)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        # kept from forward for backward, as Caffe's C++ layer keeps diff_
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * top[0].diff[0] * self.diff / bottom[i].num
