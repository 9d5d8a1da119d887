"""The daemon end to end against a real Mosquitto broker: drop folder -> MQTT, and nothing lost."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from mqtt_helpers import SHIPPED_MODEL, Subscriber, drop, new_daemon, wait_until
from pneumoflag.device.card import ModelCard
from pneumoflag.device.config import load_config
from pneumoflag.device.pipeline import Pipeline, score_file
from pneumoflag.device.scorer import load_scorer
from pneumoflag.device.samples import SAMPLES_DIR
from pneumoflag.device.vocab import PRIORITIES

SAMPLES = SAMPLES_DIR
SAMPLE_FILES = sorted(SAMPLES.rglob("*.jpeg"))


def _journal(state: Path) -> list[tuple]:
    with sqlite3.connect(state / "pneumoflag.db") as db:
        return db.execute("SELECT path, status, reason FROM journal ORDER BY id").fetchall()


def _reference_scores() -> dict[str, dict]:
    cfg = load_config(env={}, overrides={"model.path": str(SHIPPED_MODEL), "mqtt.device_id": "test"})
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu")
    pipe = Pipeline(cfg, scorer, card)
    return {p.name: score_file(pipe, p).to_dict() for p in SAMPLE_FILES}


def test_drop_folder_to_mqtt_end_to_end(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    for f in SAMPLE_FILES:
        drop(f, watch)
    flags = sub.wait_flags(len(SAMPLE_FILES))
    assert sorted(f["file"] for f in flags) == sorted(p.name for p in SAMPLE_FILES)
    card = ModelCard.load(SHIPPED_MODEL.with_suffix(".json"))
    ref = _reference_scores()
    by_topic = {m.payload["file"]: m.topic for m in sub.where(lambda m: "/flags/" in m.topic)}
    for msg in flags:
        src = next(p for p in SAMPLE_FILES if p.name == msg["file"])
        assert msg["schema"] == "pneumoflag.flag/1"
        uuid.UUID(msg["event_id"])
        assert msg["device"] == "test"
        assert msg["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert msg["probability"] == ref[src.name]["probability"]  # same as scoring the file directly
        assert msg["priority"] == card.thresholds.priority(msg["probability"])
        assert by_topic[msg["file"]] == f"pneumoflag/test/flags/{msg['priority']}"
        assert msg["thresholds"] == card.thresholds.as_dict()
        assert msg["model"] == {"name": card.name, "version": card.version, "sha256": card.tflite_sha256}
        assert msg["accelerator"] == "cpu"
        assert set(msg["timings_ms"]) == {"decode", "infer", "total"}
        assert 0 < msg["timings_ms"]["infer"] <= msg["timings_ms"]["total"]
        assert datetime.fromisoformat(msg["scored_at"].replace("Z", "+00:00")).tzinfo is not None
    status = sub.where(lambda m: m.topic == "pneumoflag/test/status")
    assert status and status[-1].payload == "online"
    wait_until(lambda: sub.where(lambda m: m.topic.endswith("/stats")
                                 and sum(m.payload["scored"].values()) == len(SAMPLE_FILES)), 10, "stats")
    stats = sub.where(lambda m: m.topic.endswith("/stats"))[-1].payload
    for key in ("scored", "errors", "queue_depth", "latency_ms", "uptime_s", "outbox"):
        assert key in stats
    assert stats["latency_ms"]["p50"] > 0 and stats["errors"] == 0
    from pneumoflag.device.stats import STEPS

    steps = stats["steps_ms"]  # where a file's time goes: every scored file in "alone" or "busy", once
    assert set(steps) == {"alone", "busy"} and all(list(v) == list(STEPS) for v in steps.values())
    for step in ("queue", "admit", "decode", "infer", "journal"):
        assert steps["alone"][step]["n"] + steps["busy"][step]["n"] == len(SAMPLE_FILES), step
    assert steps["alone"]["fsync"]["n"] + steps["busy"]["fsync"]["n"] >= 1
    assert all(v["p50"] > 0 for kind in steps.values() for k, v in kind.items() if k in ("decode", "infer") and v["n"])
    # SIGTERM: exits 0 and leaves the retained status at "offline"
    assert d.terminate() == 0
    wait_until(lambda: sub.where(lambda m: m.topic == "pneumoflag/test/status")[-1].payload == "offline", 10,
               "offline status")
    late = Subscriber(broker.address, "pneumoflag/test/status")
    wait_until(lambda: late.where(lambda m: m.retain), 5, "retained status")
    assert late.where(lambda m: m.retain)[-1].payload == "offline"
    sub.stop(), late.stop()


def test_file_written_in_chunks_is_scored_once_after_complete(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    def chunks(data: bytes) -> list[bytes]:
        n = len(data) // 8 + 1
        return [data[i: i + n] for i in range(0, len(data), n)]

    # one writer keeps the file open for 2 s; another closes and reopens it for every chunk
    a, b = SAMPLE_FILES[0].read_bytes(), SAMPLE_FILES[-1].read_bytes()
    with open(watch / "held-open.jpeg", "wb") as f:
        for c in chunks(a):
            f.write(c)
            f.flush()
            time.sleep(0.25)
    for c in chunks(b):
        with open(watch / "reopened.jpeg", "ab") as f:
            f.write(c)
        time.sleep(0.25)
    sub.wait_flags(2)
    time.sleep(2.5)  # anything more would be a second, wrong alert
    flags = {f["file"]: f for f in sub.flags()}
    assert len(sub.flags()) == 2 and set(flags) == {"held-open.jpeg", "reopened.jpeg"}
    assert flags["held-open.jpeg"]["sha256"] == hashlib.sha256(a).hexdigest()
    assert flags["reopened.jpeg"]["sha256"] == hashlib.sha256(b).hexdigest()
    assert sub.errors() == []


def test_temp_then_rename_and_temp_names_ignored(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    shutil.copyfile(SAMPLE_FILES[1], watch / "scan.jpeg.part")
    shutil.copyfile(SAMPLE_FILES[2], watch / "~lock.jpeg")
    shutil.copyfile(SAMPLE_FILES[3], watch / ".hidden.jpeg")
    shutil.copyfile(SAMPLE_FILES[4], watch / "x.tmp")
    time.sleep(1.5)
    assert sub.flags() == [] and sub.errors() == []
    os.rename(watch / "scan.jpeg.part", watch / "scan.jpeg")
    flags = sub.wait_flags(1)
    time.sleep(1)
    assert [f["file"] for f in sub.flags()] == ["scan.jpeg"]
    assert flags[0]["sha256"] == hashlib.sha256(SAMPLE_FILES[1].read_bytes()).hexdigest()


def test_broker_outage_delivers_everything_once_in_order(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/+/flags/#", client_id="nurse-station-1")
    d = new_daemon(daemons, watch, state, broker.address).start()
    drop(SAMPLE_FILES[0], watch, "before.jpeg")
    sub.wait_flags(1)
    broker.stop()
    names = [f"during-{i}.jpeg" for i in range(5)]
    for i, n in enumerate(names):
        drop(SAMPLE_FILES[i + 1], watch, n)
        time.sleep(0.2)
    wait_until(lambda: d.output().count("FLAG") + d.output().count("ROUTINE") + d.output().count("URGENT") >= 6,
               20, "daemon to score the files during the outage")
    time.sleep(1)
    broker.start()  # same port, persistence restores the subscriber's session
    flags = sub.wait_flags(6, timeout=30)
    time.sleep(2)
    flags = sub.flags()
    files = [f["file"] for f in flags]
    assert files == ["before.jpeg", *names], files  # all delivered, in order, none twice
    assert len({f["event_id"] for f in flags}) == 6
    with sqlite3.connect(state / "pneumoflag.db") as db:
        wait_until(lambda: db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0, 5, "outbox to drain")


def test_killed_mid_backlog_restart_skips_nothing_and_realerts_nothing(broker, dirs, daemons):
    watch, state = dirs
    names = []
    n_files = 120  # enough that a burst at the machine's rate is still going when the kill lands
    for i in range(n_files):
        src = SAMPLE_FILES[i % len(SAMPLE_FILES)]
        # same pixels, different bytes: a JPEG comment makes each file distinct content
        img = Image.open(src)
        dst = watch / f"backlog-{i:03d}.jpeg"
        img.save(dst, quality=90, comment=f"copy {i}".encode())
        os.utime(dst, (time.time() - 100 + i, time.time() - 100 + i))
        names.append(dst.name)
    sub = Subscriber(broker.address, "pneumoflag/+/flags/#", client_id="nurse-station-2")
    d1 = new_daemon(daemons, watch, state, broker.address).start(wait=False)
    wait_until(lambda: len(sub.flags()) >= 4, 30, "a few flags before the kill")
    d1.kill()  # SIGKILL: no clean shutdown
    n_before = len(sub.flags())
    assert n_before < n_files, "the backlog finished before the kill; the test proves nothing"
    d2 = new_daemon(daemons, watch, state, broker.address).start()
    wait_until(lambda: {f["file"] for f in sub.flags()} == set(names), 40, "every backlog file flagged")
    time.sleep(1.5)
    flags = sub.flags()
    events: dict[str, set] = {}
    for f in flags:
        events.setdefault(f["file"], set()).add(f["event_id"])
    assert all(len(ev) == 1 for ev in events.values()), events  # never a second alert for a file
    first_seen = [f["file"] for f in flags]
    assert first_seen[:n_before] == sorted(first_seen[:n_before])  # backlog oldest first
    assert d2.terminate() == 0
    assert sorted(p for p, s, r in _journal(state)) == sorted(names)


def _bomb(path: Path) -> None:
    Image.new("L", (9000, 9000)).save(path)  # 81 MP of zeros, a few hundred KB on disk


def test_bad_input_is_reported_and_the_daemon_goes_on(broker, dirs, daemons, tmp_path):
    from dicom_helpers import write_test_dicom
    import numpy as np

    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address,
            env={"PNEUMOFLAG_WATCH_MAX_FILE_MB": "1.5", "PNEUMOFLAG_WATCH_MAX_PIXELS": "50000000"}).start()
    good = SAMPLE_FILES[0].read_bytes()
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "empty.jpeg").write_bytes(b"")
    (staging / "truncated.jpeg").write_bytes(good[: len(good) // 2])
    (staging / "notes.jpeg").write_text("not an image\n" * 50)
    _bomb(staging / "bomb.png")
    (staging / "huge.png").write_bytes(os.urandom(2 * 1024 * 1024))
    write_test_dicom(staging / "ct.dcm", np.full((64, 64), 500, np.uint16), Modality="CT")
    expected = {"empty.jpeg": "empty-file", "truncated.jpeg": "truncated", "notes.jpeg": "unsupported-format",
                "bomb.png": "decompression-bomb", "huge.png": "too-large", "ct.dcm": "dicom-modality"}
    for name in expected:
        drop(staging / name, watch)
    drop(SAMPLE_FILES[1], watch, "good-after-bad.jpeg")
    errors = sub.wait_errors(len(expected), timeout=30)
    got = {e["file"]: e["reason"] for e in errors}
    assert got == expected
    for e in errors:
        assert e["schema"] == "pneumoflag.error/1" and e["message"].startswith(e["file"])
        uuid.UUID(e["event_id"])
    flags = sub.wait_flags(1)
    assert [f["file"] for f in flags] == ["good-after-bad.jpeg"]
    journal = {p: (s, r) for p, s, r in _journal(state)}
    for name, reason in expected.items():
        assert journal[name] == ("error", reason)


def test_unreadable_file_is_reported(broker, dirs, daemons):
    """A file the daemon may not read. Root reads everything, so as root the daemon runs
    without the capabilities that bypass file permissions (as under systemd with DynamicUser)."""
    watch, state = dirs
    wrapper = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop root's file-permission override"
        wrapper = (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address, wrapper=wrapper).start()
    staged = watch.parent / "locked.staged"  # arrives already unreadable: no window for the daemon to read it
    shutil.copyfile(SAMPLE_FILES[0], staged)
    staged.chmod(0o000)
    staged.rename(watch / "locked.jpeg")
    drop(SAMPLE_FILES[1], watch, "readable.jpeg")
    errors = sub.wait_errors(1)
    assert errors[0]["file"] == "locked.jpeg" and errors[0]["reason"] == "permission-denied"
    assert "permission denied" in errors[0]["message"]
    assert [f["file"] for f in sub.wait_flags(1)] == ["readable.jpeg"]


def test_duplicate_content_is_recognised_not_realerted(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    drop(SAMPLE_FILES[0], watch, "first.jpeg")
    sub.wait_flags(1)
    drop(SAMPLE_FILES[0], watch, "resent-copy.jpeg")
    wait_until(lambda: any(p == "resent-copy.jpeg" for p, s, r in _journal(state)), 10, "journal entry")
    time.sleep(0.5)
    assert [f["file"] for f in sub.flags()] == ["first.jpeg"]
    assert [(s, r) for p, s, r in _journal(state) if p == "resent-copy.jpeg"] == [("duplicate", "duplicate-of")]
    # the copy gets a message of its own that names the first event (never a second alert)
    (dup,) = sub.wait_errors(1)
    assert dup["file"] == "resent-copy.jpeg" and dup["reason"] == "duplicate-of"
    assert dup["duplicate_of"] == sub.flags()[0]["event_id"] and "first.jpeg" in dup["message"]


def test_model_card_mismatch_refuses_to_start(tmp_path, dirs, capsys):
    from conftest import run_cli

    watch, state = dirs
    model = tmp_path / SHIPPED_MODEL.name
    shutil.copy(SHIPPED_MODEL, model)
    shutil.copy(SHIPPED_MODEL.with_suffix(".json"), model.with_suffix(".json"))
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte
    model.write_bytes(bytes(data))
    rc = run_cli("watch", watch, "--state-dir", state, "--model", model, "--broker", "127.0.0.1:1")
    err = capsys.readouterr().err
    assert rc == 2 and "does not match its card" in err and "sha256" in err
    # the card promising another input shape is refused too
    shutil.copy(SHIPPED_MODEL, model)
    card = json.loads(model.with_suffix(".json").read_text())
    card["tflite"]["input"]["shape"] = [1, 224, 224, 1]
    model.with_suffix(".json").write_text(json.dumps(card))
    rc = run_cli("watch", watch, "--state-dir", state, "--model", model, "--broker", "127.0.0.1:1")
    assert rc == 2 and "224" in capsys.readouterr().err
    # no card at all
    model.with_suffix(".json").unlink()
    assert run_cli("watch", watch, "--state-dir", state, "--model", model, "--broker", "127.0.0.1:1") == 2
    assert "card" in capsys.readouterr().err


def test_missing_or_unreadable_export_folder(tmp_path, capsys):
    from conftest import run_cli

    rc = run_cli("watch", tmp_path / "nope", "--state-dir", tmp_path / "s", "--broker", "127.0.0.1:1")
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_dicom_chest_radiograph_is_flagged_with_its_ids(broker, dirs, daemons):
    import numpy as np
    from dicom_helpers import write_test_dicom

    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    pixels = (np.asarray(Image.open(SAMPLE_FILES[-1]).convert("L"), np.uint16) * 16)
    staging = dirs[1].parent / "dcm"
    staging.mkdir()
    write_test_dicom(staging / "cr.dcm", pixels, Modality="CR", BodyPartExamined="CHEST",
                     StudyInstanceUID="1.2.826.0.1.3680043.2.1125.1", SOPInstanceUID="1.2.826.0.1.3680043.2.1125.2",
                     AccessionNumber="ACC-778", PatientName="Doe^Jane", PatientID="P-1234")
    drop(staging / "cr.dcm", watch)
    flag = sub.wait_flags(1)[0]
    assert flag["file"] == "cr.dcm" and flag["priority"] in ("urgent", "flag", "routine")
    assert flag["study_instance_uid"] == "1.2.826.0.1.3680043.2.1125.1"
    assert flag["sop_instance_uid"] == "1.2.826.0.1.3680043.2.1125.2"
    assert flag["accession_number"] == "ACC-778"
    assert "patient_name" not in flag and "patient_id" not in flag  # identifiers off by default


def test_polling_recursive_and_archive(broker, dirs, daemons, tmp_path):
    """Network-share mode: no inotify, files settle by size/mtime; subfolders; scored files moved away."""
    watch, state = dirs
    archive = tmp_path / "archive"
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address, args=("--polling", "--recursive"),
            env={"PNEUMOFLAG_WATCH_POLL_INTERVAL": "0.3", "PNEUMOFLAG_WATCH_ARCHIVE_DIR": str(archive)}).start()
    (watch / "2026" / "11").mkdir(parents=True)
    drop(SAMPLE_FILES[0], watch / "2026" / "11", "deep.jpeg")
    flag = sub.wait_flags(1)[0]
    assert flag["file"] == "2026/11/deep.jpeg"
    wait_until(lambda: (archive / "2026" / "11" / "deep.jpeg").exists(), 10, "the file in the archive")
    assert not (watch / "2026" / "11" / "deep.jpeg").exists()


def test_systemd_notify_ready_watchdog_stopping(broker, dirs, daemons, tmp_path):
    import socket as _socket

    watch, state = dirs
    sock_path = Path(__import__("tempfile").mkdtemp()) / "notify.sock"
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(15)
    d = new_daemon(daemons, watch, state, broker.address,
                env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}).start(wait=False)
    seen: list[str] = []
    try:
        while not any("READY=1" in m for m in seen) or sum("WATCHDOG=1" in m for m in seen) < 2:
            seen.append(srv.recv(4096).decode())
        assert d.terminate() == 0
        while not any("STOPPING=1" in m for m in seen):
            seen.append(srv.recv(4096).decode())
    finally:
        srv.close()
    ready = next(m for m in seen if "READY=1" in m)
    assert "STATUS=watching" in ready


@pytest.fixture
def started(tmp_path):
    """A daemon started in this process (no broker, no loop): the test calls its steps."""
    from pneumoflag.device.daemon import Daemon

    watch, state = tmp_path / "w", tmp_path / "s"
    watch.mkdir()
    cfg = load_config(env={}, overrides={"watch.dir": str(watch), "state.dir": str(state),
                                         "model.path": str(SHIPPED_MODEL), "mqtt.broker": "127.0.0.1:1"})
    d = Daemon(cfg)
    d._start()
    try:
        yield d, watch
    finally:
        d.publisher.stop(timeout=0.5)
        d.pipeline.decoder.stop()
        d.store.close()


def test_disk_errors_keep_the_file_for_later(started, monkeypatch):
    """A failing state database (disk full, I/O error) must not lose or reject the image."""
    from pneumoflag.device.ingest import Ready
    from pneumoflag.device.store import Store, StoreError

    d, watch = started
    f = drop(SAMPLE_FILES[0], watch)
    real = Store.record
    calls = {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("database or disk is full")
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "record", failing)
    retried = []
    monkeypatch.setattr(d.ingest, "retry_later", lambda p, delay: retried.append(p))
    d._handle(Ready(f, "closed"))
    assert retried == [f] and d.store.outbox_depth() == 0 and d.store.journal() == []
    d._handle(Ready(f, "closed"))  # the disk is back
    assert d.store.outbox_depth() == 1 and [r.path for r in d.store.journal()] == [f.name]


def test_a_file_whose_rules_need_the_one_in_the_decoder_waits_for_its_result(started):
    """The daemon admits the next file while the worker decodes this one; a new version of the same path
    must still supersede it, and the same bytes under another name must still be a duplicate of it."""
    from pneumoflag.device.ingest import Ready

    d, watch = started
    first = drop(SAMPLE_FILES[0], watch, "a.jpeg")
    d._advance(Ready(first, "closed"))
    assert len(d._decoding) == 1  # in the worker, not journaled yet
    drop(SAMPLE_FILES[1], watch, "a.jpeg")
    d._advance(Ready(first, "closed"))  # a new version of the path in the decoder
    copy = drop(SAMPLE_FILES[1], watch, "copy.jpeg")
    d._advance(Ready(copy, "closed"))  # the same bytes as the file now in the decoder
    d._advance(None)
    rows = d.store.journal()
    assert [(r.path, r.status in PRIORITIES) for r in rows] == [("a.jpeg", True), ("a.jpeg", True),
                                                               ("copy.jpeg", False)]
    with sqlite3.connect(d.store.path) as db:
        supersedes = [r[0] for r in db.execute("SELECT supersedes FROM journal ORDER BY id")]
    assert supersedes[:2] == [None, rows[0].event_id]
    assert (rows[2].status, rows[2].reason) == ("duplicate", "duplicate-of")
    assert d.processed == 2 and not d._decoding
