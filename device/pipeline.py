"""Where a file becomes a flag: bytes -> decode/preprocess -> score -> prioritize -> message.

Pure of I/O besides the model: the daemon feeds it bytes it has read (and
hashed) once, and decides what to do with the message or the error.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .card import ModelCard
from .config import Config
from .dicom import is_dicom, read_dicom
from .gate import GateLimits, check_jpeg_stream, check_pixels, check_source
from .messages import FlagMessage, ModelRef, Timings, utc_iso
from .preprocess import ImageDecodeError, SourceInfo, decode_with_info, finish, resize
from .scorer import Scorer
from .vocab import Reason

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    pixels: np.ndarray  # the model's uint8 input (H, W, C)
    dicom_ids: Optional[dict[str, str]]
    decode_ms: float
    acquired_at: Optional[float] = None  # POSIX time from the DICOM header, when it has one


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Pipeline:
    def __init__(self, cfg: Config, scorer: Scorer, card: ModelCard):
        self.cfg = cfg
        self.scorer = scorer
        self.card = card
        self.spec = card.preprocessing
        self.model_ref = ModelRef(card.name, card.version, card.tflite_sha256)
        g = cfg.gate
        self.gate = GateLimits(g.enabled, g.min_side, g.max_aspect, g.min_dynamic_range, g.min_smoothness,
                               g.strict_jpeg, g.min_detail, g.max_uniform, g.min_template_similarity,
                               card.layout_template)

    def dicom_options(self) -> dict:
        """What ``read_dicom`` takes from the configuration (shared with the heat-map worker)."""
        d = self.cfg.dicom
        return {"include_patient_identifiers": d.include_patient_identifiers,
                "accept_modalities": d.accept_modalities, "accept_body_parts": d.accept_body_parts,
                "accept_views": d.accept_views, "max_pixels": self.cfg.watch.max_pixels,
                "max_bytes": int(self.cfg.watch.max_decode_mb * 2**20)}

    def decode(self, data: bytes, name: str) -> Decoded:
        """Bytes -> the model's input: decode (JPEG/PNG, or DICOM through pydicom), the plausibility
        gate, then the shared ``resize`` and ``finish`` steps of the one preprocessing function."""
        t0 = time.perf_counter()
        ids, acquired = None, None
        max_bytes = int(self.cfg.watch.max_decode_mb * 2**20)
        if is_dicom(data[:132]):
            gray, info = read_dicom(data, name=name, **self.dicom_options())
            ids = info.ids()
            acquired = info.acquired_at.timestamp() if info.acquired_at else None
            check_source(SourceInfo(gray.shape[1], gray.shape[0], "DICOM", "L"), self.gate, name)
        else:
            gray, src = decode_with_info(data, self.spec, self.cfg.watch.max_pixels, name=name, max_bytes=max_bytes)
            check_source(src, self.gate, name)
            if src.format == "JPEG":  # Pillow repairs a damaged stream silently; a strict decoder does not
                check_jpeg_stream(data, self.gate, name)
        small = resize(gray, self.spec)
        check_pixels(small, self.gate, name)
        pixels = finish(small, self.spec, gray)
        del gray
        return Decoded(pixels, ids, (time.perf_counter() - t0) * 1000.0, acquired)

    def score(self, data: bytes, rel_path: str, sha256: str) -> FlagMessage:
        """Raises :class:`ImageDecodeError` for input that cannot be scored."""
        return self.score_decoded(data, rel_path, sha256)[0]

    def score_decoded(self, data: bytes, rel_path: str, sha256: str) -> tuple[FlagMessage, Decoded]:
        """The flag, and the model's input it was scored on (the heat map reuses it)."""
        t0 = time.perf_counter()
        d = self.decode(data, rel_path)
        t1 = time.perf_counter()
        p = self.scorer.score(d.pixels)
        t2 = time.perf_counter()
        if not np.isfinite(p):
            raise ImageDecodeError(Reason.MODEL_OUTPUT, f"{rel_path}: the model returned {p}")
        return FlagMessage(
            device=self.cfg.mqtt.device_id,
            file=rel_path,
            sha256=sha256,
            probability=float(p),
            priority=self.card.thresholds.priority(p),
            thresholds=self.card.thresholds.as_dict(),
            model=self.model_ref,
            accelerator=self.scorer.report.accelerator,
            timings_ms=Timings(decode=d.decode_ms, infer=(t2 - t1) * 1000.0, total=(t2 - t0) * 1000.0),
            dicom=d.dicom_ids,
            written_at=utc_iso(d.acquired_at) if d.acquired_at is not None else None,
            written_ts=d.acquired_at,
        ), d


def score_file(pipeline: Pipeline, path: Path, root: Optional[Path] = None) -> FlagMessage:
    """Score one file from disk (``pneumoflag score``, self-test, benchmarks)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError("not-found", f"{path}: no such file") from None
    except PermissionError:
        raise ImageDecodeError("permission-denied", f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("not-a-file", f"{path}: is a folder") from None
    if not data:
        raise ImageDecodeError("empty-file", f"{path}: empty file (0 bytes)")
    rel = str(path.relative_to(root)) if root else path.name
    return pipeline.score(data, rel, sha256_bytes(data))
