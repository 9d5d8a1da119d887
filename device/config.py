"""Daemon configuration: TOML file < ``PNEUMOFLAG_*`` environment < command-line flags.

Every key is declared here with its type; unknown keys and bad values stop the
daemon at start with the key named, the way Mosquitto refuses a bad config
line, instead of surfacing at 3 a.m. as a runtime error.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import sys
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .contract import Topics
from .vocab import ACCELERATORS, COLORMAPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/pneumoflag/pneumoflag.toml")
ENV_PREFIX = "PNEUMOFLAG_"
#: where `watch` starts its embedded broker when none is configured (and where `alerts` looks then)
EMBEDDED_BROKER = "127.0.0.1:1883"
#: one station.allowed_hosts entry: NAME, IPv4 or [IPv6], then an optional :PORT
HOST_ENTRY = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
REDACTED = "********"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _default_state_dir() -> str:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/pneumoflag"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "pneumoflag")


def default_model_path() -> str:
    """The model shipped inside the package (``pneumoflag.models``)."""
    try:
        from importlib.resources import files

        return str(files("pneumoflag.models") / "pneumoflag-rn128.tflite")
    except (ModuleNotFoundError, TypeError):
        return str(Path(__file__).resolve().parent.parent / "models" / "pneumoflag-rn128.tflite")


def setting(default: Any = MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
            shown: Optional[str] = None, above: Optional[float] = None, min: Optional[float] = None,
            max: Optional[float] = None, unit: str = "", choices: Optional[Sequence[str]] = None,
            secret: bool = False) -> Any:
    """One configuration key: its default, a one-line ``help``, and the bounds ``_validate`` enforces.

    ``above`` is an exclusive lower bound, ``min``/``max`` inclusive ones; ``shown`` is the default as the
    README states it when the value depends on the machine (``factory``); a list default is copied per
    instance. Everything about a key is said here once: validation, ``pneumoflag config`` and the README
    tables (``pneumoflag config --markdown``) read it.
    """
    meta = {"help": help, "shown": shown, "above": above, "min": min, "max": max, "unit": unit,
            "choices": tuple(choices) if choices is not None else None, "secret": secret}
    if factory is None and isinstance(default, list):
        factory = functools.partial(list, default)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_STATE_DEFAULT = "`$STATE_DIRECTORY` (systemd), else `/var/lib/pneumoflag` as root, else `~/.local/state/pneumoflag`"


@dataclass
class WatchConfig:
    dir: str = setting("", "the X-ray system's export folder")
    recursive: bool = setting(False, "also watch the folders below it")
    polling: bool = setting(False, "poll instead of inotify: for SMB/NFS shares, where inotify sees nothing")
    poll_interval: float = setting(2.0, "seconds between polls", above=0)
    settle_seconds: float = setting(1.0, "a file whose size and mtime stay unchanged this long counts as written "
                                         "(when no close event comes)", min=0)
    incomplete_timeout: float = setting(10.0, "seconds of quiet after which a file that still fails to decode is "
                                              "rejected", min=0)
    archive_dir: str = setting("", "move scored files here; empty: leave them")
    max_file_mb: float = setting(100.0, "a larger file is refused as too-large, unread", above=0)
    max_pixels: int = setting(60_000_000, "more pixels is refused as decompression-bomb (chest radiographs: "
                                          "up to about 15 MP)", above=0)
    max_decode_mb: float = setting(96.0, "memory one decode may take, budgeted from the header; more is too-large",
                                   above=0)
    max_decode_seconds: float = setting(10.0, "time one decode may take, in the worker process; more is too-slow",
                                        above=0)
    ignore: list = setting(["*.part", "*.tmp", "~*", ".*", "*.crdownload", "*.swp"],
                           "names never taken, in any letter case: temporary and hidden files")
    backlog: bool = setting(True, "at start, score files that arrived while the daemon was down, oldest first")
    rescan_interval: float = setting(300.0, "look for files the watcher missed this often, in seconds (0: never); "
                                            "also after lost events", min=0)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 2**20)


@dataclass
class ModelConfig:
    path: str = setting(help="an int8 .tflite with its card NAME.json beside it", factory=default_model_path,
                        shown="the bundled model")
    accelerator: str = setting("auto", "where the model runs (auto: the Edge TPU when usable, else the CPU)",
                               choices=ACCELERATORS)
    threads: int = setting(2, "CPU threads of the interpreter for a file on its own", above=0)
    burst_threads: int = setting(1, "CPU threads while more files wait (a burst: the decoder worker has the other "
                                    "core); the watch daemon keeps a second interpreter for it when it differs",
                                 above=0)


@dataclass
class MqttConfig:
    broker: str = setting("", f"HOST:PORT of the broker; empty: start the embedded broker on {EMBEDDED_BROKER}")
    topic_prefix: str = setting("pneumoflag", "the first topic level")
    device_id: str = setting(help="this appliance's id in topics", shown="host name",
                             factory=lambda: socket.gethostname().split(".")[0] or "pneumoflag")
    client_id: str = setting("", "the MQTT client id", shown="`pneumoflag-<device_id>`")
    protocol: str = setting("3.1.1", "MQTT protocol version", choices=("3.1.1", "5"))
    keepalive: int = setting(30, "seconds between pings while idle", above=0)
    username: str = setting("", "user name at the broker")
    password: str = setting("", "prefer password_file or PNEUMOFLAG_MQTT_PASSWORD; never logged", secret=True)
    password_file: str = setting("", "a file holding the password")
    tls: bool = setting(False, "connect with TLS")
    ca_file: str = setting("", "CA certificate(s) the broker's certificate is checked against (needs tls)")
    cert_file: str = setting("", "client certificate (with key_file)")
    key_file: str = setting("", "client certificate's private key (with cert_file)")
    tls_insecure: bool = setting(False, "skip the broker's host-name check (test rigs only)")
    stats_interval: float = setting(60.0, "seconds between stats messages", above=0)
    reconnect_min: float = setting(1.0, "first reconnect delay, seconds; doubled up to reconnect_max", above=0)
    reconnect_max: float = setting(60.0, "longest reconnect delay, seconds", above=0)


@dataclass
class DicomConfig:
    include_patient_identifiers: bool = setting(False, "publish patient name and ID in flags")
    accept_modalities: list = setting(["CR", "DX"], "DICOM modalities scored; others are dicom-modality")
    accept_body_parts: list = setting(["CHEST"], "body parts scored; others are dicom-body-part")
    accept_views: list = setting(["PA", "AP"], "ViewPosition values scored, when the tag is present")
    study_quiet_seconds: float = setting(120.0, "a study (images sharing a StudyInstanceUID) is closed, and its SR "
                                                "queued for PACS, after this long without a new image of it",
                                         above=0)


@dataclass
class GateConfig:
    """The plausibility gate before the model (see device/gate.py): what no chest radiograph looks like."""

    enabled: bool = setting(True, "refuse what is not a chest radiograph before the model sees it")
    min_side: int = setting(128, "shorter side, pixels", above=0)
    max_aspect: float = setting(2.5, "longer side / shorter side", above=0)
    min_dynamic_range: float = setting(40.0, "1st-99th percentile grey range at the model's size, of 255")
    min_smoothness: float = setting(0.5, "neighbour-pixel correlation at the model's size (noise is near 0)")
    strict_jpeg: bool = setting(True, "refuse JPEGs whose data stream the decoder had to repair (corrupt)")
    min_detail: float = setting(0.03, "mean absolute Laplacian / std at the model's size: a gradient or a blob "
                                      "has none", min=0)
    max_uniform: float = setting(0.5, "share of the most common grey level: a document or a screenshot", above=0)
    min_template_similarity: float = setting(0.2, "layout against the card's mean training radiograph "
                                                  "(an inverted image is negative)")


@dataclass
class StateConfig:
    dir: str = setting(help="outbox and journal (SQLite)", factory=_default_state_dir, shown=_STATE_DEFAULT)


@dataclass
class LogConfig:
    level: str = setting("info", "log level, unless -v or -q is given", choices=("debug", "info", "warning", "error"))


@dataclass
class ExplainConfig:
    """Heat maps (device/explain.py). Off by default: a map directs a reader's eye, which a triage aid
    must not do unasked."""

    enabled: bool = setting(False, "a heat map for each flag and urgent image, after its flag is published")
    size: int = setting(384, "side of the overlay", min=256, max=512, unit="pixels")
    cmap: str = setting("inferno", "colour map of the overlay", choices=COLORMAPS)


@dataclass
class AlertsConfig:
    escalate_after: float = setting(300.0, "re-publish an urgent flag nobody acknowledged after this many seconds",
                                    above=0)
    max_escalations: int = setting(3, "at most this many times per flag (0: never escalate)", min=0)


@dataclass
class DriftConfig:
    """The drift monitor (device/drift.py): what the device scores against its card's ``drift_reference``."""

    enabled: bool = setting(True, "compare what the device scores with its card's drift_reference; the state goes "
                                  "to …/drift, stats and the log")
    window: int = setting(200, "the last this many images (scored or refused) are compared", min=10)
    min_images: int = setting(50, "fewer scored images in the window: too few to judge the distributions", min=5)
    max_age_hours: float = setting(168.0, "images older than this leave the window", above=0)


