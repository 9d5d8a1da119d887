"""One result per study, through the real daemon and a real Mosquitto: the images of one StudyInstanceUID give one
flag, a superseding one only when a later image raises the priority, news without an alert otherwise, refused
views named, a close after ``dicom.study_quiet_seconds`` and a reopen after it."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
from pydicom.uid import generate_uid

from dicom_helpers import make_radiograph, require_tools, sample_pixels, storescu
from mqtt_helpers import Subscriber, drop, free_port, new_daemon, wait_until
from pneumoflag.device.config import load_config
from pneumoflag.device.contract import MAX_MESSAGE_BYTES, MAX_REJECTED, FlagMessage, loads
from pneumoflag.device.pacs_outbox import MAX_SR_IMAGES, unpack_headers
from pneumoflag.device.store import UNSTATABLE, PacsItem, Store
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


def _flag(uid: str, priority: str, file: str, p: float = 0.5) -> FlagMessage:
    return FlagMessage(device="xray-1", file=file, sha256=None, probability=p, priority=priority, thresholds=None,
                       model=None, accelerator=None, timings_ms=None, dicom={"study_instance_uid": uid})


@pytest.fixture
def rules(tmp_path):
    store = Store(tmp_path / "state")
    cfg = load_config(env={}, overrides={"mqtt.device_id": "xray-1", "dicom.study_quiet_seconds": 5.0,
                                         "pacs.destinations": ["PACS@127.0.0.1:104"]})
    yield Studies(cfg, store), store
    store.close()


def _pacs(name: str, priority: str) -> PacsItem:
    return PacsItem(name.encode(), f'{{"priority": "{priority}"}}', ("PACS@127.0.0.1:104",))


def _score(rules, uid: str, priority: str, file: str, p: float = 0.5):
    """Score ``file`` and journal what it does to its study, as the intake does (its header: the file's name)."""
    studies, store = rules
    plan = studies.scored(_flag(uid, priority, file, p), _pacs(file, priority))
    q = studies.queued(plan)
    store.record(file, None, UNSTATABLE, priority, event_id=q.event_id, message=(q.topic, q.payload, 1), flag=q.flag,
                 study=plan.change)
    return plan


def _refuse(rules, uid: str, file: str, reason: str = "not-a-radiograph"):
    studies, store = rules
    plan = studies.refused(file, reason, {"study_instance_uid": uid})
    store.record(file, None, UNSTATABLE, "error", study=plan.change, also=studies.queued(plan))
    return plan


def test_only_a_change_of_the_highest_priority_gives_the_study_a_new_flag(rules):
    uid = "1.2.826.0.1.3680043.2.1125.9"
    first = _score(rules, uid, "flag", "a.dcm")
    assert first.flag is not None and first.flag.supersedes is None and first.flag.study.images == 1
    for priority in ("routine", "flag"):  # lower, or the same: news
        plan = _score(rules, uid, priority, f"{priority}.dcm")
        assert plan.flag is None and plan.news.flag == first.flag.event_id and plan.news.priority == "flag"
    urgent = _score(rules, uid, "urgent", "u.dcm")
    assert urgent.flag.priority == "urgent" and urgent.flag.supersedes == first.flag.event_id
    assert urgent.flag.study.images == 4
    assert rules[0].scored(_flag("not a uid", "urgent", "x.dcm"), None) is None  # no valid study: its own flag


def test_a_re_export_counts_once_and_a_lower_one_gives_the_study_its_next_highest_image(rules):
    uid = "1.2.826.0.1.3680043.2.1125.13"
    a = _score(rules, uid, "urgent", "a.dcm", p=0.99)
    assert _score(rules, uid, "flag", "b.dcm", p=0.97).news.study.images == 2
    again = _score(rules, uid, "urgent", "a.dcm", p=0.995)  # the same file once more: still two images
    assert again.flag is None and again.news.study.images == 2
    lower = _score(rules, uid, "routine", "a.dcm", p=0.01)  # the result's image, now routine: b's flag is the study's
    assert lower.flag is not None and lower.flag.file == "b.dcm" and lower.flag.priority == "flag"
    assert lower.flag.probability == 0.97 and lower.flag.supersedes == a.flag.event_id
    assert lower.flag.event_id not in (a.flag.event_id,) and lower.flag.study.images == 2
    assert rules[1].study(uid).flag_file == "b.dcm"


def test_a_refused_re_export_of_the_results_image_takes_its_result_away(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.14"
    a = _score(rules, uid, "urgent", "a.dcm")
    _score(rules, uid, "routine", "b.dcm")
    plan = _refuse(rules, uid, "a.dcm")  # a.dcm exported again, as a lateral: it no longer counts
    assert plan.flag.file == "b.dcm" and plan.flag.priority == "routine" and plan.flag.supersedes == a.flag.event_id
    assert plan.flag.study.images == 1 and [v.file for v in plan.flag.study.rejected] == ["a.dcm"]
    studies.close_quiet(now=time.time() + 10)
    (header, event), = store._read("SELECT header, event_id FROM pacs_outbox")
    assert event == plan.flag.event_id and unpack_headers(header) == [b"b.dcm"]  # the SR reports b, not a
    only = "1.2.826.0.1.3680043.2.1125.15"
    _score(rules, only, "urgent", "c.dcm")
    gone = _refuse(rules, only, "c.dcm")  # its only image: no result left (the error replaces the flag by path)
    assert gone.flag is None and gone.news.flag is None and gone.news.study.images == 0


def test_refused_views_are_named_once_each_bounded_and_dropped_once_scored(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.10"
    for k in range(MAX_REJECTED + 5):
        _refuse(rules, uid, f"lat{k}.dcm")
    _refuse(rules, uid, "lat0.dcm", "dicom-body-part")  # the same file again: replaced, not added
    info = studies.info(store.study(uid))
    assert len(info.rejected) == MAX_REJECTED and info.images == 0
    assert [v.reason for v in info.rejected if v.file == "lat0.dcm"] == ["dicom-body-part"]
    plan = _score(rules, uid, "routine", "lat1.dcm")  # refused once, scored now
    assert plan.flag is not None and "lat1.dcm" not in {v.file for v in plan.flag.study.rejected}
    assert studies.refused("x.dcm", "corrupt", None) is None  # no study named


def test_a_study_flag_naming_every_refused_view_still_fits_the_contract(rules):
    uid = "1.2.826.0.1.3680043.2.1125.16"
    deep = "/".join(["\x01" * 40] * 60)  # a long path of names that JSON writes six bytes a character
    for k in range(MAX_REJECTED + 3):
        _refuse(rules, uid, f"{deep}/lateral-{k}.dcm")
    plan = _score(rules, uid, "urgent", "pa-" + "\x01" * 200 + ".dcm")
    payload = rules[0].queued(plan).payload
    assert len(payload) < MAX_MESSAGE_BYTES // 2, len(payload)
    parsed = FlagMessage.parse(loads(payload))  # what a station does with it
    assert len(parsed.study.rejected) == MAX_REJECTED and parsed.study.rejected[0].file.endswith("lateral-0.dcm")


def test_a_close_queues_its_sr_once_per_result_and_waits_for_a_late_image(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.11"
    first = _score(rules, uid, "urgent", "a.dcm")
    t = store.study(uid).last_image
    assert studies.close_quiet(now=t + 4.9) == 0  # not quiet for long enough
    assert studies.close_quiet(now=t + 5.1) == 1 and studies.close_quiet(now=t + 60) == 0
    _score(rules, uid, "routine", "b.dcm")  # reopens, does not raise
    assert store.study(uid).closed_at is None
    assert studies.close_quiet(now=store.study(uid).last_image + 6) == 1
    rows = store._read("SELECT event_id, destination, header FROM pacs_outbox")
    assert [(e, d) for e, d, _ in rows] == [(first.flag.event_id, "PACS@127.0.0.1:104")]  # one SR: the same result
    assert unpack_headers(rows[0][2]) == [b"a.dcm"]  # queued at the first close, before b came


def test_the_studys_sr_headers_put_its_results_image_first_each_once_and_at_most_max_sr_images(rules):
    studies, store = rules
    uid = "1.2.826.0.1.3680043.2.1125.12"
    _score(rules, uid, "routine", "h0")
    _score(rules, uid, "routine", "h1")
    _score(rules, uid, "urgent", "h2")  # the study's result now: its header first, the SR copies its identity
    _score(rules, uid, "routine", "h1")  # the same image again: once
    for k in range(3, MAX_SR_IMAGES + 10):
        _score(rules, uid, "routine", f"h{k}")
    studies.close_quiet(now=time.time() + 10)
    (header, finding), = store._read("SELECT header, finding FROM pacs_outbox")
    headers = unpack_headers(header)
    assert len(headers) == MAX_SR_IMAGES and headers[:3] == [b"h2", b"h0", b"h1"] and '"urgent"' in finding
    assert unpack_headers(b"\0" * 128 + b"DICM...") == [b"\0" * 128 + b"DICM..."]  # a row of one header


def test_the_readme_states_the_studys_bounds_as_the_code_has_them():
    from pneumoflag.device.studies import MAX_NAME

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### One result per study"):]
    section = " ".join(section[:section.index("\n## ")].split())
    assert f"at most {MAX_REJECTED} of them, each name at most {MAX_NAME} characters" in section
    assert f"fits the contract's {MAX_MESSAGE_BYTES // 1024} KiB" in section
