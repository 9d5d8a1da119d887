"""The drift monitor (device/drift.py) with real parts: the shipped model and card, site_dev's images, the
decoder worker, Mosquitto and the daemon (`pneumoflag watch`), and `pneumoflag report`.

Small windows through the config (``[drift] window = 20, min_images = 10``) keep the suite short; the figures
for the default window come from ``python -m pneumoflag.convert.drift_study measure`` (README, "Drift").
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from dicom_helpers import write_test_dicom
from mqtt_helpers import REPO, SHIPPED_MODEL, Subscriber, drop, new_daemon, wait_until
from PIL import Image
from pneumoflag.device.card import ModelCard, card_path_for
from pneumoflag.device.config import Config, DriftConfig
from pneumoflag.device.contract import ContractError, DriftCheck, DriftMessage
from pneumoflag.device.decoder import DecodeWorker
from pneumoflag.device.drift import DriftMonitor, binomial_tail
from pneumoflag.device.drift_inputs import logit
from pneumoflag.device.drift_reference import build_reference, decode_signatures
from pneumoflag.device.pipeline import Pipeline
from pneumoflag.device.scorer import load_scorer

SITE = REPO.parent / "shared" / "data" / "chest_xray" / "site_dev"
FULLRES = REPO.parent / "shared" / "data" / "fullres"
SMALL = {"PNEUMOFLAG_DRIFT_WINDOW": "20", "PNEUMOFLAG_DRIFT_MIN_IMAGES": "10"}
#: the site's labelled images and the scanner images are data, not part of the repository (as in test_adapt)
needs_site = pytest.mark.skipif(not SITE.is_dir(), reason=f"the site data {SITE} is not on this machine")
needs_fullres = pytest.mark.skipif(not FULLRES.is_dir(), reason=f"the scanner images {FULLRES} are not on this machine")


def site_images(offset: int, n: int) -> list[Path]:
    """n site_dev images, half of each class, in turn: every 5th of each class's sorted list from ``offset``
    (0-4), so that the picks spread over the patients (neighbours by name are often alike) and two offsets
    never meet."""
    normal = sorted((SITE / "NORMAL").glob("*.jpeg"))[offset::5][:n // 2]
    pneumonia = sorted((SITE / "PNEUMONIA").glob("*.jpeg"))[offset::5][:n - n // 2]
    return [p for pair in zip(pneumonia, normal, strict=False) for p in pair] + pneumonia[len(normal):]  # in turn


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def png_bytes(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def write_bytes(data: bytes, folder: Path, name: str) -> None:
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)


def first_alarm_refusals(window: int, site: int) -> int:
    """After ``site`` site-like images, the refused image that makes the alarm: the monitor's stated rule."""
    return next(k for k in range(1, window) if binomial_tail(k, min(window, site + k), 0.01) < 1e-4)


# ----------------------------------------------------------------------------- the reference and the device agree


@needs_site
@needs_fullres
def test_the_reference_and_the_daemons_decoder_compute_the_same_figures(tmp_path):
    """One function: the figures the reference is made of are the ones the daemon's worker gives each image."""
    card = ModelCard.load(card_path_for(SHIPPED_MODEL))
    dicom = write_test_dicom(tmp_path / "scan.dcm", (grey(FULLRES / "NORMAL" / "IM-0225-0001.jpeg").astype(np.uint16)
                                                    * 16), BitsStored=12, Manufacturer="ACME",
                             ManufacturerModelName="DR-9")
    paths = site_images(0, 4) + sorted((FULLRES / "PNEUMONIA").glob("*.jpeg"))[:2] + [dicom]
    sigs, refused = decode_signatures(paths, card)
    assert not refused and all(s is not None for s in sigs)
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu", card=card)
    pipeline = Pipeline(Config(), scorer, card)
    worker = DecodeWorker(pipeline.settings, 10.0)
    worker.start()
    try:
        daemon_side = [worker.decode(p.read_bytes(), p.name).inputs for p in paths]
    finally:
        worker.stop()
    assert daemon_side == sigs
    assert sigs[-1].equipment == "ACME DR-9" and sigs[0].equipment is None
    assert sigs[4].log2_short_side > 9 > sigs[0].log2_short_side  # full-resolution sources vs 224 px copies


