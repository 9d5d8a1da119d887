"""The daemon's state and session against a real Mosquitto and real daemon processes: one daemon per state
folder, acknowledgements that survive a restart, a state disk that turns read-only, and a clock that steps."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from mqtt_helpers import Subscriber, drop, new_daemon, wait_until
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = SAMPLES_DIR
SAMPLE_FILES = sorted(SAMPLES.rglob("*.jpeg"))
IN_USE = "is in use by another pneumoflag daemon"


def test_a_second_daemon_on_the_same_state_folder_refuses_and_the_first_goes_on(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    first = new_daemon(daemons, watch, state, broker.address).start()
    other_watch = tmp_path / "export2"
    other_watch.mkdir()
    second = new_daemon(daemons, other_watch, state, broker.address, device_id="other").start(wait=False)
    assert second.wait(60) != 0
    out = second.output()
    assert f"state.dir {state} {IN_USE} (pid {first.proc.pid})" in out, out
    assert "watching " not in out and "Traceback" not in out
    assert first.proc.poll() is None
    drop(SAMPLE_FILES[0], watch)
    assert [f["file"] for f in sub.wait_flags(1)] == [SAMPLE_FILES[0].name]
    sub.stop()


def test_two_daemons_started_at_the_same_instant_exactly_one_runs(broker, dirs, daemons):
    watch, state = dirs
    pair = [new_daemon(daemons, watch, state, broker.address) for _ in range(2)]
    for d in pair:
        d.start(wait=False)
    wait_until(lambda: any(d.proc.poll() is not None for d in pair), 60, "one of the two to give up")
    loser = next(d for d in pair if d.proc.poll() is not None)
    winner = next(d for d in pair if d is not loser)
    wait_until(lambda: "watching " in winner.output() or winner.proc.poll() is not None, 60, "the other to start")
    assert winner.proc.poll() is None, winner.output()
    assert loser.proc.returncode != 0
    assert IN_USE in loser.output(), loser.output()
    for d in pair:
        assert not re.search(r"duplicate column|sqlite|database is locked|Traceback", d.output(), re.I), d.output()



def test_two_daemons_with_one_device_id_on_one_broker_say_so(broker, tmp_path, daemons):
    """Different state folders, the same device id: each takes the other's client id over; the log says why."""
    pair = []
    for name in ("a", "b"):
        (tmp_path / name / "export").mkdir(parents=True)
        (tmp_path / name / "state").mkdir()
        pair.append(new_daemon(daemons, tmp_path / name / "export", tmp_path / name / "state", broker.address))
    for d in pair:
        d.start()
    said = "MQTT client id pneumoflag-test is in use by another client"
    wait_until(lambda: any(said in d.output() for d in pair), 60, "a daemon to say its client id is taken over")
    assert "another daemon with device id test?" in next(d.output() for d in pair if said in d.output())

# ----------------------------------------------------------------------------- acks while the daemon is away


def test_an_ack_published_while_the_daemon_is_stopped_is_journaled_after_restart_and_nothing_escalates(
        broker, dirs, daemons, tmp_path):
    from test_notification import PNEUMONIA, _db, _publish_ack, _three_tier_model

    watch, state = dirs
    model = _three_tier_model(tmp_path)
    env = {"PNEUMOFLAG_ALERTS_ESCALATE_AFTER": "3", "PNEUMOFLAG_ALERTS_MAX_ESCALATIONS": "2"}
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, model=model, env=env).start()
    drop(PNEUMONIA[0], watch, "urgent.jpeg")
    (flag,) = sub.wait_flags(1)
    assert flag["priority"] == "urgent"
    assert d.terminate() == 0
    _publish_ack(broker.address, "test", flag["event_id"])  # the nurse acknowledges while the daemon is down
    time.sleep(4)  # past escalate_after: the old daemon escalated at once on its restart
    d2 = new_daemon(daemons, watch, state, broker.address, model=model, env=env).start()
    wait_until(lambda: _db(state, "SELECT COUNT(*) FROM acks")[0][0] == 1, 30, "the ack journaled after the restart")
    assert _db(state, "SELECT acked_by, escalations FROM flags") == [("Nurse Ada", 0)]
    assert "acknowledged by Nurse Ada" in d2.output()
    time.sleep(4)  # an escalation pass runs every second: several have run by now
    assert not sub.where(lambda m: m.topic.endswith("/escalations")), d2.output()
    assert _db(state, "SELECT escalations FROM flags") == [(0,)]
    assert d2.terminate() == 0
    sub.stop()


