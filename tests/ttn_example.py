"""Make the README's time-to-notification example: a real daemon and Mosquitto, the 8 samples, scripted acks.

    python tests/ttn_example.py                      # prints the state folder it leaves behind
    pneumoflag report --state-dir STATE --since 24h --plots ttn/

Not a test: the samples are dropped 0.3 s apart, and three of the four urgent flags are acknowledged by a
scripted station 1.5 s apart (the acknowledgement times measure this script, not a ward).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mqtt_helpers import DaemonProc, Mosquitto, Subscriber, drop
from test_notification import _publish_ack
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = sorted(SAMPLES_DIR.rglob("*.jpeg"))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pneumoflag-ttn-"))
    watch, state = tmp / "export", tmp / "state"
    watch.mkdir()
    state.mkdir()
    broker = Mosquitto(tmp / "broker").start()
    sub = Subscriber(broker.address, "pneumoflag/#")
    daemon = DaemonProc(watch, state, broker.address, device_id="xray-room-2").start()
    try:
        for f in SAMPLES:
            drop(f, watch)
            time.sleep(0.3)
        urgent = [f for f in sub.wait_flags(len(SAMPLES)) if f["priority"] == "urgent"]
        time.sleep(2)
        for flag in urgent[:-1]:
            time.sleep(1.5)
            _publish_ack(broker.address, "xray-room-2", flag["event_id"], by="Nurse Ada", station="desk-a")
        time.sleep(2)
    finally:
        daemon.terminate()
        broker.stop()
    print(state)


if __name__ == "__main__":
    main()
