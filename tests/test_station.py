"""The nursing station end to end, with real parts only: Mosquitto, the daemon (`pneumoflag watch`), two
station processes (`pneumoflag station`), and Debian's chromium driven by Selenium.

The ward (one broker, appliance xray-1, stations desk-a and desk-b, three browsers) is shared by the tests
of this module, in file order; each test drops its own, uniquely named images and finds its rows by name.
The security tests start their own broker and station.
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import REPO, DaemonProc, Mosquitto, Subscriber, free_port, wait_until
from pneumoflag.device.contract import ESCALATION_SCHEMA, EscalationMessage, encode
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = SAMPLES_DIR
PNEUMONIA = sorted((SAMPLES / "PNEUMONIA").glob("*.jpeg"))
NORMAL = sorted((SAMPLES / "NORMAL").glob("*.jpeg"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<img src=x onerror=alert(1)>.jpeg"
SILENT_AFTER = 3  # seconds without stats before an online appliance shows as silent (the daemon sends every 1 s)
# not PNEUMOFLAG_*: the daemon and the station refuse unknown PNEUMOFLAG_ variables
WRITE_SCREENSHOTS = os.environ.get("WRITE_SCREENSHOTS") == "1"  # docs/station*.png, for the README

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- real parts


class StationProc:
    """``pneumoflag station`` as a real process on a free loopback port."""

    def __init__(self, workdir: Path, broker: str, station_id: str, args: tuple = (), env: dict | None = None,
                 port: int | None = None):
        self.station_id = station_id
        self.port = port or free_port()
        self.db = workdir / f"station-{station_id}.db"
        self.cmd = [sys.executable, "-m", "pneumoflag.device.cli", "-v", "station", "--broker", broker,
                    "--listen", f"127.0.0.1:{self.port}", "--station-id", station_id, "--db", str(self.db), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PNEUMOFLAG_STATION_SILENT_AFTER": str(SILENT_AFTER),
                    "PNEUMOFLAG_MQTT_RECONNECT_MAX": "1", **(env or {})}
        self.env.pop("PNEUMOFLAG_CONFIG", None)
        self.log = workdir / f"station-{station_id}-{time.time_ns()}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready: str = "subscribed to") -> StationProc:
        """Returns once the log says ``ready``: by default, once the subscriptions are in place."""
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO))
        wait_until(lambda: ready in self.output() or self.proc.poll() is not None, 30, "station start")
        assert self.proc.poll() is None, f"station exited at start:\n{self.output()}"
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self._fh.close()
        return code

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "_fh", None):
            self._fh.close()


def new_browser(*switches: str) -> webdriver.Chrome:
    """Debian's headless chromium (plus ``switches``); every dialog the page opens is recorded in
    ``window.__dialogs``."""
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert Path(exe).exists(), f"{exe} is missing: apt-get install chromium chromium-driver (.ci/run does this)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp()}",
                *switches):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__dialogs = [];
        for (const k of ["alert", "confirm", "prompt"]) {
          window[k] = (...a) => { window.__dialogs.push(k + ":" + a.join(",")); };
        }"""})
    return driver


def open_page(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url)
    wait_until(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), 15, "page ready")


ROWS_JS = """const text = (tr, sel) => { const e = tr.querySelector(sel); return e ? e.textContent : null; };
return [...document.querySelectorAll('#rows tr')].map(tr => ({
    id: tr.dataset.eventId, priority: tr.dataset.priority, cls: tr.className,
    file: text(tr, 'td.file .path, td.file .path-main'), accession: text(tr, 'td.file .acc'),
    study: text(tr, 'td.file .study'), refused: text(tr, 'td.file .rejected-views'),
    device: tr.querySelector('td.device').textContent,
    ttn: tr.querySelector('td.ttn').textContent, status: tr.querySelector('td.status').textContent}));"""


def page_rows(driver: webdriver.Chrome) -> list[dict]:
    return driver.execute_script(ROWS_JS)


def wait_row(driver: webdriver.Chrome, file: str, timeout: float = 10, where=lambda r: True,
             what: str = "") -> dict:
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [r for r in page_rows(driver) if r["file"] == file and where(r)]
        return bool(found)

    wait_until(seen, timeout, f"row {file} {what} on the page", interval=0.02)
    return found[0]


def device_state(driver: webdriver.Chrome, device: str) -> str | None:
    return driver.execute_script(
        "const li = [...document.querySelectorAll('#devices li')].find(l => l.dataset.device === arguments[0]);"
        "return li ? li.dataset.state : null;", device)


def type_name(driver: webdriver.Chrome, name: str):
    """The nurse's name, typed once into "Acknowledge as" (the page keeps it in localStorage)."""
    box = driver.find_element(By.ID, "nurse-name")
    box.clear()
    box.send_keys(name)
    return box


def unique_jpeg(src: Path, tag: str) -> bytes:
    """The same picture with a JPEG comment after SOI: new bytes, new sha256, so no duplicate-of."""
    data = src.read_bytes()
    comment = f"pneumoflag test {tag} {uuid.uuid4()}".encode()
    return data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]


def drop_bytes(data: bytes, folder: Path, name: str) -> float:
    """Write under a temporary name, rename into place like a scanner; returns when (monotonic)."""
    tmp = folder / f".{uuid.uuid4().hex}.part"
    tmp.write_bytes(data)
    at = time.monotonic()
    os.replace(tmp, folder / name)
    return at


def publish(broker: str, topic: str, payload: bytes, qos: int = 1) -> None:
    host, port = broker.rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}")
    client.connect(host, int(port))
    client.loop_start()
    client.publish(topic, payload, qos=qos).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def flag_of(sub: Subscriber, file: str, timeout: float = 20) -> dict:
    wait_until(lambda: any(f["file"] == file for f in sub.flags()), timeout, f"the flag of {file} on the broker")
    return next(f for f in sub.flags() if f["file"] == file)


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    if WRITE_SCREENSHOTS:
        (REPO / "docs").mkdir(exist_ok=True)
        # two frames, so that what was just drawn (a modal's backdrop) is painted, not half-way
        driver.execute_async_script("const done = arguments[0];"
                                    "requestAnimationFrame(() => requestAnimationFrame(() => done()));")
        driver.save_screenshot(str(REPO / "docs" / name))


