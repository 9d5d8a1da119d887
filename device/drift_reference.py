"""The drift monitor's reference: what a model's validation images looked like, stored in its card.

``calibrate`` and ``adapt`` call :func:`build_reference` with the scores they set the operating points on,
and write the result into the card as ``drift_reference``; the daemon's monitor (``device/drift.py``)
compares what it scores with it. Every image is decoded here by the device's own decoder function
(:func:`~.decoder.decode_bytes`, with the gate at its default limits and the card's layout template), so the
input figures and the gate's refusals are the ones the device computes, image for image.

What it holds: the distribution of the model's logit (101 quantiles), the share of images expected at each
tier at the site's prevalence, the mean and spread of each input figure (``device/drift_inputs.py``), the
DICOM equipment seen, and how many images the gate refused. Which scores: the caller says
(``scores``); ``adapt`` gives its out-of-fold ones, since the shipped model's scores on its own training
images are sharper than those it gives new images.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .card import ModelCard, Thresholds
from .config import DicomConfig, GateConfig, WatchConfig
from .decoder import DecodeSettings, decode_bytes
from .drift_inputs import DESCRIPTORS, InputSignature, logit
from .gate import GateLimits
from .preprocess import ImageDecodeError
from .vocab import Reason

log = logging.getLogger(__name__)

REFERENCE_SCHEMA = "pneumoflag.drift-reference/1"
#: quantiles of the logit stored (0%, 1%, ..., 100%)
QUANTILES = 101


def reference_settings(card: ModelCard) -> DecodeSettings:
    """The device's decode with the default ``[watch]``, ``[gate]`` and ``[dicom]`` settings and the card's
    layout template: what a device with a default configuration computes."""
    watch, dicom = WatchConfig(), DicomConfig()
    options = {"include_patient_identifiers": False, "accept_modalities": dicom.accept_modalities,
               "accept_body_parts": dicom.accept_body_parts, "accept_views": dicom.accept_views,
               "max_pixels": watch.max_pixels, "max_bytes": watch.max_decode_bytes}
    return DecodeSettings(card.preprocessing, GateLimits.from_config(GateConfig(), card.layout_template),
                          watch.max_pixels, watch.max_decode_bytes, options)


def decode_signatures(paths: Sequence[Path], card: ModelCard) -> tuple[list[Optional[InputSignature]], Counter]:
    """Each image's figures as the device computes them (None: not scored), and the gate's refusals by reason
    text's first clause; an image the device would refuse for another reason (unreadable) is None, uncounted."""
    settings = reference_settings(card)
    sigs: list[Optional[InputSignature]] = []
    refused: Counter = Counter()
    for path in paths:
        try:
            sigs.append(decode_bytes(Path(path).read_bytes(), Path(path).name, settings).inputs)
        except ImageDecodeError as exc:
            sigs.append(None)
            if exc.reason == Reason.NOT_A_RADIOGRAPH:
                refused[str(exc).split(": ", 1)[-1].split(" (")[0][:80]] += 1
        except OSError as exc:
            log.warning("%s: %s (left out of the drift reference)", path, exc)
            sigs.append(None)
    return sigs, refused


def _tier_shares(y: np.ndarray, p: np.ndarray, thresholds: Thresholds, prevalence: float) -> dict[str, float]:
    """The share of images expected at or above each operating point at ``prevalence``, from each class's rate."""
    out = {}
    for tier, t in (("urgent", thresholds.urgent), ("flagged", thresholds.flag)):
        if t is None:
            out[tier] = 0.0
            continue
        pos = float((p[y == 1] >= t).mean()) if (y == 1).any() else 0.0
        neg = float((p[y == 0] >= t).mean()) if (y == 0).any() else 0.0
        out[tier] = round(prevalence * pos + (1.0 - prevalence) * neg, 5)
    return out


def figure_summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 5), "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 5),
            "p05": round(float(np.percentile(values, 5)), 5), "p95": round(float(np.percentile(values, 95)), 5)}


def build_reference(paths: Sequence[Path], probabilities: Sequence[float], labels: Sequence[int], card: ModelCard,
                    thresholds: Thresholds, prevalence: float, scores: str, data: dict, made_by: str) -> dict[str, Any]:
    """The ``drift_reference`` section of a card, from labelled images and the model's probabilities for them
    (in the order of ``paths``); ``scores`` says in words which scores they are, ``data`` is the card's record
    of the folder (counts and a digest of the file list, never a path)."""
    sigs, refused = decode_signatures(paths, card)
    return reference_from(sigs, refused, probabilities, labels, thresholds, prevalence, scores, data, made_by)


def reference_from(sigs: Sequence[Optional[InputSignature]], refused: Counter, probabilities: Sequence[float],
                   labels: Sequence[int], thresholds: Thresholds, prevalence: float, scores: str, data: dict,
                   made_by: str) -> dict[str, Any]:
    """:func:`build_reference` once the images are decoded (``sigs[i]`` None: not scored); the drift study
    calls it on images it decoded itself."""
    keep = [i for i, s in enumerate(sigs) if s is not None]
    if len(keep) < 2:
        raise ValueError(f"only {len(keep)} of {len(sigs)} images could be scored: no drift reference")
    p = np.asarray(probabilities, dtype=np.float64)[keep]
    y = np.asarray(labels)[keep]
    lg = np.array([logit(v) for v in p])
    kept = [sigs[i] for i in keep]
    equipment = Counter(s.equipment for s in kept if s.equipment)
    checked = len(keep) + sum(refused.values())
    return {
        "schema": REFERENCE_SCHEMA,
        "made_by": made_by,
        "scores": scores,
        "data": data,
        "n": len(keep),
        "logit_quantiles": [round(float(v), 4) for v in np.quantile(lg, np.linspace(0, 1, QUANTILES))],
        "logit_mean": round(float(lg.mean()), 4),
        "tiers": {"prevalence": round(float(prevalence), 5), "expected_share": _tier_shares(y, p, thresholds, prevalence),
                  "thresholds": thresholds.as_dict()},
        "inputs": {k: figure_summary(np.array([getattr(s, k) for s in kept])) for k in DESCRIPTORS},
        "equipment": {"images_with_equipment": sum(equipment.values()),
                      "seen": [{"name": k, "images": v} for k, v in sorted(equipment.items())]},
        "gate": {"checked": checked, "refused": sum(refused.values()),
                 "rate": round(sum(refused.values()) / checked, 5) if checked else 0.0, "reasons": dict(refused),
                 "limits": "the [gate] defaults"},
    }