@dataclass
class StationConfig:
    """The nursing-station console (``pneumoflag station``); it may run on another machine of the ward."""

    listen: str = setting("127.0.0.1:8080", "address of the page; anything but loopback needs `password_file` or "
                                            "`insecure`")
    station_id: str = setting(help="this station's name in acks, its client id and its database", shown="host name",
                              factory=lambda: socket.gethostname().split(".")[0] or "station")
    password_file: str = setting("", "the console's password (at least 8 characters); also accepted as a bearer "
                                     "token")
    insecure: bool = setting(False, "allow a non-loopback `listen` without a password")
    chime: bool = setting(True, "sound for a new urgent or escalated flag")
    db: str = setting("", "the worklist", shown="`STATE/station-<station_id>.db`")
    silent_after: float = setting(180.0, "seconds without stats before an online appliance shows as silent",
                                  above=0)
    allowed_hosts: list = setting([], "more names the page answers to (`NAME` or `NAME:PORT`), e.g. a reverse "
                                      "proxy's public name")
    login_failures: int = setting(5, "wrong passwords (form or bearer token) one client address may send per "
                                     "`login_window`", above=0)
    login_failures_total: int = setting(30, "wrong passwords from all clients together per `login_window`", above=0)
    login_window: float = setting(60.0, "seconds over which wrong passwords are counted; a lock-out ends as they "
                                        "age out", above=0)


