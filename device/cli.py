"""The ``pneumoflag`` command: one entry point, a subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .config import EMBEDDED_BROKER, ExplainConfig, MqttConfig, PacsConfig
from .safe_text import EscapingFilter
from .samples import SAMPLES_DIR
from .vocab import ACCELERATORS, PRIORITIES

log = logging.getLogger("pneumoflag")

DEVICE_TITLE = "device (the appliance)"
CLOSING = """pneumoflag is a triage aid that orders the reading queue; it is not a
diagnostic device. Every image still gets read by a clinician."""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- device side


def _add_config_flags(p, mqtt: bool = True, state: bool = True, model: bool = True) -> None:
    """The configuration flags a command reads, and only those (``score`` offers no MQTT options)."""
    g = p.add_argument_group("configuration (file < PNEUMOFLAG_* environment < these flags)")
    g.add_argument("--config", type=Path, help="TOML config file (default /etc/pneumoflag/pneumoflag.toml if present)")
    if mqtt:
        g.add_argument("--broker", metavar="HOST:PORT", help=f"MQTT broker (default: embedded broker on {EMBEDDED_BROKER})")
        g.add_argument("--topic-prefix", help=f"MQTT topic prefix (default {MqttConfig().topic_prefix})")
        g.add_argument("--device-id", help="this appliance's id in topics (default: host name)")
    if state:
        g.add_argument("--state-dir", help="where the outbox and journal live")
    if model:
        g.add_argument("--model", help="int8 .tflite model with its card NAME.json beside it")
        g.add_argument("--accelerator", choices=ACCELERATORS, help="where the model runs")


def _overrides(args) -> dict:
    mapping = {"broker": "mqtt.broker", "topic_prefix": "mqtt.topic_prefix", "device_id": "mqtt.device_id",
               "state_dir": "state.dir", "model": "model.path", "accelerator": "model.accelerator",
               "dir": "watch.dir", "polling": "watch.polling", "recursive": "watch.recursive"}
    return {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr, None) not in (None, False)}


def _config(args, overrides: Optional[dict] = None):
    """The configuration, with its ``[log] level`` applied unless -v or -q was given (they win)."""
    from .config import load_config

    cfg = load_config(args.config, overrides=_overrides(args) if overrides is None else overrides)
    if not getattr(args, "verbose", 0) and not getattr(args, "quiet", False):
        logging.getLogger().setLevel(cfg.log.level.upper())
    return cfg


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
        "time, priority (highlighted), probability, file. A persistent session under a stable client id "
        "(QoS 1) delivers the flags sent while the terminal was away; it says when it loses and regains the broker.",
    )
    p.add_argument("--priority", choices=PRIORITIES[::-1], default="routine",
                   help="lowest priority to show (default: all)")
    p.add_argument("--errors", action="store_true", help="also show rejected files")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, help="exit after N messages")
    p.add_argument("--timeout", type=float, help="exit after this many seconds (also bounds the connection wait)")
    p.add_argument("--client-id", help="MQTT client id of this terminal's persistent session "
                   "(default pneumoflag-alerts-STATION_ID: flags sent while it is away arrive when it is back)")
    _add_config_flags(p, state=False, model=False)
    p.set_defaults(func=_cmd_alerts)


def _cmd_alerts(args) -> int:
    from .alerts import run_alerts
    from .config import EMBEDDED_BROKER

    cfg = _config(args)
    if not cfg.mqtt.broker:
        cfg.mqtt.broker = EMBEDDED_BROKER
    try:
        return run_alerts(cfg, args.priority, args.json, args.count, args.timeout, args.errors,
                          client_id=args.client_id)
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
    _add_config_flags(p, mqtt=False, state=False)
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


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="heat maps of where the model looked, as PNG overlays (occlusion sensitivity)",
        description="Decode and score each FILE as the daemon does, then write OUT/STEM.heatmap.png: the "
        "radiograph with an occlusion-sensitivity map of the int8 model (how much hiding each 24 px patch of "
        "the 128 px input lowers the evidence for the model's call), a colour bar, the probability, the priority "
        "and a 'not for diagnostic use' notice. --layers also writes OUT/STEM.layers.png, every conv block's "
        "activation maps from the float .keras model (needs the toolchain: TensorFlow). Exit status 1 when any "
        "file could not be explained; the others are still written.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs (made when missing)")
    p.add_argument("--layers", action="store_true",
                   help="also write a contact sheet of each conv block's activation maps (needs TensorFlow)")
    p.add_argument("--keras", type=Path, help="float model for --layers (default: the card's source model beside "
                   "the .tflite, else MODEL.keras)")
    p.add_argument("--size", type=int, help=f"overlay size in px, 256-1024 (default: explain.size, "
                   f"{ExplainConfig().size})")
    p.add_argument("--cmap", help=f"colour map: inferno, magma or viridis (default: explain.cmap, "
                   f"{ExplainConfig().cmap})")
    g = p.add_argument_group("configuration (file < PNEUMOFLAG_* environment < these flags)")
    g.add_argument("--config", type=Path, help="TOML config file (default /etc/pneumoflag/pneumoflag.toml if present)")
    g.add_argument("--model", help="int8 .tflite model with its card NAME.json beside it")
    g.add_argument("--accelerator", choices=ACCELERATORS, help="where the model runs")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    from .explain import COLORMAPS, explain_file
    from .pipeline import Pipeline
    from .preprocess import ImageDecodeError
    from .safe_text import printable
    from .scorer import load_scorer

    if args.cmap is not None and args.cmap not in COLORMAPS:
        raise CliError(f"--cmap must be one of {', '.join(COLORMAPS)}, not {args.cmap!r}")
    if args.size is not None and not 256 <= args.size <= 1024:
        raise CliError(f"--size must be 256..1024 px, not {args.size}")
    cfg = _config(args)
    size, cmap = args.size or cfg.explain.size, args.cmap or cfg.explain.cmap
    scorer, card = load_scorer(cfg.model.path, cfg.model.accelerator, cfg.model.threads)
    layers = None
    if args.layers:  # the toolchain, imported only for --layers; it says when TensorFlow is missing
        layers = _layers_plugin(Path(cfg.model.path), card, args.keras)
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(cfg, scorer, card)
    failed, seen = 0, {}
    for f in args.files:
        try:
            ex = explain_file(pipeline, f, size=size, cmap=cmap)
        except ImageDecodeError as exc:
            failed += 1
            print(f"pneumoflag explain: {exc.reason}: {printable(str(exc))}", file=sys.stderr)
            continue
        seen[f.stem] = seen.get(f.stem, 0) + 1
        stem = f.stem if seen[f.stem] == 1 else f"{f.stem}-{seen[f.stem]}"
        out = args.out / f"{stem}.heatmap.png"
        out.write_bytes(ex.png)
        h = ex.heat
        print(f"{printable(str(out))}  {ex.priority.upper():<8} p={h.probability:.4f}  evidence for {h.target}, "
              f"peak {float(h.values.max()):.2f} logit  ({h.invokes} invokes, {h.elapsed_ms:.0f} ms, {h.source})")
        if layers is not None:
            sheet = args.out / f"{stem}.layers.png"
            layers.write(ex.pixels, card.preprocessing, sheet, f"{f.name}: {card.name} {card.version}")
            print(printable(str(sheet)))
    return 1 if failed else 0


def _layers_plugin(model: Path, card, keras: Optional[Path]):
    """The toolchain's activation contact sheet, found through its entry point (the device never imports it)."""
    from importlib.metadata import entry_points

    eps = list(entry_points(group="pneumoflag.layers"))
    if not eps:
        raise CliError("--layers needs the model toolchain (the convert part of pneumoflag), which is not installed")
    try:
        return eps[0].load()(model, card, keras)
    except RuntimeError as exc:  # LayersUnavailable: no TensorFlow, no .keras beside the model
        raise CliError(str(exc)) from None


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print the effective configuration (secrets redacted)",
        description="Load the config file, PNEUMOFLAG_* environment variables and flags, check them, and print "
        "the result as TOML with secrets redacted. Exit status 2 names the first bad key.",
    )
    p.add_argument("dir", nargs="?", help="export folder")
    p.add_argument("--unit-dropin", action="store_true",
                   help="print instead a systemd drop-in for this configuration: the export (and archive) folder "
                   "paths and an IP allow-list with the broker's addresses; save it as "
                   "/etc/systemd/system/pneumoflag.service.d/site.conf")
    p.add_argument("--markdown", action="store_true",
                   help="print instead every key with its default and meaning, as the README's tables")
    _add_config_flags(p)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args) -> int:
    if args.markdown:
        from .config import reference_markdown

        print(reference_markdown(), end="")
        return 0
    cfg = _config(args)
    print(unit_dropin(cfg) if args.unit_dropin else cfg.to_toml(), end="")
    return 0


