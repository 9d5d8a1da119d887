"""`pneumoflag selftest`: PASS on the CPU with the shipped model; FAIL, with the reason, when it must."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli
from mqtt_helpers import SHIPPED_MODEL, Mosquitto
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = SAMPLES_DIR


def _copy_model(tmp_path: Path) -> Path:
    m = tmp_path / SHIPPED_MODEL.name
    shutil.copy(SHIPPED_MODEL, m)
    shutil.copy(SHIPPED_MODEL.with_suffix(".json"), m.with_suffix(".json"))
    return m


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if name in line)


def test_selftest_passes_on_cpu_with_the_shipped_model(tmp_path, capsys):
    watch = tmp_path / "export"
    watch.mkdir()
    rc = run_cli("selftest", "--accelerator", "cpu", "--state-dir", tmp_path / "state", "--repeats", "3",
                 "--config", _empty_config(tmp_path), "--device-id", "site-test")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "RESULT: PASS" in out
    assert _row(out, "samples vs reference").split()[0] == "PASS"
    assert "exact" in _row(out, "samples vs reference")
    assert _row(out, "model and card").split()[0] == "PASS"
    assert _row(out, "latency").split()[0] == "PASS" and "p50" in out and "p95" in out
    assert _row(out, "Edge TPU delegate").split()[0] == "SKIP"  # cpu asked: not needed, reason shown


def _empty_config(tmp_path: Path) -> Path:
    p = tmp_path / "empty.toml"
    p.write_text("")
    return p


def test_selftest_fails_with_a_tampered_model(tmp_path, capsys):
    m = _copy_model(tmp_path)
    data = bytearray(m.read_bytes())
    data[len(data) // 2] ^= 0x01
    m.write_bytes(bytes(data))
    rc = run_cli("selftest", "--model", m, "--accelerator", "cpu", "--state-dir", tmp_path / "s",
                 "--config", _empty_config(tmp_path))
    out = capsys.readouterr().out
    assert rc == 1 and "RESULT: FAIL" in out
    row = _row(out, "model and card")
    assert row.split()[0] == "FAIL" and "does not match its card" in row


def test_selftest_fails_with_a_wrong_reference(tmp_path, capsys):
    ref = json.loads((SAMPLES / "reference.json").read_text())
    ref["samples"][0]["probability"] = min(1.0, ref["samples"][0]["probability"] + 0.2)
    ref["samples"][0]["priority"] = "urgent" if ref["samples"][0]["priority"] != "urgent" else "routine"
    bad = tmp_path / "reference.json"
    bad.write_text(json.dumps(ref))
    rc = run_cli("selftest", "--accelerator", "cpu", "--reference", bad, "--state-dir", tmp_path / "s",
                 "--repeats", "1", "--config", _empty_config(tmp_path))
    out = capsys.readouterr().out
    assert rc == 1
    row = _row(out, "samples vs reference")
    assert row.split()[0] == "FAIL" and ref["samples"][0]["file"] in row


def test_selftest_fails_with_an_unreachable_broker(tmp_path, capsys):
    rc = run_cli("selftest", "--accelerator", "cpu", "--broker", "127.0.0.1:1", "--state-dir", tmp_path / "s",
                 "--repeats", "1", "--config", _empty_config(tmp_path))
    out = capsys.readouterr().out
    assert rc == 1
    row = _row(out, "broker round trip")
    assert row.split()[0] == "FAIL" and "127.0.0.1:1" in row


def test_selftest_round_trips_through_a_real_broker(tmp_path, capsys):
    b = Mosquitto(tmp_path / "b").start()
    try:
        rc = run_cli("selftest", "--accelerator", "cpu", "--broker", b.address, "--state-dir", tmp_path / "s",
                     "--repeats", "1", "--config", _empty_config(tmp_path))
    finally:
        b.stop()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _row(out, "broker round trip").split()[0] == "PASS"


def test_selftest_fails_when_edgetpu_is_required_but_absent(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOFLAG_EDGETPU_LIBRARY", "libedgetpu-not-here.so.1")
    rc = run_cli("selftest", "--accelerator", "edgetpu", "--state-dir", tmp_path / "s", "--repeats", "1",
                 "--config", _empty_config(tmp_path))
    out = capsys.readouterr().out
    assert rc == 1
    assert _row(out, "Edge TPU delegate").split()[0] == "FAIL"
    assert "libedgetpu-not-here.so.1" in _row(out, "Edge TPU delegate")


def test_selftest_checks_the_export_folder(tmp_path, capsys):
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[watch]\ndir = "{tmp_path / "missing-export"}"\n')
    rc = run_cli("selftest", "--accelerator", "cpu", "--state-dir", tmp_path / "s", "--repeats", "1",
                 "--config", cfg)
    out = capsys.readouterr().out
    assert rc == 1 and _row(out, "export folder").split()[0] == "FAIL"


def test_another_cpu_runtime_may_differ_by_one_output_step_of_the_logit(tmp_path, capsys):
    """A reference made by another runtime: within one quantization step of the int8 logit passes (near
    p = 0.5 that is 0.017 of probability, more than 1/256); two steps fail, with the priority unchanged."""
    import math

    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    assert card["tflite"]["output"]["kind"] == "logit"
    step = card["tflite"]["output"]["quantization"][0]
    base = json.loads((SAMPLES / "reference.json").read_text())
    i = min(range(len(base["samples"])), key=lambda k: abs(base["samples"][k]["probability"] - 0.5))
    for shift, verdict in ((0.6 * step, "PASS"), (2.0 * step, "FAIL")):
        ref = json.loads(json.dumps(base))
        ref["runtime"] = "tflite-runtime 2.14.0"
        p = ref["samples"][i]["probability"]
        ref["samples"][i]["probability"] = 1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + shift)))
        (tmp_path / "ref.json").write_text(json.dumps(ref))
        run_cli("selftest", "--accelerator", "cpu", "--reference", tmp_path / "ref.json", "--state-dir",
                tmp_path / "s", "--repeats", "1", "--config", _empty_config(tmp_path))
        row = _row(capsys.readouterr().out, "samples vs reference")
        assert row.split()[0] == verdict and "one output step" in row, row
