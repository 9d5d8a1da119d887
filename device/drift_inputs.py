"""What an image looked like before the model saw it: a few cheap figures the drift monitor compares.

One function, :func:`describe`, computes them, on the image the one preprocessing path makes at the
model's size *before* the contrast step (histogram equalisation hides a change of exposure, gamma or
window from the model's input, not from these figures). The device's decoder calls it for every image it
scores (``Decoded.inputs``); the reference that ``calibrate`` and ``adapt`` store in the card is made by the
same decoder function (``device/drift_reference.py``), so the two cannot disagree on how a figure is made.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .gate import detail

#: the figures, in the order the card, the message and the report give them, each with its unit in words
DESCRIPTORS: dict[str, str] = {
    "grey_mean": "mean grey level before the contrast step (0-255)",
    "grey_sd": "spread (standard deviation) of the grey levels before the contrast step",
    "clipped_low": "share of pixels at 0",
    "clipped_high": "share of pixels at 255",
    "detail": "mean |Laplacian| / standard deviation (sharpness; blur lowers it)",
    "log2_short_side": "log2 of the source image's shorter side in pixels",
}
#: p is kept away from 0 and 1 by this much before its logit is taken (a float64 sigmoid saturates beyond ~36)
LOGIT_EPS = 1e-15


def logit(p: float) -> float:
    """The model's logit from its probability (the device applies the sigmoid in float; this undoes it)."""
    p = min(max(float(p), LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class InputSignature:
    """The figures of one image (see :data:`DESCRIPTORS`) and the equipment its DICOM header names."""

    grey_mean: float
    grey_sd: float
    clipped_low: float
    clipped_high: float
    detail: float
    log2_short_side: float
    manufacturer: Optional[str] = None
    model_name: Optional[str] = None

    def figures(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in DESCRIPTORS}

    @property
    def equipment(self) -> Optional[str]:
        """``"ACME DR-9"``: Manufacturer and ManufacturerModelName, or None when the header named neither."""
        parts = [p for p in (self.manufacturer, self.model_name) if p]
        return " ".join(parts) if parts else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(small: np.ndarray, source_width: int, source_height: int, manufacturer: Optional[str] = None,
             model_name: Optional[str] = None) -> InputSignature:
    """The figures of ``small``: the decoded image resized to the model's size, before the contrast step."""
    a = small.astype(np.float32)
    n = a.size
    return InputSignature(
        grey_mean=round(float(a.mean()), 3),
        grey_sd=round(float(a.std()), 3),
        clipped_low=round(float(np.count_nonzero(small == 0)) / n, 5),
        clipped_high=round(float(np.count_nonzero(small == 255)) / n, 5),
        detail=round(detail(small), 5),
        log2_short_side=round(math.log2(max(1, min(source_width, source_height))), 4),
        manufacturer=_clean(manufacturer),
        model_name=_clean(model_name),
    )


def _clean(text: Optional[str]) -> Optional[str]:
    """Header text as shown: printable, at most 64 characters (a DICOM LO), None when empty."""
    if not text:
        return None
    text = "".join(c if c.isprintable() else "?" for c in str(text)).strip()[:64]
    return text or None
