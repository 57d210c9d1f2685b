"""``caffe.draw``: pycaffe's net drawings, made by jcaffe's ``draw_net`` (Graphviz's ``dot``
renders them; pycaffe used pydot, which drives the same program).

``draw_net(caffe_net, rankdir, ext='png', phase=None, display_lrm=False)`` returns the image
bytes; ``draw_net_to_file(caffe_net, filename, rankdir='LR', phase=None, display_lrm=False)``
writes it (format from the extension); ``get_pydot_graph`` is not provided (no pydot): use
``net_to_dot`` for the DOT text.
"""

from __future__ import annotations

from jcaffe.tools.draw_net import (BLOB_STYLE, LAYER_STYLE, NEURON_LAYER_COLOR, TEXT_FORMATS,
                                   draw_net_to_file as _draw_net_to_file, edge_label,
                                   layer_color, net_to_dot, render)

from caffe import _state

__all__ = ["draw_net", "draw_net_to_file", "net_to_dot", "get_pydot_graph", "get_edge_label",
           "get_layer_lr_mult", "choose_color_by_layertype", "LAYER_STYLE_DEFAULT",
           "NEURON_LAYER_STYLE", "BLOB_STYLE"]

LAYER_STYLE_DEFAULT = LAYER_STYLE
NEURON_LAYER_STYLE = {**LAYER_STYLE, "fillcolor": NEURON_LAYER_COLOR}
get_edge_label = edge_label
choose_color_by_layertype = layer_color


def get_layer_lr_mult(layer):
    """``(weight lr_mult, bias lr_mult)`` of a Convolution/Deconvolution/InnerProduct layer
    (1 when not given), else ``(0, 0)``."""
    from jcaffe.tools.draw_net import _lr_mults

    return _lr_mults(layer)


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False) -> bytes:
    """The drawing of ``caffe_net`` (a NetParameter) as ``ext`` image bytes."""
    with _state.caffe_errors():
        text = net_to_dot(caffe_net, rankdir, phase, display_lrm)
        return text.encode() if f".{ext}" in TEXT_FORMATS else render(text, ext)


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False) -> None:
    """Writes the drawing to ``filename`` (format from the extension)."""
    with _state.caffe_errors():
        _draw_net_to_file(caffe_net, filename, rankdir, phase, display_lrm)


def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    raise NotImplementedError("caffe.draw.get_pydot_graph: jcaffe draws without pydot; "
                              "caffe.draw.net_to_dot(net, rankdir) gives the DOT text")