# ----------------------------------------------------------------------------- the ward


@dataclass
class Ward:
    root: Path
    broker: Mosquitto
    export: Path
    state: Path
    daemon: DaemonProc
    desk_a: StationProc
    desk_b: StationProc
    sub: Subscriber
    page_a: webdriver.Chrome  # a browser on desk-a
    page_b: webdriver.Chrome  # a browser on desk-b
    page_a2: webdriver.Chrome  # a second browser on desk-a
    extra: list = field(default_factory=list)

    @property
    def pages(self) -> list[webdriver.Chrome]:
        return [self.page_a, self.page_b, self.page_a2]


@pytest.fixture(scope="module")
def ward(tmp_path_factory) -> Iterator[Ward]:
    root = tmp_path_factory.mktemp("ward")
    export, state = root / "export", root / "state"
    export.mkdir()
    state.mkdir()
    broker = Mosquitto(root / "broker").start()
    parts: list = []
    try:
        daemon = DaemonProc(export, state, broker.address, device_id="xray-1")
        parts.append(daemon)
        daemon.start()
        sub = Subscriber(broker.address, "pneumoflag/#")
        parts.append(sub)
        desk_a = StationProc(root, broker.address, "desk-a")
        parts.append(desk_a)
        desk_b = StationProc(root, broker.address, "desk-b")
        parts.append(desk_b)
        desk_a.start(), desk_b.start()
        pages = []
        for station in (desk_a, desk_b, desk_a):
            driver = new_browser()
            parts.append(driver)
            open_page(driver, station.url)
            pages.append(driver)
        # a morning's worklist: the bundled samples (one of them cut short, so an error shows too)
        for src in PNEUMONIA + NORMAL:
            drop_bytes(src.read_bytes(), export, src.name)
        drop_bytes(PNEUMONIA[0].read_bytes()[:3000], export, "cut-short.jpeg")
        wait_until(lambda: len(sub.flags()) >= len(PNEUMONIA + NORMAL) and sub.errors(), 60, "the samples scored")
        ward = Ward(root, broker, export, state, daemon, desk_a, desk_b, sub, *pages)
        yield ward
        parts.extend(ward.extra)
    finally:
        for part in reversed(parts):
            _stop(part)
        broker.stop()


def _stop(part) -> None:
    """Tear a part down even when it is already gone; one broken part must not keep the others running."""
    with contextlib.suppress(Exception):
        if isinstance(part, webdriver.Chrome):
            part.quit()
        elif isinstance(part, Subscriber):
            part.stop()
        else:
            part.close()


def test_a_dropped_radiograph_appears_on_the_page_within_2_s(ward):
    for src in PNEUMONIA + NORMAL:  # the morning's samples are all there, once each
        wait_row(ward.page_a, src.name)
    assert len({r["id"] for r in page_rows(ward.page_a)}) == len(page_rows(ward.page_a))
    name = "timing-1.jpeg"
    dropped = drop_bytes(unique_jpeg(PNEUMONIA[1], name), ward.export, name)
    wait_row(ward.page_a, name, timeout=20)
    on_page = time.monotonic()
    (delivered,) = ward.sub.where(lambda m: "/flags/" in m.topic and m.payload["file"] == name)
    # the page's own share (broker -> station -> SQLite -> SSE -> DOM), whatever the daemon's speed,
    # and the whole way from the file landing in the export folder
    assert on_page - delivered.at < 2.0, f"{on_page - delivered.at:.2f} s from the broker to the page"
    assert on_page - dropped < 2.0, f"{on_page - dropped:.2f} s from the export folder to the page"
    row = wait_row(ward.page_a, name)
    assert row["device"] == "xray-1" and row["priority"] == delivered.payload["priority"]
    if delivered.payload.get("written_at"):
        assert row["ttn"].endswith(" s")  # received minus written, known for this daemon
    # the same flag delivered again (at-least-once) is not a second row
    topic = delivered.topic
    publish(ward.broker.address, topic, encode(delivered.payload))
    time.sleep(0.5)
    assert [r["file"] for r in page_rows(ward.page_a)].count(name) == 1


def test_acknowledged_on_one_page_shows_on_every_station_and_reaches_the_broker(ward):
    name = "ack-me.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[2], name), ward.export, name)
    event_id = flag_of(ward.sub, name)["event_id"]
    for page in ward.pages:
        wait_row(page, name)
    page = ward.page_a
    type_name(page, "Nurse Ada")
    page.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{event_id}"] button.ack').click()
    acked = "acknowledged by Nurse Ada (desk-a)"
    for p in ward.pages:  # this page, another browser on desk-a, and desk-b
        row = wait_row(p, name, where=lambda r: acked in r["status"], what="acknowledged")
        assert "acked" in row["cls"]
    assert page.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{event_id}"] button.ack').get_attribute("disabled")
    # on the broker: QoS 1, not retained, the ack schema and nothing else
    wait_until(lambda: ward.sub.where(lambda m: m.topic == "pneumoflag/xray-1/acks"), 10, "the ack on the broker")
    (ack,) = ward.sub.where(lambda m: m.topic == "pneumoflag/xray-1/acks" and m.payload["event_id"] == event_id)
    assert set(ack.payload) == {"schema", "event_id", "station", "by", "at"}
    assert (ack.payload["schema"], ack.payload["station"], ack.payload["by"]) == ("pneumoflag.ack/1", "desk-a",
                                                                                  "Nurse Ada")
    datetime.fromisoformat(ack.payload["at"].replace("Z", "+00:00"))
    assert not ack.retain
    assert "Received PUBLISH from pneumoflag-station-desk-a (d0, q1, r0" in ward.broker.log_text()
    # the name is typed once: a reload keeps it
    open_page(page, ward.desk_a.url)
    assert page.find_element(By.ID, "nurse-name").get_attribute("value") == "Nurse Ada"
    page.execute_script("document.querySelector(`tr[data-event-id='${arguments[0]}']`)"
                        ".scrollIntoView({block: 'center'})", event_id)
    screenshot(page, "station-ack.png")


