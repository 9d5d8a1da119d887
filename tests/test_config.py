"""Configuration: file < environment < flags; unknown keys and bad values named at start."""
from __future__ import annotations

import pytest

from conftest import run_cli
from pneumoflag.device.config import ConfigError, load_config


def _write(tmp_path, text: str):
    p = tmp_path / "pneumoflag.toml"
    p.write_text(text)
    return p


def test_precedence_file_env_flags(tmp_path):
    p = _write(tmp_path, '[mqtt]\nbroker = "file:1"\ntopic_prefix = "fromfile"\ndevice_id = "f"\n'
                         '[watch]\nsettle_seconds = 2.5\n')
    cfg = load_config(p, env={"PNEUMOFLAG_MQTT_BROKER": "env:2", "PNEUMOFLAG_MQTT_DEVICE_ID": "e"},
                      overrides={"mqtt.device_id": "flag"})
    assert cfg.mqtt.broker == "env:2"          # env beats file
    assert cfg.mqtt.topic_prefix == "fromfile"  # file beats default
    assert cfg.mqtt.device_id == "flag"         # flag beats env
    assert cfg.watch.settle_seconds == 2.5
    assert cfg.topics.flag("urgent") == "fromfile/flag/flags/urgent"
    assert cfg.broker_host_port == ("env", 2)


@pytest.mark.parametrize("text, named", [
    ("[mqtt]\nbrokr = \"x:1\"\n", "mqtt.brokr"),
    ("[mqqt]\nbroker = \"x:1\"\n", "[mqqt]"),
    ("[watch]\nsettle_seconds = \"soon\"\n", "watch.settle_seconds"),
    ("[watch]\nrecursive = \"maybe\"\n", "watch.recursive"),
    ("[model]\naccelerator = \"gpu\"\n", "model.accelerator"),
    ("[model]\nthreads = 0\n", "model.threads"),
    ("[mqtt]\nbroker = \"nohost\"\n", "mqtt.broker"),
    ("[mqtt]\nbroker = \"h:99999\"\n", "mqtt.broker"),
    ("[mqtt]\ntopic_prefix = \"a/b\"\n", "mqtt.topic_prefix"),
    ("[mqtt]\ntls = true\ncert_file = \"/etc/hostname\"\n", "key_file"),
    ("[mqtt]\nca_file = \"/etc/hostname\"\n", "mqtt.tls"),
    ("[mqtt]\npassword_file = \"/nonexistent/pw\"\n", "mqtt.password_file"),
    ("[station]\nallowed_hosts = [\"https://station.ward.example\"]\n", "no scheme or path"),
    ("[station]\nallowed_hosts = [\"station.ward.example/console\"]\n",
     "station.allowed_hosts: 'station.ward.example/console'"),
    ("[station]\nlogin_window = 0\n", "station.login_window: must be greater than 0"),
    ("[station]\nlogin_failures = 0\n", "station.login_failures: must be greater than 0"),
    ("broker = 1\n", "must be a [section]"),
    ("[mqtt\n", "invalid TOML"),
])
def test_bad_config_is_rejected_with_the_key_named(tmp_path, text, named):
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, text), env={})
    assert named in str(exc.value)


def test_bad_environment_is_rejected_with_the_variable_named():
    with pytest.raises(ConfigError, match="PNEUMOFLAG_WATCH_POLL_INTERVAL"):
        load_config(env={"PNEUMOFLAG_WATCH_POLL_INTERVAL": "fast"})
    with pytest.raises(ConfigError, match="PNEUMOFLAG_BROKER"):
        load_config(env={"PNEUMOFLAG_BROKER": "x:1"})


def test_allowed_hosts_from_file_and_environment(tmp_path):
    cfg = load_config(_write(tmp_path, '[station]\nallowed_hosts = ["station-desk-a.ward.example", "[fd00::5]:8443"]\n'),
                      env={})
    assert cfg.station.allowed_hosts == ["station-desk-a.ward.example", "[fd00::5]:8443"]
    cfg = load_config(env={"PNEUMOFLAG_STATION_ALLOWED_HOSTS": "a.example, b.example:443"})
    assert cfg.station.allowed_hosts == ["a.example", "b.example:443"]