#: the one AE title wildcard: ``dicom_net.allowed_callers = ["*"]`` accepts any calling AE (logged at start)
ANY_CALLER = "*"


@dataclass
class DicomNetConfig:
    """The DICOM C-STORE receiver (device/dicom_net.py). Off by default; unknown callers are refused."""

    enabled: bool = setting(False, "`watch` also receives radiographs over DICOM C-STORE, spooled in the state "
                                   "folder and scored like dropped files")
    listen: str = setting("0.0.0.0:11112", "HOST:PORT the receiver listens on")
    ae_title: str = setting("PNEUMOFLAG", "this appliance's AE title (1-16 characters)")
    allowed_callers: list = setting([], "calling AE titles accepted at association (needed when enabled: "
                                        "empty would refuse every caller); `*` accepts any, logged as a warning")
    allowed_addresses: list = setting([], "peer addresses or networks (`10.0.4.0/24`) accepted; empty: any address")
    timeout_seconds: float = setting(30.0, "association, DIMSE and network timeout: a slow or dead peer is dropped",
                                     above=0)
    max_associations: int = setting(8, "concurrent associations; more are refused as busy", above=0)


@dataclass
class PacsConfig:
    """Where results go back as DICOM (device/pacs.py)."""

    destinations: list = setting([], "C-STORE destinations as `AE@HOST:PORT`: each scored DICOM image's SR goes to "
                                     "every one, in order, through a durable outbox")
    calling_ae: str = setting("PNEUMOFLAG", "the AE title this appliance calls with")
    timeout_seconds: float = setting(30.0, "connection, association and DIMSE timeout of one send", above=0)
    send_heatmap: bool = setting(False, "also send the heat map (flag and urgent DICOM images; needs "
                                        "explain.enabled) as a Secondary Capture in its own series, after the SR")


