"""Does what the device scores still look like what its model was validated on? The drift monitor.

Labels arrive late or never, so the monitor compares what it can see with the card's ``drift_reference``
(``device/drift_reference.py``) over a rolling window: the last ``drift.window`` images (scored or refused by
the gate), none older than ``drift.max_age_hours``. Five checks, each ``ok``, ``watch`` or ``alarm``:

- **gate refusals**: k refused of the n images in the window against the reference's refusal rate (at least
  1%): binomial upper tail below 0.001 is watch, below 0.0001 alarm. An inverted (MONOCHROME1-style) image is
  refused by the gate's layout check before it is scored, so a surge of refusals is drift of its own;
- **flagged share**: the share of scored images at ``flag`` or above against the share the reference expects
  at the site's prevalence, with a normal-approximation binomial interval that counts both samples (window
  and reference): outside the 99.9% interval is watch, outside the 99.99% interval alarm;
- **logit distribution**: the two-sample Kolmogorov-Smirnov distance between the window's logits and the
  reference's (from its 101 quantiles); above the critical value at alpha 0.001 watch, at 0.0001 alarm;
- **input figures** (``device/drift_inputs.py``): each figure's window mean against the reference's, in
  reference standard deviations (with a floor per figure): a shift of 0.5 sd that is also significant at
  z > 3.29 is watch, 1 sd (and z > 3.89) alarm;
- **equipment**: a Manufacturer/ManufacturerModelName that the reference did not see: watch at its first
  image, alarm at its third. Compared only when the reference data had DICOM headers naming equipment.

The distribution checks need ``drift.min_images`` scored images; with fewer, and no count check in alarm or
watch, the state is ``unknown`` ("window too small to judge"). The state is the worst check's; the reason
names every check that is not ok. It is recomputed after each image (after the flag is queued: no
second model), logged once per change, published retained on ``{prefix}/{device}/drift`` at each change and
with every stats message, and saved to ``drift.json`` in the state folder (at each change and stats message,
and at a clean stop), so a restart continues the window: an alarm does not clear by restarting. It clears when
the window no longer shows the change (the images that caused it have rolled out), or when the card's reference
changes (``calibrate`` or ``adapt`` on recent labelled images: the window starts again, empty).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import DriftConfig
from .contract import DriftCheck, DriftMessage, dumps, utc_iso
from .drift_inputs import DESCRIPTORS, InputSignature, logit
from .vocab import Priority

log = logging.getLogger(__name__)

STATE_FILE = "drift.json"
#: the daemon judges the window at most this often while files come back to back (``DriftMonitor.judge``)
JUDGE_SECONDS = 1.0
STATE_SCHEMA = "pneumoflag.drift-state/1"
#: the tests' levels: rechecked after every image, over windows that overlap, so far below the usual 0.05
#: (``drift_study measure`` gives the false-alarm rate these make)
WATCH_ALPHA, ALARM_ALPHA = 0.001, 0.0001
#: two-sided normal quantiles of the flagged share's interval (99.9%, 99.99%) and the input figures' z
Z_WATCH, Z_ALARM = 3.291, 3.891
#: the Kolmogorov-Smirnov c(alpha) = sqrt(-ln(alpha / 2) / 2)
KS_WATCH, KS_ALARM = math.sqrt(-math.log(WATCH_ALPHA / 2) / 2), math.sqrt(-math.log(ALARM_ALPHA / 2) / 2)
#: the lowest refusal rate expected, whatever the reference's (0 of 312 does not make one refusal drift)
REFUSAL_FLOOR = 0.01
#: images of one new piece of equipment that make an alarm (fewer: watch)
NEW_EQUIPMENT_ALARM = 3
#: shifts of an input figure's mean, in reference standard deviations, for watch and alarm
SHIFT_WATCH, SHIFT_ALARM = 0.5, 1.0
#: the least spread taken for each figure; a figure with no spread at all in the reference is not compared
#: (the shipped reference's images are all 224 px copies: their size says nothing of a site's exports)
FIGURE_FLOOR = {"grey_mean": 2.0, "grey_sd": 2.0, "clipped_low": 0.005, "clipped_high": 0.005, "detail": 0.005,
                "log2_short_side": 0.25}
_RANK = {"ok": 0, "unknown": 0, "watch": 1, "alarm": 2}


@dataclass
class Observation:
    at: float  # epoch seconds
    logit: Optional[float]  # None: refused by the gate
    flagged: bool = False
    figures: Optional[list[float]] = None  # DESCRIPTORS' order
    equipment: Optional[str] = None


@dataclass
class Assessment:
    state: str
    reason: str
    checks: list[DriftCheck]
    images: int
    scored: int


def reference_digest(reference: dict) -> str:
    return hashlib.sha256(dumps(reference).encode()).hexdigest()[:16]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (log space; n is a window, a few hundred)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p) if p < 1 else -math.inf
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def ks_distance(values: np.ndarray, quantiles: np.ndarray) -> float:
    """sup |F_window - F_reference|, the reference CDF read from its quantiles (0%, 1%, ..., 100%)."""
    w = np.sort(values)
    n = len(w)
    levels = np.linspace(0.0, 1.0, len(quantiles))
    f_ref = np.interp(w, quantiles, levels, left=0.0, right=1.0)
    above = np.arange(1, n + 1) / n - f_ref
    below = f_ref - np.arange(0, n) / n
    return float(max(above.max(), below.max()))


def _level(watch: bool, alarm: bool) -> str:
    return "alarm" if alarm else "watch" if watch else "ok"


class DriftMonitor:
    """The rolling window and its checks; :meth:`scored` and :meth:`refused` are the daemon's two hooks."""

    def __init__(self, cfg: DriftConfig, reference: Optional[dict], device: str, model: str,
                 state_dir: Optional[Path] = None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.reference = reference
        self.device = device
        self.model = model
        self.clock = clock
        self.path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        self.window: deque[Observation] = deque(maxlen=cfg.window)
        self.on_change: Optional[Callable[[Assessment], None]] = None
        #: judge at most this often (the daemon's: :data:`JUDGE_SECONDS`); 0: after every image
        self.judge_seconds = 0.0
        self.monotonic = time.monotonic
        self._pending = False  # an image came since the last judgement
        self._next_judgement = 0.0
        self.since: float = clock()
        self.current: Assessment = Assessment("unknown", "no image yet", [], 0, 0)
        if reference is not None:
            self._q = np.asarray(reference["logit_quantiles"], dtype=np.float64)
            self._n_ref = int(reference["n"])
            self._expected = float(reference["tiers"]["expected_share"]["flagged"])
            self._refusal = max(REFUSAL_FLOOR, float(reference["gate"]["rate"]))
            self._figures = [(reference["inputs"][k]["mean"], max(reference["inputs"][k]["sd"], FIGURE_FLOOR[k]),
                              reference["inputs"][k]["sd"] > 0) for k in DESCRIPTORS]
            self._equipment = {e["name"] for e in reference["equipment"]["seen"]}
            self._load()
        loaded = self.current.state
        self.current = self.evaluate()
        if self.current.state != loaded:
            self.since = clock()

    @classmethod
    def for_daemon(cls, cfg, card) -> Optional["DriftMonitor"]:
        """The daemon's monitor (None with ``drift.enabled = false``); says at start when the card has no reference."""
        if not cfg.drift.enabled:
            return None
        if card.drift_reference is None:
            log.warning("drift: the card of %s %s has no drift_reference: drift is not judged (run calibrate, adapt "
                        "or drift_study's reference command: README, Drift)", card.name, card.version)
        monitor = cls(cfg.drift, card.drift_reference, cfg.mqtt.device_id, f"{card.name} {card.version}",
                      Path(cfg.state.dir))
        monitor.judge_seconds = JUDGE_SECONDS
        return monitor

    # ------------------------------------------------------------------ the daemon's hooks
    def scored(self, p: float, priority: str, inputs: Optional[InputSignature]) -> None:
        """One scored image (``Intake.scored``)."""
        figures = list(inputs.figures().values()) if inputs is not None else None
        self._add(Observation(self.clock(), logit(p), priority != Priority.ROUTINE.value, figures,
                              inputs.equipment if inputs is not None else None))

    def refused(self) -> None:
        """One image the gate refused as not-a-radiograph (``Intake`` on that error)."""
        self._add(Observation(self.clock(), None))

    def _add(self, obs: Observation) -> None:
        if self.reference is None:
            return
        self.window.append(obs)
        self._pending = True
        if self.monotonic() >= self._next_judgement:
            self.judge()

    def judge(self) -> None:
        """Judge the window now, if an image came since the last judgement (the daemon calls it when idle).

        Judging sorts the window, so the daemon judges at most every :data:`JUDGE_SECONDS` in a burst rather
        than after every image: the state follows at most that much behind, and the last image is judged the
        moment the daemon has no file in hand. Images that come one at a time are each judged as they come."""
        if not self._pending:
            return
        self._pending = False
        self._next_judgement = self.monotonic() + self.judge_seconds
        new = self.evaluate()
        changed = new.state != self.current.state
        self.current = new
        if changed:
            self.since = self.clock()
            (log.warning if new.state in ("watch", "alarm") else log.info)("drift: %s: %s", new.state, new.reason)
            if self.on_change is not None:  # the daemon's: publish and save
                self.on_change(new)

    # ------------------------------------------------------------------ the checks
    def evaluate(self) -> Assessment:
        if self.reference is None:
            return Assessment("unknown", "no drift reference in the model card: run calibrate or adapt", [], 0, 0)
        horizon = self.clock() - self.cfg.max_age_hours * 3600.0
        while self.window and self.window[0].at < horizon:
            self.window.popleft()
        obs = list(self.window)
        scored = [o for o in obs if o.logit is not None]
        checks = [self._refusals(obs)]
        equipment = self._new_equipment(scored)
        if equipment is not None:
            checks.append(equipment)
        need = min(self.cfg.min_images, self.cfg.window)
        if len(scored) >= need:
            checks += [self._flagged(scored), self._logits(scored), *self._inputs(scored)]
        worst = max(checks, key=lambda c: _RANK[c.level])
        bad = [c.text for c in checks if c.level in ("watch", "alarm")]
        if bad:
            return Assessment(worst.level, "; ".join(bad), checks, len(obs), len(scored))
        if len(scored) < need:
            return Assessment("unknown", f"window too small to judge: {len(scored)} images scored, {need} needed",
                              checks, len(obs), len(scored))
        return Assessment("ok", f"the last {len(scored)} images look like the reference", checks, len(obs),
                          len(scored))

    def _refusals(self, obs: list[Observation]) -> DriftCheck:
        n, k = len(obs), sum(o.logit is None for o in obs)
        tail = binomial_tail(k, n, self._refusal)
        level = _level(tail < WATCH_ALPHA, tail < ALARM_ALPHA)
        return DriftCheck("gate refusals", level, f"{k} of the last {n} images refused by the gate as not a "
                          f"radiograph (inverted or not a chest film?), expected at most {self._refusal:.0%}",
                          round(k / n, 4) if n else 0.0)

    def _new_equipment(self, scored: list[Observation]) -> Optional[DriftCheck]:
        if not self._equipment:
            return None  # the reference data named no equipment (JPEG exports): nothing to compare with
        new: dict[str, int] = {}
        for o in scored:
            if o.equipment and o.equipment not in self._equipment:
                new[o.equipment] = new.get(o.equipment, 0) + 1
        if not new:
            return DriftCheck("equipment", "ok", "no new equipment", 0.0)
        names = ", ".join(f"{name} ({k} image{'s' if k > 1 else ''})" for name, k in sorted(new.items()))
        return DriftCheck("equipment", _level(True, max(new.values()) >= NEW_EQUIPMENT_ALARM),
                          f"new equipment: {names}", float(sum(new.values())))

    def _flagged(self, scored: list[Observation]) -> DriftCheck:
        n, k, p = len(scored), sum(o.flagged for o in scored), self._expected
        sd = math.sqrt(max(p * (1 - p), 1e-6) * (1 / n + 1 / self._n_ref))
        share = k / n
        lo, hi = max(0.0, p - Z_WATCH * sd), min(1.0, p + Z_WATCH * sd)  # the 99.9% interval
        level = _level(abs(share - p) > Z_WATCH * sd, abs(share - p) > Z_ALARM * sd)
        return DriftCheck("flagged share", level, f"{share:.0%} flagged over the last {n} images, expected "
                          f"{lo:.0%}-{hi:.0%}", round(share, 4))

    def _logits(self, scored: list[Observation]) -> DriftCheck:
        n, m = len(scored), self._n_ref
        d = ks_distance(np.array([o.logit for o in scored]), self._q)
        scale = math.sqrt((n + m) / (n * m))
        level = _level(d > KS_WATCH * scale, d > KS_ALARM * scale)
        return DriftCheck("logit distribution", level, f"model scores over the last {n} images at KS distance {d:.2f} "
                          f"from the reference's (watch above {KS_WATCH * scale:.2f}, alarm above "
                          f"{KS_ALARM * scale:.2f})", round(d, 4))

    def _inputs(self, scored: list[Observation]) -> list[DriftCheck]:
        rows = np.array([o.figures for o in scored if o.figures is not None], dtype=np.float64)
        if len(rows) < 2:
            return []
        n, m = len(rows), self._n_ref
        out = []
        for i, name in enumerate(DESCRIPTORS):
            mean, sd, varied = self._figures[i]
            now = float(rows[:, i].mean())
            words = name.replace("_", " ")
            if not varied:  # resized copies (the shipped reference: all 224 px) say nothing of a site's exports
                out.append(DriftCheck(name, "ok", f"{words} not compared: every reference image had the same value "
                                      f"({mean:.3g}; resized copies?)", None))
                continue
            shift = (now - mean) / sd
            z = abs(shift) / math.sqrt(1 / n + 1 / m)
            level = _level(abs(shift) >= SHIFT_WATCH and z > Z_WATCH, abs(shift) >= SHIFT_ALARM and z > Z_ALARM)
            out.append(DriftCheck(name, level, f"{words} {now:.3g} over the last {n} images, reference {mean:.3g} "
                                  f"(sd {sd:.2g}; {shift:+.1f} sd)", round(shift, 3)))
        return out

    # ------------------------------------------------------------------ out
    def message(self) -> DriftMessage:
        a = self.current
        ref = self.reference or {}
        data = ref.get("data") or {}
        words = (f"{data.get('folder')}, {ref.get('n')} images, {ref.get('scores')} ({ref.get('made_by')})"
                 if ref else "none")
        return DriftMessage(device=self.device, state=a.state, reason=a.reason, images=a.images, scored=a.scored,
                            checks=a.checks, model=self.model, reference=words, since=utc_iso(self.since))

    def summary(self) -> dict:
        """What stats carries: the state, the reason, and the window's size."""
        a = self.current
        return {"state": a.state, "reason": a.reason, "images": a.images, "scored": a.scored, "since": utc_iso(self.since)}

    def save(self) -> None:
        """The window and state to ``drift.json`` (atomically), so a restart continues it."""
        if self.path is None or self.reference is None:
            return
        body = {"schema": STATE_SCHEMA, "reference_sha256": reference_digest(self.reference), "model": self.model,
                "reference": self.reference, "state": asdict(self.current) | {"since": self.since},
                "saved_at": self.clock(), "window": [asdict(o) for o in self.window]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(dumps(body))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("drift state not saved to %s: %s (the window starts again after a restart)", self.path, exc)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            body = json.loads(self.path.read_text())
            if body.get("reference_sha256") != reference_digest(self.reference):
                log.info("drift: the model card's reference changed since %s was saved: the window starts empty",
                         self.path)
                return
            for o in body["window"][-self.cfg.window:]:
                self.window.append(Observation(**o))
            self.since = float(body["state"]["since"])
            self.current = Assessment(**{k: v for k, v in body["state"].items() if k != "since"} | {"checks": []})
            log.info("drift: continuing the window of %d images saved in %s (state %s)", len(self.window), self.path,
                     self.current.state)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("drift state %s unreadable (%s): the window starts empty", self.path, exc)
            self.window.clear()

