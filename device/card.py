"""The model card: what the device needs to know about a model, and the check that they match."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .preprocess import PreprocessSpec
from .vocab import Priority

CARD_SCHEMA = "pneumoflag.model-card/1"
#: What the int8 model's one output is; the device turns a logit into a probability in float.
OUTPUT_KINDS = ("logit", "probability")


class CardError(ValueError):
    """A missing, malformed or mismatched model card."""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def card_path_for(model_path: Path | str) -> Path:
    """``NAME.json`` beside ``NAME.tflite`` (also for ``NAME_edgetpu.tflite``)."""
    p = Path(model_path)
    stem = p.stem[: -len("_edgetpu")] if p.stem.endswith("_edgetpu") else p.stem
    return p.with_name(stem + ".json")


@dataclass(frozen=True)
class Thresholds:
    """Operating points: ``p >= urgent`` is urgent, ``p >= flag`` is flag, else routine.

    ``urgent`` is None for a single-tier card (the data could not set a distinct
    urgent point): then nothing is urgent.
    """

    flag: float
    urgent: Optional[float]

    def __post_init__(self) -> None:
        for name in ("flag", "urgent"):
            v = getattr(self, name)
            if name == "urgent" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise CardError(f"operating point {name!r} must be a probability in [0, 1], not {v!r}")
        if self.urgent is not None and self.urgent <= self.flag:
            raise CardError(
                f"urgent threshold {self.urgent} must lie above the flag threshold {self.flag} "
                "(a card with one tier has urgent = null)"
            )

    @property
    def single_tier(self) -> bool:
        return self.urgent is None

    def priority(self, probability: float) -> str:
        if self.urgent is not None and probability >= self.urgent:
            return Priority.URGENT.value
        if probability >= self.flag:
            return Priority.FLAG.value
        return Priority.ROUTINE.value

    def as_dict(self) -> dict[str, Optional[float]]:
        return {"flag": self.flag, "urgent": self.urgent}

    def describe(self) -> str:
        if self.urgent is None:
            return f"flag p >= {self.flag:.4f} (single tier: nothing is urgent), below: routine"
        return f"urgent p >= {self.urgent:.4f}, flag p >= {self.flag:.4f}, below: routine"


@dataclass
class ModelCard:
    path: Path
    name: str
    version: str
    tflite_file: str
    tflite_sha256: str
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: PreprocessSpec
    thresholds: Thresholds
    labels: tuple[str, ...]
    output_kind: str = "probability"
    revision: int = 1
    edgetpu_file: Optional[str] = None
    edgetpu_sha256: Optional[str] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def source_model_paths(self, model_path: Path | str) -> list[Path]:
        """Where the float model(s) the .tflite was converted from would lie beside it: every ensemble member
        (``source_model.members``), else ``source_model.file``; [] when the card names none."""
        source = self.raw.get("source_model") or {}
        names = [m.get("file") for m in source.get("members") or [source]]
        return [Path(model_path).parent / n for n in names if n]

    def adaptation_summary(self) -> Optional[str]:
        """One line saying that this model was adapted to a site and on which data (``pneumoflag adapt``)."""
        a = self.raw.get("adaptation")
        if not a:
            return None
        base, site = a.get("base_model") or {}, a.get("site_data") or {}
        counts = ", ".join(f"{k} {v}" for k, v in (site.get("images") or {}).items())
        return (f"model {self.name} {self.version} is adapted: {base.get('name')} {base.get('version')} fine-tuned "
                f"on site data {site.get('folder')} ({counts}; file list sha256 {site.get('files_sha256')}), "
                f"{(a.get('folds') or {}).get('k')} patient-level folds; operating points from out-of-fold scores")

    @property
    def drift_reference(self) -> Optional[dict[str, Any]]:
        """What the validation images looked like (``device/drift_reference.py``), for the drift monitor; None for
        a card made before it (run ``calibrate``, ``adapt`` or ``drift_study reference`` to add one)."""
        ref = self.raw.get("drift_reference")
        return ref if isinstance(ref, dict) else None

    @property
    def layout_template(self) -> Optional[np.ndarray]:
        """The mean training radiograph at 32 x 32 (``plausibility.template``), for the gate's layout check."""
        t = (self.raw.get("plausibility") or {}).get("template")
        return np.asarray(t, dtype=np.float64) if t else None

    @classmethod
    def load(cls, path: Path | str) -> "ModelCard":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CardError(f"model card {path} not found (every model needs its card beside it)") from None
        except json.JSONDecodeError as exc:
            raise CardError(f"model card {path} is not valid JSON ({exc})") from None
        try:
            if d.get("schema") != CARD_SCHEMA:
                raise CardError(f"model card {path}: schema {d.get('schema')!r}, expected {CARD_SCHEMA!r}")
            t = d["tflite"]
            ops = d["operating_points"]
            et = d.get("edgetpu") or {}
            output_kind = t["output"].get("kind", "probability")
            if output_kind not in OUTPUT_KINDS:
                raise CardError(f"model card {path}: output kind {output_kind!r} is not one of {OUTPUT_KINDS}")
            urgent = ops["urgent"]["threshold"]
            if urgent is not None and urgent == ops["flag"]["threshold"]:
                urgent = None  # cards before schema revision 2 spelt "one tier" as urgent == flag
            return cls(
                path=path,
                name=d["name"],
                version=str(d["version"]),
                tflite_file=t["file"],
                tflite_sha256=t["sha256"],
                input_shape=tuple(int(v) for v in t["input"]["shape"]),
                input_dtype=t["input"]["dtype"],
                preprocessing=PreprocessSpec.from_dict(d["preprocessing"]),
                thresholds=Thresholds(float(ops["flag"]["threshold"]), None if urgent is None else float(urgent)),
                labels=tuple(d["labels"]),
                output_kind=output_kind,
                revision=int(d.get("revision", 1)),
                edgetpu_file=et.get("file"),
                edgetpu_sha256=et.get("sha256"),
                raw=d,
            )
        except KeyError as exc:
            raise CardError(f"model card {path}: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CardError):
                raise
            raise CardError(f"model card {path}: {exc}") from None

    def expected_sha256(self, model_path: Path) -> str:
        if model_path.name == self.edgetpu_file and self.edgetpu_sha256:
            return self.edgetpu_sha256
        if model_path.name != self.tflite_file:
            raise CardError(
                f"model card {self.path} describes {self.tflite_file}"
                + (f" and {self.edgetpu_file}" if self.edgetpu_file else "")
                + f", not {model_path.name}"
            )
        return self.tflite_sha256

    def verify_file(self, model_path: Path | str) -> None:
        """Refuse a model file whose bytes are not the ones the card was written for."""
        model_path = Path(model_path)
        expected = self.expected_sha256(model_path)
        actual = sha256_file(model_path)
        if actual != expected:
            raise CardError(
                f"model {model_path} does not match its card {self.path}: sha256 {actual[:12]}… "
                f"but the card says {expected[:12]}… (model replaced or corrupted; re-run "
                "`pneumoflag convert` or restore the file)"
            )

    def verify_io(self, shape: tuple[int, ...], dtype: str) -> None:
        if tuple(shape) != self.input_shape or dtype != self.input_dtype:
            raise CardError(
                f"model input is {list(shape)} {dtype} but the card {self.path} says "
                f"{list(self.input_shape)} {self.input_dtype}"
            )
        if tuple(shape[1:]) != self.preprocessing.shape:
            raise CardError(
                f"card {self.path}: preprocessing makes {list(self.preprocessing.shape)} but the model "
                f"takes {list(shape[1:])}"
            )