def test_a_key_acknowledges_the_focused_row_and_focus_is_visible(ward):
    name = "keyboard.jpeg"
    drop_bytes(unique_jpeg(NORMAL[1], name), ward.export, name)
    event_id = flag_of(ward.sub, name)["event_id"]
    page = ward.page_b
    wait_row(page, name)
    box = type_name(page, "Nurse Bo")
    box.send_keys(Keys.TAB)  # the next control is a real <button>, and it shows where the focus is
    focused = page.execute_script("const e = document.activeElement; const s = getComputedStyle(e);"
                                  "return [e.tagName, s.outlineStyle, s.outlineWidth];")
    assert focused[0] == "BUTTON" and focused[1] != "none" and focused[2] != "0px", focused
    page.execute_script("document.querySelector(`tr[data-event-id='${arguments[0]}']`).focus()", event_id)
    assert page.execute_script("return document.activeElement.dataset.eventId") == event_id
    page.switch_to.active_element.send_keys("a")
    row = wait_row(ward.page_a, name, where=lambda r: "acknowledged by Nurse Bo (desk-b)" in r["status"],
                   what="acknowledged from the keyboard")
    assert "acked" in row["cls"]


def test_the_daemon_journals_the_ack(ward):
    name = "journal-ack.jpeg"
    drop_bytes(unique_jpeg(NORMAL[2], name), ward.export, name)
    event_id = flag_of(ward.sub, name)["event_id"]
    wait_row(ward.page_a, name)
    type_name(ward.page_a, "Nurse Ada")
    ward.page_a.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{event_id}"] button.ack').click()
    wait_until(lambda: ward.sub.where(lambda m: m.topic.endswith("/acks") and m.payload["event_id"] == event_id),
               10, "the ack on the broker")

    def journaled() -> list[tuple]:
        with sqlite3.connect(ward.state / "pneumoflag.db") as db:
            return db.execute("SELECT event_id, station, by_name, at FROM acks WHERE event_id = ?",
                              (event_id,)).fetchall()

    wait_until(lambda: bool(journaled()), 5, "the daemon to journal the ack")
    ((eid, station, by, at),) = journaled()
    assert (eid, station, by) == (event_id, "desk-a", "Nurse Ada") and at


def test_an_escalation_marks_the_row_and_brings_a_flag_never_seen(ward):
    name = "escalate-me.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[3], name), ward.export, name)
    flag = flag_of(ward.sub, name)
    wait_row(ward.page_a, name)
    esc = EscalationMessage(flag["event_id"], "xray-1", 2, 3, 600.0, flag).to_dict()
    assert esc["schema"] == ESCALATION_SCHEMA
    publish(ward.broker.address, "pneumoflag/xray-1/escalations", encode(esc))
    for page in ward.pages:
        row = wait_row(page, name, where=lambda r: "escalated (2)" in r["status"], what="escalated")
        assert "is-escalated" in row["cls"]
    # a flag this station never saw (published while nobody listened, say): the escalation brings it
    written = datetime.now(timezone.utc) - timedelta(seconds=90)
    unseen = {**flag, "event_id": str(uuid.uuid4()), "device": "xray-9", "file": "never-seen.jpeg",
              "priority": "urgent", "written_at": written.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    esc = EscalationMessage(unseen["event_id"], "xray-9", 1, 3, 300.0, unseen).to_dict()
    publish(ward.broker.address, "pneumoflag/xray-9/escalations", encode(esc))
    row = wait_row(ward.page_b, "never-seen.jpeg", where=lambda r: "escalated (1)" in r["status"])
    assert row["device"] == "xray-9" and row["priority"] == "urgent"
    assert row["ttn"] == "1 min"  # received here ~90 s after it was written


def test_an_urgent_flag_chimes_once_sound_is_allowed(ward):
    page = ward.page_a2  # nobody has clicked or typed on this page yet
    page.execute_script("""
        window.__tones = 0;
        const make = AudioContext.prototype.createOscillator;
        AudioContext.prototype.createOscillator = function () { window.__tones++; return make.call(this); };""")
    sound = page.find_element(By.ID, "sound")
    assert sound.get_attribute("aria-pressed") == "true"  # station.chime defaults to on
    assert sound.text == "Sound on (click to allow)"
    sound.click()  # the browser lets a page make sound after a click: this one allows it, it does not toggle
    wait_until(lambda: sound.text == "Sound on", 5, "sound allowed")
    urgent = {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-1", "file": "chime.jpeg",
              "sha256": "0" * 64, "probability": 0.99, "priority": "urgent",
              "scored_at": datetime.now(timezone.utc).isoformat()}
    publish(ward.broker.address, "pneumoflag/xray-1/flags/urgent", encode(urgent))
    row = wait_row(page, "chime.jpeg")
    assert "prio-urgent" in row["cls"]
    wait_until(lambda: page.execute_script("return window.__tones") == 3, 5, "the three-tone chime")
    assert "New urgent flag: chime.jpeg on xray-1" in page.find_element(By.ID, "announce").get_attribute(
        "textContent")
    routine = {**urgent, "event_id": str(uuid.uuid4()), "file": "no-chime.jpeg", "priority": "routine"}
    publish(ward.broker.address, "pneumoflag/xray-1/flags/routine", encode(routine))
    wait_row(page, "no-chime.jpeg")
    assert page.execute_script("return window.__tones") == 3  # routine rows stay quiet
    sound.click()  # now that sound is allowed, the button switches it off
    assert (sound.text, sound.get_attribute("aria-pressed")) == ("Sound off", "false")


def test_a_hostile_file_name_renders_as_text_and_runs_nothing(ward):
    drop_bytes(unique_jpeg(PNEUMONIA[0], "hostile"), ward.export, HOSTILE)
    for page in ward.pages:
        row = wait_row(page, HOSTILE, timeout=20)
        assert row["file"] == HOSTILE
        assert page.execute_script("return document.querySelectorAll('main img, #rows img').length") == 0
        cell = page.execute_script(
            "return [...document.querySelectorAll('#rows td.file')].find(td => td.textContent === arguments[0])"
            ".innerHTML", HOSTILE)
        assert "&lt;img" in cell  # escaped characters in a text node, not an element
        time.sleep(0.3)  # an onerror would have fired by now
        assert page.execute_script("return window.__dialogs") == []
        with pytest.raises(NoAlertPresentException):
            _ = page.switch_to.alert.text
    logs = ward.page_a.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs


def test_a_file_overwritten_with_other_content_replaces_its_row(ward):
    name = "overwritten.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[1], "first"), ward.export, name)
    first = flag_of(ward.sub, name)
    wait_row(ward.page_b, name)
    drop_bytes(unique_jpeg(NORMAL[0], "second"), ward.export, name)  # the scanner re-exports under the same name
    wait_until(lambda: len([f for f in ward.sub.flags() if f["file"] == name]) == 2, 20, "the second result")
    second = [f for f in ward.sub.flags() if f["file"] == name][-1]
    assert second["supersedes"] == first["event_id"]
    old = wait_row(ward.page_b, name, where=lambda r: r["id"] == first["event_id"] and "replaced" in r["status"],
                   what="replaced")
    assert "superseded" in old["cls"]
    assert wait_row(ward.page_b, name, where=lambda r: r["id"] == second["event_id"])["status"] == "open"
    assert ward.page_b.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{first["event_id"]}"] button').get_attribute(
        "disabled")


