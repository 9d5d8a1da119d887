"""One result per study: the images of one StudyInstanceUID (a PA and a lateral, a repeat exposure) give one
current study result, which a nurse is alerted to once and which goes back to PACS once.

The study's result is the highest of its scored images' results (each file counted once, its latest result;
on a tie, the one that already is the study's, else the first scored). The rules, decided on the scoring
thread and journaled in the image's own transaction (``Intake``):

- the study's first scored image publishes its flag, carrying ``study`` (its uid, the images scored, the views
  refused, open or closed);
- an image that changes the study's priority publishes a new flag for the study, the result of its highest
  image, that ``supersedes`` the study's current flag: a later image that raises it, and also a re-export of
  the image behind the result that lowers it or is now refused (then the next highest image's result is the
  study's, or, with none left, the image's error replaces the flag as for any file);
- an image that does not change it publishes a :class:`~pneumoflag.device.contract.StudyUpdate` on
  ``…/studies``: the new count, no alert, no acknowledgement cleared;
- an image of the study that is refused (a lateral, a non-chest view, a failed gate) is named in the study's
  ``rejected`` list (at most :data:`~pneumoflag.device.contract.MAX_REJECTED`, each name at most
  :data:`MAX_NAME` characters, so that a study flag always fits the contract's size) and announced the same
  way; its error message goes out as for any file;
- after ``dicom.study_quiet_seconds`` without a new image the study closes: a study update that says so, and
  its SR queued for every PACS destination (``device/pacs_outbox.py``) in the same transaction. The SR reports
  the study's result and references every scored image of it (that result's image first; at most
  ``MAX_SR_IMAGES``). A later image reopens the study; its next close queues an SR only when the study's flag
  changed (the outbox is keyed by the flag's event id).

A JPEG or PNG, or a DICOM image without a valid StudyInstanceUID, has no study: its flag is its own.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Optional

from .config import Config
from .contract import MAX_REJECTED, FlagMessage, RejectedView, StudyInfo, StudyUpdate, encode, loads, new_event_id
from .dicom import is_uid
from .pacs_outbox import MAX_SR_IMAGES, pack_headers
from .store import FlagRecord, PacsItem, Queued, Store, StudyChange, StudyImage, StudyRow
from .vocab import PRIORITIES

log = logging.getLogger(__name__)

#: the longest refused file name a study names (its end, where the file's own name is)
MAX_NAME = 120


def study_uid(ids: Optional[dict[str, str]]) -> Optional[str]:
    """The image's StudyInstanceUID when it has a valid one (the key of its study), else None."""
    uid = (ids or {}).get("study_instance_uid")
    return uid if is_uid(uid) else None


@dataclass
class Plan:
    """What one image does to its study: a new study flag (``flag``), or the study's ``news`` only."""

    change: StudyChange  # written in the image's transaction
    flag: Optional[FlagMessage] = None  # the study's new result (this image's, or another image's again)
    news: Optional[StudyUpdate] = None

    @property
    def row(self) -> StudyRow:
        return self.change.row


