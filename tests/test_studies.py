"""One result per study, through the real daemon and a real Mosquitto: the images of one StudyInstanceUID give one
flag, a superseding one only when a later image raises the priority, news without an alert otherwise, refused
views named, a close after ``dicom.study_quiet_seconds`` and a reopen after it."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
from pydicom.uid import generate_uid

from dicom_helpers import make_radiograph, require_tools, sample_pixels, storescu
from mqtt_helpers import Subscriber, drop, free_port, new_daemon, wait_until
from pneumoflag.device.config import load_config
from pneumoflag.device.contract import MAX_REJECTED, FlagMessage
from pneumoflag.device.store import UNSTATABLE, Store
from pneumoflag.device.studies import Studies

CALLER = "CR_ROOM2"
#: sample_pixels indices the shipped model scores routine (0-3) and urgent (4-7) at 256 px
ROUTINE, URGENT = (0, 1, 2), (4, 5, 6)


def _news(sub: Subscriber, study: str) -> list[dict]:
    return [m for m in sub.of_kind("study") if m["study"]["uid"] == study]


def _of_study(sub: Subscriber, study: str) -> list[dict]:
    return [f for f in sub.flags() if f.get("study", {}).get("uid") == study]


def _studies(state: Path) -> list[tuple]:
    with sqlite3.connect(state / "pneumoflag.db") as db:
        return db.execute("SELECT uid, images, priority, closed_at IS NOT NULL FROM studies ORDER BY uid").fetchall()


def test_a_study_sent_with_storescu_gives_one_flag_and_a_new_one_only_when_an_image_raises_it(broker, dirs, daemons,
                                                                                              tmp_path):
    require_tools("storescu")
    watch, state = dirs
    port = free_port()
    env = {"PNEUMOFLAG_DICOM_NET_ENABLED": "true", "PNEUMOFLAG_DICOM_NET_LISTEN": f"127.0.0.1:{port}",
           "PNEUMOFLAG_DICOM_NET_ALLOWED_CALLERS": CALLER, "PNEUMOFLAG_DICOM_STUDY_QUIET_SECONDS": "600"}
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env=env).start()
    study = generate_uid()

    def send(name: str, index: int, **tags) -> Path:
        img = make_radiograph(tmp_path / f"{name}.dcm", sample_pixels(index, side=256), StudyInstanceUID=study,
                              AccessionNumber="ACC-2STUDY", **tags)
        out = storescu("127.0.0.1", port, [img], CALLER, "PNEUMOFLAG")
        assert out.returncode == 0, out.stderr
        return img

    # the PA, routine: the study's first result, a flag
    send("pa", ROUTINE[0], InstanceNumber=1)
    (first,) = sub.wait_flags(1, timeout=60)
    assert first["priority"] == "routine" and first["study"] == {"uid": study, "images": 1, "rejected": [],
                                                                  "closed": False}
    assert first.get("supersedes") is None
    # a repeat exposure, routine too: no new flag, the study's news with the count
    send("repeat", ROUTINE[1], InstanceNumber=2)
    wait_until(lambda: len(_news(sub, study)) == 1, 60, f"the study's news\n{d.output()[-2000:]}")
    (news,) = _news(sub, study)
    assert news["flag"] == first["event_id"] and news["priority"] == "routine"
    assert news["study"]["images"] == 2 and news["accession_number"] == "ACC-2STUDY"
    assert len(sub.flags()) == 1
    # an urgent image of the same study raises it: a new flag that replaces the first
    send("urgent", URGENT[0], InstanceNumber=3)
    sub.wait_flags(2, timeout=60)
    second = sub.flags()[1]
    assert second["priority"] == "urgent" and second["supersedes"] == first["event_id"]
    assert second["study"]["images"] == 3 and second["study"]["uid"] == study
    # another urgent one does not raise it further: news, no third flag
    send("urgent-again", URGENT[1], InstanceNumber=4)
    wait_until(lambda: len(_news(sub, study)) == 2, 60, "the study's second news")
    assert _news(sub, study)[1]["flag"] == second["event_id"] and _news(sub, study)[1]["study"]["images"] == 4
    # a lateral view is refused, and named in the study's news (its error goes out as for any file)
    lateral = send("lateral", ROUTINE[2], InstanceNumber=5, ViewPosition="LL")
    wait_until(lambda: len(_news(sub, study)) == 3, 60, "the refused view in the study's news")
    (err,) = sub.errors()
    assert err["reason"] == "not-a-radiograph"
    named = _news(sub, study)[2]["study"]
    assert named["images"] == 4 and named["rejected"] == [{"file": err["file"], "reason": "not-a-radiograph"}]
    assert lateral.exists() and len(sub.flags()) == 2  # two flags for the five images of one study
    assert _studies(state) == [(study, 4, "urgent", 0)]
    assert d.terminate() == 0
    sub.stop()


def test_a_quiet_study_closes_and_a_later_image_reopens_it_without_a_new_alert(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env={"PNEUMOFLAG_DICOM_STUDY_QUIET_SECONDS": "1"}).start()
    study, other = generate_uid(), generate_uid()
    drop(make_radiograph(tmp_path / "a.dcm", sample_pixels(ROUTINE[0], side=256), StudyInstanceUID=study), watch,
         "a.dcm")
    drop(make_radiograph(tmp_path / "b.dcm", sample_pixels(URGENT[0], side=256), StudyInstanceUID=other), watch,
         "b.dcm")
    sub.wait_flags(2, timeout=60)
    (flag,) = _of_study(sub, study)
    assert len(_of_study(sub, other)) == 1  # another study: its own flag
    wait_until(lambda: any(n["study"]["closed"] for n in _news(sub, study)), 20, "the study to close")
    closing = [n for n in _news(sub, study) if n["study"]["closed"]]
    assert len(closing) == 1 and closing[0]["flag"] == flag["event_id"] and closing[0]["study"]["images"] == 1
    # a late image of the closed study, routine: it reopens, counts, closes again; still one flag
    drop(make_radiograph(tmp_path / "c.dcm", sample_pixels(ROUTINE[1], side=256), StudyInstanceUID=study), watch,
         "c.dcm")
    wait_until(lambda: len([n for n in _news(sub, study) if n["study"]["closed"]]) == 2, 30, "the second close")
    reopened = [n for n in _news(sub, study) if not n["study"]["closed"]]
    assert [n["study"]["images"] for n in reopened] == [2]
    assert _news(sub, study)[-1]["study"] == {"uid": study, "images": 2, "rejected": [], "closed": True}
    assert len(_of_study(sub, study)) == 1
    # a JPEG has no study: its flag is its own
    drop(Path(__file__).parents[1] / "device" / "samples" / "NORMAL" / "IM-0395-0001.jpeg", watch, "plain.jpeg")
    wait_until(lambda: any(f["file"] == "plain.jpeg" for f in sub.flags()), 30, "the JPEG's flag")
    assert "study" not in next(f for f in sub.flags() if f["file"] == "plain.jpeg")
    assert sorted(_studies(state)) == sorted([(study, 2, "routine", 1), (other, 1, "urgent", 1)])
    assert d.terminate() == 0
    sub.stop()


def test_a_study_open_when_the_daemon_stops_is_closed_by_the_next_run(broker, dirs, daemons, tmp_path):
    watch, state = dirs
    env = {"PNEUMOFLAG_DICOM_STUDY_QUIET_SECONDS": "5"}  # long enough for the first run to stop while it is open
    sub = Subscriber(broker.address, "pneumoflag/#")
    first = new_daemon(daemons, watch, state, broker.address, env=env).start()
    study = generate_uid()
    drop(make_radiograph(tmp_path / "a.dcm", sample_pixels(URGENT[0], side=256), StudyInstanceUID=study), watch,
         "a.dcm")
    (flag,) = sub.wait_flags(1, timeout=60)
    assert first.terminate() == 0
    assert _studies(state) == [(study, 1, "urgent", 0)] and _news(sub, study) == []  # stopped while open
    second = new_daemon(daemons, watch, state, broker.address, env=env).start()
    wait_until(lambda: _news(sub, study), 30, "the next run to close the study")
    (closing,) = _news(sub, study)
    assert closing["study"]["closed"] and closing["flag"] == flag["event_id"]
    assert _studies(state) == [(study, 1, "urgent", 1)] and len(sub.flags()) == 1  # nothing alerted again
    assert second.terminate() == 0
    sub.stop()


# ----------------------------------------------------------------------------- the rules on a real state database


def _flag(uid: str, priority: str, file: str) -> FlagMessage:
    return FlagMessage(device="xray-1", file=file, sha256=None, probability=0.5, priority=priority, thresholds=None,
                       model=None, accelerator=None, timings_ms=None, dicom={"study_instance_uid": uid})


@pytest.fixture
def rules(tmp_path):
    store = Store(tmp_path / "state")
    cfg = load_config(env={}, overrides={"mqtt.device_id": "xray-1", "dicom.study_quiet_seconds": 5.0,
                                         "pacs.destinations": ["PACS@127.0.0.1:104"]})
    yield Studies(cfg, store), store
    store.close()


def _journal(store, plan, file: str) -> None:
    store.record(file, None, UNSTATABLE, "routine", study=plan.row)


def test_only_a_higher_priority_or_a_new_result_for_the_same_image_replaces_the_studys_flag(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.9"
    first = _flag(uid, "flag", "a.dcm")
    plan = studies.scored(first, None)
    assert plan.alert and plan.supersedes is None and plan.info.images == 1
    _journal(store, plan, "a.dcm")
    for priority in ("routine", "flag"):  # lower, or the same: news
        plan = studies.scored(_flag(uid, priority, f"{priority}.dcm"), None)
        assert not plan.alert and plan.news.flag == first.event_id and plan.news.priority == "flag"
        _journal(store, plan, f"{priority}.dcm")
    again = _flag(uid, "routine", "a.dcm")  # the image that made the result, exported again, lower
    plan = studies.scored(again, first.event_id)
    assert plan.alert and plan.supersedes == first.event_id and plan.row.priority == "routine"
    _journal(store, plan, "a.dcm")
    urgent = _flag(uid, "urgent", "u.dcm")
    plan = studies.scored(urgent, None)
    assert plan.alert and plan.supersedes == again.event_id and plan.info.images == 5
    assert studies.scored(_flag("not a uid", "urgent", "x.dcm"), None) is None  # no valid study: its own flag


def test_refused_views_are_named_once_each_at_most_max_rejected_and_dropped_once_scored(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.10"
    ids = {"study_instance_uid": uid}
    for k in range(MAX_REJECTED + 5):
        row, news = studies.refused(f"lat{k}.dcm", "not-a-radiograph", ids)
        store.record(f"lat{k}.dcm", None, UNSTATABLE, "error", study=row, also=news)
    row, _ = studies.refused("lat0.dcm", "dicom-body-part", ids)  # the same file again: replaced, not added
    store.record("lat0.dcm", None, UNSTATABLE, "error", study=row)
    info = studies.info(store.study(uid))
    assert len(info.rejected) == MAX_REJECTED and info.images == 0
    assert [v.reason for v in info.rejected if v.file == "lat0.dcm"] == ["dicom-body-part"]
    plan = studies.scored(_flag(uid, "routine", "lat1.dcm"), None)  # refused once, scored now
    assert plan.alert and "lat1.dcm" not in {v.file for v in plan.info.rejected}
    assert studies.refused("x.dcm", "corrupt", None) is None  # no study named


def test_a_close_queues_its_sr_once_per_result_and_waits_for_a_late_image(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.11"
    msg = _flag(uid, "urgent", "a.dcm")
    plan = studies.scored(msg, None)
    plan.row.header, plan.row.finding = b"header", '{"model": {}}'
    _journal(store, plan, "a.dcm")
    t = plan.row.last_image
    assert studies.close_quiet(now=t + 4.9) == 0  # not quiet for long enough
    assert studies.close_quiet(now=t + 5.1) == 1 and studies.close_quiet(now=t + 60) == 0
    plan = studies.scored(_flag(uid, "routine", "b.dcm"), None)  # reopens, does not raise
    _journal(store, plan, "b.dcm")
    assert store.study(uid).closed_at is None
    assert studies.close_quiet(now=plan.row.last_image + 6) == 1
    rows = store._read("SELECT event_id, destination FROM pacs_outbox")
    assert rows == [(msg.event_id, "PACS@127.0.0.1:104")]  # one SR: the result did not change


def test_the_studys_sr_headers_put_its_results_image_first_each_once_and_at_most_max_sr_images(rules):
    from pneumoflag.device.pacs_outbox import MAX_SR_IMAGES, unpack_headers
    from pneumoflag.device.store import PacsItem

    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.12"

    def image(priority: str, header: bytes):
        plan = studies.scored(_flag(uid, priority, f"{header.decode()}.dcm"), None,
                              PacsItem(header, f'{{"priority": "{priority}"}}', ("PACS@127.0.0.1:104",)))
        _journal(store, plan, f"{header.decode()}.dcm")
        return plan

    image("routine", b"h0")
    image("routine", b"h1")
    plan = image("urgent", b"h2")  # the study's result now: its header first, the SR copies its identity
    assert unpack_headers(plan.row.header) == [b"h2", b"h0", b"h1"] and '"urgent"' in plan.row.finding
    plan = image("routine", b"h1")  # the same header again: once
    assert unpack_headers(plan.row.header) == [b"h2", b"h0", b"h1"] and '"urgent"' in plan.row.finding
    for k in range(3, MAX_SR_IMAGES + 10):
        plan = image("routine", f"h{k}".encode())
    headers = unpack_headers(plan.row.header)
    assert len(headers) == MAX_SR_IMAGES and headers[0] == b"h2"
    assert unpack_headers(b"\0" * 128 + b"DICM...") == [b"\0" * 128 + b"DICM..."]  # a row of one header
