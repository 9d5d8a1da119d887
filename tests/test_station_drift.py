"""The drift state on the nursing station, with real parts: Mosquitto, the daemon with the shipped model, a
station process and Debian's chromium. A device in watch or alarm shows it in the devices panel with its
reason; alarm puts a banner above the worklist that every nurse sees and nobody can dismiss."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from mqtt_helpers import Subscriber, drop, new_daemon, wait_until
from pneumoflag.device.contract import DriftCheck, DriftMessage, Topics, encode
from selenium.webdriver.common.by import By
from test_drift import SMALL, grey, needs_site, png_bytes, site_images, write_bytes
from test_station import StationProc, new_browser, open_page, publish, screenshot

pytestmark = pytest.mark.slow

BANNER_JS = """const b = document.getElementById('drift-banner');
return {hidden: b.hidden, shown: b.offsetParent !== null, text: b.textContent,
        buttons: b.querySelectorAll('button, a, [role=button]').length,
        above: b.getBoundingClientRect().bottom <= document.getElementById('worklist').getBoundingClientRect().top};"""
DEVICE_DRIFT_JS = """const li = [...document.querySelectorAll('#devices li')].find(l => l.dataset.device === arguments[0]);
const d = li && li.querySelector('.drift'); return d ? d.textContent : null;"""


def banner(driver) -> dict:
    return driver.execute_script(BANNER_JS)


@needs_site
def test_the_station_shows_watch_in_the_panel_and_alarm_in_a_banner_nobody_can_dismiss(dirs, broker, daemons,
                                                                                       subscribers, tmp_path):
    watch, state = dirs
    sub = Subscriber(broker.address, "pneumoflag/#")
    subscribers.append(sub)
    new_daemon(daemons, watch, state, broker.address, device_id="xray-room-2", env=SMALL).start()
    station = StationProc(tmp_path, broker.address, "desk-a")
    drivers = []
    try:
        station.start()
        drivers.append(new_browser())
        page = drivers[0]
        open_page(page, station.url)
        for p in site_images(0, 12):
            drop(p, watch)
        sub.wait_flags(12, 30)
        wait_until(lambda: any(m["scored"] == 12 for m in sub.of_kind("drift")), 15, "the drift state")
        wait_until(lambda: page.execute_script(DEVICE_DRIFT_JS, "xray-room-2") is None and
                   page.find_elements(By.CSS_SELECTOR, '#devices li[data-device="xray-room-2"]'), 10, "the device")
        assert banner(page)["hidden"]

        # another appliance in watch: its reason in the devices panel, no banner
        msg = DriftMessage("xray-room-3", "watch", "grey mean 142 over the last 200 images, reference 122 (sd 16; "
                           "+0.6 sd)", 200, 200, [DriftCheck("grey_mean", "watch", "grey mean 142", 0.6)],
                           "pneumoflag-rn128 3.0.0", "site_dev, 312 images")
        publish(broker.address, Topics("pneumoflag", "xray-room-3").drift(), encode(msg.to_dict()))
        wait_until(lambda: page.execute_script(DEVICE_DRIFT_JS, "xray-room-3"), 10, "xray-room-3's drift note")
        assert page.execute_script(DEVICE_DRIFT_JS, "xray-room-3").startswith("drift watch: grey mean 142")
        assert banner(page)["hidden"]

        # xray-room-2 exports inverted grey: the gate refuses them, the daemon goes to alarm
        for i, p in enumerate(site_images(1, 8)):
            write_bytes(png_bytes(255 - grey(p).astype(np.int16)), watch, f"inverted-{i}.png")
        wait_until(lambda: not banner(page)["hidden"], 20, "the drift banner")
        b = banner(page)
        assert b["shown"] and b["above"] and b["buttons"] == 0, b
        assert "Scores from xray-room-2 no longer look like its validation data: re-validate." in b["text"]
        assert "refused by the gate" in b["text"] and "xray-room-3" not in b["text"]
        assert page.execute_script(DEVICE_DRIFT_JS, "xray-room-2").startswith("drift alarm: ")
        screenshot(page, "station-drift.png")  # docs/, with WRITE_SCREENSHOTS=1

        # a nurse who opens the page later sees it too (the station keeps the state; the topic is retained)
        drivers.append(new_browser())
        open_page(drivers[1], station.url)
        wait_until(lambda: not banner(drivers[1])["hidden"], 10, "the banner on a page opened later")
        assert "xray-room-2" in banner(drivers[1])["text"]
    finally:
        for d in drivers:
            with contextlib.suppress(Exception):
                d.quit()
        station.close()
