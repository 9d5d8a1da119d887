"""The station process: MQTT link -> worklist (SQLite) -> open pages, and the acks going the other way.

Source to sink, one way: a message from the broker is stored in the worklist, acknowledged to the broker,
then pushed to every open page (a heat map goes out as its row, now saying it has one: the PNG itself is
fetched by the page that shows it, not pushed to all). An acknowledgement a nurse gives goes to the broker
only; the row turns acknowledged when the ack comes back on ``{prefix}/+/acks``, the same way it does on
every other station.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from pneumoflag.device import contract
from pneumoflag.device.config import Config
from pneumoflag.device.contract import EVENT_ID, MAX_RESEND, AckMessage, DriftMessage, utc_now

from .events import EventHub
from .mqtt_link import Incoming, MqttLink
from .security import Guard
from .settings import StationSettings
from .worklist import BadMessage, ContractError, DeviceState, Worklist

log = logging.getLogger(__name__)

MAX_NAME = 64
PRUNE_EVERY_S = 60.0  # heat maps of rows that left the page are dropped this often
#: missed flags: asked for once they have been missing this long (queued flags may still be on their way),
#: and again this often while they stay missing
RESEND_AFTER_S = 3.0
RESEND_EVERY_S = 30.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AckRefused(ValueError):
    """An acknowledgement the station will not send (no name, bad request); the message is for the nurse."""


class UnknownFlag(AckRefused):
    """The flag is not in this station's worklist, so the device (the ack's topic) is unknown too."""


@dataclass
class AckResult:
    event_id: str
    delivered: bool  # False: waiting in the MQTT client's queue for the broker to come back


def clean_name(by: Any) -> str:
    """The nurse's name as it goes into the ack: text that can be encoded (no lone surrogate), no control
    characters, 1-``MAX_NAME`` characters."""
    if not isinstance(by, str) or not by.strip():
        raise AckRefused("type your name before acknowledging")
    try:
        by.encode("utf-8")
    except UnicodeEncodeError:
        raise AckRefused("the name contains a character that is not valid text (a lone surrogate)") from None
    name = _CONTROL.sub("", by).strip()
    if not name or len(name) > MAX_NAME:
        raise AckRefused(f"the name must be 1-{MAX_NAME} characters")
    return name


class Station:
    """One station: its worklist, its MQTT link, its open pages, and who may use them."""

    def __init__(self, cfg: Config, settings: StationSettings):
        self.cfg = cfg
        self.settings = settings
        self.worklist = Worklist(settings.db_path)
        self.hub = EventHub()
        self.guard = Guard(settings.station_id, settings.password, self.worklist.secret())
        self.link: MqttLink | None = None
        self.link_state = {"up": False, "text": "connecting"}
        self._devices: dict[str, dict[str, Any]] = {}
        #: messages refused (broken contract, or handling failed), by kind: logged rate-limited, counted here
        self.refused = contract.RateLimitedLog(log)
        self._ticker: asyncio.Task | None = None
        self._asked: dict[str, tuple[float, tuple[int, int]]] = {}  # device -> (monotonic time, range asked)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.link = MqttLink(self.cfg, self.settings, loop, self.handle, self._on_link, self.refused)
        self.link.start()
        self._ticker = loop.create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker:
            self._ticker.cancel()
        if self.link:
            await asyncio.get_running_loop().run_in_executor(None, self.link.stop)
        self.hub.close()

    # ------------------------------------------------------------------ from the broker
    def handle(self, item: Incoming) -> bool:
        """Store one message and tell the pages; True = stored (or worthless), so acknowledge it.

        Only ``sqlite3.OperationalError`` (the database itself: disk full, I/O, locked) returns False and
        leaves the message for redelivery; what a message's content can raise (a broken contract, a value
        SQLite or JSON refuses) drops it, counted in ``refused``, so no message can hold up the session.
        """
        about = f" ({item.event_id[:80]!r})" if item.event_id else ""
        try:
            self._dispatch(item)
        except sqlite3.OperationalError as exc:
            log.error("worklist write failed, message left unacknowledged for redelivery: %s", exc)
            return False
        except (ContractError, sqlite3.Error, ValueError, OverflowError, TypeError) as exc:
            self.refused.refused(item.kind, f"{exc}", f"{item.device}{about}")
        return True

    def _dispatch(self, item: Incoming) -> None:
        wl, payload = self.worklist, item.payload
        if item.kind == "status":
            wl.set_status(item.device, str(payload).strip())
            self._refresh_devices()
            return
        if item.kind == "heatmap":
            if not isinstance(payload, bytes) or item.event_id is None:
                raise BadMessage("a heat map must be PNG bytes, with its event id as the last level of its topic")
            if wl.add_heatmap(item.event_id, item.device, payload):
                row = wl.row(item.event_id)
                log.info("heat map of %s from %s stored (%d bytes)", item.event_id, item.device, len(payload))
                if row:
                    self.hub.publish("row", row.to_json())
            return
        if not isinstance(payload, dict):
            raise BadMessage("not a JSON object")
        if item.kind == "replay":  # a flag this station missed, sent again with the ack it missed too
            self._replayed(payload, item.device)
        elif item.kind == "flag":
            row = wl.add_flag(payload, item.device)
            if row:
                self.hub.publish("row", row.to_json())
                self._replaced(payload)
        elif item.kind == "ack":
            event_id = wl.add_ack(payload, item.device)
            row = wl.row(event_id) if event_id else None
            if row:
                self.hub.publish("row", row.to_json())
        elif item.kind == "study":  # a study's news: its flag's row changes in place, no alert
            row = wl.add_study_update(payload, item.device)
            if row:
                self.hub.publish("row", row.to_json())
        elif item.kind == "escalation":
            self.hub.publish("row", wl.add_escalation(payload, item.device).to_json())
        elif item.kind == "error":
            err = wl.add_error(payload, item.device)
            if err:
                self.hub.publish("rejected", err.to_json())
                self._replaced(payload)
        elif item.kind == "stats":
            wl.set_stats(item.device, payload, item.retained)
            self._refresh_devices()
        elif item.kind == "drift":
            wl.set_drift(item.device, DriftMessage.parse(payload, item.device))
            self._refresh_devices()

    def _replayed(self, payload: dict, device: str) -> None:
        acked = payload.pop("acked", None)
        row = self.worklist.add_flag(payload, device)
        if isinstance(acked, dict):
            try:
                if self.worklist.add_ack({**acked, "event_id": payload.get("event_id")}, device):
                    row = self.worklist.row(payload["event_id"])
            except BadMessage as exc:  # the flag stays; its ack is not taken
                self.refused.refused("replay", f"its ack: {exc}", device)
        if row:
            self.hub.publish("row", row.to_json())
            self._replaced(payload)

    def _replaced(self, payload: dict) -> None:
        """A newer result for the same file (``supersedes``): the old row is shown replaced, no longer open."""
        old = self.worklist.superseded(payload)
        if old:
            self.hub.publish("row", old.to_json())

    def _on_link(self, up: bool, text: str) -> None:
        self.link_state = {"up": up, "text": text}
        self.hub.publish("link", self.link_state)

    def _refresh_devices(self) -> None:
        """Push the devices whose state or figures changed (silent is a matter of time, hence the ticker)."""
        for dev in self.worklist.devices(self.settings.silent_after):
            data = dev.to_json()
            if self._devices.get(dev.device) != data:
                self._devices[dev.device] = data
                self.hub.publish("device", data)

    async def _tick(self) -> None:
        pruned = 0.0
        while True:
            try:
                self._refresh_devices()
                self._ask_missing()
                if time.monotonic() - pruned >= PRUNE_EVERY_S or not pruned:
                    pruned = time.monotonic()
                    self.worklist.prune_heatmaps()
            except sqlite3.Error as exc:
                log.error("worklist upkeep failed: %s", exc)
            await asyncio.sleep(1.0)

    def _ask_missing(self) -> None:
        """Ask each device for the oldest range of flags this station missed; again after RESEND_EVERY_S, or
        at once when the last answer filled what was asked (at most MAX_RESEND flags a request)."""
        if self.link is None or not self.link.connected:
            return
        now = time.monotonic()
        for device, (first, last) in self.worklist.missing(RESEND_AFTER_S).items():
            wanted = (first, min(last, first + MAX_RESEND - 1))
            asked = self._asked.get(device)
            if asked and wanted[0] <= asked[1][1] and now - asked[0] < RESEND_EVERY_S:
                continue  # the answer to the last request may still be coming in
            self._asked[device] = (now, wanted)
            log.warning("flags %d-%d of %s never reached this station (its broker queue overflowed?): asking "
                        "the device for them", wanted[0], wanted[1], device)
            self.link.ask_resend(device, *wanted)

    # ------------------------------------------------------------------ for the pages
    def snapshot(self, csrf: str | None) -> dict[str, Any]:
        devices: list[DeviceState] = self.worklist.devices(self.settings.silent_after)
        return {
            "station": self.settings.station_id,
            "chime": self.settings.chime,
            "silent_after": self.settings.silent_after,
            "login": self.guard.login_required,
            "server_time": utc_now(),
            "link": self.link_state,
            "csrf": csrf,
            "rows": [r.to_json() for r in self.worklist.rows()],
            "devices": [d.to_json() for d in devices],
            "errors": [e.to_json() for e in self.worklist.errors()],
            "refused": dict(self.refused.counts),
        }

    async def acknowledge(self, event_id: Any, by: Any) -> AckResult:
        if not isinstance(event_id, str) or not event_id:
            raise AckRefused("event_id is missing")
        if not EVENT_ID.match(event_id):
            raise AckRefused(f"event_id is not of the form {EVENT_ID.pattern}")
        name = clean_name(by)
        device = self.worklist.device_of(event_id)
        if device is None:
            raise UnknownFlag(f"no flag {event_id} on this station")
        assert self.link is not None
        ack = AckMessage(event_id=event_id, station=self.settings.station_id, by=name)
        delivered = await self.link.publish_ack(device, ack)
        log.info("ack of %s (%s) by %s %s", event_id, device, name, "delivered" if delivered else "queued")
        return AckResult(event_id, delivered)
