"""train -> convert -> evaluate on real images, through the CLI, and every bad input it must refuse."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import MINI, run_cli
from pneumoflag.convert.dataset import load_samples, patient_id, patient_split, scan_folder
from pneumoflag.device.card import ModelCard, sha256_file
from pneumoflag.device.preprocess import preprocess, to_float_input
from pneumoflag.device.scorer import load_scorer


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tflite" or ".tmp" in p.name)


# ----------------------------------------------------------------------------- data + split

def test_patient_ids_and_patient_level_split():
    assert patient_id("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_id("person1000_virus_17.jpeg") == "person1000"
    assert patient_id("IM-0115-0001.jpeg") == patient_id("NORMAL2-IM-0115-0002.jpeg") == "im-0115"
    samples = scan_folder(MINI)
    train, val = patient_split(samples, 0.3, seed=3)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert {s.label for s in val} == {0, 1} and len(train) + len(val) == len(samples)
    again = patient_split(samples, 0.3, seed=3)
    assert [s.path for s in again[1]] == [s.path for s in val]  # seeded: same split every time


# ----------------------------------------------------------------------------- the happy path

def test_train_writes_model_history_plot_and_metadata(tiny_run):
    k = tiny_run["keras"]
    for suffix in (".keras", ".history.csv", ".history.png", ".train.json"):
        assert k.with_name(k.stem + suffix).is_file(), suffix
    meta = json.loads(k.with_name("tiny.train.json").read_text())
    assert meta["parameters"] <= 500_000
    assert meta["split"]["kind"].startswith("patient-level")
    assert meta["preprocessing"]["height"] == 32
    import keras

    # which Keras backend trained it, with its version (TensorFlow here; torch on a GPU machine)
    assert meta["training"]["backend"].startswith(keras.backend.backend() + " ")
    rows = k.with_name("tiny.history.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch") and len(rows) == 3  # header + 2 epochs
    assert k.with_name("tiny.history.png").read_bytes()[:4] == b"\x89PNG"


def test_convert_writes_a_verified_int8_model_and_card(tiny_run):
    card = json.loads(tiny_run["card"].read_text())
    tfl = tiny_run["tflite"]
    assert card["tflite"]["sha256"] == sha256_file(tfl)
    assert card["tflite"]["input"] == {"shape": [1, 32, 32, 1], "dtype": "uint8",
                                       "quantization": card["tflite"]["input"]["quantization"]}
    assert card["tflite"]["output"]["dtype"] == "uint8"
    assert card["tflite"]["output"]["kind"] == "logit"  # the int8 graph ends before the sigmoid
    assert tfl.stat().st_size < 1_000_000
    for key in ("name", "version", "created", "source_model", "architecture", "preprocessing", "labels",
                "operating_points", "validation", "quantization", "tools", "intended_use"):
        assert key in card, key
    assert "not a diagnostic device" in card["intended_use"].lower()
    ag = card["quantization"]["agreement"]
    assert set(ag) == {"validation", "check"}  # the split from train and --check-data
    for key in ("priority_agreement", "flag_agreement"):
        assert key in ag["validation"]
    for a in ag.values():
        for key in ("max_abs_diff", "auroc_float", "auroc_int8", "auroc_drop", "distinct_outputs",
                    "share_at_lowest_level", "share_at_highest_level"):
            assert key in a, key
        assert a["auroc_drop"] == pytest.approx(a["auroc_float"] - a["auroc_int8"])
        assert 1 <= a["distinct_outputs"] <= a["n"]
    assert 0.0 <= ag["validation"]["flag_agreement"] <= 1.0
    assert ag["check"]["n"] == 32 and card["check_data"]["source"]["images"] == {"NORMAL": 16, "PNEUMONIA": 16}
    ops = card["operating_points"]
    assert 0 <= ops["flag"]["threshold"] <= ops["urgent"]["threshold"] <= 1
    # every op is int8 and each is listed in the compatibility report
    rep = card["edgetpu_compatibility"]
    assert rep["ops_total"] == len(rep["ops"]) > 5
    assert {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED"} <= {o["op"] for o in rep["ops"]}
    assert "LOGISTIC" not in {o["op"] for o in rep["ops"]}
    assert all("float" not in o["dtypes"] for o in rep["ops"])
    assert rep["all_mapped"] is True
    # calibration never used validation images
    assert card["quantization"]["calibration"]["images"] == 12
    # the card loads on the device side and matches the file
    mc = ModelCard.load(tiny_run["card"])
    mc.verify_file(tfl)


def test_operating_points_are_reproduced_from_the_card_rule(tiny_run):
    """The flag threshold in the card is the highest with sensitivity >= 0.97 on the validation split."""
    card = json.loads(tiny_run["card"].read_text())
    v = card["validation"]["int8"]["operating_points"]["flag"]
    assert v["sensitivity"] >= 0.97


def test_toolchain_and_device_make_identical_input_tensors(tiny_run):
    """The calibration/evaluation loader and the device's scorer see the same bytes for the same file."""
    scorer, card = load_scorer(tiny_run["tflite"], "cpu")
    spec = card.preprocessing
    samples = scan_folder(tiny_run["data"])[:6]
    loaded = load_samples(samples, spec)
    for s, x in zip(samples, loaded.x, strict=False):
        device_tensor = scorer.input_tensor(preprocess(s.path, spec))  # exactly what set_tensor receives
        assert device_tensor.dtype == np.uint8
        assert np.array_equal(device_tensor[0], x)
        assert np.array_equal(to_float_input(x, spec) * 255, x.astype(np.float32) * spec.scale * 255)


