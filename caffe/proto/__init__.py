"""``caffe.proto``: ``caffe.proto.caffe_pb2`` is jcaffe's ``jcaffe.proto.caffe_pb2`` (one schema,
one module object)."""

import sys

from jcaffe.proto import caffe_pb2

sys.modules[__name__ + ".caffe_pb2"] = caffe_pb2

__all__ = ["caffe_pb2"]
