"""The station's front door against a hostile tester (issue 14): a real station process, a real Mosquitto,
real HTTP with forged ``Host``/``Origin`` headers from several loopback source addresses, and headless
chromium resolving an attacker's name to the station (DNS rebinding).
"""
from __future__ import annotations

import http.client
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from mqtt_helpers import Subscriber, wait_until
from pneumoflag.device.contract import encode
from pneumoflag.station.security import AllowedHosts, QuietLog, Throttle, retry_after
from pneumoflag.station.settings import split_host
from selenium.webdriver.common.by import By
from test_station import StationProc, _in_db, new_browser, open_page, publish, type_name

PASSWORD = "correct horse battery"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def hit(station: StationProc, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
        source: str = "127.0.0.1", timeout: float = 30) -> tuple[int, dict, str]:
    """One request from ``source`` (any 127/8 address: another client to the station); ``headers`` may
    forge ``Host``."""
    conn = http.client.HTTPConnection("127.0.0.1", station.port, timeout=timeout, source_address=(source, 0))
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text


def cookie_of(headers: dict) -> str:
    return headers["set-cookie"].split(";", 1)[0]


@pytest.fixture
def stations(tmp_path, broker):
    """Start stations of their own (``env`` adds PNEUMOFLAG_STATION_* settings); all stopped afterwards."""
    started: list[StationProc] = []

    def start(*args: str, env: dict | None = None) -> StationProc:
        station = StationProc(tmp_path, broker.address, f"door-{len(started)}", args, env)
        started.append(station)
        return station.start()

    yield start
    for s in started:
        s.close()


def a_flag(broker, station: StationProc) -> dict:
    flag = {"schema": "pneumoflag.flag/1", "event_id": str(uuid.uuid4()), "device": "xray-d",
            "file": "door.jpeg", "sha256": "0" * 64, "probability": 0.9, "priority": "urgent",
            "accession_number": "ACC-4711", "scored_at": datetime.now(timezone.utc).isoformat()}
    publish(broker.address, "pneumoflag/xray-d/flags/urgent", encode(flag))
    wait_until(lambda: station.db.exists() and _in_db(station.db, flag["event_id"]), 10, "the flag stored")
    return flag


# ----------------------------------------------------------------------------- Host names


@pytest.mark.parametrize("value, parsed", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:8080", ("::1", 8080)), ("[::1]", ("::1", None)),
    ("LocalHost.:80", ("localhost", 80)), ("Station-Desk-A.Ward.Example.", ("station-desk-a.ward.example", None)),
    ("[::1]:", None), ("host:", None), ("host:99999", None), ("[nope]:1", None), ("::1", None), ("", None),
    ("evil.example/x", None), ("localhost..", None), ("a b", None),
])
def test_host_values_are_parsed_strictly(value, parsed):
    assert split_host(value) == parsed


def test_the_allowed_set_for_loopback_and_for_a_wildcard_address():
    hosts = AllowedHosts.for_listen("127.0.0.1", ["station-desk-a.ward.example", "[fd00::5]:8443"])
    for ok in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST.:8080", "[::1]:8080", "127.0.0.2",
               "station-desk-a.ward.example", "Station-Desk-A.ward.example.:443", "[fd00::5]:8443"):
        assert hosts.allows(ok), ok
    for bad in ("evil.example:8080", "localhost.evil.example", "127.0.0.1.evil.example", "10.0.0.5:8080",
                "[fd00::5]:8080", "[::2]:8080", "", None, "localhost:0"):
        assert not hosts.allows(bad), bad
    # the Origin of a POST: one of these names, and the very host and port the request went to
    assert hosts.origin_ok("http://localhost:8080", "localhost:8080")
    assert hosts.origin_ok("http://[::1]:8080", "[::1]:8080")
    assert not hosts.origin_ok("http://127.0.0.1:9999", "127.0.0.1:8080")  # another site on this machine
    assert not hosts.origin_ok("http://evil.example:8080", "evil.example:8080")
    assert not hosts.origin_ok("null", "127.0.0.1:8080")
    assert hosts.origin_ok("https://station-desk-a.ward.example", "127.0.0.1:8080")  # the proxy's name
    # on 0.0.0.0 the nurses type this machine's address or name; a name it does not have stays refused
    wide = AllowedHosts.for_listen("0.0.0.0")
    assert wide.allows("10.1.2.3:8080") and wide.allows("localhost:8080")
    assert not wide.allows("evil.example:8080")


