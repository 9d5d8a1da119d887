"""`pneumoflag watch` with its DICOM receiver on: real storescu (dcmtk), a real daemon process, a real Mosquitto.

A modality's images arrive as flags with their DICOM ids; a stranger is refused; what was answered "stored" is
scored exactly once across a kill -9 and the sender's resend; a full state disk answers a failure, not success.
"""
from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from dicom_helpers import (  # noqa: E402
    DEFLATED, EXPLICIT, IMPLICIT, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, PROPOSE, RLE, encode, make_radiograph,
    require_tools, sample_pixels, storescu,
)
from mqtt_helpers import Subscriber, fill_state_disk, free_port, new_daemon, private_tmpfs, wait_until  # noqa: E402
from pneumoflag.device.dicom_net import accepted_transfer_syntaxes  # noqa: E402

CALLER = "CR_ROOM2"
SUCCESS_LINE = "Received Store Response (Success)"


@pytest.fixture(autouse=True)
def _tools():
    require_tools("storescu", "dcmconv", "dcmcjpls", "dcmcrle", "dcmcjpeg")


def _env(port: int, **extra: str) -> dict:
    return {"PNEUMOFLAG_DICOM_NET_ENABLED": "true", "PNEUMOFLAG_DICOM_NET_LISTEN": f"127.0.0.1:{port}",
            "PNEUMOFLAG_DICOM_NET_ALLOWED_CALLERS": CALLER, "PNEUMOFLAG_DICOM_NET_TIMEOUT_SECONDS": "5", **extra}


def _images(folder: Path, n: int, study: str | None = None) -> list[Path]:
    """``n`` radiographs from the samples, each its own instance (so its own content)."""
    folder.mkdir(parents=True, exist_ok=True)
    tags = {"StudyInstanceUID": study} if study else {}
    return [make_radiograph(folder / f"img{i:03d}.dcm", sample_pixels(i, side=256), **tags) for i in range(n)]


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _by_sop(sub: Subscriber) -> dict[str, set[str]]:
    """SOP Instance UID -> the distinct event ids of its flags (a redelivery repeats an event id)."""
    out: dict[str, set[str]] = {}
    for f in sub.flags():
        out.setdefault(f.get("sop_instance_uid"), set()).add(f["event_id"])
    return out


def _journal(state: Path) -> list[tuple]:
    with sqlite3.connect(state / "pneumoflag.db") as db:
        return db.execute("SELECT path, status FROM journal ORDER BY id").fetchall()


def test_instances_sent_by_storescu_in_several_transfer_syntaxes_arrive_as_flags(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    port = free_port()
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(port)).start()
    assert f"DICOM receiver PNEUMOFLAG listening on 127.0.0.1:{port}" in d.output()
    offered = accepted_transfer_syntaxes()
    syntaxes = [s for s in (EXPLICIT, IMPLICIT, DEFLATED, JPEG_LS_LOSSLESS, JPEG_LOSSLESS_SV1, RLE) if s in offered]
    assert {EXPLICIT, IMPLICIT, DEFLATED, JPEG_LS_LOSSLESS} <= set(syntaxes), offered
    sent = {}
    for i, syntax in enumerate(syntaxes):
        src = make_radiograph(tmp_path / f"src{i}.dcm", sample_pixels(i, side=256))
        f = encode(src, tmp_path / f"sent{i}.dcm", syntax)
        out = storescu("127.0.0.1", port, [f], CALLER, "PNEUMOFLAG", PROPOSE[syntax], "-R")
        assert out.returncode == 0 and SUCCESS_LINE in out.stderr + out.stdout, out.stderr
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sent[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), syntax)
    flags = sub.wait_flags(len(sent), timeout=60)
    got = {f["sop_instance_uid"]: f for f in flags}
    assert set(got) == set(sent), (got.keys(), d.output())
    for uid, (study, _syntax) in sent.items():
        f = got[uid]
        assert f["study_instance_uid"] == study and f["accession_number"] == "ACC0001"
        assert f["file"] == f"dicom-net/{uid}.dcm" and f["received_from"] == CALLER
        assert f["priority"] in ("urgent", "flag", "routine") and 0 <= f["probability"] <= 1
    assert sorted(p for p, _ in _journal(state)) == sorted(f"dicom-net/{u}.dcm" for u in sent)
    wait_until(lambda: not list((state / "received").glob("*.dcm")), 10, "the spool to empty")
    assert d.terminate() == 0
    assert "Traceback" not in d.output()
    sub.stop()


