"""Image decoding, encoding and resizing with Caffe's (OpenCV's) conventions, on Pillow and numpy.

Caffe reads images with OpenCV, so jcaffe follows OpenCV's conventions:

* Colour pixels come out in **BGR** order (``BGRA`` when an image with alpha is decoded natively).
* Three read modes, as OpenCV's ``imread``/``imdecode`` flags:
  ``color=True`` (``IMREAD_COLOR``: always 3 channels, alpha dropped, grey replicated),
  ``color=False`` (``IMREAD_GRAYSCALE``: 1 channel) and ``color=None`` (``IMREAD_UNCHANGED``, what
  Caffe's ``DecodeDatumNative`` uses: 1 channel for grey, 3 for colour, 4 with alpha).
* Colour-to-grey: JPEG files give the decoder's own luma (libjpeg's grey output, as OpenCV reads
  them); PNG files use libpng's truncating ``rgb_to_gray`` with OpenCV's 0.299 / 0.587 weights;
  other formats use OpenCV's ``cvtColor`` fixed-point weights.
* Resizing is OpenCV's ``INTER_LINEAR`` (half-pixel centres, clamped borders, 11-bit fixed-point
  weights, no antialiasing), with OpenCV's switch to area averaging for an exact 2x reduction.

JPEG files with 1 or 3 components are decoded by OpenCV itself (``cv2.imdecode`` with
``IMREAD_IGNORE_ORIENTATION``: Caffe's decoder, one call that releases the GIL for the whole
decode, about twice Pillow's rate on one core), when opencv-python-headless is installed;
everything else (and any JPEG OpenCV refuses, or one without its end marker) goes through
Pillow, which gives the same pixels for those JPEGs (both use libjpeg-turbo's default
integer DCT and upsampling). Lossy decoders (JPEG) may differ in the last bit between libjpeg
builds; PNG/BMP/PPM decode exactly.
EXIF orientation is not applied (Caffe's OpenCV 2.4 did not). Images must have 8-bit samples.
Arrays are ``uint8`` ``[H, W, C]`` (channel-last, as OpenCV's ``Mat``); ``hwc_to_chw`` converts,
``copy_chw`` stores one into a ``[C, H, W]`` batch slot.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from jcaffe.errors import DataError

# File extensions (lower case, no dot) -> Pillow format names, for encoding.
_PIL_FORMATS = {
    "png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "bmp": "BMP", "dib": "BMP",
    "ppm": "PPM", "pgm": "PPM", "pbm": "PPM", "pnm": "PPM", "tif": "TIFF", "tiff": "TIFF",
    "webp": "WEBP",
}
_RESIZE_COEF_BITS = 11
_RESIZE_COEF_SCALE = 1 << _RESIZE_COEF_BITS


def _open(data: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: cannot decode image ({len(data)} bytes): {e}") from None
    return img


def _gray_from_rgb(rgb: np.ndarray, fmt: str | None) -> np.ndarray:
    r = rgb[..., 0].astype(np.int32)
    g = rgb[..., 1].astype(np.int32)
    b = rgb[..., 2].astype(np.int32)
    if fmt == "PNG":
        # libpng's rgb_to_gray as OpenCV's PNG reader configures it (weights 0.299, 0.587 in
        # 1/32768 units, truncated; pixels that are already grey pass through).
        out = (9797 * r + 19234 * g + 3737 * b) >> 15
        out = np.where((r == g) & (r == b), r, out)
    else:
        # OpenCV cvtColor(BGR2GRAY): 14-bit fixed-point weights, rounded.
        out = (4899 * r + 9617 * g + 1868 * b + (1 << 13)) >> 14
    return out.astype(np.uint8)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame n
_CV2: Any = None


def _opencv():
    """The ``cv2`` module, or None when opencv-python-headless is not installed."""
    global _CV2
    if _CV2 is None:
        try:
            import cv2
        except ImportError:
            cv2 = False
        _CV2 = cv2
    return _CV2 or None


def jpeg_components(data: bytes) -> int | None:
    """The number of colour components of a JPEG's frame (its SOFn marker): 1 grey, 3 colour,
    4 CMYK / YCCK; None when ``data`` is not a JPEG or has no frame header."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            return data[i + 9] if i + 10 <= n else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _decode_jpeg_opencv(data: bytes, color: bool | None) -> np.ndarray | None:
    """OpenCV's decode of a 1- or 3-component JPEG (None: leave it to Pillow)."""
    cv2 = _opencv()
    if cv2 is None:
        return None
    comps = jpeg_components(data)
    if comps not in (1, 3) or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # CMYK, or truncated (OpenCV would fill the rest): Pillow decides
    if color is None:
        color = comps == 3
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if out is None or out.dtype != np.uint8:
        return None
    return out if out.ndim == 3 else out[:, :, None]


