"""``pneumoflag bench``: the performance figures, measured on this machine (not a test).

1. per-stage latency (decode, preprocess, infer, publish) on full-resolution images;
2. end-to-end latency, file close -> flag delivered by the broker, through the real
   daemon process (delivery to a subscriber comes after the broker's PUBACK, so this
   bounds "close to acknowledgement" from above);
3. throughput over a burst of N files; the daemon's peak RSS; its idle CPU;
4. the source notebooks' path (full decode, resize, Keras float ``model.predict``
   per image) on the same images, for the speed-up ratio.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .card import ModelCard
from .config import load_config
from .contract import Topics
from .decoder import decode_bytes
from .preprocess import decode, prepare
from .scorer import load_scorer
from .selftest import sample_files
from .stats import STEPS

log = logging.getLogger(__name__)

TARGETS = {"e2e_p50_ms": 50.0, "burst_images_per_s": 40.0, "peak_rss_mb": 150.0, "idle_cpu_percent": 1.0,
           "speedup_vs_source": 10.0, "burst_x_compute": 1.3, "e2e_over_compute": 1.6}


def machine_ratios(compute_p50_ms: float, daemon: dict) -> dict:
    """How close the daemon comes to the machine, in one run: the burst rate times the compute p50
    (read + decode + preprocess + infer; above 1 means more than one core's worth of compute), and the
    end-to-end p50 over the compute p50 (what the journal, the hand-offs and MQTT add)."""
    return {"burst_x_compute": round(daemon["burst"]["images_per_s"] * compute_p50_ms / 1000.0, 2),
            "e2e_over_compute": round(daemon["e2e_ms"]["p50"] / compute_p50_ms, 2),
            "compute_p50_ms": compute_p50_ms}


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def _summary(values) -> dict:
    return {"p50": round(_pct(values, 50), 2), "p95": round(_pct(values, 95), 2), "n": len(values)}


@dataclass
class BenchConfig:
    images: Path
    model: Path
    broker: str = "auto"  # auto: a private mosquitto if installed, else the embedded broker
    burst: int = 500
    repeats: int = 10
    e2e_rounds: int = 5
    idle_seconds: float = 10.0
    keras: Optional[Path] = None
    source: bool = True
    explain: bool = True  # heat-map cost, and the flags' end-to-end latency with maps on
    stages_only: bool = False  # per-stage latency only: no daemon, no broker (the model study uses it)


# --------------------------------------------------------------------------- brokers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _BenchBroker:
    def __init__(self, spec: str, workdir: Path):
        self.proc = None
        self.embedded = None
        if spec not in ("auto", "embedded"):
            self.address, self.kind = spec, f"external broker {spec}"
            return
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        if spec == "auto" and exe:
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                            + ("user root\n" if os.geteuid() == 0 else ""))
            self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            self.kind = "mosquitto (private instance)"
        else:
            from .broker import EmbeddedBroker

            self.embedded = EmbeddedBroker("127.0.0.1", port)
            self.embedded.start()
            self.kind = "embedded amqtt broker"

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
        if self.embedded:
            self.embedded.stop()


class _Collector:
    """Subscriber that timestamps each flag's arrival by file name, and keeps the last stats message."""

    def __init__(self, broker: str, topic: str, stats_topic: Optional[str] = None):
        import paho.mqtt.client as mqtt

        host, port = broker.rsplit(":", 1)
        self.arrivals: dict[str, float] = {}
        self.stats: Optional[dict] = None
        self.stats_at = 0.0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")

        def on_connect(c, u, f, rc, p=None):
            c.subscribe([(topic, 1)] + ([(stats_topic, 0)] if stats_topic else []))

        def on_subscribe(c, u, mid, rcs, p=None):
            self.ready.set()

        def on_message(c, u, m):
            t = time.monotonic()
            if m.topic == stats_topic:
                with self.lock:
                    self.stats, self.stats_at = json.loads(m.payload), t
                return
            try:
                name = json.loads(m.payload)["file"]
            except (ValueError, KeyError):
                return
            with self.lock:
                self.arrivals.setdefault(name, t)

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError(f"benchmark subscriber could not subscribe at {broker}")

    def wait(self, names, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(n in self.arrivals for n in names):
                    return True
            time.sleep(0.002)
        return False

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _variant(data: bytes, i: int) -> bytes:
    """Same picture, distinct bytes (a trailer after the JPEG end marker), so no file is a duplicate."""
    return data + b"\0pneumoflag-bench-" + str(i).encode()


def _proc_stat(pid: int) -> tuple[float, float, float]:
    """(cpu seconds, peak RSS MB) of the daemon and its decoder worker (its children) together, from /proc, and
    the children's cpu seconds alone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    cpu, hwm = _one_proc_stat(pid)
    worker = 0.0
    for child in children:
        try:
            c, h = _one_proc_stat(child)
        except OSError:  # ended meanwhile
            continue
        cpu, hwm, worker = cpu + c, hwm + h, worker + c
    return cpu, hwm, worker


def _burst_cpu(before: tuple[float, float, float], after: tuple[float, float, float], files: int) -> dict:
    """CPU per image over a burst (``_proc_stat`` before and after) and the rates it allows at most: the
    daemon and its worker on every core, and the worker, one process, on one."""
    cpu_ms = (after[0] - before[0]) / files * 1000.0
    worker_ms = (after[2] - before[2]) / files * 1000.0
    return {"cpu_ms_per_image": round(cpu_ms, 2),
            "cpu_ceiling_per_s": round((os.cpu_count() or 1) * 1000.0 / cpu_ms, 1) if cpu_ms > 0 else None,
            "worker_cpu_ms_per_image": round(worker_ms, 2),
            "worker_ceiling_per_s": round(1000.0 / worker_ms, 1) if worker_ms > 0 else None}


def _one_proc_stat(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
    return cpu, hwm


# --------------------------------------------------------------------------- parts

def bench_stages(cfg: BenchConfig, files: list[Path], broker: Optional[str]) -> dict:
    """Per-stage latency; ``broker=None`` leaves out the publish stage."""
    import paho.mqtt.client as mqtt
    from PIL import Image

    app = load_config(env={}, overrides={"model.path": str(cfg.model), "model.accelerator": "cpu"})
    scorer, card = load_scorer(cfg.model, "cpu", app.model.threads)
    spec = card.preprocessing
    stages: dict[str, list[float]] = {"read": [], "decode": [], "preprocess": [], "infer": []}
    pixels_mp = []
    client = None
    if broker is not None:
        stages["publish"] = []
        host, port = broker.rsplit(":", 1)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
        client.connect(host, int(port))
        client.loop_start()
    try:
        for f in files:
            with Image.open(f) as im:
                pixels_mp.append(im.size[0] * im.size[1] / 1e6)
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                data = f.read_bytes()
                t1 = time.perf_counter()
                gray = decode(data, spec, name=f.name)
                t2 = time.perf_counter()
                px = prepare(gray, spec)
                t3 = time.perf_counter()
                scorer.score(px)
                t4 = time.perf_counter()
                for k, a, b in (("read", t0, t1), ("decode", t1, t2), ("preprocess", t2, t3), ("infer", t3, t4)):
                    stages[k].append((b - a) * 1000.0)
                if client is not None:
                    client.publish("pneumoflag/bench/probe", b"x" * 600, qos=1).wait_for_publish(5)
                    stages["publish"].append((time.perf_counter() - t4) * 1000.0)
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
    # the model after 50 ms of an idle machine, as a single drop meets it (the loop above runs it back to back)
    cold = []
    for f in files:
        px = prepare(decode(f.read_bytes(), spec, name=f.name), spec)
        for _ in range(2):
            time.sleep(0.05)
            t0 = time.perf_counter()
            scorer.score(px)
            cold.append((time.perf_counter() - t0) * 1000.0)
    stages["infer after 50ms idle"] = cold
    per_image = [sum(v) for v in zip(*(stages[k] for k in ("read", "decode", "preprocess", "infer")), strict=True)]
    heat = None
    if cfg.explain:
        from .explain import bench_explain

        heat = bench_explain(scorer, files, repeats=max(1, min(5, cfg.repeats)))
    return {"stages_ms": {k: _summary(v) for k, v in stages.items()}, "score_ms": _summary(per_image),
            "daemon_steps_ms": bench_daemon_steps(app, scorer, card, files, cfg.repeats),
            "heatmap": heat,
            "images": len(files), "megapixels": {"min": round(min(pixels_mp), 2), "max": round(max(pixels_mp), 2)},
            "model": f"{card.name} {card.version}", "runtime": scorer.report.runtime}


def bench_daemon_steps(app, scorer, card: ModelCard, files: list[Path], repeats: int) -> dict:
    """Two of the daemon's own steps, alone: the worker's decode (the plausibility gate and the DICOM path
    included, as ``decoder.decode_bytes`` runs it), one result's journal commit with its outbox message
    (``Store.record`` as the daemon makes it, without an fsync) and the publisher's fsync that makes it durable
    before it is sent (``Store.sync``), in a temporary folder, where the burst run keeps the daemon's state too."""
    from .pipeline import Pipeline
    from .reader import file_sig
    from .store import FlagRecord, Store

    settings = Pipeline(app, scorer, card).settings
    decode_ms, commit_ms, sync_ms = [], [], []
    for f in files:
        data = f.read_bytes()
        for _ in range(repeats):
            decode_ms.append(decode_bytes(data, f.name, settings).decode_ms)
    with tempfile.TemporaryDirectory(prefix="pneumoflag-bench-store-") as tmp:
        store = Store(Path(tmp))
        sig = file_sig(files[0])
        try:
            for i in range(max(50, repeats * 5)):
                payload = json.dumps({"file": f"f{i}.jpeg", "padding": "x" * 650}).encode()  # a flag's size
                t0 = time.perf_counter()
                store.record(f"f{i}.jpeg", f"{i:064x}", sig, "routine", event_id=f"e{i}",
                             message=("pneumoflag/bench/flag/routine", payload, 1),
                             flag=FlagRecord(f"e{i}", "routine", 0.1, payload, time.time(), time.time(), time.time()),
                             durable=False)
                t1 = time.perf_counter()
                store.sync()
                commit_ms.append((t1 - t0) * 1000.0)
                sync_ms.append((time.perf_counter() - t1) * 1000.0)
        finally:
            store.close()
    return {"decode_and_gate": _summary(decode_ms), "journal_commit": _summary(commit_ms),
            "journal_fsync": _summary(sync_ms)}


def bench_daemon(cfg: BenchConfig, files: list[Path], broker: str, work: Path, explain: bool = False) -> dict:
    """End to end through the real daemon; with ``explain`` (heat maps on) the end-to-end latency only."""
    watch, state, staging = work / "export", work / "state", work / "staging"
    for d in (watch, state, staging):
        d.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PNEUMOFLAG_MQTT_STATS_INTERVAL": "3600",
           "PNEUMOFLAG_EXPLAIN_ENABLED": "true" if explain else "false"}
    env.pop("PNEUMOFLAG_CONFIG", None)
    cmd = [sys.executable, "-m", "pneumoflag.device.cli", "-q", "watch", str(watch), "--broker", broker,
           "--state-dir", str(state), "--model", str(cfg.model), "--device-id", "bench", "--accelerator", "cpu"]
    logf = open(work / "daemon.log", "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    topics = Topics("pneumoflag", "bench")
    col = _Collector(broker, topics.filter("flag"), topics.stats())
    try:
        time.sleep(3.0)  # imports, model load, connect
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {(work / 'daemon.log').read_text()[-500:]}")
        blobs = [f.read_bytes() for f in files]
        # end to end, one image at a time: file close -> flag delivered
        e2e, n = [], 0
        for r in range(cfg.e2e_rounds):
            for i, data in enumerate(blobs):
                name = f"e2e-{r}-{i}{files[i].suffix}"
                with open(watch / name, "wb") as fh:
                    fh.write(_variant(data, n))
                t_close = time.monotonic()
                n += 1
                if not col.wait([name], 30):
                    raise RuntimeError(f"no flag for {name} within 30 s")
                e2e.append((col.arrivals[name] - t_close) * 1000.0)
                time.sleep(0.2 if explain else 0.05)  # with maps on, the map of the last one is being made
        if explain:
            return {"e2e_ms": _summary(e2e), "explain": True}
        # burst: N files renamed in as fast as possible
        names = []
        for k in range(cfg.burst):
            i = k % len(blobs)
            name = f"burst-{k:04d}{files[i].suffix}"
            (staging / name).write_bytes(_variant(blobs[i], 10_000 + k))
            names.append(name)
        before = _proc_stat(proc.pid)
        t0 = time.monotonic()
        for name in names:
            os.rename(staging / name, watch / name)
        t_moved = time.monotonic()
        if not col.wait(names, 300):
            raise RuntimeError(f"burst: {sum(n in col.arrivals for n in names)} of {len(names)} flags in 300 s")
        t_last = max(col.arrivals[n] for n in names)
        after = _proc_stat(proc.pid)
        time.sleep(2.0)
        cpu0, _, _ = _proc_stat(proc.pid)
        time.sleep(cfg.idle_seconds)
        cpu1, _, _ = _proc_stat(proc.pid)
        steps = _final_steps(proc, col)
        return {
            "e2e_ms": _summary(e2e),
            "steps_ms": steps,
            "burst": {"files": cfg.burst, "seconds": round(t_last - t0, 2),
                      "images_per_s": round(cfg.burst / (t_last - t0), 1),
                      "rename_seconds": round(t_moved - t0, 3), **_burst_cpu(before, after, cfg.burst)},
            "peak_rss_mb": round(after[1], 1),
            "idle_cpu_percent": round((cpu1 - cpu0) / cfg.idle_seconds * 100.0, 2),
            "idle_seconds": cfg.idle_seconds,
        }
    finally:
        col.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        logf.close()


def _final_steps(proc: subprocess.Popen, col: _Collector) -> Optional[dict]:
    """The daemon's own per-step times (``stats`` ``steps_ms``) from the stats message it publishes as it
    stops: "alone" are the single drops (a file with nothing else in hand), "busy" the burst's files."""
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        return None  # the finally block kills it
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with col.lock:
            if col.stats is not None and col.stats_at >= t_term:
                return col.stats.get("steps_ms")
        time.sleep(0.05)
    return None


def _source_keras_paths(cfg: BenchConfig) -> list[Path]:
    """--keras, else the float members the card names beside the model, else MODEL.keras."""
    if cfg.keras:
        return [cfg.keras]
    try:
        paths = ModelCard.load(cfg.model.with_suffix(".json")).source_model_paths(cfg.model)
    except Exception:  # noqa: BLE001 - no or unreadable card: fall back to the conventional name
        paths = []
    return paths if paths and all(p.is_file() for p in paths) else [cfg.model.with_suffix(".keras")]


def bench_source_path(cfg: BenchConfig, files: list[Path], our_score_p50: float) -> dict:
    """The source notebooks' way: full decode, resize, Keras float predict per image (each member of an ensemble)."""
    keras_paths = _source_keras_paths(cfg)
    missing = [p for p in keras_paths if not p.exists()]
    if missing:
        return {"skipped": f"no float Keras model at {missing[0]} (give --keras)"}
    try:
        import keras
    except ImportError:
        return {"skipped": "TensorFlow/Keras not installed (pip install 'pneumoflag[convert]')"}
    from PIL import Image

    models = [keras.models.load_model(p, compile=False) for p in keras_paths]
    shapes = [tuple(int(d) for d in model.inputs[0].shape[1:]) for model in models]
    times = []
    for model, (h, w, c) in zip(models, shapes, strict=True):
        model.predict(np.zeros((1, h, w, c), np.float32), verbose=0)  # warm-up
    for f in files:
        for _ in range(max(1, cfg.repeats // 2)):
            t0 = time.perf_counter()
            img = Image.open(f)
            img.load()  # full-resolution decode
            for model, (h, w, c) in zip(models, shapes, strict=True):
                x = np.asarray(img.convert("L" if c == 1 else "RGB").resize((w, h)), np.float32)[None] / 255.0
                model.predict(x[..., None] if c == 1 else x, verbose=0)
            times.append((time.perf_counter() - t0) * 1000.0)
    s = _summary(times)
    return {"per_image_ms": s, "keras_model": ", ".join(str(p) for p in keras_paths),
            "speedup": round(s["p50"] / our_score_p50, 1) if our_score_p50 > 0 else None}


def run_bench(cfg: BenchConfig) -> dict:
    files = [p for p in sample_files(Path(cfg.images)) if p.suffix.lower() != ".dcm"]
    if not files:
        raise FileNotFoundError(f"no JPEG/PNG images under {cfg.images}")
    if cfg.stages_only:
        res = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "broker": None}
        res["stages"] = bench_stages(cfg, files, None)
        return res
    with tempfile.TemporaryDirectory(prefix="pneumoflag-bench-") as tmp:
        work = Path(tmp)
        broker = _BenchBroker(cfg.broker, work)
        try:
            res = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "broker": broker.kind}
            log.info("stages on %d images x %d...", len(files), cfg.repeats)
            res["stages"] = bench_stages(cfg, files, broker.address)
            log.info("daemon: %d single drops, burst of %d, %g s idle...",
                     cfg.e2e_rounds * len(files), cfg.burst, cfg.idle_seconds)
            res["daemon"] = bench_daemon(cfg, files, broker.address, work)
            res["ratios"] = machine_ratios(res["stages"]["score_ms"]["p50"], res["daemon"])
            if cfg.explain:
                log.info("daemon with heat maps on: %d single drops...", cfg.e2e_rounds * len(files))
                res["daemon_explain"] = bench_daemon(cfg, files, broker.address, work / "explain", explain=True)
        finally:
            broker.stop()
    if cfg.source:
        log.info("source notebook path (Keras float)...")
        res["source_path"] = bench_source_path(cfg, files, res["stages"]["score_ms"]["p50"])
    return res


def _timeline(d: dict) -> list[str]:
    """One file's way through the daemon, step by step (its ``stats``), and what the steps leave of the
    end-to-end time: the watcher's event, thread wake-ups and the broker's delivery."""
    steps = d.get("steps_ms")
    if not steps:
        return ["daemon steps: no stats message from the stopping daemon"]
    out = [f"{'daemon step (its stats)':<26}{'alone p50':>10}{'p95':>8}{'burst p50':>11}"]
    total = 0.0
    for k in STEPS:
        a, b = steps["alone"].get(k) or {}, steps["busy"].get(k) or {}
        if a.get("p50") is None:
            continue
        total += a["p50"]
        busy = f"{b['p50']:>11.2f}" if b.get("p50") is not None else f"{'-':>11}"
        out.append(f"{'  ' + k:<26}{a['p50']:>10.2f}{a['p95']:>8.2f}{busy}")
    out.append(f"{'  sum of the steps':<26}{total:>10.2f}")
    out.append(f"{'  the rest (events, wake-ups, broker)':<26}{d['e2e_ms']['p50'] - total:>6.2f}")
    return out + [""]


def format_report(r: dict) -> str:
    s, d = r["stages"], r.get("daemon")
    src = r.get("source_path", {})
    lines = [
        f"pneumoflag bench — {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, "
        f"{s['runtime']}, model {s['model']}, broker: {r['broker']}",
        f"images: {s['images']} full-resolution ({s['megapixels']['min']}-{s['megapixels']['max']} MP)",
        "",
        f"{'stage':<22}{'p50 ms':>10}{'p95 ms':>10}",
    ]
    for k, v in s["stages_ms"].items():
        lines.append(f"{k:<22}{v['p50']:>10.2f}{v['p95']:>10.2f}")
    lines.append(f"{'read+decode+prep+infer':<22}{s['score_ms']['p50']:>10.2f}{s['score_ms']['p95']:>10.2f}")
    steps = s.get("daemon_steps_ms") or {}
    for key, name in (("decode_and_gate", "daemon: decode + gate"), ("journal_commit", "daemon: journal commit"),
                      ("journal_fsync", "publisher: log fsync")):
        if key in steps:
            lines.append(f"{name:<22}{steps[key]['p50']:>10.2f}{steps[key]['p95']:>10.2f}")
    if s.get("heatmap"):
        h = s["heatmap"]
        lines.append(f"{'heat map (occlusion)':<22}{h['p50_ms']:>10.2f}{h['p95_ms']:>10.2f}   "
                     f"{h['invokes_per_map']} runs of the model; overlay +{h['overlay_p50_ms']:.0f} ms")
    if d is None:
        return "\n".join(lines)
    lines += [""] + _timeline(d) + [f"{'figure':<40}{'measured':>12}{'target':>12}"]

    def row(name, value, target, unit, lower_is_better=True):
        ok = value <= target if lower_is_better else value >= target
        lines.append(f"{name:<40}{value:>10.1f} {unit:<3}{('<= ' if lower_is_better else '>= ') + f'{target:g}':>9}"
                     f"  {'ok' if ok else 'MISSED'}")

    row("end-to-end p50 (file close -> delivered)", d["e2e_ms"]["p50"], TARGETS["e2e_p50_ms"], "ms")
    lines.append(f"{'end-to-end p95':<40}{d['e2e_ms']['p95']:>10.1f} ms")
    if r.get("daemon_explain"):
        x = r["daemon_explain"]["e2e_ms"]
        lines.append(f"{'end-to-end p50 / p95 with heat maps on':<40}{x['p50']:>10.1f} / {x['p95']:.1f} ms")
    row(f"burst of {d['burst']['files']} files", d["burst"]["images_per_s"], TARGETS["burst_images_per_s"], "/s",
        lower_is_better=False)
    b = d["burst"]
    if b.get("cpu_ms_per_image"):
        lines.append(f"{'  daemon + decoder CPU per image':<40}{b['cpu_ms_per_image']:>10.2f} ms  "
                     f"(the cores allow {b['cpu_ceiling_per_s']:g}/s at most)")
    if b.get("worker_cpu_ms_per_image"):
        lines.append(f"{'  of which the decoder worker':<40}{b['worker_cpu_ms_per_image']:>10.2f} ms  "
                     f"(one process: {b['worker_ceiling_per_s']:g}/s at most)")
    q = r["ratios"]
    row("burst x compute p50 (cores' worth)", q["burst_x_compute"], TARGETS["burst_x_compute"], "x",
        lower_is_better=False)
    row("end-to-end p50 / compute p50", q["e2e_over_compute"], TARGETS["e2e_over_compute"], "x")
    row("daemon + decoder peak RSS", d["peak_rss_mb"], TARGETS["peak_rss_mb"], "MB")
    row(f"daemon idle CPU over {d['idle_seconds']:g} s", d["idle_cpu_percent"], TARGETS["idle_cpu_percent"], "%")
    if "speedup" in src:
        lines.append(f"{'source path (Keras float, full decode)':<40}{src['per_image_ms']['p50']:>10.1f} ms")
        row("speed-up vs the source path", src["speedup"], TARGETS["speedup_vs_source"], "x", lower_is_better=False)
    elif src:
        lines.append(f"source path: skipped ({src.get('skipped')})")
    return "\n".join(lines)
