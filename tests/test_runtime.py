"""The one loader for LiteRT and tflite-runtime."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mqtt_helpers import SHIPPED_MODEL
from pneumoflag.device.runtime import RuntimeUnavailable, find_runtime, make_interpreter


def test_litert_is_preferred_and_runs_the_model():
    rt = find_runtime()
    assert rt.name == "ai-edge-litert"
    interp = make_interpreter(SHIPPED_MODEL, rt, num_threads=2)
    assert interp.get_input_details()[0]["dtype"] == np.uint8


def test_unknown_runtime_name():
    with pytest.raises(ValueError, match="unknown runtime"):
        find_runtime("onnx")


def test_not_a_model_is_a_clear_error(tmp_path):
    f = tmp_path / "x.tflite"
    f.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(RuntimeUnavailable, match="x.tflite"):
        make_interpreter(f)


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is None,
                    reason="tflite-runtime has wheels only for CPython <= 3.11 (installed by the test extra there)")
def test_tflite_runtime_fallback_is_loaded_and_explains_numpy_2():
    rt = find_runtime("tflite-runtime")
    assert rt.name == "tflite-runtime"
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(RuntimeUnavailable, match="numpy"):
            make_interpreter(SHIPPED_MODEL, rt)
    else:
        assert make_interpreter(SHIPPED_MODEL, rt).get_input_details()[0]["dtype"] == np.uint8
