"""draw_net: a net definition as a graph, as Caffe's ``python/draw_net.py`` (``caffe.draw``).

    jcaffe draw_net [--rankdir LR|TB|BT|RL] [--phase TRAIN|TEST|ALL] [--display_lrm] NET OUT

The graph is Caffe's: a node per layer (label: name, ``(Type)`` — ``(Pooling MAX)`` for
pooling — and for Convolution / Deconvolution / Pooling ``kernel size``, ``stride``, ``pad``;
with ``--display_lrm`` the learning-rate multipliers of learning layers), coloured by type
(convolution red, pooling orange, inner product purple, others blue; an in-place layer —
one bottom that is also its one top, e.g. ReLU — green), a node per blob (a grey octagon), an
edge from each bottom blob to its layer and from the layer to each top blob (labelled with the
batch size of a Data layer and the ``num_output`` of Convolution / Deconvolution /
InnerProduct layers). An in-place layer therefore has an edge in and out of the same blob node,
as in Caffe. Layers of one name and type (a net's TRAIN and TEST data layers) share a node.

``--phase``: the layers Caffe's draw keeps for a phase (no ``include``, an ``include`` of that
phase, no ``exclude`` of it; ``ALL``, the default, keeps all). Separators follow Caffe: words
on separate lines for LR / RL, spaces for TB / BT.

OUT's extension picks the format: ``.dot`` / ``.gv`` / ``.raw`` write the DOT text itself;
anything else (``.png``, ``.svg``, ``.pdf``, ...) is rendered by Graphviz's ``dot`` program,
which must be installed (``apt-get install graphviz``). Unlike Caffe, top-only blobs are drawn
as octagons too (Caffe draws them as plain ellipses by an oversight).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from typing import Sequence

from jcaffe.errors import JcaffeError, NetError
from jcaffe.proto import caffe_pb2

LAYER_STYLE = {"shape": "record", "style": "filled"}
NEURON_LAYER_COLOR = "#90EE90"
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
RANKDIRS = ("LR", "TB", "BT", "RL")
TEXT_FORMATS = (".dot", ".gv", ".raw")


def layer_color(layer_type: str) -> str:
    """Caffe's colours by layer type."""
    return {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
            "InnerProduct": "#CC33FF"}.get(layer_type, "#6495ED")


