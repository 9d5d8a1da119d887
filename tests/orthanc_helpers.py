"""Orthanc as the PACS: Debian's ``Orthanc`` on free loopback ports, its own config and storage in a tmp folder."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

from mqtt_helpers import free_port

ORTHANC_AE = "ORTHANC"


def orthanc_binary() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None:
        raise RuntimeError("Orthanc is not installed: apt-get install orthanc (.ci/run does this)")
    return exe


class Orthanc:
    """One Orthanc process; ``stop()`` and ``start()`` again keep its ports and its stored instances."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.dir / "orthanc.log"
        self.conf = self.dir / "orthanc.json"
        self.conf.write_text(json.dumps({
            "Name": "pneumoflag-test-pacs", "StorageDirectory": str(self.dir / "db"),
            "IndexDirectory": str(self.dir / "db"), "DicomAet": ORTHANC_AE, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "Plugins": [], "HttpThreadsCount": 4, "ConcurrentJobs": 1, "StorageCompression": False,
            "SaveJobs": False,
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> "Orthanc":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([orthanc_binary(), str(self.conf)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"Orthanc's REST API did not answer in {timeout:g} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str, raw: bool = False) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            body = rsp.read()
        return body if raw else json.loads(body)


@contextlib.contextmanager
def running_orthanc(workdir: Path) -> Iterator[Orthanc]:
    """A started Orthanc (``.dicom_port``, ``.http_port``, AE ``ORTHANC``), stopped on the way out, whatever
    happened (a test module makes it its fixture)."""
    o = Orthanc(workdir)
    try:
        yield o.start()
    finally:
        o.stop()
