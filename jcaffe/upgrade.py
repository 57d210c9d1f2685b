"""Upgrades old Caffe net and solver definitions to the current format (Caffe's upgrade_proto.cpp).

A net is brought to the "V2" format (``layer`` messages with string types) in Caffe's order
(``UpgradeNetAsNeeded``):

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` with flat hyperparameters becomes
   ``layers { type: CONVOLUTION convolution_param { ... } }``; V0 ``padding`` layers are folded
   into the convolution / pooling layer they feed (``UpgradeV0PaddingLayers``).
2. Data transformation: ``scale`` / ``mean_file`` / ``crop_size`` / ``mirror`` given inside
   ``data_param`` / ``image_data_param`` / ``window_data_param`` move to ``transform_param``.
3. V1 -> V2: enum layer types become strings, ``blobs_lr`` / ``weight_decay`` / ``param`` /
   ``blob_share_mode`` become ``param { lr_mult decay_mult name share_mode }``.
4. Net ``input`` / ``input_dim`` / ``input_shape`` become an ``Input`` layer placed first.
5. BatchNorm layers that declare three ``param`` specs get ``lr_mult: 0 decay_mult: 0`` on each
   (its blobs are statistics, not learned).

A solver's ``solver_type`` enum becomes the string ``type``.

Every function returns an upgraded copy and leaves its argument alone. What Caffe treats as fatal
(``LOG(FATAL)`` / ``CHECK``) raises :class:`~jcaffe.errors.ProtoError` naming the file and the
layer; what Caffe only logs as an incompatibility ("had one or more problems upgrading ...;
continuing anyway") is returned as a list of problems by the ``*_as_needed`` functions and logged
at ERROR level by :func:`upgrade_net`.
"""

from __future__ import annotations

import logging

from jcaffe.errors import ProtoError
from jcaffe.proto import caffe_pb2

log = logging.getLogger("jcaffe.upgrade")

V1 = caffe_pb2.V1LayerParameter

# ---------------------------------------------------------------------------------------------
# Detection (Caffe's NetNeeds*Upgrade)
# ---------------------------------------------------------------------------------------------


def net_needs_v0_to_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when any ``layers`` entry wraps a V0 ``layer`` message."""
    return any(conn.HasField("layer") for conn in net.layers)


def net_needs_v1_to_v2_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when the net uses the V1 ``layers`` field at all."""
    return len(net.layers) > 0


