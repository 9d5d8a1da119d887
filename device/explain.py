"""Where the model looked: occlusion sensitivity of the int8 model, and the overlay a reader sees.

The device has no TensorFlow and may run the model on a Coral Edge TPU, so the
map is made by the deployed int8 model itself, one invoke per occluded copy
of the input (batch 1, one interpreter reused):

  1. a square ``patch`` of the model's input (24 px of 128: 3/16 of the side)
     is replaced by a blurred copy of the same region (Gaussian, sigma =
     ``patch / 2``). A blur keeps the local brightness, so the occluder
     removes structure without painting a flat grey square: on this model
     a mid-grey square reads as an opacity (48 px of the image's mean grey
     lift two normal samples from p = 0.004 to 0.45 and 0.52; the same
     squares blurred, to 0.05), and the map would show the occluder instead
     of the image;
  2. the patch slides in steps of about ``stride`` (13 px: 9 x 9 = 81
     positions, 83 invokes with the two unoccluded ones) over a grid that is
     symmetric under a left-right flip (every position has its exact mirror),
     so a flipped radiograph is occluded at the flipped positions;
  3. each position records the drop of the model's LOGIT, not its
     probability: the logit is additive evidence, while a sigmoid flattens
     every change near p = 0 or 1 (a confident case would get an empty map);
  4. drops are averaged over the patches that cover each pixel; the map keeps
     the part that supports the model's call (pneumonia: occlusion lowers the
     logit; normal: occlusion raises it), in logit units, >= 0.

Where the logit comes from (:class:`LogitSource`): a model whose int8 graph
ends at the logit gives it directly (CPU and Edge TPU; every model since
2.0.0). A model converted before that (1.0.0) ends in an int8 sigmoid whose top level (255/256) holds every confident
pneumonia case, so its output cannot show a drop; on the CPU the map reads
the int8 logit that feeds that sigmoid, from a second interpreter on the
same file that keeps its intermediate tensors. Where neither is possible (a
sigmoid model on the Edge TPU) the quantized probability is used and a
saturated case says so instead of drawing an empty map as if it meant
something.

Why 24 px every 13: an 83-invoke map fits the budget (200 ms p50 on a
2-core x86 CPU at about 1.3 ms an invoke of the two-member 2.1.0: 105 ms),
and a drop caused by a 24 px patch is several int8 logit steps (0.069
logit each on 2.1.0), so rounding does not draw the map; 16 px every 8 px
(227 invokes) is finer but over budget.

This is an aid to see what drives the score, not a segmentation: occlusion
finds what the model needs, at the patch's resolution, and misses evidence
the model has twice (two lungs): hiding one copy leaves the other.

Not thread-safe: a map drives the scorer's interpreter (or its tap), so call
it from the thread that owns the scorer, or give it a scorer of its own.
"""
from __future__ import annotations

import io
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .card import Thresholds
from .config import ExplainConfig
from .dicom import is_dicom
from .preprocess import PreprocessSpec, decode, prepare, preprocess
from .reader import read_file
from .scorer import Scorer
from .vocab import COLORMAPS

if TYPE_CHECKING:  # the pipeline may import this module to explain what it scores
    from .pipeline import Pipeline

log = logging.getLogger(__name__)

#: Drawn on every overlay: the map explains a triage score, it does not diagnose.
NOTICE = "not for diagnostic use"
#: Defaults as shares of the input side: 24 px patches every 13 px on a 128 px input.
DEFAULT_PATCH_FRACTION = 3 / 16
DEFAULT_STRIDE_FRACTION = 13 / 128
TARGETS = ("pneumonia", "normal")

# --------------------------------------------------------------------------- colour maps

