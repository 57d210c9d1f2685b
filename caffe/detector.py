"""``caffe.Detector``: pycaffe's R-CNN-style window detector, a ``caffe.Net`` in the TEST
phase that classifies image windows.

``detect_windows([(image_file, windows), ...])``: each window ``(ymin, xmin, ymax, xmax)`` of
each image is cut out with ``context_pad`` pixels of context (R-CNN's warp: the box is grown
so that, once warped to the input size, ``context_pad`` input pixels of context surround it;
what falls outside the image is filled with the mean), resized to the input size,
preprocessed and run through the net; returns one dict per window: ``window``, ``filename``
and ``prediction`` (the first output, flattened). ``detect_selective_search`` needs the
``selective_search_ijcv_with_python`` package (MATLAB), which is not available here.
"""

from __future__ import annotations

import numpy as np

from caffe import io as caffe_io
from caffe.pycaffe import Net
from jcaffe.classifier import image_transformer
from jcaffe.proto.caffe_pb2 import TEST


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = image_transformer(in_, self.blobs[in_].shape, mean, input_scale,
                                             raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """Predictions for every window of every image (see the module doc)."""
        crops = []
        for image_fname, windows in images_windows:
            image = caffe_io.load_image(image_fname).astype(np.float32)
            for window in windows:
                crops.append(self.crop(image, window))
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(crops), crops[0].shape[2]) + tuple(self.blobs[in_].shape[2:]),
                            np.float32)
        for i, c in enumerate(crops):
            caffe_in[i] = self.transformer.preprocess(in_, c)
        out = self.forward_all(**{in_: caffe_in})
        predictions = out[self.outputs[0]]
        detections = []
        i = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[i].ravel(),
                                   "filename": image_fname})
                i += 1
        return detections

    def detect_selective_search(self, image_fnames):
        raise ImportError("Detector.detect_selective_search needs the "
                          "selective_search_ijcv_with_python package (MATLAB), which jcaffe "
                          "does not provide: compute windows elsewhere and call "
                          "detect_windows")

    def crop(self, im, window):
        """The window ``(ymin, xmin, ymax, xmax)`` of ``im`` with context, resized to the
        input size (``H x W x K``)."""
        crop = im[window[0]:window[2], window[1]:window[3]]
        if self.context_pad:
            box = np.array(window, dtype=float)
            crop_size = self.blobs[self.inputs[0]].width
            scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
            half_h = (box[2] - box[0] + 1) / 2.0
            half_w = (box[3] - box[1] + 1) / 2.0
            center = (box[0] + half_h, box[1] + half_w)
            scaled = np.array((-half_h, -half_w, half_h, half_w)) * scale
            box = np.round(np.tile(center, 2) + scaled)
            full_h = box[2] - box[0] + 1
            full_w = box[3] - box[1] + 1
            scale_h = crop_size / full_h
            scale_w = crop_size / full_w
            pad_y = round(max(0, -box[0]) * scale_h)
            pad_x = round(max(0, -box[1]) * scale_w)
            im_h, im_w = im.shape[:2]
            box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
            clip_h = box[2] - box[0] + 1
            clip_w = box[3] - box[1] + 1
            assert clip_h > 0 and clip_w > 0
            crop_h = round(clip_h * scale_h)
            crop_w = round(clip_w * scale_w)
            if pad_y + crop_h > crop_size:
                crop_h = crop_size - pad_y
            if pad_x + crop_w > crop_size:
                crop_w = crop_size - pad_x
            context_crop = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
            context_crop = caffe_io.resize_image(context_crop, (crop_h, crop_w))
            crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
            crop[pad_y:(pad_y + crop_h), pad_x:(pad_x + crop_w)] = context_crop
        return caffe_io.resize_image(crop, self.blobs[self.inputs[0]].shape[2:]) \
            if tuple(crop.shape[:2]) != tuple(self.blobs[self.inputs[0]].shape[2:]) else crop

    def configure_crop(self, context_pad) -> None:
        """Sets ``context_pad`` and, for padding, the crop size and the mean colour that
        fills context outside the image."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_] if hasattr(self.transformer, "transpose") \
            else (2, 0, 1)
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if self.context_pad:
            mean = getattr(self.transformer, "mean", {}).get(in_)
            if mean is None:
                self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
                return
            raw_scale = getattr(self.transformer, "raw_scale", {}).get(in_) or 1.0
            swap = getattr(self.transformer, "channel_swap", {}).get(in_)
            crop_mean = np.asarray(mean).copy().transpose(inv_tpose)
            if swap is not None:
                channel_order_inverse = [list(swap).index(i) for i in range(crop_mean.shape[2])]
                crop_mean = crop_mean[:, :, channel_order_inverse]
            self.crop_mean = crop_mean / raw_scale


__all__ = ["Detector"]
