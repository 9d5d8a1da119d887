"""`pneumoflag adapt`: patient-level cross-fitting on a site's labelled images, under its protocol.

The base is the model the appliance shipped before adaptation (``models/base``); the site is half of
``site_dev`` (by patient), so that the other half can judge what adapt ships, as a site would after go-live.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from pneumoflag.convert.adapt import record_path
from pneumoflag.convert.adapt_study import link_set, score_folder, shuffled_labels
from pneumoflag.convert.dataset import DataError, Sample, patient_folds, patient_split, scan_folder
from pneumoflag.convert.metrics import auroc
from pneumoflag.device.card import ModelCard, sha256_file

BASE = REPO / "models" / "base" / "pneumoflag-rn128.tflite"
SITE_DEV = REPO.parent / "shared" / "data" / "chest_xray" / "site_dev"

pytestmark = pytest.mark.skipif(not SITE_DEV.is_dir(), reason=f"the site data {SITE_DEV} is not on this machine")


@pytest.fixture(scope="module")
def halves() -> tuple[list[Sample], list[Sample]]:
    """site_dev split by patient: the half handed over (adapted on) and the half it is judged on."""
    return patient_split(scan_folder(SITE_DEV), 0.5, 3)


@pytest.fixture(scope="module")
def adapted(halves, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapt")
    site = link_set(halves[0], root / "site")
    out = root / "models" / "site.tflite"
    out.parent.mkdir()
    # the defaults, as the shipped model was made (5 folds, 10 epochs, head only)
    assert run_cli("adapt", "--model", BASE, "--data", site, "--out", out) == 0
    return {"root": root, "site": site, "out": out, "card": json.loads(out.with_suffix(".json").read_text())}


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


# ----------------------------------------------------------------------------- folds


def test_patient_folds_keep_each_patient_in_one_fold_and_deal_the_classes_evenly():
    samples = scan_folder(SITE_DEV)
    folds = patient_folds(samples, 5, 42)
    assert folds == patient_folds(samples, 5, 42)  # seeded
    assert folds != patient_folds(samples, 5, 43)
    fold_of: dict[str, set[int]] = {}
    for s, f in zip(samples, folds, strict=True):
        fold_of.setdefault(s.patient, set()).add(f)
    assert all(len(v) == 1 for v in fold_of.values())
    for label in (0, 1):
        patients = [len({s.patient for s, f in zip(samples, folds, strict=True) if f == k and s.label == label})
                    for k in range(5)]
        assert max(patients) - min(patients) <= 1, patients
    with pytest.raises(DataError, match="3 patients cannot make 5 folds"):
        patient_folds([Sample(Path(f"person{i}_x.jpeg"), i % 2) for i in range(3)], 5, 0)


# ----------------------------------------------------------------------------- the accepted run


def test_adapt_writes_the_model_its_members_its_card_and_the_record(adapted, halves):
    out, card = adapted["out"], adapted["card"]
    base = ModelCard.load(BASE.with_suffix(".json"))
    loaded = ModelCard.load(out.with_suffix(".json"))
    loaded.verify_file(out)
    assert loaded.name == base.name and loaded.version == "3.0.0"  # new weights: a major version
    for member in loaded.source_model_paths(out):
        assert member.is_file() and member.name.startswith("site-adapted-")
    a = card["adaptation"]
    assert a["accepted"] is True and all(c["passed"] for c in a["criteria"])
    assert [c["name"] for c in a["criteria"]] == [c["name"] for c in a["protocol"]["criteria"]]
    assert a["base_model"]["sha256"] == sha256_file(BASE) and a["base_model"]["version"] == base.version
    n_normal = sum(s.label == 0 for s in halves[0])
    assert a["site_data"]["images"] == {"NORMAL": n_normal, "PNEUMONIA": len(halves[0]) - n_normal}
    assert len(a["site_data"]["image_digests"]) == len(halves[0])
    assert a["folds"]["k"] == 5 and sum(a["folds"]["images"]) == len(halves[0])
    assert a["training"]["train"] == "head" and a["training"]["epochs"] == 10
    # the protocol was on disk before the run and is the one checked
    record = json.loads(record_path(out).read_text())
    assert record["status"] == "accepted" and record["protocol"] == a["protocol"]
    digest = hashlib.sha256(json.dumps(a["protocol"], sort_keys=True).encode()).hexdigest()
    assert record["protocol_sha256"] == a["protocol_sha256"] == digest
    assert a["protocol_written"] <= record["finished"]
    # the operating points come from out-of-fold scores; nothing on the site is quoted in-sample
    assert card["operating_points"]["source"]["kind"].startswith("out-of-fold")
    assert card["site"]["auroc"] == a["out_of_fold"]["auroc"]
    assert "check_data" not in card
    assert a["out_of_fold"]["auroc"] >= a["base_on_site"]["auroc"] + 0.005
    # a card travels: no path of this machine in it
    leaked = [s for s in _strings(card) if s.startswith("/") or str(adapted["root"]) in s or "shared/data" in s]
    assert leaked == []


def test_the_shipped_member_is_the_average_of_its_fold_models(adapted):
    """What ships is exactly the fold models' mean logit: the kind of model that made the out-of-fold scores."""
    keras = pytest.importorskip("keras")
    from pneumoflag.convert.finetune import logits

    card = ModelCard.load(adapted["out"].with_suffix(".json"))
    member = keras.models.load_model(card.source_model_paths(adapted["out"])[0], compile=False)
    heads = [layer for layer in member.layers if layer.name.endswith("_head")]
    assert len(heads) == 5
    x = np.random.default_rng(0).random((4, *member.inputs[0].shape[1:]), dtype=np.float32)
    feats = member.get_layer("trunk")(x)
    per_fold = np.stack([np.asarray(h(feats)).reshape(-1) for h in heads])
    assert np.allclose(logits(member, x), per_fold.mean(axis=0), atol=1e-5)
    assert per_fold.std(axis=0).max() > 1e-3  # the folds did learn different heads


