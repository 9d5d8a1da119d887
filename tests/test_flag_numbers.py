"""Flag numbers: each device numbers its flags without gaps, a station that missed some says so and gets
them back from the device (issue: a station offline while its broker's queue overflowed missed the newest).

Real parts: Mosquitto with a tiny ``max_queued_messages``, the real daemon, a real station process, Chromium.
"""
from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
from mqtt_helpers import DaemonProc, Mosquitto, Subscriber, wait_until
from pneumoflag.device.contract import FLAG_SCHEMA, MAX_RESEND, RESEND_SCHEMA, AckMessage, encode
from pneumoflag.device.resend import ResendError, parse_resend
from pneumoflag.device.store import FileSig, FlagRecord, Store
from pneumoflag.station.worklist import Worklist
from test_station import _stop, NORMAL, PNEUMONIA, StationProc, drop_bytes, new_browser, open_page, publish, unique_jpeg

SIG = FileSig(1, 1, 1)


def _flag(store: Store, name: str) -> bytes:
    eid = str(uuid.uuid4())
    payload = encode({"event_id": eid, "file": name, "priority": "routine", "probability": 0.1})
    rec = FlagRecord(eid, "routine", 0.1, payload, None, None, time.time())
    store.record(name, eid, SIG, "routine", event_id=eid, message=("t/flags/routine", payload, 1), flag=rec)
    return eid


def test_the_store_numbers_flags_without_gaps_in_the_message_it_queues(tmp_path):
    store = Store(tmp_path)
    ids = [_flag(store, f"f{i}.jpeg") for i in range(3)]
    store.record("bad.jpeg", "x", SIG, "error", reason="corrupt", event_id="e1",
                 message=("t/errors", b"{}", 1))  # errors are not numbered
    queued = [json.loads(r.payload) for r in store.pending()]
    assert [q["seq"] for q in queued if "seq" in q] == [1, 2, 3]
    assert [q["event_id"] for q in queued if "seq" in q] == ids
    store.close()
    store = Store(tmp_path)  # numbering goes on after a restart
    _flag(store, "f3.jpeg")
    assert json.loads(store.pending()[-1].payload)["seq"] == 4
    assert store.delivered_seq() == 0
    store.ack([r.seq for r in store.pending()])
    assert store.delivered_seq() == 4
    assert [json.loads(p)["seq"] for _, p in store.flags_between(2, 3)] == [2, 3]
    assert all("acked" not in json.loads(p) for _, p in store.flags_between(1, 4))


def test_only_the_in_progress_mark_and_the_outbox_deletion_skip_the_fsync(tmp_path):
    """A result is fsync'd before it is published; the two writes that may be lost to a power cut (a
    resend, a retried decode) skip it, each at its own level under the store's lock, so a result
    journaled meanwhile by another thread never commits at theirs."""
    import threading

    store = Store(tmp_path)
    levels: list[tuple[str, int]] = []
    real = store._transaction

    def traced(fn):
        levels.append((fn.__qualname__.split(".")[1], store._db.execute("PRAGMA synchronous").fetchone()[0]))
        return real(fn)

    store._transaction = traced
    stop = threading.Event()

    def acks():
        while not stop.is_set():
            _flag(store, f"a{len(levels)}-{time.monotonic_ns()}.jpeg")
            store.ack([r.seq for r in store.pending()])

    t = threading.Thread(target=acks)
    t.start()
    try:
        for i in range(200):
            store.begin(f"b{i}.jpeg", "x")
            _flag(store, f"b{i}.jpeg")
    finally:
        stop.set()
        t.join()
    FULL, NORMAL = 2, 1
    by = {}
    for what, level in levels:
        by.setdefault(what, set()).add(level)
    assert by["record"] == {FULL} and by["begin"] == {NORMAL} and by["ack"] == {NORMAL}, by
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == FULL
    store.close()


@pytest.mark.parametrize("raw, why", [
    (b"x" * 2000, "over the 1024 byte limit"), (b"[" * 60 + b"]" * 60, "nested deeper"), (b"[]", "not a JSON object"),
    (json.dumps({"schema": RESEND_SCHEMA, "station": "a/b", "first": 1, "last": 2}).encode(), "station"),
    (json.dumps({"schema": RESEND_SCHEMA, "station": "a", "first": 3, "last": 2}).encode(), "first and last"),
    (json.dumps({"schema": RESEND_SCHEMA, "station": "a", "first": True, "last": 2}).encode(), "first and last"),
    (json.dumps({"schema": RESEND_SCHEMA, "station": "a", "first": 1, "last": 2**55}).encode(), "out of range"),
])
def test_a_resend_request_is_untrusted_input(raw, why):
    with pytest.raises(ResendError, match=why):
        parse_resend(raw)


