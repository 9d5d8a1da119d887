"""Instances received over DICOM, between the receiver (``dicom_net``) and the daemon's intake.

What it guarantees:

- **Journaled before "stored".** The receiver answers a C-STORE success only after the instance is in the spool
  (``STATE/received/<SOPInstanceUID>.dcm``, fsync'd) *and* its row is committed in the ``received`` table, through a
  database connection of this class's own (WAL, busy timeout; the receiver's association threads write here and
  never wait on the main loop). A journal that cannot be written (full disk, read-only) takes the file away again
  and the sender gets 0xA700 (Out of Resources): it resends later.
- **Scored once.** The instance's journal key is ``dicom-net/<SOPInstanceUID>.dcm``, whatever its spool path; an
  instance answered "stored" once is answered success again on a resend and never kept or scored a second time
  (the ``received`` row stays after its result).
- **Nothing acknowledged is lost.** :meth:`ReceivedInstances.recover` at start hands over every received instance
  whose result is not journaled (after a kill -9 too), removes spool files never acknowledged (renamed into place
  but not journaled when the daemon died) and finishes those whose result was journaled before the daemon could
  remove them.
- **The spool empties.** Once an instance's result (flag, error, duplicate) is journaled, :func:`finish` removes
  its file, or moves it to ``watch.archive_dir/dicom-net/`` when that is set; refused instances go the same way,
  after their error message is journaled.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .config import Config
from .store import Store

log = logging.getLogger(__name__)

#: the journal keys of received instances start with this (a path that a watched folder's file cannot reach)
PREFIX = "dicom-net/"
#: the spool's folder name in ``state.dir``
SPOOL = "received"


def key(sop_instance_uid: str) -> str:
    """The journal key of a received instance."""
    return f"{PREFIX}{sop_instance_uid}.dcm"


def finish(cfg: Config, path: Path) -> None:
    """A received instance's result is journaled: its spool file goes (to the archive, when one is set)."""
    try:
        if cfg.watch.archive_dir:
            dest = Path(cfg.watch.archive_dir) / PREFIX.rstrip("/") / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(dest))
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # left in the spool: recover() finishes it at the next start
        log.warning("could not remove the received instance %s from the spool: %s", path, exc.strerror or exc)


class ReceivedInstances:
    """The receiver of ``[dicom_net]``, its spool and its journal; ``hand_over(path)`` gets each new instance."""

    def __init__(self, cfg: Config, hand_over: Callable[[Path], None]):
        from .dicom_net import DicomReceiver

        self.cfg = cfg
        self.spool = Path(cfg.state.dir).resolve() / SPOOL
        self.hand_over = hand_over
        self.store: Optional[Store] = None
        self.receiver = DicomReceiver.from_config(cfg, self.spool, on_stored=lambda path, ds: hand_over(path),
                                                  journal=self)

    # ------------------------------------------------------------------ the receiver's journal (its threads)
    def known(self, sop_instance_uid: str) -> bool:
        return self.store.was_received(sop_instance_uid)

    def add(self, sop_instance_uid: str, caller: str, peer: Optional[str]) -> None:
        self.store.receive(sop_instance_uid, key(sop_instance_uid), caller, peer)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Recover the spool, then listen; :class:`~pneumoflag.device.dicom_net.DicomNetError` when it cannot."""
        self.store = Store(self.cfg.state.dir)  # a connection of its own
        self.spool.mkdir(parents=True, exist_ok=True)
        for path in self.recover():
            self.hand_over(path)
        self.receiver.start()

    def stop(self) -> None:
        self.receiver.stop()
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def address(self) -> tuple[str, int]:
        return self.receiver.address

    def recover(self) -> list[Path]:
        """The spool as the journal says it should be: the unscored instances to hand over, oldest first."""
        unscored = {uid: self.spool / f"{uid}.dcm" for uid, _ in self.store.received_unscored()}
        for path in sorted(self.spool.glob("*.dcm")):
            uid = path.stem
            if uid in unscored:
                continue
            if self.store.was_received(uid):  # scored before the file could be removed
                finish(self.cfg, path)
            else:  # renamed into place, never journaled: never answered "stored", so the sender resends it
                log.info("removing %s from the spool: never acknowledged to its sender", path.name)
                os.unlink(path)
        missing = [uid for uid, p in unscored.items() if not p.exists()]
        for uid in missing:
            log.error("received instance %s is journaled but its file %s is gone from the spool: it cannot be "
                      "scored (was the state folder edited?)", uid, unscored.pop(uid))
        if unscored:
            log.info("DICOM spool: %d received instances not yet scored", len(unscored))
        return list(unscored.values())
