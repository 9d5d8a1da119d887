"""The toolchain's subcommands (train, convert, evaluate) for the one ``pneumoflag`` command.

Argument parsing only: TensorFlow is imported when a command runs, never when
the device CLI starts.
"""
from __future__ import annotations

from pathlib import Path
from ..device.preprocess import CONTRASTS
from ..device.vocab import ACCELERATORS
from .augment import AUGMENTATIONS
from .budget import MAX_INFER_MS, MAX_TFLITE_BYTES
from .metrics import FLAG_MIN_SENSITIVITY, MIN_PER_CLASS, URGENT_MIN_SPECIFICITY, format_points
from .model import ARCHITECTURES


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the reduced-node CNN (or another --arch)",
        description="Train the compact reduced-node CNN (or another --arch) on DATA (NORMAL/ and PNEUMONIA/ "
        "subfolders) with a seeded patient-level validation split. Writes OUT (.keras), "
        "OUT.history.csv, OUT.history.png and OUT.train.json (split, preprocessing, metrics).",
    )
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", required=True, type=Path, help="where to write the model (.keras)")
    p.add_argument("--arch", choices=tuple(ARCHITECTURES), default="reduced-node",
                   help="network: reduced-node (default, the shipped family), rgb64 or small-cnn "
                   "(the source notebooks' other small CNNs), or vgg19, inception-resnet-v2, resnet50v2 "
                   "(the notebooks' transfer models: Keras applications with weights=None, 20-54 million "
                   "parameters, far over the appliance's size and speed budget; they train on a GPU, on a "
                   "small CPU use them only to prove the path, with --epochs 0)")
    p.add_argument("--size", type=int,
                   help="input height and width in px (default: 128; rgb64: 64; the transfer models: 224)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="input channels (default: 1; rgb64 and the transfer models: 3)")
    p.add_argument("--contrast", choices=CONTRASTS, default="equalize",
                   help="contrast step of the preprocessing: global histogram equalisation (default), "
                   "CLAHE, or none")
    p.add_argument("--no-equalize", dest="contrast", action="store_const", const="none",
                   help="same as --contrast none")
    p.add_argument("--crop", type=float, default=0.0,
                   help="cut this share of each side before resizing (0-0.25; default 0)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default="geometric",
                   help="geometric: rotation/zoom/shift (default); export: also another window and gamma, "
                   "another downscaling, JPEG re-compression; scanner: export's, stronger, plus haze, blur, "
                   "noise and a wider zoom; none")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    p.add_argument("--flip", action="store_true", help="also flip left-right at random")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="binary cross-entropy label smoothing")
    p.add_argument("--dropout", type=float, default=0.3, help="dropout before the dense head (default 0.3)")
    p.add_argument("--epochs", type=int, default=30,
                   help="maximum epochs (early stopping on val loss); 0: write the initialised, untrained model "
                   "and its OUT.train.json (no history), to take an architecture through convert and the daemon")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out (default 0.2)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                   help="do not weight classes by inverse frequency")
    p.add_argument("--seed", type=int, default=42, help="seed for initialisation, shuffling and augmentation")
    p.add_argument("--split-seed", type=int, default=42,
                   help="seed of the patient-level validation split (default 42; ensemble members share it)")
    p.add_argument("--workers", type=int, default=2, help="threads that decode and augment (default 2)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from ..convert.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, size=args.size, channels=args.channels,
        contrast=args.contrast, crop=args.crop, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, val_fraction=args.val_fraction,
        patience=args.patience, augment=args.augment, flip=args.flip,
        label_smoothing=args.label_smoothing, dropout=args.dropout, class_weights=args.class_weights,
        seed=args.seed, split_seed=args.split_seed, workers=args.workers,
    )
    meta = train(cfg)
    done = (f"trained {args.out}: {meta['parameters']:,} parameters, {meta['training']['epochs_run']} epochs"
            if not meta["training"]["untrained"] else
            f"wrote the untrained {args.out} (--epochs 0): {meta['parameters']:,} parameters")
    print(
        f"{done}, validation AUROC {meta['validation']['auroc_float']:.4f} "
        f"({meta['split']['val_images']} images, patient-level split)"
    )
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="quantize a model to full-int8 TFLite and write its model card",
        description="Quantize MODEL (.keras, Keras-2 .h5 or SavedModel folder; several .keras files make an "
        "ensemble that averages their logits) to a full-int8 TFLite file calibrated on real images. The int8 "
        "graph ends at the logit (the device applies the sigmoid in float), its input is uint8 (the device feeds "
        "raw pixels). It is verified against the float model on the validation split and on --check-data, the "
        "operating points are chosen and the model card OUT.json is written. Nothing is written unless every "
        "check passes.",
    )
    p.add_argument("model", type=Path, nargs="+", help="float model(s): .keras, .h5 or SavedModel folder")
    p.add_argument("--calibration", required=True, type=Path,
                   help="folder with NORMAL/ and PNEUMONIA/ images for calibration")
    p.add_argument("--out", required=True, type=Path, help="output .tflite, e.g. models/NAME.tflite")
    p.add_argument("--validation", type=Path,
                   help="folder with NORMAL/ and PNEUMONIA/ for verification and operating points "
                   "(default: the validation split recorded by `pneumoflag train`)")
    p.add_argument("--check-data", type=Path,
                   help="a second labelled folder (e.g. the site's images) on which float and int8 must also "
                   "agree; never used for calibration or operating points")
    p.add_argument("--num-calibration", type=int, default=200, help="calibration images (default 200)")
    p.add_argument("--max-auroc-drop", type=float, default=0.005,
                   help="fail when int8 AUROC is this much below float on either set (default 0.005)")
    p.add_argument("--edgetpu", action="store_true", help="also compile NAME_edgetpu.tflite with edgetpu_compiler")
    p.add_argument("--name", help="model name in the card (default: OUT's stem)")
    p.add_argument("--model-version", default="1.0.0", help="model version in the card")
    p.add_argument("--contrast", choices=CONTRASTS,
                   help="contrast step of the preprocessing (default: as trained; none for foreign models)")
    p.add_argument("--input-scale", type=float,
                   help="float model input = pixels * SCALE (default: as trained, else 1/255)")
    p.add_argument("--min-sensitivity", type=float, default=FLAG_MIN_SENSITIVITY,
                   help=f"flag: highest threshold with at least this sensitivity (default {FLAG_MIN_SENSITIVITY})")
    p.add_argument("--min-specificity", "--urgent-min-specificity", dest="min_specificity", type=float,
                   default=URGENT_MIN_SPECIFICITY,
                   help=f"urgent: lowest threshold with at least this specificity (default {URGENT_MIN_SPECIFICITY})")
    p.add_argument("--single-tier", action="store_true",
                   help="when the data cannot put urgent above flag, write a card without an urgent tier "
                   "instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration sample")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from ..convert.quantize import ConvertConfig, ConvertError, convert

    cfg = ConvertConfig(
        model=args.model, calibration=args.calibration, out=args.out, validation=args.validation,
        check_data=args.check_data, num_calibration=args.num_calibration, max_auroc_drop=args.max_auroc_drop,
        edgetpu=args.edgetpu, name=args.name, version=args.model_version, contrast=args.contrast,
        input_scale=args.input_scale, min_sensitivity=args.min_sensitivity, min_specificity=args.min_specificity,
        single_tier=args.single_tier, seed=args.seed,
    )
    if cfg.num_calibration < 1:
        raise _cli_error("--num-calibration must be at least 1")
    try:
        res = convert(cfg)
    except ConvertError as exc:
        raise _cli_error(str(exc)) from None
    card = res["card"]
    print(res["report"])
    print(f"int8 output: {card['tflite']['output']['kind']} ({card['tflite']['output']['note']})")
    for set_name, ag in card["quantization"]["agreement"].items():
        extra = ""
        if "priority_agreement" in ag:
            extra = f", priority agreement {ag['priority_agreement']:.3f}"
        print(
            f"float vs int8 on {ag['n']} {set_name} images: AUROC {ag['auroc_float']:.4f} -> {ag['auroc_int8']:.4f} "
            f"(drop {ag['auroc_drop']:+.4f}), max |dp| {ag['max_abs_diff']:.4f}{extra}; "
            f"{ag['distinct_outputs']} distinct outputs, {ag['share_at_lowest_level']:.1%} at the lowest and "
            f"{ag['share_at_highest_level']:.1%} at the highest level"
        )
    print("operating points (validation data):")
    print("\n".join(format_points(card["validation"]["int8"])))
    if card.get("check_data"):
        print("the same points on --check-data:")
        print("\n".join(format_points(card["check_data"]["int8"])))
    print(f"wrote {args.out} ({card['tflite']['bytes']:,} bytes) and {res['card_path']}")
    if "edgetpu_error" in res:
        raise _cli_error(res["edgetpu_error"])
    if card.get("edgetpu"):
        print(f"wrote {args.out.parent / card['edgetpu']['file']} and {card['edgetpu']['log']}")
    return 0