def test_a_foreign_host_is_refused_on_every_path_and_cannot_acknowledge(stations, broker):
    """DNS rebinding, by hand: the attacker's name (evil.example, re-pointed at 127.0.0.1) in Host and Origin."""
    station = stations()
    flag = a_flag(broker, station)
    evil = f"evil.example:{station.port}"
    sub = Subscriber(broker.address, "pneumoflag/+/acks")
    try:
        status, headers, _ = hit(station, "GET", "/")
        assert status == 200
        cookie = cookie_of(headers)
        _, _, body = hit(station, "GET", "/api/state", {"Cookie": cookie})
        csrf = json.loads(body)["csrf"]
        ack = json.dumps({"event_id": flag["event_id"], "by": "attacker"}).encode()
        post = {"Content-Type": "application/json", "Cookie": cookie, "X-CSRF-Token": csrf}
        refused = 0
        for host in (evil, "EVIL.example.", "localhost.evil.example", f"127.0.0.1.evil.example:{station.port}",
                     f"[::2]:{station.port}", f"10.9.8.7:{station.port}"):
            for method, path in (("GET", "/"), ("GET", "/api/state"), ("GET", "/static/station.js"),
                                 ("GET", f"/heatmap/{flag['event_id']}.png"), ("GET", "/nope")):
                status, _, text = hit(station, method, path, {"Host": host, "Cookie": cookie})
                assert status == 421, (host, path, status)
                assert "ACC-4711" not in text and "door.jpeg" not in text
                assert "station.allowed_hosts" in json.loads(text)["error"]
                refused += 1
            status, _, text = hit(station, "GET", "/events", {"Host": host, "Cookie": cookie}, timeout=5)
            assert status == 421 and "snapshot" not in text and "door.jpeg" not in text
            status, _, _ = hit(station, "POST", "/api/ack", {**post, "Host": host, "Origin": f"http://{host}"}, ack)
            assert status == 421, (host, status)
            refused += 2
        time.sleep(0.3)
        assert sub.where(lambda m: True) == []  # nothing acknowledged
        # logged, but not once per request
        lines = [ln for ln in station.output().splitlines() if "is not one of this station's names" in ln]
        assert lines and "Host 'evil.example:" in lines[0] and len(lines) < refused
        # its own names still work, however they are spelled
        for host in (f"127.0.0.1:{station.port}", f"localhost:{station.port}", f"LocalHost.:{station.port}",
                     f"[::1]:{station.port}"):
            status, _, body = hit(station, "GET", "/api/state", {"Host": host, "Cookie": cookie})
            assert status == 200 and "door.jpeg" in body, host
        status, _, _ = hit(station, "POST", "/api/ack", {**post, "Host": f"localhost:{station.port}",
                                                         "Origin": f"http://localhost:{station.port}"}, ack)
        assert status == 202
        wait_until(lambda: sub.where(lambda m: m.payload["event_id"] == flag["event_id"]), 10, "the real ack")
    finally:
        sub.stop()


def test_a_reverse_proxys_name_is_allowed_when_configured(stations, broker):
    station = stations(env={"PNEUMOFLAG_STATION_ALLOWED_HOSTS": "station-desk-a.ward.example"})
    flag = a_flag(broker, station)
    proxied = {"Host": "station-desk-a.ward.example", "X-Forwarded-Proto": "https"}
    status, headers, _ = hit(station, "GET", "/", proxied)
    assert status == 200
    cookie = cookie_of(headers)
    status, _, body = hit(station, "GET", "/api/state", {**proxied, "Cookie": cookie})
    assert status == 200
    ack = json.dumps({"event_id": flag["event_id"], "by": "Nurse Ed"}).encode()
    post = {**proxied, "Cookie": cookie, "X-CSRF-Token": json.loads(body)["csrf"],
            "Content-Type": "application/json"}
    # the Origin check uses the same set: the proxy's https name passes, another name or port does not
    for origin in ("https://evil.example", f"http://127.0.0.1:{station.port + 1}", "null"):
        status, _, _ = hit(station, "POST", "/api/ack", {**post, "Origin": origin}, ack)
        assert status == 403, origin
    status, _, _ = hit(station, "POST", "/api/ack", {**post, "Origin": "https://station-desk-a.ward.example"}, ack)
    assert status == 202
    assert hit(station, "GET", "/api/state", {"Host": "other.ward.example"})[0] == 421