#: matplotlib's perceptually uniform maps (van der Walt & Smith, CC0), 33 control colours each
#: (every 8th of the 256 entries); linear interpolation rebuilds the 256-entry LUT within 2/255.
_CONTROL = {
    "viridis": "440154470d6048186a482374472d7b4537814240863e49893b528b375b8d33638d2f6b8e2c728e297a8e26828e23898e"
               "21918c1f978b1f9f8821a68527ad8131b57b3dbc744cc26c5cc8636ece5881d34d95d840aadc32c0df25d5e21aeae51a"
               "fde725",
    "magma": "0000040303120a0822130d341d114729115a36106b440f7651127c5d177f6a1c81762181832681902a819c2e7faa337d"
             "b73779c23b75cf4070db476ae55064ee5b5ef4695cf9785dfb8761fd9668fea571feb47bfec287fed194fde0a1fceeb0"
             "fcfdbf",
    "inferno": "0000040403120b0724150b37210c4a2f0a5b3d09654a0c6b57106e64156e71196e7d1e6d8a226a972766a32c61b0315b"
               "bc3754c63d4dd04545da4e3ce35933eb6429f1711ff67e14f98c0afb9b06fcaa0ffbba1ff9c932f5d949f2e865f3f586"
               "fcffa4",
}
assert set(_CONTROL) == set(COLORMAPS), "device/vocab.py lists the colour maps"


