"""Caffe's WindowData on the host: R-CNN window files, fg/bg sampling, warped crops.

The window file (``window_data_param.source``), read as a stream of whitespace-separated tokens
as Caffe's ``infile >>`` reads it; for each image, in order::

    # image_index            (0, 1, 2, ... in file order)
    image_path               (root_folder + image_path, as Caffe concatenates it)
    channels                 (3: WindowData decodes every image in colour, BGR)
    height
    width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows lines; inclusive pixel corners)

A window with ``overlap >= fg_threshold`` is a foreground window (its ``class_index`` must be
positive) and keeps its class as label; one with ``overlap < bg_threshold`` is a background
window, labelled 0; others are not used. Anything else in the file is a one-line ``DataError``
naming the file and line.

A batch (Caffe's ``WindowDataLayer::load_batch``): ``num_fg = int(float(batch) * fg_fraction)``
in float32, as Caffe computes it; the first ``batch - num_fg`` items are background windows,
the rest foreground, each drawn uniformly with replacement, each mirrored with probability 1/2
when ``mirror`` is set. Each item is Caffe's warp: with ``context_pad`` or ``crop_mode:
"square"`` the box is expanded about its centre (squared first in square mode) by
``crop / (crop - 2 context_pad)``, clipped to the image, and the clipped part is resized
(OpenCV INTER_LINEAR) to the size it takes in the ``crop x crop`` output, where it is placed at
the offset of the clipped-off part (``pad_h``, ``pad_w``; ``pad_w`` from the right edge when
mirrored); the rest of the output stays 0. Without either, the box itself is resized to
``crop x crop``. All of Caffe's intermediate values are float32 and rounded half away from
zero. Pixel values become ``(pixel - mean) * scale``: ``mean_file`` indexed at
``(c, h + off + pad_h, w + off + pad_w)`` with ``off = (mean_width - crop) / 2``, or one
``mean_value`` per channel.

Randomness: batch at stream position ``p`` draws from a numpy generator seeded ``(seed, 3, p)``,
so a batch is a function of the seed and its position (resume by ``seek``), like the other
readers. Sampling is with replacement: ``shuffled`` is True, so the feeders never cut this
stream on the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from jcaffe import log
from jcaffe.data.image import read_image_file, resize_linear
from jcaffe.data.readers import BatchReader, ReaderOwner, root_path
from jcaffe.errors import DataError

_log = log.get_logger("data")

CHANNELS = 3  # Caffe's WindowData reads every image with CV_LOAD_IMAGE_COLOR


class Window(NamedTuple):
    image: int  # index into WindowFile.images
    label: int  # class for foreground windows, 0 for background
    overlap: float
    x1: int
    y1: int
    x2: int
    y2: int
    line: int  # line of the window file, for messages


class WindowImage(NamedTuple):
    path: str
    channels: int
    height: int
    width: int
    line: int


def _tokens(text: str):
    for no, line in enumerate(text.splitlines(), 1):
        for tok in line.split():
            yield tok, no


class _Cursor:
    """The window file's tokens, read one at a time with the line each stands on."""

    def __init__(self, text: str, error):
        self._toks = _tokens(text)
        self._last_line = max(1, len(text.splitlines()))
        self.error = error

    def next(self) -> tuple[str, int] | None:
        return next(self._toks, None)

    def take(self, what: str) -> tuple[str, int]:
        got = self.next()
        if got is None:
            raise self.error(self._last_line, f"file ends where {what} was expected")
        return got

    def integer(self, what: str) -> tuple[int, int]:
        tok, no = self.take(what)
        try:
            return int(tok), no
        except ValueError:
            raise self.error(no, f"{what} must be an integer, got {tok!r}") from None


