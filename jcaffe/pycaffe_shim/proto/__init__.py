"""``caffe.proto`` for pycaffe layer code: ``from caffe.proto import caffe_pb2``."""

from jcaffe.proto import caffe_pb2

__all__ = ["caffe_pb2"]