# ----------------------------------------------------------------------------- clock steps


class SteppingWall:
    """A test double of time.time: the real wall clock plus an offset the test steps by hours."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _desk(broker, state: Path, wall, escalate_after: float = 2.0):
    from pneumoflag.device.config import load_config
    from pneumoflag.device.escalation import AckDesk
    from pneumoflag.device.publisher import Publisher
    from pneumoflag.device.store import Store

    cfg = load_config(env={}, overrides={"mqtt.broker": broker.address, "mqtt.device_id": "clock",
                                          "alerts.escalate_after": escalate_after, "alerts.max_escalations": 3})
    store = Store(state)
    pub = Publisher(cfg, store)
    desk = AckDesk(cfg, store, pub, wall=wall)
    pub.start()
    wait_until(pub.subscribed.is_set, 20, "the publisher's subscription")
    return store, pub, desk


def _urgent(store, name: str) -> str:
    from pneumoflag.device.store import FileSig, FlagRecord

    event_id = str(uuid.uuid4())
    payload = json.dumps({"event_id": event_id, "file": name}).encode()
    seq = store.record(name, name, FileSig(1, 1, 1), "urgent", event_id=event_id, message=("t/flags/urgent", payload, 1),
                       flag=FlagRecord(event_id, "urgent", 0.99, payload, None, None, time.time()))
    store.ack([seq])  # the broker took it: delivered now (wall clock)
    return event_id


def _escalations(store) -> list[str]:
    return [r.event_id for r in store.pending(1000) if "#escalation-" in r.event_id]


def test_wall_clock_steps_do_not_move_escalations(broker, tmp_path):
    wall = SteppingWall()
    store, pub, desk = _desk(broker, tmp_path / "state", wall)
    try:
        fwd = _urgent(store, "forward.jpeg")
        t0 = time.monotonic()
        desk.escalate_due()  # the daemon sees it delivered
        wall.offset += 2 * 3600  # the wall clock jumps 2 h forward
        desk.escalate_due()
        assert _escalations(store) == [], "a forward step escalated at once"
        wait_until(lambda: desk.escalate_due() or _escalations(store), 20, "the escalation, on time")
        assert time.monotonic() - t0 >= 2.0
        assert _escalations(store) == [f"{fwd}#escalation-1"]
        wall.offset = 0.0  # the store stamps deliveries with the real clock: agree with it again
        back = _urgent(store, "backward.jpeg")
        t1 = time.monotonic()
        desk.escalate_due()
        wall.offset -= 3600  # the wall clock jumps 1 h back
        wait_until(lambda: desk.escalate_due() or f"{back}#escalation-1" in _escalations(store), 20,
                   "the escalation despite a backward step")
        assert time.monotonic() - t1 >= 2.0
    finally:
        pub.stop()
        store.close()


def test_across_a_restart_the_wait_is_the_journals_clamped_to_one_interval(broker, tmp_path):
    """The monotonic clock does not survive a restart: the wait already elapsed is taken from the journal's
    wall-clock stamps, clamped to [0, escalate_after], so a step while the daemon was down brings an
    escalation forward to the restart at most, or delays it by one escalate_after at most."""
    wall = SteppingWall()
    state = tmp_path / "state"
    store, pub, _ = _desk(broker, state, wall, escalate_after=600)
    early, late = _urgent(store, "early.jpeg"), _urgent(store, "late.jpeg")
    pub.stop()
    store.close()
    with sqlite3.connect(state / "pneumoflag.db") as db:  # "late" was delivered 2 h after the restart's clock
        db.execute("UPDATE flags SET delivered_at = delivered_at + 7200 WHERE event_id=?", (late,))
    wall.offset = 3600  # the restarted daemon's wall clock: 1 h after "early" was delivered
    store, pub, desk = _desk(broker, state, wall, escalate_after=600)
    try:
        desk.escalate_due()
        assert _escalations(store) == [f"{early}#escalation-1"]  # waited 1 h > 600 s: due at the restart
        (row,) = [r for r in store.pending(1000) if r.event_id == f"{early}#escalation-1"]
        assert json.loads(row.payload)["unacknowledged_s"] == 600.0  # clamped to one escalate_after
        desk.escalate_due()
        assert _escalations(store) == [f"{early}#escalation-1"]  # "late" waits its full interval from now
    finally:
        pub.stop()
        store.close()


# ----------------------------------------------------------------------------- a state disk turned read-only


def _loop_ext4(tmp_path: Path) -> Path:
    """An 16 MB ext4 image, mounted with ``errors=remount-ro`` (as a state partition is) by the test."""
    img = tmp_path / "state.ext4"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-o", "loop", str(img), str(probe)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs unshare and a loop device (mount -o loop) to make a real read-only disk")
    return img


def test_a_state_disk_turned_read_only_mid_run_ends_the_daemon_with_status_1(broker, dirs, daemons, tmp_path):
    """A real read-only disk: the state folder is an ext4 file system (``errors=remount-ro``) in the daemon's
    private mount namespace, and the kernel is made to find an error in it while the daemon runs
    (``/sys/fs/ext4/DEV/trigger_fs_error``): it turns read-only as after a media error."""
    watch, state = dirs
    img = _loop_ext4(tmp_path)
    sub = Subscriber(broker.address, "pneumoflag/#")
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -o loop,errors=remount-ro {img} {state} && exec "$@"', "sh")
    d = new_daemon(daemons, watch, state, broker.address, wrapper=wrapper).start()
    drop(SAMPLE_FILES[0], watch, "before.jpeg")
    sub.wait_flags(1)
    subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "sh", "-c",
                    f"echo test > /sys/fs/ext4/$(basename $(findmnt -n -o SOURCE {state}))/trigger_fs_error"],
                   check=True)
    drop(SAMPLE_FILES[1], watch, "after.jpeg")
    assert d.wait(60) == 1, d.output()
    out = d.output()
    assert f"state database {state / 'pneumoflag.db'} can no longer be written" in out, out
    assert "exiting with status 1" in out and "state disk full" not in out, out
    wait_until(lambda: sub.where(lambda m: m.topic == "pneumoflag/test/status")[-1].payload == "offline", 10,
               "offline status")
    assert [f["file"] for f in sub.flags()] == ["before.jpeg"]  # after.jpeg is not journaled: scored next start
    sub.stop()



OPEN_AT = """
import sys, time
from pneumoflag.device.store import Store, StoreError
while time.time() < float(sys.argv[2]):  # all at the same instant
    pass
