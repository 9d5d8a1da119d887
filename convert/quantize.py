"""``pneumoflag convert``: full-int8 TFLite with real calibration images, verified, with a model card.

Flow: load float model -> preprocessing spec -> stratified calibration set ->
int8 conversion (uint8 input: the device feeds raw pixels) -> every op must be
int8 -> Edge TPU compatibility report -> float vs int8 on the validation set
(fails when AUROC drops too much) -> operating points -> .tflite + card,
written under temporary names and renamed only when everything passed.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from ..device import __version__ as PNEUMOFLAG_VERSION
from ..device.card import CARD_SCHEMA, ModelCard, Thresholds, sha256_file
from ..device.preprocess import PreprocessSpec, to_float_input
from ..device.scorer import LoadReport, Scorer
from ..device.runtime import find_runtime, make_interpreter
from .dataset import (
    LABELS,
    DataError,
    LoadedSet,
    Sample,
    load_samples,
    require_both_classes,
    scan_folder,
    stratified_subset,
)
from .edgetpu import EdgeTpuError, check_ops, compile_edgetpu, format_report, non_int8_ops, report_dict
from .float_model import FloatModel, ModelLoadError, load_float_model
from .metrics import auroc, choose_operating_points, evaluate_scores
from .progress import Progress
from .train import check_writable, sidecar_paths

log = logging.getLogger(__name__)

DATA_CREDIT = (
    "Chest X-Ray Images (Pneumonia): Kermany, Zhang, Goldbaum et al., Guangzhou Women and "
    "Children's Medical Center; Mendeley Data v2 (2018), Cell 172(5) 2018; CC BY 4.0"
)
INTENDED_USE = (
    "Triage aid that orders the reading queue of paediatric chest radiographs (AP/PA, CR/DX) so that "
    "likely pneumonia is read first. Not a diagnostic device: it does not diagnose, rule out or replace "
    "a clinician's reading of every image."
)


class ConvertError(Exception):
    """A conversion that cannot go on or did not pass its checks."""


class QuantizationError(ConvertError):
    """A layer/op that cannot be quantized to int8."""


@dataclass
class ConvertConfig:
    model: Path
    calibration: Path
    out: Path
    validation: Optional[Path] = None
    num_calibration: int = 200
    max_auroc_drop: float = 0.01
    edgetpu: bool = False
    name: Optional[str] = None
    version: str = "1.0.0"
    equalize: Optional[bool] = None  # None: from the training sidecar, else False
    input_scale: Optional[float] = None
    min_sensitivity: float = 0.97
    min_specificity: float = 0.95
    seed: int = 0
    workers: int = 4


def _training_meta(model_path: Path) -> Optional[dict]:
    meta = sidecar_paths(model_path)["meta"] if model_path.is_file() else None
    if meta and meta.exists():
        return json.loads(meta.read_text())
    return None


def resolve_spec(fm: FloatModel, meta: Optional[dict], equalize: Optional[bool] = None,
                 input_scale: Optional[float] = None) -> PreprocessSpec:
    """As trained (the training record) unless overridden; foreign models: no equalisation, 1/255."""
    h, w, c = fm.input_shape
    base = PreprocessSpec.from_dict(meta["preprocessing"]) if meta else None
    equalize = equalize if equalize is not None else (base.equalize if base else False)
    scale = input_scale if input_scale is not None else (base.scale if base else 1.0 / 255.0)
    return PreprocessSpec(h, w, c, equalize=equalize, scale=scale)


def _validation_samples(cfg: ConvertConfig, meta: Optional[dict]) -> tuple[list[Sample], str]:
    if cfg.validation:
        return scan_folder(cfg.validation, "validation folder"), str(cfg.validation)
    if meta and meta.get("split", {}).get("val_files"):
        root = Path(meta["data"])
        samples = []
        for rel in meta["split"]["val_files"]:
            label, name = rel.split("/", 1)
            samples.append(Sample(root / label / name, LABELS.index(label)))
        missing = [s for s in samples if not s.path.exists()]
        if missing:
            raise DataError(
                f"the training run's validation split lives under {root}, but {len(missing)} of its "
                f"files are missing (e.g. {missing[0].path}); give --validation DIR"
            )
        return samples, f"patient-level validation split of {root} (seed {meta['split']['seed']})"
    raise DataError("no validation data: give --validation DIR (NORMAL/ and PNEUMONIA/ subfolders)")


def _calibration_samples(cfg: ConvertConfig, exclude: set[Path]) -> list[Sample]:
    samples = scan_folder(cfg.calibration, "calibration folder")
    kept = [s for s in samples if s.path.resolve() not in exclude]
    if len(kept) < len(samples):
        log.info("calibration: %d validation images left out of the pool", len(samples) - len(kept))
    return stratified_subset(kept or samples, cfg.num_calibration, cfg.seed)


def quantize_int8(fm: FloatModel, calib: LoadedSet, spec: PreprocessSpec) -> bytes:
    import tensorflow as tf

    x = to_float_input(calib.x, spec)

    def representative():
        for i in range(len(x)):
            yield [x[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fm.frozen_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    try:
        return converter.convert()
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted types
        text = str(exc)
        ops = sorted(set(re.findall(r"(?:op|Op)[: ]+'?([A-Za-z0-9_.]+)'?", text)))
        first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), text.strip()[:300])
        raise QuantizationError(
            "the model cannot be quantized to int8 builtins"
            + (f" (ops: {', '.join(ops)})" if ops else "")
            + f": {first[:300]}"
        ) from None


def _int8_scorer(path: Path, spec: PreprocessSpec) -> Scorer:
    rt = find_runtime()
    return Scorer(make_interpreter(path, rt), spec, LoadReport("cpu", path, f"{rt.name} {rt.version}", None))


def _priority_agreement(p_float, p_int8, th: Thresholds) -> float:
    a = [th.priority(v) for v in p_float]
    b = [th.priority(v) for v in p_int8]
    return float(np.mean([x == y for x, y in zip(a, b)])) if a else float("nan")


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"pneumoflag": PNEUMOFLAG_VERSION}
    for pkg in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "pillow", "ai-edge-litert"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def convert(cfg: ConvertConfig) -> dict:
    out = cfg.out
    if out.suffix != ".tflite":
        raise ConvertError(f"output {out} must end in .tflite")
    check_writable(out)
    name = cfg.name or out.stem
    card_path = out.with_suffix(".json")

    try:
        fm = load_float_model(cfg.model)
    except ModelLoadError as exc:
        raise ConvertError(str(exc)) from None
    meta = _training_meta(cfg.model)
    spec = resolve_spec(fm, meta, cfg.equalize, cfg.input_scale)
    log.info("model %s (%s), input %s, preprocessing %s", cfg.model, fm.kind, fm.input_shape,
             spec.to_dict()["description"])

    val_samples, val_source = _validation_samples(cfg, meta)
    exclude = {s.path.resolve() for s in val_samples}
    calib_samples = _calibration_samples(cfg, exclude)
    calib = load_samples(calib_samples, spec, cfg.workers, Progress("calibration images", len(calib_samples)))
    if len(calib) == 0:
        raise DataError(f"calibration folder {cfg.calibration}: no readable images "
                        f"({len(calib.skipped)} skipped as unreadable)")
    val = load_samples(val_samples, spec, cfg.workers, Progress("validation images", len(val_samples)))
    require_both_classes(val, "validation data")

    tflite_bytes = quantize_int8(fm, calib, spec)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(tflite_bytes)
        checks = check_ops(tmp)
        float_ops = non_int8_ops(checks)
        if float_ops:
            culprits = [c for c in float_ops if c.op not in ("QUANTIZE", "DEQUANTIZE")] or float_ops
            named = list(dict.fromkeys(f"{c.op} in layer {c.layer!r}" for c in culprits))
            raise QuantizationError(
                "cannot quantize to int8: " + "; ".join(named)
                + " has no int8 kernel and would run in float32; replace that layer"
            )
        report_text = format_report(checks)

        scorer = _int8_scorer(tmp, spec)
        prog = Progress("float vs int8", len(val))
        p_int8 = np.empty(len(val))
        for i, x in enumerate(val.x):
            p_int8[i] = scorer.score(x)
            prog(i + 1)
        p_float = fm.predict(to_float_input(val.x, spec))
        ops = choose_operating_points(val.y, p_int8, cfg.min_sensitivity, cfg.min_specificity)
        th = Thresholds(ops["flag"]["threshold"], ops["urgent"]["threshold"])
        auc_f, auc_q = auroc(val.y, p_float), auroc(val.y, p_int8)
        agreement = {
            "n": len(val),
            "priority_agreement": _priority_agreement(p_float, p_int8, th),
            "flag_agreement": float(np.mean((p_float >= th.flag) == (p_int8 >= th.flag))),
            "max_abs_diff": float(np.max(np.abs(p_float - p_int8))),
            "mean_abs_diff": float(np.mean(np.abs(p_float - p_int8))),
            "auroc_float": auc_f,
            "auroc_int8": auc_q,
            "auroc_drop": auc_f - auc_q,
            "max_auroc_drop": cfg.max_auroc_drop,
        }
        if auc_f - auc_q > cfg.max_auroc_drop:
            raise ConvertError(
                f"int8 AUROC {auc_q:.4f} is {auc_f - auc_q:.4f} below float {auc_f:.4f}, more than the allowed "
                f"{cfg.max_auroc_drop} (--max-auroc-drop); try more calibration images (--num-calibration)"
            )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    in_d, out_d = scorer.io_details
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "version": cfg.version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "not_a_diagnostic_device": True,
        "source_model": {
            "file": cfg.model.name,
            "format": fm.kind,
            "sha256": sha256_file(cfg.model) if cfg.model.is_file() else None,
            "training": (meta or {}).get("training"),
            "split": {k: v for k, v in (meta or {}).get("split", {}).items() if k != "val_files"} or None,
        },
        "architecture": {
            "summary": fm.summary,
            "parameters": fm.parameters,
            "description": (meta or {}).get("architecture", "as loaded"),
        },
        "tflite": {
            "file": out.name,
            "sha256": sha256_file(out),
            "bytes": out.stat().st_size,
            "input": {"shape": [int(v) for v in in_d["shape"]], "dtype": np.dtype(in_d["dtype"]).name,
                      "quantization": [float(in_d["quantization"][0]), int(in_d["quantization"][1])]},
            "output": {"shape": [int(v) for v in out_d["shape"]], "dtype": np.dtype(out_d["dtype"]).name,
                       "quantization": [float(out_d["quantization"][0]), int(out_d["quantization"][1])]},
        },
        "edgetpu": None,
        "preprocessing": spec.to_dict(),
        "labels": list(LABELS),
        "positive_label": "PNEUMONIA",
        "operating_points": ops,
        "validation": {
            "source": val_source,
            "int8": evaluate_scores(val.y, p_int8, th.as_dict()),
            "float": evaluate_scores(val.y, p_float, th.as_dict()),
            "skipped_files": len(val.skipped),
            "note": "validation figures are optimistic: this data set shifts between its train and test splits",
        },
        "quantization": {
            "type": "full integer (int8 internals, uint8 input and output)",
            "calibration": {"source": str(cfg.calibration), "images": len(calib), "requested": cfg.num_calibration,
                            "stratified": True, "seed": cfg.seed, "skipped_files": len(calib.skipped)},
            "agreement": agreement,
        },
        "edgetpu_compatibility": report_dict(checks),
        "data_credit": DATA_CREDIT,
        "tools": _tool_versions(),
    }
    _write_card(card, card_path)
    result = {"card": card, "card_path": card_path, "report": report_text}
    if cfg.edgetpu:
        try:
            compiled = compile_edgetpu(out)
        except EdgeTpuError as exc:
            result["edgetpu_error"] = str(exc)
            return result
        compiled["sha256"] = sha256_file(out.parent / compiled["file"])
        card["edgetpu"] = compiled
        _write_card(card, card_path)
    ModelCard.load(card_path).verify_file(out)  # the card we wrote must describe the file we wrote
    return result


def _write_card(card: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
