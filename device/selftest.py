"""``pneumoflag selftest``: prove on site, on this very hardware, that the appliance is fit to go live.

Checks the environment (runtime, Edge TPU delegate, model/card integrity,
state and export folders), scores the bundled sample radiographs and compares
them with the reference probabilities made by the shipped model on the CPU,
measures latency, and optionally round-trips one message through the broker.
``--pacs`` checks the DICOM network path instead (:meth:`SelfTest.run_pacs`).
Prints a PASS/FAIL table; any FAIL gives a non-zero exit.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .card import CardError, sha256_file
from .config import ANY_CALLER, Config, parse_host_port
from .pipeline import Pipeline, score_file
from .preprocess import ImageDecodeError
from .samples import SAMPLES_DIR
from .runtime import RuntimeUnavailable, find_runtime, load_edgetpu_delegate
from .scorer import Scorer, load_scorer

#: one uint8 output step of the int8 model; two CPU runtimes may differ by this much
QUANT_STEP = 1.0 / 256.0
EDGETPU_TOLERANCE = 0.05
REFERENCE_NAME = "reference.json"


def default_samples_dir() -> Path:
    """The bundled sample set (package data of the device, so an installed appliance has it too)."""
    return SAMPLES_DIR


def _prob_distance(a: float, b: float) -> float:
    return abs(a - b)


def _logit_distance(a: float, b: float) -> float:
    def logit(p: float) -> float:
        p = min(max(p, 1e-12), 1 - 1e-12)
        return math.log(p / (1 - p))
    return abs(logit(a) - logit(b))


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP | INFO
    detail: str


def sample_files(samples: Path) -> list[Path]:
    return sorted(p for p in samples.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm"))


def write_reference(pipeline: Pipeline, samples: Path, out: Path) -> dict:
    """Score the samples on this runtime and store them as the reference (CPU, shipped model)."""
    rows = []
    for f in sample_files(samples):
        msg = score_file(pipeline, f)
        rows.append({"file": f.relative_to(samples).as_posix(), "label": f.parent.name,
                     "probability": msg.probability, "priority": msg.priority})
    ref = {
        "model": {"name": pipeline.card.name, "version": pipeline.card.version,
                  "sha256": pipeline.card.tflite_sha256},
        "runtime": pipeline.scorer.report.runtime,
        "accelerator": pipeline.scorer.report.accelerator,
        "thresholds": pipeline.card.thresholds.as_dict(),
        "regenerate": "pneumoflag selftest --accelerator cpu --write-reference " + out.as_posix(),
        "samples": rows,
    }
    out.write_text(json.dumps(ref, indent=2) + "\n")
    return ref


class SelfTest:
    def __init__(self, cfg: Config, samples: Path, reference: Path, repeats: int = 20,
                 broker: Optional[str] = None, max_latency_ms: float = 100.0):
        self.cfg = cfg
        self.samples = samples
        self.reference = reference
        self.repeats = repeats
        self.broker = broker
        self.max_latency_ms = max_latency_ms
        self.checks: list[Check] = []
        self.scorer: Optional[Scorer] = None
        self.pipeline: Optional[Pipeline] = None

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def passed(self) -> bool:
        return not any(c.status == "FAIL" for c in self.checks)

    # ------------------------------------------------------------------ checks
    def run(self) -> bool:
        self.check_runtime()
        self.check_delegate()
        self.check_model()
        self.check_state_dir()
        self.check_export_dir()
        if self.pipeline is not None:
            self.check_samples()
            self.check_latency()
        if self.broker:
            self.check_broker()
        return self.passed

    def run_pacs(self) -> bool:
        """The field engineer's check of the DICOM network path: every PACS destination, and the receiver."""
        self.check_pacs_destinations()
        self.check_receiver()
        return self.passed

    def check_pacs_destinations(self) -> None:
        from . import pacs

        dests = pacs.destinations(self.cfg.pacs)
        if not dests:
            self.add("PACS destinations", "SKIP", "pacs.destinations is empty")
        for dest in dests:
            r = pacs.echo(dest, self.cfg.pacs.calling_ae, self.cfg.pacs.timeout_seconds)
            self.add(f"C-ECHO {dest}", "PASS" if r.ok else "FAIL", r.message)

    def check_receiver(self) -> None:
        """The receiver's port: free to bind (the daemon is stopped), or answering C-ECHO as our AE title (it
        runs; the echo calls as the first allowed caller, which the receiver accepts)."""
        from . import pacs

        net = self.cfg.dicom_net
        name = "DICOM receiver port"
        if not net.enabled:
            self.add(name, "SKIP", "dicom_net.enabled = false")
            return
        host, port = parse_host_port(net.listen, "dicom_net.listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            self.add(name, "PASS", f"{net.listen} is free: `watch` can listen there (not running now)")
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                self.add(name, "FAIL", f"dicom_net.listen {net.listen}: cannot listen ({exc.strerror or exc})")
                return
        local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        callers = [c for c in net.allowed_callers if c != ANY_CALLER]
        dest = pacs.Destination(net.ae_title, local, port)
        r = pacs.echo(dest, callers[0] if callers else self.cfg.pacs.calling_ae, self.cfg.pacs.timeout_seconds)
        if r.ok:
            self.add(name, "PASS", f"{net.listen}: listening, {net.ae_title} answers C-ECHO")
        else:
            self.add(name, "FAIL", f"{net.listen} is taken by something that does not answer C-ECHO as "
                                   f"{net.ae_title}: {r.message}")

    def check_runtime(self) -> None:
        try:
            rt = find_runtime()
            self.add("TFLite runtime", "PASS", f"{rt.name} {rt.version}")
        except RuntimeUnavailable as exc:
            self.add("TFLite runtime", "FAIL", str(exc))

    def check_delegate(self) -> None:
        want = self.cfg.model.accelerator
        try:
            load_edgetpu_delegate()
            self.add("Edge TPU delegate", "PASS", "libedgetpu loaded")
        except RuntimeUnavailable as exc:
            status = "FAIL" if want == "edgetpu" else ("SKIP" if want == "cpu" else "INFO")
            self.add("Edge TPU delegate", status, f"not available: {exc}")

    def check_model(self) -> None:
        model = Path(self.cfg.model.path)
        try:
            self.scorer, card = load_scorer(model, self.cfg.model.accelerator, self.cfg.model.threads)
        except (CardError, RuntimeUnavailable, OSError) as exc:
            self.add("model and card", "FAIL", str(exc))
            return
        self.pipeline = Pipeline(self.cfg, self.scorer, card)
        r = self.scorer.report
        self.add("model and card", "PASS",
                 f"{card.name} {card.version}, sha256 {sha256_file(r.model_file)[:12]}… matches {card.path.name}")
        self.add("accelerator", "PASS", f"{r.accelerator} ({r.model_file.name})"
                 + (f"; Edge TPU not used: {r.edgetpu_reason}" if r.edgetpu_reason else ""))

    def check_state_dir(self) -> None:
        d = Path(self.cfg.state.dir)
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d, prefix=".selftest-"):
                pass
            self.add("state folder writable", "PASS", str(d))
        except OSError as exc:
            self.add("state folder writable", "FAIL", f"{d}: {exc.strerror or exc}")

    def check_export_dir(self) -> None:
        d = self.cfg.watch.dir
        if not d:
            self.add("export folder readable", "SKIP", "no watch.dir configured")
            return
        p = Path(d)
        if not p.is_dir():
            self.add("export folder readable", "FAIL", f"{p} does not exist or is not a folder")
        elif not os.access(p, os.R_OK | os.X_OK):
            self.add("export folder readable", "FAIL", f"{p}: permission denied for this user")
        else:
            self.add("export folder readable", "PASS", str(p))

    def _tolerance(self, ref: dict) -> tuple[Callable[[float, float], float], float, str]:
        """How to compare with the reference: (distance function, limit, the rule in words).

        Another CPU runtime may round one output level differently: 1/256 of
        probability for a sigmoid output, one quantization step of the logit for
        a logit output (near p = 0.5 that is more than 1/256 of probability).
        """
        r = self.scorer.report
        if r.accelerator == "edgetpu":
            return _prob_distance, EDGETPU_TOLERANCE, f"Edge TPU: |dp| <= {EDGETPU_TOLERANCE}"
        if r.runtime == ref.get("runtime"):
            return _prob_distance, 0.0, f"same CPU runtime as the reference ({r.runtime}): exact"
        other = f"other CPU runtime ({r.runtime} vs {ref.get('runtime')})"
        scale = float(self.scorer.io_details[1].get("quantization", (0.0, 0))[0] or 0.0)
        if self.scorer.output_kind == "logit" and scale > 0:
            return _logit_distance, scale, f"{other}: |d logit| <= one output step ({scale:.4f})"
        return _prob_distance, QUANT_STEP, f"{other}: |dp| <= 1/256"

    def check_samples(self) -> None:
        try:
            ref = json.loads(self.reference.read_text())
        except FileNotFoundError:
            self.add("samples vs reference", "FAIL", f"reference {self.reference} not found")
            return
        except ValueError as exc:
            self.add("samples vs reference", "FAIL", f"reference {self.reference} is not valid JSON ({exc})")
            return
        card = self.pipeline.card
        if ref.get("model", {}).get("sha256") != card.tflite_sha256:
            self.add("samples vs reference", "FAIL",
                     f"the reference was made with model {ref.get('model', {}).get('name')} "
                     f"{ref.get('model', {}).get('version')}, not this one ({card.name} {card.version})")
            return
        distance, tol, how = self._tolerance(ref)
        worst, bad = 0.0, []
        for row in ref.get("samples", []):
            f = self.samples / row["file"]
            try:
                msg = score_file(self.pipeline, f)
            except ImageDecodeError as exc:
                bad.append(f"{row['file']}: {exc}")
                continue
            dp = abs(msg.probability - row["probability"])
            worst = max(worst, dp)
            if msg.priority != row["priority"] or distance(msg.probability, row["probability"]) > tol + 1e-9:
                bad.append(f"{row['file']}: {msg.priority} p={msg.probability:.4f}, reference "
                           f"{row['priority']} p={row['probability']:.4f}")
        n = len(ref.get("samples", []))
        if not n:
            self.add("samples vs reference", "FAIL", f"reference {self.reference} lists no samples")
        elif bad:
            self.add("samples vs reference", "FAIL", f"{len(bad)} of {n} differ ({how}): " + "; ".join(bad[:3]))
        else:
            self.add("samples vs reference", "PASS",
                     f"{n} samples, every priority agrees, max |dp| {worst:.4f} ({how})")

    def check_latency(self) -> None:
        files = sample_files(self.samples)
        if not files:
            self.add("latency", "FAIL", f"no sample images in {self.samples}")
            return
        times = []
        for _ in range(self.repeats):
            for f in files:
                t = time.perf_counter()
                score_file(self.pipeline, f)
                times.append((time.perf_counter() - t) * 1000.0)
        p50, p95 = np.percentile(times, 50), np.percentile(times, 95)
        status = "PASS" if p50 <= self.max_latency_ms else "FAIL"
        self.add("latency (read+decode+score)", status,
                 f"p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(times)} runs (limit p50 <= {self.max_latency_ms:g} ms)")

    def check_broker(self) -> None:
        from .mqtt_client import make_client

        host, port = self.cfg.broker_host_port
        topic = self.cfg.topics.selftest()
        token = str(uuid.uuid4())
        got = threading.Event()
        state: dict = {}
        client = make_client(self.cfg, f"pneumoflag-selftest-{token[:8]}")

        def on_connect(c, u, flags, rc, props=None):
            if rc.is_failure:
                state["error"] = f"broker refused the connection: {rc}"
                got.set()
                return
            c.subscribe(topic, qos=1)

        def on_subscribe(c, u, mid, rcs, props=None):
            c.publish(topic, json.dumps({"selftest": token, "device": self.cfg.mqtt.device_id}), qos=1)
            state["t0"] = time.perf_counter()

        def on_message(c, u, m):
            if token.encode() in m.payload:
                state["rtt"] = (time.perf_counter() - state.get("t0", time.perf_counter())) * 1000.0
                got.set()

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        try:
            client.connect(host, port, keepalive=10)
        except (OSError, ValueError) as exc:
            self.add("broker round trip", "FAIL", f"cannot reach {host}:{port}: {exc}")
            return
        client.loop_start()
        try:
            ok = got.wait(10)
        finally:
            client.disconnect()
            client.loop_stop()
        if "error" in state:
            self.add("broker round trip", "FAIL", state["error"])
        elif not ok:
            self.add("broker round trip", "FAIL", f"{host}:{port}: no echo of the test message within 10 s")
        else:
            self.add("broker round trip", "PASS", f"{host}:{port} {topic}: {state['rtt']:.1f} ms")

    # ------------------------------------------------------------------ output
    def table(self) -> str:
        w = max(len(c.name) for c in self.checks)
        lines = [f"pneumoflag self-test ({self.cfg.mqtt.device_id})", ""]
        for c in self.checks:
            lines.append(f"  {c.status:<4}  {c.name:<{w}}  {c.detail}")
        n_fail = sum(c.status == "FAIL" for c in self.checks)
        n_pass = sum(c.status == "PASS" for c in self.checks)
        lines += ["", f"RESULT: {'PASS' if not n_fail else 'FAIL'} ({n_pass} passed, {n_fail} failed, "
                      f"{sum(c.status in ('SKIP', 'INFO') for c in self.checks)} not applicable)"]
        return "\n".join(lines)