def test_evaluate_tflite_confusion_arithmetic(tiny_run, tmp_path):
    out = tmp_path / "new" / "eval.json"  # a folder that does not exist yet is made
    plots = tmp_path / "plots"
    assert run_cli("evaluate", "--model", tiny_run["tflite"], "--data", MINI, "--json", out, "--plots", plots) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 32 and r["n_positive"] == 16 and r["n_negative"] == 16
    # recompute independently with the device scorer
    scorer, card = load_scorer(tiny_run["tflite"], "cpu")
    samples = scan_folder(MINI)
    p = np.array([scorer.score(preprocess(s.path, card.preprocessing)) for s in samples])
    y = np.array([s.label for s in samples])
    for name, m in r["operating_points"].items():
        t = getattr(card.thresholds, name)
        assert m["threshold"] == t
        assert m["tp"] == int(((p >= t) & (y == 1)).sum())
        assert m["fp"] == int(((p >= t) & (y == 0)).sum())
        assert m["tn"] == int(((p < t) & (y == 0)).sum())
        assert m["fn"] == int(((p < t) & (y == 1)).sum())
        assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 32
        if m["tp"] + m["fn"]:
            assert m["sensitivity"] == pytest.approx(m["tp"] / (m["tp"] + m["fn"]))
    for name in ("roc.png", "confusion.png", "misclassified.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_keras_model_uses_card_thresholds(tiny_run, tmp_path):
    out = tmp_path / "k.json"
    assert run_cli("evaluate", "--model", tiny_run["keras"], "--data", MINI, "--json", out,
                   "--card", tiny_run["card"]) == 0
    r = json.loads(out.read_text())
    assert r["runner"].startswith("float") and r["n"] == 32
    assert r["operating_points"]["flag"]["threshold"] == ModelCard.load(tiny_run["card"]).thresholds.flag


def test_evaluate_tflite_needs_no_tensorflow(tiny_run, tmp_path):
    """Run evaluate in a subprocess where importing tensorflow fails."""
    import subprocess
    import sys

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "tensorflow.py").write_text("raise ImportError('tensorflow is blocked for this test')\n")
    (blocker / "keras.py").write_text("raise ImportError('keras is blocked for this test')\n")
    out = tmp_path / "e.json"
    env = {**__import__("os").environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "evaluate", "--model", str(tiny_run["tflite"]),
                           "--data", str(MINI), "--json", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["n"] == 32


def test_convert_h5_with_rgb_input(tmp_path, mini_data):
    import keras

    inp = keras.Input((40, 48, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    h5 = tmp_path / "notebook.h5"
    model.save(h5)
    tfl = tmp_path / "nb.tflite"
    assert run_cli("convert", h5, "--calibration", mini_data, "--validation", mini_data, "--out", tfl,
                   "--num-calibration", "8", "--max-auroc-drop", "1.0", "--single-tier") == 0
    card = json.loads(tfl.with_suffix(".json").read_text())
    assert card["tflite"]["input"]["shape"] == [1, 40, 48, 3]
    assert card["preprocessing"]["channels"] == 3 and card["preprocessing"]["contrast"] == "none"
    assert card["source_model"]["format"] == "h5"
    scorer, _ = load_scorer(tfl, "cpu")
    assert 0.0 <= scorer.score(preprocess(next(mini_data.rglob("*.jpeg")), scorer.spec)) <= 1.0


def test_convert_savedmodel(tmp_path, mini_data, tiny_run):
    import keras

    model = keras.models.load_model(tiny_run["keras"], compile=False)
    sm = tmp_path / "saved"
    model.export(sm)
    tfl = tmp_path / "sm.tflite"
    assert run_cli("convert", sm, "--calibration", mini_data, "--validation", mini_data, "--out", tfl,
                   "--num-calibration", "8", "--max-auroc-drop", "1.0", "--single-tier") == 0
    assert json.loads(tfl.with_suffix(".json").read_text())["source_model"]["format"] == "savedmodel"


# ----------------------------------------------------------------------------- bad input

def test_missing_and_empty_data_folders(tmp_path, capsys):
    assert run_cli("train", "--data", tmp_path / "nope", "--out", tmp_path / "m.keras") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli("train", "--data", tmp_path / "empty", "--out", tmp_path / "m.keras") == 2
    assert "NORMAL, PNEUMONIA" in capsys.readouterr().err
    (tmp_path / "empty" / "NORMAL").mkdir()
    (tmp_path / "empty" / "PNEUMONIA").mkdir()
    assert run_cli("evaluate", "--model", "x.tflite", "--data", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_calibration_folder_missing(tiny_run, tmp_path, capsys):
    assert run_cli("convert", tiny_run["keras"], "--calibration", tmp_path / "none", "--out", tmp_path / "x.tflite") == 2
    assert "calibration folder" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_corrupt_files_are_skipped_counted_never_a_crash(tiny_run, mini_data, tmp_path, caplog):
    (mini_data / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (mini_data / "PNEUMONIA" / "notes.txt").write_text("radiographer notes")
    (mini_data / "PNEUMONIA" / "empty.png").write_bytes(b"")
    tfl = tmp_path / "c.tflite"
    assert run_cli("convert", tiny_run["keras"], "--calibration", mini_data, "--validation", mini_data,
                   "--out", tfl, "--num-calibration", "100", "--max-auroc-drop", "1.0", "--single-tier") == 0
    card = json.loads(tfl.with_suffix(".json").read_text())
    assert card["quantization"]["calibration"]["skipped_files"] == 3
    assert card["validation"]["skipped_files"] == 3
    assert "broken.jpeg" in caplog.text


def test_model_file_that_is_not_a_model(tmp_path, mini_data, capsys):
    for name, content in (("fake.keras", b"hello"), ("fake.h5", b"not hdf5"), ("fake.onnx", b"x")):
        f = tmp_path / name
        f.write_bytes(content)
        assert run_cli("convert", f, "--calibration", mini_data, "--out", tmp_path / "o.tflite") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err
    assert _leftovers(tmp_path) == []


def test_layer_that_cannot_be_int8_is_named(tmp_path, mini_data, capsys):
    import keras

    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.LayerNormalization(name="odd_layernorm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(x))
    m = tmp_path / "odd.keras"
    model.save(m)
    out = tmp_path / "odd.tflite"
    assert run_cli("convert", m, "--calibration", mini_data, "--validation", mini_data, "--out", out,
                   "--num-calibration", "8") == 2
    err = capsys.readouterr().err
    assert "odd_layernorm" in err and "int8" in err
    assert _leftovers(tmp_path) == []


def test_unwritable_output(tiny_run, mini_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert run_cli("convert", tiny_run["keras"], "--calibration", mini_data, "--out", blocker / "m.tflite") == 2
    assert "not a folder" in capsys.readouterr().err
    assert run_cli("train", "--data", mini_data, "--out", tmp_path / "no" / "such" / "m.keras") == 2
    assert "does not exist" in capsys.readouterr().err


def test_auroc_gate_fails_and_leaves_no_model(tiny_run, mini_data, tmp_path, capsys):
    """With a gate no model can pass, convert fails, says why, and writes nothing."""
    out = tmp_path / "gate.tflite"
    assert run_cli("convert", tiny_run["keras"], "--calibration", mini_data, "--validation", mini_data,
                   "--out", out, "--num-calibration", "8", "--max-auroc-drop", "-1") == 2
    assert "AUROC" in capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and not out.with_suffix(".json").exists()


def test_edgetpu_without_compiler_says_how_to_get_it(tiny_run, mini_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    out = tmp_path / "e.tflite"
    assert shutil.which("edgetpu_compiler") is None
    assert run_cli("convert", tiny_run["keras"], "--calibration", mini_data, "--validation", mini_data,
                   "--out", out, "--num-calibration", "8", "--max-auroc-drop", "1.0", "--single-tier", "--edgetpu") == 2
    captured = capsys.readouterr()
    assert "Edge TPU compatibility" in captured.out  # the report comes before any compiler
    errors = [ln for ln in captured.err.splitlines() if "error:" in ln]
    assert len(errors) == 1
    assert "edgetpu_compiler is not installed" in errors[0] and "apt-get install" in errors[0]


def test_edgetpu_compiler_is_run_and_its_outputs_kept(tiny_run, mini_data, tmp_path, monkeypatch):
    """A stand-in compiler on PATH (the real one is x86 Debian-only and not on PyPI) gets the real CLI contract."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "edgetpu_compiler"
    fake.write_text(
        "#!/bin/sh\n"
        "# args: -s -o OUTDIR MODEL\n"
        'out="$3"; model="$4"; base=$(basename "$model" .tflite)\n'
        'cp "$model" "$out/${base}_edgetpu.tflite"\n'
        'echo "Edge TPU Compiler version 16.0.384591198"\n'
        'echo "Model compiled successfully"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    out = tmp_path / "m.tflite"
    assert run_cli("convert", tiny_run["keras"], "--calibration", mini_data, "--validation", mini_data,
                   "--out", out, "--num-calibration", "8", "--max-auroc-drop", "1.0", "--single-tier", "--edgetpu") == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["edgetpu"]["file"] == "m_edgetpu.tflite"
    assert card["edgetpu"]["compiler_version"] == "16.0.384591198"
    assert (tmp_path / "m_edgetpu.log").read_text().startswith("Edge TPU Compiler")
    ModelCard.load(out.with_suffix(".json")).verify_file(tmp_path / "m_edgetpu.tflite")


def test_training_is_deterministic_with_a_seed(tmp_path, mini_data):
    import keras

    weights = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.keras"
        assert run_cli("train", "--data", mini_data, "--out", out, "--size", "32", "--epochs", "1",
                       "--val-fraction", "0.3", "--seed", "11") == 0
        weights.append(keras.models.load_model(out, compile=False).get_weights())
    assert all(np.array_equal(x, y) for x, y in zip(*weights, strict=False))


def test_evaluate_on_the_recorded_validation_split(tiny_run, tmp_path):
    meta = tiny_run["keras"].with_name("tiny.train.json")
    out = tmp_path / "v.json"
    assert run_cli("evaluate", "--model", tiny_run["tflite"], "--data", tiny_run["data"], "--split", meta,
                   "--json", out) == 0
    r = json.loads(out.read_text())
    assert r["n"] == json.loads(meta.read_text())["split"]["val_images"]
    # the card's int8 validation figures were computed on the very same images
    card = json.loads(tiny_run["card"].read_text())
    assert r["auroc"] == pytest.approx(card["validation"]["int8"]["auroc"])
    assert r["operating_points"]["flag"]["tp"] == card["validation"]["int8"]["operating_points"]["flag"]["tp"]


def test_the_int8_graph_ends_at_the_logit_so_saturated_scores_keep_their_order(tmp_path):
    """A sigmoid quantized to 256 levels puts every confident case on the top level and loses their order;
    the logit does not. The model: a steep sigmoid of the image's mean grey level, on the mini set."""
    import keras

    from pneumoflag.convert.dataset import load_samples, scan_folder
    from pneumoflag.convert.float_model import load_float_model, logit_model
    from pneumoflag.convert.metrics import auroc
    from pneumoflag.convert.quantize import _int8_scorer, quantize_int8, resolve_spec

    inp = keras.Input((64, 64, 1))
    mean = keras.layers.GlobalAveragePooling2D()(inp)
    out = keras.layers.Dense(1, activation="sigmoid", name="steep")(mean)
    model = keras.Model(inp, out)
    fm0 = load_float_model(_save(model, tmp_path / "steep.keras"))
    spec = resolve_spec(fm0, None)
    data = load_samples(scan_folder(MINI), spec)
    means = to_float_input(data.x, spec).mean(axis=(1, 2, 3))
    k = 40.0 / float(means.max() - means.min())  # logits over about 40 units: many far out on the flat top
    model.get_layer("steep").set_weights([np.array([[k]], np.float32), np.array([-k * np.percentile(means, 30)],
                                                                                 np.float32)])
    fm = load_float_model(_save(model, tmp_path / "steep.keras"))
    p_float = fm.predict(to_float_input(data.x, spec))
    assert np.mean(p_float > 0.996) > 0.3  # confident about many images, in a clear order
    auc_float = auroc(data.y, p_float)
    results = {}
    for kind, m in (("probability", fm), ("logit", logit_model(fm))):
        assert m.output == kind
        path = tmp_path / f"{kind}.tflite"
        path.write_bytes(quantize_int8(m, data, spec))
        scorer = _int8_scorer(path, spec, kind)
        p = np.array([scorer.score(x) for x in data.x])
        results[kind] = (auroc(data.y, p), len({scorer.raw(x)[0] for x in data.x}))
    assert abs(results["logit"][0] - auc_float) <= 0.005  # the logit keeps the order
    assert results["logit"][1] > 2 * results["probability"][1]  # the saturated sigmoid collapses it


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


def test_an_ensemble_of_members_with_different_contrast_steps_is_one_model(tiny_run, mini_data, tmp_path):
    """Two members, one trained on equalised and one on CLAHE images: one .tflite with one channel per step,
    each member reading its own, the logits averaged; every op int8 and Edge-TPU-mapped."""
    import keras

    from pneumoflag.convert.float_model import load_float_model
    from pneumoflag.convert.train import sidecar_paths

    other = tmp_path / "clahe.keras"
    assert run_cli("train", "--data", mini_data, "--out", other, "--size", "32", "--epochs", "1",
                   "--val-fraction", "0.3", "--seed", "3", "--contrast", "clahe") == 0
    out = tmp_path / "ens.tflite"
    assert run_cli("convert", tiny_run["keras"], other, "--calibration", mini_data, "--out", out,
                   "--validation", mini_data, "--num-calibration", "8", "--max-auroc-drop", "1", "--single-tier") == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["preprocessing"]["contrast"] == "equalize+clahe" and card["tflite"]["input"]["shape"] == [1, 32, 32, 2]
    assert "ensemble of 2" in card["architecture"]["description"]
    assert card["edgetpu_compatibility"]["all_mapped"] and "STRIDED_SLICE" in {
        o["op"] for o in card["edgetpu_compatibility"]["ops"]}
    # the int8 ensemble follows the float mean of the members' logits, each on its own contrast step
    from pneumoflag.device.preprocess import PreprocessSpec

    scorer, mc = load_scorer(out, "cpu")
    assert mc.preprocessing.shape == (32, 32, 2)
    f = sorted(mini_data.rglob("*.jpeg"))[0]
    z = []
    for path in (tiny_run["keras"], other):
        fm = load_float_model(path)
        spec = PreprocessSpec.from_dict(json.loads(sidecar_paths(path)["meta"].read_text())["preprocessing"])
        logit = keras.Model(fm.keras_model.inputs[0], fm.keras_model.get_layer("logit").output)
        z.append(float(np.asarray(logit(to_float_input(preprocess(f, spec)[None], spec))).ravel()[0]))
    p_float = 1 / (1 + np.exp(-np.mean(z)))
    assert scorer.score(preprocess(f, mc.preprocessing)) == pytest.approx(p_float, abs=0.05)