_DATA_PARAM_OF_V1_TYPE = {
    V1.DATA: "data_param",
    V1.IMAGE_DATA: "image_data_param",
    V1.WINDOW_DATA: "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def net_needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when a V1 data layer gives transformation fields inside its own data parameter."""
    for layer in net.layers:
        field = _DATA_PARAM_OF_V1_TYPE.get(layer.type)
        if field is not None:
            sub = getattr(layer, field)
            if any(sub.HasField(f) for f in _TRANSFORM_FIELDS):
                return True
    return False


def net_needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when the net declares its inputs with the net-level ``input`` field."""
    return len(net.input) > 0


def net_needs_batch_norm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True when a BatchNorm layer declares exactly three param specs (the old definition)."""
    return any(layer.type == "BatchNorm" and len(layer.param) == 3 for layer in net.layer)


def net_needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Caffe's NetNeedsUpgrade: any of the five upgrades applies."""
    return (net_needs_v0_to_v1_upgrade(net) or net_needs_v1_to_v2_upgrade(net)
            or net_needs_data_upgrade(net) or net_needs_input_upgrade(net)
            or net_needs_batch_norm_upgrade(net))


def solver_needs_type_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """True when the solver uses the deprecated ``solver_type`` enum."""
    return solver.HasField("solver_type")


# ---------------------------------------------------------------------------------------------
# V0 -> V1
# ---------------------------------------------------------------------------------------------


def _where(filename: str) -> str:
    return f"{filename}: " if filename else ""


def upgrade_v0_padding_layers(net: caffe_pb2.NetParameter,
                              filename: str = "") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeV0PaddingLayers: drops V0 ``padding`` layers and sets their ``pad`` on the
    conv / pool layer that consumes them, rewiring its bottom to the padding layer's bottom.

    Caffe only allows this for a conv or pool consumer with one bottom fed by a padding layer
    with one bottom and one top; anything else raises naming the layer.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    # Blob name -> index (in the input net) of the layer that last produced it; -1: net input.
    last_top: dict[str, int] = {name: -1 for name in net.input}
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise ProtoError(f"{_where(filename)}layer '{v0.name}': unknown bottom blob "
                                 f"'{blob}' (no earlier layer or net input produces it)")
            src_idx = last_top[blob]
            if src_idx == -1:
                continue
            src = net.layers[src_idx]
            if src.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise ProtoError(
                    f"{_where(filename)}layer '{v0.name}': a V0 padding layer "
                    f"('{src.layer.name}') can only feed a conv or pool layer, not type "
                    f"'{v0.type}'")
            if len(conn.bottom) != 1:
                raise ProtoError(f"{_where(filename)}layer '{v0.name}': takes input from padding "
                                 f"layer '{src.layer.name}' so it must have exactly one bottom, "
                                 f"has {len(conn.bottom)}")
            if len(src.bottom) != 1 or len(src.top) != 1:
                raise ProtoError(f"{_where(filename)}layer '{src.layer.name}': a V0 padding layer "
                                 f"must have exactly one bottom and one top")
            target = out.layers[len(out.layers) - 1]
            target.layer.pad = src.layer.pad
            target.bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


# V0 type string -> V1 enum (Caffe's UpgradeV0LayerType).
V0_LAYER_TYPES: dict[str, int] = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# V0 hyperparameter -> {V0 layer type: (V1 sub-message, field)}. A V0 field given on a layer
# type not listed here is an incompatibility Caffe logs and skips.
_V0_TYPED_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"),
               "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"),
                  "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}
# Transformation fields apply to any V0 layer type.
_V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size",
                        "mirror": "mirror"}
# Copied as is, or (new_num, new_channels) ignored by Caffe's upgrade.
_V0_OTHER_FIELDS = {"name", "type", "blobs", "blobs_lr", "weight_decay", "new_num",
                    "new_channels"}


def upgrade_v0_layer_type(v0_type: str, layer_name: str = "", filename: str = "") -> int:
    """Caffe's UpgradeV0LayerType: a V0 type string to the V1 ``LayerType`` enum."""
    try:
        return V0_LAYER_TYPES[v0_type]
    except KeyError:
        known = ", ".join(sorted(V0_LAYER_TYPES))
        raise ProtoError(f"{_where(filename)}layer '{layer_name}': unknown V0 layer type "
                         f"'{v0_type}' (known: {known})") from None


def _set_field(msg, field: str, value) -> None:
    fd = msg.DESCRIPTOR.fields_by_name[field]
    if fd.message_type is not None:
        getattr(msg, field).CopyFrom(value)
    elif fd.is_repeated:
        getattr(msg, field).append(value)
    else:
        setattr(msg, field, value)


def upgrade_v0_layer_parameter(conn: caffe_pb2.V1LayerParameter, problems: list[str] | None = None,
                               filename: str = "") -> caffe_pb2.V1LayerParameter:
    """Caffe's UpgradeV0LayerParameter: one V0 layer (wrapped in a V1 ``layers`` entry) to a V1
    layer. Fields that do not apply to the layer's type are appended to ``problems``."""
    problems = problems if problems is not None else []
    out = V1()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return out
    v0 = conn.layer
    v0_type = v0.type
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        out.type = upgrade_v0_layer_type(v0_type, v0.name, filename)
    for blob in v0.blobs:
        out.blobs.add().CopyFrom(blob)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for fd, value in v0.ListFields():
        name = fd.name
        if name in _V0_OTHER_FIELDS:
            continue
        if name in _V0_TRANSFORM_FIELDS:
            setattr(out.transform_param, _V0_TRANSFORM_FIELDS[name], value)
            continue
        targets = _V0_TYPED_FIELDS[name]
        if v0_type not in targets:
            problems.append(f"layer '{v0.name}': V0 parameter '{name}' does not apply to layer "
                            f"type '{v0_type}'; ignored")
            continue
        sub_name, field = targets[v0_type]
        sub = getattr(out, sub_name)
        if field is None:
            sub.CopyFrom(value)
        elif name == "pool":
            # V0 and current pooling enums share names (MAX, AVE, STOCHASTIC).
            method = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            sub.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(method)
        else:
            _set_field(sub, field, value)
    return out