@dataclass
class Config:
    watch: WatchConfig = field(default_factory=WatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    state: StateConfig = field(default_factory=StateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    station: StationConfig = field(default_factory=StationConfig)
    dicom_net: DicomNetConfig = field(default_factory=DicomNetConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    source: str = "defaults"
    #: where each setting that is not a default came from: (section, key) -> file, variable or "command line"
    origins: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    @property
    def broker_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.mqtt.broker, "mqtt.broker")

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"pneumoflag-{self.mqtt.device_id}"

    @property
    def topics(self) -> Topics:
        """This device's topics (the contract builds them all)."""
        return Topics(self.mqtt.topic_prefix, self.mqtt.device_id)

    def mqtt_password(self) -> Optional[str]:
        if self.mqtt.password_file:
            try:
                return Path(self.mqtt.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.mqtt.password_file} ({exc.strerror})") from None
        return self.mqtt.password or None

    def redacted(self) -> dict[str, Any]:
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        for sec, key in SECRET_KEYS:
            if d[sec].get(key):
                d[sec][key] = REDACTED
        return d

    def to_toml(self) -> str:
        sources = sorted(set(self.origins.values()))
        lines = ["# effective configuration; secrets redacted",
                 f"# from: {', '.join(sources) if sources else 'defaults only'} (each changed key says where from)"]
        for sec, values in self.redacted().items():
            lines.append(f"\n[{sec}]")
            for f in fields(SECTIONS[sec]):
                origin = self.origins.get((sec, f.name))
                lines.append(f"# {_plain(describe(f))}")
                lines.append(f"{f.name} = {_toml_value(values[f.name])}" + (f"  # from {origin}" if origin else ""))
        return "\n".join(lines) + "\n"


SECTIONS = {"watch": WatchConfig, "model": ModelConfig, "mqtt": MqttConfig, "dicom": DicomConfig,
            "state": StateConfig, "log": LogConfig, "gate": GateConfig, "explain": ExplainConfig,
            "alerts": AlertsConfig, "drift": DriftConfig,
            "station": StationConfig, "dicom_net": DicomNetConfig, "pacs": PacsConfig}
#: the keys whose value is never shown (``pneumoflag config`` redacts them, errors leave them out)
SECRET_KEYS = {(sec, f.name) for sec, cls in SECTIONS.items() for f in fields(cls) if f.metadata["secret"]}


def describe(f: Field) -> str:
    """A key's help with its choices and bounds, as ``pneumoflag config`` and the README state them."""
    m, notes = f.metadata, []
    if m["choices"] is not None:
        notes.append("one of " + ", ".join(f"`{c}`" for c in m["choices"]))
    unit = f" {m['unit']}" if m["unit"] else ""
    if m["above"] is not None:
        notes.append(f"> {m['above']:g}{unit}")
    if m["min"] is not None and m["max"] is not None:
        notes.append(f"{m['min']:g}-{m['max']:g}{unit}")
    elif m["min"] is not None:
        notes.append(f"≥ {m['min']:g}{unit}")
    elif m["max"] is not None:
        notes.append(f"≤ {m['max']:g}{unit}")
    text = m["help"]
    if notes and text.endswith(")"):  # one parenthesis, not two in a row
        return f"{text[:-1]}; {'; '.join(notes)})"
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _plain(text: str) -> str:
    return text.replace("`", "")


def shown_default(f: Field) -> str:
    """The default as a README cell: the value in code format, blank when empty, ``shown`` when set."""
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    v = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
    if v in ("", []):
        return ""
    if isinstance(v, float):
        return f"`{v:g}`"
    return f"`{v}`" if isinstance(v, str) else f"`{_toml_value(v)}`"


def reference_markdown(section: Optional[str] = None) -> str:
    """The README's configuration tables (``pneumoflag config --markdown``): one per section, blank-line apart."""
    tables = []
    for sec, cls in SECTIONS.items():
        if section not in (None, sec):
            continue
        rows = [f"| `[{sec}]` key | default | meaning |", "| --- | --- | --- |"]
        rows += [f"| `{f.name}` | {shown_default(f)} | {describe(f)} |" for f in fields(cls)]
        tables.append("\n".join(rows) + "\n")
    return "\n".join(tables)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_topic_level(key: str, v: str, topic: bool = True) -> None:
    """One level of an MQTT topic (or a client id), as the MQTT 3.1.1/5 rules allow it.

    A broker silently drops publishes under ``$``-topics and refuses a
    connection over a NUL, with nothing in our logs that says why: refuse at start.
    """
    if not v or v.strip() != v:
        raise ConfigError(f"{key}: {v!r} must be non-empty without surrounding spaces")
    bad = sorted({c for c in v if c in "+#/" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F})
    if bad:
        raise ConfigError(f"{key}: {v!r} contains {', '.join(repr(c) for c in bad)}; MQTT topics forbid '+', '#' "
                          "and control characters, and '/' would add a topic level")
    if topic and v.startswith("$"):
        raise ConfigError(f"{key}: {v!r} starts with '$': brokers reserve $-topics ($SYS) and drop what is "
                          "published there")
    try:
        size = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: {v!r} is not valid UTF-8") from None
    if size > 200:
        raise ConfigError(f"{key}: {size} bytes is too long (at most 200)")


def parse_host_port(value: str, key: str) -> tuple[str, int]:
    if "://" in value:
        scheme = value.split("://", 1)[0]
        raise ConfigError(f"{key}: {value!r}: give HOST:PORT without a scheme ({scheme}://); TLS is mqtt.tls = true")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {value!r} must be HOST:PORT, e.g. 127.0.0.1:1883")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port {port!r} is not a number") from None
    if not 0 < p < 65536:
        raise ConfigError(f"{key}: port {p} is out of range 1-65535")
    return host.strip("[]"), p


def _coerce(sec: str, key: str, value: Any, default: Any, origin: str) -> Any:
    """Check/convert one value to the type of its default; strings from the environment are parsed.

    A secret's value never appears in an error message.
    """
    where = f"{sec}.{key} (from {origin})"
    if (sec, key) in SECRET_KEYS:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string (quote it in TOML); the value is not shown")
        return value
    if isinstance(default, bool):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: {value!r} is not a boolean (true/false)")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not a boolean (true/false)")
        return value
    if isinstance(default, int):
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not an integer") from None
    if isinstance(default, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a number") from None
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {value!r} is not a list of strings")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string")
    return value


