"""Where a file becomes a flag: bytes -> decode/preprocess -> score -> prioritize -> message.

It reads no file itself (but :func:`score_file`, for the command line): the daemon feeds it bytes
it has read and hashed once, and decides what to do with the message or the error. The decode runs
in the decoder worker process when the daemon gives it one (``decoder``), else in this process.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np

from .card import ModelCard
from .config import Config
from .contract import FlagMessage, ModelRef, Timings, utc_iso
from .decoder import Decoded, DecodeSettings, DecodeWorker, decode_bytes
from .gate import GateLimits
from .preprocess import ImageDecodeError
from .reader import read_file
from .scorer import Scorer
from .vocab import Reason

log = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Pipeline:
    #: files decoding at once (submitted, not yet collected)
    DEPTH = DecodeWorker.DEPTH

    def __init__(self, cfg: Config, scorer: Scorer, card: ModelCard):
        self.cfg = cfg
        self.scorer = scorer
        self.card = card
        self.spec = card.preprocessing
        self.model_ref = ModelRef(card.name, card.version, card.tflite_sha256)
        self.gate = GateLimits.from_config(cfg.gate, card.layout_template)
        self.settings = DecodeSettings(self.spec, self.gate, cfg.watch.max_pixels,
                                       int(cfg.watch.max_decode_mb * 2**20), self.dicom_options())
        #: set by the daemon: decode in a reused worker process with a deadline
        self.decoder: Optional[DecodeWorker] = None
        self._local: deque[tuple[bytes, str]] = deque()  # submitted, without a worker

    def dicom_options(self) -> dict:
        """What ``read_dicom`` takes from the configuration (shared with the heat-map worker)."""
        d = self.cfg.dicom
        return {"include_patient_identifiers": d.include_patient_identifiers,
                "accept_modalities": d.accept_modalities, "accept_body_parts": d.accept_body_parts,
                "accept_views": d.accept_views, "max_pixels": self.cfg.watch.max_pixels,
                "max_bytes": int(self.cfg.watch.max_decode_mb * 2**20)}

    def decode(self, data: bytes, name: str) -> Decoded:
        """Bytes -> the model's input (:func:`~.decoder.decode_bytes`): in the worker process, with its
        deadline, when the daemon gave the pipeline one (``decoder``), else here."""
        self.submit(data, name)
        return self.collect()

    def submit(self, data: bytes, name: str) -> None:
        """Start decoding one more file (up to :data:`DEPTH` at once); :meth:`collect` gives the results in
        order. With a worker the call returns at once, so the caller can infer an earlier file meanwhile."""
        if self.decoder is not None:
            self.decoder.submit(data, name)
        else:
            self._local.append((data, name))

    def collect(self) -> Decoded:
        """The oldest submitted file's decode."""
        if self.decoder is not None:
            return self.decoder.collect()
        data, name = self._local.popleft()
        return decode_bytes(data, name, self.settings)

    def infer(self, d: Decoded, rel_path: str, busy: bool = False) -> tuple[float, float]:
        """(probability, inference ms); ``busy``: other files are in the decoder (:meth:`Scorer.score`).
        Raises :class:`ImageDecodeError` for a non-finite output."""
        t0 = time.perf_counter()
        p = self.scorer.score(d.pixels, busy)
        infer_ms = (time.perf_counter() - t0) * 1000.0
        if not np.isfinite(p):
            raise ImageDecodeError(Reason.MODEL_OUTPUT, f"{rel_path}: the model returned {p}")
        return float(p), infer_ms

    def message(self, d: Decoded, p: float, infer_ms: float, total_ms: float, rel_path: str, sha256: str,
                file_mtime: Optional[float] = None, seen_at: Optional[float] = None,
                supersedes: Optional[str] = None) -> FlagMessage:
        """The flag, whole: the one place a :class:`FlagMessage` is made. ``written_at`` is the DICOM
        acquisition time, else the file's modification time."""
        written = d.acquired_at if d.acquired_at is not None else file_mtime
        return FlagMessage(
            device=self.cfg.mqtt.device_id,
            file=rel_path,
            sha256=sha256,
            probability=p,
            priority=self.card.thresholds.priority(p),
            thresholds=self.card.thresholds.as_dict(),
            model=self.model_ref,
            accelerator=self.scorer.report.accelerator,
            timings_ms=Timings(decode=d.decode_ms, infer=infer_ms, total=total_ms),
            dicom=d.dicom_ids,
            written_at=utc_iso(written) if written is not None else None,
            written_ts=written,
            seen_at=utc_iso(seen_at) if seen_at is not None else None,
            supersedes=supersedes,
        )

    def score(self, data: bytes, rel_path: str, sha256: str) -> FlagMessage:
        """One file, start to end (the command line). Raises :class:`ImageDecodeError` for input that
        cannot be scored."""
        t0 = time.perf_counter()
        d = self.decode(data, rel_path)
        p, infer_ms = self.infer(d, rel_path)
        return self.message(d, p, infer_ms, (time.perf_counter() - t0) * 1000.0, rel_path, sha256)


def score_file(pipeline: Pipeline, path: Path, root: Optional[Path] = None) -> FlagMessage:
    """Score one file from disk (``pneumoflag score``, self-test, benchmarks)."""
    data = read_file(path)
    rel = str(path.relative_to(root)) if root else path.name
    return pipeline.score(data, rel, sha256_bytes(data))
