"""The message contract's bounded parser and field validators (device/contract.py), and the worklist's use of
them: what a hostile publisher can send is refused with a reason, or stored bounded; what an older version
stored that no longer validates is skipped. Real SQLite files, no mocks."""
from __future__ import annotations

import json
import logging
import sqlite3
import uuid

import pytest
from pneumoflag.device import contract
from pneumoflag.device.contract import MAX_DEPTH, MAX_MESSAGE_BYTES, MAX_TEXT, AckMessage, ContractError, utc_iso
from pneumoflag.device.escalation import AckError, parse_ack
from pneumoflag.station.service import AckRefused, clean_name
from pneumoflag.station.worklist import MAX_ORPHAN_ACKS, BadMessage, Worklist

T0 = 1_800_000_000.0


def flag(**extra) -> dict:
    return {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-1",
            "file": f"{uuid.uuid4().hex[:8]}.jpeg", "sha256": "0" * 64, "probability": 0.9, "priority": "urgent",
            "scored_at": utc_iso(T0 - 59.5), "written_at": utc_iso(T0 - 60), **extra}


@pytest.fixture
def wl(tmp_path) -> Worklist:
    w = Worklist(tmp_path / "station.db")
    yield w
    w.close()


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("raw, why", [
    (b"[" * 50_000 + b"]" * 50_000, "nested deeper"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
    (b'{"f": "' + b"x" * 500_000 + b'"}', "byte limit"),
    (b'{"errors": NaN}', "NaN is not a number"),
    (b'{"uptime_s": Infinity}', "Infinity is not a number"),
    (b'{"uptime_s": -Infinity}', "Infinity is not a number"),
    (b'{"scored": 1e400}', "out of range"),
    (b'{"escalation": ' + str(10**30).encode() + b"}", "integer of 31 digits"),
    (b'{"scored": ' + str(10**400).encode() + b"}", "integer of 401 digits"),
    (b'{"file": "x\\ud800.jpeg"}', "lone surrogate"),
    (b'{"x\\udfff": 1}', "lone surrogate"),
    (b'{"a": ["ok", ["\\ud800"]]}', "lone surrogate"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"a": 1', "not JSON"),
])
def test_the_parser_refuses_with_a_reason(raw, why):
    with pytest.raises(ContractError, match=why):
        contract.loads(raw, max_bytes=max(MAX_MESSAGE_BYTES, 400_000))


def test_the_parser_takes_what_the_contract_allows():
    # brackets inside strings do not count as nesting; escaped quotes do not end a string
    raw = json.dumps({"file": "[[[[" * 1000 + '"\\', "n": [[[1]]], "p": 0.25, "i": 10**17, "t": "caf\u00e9 \U0001F600"})
    assert contract.loads(raw.encode())["file"].startswith("[[[[")
    assert contract.loads(raw)["i"] == 10**17
    assert contract.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert contract.loads(b'{"file": "x\\ud800"}', check_text=False)["file"] == "x\ud800"  # the terminal's reading
    with pytest.raises(ContractError, match="not a JSON object"):
        contract.loads_object(b"[1]")


def test_dumps_never_writes_nan():
    assert contract.dumps({"a": 1.5}) == '{"a":1.5}'
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            contract.dumps({"a": bad})


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("value, why", [
    ("0001-01-01T00:00:00+14:00", "convert"),  # year 0 in UTC: Python cannot hold it
    ("9999-12-31T23:59:59-14:00", "convert"),  # year 10000 in UTC
    ("1900-01-01T00:00:00Z", "outside the years"),
    ("9500-01-01T00:00:00Z", "outside the years"),
    ("yesterday", "not an ISO 8601 date"),
])
def test_dates_outside_sane_years_are_refused(value, why):
    with pytest.raises(ContractError, match=why):
        contract.when({"at": value}, "at")


def test_field_validators():
    assert contract.when({"at": "2026-12-01T10:00:00.000Z"}, "at")[1] == pytest.approx(1796119200.0)
    assert contract.when({}, "at") == (None, None)
    assert contract.text({"f": "x" * 5000}, "f") == "x" * MAX_TEXT  # over-long text is cut to what is shown
    with pytest.raises(ContractError, match="lone surrogate"):
        contract.text({"f": "x\ud800"}, "f")
    with pytest.raises(ContractError, match="non-empty string"):
        contract.text({"f": 3}, "f")
    with pytest.raises(ContractError, match="not a number in"):
        contract.number({"p": float("nan")}, "p", 0, 1)
    with pytest.raises(ContractError, match="not a number in"):
        contract.number({"p": True}, "p", 0, 1)
    with pytest.raises(ContractError, match="whole number"):
        contract.integer({"e": 10**30}, "e", 1, 1000)
    with pytest.raises(ContractError, match="not of the form"):
        contract.event_id({"event_id": "a" * 129}, "event_id")  # never cut: a cut id would be another event's


def test_the_nurses_name_must_be_encodable():
    assert clean_name("  Nurse Ada\x07 ") == "Nurse Ada"
    with pytest.raises(AckRefused, match="not valid text"):
        clean_name("Nurse \ud800")


def test_the_daemons_ack_parser_uses_the_contract():
    good = AckMessage(str(uuid.uuid4()), "desk-a", "Ada").to_dict()
    assert parse_ack(json.dumps(good).encode())["by"] == "Ada"
    for raw, why in ((b"[" * 100_000, "over the 4096 byte limit"), (b"[" * 2000 + b"]" * 2000, "nested deeper"),
                     (json.dumps({**good, "by": "\ud800"}).encode(), "lone surrogate"),
                     (json.dumps({**good, "n": float("nan")}).encode(), "NaN")):
        with pytest.raises(AckError, match=why):
            parse_ack(raw)


def test_refusals_are_logged_rate_limited_and_counted(caplog):
    refused = contract.RateLimitedLog(logging.getLogger("test.contract"), every=3600, burst=3)
    with caplog.at_level(logging.WARNING, "test.contract"):
        for _ in range(500):
            refused.refused("flag", "bad \ud800 \x1b[2J", "pneumoflag/evil/flags/urgent")
        assert len(caplog.records) == 3 and "\x1b" not in caplog.text and "not logged for 3600 s" in caplog.text
        refused._window -= 3600  # the next window
        refused.refused("ack", "bad", "pneumoflag/evil/acks")
    assert "497 more refused unlogged" in caplog.records[-1].getMessage()
    assert refused.counts == {"flag": 500, "ack": 1} and refused.total == 501


# ----------------------------------------------------------------------------- the worklist's use


def test_a_flag_with_an_unconvertible_date_is_refused(wl):
    with pytest.raises(BadMessage, match="convert"):
        wl.add_flag(flag(written_at="0001-01-01T00:00:00+14:00"), "xray-1", received=T0)
    with pytest.raises(BadMessage, match="whole number"):
        wl.add_escalation({"event_id": str(uuid.uuid4()), "escalation": 10**30, "flag": flag()}, "xray-1")
    assert wl.rows(now=T0) == []


def test_an_ack_counts_only_on_the_flags_own_device(wl):
    f = flag()
    wl.add_flag(f, "xray-1", received=T0)
    at = utc_iso(T0)
    wl.add_ack(AckMessage(f["event_id"], "desk-a", "Mallory", at=at).to_dict(), "xray-2", received=T0)
    assert wl.row(f["event_id"]).ack is None  # xray-1 never heard of that ack: the row stays open
    # the same station and time on the right topic is another ack, not a repeat of the first
    assert wl.add_ack(AckMessage(f["event_id"], "desk-a", "Ada", at=at).to_dict(), "xray-1") == f["event_id"]
    assert wl.row(f["event_id"]).ack.by == "Ada"


def test_an_acks_table_from_before_devices_is_rebuilt_and_keeps_its_acks(tmp_path):
    f = flag()
    with sqlite3.connect(tmp_path / "station.db") as db:
        db.execute("CREATE TABLE acks (event_id TEXT NOT NULL, station TEXT NOT NULL, by_name TEXT NOT NULL, "
                   "at TEXT NOT NULL, received_epoch REAL NOT NULL, PRIMARY KEY (event_id, station, at))")
        db.execute("INSERT INTO acks VALUES (?, 'desk-a', 'Ada', ?, ?)", (f["event_id"], utc_iso(T0), T0))
    wl = Worklist(tmp_path / "station.db")
    try:
        assert wl.add_flag(f, "xray-1", received=T0).ack.by == "Ada"  # an old ack counts (its device unknown)
    finally:
        wl.close()


def test_a_flag_whose_device_disagrees_with_its_topic_is_refused(wl):
    with pytest.raises(BadMessage, match="in its topic"):
        wl.add_flag(flag(device="xray-2"), "xray-1")


def test_the_same_event_id_from_another_device_is_refused(wl):
    f = flag()
    wl.add_flag(f, "xray-1", received=T0)
    with pytest.raises(BadMessage, match="already a flag of device 'xray-1'"):
        wl.add_flag({**f, "device": "xray-2", "file": "other.jpeg"}, "xray-2", received=T0)
    assert wl.row(f["event_id"]).file == f["file"]
    assert wl.add_flag(dict(f), "xray-1", received=T0 + 1) is None  # a repeat from its own device: no change


def test_acks_for_unknown_flags_are_capped(wl):
    for i in range(MAX_ORPHAN_ACKS + 200):
        wl.add_ack(AckMessage(f"unknown-{i}", "desk-a", "Eve", at=utc_iso(T0)).to_dict(), "xray-1",
                   received=T0 + i)
    (n,) = wl.db.execute("SELECT COUNT(*) FROM acks").fetchone()
    assert n == MAX_ORPHAN_ACKS
    known = flag()
    wl.add_flag(known, "xray-1", received=T0)
    wl.add_ack(AckMessage(known["event_id"], "desk-a", "Ada").to_dict(), "xray-1")
    for i in range(50):  # more orphans never push out the ack of a flag this station has
        wl.add_ack(AckMessage(f"later-{i}", "desk-a", "Eve", at=utc_iso(T0)).to_dict(), "xray-1",
                   received=T0 + 10_000 + i)
    assert wl.row(known["event_id"]).ack.by == "Ada"


def test_the_stored_payload_is_bounded(wl):
    f = flag(file="f" * 50_000 + ".jpeg", note="n" * 10_000)
    row = wl.add_flag(f, "xray-1", received=T0)
    assert row.file == "f" * MAX_TEXT
    (payload,) = wl.db.execute("SELECT payload FROM flags WHERE event_id = ?", (f["event_id"],)).fetchone()
    assert len(payload) < 3 * MAX_TEXT


def test_rows_an_older_version_stored_that_no_longer_validate_are_skipped(tmp_path):
    wl = Worklist(tmp_path / "station.db")
    good = flag()
    wl.add_flag(good, "xray-1", received=T0)
    wl.set_status("xray-1", "online", received=T0)
    wl.close()
    with sqlite3.connect(tmp_path / "station.db") as db:  # what the old code let in
        db.execute("INSERT INTO flags (event_id, device, priority, rank, probability, file, written_at, "
                   "received_at, sort_epoch, payload) VALUES ('old-bad', 'xray-1', 'urgent', 0, 0.9, 'f.jpeg', "
                   "'0001-01-01T00:00:00+14:00', ?, -62135647200.0, '{}')", (utc_iso(T0),))
        db.execute("INSERT INTO devices (device, status, status_epoch, stats, stats_epoch) "
                   "VALUES ('evil', 'online', ?, '{\"errors\": NaN, \"uptime_s\": Infinity}', ?)", (T0, T0))
    wl = Worklist(tmp_path / "station.db")
    try:
        assert [r.event_id for r in wl.rows(now=T0)] == [good["event_id"]]
        assert wl.row("old-bad") is None
        states = {d.device: d for d in wl.devices(silent_after=30, now=T0)}
        assert states["evil"].stats == {}
        contract.dumps([r.to_json() for r in wl.rows(now=T0)] + [d.to_json() for d in states.values()])
    finally:
        wl.close()


def test_stats_figures_out_of_range_are_left_out(wl):
    wl.set_stats("a", {"scored": {"urgent": 1e300, "routine": 1e300}, "errors": 2, "uptime_s": 1e300},
                 retained=False, received=T0)
    assert wl.devices(silent_after=30, now=T0)[0].stats == {"errors": 2}
