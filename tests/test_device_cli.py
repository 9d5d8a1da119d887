"""`score`, `alerts`, the embedded broker default, and accelerator selection."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from mqtt_helpers import SHIPPED_MODEL, Mosquitto
from pneumoflag.device.broker import port_in_use
from pneumoflag.device.card import ModelCard
from pneumoflag.device.runtime import RuntimeUnavailable
from pneumoflag.device import scorer as scorer_mod
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = sorted(SAMPLES_DIR.rglob("*.jpeg"))
CLI = [sys.executable, "-m", "pneumoflag.device.cli"]


def test_score_prints_priority_and_fails_on_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = run_cli("score", "--json", "--model", SHIPPED_MODEL, SAMPLES[0], bad)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 1
    card = ModelCard.load(SHIPPED_MODEL.with_suffix(".json"))
    assert lines[0]["priority"] == card.thresholds.priority(lines[0]["probability"])
    assert lines[1]["error"] in ("corrupt", "truncated", "unsupported-format")
    assert run_cli("score", "--model", SHIPPED_MODEL, *SAMPLES[:2]) == 0
    out = capsys.readouterr().out
    assert SAMPLES[0].name in out and "p=" in out


def test_alerts_prints_flags_from_a_real_broker(tmp_path):
    broker = Mosquitto(tmp_path / "b").start()
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        alerts = subprocess.Popen([*CLI, "alerts", "--broker", broker.address, "--count", "2", "--errors"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert "listening on" in alerts.stderr.readline()  # connected and subscribed
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        flag = {"file": "a/b.jpeg", "priority": "urgent", "probability": 0.97, "device": "xr1",
                "scored_at": "2026-01-01T10:00:00.000Z"}
        c.publish("pneumoflag/xr1/flags/urgent", json.dumps(flag), qos=1).wait_for_publish(5)
        c.publish("pneumoflag/xr1/errors", json.dumps({"file": "x.jpg", "reason": "truncated", "message": "x.jpg: truncated"}),
                  qos=1).wait_for_publish(5)
        out, err = alerts.communicate(timeout=15)
        c.loop_stop()
        assert alerts.returncode == 0, err
        lines = out.splitlines()
        assert "URGENT" in lines[0] and "p=0.9700" in lines[0] and "a/b.jpeg" in lines[0] and "[xr1]" in lines[0]
        assert "ERROR" in lines[1] and "truncated" in lines[1]
    finally:
        broker.stop()


def test_alerts_without_broker_says_so(capsys):
    assert run_cli("alerts", "--broker", "127.0.0.1:1", "--timeout", "1") == 2
    assert "no MQTT broker answered" in capsys.readouterr().err


def _own_loopback() -> tuple:
    """A private network namespace: 127.0.0.1:1883 is free there whatever runs on the host."""
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ("unshare", "--net", "sh", "-c", 'ip link set lo up 2>/dev/null || true; exec "$@"', "sh")
    return ()


def test_watch_with_no_broker_starts_the_embedded_one(tmp_path):
    """The README's one-command flow: embedded broker, alerts printed, bounded by --exit-after.

    Runs in a network namespace of its own, so a system Mosquitto on the host's port 1883
    (`apt-get install mosquitto` starts one) cannot get in the way.
    """
    watch, state = tmp_path / "export", tmp_path / "state"
    watch.mkdir()
    ns = _own_loopback()
    if not ns and port_in_use("127.0.0.1", 1883):
        pytest.fail("127.0.0.1:1883 is taken and no network namespace can be made: stop the system broker "
                    "(systemctl stop mosquitto) to run this test")
    script = tmp_path / "flow.sh"
    cli = " ".join(CLI)
    script.write_text(
        "set -e\n"
        f"{cli} watch {watch} --state-dir {state} --model {SHIPPED_MODEL} --exit-after 2 > {tmp_path}/daemon.log 2>&1 &\n"
        "daemon=$!\n"
        "for i in $(seq 100); do grep -q 'embedded MQTT broker' " + f"{tmp_path}/daemon.log" + " && break; sleep 0.2; done\n"
        f"{cli} alerts --count 2 --json --client-id flow-test > {tmp_path}/alerts.out 2> {tmp_path}/alerts.err &\n"
        "alerts=$!\n"
        f"for i in $(seq 100); do grep -q 'listening on' {tmp_path}/alerts.err && break; sleep 0.2; done\n"
        f"cp {SAMPLES[0]} {watch}/.a.part && mv {watch}/.a.part {watch}/{SAMPLES[0].name}\n"
        f"cp {SAMPLES[-1]} {watch}/.b.part && mv {watch}/.b.part {watch}/{SAMPLES[-1].name}\n"
        "wait $alerts\nwait $daemon\n"
        "python3 -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex((\"127.0.0.1\", 1883)) else 3)'\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*ns, "bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    log = (tmp_path / "daemon.log").read_text()
    assert proc.returncode == 0, proc.stderr + log  # 3 would mean the embedded broker outlived the daemon
    assert "embedded MQTT broker" in log and "pneumoflag alerts" in log
    out = (tmp_path / "alerts.out").read_text()
    got = sorted(json.loads(x)["file"] for x in out.splitlines())
    assert got == sorted([SAMPLES[0].name, SAMPLES[-1].name])


def test_accelerator_selection(tmp_path, monkeypatch, caplog):
    """The Edge TPU path needs hardware; what can run here is the choice and its reasons."""
    model = tmp_path / SHIPPED_MODEL.name
    shutil.copy(SHIPPED_MODEL, model)
    shutil.copy(SHIPPED_MODEL.with_suffix(".json"), model.with_suffix(".json"))
    # no NAME_edgetpu.tflite: auto runs on the CPU and says why; edgetpu refuses
    s, _ = scorer_mod.load_scorer(model, "auto")
    assert s.report.accelerator == "cpu" and "no Edge TPU model" in s.report.edgetpu_reason
    with pytest.raises(RuntimeUnavailable, match="no Edge TPU model"):
        scorer_mod.load_scorer(model, "edgetpu")
    # an _edgetpu.tflite listed in the card, but no delegate library on this machine
    et = tmp_path / (model.stem + "_edgetpu.tflite")
    shutil.copy(model, et)
    card = json.loads(model.with_suffix(".json").read_text())
    card["edgetpu"] = {"file": et.name, "sha256": card["tflite"]["sha256"]}
    model.with_suffix(".json").write_text(json.dumps(card))
    monkeypatch.setenv("PNEUMOFLAG_EDGETPU_LIBRARY", "libedgetpu-absent.so.1")
    s, _ = scorer_mod.load_scorer(model, "auto")
    assert s.report.accelerator == "cpu" and "libedgetpu-absent.so.1" in s.report.edgetpu_reason
    with pytest.raises(RuntimeUnavailable, match="Edge TPU delegate"):
        scorer_mod.load_scorer(model, "edgetpu")
    # cpu never tries the delegate
    s, _ = scorer_mod.load_scorer(model, "cpu")
    assert s.report.edgetpu_reason is None


def test_alerts_says_when_it_loses_and_regains_the_broker_and_gets_what_it_missed(tmp_path):
    broker = Mosquitto(tmp_path / "b").start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PNEUMOFLAG_MQTT_RECONNECT_MAX": "1"}
    alerts = subprocess.Popen([*CLI, "alerts", "--broker", broker.address, "--count", "1", "--json",
                               "--client-id", "desk-terminal"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert "listening on" in alerts.stderr.readline()
        broker.stop()
        assert "LOST the broker" in alerts.stderr.readline()
        broker.start()  # same port, persistence on: the terminal's session is still there
        assert "is back after" in alerts.stderr.readline()
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.publish("pneumoflag/xr1/flags/urgent", json.dumps({"file": "late.jpeg", "priority": "urgent"}),
                  qos=1).wait_for_publish(5)
        c.loop_stop()
        out, _ = alerts.communicate(timeout=20)
        assert alerts.returncode == 0 and json.loads(out)["file"] == "late.jpeg"
    finally:
        if alerts.poll() is None:
            alerts.kill()
        broker.stop()


def test_bench_compares_against_every_float_member_the_card_names(tmp_path: Path):
    """The source-path comparison runs the float members of the shipped ensemble (they are not MODEL.keras)."""
    from pneumoflag.device.bench import BenchConfig, _source_keras_paths

    members = [m["file"] for m in ModelCard.load(SHIPPED_MODEL.with_suffix(".json")).raw["source_model"]["members"]]
    assert len(members) == 2
    paths = _source_keras_paths(BenchConfig(SAMPLES[0].parent, SHIPPED_MODEL))
    assert [p.name for p in paths] == members and all(p.is_file() for p in paths)
    assert _source_keras_paths(BenchConfig(SAMPLES[0].parent, SHIPPED_MODEL, keras=tmp_path / "x.keras")) == [
        tmp_path / "x.keras"]
    lone = tmp_path / "lone.tflite"  # no card beside it: the conventional name, which the bench then reports missing
    shutil.copy(SHIPPED_MODEL, lone)
    assert _source_keras_paths(BenchConfig(SAMPLES[0].parent, lone)) == [tmp_path / "lone.keras"]


# ----------------------------------------------------------------------------- what a new user tripped over

def test_help_lists_each_command_once_with_its_own_words():
    from pneumoflag.device.cli import build_parser

    parser, _ = build_parser()
    text = parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        listed = [line for line in text.splitlines() if line.split()[:1] == [name]]
        assert len(listed) == 1, f"{name} listed {len(listed)} times in --help"
    # the one line shown is the subcommand's own help= (one wording, kept beside its parser)
    assert "score image files now and print the results (no MQTT)" in text
    assert "web console: live worklist of every appliance, acknowledge, escalations" in text


def test_score_help_offers_only_what_score_reads():
    out = subprocess.run([*CLI, "score", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--broker", "--topic-prefix", "--device-id", "--state-dir"):
        assert flag not in out
    assert "--model" in out and "--accelerator" in out


def test_demo_keeps_its_journal_in_the_given_state_dir(tmp_path):
    broker = Mosquitto(tmp_path / "b").start()
    try:
        state = tmp_path / "state"
        args = [*CLI, "demo", "--broker", broker.address, "--state-dir", str(state), "--interval", "0.05"]
        run = subprocess.run(args, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert f"journal kept in {state}" in run.stdout
        figures = tmp_path / "report.json"
        report = subprocess.run([*CLI, "report", "--state-dir", str(state), "--json", str(figures)],
                                capture_output=True, text=True, timeout=60)
        assert report.returncode == 0, report.stderr
        assert sum(json.loads(figures.read_text())["flags"].values()) == 8
        again = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "already holds a journal" in again.stderr
    finally:
        broker.stop()


def test_alerts_timeout_says_it_timed_out(tmp_path):
    broker = Mosquitto(tmp_path / "b").start()
    try:
        run = subprocess.run([*CLI, "alerts", "--broker", broker.address, "--count", "1", "--timeout", "1"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1
        assert "timed out after 1 s: 0 of 1 messages received" in run.stderr
    finally:
        broker.stop()


def test_runtime_log_lines_follow_the_log_level():
    """The runtime's C++ "Created TensorFlow Lite XNNPACK delegate" line is a log record: -q hides it."""
    sample = str(SAMPLES[0])
    quiet = subprocess.run([*CLI, "-q", "score", "--accelerator", "cpu", sample], capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([*CLI, "score", "--accelerator", "cpu", sample], capture_output=True, text=True,
                          timeout=120)
    native = [line for line in loud.stderr.splitlines() if "XNNPACK" in line]
    assert native and all("INFO pneumoflag.device.runtime.native:" in line for line in native), loud.stderr


def test_every_command_follows_the_configured_log_level():
    """``[log] level`` is read by each command that loads the configuration, not only by ``watch``;
    -v still wins over it."""
    sample = str(SAMPLES[0])
    env = {**os.environ, "PNEUMOFLAG_LOG_LEVEL": "warning"}
    quiet = subprocess.run([*CLI, "score", "--accelerator", "cpu", sample], capture_output=True, text=True,
                           timeout=120, env=env)
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*CLI, "-v", "score", "--accelerator", "cpu", sample], capture_output=True, text=True,
                          timeout=120, env=env)
    assert loud.returncode == 0 and " INFO pneumoflag.device.scorer:" in loud.stderr, loud.stderr