class WindowFile:
    """A parsed window file: ``images``, ``fg`` and ``bg`` windows (see the module doc)."""

    def __init__(self, path: str, *, fg_threshold: float, bg_threshold: float,
                 root_folder: str = "", where: str = ""):
        self.path = path
        self.where = where
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise DataError(f"{where}failed to open window file '{path}': {reason}") from None
        self._fg_t, self._bg_t = np.float32(fg_threshold), np.float32(bg_threshold)
        self.images: list[WindowImage] = []
        self.fg: list[Window] = []
        self.bg: list[Window] = []
        self.dropped = 0
        cur = _Cursor(text, self._error)
        while True:
            got = cur.next()
            if got is None:
                break
            tok, no = got
            if tok != "#":
                raise self._error(no, f"expected '#' starting an image entry, got {tok!r}")
            index = self._image(cur, root_folder)
            count, cno = cur.integer("num_windows")
            if count < 0:
                raise self._error(cno, f"num_windows is {count}")
            for _ in range(count):
                self._window(cur, index)
        self._check_and_log()

    def _image(self, cur: _Cursor, root_folder: str) -> int:
        """``# index path channels height width``: appends the image, returns its index."""
        index, no = cur.integer("the image index after '#'")
        if index != len(self.images):
            raise self._error(no, f"image index {index}: images must be numbered 0, 1, 2, "
                                  f"... in file order (expected {len(self.images)})")
        rel, _ = cur.take("the image path")
        channels, cno = cur.integer("channels")
        height, _ = cur.integer("height")
        width, _ = cur.integer("width")
        if channels != CHANNELS:
            raise self._error(cno, f"image '{rel}' has {channels} channels; WindowData reads "
                                   f"every image in colour ({CHANNELS} channels)")
        if height <= 0 or width <= 0:
            raise self._error(cno, f"image '{rel}' has size {height}x{width}")
        self.images.append(WindowImage(root_path(root_folder, rel), channels, height, width, no))
        return index

    def _window(self, cur: _Cursor, index: int) -> None:
        """``class_index overlap x1 y1 x2 y2``: a foreground window (overlap >= fg_threshold),
        a background one (overlap < bg_threshold) or, between the two, dropped."""
        label, wno = cur.integer("a window's class_index")
        otok, ono = cur.take("a window's overlap")
        try:
            overlap = np.float32(float(otok))
        except ValueError:
            raise self._error(ono, f"overlap must be a number, got {otok!r}") from None
        x1, _ = cur.integer("x1")
        y1, _ = cur.integer("y1")
        x2, _ = cur.integer("x2")
        y2, eno = cur.integer("y2")
        if x2 < x1 or y2 < y1 or x1 < 0 or y1 < 0:
            raise self._error(eno, f"window [{x1}, {y1}, {x2}, {y2}] is not a box "
                                   f"(need 0 <= x1 <= x2, 0 <= y1 <= y2)")
        if overlap >= self._fg_t:
            if label <= 0:
                raise self._error(wno, f"foreground window (overlap {float(overlap):g} "
                                       f">= fg_threshold) has class {label}; classes "
                                       f"of foreground windows start at 1")
            self.fg.append(Window(index, label, float(overlap), x1, y1, x2, y2, wno))
        elif overlap < self._bg_t:
            self.bg.append(Window(index, 0, 0.0, x1, y1, x2, y2, wno))
        else:
            self.dropped += 1

    def _check_and_log(self) -> None:
        where, path = self.where, self.path
        if not self.images:
            raise DataError(f"{where}window file '{path}' is empty")
        if not self.fg or not self.bg:
            which = "foreground (overlap >= fg_threshold)" if not self.fg else \
                "background (overlap < bg_threshold)"
            raise DataError(f"{where}window file '{path}' has no {which} windows; Caffe's "
                            f"WindowData needs both")
        _log.info("Number of images: %d", len(self.images))
        hist: dict[int, int] = {0: len(self.bg)}
        for w in self.fg:
            hist[w.label] = hist.get(w.label, 0) + 1
        for label in sorted(hist):
            _log.info("class %d has %d samples", label, hist[label])

    def _error(self, line: int, message: str) -> DataError:
        return DataError(f"{self.where}{self.path}:{line}: {message}")


# ---------------------------------------------------------------------------------------------
# Caffe's warp geometry
# ---------------------------------------------------------------------------------------------

def _round(x) -> int:
    """C's ``round``: half away from zero."""
    x = float(x)
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


class Warp(NamedTuple):
    """Where one window goes: source box ``[x1..x2] x [y1..y2]`` (inclusive, inside the image),
    resized to ``height x width`` and placed at ``(pad_h, pad_w)`` in the crop."""

    x1: int
    y1: int
    x2: int
    y2: int
    height: int
    width: int
    pad_h: int
    pad_w: int


