"""One list, one place: every reason code, priority and accelerator the code uses comes from device/vocab.py,
and the README lists the same values."""
from __future__ import annotations

import re

from conftest import REPO
from pneumoflag.device.vocab import ACCELERATORS, PRIORITIES, REASONS, Reason

SOURCES = sorted((REPO / "device").glob("*.py")) + sorted((REPO / "convert").glob("*.py"))
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def test_every_reason_the_code_raises_is_in_the_list():
    used = set()
    for f in SOURCES:
        text = f.read_text()
        used |= set(re.findall(r'ImageDecodeError\(\s*"([a-z-]+)"', text))
        used |= {Reason[name].value for name in re.findall(r"Reason\.([A-Z_]+)", text)}
    assert used <= set(REASONS), used - set(REASONS)
    assert {"not-a-radiograph", "duplicate-of", "outside-folder", "too-large", "internal-error"} <= used


def test_the_readme_lists_every_reason_code_exactly():
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", _section("Error reason codes"), re.M))
    assert listed == set(REASONS)


def test_the_readme_names_the_priorities_and_accelerators_as_the_code_does():
    contract = _section("MQTT contract")
    for p in PRIORITIES:
        assert f"`…/flags/{p}`" in contract or f"/flags/{p}`" in contract
    assert f"--accelerator {'|'.join(ACCELERATORS)}" in README


def test_the_device_never_imports_the_toolchain_by_name():
    """The toolchain and the station plug into the device (entry points); the device imports neither."""
    offenders = [f"{f.name}: {line.strip()}" for f in sorted((REPO / "device").glob("*.py"))
                 for line in f.read_text().splitlines()
                 if re.search(r"from \.\.(convert|station)\b|pneumoflag\.(convert|station)\b", line)
                 and not line.strip().startswith("#")]
    assert offenders == []


def test_the_readme_names_the_steps_of_stats_as_the_code_does():
    from pneumoflag.device.stats import STEPS

    stats_row = next(line for line in _section("MQTT contract").splitlines() if line.startswith("| `{prefix}/{device}/stats`"))
    named = re.search(r"`steps_ms` \(p50/p95/n in ms of each step of a scored file: (.*?);", stats_row).group(1)
    assert re.findall(r"`([a-z]+)`", named) == list(STEPS)
