"""``pneumoflag calibrate``: set a model's operating points on a site's own labelled images.

Before go-live a hospital hands over labelled local images. Their score
distribution is the one the appliance will meet, unlike the validation split
carved from the training data (this data set's test split is known to be
shifted: thresholds from validation flag four normal images in ten there).
Calibration keeps the weights and the ``.tflite`` as they are and writes a new
revision of the card: new thresholds, the data they were set on (counts per
class and a digest of the file list, never a path), the figures with bootstrap
intervals, and the previous operating points kept in ``revisions``.

Runs on the device runtime: no TensorFlow needed.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..device.card import CardError, ModelCard, Thresholds, card_path_for, sha256_file
from ..device.drift_reference import build_reference
from ..device.scorer import load_scorer
from .dataset import LABELS, load_samples, scan_folder, score_all
from .metrics import (
    FLAG_MIN_SENSITIVITY,
    MIN_PER_CLASS,
    URGENT_MIN_SPECIFICITY,
    TierError,
    choose_operating_points,
    evaluate_scores,
    format_points,
)
from .progress import Progress
from .quantize import data_record, write_card

log = logging.getLogger(__name__)


class CalibrateError(Exception):
    """Calibration cannot go on; the message says why."""


@dataclass
class CalibrateConfig:
    model: Path
    data: Path
    card: Optional[Path] = None  # default: beside the model
    out: Optional[Path] = None  # default: the card itself, as a new revision
    min_sensitivity: float = FLAG_MIN_SENSITIVITY
    urgent_min_specificity: float = URGENT_MIN_SPECIFICITY
    prevalence: Optional[float] = None  # default: the data's own
    single_tier: bool = False
    version: Optional[str] = None  # default: the minor version bumped
    workers: int = 4


def bump_version(version: str, revision: int) -> str:
    """Same weights, new operating points: a minor version step (2.0.0 -> 2.1.0)."""
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if not m:
        return f"{version}+r{revision}"
    return f"{m.group(1)}.{int(m.group(2)) + 1}.0"


def adapted_overlap(card: ModelCard, paths: Sequence[Path], inputs: Optional[np.ndarray] = None,
                    by_bytes: bool = True) -> int:
    """How many of these images trained the model's weights (``pneumoflag adapt``): by their files' bytes, or,
    given ``inputs`` (the preprocessed images, in the order of ``paths``), by the model input they make, which
    finds a renamed copy, a lossless re-encode or a file with bytes added. 0 for a model that was not adapted."""
    from .dataset import file_digest, input_digest

    site = (card.raw.get("adaptation") or {}).get("site_data") or {}
    seen_bytes, by_input = set(site.get("image_digests") or []), set(site.get("input_digests") or [])
    n = 0
    for i, path in enumerate(paths):
        hit = by_bytes and file_digest(path) in seen_bytes
        if not hit and inputs is not None and by_input:
            hit = input_digest(inputs[i]) in by_input
        n += hit
    return n


def _refuse_adapted_on(card: ModelCard, paths: Sequence[Path], inputs: Optional[np.ndarray] = None,
                       by_bytes: bool = True) -> None:
    """Thresholds set on images that trained the weights would be optimistic: refuse them, by content."""
    overlap = adapted_overlap(card, paths, inputs, by_bytes)
    if overlap:
        adaptation = card.raw["adaptation"]
        raise CalibrateError(
            f"{overlap} of these {len(paths)} images trained {card.name} {card.version}'s weights "
            f"(pneumoflag adapt on {adaptation['site_data']['folder']}): thresholds set on them would be optimistic. "
            "Its operating points already come from adapt's out-of-fold scores; calibrate only on images the "
            "model has not seen, or run adapt again from the base model with all the labelled images"
        )


def calibrate(cfg: CalibrateConfig) -> dict:
    card_path = cfg.card or card_path_for(cfg.model)
    try:
        card = ModelCard.load(card_path)
        card.verify_file(cfg.model)  # a card that does not belong to the model is refused here
    except CardError as exc:
        raise CalibrateError(str(exc)) from None
    if cfg.prevalence is not None and not 0.0 < cfg.prevalence < 1.0:
        raise CalibrateError(f"--prevalence must be between 0 and 1, not {cfg.prevalence}")
    for name, v in (("--min-sensitivity", cfg.min_sensitivity), ("--urgent-min-specificity", cfg.urgent_min_specificity)):
        if not 0.0 < v <= 1.0:
            raise CalibrateError(f"{name} must be in (0, 1], not {v}")
    model_sha = sha256_file(cfg.model)

    samples = scan_folder(cfg.data, "site data folder")
    counts = np.bincount([s.label for s in samples], minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise CalibrateError(
            f"site data {cfg.data}: {', '.join(f'{LABELS[i]}={counts[i]}' for i in range(2))} images; calibration "
            f"needs at least {MIN_PER_CLASS} of each class to set thresholds worth trusting"
        )
    _refuse_adapted_on(card, [s.path for s in samples])  # by the files' bytes, before any decoding
    scorer, card = load_scorer(cfg.model, "cpu", card=card)
    ds = load_samples(samples, card.preprocessing, cfg.workers, Progress("decoding", len(samples)))
    _refuse_adapted_on(card, ds.paths, ds.x, by_bytes=False)  # and by the model input they make (a re-encoded copy)
    readable = np.bincount(ds.y, minlength=2)
    if readable.min() < MIN_PER_CLASS:
        raise CalibrateError(
            f"site data {cfg.data}: only {', '.join(f'{LABELS[i]}={readable[i]}' for i in range(2))} readable images "
            f"({len(ds.skipped)} unreadable); at least {MIN_PER_CLASS} of each class are needed"
        )
    p = score_all(scorer, ds)

    try:
        ops = choose_operating_points(ds.y, p, cfg.min_sensitivity, cfg.urgent_min_specificity, cfg.single_tier)
    except TierError as exc:
        raise CalibrateError(f"site data {cfg.data}: {exc}") from None
    kept = [s for s in samples if s.path in set(ds.paths)]
    record = {"kind": "site data (pneumoflag calibrate)", **data_record(kept, cfg.data)}
    ops["source"] = record
    prevalence = cfg.prevalence if cfg.prevalence is not None else float(ds.y.mean())
    thresholds = {"flag": ops["flag"]["threshold"], "urgent": ops["urgent"]["threshold"]}
    figures = evaluate_scores(ds.y, p, thresholds, intervals=True, prevalence=prevalence)
    figures["prevalence_source"] = "--prevalence" if cfg.prevalence is not None else "the site data's own"
    # what these images looked like, for the daemon's drift monitor: in-sample scores are this model's honest
    # scores here (calibration moves thresholds, not weights)
    reference = build_reference(ds.paths, p, ds.y, card, Thresholds(thresholds["flag"], thresholds["urgent"]),
                                prevalence, "this model's scores on the site data (calibration sets no weights)",
                                record, "pneumoflag calibrate")

    new = dict(card.raw)
    revision = card.revision + 1
    history = list(new.get("revisions") or [])
    history.append({"revision": card.revision, "version": card.version,
                    "operating_points": card.raw["operating_points"]})
    new.update(
        version=cfg.version or bump_version(card.version, revision),
        revision=revision,
        calibrated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        operating_points=ops,
        site=figures | {"source": record},
        revisions=history,
        drift_reference=reference,
    )
    out = cfg.out or card_path
    write_card(new, out)
    ModelCard.load(out).verify_file(cfg.model)
    if sha256_file(cfg.model) != model_sha:  # the model file is never touched
        raise CalibrateError(f"{cfg.model} changed during calibration")
    log.info("wrote %s: %s %s revision %d", out, new["name"], new["version"], revision)
    return {"card": new, "card_path": out, "figures": figures, "skipped": ds.skipped}


def summary(result: dict) -> str:
    card, fig = result["card"], result["figures"]
    ops = card["operating_points"]
    lines = [
        f"{card['name']} {card['version']} (revision {card['revision']}) calibrated on "
        f"{ops['source']['folder']}: NORMAL {fig['n_negative']}, PNEUMONIA {fig['n_positive']} "
        f"(file list sha256 {ops['source']['files_sha256']})",
        f"AUROC {fig['auroc']:.4f} [{fig['auroc_ci95'][0]:.4f}, {fig['auroc_ci95'][1]:.4f}]",
        "operating points (bootstrap 95% intervals; flagged share and PPV at the prevalence):",
        *format_points(fig),
    ]
    if ops["urgent"]["threshold"] is None:
        lines.append("  urgent  none: " + ops["urgent"]["note"])
    lines.append(f"wrote {result['card_path']} (the .tflite is unchanged); restart the daemon to use it")
    return "\n".join(lines)
