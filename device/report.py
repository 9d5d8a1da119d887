"""``pneumoflag report``: what the appliance did, and how fast it notified (time-to-notification).

The headline figure for computer-aided triage is the time from an image being
written to a clinician being notified, and then to someone acting on it. The
daemon records for every flag when the image was written (DICOM acquisition or
content time, else the file's mtime), first seen, scored, delivered to the
broker (PUBACK) and acknowledged at a nursing station; this reads those records
from the state database (read-only, while the daemon runs) and prints them.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .drift import STATE_FILE
from .safe_text import printable
from .vocab import PRIORITIES

#: (label, start column, end column) of the intervals reported
INTERVALS = (
    ("written -> seen", "written_at", "seen_at"),
    ("seen -> scored", "seen_at", "scored_at"),
    ("scored -> delivered", "scored_at", "delivered_at"),
    ("written -> delivered", "written_at", "delivered_at"),
    ("delivered -> acknowledged", "delivered_at", "acked_at"),
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReportError(Exception):
    """The report cannot be made; the message says why."""


def parse_since(text: str) -> float:
    """``7d``, ``24h``, ``90m``, ``3600s`` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ReportError(f"--since {text!r}: give a duration such as 7d, 24h, 90m or 3600s")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    a = np.array(values)
    return {"n": len(a), "p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2), "max": round(float(a.max()), 2)}


def _open(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise ReportError(f"no state database at {db_path}: has the daemon run with this state.dir?")
    try:
        return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise ReportError(f"cannot open {db_path}: {exc}") from None


def build_report(db_path: Path, since_s: float, now: Optional[float] = None) -> dict:
    now = time.time() if now is None else now
    start = now - since_s
    db = _open(db_path)
    try:
        cols = ["event_id", "path", "priority", "probability", "written_at", "seen_at", "scored_at", "delivered_at",
                "acked_at", "acked_by", "ack_station", "escalations"]
        try:
            rows = [dict(zip(cols, r, strict=True)) for r in db.execute(
                f"SELECT {', '.join(cols)} FROM flags WHERE scored_at >= ? ORDER BY scored_at", (start,))]
            errors = dict(db.execute("SELECT reason, COUNT(*) FROM journal WHERE status='error' AND processed_at >= ? "
                                     "GROUP BY reason", (start,)).fetchall())
        except sqlite3.Error as exc:
            raise ReportError(f"{db_path}: {exc} (a database from an older pneumoflag? it records flags from "
                              "this version on)") from None
        pacs = _pacs_outbox(db)
    finally:
        db.close()
    intervals = {}
    for label, a, b in INTERVALS:
        vals = [r[b] - r[a] for r in rows if r[a] is not None and r[b] is not None]
        intervals[label] = {"seconds": _stats(vals), "values": vals}
    open_urgent = [
        {"event_id": r["event_id"], "file": r["path"], "probability": r["probability"],
         "waiting_s": round(now - (r["delivered_at"] or r["scored_at"]), 1), "escalations": r["escalations"]}
        for r in rows if r["priority"] == "urgent" and r["acked_at"] is None
    ]
    return {
        "schema": "pneumoflag.report/1",
        "database": str(db_path),
        "since_s": since_s,
        "from": start,
        "to": now,
        "flags": {p: sum(r["priority"] == p for r in rows) for p in PRIORITIES},
        "acknowledged": {p: sum(r["priority"] == p and r["acked_at"] is not None for r in rows) for p in PRIORITIES},
        "escalated": sum(r["escalations"] > 0 for r in rows),
        "errors": errors,
        "intervals_s": {k: v["seconds"] for k, v in intervals.items()},
        "unacknowledged_urgent": open_urgent,
        "drift": read_drift(db_path.parent / STATE_FILE),
        "pacs_outbox": pacs,
        "_values": {k: v["values"] for k, v in intervals.items()},
    }


def read_drift(path: Path) -> Optional[dict]:
    """The drift monitor's last saved state (``device/drift.py``): state, reason, the checks' figures, the
    window's logits and the reference's quantiles; None when the daemon saved none (no reference, or disabled)."""
    try:
        body = json.loads(path.read_text())
        state, ref = body["state"], body["reference"]
        logits = [o["logit"] for o in body["window"] if o.get("logit") is not None]
        return {"state": state["state"], "reason": state["reason"], "since": state.get("since"),
                "saved_at": body.get("saved_at"), "model": body.get("model"), "images": state.get("images"),
                "scored": state.get("scored"), "checks": state.get("checks") or [],
                "reference": {"n": ref["n"], "made_by": ref.get("made_by"), "scores": ref.get("scores"),
                              "data": ref.get("data"), "logit_quantiles": ref["logit_quantiles"]},
                "window_logits": logits}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path}: unreadable drift state ({exc})") from None


def _pacs_outbox(db: sqlite3.Connection) -> dict:
    """Per PACS destination: SRs waiting, the tries of the oldest, and its last error (empty: nothing waits)."""
    try:
        rows = db.execute("SELECT destination, COUNT(*), MIN(id) FROM pacs_outbox GROUP BY destination").fetchall()
        out = {}
        for dest, depth, head in rows:
            attempts, error = db.execute("SELECT attempts, last_error FROM pacs_outbox WHERE id=?", (head,)).fetchone()
            out[dest] = {"depth": depth, "attempts": attempts, "last_error": error}
        return out
    except sqlite3.Error:  # a database from before the PACS outbox
        return {}


def _fmt_s(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def format_report(r: dict) -> str:
    since = r["since_s"]
    span = f"{since / 86400:g} d" if since >= 86400 else f"{since / 3600:g} h"
    lines = [f"pneumoflag report: the last {span} ({r['database']})", "",
             f"{'priority':<10}{'flags':>7}{'acknowledged':>14}"]
    for p in PRIORITIES:
        lines.append(f"{p:<10}{r['flags'][p]:>7}{r['acknowledged'][p]:>14}")
    total_errors = sum(r["errors"].values())
    lines.append(f"errors: {total_errors}" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items()))
                                                + ")" if total_errors else ""))
    lines += ["", "time to notification", f"{'interval':<28}{'n':>6}{'p50':>12}{'p95':>12}{'max':>12}"]
    for label, st in r["intervals_s"].items():
        lines.append(f"{label:<28}{st['n']:>6}{_fmt_s(st['p50']):>12}{_fmt_s(st['p95']):>12}{_fmt_s(st['max']):>12}")
    lines += ["", f"urgent flags not acknowledged: {len(r['unacknowledged_urgent'])}"
              + (f" (escalated: {r['escalated']} flags in all)" if r["escalated"] else "")]
    for u in r["unacknowledged_urgent"]:
        lines.append(f"  {printable(u['file'])}  p={u['probability']:.4f}  waiting {_fmt_s(u['waiting_s'])}"
                     f"  escalations {u['escalations']}  event {u['event_id']}")
    for dest, w in r.get("pacs_outbox", {}).items():
        lines.append(f"SRs waiting for PACS {printable(dest)}: {w['depth']} (the oldest tried {w['attempts']} times"
                     + (f"; last error: {printable(w['last_error'])}" if w["last_error"] else "") + ")")
    return "\n".join(lines + format_drift(r.get("drift")))


