"""What pyproject.toml promises about dependencies is what the code needs.

The DICOM path uses ``pydicom.pixels`` (pydicom 3): a pin that admitted 2.4 let
every DICOM be rejected as ``dicom-unavailable``. This installs the lowest
version the pin admits, beside the installed one, and reads a radiograph with it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mqtt_helpers import REPO

PYPROJECT = REPO / "pyproject.toml"


def _lower_bound(package: str) -> str:
    text = PYPROJECT.read_text()
    bounds = set(re.findall(rf'"{package}>=([0-9.]+)', text))
    assert len(bounds) == 1, f"{package} is pinned differently in different places: {bounds}"
    return bounds.pop()


def test_the_lowest_pinned_pydicom_reads_a_radiograph(tmp_path: Path) -> None:
    from dicom_helpers import write_test_dicom

    lowest = _lower_bound("pydicom")
    assert int(lowest.split(".")[0]) >= 3, "the code uses pydicom.pixels (pydicom 3)"
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          f"pydicom=={lowest}"], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    gray = np.asarray(Image.open(sorted((REPO / "tests" / "data" / "mini" / "NORMAL").glob("*.jpeg"))[0])
                      .convert("L"), np.uint16) * 16
    dcm = write_test_dicom(tmp_path / "cr.dcm", gray, WindowCenter=2048.0, WindowWidth=4096.0)
    code = (
        "import sys, pydicom\n"
        "from pneumoflag.device.dicom import read_dicom\n"
        f"arr, info = read_dicom({str(dcm)!r})\n"
        "print(pydicom.__version__, arr.shape, arr.dtype, info.modality)\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    version, rest = run.stdout.split(" ", 1)
    assert version.startswith(lowest) and f"{gray.shape}" in rest and "uint8 CR" in rest