def test_resend_requests_under_changing_names_cannot_bury_new_flags(tmp_path):
    """A requester that changes its station name every time gets past the per-station limit, not past the cap
    on copies waiting in the outbox (a new flag would queue behind them)."""
    from pneumoflag.device.config import load_config
    from pneumoflag.device.publisher import Publisher
    from pneumoflag.device.resend import MAX_BACKLOG, ResendDesk

    cfg = load_config(env={}, overrides={"state.dir": str(tmp_path), "mqtt.broker": "127.0.0.1:1",
                                         "mqtt.device_id": "xr"})
    store = Store(tmp_path)
    for i in range(MAX_BACKLOG + 100):
        _flag(store, f"f{i}.jpeg")
    store.ack([r.seq for r in store.pending(limit=10_000)])
    desk = ResendDesk(cfg, store, Publisher(cfg, store))  # never connected: what it queues stays queued
    for n in range(40):
        desk._receive(json.dumps({"schema": RESEND_SCHEMA, "station": f"x{n}", "first": 1, "last": MAX_RESEND}).encode())
    for _ in range(10):
        desk.serve_requests()
    assert store.resend_backlog() == MAX_BACKLOG
    replayed = [json.loads(r.payload)["seq"] for r in store.pending(limit=10_000)]
    assert replayed == list(range(1, MAX_BACKLOG + 1))  # the first request, cut to what fits; the rest wait
    store.close()


def test_the_worklist_keeps_what_it_missed(tmp_path):
    wl = Worklist(tmp_path / "w.db")
    wl.set_status("xr", "online")
    wl.note_seq("xr", 10, now=0)  # where this station starts counting: nothing missed before
    assert wl.devices(60)[0].missed == 0
    wl.note_seq("xr", 14, now=0)
    assert wl.devices(60)[0].missed == 3 and wl.devices(60)[0].missed_ranges == [[11, 13]]
    assert wl.missing(older_than=3, now=1) == {}  # queued flags may still be on their way
    assert wl.missing(older_than=3, now=5) == {"xr": (11, 13)}
    wl.note_seq("xr", 12, now=6)  # a copy sent again fills its place
    assert wl.devices(60)[0].missed_ranges == [[11, 11], [13, 13]]
    wl.note_delivered("xr", 16, now=7)  # the newest, dropped by the broker: only stats can tell
    assert wl.devices(60)[0].missed == 4
    for n in (11, 13, 15, 16):
        wl.note_seq("xr", n)
    assert wl.devices(60)[0].missed == 0
    wl.note_seq("xr", 1)  # the device numbers from 1 again (a new state folder): not 15 missed flags
    wl.note_seq("xr", 2)
    assert wl.devices(60)[0].missed == 0


def test_forged_numbers_cannot_hide_or_inflate_what_a_station_missed(tmp_path):
    """Whoever may publish as a device can send any number: none of these may lose a real gap."""
    wl = Worklist(tmp_path / "w.db")
    wl.set_status("xr", "online")
    for n in (1, 2, 3, 5):
        wl.note_seq("xr", n, now=0)
    wl.note_seq("xr", 1, now=1)  # "a new numbering" is not believed while #4 is missing
    assert wl.devices(60)[0].missed_ranges == [[4, 4]]
    wl.note_seq("xr", 2**53, now=1)  # no broker keeps such a backlog: ignored, #4 still asked for
    wl.note_delivered("xr", 10**12, now=1)
    assert wl.devices(60)[0].missed == 1 and wl.missing(older_than=0, now=2) == {"xr": (4, 4)}
    high = 5
    for _ in range(150):  # more gaps than are kept: the closest are merged, the real one stays covered
        high += 2
        wl.note_seq("xr", high, now=1)
    state = wl.devices(60)[0]
    assert state.missed_ranges[0][0] == 4 and wl.missing(older_than=0, now=2)["xr"][0] == 4
    assert state.missed >= 1 + 150  # every number not received is still counted


