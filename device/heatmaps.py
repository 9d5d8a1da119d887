"""Heat maps for flagged images, made after the flag is on its way (``explain.enabled``).

A map takes about a hundred model runs; the flag must never wait for it. The
daemon queues the flag first, then hands the image to this worker, which has
an interpreter of its own (interpreters are not thread-safe), draws the overlay,
writes it under ``STATE/heatmaps/``, names it in the journal and queues it in
the outbox on ``{prefix}/{device}/heatmaps/{event_id}``, after its flag. A
failure is logged and skipped: a heat map is an aid to the aid, never a reason
to stop. Maps still queued at shutdown are not made.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelCard
from .config import Config
from .dicom import is_dicom, read_dicom
from .explain import display_gray, display_spec, explain_pixels, reference_view
from .pipeline import Pipeline
from .preprocess import ImageDecodeError, decode
from .publisher import Publisher
from .safe_text import printable
from .scorer import load_scorer
from .store import Store, StoreError

log = logging.getLogger(__name__)

#: images waiting for a map; beyond this a map is skipped (and said so) rather than memory grown
MAX_QUEUED = 32


@dataclass
class _Job:
    event_id: str
    rel: str
    data: bytes
    pixels: np.ndarray


class HeatmapWorker:
    def __init__(self, cfg: Config, card: ModelCard, pipeline: Pipeline, store: Store, publisher: Publisher):
        self.cfg, self.card, self.pipeline, self.store, self.publisher = cfg, card, pipeline, store, publisher
        self.folder = Path(cfg.state.dir) / "heatmaps"
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.scorer, _ = load_scorer(cfg.model.path, cfg.model.accelerator, 1, card=card)
        self._jobs: "queue.Queue[_Job]" = queue.Queue(MAX_QUEUED)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heatmaps", daemon=True)
        self.made = 0

    def start(self) -> None:
        self._thread.start()
        log.info("heat maps on (explain.enabled): for flag and urgent images, after their flag, in %s", self.folder)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._jobs.qsize():
            log.info("%d heat maps not made (stopping)", self._jobs.qsize())

    def submit(self, event_id: str, rel: str, data: bytes, pixels: np.ndarray) -> None:
        try:
            self._jobs.put_nowait(_Job(event_id, rel, data, pixels))
        except queue.Full:
            log.warning("%s: no heat map (%d images already wait for one)", printable(rel), MAX_QUEUED)

    def depth(self) -> int:
        return self._jobs.qsize()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._make(job)
            except Exception:
                log.exception("%s: heat map failed; the flag stands", printable(job.rel))

    def _pacs(self, job: _Job):
        """The map as a Secondary Capture for the PACS destinations (``pacs.send_heatmap``, DICOM sources)."""
        if not self.cfg.pacs.send_heatmap:
            return None
        from .pacs_outbox import heatmap_item

        return heatmap_item(self.cfg, job.data, {"name": self.card.name, "version": self.card.version,
                                                 "sha256": self.card.tflite_sha256})

    def _display(self, job: _Job) -> np.ndarray:
        """A sharp view of the radiograph at the overlay's size (decoded again, off the scoring path)."""
        size = self.cfg.explain.size
        spec = self.card.preprocessing
        try:
            if is_dicom(job.data[:132]):
                gray, _ = read_dicom(job.data, name=job.rel, **self.pipeline.dicom_options())
            else:
                gray = decode(job.data, display_spec(spec, size), name=job.rel)
        except ImageDecodeError:
            return job.pixels[:, :, reference_view(spec)]
        return display_gray(gray, spec, size)

    def _make(self, job: _Job) -> None:
        ex = explain_pixels(self.scorer, job.pixels, self.card.thresholds, self._display(job), self.cfg.explain.size,
                            self.cfg.explain.cmap)
        path = self.folder / f"{job.event_id}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(ex.png)
        os.replace(tmp, path)
        try:
            self.store.record_heatmap(job.event_id, path.name, self.cfg.topics.heatmap(job.event_id), ex.png,
                                      pacs=self._pacs(job))
        except StoreError as exc:
            log.error("%s: heat map made but not journaled or sent (%s)", printable(job.rel), exc)
            return
        self.publisher.wake()
        self.made += 1
        h = ex.heat
        log.info("%s: heat map %s (evidence for %s, peak %.2f, %d runs, %.0f ms)", printable(job.rel), path.name,
                 h.target, float(h.values.max()), h.invokes, h.elapsed_ms)