def warp_geometry(box: Sequence[int], image_hw: tuple[int, int], crop: int, context_pad: int,
                  square: bool, mirror: bool) -> Warp:
    """Caffe's ``load_batch`` geometry for one window (float32 arithmetic, C rounding).

    Raises ``ValueError`` when the box does not fit the image (no context, no square mode) or
    the warped region is empty.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    rows, cols = image_hw
    f32 = np.float32
    height, width, pad_h, pad_w = crop, crop, 0, 0
    if context_pad > 0 or square:
        context_scale = f32(crop) / f32(crop - 2 * context_pad)
        half_height = f32((y2 - y1 + 1) / 2.0)
        half_width = f32((x2 - x1 + 1) / 2.0)
        center_x = f32(x1) + half_width
        center_y = f32(y1) + half_height
        if square:
            if half_height > half_width:
                half_width = half_height
            else:
                half_height = half_width
        x1 = _round(center_x - half_width * context_scale)
        x2 = _round(center_x + half_width * context_scale)
        y1 = _round(center_y - half_height * context_scale)
        y2 = _round(center_y + half_height * context_scale)
        unclipped_height = y2 - y1 + 1
        unclipped_width = x2 - x1 + 1
        pad_x1 = max(0, -x1)
        pad_y1 = max(0, -y1)
        pad_x2 = max(0, x2 - cols + 1)
        pad_y2 = max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        if x1 > x2 or y1 > y2:
            raise ValueError(f"the expanded window lies outside the {cols}x{rows} image")
        clipped_height = y2 - y1 + 1
        clipped_width = x2 - x1 + 1
        scale_x = f32(crop) / f32(unclipped_width)
        scale_y = f32(crop) / f32(unclipped_height)
        width = _round(f32(clipped_width) * scale_x)
        height = _round(f32(clipped_height) * scale_y)
        pad_x1 = _round(f32(pad_x1) * scale_x)
        pad_x2 = _round(f32(pad_x2) * scale_x)
        pad_y1 = _round(f32(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1  # the padding is mirrored too
        if pad_h + height > crop:
            height = crop - pad_h
        if pad_w + width > crop:
            width = crop - pad_w
    elif x2 >= cols or y2 >= rows:
        raise ValueError(f"window [{x1}, {y1}, {x2}, {y2}] reaches outside the {cols}x{rows} "
                         f"image")
    if height <= 0 or width <= 0:
        raise ValueError(f"the warped window is empty ({height}x{width})")
    return Warp(x1, y1, x2, y2, height, width, pad_h, pad_w)


def crop_window(img_hwc: np.ndarray, geo: Warp, mirror: bool) -> np.ndarray:
    """The warped patch ``uint8 [height, width, C]`` (mirrored left-right when asked)."""
    roi = img_hwc[geo.y1:geo.y2 + 1, geo.x1:geo.x2 + 1]
    patch = resize_linear(roi, geo.height, geo.width)
    return patch[:, ::-1] if mirror else patch


# ---------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------

class WindowSample(NamedTuple):
    window: Window
    foreground: bool
    mirror: bool


class WindowReader(BatchReader):
    """WindowData: batches of warped windows ``float32 [batch, 3, crop, crop]`` with labels.

    ``mean``: ``[C, H, W]`` float32 (mean_file, its first image), ``[C]`` (mean_value per
    channel) or None. ``count`` is the number of usable windows (fg + bg); the stream has no
    passes, batch ``p`` is drawn from ``(seed, 3, p)``.
    """

    shuffled = True

    def __init__(self, layer: ReaderOwner, seed: int | None, windows: WindowFile, *,
                 crop_size: int, context_pad: int = 0, square: bool = False,
                 mirror: bool = False, fg_fraction: float = 0.25, scale: float = 1.0,
                 mean: np.ndarray | None = None, cache_images: bool = False,
                 where: str = "", workers: int | None = None):
        self.windows = windows
        self.crop = int(crop_size)
        self.context_pad = int(context_pad)
        self.square = bool(square)
        self.mirror = bool(mirror)
        self.scale = np.float32(scale)
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.where = where
        b = int(layer.batch_size)
        # Caffe: static_cast<int>(static_cast<float>(batch_size) * fg_fraction), in float.
        self.num_fg = int(np.float32(b) * np.float32(fg_fraction))
        self._cache: dict[int, np.ndarray] | None = None
        super().__init__(layer, seed, len(windows.fg) + len(windows.bg), workers)
        self._base = self._position  # batches are drawn at base + k·batch
        if cache_images:
            images = [None] * len(windows.images)

            def decode(i: int) -> None:
                images[i] = self._decode(i)

            self.pool.run(decode, len(images))
            self._cache = dict(enumerate(images))

    def _decode(self, i: int) -> np.ndarray:
        img = self.windows.images[i]
        return read_image_file(img.path, True, where=f"{self.where}image '{img.path}' "
                                                       f"({self.windows.path}:{img.line})")

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` of the window file, ``uint8 [H, W, 3]`` BGR."""
        if self._cache is not None:
            return self._cache[i]
        return self._decode(i)

    def samples(self, position: int) -> list[WindowSample]:
        """The windows of the batch at stream ``position``: background first, then foreground
        (Caffe's order), with their mirror flags."""
        rng = np.random.default_rng([self.seed, 3, int(position)])
        out = []
        for fg, n in ((False, self.batch_size - self.num_fg), (True, self.num_fg)):
            pool = self.windows.fg if fg else self.windows.bg
            for _ in range(n):
                w = pool[int(rng.integers(len(pool)))]
                flip = bool(rng.integers(2)) if self.mirror else False
                out.append(WindowSample(w, fg, flip))
        return out

    def render(self, sample: WindowSample, img: np.ndarray | None = None) -> np.ndarray:
        """One item: the window warped into ``float32 [3, crop, crop]``, mean and scale applied."""
        w = sample.window
        if img is None:
            img = self.image(w.image)
        try:
            geo = warp_geometry((w.x1, w.y1, w.x2, w.y2), img.shape[:2], self.crop,
                                self.context_pad, self.square, sample.mirror)
        except ValueError as e:
            raise DataError(f"{self.where}{self.windows.path}:{w.line}: {e}") from None
        patch = crop_window(img, geo, sample.mirror).astype(np.float32)  # [h, w, C]
        patch = np.transpose(patch, (2, 0, 1))
        out = np.zeros((img.shape[2], self.crop, self.crop), np.float32)
        hs = slice(geo.pad_h, geo.pad_h + geo.height)
        ws = slice(geo.pad_w, geo.pad_w + geo.width)
        if self.mean is None:
            out[:, hs, ws] = patch * self.scale
        elif self.mean.ndim == 1:
            out[:, hs, ws] = (patch - self.mean[:, None, None]) * self.scale
        else:
            off = (self.mean.shape[2] - self.crop) // 2
            m = self.mean[:, geo.pad_h + off:geo.pad_h + off + geo.height,
                          geo.pad_w + off:geo.pad_w + off + geo.width]
            out[:, hs, ws] = (patch - m) * self.scale
        return out

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        out = self._render_all(self.samples(position))
        self.count_read(self.batch_size)
        return out

    def read_positions(self, positions) -> dict[str, np.ndarray]:
        """The items at stream ``positions``: position ``q`` is item ``q - s`` of the batch
        drawn at ``s = base + ((q - base) // batch)·batch`` (``base``: the first batch's
        position), so one process's share of a global batch is the items the whole batch
        would hold there."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        b = self.batch_size
        drawn: dict[int, list[WindowSample]] = {}
        picks = []
        for q in positions:
            s = self._base + ((int(q) - self._base) // b) * b
            if s not in drawn:
                drawn[s] = self.samples(s)
            picks.append(drawn[s][int(q) - s])
        out = self._render_all(picks)
        self.count_read(len(positions))
        return out

    def _render_all(self, picks: list[WindowSample]) -> dict[str, np.ndarray]:
        # Each window is decoded (unless cached) and warped on a worker, into its own slot.
        data = self.pool.empty((len(picks), CHANNELS, self.crop, self.crop), np.float32)

        def one(k: int) -> None:
            data[k] = self.render(picks[k])

        self.pool.run(one, len(picks))
        labels = np.asarray([s.window.label for s in picks], np.int32)
        return {self.tops[0]: self._cast(self.tops[0], data),
                self.tops[1]: self._cast(self.tops[1], labels)}

    def load_all(self):
        raise DataError(f"{self.where}WindowData samples windows at random; it has no fixed "
                        f"records to load whole")


__all__ = ["WindowFile", "Window", "WindowImage", "Warp", "warp_geometry", "crop_window",
           "WindowReader", "WindowSample"]
