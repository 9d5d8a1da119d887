"""Is this plausibly a chest radiograph? A gate before the model.

The model scores whatever it is given, and a CNN trained on radiographs says
"pneumonia" with confidence about a grey square, sensor noise or a strip of
pixels. The gate refuses, with the reason ``not-a-radiograph`` and the figure
that failed, what no chest radiograph looks like:

- too small or too thin: the shorter side below ``gate.min_side`` pixels, or a
  side ratio above ``gate.max_aspect`` (chest films are about 0.7-1.4);
- no contrast: the 1st-99th percentile grey range at the model's size below
  ``gate.min_dynamic_range`` levels (a blank or constant image);
- noise-like: neighbouring pixels at the model's size correlating less than
  ``gate.min_smoothness`` (radiographs are smooth at that scale: 0.91-0.99 on
  every image of this project's data; random noise is near 0);
- no detail: a gradient or a smooth blob (mean |Laplacian| over the standard
  deviation under ``gate.min_detail``; radiographs: 0.066 and up);
- mostly one grey level: a document or a screenshot (the most common level
  over ``gate.max_uniform`` of the image; radiographs: at most 0.27);
- not laid out like a chest film: the image at 32 x 32 correlates less than
  ``gate.min_template_similarity`` with the mean training radiograph that
  ``convert`` stores in the card (radiographs here: 0.33 and up; an inverted
  image is negative), or it matches that template clearly better upside down;
- a JPEG the decoder had to repair (bit errors, a damaged stream): refused as
  ``corrupt`` (``gate.strict_jpeg``), found by the one strict decode that
  :func:`~.preprocess.decode_with_info` makes anyway, so it costs nothing;
- DICOM that is another kind of image relabelled (see ``dicom``: SOP class,
  MR acquisition tags, lateral views).

Each limit was set against every real image here (the sample set, site_dev,
the full-resolution images and 1,000 training images): none is refused
(``tests/test_hardening.py`` checks the sample set, the mini set, site_dev and
the full-resolution images).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
from PIL import Image

from .config import GateConfig
from .preprocess import ImageDecodeError, SourceInfo, equalize_histogram
from .vocab import Reason



#: side of the layout template (the card stores TEMPLATE_SIDE**2 values)
TEMPLATE_SIDE = 32
#: how much better an image may match the template upside down before it counts as upside down
#: (radiographs here: at most 0.12 better, on the validation split; an upside-down film: 0.25 better)
UPSIDE_DOWN_MARGIN = 0.18


@dataclass
class GateLimits(GateConfig):
    """The ``[gate]`` limits (their defaults are :class:`~.config.GateConfig`'s) and the card's layout template."""

    template: Optional[np.ndarray] = None  # from the model card; None: no layout check

    @classmethod
    def from_config(cls, gate: GateConfig, template: Optional[np.ndarray] = None) -> GateLimits:
        """Copied by field name, so a new ``[gate]`` key reaches the gate without a second list."""
        return cls(**{f.name: getattr(gate, f.name) for f in fields(GateConfig)}, template=template)


def layout_vector(small: np.ndarray) -> np.ndarray:
    """The image as the layout check sees it: equalised, 32 x 32, zero mean."""
    eq = Image.fromarray(equalize_histogram(np.ascontiguousarray(small)), "L")
    v = np.asarray(eq.resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.Resampling.BOX), np.float64).ravel()
    return v - v.mean()


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b / d) if d > 0 else 0.0


def layout_similarity(small: np.ndarray, template: np.ndarray) -> tuple[float, float]:
    """Correlation with the template, upright and upside down."""
    v = layout_vector(small)
    t = template - template.mean()
    flipped = t.reshape(TEMPLATE_SIDE, TEMPLATE_SIDE)[::-1].ravel()
    return _correlation(v, t), _correlation(v, flipped)


def detail(small: np.ndarray) -> float:
    """Mean absolute Laplacian over the standard deviation: fine structure, whatever the contrast."""
    a = small.astype(np.int16)  # the Laplacian of uint8 fits, and integer sums are exact
    lap = np.abs(4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:])
    sd = float(small.std(dtype=np.float64))
    return float(lap.sum(dtype=np.int64) / lap.size / sd) if sd > 0 else 0.0


def uniform_share(small: np.ndarray, hist: Optional[np.ndarray] = None) -> float:
    """The share of the image taken by its most common grey level."""
    counts = np.bincount(small.ravel(), minlength=256) if hist is None else hist
    return float(counts.max() / counts.sum())


def smoothness(small: np.ndarray) -> float:
    """Correlation of horizontally neighbouring pixels (1: smooth, 0: noise)."""
    a = small[:, :-1].astype(np.float64)
    b = small[:, 1:].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    # elementwise sums, not np.dot: BLAS would start (and spin) its threads in the decoder worker
    aa, bb = float(np.square(a).sum()), float(np.square(b).sum())
    if aa == 0 or bb == 0:
        return 0.0
    return float((a * b).sum() / np.sqrt(aa * bb))


def dynamic_range(small: np.ndarray, hist: Optional[np.ndarray] = None) -> float:
    """The 1st-99th percentile grey range (``np.percentile``'s linear interpolation), read off the histogram
    instead of sorting the pixels."""
    counts = np.bincount(small.ravel(), minlength=256) if hist is None else hist
    cdf = np.cumsum(counts)
    n = int(cdf[-1])

    def order_stat(k: int) -> int:  # the k-th smallest pixel (0-based)
        return int(np.searchsorted(cdf, k, side="right"))

    def pct(q: float) -> float:
        pos = (n - 1) * q / 100.0
        k = int(np.floor(pos))
        lo, hi = order_stat(k), order_stat(min(k + 1, n - 1))
        return lo + (hi - lo) * (pos - k)

    return float(pct(99) - pct(1))


def check_source(info: SourceInfo, limits: GateLimits, name: str) -> None:
    """Size and shape, from the header: before any pixel is decoded."""
    if not limits.enabled:
        return
    short, long_ = min(info.width, info.height), max(info.width, info.height)
    if short < limits.min_side:
        raise _refused(
            f"{name}: {info.width}x{info.height} is too small for a chest radiograph "
            f"(shorter side under gate.min_side = {limits.min_side} px)",
        )
    if long_ / short > limits.max_aspect:
        raise _refused(
            f"{name}: {info.width}x{info.height} is a strip, not a chest radiograph "
            f"(sides {long_ / short:.1f}:1, over gate.max_aspect = {limits.max_aspect:g})",
        )


def _refused(message: str) -> ImageDecodeError:
    return ImageDecodeError(Reason.NOT_A_RADIOGRAPH, message)


def check_pixels(small: np.ndarray, limits: GateLimits, name: str) -> None:
    """Contrast and texture at the model's input size, before the contrast step."""
    if not limits.enabled:
        return
    hist = np.bincount(small.ravel(), minlength=256)
    rng = dynamic_range(small, hist)
    if rng < limits.min_dynamic_range:
        raise _refused(
            f"{name}: almost no contrast (grey range {rng:.0f} levels, under gate.min_dynamic_range = "
            f"{limits.min_dynamic_range:g}): not a chest radiograph",
        )
    smooth = smoothness(small)
    if smooth < limits.min_smoothness:
        raise _refused(
            f"{name}: looks like noise, not a chest radiograph (neighbour correlation {smooth:.2f}, under "
            f"gate.min_smoothness = {limits.min_smoothness:g})",
        )
    d = detail(small)
    if d < limits.min_detail:
        raise _refused(
            f"{name}: no fine structure, not a chest radiograph (detail {d:.3f}, under gate.min_detail = "
            f"{limits.min_detail:g}): a gradient or a smooth shape?",
        )
    u = uniform_share(small, hist)
    if u > limits.max_uniform:
        raise _refused(
            f"{name}: {u:.0%} of the image is one grey level (over gate.max_uniform = {limits.max_uniform:g}): "
            "a document or a screenshot, not a chest radiograph",
        )
    if limits.template is None:
        return
    upright, upside_down = layout_similarity(small, limits.template)
    if upright < limits.min_template_similarity:
        raise _refused(
            f"{name}: not laid out like a frontal chest radiograph (similarity {upright:.2f} to the training "
            f"images, under gate.min_template_similarity = {limits.min_template_similarity:g}; an inverted "
            "image is negative)",
        )
    if upside_down - upright > UPSIDE_DOWN_MARGIN:
        raise _refused(
            f"{name}: looks upside down (similarity {upright:.2f} upright, {upside_down:.2f} turned over)",
        )