def test_explicit_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_lists_and_booleans_from_environment():
    cfg = load_config(env={"PNEUMOFLAG_DICOM_ACCEPT_MODALITIES": "CR, DX,DR", "PNEUMOFLAG_WATCH_POLLING": "yes"})
    assert cfg.dicom.accept_modalities == ["CR", "DX", "DR"] and cfg.watch.polling is True


def test_config_command_prints_effective_config_with_secrets_redacted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PNEUMOFLAG_MQTT_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("PNEUMOFLAG_MQTT_USERNAME", "station")
    p = _write(tmp_path, '[mqtt]\nbroker = "10.0.0.5:8883"\n')
    assert run_cli("config", "--config", p, "--device-id", "xr-3") == 0
    out = capsys.readouterr().out
    assert "hunter2-secret" not in out and 'password = "********"' in out
    assert 'device_id = "xr-3"' in out and 'broker = "10.0.0.5:8883"' in out and 'username = "station"' in out


def test_config_command_fails_on_bad_key(tmp_path, capsys):
    p = _write(tmp_path, "[watch]\nsettle = 1\n")
    assert run_cli("config", "--config", p) == 2
    err = capsys.readouterr().err
    assert "watch.settle" in err and err.count("\n") == 1


def test_bad_flag_value_is_rejected(capsys):
    assert run_cli("config", "--broker", "localhost") == 2
    assert "mqtt.broker" in capsys.readouterr().err


def test_example_config_is_valid(tmp_path):
    """The annotated example in systemd/ must load once its files exist."""
    from conftest import REPO

    text = (REPO / "systemd" / "pneumoflag.toml.example").read_text()
    (tmp_path / "ca.crt").write_text("x\n")
    text = text.replace("/etc/pneumoflag/ca.crt", str(tmp_path / "ca.crt"))
    cfg = load_config(_write(tmp_path, text), env={"PNEUMOFLAG_MQTT_PASSWORD": "from-secrets-env"})
    assert cfg.mqtt.tls and cfg.mqtt.username == "pneumoflag" and cfg.watch.dir == "/srv/xray-export"
    assert cfg.mqtt_password() == "from-secrets-env"


def test_every_setting_is_read_somewhere():
    """A documented setting that nothing reads is a bug: each key is used by name outside config.py."""
    import re
    from dataclasses import fields

    from conftest import REPO
    from pneumoflag.device.config import SECTIONS

    code = "\n".join(p.read_text() for d in ("device", "station", "convert") for p in (REPO / d).rglob("*.py")
                     if p.name != "config.py")
    helpers = (REPO / "device" / "config.py").read_text().split("# ------------------------------------------------------------------ helpers")[1]
    unread = [f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in fields(cls)
              if not re.search(rf"\.{f.name}\b", code) and not re.search(rf"\.{sec}\.{f.name}\b", helpers)]
    assert unread == []


def test_the_example_config_documents_every_key():
    import re
    from dataclasses import fields

    from conftest import REPO
    from pneumoflag.device.config import SECTIONS

    text = (REPO / "systemd" / "pneumoflag.toml.example").read_text()
    missing = []
    for sec, cls in SECTIONS.items():
        body = re.search(rf"^\[{sec}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
        assert body, f"no [{sec}] section in the example"
        missing += [f"{sec}.{f.name}" for f in fields(cls) if not re.search(rf"^#? ?{f.name} =", body.group(1), re.M)]
    assert missing == []


def test_config_command_shows_every_key_with_its_value_and_meaning(tmp_path, capsys):
    """`pneumoflag config` prints each declared key, its help above it, as TOML that reads back to the values."""
    from dataclasses import fields

    from pneumoflag.device.config import SECTIONS, describe, tomllib
    p = _write(tmp_path, "[gate]\nmin_side = 200\n")
    assert run_cli("config", "--config", p) == 0
    out = capsys.readouterr().out
    printed = tomllib.loads(out)
    assert {sec: set(v) for sec, v in printed.items()} == {sec: {f.name for f in fields(cls)} for sec, cls in SECTIONS.items()}
    assert printed == load_config(p).redacted() and printed["gate"]["min_side"] == 200
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"# {describe(f).replace('`', '')}\n{f.name} = " in out, f"{sec}.{f.name}"


def _out_of_bounds(m) -> list:
    """Values just outside what a key's metadata allows (its choices, ``above``, ``min``, ``max``)."""
    bad = []
    if m["choices"] is not None:
        bad.append("surely-not-a-choice")
    if m["above"] is not None:
        bad.append(m["above"])
    if m["min"] is not None:
        bad.append(m["min"] - 1)
    if m["max"] is not None:
        bad.append(m["max"] + 1)
    return bad


def test_every_declared_bound_is_enforced_with_the_key_named():
    from dataclasses import fields

    from pneumoflag.device.config import SECTIONS

    checked = 0
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            for value in _out_of_bounds(f.metadata):
                with pytest.raises(ConfigError, match=rf"^{sec}\.{f.name}: "):
                    load_config(env={}, overrides={f"{sec}.{f.name}": value})
                checked += 1
    assert checked >= 29  # the 18 positive, 5 non-negative and 4 choice keys once listed by hand, explain.size's 2


@pytest.mark.parametrize("key, value, message", [
    ("explain.size", 600, "explain.size: 600 must be between 256 and 512 pixels"),
    ("watch.rescan_interval", -1, "watch.rescan_interval: must not be negative"),
    ("gate.min_side", 0, "gate.min_side: must be greater than 0"),
    ("log.level", "loud", "log.level: 'loud' is not one of debug, info, warning, error"),
])
def test_bound_messages_say_the_limit(key, value, message):
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={key: value})
    assert str(exc.value) == message