def decode_image(data: bytes, color: bool | None = True, *, where: str = "image") -> np.ndarray:
    """Decodes image bytes into ``uint8 [H, W, C]`` in OpenCV's channel order (see the module doc).

    ``color``: True = 3-channel BGR, False = 1-channel grey, None = native (1, 3 or 4 channels).
    ``where`` names the image in errors (file, record, key). Raises ``DataError``.
    """
    if data[:2] == b"\xff\xd8":
        out = _decode_jpeg_opencv(data, color)
        if out is not None:
            return out
    return decode_image_pillow(data, color, where=where)


def decode_image_pillow(data: bytes, color: bool | None = True, *,
                        where: str = "image") -> np.ndarray:
    """``decode_image`` by Pillow alone (every format; the reference for OpenCV's JPEGs)."""
    img = _open(data, where)
    fmt = img.format
    try:
        if color is False and fmt == "JPEG" and img.mode in ("RGB", "YCbCr", "L"):
            img.draft("L", img.size)  # let libjpeg emit its own luma, as OpenCV does
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: cannot decode {fmt or 'image'} data: {e}") from None
    mode = img.mode
    if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"):
        raise DataError(f"{where}: {fmt or 'image'} with pixel mode '{mode}' is not 8-bit grey "
                        "or colour (only 8-bit images are supported)")
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode == "La":
        img, mode = img.convert("LA"), "LA"

    if color is False:
        if mode == "L":
            return np.asarray(img, dtype=np.uint8)[:, :, None].copy()
        if mode == "LA":
            return np.asarray(img, dtype=np.uint8)[:, :, :1].copy()
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return _gray_from_rgb(rgb, fmt)[:, :, None]
    if color is None:
        if mode == "L":
            return np.asarray(img, dtype=np.uint8)[:, :, None].copy()
        if mode in ("LA", "RGBA"):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.uint8)
            return rgba[:, :, [2, 1, 0, 3]].copy()
    if mode != "RGB":
        img = img.convert("RGB")
    # Pillow packs the pixels as BGR itself (one pass in C, far cheaper than numpy's copy of
    # a channel-reversed view); the contiguous copy makes the array writable.
    width, height = img.size
    return np.frombuffer(img.tobytes("raw", "BGR"), np.uint8).reshape(height, width, 3).copy()


def native_channels(data: bytes, *, where: str = "image") -> int:
    """How many channels ``decode_image(data, None)`` gives (1, 3 or 4), from the header only."""
    img = _open(data, where)
    mode = img.mode
    if mode in ("1", "L"):
        return 1
    if mode in ("LA", "La", "RGBA", "PA") or (mode == "P" and "transparency" in img.info):
        return 4
    return 3