def test_the_shipped_card_has_its_reference_from_adapts_out_of_fold_scores():
    card = ModelCard.load(card_path_for(SHIPPED_MODEL))
    ref = card.drift_reference
    assert ref is not None and ref["n"] == 312 and "out-of-fold" in ref["scores"]
    assert ref["data"]["images"] == {"NORMAL": 117, "PNEUMONIA": 195}
    assert ref["tiers"]["thresholds"] == card.thresholds.as_dict()
    record = json.loads(SHIPPED_MODEL.with_name("pneumoflag-rn128.adapt.json").read_text())
    oof = np.array([logit(r[3]) for r in record["out_of_fold_scores"]["rows"]])
    assert np.allclose(ref["logit_quantiles"], np.quantile(oof, np.linspace(0, 1, 101)), atol=1e-3)
    assert ref["gate"]["refused"] == 0 and ref["equipment"]["seen"] == []


def test_a_drift_message_parses_back_and_a_bad_one_is_refused():
    msg = DriftMessage("xray-1", "alarm", "new equipment: ACME DR-9 (3 images)", 20, 20,
                       [DriftCheck("equipment", "alarm", "new equipment: ACME DR-9 (3 images)", 3.0)],
                       "pneumoflag-rn128 3.0.0", "site_dev, 312 images", since="2026-12-02T10:00:00.000Z")
    assert DriftMessage.parse(json.loads(json.dumps(msg.to_dict())), "xray-1") == msg
    for bad, why in (({"state": "fine"}, "not one of"), ({"checks": [{}] * 17}, "at most"),
                     ({"checks": [{"check": "x", "level": "panic", "text": "t"}]}, "not one of"),
                     ({"device": "xray-2"}, "in its topic"), ({"images": -1}, "whole number")):
        with pytest.raises(ContractError, match=why):
            DriftMessage.parse(msg.to_dict() | bad, "xray-1")


@needs_site
def test_new_equipment_reaches_alarm_at_its_third_image(tmp_path):
    """A reference made from DICOM exports that name their equipment (the real decoder and model), then
    another manufacturer's images: watch at the first, alarm at the third."""
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu")
    paths, labels = [], []
    for i, p in enumerate(site_images(0, 40)):
        paths.append(write_test_dicom(tmp_path / f"site{i}.dcm", grey(p), Manufacturer="SiteCo",
                                      ManufacturerModelName="CR-1"))
        labels.append(int("PNEUMONIA" in str(p)))
    settings = Pipeline(Config(), scorer, card).settings
    from pneumoflag.device.decoder import decode_bytes

    probs = [scorer.score(decode_bytes(p.read_bytes(), p.name, settings).pixels) for p in paths]
    ref = build_reference(paths, probs, labels, card, card.thresholds, 0.5, "test", {}, "test")
    assert ref["equipment"]["seen"] == [{"name": "SiteCo CR-1", "images": 40}]
    monitor = DriftMonitor(DriftConfig(window=20, min_images=10), ref, "xray-1", "m")
    states = []
    for i, p in enumerate(site_images(1, 13)):
        data = write_test_dicom(tmp_path / f"new{i}.dcm", grey(p), Manufacturer="SiteCo" if i < 10 else "ACME",
                                ManufacturerModelName="CR-1" if i < 10 else "DR-9").read_bytes()
        d = decode_bytes(data, p.name, settings)
        pr = scorer.score(d.pixels)
        monitor.scored(pr, card.thresholds.priority(pr), d.inputs)
        states.append(monitor.current.state)
    assert states[9] == "ok", monitor.current.reason
    assert states[10:] == ["watch", "watch", "alarm"], monitor.current.reason
    assert "new equipment: ACME DR-9 (3 images)" in monitor.current.reason


