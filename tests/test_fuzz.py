"""Fuzzing the readers with mutated real inputs (hypothesis, bounded).

Property, for every input: the reader succeeds or raises a ``JcaffeError`` whose message is one
line; never another exception, a hang or a crash. Inputs are the shipped prototxt files, and a
caffemodel / solverstate / binaryproto / Datum / dataset metadata file written from a tiny net,
mutated by bytes, lines and tokens. Examples found to break a reader are kept as ``@example``s.

``JCAFFE_FUZZ_EXAMPLES`` raises the number of examples per test (default: a small number so the
whole file stays within about half a minute on two cores).
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jcaffe import caffemodel, prototxt
from jcaffe.data import datum as jdatum
from jcaffe.data.dataset import read_dataset, verify_dataset, write_dataset
from jcaffe.errors import JcaffeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = int(os.environ.get("JCAFFE_FUZZ_EXAMPLES", "0") or 0)
TRIED: dict[str, int] = {}


def _settings(n):
    return settings(max_examples=SCALE or n, deadline=None, database=None, derandomize=not SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    total = sum(v for k, v in TRIED.items() if "(" not in k)
    print(f"\nfuzz inputs tried: {total} ({', '.join(f'{k} {v}' for k, v in TRIED.items())})")


def _count(kind):
    TRIED[kind] = TRIED.get(kind, 0) + 1


def _check(fn, *args, kind: str = ""):
    """Runs ``fn``; a JcaffeError must be one line; any other exception fails the test."""
    try:
        out = fn(*args)
    except JcaffeError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return None
    if kind:
        _count(kind + " (accepted)")
    return out


# -- mutations ---------------------------------------------------------------------------------

INTERESTING = [b"0", b"-1", b"1", b"2", b"4294967296", b"-2147483649", b"1e40", b"nan", b"inf",
               b"-0.0", b"\"\"", b"\"", b"{", b"}", b":", b"#", b"\\", b"\xff", b"layer",
               b"bottom", b"top", b"type", b"name", b"\"Convolution\"", b"\"Pooling\"",
               b"\"InnerProduct\"", b"\"Reshape\"", b"\"Slice\"", b"\"Concat\"", b"TRAIN",
               b"999999", b"kernel_size", b"stride", b"pad", b"num_output", b"axis", b"dim"]

NUMBERS = [b"0", b"-1", b"1", b"2", b"3", b"7", b"100000", b"4294967296", b"-2147483649",
           b"1e40", b"-1e40", b"nan", b"inf", b"-0.0", b"0.5"]
_NUMBER = re.compile(rb"(?<=: )-?\d+(?:\.\d*)?(?:[eE]-?\d+)?")
_TOKEN = re.compile(rb"[A-Za-z_][A-Za-z0-9_.]*|-?\d+(?:\.\d*)?(?:[eE]-?\d+)?|\"[^\"\n]*\"|\S")

ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate",
                                          "line_del", "line_dup", "line_swap", "tok_set",
                                          "tok_copy", "tok_del", "num_set"]),
                         st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 255)),
               min_size=1, max_size=4)


def mutate(data: bytes, operations) -> bytes:
    b = bytearray(data)
    for kind, i, j, v in operations:
        if kind in ("flip", "set", "insert", "delete", "truncate"):
            if not b and kind != "insert":
                continue
            k = i % (len(b) + (kind == "insert"))
            if kind == "flip":
                b[k] ^= 1 << (v % 8)
            elif kind == "set":
                b[k] = v
            elif kind == "insert":
                b[k:k] = bytes([v]) * (1 + j % 4)
            elif kind == "delete":
                del b[k:k + 1 + j % 8]
            else:
                del b[k:]
        elif kind.startswith("line"):
            lines = bytes(b).split(b"\n")
            a, c = i % len(lines), j % len(lines)
            if kind == "line_del":
                del lines[a]
            elif kind == "line_dup":
                lines.insert(c, lines[a])
            else:
                lines[a], lines[c] = lines[c], lines[a]
            b = bytearray(b"\n".join(lines))
        elif kind == "num_set":
            nums = list(_NUMBER.finditer(bytes(b)))
            if nums:
                t = nums[i % len(nums)]
                b[t.start():t.end()] = NUMBERS[v % len(NUMBERS)]
        else:
            toks = list(_TOKEN.finditer(bytes(b)))
            if not toks:
                continue
            t = toks[i % len(toks)]
            if kind == "tok_set":
                new = INTERESTING[v % len(INTERESTING)]
            elif kind == "tok_copy":
                new = toks[j % len(toks)].group()
            else:
                new = b""
            b[t.start():t.end()] = new
    return bytes(b)


# -- prototxt -> Net -> forward on zeros -------------------------------------------------------

SHIPPED = sorted(n for n in os.listdir(os.path.join(REPO, "prototxt"))
                 if n.endswith(".prototxt") and "solver" not in n)
_MAX_ELEMENTS = 4_000_000  # a mutated net may legitimately be huge; its forward pass is skipped


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzdb") / "db"
    rng = np.random.default_rng(0)
    write_dataset(path, rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8),
                  np.arange(4, dtype=np.int32) % 10)
    return str(path)


def _net_text(name: str, db: str) -> bytes:
    with open(os.path.join(REPO, "prototxt", name), "rb") as f:
        text = f.read()
    # Data layers read a 4-record dataset (no mean file); batches of 64 / 100 become 2 and the
    # deploy nets' Input batch likewise, to keep each forward pass fast.
    text = re.sub(rb'source: "[^"]*"', b'source: "' + db.encode() + b'"', text)
    text = re.sub(rb'mean_file: "[^"]*"', b"", text)
    text = re.sub(rb"shape: \{ dim: \d+", b"shape: { dim: 2", text)
    return re.sub(rb"batch_size: \d+", b"batch_size: 2", text)


_PHASES = [("TRAIN", ()), ("TEST", ()), ("TEST", ("test-on-train",)), ("TEST", ("test-on-test",))]


def _build_and_run(text: bytes, name: str, phase: str = "TEST", stages=(), run: bool = True):
    from jcaffe.net import Net

    param = prototxt.parse_net_text(text.decode("utf-8", "replace"), name)
    net = Net(param, phase, stages=list(stages), verbose=False)
    specs = net.input_specs()
    shapes = [s for s, _ in specs.values()] + [b for layer in net.layers
                                               for b in getattr(layer, "blob_shapes", [])]
    if any(int(np.prod(s, dtype=np.float64)) > _MAX_ELEMENTS for s in shapes):
        return
    # Zero weights of the right shapes (eval_shape: no filler is run); zero inputs.
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                          jax.eval_shape(net.init, jax.random.key(0)))
    inputs = {top: np.zeros(shape, dtype) for top, (shape, dtype) in specs.items()}

    def forward(p, x, k):
        return net.apply(p, x, train=phase == "TRAIN", key=k)

    # Every example traces the whole forward pass (each layer's apply on abstract zeros); the
    # LeNet family also runs it, op by op on zeros (their compiled ops are reused from one
    # example to the next; compiling the other nets' would cost seconds per example).
    jax.eval_shape(forward, params, inputs, jax.random.key(1))
    if run and name.startswith("lenet"):
        jax.block_until_ready(forward(params, inputs, jax.random.key(1)))


def _token_after(name: str, before: bytes) -> int:
    """The index (in ``mutate``'s tokenization) of the first token after ``before``."""
    text = _net_text(name, "")
    at = text.index(before) + len(before)
    return next(k for k, t in enumerate(_TOKEN.finditer(text)) if t.start() >= at)


@given(which=st.sampled_from(SHIPPED), phase=st.sampled_from(range(len(_PHASES))),
       operations=ops)
@example(  # found: an empty batch (the deploy LeNet's Input `dim: 0`) into a Convolution
    which="lenet.prototxt", phase=1,
    operations=[("tok_set", _token_after("lenet.prototxt", b"shape: { dim: "), 0, 0)],
)
@example(  # found: the same through CIFAR-10 quick's Input (its first number set to 0), TRAIN
    which="cifar10_quick.prototxt", phase=0, operations=[("num_set", 0, 0, 0)],
)
@_settings(40)
def test_fuzz_prototxt_to_forward(which, phase, operations, tiny_db):
    _count("prototxt")
    text = mutate(_net_text(which, tiny_db), operations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(_build_and_run, text, which, *_PHASES[phase], kind="prototxt")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_prototxts_build_unmutated(name, tiny_db):
    """The seeds themselves build and trace (so mutations start from working inputs)."""
    for phase in ("TEST", "TRAIN"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _build_and_run(_net_text(name, tiny_db), name, phase,
                           ("test-on-test",) if "autoencoder" in name else (), run=False)


# -- binary files of a tiny net ----------------------------------------------------------------

TINY = """
name: "tiny"
input: "data" input_shape { dim: 2 dim: 1 dim: 6 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jcaffe.net import Net

    d = tmp_path_factory.mktemp("fuzzbin")
    net = Net(prototxt.parse_net_text(TINY), "TEST", verbose=False)
    params = net.init(jax.random.key(0))
    model = str(d / "tiny.caffemodel")
    caffemodel.save_caffemodel(model, net, params)
    state = str(d / "tiny.solverstate")
    caffemodel.write_solverstate(state, iter=7, learned_net=model,
                                 history=[np.asarray(b) for v in params.values() for b in v])
    mean = str(d / "mean.binaryproto")
    caffemodel.write_binaryproto(mean, np.arange(36, dtype=np.float32).reshape(1, 1, 6, 6))
    files = {k: open(p, "rb").read() for k, p in
             (("caffemodel", model), ("solverstate", state), ("binaryproto", mean))}
    return net, params, d, files


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _load_and_copy(net, params, path):
    blobs = caffemodel.load_caffemodel(path)
    net.copy_from(params, blobs, filename=path)


@given(operations=ops)
@_settings(60)
def test_fuzz_caffemodel(operations, tiny):
    net, params, d, files = tiny
    _count("caffemodel")
    path = _write(d / "m.caffemodel", mutate(files["caffemodel"], operations))
    _check(_load_and_copy, net, params, path, kind="caffemodel")


@given(operations=ops)
@_settings(60)
def test_fuzz_solverstate(operations, tiny):
    _, _, d, files = tiny
    _count("solverstate")
    path = _write(d / "s.solverstate", mutate(files["solverstate"], operations))
    _check(caffemodel.read_solverstate, path, kind="solverstate")


@given(operations=ops)
@_settings(60)
def test_fuzz_binaryproto(operations, tiny):
    _, _, d, files = tiny
    _count("binaryproto")
    path = _write(d / "b.binaryproto", mutate(files["binaryproto"], operations))
    _check(caffemodel.read_binaryproto, path, kind="binaryproto")
    _check(caffemodel.read_blob_proto_vector, path)


def _png():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


DATUMS = [jdatum.array_to_datum(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 5)
          .SerializeToString(),
          jdatum.array_to_datum(np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4), 2)
          .SerializeToString(),
          jdatum.encoded_datum(_png(), 1).SerializeToString()]


@given(which=st.sampled_from(range(len(DATUMS))), operations=ops, color=st.booleans())
@_settings(80)
def test_fuzz_datum(which, operations, color):
    _count("datum")
    _check(lambda: jdatum.datum_to_array(mutate(DATUMS[which], operations), "record 3 (key 'k')",
                                         force_color=color), kind="datum")


# -- dataset metadata --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzmeta") / "db"
    rng = np.random.default_rng(1)
    write_dataset(path, rng.integers(0, 256, (5, 1, 2, 3), dtype=np.uint8),
                  np.arange(5, dtype=np.int32), chunk_records=2)
    with open(path / "jcaffe_dataset.json", "rb") as f:
        return path, f.read()


def _open_and_read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with read_dataset(path) as src:
            src.read(0, src.count)


@given(operations=ops)
@_settings(60)
def test_fuzz_dataset_metadata(operations, meta_db):
    path, good = meta_db
    _count("dataset metadata")
    _write(path / "jcaffe_dataset.json", mutate(good, operations))
    try:
        _check(_open_and_read, str(path), kind="dataset metadata")
    finally:
        _write(path / "jcaffe_dataset.json", good)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
META_FIELDS = ["format", "version", "count", "shape", "dtype", "label_dtype", "chunk_records",
               "zarr_format", "source", "checksum", "created_by"]


@given(changes=st.lists(st.tuples(st.sampled_from(META_FIELDS), st.booleans(), json_values),
                        min_size=1, max_size=3))
# found: chunk_records that int() cannot take or that overflow the cache size; a checksum that
# is not an object (raised OverflowError, ValueError, AttributeError)
@example(changes=[("chunk_records", False, 1e40)])
@example(changes=[("chunk_records", False, 10**30)])
@example(changes=[("chunk_records", False, "x")])
@example(changes=[("chunk_records", False, float("nan"))])
@example(changes=[("checksum", False, "x")])
@example(changes=[("chunk_records", False, -5)])
@_settings(60)
def test_fuzz_dataset_metadata_fields(changes, meta_db):
    """Well-formed JSON with fields deleted or set to any JSON value."""
    path, good = meta_db
    _count("dataset metadata fields")
    meta = json.loads(good)
    for field, delete, value in changes:
        if delete:
            meta.pop(field, None)
        else:
            meta[field] = value
    _write(path / "jcaffe_dataset.json", json.dumps(meta).encode())
    try:
        _check(_open_and_read, str(path), kind="dataset metadata fields")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check(verify_dataset, str(path))
    finally:
        _write(path / "jcaffe_dataset.json", good)
