"""``pneumoflag evaluate``: AUROC and operating-point figures of a model on a labelled folder.

A ``.tflite`` model runs through the device runtime (no TensorFlow needed);
a Keras/SavedModel model runs in TensorFlow.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..device.card import CardError, ModelCard, card_path_for
from ..device.preprocess import PreprocessSpec, to_float_input
from .dataset import LABELS, DataError, LoadedSet, load_samples, require_both_classes, scan_folder, score_all
from .metrics import choose_operating_points, evaluate_scores
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    model: Path
    data: Path
    json_out: Optional[Path] = None
    plots: Optional[Path] = None
    card: Optional[Path] = None
    accelerator: str = "cpu"
    workers: int = 4
    split: Optional[Path] = None  # a *.train.json: evaluate only its validation files
    prevalence: Optional[float] = None


def _scores_tflite(cfg: EvaluateConfig) -> tuple[LoadedSet, np.ndarray, ModelCard, str]:
    from ..device.scorer import load_scorer

    card = ModelCard.load(cfg.card or card_path_for(cfg.model))
    scorer, card = load_scorer(cfg.model, cfg.accelerator, card=card)
    ds = _load(cfg, card.preprocessing)
    return ds, score_all(scorer, ds), card, f"int8 TFLite on {scorer.report.accelerator} ({scorer.report.runtime})"


def _load(cfg: EvaluateConfig, spec: PreprocessSpec) -> LoadedSet:
    samples = scan_folder(cfg.data, "evaluation folder")
    if cfg.split:
        try:
            wanted = set(json.loads(cfg.split.read_text())["split"]["val_files"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"--split {cfg.split}: not a training record with a validation split ({exc})") from None
        samples = [s for s in samples if f"{LABELS[s.label]}/{s.path.name}" in wanted]
        if len(samples) != len(wanted):
            raise DataError(f"--split {cfg.split}: {len(wanted) - len(samples)} of its {len(wanted)} validation "
                            f"files are not under {cfg.data}")
    ds = load_samples(samples, spec, cfg.workers, Progress("decoding", len(samples)))
    require_both_classes(ds.y, f"evaluation folder {cfg.data}", len(ds.skipped))
    return ds


def _scores_float(cfg: EvaluateConfig) -> tuple[LoadedSet, np.ndarray, Optional[ModelCard], PreprocessSpec]:
    from .float_model import load_float_model
    from .quantize import _training_meta, resolve_spec

    fm = load_float_model(cfg.model)
    card = ModelCard.load(cfg.card) if cfg.card else None
    if card:
        spec = card.preprocessing
    else:
        spec = resolve_spec(fm, _training_meta(cfg.model))
    ds = _load(cfg, spec)
    p = fm.predict(to_float_input(ds.x, spec))
    return ds, p, card, spec


def evaluate(cfg: EvaluateConfig) -> dict:
    for target in (cfg.json_out, cfg.plots):
        if target is not None:
            parent = (target if target == cfg.plots else target.parent).resolve()
            probe = parent if parent.exists() else parent.parent
            if not os.access(probe, os.W_OK):
                raise CardError(f"cannot write to {parent}: permission denied")
    if cfg.model.suffix == ".tflite":
        ds, p, card, runner = _scores_tflite(cfg)
        thresholds, source = card.thresholds.as_dict(), f"model card {card.path}"
    else:
        ds, p, card, _spec = _scores_float(cfg)
        runner = "float model in TensorFlow"
        if card:
            thresholds, source = card.thresholds.as_dict(), f"model card {card.path}"
        else:
            ops = choose_operating_points(ds.y, p, single_tier=True)
            thresholds = {k: ops[k]["threshold"] for k in ("flag", "urgent")}
            source = "chosen on this data (no --card given): optimistic"
    result = evaluate_scores(ds.y, p, thresholds, intervals=True, prevalence=cfg.prevalence)
    if card is not None and card.raw.get("adaptation"):
        from .calibrate import adapted_overlap

        n_seen = adapted_overlap(card, ds.paths, ds.x)
        if n_seen:
            result["adapted_on"] = {
                "images": n_seen,
                "note": "these images trained the model's weights (pneumoflag adapt): the figures on them are "
                        "in-sample and optimistic; the card's out-of-fold figures are the honest ones"}
            log.warning("%d of these %d images trained %s %s's weights: these figures are in-sample", n_seen,
                        len(ds), card.name, card.version)
    result.update({
        "model": str(cfg.model),
        "data": str(cfg.data) + (f" (validation split of {cfg.split.name})" if cfg.split else ""),
        "runner": runner,
        "thresholds_from": source,
        "skipped_files": [[str(a), b] for a, b in ds.skipped],
    })
    if cfg.json_out:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfg.json_out.with_name(f".{cfg.json_out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, cfg.json_out)
    if cfg.plots:
        from .plots import write_plots

        result["plots"] = [str(x) for x in write_plots(cfg.plots, ds, p, result)]
    return result


def format_summary(r: dict) -> str:
    from .metrics import format_points

    lo, hi = r.get("auroc_ci95", [float("nan")] * 2)
    s95 = r.get("specificity_at_sensitivity", {})
    lines = [
        f"{r['model']} on {r['data']} ({r['runner']})",
        f"n={r['n']} (PNEUMONIA {r['n_positive']}, NORMAL {r['n_negative']})  AUROC {r['auroc']:.4f} "
        f"[{lo:.4f}, {hi:.4f}]",
        "specificity at sensitivity " + ", ".join(f"{k}: {v:.3f}" for k, v in s95.items()),
        f"thresholds from {r['thresholds_from']} (bootstrap 95% intervals)",
        *format_points(r),
        f"{'point':<8}{'thr':>8}{'sens':>8}{'spec':>8}{'ppv':>8}{'npv':>8}{'acc':>8}   tp   fp   tn   fn",
    ]
    fmt = lambda v: f"{v:8.3f}" if v is not None else f"{'n/a':>8}"  # noqa: E731
    for name, m in r["operating_points"].items():
        lines.append(
            f"{name:<8}{m['threshold']:8.4f}{fmt(m['sensitivity'])}{fmt(m['specificity'])}{fmt(m['ppv'])}"
            f"{fmt(m['npv'])}{fmt(m['accuracy'])} {m['tp']:4d} {m['fp']:4d} {m['tn']:4d} {m['fn']:4d}"
        )
    if r["skipped_files"]:
        lines.append(f"{len(r['skipped_files'])} unreadable files skipped")
    if r.get("adapted_on"):
        lines.append(f"NOT AN EVALUATION: {r['adapted_on']['images']} of these {r['n']} images trained this model's "
                     "weights (pneumoflag adapt); the figures are in-sample and optimistic, the card's out-of-fold "
                     "figures are the honest ones")
    return "\n".join(lines)
