"""Hostile folders and inputs against the real daemon and a real Mosquitto (issue 8's defects, one test each).

Each test reproduces what broke the appliance before: a name that is not UTF-8,
a link loop, links out of the folder, small files that decode to huge rasters,
a permission fixed later, a replaced export folder, a clock in the future, a
writer that pauses, names that forge log lines, things that are not chest
radiographs, topic names a broker drops, a full state disk, silent copies and
secrets echoed in errors.
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MINI, run_cli
from mqtt_helpers import REPO, SHIPPED_MODEL, Subscriber, drop, fill_state_disk, new_daemon, private_tmpfs, wait_until
from test_daemon import SAMPLE_FILES, _journal

GOOD = SAMPLE_FILES[0]


def _no_dac_override() -> tuple:
    """Root reads everything: run the daemon without the capabilities that bypass file permissions."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's file-permission override"
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _peaks_mb(pid: int) -> dict[int, float]:
    """Peak RSS of the daemon and of its children (the decoder worker), by pid."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {p: _vm_hwm_mb(p) for p in [pid, *children]}


# ----------------------------------------------------------------------------- 1. names that are not UTF-8

def test_a_name_that_is_not_utf8_is_scored_and_survives_a_restart(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    raw = os.fsencode(watch) + b"/bad\xff\xfename.jpeg"
    tmp = os.fsencode(watch) + b"/.incoming.part"
    with open(tmp, "wb") as f:
        f.write(GOOD.read_bytes())
    os.rename(tmp, raw)
    drop(SAMPLE_FILES[1], watch, "after.jpeg")
    flags = sub.wait_flags(2)
    names = {f["file"] for f in flags}
    assert names == {"bad\\xff\\xfename.jpeg", "after.jpeg"}  # shown safely, reversibly
    assert d.terminate() == 0
    d2 = new_daemon(daemons, watch, state, broker.address).start()
    drop(SAMPLE_FILES[2], watch, "third.jpeg")
    wait_until(lambda: len(sub.flags()) == 3, 20, "the third flag")
    time.sleep(1)
    assert len(sub.flags()) == 3 and d2.proc.poll() is None  # no crash loop, no second alert


# ----------------------------------------------------------------------------- 2. a dying thread

def test_a_symlink_loop_is_rejected_and_the_watcher_lives_on(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    os.symlink("loop.jpg", watch / "loop.jpg")
    (err,) = sub.wait_errors(1)
    assert err["file"] == "loop.jpg" and err["reason"] == "unreadable" and "symbolic links" in err["message"]
    drop(GOOD, watch, "next.jpeg")  # the watcher still sees new files
    assert [f["file"] for f in sub.wait_flags(1)] == ["next.jpeg"]
    assert d.proc.poll() is None


def test_a_worker_thread_that_dies_ends_the_process_with_status_1(broker, dirs, tmp_path):
    """If an exception ever does end a thread, the daemon says so and exits 1 (systemd restarts it)."""
    watch, state = dirs
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\n"
        "from pneumoflag.device import publisher\n"
        "def boom(self):\n"
        "    raise RuntimeError('injected failure in the outbox pump')\n"
        "publisher.Publisher._pump = boom\n"
        "from pneumoflag.device.cli import main\n"
        f"sys.exit(main(['watch', {str(watch)!r}, '--state-dir', {str(state)!r}, '--model', {str(SHIPPED_MODEL)!r},"
        f" '--broker', {broker.address!r}]))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "thread outbox-pump died" in proc.stderr and "exiting with status 1" in proc.stderr


# ----------------------------------------------------------------------------- 3. links out of the folder

def test_links_out_of_the_folder_are_never_read(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    os.symlink("/etc/shadow", watch / "shadow.jpeg")
    os.symlink("/etc/passwd/x", watch / "link.tmp")
    os.rename(watch / "link.tmp", watch / "link.jpg")
    errors = {e["file"]: e for e in sub.wait_errors(2)}
    assert errors["shadow.jpeg"]["reason"] == "outside-folder" and errors["shadow.jpeg"]["sha256"] is None
    assert errors["link.jpg"]["reason"] == "unreadable" and "Not a directory" in errors["link.jpg"]["message"]
    os.symlink(watch / "next.jpeg", watch / "inside-link.jpeg")  # a link that stays inside is fine
    drop(GOOD, watch, "next.jpeg")
    wait_until(lambda: len(sub.flags()) >= 1, 20, "a flag after the links")
    assert d.proc.poll() is None
    assert "root:" not in d.output()


# ----------------------------------------------------------------------------- 4. memory

def test_small_files_that_decode_huge_are_refused_and_memory_stays_small(broker, dirs, daemons, tmp_path):
    from pydicom.uid import RLELossless
    from dicom_helpers import write_test_dicom

    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    staging = tmp_path / "staging"
    staging.mkdir()
    Image.new("RGBA", (7000, 8500)).save(staging / "rgba.png")  # 59.5 MP: ~230 KB on disk
    Image.new("L", (7400, 7400)).save(staging / "gray8.png")  # 55 MP
    big = np.zeros((7700, 7700), np.uint16)
    ds_path = write_test_dicom(staging / "rle.dcm", big)
    import pydicom

    ds = pydicom.dcmread(ds_path)
    ds.compress(RLELossless)
    ds.save_as(ds_path)
    # a large but real-sized 16-bit radiograph must still be scored
    src = np.asarray(Image.open(GOOD).convert("L"), np.uint16)
    Image.fromarray(np.asarray(Image.fromarray(src * 257).resize((4300, 3500)), np.uint16)).save(staging / "dr16.png")
    for f in sorted(staging.iterdir()):
        drop(f, watch)
    errors = {e["file"]: e for e in sub.wait_errors(3, timeout=60)}
    for name in ("rgba.png", "gray8.png", "rle.dcm"):
        assert errors[name]["reason"] == "too-large", errors[name]
        assert re.search(r"needs \d+ MiB to decode, over the limit of 96 MiB", errors[name]["message"])
    assert [f["file"] for f in sub.wait_flags(1, timeout=60)] == ["dr16.png"]
    peaks = _peaks_mb(d.proc.pid)
    assert sum(peaks.values()) <= 300, f"peak RSS by process: {peaks} MB"


# ----------------------------------------------------------------------------- 5. a permission fixed later

def test_a_file_made_readable_later_is_scored_and_supersedes_its_error(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, wrapper=_no_dac_override()).start()
    locked = watch / "locked.jpeg"
    staged = watch.parent / "locked.staged"  # arrives already unreadable: no window for the daemon to read it
    shutil.copyfile(GOOD, staged)
    staged.chmod(0o000)
    staged.rename(locked)
    (err,) = sub.wait_errors(1)
    assert err["reason"] == "permission-denied"
    locked.chmod(0o644)
    (flag,) = sub.wait_flags(1)
    assert flag["file"] == "locked.jpeg" and flag["supersedes"] == err["event_id"]
    assert d.terminate() == 0
    new_daemon(daemons, watch, state, broker.address, wrapper=_no_dac_override()).start()
    time.sleep(2)
    assert len(sub.flags()) == 1 and len(sub.errors()) == 1  # and a restart says nothing new


# ----------------------------------------------------------------------------- 6. the export folder replaced

@pytest.mark.parametrize("how", ["rm-mkdir", "mv-mkdir"])
def test_a_replaced_export_folder_is_watched_again(broker, dirs, daemons, how):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    drop(GOOD, watch, "before.jpeg")
    sub.wait_flags(1)
    if how == "rm-mkdir":
        shutil.rmtree(watch)
    else:
        watch.rename(watch.with_name("old-export"))
    watch.mkdir()
    wait_until(lambda: "was replaced" in d.output(), 15, "the daemon to notice")
    drop(SAMPLE_FILES[1], watch, "after.jpeg")
    assert [f["file"] for f in sub.wait_flags(2)][-1] == "after.jpeg"


# ----------------------------------------------------------------------------- 7. a clock in the future

def test_a_bad_file_from_the_future_ends_in_an_error_in_time(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    staged = tmp_path / "future.jpeg"
    staged.write_bytes(GOOD.read_bytes()[:4000])
    later = time.time() + 86400
    os.utime(staged, (later, later))
    t0 = time.monotonic()
    os.rename(staged, watch / "future.jpeg")
    (err,) = sub.wait_errors(1, timeout=15)
    elapsed = time.monotonic() - t0
    assert err["reason"] == "truncated"
    assert elapsed < 1.5 + 4  # incomplete_timeout (1.5 s here) plus scheduling slack
    retries = d.output().count("still being written? retrying")
    assert retries < 30, f"{retries} retries"


# ----------------------------------------------------------------------------- 8. a writer that pauses

def test_a_writer_that_pauses_gets_one_chain_error_then_superseding_flag(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    data = GOOD.read_bytes()
    with open(watch / "slow.jpeg", "wb") as f:
        f.write(data[: len(data) // 3])
    (err,) = sub.wait_errors(1, timeout=15)  # the pause outlasted incomplete_timeout
    assert err["reason"] == "truncated"
    with open(watch / "slow.jpeg", "ab") as f:
        f.write(data[len(data) // 3:])
    (flag,) = sub.wait_flags(1)
    assert flag["file"] == "slow.jpeg" and flag["supersedes"] == err["event_id"]
    time.sleep(1)
    assert len(sub.flags()) == 1 and len(sub.errors()) == 1


# ----------------------------------------------------------------------------- 9. names that forge lines

def test_names_cannot_forge_log_lines_or_terminal_escapes(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    # the nursing-station terminal, connected before the files arrive
    alerts = subprocess.Popen([sys.executable, "-m", "pneumoflag.device.cli", "alerts", "--broker", broker.address,
                               "--count", "2", "--client-id", "forge-test"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "listening on" in alerts.stderr.readline()
    forged = "evil\n2026-01-01 00:00:00,000 INFO pneumoflag: FAKE all clear.jpeg"
    drop(GOOD, watch, forged)
    drop(SAMPLE_FILES[1], watch, "clear\x1b[2Jscreen.jpeg")
    flags = sub.wait_flags(2)
    assert {f["file"] for f in flags} == {forged, "clear\x1b[2Jscreen.jpeg"}  # JSON keeps the name exact
    log = d.output()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())
    assert "evil\\n2026-01-01" in log and "\x1b" not in log
    out, _ = alerts.communicate(timeout=30)
    assert alerts.returncode == 0
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert len(out.splitlines()) == 2 and "evil\\n2026" in out  # one line per flag, whatever the name


# ----------------------------------------------------------------------------- 10. not a chest radiograph

def _bitflipped_jpeg_that_still_decodes() -> bytes:
    from pneumoflag.device.preprocess import ImageDecodeError, PreprocessSpec, decode, decode_with_info

    rng = random.Random(7)
    base = GOOD.read_bytes()
    for _ in range(500):
        d = bytearray(base)
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(600, len(d))
            d[i] ^= 1 << rng.randrange(8)
        try:
            decode(bytes(d), PreprocessSpec())
        except ImageDecodeError:
            continue
        try:
            decode_with_info(bytes(d), PreprocessSpec(), strict_jpeg=True)
        except ImageDecodeError:
            return bytes(d)  # Pillow repaired it silently; the strict check does not
    raise AssertionError("no damaged JPEG found")


def _mr_relabelled(path: Path) -> Path:
    from dicom_helpers import write_test_dicom

    rng = np.random.default_rng(0)
    mr = (rng.normal(800, 200, (256, 256)).clip(0, 4095)).astype(np.uint16)
    return write_test_dicom(path, mr, Modality="CR", BodyPartExamined="CHEST", EchoTime=12.0, RepetitionTime=500.0,
                            SOPClassUID="1.2.840.10008.5.1.4.1.1.4")


def test_what_is_not_a_chest_radiograph_is_refused(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    staging = tmp_path / "s"
    staging.mkdir()
    Image.new("L", (1, 1), 128).save(staging / "dot.jpeg")
    Image.new("L", (1, 5000), 90).save(staging / "strip.png")
    Image.new("L", (600, 600), 77).save(staging / "grey.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 65535, (512, 512), dtype=np.uint16)).save(staging / "noise16.png")
    (staging / "damaged.jpeg").write_bytes(_bitflipped_jpeg_that_still_decodes())
    _mr_relabelled(staging / "mr.dcm")
    expected = {"dot.jpeg": "not-a-radiograph", "strip.png": "not-a-radiograph", "grey.png": "not-a-radiograph",
                "noise16.png": "not-a-radiograph", "damaged.jpeg": "corrupt", "mr.dcm": "not-a-radiograph"}
    for f in staging.iterdir():
        drop(f, watch)
    drop(GOOD, watch, "real.jpeg")
    errors = {e["file"]: e for e in sub.wait_errors(len(expected), timeout=30)}
    assert {k: v["reason"] for k, v in errors.items()} == expected
    assert "gate.min_side" in errors["dot.jpeg"]["message"] and "noise" in errors["noise16.png"]["message"]
    assert "MR Image Storage" in errors["mr.dcm"]["message"]
    assert [f["file"] for f in sub.wait_flags(1)] == ["real.jpeg"]


def _real_radiographs() -> list[Path]:
    files = sorted(SAMPLE_FILES) + sorted(MINI.rglob("*.jpeg"))
    shared = REPO.parent / "shared" / "data"
    for sub in ("chest_xray/site_dev", "fullres"):
        files += sorted((shared / sub).rglob("*.jpeg"))
    return files


def test_no_real_radiograph_is_refused_by_the_gate():
    from pneumoflag.device.config import load_config
    from pneumoflag.device.pipeline import Pipeline
    from pneumoflag.device.preprocess import ImageDecodeError
    from pneumoflag.device.scorer import load_scorer

    cfg = load_config(env={}, overrides={"model.path": str(SHIPPED_MODEL)})
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu")
    pipe = Pipeline(cfg, scorer, card)
    files = _real_radiographs()
    refused = []
    for f in files:
        try:
            pipe.decode(f.read_bytes(), f.name)
        except ImageDecodeError as exc:
            refused.append(str(exc))
    assert refused == [], refused
    assert len(files) >= 40  # the samples and the mini set at least; site_dev and fullres where present


def test_the_gates_fast_metrics_equal_the_textbook_formulas():
    """The gate reads percentiles off a histogram and correlates by hand (it runs on every file); on real
    radiographs at the model's size, noise, flat, stepped and tiny images, each figure equals numpy's
    percentile / corrcoef / float Laplacian, so no limit moves."""
    from pneumoflag.device import gate
    from pneumoflag.device.card import ModelCard, card_path_for
    from pneumoflag.device.preprocess import decode, resize

    def dynamic_range(a):
        lo, hi = np.percentile(a, [1, 99])
        return float(hi - lo)

    def smoothness(a):
        x, y = a[:, :-1].astype(np.float64).ravel(), a[:, 1:].astype(np.float64).ravel()
        return 0.0 if x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])

    def detail(a):
        a = a.astype(np.float64)
        lap = np.abs(4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]).mean()
        return float(lap / a.std()) if a.std() > 0 else 0.0

    spec = ModelCard.load(card_path_for(SHIPPED_MODEL)).preprocessing
    rng = np.random.default_rng(7)
    images = [resize(decode(f, spec), spec) for f in _real_radiographs()[:40]]
    images += [rng.integers(0, 256, (128, 128), dtype=np.uint8), rng.integers(100, 103, (97, 128), dtype=np.uint8),
               np.full((128, 128), 9, np.uint8), np.zeros((3, 3), np.uint8),
               (np.add.outer(np.arange(128), np.arange(128)) % 256).astype(np.uint8),
               np.where(rng.random((64, 64)) < 0.995, 0, 255).astype(np.uint8)]
    for a in images:
        assert gate.dynamic_range(a) == pytest.approx(dynamic_range(a), abs=1e-9)
        assert gate.smoothness(a) == pytest.approx(smoothness(a), abs=1e-9)
        assert gate.detail(a) == pytest.approx(detail(a), abs=1e-9)
        assert gate.uniform_share(a) == np.bincount(a.ravel()).max() / a.size


# ----------------------------------------------------------------------------- 11. topic names

@pytest.mark.parametrize("toml, needle", [
    ('[mqtt]\ntopic_prefix = "$SYS"\n', "starts with '$'"),
    ('[mqtt]\ndevice_id = "xr\\u0000room"\n', "control characters"),
    ('[mqtt]\ndevice_id = "room/2"\n', "'/'"),
    ('[mqtt]\nbroker = "mqtt://host:1883"\n', "without a scheme"),
])
def test_topic_names_a_broker_would_drop_are_refused_at_start(tmp_path, dirs, capsys, toml, needle):
    watch, state = dirs
    cfg = tmp_path / "p.toml"
    cfg.write_text(toml)
    assert run_cli("watch", watch, "--config", cfg, "--state-dir", state) == 2
    assert needle in capsys.readouterr().err
    assert run_cli("watch", watch, "--topic-prefix", "$share", "--state-dir", state) == 2


# ----------------------------------------------------------------------------- 12. a full state disk

def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    return subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                          capture_output=True).returncode == 0


def test_a_full_state_disk_is_said_once_and_nothing_is_lost(broker, dirs, daemons, tmp_path):
    if not shutil.which("unshare") or not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare and mount (a private tmpfs) to make a real full disk")
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    wrapper = private_tmpfs(state)
    d = new_daemon(daemons, watch, state, broker.address, wrapper=wrapper).start()
    drop(GOOD, watch, "first.jpeg")
    sub.wait_flags(1)
    filler = fill_state_disk(d, state)
    for i in range(1, 5):
        drop(SAMPLE_FILES[i], watch, f"during-{i}.jpeg")
    wait_until(lambda: "state disk full" in d.output(), 20, "the disk-full report")
    time.sleep(3)
    assert d.output().count("state disk full") == 1  # once per episode, not 20 lines a second
    filler.unlink()
    flags = sub.wait_flags(5, timeout=90)  # retried with backoff, nothing lost
    assert sorted(f["file"] for f in flags) == [f"during-{i}.jpeg" for i in range(1, 5)] + ["first.jpeg"]
    assert "writable again" in d.output()


# ----------------------------------------------------------------------------- 13. no silent files

def test_copies_and_overwrites_each_get_a_message(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    bad = tmp_path / "bad.jpeg"
    bad.write_text("not an image\n" * 40)
    drop(bad, watch, "bad.jpeg")
    (first_err,) = sub.wait_errors(1)
    drop(bad, watch, "bad-copy.jpeg")  # an identical copy of a rejected file
    errs = sub.wait_errors(2)
    assert errs[1]["reason"] == "duplicate-of" and errs[1]["duplicate_of"] == first_err["event_id"]
    drop(GOOD, watch, "scan.jpeg")
    (f1,) = sub.wait_flags(1)
    drop(SAMPLE_FILES[-1], watch, "scan.jpeg")  # the same path, new content
    flags = sub.wait_flags(2)
    assert flags[1]["file"] == "scan.jpeg" and flags[1]["supersedes"] == f1["event_id"]
    assert flags[1]["sha256"] != f1["sha256"]
    statuses = [s for p, s, r in _journal(state)]
    assert statuses.count("duplicate") == 1


# ----------------------------------------------------------------------------- 14. secrets in errors

def test_a_secret_is_never_printed_in_an_error(tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[mqtt]\nusername = "u"\npassword = 918273645\n')
    assert run_cli("config", "--config", cfg) == 2
    err = capsys.readouterr().err
    assert "918273645" not in err and "mqtt.password" in err and "not shown" in err


# ----------------------------------------------------------------------------- SIGTERM still clean

def test_sigterm_after_hostile_input_still_exits_0(broker, dirs, daemons):
    watch, state = dirs
    d = new_daemon(daemons, watch, state, broker.address).start()
    os.mkfifo(watch / "pipe.jpeg")  # a FIFO would block a naive reader forever
    drop(GOOD, watch, "ok.jpeg")
    wait_until(lambda: "ok.jpeg: " in d.output(), 20, "the good file")
    wait_until(lambda: "pipe.jpeg: not a regular file" in d.output(), 20, "the FIFO to be rejected, unread")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0


# ============================================================================= round 2 (a hostile tester's findings)

def _publish(broker: str, topic: str, payload: bytes) -> None:
    import paho.mqtt.client as mqtt

    host, port = broker.rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(host, int(port))
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def test_hostile_acknowledgements_never_stop_the_daemon(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    for payload in (b'{"schema":"pneumoflag.ack/1","event_id":"\\ud800","station":"s","by":"b","at":"t"}',
                    b"[" * 100_000, b'{"a":' * 50_000, b"x" * 100_000, b"\xff\xfe not utf-8",
                    b'{"schema":"pneumoflag.ack/1","event_id":"../../x","station":"s","by":"b","at":"t"}'):
        _publish(broker.address, "pneumoflag/test/acks", payload)
    drop(GOOD, watch, "after-the-acks.jpeg")
    assert [f["file"] for f in sub.wait_flags(1)] == ["after-the-acks.jpeg"]
    assert d.proc.poll() is None
    wait_until(lambda: "that are not acknowledgements" in d.output(), 70, "one summary line of what was refused")
    assert d.output().count("that are not acknowledgements") == 1


def test_the_terminal_survives_hostile_flag_messages(broker, tmp_path):
    alerts = subprocess.Popen([sys.executable, "-m", "pneumoflag.device.cli", "alerts", "--broker", broker.address,
                               "--count", "1", "--client-id", "hostile-terminal"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "listening on" in alerts.stderr.readline()
        _publish(broker.address, "pneumoflag/evil/flags/urgent", b"[" * 100_000)
        _publish(broker.address, "pneumoflag/evil/flags/urgent", b'{"file": "x\\ud800\\u001b[2J.jpeg", "priority": 7}')
        out, _ = alerts.communicate(timeout=30)
        assert alerts.returncode == 0 and "\\ud800" in out and "\x1b" not in out
    finally:
        if alerts.poll() is None:
            alerts.kill()


def _encapsulated_jpeg_dicom(path: Path, frame_side: int, header_side: int) -> Path:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    from dicom_helpers import write_test_dicom

    buf = io.BytesIO()
    Image.open(GOOD).convert("L").resize((frame_side, frame_side)).save(buf, "JPEG", quality=20)
    write_test_dicom(path, np.zeros((header_side, header_side), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _deflated_dicom(path: Path, side: int) -> Path:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from dicom_helpers import write_test_dicom

    write_test_dicom(path, np.zeros((side, side), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_that_lies_about_its_size_is_refused_before_it_is_decoded(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    staging = tmp_path / "s"
    staging.mkdir()
    _encapsulated_jpeg_dicom(staging / "lie.dcm", 9000, 512)  # says 512 x 512, holds 9000 x 9000
    _deflated_dicom(staging / "deflated.dcm", 8000)  # a few hundred KB that inflate to 128 MB
    for f in staging.iterdir():
        drop(f, watch)
    drop(GOOD, watch, "next.jpeg")
    errors = {e["file"]: e for e in sub.wait_errors(2, timeout=60)}
    assert errors["lie.dcm"]["reason"] == "dicom-invalid" and "9000x9000" in errors["lie.dcm"]["message"]
    assert errors["deflated.dcm"]["reason"] == "too-large"
    sub.wait_flags(1)
    assert _vm_hwm_mb(d.proc.pid) <= 300


def test_no_second_message_for_a_file_only_its_attributes_change(broker, dirs, daemons, tmp_path):
    """chmod 000 then 644 of a scored file, touching a rejected file: nothing new to say, so nothing said."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address, wrapper=_no_dac_override()).start()
    drop(GOOD, watch, "scan.jpeg")
    sub.wait_flags(1)
    os.mkfifo(watch / "pipe.jpeg")
    sub.wait_errors(1)
    (watch / "scan.jpeg").chmod(0o000)
    time.sleep(1)
    (watch / "scan.jpeg").chmod(0o644)
    for _ in range(3):
        os.utime(watch / "pipe.jpeg")
        time.sleep(0.4)
    drop(SAMPLE_FILES[1], watch, "next.jpeg")
    wait_until(lambda: len(sub.flags()) == 2, 20, "the next flag")
    time.sleep(1)
    assert [f["file"] for f in sub.flags()] == ["scan.jpeg", "next.jpeg"] and len(sub.errors()) == 1