def test_a_study_of_several_images_is_one_row_that_counts_them_and_names_the_refused_view(ward, tmp_path):
    pytest.importorskip("pydicom")
    from dicom_helpers import make_radiograph, sample_pixels
    from pydicom.uid import generate_uid

    study = generate_uid()

    def image(name: str, index: int, **tags) -> None:
        src = make_radiograph(tmp_path / name, sample_pixels(index, side=256), StudyInstanceUID=study,
                              AccessionNumber="ACC-STUDY7", **tags)
        drop_bytes(src.read_bytes(), ward.export, name)

    def study_rows() -> list[dict]:
        return [r for r in page_rows(ward.page_a) if r["accession"] == "Acc. ACC-STUDY7"]

    image("study7-pa.dcm", 0)  # routine
    wait_until(lambda: [r["study"] for r in study_rows()] == ["Study · 1 image"], 30, "the study's row")
    (first,) = study_rows()
    image("study7-repeat.dcm", 1)  # routine again: the same row counts it, no second row
    wait_until(lambda: [r["study"] for r in study_rows()] == ["Study · 2 images"], 30, "the count on the same row")
    assert study_rows()[0]["id"] == first["id"] and study_rows()[0]["status"] == "open"
    image("study7-lateral.dcm", 2, ViewPosition="LL")  # refused: named on the row, not a row of its own
    wait_until(lambda: study_rows() and (study_rows()[0]["refused"] or "").endswith("(not-a-radiograph)"), 30,
               "the refused view named")
    assert len(study_rows()) == 1 and study_rows()[0]["refused"].startswith("not scored: study7-lateral.dcm")
    image("study7-urgent.dcm", 4)  # urgent: the study's new result replaces the row
    wait_until(lambda: len(study_rows()) == 2, 30, "the study's new result")
    new, old = sorted(study_rows(), key=lambda r: r["id"] == first["id"])
    assert new["priority"] == "urgent" and new["study"] == "Study · 3 images" and new["status"] == "open"
    assert old["id"] == first["id"] and "replaced by a newer result for this study" in old["status"]
    assert [f["file"] for f in ward.sub.flags() if f.get("accession_number") == "ACC-STUDY7"] == [
        "study7-pa.dcm", "study7-urgent.dcm"]  # two flags for four images
    screenshot(ward.page_a, "station-study.png")


def test_errors_panel_shows_the_rejected_file(ward):
    texts = ward.page_a.execute_script("return [...document.querySelectorAll('#errors li')].map(li => li.textContent)")
    assert any("cut-short.jpeg" in t and "xray-1" in t for t in texts), texts


def test_an_appliance_goes_silent_then_offline_on_sigterm(ward):
    export, state = ward.root / "export-2", ward.root / "state-2"
    export.mkdir()
    state.mkdir()
    daemon = DaemonProc(export, state, ward.broker.address, device_id="xray-2")
    ward.extra.append(daemon)
    daemon.start()
    page = ward.page_a
    wait_until(lambda: device_state(page, "xray-2") == "online", 15, "xray-2 online on the page")
    daemon.proc.send_signal(signal.SIGSTOP)  # still connected, no more stats
    try:
        wait_until(lambda: device_state(page, "xray-2") == "silent", SILENT_AFTER + 8, "xray-2 silent")
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: device_state(page, "xray-2") == "online", 10, "xray-2 online again")
    assert daemon.terminate() == 0
    for p in ward.pages:
        wait_until(lambda p=p: device_state(p, "xray-2") == "offline", 10, "xray-2 offline on the page")
    daemon.close()


