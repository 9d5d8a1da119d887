"""`pneumoflag calibrate`: operating points from a site's own labelled images, as a new card revision."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from conftest import MINI, run_cli
from pneumoflag.device.card import ModelCard, sha256_file


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """64 + 64 real radiographs: the mini set, each as itself, mirrored, with another gamma and cropped."""
    dst = tmp_path_factory.mktemp("site")
    for label in ("NORMAL", "PNEUMONIA"):
        (dst / label).mkdir()
        for f in sorted((MINI / label).glob("*.jpeg")):
            im = Image.open(f).convert("L")
            variants = {"o": im, "m": ImageOps.mirror(im), "g": im.point(lambda v: int(255 * (v / 255) ** 0.8)),
                        "c": im.crop((8, 8, 216, 216)).resize((224, 224))}
            for k, v in variants.items():
                v.save(dst / label / f"{f.stem}-{k}.jpeg", quality=90)
    return dst


@pytest.fixture
def model(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny model and its card (calibrate rewrites the card)."""
    m = tmp_path / "m" / tiny_run["tflite"].name
    m.parent.mkdir()
    shutil.copy(tiny_run["tflite"], m)
    shutil.copy(tiny_run["card"], m.with_suffix(".json"))
    return m


def test_calibrate_writes_a_new_revision_and_leaves_the_model_alone(model, site, capsys):
    before = json.loads(model.with_suffix(".json").read_text())
    sha = sha256_file(model)
    rc = run_cli("calibrate", "--model", model, "--data", site, "--min-sensitivity", "0.9",
                 "--urgent-min-specificity", "0.9", "--prevalence", "0.2", "--single-tier")
    out = capsys.readouterr().out
    assert rc == 0, out
    card = json.loads(model.with_suffix(".json").read_text())
    assert sha256_file(model) == sha  # the .tflite is untouched
    assert card["revision"] == before["revision"] + 1
    major, minor, _ = before["version"].split(".")
    assert card["version"] == f"{major}.{int(minor) + 1}.0"
    src = card["operating_points"]["source"]
    assert src["images"] == {"NORMAL": 64, "PNEUMONIA": 64} and len(src["files_sha256"]) == 16
    assert src["folder"] == site.name and str(site) not in json.dumps(card)  # never an absolute path
    assert card["revisions"][-1]["operating_points"] == before["operating_points"]
    urgent = card["operating_points"]["urgent"]["threshold"]
    assert urgent is None or urgent > card["operating_points"]["flag"]["threshold"]
    flag = card["site"]["operating_points"]["flag"]
    assert flag["sensitivity"] >= 0.9
    lo, hi = flag["sensitivity_ci95"]
    assert lo <= flag["sensitivity"] <= hi
    assert flag["at_prevalence"]["prevalence"] == 0.2
    assert "sensitivity" in out and "[" in out and "PPV" in out and "prevalence 20.0%" in out
    mc = ModelCard.load(model.with_suffix(".json"))  # the device reads the new card
    mc.verify_file(model)
    assert mc.revision == card["revision"] and mc.thresholds.flag == flag["threshold"]


def test_calibrate_refuses_too_few_images_and_a_foreign_card(model, tmp_path, capsys):
    assert run_cli("calibrate", "--model", model, "--data", MINI) == 2
    assert "at least 50 of each class" in capsys.readouterr().err
    other = tmp_path / "other.json"
    card = json.loads(model.with_suffix(".json").read_text())
    card["tflite"]["sha256"] = "0" * 64
    other.write_text(json.dumps(card))
    assert run_cli("calibrate", "--model", model, "--data", MINI, "--card", other) == 2
    assert "does not match its card" in capsys.readouterr().err


