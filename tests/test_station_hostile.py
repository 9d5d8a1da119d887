"""No message can silence a nursing station: a real station process, a real Mosquitto and Debian's chromium,
fed what a hostile publisher (or a broken one) sends, retained too, before and after a restart.

Each poison, on the old code, stopped a page from showing new flags: a deeply nested message killed paho's
thread; a text or number the station could not store left the message unacknowledged until the broker's
in-flight window (20) was full; ``NaN`` reached the browser's ``JSON.parse``; a date Python cannot convert made
every snapshot fail. After all of them, a new flag must still show in a real browser, and after a restart.
"""
from __future__ import annotations

import json
import sqlite3
import uuid

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import free_port, wait_until
from pneumoflag.device.contract import utc_now as now_iso
from test_station import StationProc, new_browser, open_page, page_rows, request, wait_row

pytestmark = pytest.mark.slow

DEEP = b"[" * 50_000 + b"]" * 50_000
WINDOW = 25  # more than Mosquitto's in-flight window (max_inflight_messages 20)


def flag(device: str, file: str, **extra) -> dict:
    return {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": device, "file": file,
            "sha256": "0" * 64, "probability": 0.9, "priority": "urgent", "scored_at": now_iso(), **extra}


def publish_all(broker: str, messages: list[tuple[str, bytes, bool]]) -> None:
    """(topic, payload, retain) in order, QoS 1, over one connection (the broker keeps their order)."""
    host, port = broker.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hostile-{uuid.uuid4().hex[:8]}")
    client.connect(host, int(port))
    client.loop_start()
    try:
        for topic, payload, retain in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def raw_json(text: str) -> bytes:
    """JSON as a hostile publisher writes it: ``\\ud800`` escapes, NaN, numbers of any size are left as written."""
    return text.encode()


def poisons(now: str) -> list[tuple[str, bytes, bool]]:
    """Items 1-4 of issue 14, retained where the issue says a retained copy kills every new station too."""
    eid = lambda: str(uuid.uuid4())  # noqa: E731
    surrogate_flag = ('{"schema":"pneumoflag.flag/1","event_id":"%s","device":"evil-f","file":"x\\ud800.jpeg",'
                      '"sha256":"0","probability":0.9,"priority":"urgent","scored_at":"%s"}')
    big_escalation = ('{"schema":"pneumoflag.escalation/1","event_id":"%s","device":"evil-g","escalation":%d,'
                      '"max_escalations":3,"unacknowledged_s":1,"flag":{"event_id":"x"},"at":"%s"}')
    surrogate_ack = '{"schema":"pneumoflag.ack/1","event_id":"%s","station":"s","by":"Nurse \\ud800","at":"%s"}'
    out = [
        ("pneumoflag/evil-a/stats", DEEP, True),  # 1: nesting, retained
        ("pneumoflag/evil-b/flags/urgent", DEEP, True),
        ("pneumoflag/evil-a/acks", DEEP, False),
        ("pneumoflag/evil-c/stats", raw_json('{"errors": NaN, "uptime_s": Infinity, "at": "%s"}' % now), True),  # 3
        ("pneumoflag/evil-c/flags/urgent", raw_json(json.dumps(flag("evil-c", "nan.jpeg"))
                                                    .replace('"probability": 0.9', '"probability": NaN')), True),
        ("pneumoflag/evil-d/flags/urgent",  # 4: a date Python cannot convert, retained
         json.dumps(flag("evil-d", "year-one.jpeg", written_at="0001-01-01T00:00:00+14:00")).encode(), True),
        ("pneumoflag/evil-e/stats", raw_json('{"scored": %d, "at": "%s"}' % (10**400, now)), True),
    ]
    for _ in range(WINDOW):  # 2: more than the in-flight window of messages the old code could not store
        out.append(("pneumoflag/evil-f/flags/urgent", raw_json(surrogate_flag % (eid(), now)), False))
        out.append(("pneumoflag/evil-g/escalations", raw_json(big_escalation % (eid(), 10**30, now)), False))
        out.append(("pneumoflag/evil-h/acks", raw_json(surrogate_ack % (eid(), now)), False))
    return out


def strict_state(station: StationProc) -> dict:
    """/api/state as a browser's JSON.parse reads it: a bare NaN or Infinity is an error."""
    status, _, body = request("GET", station.url + "/api/state")
    assert status == 200, body[:500]

    def refuse(name: str):
        raise AssertionError(f"/api/state carries {name}")

    return json.loads(body, parse_constant=refuse)


def show_new_flag(broker: str, driver, file: str) -> dict:
    """Publish a good flag and wait for its row in the browser (the proof that delivery goes on)."""
    f = flag("xray-1", file)
    publish_all(broker, [("pneumoflag/xray-1/flags/urgent", json.dumps(f).encode(), False)])
    wait_row(driver, file, timeout=30, what="(a new flag after the poisons)")
    return f


def surrogate_acks_from_the_page(driver, event_id: str, n: int) -> list[int]:
    """POST /api/ack from the page itself (its session and CSRF token) ``n`` times, as the nurse "Nurse \\ud800"
    (made in the page: WebDriver cannot carry a lone surrogate); the HTTP statuses."""
    return driver.execute_async_script("""
        const [eventId, n, done] = arguments;
        const name = 'Nurse ' + String.fromCharCode(0xD800);
        (async () => {
          const state = await (await fetch('/api/state', {credentials: 'same-origin'})).json();
          const codes = [];
          for (let i = 0; i < n; i++) {
            const r = await fetch('/api/ack', {method: 'POST', credentials: 'same-origin',
              headers: {'Content-Type': 'application/json', 'X-CSRF-Token': state.csrf},
              body: JSON.stringify({event_id: eventId, by: name})});
            codes.push(r.status);
          }
          done(codes);
        })().catch(e => done(String(e)));""", event_id, n)


