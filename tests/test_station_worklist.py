"""The station's parts that need no broker or browser: the SQLite worklist, the exposure rule, the signed
session, topic routing, and the CLI plug-in. Real SQLite files, no mocks."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pneumoflag.device.config import load_config
from pneumoflag.device.contract import AckMessage, EscalationMessage, utc_iso
from pneumoflag.device.escalation import AckError, parse_ack
from pneumoflag.station.mqtt_link import classify
from pneumoflag.station.security import SESSION_TTL_S, Guard
from pneumoflag.station.settings import StationError, StationSettings, is_loopback
from pneumoflag.station.worklist import (ACK_KEEP_S, MAX_HEATMAP_BYTES, MAX_ORPHANS, ORPHAN_KEEP_S, SCHEMA,
                                        BadMessage, Worklist)

REPO = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0  # a fixed "now" for the tests


def flag(priority: str = "urgent", written: float | None = T0 - 60, **extra) -> dict:
    return {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-1",
            "file": f"{uuid.uuid4().hex[:8]}.jpeg", "sha256": "0" * 64, "probability": 0.9, "priority": priority,
            "scored_at": utc_iso(T0 - 59.5), "written_at": utc_iso(written) if written is not None else None,
            "seen_at": None, **extra}


@pytest.fixture
def wl(tmp_path) -> Worklist:
    w = Worklist(tmp_path / "station.db")
    yield w
    w.close()


def test_order_is_priority_then_oldest_and_acknowledged_rows_go_last(wl):
    rows = {
        "routine-old": flag("routine", T0 - 500),
        "urgent-new": flag("urgent", T0 - 10),
        "flag-old": flag("flag", T0 - 400),
        "urgent-old": flag("urgent", T0 - 300),
        "urgent-acked": flag("urgent", T0 - 900),
    }
    for payload in rows.values():
        assert wl.add_flag(payload, "xray-1", received=T0) is not None
    wl.add_ack(AckMessage(rows["urgent-acked"]["event_id"], "desk-a", "Ada").to_dict(), "xray-1", received=T0)
    order = [r.event_id for r in wl.rows(now=T0)]
    names = {p["event_id"]: name for name, p in rows.items()}
    assert [names[e] for e in order] == ["urgent-old", "urgent-new", "flag-old", "routine-old", "urgent-acked"]


def test_a_repeat_delivery_adds_nothing(wl):
    payload = flag()
    first = wl.add_flag(payload, "xray-1", received=T0)
    assert first is not None and first.event_id == payload["event_id"]
    assert wl.add_flag(dict(payload), "xray-1", received=T0 + 5) is None
    assert len(wl.rows(now=T0)) == 1
    ack = AckMessage(payload["event_id"], "desk-a", "Ada").to_dict()
    assert wl.add_ack(ack, "xray-1", received=T0) == payload["event_id"]
    assert wl.add_ack(dict(ack), "xray-1", received=T0 + 1) is None


def test_time_to_notification_is_received_minus_written(wl):
    with_written = wl.add_flag(flag(written=T0 - 2.5), "xray-1", received=T0)
    assert with_written.ttn_s == pytest.approx(2.5)
    assert with_written.sort_at == utc_iso(T0 - 2.5)
    without = wl.add_flag(flag(written=None), "xray-1", received=T0)
    assert without.ttn_s is None
    assert without.sort_at == utc_iso(T0 - 59.5)  # falls back to scored_at


def test_an_ack_that_arrives_before_its_flag_is_shown_once_the_flag_comes(wl):
    payload = flag()
    ack = AckMessage(payload["event_id"], "desk-b", "Bo", at="2027-01-15T08:00:01.000Z").to_dict()
    assert wl.add_ack(ack, "xray-1", received=T0) == payload["event_id"]
    assert wl.row(payload["event_id"]) is None
    row = wl.add_flag(payload, "xray-1", received=T0)
    assert row.ack is not None and (row.ack.by, row.ack.station, row.ack.at) == ("Bo", "desk-b", ack["at"])


def test_the_first_ack_wins_when_two_stations_acknowledge(wl):
    payload = flag()
    wl.add_flag(payload, "xray-1", received=T0)
    wl.add_ack(AckMessage(payload["event_id"], "desk-b", "Bo", at="2027-01-15T08:00:05.000Z").to_dict(), "xray-1")
    wl.add_ack(AckMessage(payload["event_id"], "desk-a", "Ada", at="2027-01-15T08:00:02.000Z").to_dict(), "xray-1")
    assert wl.row(payload["event_id"]).ack.by == "Ada"


def test_escalation_marks_the_row_and_adds_a_flag_never_seen(wl):
    known = flag()
    wl.add_flag(known, "xray-1", received=T0)
    msg = EscalationMessage(known["event_id"], "xray-1", 2, 3, 600.0, known).to_dict()
    row = wl.add_escalation(msg, "xray-1", received=T0)
    assert (row.escalation, row.max_escalations) == (2, 3)
    lower = EscalationMessage(known["event_id"], "xray-1", 1, 3, 300.0, known).to_dict()
    assert wl.add_escalation(lower, "xray-1").escalation == 2  # a late, lower count changes nothing

    unseen = flag()
    row = wl.add_escalation(EscalationMessage(unseen["event_id"], "xray-1", 1, 3, 300.0, unseen).to_dict(),
                            "xray-1", received=T0)
    assert row.file == unseen["file"] and row.escalation == 1
    with pytest.raises(BadMessage):
        wl.add_escalation({"event_id": str(uuid.uuid4()), "escalation": 1, "flag": None}, "xray-1")


def test_a_newer_result_for_the_same_file_closes_the_old_row_in_either_order(wl):
    old, new = flag("urgent"), flag("urgent")
    new["supersedes"] = old["event_id"]
    wl.add_flag(old, "xray-1", received=T0)
    wl.add_flag(new, "xray-1", received=T0 + 1)
    assert wl.row(old["event_id"]).superseded_by == new["event_id"]
    assert wl.row(new["event_id"]).superseded_by is None
    assert [r.event_id for r in wl.rows(now=T0)][-1] == old["event_id"]  # closed rows go last
    assert wl.superseded(new).event_id == old["event_id"]

    late_old, error = flag("flag"), {"event_id": str(uuid.uuid4()), "device": "xray-1", "file": "x.jpeg",
                                     "reason": "truncated", "message": "cut short"}
    error["supersedes"] = late_old["event_id"]
    wl.add_error(error, "xray-1")  # the error that replaces it comes first
    assert wl.add_flag(late_old, "xray-1", received=T0).superseded_by == error["event_id"]


def test_a_database_from_before_supersedes_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.replace("    supersedes TEXT,\n", "").replace(",\n    supersedes TEXT\n", "\n"))
        assert "supersedes" not in {r[1] for r in db.execute("PRAGMA table_info(flags)")}
    upgraded = Worklist(path)
    payload = flag()
    assert upgraded.add_flag(payload, "xray-1", received=T0).superseded_by is None
    upgraded.close()


def png(side: int = 8) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 0)).save(out, "PNG")
    return out.getvalue()


def test_a_heat_map_is_stored_once_and_marks_its_row(wl):
    payload, data = flag("flag"), png()
    wl.add_flag(payload, "xray-1", received=T0)
    assert wl.row(payload["event_id"]).heatmap is False
    assert wl.add_heatmap(payload["event_id"], "xray-1", data, received=T0) is True
    assert wl.add_heatmap(payload["event_id"], "xray-1", png(16), received=T0 + 1) is False  # a repeat: first stays
    assert wl.heatmap(payload["event_id"]) == data
    assert wl.row(payload["event_id"]).heatmap is True and wl.rows(now=T0)[0].heatmap is True
    assert wl.heatmap(str(uuid.uuid4())) is None


@pytest.mark.parametrize("event_id, data, why", [
    ("ok-id", b"GIF89a" + bytes(64), "not a PNG"),
    ("ok-id", b"\x89PNG\r\n\x1a\n" + bytes(64), "no IHDR"),
    ("ok-id", b"\x89PNG\r\n\x1a\n" + bytes(MAX_HEATMAP_BYTES), "byte limit"),
    ("ok-id", png()[:16] + (100_000).to_bytes(4, "big") + png()[20:], "pixel limit"),  # a decompression bomb
    ("../../etc/passwd", None, "event id"),
    (".hidden", None, "event id"),
    ("a" * 129, None, "event id"),
    ("", None, "event id"),
])
def test_a_heat_map_that_is_not_a_sane_png_or_has_a_bad_id_is_refused(wl, event_id, data, why):
    with pytest.raises(BadMessage, match=why):
        wl.add_heatmap(event_id, "xray-1", png() if data is None else data)
    assert wl.db.execute("SELECT COUNT(*) FROM heatmaps").fetchone()[0] == 0


def test_heat_maps_leave_with_their_rows_and_orphans_after_an_hour(wl):
    open_, acked = flag("urgent"), flag("flag")
    for p in (open_, acked):
        wl.add_flag(p, "xray-1", received=T0)
        wl.add_heatmap(p["event_id"], "xray-1", png(), received=T0)
    wl.add_ack(AckMessage(acked["event_id"], "desk-a", "Ada").to_dict(), "xray-1", received=T0)
    assert wl.prune_heatmaps(now=T0 + ACK_KEEP_S - 1) == 0  # the acknowledged row is still on the page
    assert wl.prune_heatmaps(now=T0 + ACK_KEEP_S + 1) == 1
    assert wl.heatmap(acked["event_id"]) is None and wl.row(acked["event_id"]).heatmap is False
    assert wl.heatmap(open_["event_id"]) is not None  # open rows stay on the page, and their maps with them
    # a heat map before (or without) its flag: kept an hour, and shown once the flag comes
    early, never = flag("flag"), flag("flag")
    wl.add_heatmap(early["event_id"], "xray-1", png(), received=T0)
    wl.add_heatmap(never["event_id"], "xray-1", png(), received=T0)
    assert wl.prune_heatmaps(now=T0 + ORPHAN_KEEP_S - 1) == 0
    assert wl.add_flag(early, "xray-1", received=T0 + 10).heatmap is True
    assert wl.prune_heatmaps(now=T0 + ORPHAN_KEEP_S + 1) == 1
    assert wl.heatmap(never["event_id"]) is None and wl.heatmap(early["event_id"]) is not None


def test_heat_maps_without_a_flag_are_capped(wl):
    ids = [f"orphan-{i:04d}" for i in range(MAX_ORPHANS + 5)]
    for i, event_id in enumerate(ids):
        wl.add_heatmap(event_id, "xray-1", png(), received=T0 + i)
    kept = {e for (e,) in wl.db.execute("SELECT event_id FROM heatmaps")}
    assert kept == set(ids[5:])  # the newest MAX_ORPHANS


@pytest.mark.parametrize("change", [
    {"priority": "critical"}, {"probability": 1.5}, {"probability": "0.9"}, {"event_id": ""}, {"file": None},
])
def test_a_flag_that_breaks_the_contract_is_refused(wl, change):
    with pytest.raises(BadMessage):
        wl.add_flag(flag(**change), "xray-1")
    assert wl.rows() == []


def test_device_states_online_offline_silent(wl):
    wl.set_status("a", "online", received=T0 - 100)
    wl.set_stats("a", {"at": utc_iso(T0 - 1), "scored": {"urgent": 2, "routine": 3}, "errors": 1,
                       "queue_depth": 0, "latency_ms": {"p50": 12.5}, "secret": "x"}, retained=False, received=T0 - 1)
    wl.set_status("b", "offline", received=T0)
    wl.set_status("c", "online", received=T0 - 100)
    wl.set_stats("c", {"at": utc_iso(T0 - 50)}, retained=False, received=T0 - 50)
    wl.set_stats("d", {"at": utc_iso(T0)}, retained=False, received=T0)
    states = {d.device: d for d in wl.devices(silent_after=30, now=T0)}
    assert {k: v.state for k, v in states.items()} == {"a": "online", "b": "offline", "c": "silent", "d": "unknown"}
    assert states["a"].stats == {"scored": 5, "errors": 1, "queue_depth": 0, "p50_ms": 12.5}
    with pytest.raises(BadMessage):
        wl.set_status("a", "rebooting")


def test_a_retained_stats_message_counts_from_its_own_time(wl):
    wl.set_status("a", "online", received=T0)
    wl.set_stats("a", {"at": utc_iso(T0 - 3600)}, retained=True, received=T0)
    assert wl.devices(silent_after=180, now=T0)[0].state == "silent"
    wl.set_stats("a", {"at": utc_iso(T0)}, retained=False, received=T0)
    assert wl.devices(silent_after=180, now=T0)[0].state == "online"


def test_the_worklist_and_the_session_secret_survive_a_reopen(tmp_path):
    path = tmp_path / "station.db"
    first = Worklist(path)
    payload = flag()
    first.add_flag(payload, "xray-1", received=T0)
    secret = first.secret()
    first.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = Worklist(path)
    assert [r.event_id for r in again.rows(now=T0)] == [payload["event_id"]]
    assert again.secret() == secret
    again.close()


def test_errors_newest_first_and_deduplicated(wl):
    for i in range(3):
        wl.add_error({"event_id": f"e{i}", "device": "xray-1", "file": f"f{i}", "reason": "truncated",
                      "message": "cut short", "at": utc_iso(T0 + i)}, "xray-1", received=T0 + i)
    assert wl.add_error({"event_id": "e1", "file": "again"}, "xray-1") is None
    assert [e.event_id for e in wl.errors()] == ["e2", "e1", "e0"]


def test_topics_route_to_kinds():
    assert classify("pneumoflag", "pneumoflag/xray-1/flags/urgent") == ("flag", "xray-1")
    assert classify("pneumoflag", "pneumoflag/xray-1/acks") == ("ack", "xray-1")
    assert classify("pneumoflag", "pneumoflag/xray-1/escalations") == ("escalation", "xray-1")
    assert classify("pneumoflag", "pneumoflag/xray-1/heatmaps/4f0c-aa") == ("heatmap", "xray-1")
    assert classify("pneumoflag", "pneumoflag/xray-1/heatmaps") is None
    assert classify("pneumoflag", "pneumoflag/xray-1/selftest") is None
    assert classify("pneumoflag", "other/xray-1/status") is None


# ----------------------------------------------------------------------------- exposure and sessions


def _settings(tmp_path, **station) -> StationSettings:
    overrides = {f"station.{k}": v for k, v in station.items()}
    return StationSettings.from_config(load_config(env={}, overrides={"state.dir": str(tmp_path), **overrides}))


def test_loopback_needs_no_password_anything_else_does(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("ward-station.example")
    _settings(tmp_path).check_exposure()
    exposed = _settings(tmp_path, listen="0.0.0.0:8080")
    with pytest.raises(StationError, match="password_file.*--insecure"):
        exposed.check_exposure()
    _settings(tmp_path, listen="0.0.0.0:8080", insecure=True).check_exposure()
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    with_password = _settings(tmp_path, listen="0.0.0.0:8080", password_file=str(pw))
    with_password.check_exposure()
    assert with_password.password == "correct horse battery"
    pw.write_text("short")
    with pytest.raises(StationError, match="fewer than 8"):
        _settings(tmp_path, password_file=str(pw))


def test_station_id_is_checked_and_names_the_database_and_client(tmp_path):
    s = _settings(tmp_path, station_id="desk-a")
    assert s.db_path == tmp_path / "station-desk-a.db"
    assert s.client_id == "pneumoflag-station-desk-a"
    with pytest.raises(StationError, match="station_id"):
        _settings(tmp_path, station_id="desk/a")


def test_sessions_are_signed_expire_and_end_with_a_new_password():
    guard = Guard("desk-a", "correct horse battery", b"k" * 32)
    session = guard.new_session()
    body, _, sig = session.rpartition(".")
    tampered = body + "." + ("0" if sig[0] != "0" else "1") + sig[1:]
    old_body = f"{int(time.time() - SESSION_TTL_S - 5)}.abc"
    expired = f"{old_body}.{guard._sign(old_body)}"

    class Req:  # the one attribute Guard.session reads
        def __init__(self, value: str):
            self.cookies = {guard.cookie_name: value}

    assert guard.session(Req(session)) == session
    assert guard.session(Req(tampered)) is None
    assert guard.session(Req(expired)) is None
    assert Guard("desk-a", "another password", b"k" * 32).session(Req(session)) is None
    guard.revoke(session)
    assert guard.session(Req(session)) is None
    assert guard.csrf_token(session) != guard.csrf_token(guard.new_session())
    assert guard.password_ok("correct horse battery") and not guard.password_ok("correct horse")


# ----------------------------------------------------------------------------- the CLI plug-in


def test_station_is_a_subcommand_that_explains_itself():
    out = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "--help"], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and re.search(r"^  station +web console", out.stdout, re.M)
    out = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "station", "--help"], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for words in ("--password-file", "--insecure", "--listen", "--station-id", "persistent MQTT session"):
        assert words in out.stdout


def test_the_device_package_never_imports_the_station():
    offenders = [p.name for p in (REPO / "device").glob("*.py")
                 if "pneumoflag.station" in p.read_text() or "from ..station" in p.read_text()]
    assert offenders == []
    code = ("import sys, pneumoflag.device.daemon, pneumoflag.device.alerts, pneumoflag.device.publisher;"
            "print([m for m in sys.modules if m.startswith('pneumoflag.station')])")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_static_files_ship_with_the_package_and_fetch_nothing_from_elsewhere():
    static = REPO / "station" / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["index.html", "login.html", "station.js", "style.css"]
    for p in static.iterdir():
        text = p.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, p.name
    js = (static / "station.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_the_readme_lists_every_station_key():
    from dataclasses import fields

    from pneumoflag.device.config import StationConfig

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Nursing station"):]
    section = section[:section.index("\n## ")]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `") and "[" not in line}
    assert listed == {f.name for f in fields(StationConfig)}


@pytest.mark.parametrize("event_id, valid", [
    (str(uuid.uuid4()), True), ("ok_id-2", True), ("a" * 128, True),
    ("a.b", False), ("urn:x", False), ("a/b", False), ("-a", False), ("a" * 129, False),
])
def test_the_daemon_and_the_station_accept_the_same_event_ids(wl, event_id, valid):
    """An ack the station sends is one the daemon takes, and the ids the daemon refuses the station refuses too."""
    ack = json.dumps({"schema": "pneumoflag.ack/1", "event_id": event_id, "station": "desk-a", "by": "Ada",
                      "at": "2026-11-26T10:00:00.000Z"}).encode()
    if valid:
        assert parse_ack(ack)["event_id"] == event_id
        wl.add_heatmap(event_id, "xray-1", png())  # kept as an orphan until its flag comes
    else:
        with pytest.raises(AckError, match="not an event id"):
            parse_ack(ack)
        with pytest.raises(BadMessage, match="event id"):
            wl.add_heatmap(event_id, "xray-1", png())


def _study(uid: str, images: int, rejected: tuple = (), closed: bool = False) -> dict:
    return {"uid": uid, "images": images, "rejected": [{"file": f, "reason": r} for f, r in rejected],
            "closed": closed}


def _news(flag_id: str | None, study: dict, device: str = "xray-1", at: float = T0) -> dict:
    return {"schema": "pneumoflag.study/1", "event_id": str(uuid.uuid4()), "device": device, "study": study,
            "flag": flag_id, "priority": "routine", "at": utc_iso(at)}


def test_a_studys_news_updates_its_flags_row_in_place_and_an_older_copy_changes_nothing(wl):
    uid = "1.2.826.0.1.3680043.2.1125.7"
    payload = flag("routine", study=_study(uid, 1))
    row = wl.add_flag(payload, "xray-1", received=T0)
    assert row.study == _study(uid, 1)
    two = _news(payload["event_id"], _study(uid, 2), at=T0 + 1)
    assert wl.add_study_update(two, "xray-1").study == _study(uid, 2)
    refused = _news(payload["event_id"], _study(uid, 2, (("lat.dcm", "not-a-radiograph"),)), at=T0 + 2)
    assert wl.add_study_update(refused, "xray-1").study["rejected"] == [{"file": "lat.dcm",
                                                                         "reason": "not-a-radiograph"}]
    assert wl.add_study_update(two, "xray-1") is None  # delivered again after the newer one: older, ignored
    closed = _news(payload["event_id"], _study(uid, 2, (("lat.dcm", "not-a-radiograph"),), closed=True), at=T0 + 3)
    assert wl.add_study_update(closed, "xray-1").study["closed"] is True
    assert wl.add_study_update(refused, "xray-1") is None  # the open one again, with the same counts: older
    assert wl.row(payload["event_id"]).study["closed"] is True
    hostile = _news(payload["event_id"], _study(uid, 10**6), at=T0 + 3.5)
    wl.add_study_update(hostile, "xray-1")  # a count no device has: the next genuine news still counts
    genuine = _news(payload["event_id"], _study(uid, 3, closed=True), at=T0 + 4)
    assert wl.add_study_update(genuine, "xray-1").study["images"] == 3
    assert [r.event_id for r in wl.rows(now=T0)] == [payload["event_id"]]  # still one row, still open
    assert wl.rows(now=T0)[0].ack is None and wl.rows(now=T0)[0].superseded_by is None


def test_a_studys_news_that_comes_before_its_flag_is_shown_when_the_flag_comes(wl):
    uid = "1.2.826.0.1.3680043.2.1125.17"
    payload = flag("routine", study=_study(uid, 1))
    early = _news(payload["event_id"], _study(uid, 2, closed=True), at=T0 + 5)
    assert wl.add_study_update(early, "xray-1") is None  # no row to show it on yet: kept
    assert wl.add_flag(payload, "xray-1", received=T0 + 6).study == _study(uid, 2, closed=True)


def test_a_studys_news_for_another_study_or_a_flag_without_one_is_refused(wl):
    uid = "1.2.826.0.1.3680043.2.1125.8"
    payload = flag("routine", study=_study(uid, 1))
    wl.add_flag(payload, "xray-1", received=T0)
    with pytest.raises(BadMessage, match="not the flag's"):
        wl.add_study_update(_news(payload["event_id"], _study("9.9.9", 5)), "xray-1")
    plain = flag("urgent")  # a JPEG's flag: no study
    wl.add_flag(plain, "xray-1", received=T0)
    with pytest.raises(BadMessage, match="without a study"):
        wl.add_study_update(_news(plain["event_id"], _study(uid, 3, (("<b>x</b>", "x"),))), "xray-1")
    assert wl.row(plain["event_id"]).study is None and wl.row(payload["event_id"]).study == _study(uid, 1)
    assert wl.add_study_update(_news(None, _study(uid, 0, (("a.dcm", "dicom-body-part"),))), "xray-1") is None
    other = _news(payload["event_id"], _study(uid, 5), device="xray-2")
    assert wl.add_study_update(other, "xray-2") is None  # its flag is xray-1's: kept apart, never shown on it
    assert wl.row(payload["event_id"]).study == _study(uid, 1)
    early = _news(str(uuid.uuid4()), _study("1.2.3", 4))
    wl.add_study_update(early, "xray-1")  # news whose flag never comes is kept a day, at most 1,000 of them
    assert wl._prune_flagless("study_news", T0 + 10**9, 1000) >= 1


@pytest.mark.parametrize("change, why", [
    (lambda m: m.pop("study"), "'study' is missing"),
    (lambda m: m["study"].update(rejected=[{"file": "x", "reason": "r"}] * 33), "at most 32"),
    (lambda m: m["study"].update(closed="yes"), "'closed' must be true or false"),
    (lambda m: m["study"].update(images=-1), "images"),
    (lambda m: m.update(priority="panic"), "is not one of"),
    (lambda m: m.update(flag="not an id"), "flag"),
])
def test_a_bad_study_update_is_refused_with_its_reason(wl, change, why):
    msg = _news(str(uuid.uuid4()), _study("1.2.3", 1))
    change(msg)
    with pytest.raises(BadMessage, match=why):
        wl.add_study_update(msg, "xray-1")
