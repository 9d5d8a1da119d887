"""MQTT security against a real Mosquitto: username/password, TLS with a test CA and client
certificates, MQTT 5 - and that a refused or failed connection never loses a flag."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqtt_helpers import REPO, DaemonProc, Mosquitto, Subscriber, drop, new_daemon, wait_until
from pneumoflag.device.config import REDACTED, ConfigError, load_config
from pneumoflag.device.samples import SAMPLES_DIR

SAMPLES = SAMPLES_DIR
SAMPLE_FILES = sorted(SAMPLES.rglob("*.jpeg"))

DAEMON_USER, DAEMON_PASSWORD = "nurse", "Xr4y-n1ght-sh1ft-7Qz"
STATION_USER, STATION_PASSWORD = "station", "st4tion-pw-81"


# ----------------------------------------------------------------------------- fixtures


def _sub(subscribers, *a, **kw) -> Subscriber:
    s = Subscriber(*a, **kw)
    subscribers.append(s)
    return s


def _outbox(state: Path) -> list[tuple]:
    db_path = state / "pneumoflag.db"
    if not db_path.exists():
        return []
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT event_id, topic FROM outbox ORDER BY seq").fetchall()


def _journal(state: Path) -> list[tuple]:
    db_path = state / "pneumoflag.db"
    if not db_path.exists():
        return []
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT path, status, event_id FROM journal ORDER BY id").fetchall()


def _wait_queued(state: Path, name: str, timeout: float = 20) -> str:
    """The file was scored and its flag sits in the outbox; returns its event_id."""
    wait_until(lambda: any(p == name for p, _, _ in _journal(state)), timeout, f"{name} to be scored")
    (event_id,) = [e for p, _, e in _journal(state) if p == name]
    assert [e for e, _ in _outbox(state)] == [event_id]
    return event_id


# ----------------------------------------------------------------------------- username / password


@pytest.fixture
def auth_broker(tmp_path, brokers) -> Mosquitto:
    pwfile = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), DAEMON_USER, DAEMON_PASSWORD], check=True,
                   capture_output=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), STATION_USER, STATION_PASSWORD], check=True,
                   capture_output=True, timeout=30)
    assert DAEMON_PASSWORD not in pwfile.read_text()  # hashed
    return brokers(tmp_path / "broker", f"allow_anonymous false\npassword_file {pwfile}\n")


def _station(subscribers, broker: Mosquitto, **kw) -> Subscriber:
    return _sub(subscribers, broker.address, "pneumoflag/#", client_id="station-1",
                username_pw_set=(STATION_USER, STATION_PASSWORD), **kw)


def test_anonymous_client_is_refused_by_the_auth_broker(auth_broker):
    """The rig itself: without credentials the broker says no, so the other tests prove something."""
    import paho.mqtt.client as mqtt

    refused: list = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"anon-{time.time_ns()}")
    c.on_connect = lambda cl, u, f, rc, p=None: refused.append(rc)
    c.connect("127.0.0.1", auth_broker.port, keepalive=5)
    c.loop_start()
    try:
        wait_until(lambda: refused, 10, "CONNACK")
    finally:
        c.loop_stop()
        c.disconnect()
    assert refused[0].is_failure


def test_username_from_env_password_from_file_delivers_and_never_leaks(auth_broker, dirs, daemons, subscribers,
                                                                       tmp_path):
    watch, state = dirs
    secret = tmp_path / "mqtt-password"
    secret.write_text(DAEMON_PASSWORD + "\n")  # trailing newline, as `echo pw > file` leaves it
    secret.chmod(0o600)
    sub = _station(subscribers, auth_broker)
    d = new_daemon(daemons, watch, state, auth_broker.address,
                env={"PNEUMOFLAG_MQTT_USERNAME": DAEMON_USER, "PNEUMOFLAG_MQTT_PASSWORD_FILE": str(secret)}).start()
    drop(SAMPLE_FILES[0], watch, "auth.jpeg")
    flags = sub.wait_flags(1, timeout=30)
    assert [f["file"] for f in flags] == ["auth.jpeg"]
    assert flags[0]["device"] == "test"
    # the broker saw the daemon log in as "nurse"
    wait_until(lambda: "as pneumoflag-test" in auth_broker.log_text(), 5, "broker log of the daemon's connect")
    connects = [ln for ln in auth_broker.log_text().splitlines() if "as pneumoflag-test" in ln]
    assert any(f"u'{DAEMON_USER}'" in ln for ln in connects), connects
    assert d.terminate() == 0
    out = d.output()
    assert "MQTT connected" in out
    assert DAEMON_PASSWORD not in out
    assert DAEMON_PASSWORD not in auth_broker.log_text()


def test_config_command_redacts_the_password():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOFLAG_")}
    env.update(PNEUMOFLAG_MQTT_USERNAME=DAEMON_USER, PNEUMOFLAG_MQTT_PASSWORD=DAEMON_PASSWORD)
    res = subprocess.run([sys.executable, "-m", "pneumoflag.device.cli", "config", "--broker", "127.0.0.1:1883"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert DAEMON_PASSWORD not in res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert f'password = "{REDACTED}"  # from environment PNEUMOFLAG_MQTT_PASSWORD' in lines
    assert f'username = "{DAEMON_USER}"  # from environment PNEUMOFLAG_MQTT_USERNAME' in lines
    assert 'broker = "127.0.0.1:1883"  # from command line' in lines  # each setting says where it came from
    assert 'keepalive = 30' in lines  # a default says nothing


def test_wrong_password_keeps_running_keeps_the_flag_then_delivers_it(auth_broker, dirs, daemons, subscribers):
    watch, state = dirs
    sub = _station(subscribers, auth_broker)
    creds = {"PNEUMOFLAG_MQTT_USERNAME": DAEMON_USER}
    bad = new_daemon(daemons, watch, state, auth_broker.address,
                  env={**creds, "PNEUMOFLAG_MQTT_PASSWORD": "not-the-password"}).start()
    wait_until(lambda: "broker refused the connection" in bad.output(), 15, "the refusal in the daemon log")
    assert "not authori" in bad.output().lower()
    drop(SAMPLE_FILES[1], watch, "while-refused.jpeg")
    event_id = _wait_queued(state, "while-refused.jpeg")
    time.sleep(3)  # several reconnect attempts (reconnect_max = 1 s), all refused
    assert bad.proc.poll() is None, f"daemon died:\n{bad.output()}"
    # it kept trying (the daemon logs a problem once per outage; the broker sees every attempt)
    assert auth_broker.log_text().count("disconnected, not authorised") >= 2
    assert [e for e, _ in _outbox(state)] == [event_id]
    assert sub.flags() == []
    assert "not-the-password" not in bad.output()
    assert bad.terminate() == 0
    assert [e for e, _ in _outbox(state)] == [event_id]  # still there after a clean stop
    # the right password: the waiting flag goes out, once
    good = new_daemon(daemons, watch, state, auth_broker.address, env={**creds, "PNEUMOFLAG_MQTT_PASSWORD": DAEMON_PASSWORD})
    good.start()
    flags = sub.wait_flags(1, timeout=30)
    assert [(f["file"], f["event_id"]) for f in flags] == [("while-refused.jpeg", event_id)]
    wait_until(lambda: _outbox(state) == [], 10, "outbox to drain")
    time.sleep(1)
    assert len(sub.flags()) == 1
    assert DAEMON_PASSWORD not in good.output()


# ----------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=str(cwd), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)}: {res.stderr}"


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def _make_leaf(d: Path, name: str, cn: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
             str(time.time_ns() % 10**12), "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "test-ca")
    rogue = _make_ca(d, "rogue-ca")
    server = _make_leaf(d, "server", "localhost", ca,
                        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client = _make_leaf(d, "client", "pneumoflag-test", ca,
                        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    for key in (ca[1], rogue[1], server[1], client[1]):
        key.chmod(0o600)
    return {"ca": ca[0], "rogue_ca": rogue[0], "server_crt": server[0], "server_key": server[1],
            "client_crt": client[0], "client_key": client[1]}


@pytest.fixture
def tls_broker(tmp_path, brokers, pki) -> Mosquitto:
    return brokers(tmp_path / "broker",
                   f"cafile {pki['ca']}\ncertfile {pki['server_crt']}\nkeyfile {pki['server_key']}\n"
                   "require_certificate true\nallow_anonymous true\n")


def _toml_config(path: Path, broker: str, **mqtt) -> Path:
    lines = ["[mqtt]", f'broker = "{broker}"', "tls = true"]
    lines += [f'{k} = "{v}"' for k, v in mqtt.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tls_station(subscribers, broker: Mosquitto, pki) -> Subscriber:
    return _sub(subscribers, broker.address, "pneumoflag/#", client_id="tls-station",
                tls_set=(str(pki["ca"]), str(pki["client_crt"]), str(pki["client_key"])))


def test_tls_broker_refuses_plain_and_certless_clients(tls_broker, pki):
    """The rig itself: plaintext MQTT and TLS without a client certificate get no session."""
    import paho.mqtt.client as mqtt

    for tls in (None, (str(pki["ca"]),)):
        connected: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time_ns()}")
        if tls:
            c.tls_set(*tls)
        c.on_connect = lambda cl, u, f, rc, p=None, got=connected: got.append(rc)
        try:
            c.connect("127.0.0.1", tls_broker.port, keepalive=5)
            c.loop_start()
            time.sleep(1.5)
        except OSError:
            pass
        finally:
            c.loop_stop()
            c.disconnect()
        assert not any(not rc.is_failure for rc in connected), (tls, connected)


def test_tls_with_client_certificate_from_config_file(tls_broker, pki, dirs, daemons, subscribers, tmp_path):
    watch, state = dirs
    sub = _tls_station(subscribers, tls_broker, pki)
    conf = _toml_config(tmp_path / "pneumoflag.toml", tls_broker.address, ca_file=pki["ca"],
                        cert_file=pki["client_crt"], key_file=pki["client_key"])
    d = new_daemon(daemons, watch, state, "", args=("--config", str(conf))).start()
    drop(SAMPLE_FILES[2], watch, "tls.jpeg")
    flags = sub.wait_flags(1, timeout=30)
    assert [f["file"] for f in flags] == ["tls.jpeg"]
    wait_until(lambda: _outbox(state) == [], 10, "outbox to drain")
    assert f"connecting to MQTT broker {tls_broker.address}" in d.output()
    assert d.terminate() == 0


def test_tls_without_client_certificate_cannot_connect_and_keeps_the_flag(tls_broker, pki, dirs, daemons,
                                                                          subscribers, tmp_path):
    watch, state = dirs
    sub = _tls_station(subscribers, tls_broker, pki)
    conf = _toml_config(tmp_path / "pneumoflag.toml", tls_broker.address, ca_file=pki["ca"])
    d = new_daemon(daemons, watch, state, "", args=("--config", str(conf))).start()
    drop(SAMPLE_FILES[3], watch, "no-client-cert.jpeg")
    event_id = _wait_queued(state, "no-client-cert.jpeg")
    time.sleep(3)  # reconnect attempts, all cut off by the broker
    assert d.proc.poll() is None, f"daemon died:\n{d.output()}"
    assert "MQTT connected" not in d.output()
    assert [e for e, _ in _outbox(state)] == [event_id]
    assert sub.flags() == []
    # the broker rejected the handshakes (mosquitto logs the failed TLS connects)
    assert "as pneumoflag-test" not in tls_broker.log_text()
    assert "did not return a certificate" in tls_broker.log_text()  # refused for the missing client cert
    assert d.terminate() == 0
    assert [e for e, _ in _outbox(state)] == [event_id]


def _start_with_rogue_ca(tls_broker, pki, dirs, daemons, tmp_path) -> DaemonProc:
    watch, state = dirs
    conf = _toml_config(tmp_path / "pneumoflag.toml", tls_broker.address, ca_file=pki["rogue_ca"],
                        cert_file=pki["client_crt"], key_file=pki["client_key"])
    return new_daemon(daemons, watch, state, "", args=("--config", str(conf))).start()


def test_tls_server_cert_from_another_ca_is_refused_and_daemon_keeps_running(tls_broker, pki, dirs, daemons,
                                                                              subscribers, tmp_path):
    watch, state = dirs
    sub = _tls_station(subscribers, tls_broker, pki)
    d = _start_with_rogue_ca(tls_broker, pki, dirs, daemons, tmp_path)
    drop(SAMPLE_FILES[4], watch, "rogue-ca.jpeg")
    event_id = _wait_queued(state, "rogue-ca.jpeg")
    time.sleep(3)
    assert d.proc.poll() is None, f"daemon died:\n{d.output()}"
    assert "MQTT connected" not in d.output()
    assert [e for e, _ in _outbox(state)] == [event_id]
    assert sub.flags() == []
    assert "as pneumoflag-test" not in tls_broker.log_text()  # no MQTT session was ever set up
    assert "unknown ca" in tls_broker.log_text()  # the daemon aborted the handshake: server cert not trusted
    assert d.terminate() == 0


def test_tls_handshake_failure_is_logged(tls_broker, pki, dirs, daemons, tmp_path):
    d = _start_with_rogue_ca(tls_broker, pki, dirs, daemons, tmp_path)
    wait_until(lambda: "certificate verify failed" in d.output().lower(), 8, "the TLS failure in the log")


def test_tls_config_validation(pki):
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"mqtt.tls": True, "mqtt.cert_file": str(pki["client_crt"])})
    assert "cert_file" in str(exc.value) and "key_file" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"mqtt.cert_file": str(pki["client_crt"])})
    assert "cert_file" in str(exc.value) and "key_file" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"mqtt.tls": True, "mqtt.key_file": str(pki["client_key"])})
    assert "cert_file" in str(exc.value) and "key_file" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(env={}, overrides={"mqtt.ca_file": str(pki["ca"])})
    assert "ca_file" in str(exc.value) and "tls" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(env={"PNEUMOFLAG_MQTT_TLS": "true"}, overrides={"mqtt.ca_file": str(pki["ca"]) + ".missing"})
    assert "ca_file" in str(exc.value) and "does not exist" in str(exc.value)
    cfg = load_config(env={"PNEUMOFLAG_MQTT_TLS": "true"},
                      overrides={"mqtt.ca_file": str(pki["ca"]), "mqtt.cert_file": str(pki["client_crt"]),
                                 "mqtt.key_file": str(pki["client_key"])})
    assert cfg.mqtt.tls and cfg.mqtt.key_file == str(pki["client_key"])


# ----------------------------------------------------------------------------- MQTT 5


def test_mqtt5_daemon_delivers(tmp_path, brokers, dirs, daemons, subscribers):
    watch, state = dirs
    broker = brokers(tmp_path / "broker", "allow_anonymous true\n")
    sub = _sub(subscribers, broker.address, "pneumoflag/#")
    d = new_daemon(daemons, watch, state, broker.address, env={"PNEUMOFLAG_MQTT_PROTOCOL": "5"}).start()
    drop(SAMPLE_FILES[5], watch, "v5.jpeg")
    flags = sub.wait_flags(1, timeout=30)
    assert [f["file"] for f in flags] == ["v5.jpeg"]
    wait_until(lambda: _outbox(state) == [], 10, "outbox to drain")
    connects = [ln for ln in broker.log_text().splitlines() if "as pneumoflag-test" in ln]
    assert connects and all("(p5" in ln for ln in connects), connects  # spoke MQTT 5, not 3.1.1
    assert d.terminate() == 0
    wait_until(lambda: sub.where(lambda m: m.topic == "pneumoflag/test/status")[-1].payload == "offline", 10,
               "offline status")