try:
    Store(sys.argv[1]).close()
except StoreError as exc:
    sys.exit(str(exc))
"""


def test_the_schema_migration_is_safe_when_processes_open_an_old_database_at_once(tmp_path):
    """Not only daemons open the database (report, a second daemon before it reads the lock): adding a
    column must not fail with ``duplicate column name`` when several do so at the same instant."""
    from pneumoflag.device.store import MIGRATIONS, SCHEMA

    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "pneumoflag.db") as db:  # a database from before the migrations
        db.executescript(SCHEMA.replace("    heatmap        TEXT             -- the overlay's file name under "
                                        "STATE/heatmaps (explain.enabled)\n", "").replace(
                                            "last_escalated REAL,", "last_escalated REAL"))
        for table, column, _ in MIGRATIONS:
            assert column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(state), start], stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert results == [(0, "")] * 8


def test_the_state_lock_is_never_taken_through_a_link_or_on_a_fifo(tmp_path):
    """The pid note would overwrite a link's target; a FIFO is no lock file either."""
    from pneumoflag.device.statelock import LOCK_NAME, StateLock

    precious = tmp_path / "precious"
    precious.write_text("keep me")
    state = tmp_path / "state"
    state.mkdir()
    (state / LOCK_NAME).symlink_to(precious)
    with pytest.raises(OSError):
        StateLock(state).acquire()
    assert precious.read_text() == "keep me"
    (state / LOCK_NAME).unlink()
    os.mkfifo(state / LOCK_NAME)
    with pytest.raises(OSError, match="not a plain file"):
        StateLock(state).acquire()
    (state / LOCK_NAME).unlink()
    lock = StateLock(state)
    lock.acquire()  # a plain file: taken
    lock.release()


