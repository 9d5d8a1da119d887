"""Results back to PACS: a structured report for each scored DICOM study, through a durable outbox of its own.

What it guarantees:

- **Queued with the result.** For a scored image that came as DICOM (from the folder or the network) with its
  study identity, :func:`pacs_item` gives what the SR is built from later (the source's DICOM header without
  pixel data, and the finding as JSON). The study keeps it with its current result (``device/studies.py``),
  and the rows for every ``pacs.destinations`` entry are inserted in the transaction that closes the study:
  no SR queued for a result that was not journaled, and one SR per study result. Only the header is read on
  the scoring thread; the SR itself (highdicom) is built by the sender thread.
- **In order, deleted only on success.** One thread per destination sends the oldest row; only the peer's
  success (or warning) status deletes it. Anything else (the PACS down, a refused association, a failure
  status) keeps the row, counts the attempt, keeps its reason (``stats`` and ``report`` show it), and the same
  row is tried again after a capped backoff (1 s, doubling up to 60 s); nothing behind it passes.
- **The same instance after a crash.** The SR's SOP Instance UID and Series Instance UID are derived from the
  result's event id (:func:`derived_uid`): a row sent, stored by the PACS, and not deleted because the daemon
  died before the answer arrived is the same instance when it is sent again, which the PACS keeps once.

The outbox is keyed by the event id of the study's flag whose result it reports: a study closed again with the
same result queues nothing again.
"""
from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from typing import Any, Optional

import numpy as np

from .config import Config
from .contract import FlagMessage
from .dicom import is_uid
from .store import PacsItem, PacsRow, Store, StoreError

log = logging.getLogger(__name__)

#: first and longest wait before the same row is tried again
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
#: how often an idle sender looks for a new row
IDLE_POLL = 0.5
#: UUIDv5 namespace of the UIDs derived from event ids (fixed: the same event gives the same UIDs everywhere)
UID_NAMESPACE = uuid.UUID("0f6d2a51-93c4-4e8b-b7d2-5a1c9e3f7b60")


def derived_uid(event_id: str, what: str) -> str:
    """A DICOM UID (``2.25.`` and a UUIDv5) that only ``event_id`` and ``what`` ("sr", "series") decide."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, f'{event_id}/{what}').int}"


#: marks a study's headers packed together (``pack_headers``); a single Part 10 header starts with its preamble
PACKED = b"PFH1"
#: the most images a study's SR references (the study's result and the images scored before it, in order)
MAX_SR_IMAGES = 64


def pack_headers(headers: list[bytes]) -> bytes:
    """Several Part 10 headers as one outbox value: each with its length, after :data:`PACKED`."""
    return PACKED + b"".join(len(h).to_bytes(4, "big") + h for h in headers)


def unpack_headers(value: bytes) -> list[bytes]:
    """The headers of :func:`pack_headers`, or ``[value]`` for one header as rows queued before studies hold."""
    if not value.startswith(PACKED):
        return [value]
    out, at = [], len(PACKED)
    while at < len(value):
        n = int.from_bytes(value[at:at + 4], "big")
        out.append(value[at + 4:at + 4 + n])
        at += 4 + n
    return out


def source_header(data: bytes) -> Optional[Any]:
    """The image's data set without its pixel data, or None when it is not DICOM with a complete identity."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - the image was scored: it only gets no SR
        log.warning("no SR: the DICOM header cannot be read again (%s)", exc)
        return None
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not is_uid(str(ds.get(keyword, ""))):
            log.warning("no SR for %s: the image has no valid %s", ds.get("SOPInstanceUID", "an image"), keyword)
            return None
    return ds


def _header_bytes(data: bytes) -> Optional[bytes]:
    ds = source_header(data)
    if ds is None:
        return None
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # no pixel data left to be compressed
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pacs_item(cfg: Config, data: bytes, msg: FlagMessage) -> Optional[PacsItem]:
    """What a study keeps of a scored image for its SR (its header and finding); None when it gets none."""
    if not cfg.pacs.destinations or not msg.dicom or "study_instance_uid" not in msg.dicom:
        return None
    header = _header_bytes(data)
    if header is None:
        return None
    th = msg.thresholds or {}
    threshold = th.get("urgent") if msg.priority == "urgent" else th.get("flag")
    finding = {"probability": float(msg.probability), "priority": msg.priority, "threshold": threshold,
               "model": {"name": msg.model.name, "version": msg.model.version, "sha256": msg.model.sha256}}
    return PacsItem(header, json.dumps(finding), tuple(cfg.pacs.destinations))