def test_the_page_works_by_its_own_names_and_not_by_a_rebound_one(stations, broker):
    """Real chromium: 127.0.0.1 and localhost show the worklist and acknowledge; evil.example, resolved by
    the browser to 127.0.0.1 (what a rebinding DNS server does), gets no worklist."""
    station = stations()
    flag = a_flag(broker, station)
    sub = Subscriber(broker.address, "pneumoflag/+/acks")
    driver = new_browser("--host-resolver-rules=MAP evil.example 127.0.0.1")
    try:
        open_page(driver, f"http://127.0.0.1:{station.port}/")
        assert "door.jpeg" in driver.find_element(By.ID, "rows").text
        open_page(driver, f"http://localhost:{station.port}/")
        type_name(driver, "Nurse Flo")
        driver.find_element(By.CSS_SELECTOR, f'tr[data-event-id="{flag["event_id"]}"] button.ack').click()
        wait_until(lambda: sub.where(lambda m: m.payload["by"] == "Nurse Flo"), 10, "the ack from localhost")
        driver.get(f"http://evil.example:{station.port}/")
        text = driver.find_element(By.TAG_NAME, "body").text
        assert "does not answer to Host" in text and "door.jpeg" not in text
        stolen = driver.execute_async_script(
            "const done = arguments[0];"
            "fetch('/api/state').then(r => r.text()).then(done, e => done('failed: ' + e));")
        assert "door.jpeg" not in stolen and "ACC-4711" not in stolen
    finally:
        driver.quit()
        sub.stop()


# ----------------------------------------------------------------------------- password guessing


def _locked(status: int, headers: dict, window: float) -> bool:
    return status == 429 and 1 <= int(headers["retry-after"]) <= window + 1


def _guesses(station: StationProc, sources: list[str], bearer: bool = False) -> list[tuple[int, dict, str]]:
    """One wrong password from each source, all at once."""
    def guess(args: tuple[int, str]) -> tuple[int, dict, str]:
        i, source = args
        if bearer:
            return hit(station, "GET", "/api/state", {"Authorization": f"Bearer guess-bearer-{i}"}, source=source)
        return hit(station, "POST", "/login", FORM, f"password=guess-form-{i}".encode(), source=source)

    with ThreadPoolExecutor(len(sources)) as pool:
        return list(pool.map(guess, enumerate(sources)))


def _login(station: StationProc, source: str) -> tuple[int, dict, str]:
    return hit(station, "POST", "/login", FORM, b"password=correct+horse+battery", source=source)


def _password_station(stations, tmp_path, **limits: int) -> StationProc:
    pw = tmp_path / "station.password"
    pw.write_text(PASSWORD + "\n")
    return stations("--password-file", str(pw),
                    env={f"PNEUMOFLAG_STATION_{k.upper()}": str(v) for k, v in limits.items()})


def test_concurrent_guesses_are_refused_per_client_and_overall(stations, tmp_path):
    """A long window, so that no failure ages out while the test runs: the counts are exact."""
    window = 600
    station = _password_station(stations, tmp_path, login_failures=3, login_failures_total=8, login_window=window)
    # a nurse with two typos, then the right password: in at once
    for typo in ("correct horse batery", "correct hors battery"):
        status, headers, _ = hit(station, "POST", "/login", FORM, f"password={typo}".encode(), source="127.0.0.2")
        assert status == 303 and headers["location"] == "/login?failed=1"
    status, headers, _ = _login(station, "127.0.0.2")
    assert status == 303 and headers["location"] == "/"
    # twelve concurrent form guesses from one client: three are checked, the rest refused unchecked
    answers = _guesses(station, ["127.0.0.3"] * 12)
    failed = [a for a in answers if a[0] == 303]
    locked = [a for a in answers if _locked(a[0], a[1], window)]
    assert len(failed) == 3 and len(locked) == 9, [a[0] for a in answers]
    assert all(a[1]["location"] == "/login?failed=1" for a in failed)
    assert "Too many wrong passwords" in locked[0][2] and "text/html" in locked[0][1]["content-type"]
    status, headers, _ = _login(station, "127.0.0.3")  # locked out: not even the right password is checked
    assert _locked(status, headers, window)
    # another client is not slowed by that
    assert hit(station, "GET", "/api/state", {"Authorization": f"Bearer {PASSWORD}"}, source="127.0.0.4")[0] == 200
    # bearer guesses count the same way: three 401s, then 429
    answers = _guesses(station, ["127.0.0.5"] * 12, bearer=True)
    assert sorted(a[0] for a in answers) == [401] * 3 + [429] * 9
    assert all(_locked(*a[:2], window) and "retry in" in json.loads(a[2])["error"] for a in answers if a[0] == 429)
    # 2 + 3 + 3 = 8 failures in the window: now a client that never guessed waits too
    status, headers, _ = _login(station, "127.0.0.6")
    assert _locked(status, headers, window)
    assert hit(station, "GET", "/api/state", {"Authorization": f"Bearer {PASSWORD}"}, source="127.0.0.7")[0] == 429
    # logged, rate-limited, and never the password tried
    out = station.output()
    assert "wrong password (login form) from 127.0.0.3" in out
    assert "wrong password (bearer token) from 127.0.0.5" in out
    assert "refused a login from 127.0.0.3: too many wrong passwords" in out
    assert "guess-" not in out and "batery" not in out and PASSWORD not in out
    assert len([ln for ln in out.splitlines() if "too many wrong passwords" in ln and "127.0.0.3" in ln]) < 9