def test_a_station_that_missed_the_newest_flags_gets_them_back_and_says_so(tmp_path):
    """Mosquitto keeps 3 messages for an absent client; 8 flags come while the station is away."""
    broker = Mosquitto(tmp_path / "broker", extra="allow_anonymous true\nmax_queued_messages 3\n").start()
    export, state = tmp_path / "export", tmp_path / "state"
    export.mkdir()
    state.mkdir()
    parts: list = []
    try:
        daemon = DaemonProc(export, state, broker.address, device_id="xray-q")
        parts.append(daemon)
        daemon.start()
        sub = Subscriber(broker.address, "pneumoflag/+/flags/#")
        parts.append(sub)
        station = StationProc(tmp_path, broker.address, "desk-q")
        parts.append(station)
        station.start()
        page = new_browser()
        parts.append(page)
        open_page(page, station.url)
        drop_bytes(unique_jpeg(NORMAL[0], "first"), export, "first.jpeg")
        sub.wait_flags(1)
        wait_until(lambda: len(_rows(page)) == 1, 15, "the first row")
        assert station.terminate() == 0
        names = [f"away-{i}.jpeg" for i in range(8)]
        for i, name in enumerate(names):
            drop_bytes(unique_jpeg((PNEUMONIA + NORMAL)[i % 8], name), export, name)
        flags = sub.wait_flags(9, timeout=60)
        assert sorted(f["seq"] for f in flags) == list(range(1, 10))  # numbered 1..9, no gaps
        # another desk acknowledges the newest: the broker drops that ack for desk-q too (its queue is full)
        newest = max(flags, key=lambda f: f["seq"])
        ack = AckMessage(event_id=newest["event_id"], station="desk-r", by="Nurse Ro")
        publish(broker.address, "pneumoflag/xray-q/acks", encode(ack.to_dict()))
        wait_until(lambda: "acknowledged by Nurse Ro" in daemon.output(), 20, "the daemon to journal the ack")
        station.start()
        wait_until(lambda: len(_rows(page)) == 9, 60, "every flag on the page again")
        log = station.output()
        assert "never reached this station" in log, log  # the broker really dropped some: they came back
        assert "sent again" in daemon.output()
        assert {r for r in _rows(page)} == {"first.jpeg", *names}
        wait_until(lambda: not _missed(page), 15, "the notice to go")
        rows = {r["event_id"]: r for r in _state(station)["rows"]}  # the copy brought the ack desk-q missed
        assert rows[newest["event_id"]]["ack"] == {"by": "Nurse Ro", "station": "desk-r", "at": rows[
            newest["event_id"]]["ack"]["at"]}
        assert all(r["ack"] is None for e, r in rows.items() if e != newest["event_id"])
    finally:
        for part in reversed(parts):
            _stop(part)
        broker.stop()


def test_the_page_says_which_flags_never_came_and_the_station_asks_for_them(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    parts: list = []
    try:
        requests = Subscriber(broker.address, "pneumoflag/+/resend")
        parts.append(requests)
        station = StationProc(tmp_path, broker.address, "desk-g")
        parts.append(station)
        station.start()
        page = new_browser()
        parts.append(page)
        open_page(page, station.url)
        publish(broker.address, "pneumoflag/ghost/status", b"online")
        for seq in (1, 5):
            flag = {"schema": FLAG_SCHEMA, "event_id": str(uuid.uuid4()), "device": "ghost", "file": f"{seq}.jpeg",
                    "priority": "flag", "probability": 0.97, "seq": seq}
            publish(broker.address, "pneumoflag/ghost/flags/flag", encode(flag))
        wait_until(lambda: "3 flags from ghost not received (#2–4)" in _missed(page), 15, "the notice")
        wait_until(lambda: requests.where(lambda m: True), 15, "the station's resend request")
        req = requests.where(lambda m: True)[0].payload
        assert (req["station"], req["first"], req["last"]) == ("desk-g", 2, 4) and req["last"] - req["first"] < MAX_RESEND
        flag3 = {"schema": FLAG_SCHEMA, "event_id": str(uuid.uuid4()), "device": "ghost", "file": "3.jpeg",
                 "priority": "flag", "probability": 0.97, "seq": 3}
        publish(broker.address, "pneumoflag/ghost/replay/desk-g", encode(flag3))  # the device's answer
        wait_until(lambda: "2 flags from ghost not received (#2, #4)" in _missed(page), 15, "the notice updated")
        assert "3.jpeg" in _rows(page)
    finally:
        for part in reversed(parts):
            _stop(part)
        broker.stop()


def _state(station: StationProc) -> dict:
    with urllib.request.urlopen(station.url + "/api/state", timeout=30) as r:
        return json.loads(r.read())


def _rows(page) -> list[str]:
    """In one script: the page re-renders rows as they come, so elements fetched one by one may go stale."""
    return page.execute_script("return [...document.querySelectorAll('#rows tr td.file')].map(td => td.textContent)")


def _missed(page) -> str:
    return page.execute_script("return [...document.querySelectorAll('#devices .missed')]"
                               ".map(e => e.textContent).join(' ')")