def upgrade_v0_net(net: caffe_pb2.NetParameter, problems: list[str] | None = None,
                   filename: str = "") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeV0Net: padding layers folded, then each layer upgraded to V1. Like Caffe,
    only the net's name, inputs and ``force_backward`` are carried over from the net level."""
    problems = problems if problems is not None else []
    padded = upgrade_v0_padding_layers(net, filename)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for conn in padded.layers:
        out.layers.add().CopyFrom(upgrade_v0_layer_parameter(conn, problems, filename))
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out


# ---------------------------------------------------------------------------------------------
# Data transformation fields
# ---------------------------------------------------------------------------------------------


def upgrade_net_data_transformation(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Caffe's UpgradeNetDataTransformation: moves scale / mean_file / crop_size / mirror out of
    a V1 DATA / IMAGE_DATA / WINDOW_DATA layer's parameter into its ``transform_param``."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layers:
        field = _DATA_PARAM_OF_V1_TYPE.get(layer.type)
        if field is None:
            continue
        sub = getattr(layer, field)
        for name in _TRANSFORM_FIELDS:
            if sub.HasField(name):
                setattr(layer.transform_param, name, getattr(sub, name))
                sub.ClearField(name)
    return out


# ---------------------------------------------------------------------------------------------
# V1 -> V2
# ---------------------------------------------------------------------------------------------

# V1 enum -> V2 type string (Caffe's UpgradeV1LayerType), keyed by enum name.
V1_LAYER_TYPES: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# The layer-specific sub-messages a V1 layer may carry; each is copied into the V2 layer's field
# of the same name.
V1_PARAM_FIELDS: tuple[str, ...] = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param", "eltwise_param",
    "exp_param", "hdf5_data_param", "hdf5_output_param", "hinge_loss_param", "image_data_param",
    "infogain_loss_param", "inner_product_param", "lrn_param", "memory_data_param", "mvn_param",
    "pooling_param", "power_param", "relu_param", "sigmoid_param", "softmax_param",
    "slice_param", "tanh_param", "threshold_param", "window_data_param", "transform_param",
    "loss_param",
)


def upgrade_v1_layer_type(v1_type: int, layer_name: str = "", filename: str = "") -> str:
    """Caffe's UpgradeV1LayerType: the V1 ``LayerType`` enum to the V2 type string."""
    try:
        return V1_LAYER_TYPES[V1.LayerType.Name(v1_type)]
    except (KeyError, ValueError):
        raise ProtoError(f"{_where(filename)}layer '{layer_name}': unknown V1 layer type "
                         f"{v1_type}") from None


