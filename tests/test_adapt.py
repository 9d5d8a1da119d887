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


# ----------------------------------------------------------------------------- hostile pass: refused before training

MISSING = Path("/nonexistent/site")  # an option or --out refused before the site folder is read


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be between 0 and"),  # fine-tuning seeds must stay in [0, 2**32)
    (["--max-infer-ms", "nan"], "--max-infer-ms must be a positive number"),
    (["--max-forgetting", "-0.1"], "--max-forgetting must be in [0, 1)"),
    (["--max-auroc-drop", "nan"], "--max-auroc-drop must be in [0, 1)"),
    (["--min-gain", "nan"], "--min-gain must be in [0, 1)"),
    (["--min-gain", "-0.1"], "--min-gain must be in [0, 1)"),
    (["--max-bytes", "0"], "--max-bytes must be at least 1"),
    (["--num-calibration", "0"], "--num-calibration must be at least 1"),
])
def test_adapt_refuses_options_that_break_the_run_or_void_a_criterion(args, message, tmp_path, capsys):
    assert run_cli("adapt", "--model", BASE, "--data", MISSING, "--out", tmp_path / "x.tflite", *args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["pneumoflag-rn128_edgetpu.tflite", "pneumoflag-rn128-full.train.tflite"])
def test_adapt_refuses_an_out_whose_card_or_members_would_overwrite_a_base_file(name, capsys):
    """NAME_edgetpu.tflite's card is NAME.json: the base card was overwritten and the base model refused."""
    before = {p.name: sha256_file(p) for p in BASE.parent.iterdir() if p.is_file()}
    assert run_cli("adapt", "--model", BASE, "--data", MISSING, "--out", BASE.parent / name) == 2
    assert "choose another name" in capsys.readouterr().err
    assert {p.name: sha256_file(p) for p in BASE.parent.iterdir() if p.is_file()} == before


