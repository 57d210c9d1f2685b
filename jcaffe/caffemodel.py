"""Caffe's binary model formats: .caffemodel, .caffemodel.h5, .binaryproto, .solverstate.

* A binary ``.caffemodel`` is a serialized ``NetParameter`` as written by Caffe's
  ``Net::ToProto(write_diff=false)``: the net's name and, for every layer, its full
  ``LayerParameter`` with ``blobs`` filled. Models from before 2015 keep their layers (and blobs)
  in the V1 ``layers`` field, and the oldest ones nest a V0 layer inside each of those.
* An HDF5 ``.caffemodel.h5`` is Caffe's ``Net::ToHDF5`` layout: group ``data``, one group per
  layer name, datasets ``"0"``, ``"1"``, ... holding the blobs; a parameter shared from an
  earlier layer is stored only with its owner.
* A ``.binaryproto`` is one ``BlobProto`` (mean files: ``[1, C, H, W]``); a ``BlobProtoVector``
  file holds several.
* A ``.solverstate`` is a ``SolverState`` message; ``.solverstate.h5`` is
  ``SGDSolver::SnapshotSolverStateToHDF5``'s layout (``iter``, ``learned_net``,
  ``current_step``, group ``history``).

Every reader turns bad input into a one-line :class:`~jcaffe.errors.ModelError` naming the file
(and the layer and blob where there is one). Every writer is atomic (:func:`atomic_write`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from typing import NamedTuple, Sequence

import numpy as np
from google.protobuf.message import DecodeError, EncodeError

from jcaffe._atomic import atomic_file
from jcaffe._atomic import atomic_write as _atomic_write
from jcaffe.errors import ModelError, read_bytes
from jcaffe.proto import caffe_pb2

# Caffe's kMaxBlobAxes (blob.hpp): a blob has at most 32 axes.
MAX_BLOB_AXES = 32

_LEGACY_DIMS = ("num", "channels", "height", "width")
# Wire tags of BlobProto's packed repeated fields: (field number << 3) | length-delimited.
_TAG_DATA, _TAG_DIFF, _TAG_DOUBLE_DATA, _TAG_DOUBLE_DIFF = 0x2A, 0x32, 0x42, 0x4A
_BLOB_DATASET = re.compile(r"0|[1-9][0-9]*")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


# -- blobs ------------------------------------------------------------------------------------

def blob_shape(blob: caffe_pb2.BlobProto, where: str = "") -> tuple[int, ...]:
    """The shape Caffe's ``Blob::FromProto(reshape=true)`` gives a ``BlobProto``.

    Any of the legacy ``num/channels/height/width`` fields being set selects the 4-d legacy form
    (unset ones count as 0); otherwise ``shape.dim`` is the shape (no dims: a scalar, count 1).
    """
    if any(blob.HasField(f) for f in _LEGACY_DIMS):
        shape = tuple(int(getattr(blob, f)) for f in _LEGACY_DIMS)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    if len(shape) > MAX_BLOB_AXES:
        raise ModelError(f"{_prefix(where)}blob has {len(shape)} axes; Caffe allows at most "
                         f"{MAX_BLOB_AXES}")
    if any(d < 0 for d in shape):
        raise ModelError(f"{_prefix(where)}blob shape {list(shape)} has a negative dimension")
    return shape


def blob_to_array(blob: caffe_pb2.BlobProto, where: str = "", dtype=np.float32) -> np.ndarray:
    """A ``BlobProto``'s data as an array shaped as Caffe's ``Blob::FromProto`` shapes it.

    Values come from ``double_data`` when it is non-empty, else from ``data`` (Caffe's rule).
    The result is ``dtype`` (float32 by default, what Caffe's float nets hold); ``dtype=None``
    keeps the stored precision (float64 for ``double_data``). ``where`` names the file, layer
    and blob in errors. The value count must equal the shape's count.
    """
    shape = blob_shape(blob, where)
    if len(blob.double_data):
        field, values = "double_data", np.array(blob.double_data, dtype=np.float64)
    else:
        field, values = "data", np.array(blob.data, dtype=np.float32)
    want = math.prod(shape)
    if values.size != want:
        if values.size == 0 and not blob.HasField("shape") and shape == ():
            raise ModelError(f"{_prefix(where)}empty blob: no shape and no data")
        raise ModelError(f"{_prefix(where)}blob holds {values.size} value(s) in '{field}' but "
                         f"its shape {list(shape)} needs {want}")
    arr = values.reshape(shape)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _merge_packed(blob: caffe_pb2.BlobProto, tag: int, raw: bytes) -> None:
    # Parsing the packed field from its wire bytes copies the values bit for bit (NaN payloads
    # included) and is much faster than appending Python floats one by one.
    if raw:
        blob.MergeFromString(bytes([tag]) + _varint(len(raw)) + raw)


def _fill_blob(blob: caffe_pb2.BlobProto, arr, write_diff: bool = False, diff=None, *,
               legacy_dims: bool = False) -> None:
    a = np.asarray(arr)
    double = a.dtype == np.float64
    if legacy_dims:
        if a.ndim != 4:
            raise ValueError(f"the legacy num/channels/height/width form needs a 4-d array, "
                             f"got shape {list(a.shape)}")
        blob.num, blob.channels, blob.height, blob.width = (int(d) for d in a.shape)
    else:
        blob.shape.SetInParent()  # Caffe always writes the shape message, even for 0-d blobs
        blob.shape.dim.extend(int(d) for d in a.shape)
    _merge_packed(blob, _TAG_DOUBLE_DATA if double else _TAG_DATA,
                  a.astype("<f8" if double else "<f4").tobytes())
    if write_diff:
        d = np.zeros(a.shape) if diff is None else np.asarray(diff)
        if d.shape != a.shape:
            raise ValueError(f"diff shape {list(d.shape)} differs from data shape {list(a.shape)}")
        _merge_packed(blob, _TAG_DOUBLE_DIFF if double else _TAG_DIFF,
                      d.astype("<f8" if double else "<f4").tobytes())


def array_to_blob(arr, write_diff: bool = False, diff=None, *,
                  legacy_dims: bool = False) -> caffe_pb2.BlobProto:
    """A ``BlobProto`` as Caffe's ``Blob::ToProto`` writes it: ``shape`` plus packed values.

    float64 arrays go to ``double_data`` (Caffe's ``Blob<double>``), anything else to ``data``
    as float32 (``Blob<float>``). With ``write_diff`` the ``diff`` (``double_diff``) field
    holds ``diff``, or zeros when none is given (a blob whose gradient was never computed).
    ``legacy_dims``: a 4-d array's shape goes to the legacy ``num/channels/height/width``
    fields instead of ``shape``, as Caffe's ``compute_image_mean`` writes its mean file.
    """
    blob = caffe_pb2.BlobProto()
    _fill_blob(blob, arr, write_diff, diff, legacy_dims=legacy_dims)
    return blob


# -- atomic writes ----------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either the old file or the new one
    (``jcaffe._atomic``: temporary beside it, fsync, ``os.replace``); ModelError on failure."""
    _atomic_write(path, data, error=ModelError)


# -- binary protobuf files --------------------------------------------------------------------

def _is_hdf5(path: str) -> bool:
    # Caffe picks the format by the ".h5" suffix; the signature check also catches an HDF5 file
    # under another name (which protobuf would otherwise half-parse as unknown fields).
    if path.endswith(".h5"):
        return True
    try:
        import h5py
        return bool(h5py.is_hdf5(path))
    except (OSError, ImportError):
        return False


def _parse(path: str, cls, what: str):
    data = read_bytes(path, ModelError)
    if not data:
        raise ModelError(f"{path}: file is empty (expected {what})")
    if data.startswith(b"\x89HDF\r\n\x1a\n"):
        raise ModelError(f"{path}: is an HDF5 file, not {what} (HDF5 files must end in .h5)")
    try:
        # Python protobuf (upb) has no 64 MB total-bytes limit, unlike Caffe's C++ reader
        # before it raised kProtoReadBytesLimit; only the 2 GB message limit applies.
        return cls.FromString(data)
    except DecodeError as e:
        raise ModelError(f"{path}: not {what}: the file is truncated or corrupt "
                         f"({str(e).splitlines()[0] if str(e) else 'decode error'})") from None


def _serialize(msg, path: str) -> bytes:
    try:
        return msg.SerializeToString()
    except (EncodeError, ValueError) as e:
        # protobuf cannot serialize a message over 2 GB; Caffe's binary format has the same limit.
        raise ModelError(f"{path}: cannot serialize {type(msg).__name__} ({e}); "
                         f"save large models as HDF5") from None


def _text(name, path: str, what: str) -> str:
    # proto2 string fields are not UTF-8 checked on parse; upb hands invalid ones back as bytes.
    if isinstance(name, bytes):
        raise ModelError(f"{path}: {what} {name!r} is not valid UTF-8")
    return name


def parse_caffemodel(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """The raw ``NetParameter`` message of a binary ``.caffemodel``, in whatever Caffe format
    it was written (V0 / V1 ``layers`` or ``layer``): the weights' reader walks every format
    itself. A net *definition* in binary form is read, upgraded, by
    ``jcaffe.prototxt.read_net_binary``.

    Any size up to protobuf's 2 GB message limit is read. Missing, empty, truncated or corrupt
    files raise a ModelError naming the file.
    """
    return _parse(os.fspath(path), caffe_pb2.NetParameter, "a binary NetParameter (.caffemodel)")


def _binary_layers(net: caffe_pb2.NetParameter, path: str):
    """(name, blobs) of each layer in file order: ``layer``, or V1 ``layers`` (with V0 inside)."""
    if len(net.layer) and len(net.layers):
        # Caffe's UpgradeV1Net refuses such a file as inconsistent.
        raise ModelError(f"{path}: has both 'layer' and legacy 'layers' fields; Caffe refuses "
                         f"such a model")
    if len(net.layer):
        for lp in net.layer:
            yield _text(lp.name, path, "layer name"), lp.blobs
    else:
        for lp in net.layers:
            # V0 models keep the name and the blobs in the nested V0LayerParameter.
            name = lp.name or (lp.layer.name if lp.HasField("layer") else "")
            blobs = lp.blobs if len(lp.blobs) else lp.layer.blobs
            yield _text(name, path, "layer name"), blobs


def load_caffemodel(path: str | os.PathLike, dtype=np.float32) -> dict[str, list]:
    """Layer name -> its parameter blobs in order, from a ``.caffemodel`` or ``.caffemodel.h5``.

    Binary models: layers from ``layer`` or the legacy ``layers`` field; only layers with
    blobs are listed; a later layer of the same name replaces an earlier one (as Caffe's
    ``CopyTrainedLayersFrom`` copies both in turn). Legacy blobs keep their 4-d
    ``(num, channels, height, width)`` shape, as Caffe reads them.

    HDF5 models (path ending in ``.h5``, or an HDF5 signature): Caffe's ``Net::ToHDF5``
    layout. Caffe stores a parameter shared from an earlier layer only with its owner, so such
    a layer's list holds ``None`` where a blob is absent before its last stored one, and is
    shorter when absent blobs come last.
    """
    path = os.fspath(path)
    if _is_hdf5(path):
        return _load_caffemodel_h5(path, dtype)
    net = parse_caffemodel(path)
    if not len(net.layer) and not len(net.layers):
        raise ModelError(f"{path}: holds no layers (not a .caffemodel?)")
    out: dict[str, list] = {}
    for name, blobs in _binary_layers(net, path):
        if len(blobs):
            out[name] = [blob_to_array(b, f"{path}: layer '{name}' blob {j}", dtype)
                         for j, b in enumerate(blobs)]
    return out


def _format(fmt) -> str:
    """'binaryproto' or 'hdf5' from a name or a ``SolverParameter.SnapshotFormat`` value."""
    if isinstance(fmt, str):
        f = fmt.lower()
        if f in ("binaryproto", "hdf5"):
            return f
    elif fmt == caffe_pb2.SolverParameter.HDF5:
        return "hdf5"
    elif fmt == caffe_pb2.SolverParameter.BINARYPROTO:
        return "binaryproto"
    raise ValueError(f"unknown snapshot format {fmt!r} (expected 'binaryproto' or 'hdf5')")


def save_caffemodel(path: str | os.PathLike, net, params, fmt="binaryproto") -> str:
    """Writes ``net``'s parameters as Caffe's ``Net::ToProto(write_diff=false)`` / ``ToHDF5``.

    ``net`` provides ``name`` and ``export_blobs(params)`` (every layer in file order with its
    LayerParameter and blobs). Binary: a ``NetParameter`` with the name and, per layer, a copy of
    its LayerParameter with ``blobs`` replaced by the given ones (shared blobs written in every
    layer that uses them). HDF5: group ``data`` / one group per layer / datasets ``"0"``,
    ``"1"``, ...; a parameter whose ``param { name }`` an earlier layer already used is skipped,
    as Caffe stores shared parameters only with their owner. float64 blobs keep float64
    (``double_data``), others are stored as float32. Returns the path.
    """
    path = os.fspath(path)
    fmt = _format(fmt)
    layers = net.export_blobs(params)
    if fmt == "hdf5":
        _save_caffemodel_h5(path, layers)
        return path
    msg = caffe_pb2.NetParameter()
    msg.name = net.name
    for lp, blobs in layers:
        out = msg.layer.add()
        out.CopyFrom(lp)
        out.ClearField("blobs")
        for b in blobs:
            _fill_blob(out.blobs.add(), b)
    atomic_write(path, _serialize(msg, path))
    return path


def read_binaryproto(path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """Reads a file holding one ``BlobProto`` (a Caffe mean file: ``[1, C, H, W]``), shaped and
    filled by Caffe's ``Blob::FromProto`` rules (:func:`blob_to_array`). jcaffe's one
    ``.binaryproto`` reader: the data layers' ``mean_file`` goes through it too."""
    path = os.fspath(path)
    blob = _parse(path, caffe_pb2.BlobProto, "a BlobProto (.binaryproto)")
    return blob_to_array(blob, path, dtype)


def write_binaryproto(path: str | os.PathLike, array, *, legacy_dims: bool = False) -> None:
    """Writes one ``BlobProto`` atomically: ``shape`` form (``Blob::ToProto``), or with
    ``legacy_dims`` a 4-d array in the ``num/channels/height/width`` form Caffe's
    ``compute_image_mean`` writes. jcaffe's one ``.binaryproto`` writer."""
    path = os.fspath(path)
    try:
        blob = array_to_blob(array, legacy_dims=legacy_dims)
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from None
    atomic_write(path, _serialize(blob, path))


def read_blob_proto_vector(path: str | os.PathLike, dtype=np.float32) -> list[np.ndarray]:
    """Reads a ``BlobProtoVector`` file: its blobs in order."""
    path = os.fspath(path)
    vec = _parse(path, caffe_pb2.BlobProtoVector, "a BlobProtoVector")
    return [blob_to_array(b, f"{path}: blob {i}", dtype) for i, b in enumerate(vec.blobs)]


def write_blob_proto_vector(path: str | os.PathLike, arrays: Sequence) -> None:
    """Writes a ``BlobProtoVector`` file holding ``arrays`` in order."""
    path = os.fspath(path)
    vec = caffe_pb2.BlobProtoVector()
    for a in arrays:
        _fill_blob(vec.blobs.add(), a)
    atomic_write(path, _serialize(vec, path))


# -- HDF5 -------------------------------------------------------------------------------------

def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is a dependency
        raise ModelError("HDF5 model files need the h5py package") from None
    return h5py


@contextlib.contextmanager
def _open_h5(path: str):
    h5py = _h5py()
    if not os.path.exists(path):
        raise ModelError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ModelError(f"{path}: not a readable HDF5 file: truncated or corrupt "
                         f"({str(e).splitlines()[0]})") from None
    try:
        with f:
            yield f
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        # A damaged file can open yet fail while its objects are read.
        raise ModelError(f"{path}: corrupt HDF5 file ({str(e).splitlines()[0]})") from None


def _dataset_array(ds, where: str, dtype) -> np.ndarray:
    # Caffe's hdf5_load_nd_dataset accepts float and integer data of 0..kMaxBlobAxes axes.
    if ds.dtype.kind not in "fiu":
        raise ModelError(f"{where}: dataset type {ds.dtype} is not numeric")
    if ds.ndim > MAX_BLOB_AXES:
        raise ModelError(f"{where}: dataset has {ds.ndim} axes; Caffe allows at most "
                         f"{MAX_BLOB_AXES}")
    arr = np.asarray(ds[()])
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    return arr if arr.dtype.kind == "f" else arr.astype(np.float32)


def _load_caffemodel_h5(path: str, dtype) -> dict[str, list]:
    h5py = _h5py()
    out: dict[str, list] = {}

    def walk(group, prefix: str) -> None:
        # Caffe's own writer cannot store a layer name holding '/', but h5py turns it into nested
        # groups: a group's datasets are the blobs of the layer named by its path under "data",
        # its subgroups continue longer names.
        found: dict[int, np.ndarray] = {}
        layer = prefix.rstrip("/")
        for key, item in group.items():
            if isinstance(item, h5py.Group):
                walk(item, prefix + key + "/")
                continue
            if not layer:
                raise ModelError(f"{path}: group 'data' holds dataset '{key}' outside any "
                                 f"layer group")
            if not _BLOB_DATASET.fullmatch(key):
                raise ModelError(f"{path}: layer '{layer}': unexpected dataset '{key}' (blobs "
                                 f"are datasets named 0, 1, ...)")
            found[int(key)] = _dataset_array(item, f"{path}: layer '{layer}' blob {key}", dtype)
        if found:
            out[layer] = [found.get(j) for j in range(max(found) + 1)]

    with _open_h5(path) as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise ModelError(f"{path}: has no group 'data' (not a Caffe HDF5 model)")
        walk(data, "")
    return out


def _save_caffemodel_h5(path: str, layers) -> None:
    h5py = _h5py()
    seen_layers: set[str] = set()
    owned: set[str] = set()
    with atomic_file(path, error=ModelError) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            for lp, blobs in layers:
                name = lp.name
                if not name or any(part in ("", ".") for part in name.split("/")):
                    raise ModelError(f"{path}: layer name '{name}' cannot name an HDF5 group")
                if name in seen_layers:
                    raise ModelError(f"{path}: layer name '{name}' appears twice; the HDF5 "
                                     f"format needs unique layer names")
                seen_layers.add(name)
                group = data.require_group(name)
                for j, b in enumerate(blobs):
                    shared = lp.param[j].name if j < len(lp.param) else ""
                    if shared:
                        # Caffe's Net::ToHDF5 writes a shared parameter only with its owner,
                        # the first layer naming it.
                        if shared in owned:
                            continue
                        owned.add(shared)
                    a = np.asarray(b)
                    group.create_dataset(str(j), data=a if a.dtype == np.float64
                                         else a.astype(np.float32))


def _h5_int(f, name: str, path: str) -> int:
    ds = f.get(name)
    if ds is None or not hasattr(ds, "dtype"):
        raise ModelError(f"{path}: has no dataset '{name}'")
    if ds.dtype.kind not in "iu" or ds.size != 1:
        raise ModelError(f"{path}: dataset '{name}' must hold one integer, got "
                         f"{ds.dtype} of shape {list(ds.shape)}")
    return int(np.asarray(ds[()]).reshape(()))


def _h5_write_string(f, name: str, s: str) -> None:
    # H5LTmake_dataset_string's form: a scalar, NUL-terminated fixed-length C string.
    h5py = _h5py()
    raw = s.encode("utf-8") + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dsid = h5py.h5d.create(f.id, name.encode(), tid, space)
    dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"))


def _h5_read_string(ds, path: str, name: str) -> str:
    if ds.dtype.kind not in "SOU":
        raise ModelError(f"{path}: dataset '{name}' is not a string ({ds.dtype})")
    value = ds[()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ModelError(f"{path}: dataset '{name}' must hold one string")
        value = value.reshape(()).item()
    if isinstance(value, str):
        return value
    try:
        return bytes(value).split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: dataset '{name}' is not valid UTF-8") from None


# -- solver state -----------------------------------------------------------------------------

class SolverStateData(NamedTuple):
    """The contents of a ``.solverstate``: Caffe's ``SolverState`` message."""

    iter: int
    learned_net: str
    history: list[np.ndarray]
    current_step: int = 0


def write_solverstate(path: str | os.PathLike, *, iter: int, learned_net: str,
                      history: Sequence, current_step: int = 0, fmt="binaryproto") -> str:
    """Writes a solver state as Caffe's ``SGDSolver::SnapshotSolverStateTo{BinaryProto,HDF5}``.

    Binary: a ``SolverState`` (iter, learned_net, history blobs, current_step). HDF5: int
    datasets ``iter`` and ``current_step`` (shape [1]), string dataset ``learned_net``, group
    ``history`` with datasets ``"0"``, ``"1"``, .... An empty ``learned_net`` is left out (Caffe
    then restores no weights from it). Returns the path.
    """
    path = os.fspath(path)
    fmt = _format(fmt)
    if fmt == "binaryproto":
        state = caffe_pb2.SolverState(iter=int(iter), current_step=int(current_step))
        if learned_net:
            state.learned_net = learned_net
        for h in history:
            _fill_blob(state.history.add(), h)
        atomic_write(path, _serialize(state, path))
        return path
    h5py = _h5py()
    with atomic_file(path, error=ModelError) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("iter", data=np.array([iter], dtype=np.int32))
            if learned_net:
                _h5_write_string(f, "learned_net", learned_net)
            f.create_dataset("current_step", data=np.array([current_step], dtype=np.int32))
            group = f.create_group("history")
            for i, h in enumerate(history):
                a = np.asarray(h)
                group.create_dataset(str(i), data=a if a.dtype == np.float64
                                     else a.astype(np.float32))
    return path


def read_solverstate(path: str | os.PathLike, dtype=np.float32) -> SolverStateData:
    """Reads a ``.solverstate`` (binary ``SolverState``) or ``.solverstate.h5`` (Caffe's
    ``Solver::Restore`` chooses HDF5 by the ``.h5`` suffix). ``learned_net`` is "" when the
    file names no model."""
    path = os.fspath(path)
    if _is_hdf5(path):
        return _read_solverstate_h5(path, dtype)
    state = _parse(path, caffe_pb2.SolverState, "a SolverState (.solverstate)")
    if not state.HasField("iter"):
        raise ModelError(f"{path}: has no 'iter' field (not a .solverstate?)")
    history = [blob_to_array(b, f"{path}: history blob {i}", dtype)
               for i, b in enumerate(state.history)]
    return SolverStateData(state.iter, _text(state.learned_net, path, "learned_net"),
                           history, state.current_step)


def _read_solverstate_h5(path: str, dtype) -> SolverStateData:
    h5py = _h5py()
    with _open_h5(path) as f:
        it = _h5_int(f, "iter", path)
        learned = ""
        if "learned_net" in f:
            learned = _h5_read_string(f["learned_net"], path, "learned_net")
        step = _h5_int(f, "current_step", path)
        group = f.get("history")
        if not isinstance(group, h5py.Group):
            raise ModelError(f"{path}: has no group 'history'")
        names = set(group.keys())
        expected = {str(i) for i in range(len(names))}
        if names != expected:
            odd = sorted(names - expected)
            raise ModelError(f"{path}: group 'history' must hold datasets 0..{len(names) - 1}, "
                             f"found {odd[0]!r}")
        history = []
        for i in range(len(names)):
            item = group[str(i)]
            if not isinstance(item, h5py.Dataset):
                raise ModelError(f"{path}: history '{i}' is not a dataset")
            history.append(_dataset_array(item, f"{path}: history blob {i}", dtype))
    return SolverStateData(it, learned, history, step)


def snapshot_filenames(prefix: str, iter: int, fmt="binaryproto") -> tuple[str, str]:
    """Caffe's ``Solver::SnapshotFilename``: ``<prefix>_iter_<N>.caffemodel`` and
    ``.solverstate``, or ``.caffemodel.h5`` / ``.solverstate.h5`` for HDF5 (N unpadded)."""
    ext = ".h5" if _format(fmt) == "hdf5" else ""
    stem = f"{prefix}_iter_{int(iter)}"
    return f"{stem}.caffemodel{ext}", f"{stem}.solverstate{ext}"
