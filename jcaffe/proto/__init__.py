"""Caffe's protobuf schema (``caffe.proto``, package ``caffe``) and its generated module."""

from jcaffe.proto import caffe_pb2

__all__ = ["caffe_pb2"]