def poison_the_database(db) -> None:
    """What an older version stored and the contract now refuses: a year-one flag, NaN figures."""
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO flags (event_id, device, priority, rank, probability, file, written_at, "
                    "received_at, sort_epoch, payload) VALUES (?, 'xray-1', 'urgent', 0, 0.9, 'stored-old.jpeg', "
                    "'0001-01-01T00:00:00+14:00', ?, -62135647200.0, '{}')", (str(uuid.uuid4()), now_iso()))
        con.execute("INSERT OR REPLACE INTO devices (device, status, status_epoch, stats, stats_epoch) "
                    "VALUES ('evil-old', 'online', 1.8e9, '{\"errors\": NaN}', 1.8e9)")


def test_no_poisoned_message_silences_a_station_page(tmp_path, broker):
    station = StationProc(tmp_path, broker.address, "hostile")
    driver = None
    try:
        station.start()
        driver = new_browser()
        open_page(driver, station.url)
        first = show_new_flag(broker.address, driver, "before-the-poisons.jpeg")

        publish_all(broker.address, poisons(now_iso()))
        show_new_flag(broker.address, driver, "after-the-poisons.jpeg")
        state = strict_state(station)
        assert not {r["file"] for r in state["rows"]} & {"year-one.jpeg", "nan.jpeg", "x\ud800.jpeg"}
        assert state["refused"].get("flag", 0) >= WINDOW and state["refused"].get("ack", 0) >= WINDOW
        assert "dropped a" in station.output()

        # the station's own acknowledge path, with a name that cannot be encoded: refused, not published
        codes = surrogate_acks_from_the_page(driver, first["event_id"], WINDOW)
        assert codes == [400] * WINDOW, codes
        show_new_flag(broker.address, driver, "after-the-acks.jpeg")
        assert next(r for r in page_rows(driver) if r["file"] == "before-the-poisons.jpeg")["status"] != "acknowledged"

        # a restart: the retained poisons come again, and the database holds rows an older version stored
        assert station.terminate() == 0
        poison_the_database(station.db)
        before = station.output().count("subscribed to")
        station.start()  # (its log goes on in the same file: wait for the new run's subscriptions)
        wait_until(lambda: station.output().count("subscribed to") > before, 30, "the restarted station")
        open_page(driver, station.url)
        wait_row(driver, "after-the-acks.jpeg", timeout=15, what="(kept over the restart)")
        show_new_flag(broker.address, driver, "after-the-restart.jpeg")
        state = strict_state(station)
        assert "stored-old.jpeg" not in {r["file"] for r in state["rows"]}
        assert "no longer validates" in station.output()
        assert not [e for e in driver.get_log("browser") if "SyntaxError" in e["message"]]

        # and a new station on the same broker (retained poisons from its first subscription) shows flags too
        fresh = StationProc(tmp_path, broker.address, "fresh")
        try:
            fresh.start()
            open_page(driver, fresh.url)
            show_new_flag(broker.address, driver, "on-a-new-station.jpeg")
            strict_state(fresh)
        finally:
            fresh.close()
    finally:
        if driver is not None:
            driver.quit()
        station.close()


def test_acks_count_only_on_the_flags_device_and_a_clashing_event_id_is_refused(tmp_path, broker):
    station = StationProc(tmp_path, broker.address, "acks")
    try:
        station.start()
        mine = flag("dev-a", "mine.jpeg")
        ack = {"schema": "pneumoflag.ack/1", "event_id": mine["event_id"], "station": "x", "by": "Mallory",
               "at": now_iso()}
        clash = {**flag("dev-b", "clash.jpeg"), "event_id": mine["event_id"]}
        marker = flag("dev-a", "marker.jpeg")
        publish_all(broker.address, [
            ("pneumoflag/dev-a/flags/urgent", json.dumps(mine).encode(), False),
            ("pneumoflag/dev-b/acks", json.dumps(ack).encode(), False),  # dev-a never hears of this one
            ("pneumoflag/dev-b/flags/urgent", json.dumps(clash).encode(), False),
            ("pneumoflag/dev-a/flags/urgent", json.dumps(marker).encode(), False),  # all the above are handled
        ])
        wait_until(lambda: any(r["file"] == "marker.jpeg" for r in strict_state(station)["rows"]), 20, "the marker")
        state = strict_state(station)
        (row,) = [r for r in state["rows"] if r["event_id"] == mine["event_id"]]
        assert row["ack"] is None and row["device"] == "dev-a" and row["file"] == "mine.jpeg"
        assert state["refused"].get("flag") == 1
        assert "already a flag of device 'dev-a'" in station.output()

        publish_all(broker.address, [("pneumoflag/dev-a/acks", json.dumps({**ack, "by": "Ada"}).encode(), False)])
        wait_until(lambda: (next(r for r in strict_state(station)["rows"] if r["event_id"] == mine["event_id"])
                            ["ack"] or {}).get("by") == "Ada", 20, "the ack on the flag's own device")
    finally:
        station.close()


def test_a_station_without_a_broker_says_why(tmp_path):
    port = free_port()  # nothing listens there
    station = StationProc(tmp_path, f"127.0.0.1:{port}", "lonely")
    try:
        station.start(ready="connection refused")
        assert f"cannot connect to 127.0.0.1:{port}: connection refused" in station.output()
        assert station.output().count("connection refused") == 1  # once per cause, not at every retry
        status, _, body = request("GET", station.url + "/api/state")
        assert "connection refused" in json.loads(body)["link"]["text"]
    finally:
        station.close()
