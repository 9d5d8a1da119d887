"""One result per study: the images of one StudyInstanceUID (a PA and a lateral, a repeat exposure) give one
current study result, which a nurse is alerted to once and which goes back to PACS once.

The rules, decided on the scoring thread and journaled in the image's own transaction (``Intake``):

- the first scored image of a study publishes its flag, carrying ``study`` (its uid, the images scored, the
  views refused, open or closed);
- a later image whose priority is higher than the study's publishes a new flag that ``supersedes`` the study's
  current one (a station shows the old row replaced, and alerts for the new one);
- a later image that does not raise it publishes a :class:`~pneumoflag.device.contract.StudyUpdate` on
  ``…/studies``: the new count, no alert, no acknowledgement cleared;
- an image of the study that is refused (a lateral, a non-chest view, a failed gate) is named in the study's
  ``rejected`` list and announced the same way; its error message goes out as for any file;
- a new result for the very image that made the study's current one (a re-export with other pixels) replaces
  it, raised or not;
- after ``dicom.study_quiet_seconds`` without a new image the study closes: a study update that says so, and
  its SR queued for every PACS destination (``device/pacs_outbox.py``) in the same transaction. The SR reports
  the study's current result and references every image of it that was scored (the one that made the result
  first; at most ``MAX_SR_IMAGES``). A later image reopens the study; its next
  close queues an SR only when the result changed (the outbox is keyed by the result's event id).

A JPEG or PNG, or a DICOM image without a valid StudyInstanceUID, has no study: its flag is its own, as before.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Optional

from .config import Config
from .contract import MAX_REJECTED, FlagMessage, RejectedView, StudyInfo, StudyUpdate, encode
from .dicom import is_uid
from .pacs_outbox import MAX_SR_IMAGES, pack_headers, unpack_headers
from .store import PacsItem, Queued, Store, StudyRow
from .vocab import PRIORITIES

log = logging.getLogger(__name__)


def study_uid(ids: Optional[dict[str, str]]) -> Optional[str]:
    """The image's StudyInstanceUID when it has a valid one (the key of its study), else None."""
    uid = (ids or {}).get("study_instance_uid")
    return uid if is_uid(uid) else None


@dataclass
class Plan:
    """What one scored image of a study does: publish ``flag`` fields (``alert``), or ``news`` only."""

    row: StudyRow  # the study as it stands with this image, written in the image's transaction
    info: StudyInfo
    alert: bool
    supersedes: Optional[str] = None  # the flag the new study flag replaces (alert only)
    news: Optional[StudyUpdate] = None  # no alert: the study's news instead


class Studies:
    def __init__(self, cfg: Config, store: Store):
        self.cfg = cfg
        self.store = store
        self.quiet = float(cfg.dicom.study_quiet_seconds)

    # ------------------------------------------------------------------ an image of a study
    def scored(self, msg: FlagMessage, path_prev: Optional[str], pacs: Optional[PacsItem] = None) -> Optional[Plan]:
        """The study's plan for a scored image (None: no study); ``path_prev`` is the last result for its path,
        ``pacs`` what its SR would be made of (``pacs_item``). Raises
        :class:`~pneumoflag.device.store.StoreError` when the study cannot be read."""
        uid = study_uid(msg.dicom)
        if uid is None:
            return None
        row = self._opened(uid, msg.dicom)
        row.images += 1
        row.rejected = _without(row.rejected, msg.file)  # a refused view now scored is no longer refused
        alert = (row.flag_event is None or path_prev == row.flag_event
                 or PRIORITIES.index(msg.priority) < PRIORITIES.index(row.priority or PRIORITIES[-1]))
        supersedes = (row.flag_event or path_prev) if alert else None
        if alert:
            row.flag_event, row.priority = msg.event_id, msg.priority
            row.finding = pacs.finding if pacs is not None else None  # an image without its header: no SR
        if pacs is not None:
            row.header = _with_header(row.header, pacs.header, first=alert)
        info = self.info(row)
        if alert:
            return Plan(row, info, True, supersedes=supersedes)
        return Plan(row, info, False, news=self._news(row, info))

    def refused(self, file: str, reason: str, ids: Optional[dict[str, str]]) -> Optional[tuple[StudyRow, Queued]]:
        """A refused image of a study: the study naming it, and its news (None: the image has no study)."""
        uid = study_uid(ids)
        if uid is None:
            return None
        row = self._opened(uid, ids)
        views = [v for v in json.loads(row.rejected) if v.get("file") != file]
        if len(views) < MAX_REJECTED:  # beyond that the journal alone has them
            views.append({"file": file, "reason": str(reason)})
        row.rejected = json.dumps(views)
        news = self._news(row, self.info(row))
        return row, self.queued(news)

    def _opened(self, uid: str, ids: Optional[dict[str, str]]) -> StudyRow:
        """The study with a new image: a copy of its row, open, stamped now (a new row for a new study)."""
        old = self.store.study(uid)
        now = time.time()
        if old is None:
            return StudyRow(uid, None, None, 0, "[]", (ids or {}).get("accession_number"), None, None, now)
        return replace(old, closed_at=None, last_image=now)

    def info(self, row: StudyRow) -> StudyInfo:
        views = [RejectedView(file=v["file"], reason=v["reason"]) for v in json.loads(row.rejected)]
        return StudyInfo(uid=row.uid, images=row.images, rejected=views, closed=row.closed_at is not None)

    def _news(self, row: StudyRow, info: StudyInfo) -> StudyUpdate:
        return StudyUpdate(device=self.cfg.mqtt.device_id, study=info, flag=row.flag_event, priority=row.priority,
                           accession_number=row.accession)

    def queued(self, news: StudyUpdate) -> Queued:
        """A study update as the outbox takes it."""
        return Queued(news.event_id, self.cfg.topics.study(), encode(news.to_dict()), 1)

    # ------------------------------------------------------------------ the close
    def close_quiet(self, now: Optional[float] = None) -> int:
        """Close every study without a new image for ``study_quiet_seconds``: its news and its SR queued in one
        transaction each. Returns how many closed. Raises ``StoreError`` (the daemon's loop logs it and tries
        again at its next pass)."""
        now = time.time() if now is None else now
        closed = 0
        for row in self.store.quiet_studies(now - self.quiet):
            done = replace(row, closed_at=now)
            pacs = None
            if self.cfg.pacs.destinations and row.header is not None and row.finding is not None:
                pacs = PacsItem(row.header, row.finding, tuple(self.cfg.pacs.destinations))
            if self.store.close_study(row, self.queued(self._news(done, self.info(done))), pacs):
                closed += 1
                log.info("study %s closed: %d image%s scored, %s%s", row.uid, row.images,
                         "" if row.images == 1 else "s", (row.priority or "none scored").upper(),
                         "; its SR queued for PACS" if pacs else "")
        return closed


def _with_header(packed: Optional[bytes], header: bytes, first: bool) -> bytes:
    """The study's scored images' headers with this one: first when its result is the study's (the SR copies the
    identity of the first), else last; at most :data:`MAX_SR_IMAGES`, the same image once."""
    headers = [h for h in (unpack_headers(packed) if packed else []) if h != header]
    headers = [header, *headers] if first else [*headers, header]
    return pack_headers(headers[:MAX_SR_IMAGES])


def _without(rejected: str, file: str) -> str:
    return json.dumps([v for v in json.loads(rejected) if v.get("file") != file])
