"""Caffe's protobuf schema (``caffe.proto``, package ``caffe``) and its generated module; the
SSD fork's fields in ``ssd.proto`` (package ``caffe.ssd``, module ``ssd_pb2``)."""

from jcaffe.proto import caffe_pb2, ssd_pb2

__all__ = ["caffe_pb2", "ssd_pb2", "ssd_layer"]


def ssd_layer(param):
    """The SSD fork's view of a ``LayerParameter`` (``ssd_pb2.LayerParameter``): its fork fields
    (``norm_param``, ``prior_box_param``, ``transform_param.resize_param``, ...) which BVLC's
    message holds as unknown fields after :func:`jcaffe.prototxt.read_net` read them."""
    if isinstance(param, ssd_pb2.LayerParameter):
        return param
    return ssd_pb2.LayerParameter.FromString(param.SerializeToString())
