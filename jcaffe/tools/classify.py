"""classify: class probabilities of images with a trained model, as Caffe's
``python/classify.py`` (on :class:`jcaffe.Classifier`).

    jcaffe classify --model_def deploy.prototxt --pretrained_model weights.caffemodel \\
        [--center_only] [--images_dim H,W] [--mean_file mean.npy|mean.binaryproto] \\
        [--input_scale S] [--raw_scale 255] [--channel_swap 2,1,0] [--ext jpg] \\
        [--labels synset_words.txt] [--top_k 5] INPUT [OUTPUT.npy]

INPUT is an image file, a folder (its ``*.<ext>`` files, in name order) or a ``.npy`` array of
``N x H x W x K`` images. The probabilities (``N x classes``) are written to OUTPUT.npy when
given, and the ``top_k`` classes of each image are printed (``--top_k 0``: none), named by the
``--labels`` file's lines when given.

Differences from Caffe's script, where its defaults only fit the ImageNet CaffeNet: there is no
default model; ``--images_dim`` defaults to the net's input size; ``--channel_swap`` defaults
to ``2,1,0`` (RGB -> BGR) only for 3-channel nets, and grey (1-channel) nets read images as
grey; ``--mean_file`` defaults to none and may also be a ``.binaryproto``. ``--gpu`` / ``--cpu``
pick the JAX device.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time
from typing import Sequence

import numpy as np

from jcaffe.errors import DataError, JcaffeError


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise JcaffeError(f"--{flag}: expected comma-separated integers, got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    from jcaffe.cli import add_bool_flag

    p = argparse.ArgumentParser(prog="jcaffe classify",
                                description="Classify images with a trained model.")
    p.add_argument("input_file", metavar="INPUT", help="an image, a folder of images or a .npy")
    p.add_argument("output_file", metavar="OUTPUT.npy", nargs="?", default=None,
                   help="where to save the N x classes probabilities")
    p.add_argument("--model_def", required=True, help="the deploy net definition")
    p.add_argument("--pretrained_model", required=True, help="the trained .caffemodel")
    add_bool_flag(p, "gpu", help="run on the GPU")
    add_bool_flag(p, "cpu", help="run on the CPU")
    add_bool_flag(p, "center_only", help="the centre crop alone instead of the average over "
                                         "10 crops (corners, centre, mirrored)")
    p.add_argument("--images_dim", default="",
                   help="'height,width' the images are resized to (default: the net's input)")
    p.add_argument("--mean_file", default="", help="mean (.npy K x H x W or K, or .binaryproto)")
    p.add_argument("--input_scale", type=float, default=None,
                   help="multiply the input by this after mean subtraction")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="multiply the raw [0, 1] image by this before preprocessing")
    p.add_argument("--channel_swap", default=None,
                   help="order to permute the input channels (default 2,1,0 for 3 channels)")
    p.add_argument("--ext", default="jpg", help="image file extension when INPUT is a folder")
    p.add_argument("--labels", default="", help="class names, one per line")
    p.add_argument("--top_k", type=int, default=5, help="classes printed per image (0: none)")
    return p


def _load_inputs(path: str, ext: str, color: bool) -> tuple[list[str], list[np.ndarray]]:
    from jcaffe.classifier import load_image

    path = os.path.expanduser(path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the .npy: {e}") from None
        if arr.ndim != 4:
            raise DataError(f"{path}: expected N x H x W x K images, got shape {list(arr.shape)}")
        return [f"{path}[{i}]" for i in range(len(arr))], list(arr)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*." + ext.lstrip("."))))
        if not files:
            raise DataError(f"{path}: no *.{ext.lstrip('.')} files in the folder (see --ext)")
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"{path}: no such image file or folder")
    return files, [load_image(f, color=color) for f in files]


def _read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except OSError as e:
        raise DataError(f"{path}: cannot read the labels file: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from jcaffe.cli import parse_flags
    from jcaffe.classifier import Classifier, load_mean

    args = parse_flags(list(argv or []), _parser())
    if args.gpu and args.cpu:
        raise JcaffeError("--gpu and --cpu exclude each other")
    device = jax.devices("cpu")[0] if args.cpu else None
    if args.gpu:
        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            raise JcaffeError("--gpu: JAX sees no GPU") from None
    image_dims = _ints(args.images_dim, "images_dim") if args.images_dim else None
    if image_dims is not None and len(image_dims) != 2:
        raise JcaffeError(f"--images_dim: expected 'height,width', got '{args.images_dim}'")
    mean = load_mean(args.mean_file) if args.mean_file else None
    labels = _read_labels(args.labels) if args.labels else None
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        clf = Classifier(args.model_def, args.pretrained_model, image_dims=image_dims, mean=mean,
                         input_scale=args.input_scale, raw_scale=args.raw_scale)
        channels = clf.transformer.inputs[clf.inputs[0]][1]
        swap = args.channel_swap
        if swap is None:
            swap = "2,1,0" if channels == 3 else ""
        if swap:
            clf.transformer.set_channel_swap(clf.inputs[0], _ints(swap, "channel_swap"))
        names, inputs = _load_inputs(args.input_file, args.ext, color=channels != 1)
        print(f"Classifying {len(inputs)} inputs.", file=sys.stderr)
        start = time.time()
        predictions = clf.predict(inputs, not args.center_only)
        print(f"Done in {time.time() - start:.2f} s.", file=sys.stderr)
    if labels is not None and len(labels) < predictions.shape[1]:
        raise DataError(f"{args.labels}: {len(labels)} labels for {predictions.shape[1]} classes")
    if args.top_k > 0:
        for name, p in zip(names, predictions):
            top = np.argsort(-p, kind="stable")[:args.top_k]
            shown = ", ".join(f"{labels[c] if labels else c} ({p[c]:.4f})" for c in top)
            print(f"{name}: {shown}")
    if args.output_file:
        print(f"Saving results into {args.output_file}", file=sys.stderr)
        out = args.output_file if args.output_file.endswith(".npy") else args.output_file + ".npy"
        tmp = out[:-len(".npy")] + ".tmp.npy"
        try:
            np.save(tmp, predictions)
            os.replace(tmp, out)
        except OSError as e:
            raise DataError(f"{out}: cannot write: {e.strerror or e}") from None
    return 0

