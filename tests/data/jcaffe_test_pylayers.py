"""Python layers for tests/test_layers_python.py: pycaffe-style ones (caffe.Layer) and
jcaffe-native ones (JaxLayer)."""

import json

import caffe
import jax.numpy as jnp
import numpy as np

from jcaffe.layers.python import JaxLayer


class LinRegData(caffe.Layer):
    """A data layer: x ~ N(0, 1) of shape [batch, dim] from a seeded generator, and
    y = x @ w_true. param_str: JSON {"batch": B, "dim": D, "seed": S}."""

    def setup(self, bottom, top):
        if bottom:
            raise Exception("LinRegData takes no bottoms")
        p = json.loads(self.param_str)
        self.batch, self.dim = int(p["batch"]), int(p["dim"])
        self.rng = np.random.default_rng(int(p["seed"]))
        self.w_true = np.arange(1, self.dim + 1, dtype=np.float32) / self.dim
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, self.dim)
        top[1].reshape(self.batch, 1)

    def forward(self, bottom, top):
        x = self.rng.standard_normal((self.batch, self.dim)).astype(np.float32)
        top[0].data[...] = x
        top[1].data[...] = (x @ self.w_true)[:, None]
        self.calls += 1

    def backward(self, top, propagate_down, bottom):
        pass


class PyScale(caffe.Layer):
    """top = bottom * w (w: one learnable value per channel, a pycaffe blob added in setup,
    filled with param_str's value); backward writes bottom diff and the blob's diff."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = float(self.param_str or 1.0)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        w = self.blobs[0].data.reshape(1, -1, *([1] * (bottom[0].data.ndim - 2)))
        top[0].data[...] = bottom[0].data * w

    def backward(self, top, propagate_down, bottom):
        x = bottom[0].data
        shape = (1, -1) + (1,) * (x.ndim - 2)
        w = self.blobs[0].data.reshape(shape)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        self.blobs[0].diff[...] = np.sum(top[0].diff * x, axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * w


class RaisesInSetup(caffe.Layer):
    def setup(self, bottom, top):
        raise ValueError("bad param_str: " + repr(self.param_str))

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        pass


class NeverReshapes(caffe.Layer):
    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


class PhaseTop(caffe.Layer):
    """top = the phase the layer was built for (caffe.TRAIN = 0, caffe.TEST = 1), per example
    of bottom 0."""

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].num)

    def forward(self, bottom, top):
        top[0].data[...] = 1.0 if self.phase == caffe.TEST else 0.0

    def backward(self, top, propagate_down, bottom):
        pass


class ScaleShift(JaxLayer):
    """Native: top = tanh(bottom * w + b), w per channel (axis 1), b a scalar blob.
    param_str: the initial value of w."""

    def setup(self, bottom_shapes):
        (shape,) = bottom_shapes
        if len(shape) < 2:
            raise ValueError("ScaleShift needs at least 2 axes")
        self.channels = shape[1]
        self.blob_shapes = [(self.channels,), (1,)]
        return [shape]

    def init(self, key):
        w0 = float(self.param_str or 0.5)
        return [jnp.full((self.channels,), w0, jnp.float32), jnp.full((1,), 0.25, jnp.float32)]

    def apply(self, blobs, bottoms, train, key):
        x = bottoms[0]
        shape = (1, self.channels) + (1,) * (x.ndim - 2)
        w = blobs[0].astype(x.dtype).reshape(shape)
        b = blobs[1].astype(x.dtype).reshape((1,) * x.ndim)
        return [jnp.tanh(x * w + b)]


class WrongTops(JaxLayer):
    def setup(self, bottom_shapes):
        return [(3,)]

    def apply(self, blobs, bottoms, train, key):
        return [bottoms[0]]


class RaisesInForward(caffe.Layer):
    """A loss whose forward fails at run time (a bug in the user's layer)."""

    def reshape(self, bottom, top):
        top[0].reshape(1)

    def forward(self, bottom, top):
        raise RuntimeError("boom at run time")

    def backward(self, top, propagate_down, bottom):
        pass
