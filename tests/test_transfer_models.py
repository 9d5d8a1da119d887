"""The source notebooks' transfer models (VGG19, InceptionResNetV2, ResNet50V2) through the whole pipeline.

ImageNet weights cannot be fetched here, so each architecture is written untrained
(``pneumoflag train --arch A --epochs 0``: the Keras application with ``weights=None`` and the
project's end), converted to full int8 with real calibration images, scored by ``pneumoflag score``
and by the real daemon through a real Mosquitto broker. Their probabilities mean nothing; what is
shown is that the path takes them: a user who trained one elsewhere can deploy it.

Each model is built and converted once (a module-scoped fixture per architecture) on 8 calibration
and 4 validation images: 113 s for the whole file on 2 cores (peak memory 6.3 GB, converting
InceptionResNetV2).
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import MINI, run_cli
from mqtt_helpers import Subscriber, drop, new_daemon
from pneumoflag.convert.edgetpu import check_ops
from pneumoflag.device.card import ModelCard, sha256_file
from pneumoflag.device.config import load_config
from pneumoflag.device.pipeline import Pipeline, score_file
from pneumoflag.device.preprocess import preprocess
from pneumoflag.device.scorer import load_scorer
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLE = SAMPLES_DIR / "PNEUMONIA" / "person1112_bacteria_3053.jpeg"
#: --arch -> (keras.applications module, parameters of the Keras application without its top + Dense(1))
ARCHS = {
    "vgg19": ("vgg19", 20_024_897),
    "inception-resnet-v2": ("inception_resnet_v2", 54_338_273),
    "resnet50v2": ("resnet_v2", 23_566_849),
}


def _subset(dst: Path, per_class: int, skip: int) -> Path:
    """``per_class`` images of each class of the mini set, after the first ``skip``: disjoint folders."""
    for label in ("NORMAL", "PNEUMONIA"):
        (dst / label).mkdir(parents=True)
        for f in sorted((MINI / label).glob("*.jpeg"))[skip : skip + per_class]:
            shutil.copyfile(f, dst / label / f.name)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("transfer-data")
    return {"calibration": _subset(root / "calibration", 4, 0), "validation": _subset(root / "validation", 2, 4)}


@pytest.fixture(scope="module", params=list(ARCHS))
def run(request, folders, tmp_path_factory) -> dict:
    """``train --epochs 0`` then ``convert``, through the CLI, once per architecture."""
    import keras

    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    keras_path = root / f"{arch}.keras"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli("train", "--arch", arch, "--data", MINI, "--out", keras_path, "--epochs", "0",
                       "--val-fraction", "0.3") == 0
    train_stdout = out.getvalue()
    model = keras.models.load_model(keras_path, compile=False)
    layers = [(lay.name, type(lay).__name__, getattr(getattr(lay, "activation", None), "__name__", None))
              for lay in model.layers]
    scaling = model.get_layer("input_scaling")
    grey = np.array([0, 1, 37, 128, 200, 254, 255], np.float32)
    rgb = np.repeat(grey[None, None, :, None], 3, axis=3)  # R = G = B, as the device feeds 3 channels
    scaled = np.asarray(scaling(rgb / 255.0))
    params = int(model.count_params())
    del model, scaling
    keras.backend.clear_session()

    tflite = root / "models" / f"{arch}.tflite"
    tflite.parent.mkdir()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli("convert", keras_path, "--calibration", folders["calibration"],
                       "--validation", folders["validation"], "--out", tflite, "--num-calibration", "8",
                       "--name", f"{arch}-untrained", "--model-version", "0.0.1",
                       "--max-auroc-drop", "1.0", "--single-tier") == 0
    keras.backend.clear_session()
    gc.collect()
    yield {"arch": arch, "keras": keras_path, "meta": json.loads(keras_path.with_suffix(".train.json").read_text()),
           "train_stdout": train_stdout, "layers": layers, "rgb": rgb, "scaled": scaled, "params": params,
           "tflite": tflite, "card": json.loads(tflite.with_suffix(".json").read_text()),
           "convert_stdout": out.getvalue()}
    shutil.rmtree(root, ignore_errors=True)  # 100-280 MB a model: not kept among pytest's last runs


def test_train_epochs_0_writes_the_keras_application_with_the_projects_end(run):
    module, params = ARCHS[run["arch"]]
    assert run["params"] == params  # the Keras application itself, plus Dense(1)
    meta = run["meta"]
    assert meta["arch"] == run["arch"] and meta["parameters"] == params
    assert meta["training"]["untrained"] is True and meta["training"]["epochs_run"] == 0
    assert meta["training"]["best_val_loss"] is None
    pre = meta["preprocessing"]
    assert (pre["height"], pre["width"], pre["channels"]) == (224, 224, 3)
    assert pre["scale"] == pytest.approx(1 / 255)
    assert "wrote the untrained" in run["train_stdout"] and f"{params:,} parameters" in run["train_stdout"]
    for suffix in (".history.csv", ".history.png", ".best.keras"):  # nothing pretends it was trained
        assert not run["keras"].with_name(run["keras"].stem + suffix).exists()
    # it ends as every other architecture does, so convert cuts at the logit
    names = [n for n, _, _ in run["layers"]]
    assert names[:2] == ["image", "input_scaling"]
    assert run["layers"][-4][1] == "GlobalAveragePooling2D" and run["layers"][-3][1] == "Dropout"
    assert run["layers"][-2] == ("logit", "Dense", "linear")
    assert run["layers"][-1] == ("pneumonia", "Activation", "sigmoid")


def test_the_models_own_input_scaling_is_the_applications_preprocess_input(run):
    """The device feeds pixels * 1/255; the Rescaling inside the model makes of it what the Keras
    application's ``preprocess_input`` makes of the 0-255 pixels (grey, R = G = B)."""
    import keras

    module = getattr(keras.applications, ARCHS[run["arch"]][0])
    expected = np.asarray(module.preprocess_input(run["rgb"] * 1.0))
    np.testing.assert_allclose(run["scaled"], expected, atol=1e-4)


