"""Caffe's layers as pure JAX functions, one family per module.

``REGISTRY`` maps each Caffe type name (``"Convolution"``, ``"ReLU"``, ...) to its layer class:
its shape rule (``setup``), its parameter initialisation (``init``) and its pure ``apply``.
The families (vision, neuron, common, loss, norm, data, python) register themselves on import;
third-party types come from the entry-point group ``jcaffe.layers`` (``jcaffe.layers.python``).
"""

from jcaffe.layers.base import REGISTRY, Context, Layer, known_types, layer_class, register

__all__ = ["REGISTRY", "Context", "Layer", "known_types", "layer_class", "register"]