def test_upper_case_temporary_names_are_ignored(broker, dirs, daemons):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    new_daemon(daemons, watch, state, broker.address).start()
    for tmp in ("CR0001.TMP", "CR0002.PART", "CR0003.Tmp"):
        shutil.copyfile(GOOD, watch / tmp)
        os.replace(watch / tmp, watch / (tmp.split(".")[0] + ".jpeg"))
    flags = sub.wait_flags(1)
    time.sleep(1)
    assert [f["file"] for f in sub.flags()] == ["CR0001.jpeg"] and [e["reason"] for e in sub.errors()] == [
        "duplicate-of", "duplicate-of"] and flags


def test_events_lost_while_paused_are_found_by_a_rescan(broker, dirs, daemons):
    """SIGSTOP (a VM pause) while more files arrive than the inotify queue holds: every file still gets its
    result, found by the scan that the lost-events warning starts."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    n = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) // 3 + 500
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for i in range(n):  # tiny distinct files: the gate refuses them, quickly, each with its own message
            (watch / f"f{i:05d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + i.to_bytes(4, "big"))
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_until(lambda: len(sub.errors()) >= n, 240, f"{n} results")
    assert "scanning the export folder for what was missed" in d.output()
    assert len({e["file"] for e in sub.errors()}) == n


def test_an_export_folder_replaced_by_a_link_is_not_followed(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(GOOD, elsewhere / "private.jpeg")
    watch.rename(tmp_path / "old-export")
    watch.symlink_to(elsewhere)
    wait_until(lambda: "was replaced by a link" in d.output(), 15, "the daemon to notice")
    time.sleep(2.5)
    assert sub.flags() == [] and d.proc.poll() is None


def test_a_deleted_state_database_is_written_back(broker, dirs, daemons):
    """Deleting the journal under a running daemon would make the next start alert every file again."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    drop(GOOD, watch, "a.jpeg")
    sub.wait_flags(1)
    (state / "pneumoflag.db").unlink()
    wait_until(lambda: (state / "pneumoflag.db").exists(), 15, "the database written back")
    assert "written back from its open copy" in d.output()
    assert d.terminate() == 0
    new_daemon(daemons, watch, state, broker.address).start()
    time.sleep(2)
    assert len(sub.flags()) == 1