def test_an_unknown_calling_ae_title_is_refused_at_association(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    port = free_port()
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(port)).start()
    (f,) = _images(tmp_path / "imgs", 1)
    out = storescu("127.0.0.1", port, [f], "STRANGER", "PNEUMOFLAG")
    assert out.returncode != 0, out.stderr
    assert SUCCESS_LINE not in out.stderr + out.stdout
    assert re.search(r"calling AE title not recognized|Association Rejected", out.stderr + out.stdout, re.I), \
        out.stderr
    wait_until(lambda: "'STRANGER'" in d.output() and "refused" in d.output(), 10, "the refusal in the log")
    time.sleep(2)
    assert sub.flags() == [] and not list((state / "received").glob("*"))
    assert _journal(state) == []
    sub.stop()


def test_kill_9_while_storescu_sends_50_images_loses_nothing_acknowledged_and_scores_each_once(
        broker, dirs, daemons, tmp_path):
    watch, state = dirs
    port = free_port()
    files = _images(tmp_path / "imgs", 50)
    uids = [_sop(f) for f in files]
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=_env(port)).start()
    log = tmp_path / "storescu-1.log"
    with open(log, "w") as fh:
        sender = subprocess.Popen(["storescu", "-v", "-aet", CALLER, "-aec", "PNEUMOFLAG", "-to", "10", "-ta", "10",
                                   "-td", "10", "127.0.0.1", str(port), *map(str, files)], stdout=fh,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: log.read_text().count(SUCCESS_LINE) >= 10, 60, "10 acknowledged instances")
            d.kill()  # kill -9 in the middle of the association
            sender.wait(60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    first = log.read_text()
    acked = first.count(SUCCESS_LINE)
    assert 10 <= acked < 50, first[-2000:]  # killed mid-way: some were never answered
    assert sender.returncode != 0
    d2 = new_daemon(daemons, watch, state, broker.address, env=_env(port)).start()
    again = storescu("127.0.0.1", port, files, CALLER, "PNEUMOFLAG", timeout=180)
    assert again.returncode == 0 and (again.stderr + again.stdout).count(SUCCESS_LINE) == 50, again.stderr[-2000:]
    wait_until(lambda: len(_by_sop(sub)) >= 50, 180, "a flag for every instance")
    time.sleep(3)  # anything scored twice would be published by now
    by_sop = _by_sop(sub)
    assert set(by_sop) == set(uids), set(uids) ^ set(by_sop)
    assert all(len(events) == 1 for events in by_sop.values()), {u: e for u, e in by_sop.items() if len(e) > 1}
    counts = Counter(p for p, _ in _journal(state))
    assert counts == Counter({f"dicom-net/{u}.dcm": 1 for u in uids})
    assert not list((state / "received").glob("*.dcm"))
    assert d2.terminate() == 0
    sub.stop()


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    return subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                          capture_output=True).returncode == 0


def test_a_full_state_disk_answers_a_failure_and_the_resend_after_space_is_freed_is_scored(
        broker, dirs, daemons, tmp_path):
    if not shutil.which("unshare") or not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare and mount (a private tmpfs) to make a real full disk")
    watch, state = dirs
    port = free_port()
    sub = Subscriber(broker.address, "pneumoflag/#")
    wrapper = private_tmpfs(state)
    d = new_daemon(daemons, watch, state, broker.address, env=_env(port), wrapper=wrapper).start()
    first, second = _images(tmp_path / "imgs", 2)
    out = storescu("127.0.0.1", port, [first], CALLER, "PNEUMOFLAG")
    assert out.returncode == 0 and SUCCESS_LINE in out.stderr, out.stderr
    sub.wait_flags(1, timeout=60)
    filler = fill_state_disk(d, state)
    refused = storescu("127.0.0.1", port, [second], CALLER, "PNEUMOFLAG")
    said = refused.stderr + refused.stdout
    assert SUCCESS_LINE not in said, said
    assert "Received Store Response (Refused: OutOfResources)" in said, said
    assert "refused: cannot" in d.output()
    assert not [p for p in (filler.parent / "received").iterdir() if p.name != f"{_sop(first)}.dcm"]  # nothing half-written
    time.sleep(2)
    assert len(sub.flags()) == 1
    filler.unlink()
    again = storescu("127.0.0.1", port, [second], CALLER, "PNEUMOFLAG")
    assert again.returncode == 0 and SUCCESS_LINE in again.stderr, again.stderr
    flags = sub.wait_flags(2, timeout=60)
    assert sorted(f["sop_instance_uid"] for f in flags) == sorted([_sop(first), _sop(second)])
    assert d.terminate() == 0
    sub.stop()