@needs_fullres
def test_a_sites_full_resolution_exports_do_not_alarm_for_their_size_against_the_shipped_reference():
    """The shipped reference is 224 px copies, all one size: the source size is not compared (it says nothing
    of a site's exports), and the 24 scanner images, whose other figures are like the copies', raise no
    alarm (default window; judged from 20 images)."""
    files = sorted(FULLRES.rglob("*.jpeg"))
    assert len(files) >= 20, "the full-resolution images are needed (../shared/data/fullres)"
    scorer, card = load_scorer(SHIPPED_MODEL, "cpu")
    settings = Pipeline(Config(), scorer, card).settings
    from pneumoflag.device.decoder import decode_bytes

    monitor = DriftMonitor(DriftConfig(min_images=20), card.drift_reference, "xray-1", "m")  # 24 images
    for f in files:
        d = decode_bytes(f.read_bytes(), f.name, settings)
        assert d.inputs.log2_short_side > 9  # really full resolution
        p = scorer.score(d.pixels)
        monitor.scored(p, card.thresholds.priority(p), d.inputs)
    a = monitor.evaluate()
    size = next(c for c in a.checks if c.check == "log2_short_side")
    assert size.level == "ok" and "not compared" in size.text
    assert a.state != "alarm", a.reason


# ----------------------------------------------------------------------------- through the daemon and the broker


def drift_messages(sub: Subscriber) -> list[dict]:
    return sub.of_kind("drift")


@needs_site
def test_site_images_keep_ok_inverted_ones_reach_alarm_which_survives_a_restart_and_the_report_says_so(
        dirs, broker, daemons, subscribers, tmp_path, capsys):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    subscribers.append(sub)
    daemon = new_daemon(daemons, watch, state, broker.address, device_id="xray-room-2", env=SMALL).start()
    site = site_images(0, 12)
    for p in site:
        drop(p, watch)
    sub.wait_flags(12, 30)
    wait_until(lambda: any(m["scored"] == 12 for m in drift_messages(sub)), 15, "the drift state after 12 images")
    now = [m for m in drift_messages(sub) if m["scored"] == 12][-1]
    assert now["state"] == "ok", now["reason"]
    assert all(m["state"] in ("ok", "unknown") for m in drift_messages(sub)), [m["reason"] for m in drift_messages(sub)]
    wait_until(lambda: sub.of_kind("stats"), 15, "a stats message")
    stats = sub.of_kind("stats")[-1]
    assert stats["drift"]["state"] in ("ok", "unknown")

    # the same kind of radiographs exported with inverted grey (a MONOCHROME1 shown as MONOCHROME2): the gate
    # refuses each one, and the surge of refusals is drift
    stated = first_alarm_refusals(20, 12)
    assert stated == 4
    # one at a time, as a modality exports: each is judged as it comes (a burst is judged at most once a
    # second, so there the alarm may name a few more images than the stated number)
    for i, p in enumerate(site_images(1, 8)):
        write_bytes(png_bytes(255 - grey(p).astype(np.int16)), watch, f"inverted-{i}.png")
        sub.wait_errors(i + 1, 30)
    assert all(e["reason"] == "not-a-radiograph" for e in sub.errors())
    wait_until(lambda: any(m["state"] == "alarm" for m in drift_messages(sub)), 15, "the drift alarm")
    alarm = next(m for m in drift_messages(sub) if m["state"] == "alarm")
    assert alarm["images"] - alarm["scored"] <= stated, alarm  # within the stated number of changed images
    assert alarm["device"] == "xray-room-2" and "refused by the gate" in alarm["reason"]
    assert "drift: alarm" in daemon.output() and daemon.output().count("drift: alarm") == 1  # once per change
    wait_until(lambda: (sub.of_kind("stats")[-1].get("drift") or {}).get("state") == "alarm", 10, "alarm in stats")

    # a restart continues the window: the alarm does not clear by restarting
    assert daemon.terminate() == 0
    n_before = len(drift_messages(sub))
    new_daemon(daemons, watch, state, broker.address, device_id="xray-room-2", env=SMALL).start()
    wait_until(lambda: len(drift_messages(sub)) > n_before, 15, "a drift message after the restart")
    assert drift_messages(sub)[-1]["state"] == "alarm"
    daemons[-1].terminate()

    plots = tmp_path / "plots"
    assert run_cli("report", "--state-dir", state, "--plots", plots) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)  # the README quotes this report
    assert "drift: ALARM since" in out and "refused by the gate" in out
    assert "logit distribution" in out and "site_dev, 312 images" in out
    assert (plots / "drift_logits.png").stat().st_size > 1000