def test_daemon_logs_probabilities_as_the_thresholds_are_written(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(SAMPLES[0], export)
    broker = Mosquitto(tmp_path / "b").start()
    try:
        run = subprocess.run([*CLI, "watch", str(export), "--once", "--broker", broker.address, "--state-dir",
                              str(tmp_path / "state"), "--model", str(SHIPPED_MODEL)], capture_output=True,
                             text=True, timeout=120)
    finally:
        broker.stop()
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stderr.splitlines() if SAMPLES[0].name in x and "p=" in x)
    assert re.search(r"p=\d\.\d{4},", line), line
    # the shipped model is adapted to a site: the daemon says so, and on which data
    adapted = ModelCard.load(SHIPPED_MODEL.with_suffix(".json")).raw["adaptation"]["site_data"]
    said = next(x for x in run.stderr.splitlines() if "is adapted" in x)
    assert f"site data {adapted['folder']}" in said and adapted["files_sha256"] in said, said


def test_bench_stages_include_the_daemons_decode_with_the_gate_and_its_journal_commit(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for f in SAMPLES[:2]:
        shutil.copy(f, images)
    out = tmp_path / "bench.json"
    run = subprocess.run([*CLI, "-q", "bench", "--images", str(images), "--stages-only", "--no-explain", "--repeats",
                          "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    steps = json.loads(out.read_text())["stages"]["daemon_steps_ms"]
    assert steps["decode_and_gate"]["n"] == 4 and steps["decode_and_gate"]["p50"] > 0
    assert steps["journal_commit"]["n"] >= 50 and steps["journal_commit"]["p50"] > 0
    assert steps["journal_fsync"]["n"] >= 50 and steps["journal_fsync"]["p50"] > 0
    assert re.search(r"^daemon: decode \+ gate +\d+\.\d\d", run.stdout, re.M), run.stdout
    assert re.search(r"^daemon: journal commit +\d+\.\d\d", run.stdout, re.M), run.stdout
    assert re.search(r"^publisher: log fsync +\d+\.\d\d", run.stdout, re.M), run.stdout


def test_bench_shows_one_files_way_through_the_daemon_step_by_step(tmp_path: Path):
    """The daemon's own step times (its stats as it stops) beside the end-to-end figure: the single drops are
    the "alone" column, the burst's files the "burst" one."""
    from pneumoflag.device.stats import STEPS

    images = tmp_path / "images"
    images.mkdir()
    for f in SAMPLES[:3]:
        shutil.copy(f, images)
    out = tmp_path / "bench.json"
    run = subprocess.run([*CLI, "-q", "bench", "--images", str(images), "--no-source", "--no-explain", "--repeats", "1",
                          "--burst", "20", "--e2e-rounds", "2", "--idle-seconds", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    d = json.loads(out.read_text())["daemon"]
    steps = d["steps_ms"]
    for step in ("queue", "admit", "decode", "infer", "journal"):
        assert steps["alone"][step]["n"] + steps["busy"][step]["n"] == 6 + 20, step
        assert steps["alone"][step]["n"] >= 5, step  # single drops, 50 ms apart (the first burst file may join)
    assert steps["alone"]["decode"]["p50"] > 0 and steps["busy"]["infer"]["p50"] > 0
    for step in STEPS:
        assert re.search(rf"^  {step} +\d+\.\d\d +\d+\.\d\d", run.stdout, re.M), (step, run.stdout)
    total = sum(steps["alone"][k]["p50"] for k in STEPS if steps["alone"][k]["p50"] is not None)
    m = re.search(r"^  sum of the steps +(\d+\.\d\d)", run.stdout, re.M)
    assert m and abs(float(m.group(1)) - total) < 0.011
    assert re.search(r"^infer after 50ms idle +\d+\.\d\d", run.stdout, re.M), run.stdout