def test_tiers_that_cannot_differ_stop_calibrate_unless_single_tier(site, tmp_path, capsys):
    """The base model (2.1.0) separates these training images completely: no distinct urgent tier exists there."""
    from mqtt_helpers import REPO

    base = REPO / "models" / "base" / "pneumoflag-rn128.tflite"
    m = tmp_path / base.name
    shutil.copy(base, m)
    shutil.copy(base.with_suffix(".json"), m.with_suffix(".json"))
    assert run_cli("calibrate", "--model", m, "--data", site) == 2
    assert "cannot support distinct tiers" in capsys.readouterr().err
    assert run_cli("calibrate", "--model", m, "--data", site, "--single-tier") == 0
    card = ModelCard.load(m.with_suffix(".json"))
    assert card.thresholds.urgent is None and card.thresholds.priority(0.999) == "flag"


def test_the_daemon_runs_the_new_revision_after_a_restart(site, tmp_path, broker, dirs, daemons):
    from mqtt_helpers import SHIPPED_MODEL, Subscriber, drop, new_daemon

    m = tmp_path / SHIPPED_MODEL.name
    shutil.copy(SHIPPED_MODEL, m)
    shutil.copy(SHIPPED_MODEL.with_suffix(".json"), m.with_suffix(".json"))
    watch, state = dirs
    revision = ModelCard.load(m.with_suffix(".json")).revision
    d = new_daemon(daemons, watch, state, broker.address, model=m).start()
    assert f"card revision {revision}" in d.output()
    assert d.terminate() == 0
    assert run_cli("calibrate", "--model", m, "--data", site, "--single-tier") == 0
    sub = Subscriber(broker.address, "pneumoflag/#")
    d2 = new_daemon(daemons, watch, state, broker.address, model=m).start()
    assert f"card revision {revision + 1}, operating points from {site.name}" in d2.output()
    drop(sorted((MINI / "PNEUMONIA").glob("*.jpeg"))[0], watch)
    (flag,) = sub.wait_flags(1)
    card = ModelCard.load(m.with_suffix(".json"))
    assert flag["model"]["version"] == card.version and flag["thresholds"] == card.thresholds.as_dict()


def test_calibrate_writes_the_drift_reference_from_the_images_it_set_the_points_on(model, site, capsys):
    """The reference in the card: this model's scores on the site images (calibration sets no weights), the
    share expected at flag at the given prevalence, and the gate's refusals, all from the device's decoder."""
    import numpy as np
    from pneumoflag.device.drift_inputs import logit
    from pneumoflag.device.scorer import load_scorer
    from pneumoflag.device.preprocess import preprocess

    assert run_cli("calibrate", "--model", model, "--data", site, "--min-sensitivity", "0.9",
                   "--urgent-min-specificity", "0.9", "--prevalence", "0.2", "--single-tier") == 0
    capsys.readouterr()
    card = ModelCard.load(model.with_suffix(".json"))
    ref = card.drift_reference
    assert ref["made_by"] == "pneumoflag calibrate" and "this model's scores" in ref["scores"]
    assert ref["n"] + ref["gate"]["refused"] == 128 and ref["data"] == card.raw["operating_points"]["source"]
    scorer, _ = load_scorer(model, "cpu", card=card)
    paths = sorted(site.glob("*/*.jpeg"))
    p = np.array([scorer.score(preprocess(f, card.preprocessing)) for f in paths])
    y = np.array([int(f.parent.name == "PNEUMONIA") for f in paths])
    t = card.thresholds.flag
    expected = 0.2 * (p[y == 1] >= t).mean() + 0.8 * (p[y == 0] >= t).mean()
    if ref["gate"]["refused"] == 0:
        assert ref["tiers"]["expected_share"]["flagged"] == pytest.approx(expected, abs=1e-4)
        assert ref["logit_quantiles"] == pytest.approx(
            np.quantile([logit(v) for v in p], np.linspace(0, 1, 101)).tolist(), abs=1e-3)
    assert ref["tiers"]["prevalence"] == 0.2 and ref["tiers"]["thresholds"] == card.thresholds.as_dict()