def _apply(cfg: Config, sec: str, key: str, value: Any, origin: str) -> None:
    if sec not in SECTIONS:
        raise ConfigError(f"unknown section [{sec}] (from {origin}); known: {', '.join(SECTIONS)}")
    section = getattr(cfg, sec)
    names = {f.name for f in fields(section)}
    if key not in names:
        raise ConfigError(f"unknown key {sec}.{key} (from {origin}); [{sec}] takes: {', '.join(sorted(names))}")
    setattr(section, key, _coerce(sec, key, value, getattr(section, key), origin))
    cfg.origins[(sec, key)] = origin


def _check_bounds(key: str, v: Any, m: Mapping[str, Any]) -> None:
    """The choices and bounds a key declares (:func:`setting`)."""
    if m["choices"] is not None and v not in m["choices"]:
        raise ConfigError(f"{key}: {v!r} is not one of {', '.join(m['choices'])}")
    if m["above"] is not None and v <= m["above"]:
        raise ConfigError(f"{key}: must be greater than {m['above']:g}")
    lo, hi, unit = m["min"], m["max"], f" {m['unit']}" if m["unit"] else ""
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise ConfigError(f"{key}: {v} must be between {lo:g} and {hi:g}{unit}")
    if lo == 0 and hi is None and v < 0:
        raise ConfigError(f"{key}: must not be negative")
    if lo is not None and v < lo:
        raise ConfigError(f"{key}: {v} must be at least {lo:g}{unit}")
    if hi is not None and v > hi:
        raise ConfigError(f"{key}: {v} must be at most {hi:g}{unit}")


def _validate(cfg: Config) -> None:
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            _check_bounds(f"{sec}.{f.name}", getattr(getattr(cfg, sec), f.name), f.metadata)
    if cfg.mqtt.broker:
        parse_host_port(cfg.mqtt.broker, "mqtt.broker")
    for key in ("topic_prefix", "device_id"):
        _check_topic_level(f"mqtt.{key}", getattr(cfg.mqtt, key))
    if cfg.mqtt.client_id:
        _check_topic_level("mqtt.client_id", cfg.mqtt.client_id, topic=False)
    if cfg.mqtt.reconnect_max < cfg.mqtt.reconnect_min:
        raise ConfigError("mqtt.reconnect_max must be >= mqtt.reconnect_min")
    if bool(cfg.mqtt.cert_file) != bool(cfg.mqtt.key_file):
        raise ConfigError("mqtt.cert_file and mqtt.key_file go together: give both or neither")
    if (cfg.mqtt.ca_file or cfg.mqtt.cert_file) and not cfg.mqtt.tls:
        raise ConfigError("mqtt.ca_file/cert_file are set but mqtt.tls = false; set mqtt.tls = true")
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        v = getattr(cfg.mqtt, key)
        if v and not Path(v).is_file():
            raise ConfigError(f"mqtt.{key}: {v} does not exist")
    parse_host_port(cfg.station.listen, "station.listen")
    for entry in cfg.station.allowed_hosts:
        if not HOST_ENTRY.match(entry):
            raise ConfigError(f"station.allowed_hosts: {entry!r} must be a host name or address with an optional "
                              ":PORT (e.g. station-desk-a.ward.example or [fd00::5]:8443), no scheme or path")
    if cfg.station.password_file and not Path(cfg.station.password_file).is_file():
        raise ConfigError(f"station.password_file: {cfg.station.password_file} does not exist")
    _validate_dicom_net(cfg)
    if cfg.watch.archive_dir and cfg.watch.dir and Path(cfg.watch.archive_dir).resolve() == Path(cfg.watch.dir).resolve():
        raise ConfigError("watch.archive_dir must differ from watch.dir")


