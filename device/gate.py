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
- a JPEG the decoder had to repair (bit errors, a damaged stream): refused as
  ``corrupt``, found by decoding it once more with libjpeg-turbo in strict mode
  at 1/8 scale (about 0.5 ms);
- DICOM that is another kind of image relabelled (see ``dicom``: SOP class,
  MR acquisition tags, lateral views).

Each limit was set against every real image here (the sample set, site_dev,
the full-resolution images and 400 training images): none is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .preprocess import ImageDecodeError, SourceInfo
from .vocab import Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateLimits:
    enabled: bool = True
    min_side: int = 128
    max_aspect: float = 2.5
    min_dynamic_range: float = 40.0
    min_smoothness: float = 0.5
    strict_jpeg: bool = True


def smoothness(small: np.ndarray) -> float:
    """Correlation of horizontally neighbouring pixels (1: smooth, 0: noise)."""
    a = small[:, :-1].astype(np.float64).ravel()
    b = small[:, 1:].astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def dynamic_range(small: np.ndarray) -> float:
    lo, hi = np.percentile(small, [1, 99])
    return float(hi - lo)


def check_source(info: SourceInfo, limits: GateLimits, name: str) -> None:
    """Size and shape, from the header: before any pixel is decoded."""
    if not limits.enabled:
        return
    short, long_ = min(info.width, info.height), max(info.width, info.height)
    if short < limits.min_side:
        raise ImageDecodeError(
            Reason.NOT_A_RADIOGRAPH,
            f"{name}: {info.width}x{info.height} is too small for a chest radiograph "
            f"(shorter side under gate.min_side = {limits.min_side} px)",
        )
    if long_ / short > limits.max_aspect:
        raise ImageDecodeError(
            Reason.NOT_A_RADIOGRAPH,
            f"{name}: {info.width}x{info.height} is a strip, not a chest radiograph "
            f"(sides {long_ / short:.1f}:1, over gate.max_aspect = {limits.max_aspect:g})",
        )


def check_jpeg_stream(data: bytes, limits: GateLimits, name: str) -> None:
    """A JPEG whose entropy-coded data is damaged decodes to bands and smears; refuse it."""
    if not (limits.enabled and limits.strict_jpeg) or data[:2] != b"\xff\xd8":
        return
    try:
        import simplejpeg
    except ImportError:  # pragma: no cover - a dependency; a broken install still scores
        log.warning("simplejpeg is not installed: damaged JPEG streams are not detected")
        return
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1, min_width=1, min_factor=8, strict=True)
    except ValueError as exc:
        raise ImageDecodeError(Reason.CORRUPT, f"{name}: corrupt JPEG data ({exc}); not scored") from None


def check_pixels(small: np.ndarray, limits: GateLimits, name: str) -> None:
    """Contrast and texture at the model's input size, before the contrast step."""
    if not limits.enabled:
        return
    rng = dynamic_range(small)
    if rng < limits.min_dynamic_range:
        raise ImageDecodeError(
            Reason.NOT_A_RADIOGRAPH,
            f"{name}: almost no contrast (grey range {rng:.0f} levels, under gate.min_dynamic_range = "
            f"{limits.min_dynamic_range:g}): not a chest radiograph",
        )
    smooth = smoothness(small)
    if smooth < limits.min_smoothness:
        raise ImageDecodeError(
            Reason.NOT_A_RADIOGRAPH,
            f"{name}: looks like noise, not a chest radiograph (neighbour correlation {smooth:.2f}, under "
            f"gate.min_smoothness = {limits.min_smoothness:g})",
        )