def heatmap_item(cfg: Config, data: bytes, model: dict) -> Optional[PacsItem]:
    """What goes into the heat map's transaction (``pacs.send_heatmap``): for a DICOM source only."""
    from .dicom import is_dicom

    if not (cfg.pacs.send_heatmap and cfg.pacs.destinations and is_dicom(data[:132])):
        return None
    header = _header_bytes(data)
    if header is None:
        return None
    return PacsItem(header, json.dumps({"model": model}), tuple(cfg.pacs.destinations))


def build(row: PacsRow) -> Any:
    """The SR (or the heat map's Secondary Capture) of one outbox row, the same instance however often built."""
    import pydicom

    from .sr import ModelIdentity, StudyFinding, build_heatmap_sc, build_sr

    f = json.loads(row.finding)
    sources = [pydicom.dcmread(io.BytesIO(h)) for h in unpack_headers(row.header)]
    source = sources[0]  # the image whose result it reports
    if row.kind == "heatmap":
        from PIL import Image

        with Image.open(io.BytesIO(row.payload)) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return build_heatmap_sc(source, rgb, ModelIdentity(**f["model"]),
                                series_instance_uid=derived_uid(row.event_id, "heatmap-series"),
                                sop_instance_uid=derived_uid(row.event_id, "heatmap"))
    return build_sr(sources, StudyFinding(f["probability"], f["priority"], f["threshold"]),
                    ModelIdentity(**f["model"]), series_instance_uid=derived_uid(row.event_id, "series"),
                    sop_instance_uid=derived_uid(row.event_id, "sr"))


class PacsSender:
    """One thread per destination, each emptying that destination's rows of the outbox, in order."""

    def __init__(self, cfg: Config, store: Store):
        from .pacs import Destination

        self.cfg = cfg
        self.destinations = {d: Destination.parse(d, "pacs.destinations") for d in cfg.pacs.destinations}
        #: the daemon's store: its fsync watermark says which rows are on disk (a result is sent, over MQTT
        #: or to PACS, only once it is); a send holds its lock only to read or delete a row
        self.store = store
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for key, dest in self.destinations.items():
            t = threading.Thread(target=self._run, args=(key, dest), name=f"pacs:{dest}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.destinations:
            log.info("results go back as DICOM SR to %s", ", ".join(self.destinations))

    def stop(self, timeout: float = 2.0) -> None:
        """Stop; a send still in hand after ``timeout`` is left to end with the process (its row stays: what
        waits, that one included, is sent at the next start, as the same instance)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads.clear()

    def _run(self, key: str, dest: Any) -> None:
        from . import pacs

        backoff, failing = BACKOFF_MIN, False
        while not self._stop.is_set():
            try:
                row = self.store.pacs_head(key)
            except StoreError as exc:
                log.warning("PACS outbox for %s cannot be read: %s", dest, exc)
                self._stop.wait(BACKOFF_MAX)
                continue
            if row is None:
                self._stop.wait(IDLE_POLL)
                continue
            try:
                result = pacs.send(build(row), dest, self.cfg.pacs.calling_ae, self.cfg.pacs.timeout_seconds)
            except Exception as exc:  # noqa: BLE001 - an SR that cannot be built: kept, said, tried again
                result = pacs.SendResult(False, f"{dest}: cannot build the SR of {row.event_id}: {exc}")
            try:
                if result.ok:
                    self.store.pacs_sent(row.id)
                else:
                    self.store.pacs_failed(row.id, result.message)
            except StoreError as exc:  # a sent row not deleted is sent again: the same SR instance
                log.warning("PACS outbox for %s not updated: %s", dest, exc)
            if result.ok:
                if failing:
                    log.info("%s takes results again", dest)
                log.info("%s of %s stored at %s", "SR" if row.kind == "sr" else "heat map", row.event_id, dest)
                backoff, failing = BACKOFF_MIN, False
                continue
            (log.debug if failing else log.warning)("SR of %s not stored at %s: %s; kept, tried again with backoff",
                                                   row.event_id, dest, result.message)
            failing = True
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