def edge_label(layer: caffe_pb2.LayerParameter) -> str:
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def _lr_mults(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    mults = [p.lr_mult for p in layer.param]
    if len(mults) > 2:
        raise NetError(f"layer '{layer.name}': {len(mults)} param entries; the learning-rate "
                       f"multipliers of a {layer.type} layer are 2")
    return tuple(mults + [1.0] * (2 - len(mults)))  # type: ignore[return-value]


def layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False
                ) -> list[str]:
    """The lines (TB/BT: words) of a layer node's label, as Caffe's ``get_layer_label``."""
    parts = [layer.name]
    if layer.type == "Pooling":
        pool = caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)
        parts.append(f"(Pooling {pool})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            p = layer.pooling_param
            kernel, stride, pad = p.kernel_size, p.stride, p.pad
        else:
            p = layer.convolution_param
            kernel = p.kernel_size[0] if len(p.kernel_size) else 1
            stride = p.stride[0] if len(p.stride) else 1
            pad = p.pad[0] if len(p.pad) else 0
        parts += [f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        w, b = _lr_mults(layer)
        if w or b:
            parts.append(f"lr mult: {w:.1f}, {b:.1f}")
    return parts


def _included(layer: caffe_pb2.LayerParameter, phase: int | None) -> bool:
    if phase is None:
        return True
    if layer.include and layer.exclude:
        raise NetError(f"layer '{layer.name}' has both include and exclude specified")
    included = not layer.include or any(r.phase == phase for r in layer.include)
    return included and not any(r.phase == phase for r in layer.exclude)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _record_text(text: str) -> str:
    # Characters with a meaning in a record label are escaped to stand for themselves.
    for ch in "{}|<>":
        text = text.replace(ch, "\\" + ch)
    return text


def _attrs(attrs: dict[str, str]) -> str:
    return "[" + ", ".join(f"{k}={_quote(v) if k != 'label' else v}" for k, v in attrs.items()) + "]"


def net_to_dot(net: caffe_pb2.NetParameter, rankdir: str = "LR", phase: int | None = None,
               display_lrm: bool = False, label_edges: bool = True) -> str:
    """The DOT text of Caffe's drawing of ``net`` (see the module doc)."""
    if rankdir not in RANKDIRS:
        raise JcaffeError(f"--rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    sep = " " if rankdir in ("TB", "BT") else "\\n"
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, str]] = []
    for layer in net.layer:
        if not _included(layer, phase):
            continue
        node = f"{layer.name}_{layer.type}"
        label = sep.join(_record_text(p) for p in layer_label(layer, rankdir, display_lrm))
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        color = NEURON_LAYER_COLOR if in_place else layer_color(layer.type)
        nodes[node] = {"label": '"' + label.replace('"', '\\"') + '"', **LAYER_STYLE,
                       "fillcolor": color}
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = {"label": _quote(bottom), **BLOB_STYLE}
            edges.append((bottom + "_blob", node, ""))
        for top in layer.top:
            nodes[top + "_blob"] = {"label": _quote(top), **BLOB_STYLE}
            edges.append((node, top + "_blob", edge_label(layer) if label_edges else ""))
    lines = [f"digraph {_quote(net.name or 'Net')} {{", f"  rankdir={rankdir};"]
    lines += [f"  {_quote(name)} {_attrs(attrs)};" for name, attrs in nodes.items()]
    lines += [f"  {_quote(src)} -> {_quote(dst)} [label={_quote(label)}];"
              for src, dst, label in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """``dot_text`` rendered by Graphviz's ``dot -T<fmt>``."""
    exe = shutil.which("dot")
    if exe is None:
        raise JcaffeError(f"drawing a net as .{fmt} needs Graphviz's 'dot' program, which is "
                          f"not installed (apt-get install graphviz; or write a .dot file)")
    try:
        r = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        raise JcaffeError(f"Graphviz's dot did not finish rendering .{fmt} in 120 s") from None
    if r.returncode != 0:
        msg = " ".join(r.stderr.decode(errors="replace").split())
        raise JcaffeError(f"Graphviz's dot could not render .{fmt}: {msg}")
    return r.stdout


def draw_net_to_file(net: caffe_pb2.NetParameter, filename: str | os.PathLike,
                     rankdir: str = "LR", phase: int | str | None = None,
                     display_lrm: bool = False) -> None:
    """Caffe's ``caffe.draw.draw_net_to_file``: the format is ``filename``'s extension."""
    filename = os.fspath(filename)
    if isinstance(phase, str):
        phase = _phase(phase)
    ext = os.path.splitext(filename)[1].lower()
    if not ext:
        raise JcaffeError(f"{filename}: no extension to tell the output format "
                          f"(.png, .svg, .dot, ...)")
    text = net_to_dot(net, rankdir, phase, display_lrm)
    data = text.encode() if ext in TEXT_FORMATS else render(text, ext[1:])
    tmp = filename + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, filename)
    except OSError as e:
        raise JcaffeError(f"{filename}: cannot write: {e.strerror or e}") from None


def _phase(name: str) -> int | None:
    name = name.upper()
    if name == "ALL":
        return None
    if name in ("TRAIN", "TEST"):
        return caffe_pb2.Phase.Value(name)
    raise JcaffeError(f"unknown phase '{name}': TRAIN, TEST or ALL")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jcaffe draw_net",
                                description="Draw a graph of the net architecture.")
    p.add_argument("input_net_proto_file", metavar="NET", help="the net prototxt")
    p.add_argument("output_image_file", metavar="OUT", help="the image (.png, .svg, ...) or .dot")
    p.add_argument("--rankdir", default="LR",
                   help="LR (left-right, the default), TB (top-bottom), BT or RL")
    p.add_argument("--phase", default="ALL", help="TRAIN, TEST or ALL (the default)")
    p.add_argument("--display_lrm", action="store_true",
                   help="show the learning-rate multipliers of learning layers")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from jcaffe.cli import parse_flags
    from jcaffe.prototxt import read_net

    args = parse_flags(list(argv or []), _parser())
    phase = _phase(args.phase)
    if args.rankdir not in RANKDIRS:
        raise JcaffeError(f"--rankdir must be one of {', '.join(RANKDIRS)}, got '{args.rankdir}'")
    net = read_net(args.input_net_proto_file)
    print(f"Drawing net to {args.output_image_file}")
    draw_net_to_file(net, args.output_image_file, args.rankdir, phase, args.display_lrm)
    return 0
