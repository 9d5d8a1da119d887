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
