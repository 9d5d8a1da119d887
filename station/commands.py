"""``pneumoflag station``: plugged into the device CLI through the ``pneumoflag.commands`` entry point.

Nothing heavy is imported here: the device CLI loads this module for every command, and a machine
without the ``station`` extra (aiohttp) must still get its ``--help``.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .settings import StationError, StationSettings

TITLE = "nursing station (needs the 'station' extra: pip install 'pneumoflag[station]')"

DESCRIPTION = """\
Serve the nursing-station web console: one live page with the worklist of every appliance under the
topic prefix (urgent, flag, routine, oldest first), their time to notification, an acknowledge button
per row, a detail panel per row with the appliance's heat map (explain.enabled), escalations, the
appliances' online/offline/silent state and recent errors.

The station subscribes with a persistent MQTT session under the client id pneumoflag-station-ID, so
flags published while it was down arrive when it comes back, and keeps its worklist in SQLite
(default STATE/station-ID.db), so a reload or a restart shows the same list. Acknowledgements are
published on PREFIX/DEVICE/acks and shown on every station.

It listens on 127.0.0.1:8080 by default. Listening on any other address needs a password
(--password-file; the same secret works as a bearer token) or an explicit --insecure. Put it behind a
TLS reverse proxy for the ward network (README, "Nursing station").
"""


def add_station(sub) -> None:
    p = sub.add_parser("station", help="web console: live worklist of every appliance, acknowledge, escalations",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("configuration (file < PNEUMOFLAG_* environment < these flags)")
    g.add_argument("--config", type=Path, help="TOML config file with [station] and [mqtt] "
                   "(default /etc/pneumoflag/pneumoflag.toml if present)")
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker (default 127.0.0.1:1883)")
    g.add_argument("--topic-prefix", help="MQTT topic prefix (default pneumoflag)")
    g.add_argument("--listen", metavar="HOST:PORT", help="address of the web page (default 127.0.0.1:8080)")
    g.add_argument("--station-id", metavar="ID", help="this station's name in acks and its MQTT client id "
                   "(default: host name)")
    g.add_argument("--password-file", metavar="FILE", help="file holding the console's password "
                   "(also accepted as a bearer token); required to listen beyond loopback")
    g.add_argument("--insecure", action="store_true", default=None,
                   help="allow a non-loopback listen address without a password")
    g.add_argument("--no-chime", dest="chime", action="store_false", default=None,
                   help="no sound when an urgent flag arrives")
    g.add_argument("--state-dir", help="where the worklist lives when --db is not given")
    g.add_argument("--db", metavar="FILE", help="the worklist database (default STATE/station-ID.db)")
    p.set_defaults(func=run_station)


OVERRIDES = {"broker": "mqtt.broker", "topic_prefix": "mqtt.topic_prefix", "listen": "station.listen",
             "station_id": "station.station_id", "password_file": "station.password_file",
             "insecure": "station.insecure", "chime": "station.chime", "state_dir": "state.dir", "db": "station.db"}


def run_station(args: argparse.Namespace) -> int:
    from pneumoflag.device.config import EMBEDDED_BROKER, load_config

    overrides = {key: getattr(args, attr) for attr, key in OVERRIDES.items() if getattr(args, attr) is not None}
    cfg = load_config(args.config, overrides=overrides)
    if not cfg.mqtt.broker:
        cfg.mqtt.broker = EMBEDDED_BROKER
    settings = StationSettings.from_config(cfg)
    settings.check_exposure()
    try:
        from .web import serve
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "aiohttp":
            raise StationError("needs aiohttp, which is not installed: pip install 'pneumoflag[station]'") from None
        raise
    asyncio.run(serve(cfg, settings))
    return 0


def register(sub) -> dict:
    """Entry point (group ``pneumoflag.commands``): add ``station`` to the CLI."""
    add_station(sub)
    return {"title": TITLE, "errors": (StationError,)}
