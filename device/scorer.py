"""Score preprocessed pixels with the int8 TFLite model on the Edge TPU or the CPU."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .card import OUTPUT_KINDS, CardError, ModelCard, card_path_for
from .preprocess import PreprocessSpec
from .runtime import Runtime, RuntimeUnavailable, find_runtime, load_edgetpu_delegate, make_interpreter

from .vocab import ACCELERATORS

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """How the model was loaded, for logs, stats and the self-test."""

    accelerator: str  # "edgetpu" or "cpu"
    model_file: Path
    runtime: str
    edgetpu_reason: Optional[str]  # why the Edge TPU is not used, when it is not


class Scorer:
    """Wraps one interpreter: uint8 pixels in, probability of pneumonia out."""

    def __init__(self, interpreter, spec: PreprocessSpec, report: LoadReport, output_kind: str = "probability"):
        self.interp = interpreter
        self.spec = spec
        self.report = report
        if output_kind not in OUTPUT_KINDS:
            raise CardError(f"output kind must be one of {OUTPUT_KINDS}, not {output_kind!r}")
        self.output_kind = output_kind
        inp = interpreter.get_input_details()
        out = interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise CardError(f"model must have one input and one output, has {len(inp)} and {len(out)}")
        self._in, self._out = inp[0], out[0]
        self.input_shape = tuple(int(v) for v in self._in["shape"])
        self.input_dtype = np.dtype(self._in["dtype"]).name
        if tuple(self.input_shape[1:]) != spec.shape:
            raise CardError(
                f"model takes {list(self.input_shape[1:])} but preprocessing makes {list(spec.shape)}"
            )
        self._in_fn = self._make_input_fn()
        self._burst = None  # add_burst_interpreter
        scale, zp = self._out.get("quantization", (0.0, 0))
        self._out_scale, self._out_zp = float(scale), int(zp)

    def _make_input_fn(self):
        dtype = np.dtype(self._in["dtype"])
        scale, zp = self._in.get("quantization", (0.0, 0))
        shape = self.input_shape
        if dtype == np.float32:
            s = np.float32(self.spec.scale)
            return lambda px: (px.astype(np.float32) * s).reshape(shape)
        if dtype not in (np.uint8, np.int8):
            raise CardError(f"unsupported model input dtype {dtype}")
        if dtype == np.uint8 and zp == 0 and abs(scale - self.spec.scale) <= 1e-6 * self.spec.scale:
            return lambda px: px.reshape(shape)  # the model eats raw pixels
        info = np.iinfo(dtype)
        ratio = self.spec.scale / scale

        def requantize(px: np.ndarray) -> np.ndarray:
            q = np.round(px.astype(np.float32) * ratio + zp)
            return np.clip(q, info.min, info.max).astype(dtype).reshape(shape)

        return requantize

    def input_tensor(self, pixels: np.ndarray) -> np.ndarray:
        """Exactly what ``set_tensor`` receives for preprocessed ``pixels`` (batch of one, model dtype)."""
        return self._in_fn(pixels)

    def add_burst_interpreter(self, interpreter) -> None:
        """A second interpreter of the same model (fewer threads) for :meth:`score` with ``busy``: in a burst
        the decoder worker needs the other core, and threads that spin waiting for it cost more than they give."""
        self._burst = interpreter

    def raw(self, pixels: np.ndarray, busy: bool = False) -> tuple[int | float, float]:
        """The output tensor's value as stored (a quantized level) and dequantized."""
        interp = self._burst if busy and self._burst is not None else self.interp
        interp.set_tensor(self._in["index"], self._in_fn(pixels))
        interp.invoke()
        q = interp.get_tensor(self._out["index"]).reshape(-1)[0]
        if self._out_scale:  # widen before subtracting the zero point
            return int(q), float((int(q) - self._out_zp) * self._out_scale)
        return float(q), float(q)

    def score(self, pixels: np.ndarray, busy: bool = False) -> float:
        """Probability of pneumonia for one preprocessed image (H, W, C) uint8; ``busy``: more files wait
        (the burst interpreter, when there is one: the same model, the same result).

        A logit model's output is mapped to a probability here, in float, so
        the int8 graph never quantizes a saturating sigmoid.
        """
        value = self.raw(pixels, busy)[1]
        if self.output_kind == "logit":
            return 1.0 / (1.0 + math.exp(-min(max(value, -500.0), 500.0)))
        return value

    @property
    def io_details(self) -> tuple[dict, dict]:
        """The interpreter's input and output details (shape, dtype, quantization) for the model card."""
        return self._in, self._out


def load_scorer(
    model_path: Path | str,
    accelerator: str = "auto",
    num_threads: Optional[int] = None,
    card: Optional[ModelCard] = None,
    runtime: Optional[Runtime] = None,
    verify: bool = True,
    burst_threads: Optional[int] = None,
) -> tuple[Scorer, ModelCard]:
    """Load a model with its card, on the Edge TPU when asked/available, else the CPU.

    ``auto`` uses the Edge TPU only when both the delegate and ``NAME_edgetpu.tflite``
    exist; ``edgetpu`` fails when either is missing; ``cpu`` never tries.
    Refuses a model whose sha256 or input does not match its card. ``burst_threads`` (on the CPU, when it
    differs from ``num_threads``): a second interpreter for files scored while others wait.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, not {accelerator!r}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise CardError(f"model file {model_path} not found")
    card = card or ModelCard.load(card_path_for(model_path))
    rt = runtime or find_runtime()

    chosen, delegates, reason = model_path, None, None
    if accelerator != "cpu":
        et_path = model_path.with_name(card.edgetpu_file) if card.edgetpu_file else None
        if et_path is None or not et_path.is_file():
            reason = f"no Edge TPU model ({model_path.stem}_edgetpu.tflite) beside {model_path.name}"
        else:
            try:
                delegates = [load_edgetpu_delegate(rt)]
                chosen = et_path
            except RuntimeUnavailable as exc:
                reason = str(exc)
        if accelerator == "edgetpu" and delegates is None:
            raise RuntimeUnavailable(f"--accelerator edgetpu: {reason}")
    if verify:
        card.verify_file(chosen)
    interp = make_interpreter(chosen, rt, num_threads=num_threads, delegates=delegates)
    report = LoadReport("edgetpu" if delegates else "cpu", chosen, f"{rt.name} {rt.version}", reason)
    scorer = Scorer(interp, card.preprocessing, report, card.output_kind)
    card.verify_io(scorer.input_shape, scorer.input_dtype)
    if burst_threads and not delegates and burst_threads != num_threads:
        scorer.add_burst_interpreter(make_interpreter(chosen, rt, num_threads=burst_threads))
    if reason and accelerator == "auto":
        log.info("Edge TPU not used: %s", reason)
    log.info("model %s %s on %s (%s)", card.name, card.version, report.accelerator, report.runtime)
    return scorer, card