def test_out_of_fold_thresholds_hold_on_patients_no_fold_saw(adapted, halves):
    """The other half of site_dev, never shown to adapt: the points land near what adapt intended."""
    y, p, th = score_folder(adapted["out"], halves[1])
    _, p_base, _ = score_folder(BASE, halves[1])
    sens = float((p[y == 1] >= th["flag"]).mean())
    spec_urgent = float((p[y == 0] < th["urgent"]).mean())
    assert sens >= 0.92, f"flag sensitivity {sens:.3f} on new patients, intended 0.97"
    assert spec_urgent >= 0.90, f"urgent specificity {spec_urgent:.3f} on new patients, intended 0.95"
    assert auroc(y, p) > auroc(y, p_base), "the gain holds on new patients"
    # the shipped model does not score more extreme than its fold models: the flagged shares agree
    oof = adapted["card"]["adaptation"]["out_of_fold"]["operating_points"]
    prevalence = y.mean()
    expected = prevalence * oof["flag"]["sensitivity"] + (1 - prevalence) * (1 - oof["flag"]["specificity"])
    assert abs(float((p >= th["flag"]).mean()) - expected) < 0.1


def test_calibrate_refuses_the_images_the_model_was_adapted_on_even_renamed(adapted, halves, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    for i, s in enumerate(halves[0]):
        d = renamed / ("NORMAL" if s.label == 0 else "PNEUMONIA")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, d / f"study{i}.jpeg")
    card_before = adapted["out"].with_suffix(".json").read_bytes()
    assert run_cli("calibrate", "--model", adapted["out"], "--data", renamed) == 2
    err = capsys.readouterr().err
    assert f"{len(halves[0])} of these {len(halves[0])} images trained" in err and "out-of-fold" in err
    assert adapted["out"].with_suffix(".json").read_bytes() == card_before
    # images it has not seen are fine
    other = link_set(halves[1], tmp_path / "other")
    assert run_cli("calibrate", "--model", adapted["out"], "--data", other, "--out", tmp_path / "new.json") == 0