def check_ae_title(value: str, key: str) -> str:
    """An AE title as DICOM PS3.5 allows it: 1-16 characters, no backslash or control characters; returned stripped.

    Leading and trailing spaces are not significant in an AE title, so they are dropped; one made only of spaces
    is empty. The message names ``key`` (a config key, or what the caller typed).
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not an AE title (a string)")
    title = value.strip(" ")
    bad = sorted({c for c in title if c == "\\" or ord(c) < 0x20 or ord(c) >= 0x7F})
    if bad:
        raise ConfigError(f"{key}: AE title {value!r} contains {', '.join(repr(c) for c in bad)}; an AE title is "
                          "1-16 printable ASCII characters without a backslash")
    if not 1 <= len(title) <= 16:
        raise ConfigError(f"{key}: AE title {value!r} must be 1-16 characters (not counting surrounding spaces)")
    return title


def _validate_dicom_net(cfg: Config) -> None:
    """[dicom_net] and [pacs]: AE titles, addresses and destinations, each error naming its key."""
    net = cfg.dicom_net
    parse_host_port(net.listen, "dicom_net.listen")
    check_ae_title(net.ae_title, "dicom_net.ae_title")
    for caller in net.allowed_callers:
        if caller != ANY_CALLER:
            check_ae_title(caller, "dicom_net.allowed_callers")
    if net.enabled and not net.allowed_callers:
        raise ConfigError("dicom_net.allowed_callers: empty refuses every modality; name the calling AE titles "
                          f'(e.g. ["CR_ROOM2"]), or ["{ANY_CALLER}"] to accept any caller')
    for entry in net.allowed_addresses:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"dicom_net.allowed_addresses: {entry!r} is not an IP address or network "
                              "(e.g. 10.0.4.17 or 10.0.4.0/24)") from None
    check_ae_title(cfg.pacs.calling_ae, "pacs.calling_ae")
    for dest in cfg.pacs.destinations:
        parse_destination(dest, "pacs.destinations")
    if cfg.pacs.send_heatmap and not cfg.explain.enabled:
        raise ConfigError("pacs.send_heatmap = true needs explain.enabled = true: without it no heat map is made")


def parse_destination(value: str, key: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (AE title, host, port); the one parser of a DICOM peer's address."""
    ae, sep, rest = value.partition("@")
    if not sep:
        raise ConfigError(f"{key}: {value!r} must be AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
    host, port = parse_host_port(rest, key)
    return check_ae_title(ae, key), host, port


def load_config(
    path: Optional[Path | str] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Defaults < TOML file < environment < ``overrides`` (``"section.key" -> value``, from CLI flags).

    ``path=None`` reads the default file when it exists; an explicit path must exist.
    """
    env = os.environ if env is None else env
    cfg = Config()
    explicit = path is not None or bool(env.get(ENV_PREFIX + "CONFIG"))
    path = Path(path or env.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG)
    if path.exists() or explicit:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except PermissionError:
            raise ConfigError(f"config file {path}: permission denied") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML ({exc})") from None
        for sec, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: top-level key {sec!r} must be a [section]")
            for key, value in values.items():
                _apply(cfg, sec, key, value, str(path))
        cfg.source = str(path)
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        # the longest section that fits: PNEUMOFLAG_DICOM_NET_LISTEN is [dicom_net], not [dicom] key net_listen
        sec = max((s for s in SECTIONS if rest.startswith(s + "_")), key=len, default=None)
        if sec is None:
            if name.startswith(ENV_PREFIX + "NO_") or name in _OTHER_ENV:
                continue  # switches for tests/tools, not configuration
            raise ConfigError(f"unknown environment variable {name}: use {ENV_PREFIX}<SECTION>_<KEY>, e.g. PNEUMOFLAG_MQTT_BROKER")
        _apply(cfg, sec, rest[len(sec) + 1:], value, f"environment {name}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        sec, _, key = dotted.partition(".")
        _apply(cfg, sec, key, value, "command line")
    _validate(cfg)
    return cfg


_OTHER_ENV = {ENV_PREFIX + "EDGETPU_LIBRARY"}
