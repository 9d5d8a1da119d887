"""The MQTT contract (device/contract.py): its topics, built and parsed in one place and spelled nowhere else;
its messages, which the receivers parse back to what the senders wrote; its bounded parser and field
validators, and the worklist's use of them: what a hostile publisher can send is refused with a reason, or
stored bounded; what an older version stored that no longer validates is skipped. Real SQLite files, no mocks."""
from __future__ import annotations

import ast
import json
import logging
import re
import sqlite3
import uuid
from pathlib import Path

import pytest
from pneumoflag.device import contract
from pneumoflag.device.contract import (ANY, MAX_DEPTH, MAX_MESSAGE_BYTES, MAX_TEXT, PRIORITIES, TOPICS, AckMessage,
                                        ContractError, ErrorMessage, EscalationMessage, FlagMessage, ModelRef,
                                        ResendRequest, Timings, Topics, utc_iso)
from pneumoflag.device.escalation import AckError, parse_ack
from pneumoflag.station.service import AckRefused, clean_name
from pneumoflag.station.worklist import MAX_ORPHAN_ACKS, BadMessage, Worklist

T0 = 1_800_000_000.0


def flag(**extra) -> dict:
    return {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-1",
            "file": f"{uuid.uuid4().hex[:8]}.jpeg", "sha256": "0" * 64, "probability": 0.9, "priority": "urgent",
            "scored_at": utc_iso(T0 - 59.5), "written_at": utc_iso(T0 - 60), **extra}


