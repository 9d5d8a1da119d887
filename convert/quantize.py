"""``pneumoflag convert``: full-int8 TFLite with real calibration images, verified, with a model card.

Flow: load float model(s), cut at the logit (an ensemble averages its members'
logits) -> preprocessing spec -> stratified calibration set -> int8 conversion
(uint8 input: the device feeds raw pixels) -> every op must be int8 -> Edge TPU
compatibility report -> float vs int8 on the validation split and on a second
labelled folder (``--check-data``, site images), failing when AUROC drops too
much on either -> operating points (urgent strictly above flag) -> .tflite +
card, written under temporary names and renamed only when everything passed.

Why the logit: an int8 LOGISTIC op has 256 output levels of 1/256, and every
image above p = 0.996 shares the top one; on shifted site data most pneumonia
cases and some normals land there and their order is lost (1.0.0 lost 0.028
AUROC that way). The int8 graph ends at the logit and the device applies the
sigmoid in float.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
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
    split_fingerprint,
    stratified_subset,
)
from .edgetpu import EdgeTpuError, check_ops, compile_edgetpu, format_report, non_int8_ops, report_dict
from .float_model import FloatModel, ModelLoadError, ensemble, load_float_model, logit_model
from .metrics import (
    FLAG_MIN_SENSITIVITY,
    URGENT_MIN_SPECIFICITY,
    TierError,
    auroc,
    choose_operating_points,
    evaluate_scores,
)
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
    model: Path | list[Path]  # several: an ensemble averaging their logits
    calibration: Path
    out: Path
    validation: Optional[Path] = None
    check_data: Optional[Path] = None
    num_calibration: int = 200
    max_auroc_drop: float = 0.005
    edgetpu: bool = False
    name: Optional[str] = None
    version: str = "1.0.0"
    contrast: Optional[str] = None  # None: from the training record, else none
    input_scale: Optional[float] = None
    min_sensitivity: float = FLAG_MIN_SENSITIVITY
    min_specificity: float = URGENT_MIN_SPECIFICITY
    single_tier: bool = False
    seed: int = 0
    workers: int = 4

    @property
    def models(self) -> list[Path]:
        return list(self.model) if isinstance(self.model, (list, tuple)) else [self.model]


def _training_meta(model_path: Path) -> Optional[dict]:
    meta = sidecar_paths(model_path)["meta"] if model_path.is_file() else None
    if meta and meta.exists():
        return json.loads(meta.read_text())
    return None


def training_data_root(model_path: Path, meta: dict) -> Path:
    """The training folder a record names (relative to the model's folder; old records: absolute)."""
    root = Path(meta["data"])
    return root if root.is_absolute() else (model_path.parent / root)


def resolve_spec(fm: FloatModel, meta: Optional[dict], contrast: Optional[str] = None,
                 input_scale: Optional[float] = None) -> PreprocessSpec:
    """As trained (the training record) unless overridden; foreign models: no contrast step, 1/255."""
    h, w, c = fm.input_shape
    base = PreprocessSpec.from_dict(meta["preprocessing"]) if meta else PreprocessSpec(h, w, c, contrast="none")
    return replace(
        base, height=h, width=w, channels=c,
        contrast=contrast if contrast is not None else base.contrast,
        scale=input_scale if input_scale is not None else base.scale,
    )


def data_record(samples: list[Sample], root: Path | str) -> dict:
    """What a card says about a labelled folder: its name, counts per class and a digest of the file list.

    Never an absolute path: a card travels to other machines.
    """
    counts = {lab: sum(s.label == i for s in samples) for i, lab in enumerate(LABELS)}
    return {"folder": Path(root).name, "images": counts, "files_sha256": split_fingerprint(samples)}


def _validation_samples(cfg: ConvertConfig, meta: Optional[dict]) -> tuple[list[Sample], dict]:
    if cfg.validation:
        samples = scan_folder(cfg.validation, "validation folder")
        return samples, {"kind": "folder", **data_record(samples, cfg.validation)}
    if meta and meta.get("split", {}).get("val_files"):
        root = training_data_root(cfg.models[0], meta)
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
        return samples, {"kind": f"patient-level validation split of the training data (seed {meta['split']['seed']})",
                         **data_record(samples, root)}
    raise DataError("no validation data: give --validation DIR (NORMAL/ and PNEUMONIA/ subfolders)")


def _calibration_samples(cfg: ConvertConfig, exclude: set[Path]) -> list[Sample]:
    samples = scan_folder(cfg.calibration, "calibration folder")
    kept = [s for s in samples if s.path.resolve() not in exclude]
    if len(kept) < len(samples):
        log.info("calibration: %d validation/check images left out of the pool", len(samples) - len(kept))
    return stratified_subset(kept or samples, cfg.num_calibration, cfg.seed)


def load_float_for_convert(cfg: ConvertConfig) -> tuple[FloatModel, PreprocessSpec, Optional[dict]]:
    """The model to quantize (cut at the logit; several: one ensemble graph), its preprocessing, its record.

    Ensemble members may have been trained with different contrast steps: the
    ensemble then takes one channel per step (``equalize+clahe``) and hands
    each member its own.
    """
    try:
        models = [load_float_model(m) for m in cfg.models]
    except ModelLoadError as exc:
        raise ConvertError(str(exc)) from None
    metas = [_training_meta(m) for m in cfg.models]
    specs = [resolve_spec(fm, meta, cfg.contrast, cfg.input_scale) for fm, meta in zip(models, metas, strict=True)]
    if len(models) == 1:
        return logit_model(models[0]), specs[0], metas[0]
    first = specs[0]
    for m, sp in zip(cfg.models[1:], specs[1:], strict=True):
        if replace(sp, contrast=first.contrast, crop=first.crop) != first:
            raise ConvertError(f"ensemble member {m} takes other input than {cfg.models[0]}: "
                               f"{sp.to_dict()['description']} vs {first.to_dict()['description']}")
    # one view (channel) per distinct (contrast step, crop); a member reads its own
    def view(sp: PreprocessSpec) -> str:
        return sp.contrast if sp.crop == first.crop else f"{sp.contrast}@{sp.crop:g}"

    views = list(dict.fromkeys(view(sp) for sp in specs))
    if len(views) > 1 and first.channels != 1:
        raise ConvertError("ensemble members with different contrast steps or crops must take one channel each")
    spec = replace(first, contrast="+".join(views), channels=len(views) if len(views) > 1 else first.channels)
    member_view = [views.index(view(sp)) for sp in specs]
    try:
        fm = ensemble(models, member_view, spec.shape)
    except ModelLoadError as exc:
        raise ConvertError(str(exc)) from None
    return fm, spec, metas[0]


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


def _resized(samples: list[Sample], spec: PreprocessSpec):
    """Each readable sample at the model's size, before the contrast step (what the gate looks at)."""
    from ..device.preprocess import ImageDecodeError, decode, resize

    for s in samples:
        try:
            yield resize(decode(s.path, spec), spec)
        except ImageDecodeError:
            continue


def layout_template(samples: list[Sample], spec: PreprocessSpec) -> np.ndarray:
    """The mean radiograph of these images at 32 x 32, as the gate's layout check compares (see device/gate.py)."""
    from ..device.gate import layout_vector

    vectors = [layout_vector(small) for small in _resized(samples, spec)]
    if not vectors:
        raise DataError("no readable calibration image for the layout template")
    return np.mean(vectors, axis=0)


def _layout_stats(samples: list[Sample], spec: PreprocessSpec, template: np.ndarray) -> dict:
    from ..device.gate import layout_similarity

    sims = [layout_similarity(small, template) for small in _resized(samples, spec)]
    up = np.array([a for a, _ in sims])
    turned = np.array([b - a for a, b in sims])
    return {"n": len(sims), "similarity_min": round(float(up.min()), 3),
            "similarity_p1": round(float(np.percentile(up, 1)), 3),
            "upside_down_gain_max": round(float(turned.max()), 3)}


def _refuse_float_ops(checks: list) -> None:
    float_ops = non_int8_ops(checks)
    if float_ops:
        culprits = [c for c in float_ops if c.op not in ("QUANTIZE", "DEQUANTIZE")] or float_ops
        named = list(dict.fromkeys(f"{c.op} in layer {c.layer!r}" for c in culprits))
        raise QuantizationError(
            "cannot quantize to int8: " + "; ".join(named)
            + " has no int8 kernel and would run in float32; replace that layer"
        )


def _int8_scorer(path: Path, spec: PreprocessSpec, output_kind: str) -> Scorer:
    rt = find_runtime()
    report = LoadReport("cpu", path, f"{rt.name} {rt.version}", None)
    return Scorer(make_interpreter(path, rt), spec, report, output_kind)


def _priority_agreement(p_float, p_int8, th: Thresholds) -> float:
    a = [th.priority(v) for v in p_float]
    b = [th.priority(v) for v in p_int8]
    return float(np.mean([x == y for x, y in zip(a, b, strict=False)])) if a else float("nan")


@dataclass
class CheckSet:
    """One labelled set scored by the float and the int8 model."""

    name: str  # "validation" or "check"
    record: dict
    data: LoadedSet
    p_float: np.ndarray
    p_int8: np.ndarray
    levels: np.ndarray  # the int8 model's output as quantized levels

    def agreement(self, max_drop: float, level_range: tuple[int, int]) -> dict:
        auc_f, auc_q = auroc(self.data.y, self.p_float), auroc(self.data.y, self.p_int8)
        lo, hi = level_range
        return {
            "n": len(self.data),
            "data": self.record,
            "auroc_float": auc_f,
            "auroc_int8": auc_q,
            "auroc_drop": auc_f - auc_q,
            "max_auroc_drop": max_drop,
            "max_abs_diff": float(np.max(np.abs(self.p_float - self.p_int8))),
            "mean_abs_diff": float(np.mean(np.abs(self.p_float - self.p_int8))),
            "distinct_outputs": int(np.unique(self.levels).size),
            "share_at_lowest_level": float(np.mean(self.levels == lo)),
            "share_at_highest_level": float(np.mean(self.levels == hi)),
        }


def _score_set(name: str, record: dict, data: LoadedSet, fm: FloatModel, scorer: Scorer,
               spec: PreprocessSpec) -> CheckSet:
    prog = Progress(f"float vs int8 ({name})", len(data))
    levels = np.empty(len(data))
    p_int8 = np.empty(len(data))
    for i, x in enumerate(data.x):
        levels[i] = scorer.raw(x)[0]
        p_int8[i] = scorer.score(x)
        prog(i + 1)
    return CheckSet(name, record, data, fm.predict(to_float_input(data.x, spec)), p_int8, levels)


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

    fm, spec, meta = load_float_for_convert(cfg)
    log.info("model %s (%s, output %s), input %s, preprocessing %s", ", ".join(map(str, cfg.models)), fm.kind,
             fm.output, fm.input_shape, spec.to_dict()["description"])

    val_samples, val_record = _validation_samples(cfg, meta)
    sets = [("validation", val_record, val_samples)]
    if cfg.check_data:
        check_samples = scan_folder(cfg.check_data, "--check-data folder")
        sets.append(("check", {"kind": "--check-data folder", **data_record(check_samples, cfg.check_data)},
                     check_samples))
    exclude = {s.path.resolve() for _, _, samples in sets for s in samples}
    calib_samples = _calibration_samples(cfg, exclude)
    calib = load_samples(calib_samples, spec, cfg.workers, Progress("calibration images", len(calib_samples)))
    if len(calib) == 0:
        raise DataError(f"calibration folder {cfg.calibration}: no readable images "
                        f"({len(calib.skipped)} skipped as unreadable)")
    loaded = []
    for set_name, record, samples in sets:
        data = load_samples(samples, spec, cfg.workers, Progress(f"{set_name} images", len(samples)))
        require_both_classes(data.y, f"{set_name} data", len(data.skipped))
        loaded.append((set_name, record, data))

    tflite_bytes = quantize_int8(fm, calib, spec)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(tflite_bytes)
        checks = check_ops(tmp)
        _refuse_float_ops(checks)
        scorer = _int8_scorer(tmp, spec, fm.output)
        scored = [_score_set(n, r, d, fm, scorer, spec) for n, r, d in loaded]
        out_dtype = np.dtype(scorer.io_details[1]["dtype"])
        level_range = (int(np.iinfo(out_dtype).min), int(np.iinfo(out_dtype).max)) if out_dtype.kind in "iu" else (0, 0)
        agreement = {c.name: c.agreement(cfg.max_auroc_drop, level_range) for c in scored}
        _refuse_auroc_drop(agreement, cfg.max_auroc_drop)
        val = scored[0]
        try:
            ops = choose_operating_points(val.data.y, val.p_int8, cfg.min_sensitivity, cfg.min_specificity,
                                          cfg.single_tier)
        except TierError as exc:
            raise ConvertError(f"operating points on the validation data: {exc}") from None
        ops["source"] = {"set": "validation", **val_record}
        th = Thresholds(ops["flag"]["threshold"], ops["urgent"]["threshold"])
        agreement["validation"].update(
            priority_agreement=_priority_agreement(val.p_float, val.p_int8, th),
            flag_agreement=float(np.mean((val.p_float >= th.flag) == (val.p_int8 >= th.flag))),
        )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    card = _card(cfg, name, fm, meta, spec, scorer, out, ops, th, scored, agreement, calib, checks)
    template = layout_template(calib_samples, spec)
    card["plausibility"] = {
        "template": [round(float(v), 2) for v in template],
        "side": 32,
        "source": "the mean of the calibration images, equalised, at 32 x 32 (device/gate.py's layout check)",
        "on_data": {n: _layout_stats(smp, spec, template) for n, _, smp in sets},
    }
    write_card(card, card_path)
    result = {"card": card, "card_path": card_path, "report": format_report(checks)}
    if cfg.edgetpu:
        try:
            compiled = compile_edgetpu(out)
        except EdgeTpuError as exc:
            result["edgetpu_error"] = str(exc)
            return result
        compiled["sha256"] = sha256_file(out.parent / compiled["file"])
        card["edgetpu"] = compiled
        write_card(card, card_path)
    ModelCard.load(card_path).verify_file(out)  # the card we wrote must describe the file we wrote
    return result


def _refuse_auroc_drop(agreement: dict, max_drop: float) -> None:
    for set_name, ag in agreement.items():
        if ag["auroc_drop"] > max_drop:
            raise ConvertError(
                f"int8 AUROC {ag['auroc_int8']:.4f} on the {set_name} data is {ag['auroc_drop']:.4f} below float "
                f"{ag['auroc_float']:.4f}, more than the allowed {max_drop} (--max-auroc-drop); "
                f"{ag['distinct_outputs']} distinct outputs, {ag['share_at_highest_level']:.0%} at the highest level: "
                "try more calibration images (--num-calibration)"
            )


def _card(cfg: ConvertConfig, name: str, fm: FloatModel, meta: Optional[dict], spec: PreprocessSpec,
          scorer: Scorer, out: Path, ops: dict, th: Thresholds, scored: list[CheckSet], agreement: dict,
          calib: LoadedSet, checks: list) -> dict:
    in_d, out_d = scorer.io_details
    val = scored[0]
    sources = [
        {"file": m.name, "format": fm.kind if len(cfg.models) == 1 else "keras",
         "sha256": sha256_file(m) if m.is_file() else None}
        for m in cfg.models
    ]
    card = {
        "schema": CARD_SCHEMA,
        "name": name,
        "version": cfg.version,
        "revision": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "not_a_diagnostic_device": True,
        "source_model": {
            **sources[0],
            "members": sources if len(sources) > 1 else None,
            "training": (meta or {}).get("training"),
            "split": {k: v for k, v in (meta or {}).get("split", {}).items() if k != "val_files"} or None,
        },
        "architecture": {
            "summary": fm.summary,
            "parameters": fm.parameters,
            "description": (meta or {}).get("architecture", "as loaded")
            + (f"; ensemble of {len(cfg.models)}, logits averaged" if len(cfg.models) > 1 else ""),
        },
        "tflite": {
            "file": out.name,
            "sha256": sha256_file(out),
            "bytes": out.stat().st_size,
            "input": {"shape": [int(v) for v in in_d["shape"]], "dtype": np.dtype(in_d["dtype"]).name,
                      "quantization": [float(in_d["quantization"][0]), int(in_d["quantization"][1])]},
            "output": {"shape": [int(v) for v in out_d["shape"]], "dtype": np.dtype(out_d["dtype"]).name,
                       "quantization": [float(out_d["quantization"][0]), int(out_d["quantization"][1])],
                       "kind": fm.output,
                       "note": "the int8 graph ends at the logit; the device computes p = 1 / (1 + exp(-logit)) "
                               "in float" if fm.output == "logit" else "the model's own probability output"},
        },
        "edgetpu": None,
        "preprocessing": spec.to_dict(),
        "labels": list(LABELS),
        "positive_label": "PNEUMONIA",
        "operating_points": ops,
        "validation": {
            "source": val.record,
            "int8": evaluate_scores(val.data.y, val.p_int8, th.as_dict(), intervals=True),
            "float": evaluate_scores(val.data.y, val.p_float, th.as_dict()),
            "skipped_files": len(val.data.skipped),
            "note": "validation figures are optimistic: this data set shifts between its train and test splits",
        },
        "quantization": {
            "type": "full integer (int8 internals, uint8 input and output)",
            "calibration": {"data": data_record([Sample(p, int(y)) for p, y in zip(calib.paths, calib.y, strict=False)],
                                                cfg.calibration),
                            "images": len(calib), "requested": cfg.num_calibration,
                            "stratified": True, "seed": cfg.seed, "skipped_files": len(calib.skipped)},
            "agreement": agreement,
        },
        "edgetpu_compatibility": report_dict(checks),
        "data_credit": DATA_CREDIT,
        "tools": _tool_versions(),
    }
    for c in scored[1:]:
        card["check_data"] = {
            "source": c.record,
            "int8": evaluate_scores(c.data.y, c.p_int8, th.as_dict(), intervals=True),
            "note": "a second labelled folder (e.g. the site's own images), scored with the validation "
                    "operating points",
        }
    return card


def write_card(card: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