def unit_dropin(cfg) -> str:
    """The site-specific part of the systemd unit, derived from the configuration (never typed twice)."""
    import socket

    lines = ["# generated by `pneumoflag config --unit-dropin`; regenerate it after changing the configuration",
             "[Service]"]
    if cfg.watch.dir:
        if cfg.watch.archive_dir:  # scored files are moved: both folders must be writable
            lines.append(f"ReadWritePaths={cfg.watch.dir} {cfg.watch.archive_dir}")
        else:
            lines.append(f"ReadOnlyPaths={cfg.watch.dir}")
    if cfg.mqtt.broker:
        host, port = cfg.broker_host_port
        try:
            addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
        except OSError as exc:
            raise CliError(f"mqtt.broker {host}: cannot resolve it for the IP allow-list ({exc})") from None
        lines.append(f"# the MQTT broker {host}:{port}")
        lines.append("IPAddressAllow=" + " ".join(addrs))
    else:
        lines.append("# no mqtt.broker: the embedded broker on loopback, which the unit allows already")
    return "\n".join(lines) + "\n"


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="counts and time-to-notification figures from this appliance's records",
        description="Read the daemon's state database (read-only, also while it runs) and print, for the period: "
        "flags by priority and how many were acknowledged, errors by reason, p50/p95/max of each step from the "
        "image being written to a nursing station acknowledging it (written -> delivered is the "
        "time-to-notification), the urgent flags nobody has acknowledged yet, and the drift monitor's last state "
        "with its figures (device/drift.py).",
    )
    p.add_argument("--since", default="7d", help="the period, back from now: 7d (default), 24h, 90m, 3600s")
    p.add_argument("--json", dest="json_out", type=Path, help="also write the figures as JSON")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also draw histograms of written->delivered and delivered->acknowledged, and the drift "
                        "monitor's logit distribution against its reference (needs matplotlib)")
    p.add_argument("--config", type=Path, help="TOML config file (for state.dir)")
    p.add_argument("--state-dir", help="the daemon's state folder (default: state.dir from the config)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    import json as _json

    from .report import ReportError, build_report, format_report, parse_since, public, write_plots
    from .store import STATE_DB

    cfg = _config(args, overrides={"state.dir": args.state_dir})
    try:
        rep = build_report(Path(cfg.state.dir) / STATE_DB, parse_since(args.since))
        print(format_report(rep))
        if args.json_out:
            args.json_out.write_text(_json.dumps(public(rep), indent=2) + "\n")
            print(f"wrote {args.json_out}")
        if args.plots:
            for path in write_plots(rep, args.plots):
                print(f"wrote {path}")
    except ReportError as exc:
        raise CliError(str(exc)) from None
    return 0


def _add_bench(sub) -> None:
    default_images = SAMPLES_DIR
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
    p.add_argument("--keras", type=Path, help="float Keras model for the source path (default: the members the "
                   "card names beside MODEL, else MODEL.keras)")
    p.add_argument("--broker", default="auto",
                   help="HOST:PORT, 'embedded', or 'auto' (a private mosquitto if installed, else embedded)")
    p.add_argument("--burst", type=int, default=500, help="files in the burst (default 500)")
    p.add_argument("--repeats", type=int, default=10, help="repeats per image for stage timings")
    p.add_argument("--e2e-rounds", type=int, default=5, help="passes over the images for end-to-end latency")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU measurement window")
    p.add_argument("--no-source", dest="source", action="store_false", help="skip the Keras source path")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip the heat-map figures (their cost, and the end-to-end latency with maps on)")
    p.add_argument("--stages-only", action="store_true",
                   help="only the per-stage latency (decode, preprocess, infer): no daemon, no broker, no source path")
    p.add_argument("--json", dest="json_out", type=Path, help="also write the figures as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json as _json

    from .bench import BenchConfig, format_report, run_bench
    from .config import default_model_path

    cfg = BenchConfig(images=args.images, model=args.model or Path(default_model_path()), broker=args.broker,
                      burst=args.burst, repeats=args.repeats, e2e_rounds=args.e2e_rounds,
                      idle_seconds=args.idle_seconds, keras=args.keras, source=args.source and not args.stages_only,
                      stages_only=args.stages_only, explain=args.explain)
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
    p.add_argument("--pacs", action="store_true",
                   help="check only the DICOM network path: a C-ECHO to each pacs.destinations entry, and (with "
                        "dicom_net.enabled) that the receiver's port can be bound or answers C-ECHO")
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
    if args.pacs:
        st.run_pacs()
    else:
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
        return run_demo(cfg, args.samples or default_samples_dir(), args.export_dir, args.interval,
                        state_dir=Path(args.state_dir) if args.state_dir else None)
    except (StartupError, ConnectionError) as exc:
        raise CliError(str(exc)) from None


def _add_dicom_echo(sub) -> None:
    p = sub.add_parser(
        "dicom-echo",
        help="check the DICOM network path to a PACS or modality (C-ECHO)",
        description="Open a DICOM association with PEER and send a C-ECHO (the DICOM ping): it checks the "
        "network path, the AE titles on both sides and the peer's DICOM service in one round. PEER is "
        "AE@HOST:PORT (the peer's AE title, e.g. PACS@10.0.0.5:104) or HOST:PORT (called ANY-SCP, which many "
        "PACS accept). Prints one line; exit status 0 when the peer answers success, 1 when it does not "
        "(refused connection, rejected association with its reason, no answer within --timeout).",
    )
    p.add_argument("peer", metavar="[AE@]HOST:PORT", help="the DICOM node to check")
    p.add_argument("--calling-ae", help="the AE title to call with (default: pacs.calling_ae, "
                   f"{PacsConfig().calling_ae}); a peer that checks callers must know it")
    p.add_argument("--timeout", type=float, help="seconds for the connection, the association and the answer "
                   f"(default: pacs.timeout_seconds, {PacsConfig().timeout_seconds:g})")
    p.add_argument("--config", type=Path, help="TOML config file (for [pacs])")
    p.set_defaults(func=_cmd_dicom_echo)


def _cmd_dicom_echo(args) -> int:
    from .config import ConfigError, check_ae_title
    from .pacs import DEFAULT_CALLED_AE, Destination, echo

    cfg = _config(args, overrides={})
    try:
        dest = Destination.parse(args.peer, "PEER", default_ae=DEFAULT_CALLED_AE)
        calling = check_ae_title(args.calling_ae, "--calling-ae") if args.calling_ae else cfg.pacs.calling_ae
        timeout = args.timeout if args.timeout is not None else cfg.pacs.timeout_seconds
        if not timeout > 0:
            raise ConfigError(f"--timeout must be greater than 0, not {timeout:g}")
    except ConfigError as exc:  # exit status 1 as for a failed echo: the check did not pass
        print(f"pneumoflag dicom-echo: error: {exc}", file=sys.stderr)
        return 1
    result = echo(dest, calling, timeout)
    print(("ok: " if result.ok else "failed: ") + result.message, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


#: Other packages add subcommands (the model toolchain does) through this entry-point group;
#: the device never imports them by name.
PLUGIN_GROUP = "pneumoflag.commands"


def _plugins() -> list:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name)


def _command_list(groups: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """The subcommands under their group titles, each with its parser's own one-line help (said once)."""
    width = max((len(name) for _, cmds in groups for name, _ in cmds), default=0) + 2
    wrap = textwrap.TextWrapper(width=100, initial_indent="", subsequent_indent=" " * (width + 2))
    blocks = []
    for title, cmds in groups:
        lines = [f"{title}:"] + [wrap.fill(f"  {name:<{width}}{text}") for name, text in cmds]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks + [CLOSING])


def build_parser() -> tuple[argparse.ArgumentParser, tuple[type[BaseException], ...]]:
    """The parser, and the exception types the plugin commands raise for their users.

    argparse would list the subcommands once more under "positional arguments"; the grouped list in the
    epilog is the one list, made from each subcommand's ``help``.
    """
    parser = argparse.ArgumentParser(
        prog="pneumoflag",
        description="Edge pneumonia triage for chest X-rays: score each new radiograph with an "
        "int8 CNN on the local accelerator and publish prioritised flags over MQTT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoflag {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one of the commands listed below")
    for add in SUBCOMMANDS:
        add(sub)
    groups = [(DEVICE_TITLE, _listed(sub, 0))]
    errors: list[type[BaseException]] = []
    for ep in _plugins():
        before = len(sub._choices_actions)
        try:
            reg = ep.load()(sub)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the device CLI down
            log.warning("subcommands from %s not available: %s", ep.value, exc)
            continue
        groups.append((reg.get("title", ep.name), _listed(sub, before)))
        errors.extend(reg.get("errors", ()))
    sub._choices_actions = []  # listed once, in the epilog
    parser.epilog = _command_list(groups)
    return parser, tuple(errors)


def _listed(sub, start: int) -> list[tuple[str, str]]:
    """(name, help) of the subcommands added since ``start``."""
    return [(a.dest, a.help or "") for a in sub._choices_actions[start:]]


SUBCOMMANDS: list[Callable] = [_add_demo, _add_watch, _add_alerts, _add_score, _add_explain, _add_config,
                               _add_selftest, _add_bench, _add_report, _add_dicom_echo]


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # a file name cannot forge a log line or a terminal escape
        handler.addFilter(EscapingFilter())
    if verbose < 2:
        for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # its errors (a refused connection, a rejected association) say in its words what ours say after it
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, plugin_errors = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
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
    except (CliError, CardError, RuntimeUnavailable, ImageDecodeError, ConfigError, *plugin_errors) as exc:
        print(f"pneumoflag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, full disk, unreadable input folder...
        print(f"pneumoflag {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
