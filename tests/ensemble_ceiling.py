"""The best any logit-average of trained members could do on one labelled folder: an upper bound, not a choice.

    python tests/ensemble_ceiling.py --data ../shared/data/chest_xray/site_dev --max-members 4 runs/*.keras

Not a test. Every subset of up to ``--max-members`` members is scored on ``--data`` (float Keras, each member
on its own preprocessing, as ``convert`` joins them) and ranked by specificity at ``--sensitivity``. Picking
the subset on the same images it is scored on is optimistic by construction: when even the best subset falls
short of a target there, no ensemble of these members meets it, and more searching is not the way.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from pneumoflag.convert.dataset import load_samples, scan_folder
from pneumoflag.convert.float_model import load_float_model, logit_model
from pneumoflag.convert.metrics import auroc, specificity_at_sensitivity
from pneumoflag.device.preprocess import PreprocessSpec, to_float_input


def member_logits(paths: list[Path], data: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    samples = scan_folder(data)
    loaded: dict[str, object] = {}
    logits: dict[str, np.ndarray] = {}
    y = np.zeros(0)
    for path in paths:
        meta = json.loads(path.with_name(path.stem + ".train.json").read_text())
        spec = PreprocessSpec.from_dict(meta["preprocessing"])
        key = json.dumps(meta["preprocessing"], sort_keys=True)
        if key not in loaded:
            loaded[key] = load_samples(samples, spec)
        ds = loaded[key]
        logits[path.stem] = logit_model(load_float_model(path)).raw(to_float_input(ds.x, spec))
        y = ds.y
    return y, logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("members", nargs="+", type=Path, help=".keras files with their .train.json beside them")
    ap.add_argument("--data", required=True, type=Path, help="labelled folder: NORMAL/ and PNEUMONIA/")
    ap.add_argument("--max-members", type=int, default=4)
    ap.add_argument("--sensitivity", type=float, default=0.95)
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    y, logits = member_logits(args.members, args.data)
    names = sorted(logits)
    ranked = []
    for k in range(1, min(args.max_members, len(names)) + 1):
        for subset in itertools.combinations(names, k):
            z = np.mean([logits[n] for n in subset], axis=0)
            ranked.append((specificity_at_sensitivity(y, z, args.sensitivity), auroc(y, z), subset))
    ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
    print(f"{len(names)} members, {len(ranked)} subsets of 1-{args.max_members}, scored on {len(y)} images "
          f"of {args.data.name} (float logit average)")
    print(f"specificity at sensitivity {args.sensitivity}   AUROC   members")
    for spec_at, auc, subset in ranked[: args.top]:
        print(f"{spec_at:.3f}   {auc:.4f}   {' + '.join(subset)}")


if __name__ == "__main__":
    sys.exit(main())