def test_a_read_only_or_corrupt_state_database_stops_the_start_with_the_reason(tmp_path, dirs, capsys):
    watch, state = dirs
    (state / "pneumoflag.db").write_bytes(b"this is not an SQLite database" * 100)
    assert run_cli("watch", watch, "--state-dir", state, "--broker", "127.0.0.1:1") == 2
    assert "corrupt" in capsys.readouterr().err


def test_header_floods_are_refused_and_memory_stays_small(broker, dirs, daemons, tmp_path):
    """99 MB of empty JPEG COM segments (1,865 MB before) or of empty private PNG chunks (1,105 MB):
    refused from a scan of the bytes; the daemon and its decoder worker together stay under 300 MB."""
    import struct
    import zlib

    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address).start()
    size = 99 * 10**6
    jpeg = GOOD.read_bytes()
    buf = io.BytesIO()
    Image.open(GOOD).convert("L").save(buf, "PNG")
    png = buf.getvalue()
    chunk = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "com.jpeg").write_bytes(jpeg[:2] + b"\xff\xfe\x00\x02" * ((size - len(jpeg)) // 4) + jpeg[2:])
    (staging / "chunks.png").write_bytes(png[:33] + chunk * ((size - len(png)) // 12) + png[33:])
    for f in sorted(staging.iterdir()):
        assert 98e6 < f.stat().st_size < 100 * 2**20
        drop(f, watch)
        f.unlink()
    errors = {e["file"]: e for e in sub.wait_errors(2, timeout=120)}
    assert errors["com.jpeg"]["reason"] == "too-large"
    assert "more than 1,000 JPEG segments" in errors["com.jpeg"]["message"]
    assert errors["chunks.png"]["reason"] == "too-large"
    assert "more than 1,000 PNG ancillary chunks" in errors["chunks.png"]["message"]
    drop(GOOD, watch)  # still scoring
    assert [f["file"] for f in sub.wait_flags(1, timeout=60)] == [GOOD.name]
    peaks = _peaks_mb(d.proc.pid)
    print(f"peak RSS by process: {peaks} MB")
    assert sum(peaks.values()) <= 300, f"peak RSS by process: {peaks} MB"