def read_image_file(path: str, color: bool | None = True, *,
                    where: str | None = None) -> np.ndarray:
    """Reads and decodes an image file (see ``decode_image``); an unreadable file raises
    ``DataError``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{where or path}: cannot read image file '{path}': "
                        f"{e.strerror or e}") from None
    return decode_image(data, color, where=where or path)


def encode_image(hwc: np.ndarray, ext: str, *, where: str = "image") -> bytes:
    """Encodes ``uint8 [H, W, C]`` (BGR / BGRA / grey, OpenCV's order) as ``ext`` ("png", ...).

    JPEG uses quality 95 (OpenCV's ``imencode`` default).
    """
    from PIL import Image

    fmt = _PIL_FORMATS.get(ext.lower().lstrip("."))
    if fmt is None:
        raise DataError(f"{where}: unknown image encoding '{ext}' "
                        f"(known: {', '.join(sorted(_PIL_FORMATS))})")
    arr = np.ascontiguousarray(hwc, dtype=np.uint8)
    c = arr.shape[2]
    if c == 1:
        img = Image.fromarray(arr[:, :, 0], "L")
    elif c == 3:
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, ::-1]), "RGB")
    elif c == 4:
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, [2, 1, 0, 3]]), "RGBA")
    else:
        raise DataError(f"{where}: cannot encode an image with {c} channels")
    if fmt == "JPEG" and img.mode == "RGBA":
        img = img.convert("RGB")
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{where}: cannot encode as {ext}: {e}") from None
    return buf.getvalue()


def _linear_taps(src: int, dst: int):
    """OpenCV INTER_LINEAR source indices and 11-bit weights along one axis."""
    scale = 1.0 / (dst / src)  # OpenCV keeps the inverse scale in double
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    low = i0 < 0
    frac[low], i0[low] = 0.0, 0
    high = i0 >= src - 1
    frac[high], i0[high] = 0.0, src - 1
    i1 = np.minimum(i0 + 1, src - 1)
    one = np.float32(1.0)
    w1 = np.rint(frac * np.float32(_RESIZE_COEF_SCALE)).astype(np.int64)
    w0 = np.rint((one - frac) * np.float32(_RESIZE_COEF_SCALE)).astype(np.int64)
    return i0, i1, w0, w1


def resize_linear(hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV ``cv::resize(src, dst, Size(width, height))`` with its default ``INTER_LINEAR``."""
    src = np.asarray(hwc, dtype=np.uint8)
    h, w = src.shape[:2]
    if (h, w) == (height, width):
        return src.copy()
    if height <= 0 or width <= 0:
        raise ValueError(f"resize target must be positive, got {height}x{width}")
    if h == 2 * height and w == 2 * width:
        # OpenCV takes the area path for an exact halving: the rounded mean of each 2x2 block.
        s = src.astype(np.int32)
        total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
        return ((total + 2) >> 2).astype(np.uint8)
    y0, y1, by0, by1 = _linear_taps(h, height)
    x0, x1, ax0, ax1 = _linear_taps(w, width)
    s = src.astype(np.int64)
    rows = s[:, x0] * ax0[None, :, None] + s[:, x1] * ax1[None, :, None]  # [h, width, C]
    out = rows[y0] * by0[:, None, None] + rows[y1] * by1[:, None, None]
    out = (out + (1 << (2 * _RESIZE_COEF_BITS - 1))) >> (2 * _RESIZE_COEF_BITS)
    return np.clip(out, 0, 255).astype(np.uint8)


def hwc_to_chw(hwc: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` -> contiguous ``[C, H, W]`` (Caffe's Datum layout; ``CVMatToDatum``)."""
    return np.ascontiguousarray(np.transpose(hwc, (2, 0, 1)))


def copy_chw(out: np.ndarray, chw: np.ndarray) -> None:
    """``out[...] = chw``: one image ``[C, H, W]`` into its slot of a batch.

    ``chw`` is usually the ``[C, H, W]`` view of a decoder's contiguous ``[H, W, C]`` array;
    then the copy is OpenCV's ``split`` (planes written in place, without the GIL, about 4x
    numpy's strided transpose for 3 channels). Anything else is numpy's copy. Same values
    either way."""
    if out.shape != chw.shape:
        raise ValueError(f"image of shape {chw.shape} does not fit a slot of shape {out.shape}")
    cv2 = _opencv()
    hwc = chw.transpose(1, 2, 0)
    c = chw.shape[0]
    if (cv2 is not None and 2 <= c <= 4 and out.dtype == chw.dtype == np.uint8
            and out.flags.c_contiguous and hwc.flags.c_contiguous):
        # split writes into the planes given when their shapes and type match (checked
        # above: each plane of a contiguous [C, H, W] slot is a contiguous [H, W] uint8).
        cv2.split(hwc, [out[k] for k in range(c)])
        return
    out[...] = chw


def pil_format_for(ext: str) -> str | None:
    """Pillow's format name for a file extension, or None when unknown."""
    return _PIL_FORMATS.get(ext.lower().lstrip("."))


__all__ = ["decode_image", "decode_image_pillow", "jpeg_components", "native_channels", "read_image_file", "encode_image", "resize_linear",
           "hwc_to_chw", "copy_chw", "pil_format_for"]