def test_the_notice_stays_in_view(ward):
    page = ward.page_a
    page.execute_script("document.querySelector('main').scrollTop = 1e6; window.scrollTo(0, 1e6)")
    notice = page.execute_script(
        "const r = document.querySelector('footer.notice').getBoundingClientRect();"
        "return [r.top, r.bottom, window.innerHeight, document.querySelector('footer.notice').textContent];")
    top, bottom, height, text = notice
    assert 0 <= top < bottom <= height
    assert "pneumoflag is a triage aid, not a diagnostic device" in text
    # one screen at 1280 px: the worklist needs no sideways scrolling
    assert page.execute_script("const w = document.querySelector('.table-wrap'); return w.scrollWidth <= w.clientWidth")
    page.execute_script("document.querySelector('main').scrollTop = 0; window.scrollTo(0, 0)")
    screenshot(page, "station.png")


def test_a_restarted_station_keeps_its_worklist_and_gets_what_it_missed(ward):
    acked_name = "acked-before-restart.jpeg"
    drop_bytes(unique_jpeg(NORMAL[3], acked_name), ward.export, acked_name)
    wait_row(ward.page_a, acked_name)
    type_name(ward.page_a, "Nurse Di")
    ward.page_a.find_element(By.XPATH, f'//tr[td[@class="file"]="{acked_name}"]//button').click()
    wait_row(ward.page_a, acked_name, where=lambda r: "acknowledged by Nurse Di" in r["status"])
    before = {r["id"]: r for r in page_rows(ward.page_a)}
    assert ward.desk_a.terminate() == 0
    wait_until(lambda: "reconnecting" in ward.page_a.find_element(By.ID, "link").text, 10, "the page to notice")
    name = "while-down.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[2], name), ward.export, name)
    flag_of(ward.sub, name)  # published while desk-a was down
    ward.desk_a.start()
    row = wait_row(ward.page_a, name, timeout=15)  # the open page reconnects by itself
    assert row["device"] == "xray-1"
    open_page(ward.page_a, ward.desk_a.url)  # and a reload shows the same list
    after = {r["id"]: r for r in page_rows(ward.page_a)}
    assert set(before) < set(after) and len(after) == len(before) + 1
    acked = [r for r in after.values() if "acknowledged by" in r["status"]]
    assert any(r["file"] == acked_name for r in acked)
    assert all(before[r["id"]]["status"] == r["status"] for r in acked)


# ----------------------------------------------------------------------------- security


