"""Daemon configuration: TOML file < ``PNEUMOFLAG_*`` environment < command-line flags.

Every key is declared here with its type; unknown keys and bad values stop the
daemon at start with the key named, the way Mosquitto refuses a bad config
line, instead of surfacing at 3 a.m. as a runtime error.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

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
SECRET_KEYS = {("mqtt", "password")}
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


@dataclass
class WatchConfig:
    dir: str = ""  # the X-ray system's export folder
    recursive: bool = False
    polling: bool = False  # for SMB/NFS shares, where inotify sees nothing
    poll_interval: float = 2.0
    settle_seconds: float = 1.0  # size+mtime unchanged this long = written (no close event)
    incomplete_timeout: float = 10.0  # a file that still fails to decode after this quiet time is rejected
    archive_dir: str = ""  # move scored files here; off when empty
    max_file_mb: float = 100.0
    max_pixels: int = 60_000_000
    max_decode_mb: float = 96.0  # memory one decode may take, budgeted from the header; more is too-large
    max_decode_seconds: float = 10.0  # time one decode may take (in the worker process); more is too-slow
    ignore: list = field(default_factory=lambda: ["*.part", "*.tmp", "~*", ".*", "*.crdownload", "*.swp"])
    backlog: bool = True  # score files that arrived while the daemon was down
    rescan_interval: float = 300.0  # look for files the watcher missed this often (0: never); also after lost events


@dataclass
class ModelConfig:
    path: str = field(default_factory=default_model_path)
    accelerator: str = "auto"  # auto | edgetpu | cpu
    threads: int = 2


@dataclass
class MqttConfig:
    broker: str = ""  # host:port; empty = start the embedded broker on 127.0.0.1:1883
    topic_prefix: str = "pneumoflag"
    device_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "pneumoflag")
    client_id: str = ""  # default pneumoflag-<device_id>
    protocol: str = "3.1.1"  # 3.1.1 | 5
    keepalive: int = 30
    username: str = ""
    password: str = ""  # prefer password_file or PNEUMOFLAG_MQTT_PASSWORD
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False  # skip hostname check (test rigs only)
    stats_interval: float = 60.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0


@dataclass
class DicomConfig:
    include_patient_identifiers: bool = False
    accept_modalities: list = field(default_factory=lambda: ["CR", "DX"])
    accept_body_parts: list = field(default_factory=lambda: ["CHEST"])
    accept_views: list = field(default_factory=lambda: ["PA", "AP"])  # ViewPosition, when present


@dataclass
class GateConfig:
    """The plausibility gate before the model (see device/gate.py): what no chest radiograph looks like."""

    enabled: bool = True
    min_side: int = 128  # shorter side, pixels
    max_aspect: float = 2.5  # longer side / shorter side
    min_dynamic_range: float = 40.0  # 1st-99th percentile grey range at the model's size, of 255
    min_smoothness: float = 0.5  # neighbour-pixel correlation at the model's size
    strict_jpeg: bool = True  # refuse JPEGs whose data stream the decoder had to repair
    min_detail: float = 0.03  # mean |Laplacian| / std at the model's size: a gradient or a blob has none
    max_uniform: float = 0.5  # share of the most common grey level: a document or a screenshot
    min_template_similarity: float = 0.2  # layout vs the card's mean training radiograph (inverted: negative)


@dataclass
class StateConfig:
    dir: str = field(default_factory=_default_state_dir)


@dataclass
class LogConfig:
    level: str = "info"


@dataclass
class ExplainConfig:
    """Heat maps (device/explain.py). Off by default: a map directs a reader's eye, which a triage aid
    must not do unasked."""

    enabled: bool = False  # for each flag and urgent image, after its flag is published
    size: int = 384  # overlay side, pixels (256-512)
    cmap: str = "inferno"  # inferno | magma | viridis


@dataclass
class AlertsConfig:
    escalate_after: float = 300.0  # re-publish an urgent flag nobody acknowledged after this many seconds
    max_escalations: int = 3  # at most this many times per flag (0: never escalate)


@dataclass
class StationConfig:
    """The nursing-station console (``pneumoflag station``); it may run on another machine of the ward."""

    listen: str = "127.0.0.1:8080"  # HOST:PORT of the web page; anything but loopback needs a password or insecure
    station_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "station")
    password_file: str = ""  # a file holding the console's password (or token)
    insecure: bool = False  # allow a non-loopback listen address without a password
    chime: bool = True  # sound a chime when an urgent flag arrives
    db: str = ""  # the worklist database (default: STATE/station-<station_id>.db)
    silent_after: float = 180.0  # a device whose stats stop for this long shows as silent
    allowed_hosts: list = field(default_factory=list)  # more Host names the page answers to (a proxy's public name)
    login_failures: int = 5  # wrong passwords (form or bearer) one client address may send per login_window
    login_failures_total: int = 30  # wrong passwords from all clients together per login_window
    login_window: float = 60.0  # seconds over which wrong passwords are counted; a lock-out ends with it


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
    station: StationConfig = field(default_factory=StationConfig)
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
            for k, v in values.items():
                origin = self.origins.get((sec, k))
                lines.append(f"{k} = {_toml_value(v)}" + (f"  # from {origin}" if origin else ""))
        return "\n".join(lines) + "\n"


SECTIONS = {"watch": WatchConfig, "model": ModelConfig, "mqtt": MqttConfig, "dicom": DicomConfig,
            "state": StateConfig, "log": LogConfig, "gate": GateConfig, "explain": ExplainConfig,
            "alerts": AlertsConfig,
            "station": StationConfig}
CHOICES = {("model", "accelerator"): ACCELERATORS, ("explain", "cmap"): COLORMAPS, ("mqtt", "protocol"): ("3.1.1", "5"),
           ("log", "level"): ("debug", "info", "warning", "error")}
POSITIVE = {("watch", "poll_interval"), ("watch", "max_file_mb"), ("watch", "max_pixels"), ("model", "threads"),
            ("mqtt", "keepalive"), ("mqtt", "stats_interval"), ("mqtt", "reconnect_min"), ("mqtt", "reconnect_max")}
NON_NEGATIVE = {("watch", "settle_seconds"), ("watch", "incomplete_timeout"), ("alerts", "max_escalations"),
                ("watch", "rescan_interval"), ("gate", "min_detail")}
POSITIVE |= {("gate", "max_uniform"), ("alerts", "escalate_after"), ("station", "silent_after"), ("watch", "max_decode_mb"),
             ("watch", "max_decode_seconds"), ("gate", "min_side"), ("gate", "max_aspect"), ("station", "login_failures"),
             ("station", "login_failures_total"), ("station", "login_window")}


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


def _validate(cfg: Config) -> None:
    for (sec, key), allowed in CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in allowed:
            raise ConfigError(f"{sec}.{key}: {v!r} is not one of {', '.join(allowed)}")
    for sec, key in POSITIVE:
        if getattr(getattr(cfg, sec), key) <= 0:
            raise ConfigError(f"{sec}.{key}: must be greater than 0")
    for sec, key in NON_NEGATIVE:
        if getattr(getattr(cfg, sec), key) < 0:
            raise ConfigError(f"{sec}.{key}: must not be negative")
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
    if not 256 <= cfg.explain.size <= 512:
        raise ConfigError(f"explain.size: {cfg.explain.size} must be between 256 and 512 pixels")
    parse_host_port(cfg.station.listen, "station.listen")
    for entry in cfg.station.allowed_hosts:
        if not HOST_ENTRY.match(entry):
            raise ConfigError(f"station.allowed_hosts: {entry!r} must be a host name or address with an optional "
                              ":PORT (e.g. station-desk-a.ward.example or [fd00::5]:8443), no scheme or path")
    if cfg.station.password_file and not Path(cfg.station.password_file).is_file():
        raise ConfigError(f"station.password_file: {cfg.station.password_file} does not exist")
    if cfg.watch.archive_dir and cfg.watch.dir and Path(cfg.watch.archive_dir).resolve() == Path(cfg.watch.dir).resolve():
        raise ConfigError("watch.archive_dir must differ from watch.dir")


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
        sec = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
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
