"""Hardware-in-loop: the sample set through the real runtime on each accelerator present.

Run alone with `pytest -m hil`. The CPU part runs everywhere (CI included) and must
equal the reference exactly; the Edge TPU part runs where libedgetpu and a Coral
are present, and is skipped with the reason otherwise (pytest reports skips
separately: a skip is never a pass).
"""
from __future__ import annotations

import json

import pytest

from mqtt_helpers import SHIPPED_MODEL
from pneumoflag.device.config import load_config
from pneumoflag.device.pipeline import Pipeline, score_file
from pneumoflag.device.runtime import RuntimeUnavailable
from pneumoflag.device.scorer import load_scorer
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = SAMPLES_DIR
REFERENCE = json.loads((SAMPLES / "reference.json").read_text())

pytestmark = pytest.mark.hil


def _pipeline(accelerator: str) -> Pipeline:
    try:
        scorer, card = load_scorer(SHIPPED_MODEL, accelerator)
    except RuntimeUnavailable as exc:
        pytest.skip(f"{accelerator}: {exc}")
    cfg = load_config(env={}, overrides={"model.path": str(SHIPPED_MODEL), "model.accelerator": accelerator})
    return Pipeline(cfg, scorer, card)


def test_reference_belongs_to_the_shipped_model():
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    assert REFERENCE["model"]["sha256"] == card["tflite"]["sha256"]
    assert len(REFERENCE["samples"]) >= 6
    assert {r["label"] for r in REFERENCE["samples"]} == {"NORMAL", "PNEUMONIA"}


@pytest.mark.parametrize("row", REFERENCE["samples"], ids=lambda r: r["file"])
def test_cpu_int8_equals_reference_exactly(row):
    pipe = _pipeline("cpu")
    assert pipe.scorer.report.accelerator == "cpu"
    msg = score_file(pipe, SAMPLES / row["file"])
    assert msg.probability == row["probability"]
    assert msg.priority == row["priority"]


def test_edgetpu_agrees_on_every_priority():
    pipe = _pipeline("edgetpu")  # skips, with the reason, where there is no Coral
    assert pipe.scorer.report.accelerator == "edgetpu"
    for row in REFERENCE["samples"]:
        msg = score_file(pipe, SAMPLES / row["file"])
        assert msg.priority == row["priority"], row["file"]
        assert abs(msg.probability - row["probability"]) <= 0.05, row["file"]
