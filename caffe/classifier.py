"""``caffe.Classifier``: pycaffe's image classifier, a ``caffe.Net`` in the TEST phase with the
preprocessing of its first input (``caffe.io.Transformer``).

``predict(inputs, oversample=True)``: every ``H x W x K`` image is resized to ``image_dims``
(default: the input blob's size), then cut to the input size, as the 10 crops of
``caffe.io.oversample`` (corners, centre and their mirrors; their predictions averaged) or the
centre crop; the crops are preprocessed (transpose to ``K x H x W``, ``channel_swap``,
``raw_scale``, ``mean``, ``input_scale``) and run through the net in batches; the result is the
first output blob, one row per image.
"""

from __future__ import annotations

import numpy as np

from caffe import io as caffe_io
from caffe.pycaffe import Net
from jcaffe.classifier import image_transformer
from jcaffe.proto.caffe_pb2 import TEST


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        if not self.inputs:
            raise RuntimeError(f"{model_file}: the net has no input blob (an Input layer)")
        in_ = self.inputs[0]
        self.transformer = image_transformer(in_, self.blobs[in_].shape, mean, input_scale,
                                             raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].shape[2:])
        if not image_dims:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """Class scores ``[N, C]`` for ``N`` images (see the module doc)."""
        channels = inputs[0].shape[2]
        batch = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], channels),
                         np.float32)
        for i, im in enumerate(inputs):
            batch[i] = caffe_io.resize_image(im, self.image_dims)
        if oversample:
            batch = caffe_io.oversample(batch, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            box = np.tile(center, (1, 2))[0] + np.concatenate([-self.crop_dims / 2.0,
                                                                self.crop_dims / 2.0])
            box = box.astype(int)
            batch = batch[:, box[0]:box[2], box[1]:box[3], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros(np.array(batch.shape)[[0, 3, 1, 2]], np.float32)
        for i, im in enumerate(batch):
            caffe_in[i] = self.transformer.preprocess(in_, im)
        out = self.forward_all(**{in_: caffe_in})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions


__all__ = ["Classifier"]