def test_adapt_refuses_an_adapted_model_and_overwriting_its_base(adapted, tmp_path, capsys):
    assert run_cli("adapt", "--model", adapted["out"], "--data", adapted["site"], "--out", tmp_path / "x.tflite") == 2
    assert "already adapted" in capsys.readouterr().err
    assert run_cli("adapt", "--model", BASE, "--data", adapted["site"], "--out", BASE) == 2
    assert "is the base model itself" in capsys.readouterr().err
    assert not (tmp_path / "x.tflite").exists()


def test_the_daemon_says_it_runs_an_adapted_model(adapted):
    card = ModelCard.load(adapted["out"].with_suffix(".json"))
    line = card.adaptation_summary()
    assert line and "is adapted" in line and "site (NORMAL" in line and card.raw["adaptation"]["site_data"][
        "files_sha256"] in line


# ----------------------------------------------------------------------------- a refused run


def test_adapt_refuses_an_adaptation_that_fails_its_protocol(halves, tmp_path, capsys):
    """Labels that carry no signal: the out-of-fold AUROC cannot beat the base, so nothing ships."""
    site = link_set(shuffled_labels(halves[0], seed=0), tmp_path / "shuffled")
    out = tmp_path / "models" / "site.tflite"
    out.parent.mkdir()
    base_sha = sha256_file(BASE)
    assert run_cli("adapt", "--model", BASE, "--data", site, "--out", out, "--folds", "3", "--epochs", "2") == 1
    err = capsys.readouterr().err
    assert "adaptation refused by its protocol" in err and "site gain failed" in err
    assert f"Keep using {BASE.name}" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["site.adapt.json"]  # only the record
    record = json.loads(record_path(out).read_text())
    assert record["status"] == "refused"
    gain = next(c for c in record["result"]["criteria"] if c["name"] == "site gain")
    assert gain["passed"] is False and gain["value"] < gain["limit"]
    assert sha256_file(BASE) == base_sha


# ----------------------------------------------------------------------------- what each mode trains


@pytest.fixture(scope="module")
def member_and_images():
    keras = pytest.importorskip("keras")
    from pneumoflag.convert.train import decode_all

    card = ModelCard.load(BASE.with_suffix(".json"))
    path = card.source_model_paths(BASE)[0]
    meta = json.loads(path.with_name(path.stem + ".train.json").read_text())
    from pneumoflag.device.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    samples = scan_folder(REPO / "tests" / "data" / "mini")
    sources, y, _ = decode_all(samples, spec, 2, "mini")
    return keras.models.load_model(path, compile=False), sources, y, spec


@pytest.mark.parametrize("mode", ["head", "all"])
def test_fine_tuning_changes_only_what_its_mode_names(member_and_images, mode):
    from pneumoflag.convert.finetune import FineTuneConfig, fine_tune, fold_average, logits, member_inputs, trunk_end

    base, sources, y, spec = member_and_images
    cfg = FineTuneConfig(mode=mode, epochs=1, learning_rate=1e-3, batch_size=16, seed=1, verbose=0)
    folds = [fine_tune(base, sources, y, spec, cfg), fine_tune(base, sources[::-1], y[::-1], spec,
                                                                   FineTuneConfig(**{**cfg.__dict__, "seed": 2}))]
    end = trunk_end(base)
    assert end == "flatten"
    changed = {layer.name for layer in folds[0].layers
               if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                                  base.get_layer(layer.name).get_weights(), strict=True))}
    assert {"dense1", "dense2", "dense3", "logit"} <= changed
    assert not any(name.startswith("bn") for name in changed)  # batch norms keep the training split's statistics
    assert ("conv1" in changed) == (mode == "all")
    joined = fold_average(base, folds, mode, "joined")
    x = member_inputs(sources[:6], spec)
    assert np.allclose(logits(joined, x), (logits(folds[0], x) + logits(folds[1], x)) / 2, atol=1e-4)
    # head mode shares one set of convolutional layers: the joined graph is not twice the base
    ratio = joined.count_params() / base.count_params()
    assert (ratio < 1.7) if mode == "head" else (ratio == pytest.approx(2.0, rel=0.01))