def add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="set the operating points on a site's own labelled images",
        description="Score a site's labelled images (DATA with NORMAL/ and PNEUMONIA/, at least 50 of each) with "
        "MODEL and set the operating points there, as a hospital does before go-live: flag = the highest "
        "threshold with sensitivity >= --min-sensitivity, urgent = the lowest with specificity >= "
        "--urgent-min-specificity, strictly above flag. Prints both with bootstrap 95% intervals, the share of "
        "images flagged and the PPV at the site's prevalence, then writes a new revision of the model card "
        "(version bumped, the data recorded as counts and a digest, the old points kept). The .tflite is not "
        "touched; the daemon picks the new card up on restart. No TensorFlow needed.",
    )
    p.add_argument("--model", required=True, type=Path, help="the .tflite model (its card beside it)")
    p.add_argument("--data", required=True, type=Path, help="the site's labelled images: NORMAL/ and PNEUMONIA/")
    p.add_argument("--card", type=Path, help="the model's card (default: NAME.json beside the model)")
    p.add_argument("--out", type=Path, help="write the new card here (default: replace the card, a new revision)")
    p.add_argument("--min-sensitivity", type=float, default=FLAG_MIN_SENSITIVITY,
                   help=f"flag target (default {FLAG_MIN_SENSITIVITY})")
    p.add_argument("--urgent-min-specificity", type=float, default=URGENT_MIN_SPECIFICITY,
                   help=f"urgent target (default {URGENT_MIN_SPECIFICITY})")
    p.add_argument("--prevalence", type=float,
                   help="share of pneumonia among the site's radiographs, for PPV and the flagged share "
                   "(default: the data's own)")
    p.add_argument("--single-tier", action="store_true",
                   help="when urgent cannot lie above flag, write a card without an urgent tier instead of stopping")
    p.add_argument("--model-version", help="version of the new card (default: the minor version bumped)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    from ..convert.calibrate import CalibrateConfig, CalibrateError, calibrate, summary

    try:
        res = calibrate(CalibrateConfig(
            model=args.model, data=args.data, card=args.card, out=args.out, min_sensitivity=args.min_sensitivity,
            urgent_min_specificity=args.urgent_min_specificity, prevalence=args.prevalence,
            single_tier=args.single_tier, version=args.model_version,
        ))
    except CalibrateError as exc:
        raise _cli_error(str(exc)) from None
    print(summary(res))
    return 0


def add_adapt(sub) -> None:
    p = sub.add_parser(
        "adapt",
        help="fine-tune the model on a site's labelled images (patient-level cross-fitting, acceptance protocol)",
        description="Fit MODEL to a site's labelled images (DATA with NORMAL/ and PNEUMONIA/, at least 50 of each) "
        "so that every figure on them stays out-of-fold: the site's patients are dealt into --folds folds; for each "
        "fold every ensemble member (the card's float members) is fine-tuned on the other folds and scores the "
        "held-out one. The operating points are set on those out-of-fold scores (same rules as calibrate). What "
        "ships is the average of the fold models, converted to int8 through convert's checks. The acceptance "
        "protocol is written to NAME.adapt.json beside OUT (NAME.tflite) before training and checked after: "
        "out-of-fold AUROC at least the base model's on the same images + --min-gain; validation AUROC down by at "
        "most --max-forgetting; the int8 check; distinct tiers; size, Edge TPU ops and latency within budget. OUT, "
        "its card and its float members are written only if every criterion holds; otherwise adapt says which "
        "failed (exit status 1) and the base model stays the one to use. Needs the toolchain (TensorFlow).",
    )
    p.add_argument("--model", required=True, type=Path, help="the base .tflite (its card and float members beside it)")
    p.add_argument("--data", required=True, type=Path, help="the site's labelled images: NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", required=True, type=Path, help="the adapted .tflite (its card, members and record beside it)")
    p.add_argument("--folds", type=int, default=5, help="patient-level folds (default 5)")
    p.add_argument("--seed", type=int, default=42, help="seed of the folds and of the fine-tuning (default 42)")
    p.add_argument("--train", choices=("head", "all"), default="head",
                   help="head: only the dense head after the convolutional layers learns (default; the shipped "
                   "graph shares those layers between folds); all: every weight but the batch norms")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs per fold (fixed: no early stopping; "
                   "default 10)")
    p.add_argument("--learning-rate", type=float, help="Adam learning rate (default: 1e-3 for head, 1e-4 for all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", choices=AUGMENTATIONS, default="geometric",
                   help="augmentation of the site images while fine-tuning (as train; default geometric)")
    p.add_argument("--flip", action="store_true", help="also flip left-right at random")
    p.add_argument("--mix-train", type=float, default=0.0, metavar="SHARE",
                   help="add this share (of each fold's site images) of images from the members' own training split, "
                   "so that what was learnt there is kept (default 0; never their validation split)")
    p.add_argument("--min-gain", type=float, default=0.005,
                   help="protocol: out-of-fold AUROC must beat the base model's on the site by this (default 0.005)")
    p.add_argument("--max-forgetting", type=float, default=0.01,
                   help="protocol: validation AUROC may fall by at most this (default 0.01)")
    p.add_argument("--min-sensitivity", type=float, default=FLAG_MIN_SENSITIVITY,
                   help=f"flag: highest out-of-fold threshold with this sensitivity (default {FLAG_MIN_SENSITIVITY})")
    p.add_argument("--urgent-min-specificity", type=float, default=URGENT_MIN_SPECIFICITY,
                   help=f"urgent: lowest out-of-fold threshold with this specificity (default {URGENT_MIN_SPECIFICITY})")
    p.add_argument("--single-tier", action="store_true", help="allow a card without an urgent tier")
    p.add_argument("--prevalence", type=float, help="the site's share of pneumonia, for PPV and the flagged share "
                   "(default: the data's own)")
    p.add_argument("--calibration", type=Path, help="int8 calibration images (default: the members' training folder)")
    p.add_argument("--validation", type=Path,
                   help="the validation folder (default: the validation split the members' training recorded)")
    p.add_argument("--num-calibration", type=int, default=200, help="calibration images (default 200)")
    p.add_argument("--max-auroc-drop", type=float, default=0.005, help="protocol: int8 vs float (default 0.005)")
    p.add_argument("--max-bytes", type=int, default=MAX_TFLITE_BYTES,
                   help=f"protocol: .tflite bytes in all (default {MAX_TFLITE_BYTES:,})")
    p.add_argument("--max-infer-ms", type=float, default=MAX_INFER_MS,
                   help=f"protocol: infer p50 on this CPU (default {MAX_INFER_MS} ms)")
    p.add_argument("--model-version", help="version of the adapted model (default: the base's major version bumped)")
    p.add_argument("--edgetpu", action="store_true", help="also compile NAME_edgetpu.tflite with edgetpu_compiler")
    p.add_argument("--plots", type=Path, help="write roc.png, confusion.png, misclassified.png and evaluation.json of "
                   "the out-of-fold scores here")
    p.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS,
                   help=f"refuse fewer labelled site images of a class than this (default {MIN_PER_CLASS}, as "
                   "calibrate; lower it only to study how many images adaptation needs)")
    p.add_argument("--workers", type=int, default=2, help="threads that decode and augment (default 2)")
    p.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args) -> int:
    from ..convert.adapt import AdaptConfig, AdaptError, AdaptRefused, adapt, summary

    cfg = AdaptConfig(
        model=args.model, data=args.data, out=args.out, folds=args.folds, seed=args.seed, train=args.train,
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, augment=args.augment,
        flip=args.flip, mix_train=args.mix_train, min_gain=args.min_gain, max_forgetting=args.max_forgetting,
        min_sensitivity=args.min_sensitivity, urgent_min_specificity=args.urgent_min_specificity,
        single_tier=args.single_tier, prevalence=args.prevalence, calibration=args.calibration,
        validation=args.validation, num_calibration=args.num_calibration, max_auroc_drop=args.max_auroc_drop,
        max_bytes=args.max_bytes, max_infer_ms=args.max_infer_ms, version=args.model_version, edgetpu=args.edgetpu,
        plots=args.plots, min_per_class=args.min_per_class, workers=args.workers,
    )
    import signal

    def _terminated(signum, frame):  # kill, systemd, timeout: end as Ctrl-C does (record, temporary folder)
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        res = adapt(cfg)
    except AdaptRefused as exc:
        import sys

        print(f"pneumoflag adapt: {exc}", file=sys.stderr)
        return 1
    except AdaptError as exc:
        raise _cli_error(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(res))
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="AUROC and operating-point figures on a labelled folder",
        description="Score every image of DATA (NORMAL/ and PNEUMONIA/ subfolders) and report AUROC and, "
        "at each operating point of the model card, sensitivity and specificity with bootstrap 95% intervals, "
        "PPV, NPV, accuracy and the confusion matrix. A .tflite runs on the device runtime (no TensorFlow needed).",
    )
    p.add_argument("--model", required=True, type=Path, help=".tflite (with its card) or a Keras/SavedModel model")
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--json", dest="json_out", type=Path, help="write the figures as JSON here")
    p.add_argument("--plots", type=Path, help="write roc.png, confusion.png, misclassified.png here")
    p.add_argument("--card", type=Path, help="model card for thresholds (default: beside a .tflite)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    p.add_argument("--split", type=Path, metavar="TRAIN_JSON",
                   help="only the validation files recorded in this *.train.json (from `pneumoflag train`)")
    p.add_argument("--prevalence", type=float, help="also report the flagged share and PPV at this prevalence")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from ..convert.evaluate import EvaluateConfig, evaluate, format_summary

    res = evaluate(EvaluateConfig(args.model, args.data, args.json_out, args.plots, args.card, args.accelerator,
                                  split=args.split, prevalence=args.prevalence))
    print(format_summary(res))
    if args.json_out:
        print(f"wrote {args.json_out}")
    for pth in res.get("plots", []):
        print(f"wrote {pth}")
    return 0


TITLE = "model toolchain (train/convert need the 'convert' extra: pip install 'pneumoflag[convert]')"


def register(sub) -> dict:
    """Entry point (group ``pneumoflag.commands``): add the toolchain's subcommands to the CLI."""
    from .calibrate import CalibrateError
    from .dataset import DataError
    from .quantize import ConvertError

    for add in (add_train, add_convert, add_calibrate, add_adapt, add_evaluate):
        add(sub)
    return {"title": TITLE, "errors": (DataError, ConvertError, CalibrateError)}


def _cli_error(message: str) -> Exception:
    from ..device.cli import CliError

    return CliError(message)