def _lock_out(send) -> dict:
    """Wrong passwords until one is answered 429 (however slow this machine is); that answer's headers."""
    got: dict = {}

    def locked() -> bool:
        status, headers, _ = send()
        got.update(headers)
        return status == 429

    wait_until(locked, 120, "a lock-out", interval=0)
    return got


def test_after_a_lock_out_the_right_password_gets_in_within_retry_after(stations, tmp_path):
    window = 3
    station = _password_station(stations, tmp_path, login_failures=2, login_failures_total=6, login_window=window)
    # one client, the form
    headers = _lock_out(lambda: hit(station, "POST", "/login", FORM, b"password=typo", source="127.0.0.3"))
    assert 1 <= int(headers["retry-after"]) <= window
    time.sleep(int(headers["retry-after"]))
    status, headers, _ = _login(station, "127.0.0.3")
    assert status == 303 and headers["location"] == "/"
    # one client, the bearer token
    headers = _lock_out(lambda: hit(station, "GET", "/api/state", {"Authorization": "Bearer typo"},
                                    source="127.0.0.5"))
    time.sleep(int(headers["retry-after"]))
    assert hit(station, "GET", "/api/state", {"Authorization": f"Bearer {PASSWORD}"}, source="127.0.0.5")[0] == 200
    # everyone: one wrong token from each of many clients until a newcomer is refused, then a nurse gets in
    sources = iter(f"127.0.1.{n}" for n in range(1, 250))
    headers = _lock_out(lambda: hit(station, "GET", "/api/state", {"Authorization": "Bearer typo"},
                                    source=next(sources)))
    time.sleep(int(headers["retry-after"]))
    status, headers, _ = _login(station, "127.0.2.1")
    assert status == 303 and headers["location"] == "/"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_counts_a_sliding_window_per_client_and_overall():
    clock = FakeClock()
    throttle = Throttle(per_client=2, overall=3, window=10.0, clock=clock)
    assert throttle.reserve("a") == 0 and throttle.reserve("a") == 0
    assert throttle.reserve("a") == pytest.approx(10.0)  # a's third guess waits for its first to age out
    clock.now += 4
    assert throttle.reserve("b") == 0
    assert throttle.reserve("c") == pytest.approx(6.0)  # the overall limit: c never guessed, still waits
    throttle.forgive("b")  # b's was the right password: it does not count
    assert throttle.failures("b") == 0 and throttle.reserve("c") == 0
    clock.now += 6  # a's two failures age out
    assert throttle.failures("a") == 0 and throttle.reserve("a") == 0
    assert retry_after(0.2) == "1" and retry_after(6.0) == "6" and retry_after(6.01) == "7"


def test_the_quiet_log_holds_back_repeats_and_counts_them():
    clock = FakeClock()
    quiet = QuietLog(interval=10.0, clock=clock)
    assert quiet.due("x") == 0
    assert [quiet.due("x") for _ in range(5)] == [None] * 5
    assert quiet.due("y") == 0  # another client is not held back
    clock.now += 10
    assert quiet.due("x") == 5