@pytest.fixture
def wl(tmp_path) -> Worklist:
    w = Worklist(tmp_path / "station.db")
    yield w
    w.close()


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("raw, why", [
    (b"[" * 50_000 + b"]" * 50_000, "nested deeper"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
    (b'{"f": "' + b"x" * 500_000 + b'"}', "byte limit"),
    (b'{"errors": NaN}', "NaN is not a number"),
    (b'{"uptime_s": Infinity}', "Infinity is not a number"),
    (b'{"uptime_s": -Infinity}', "Infinity is not a number"),
    (b'{"scored": 1e400}', "out of range"),
    (b'{"escalation": ' + str(10**30).encode() + b"}", "integer of 31 digits"),
    (b'{"scored": ' + str(10**400).encode() + b"}", "integer of 401 digits"),
    (b'{"file": "x\\ud800.jpeg"}', "lone surrogate"),
    (b'{"x\\udfff": 1}', "lone surrogate"),
    (b'{"a": ["ok", ["\\ud800"]]}', "lone surrogate"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"a": 1', "not JSON"),
])
def test_the_parser_refuses_with_a_reason(raw, why):
    with pytest.raises(ContractError, match=why):
        contract.loads(raw, max_bytes=max(MAX_MESSAGE_BYTES, 400_000))


def test_the_parser_takes_what_the_contract_allows():
    # brackets inside strings do not count as nesting; escaped quotes do not end a string
    raw = json.dumps({"file": "[[[[" * 1000 + '"\\', "n": [[[1]]], "p": 0.25, "i": 10**17, "t": "caf\u00e9 \U0001F600"})
    assert contract.loads(raw.encode())["file"].startswith("[[[[")
    assert contract.loads(raw)["i"] == 10**17
    assert contract.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert contract.loads(b'{"file": "x\\ud800"}', check_text=False)["file"] == "x\ud800"  # the terminal's reading
    with pytest.raises(ContractError, match="not a JSON object"):
        contract.loads_object(b"[1]")


def test_dumps_never_writes_nan():
    assert contract.dumps({"a": 1.5}) == '{"a":1.5}'
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            contract.dumps({"a": bad})


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("value, why", [
    ("0001-01-01T00:00:00+14:00", "convert"),  # year 0 in UTC: Python cannot hold it
    ("9999-12-31T23:59:59-14:00", "convert"),  # year 10000 in UTC
    ("1900-01-01T00:00:00Z", "outside the years"),
    ("9500-01-01T00:00:00Z", "outside the years"),
    ("yesterday", "not an ISO 8601 date"),
])
def test_dates_outside_sane_years_are_refused(value, why):
    with pytest.raises(ContractError, match=why):
        contract.when({"at": value}, "at")


def test_field_validators():
    assert contract.when({"at": "2026-12-01T10:00:00.000Z"}, "at")[1] == pytest.approx(1796119200.0)
    assert contract.when({}, "at") == (None, None)
    assert contract.text({"f": "x" * 5000}, "f") == "x" * MAX_TEXT  # over-long text is cut to what is shown
    with pytest.raises(ContractError, match="lone surrogate"):
        contract.text({"f": "x\ud800"}, "f")
    with pytest.raises(ContractError, match="non-empty string"):
        contract.text({"f": 3}, "f")
    with pytest.raises(ContractError, match="not a number in"):
        contract.number({"p": float("nan")}, "p", 0, 1)
    with pytest.raises(ContractError, match="not a number in"):
        contract.number({"p": True}, "p", 0, 1)
    with pytest.raises(ContractError, match="whole number"):
        contract.integer({"e": 10**30}, "e", 1, 1000)
    with pytest.raises(ContractError, match="not of the form"):
        contract.event_id({"event_id": "a" * 129}, "event_id")  # never cut: a cut id would be another event's


def test_the_nurses_name_must_be_encodable():
    assert clean_name("  Nurse Ada\x07 ") == "Nurse Ada"
    with pytest.raises(AckRefused, match="not valid text"):
        clean_name("Nurse \ud800")


def test_the_daemons_ack_parser_uses_the_contract():
    good = AckMessage(str(uuid.uuid4()), "desk-a", "Ada").to_dict()
    assert parse_ack(json.dumps(good).encode())["by"] == "Ada"
    for raw, why in ((b"[" * 100_000, "over the 4096 byte limit"), (b"[" * 2000 + b"]" * 2000, "nested deeper"),
                     (json.dumps({**good, "by": "\ud800"}).encode(), "lone surrogate"),
                     (json.dumps({**good, "n": float("nan")}).encode(), "NaN")):
        with pytest.raises(AckError, match=why):
            parse_ack(raw)


def test_refusals_are_logged_rate_limited_and_counted(caplog):
    refused = contract.RateLimitedLog(logging.getLogger("test.contract"), every=3600, burst=3)
    with caplog.at_level(logging.WARNING, "test.contract"):
        for _ in range(500):
            refused.refused("flag", "bad \ud800 \x1b[2J", "pneumoflag/evil/flags/urgent")
        assert len(caplog.records) == 3 and "\x1b" not in caplog.text and "not logged for 3600 s" in caplog.text
        refused._window -= 3600  # the next window
        refused.refused("ack", "bad", "pneumoflag/evil/acks")
    assert "497 more refused unlogged" in caplog.records[-1].getMessage()
    assert refused.counts == {"flag": 500, "ack": 1} and refused.total == 501


# ----------------------------------------------------------------------------- the worklist's use


def test_a_flag_with_an_unconvertible_date_is_refused(wl):
    with pytest.raises(BadMessage, match="convert"):
        wl.add_flag(flag(written_at="0001-01-01T00:00:00+14:00"), "xray-1", received=T0)
    with pytest.raises(BadMessage, match="whole number"):
        wl.add_escalation({"event_id": str(uuid.uuid4()), "escalation": 10**30, "flag": flag()}, "xray-1")
    assert wl.rows(now=T0) == []


def test_an_ack_counts_only_on_the_flags_own_device(wl):
    f = flag()
    wl.add_flag(f, "xray-1", received=T0)
    at = utc_iso(T0)
    wl.add_ack(AckMessage(f["event_id"], "desk-a", "Mallory", at=at).to_dict(), "xray-2", received=T0)
    assert wl.row(f["event_id"]).ack is None  # xray-1 never heard of that ack: the row stays open
    # the same station and time on the right topic is another ack, not a repeat of the first
    assert wl.add_ack(AckMessage(f["event_id"], "desk-a", "Ada", at=at).to_dict(), "xray-1") == f["event_id"]
    assert wl.row(f["event_id"]).ack.by == "Ada"


def test_an_acks_table_from_before_devices_is_rebuilt_and_keeps_its_acks(tmp_path):
    f = flag()
    with sqlite3.connect(tmp_path / "station.db") as db:
        db.execute("CREATE TABLE acks (event_id TEXT NOT NULL, station TEXT NOT NULL, by_name TEXT NOT NULL, "
                   "at TEXT NOT NULL, received_epoch REAL NOT NULL, PRIMARY KEY (event_id, station, at))")
        db.execute("INSERT INTO acks VALUES (?, 'desk-a', 'Ada', ?, ?)", (f["event_id"], utc_iso(T0), T0))
    wl = Worklist(tmp_path / "station.db")
    try:
        assert wl.add_flag(f, "xray-1", received=T0).ack.by == "Ada"  # an old ack counts (its device unknown)
    finally:
        wl.close()


def test_a_flag_whose_device_disagrees_with_its_topic_is_refused(wl):
    with pytest.raises(BadMessage, match="in its topic"):
        wl.add_flag(flag(device="xray-2"), "xray-1")


def test_the_same_event_id_from_another_device_is_refused(wl):
    f = flag()
    wl.add_flag(f, "xray-1", received=T0)
    with pytest.raises(BadMessage, match="already a flag of device 'xray-1'"):
        wl.add_flag({**f, "device": "xray-2", "file": "other.jpeg"}, "xray-2", received=T0)
    assert wl.row(f["event_id"]).file == f["file"]
    assert wl.add_flag(dict(f), "xray-1", received=T0 + 1) is None  # a repeat from its own device: no change


def test_acks_for_unknown_flags_are_capped(wl):
    for i in range(MAX_ORPHAN_ACKS + 200):
        wl.add_ack(AckMessage(f"unknown-{i}", "desk-a", "Eve", at=utc_iso(T0)).to_dict(), "xray-1",
                   received=T0 + i)
    (n,) = wl.db.execute("SELECT COUNT(*) FROM acks").fetchone()
    assert n == MAX_ORPHAN_ACKS
    known = flag()
    wl.add_flag(known, "xray-1", received=T0)
    wl.add_ack(AckMessage(known["event_id"], "desk-a", "Ada").to_dict(), "xray-1")
    for i in range(50):  # more orphans never push out the ack of a flag this station has
        wl.add_ack(AckMessage(f"later-{i}", "desk-a", "Eve", at=utc_iso(T0)).to_dict(), "xray-1",
                   received=T0 + 10_000 + i)
    assert wl.row(known["event_id"]).ack.by == "Ada"


def test_the_stored_payload_is_bounded(wl):
    f = flag(file="f" * 50_000 + ".jpeg", note="n" * 10_000)
    row = wl.add_flag(f, "xray-1", received=T0)
    assert row.file == "f" * MAX_TEXT
    (payload,) = wl.db.execute("SELECT payload FROM flags WHERE event_id = ?", (f["event_id"],)).fetchone()
    assert len(payload) < 3 * MAX_TEXT


def test_rows_an_older_version_stored_that_no_longer_validate_are_skipped(tmp_path):
    wl = Worklist(tmp_path / "station.db")
    good = flag()
    wl.add_flag(good, "xray-1", received=T0)
    wl.set_status("xray-1", "online", received=T0)
    wl.close()
    with sqlite3.connect(tmp_path / "station.db") as db:  # what the old code let in
        db.execute("INSERT INTO flags (event_id, device, priority, rank, probability, file, written_at, "
                   "received_at, sort_epoch, payload) VALUES ('old-bad', 'xray-1', 'urgent', 0, 0.9, 'f.jpeg', "
                   "'0001-01-01T00:00:00+14:00', ?, -62135647200.0, '{}')", (utc_iso(T0),))
        db.execute("INSERT INTO devices (device, status, status_epoch, stats, stats_epoch) "
                   "VALUES ('evil', 'online', ?, '{\"errors\": NaN, \"uptime_s\": Infinity}', ?)", (T0, T0))
    wl = Worklist(tmp_path / "station.db")
    try:
        assert [r.event_id for r in wl.rows(now=T0)] == [good["event_id"]]
        assert wl.row("old-bad") is None
        states = {d.device: d for d in wl.devices(silent_after=30, now=T0)}
        assert states["evil"].stats == {}
        contract.dumps([r.to_json() for r in wl.rows(now=T0)] + [d.to_json() for d in states.values()])
    finally:
        wl.close()


def test_stats_figures_out_of_range_are_left_out(wl):
    wl.set_stats("a", {"scored": {"urgent": 1e300, "routine": 1e300}, "errors": 2, "uptime_s": 1e300},
                 retained=False, received=T0)
    assert wl.devices(silent_after=30, now=T0)[0].stats == {"errors": 2}


# ----------------------------------------------------------------------------- topics: one builder, one parser

REPO = Path(__file__).resolve().parent.parent
LEVELS = {level for level, _ in TOPICS.values()}
#: a topic level of the contract inside a string that has a slash: "/errors", "flags/", "pneumoflag/+/acks"
TOPIC_LITERAL = re.compile(r"(?:^|/)(?:" + "|".join(sorted(LEVELS)) + r")(?:/|$)")
#: calls that take a topic: a bare level handed to one of them is a topic spelled by hand
TOPIC_CALLS = {"topic", "publish", "subscribe", "unsubscribe", "will_set", "message_callback_add"}


def every_topic(topics: Topics) -> dict[str, tuple[str, str | None]]:
    """Each topic the contract builds -> (kind, its last level): a flag for each priority, placeholders else."""
    out = {}
    for kind, (_, takes) in TOPICS.items():
        for arg in PRIORITIES if kind == "flag" else [f"{{{takes}}}" if takes else None]:
            out[topics.build(kind, arg)] = (kind, arg)
    return out


@pytest.mark.parametrize("prefix, device", [("pneumoflag", "xray-1"), ("site.b", "room_2.dx"), ("p", ANY)])
def test_every_topic_built_parses_back(prefix, device):
    topics = Topics(prefix, device)
    built = every_topic(topics)
    assert len(built) == len(TOPICS) + len(PRIORITIES) - 1  # no two kinds share a topic
    for topic, (kind, arg) in built.items():
        assert topics.parse(topic) == (device, kind, arg)
        assert Topics(prefix).parse(topic) == (device, kind, arg)  # a subscriber to every device reads it too
        assert getattr(topics, kind)(*([] if arg is None else [arg])) == topic  # the named helper builds the same


def test_a_topic_that_is_not_the_contracts_parses_to_none():
    topics = Topics("pneumoflag", "xray-1")
    for topic in ("other/xray-1/status", "pneumoflag/xray-2/status", "pneumoflag/xray-1/heatmaps",
                  "pneumoflag/xray-1/status/x", "pneumoflag/xray-1/flags/urgent/x", "pneumoflag/xray-1/selftests",
                  "pneumoflag/xray-1", "pneumoflag"):
        assert topics.parse(topic) is None, topic
    with pytest.raises(ValueError, match="takes one event_id"):
        topics.build("heatmap")
    with pytest.raises(ValueError, match="takes no level"):
        topics.build("status", "x")
    assert (Topics("p").filter("heatmap"), Topics("p").filter("ack"), Topics("p").tree()) == \
        ("p/+/heatmaps/+", "p/+/acks", "p/+/#")


def _strings(tree: ast.AST):
    """(line, text) of every string but docstrings; an f-string whole, ``{}`` for each placeholder."""
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip |= {id(v) for v in node.values}
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def topic_literals(source: str) -> list[tuple[int, str]]:
    """Strings (f-strings too; docstrings and file system paths not) that spell a topic level next to a slash,
    and bare levels handed to a call that takes a topic."""
    tree = ast.parse(source)
    hits = [(line, s) for line, s in _strings(tree)
            if "/" in s and TOPIC_LITERAL.search(s) and not re.match(r"/(proc|sys|dev|etc|tmp)/", s)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TOPIC_CALLS:
            hits += [(a.lineno, a.value) for a in node.args if isinstance(a, ast.Constant) and a.value in LEVELS]
    return hits


def test_the_scan_finds_a_topic_spelled_by_hand():
    source = ('def f(cfg, client, p, d):\n    """Publishes on {prefix}/{device}/errors."""\n'
              '    cfg.topic("stats")\n    client.publish(f"{p}/{d}/errors", b"")\n'
              '    client.subscribe(f"{p}/+/replay/{d}")\n    open(f"/proc/{d}/status")\n'
              '    return "pneumoflag/+/flags/#", "errors", "a/b", p.endswith("/acks")\n')
    assert {value for _, value in topic_literals(source)} == {"stats", "{}/{}/errors", "{}/+/replay/{}",
                                                              "pneumoflag/+/flags/#", "/acks"}


def test_topics_are_spelled_only_in_the_contract():
    files = [p for folder in ("device", "station") for p in sorted((REPO / folder).glob("*.py"))
             if p != REPO / "device" / "contract.py"]
    assert len(files) > 30
    offenders = [f"{p.relative_to(REPO)}:{line}: {value!r}" for p in files for line, value in topic_literals(p.read_text())]
    assert offenders == []


def test_the_readme_lists_every_topic_of_the_contract():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## MQTT contract"):]
    section = section[:section.index("\n## ")]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `{prefix}/"):
            listed |= {t.replace("…/", "{prefix}/{device}/") for t in re.findall(r"`([^`]+)`", line.split("|")[1])}
    assert listed == set(every_topic(Topics("{prefix}", "{device}")))


# ----------------------------------------------------------------------------- messages: sent, then parsed back


def sent_flag() -> FlagMessage:
    """A flag as the daemon's pipeline makes it, every field filled."""
    return FlagMessage(device="xray-1", file="2026/11/25/CR0001.dcm", sha256="9a" * 32, probability=0.99976321,
                       priority="urgent", thresholds={"flag": 0.5, "urgent": None},
                       model=ModelRef("pneumoflag-mobilenet", "3.0.0", "ab" * 32), accelerator="cpu",
                       timings_ms=Timings(decode=12.345, infer=30.1, total=45.0), written_at=utc_iso(T0 - 60),
                       seen_at=utc_iso(T0 - 59), supersedes=str(uuid.uuid4()), seq=7,
                       dicom={"study_instance_uid": "1.2.3", "accession_number": "ACC-1"})


def test_each_message_parses_back_to_what_was_sent():
    flag_msg = sent_flag()
    error = ErrorMessage(device="xray-1", file="a.jpeg", reason="truncated", message="cut short", sha256="0" * 64,
                         duplicate_of=str(uuid.uuid4()), supersedes=str(uuid.uuid4()))
    escalation = EscalationMessage(flag_msg.event_id, "xray-1", 2, 3, 600.0, flag_msg.to_dict())
    for sent, parse in ((flag_msg, lambda d: FlagMessage.parse(d, "xray-1")),
                        (error, lambda d: ErrorMessage.parse(d, "xray-1")),
                        (escalation, lambda d: EscalationMessage.parse(d, "xray-1")),
                        (AckMessage(flag_msg.event_id, "desk-a", "Ada"), AckMessage.parse),
                        (ResendRequest("desk-a", 3, 9), ResendRequest.parse)):
        wire = json.loads(contract.encode(sent.to_dict()))
        assert parse(wire).to_dict() == wire, type(sent).__name__
    parsed = FlagMessage.parse(json.loads(contract.encode(flag_msg.to_dict())))  # no topic: the message names it
    assert parsed.device == "xray-1" and parsed.written_ts == T0 - 60 and parsed.dicom["accession_number"] == "ACC-1"


def test_a_flag_without_the_descriptive_fields_is_still_a_flag():
    parsed = FlagMessage.parse(flag(device=None, written_at=None), "xray-1")
    assert (parsed.device, parsed.model, parsed.timings_ms, parsed.thresholds, parsed.written_ts) == \
        ("xray-1", None, None, None, None)
    for change, why in (({"model": {"name": "m"}}, "'version'"), ({"timings_ms": {"decode": -1}}, "decode"),
                        ({"thresholds": {"flag": 2}}, "flag 2"), ({"thresholds": [0.5]}, "'thresholds'"),
                        ({"seen_at": "soon"}, "ISO 8601"), ({"accession_number": 7}, "accession_number")):
        with pytest.raises(ContractError, match=why):
            FlagMessage.parse(flag(**change), "xray-1")
    with pytest.raises(ContractError, match="'device' must be a non-empty string"):
        FlagMessage.parse(flag(device=None))  # with no topic to name it, the message must


@pytest.mark.parametrize("change, why", [
    ({"by": "   "}, "blank"), ({"by": 3}, "'by' must be"), ({"station": ""}, "'station' must be"),
    ({"at": None}, "'at' must be"), ({"at": "yesterday"}, "ISO 8601"), ({"event_id": "a/b"}, "not an event id"),
])
def test_the_daemon_and_the_station_refuse_the_same_acks(wl, change, why):
    ack = {**AckMessage(str(uuid.uuid4()), "desk-a", "Ada").to_dict(), **change}
    with pytest.raises(AckError, match=why):
        parse_ack(json.dumps(ack).encode())
    with pytest.raises(BadMessage, match=why):
        wl.add_ack(ack, "xray-1")


def test_an_escalation_must_carry_its_own_flag_and_device():
    f = flag()
    with pytest.raises(ContractError, match="not the escalated flag"):
        EscalationMessage.parse(EscalationMessage(str(uuid.uuid4()), "xray-1", 1, 3, 300.0, f).to_dict(), "xray-1")
    with pytest.raises(ContractError, match="in its topic"):
        EscalationMessage.parse(EscalationMessage(f["event_id"], "xray-1", 1, 3, 300.0, f).to_dict(), "xray-2")


def test_the_station_reaches_the_device_only_through_the_contract_the_client_factory_and_the_config():
    used = set()
    for p in sorted((REPO / "station").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoflag.device"):
                whole = node.module == "pneumoflag.device"
                used |= {f"{node.module}.{a.name}" if whole else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                used |= {a.name for a in node.names if a.name.startswith("pneumoflag.device")}
    assert used == {"pneumoflag.device.contract", "pneumoflag.device.mqtt_client", "pneumoflag.device.config"}


def test_the_stats_summary_takes_the_daemons_own_stats_and_leaves_out_bad_figures():
    from pneumoflag.device.config import load_config
    from pneumoflag.device.stats import Stats

    stats = Stats()
    stats.by_priority["urgent"] += 2
    stats.by_priority["routine"] += 3
    stats.latencies.extend([4.0, 6.0])
    snap = json.loads(contract.encode(stats.snapshot(load_config(env={}), 1, 2, "cpu", "m 1", {"delivered_seq": 7},
                                                     {})))
    s = contract.StatsSummary.parse(snap)
    assert (s.scored, s.queue_depth, s.outbox, s.p50_ms, s.delivered_seq) == (5, 1, 2, 5.0, 7)
    assert s.at is not None and set(s.figures()) == {"scored", "errors", "queue_depth", "outbox", "uptime_s", "p50_ms"}
    bad = contract.StatsSummary.parse({**snap, "outbox": -1, "errors": True, "scored": {"urgent": 1e16},
                                       "at": "yesterday"})
    assert (bad.outbox, bad.errors, bad.scored, bad.at) == (None, None, None, None) and bad.queue_depth == 1
    with pytest.raises(contract.ContractError, match="delivered_seq"):
        contract.StatsSummary.parse({**snap, "delivered_seq": -3})
    with pytest.raises(contract.ContractError, match="JSON object"):
        contract.StatsSummary.parse([snap])