def upgrade_v1_layer_parameter(v1: caffe_pb2.V1LayerParameter, problems: list[str] | None = None,
                               filename: str = "") -> caffe_pb2.LayerParameter:
    """Caffe's UpgradeV1LayerParameter: one V1 ``layers`` entry to a V2 ``layer``."""
    problems = problems if problems is not None else []
    out = caffe_pb2.LayerParameter()
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    for rule in v1.include:
        out.include.add().CopyFrom(rule)
    for rule in v1.exclude:
        out.exclude.add().CopyFrom(rule)
    if v1.HasField("type"):
        out.type = upgrade_v1_layer_type(v1.type, v1.name, filename)
    for blob in v1.blobs:
        out.blobs.add().CopyFrom(blob)

    def param_spec(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        param_spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        mode_name = V1.DimCheckMode.Name(mode)
        param_spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(mode_name)
    for i, lr in enumerate(v1.blobs_lr):
        param_spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param_spec(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for field in V1_PARAM_FIELDS:
        if v1.HasField(field):
            getattr(out, field).CopyFrom(getattr(v1, field))
    if v1.HasField("layer"):
        problems.append(f"layer '{v1.name}': V1 layer also holds a V0 'layer' message; ignored")
    return out


def upgrade_v1_net(net: caffe_pb2.NetParameter, problems: list[str] | None = None,
                   filename: str = "") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeV1Net: every ``layers`` entry becomes a ``layer``; net-level fields are
    kept. A net that mixes ``layer`` and ``layers`` is refused, as in Caffe."""
    problems = problems if problems is not None else []
    if len(net.layer) > 0:
        raise ProtoError(
            f"{_where(filename)}the net mixes 'layer' (current format) and 'layers' (V1 format) "
            f"entries; write all of them as layer {{ type: \"Convolution\" ... }} to continue")
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    for v1 in net.layers:
        out.layer.add().CopyFrom(upgrade_v1_layer_parameter(v1, problems, filename))
    return out


# ---------------------------------------------------------------------------------------------
# Net inputs and BatchNorm
# ---------------------------------------------------------------------------------------------


def upgrade_net_input(net: caffe_pb2.NetParameter, filename: str = "") -> caffe_pb2.NetParameter:
    """Caffe's UpgradeNetInput: ``input`` with ``input_shape`` or ``input_dim`` (4 per input)
    becomes one ``Input`` layer named "input" placed first; an ``input`` without shapes (as in
    old caffemodels) is simply dropped."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    n = len(net.input)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) < n:
            raise ProtoError(f"{_where(filename)}the net has {n} 'input' entries but only "
                             f"{len(net.input_shape)} 'input_shape' entries")
        if not has_shape and len(net.input_dim) < 4 * n:
            raise ProtoError(f"{_where(filename)}the net has {n} 'input' entries, which need "
                             f"{4 * n} 'input_dim' values (4 per input), but has "
                             f"{len(net.input_dim)}")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, top in enumerate(net.input):
            layer.top.append(top)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        # Placed first so that every later layer finds its bottoms already produced.
        rest = []
        for existing in out.layer:
            copy = caffe_pb2.LayerParameter()
            copy.CopyFrom(existing)
            rest.append(copy)
        del out.layer[:]
        out.layer.add().CopyFrom(layer)
        for existing in rest:
            out.layer.add().CopyFrom(existing)
    out.ClearField("input")
    out.ClearField("input_shape")
    out.ClearField("input_dim")
    return out


def upgrade_net_batch_norm(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Caffe's UpgradeNetBatchNorm: a BatchNorm layer with exactly three param specs gets
    ``lr_mult: 0`` and ``decay_mult: 0`` on each; the specs' other fields are kept."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in out.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# The whole net
# ---------------------------------------------------------------------------------------------


def upgrade_net_as_needed(net: caffe_pb2.NetParameter,
                          filename: str = "") -> tuple[caffe_pb2.NetParameter, list[str]]:
    """Caffe's UpgradeNetAsNeeded: applies each needed upgrade in Caffe's order. Returns the
    upgraded copy and the incompatibilities found (empty when the upgrade was exact)."""
    name = filename or "<net>"
    problems: list[str] = []
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    if net_needs_v0_to_v1_upgrade(out):
        log.info("Upgrading %s from the V0 layer format", name)
        out = upgrade_v0_net(out, problems, filename)
        log.warning("%s uses the V0 net format; run `jcaffe upgrade_net_proto_text` (or "
                    "upgrade_net_proto_binary for weights) to save it in the current format",
                    name)
    if net_needs_data_upgrade(out):
        log.info("Upgrading %s: moving data transformation fields into transform_param", name)
        out = upgrade_net_data_transformation(out)
    if net_needs_v1_to_v2_upgrade(out):
        log.info("Upgrading %s from the V1 layer format", name)
        out = upgrade_v1_net(out, problems, filename)
    if net_needs_input_upgrade(out):
        log.info("Upgrading %s: net-level input fields become an Input layer", name)
        out = upgrade_net_input(out, filename)
    if net_needs_batch_norm_upgrade(out):
        log.info("Upgrading %s: BatchNorm param specs get lr_mult 0, decay_mult 0", name)
        out = upgrade_net_batch_norm(out)
    return out, problems


def upgrade_net(net: caffe_pb2.NetParameter, filename: str = "") -> caffe_pb2.NetParameter:
    """An upgraded copy of ``net`` in the current (V2) format; incompatibilities Caffe tolerates
    are logged at ERROR level, impossible upgrades raise ProtoError naming the layer."""
    out, problems = upgrade_net_as_needed(net, filename)
    for problem in problems:
        log.error("%s%s", _where(filename), problem)
    if problems:
        log.error("%shad problems upgrading the net (see above); continuing anyway",
                  _where(filename))
    return out


# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------

SOLVER_TYPES: dict[str, str] = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}

_EMBEDDED_NETS = ("net_param", "train_net_param")


def upgrade_solver_type(solver: caffe_pb2.SolverParameter,
                        filename: str = "") -> caffe_pb2.SolverParameter:
    """Caffe's UpgradeSolverType: the ``solver_type`` enum becomes the ``type`` string. Giving
    both is refused, as in Caffe."""
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(solver)
    if not solver.HasField("solver_type"):
        return out
    if solver.HasField("type"):
        raise ProtoError(f"{_where(filename)}the solver gives both the old 'solver_type' (enum) "
                         f"and the new 'type' (string); keep only 'type'")
    enum_name = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
    out.type = SOLVER_TYPES[enum_name]
    out.ClearField("solver_type")
    return out


def upgrade_solver_as_needed(solver: caffe_pb2.SolverParameter, filename: str = ""
                             ) -> tuple[caffe_pb2.SolverParameter, list[str]]:
    """Caffe's UpgradeSolverAsNeeded, plus (a jcaffe extension; Caffe leaves them alone) the
    upgrade of nets embedded in ``net_param`` / ``train_net_param`` / ``test_net_param``."""
    name = filename or "<solver>"
    problems: list[str] = []
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(solver)
    if solver_needs_type_upgrade(out):
        log.info("Upgrading %s: 'solver_type' (enum) becomes 'type' (string)", name)
        out = upgrade_solver_type(out, filename)
    for field in _EMBEDDED_NETS:
        if out.HasField(field) and net_needs_upgrade(getattr(out, field)):
            net, net_problems = upgrade_net_as_needed(getattr(out, field), f"{name} ({field})")
            getattr(out, field).CopyFrom(net)
            problems.extend(f"{field}: {p}" for p in net_problems)
    for i, test_net in enumerate(out.test_net_param):
        if net_needs_upgrade(test_net):
            net, net_problems = upgrade_net_as_needed(test_net, f"{name} (test_net_param #{i})")
            test_net.CopyFrom(net)
            problems.extend(f"test_net_param #{i}: {p}" for p in net_problems)
    return out, problems


def solver_needs_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """The solver type is an enum, or an embedded net needs an upgrade."""
    return (solver_needs_type_upgrade(solver)
            or any(solver.HasField(f) and net_needs_upgrade(getattr(solver, f))
                   for f in _EMBEDDED_NETS)
            or any(net_needs_upgrade(n) for n in solver.test_net_param))


def upgrade_solver(solver: caffe_pb2.SolverParameter,
                   filename: str = "") -> caffe_pb2.SolverParameter:
    """An upgraded copy of ``solver`` (see :func:`upgrade_solver_as_needed`)."""
    out, problems = upgrade_solver_as_needed(solver, filename)
    for problem in problems:
        log.error("%s%s", _where(filename), problem)
    return out
