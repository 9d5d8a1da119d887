"""Acknowledgement, escalation and time-to-notification, daemon side, against the real daemon and Mosquitto."""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from conftest import run_cli
from mqtt_helpers import SHIPPED_MODEL, Subscriber, drop, new_daemon, wait_until
from test_daemon import SAMPLES

PNEUMONIA = sorted((SAMPLES / "PNEUMONIA").glob("*.jpeg"))
NORMAL = sorted((SAMPLES / "NORMAL").glob("*.jpeg"))


def _three_tier_model(tmp_path: Path) -> Path:
    """The shipped model with tiers at p 0.3 and 0.9 (the weights untouched), so each sample's priority is known."""
    model = tmp_path / "model" / SHIPPED_MODEL.name
    model.parent.mkdir()
    shutil.copy(SHIPPED_MODEL, model)
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    card["operating_points"]["flag"]["threshold"] = 0.3
    card["operating_points"]["urgent"]["threshold"] = 0.9
    model.with_suffix(".json").write_text(json.dumps(card))
    return model


def _publish_ack(broker: str, device: str, event_id: str, by: str = "Nurse Ada", station: str = "desk-a") -> None:
    host, port = broker.rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(host, int(port))
    c.loop_start()
    ack = {"schema": "pneumoflag.ack/1", "event_id": event_id, "station": station, "by": by,
           "at": "2026-11-26T10:00:00.000Z"}
    c.publish(f"pneumoflag/{device}/acks", json.dumps(ack), qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def _db(state: Path, sql: str, *args) -> list:
    with sqlite3.connect(state / "pneumoflag.db") as db:
        return db.execute(sql, args).fetchall()


def test_unacknowledged_urgent_flags_escalate_and_acknowledged_ones_do_not(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    env = {"PNEUMOFLAG_ALERTS_ESCALATE_AFTER": "1.5", "PNEUMOFLAG_ALERTS_MAX_ESCALATIONS": "2"}
    d = new_daemon(daemons, watch, state, broker.address, model=_three_tier_model(tmp_path), env=env).start()
    drop(PNEUMONIA[0], watch, "ignored.jpeg")
    drop(PNEUMONIA[1], watch, "answered.jpeg")
    flags = {f["file"]: f for f in sub.wait_flags(2)}
    assert {f["priority"] for f in flags.values()} == {"urgent"}
    _publish_ack(broker.address, "test", flags["answered.jpeg"]["event_id"])
    escalations = lambda: [m.payload for m in sub.where(lambda m: m.topic == "pneumoflag/test/escalations")]  # noqa: E731
    wait_until(lambda: len(escalations()) >= 2, 20, "two escalations")
    time.sleep(2.5)  # a third would come now if max_escalations were not kept
    esc = escalations()
    assert [e["escalation"] for e in esc] == [1, 2]
    for e in esc:
        assert e["schema"] == "pneumoflag.escalation/1" and e["max_escalations"] == 2
        assert e["event_id"] == flags["ignored.jpeg"]["event_id"] and e["flag"] == flags["ignored.jpeg"]
        assert e["unacknowledged_s"] >= 1.5
    # the acknowledgement is journaled against the flag, by whom and where
    acks = _db(state, "SELECT event_id, station, by_name, known_flag FROM acks")
    assert acks == [(flags["answered.jpeg"]["event_id"], "desk-a", "Nurse Ada", 1)]
    (acked,) = _db(state, "SELECT acked_by, ack_station, escalations FROM flags WHERE event_id=?",
                   flags["answered.jpeg"]["event_id"])
    assert acked == ("Nurse Ada", "desk-a", 0)
    assert "acknowledged by Nurse Ada at station desk-a" in d.output()


def test_stats_and_report_carry_time_to_notification(broker, dirs, daemons, tmp_path, capsys):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, model=_three_tier_model(tmp_path),
                   env={"PNEUMOFLAG_ALERTS_ESCALATE_AFTER": "600"}).start()
    for f in PNEUMONIA[:2] + NORMAL[:2]:
        drop(f, watch)
    flags = sub.wait_flags(4)
    urgent = [f for f in flags if f["priority"] == "urgent"]
    assert urgent and all(f["written_at"] and f["seen_at"] for f in flags)
    _publish_ack(broker.address, "test", urgent[0]["event_id"])
    wait_until(lambda: _db(state, "SELECT COUNT(*) FROM flags WHERE acked_at IS NOT NULL")[0][0] == 1, 10, "ack")

    def ttn():
        stats = [m.payload for m in sub.where(lambda m: m.topic.endswith("/stats"))]
        return stats[-1]["time_to_notification_s"] if stats else {}

    wait_until(lambda: ttn().get("delivered_to_acknowledged", {}).get("n") == 1, 15, "stats with the ack")
    t = ttn()
    assert t["written_to_delivered"]["n"] == 4 and 0 <= t["written_to_delivered"]["p50"] <= t["written_to_delivered"]["p95"]
    assert t["window_s"] == 86400
    d.terminate()

    out_json = tmp_path / "r.json"
    plots = tmp_path / "plots"
    assert run_cli("report", "--state-dir", state, "--since", "1h", "--json", out_json, "--plots", plots) == 0
    text = capsys.readouterr().out
    assert "time to notification" in text and "written -> delivered" in text
    assert f"urgent flags not acknowledged: {len(urgent) - 1}" in text
    rep = json.loads(out_json.read_text())
    assert sum(rep["flags"].values()) == 4 and rep["acknowledged"]["urgent"] == 1
    assert rep["intervals_s"]["written -> delivered"]["n"] == 4
    assert rep["intervals_s"]["delivered -> acknowledged"]["n"] == 1
    assert len(rep["unacknowledged_urgent"]) == len(urgent) - 1
    for name in ("written_to_delivered.png", "delivered_to_acknowledged.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"
    assert run_cli("report", "--state-dir", tmp_path / "nowhere") == 2
    assert "no state database" in capsys.readouterr().err