def colormap_lut(name: str = ExplainConfig().cmap) -> np.ndarray:
    """The 256 x 3 uint8 lookup table of a perceptual colour map (no matplotlib on the device)."""
    try:
        hexes = _CONTROL[name]
    except KeyError:
        raise ValueError(f"colour map must be one of {', '.join(COLORMAPS)}, not {name!r}") from None
    ctrl = np.frombuffer(bytes.fromhex(hexes), np.uint8).reshape(-1, 3).astype(np.float64)
    at = np.round(np.linspace(0, 255, len(ctrl)))
    x = np.arange(256)
    lut = np.stack([np.interp(x, at, ctrl[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


# --------------------------------------------------------------------------- the grid and the occluder


def grid_positions(size: int, patch: int, stride: int) -> np.ndarray:
    """Top-left offsets along one axis: first at 0, last at ``size - patch``, steps of about ``stride``.

    The steps are spread evenly (numpy's round-half-even is odd-symmetric), so
    offset ``o`` is present exactly when ``size - patch - o`` is: a flipped image
    is occluded at the flipped positions, and every pixel is covered.
    """
    if not 1 <= patch <= size:
        raise ValueError(f"patch {patch} must be between 1 and the input size {size}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    span = size - patch
    steps = max(1, math.ceil(span / stride)) if span else 0
    return np.unique(np.round(np.linspace(0, span, steps + 1)).astype(int))


def blurred(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian-blurred copy (standard deviation ``sigma`` px) of an (H, W, C) uint8 image: the occluder.

    Pillow's blur (edges extended) is exactly flip-equivariant, and it stays off
    BLAS: a multithreaded matrix product would spin threads that slow the
    interpreter's invokes that follow.
    """
    out = np.empty_like(pixels)
    for c in range(pixels.shape[2]):
        img = Image.fromarray(np.ascontiguousarray(pixels[:, :, c]), "L")
        out[:, :, c] = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)))
    return out


# --------------------------------------------------------------------------- the score the map measures


@dataclass
class _Tap:
    """A second CPU interpreter on the model file that keeps the int8 logit before the final sigmoid."""

    interp: object
    input_index: int
    logit_index: int
    output_index: int
    scale: float
    zero_point: int


class LogitSource:
    """The int8 model's pre-sigmoid score for one image: what occlusion measures.

    ``kind`` is ``logit`` (the model's output is its logit), ``tap`` (the int8
    logit that feeds the final sigmoid, read on the CPU from a second
    interpreter that keeps intermediate tensors: about 1.5 MB more) or
    ``probability`` (the quantized output, mapped to a logit; blind where it
    saturates).
    """

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.kind = "logit" if scorer.output_kind == "logit" else "probability"
        out = scorer.io_details[1]
        self._p_step = float(out.get("quantization", (0.0, 0))[0]) or 0.0
        self._tap = self._open_tap() if self.kind == "probability" else None
        if self._tap is not None:
            self.kind = "tap"
        elif self.kind == "probability":
            log.warning("heat maps use the model's quantized probability: confident cases saturate "
                        "it and get no map (a model converted with a logit output avoids this)")

    def _open_tap(self) -> Optional[_Tap]:
        """A CPU interpreter on the same file that exposes the input of the final LOGISTIC op."""
        sc = self.scorer
        if sc.report.accelerator != "cpu":
            return None
        try:
            with warnings.catch_warnings():  # "for debugging": here it is the point, and costs ~1.5 MB
                warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
                interp = type(sc.interp)(model_path=str(sc.report.model_file), experimental_preserve_all_tensors=True)
            interp.allocate_tensors()
            ops = interp._get_ops_details()
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            log.info("no logit tap on %s: %s", sc.report.model_file, exc)
            return None
        # the graph's own ops (a delegate adds DELEGATE nodes that list the same tensors)
        producer = {int(t): op for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]}
        output = tensor = int(interp.get_output_details()[0]["index"])
        while tensor in producer and producer[tensor]["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            tensor = int(producer[tensor]["inputs"][0])
        op = producer.get(tensor)
        if op is None or op["op_name"] != "LOGISTIC":
            log.info("no logit tap on %s: its output is not made by a sigmoid", sc.report.model_file)
            return None
        logit = int(op["inputs"][0])
        detail = next(d for d in interp.get_tensor_details() if int(d["index"]) == logit)
        scale, zp = detail.get("quantization", (0.0, 0))
        return _Tap(interp, int(interp.get_input_details()[0]["index"]), logit, output, float(scale), int(zp))

    def __call__(self, pixels: np.ndarray) -> float:
        tap = self._tap
        if tap is not None:
            tap.interp.set_tensor(tap.input_index, self.scorer.input_tensor(pixels))
            tap.interp.invoke()
            q = tap.interp.get_tensor(tap.logit_index).reshape(-1)[0]
            return float((int(q) - tap.zero_point) * tap.scale) if tap.scale else float(q)
        value = self.scorer.raw(pixels)[1]
        if self.kind == "logit":
            return value
        half = 0.5 * self._p_step if self._p_step else 1e-6
        p = min(max(value, half), 1.0 - half)
        return math.log(p / (1.0 - p))

    def base(self, pixels: np.ndarray) -> tuple[float, float]:
        """(logit, probability) of the unoccluded input; the probability is the scorer's own.

        With a tap, its model output must be the scorer's: a file replaced since
        the scorer loaded it would otherwise be explained in its place.
        """
        z = self(pixels)
        p = self.scorer.score(pixels)
        tap = self._tap
        if tap is not None:
            q = tap.interp.get_tensor(tap.output_index).reshape(-1)[0]
            scale, zp = self.scorer.io_details[1].get("quantization", (0.0, 0))
            mine = float((int(q) - int(zp)) * float(scale)) if scale else float(q)
            if mine != p:
                raise RuntimeError(f"the logit tap on {self.scorer.report.model_file} gives p = {mine}, the "
                                   f"scorer {p}: the file changed since it was loaded; reload the model")
        return z, p

    def saturated(self, pixels: np.ndarray) -> bool:
        """True when a quantized probability sits at its lowest or highest level."""
        if self.kind != "probability":
            return False
        level = self.scorer.raw(pixels)[0]
        dtype = np.dtype(self.scorer.io_details[1]["dtype"])
        if dtype.kind not in "iu":
            return False
        info = np.iinfo(dtype)
        return int(level) in (info.min, info.max)


_SOURCES: "weakref.WeakKeyDictionary[Scorer, LogitSource]" = weakref.WeakKeyDictionary()


def logit_source(scorer: Scorer) -> LogitSource:
    """The scorer's :class:`LogitSource`, built once (the tap's interpreter is reused)."""
    src = _SOURCES.get(scorer)
    if src is None:
        src = _SOURCES[scorer] = LogitSource(scorer)
    return src


# --------------------------------------------------------------------------- the map


@dataclass
class HeatMap:
    """An occlusion map at the model's input resolution, and how it was made."""

    values: np.ndarray  # float32 (H, W) >= 0: logit units of evidence for ``target``
    target: str  # "pneumonia" or "normal": the call the map supports
    probability: float  # the model's probability for the unoccluded input
    logit: float  # the score the drops are measured on
    patch: int
    stride: int
    invokes: int
    elapsed_ms: float
    source: str  # LogitSource.kind
    saturated: bool = False  # the quantized probability could not move: the map is empty for that reason
    drops: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32), repr=False)

    @property
    def informative(self) -> bool:
        return bool(self.values.size and float(self.values.max()) > 0.0)

    def normalized(self) -> np.ndarray:
        """The map scaled to [0, 1] by its maximum (for display; zeros when empty)."""
        peak = float(self.values.max()) if self.values.size else 0.0
        return (self.values / peak).astype(np.float32) if peak > 0 else np.zeros_like(self.values)


def reference_view(spec: PreprocessSpec) -> int:
    """The channel whose view the map is drawn in: the one that keeps the most of the radiograph (least crop)."""
    crops = [c for _, c in spec.view_list()]
    return crops.index(min(crops)) if len(crops) == spec.channels else 0


def view_spans(spec: PreprocessSpec, start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Where a patch spanning ``[start, stop)`` of the reference view lies in each channel (one axis).

    An ensemble may take views with different border crops (``equalize+equalize@0.12``): the same
    anatomy sits at other pixels in each, so each channel is occluded where that anatomy is.
    """
    views = spec.view_list()
    if len(views) != spec.channels or len({c for _, c in views}) == 1:
        return [(start, stop)] * spec.channels
    ref = views[reference_view(spec)][1]
    spans = []
    for _, crop in views:
        # reference pixel -> share of the source image -> this view's pixel
        a, b = ((ref + (1 - 2 * ref) * v / size - crop) / (1 - 2 * crop) * size for v in (start, stop))
        spans.append((max(0, min(size, int(round(a)))), max(0, min(size, int(round(b))))))
    return spans


def display_spec(spec: PreprocessSpec, size: int) -> PreprocessSpec:
    """The reference view alone (its contrast step and crop) at ``size`` px: what an overlay shows."""
    contrast, crop = spec.view_list()[reference_view(spec)]
    return replace(spec, height=size, width=size, channels=1, contrast=contrast, crop=crop)


def default_patch_stride(size: int) -> tuple[int, int]:
    """24 px patches every 13 px on a 128 px input; the same shares of other sizes."""
    return max(2, int(round(size * DEFAULT_PATCH_FRACTION))), max(1, int(round(size * DEFAULT_STRIDE_FRACTION)))


def occlusion_map(
    scorer: Scorer,
    pixels: np.ndarray,
    patch: Optional[int] = None,
    stride: Optional[int] = None,
    target: Optional[str] = None,
    threshold: float = 0.5,
) -> HeatMap:
    """Occlusion sensitivity of the scorer's model for one preprocessed (H, W, C) uint8 input.

    ``target`` None explains the model's call: pneumonia when the probability
    is at least ``threshold`` (give the card's flag point), else normal.
    """
    t0 = time.perf_counter()
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be a (H, W, C) uint8 array, not {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    dp, ds = default_patch_stride(min(h, w))
    patch, stride = patch or dp, stride or ds
    src = logit_source(scorer)
    z0, probability = src.base(pixels)
    if target is None:
        target = "pneumonia" if probability >= threshold else "normal"
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    fill = blurred(pixels, patch / 2)
    ys, xs = grid_positions(h, patch, stride), grid_positions(w, patch, stride)
    drops = np.empty((len(ys), len(xs)), np.float32)
    work = pixels.copy()
    spec: Optional[PreprocessSpec] = getattr(scorer, "spec", None)

    def spans(start: int, size: int) -> list[tuple[int, int]]:
        if spec is None or spec.channels != pixels.shape[2]:
            return [(start, start + patch)] * pixels.shape[2]
        return view_spans(spec, start, start + patch, size)

    col_spans = [spans(int(x), w) for x in xs]
    for i, y in enumerate(ys):
        rows = spans(int(y), h)
        for j, cols in enumerate(col_spans):
            for c, ((y0, y1), (x0, x1)) in enumerate(zip(rows, cols, strict=True)):
                work[y0:y1, x0:x1, c] = fill[y0:y1, x0:x1, c]
            drops[i, j] = z0 - src(work)
            for c, ((y0, y1), (x0, x1)) in enumerate(zip(rows, cols, strict=True)):
                work[y0:y1, x0:x1, c] = pixels[y0:y1, x0:x1, c]
    sign = 1.0 if target == "pneumonia" else -1.0
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            total[y : y + patch, x : x + patch] += drops[i, j]
            count[y : y + patch, x : x + patch] += 1.0
    values = np.maximum(sign * total / count, 0.0).astype(np.float32)
    saturated = bool(src.kind == "probability" and not np.any(drops) and src.saturated(pixels))
    return HeatMap(values, target, float(probability), float(z0), int(patch), int(stride),
                   int(drops.size) + 2, (time.perf_counter() - t0) * 1000.0, src.kind, saturated, drops)


# --------------------------------------------------------------------------- the overlay

_PRIORITY_COLOUR = {"urgent": (255, 80, 80), "flag": (255, 176, 64), "routine": (150, 220, 150)}
_BAND = (16, 16, 16)
_TEXT = (255, 255, 255)


def pillow_font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font (no download) at ``px`` pixels."""
    try:
        return ImageFont.load_default(px)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The overlay's font, scaled with the overlay."""
    return pillow_font(max(10, size // 28))


def band_height(size: int) -> int:
    return max(14, size // 18)


def notice_box(size: int) -> tuple[int, int, int, int]:
    """Where the notice band sits on a ``size`` px overlay: (left, top, right, bottom)."""
    return (0, size - band_height(size), size, size)


def notice_band(size: int, text: str = NOTICE) -> Image.Image:
    """The bottom band with the notice, as :func:`render_overlay` draws it."""
    x0, y0, x1, y1 = notice_box(size)
    band = Image.new("RGB", (x1 - x0, y1 - y0), _BAND)
    d = ImageDraw.Draw(band)
    font = _font(size)
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    d.text(((band.width - (right - left)) // 2 - left, (band.height - (bottom - top)) // 2 - top), text,
           fill=_TEXT, font=font)
    return band


def _blend(gray: np.ndarray, heat: HeatMap, size: int, lut: np.ndarray) -> Image.Image:
    """The radiograph at ``size`` px with the map laid over it, its alpha growing with the heat."""
    g = np.asarray(gray)
    if g.ndim == 3:
        g = g[:, :, 0]
    base = np.asarray(Image.fromarray(np.ascontiguousarray(g.astype(np.uint8)), "L")
                      .resize((size, size), Image.Resampling.LANCZOS), np.float32)
    # display only: soften the steps of the patch grid (a Gaussian of half a stride), then rescale
    n = max(heat.values.shape) if heat.values.size else size
    h8 = Image.fromarray(np.round(heat.normalized() * 255).astype(np.uint8), "L")
    h8 = h8.resize((size, size), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(heat.stride * size / n / 2))
    h = np.asarray(h8, np.float32)
    h = h / h.max() if h.max() > 0 else h
    colour = lut.astype(np.float32)[np.round(h * 255).astype(np.uint8)]
    alpha = (0.7 * h)[:, :, None]  # cold is clear: the radiograph shows through
    rgb = base[:, :, None] * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def _draw_header(d: ImageDraw.ImageDraw, heat: HeatMap, probability: float, priority: str, size: int,
                 font) -> None:
    """Top band: probability, priority (in its colour) and what the heat shows."""
    bh = band_height(size)
    d.rectangle((0, 0, size, bh), fill=_BAND)
    pad = max(3, bh // 5)
    if heat.informative:
        what = f"heat: evidence for {heat.target}"
    elif heat.saturated:
        what = "no map: model output saturated"
    else:
        what = f"no region supports {heat.target}"
    _, t, _, b = d.textbbox((0, 0), "Ag", font=font)
    ty = (bh - (b - t)) // 2 - t
    head = f"p = {probability:.4f}  "
    d.text((pad, ty), head, fill=_TEXT, font=font)
    x = pad + d.textlength(head, font=font)
    d.text((x, ty), priority.upper(), fill=_PRIORITY_COLOUR.get(priority, _TEXT), font=font)
    x += d.textlength(priority.upper() + "  ", font=font)
    d.text((x, ty), what, fill=_TEXT, font=font)


def _draw_colour_bar(img: Image.Image, d: ImageDraw.ImageDraw, lut: np.ndarray, size: int, font) -> None:
    """The legend: the colour map as a vertical bar on the right edge, high at the top."""
    bh = band_height(size)
    pad = max(3, bh // 5)
    bw = max(8, size // 40)
    top, bottom = bh + 2 * pad + bh, size - bh - 2 * pad - bh
    x1 = size - pad
    x0 = x1 - bw
    ramp = lut[np.linspace(255, 0, bottom - top).round().astype(int)]
    img.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp[:, None, :], bw, axis=1)), "RGB"), (x0, top))
    d.rectangle((x0 - 1, top - 1, x1, bottom), outline=_TEXT)
    _, t, _, b = d.textbbox((0, 0), "Ag", font=font)
    for label, y in (("high", top - bh), ("low", bottom + 2)):
        lw = d.textlength(label, font=font)
        d.rectangle((x1 - lw - 4, y, x1, y + bh - 2), fill=_BAND)
        d.text((x1 - lw - 2, y + (bh - 2 - (b - t)) // 2 - t), label, fill=_TEXT, font=font)


def render_overlay(
    gray: np.ndarray,
    heat: HeatMap,
    probability: float,
    priority: str,
    size: int = ExplainConfig().size,
    cmap: str = ExplainConfig().cmap,
) -> bytes:
    """A ``size`` x ``size`` PNG: the radiograph, the map in a perceptual colour map, a colour bar,
    probability, priority and the notice.

    ``gray`` is the radiograph in the model's geometry (any resolution: the
    model's input, or a sharper copy made the same way); the map is stretched
    over it. Cold parts of the map are transparent, so the image stays readable.
    """
    if not 256 <= size <= 1024:
        raise ValueError(f"overlay size must be 256..1024 px, not {size}")
    lut = colormap_lut(cmap)
    img = _blend(gray, heat, size, lut)
    d = ImageDraw.Draw(img)
    font = _font(size)
    _draw_header(d, heat, probability, priority, size, font)
    _draw_colour_bar(img, d, lut, size, font)
    img.paste(notice_band(size), notice_box(size)[:2])
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=3)  # 12 ms at 384 px; optimize=True takes 150 ms for 7% less
    return buf.getvalue()


# --------------------------------------------------------------------------- files and figures


@dataclass
class Explanation:
    """One radiograph explained: the overlay PNG, the map behind it and the model input it was made on."""

    png: bytes
    heat: HeatMap
    priority: str
    pixels: np.ndarray = field(repr=False)


def display_gray(gray: np.ndarray, spec: PreprocessSpec, size: int) -> np.ndarray:
    """A sharper copy of the model's (reference) view: the same crop, squash and contrast step at ``size`` px."""
    return prepare(gray, display_spec(spec, size))[:, :, 0]


def explain_pixels(
    scorer: Scorer,
    pixels: np.ndarray,
    thresholds: Thresholds,
    display: Optional[np.ndarray] = None,
    size: int = ExplainConfig().size,
    cmap: str = ExplainConfig().cmap,
    patch: Optional[int] = None,
    stride: Optional[int] = None,
) -> Explanation:
    """Map and overlay for a preprocessed input (what the daemon holds after scoring).

    The map explains the card's call: pneumonia evidence when the image is
    flagged, normal evidence when it is routine. ``display`` is a sharper
    copy of the same view (:func:`display_gray`); without it the overlay shows
    the model's input itself.
    """
    heat = occlusion_map(scorer, pixels, patch, stride, threshold=thresholds.flag)
    priority = thresholds.priority(heat.probability)
    if display is None:
        ref = reference_view(scorer.spec)
        display = pixels[:, :, ref]
    png = render_overlay(display, heat, heat.probability, priority, size, cmap)
    return Explanation(png, heat, priority, pixels)


def explain_file(
    pipeline: "Pipeline",
    path: Union[str, Path],
    size: int = ExplainConfig().size,
    cmap: str = ExplainConfig().cmap,
    patch: Optional[int] = None,
    stride: Optional[int] = None,
) -> Explanation:
    """Decode a file as the daemon does (:meth:`Pipeline.decode`: DICOM, the gate), then explain it.

    Raises :class:`~pneumoflag.device.preprocess.ImageDecodeError` for a file
    that cannot be scored. JPEG and PNG are decoded a second time at the
    overlay's size for a sharp picture; DICOM shows the model's input.
    """
    path = Path(path)
    data = read_file(path)
    decoded = pipeline.decode(data, str(path))
    display = None
    if not is_dicom(data[:132]):
        gray = decode(data, display_spec(pipeline.spec, size), name=str(path))
        display = display_gray(gray, pipeline.spec, size)
    return explain_pixels(pipeline.scorer, decoded.pixels, pipeline.card.thresholds, display, size, cmap,
                          patch, stride)


def bench_explain(
    scorer: Scorer,
    images: Sequence[Union[np.ndarray, str, Path]],
    repeats: int = 5,
    patch: Optional[int] = None,
    stride: Optional[int] = None,
) -> dict:
    """Time :func:`occlusion_map` (and the overlay) per image: for ``pneumoflag bench``.

    ``images`` are preprocessed (H, W, C) uint8 inputs or files. The run's first
    map is timed apart as ``first_ms``: the first map of a scorer also builds
    its logit tap. ``overlay_p50_ms`` is :func:`render_overlay` at 384 px.
    """
    inputs = [im if isinstance(im, np.ndarray) else preprocess(im, scorer.spec) for im in images]
    if not inputs:
        raise ValueError("bench_explain needs at least one image")
    t0 = time.perf_counter()
    first = occlusion_map(scorer, inputs[0], patch, stride)
    first_ms = (time.perf_counter() - t0) * 1000.0
    maps, renders = [], []
    for _ in range(max(1, repeats)):
        for px in inputs:
            heat = occlusion_map(scorer, px, patch, stride)
            maps.append(heat.elapsed_ms)
            t1 = time.perf_counter()
            render_overlay(px, heat, heat.probability, "routine")
            renders.append((time.perf_counter() - t1) * 1000.0)
    m, r = np.asarray(maps), np.asarray(renders)
    return {
        "maps": int(m.size),
        "images": len(inputs),
        "patch": first.patch,
        "stride": first.stride,
        "invokes_per_map": first.invokes,
        "source": first.source,
        "first_ms": round(first_ms, 1),
        "p50_ms": round(float(np.percentile(m, 50)), 1),
        "p95_ms": round(float(np.percentile(m, 95)), 1),
        "mean_ms": round(float(m.mean()), 1),
        "ms_per_invoke": round(float(np.median(m)) / first.invokes, 3),
        "overlay_p50_ms": round(float(np.percentile(r, 50)), 1),
    }