def test_adapt_refuses_a_float_member_that_is_not_the_one_the_card_names(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(BASE.parent, base)
    shutil.copy(base / "pneumoflag-rn128-crop12.keras", base / "pneumoflag-rn128-full.keras")
    assert run_cli("adapt", "--model", base / BASE.name, "--data", MISSING, "--out", tmp_path / "x.tflite") == 2
    assert "pneumoflag-rn128-full.keras does not match the card" in capsys.readouterr().err


def test_a_second_adapt_into_the_same_out_is_refused_while_one_runs(tmp_path, capsys):
    import fcntl
    import os

    fd = os.open(tmp_path / ".x.adapt.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_cli("adapt", "--model", BASE, "--data", MISSING, "--out", tmp_path / "x.tflite") == 2
    finally:
        os.close(fd)
    assert "another pneumoflag adapt" in capsys.readouterr().err
    assert not record_path(tmp_path / "x.tflite").exists()


def _site(root: Path, normal: list[Path], pneumonia: list[Path]) -> Path:
    for lab, files in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (root / lab).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, root / lab / (f"IM-{900 + i:04d}-0001.jpeg" if lab == "NORMAL" else f"person{900 + i}_x.jpeg"))
    return root


def test_adapt_counts_only_readable_images_against_min_per_class(tmp_path, capsys):
    n = sorted((SITE_DEV / "NORMAL").iterdir())[:3]
    p = sorted((SITE_DEV / "PNEUMONIA").iterdir())[:3]
    site = _site(tmp_path / "site", n, p)
    (site / "NORMAL" / "IM-0900-0001.jpeg").write_bytes(n[0].read_bytes()[:300])  # truncated
    assert run_cli("adapt", "--model", BASE, "--data", site, "--out", tmp_path / "x.tflite", "--min-per-class", "3",
                   "--folds", "3") == 2
    assert "only NORMAL=2, PNEUMONIA=3 readable images (1 unreadable)" in capsys.readouterr().err


def test_adapt_refuses_the_same_image_under_both_classes(tmp_path, capsys):
    n = sorted((SITE_DEV / "NORMAL").iterdir())[:3]
    p = sorted((SITE_DEV / "PNEUMONIA").iterdir())[:3]
    site = _site(tmp_path / "site", n, p + [n[1]])
    assert run_cli("adapt", "--model", BASE, "--data", site, "--out", tmp_path / "x.tflite", "--min-per-class", "3",
                   "--folds", "20") == 2
    assert "1 site images have the same bytes under NORMAL and under PNEUMONIA" in capsys.readouterr().err


def test_adapt_refuses_site_images_the_base_was_trained_on(tmp_path, capsys):
    """adapt --data on (part of) the training split: the out-of-fold scores would come from layers that saw them."""
    n = sorted((SITE_DEV / "NORMAL").iterdir())[:3]
    p = sorted((SITE_DEV / "PNEUMONIA").iterdir())[:3]
    train = sorted((SITE_DEV.parent / "train" / "PNEUMONIA").iterdir())[:1]
    site = _site(tmp_path / "site", n, p + train)
    assert run_cli("adapt", "--model", BASE, "--data", site, "--out", tmp_path / "x.tflite", "--min-per-class", "3",
                   "--folds", "20") == 2
    assert "1 site images (e.g. person903_x.jpeg) are images the base model's members were trained" in (
        capsys.readouterr().err)


def test_copies_of_an_image_under_two_patients_are_dealt_into_one_fold():
    """The same bytes under two patients' names were two patients, and could sit in two folds (a leak)."""
    from pneumoflag.convert.dataset import copy_groups

    samples = [Sample(Path(f"person{i}_bacteria_1.jpeg"), 1) for i in range(12)] + [
        Sample(Path(f"IM-{i:04d}-0001.jpeg"), 0) for i in range(12)]
    digests = [f"d{i}" for i in range(24)]
    digests[11] = digests[0]  # person11's image is person0's
    digests[23] = digests[12]  # and IM-0011's is IM-0000's
    joined = copy_groups(samples, digests)
    assert joined == {"person0": "person0", "person11": "person0", "im-0000": "im-0000", "im-0011": "im-0000"}
    for seed in range(20):
        folds = patient_folds(samples, 4, seed, joined)
        assert folds[11] == folds[0] and folds[23] == folds[12]
    assert copy_groups(samples, [f"d{i}" for i in range(24)]) == {}  # no copies: the folds are as before
    assert patient_folds(samples, 4, 3, {}) == patient_folds(samples, 4, 3)


def test_a_site_image_that_changes_during_the_run_is_caught(tmp_path):
    from pneumoflag.convert.adapt import AdaptError, _check_unchanged
    from pneumoflag.convert.dataset import file_digest

    files = [tmp_path / f"{i}.jpeg" for i in range(3)]
    for f in files:
        shutil.copy(sorted((SITE_DEV / "NORMAL").iterdir())[0], f)
    digests = [file_digest(f) for f in files]
    _check_unchanged(files, digests)
    files[1].write_bytes(files[1].read_bytes() + b"\0")
    with pytest.raises(AdaptError, match="1 site images changed or went away"):
        _check_unchanged(files, digests)


def test_link_set_drops_the_links_of_an_earlier_run(tmp_path):
    """nested --site-images N with a --work used before adapted on the earlier run's links as well."""
    samples = scan_folder(SITE_DEV)
    link_set(samples[:40] + samples[-40:], tmp_path / "site")
    link_set(samples[:5] + samples[-5:], tmp_path / "site")
    assert len(scan_folder(tmp_path / "site")) == 10


# ----------------------------------------------------------------------------- hostile pass: with the accepted run


def test_the_protocol_names_the_validation_data_and_the_site_images_bytes(adapted):
    a = adapted["card"]["adaptation"]
    assert sum(a["protocol"]["validation_data"]["images"].values()) > 0
    assert len(a["protocol"]["site_data"]["content_sha256"]) == 16
    assert len(a["site_data"]["input_digests"]) == len(a["site_data"]["image_digests"])


def test_calibrate_and_evaluate_know_the_adapted_images_after_a_lossless_re_encode(adapted, halves, tmp_path, capsys):
    """One byte appended, or the same pixels as PNG: new bytes, the same model input. Both were calibrated on."""
    from PIL import Image

    for kind in ("appended", "png"):
        d = tmp_path / kind
        for i, s in enumerate(halves[0]):
            (d / LABEL_DIRS[s.label]).mkdir(parents=True, exist_ok=True)
            if kind == "appended":
                (d / LABEL_DIRS[s.label] / f"s{i}.jpeg").write_bytes(s.path.read_bytes() + b"\0")
            else:
                Image.open(s.path).save(d / LABEL_DIRS[s.label] / f"s{i}.png")
        assert run_cli("calibrate", "--model", adapted["out"], "--data", d, "--out", tmp_path / "c.json") == 2, kind
        assert f"{len(halves[0])} of these {len(halves[0])} images trained" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
    assert run_cli("evaluate", "--model", adapted["out"], "--data", tmp_path / "png") == 0
    assert f"NOT AN EVALUATION: {len(halves[0])} of these {len(halves[0])} images trained" in capsys.readouterr().out


LABEL_DIRS = ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize("how", ["refused", "interrupted"])
def test_a_run_that_does_not_ship_keeps_the_record_of_the_model_already_at_out(adapted, tmp_path, monkeypatch, how):
    """A refused or interrupted run into --out used to leave the accepted model beside a record not its own."""
    import pneumoflag.convert.adapt as adapt_mod

    out = tmp_path / "models" / adapted["out"].name
    shutil.copytree(adapted["out"].parent, out.parent)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}

    def fake_run(*args, **kwargs):  # the trainer, cut short: its outcome is what matters here
        if how == "refused":  # as _run ends a refused run: the record says so, then the refusal
            record, rec_path = args[8], args[9]
            record.update(status="refused")
            adapt_mod._write_record(rec_path, record)
            raise adapt_mod._Refused("site gain failed (0.5 against 0.9)")
        raise KeyboardInterrupt("stopped by signal SIGTERM")

    monkeypatch.setattr(adapt_mod, "_run", fake_run)
    cfg = adapt_mod.AdaptConfig(model=BASE, data=adapted["site"], out=out)
    with pytest.raises(adapt_mod.AdaptRefused if how == "refused" else KeyboardInterrupt) as exc:
        adapt_mod.adapt(cfg)
    after = {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # model, card, members and record as they were
    (this_run,) = [k for k in after if k not in before and k.endswith(".json")]
    rec = json.loads((out.parent / this_run).read_text())
    assert rec["status"] == ("refused" if how == "refused" else "error") and this_run.endswith(f".{rec['status']}.json")
    if how == "refused":
        assert str(out.parent / this_run) in str(exc.value) and f"Keep using {out.name}" in str(exc.value)
        assert exc.value.record_path == out.parent / this_run


def test_an_earlier_refused_run_keeps_its_record_when_another_run_follows(adapted, tmp_path, monkeypatch):
    """Seed after seed into one --out until one passes: each refused run's record used to be overwritten."""
    import pneumoflag.convert.adapt as adapt_mod

    out = tmp_path / "site.tflite"
    earlier = {"protocol": {}, "protocol_sha256": "0" * 64, "protocol_written": "2026-01-02T03:04:05+00:00",
               "status": "refused"}
    record_path(out).write_text(json.dumps(earlier))

    def fake_run(*args, **kwargs):
        args[8].update(status="refused")
        adapt_mod._write_record(args[9], args[8])
        raise adapt_mod._Refused("site gain failed (0.5 against 0.9)")

    monkeypatch.setattr(adapt_mod, "_run", fake_run)
    with pytest.raises(adapt_mod.AdaptRefused):
        adapt_mod.adapt(adapt_mod.AdaptConfig(model=BASE, data=adapted["site"], out=out, seed=7))
    kept = tmp_path / "site.adapt.20260102T030405Z.refused.json"
    assert json.loads(kept.read_text()) == earlier
    assert json.loads(record_path(out).read_text())["protocol"]["method"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name, "site.adapt.json"]  # no lock left behind


def test_adapt_ends_as_ctrl_c_does_when_it_is_terminated(monkeypatch, tmp_path):
    """SIGTERM (kill, systemd, timeout) left the record 'running' and a half-written .adapt-* folder behind."""
    import signal

    import pneumoflag.convert.adapt as adapt_mod

    def fake_adapt(cfg):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "no SIGTERM handler while adapt runs"
        handler(signal.SIGTERM, None)

    monkeypatch.setattr(adapt_mod, "adapt", fake_adapt)
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli("adapt", "--model", BASE, "--data", MISSING, "--out", tmp_path / "x.tflite") == 130
    assert signal.getsignal(signal.SIGTERM) == before


def test_adapts_drift_reference_holds_its_out_of_fold_scores(adapted, halves):
    """The reference a monitor compares new images with: the out-of-fold scores (what a model of the shipped
    kind gives images it never saw), not the shipped model's sharper scores on its own training images."""
    from pneumoflag.device.drift_inputs import logit

    ref = ModelCard.load(adapted["out"].with_suffix(".json")).drift_reference
    assert ref["made_by"] == "pneumoflag adapt" and "out-of-fold" in ref["scores"]
    assert ref["n"] == len(halves[0]) and ref["gate"]["refused"] == 0
    record = json.loads(record_path(adapted["out"]).read_text())
    oof = [logit(r[3]) for r in record["out_of_fold_scores"]["rows"]]  # the record rounds p to 6 decimals:
    clip = lambda v: np.clip(v, -10, 10)  # noqa: E731 - compared where that rounding moves a logit < 0.02
    assert clip(ref["logit_quantiles"]) == pytest.approx(clip(np.quantile(oof, np.linspace(0, 1, 101))), abs=0.02)
