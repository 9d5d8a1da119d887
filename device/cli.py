"""The ``pneumoflag`` command: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__

log = logging.getLogger("pneumoflag")

EPILOG = """\
device (the appliance):
  demo       the whole flow in one command, on the bundled samples
  watch      the main job: export folder -> score -> MQTT flags
  alerts     print flags as they arrive (nursing-station terminal)
  score      score files now, print the results
  config     print the effective configuration
  selftest   on-site check of hardware, model, samples, latency, broker
  bench      latency, throughput, memory and idle CPU figures

model toolchain (needs the 'convert' extra: pip install 'pneumoflag[convert]'):
  train      train the reduced-node CNN on a NORMAL/ PNEUMONIA/ folder
  convert    quantize a Keras/SavedModel model to full-int8 TFLite + model card
  evaluate   AUROC and operating-point figures of a model on a labelled folder

pneumoflag is a triage aid that orders the reading queue; it is not a
diagnostic device. Every image still gets read by a clinician.
"""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_train(sub) -> None:
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


def _add_convert(sub) -> None:
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
        raise CliError("--num-calibration must be at least 1")
    try:
        res = convert(cfg)
    except ConvertError as exc:
        raise CliError(str(exc)) from None
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
        raise CliError(res["edgetpu_error"])
    if card.get("edgetpu"):
        print(f"wrote {args.out.parent / card['edgetpu']['file']} and {card['edgetpu']['log']}")
    return 0


def _add_evaluate(sub) -> None:
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


# ----------------------------------------------------------------------------- device side


def _add_config_flags(p, daemon: bool = True) -> None:
    g = p.add_argument_group("configuration (file < PNEUMOFLAG_* environment < these flags)")
    g.add_argument("--config", type=Path, help="TOML config file (default /etc/pneumoflag/pneumoflag.toml if present)")
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (default: embedded broker on 127.0.0.1:1883)")
    g.add_argument("--topic-prefix", help="MQTT topic prefix (default pneumoflag)")
    g.add_argument("--device-id", help="this appliance's id in topics (default: host name)")
    if daemon:
        g.add_argument("--state-dir", help="where the outbox and journal live")
        g.add_argument("--model", help="int8 .tflite model with its card NAME.json beside it")
        g.add_argument("--accelerator", choices=("auto", "edgetpu", "cpu"), help="where the model runs")


def _overrides(args) -> dict:
    mapping = {"broker": "mqtt.broker", "topic_prefix": "mqtt.topic_prefix", "device_id": "mqtt.device_id",
               "state_dir": "state.dir", "model": "model.path", "accelerator": "model.accelerator",
               "dir": "watch.dir", "polling": "watch.polling", "recursive": "watch.recursive"}
    return {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) not in (None, False)}


def _config(args):
    from .config import load_config

    return load_config(args.config, overrides=_overrides(args))


def _add_watch(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="the main job: watch the export folder, score new images, publish flags",
        description="Watch DIR (the X-ray system's export folder) for new JPEG, PNG and DICOM images, score each "
        "with the int8 model on the Edge TPU or CPU, and publish urgent/flag/routine results over MQTT. Results "
        "are journaled and kept in a durable outbox until the broker acknowledges them. With no broker "
        "configured, an embedded broker starts on 127.0.0.1:1883.",
    )
    p.add_argument("dir", nargs="?", help="export folder (default: watch.dir from the config)")
    p.add_argument("--recursive", action="store_true", help="also watch subfolders")
    p.add_argument("--polling", action="store_true", help="poll instead of OS events (SMB/NFS shares)")
    p.add_argument("--once", action="store_true", help="score the files already there, then exit")
    p.add_argument("--exit-after", type=int, metavar="N", help="exit after N files are scored or rejected")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_watch)


def _cmd_watch(args) -> int:
    from .daemon import Daemon, StartupError

    cfg = _config(args)
    try:
        return Daemon(cfg, exit_after=args.exit_after, once=args.once).run()
    except StartupError as exc:
        raise CliError(str(exc)) from None


def _add_alerts(sub) -> None:
    p = sub.add_parser(
        "alerts",
        help="print flags as they arrive (nursing-station terminal)",
        description="Subscribe to the flags of every appliance under the topic prefix and print them: "
        "time, priority (highlighted), probability, file.",
    )
    p.add_argument("--priority", choices=("routine", "flag", "urgent"), default="routine",
                   help="lowest priority to show (default: all)")
    p.add_argument("--errors", action="store_true", help="also show rejected files")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, help="exit after N messages")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    _add_config_flags(p, daemon=False)
    p.set_defaults(func=_cmd_alerts)


def _cmd_alerts(args) -> int:
    from .alerts import run_alerts

    cfg = _config(args)
    if not cfg.mqtt.broker:
        cfg.mqtt.broker = "127.0.0.1:1883"
    try:
        return run_alerts(cfg, args.priority, args.json, args.count, args.timeout, args.errors)
    except ConnectionError as exc:
        raise CliError(str(exc)) from None


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score image files now and print the results (no MQTT)",
        description="Score each FILE with the configured model and print probability and priority. "
        "Exit status 1 when any file could not be scored.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_score)


def _cmd_score(args) -> int:
    import json as _json

    from .pipeline import Pipeline, score_file
    from .preprocess import ImageDecodeError
    from .scorer import load_scorer

    cfg = _config(args)
    scorer, card = load_scorer(cfg.model.path, cfg.model.accelerator, cfg.model.threads)
    pipeline = Pipeline(cfg, scorer, card)
    failed = 0
    for f in args.files:
        try:
            msg = score_file(pipeline, f)
        except ImageDecodeError as exc:
            failed += 1
            if args.json:
                print(_json.dumps({"file": str(f), "error": exc.reason, "message": str(exc)}))
            else:
                print(f"{str(f):<50} ERROR    {exc}")
            continue
        if args.json:
            d = msg.to_dict()
            d["file"] = str(f)
            print(_json.dumps(d))
        else:
            print(f"{str(f):<50} {msg.priority.upper():<8} p={msg.probability:.4f}  "
                  f"({msg.timings_ms.total:.1f} ms on {msg.accelerator})")
    return 1 if failed else 0


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print the effective configuration (secrets redacted)",
        description="Load the config file, PNEUMOFLAG_* environment variables and flags, check them, and print "
        "the result as TOML with secrets redacted. Exit status 2 names the first bad key.",
    )
    p.add_argument("dir", nargs="?", help="export folder")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args) -> int:
    print(_config(args).to_toml(), end="")
    return 0


def _add_bench(sub) -> None:
    default_images = Path(__file__).resolve().parent.parent / "tests" / "data" / "samples"
    p = sub.add_parser(
        "bench",
        help="measure latency, throughput, memory and idle CPU (prints figures)",
        description="Benchmark on this machine: per-stage latency on full-resolution images, end-to-end latency "
        "from file close to broker delivery through the real daemon, a burst of N files, the daemon's peak "
        "RSS and idle CPU, and the source notebooks' Keras float path for comparison.",
    )
    p.add_argument("--images", type=Path, default=default_images if default_images.is_dir() else None,
                   required=not default_images.is_dir(), help="folder of JPEG/PNG images (default: the sample set)")
    p.add_argument("--model", type=Path, help="int8 .tflite (default: the shipped model)")
    p.add_argument("--keras", type=Path, help="float Keras model for the source path (default: MODEL.keras)")
    p.add_argument("--broker", default="auto",
                   help="HOST:PORT, 'embedded', or 'auto' (a private mosquitto if installed, else embedded)")
    p.add_argument("--burst", type=int, default=500, help="files in the burst (default 500)")
    p.add_argument("--repeats", type=int, default=10, help="repeats per image for stage timings")
    p.add_argument("--e2e-rounds", type=int, default=5, help="passes over the images for end-to-end latency")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measurement window")
    p.add_argument("--no-source", dest="source", action="store_false", help="skip the Keras source path")
    p.add_argument("--json", dest="json_out", type=Path, help="also write the figures as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json as _json

    from .bench import BenchConfig, format_report, run_bench
    from .config import default_model_path

    cfg = BenchConfig(images=args.images, model=args.model or Path(default_model_path()), broker=args.broker,
                      burst=args.burst, repeats=args.repeats, e2e_rounds=args.e2e_rounds,
                      idle_seconds=args.idle_seconds, keras=args.keras, source=args.source)
    res = run_bench(cfg)
    print(format_report(res))
    if args.json_out:
        args.json_out.write_text(_json.dumps(res, indent=2) + "\n")
    return 0


def _add_selftest(sub) -> None:
    p = sub.add_parser(
        "selftest",
        help="on-site check: runtime, accelerator, model integrity, sample images, latency, broker",
        description="Prove on this hardware that the appliance is fit to go live: the runtime and Edge TPU "
        "delegate, the model against its card, the state and export folders, the sample radiographs against "
        "their reference probabilities, latency, and (with a broker) one message round trip. Prints a "
        "PASS/FAIL table; exit status 1 on any FAIL.",
    )
    p.add_argument("--samples", type=Path, help="sample images (default: the bundled set)")
    p.add_argument("--reference", type=Path, help="reference probabilities (default: SAMPLES/reference.json)")
    p.add_argument("--repeats", type=int, default=20, help="latency runs per sample (default 20)")
    p.add_argument("--max-latency-ms", type=float, default=100.0, help="fail when the p50 is above (default 100)")
    p.add_argument("--skip-broker", action="store_true", help="no broker round trip even if one is configured")
    p.add_argument("--write-reference", type=Path, metavar="FILE",
                   help="score the samples and write them as the reference (run on the CPU), then exit")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_selftest)


def _cmd_selftest(args) -> int:
    from .pipeline import Pipeline
    from .scorer import load_scorer
    from .selftest import REFERENCE_NAME, SelfTest, default_samples_dir, write_reference

    cfg = _config(args)
    samples = args.samples or default_samples_dir()
    if args.write_reference:
        if cfg.model.accelerator != "cpu":
            raise CliError("write the reference on the CPU: add --accelerator cpu")
        scorer, card = load_scorer(cfg.model.path, "cpu", cfg.model.threads)
        ref = write_reference(Pipeline(cfg, scorer, card), samples, args.write_reference)
        print(f"wrote {args.write_reference}: {len(ref['samples'])} samples, {ref['runtime']}, "
              f"model {card.name} {card.version}")
        return 0
    broker = None if args.skip_broker else (cfg.mqtt.broker or None)
    st = SelfTest(cfg, samples, args.reference or samples / REFERENCE_NAME, args.repeats, broker, args.max_latency_ms)
    st.run()
    print(st.table())
    return 0 if st.passed else 1


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole flow in one command: daemon + embedded broker + sample images, alerts printed",
        description="Start the daemon on a fresh export folder (embedded MQTT broker unless --broker), drop "
        "the bundled sample radiographs in like a scanner export, print each alert as it arrives over MQTT, "
        "and exit when all are scored.",
    )
    p.add_argument("--samples", type=Path, help="images to drop in (default: the bundled sample set)")
    p.add_argument("--export-dir", type=Path, help="export folder to use (default: a temporary one)")
    p.add_argument("--interval", type=float, default=0.3, help="seconds between drops (default 0.3)")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .daemon import StartupError
    from .demo import quiet_logging, run_demo
    from .selftest import default_samples_dir

    quiet_logging(args.verbose)
    cfg = _config(args)
    try:
        return run_demo(cfg, args.samples or default_samples_dir(), args.export_dir, args.interval)
    except (StartupError, ConnectionError) as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumoflag",
        description="Edge pneumonia triage for chest X-rays: score each new radiograph with an "
        "int8 CNN on the local accelerator and publish prioritised flags over MQTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoflag {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


SUBCOMMANDS: list[Callable] = [_add_demo, _add_watch, _add_alerts, _add_score, _add_config, _add_selftest, _add_bench,
                               _add_train, _add_convert, _add_evaluate]


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if verbose < 2:
        for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    from ..convert.dataset import DataError
    from .card import CardError
    from .config import ConfigError
    from .preprocess import ImageDecodeError
    from .runtime import RuntimeUnavailable

    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("tensorflow", "keras", "matplotlib"):
            print(f"pneumoflag {args.command}: needs {exc.name}, which is not installed: "
                  "pip install 'pneumoflag[convert]'", file=sys.stderr)
            return 2
        raise
    except (CliError, DataError, CardError, RuntimeUnavailable, ImageDecodeError, ConfigError) as exc:
        print(f"pneumoflag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, full disk, unreadable input folder...
        print(f"pneumoflag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