def test_a_flag_is_sent_only_after_an_fsync_has_put_its_journal_entry_on_disk(broker, dirs, daemons, tmp_path):
    """Group commit keeps the promise: a result is journaled without an fsync, and the publisher fsyncs the
    write-ahead log before it sends. strace records every write to the log, every fsync of it and every send;
    before each flag goes to the broker, the last thing done to the log is an fsync (which covers all the
    writes before it, the flag's own included)."""
    import shutil

    from pneumoflag.device.contract import Topics

    strace = shutil.which("strace")
    assert strace, "strace is needed; .ci/run installs it"
    trace = tmp_path / "io.txt"
    wrapper = (strace, "-f", "-qq", "-y", "-s", "200", "-o", str(trace),
               "-e", "trace=pwrite64,write,fsync,fdatasync,sendto,sendmsg")
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, wrapper=wrapper).start()
    samples = sorted(SAMPLES_DIR.rglob("*.jpeg"))[:3]
    for i, f in enumerate(samples):  # one at a time: each commit, fsync and send on its own
        drop(f, watch)
        sub.wait_flags(i + 1, timeout=60)
    daemon_pid = int(subprocess.check_output(["pgrep", "-P", str(d.proc.pid)]).split()[0])
    os.kill(daemon_pid, signal.SIGTERM)  # the daemon, not strace: strace writes its whole record as it ends
    assert d.proc.wait(30) == 0
    flag_topic = Topics("pneumoflag", "test").flag("routine").rsplit("/", 1)[0] + "/"  # any priority
    events = []
    waiting = set()  # threads whose fsync of the log strace split ("<unfinished ...>", later "<... resumed>")
    for line in trace.read_text(errors="replace").splitlines():
        pid = line.split(None, 1)[0]
        if "-wal>" in line and ("fsync(" in line or "fdatasync(" in line):
            if "unfinished" in line:
                waiting.add(pid)
            else:
                events.append("fsync")  # completed
        elif "sync resumed>" in line and pid in waiting:  # the resumed half names no file: the thread does
            waiting.discard(pid)
            events.append("fsync")
        elif "-wal>" in line and "write" in line and "resumed>" not in line:
            events.append("write")
        elif ("sendto(" in line or "sendmsg(" in line) and flag_topic in line:
            events.append("send")
    sends = [i for i, e in enumerate(events) if e == "send"]
    assert len(sends) >= 3, events[-40:]
    for i in sends:
        last_log_op = next(e for e in reversed(events[:i]) if e != "send")
        assert last_log_op == "fsync", f"a flag was sent after an un-fsync'd write to the log: {events[:i + 1][-12:]}"


def test_a_result_committed_without_an_fsync_is_not_offered_for_sending_until_a_sync(tmp_path):
    """The store's half of group commit: ``record(durable=False)`` is journaled at once (the rules see it) but
    ``pending`` holds its message back until ``sync`` has fsync'd the log; a durable write (an escalation, a
    heat map) covers what was committed before it; a reopened store starts with everything on disk."""
    from pneumoflag.device.store import FileSig, Store

    store = Store(tmp_path)
    sig = FileSig(1, 1, 1)
    store.record("a.jpeg", "a" * 64, sig, "error", reason="corrupt", event_id="ea", message=("t/errors", b"{}", 1),
                 durable=False)
    assert store.last_for_path("a.jpeg").event_id == "ea"  # journaled: seen by the dedupe rules
    assert store.pending() == []
    assert store.sync() >= 1 and [r.event_id for r in store.pending()] == ["ea"]
    store.record("b.jpeg", "b" * 64, sig, "error", reason="corrupt", event_id="eb", message=("t/errors", b"{}", 1),
                 durable=False)
    store.queue_resend("t/resend", [("x", b"{}")], "tag")  # a durable write: its fsync covers "eb" too
    assert [r.event_id for r in store.pending()] == ["ea", "eb", "x#resend-tag"]
    store.record("c.jpeg", "c" * 64, sig, "error", reason="corrupt", event_id="ec", message=("t/errors", b"{}", 1),
                 durable=False)
    store.close()
    assert [r.event_id for r in Store(tmp_path).pending()][-1] == "ec"