def test_convert_writes_an_all_int8_model_its_card_and_the_edge_tpu_op_report(run):
    card, tflite = run["card"], run["tflite"]
    assert card["tflite"]["input"]["shape"] == [1, 224, 224, 3]
    assert card["tflite"]["input"]["dtype"] == "uint8"
    in_scale, in_zero = card["tflite"]["input"]["quantization"]
    assert in_scale == pytest.approx(1 / 255, rel=1e-6) and in_zero == 0  # the device feeds raw pixels
    assert card["tflite"]["output"]["kind"] == "logit"
    assert card["tflite"]["output"]["dtype"] == "uint8"
    assert card["tflite"]["bytes"] == tflite.stat().st_size and card["tflite"]["sha256"] == sha256_file(tflite)
    assert card["tflite"]["bytes"] > run["params"] * 0.9  # one byte a weight: this is the whole network
    assert card["architecture"]["parameters"] == run["params"]
    assert card["quantization"]["calibration"]["images"] == 8
    assert card["quantization"]["agreement"]["validation"]["n"] == 4
    ModelCard.load(tflite.with_suffix(".json")).verify_file(tflite)

    report = card["edgetpu_compatibility"]
    ops = report["ops"]
    assert report["ops_total"] == len(ops) > 20
    assert {"CONV_2D", "MEAN", "FULLY_CONNECTED"} <= {o["op"] for o in ops}
    not_int8 = [(o["op"], o["layer"], o["dtypes"]) for o in ops if not set(o["dtypes"].split("/")) <= {"int8", "uint8"}]
    assert not_int8 == []
    # the report convert printed is the card's, and a fresh check of the written file gives the same ops
    assert (f"Edge TPU compatibility: {report['ops_mapped']} of {report['ops_total']} ops would be mapped"
            in run["convert_stdout"])
    assert [(c.op, c.dtypes, c.mapped) for c in check_ops(tflite)] == [(o["op"], o["dtypes"], o["mapped"]) for o in ops]
    unmapped = [(o["op"], o["layer"], o["reason"]) for o in ops if not o["mapped"]]
    assert unmapped == [] and report["all_mapped"]  # by the static table; edgetpu_compiler not run here
    assert f"wrote {tflite} ({card['tflite']['bytes']:,} bytes)" in run["convert_stdout"]


def _device_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PNEUMOFLAG_CONFIG", None)
    return env


def test_score_cli_scores_a_sample_radiograph(run):
    card = run["card"]
    proc = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "score", "--json", "--accelerator", "cpu",
                           "--model", str(run["tflite"]), str(SAMPLE)],
                          capture_output=True, text=True, env=_device_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    msg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert msg["file"] == str(SAMPLE)
    assert 0.0 <= msg["probability"] <= 1.0
    assert msg["model"] == {"name": f"{run['arch']}-untrained", "version": "0.0.1", "sha256": card["tflite"]["sha256"]}
    assert msg["priority"] in ("routine", "flag", "urgent") and msg["accelerator"] == "cpu"
    assert msg["timings_ms"]["infer"] > 0
    # the same number as the int8 model through the device's scorer in this process
    scorer, _ = load_scorer(run["tflite"], "cpu")
    assert msg["probability"] == pytest.approx(scorer.score(preprocess(SAMPLE, scorer.spec)), abs=1e-6)


def test_the_daemon_publishes_its_flag_over_mqtt(run, broker, dirs, daemons):
    watch, state = dirs
    card = ModelCard.load(run["tflite"].with_suffix(".json"))
    cfg = load_config(env={}, overrides={"model.path": str(run["tflite"]), "mqtt.device_id": "test"})
    scorer, _ = load_scorer(run["tflite"], "cpu")
    expected = score_file(Pipeline(cfg, scorer, card), SAMPLE).to_dict()
    sub = Subscriber(broker.address, "pneumoflag/#")
    try:
        d = new_daemon(daemons, watch, state, broker.address, model=run["tflite"]).start()
        drop(SAMPLE, watch)
        (msg,) = sub.wait_flags(1, timeout=60)
        assert msg["file"] == SAMPLE.name and msg["device"] == "test"
        assert 0.0 <= msg["probability"] <= 1.0
        assert msg["probability"] == expected["probability"]
        assert msg["model"] == {"name": f"{run['arch']}-untrained", "version": "0.0.1", "sha256": card.tflite_sha256}
        assert msg["priority"] == card.thresholds.priority(msg["probability"])
        assert sub.where(lambda m: m.topic == f"pneumoflag/test/flags/{msg['priority']}")
        assert sub.errors() == []
        assert d.terminate() == 0
    finally:
        sub.stop()


def test_the_transfer_architectures_refuse_what_their_applications_cannot_take(tmp_path, capsys):
    out = tmp_path / "m.keras"
    assert run_cli("train", "--arch", "vgg19", "--channels", "1", "--data", MINI, "--out", out, "--epochs", "0") == 2
    assert "--arch vgg19 takes 3 channels" in capsys.readouterr().err
    assert run_cli("train", "--arch", "inception-resnet-v2", "--size", "64", "--data", MINI, "--out", out,
                   "--epochs", "0") == 2
    assert "needs --size 75 or more" in capsys.readouterr().err
    assert run_cli("train", "--data", MINI, "--out", out, "--epochs", "-1") == 2
    assert "--epochs must be 0 or more" in capsys.readouterr().err
    assert not out.exists()
