"""The model card: what the device needs to know about a model, and the check that they match."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .preprocess import PreprocessSpec

CARD_SCHEMA = "pneumoflag.model-card/1"
PRIORITIES = ("urgent", "flag", "routine")


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
    flag: float
    urgent: float

    def __post_init__(self) -> None:
        for name in ("flag", "urgent"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise CardError(f"operating point {name!r} must be a probability in [0, 1], not {v!r}")
        if self.urgent < self.flag:
            raise CardError(f"urgent threshold {self.urgent} is below the flag threshold {self.flag}")

    def priority(self, probability: float) -> str:
        if probability >= self.urgent:
            return "urgent"
        if probability >= self.flag:
            return "flag"
        return "routine"

    def as_dict(self) -> dict[str, float]:
        return {"flag": self.flag, "urgent": self.urgent}


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
    edgetpu_file: Optional[str] = None
    edgetpu_sha256: Optional[str] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

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
            return cls(
                path=path,
                name=d["name"],
                version=str(d["version"]),
                tflite_file=t["file"],
                tflite_sha256=t["sha256"],
                input_shape=tuple(int(v) for v in t["input"]["shape"]),
                input_dtype=t["input"]["dtype"],
                preprocessing=PreprocessSpec.from_dict(d["preprocessing"]),
                thresholds=Thresholds(float(ops["flag"]["threshold"]), float(ops["urgent"]["threshold"])),
                labels=tuple(d["labels"]),
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
