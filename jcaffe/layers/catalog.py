"""What BVLC Caffe's layer set is, and what belongs to well-known Caffe forks.

Used to tell a user whose net comes from a fork (SSD, Fast R-CNN, SegNet, DeepLab ...) that a
layer type or ``LayerParameter`` field is not BVLC Caffe's, instead of a bare "unknown".
No JAX here: the prototxt reader imports it.
"""

from __future__ import annotations

# Every type BVLC/caffe master registers (REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR in
# src/caffe/layers/*.cpp; Python only when built WITH_PYTHON_LAYER).
BVLC_LAYER_TYPES = frozenset("""
AbsVal Accuracy ArgMax BNLL BatchNorm BatchReindex Bias Clip Concat ContrastiveLoss Convolution
Crop Data Deconvolution Dropout DummyData ELU Eltwise Embed EuclideanLoss Exp Filter Flatten
HDF5Data HDF5Output HingeLoss Im2col ImageData InfogainLoss InnerProduct Input LRN LSTM LSTMUnit
Log MVN MemoryData MultinomialLogisticLoss PReLU Parameter Pooling Power Python RNN ReLU
Reduction Reshape SPP Scale Sigmoid SigmoidCrossEntropyLoss Silence Slice Softmax
SoftmaxWithLoss Split Swish TanH Threshold Tile WindowData
""".split())

_SSD = "SSD (weiliu89/caffe, ssd branch)"
_FRCNN = "Fast/Faster R-CNN (rbgirshick/caffe-fast-rcnn)"
_SEGNET = "SegNet (alexgkendall/caffe-segnet)"
_DEEPLAB = "DeepLab (caffe-deeplab)"

# Layer types and LayerParameter fields of forks -> the fork that defines them. jcaffe reads
# and implements the SSD fork's (jcaffe/proto/ssd.proto, jcaffe/layers/detection.py) except
# VideoData / video_data_param; the notes still name the fork where a message needs one.
FORK_LAYER_TYPES = {
    "Normalize": _SSD, "Permute": _SSD, "PriorBox": _SSD, "DetectionOutput": _SSD,
    "DetectionEvaluate": _SSD, "MultiBoxLoss": _SSD, "AnnotatedData": _SSD, "VideoData": _SSD,
    "SmoothL1Loss": _SSD + " / " + _FRCNN, "ROIPooling": _FRCNN,
    "Upsample": _SEGNET, "BN": _SEGNET, "Interp": _DEEPLAB,
}
FORK_FIELDS = {
    "norm_param": _SSD, "permute_param": _SSD, "prior_box_param": _SSD,
    "detection_output_param": _SSD, "detection_evaluate_param": _SSD,
    "multibox_loss_param": _SSD, "annotated_data_param": _SSD, "video_data_param": _SSD,
    "roi_pooling_param": _FRCNN, "smooth_l1_loss_param": _FRCNN,
    "upsample_param": _SEGNET, "bn_param": _SEGNET, "interp_param": _DEEPLAB,
}


def fork_note(layer_type: str = "", field: str = "") -> str | None:
    """Why a layer type / LayerParameter field is not BVLC Caffe's, or None when it may be."""
    fork = FORK_FIELDS.get(field) or FORK_LAYER_TYPES.get(layer_type)
    if fork:
        return f"belongs to a Caffe fork, {fork}, not to BVLC Caffe"
    if layer_type and layer_type not in BVLC_LAYER_TYPES:
        return "is not BVLC Caffe's (the net probably comes from a Caffe fork)"
    return None