def _site_phase(dirs, broker, daemons, subscribers, offset: int, n: int) -> Subscriber:
    """A daemon (window 20) that has scored ``n`` site images from ``offset``; its subscriber."""
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    subscribers.append(sub)
    new_daemon(daemons, watch, state, broker.address, device_id="xray-room-2", env=SMALL).start()
    for p in site_images(offset, n):
        drop(p, watch)
    sub.wait_flags(n, 30)
    wait_until(lambda: any(m["scored"] == n for m in drift_messages(sub)), 15, f"the drift state after {n} images")
    return sub


@needs_site
def test_in_a_burst_the_alarm_comes_at_most_a_judgement_late(dirs, broker, daemons, subscribers):
    """A burst is judged at most once a second, and at once when the daemon has no file in hand: inverted
    images dropped all at once bring the alarm within a second of the refusal that brings the window to it."""
    watch, _ = dirs
    sub = _site_phase(dirs, broker, daemons, subscribers, 2, 12)
    assert drift_messages(sub)[-1]["state"] == "ok"
    inverted = [png_bytes(255 - grey(p).astype(np.int16)) for p in site_images(3, 8)]
    for i, data in enumerate(inverted):  # all at once: the daemon has the next ones in hand as it refuses each
        write_bytes(data, watch, f"inverted-{i}.png")
    sub.wait_errors(8, 30)
    stated = first_alarm_refusals(20, 12)  # the refusal that brings the window to alarm
    tipping = sorted(m.at for m in sub.where(lambda m: m.topic.endswith("/errors")))[stated - 1]
    wait_until(lambda: any(m["state"] == "alarm" for m in drift_messages(sub)), 15, "the drift alarm")
    (alarm, *_) = sub.where(lambda m: m.topic.endswith("/drift") and m.payload.get("state") == "alarm")
    late = alarm.at - tipping
    assert late < 1.0 + 0.5, f"the alarm came {late:.2f} s after refusal {stated}, which brought the window to alarm"
    assert stated <= alarm.payload["images"] - alarm.payload["scored"] <= 8


@needs_site
def test_a_strong_gamma_change_reaches_alarm_through_the_daemon(dirs, broker, daemons, subscribers):
    """Radiographs the gate passes but exported with gamma 2.2: the input figures and the scores move."""
    watch, _ = dirs
    sub = _site_phase(dirs, broker, daemons, subscribers, 0, 20)
    site_phase = drift_messages(sub)
    assert all(m["state"] in ("ok", "unknown") for m in site_phase), [m["reason"] for m in site_phase]
    assert site_phase[-1]["state"] == "ok"
    # drift_study measure, window 20: a gamma change reaches alarm within 10 images (max of 100 trials)
    for i, p in enumerate(site_images(1, 10)):
        write_bytes(png_bytes(255.0 * (grey(p) / 255.0) ** 2.2), watch, f"gamma-{i}.png")
    sub.wait_flags(30, 30)
    wait_until(lambda: any(m["state"] == "alarm" for m in drift_messages(sub)[len(site_phase):]), 15,
               "the drift alarm")
    alarm = next(m for m in drift_messages(sub)[len(site_phase):] if m["state"] == "alarm")
    assert any(c["level"] == "alarm" and c["check"] in ("grey_mean", "grey_sd", "logit distribution", "flagged share")
               for c in alarm["checks"]), alarm