def request(method: str, url: str, headers: dict | None = None, body: bytes | None = None,
         read_for: float | None = None) -> tuple[int, dict, str]:
    """One request, no redirects followed; ``read_for`` reads a stream for that long."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=read_for or 10)
    conn.request(method, "/" + path, body=body, headers=headers or {})
    resp = conn.getresponse()
    if read_for:
        chunks, end = [], time.monotonic() + read_for
        try:
            while time.monotonic() < end:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            pass
        text = b"".join(chunks).decode(errors="replace")
    else:
        text = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()} | {"set-cookie-all": resp.headers.get_all(
        "Set-Cookie") or []}, text


def cookie_of(headers: dict) -> str:
    return "; ".join(c.split(";", 1)[0] for c in headers["set-cookie-all"])


def test_listening_beyond_loopback_without_a_password_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "station", "--listen", "0.0.0.0:8080",
                          "--broker", "127.0.0.1:1", "--db", str(tmp_path / "s.db")],
                         check=False, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PNEUMOFLAG_CONFIG": ""})
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0:8080 without a password" in out.stderr
    assert "--password-file" in out.stderr and "--insecure" in out.stderr
    assert not (tmp_path / "s.db").exists()


@pytest.fixture
def lone_station(tmp_path, broker):
    """A station of its own, and a flag for it to acknowledge."""
    started: list[StationProc] = []

    def start(*args: str, env: dict | None = None, with_flag: bool = True, broker_address: str = "") -> tuple:
        station = StationProc(tmp_path, broker_address or broker.address, f"sec-{len(started)}", args, env)
        started.append(station)
        station.start()
        flag = None
        if with_flag:
            flag = {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-t",
                    "file": "secure.jpeg", "sha256": "0" * 64, "probability": 0.9, "priority": "urgent",
                    "scored_at": datetime.now(timezone.utc).isoformat()}
            publish(broker_address or broker.address, "pneumoflag/xray-t/flags/urgent", encode(flag))
            wait_until(lambda: station.db.exists() and _in_db(station.db, flag["event_id"]), 10, "the flag stored")
        return station, flag

    yield start
    for s in started:
        s.close()


def _in_db(db: Path, event_id: str) -> bool:
    with sqlite3.connect(db) as con:
        return bool(con.execute("SELECT 1 FROM flags WHERE event_id = ?", (event_id,)).fetchall())


def test_the_ack_endpoint_wants_the_csrf_token_and_the_same_origin(lone_station, broker):
    station, flag = lone_station()
    sub = Subscriber(broker.address, "pneumoflag/+/acks")
    try:
        status, headers, _ = request("GET", station.url + "/")
        assert status == 200
        cookie = cookie_of(headers)
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        assert "script-src 'self'" in headers["content-security-policy"]
        _, _, body = request("GET", station.url + "/api/state", {"Cookie": cookie})
        csrf = json.loads(body)["csrf"]
        assert csrf
        ack = json.dumps({"event_id": flag["event_id"], "by": "Nurse Cy"}).encode()
        json_type = {"Content-Type": "application/json"}
        refused = [
            {"Cookie": cookie},  # no token
            {"Cookie": cookie, "X-CSRF-Token": "0" * 64},  # a wrong one
            {"X-CSRF-Token": csrf},  # a token without its session
            {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": "http://evil.example"},
            {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": "null"},
            {"Cookie": cookie, "X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
        ]
        for h in refused:
            status, _, text = request("POST", station.url + "/api/ack", {**json_type, **h}, ack)
            assert status == 403, (h, status, text)
        time.sleep(0.3)
        assert sub.where(lambda m: True) == []  # nothing went out
        status, _, text = request("POST", station.url + "/api/ack",
                               {**json_type, "Cookie": cookie, "X-CSRF-Token": csrf, "Origin": station.url}, ack)
        assert status == 202 and json.loads(text) == {"event_id": flag["event_id"], "delivered": True}
        wait_until(lambda: sub.where(lambda m: m.payload["event_id"] == flag["event_id"]), 10, "the ack")
        status, _, _ = request("POST", station.url + "/api/ack", {**json_type, "Cookie": cookie, "X-CSRF-Token": csrf},
                            json.dumps({"event_id": "no-such-flag", "by": "Nurse Cy"}).encode())
        assert status == 404
    finally:
        sub.stop()


class _HostilePage(BaseHTTPRequestHandler):
    """Another site on the same host (another port: the same *site* for cookies) that tries to acknowledge."""

    target = ""
    event_id = ""

    def do_GET(self) -> None:
        script = f"""
          window.__result = "pending";
          fetch("{self.target}/api/state", {{credentials: "include"}})
            .then(r => r.json()).then(s => {{ window.__stolen = s.csrf; }}).catch(e => {{ window.__stolen = "blocked"; }})
            .finally(() => fetch("{self.target}/api/ack", {{method: "POST", mode: "no-cors", credentials: "include",
                headers: {{"Content-Type": "text/plain", "X-CSRF-Token": String(window.__stolen)}},
                body: JSON.stringify({{event_id: "{self.event_id}", by: "attacker"}})}}))
            .then(() => {{ window.__result = "sent"; }}, () => {{ window.__result = "failed"; }});"""
        body = f"<!doctype html><title>hostile</title><script>{script}</script>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_hostile_page_in_the_same_browser_cannot_acknowledge(lone_station, broker):
    station, flag = lone_station()
    sub = Subscriber(broker.address, "pneumoflag/+/acks")
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Hostile", (_HostilePage,),
                                                         {"target": station.url, "event_id": flag["event_id"]}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = new_browser()
    try:
        open_page(driver, station.url)  # the nurse's session cookie is in this browser
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait_until(lambda: driver.execute_script("return window.__result") in ("sent", "failed"), 10, "the attack")
        assert driver.execute_script("return window.__stolen") == "blocked"  # CORS: the token cannot be read
        wait_until(lambda: "refused POST /api/ack" in station.output(), 5, "the station to refuse the ack")
        time.sleep(0.3)
        assert sub.where(lambda m: True) == []
    finally:
        driver.quit()
        server.shutdown()
        sub.stop()


def test_with_a_password_the_page_wants_a_login(lone_station, tmp_path):
    pw = tmp_path / "station.password"
    pw.write_text("correct horse battery\n")
    station, _ = lone_station("--password-file", str(pw), with_flag=False)
    for path in ("/api/state", "/events", "/static/station.js"):
        status, _, _ = request("GET", station.url + path)
        assert status == 401, path
    status, headers, _ = request("GET", station.url + "/")
    assert status == 303 and headers["location"] == "/login"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    started = time.monotonic()
    status, headers, _ = request("POST", station.url + "/login", form, b"password=wrong")
    assert status == 303 and headers["location"] == "/login?failed=1" and time.monotonic() - started >= 1
    status, _, _ = request("POST", station.url + "/login", {**form, "Origin": "http://evil.example"},
                        b"password=correct+horse+battery")
    assert status == 403
    status, headers, _ = request("POST", station.url + "/login", {**form, "Origin": station.url},
                              b"password=correct+horse+battery")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    status, _, body = request("GET", station.url + "/api/state", {"Cookie": cookie_of(headers)})
    assert status == 200 and json.loads(body)["login"] is True
    status, _, _ = request("GET", station.url + "/api/state", {"Authorization": "Bearer correct horse battery"})
    assert status == 200
    status, _, _ = request("GET", station.url + "/api/state", {"Authorization": "Bearer wrong"})
    assert status == 401
    # and in a browser
    driver = new_browser()
    try:
        driver.get(station.url + "/")
        assert driver.current_url.endswith("/login")
        driver.find_element(By.ID, "password").send_keys("correct horse battery", Keys.ENTER)
        wait_until(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), 15,
                   "the worklist after login")
        assert driver.find_element(By.ID, "station-id").text == station.station_id
        assert driver.find_element(By.ID, "logout").is_displayed()
    finally:
        driver.quit()


def test_the_mqtt_password_never_reaches_the_browser(tmp_path, brokers, lone_station):
    secret, user = "mqtt-Secret-4711-xyz", "station-user"
    pwfile = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), user, secret], check=True, capture_output=True,
                   timeout=30)
    auth = brokers(tmp_path / "auth-broker", f"allow_anonymous false\npassword_file {pwfile}\n")
    station, _ = lone_station(env={"PNEUMOFLAG_MQTT_USERNAME": user, "PNEUMOFLAG_MQTT_PASSWORD": secret},
                              with_flag=False, broker_address=auth.address)
    _, headers, _ = request("GET", station.url + "/")
    cookie = {"Cookie": cookie_of(headers)}
    seen = []
    for path in ("/", "/login", "/static/station.js", "/static/style.css", "/api/state", "/nope"):
        status, h, body = request("GET", station.url + path, cookie)
        seen.append((path, status, json.dumps(h), body))
    state = json.loads(seen[4][3])
    assert state["link"]["up"] is True  # it did log in to the broker with that password
    seen.append(("/events", *request("GET", station.url + "/events", cookie, read_for=1.5)))
    assert "event: snapshot" in seen[-1][3]
    for path, _, headers_text, body in seen:
        assert secret not in body and secret not in headers_text, path
        assert user not in body, path
    assert secret not in station.output()


def test_a_station_without_a_broker_still_serves_the_page_and_says_so(tmp_path):
    station = StationProc(tmp_path, f"127.0.0.1:{free_port()}", "no-broker", ("--no-chime",))  # no broker there
    try:
        station.start(ready="listening on")
        _, _, body = request("GET", station.url + "/api/state")
        state = json.loads(body)
        assert state["link"]["up"] is False and state["chime"] is False
    finally:
        station.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_the_session_outlives_the_station_process(tmp_path, broker, protocol):
    """clean_session = false (3.1.1) or a session expiry (5): what was published while it was down arrives."""
    station = StationProc(tmp_path, broker.address, "persist", env={"PNEUMOFLAG_MQTT_PROTOCOL": protocol})
    try:
        station.start()
        assert station.terminate() == 0
        missed = {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-p",
                  "file": "missed.jpeg", "sha256": "0" * 64, "probability": 0.8, "priority": "urgent",
                  "scored_at": datetime.now(timezone.utc).isoformat()}
        publish(broker.address, "pneumoflag/xray-p/flags/urgent", encode(missed))
        station.start()
        wait_until(lambda: _in_db(station.db, missed["event_id"]), 10, "the flag published while it was down")
        assert "session resumed" in station.output()
    finally:
        station.close()


def test_the_daemon_escalates_an_unacknowledged_urgent_flag_onto_the_page(ward, tmp_path):
    """Not a hand-made message: a real daemon with a short alerts.escalate_after, and a card with an urgent tier."""
    from test_notification import _three_tier_model

    export, state = ward.root / "export-esc", ward.root / "state-esc"
    export.mkdir()
    state.mkdir()
    daemon = DaemonProc(export, state, ward.broker.address, device_id="xray-3", model=_three_tier_model(tmp_path),
                        env={"PNEUMOFLAG_ALERTS_ESCALATE_AFTER": "2", "PNEUMOFLAG_ALERTS_MAX_ESCALATIONS": "1"})
    ward.extra.append(daemon)
    daemon.start()
    name = "nobody-answers.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[1], name), export, name)
    assert flag_of(ward.sub, name)["priority"] == "urgent"
    for page in ward.pages:
        row = wait_row(page, name, timeout=20, where=lambda r: "escalated (1)" in r["status"], what="escalated")
        assert "is-escalated" in row["cls"] and row["device"] == "xray-3"
    assert daemon.terminate() == 0


# ----------------------------------------------------------------------------- heat maps (explain.enabled)


def fetch_bytes(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET as raw bytes (``request`` decodes text)."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/" + path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def make_png(side: int = 384) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (220, 90, 20)).save(out, "PNG")
    return out.getvalue()


PANEL_JS = """const d = document.getElementById('detail'); const img = document.getElementById('detail-img');
    const t = (id) => document.getElementById(id).textContent;
    return {open: d.open, file: t('detail-file'), prio: t('detail-prio'), probability: t('detail-probability'),
            accession: t('detail-accession'), image: t('detail-image'), notice: d.querySelector('.notice').textContent,
            src: img ? img.getAttribute('src') : null, width: img && img.complete ? img.naturalWidth : 0,
            focus: document.activeElement.id || document.activeElement.dataset.eventId || ''};"""


def panel(driver: webdriver.Chrome) -> dict:
    return driver.execute_script(PANEL_JS)


def click_cell(driver: webdriver.Chrome, event_id: str, cell: str) -> None:
    """Click a cell of a row as a nurse would; a live update may redraw the cells between find and click."""
    for _ in range(5):
        try:
            driver.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{event_id}"] td.{cell}').click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"the {cell} cell of {event_id} kept being redrawn")


def focus_row(driver: webdriver.Chrome, event_id: str):
    driver.execute_script("document.querySelector(`tr[data-event-id='${arguments[0]}']`).focus()", event_id)
    return driver.switch_to.active_element


def test_opening_a_row_shows_the_heat_map_the_daemon_drew(ward):
    """A real daemon with explain.enabled: its flag's overlay, byte for byte, in the row's detail panel."""
    export, state = ward.root / "export-heat", ward.root / "state-heat"
    export.mkdir()
    state.mkdir()
    daemon = DaemonProc(export, state, ward.broker.address, device_id="xray-h",
                        env={"PNEUMOFLAG_EXPLAIN_ENABLED": "true"})
    ward.extra.append(daemon)
    daemon.start()
    name, routine_name = "heat-map.jpeg", "heat-routine.jpeg"
    drop_bytes(unique_jpeg(PNEUMONIA[0], name), export, name)
    drop_bytes(unique_jpeg(NORMAL[0], routine_name), export, routine_name)
    flag = flag_of(ward.sub, name)
    routine = flag_of(ward.sub, routine_name)
    assert flag["priority"] in ("flag", "urgent") and routine["priority"] == "routine"
    page = ward.page_b
    wait_row(page, name, timeout=20)
    click_cell(page, flag["event_id"], "file")
    wait_until(lambda: panel(page)["width"] == 384, 60, "the heat map in the open panel")  # SSE if it came later
    shown = panel(page)
    assert shown["open"] and shown["file"] == name and shown["prio"] == flag["priority"]
    assert shown["probability"] == f'{flag["probability"]:.4f}' and shown["accession"] == "—"
    assert "triage aid, not a diagnostic device" in shown["notice"]
    assert shown["src"] == f'/heatmap/{flag["event_id"]}.png' and shown["focus"] == "detail-close"
    # the very bytes the daemon wrote, served to this page's session, and cached by nobody else
    written = (state / "heatmaps" / f'{flag["event_id"]}.png').read_bytes()
    cookie = page.get_cookie("pneumoflag_station_desk-b")["value"]
    status, headers, body = fetch_bytes(ward.desk_b.url + shown["src"], {"Cookie": f"pneumoflag_station_desk-b={cookie}"})
    assert status == 200 and body == written
    assert headers["content-type"] == "image/png" and "no-store" in headers["cache-control"]
    assert "private" in headers["cache-control"] and headers["x-content-type-options"] == "nosniff"
    screenshot(page, "station-heatmap.png")
    # Esc closes it and gives the focus back to the row; Enter and Space open the focused row
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_until(lambda: not panel(page)["open"], 5, "Esc to close the panel")
    wait_until(lambda: panel(page)["focus"] == flag["event_id"], 5, "the focus back on the row")
    # the image leaves with the panel (the dialog's close event comes a moment after the focus returns)
    wait_until(lambda: panel(page)["src"] is None, 5, "the image gone with the panel")
    for key in (Keys.ENTER, Keys.SPACE):
        focus_row(page, flag["event_id"]).send_keys(key)
        wait_until(lambda: panel(page)["width"] == 384, 10, f"{key!r} to open the panel")
        page.find_element(By.ID, "detail-close").click()
        wait_until(lambda: not panel(page)["open"], 5, "the Close button")
        # the focus goes back to the row with the dialog's close event: wait for it, or it could land after
        # the next row is focused (and Enter would open this row again)
        wait_until(lambda: panel(page)["focus"] == flag["event_id"] and panel(page)["src"] is None, 5,
                   "the focus back on the row after Close")
    # the appliance draws no map for a routine image: the panel says so
    focus_row(page, routine["event_id"]).send_keys(Keys.ENTER)
    wait_until(lambda: panel(page)["open"], 5, "the routine row's panel")
    shown = panel(page)
    assert shown["file"] == routine_name and shown["prio"] == "routine" and shown["src"] is None
    assert "no heat map for this image" in shown["image"]
    assert not (state / "heatmaps" / f'{routine["event_id"]}.png').exists()
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_until(lambda: not panel(page)["open"], 5, "Esc to close the panel")
    # the row's own controls still do what they did: Acknowledge opens nothing, `a` acknowledges
    type_name(page, "Nurse Bo")
    page.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{routine["event_id"]}"] button.ack').click()
    wait_row(page, routine_name, where=lambda r: "acknowledged by Nurse Bo" in r["status"], what="acknowledged")
    focus_row(page, flag["event_id"]).send_keys("a")
    wait_row(page, name, where=lambda r: "acknowledged by Nurse Bo" in r["status"], what="acknowledged with a")
    assert not panel(page)["open"]
    assert page.execute_script("return window.__dialogs") == []
    assert not [e for e in page.get_log("browser") if "Content Security Policy" in e["message"]]
    assert daemon.terminate() == 0


def test_a_heat_map_that_arrives_while_the_row_is_open_shows_at_once(ward):
    page = ward.page_a
    flag = {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-1", "file": "late-map.jpeg",
            "sha256": "0" * 64, "probability": 0.93, "priority": "flag", "accession_number": "<b>A77</b>",
            "scored_at": datetime.now(timezone.utc).isoformat()}
    publish(ward.broker.address, "pneumoflag/xray-1/flags/flag", encode(flag))
    wait_row(page, "late-map.jpeg", where=lambda r: r["accession"] == "Acc. <b>A77</b>")  # as text, not markup
    click_cell(page, flag["event_id"], "prob")
    wait_until(lambda: panel(page)["open"], 5, "the panel")
    shown = panel(page)
    assert "no heat map for this image" in shown["image"] and shown["accession"] == "<b>A77</b>"  # text, not HTML
    data = make_png(384)
    publish(ward.broker.address, f'pneumoflag/xray-1/heatmaps/{flag["event_id"]}', data)
    wait_until(lambda: panel(page)["width"] == 384, 10, "the heat map pushed into the open panel")
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait_until(lambda: not panel(page)["open"], 5, "Esc to close the panel")


def test_the_heat_map_endpoint_wants_a_login_a_good_id_and_a_real_png(lone_station, broker, tmp_path):
    pw = tmp_path / "station.password"
    pw.write_text("correct horse battery\n")
    station, flag = lone_station("--password-file", str(pw))
    bearer = {"Authorization": "Bearer correct horse battery"}
    url = f'{station.url}/heatmap/{flag["event_id"]}.png'
    topic = f'pneumoflag/xray-t/heatmaps/{flag["event_id"]}'
    # refused, and said why: not a PNG, over the size limit, an event id that could not be one
    publish(broker.address, topic, b"GIF89a" + bytes(200))
    publish(broker.address, topic, b"\x89PNG\r\n\x1a\n" + bytes(2 * 1024 * 1024))
    publish(broker.address, "pneumoflag/xray-t/heatmaps/..", make_png(8))
    wait_until(lambda: station.output().count("dropped a heatmap message") == 3, 10, "three refusals in the log")
    out = station.output()
    assert "not a PNG" in out and "byte limit" in out and "event id '..'" in out
    assert fetch_bytes(url, bearer)[0] == 404
    # a good one
    data = make_png(384)
    publish(broker.address, topic, data)
    wait_until(lambda: fetch_bytes(url, bearer)[0] == 200, 10, "the heat map stored")
    status, headers, body = fetch_bytes(url, bearer)
    assert body == data and headers["content-type"] == "image/png" and headers["cache-control"] == "private, no-store"
    assert fetch_bytes(url)[0] == 401  # not without the password
    assert fetch_bytes(url, {"Authorization": "Bearer wrong"})[0] == 401
    for bad in ("..%2F..%2Fetc%2Fpasswd.png", "%2e%2e.png", ".png", f'{flag["event_id"]}.gif', flag["event_id"],
                "a" * 200 + ".png", "x%00.png"):
        status, _, body = fetch_bytes(f"{station.url}/heatmap/{bad}", bearer)
        assert status == 400 and b"not a heat map name" in body, (bad, status)
    assert fetch_bytes(f"{station.url}/heatmap/{uuid.uuid4()}.png", bearer)[0] == 404