def format_drift(d: Optional[dict]) -> list[str]:
    """The drift section of the report: the state with its reason, then each check's figure."""
    if d is None:
        return ["", "drift: no state saved (the model card has no drift_reference, or drift.enabled = false)"]
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(d["since"])) if d.get("since") else "?"
    ref = d["reference"]
    folder = (ref.get("data") or {}).get("folder")
    lines = ["", f"drift: {d['state'].upper()} since {since}: {printable(d['reason'])}",
             f"  window: {d['images']} images, {d['scored']} scored; reference: {folder}, {ref['n']} images, "
             f"{ref.get('scores')}"]
    lines += [f"  {c['level']:<6} {c['check']:<20} {printable(c['text'])}" for c in d["checks"]]
    return lines


def write_plots(r: dict, folder: Path) -> list[Path]:
    """Histograms of written -> delivered and delivered -> acknowledged (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plots needs matplotlib: pip install matplotlib") from None
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label, name in (("written -> delivered", "written_to_delivered.png"),
                        ("delivered -> acknowledged", "delivered_to_acknowledged.png")):
        vals = r["_values"][label]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if vals:
            ax.hist(vals, bins=min(40, max(5, len(vals) // 3)), color="#4c72b0")
            st = r["intervals_s"][label]
            for q, style in (("p50", "-"), ("p95", "--")):
                ax.axvline(st[q], color="k", linestyle=style, linewidth=1, label=f"{q} {_fmt_s(st[q])}")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("seconds")
        ax.set_ylabel("flags")
        ax.set_title(f"time to notification: {label} (n={len(vals)})")
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    if r.get("drift") is not None:
        out.append(_drift_plot(plt, r["drift"], folder / "drift_logits.png"))
    return out


def _drift_plot(plt, d: dict, path: Path) -> Path:
    """The logit's distribution in the window against the reference's, as cumulative distributions."""
    q = np.asarray(d["reference"]["logit_quantiles"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(q, np.linspace(0, 1, len(q)), color="k", label=f"reference ({d['reference']['n']} images)")
    w = np.sort(np.asarray(d["window_logits"]))
    if len(w):
        ax.step(w, np.arange(1, len(w) + 1) / len(w), where="post", color="#c44e52", label=f"now ({len(w)} images)")
    ax.set_xlabel("model logit")
    ax.set_ylabel("share of images at or below")
    ax.set_title(f"drift: {d['state']} (logit distribution now vs reference)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def public(r: dict) -> dict:
    """The report without its raw value lists (for --json)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}
