"""Evaluation pictures: ROC curve, confusion matrices, contact sheet of the misclassified."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .dataset import LABELS, LoadedSet
from .metrics import roc_curve

log = logging.getLogger(__name__)
MAX_SHEET = 48


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(folder: Path, ds: LoadedSet, p: np.ndarray, result: dict,
                title: str = "ROC: pneumonia vs normal") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [roc_plot(folder / "roc.png", ds.y, p, result, title),
            confusion_plot(folder / "confusion.png", result),
            misclassified_sheet(folder / "misclassified.png", ds, p, result)]


def roc_plot(path: Path, y, p, result: dict, title: str = "ROC: pneumonia vs normal") -> Path:
    plt = _plt()
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {result['auroc']:.3f} (n={result['n']})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for (name, m), marker in zip(result["operating_points"].items(), ("o", "s"), strict=False):
        if m["sensitivity"] is not None and m["specificity"] is not None:
            ax.plot(1 - m["specificity"], m["sensitivity"], marker, ms=8,
                    label=f"{name} p>={m['threshold']:.3f}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_plot(path: Path, result: dict) -> Path:
    plt = _plt()
    points = result["operating_points"]
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4))
    axes = np.atleast_1d(axes)
    for ax, (name, m) in zip(axes, points.items(), strict=False):
        cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([0, 1], [f"pred {LABELS[0]}", f"pred {LABELS[1]}"])
        ax.set_yticks([0, 1], [f"true {LABELS[0]}", f"true {LABELS[1]}"])
        ax.set_title(f"{name} (p >= {m['threshold']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def misclassified_sheet(path: Path, ds: LoadedSet, p: np.ndarray, result: dict) -> Path:
    """The review the source notebook did by hand: every error at ``flag``, worst first."""
    plt = _plt()
    thr = result["operating_points"]["flag"]["threshold"]
    pred = p >= thr
    wrong = np.flatnonzero(pred != (ds.y == 1))
    wrong = wrong[np.argsort(-np.abs(p[wrong] - thr))][:MAX_SHEET]
    cols = 8
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9 + 0.6))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, wrong, strict=False):
        ax.imshow(ds.x[i][..., 0], cmap="gray", vmin=0, vmax=255)
        kind = "FN" if ds.y[i] == 1 else "FP"
        ax.set_title(f"{kind} p={p[i]:.3f}\n{ds.paths[i].name[:18]}", fontsize=6,
                     color="crimson" if kind == "FN" else "darkorange")
    n_fn = int(((~pred) & (ds.y == 1)).sum())
    n_fp = int((pred & (ds.y == 0)).sum())
    fig.suptitle(f"misclassified at flag (p >= {thr:.3f}): {n_fn} missed pneumonia (FN), {n_fp} false flags (FP)"
                 + (f"; worst {len(wrong)} shown" if len(wrong) < n_fn + n_fp else "")
                 + ("" if len(wrong) else " - none"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