class Studies:
    def __init__(self, cfg: Config, store: Store):
        self.cfg = cfg
        self.store = store
        self.quiet = float(cfg.dicom.study_quiet_seconds)

    # ------------------------------------------------------------------ an image of a study
    def scored(self, msg: FlagMessage, pacs: Optional[PacsItem] = None) -> Optional[Plan]:
        """The study's plan for a scored image (None: no study); ``pacs``: what its SR needs (``pacs_item``).
        Raises :class:`~pneumoflag.device.store.StoreError` when the study cannot be read."""
        uid = study_uid(msg.dicom)
        if uid is None:
            return None
        row = self._opened(uid, msg.dicom)
        row.rejected = json.dumps([v for v in json.loads(row.rejected) if v["file"] != _name(msg.file)])
        image = StudyImage(msg.file, msg.priority, encode(msg.to_dict()), pacs.header if pacs else None,
                           pacs.finding if pacs else None, time.time())
        ranks = [r for r in self.store.study_ranks(uid) if r[0] != msg.file] + [(msg.file, msg.priority)]
        return self._settle(StudyChange(row, image=image), ranks, msg)

    def refused(self, file: str, reason: str, ids: Optional[dict[str, str]]) -> Optional[Plan]:
        """A refused image of a study, named in it (None: the image has no study). A scored image refused now
        (a re-export) no longer counts: the study's result may fall to its next highest image."""
        uid = study_uid(ids)
        if uid is None:
            return None
        row = self._opened(uid, ids)
        views = [v for v in json.loads(row.rejected) if v["file"] != _name(file)]
        if len(views) < MAX_REJECTED:  # beyond that the journal alone has them
            views.append({"file": _name(file), "reason": str(reason)[:64]})
        row.rejected = json.dumps(views)
        ranks = [r for r in self.store.study_ranks(uid) if r[0] != file]
        return self._settle(StudyChange(row, drop=file), ranks, None)

    def _settle(self, change: StudyChange, ranks: list[tuple[str, str]], this: Optional[FlagMessage]) -> Plan:
        """The study's result from its images' (file, priority) now: a new flag when its priority changed, else
        its news."""
        row = change.row
        row.images = len(ranks)
        best = min(ranks, key=lambda r: (PRIORITIES.index(r[1]), r[0] != row.flag_file), default=None)
        if best is None:  # none of its images counts (any more): no result; an error replaces the old flag
            row.flag_event = row.flag_file = row.priority = None
            return Plan(change, news=self._news(row))
        best_file, best_priority = best
        row.flag_file = best_file
        if row.flag_event is not None and best_priority == row.priority:
            return Plan(change, news=self._news(row))
        if this is not None and best_file == this.file:
            flag = this  # this image's own result (it supersedes what the intake set: its path's last result)
            flag.supersedes = row.flag_event or flag.supersedes
        else:  # another image's result becomes the study's again, as a new flag
            kept = self.store.study_image(row.uid, best_file)
            assert kept is not None  # ranked from the same table, on the one thread that writes it
            flag = replace(FlagMessage.parse(loads(kept.message)), event_id=new_event_id(), supersedes=row.flag_event)
        row.flag_event, row.priority = flag.event_id, best_priority
        flag.study = self.info(row)
        return Plan(change, flag=flag)

    def _opened(self, uid: str, ids: Optional[dict[str, str]]) -> StudyRow:
        """The study with a new image: a copy of its row, open, stamped now (a new row for a new study)."""
        old = self.store.study(uid)
        now = time.time()
        if old is None:
            return StudyRow(uid, None, None, None, 0, "[]", (ids or {}).get("accession_number"), now)
        return replace(old, closed_at=None, last_image=now)

    def info(self, row: StudyRow) -> StudyInfo:
        views = [RejectedView(file=v["file"], reason=v["reason"]) for v in json.loads(row.rejected)]
        return StudyInfo(uid=row.uid, images=row.images, rejected=views, closed=row.closed_at is not None)

    def _news(self, row: StudyRow) -> StudyUpdate:
        return StudyUpdate(device=self.cfg.mqtt.device_id, study=self.info(row), flag=row.flag_event,
                           priority=row.priority, accession_number=row.accession)

    def queued(self, plan: Plan) -> Queued:
        """The plan's message as the outbox takes it: the study's news, or its new flag (with its flag record)."""
        if plan.flag is None:
            assert plan.news is not None
            return self._queued_news(plan.news)
        f = plan.flag
        payload = encode(f.to_dict())
        return Queued(f.event_id, self.cfg.topics.flag(f.priority), payload, 1,
                      FlagRecord(f.event_id, f.priority, f.probability, payload, f.written_ts, None, time.time()))

    def _queued_news(self, news: StudyUpdate) -> Queued:
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
            pacs = self._sr(row) if self.cfg.pacs.destinations else None
            if self.store.close_study(row, self._queued_news(self._news(done)), pacs):
                closed += 1
                log.info("study %s closed: %d image%s scored, %s%s", row.uid, row.images,
                         "" if row.images == 1 else "s", (row.priority or "none scored").upper(),
                         "; its SR queued for PACS" if pacs else "")
        return closed

    def _sr(self, row: StudyRow) -> Optional[PacsItem]:
        """What the study's SR is made of: the headers of its scored images (its result's first) and that
        result's finding; None when the result's image has none (no DICOM identity: it gets no SR)."""
        images = self.store.study_images(row.uid)
        best = next((i for i in images if i.file == row.flag_file), None)
        if best is None or best.header is None or best.finding is None:
            return None
        headers = [best.header] + [i.header for i in images if i is not best and i.header is not None]
        return PacsItem(pack_headers(headers[:MAX_SR_IMAGES]), best.finding, tuple(self.cfg.pacs.destinations))


def _name(file: str) -> str:
    """A refused file's name as its study names it: the end of a long path, marked as cut."""
    return file if len(file) <= MAX_NAME else "…" + file[-(MAX_NAME - 1):]