def test_a_receiver_port_already_in_use_stops_the_start_with_a_clear_error(broker, dirs, daemons):
    import socket

    watch, state = dirs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = new_daemon(daemons, watch, state, broker.address, env=_env(port)).start(wait=False)
        assert d.wait(60) == 2, d.output()
    out = d.output()
    assert f"dicom_net.listen 127.0.0.1:{port}: cannot listen" in out and "Traceback" not in out, out


def test_a_refused_instance_gets_its_error_once_and_leaves_the_spool_for_the_archive(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    archive = tmp_path / "archive"
    port = free_port()
    sub = Subscriber(broker.address, "pneumoflag/#")
    env = _env(port, PNEUMOFLAG_WATCH_ARCHIVE_DIR=str(archive))
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    f = make_radiograph(tmp_path / "abdomen.dcm", sample_pixels(0, side=256), BodyPartExamined="ABDOMEN")
    uid = _sop(f)
    out = storescu("127.0.0.1", port, [f], CALLER, "PNEUMOFLAG")
    assert out.returncode == 0 and SUCCESS_LINE in out.stderr, out.stderr  # stored: the refusal is the model's
    (err,) = sub.wait_errors(1, timeout=60)
    assert err["file"] == f"dicom-net/{uid}.dcm" and err["reason"] == "dicom-body-part", err
    wait_until(lambda: (archive / "dicom-net" / f"{uid}.dcm").exists(), 10, "the refused instance in the archive")
    assert not list((state / "received").glob("*.dcm"))
    again = storescu("127.0.0.1", port, [f], CALLER, "PNEUMOFLAG")
    assert again.returncode == 0 and SUCCESS_LINE in again.stderr, again.stderr  # a resend: success, said once
    time.sleep(2)
    assert len(sub.errors()) == 1 and sub.flags() == []
    assert _journal(state) == [(f"dicom-net/{uid}.dcm", "error")]
    assert d.terminate() == 0
    sub.stop()


def test_the_spool_is_put_right_at_start_from_the_journal(tmp_path, caplog):
    """What a kill -9 can leave: an instance journaled but not scored (handed over), one scored but not yet removed
    (removed), one renamed into place but never journaled, so never acknowledged (removed: its sender resends it),
    and a journaled one whose file was deleted by hand (said, not handed over)."""
    from pneumoflag.device.config import load_config
    from pneumoflag.device.received import ReceivedInstances, key
    from pneumoflag.device.store import FileSig, Store

    state = tmp_path / "state"
    spool = state / "received"
    spool.mkdir(parents=True)
    cfg = load_config(env={}, overrides={"state.dir": str(state), "dicom_net.enabled": True,
                                         "dicom_net.listen": f"127.0.0.1:{free_port()}",
                                         "dicom_net.allowed_callers": [CALLER]})
    store = Store(state)
    for uid in ("1.2.1", "1.2.2", "1.2.4"):
        store.receive(uid, key(uid), CALLER, "127.0.0.1")
    store.record(key("1.2.2"), "ab" * 32, FileSig(1, 1, 1), "routine", event_id="e2")
    store.close()
    for uid in ("1.2.1", "1.2.2", "1.2.3"):
        (spool / f"{uid}.dcm").write_bytes(b"x")
    handed: list[Path] = []
    r = ReceivedInstances(cfg, handed.append)
    with caplog.at_level("INFO"):
        r.start()
        r.stop()
    assert handed == [spool.resolve() / "1.2.1.dcm"]
    assert sorted(p.name for p in spool.iterdir()) == ["1.2.1.dcm"]
    assert "1.2.4 is journaled but its file" in caplog.text and "never acknowledged" in caplog.text
