"""The toolchain's subcommands (train, convert, evaluate) for the one ``pneumoflag`` command.

Argument parsing only: TensorFlow is imported when a command runs, never when
the device CLI starts.
"""
from __future__ import annotations

from pathlib import Path


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the reduced-node CNN",
        description="Train the compact reduced-node CNN on DATA (NORMAL/ and PNEUMONIA/ "
        "subfolders) with a seeded patient-level validation split. Writes OUT (.keras), "
        "OUT.history.csv, OUT.history.png and OUT.train.json (split, preprocessing, metrics).",
    )
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", required=True, type=Path, help="where to write the model (.keras)")
    p.add_argument("--size", type=int, default=128, help="input height and width in px (default 128)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="input channels (default 1)")
    p.add_argument("--no-equalize", dest="equalize", action="store_false",
                   help="skip histogram equalisation in preprocessing")
    p.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping on val loss)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients held out (default 0.2)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation")
    p.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                   help="do not weight classes by inverse frequency")
    p.add_argument("--seed", type=int, default=42, help="seed for split, init, shuffling, augmentation")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from ..convert.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, size=args.size, channels=args.channels,
        equalize=args.equalize, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, val_fraction=args.val_fraction,
        patience=args.patience, augment=args.augment, class_weights=args.class_weights,
        seed=args.seed,
    )
    meta = train(cfg)
    print(
        f"trained {args.out}: {meta['parameters']:,} parameters, {meta['training']['epochs_run']} epochs, "
        f"validation AUROC {meta['validation']['auroc_float']:.4f} "
        f"({meta['split']['val_images']} images, patient-level split)"
    )
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="quantize a model to full-int8 TFLite and write its model card",
        description="Quantize MODEL (.keras, Keras-2 .h5 or SavedModel folder) to a full-int8 TFLite "
        "file (uint8 input: the device feeds raw pixels) calibrated on real images, verify it against "
        "the float model on validation data, choose the operating points and write the model card "
        "OUT.json. Nothing is written unless every check passes.",
    )
    p.add_argument("model", type=Path, help="float model: .keras, .h5 or SavedModel folder")
    p.add_argument("--calibration", required=True, type=Path,
                   help="folder with NORMAL/ and PNEUMONIA/ images for calibration")
    p.add_argument("--out", required=True, type=Path, help="output .tflite, e.g. models/NAME.tflite")
    p.add_argument("--validation", type=Path,
                   help="folder with NORMAL/ and PNEUMONIA/ for verification and operating points "
                   "(default: the validation split recorded by `pneumoflag train`)")
    p.add_argument("--num-calibration", type=int, default=200, help="calibration images (default 200)")
    p.add_argument("--max-auroc-drop", type=float, default=0.01,
                   help="fail when int8 AUROC is this much below float (default 0.01)")
    p.add_argument("--edgetpu", action="store_true", help="also compile NAME_edgetpu.tflite with edgetpu_compiler")
    p.add_argument("--name", help="model name in the card (default: OUT's stem)")
    p.add_argument("--model-version", default="1.0.0", help="model version in the card")
    eq = p.add_mutually_exclusive_group()
    eq.add_argument("--equalize", dest="equalize", action="store_true", default=None,
                    help="histogram-equalise inputs (default: as trained; off for foreign models)")
    eq.add_argument("--no-equalize", dest="equalize", action="store_false")
    p.add_argument("--input-scale", type=float,
                   help="float model input = pixels * SCALE (default: as trained, else 1/255)")
    p.add_argument("--min-sensitivity", type=float, default=0.97, help="flag operating point target")
    p.add_argument("--min-specificity", type=float, default=0.95, help="urgent operating point target")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration sample")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args) -> int:
    from ..convert.quantize import ConvertConfig, ConvertError, convert

    cfg = ConvertConfig(
        model=args.model, calibration=args.calibration, out=args.out, validation=args.validation,
        num_calibration=args.num_calibration, max_auroc_drop=args.max_auroc_drop, edgetpu=args.edgetpu,
        name=args.name, version=args.model_version, equalize=args.equalize, input_scale=args.input_scale,
        min_sensitivity=args.min_sensitivity, min_specificity=args.min_specificity, seed=args.seed,
    )
    if cfg.num_calibration < 1:
        raise _cli_error("--num-calibration must be at least 1")
    try:
        res = convert(cfg)
    except ConvertError as exc:
        raise _cli_error(str(exc)) from None
    card = res["card"]
    ag = card["quantization"]["agreement"]
    ops = card["operating_points"]
    print(res["report"])
    print(
        f"float vs int8 on {ag['n']} validation images: priority agreement {ag['priority_agreement']:.3f}, "
        f"flag agreement {ag['flag_agreement']:.3f}, max |dp| {ag['max_abs_diff']:.4f}, "
        f"AUROC {ag['auroc_float']:.4f} -> {ag['auroc_int8']:.4f} (drop {ag['auroc_drop']:+.4f})"
    )
    v = card["validation"]["int8"]["operating_points"]
    print(
        f"operating points: flag p>={ops['flag']['threshold']:.4f} (sens {v['flag']['sensitivity']:.3f}, "
        f"spec {v['flag']['specificity']:.3f}); urgent p>={ops['urgent']['threshold']:.4f} "
        f"(sens {v['urgent']['sensitivity']:.3f}, spec {v['urgent']['specificity']:.3f})"
    )
    print(f"wrote {args.out} ({card['tflite']['bytes']:,} bytes) and {res['card_path']}")
    if "edgetpu_error" in res:
        raise _cli_error(res["edgetpu_error"])
    if card.get("edgetpu"):
        print(f"wrote {args.out.parent / card['edgetpu']['file']} and {card['edgetpu']['log']}")
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="AUROC and operating-point figures on a labelled folder",
        description="Score every image of DATA (NORMAL/ and PNEUMONIA/ subfolders) and report AUROC and, "
        "at each operating point of the model card, sensitivity, specificity, PPV, NPV, accuracy and the "
        "confusion matrix. A .tflite runs on the device runtime (no TensorFlow needed).",
    )
    p.add_argument("--model", required=True, type=Path, help=".tflite (with its card) or a Keras/SavedModel model")
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--json", dest="json_out", type=Path, help="write the figures as JSON here")
    p.add_argument("--plots", type=Path, help="write roc.png, confusion.png, misclassified.png here")
    p.add_argument("--card", type=Path, help="model card for thresholds (default: beside a .tflite)")
    p.add_argument("--accelerator", choices=("auto", "edgetpu", "cpu"), default="cpu")
    p.add_argument("--split", type=Path, metavar="TRAIN_JSON",
                   help="only the validation files recorded in this *.train.json (from `pneumoflag train`)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from ..convert.evaluate import EvaluateConfig, evaluate, format_summary

    res = evaluate(EvaluateConfig(args.model, args.data, args.json_out, args.plots, args.card, args.accelerator,
                                  split=args.split))
    print(format_summary(res))
    if args.json_out:
        print(f"wrote {args.json_out}")
    for pth in res.get("plots", []):
        print(f"wrote {pth}")
    return 0



def _cli_error(message: str) -> Exception:
    from ..device.cli import CliError

    return CliError(message)