def test_the_gate_takes_every_gate_key_by_name():
    """GateLimits is GateConfig plus the card's template: a [gate] value reaches the gate under its own name."""
    from dataclasses import fields

    import numpy as np

    from pneumoflag.device.config import GateConfig
    from pneumoflag.device.gate import GateLimits

    changed = {f.name: (not f.default) if isinstance(f.default, bool) else f.default + i + 1
               for i, f in enumerate(fields(GateConfig))}
    template = np.zeros(32 * 32)
    limits = GateLimits.from_config(GateConfig(**changed), template)
    assert {f.name: getattr(limits, f.name) for f in fields(GateConfig)} == changed
    assert limits.template is template
    assert {f.name for f in fields(GateLimits)} == {f.name for f in fields(GateConfig)} | {"template"}


def test_code_without_a_config_takes_the_config_defaults(tmp_path):
    """The watcher, the decoders, the heat maps and the station settings default to config.py's values."""
    import inspect
    from dataclasses import fields

    from pneumoflag.device import dicom, explain, preprocess
    from pneumoflag.device.config import DicomConfig, ExplainConfig, StationConfig, WatchConfig
    from pneumoflag.device.ingest import Ingest
    from pneumoflag.station.settings import StationSettings

    w = WatchConfig()
    ingest = Ingest(tmp_path)
    assert ingest.ignore == tuple(p.lower() for p in w.ignore)
    assert (ingest.recursive, ingest.polling, ingest.poll_interval, ingest.settle) == (
        w.recursive, w.polling, w.poll_interval, w.settle_seconds)
    for fn in (preprocess.decode, preprocess.decode_with_info, dicom.read_dicom):
        params = inspect.signature(fn).parameters
        assert params["max_pixels"].default == w.max_pixels and params["max_bytes"].default == w.max_decode_bytes
    d, params = DicomConfig(), inspect.signature(dicom.read_dicom).parameters
    for name in ("include_patient_identifiers", "accept_modalities", "accept_body_parts", "accept_views"):
        assert params[name].default == (tuple(v) if isinstance(v := getattr(d, name), list) else v), name
    for fn in (explain.render_overlay, explain.explain_pixels, explain.explain_file):
        params = inspect.signature(fn).parameters
        assert (params["size"].default, params["cmap"].default) == (ExplainConfig().size, ExplainConfig().cmap)
    defaults = {f.name: f.default for f in fields(StationSettings)}
    for name in ("login_failures", "login_failures_total", "login_window"):
        assert defaults[name] == getattr(StationConfig(), name), name


def test_the_example_config_shows_the_defaults_but_for_the_site_keys():
    """The example says "the value shown is the default": a changed default must be changed there too."""
    from conftest import REPO
    from pneumoflag.device.config import Config, tomllib

    example = tomllib.loads((REPO / "systemd" / "pneumoflag.toml.example").read_text())
    defaults = Config()
    differ = {f"{sec}.{key}" for sec, values in example.items() for key, v in values.items()
              if getattr(getattr(defaults, sec), key) != v}
    assert differ == {"watch.dir", "mqtt.broker", "mqtt.username", "mqtt.tls", "mqtt.ca_file"}  # a site's own
