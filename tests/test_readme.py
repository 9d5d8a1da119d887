"""The README: its first two commands, as a newcomer runs them on a fresh clone; its configuration tables."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from pneumoflag.device.broker import port_in_use
from pneumoflag.device.samples import SAMPLES_DIR


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block and text.index(block.group(0)) < 200, "the README must open with the two commands"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2
    return lines


def test_ci_runs_the_readme_test_command_unchanged():
    _, test_cmd = readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


@pytest.mark.slow
def test_first_command_runs_the_demo_from_a_clean_clone(tmp_path):
    """Clone the committed tree, run the first command exactly; it must stop by itself."""
    if not (REPO / ".git").exists():
        pytest.fail("not a git checkout: cannot make a clean clone")
    # With 127.0.0.1:1883 already taken (a system Mosquitto) the demo publishes to that broker
    # instead of starting its own; either way every sample must arrive.
    taken = port_in_use("127.0.0.1", 1883)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
    demo_cmd, _ = readme_commands()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PNEUMOFLAG_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    proc = subprocess.run(["bash", "-c", demo_cmd], cwd=clone, capture_output=True, text=True, env=env,
                          timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    samples = len(list(SAMPLES_DIR.rglob("*.jpeg")))
    assert f"{samples} of {samples} scored and delivered over MQTT" in out
    assert len([ln for ln in out.splitlines() if re.search(r"\b(URGENT|FLAG|ROUTINE)\b +p=", ln)]) == samples
    assert "not a diagnostic device" in out
    assert ("(embedded)" in out) is not taken
    shutil.rmtree(clone / ".venv", ignore_errors=True)


def _readme_config_tables(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """Each ``| `[section]` key | default | meaning |`` table of the README: section -> key -> (default, meaning)."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    head = re.compile(r"^\| `\[(\w+)\]` key \| default \| meaning \|\n\| --- \| --- \| --- \|\n((?:\|.*\n)*)", re.M)
    for m in head.finditer(text):
        assert m.group(1) not in tables, f"two README tables for [{m.group(1)}]"
        rows = {}
        for line in m.group(2).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 3 and cells[0].startswith("`"), f"not a key row: {line!r}"
            rows[cells[0].strip("`")] = (cells[1], cells[2])
        tables[m.group(1)] = rows
    return tables


def test_readme_documents_every_config_key_with_its_default_and_meaning():
    """The README's tables say what config.py declares: every key, its default, its help and bounds."""
    from dataclasses import fields

    from pneumoflag.device.config import SECTIONS, describe, shown_default

    readme = _readme_config_tables((REPO / "README.md").read_text())
    declared = {sec: {f.name: (shown_default(f), describe(f)) for f in fields(cls)} for sec, cls in SECTIONS.items()}
    assert readme == declared


def test_readme_tables_are_the_output_of_config_markdown(capsys):
    """Regenerate them with `pneumoflag config --markdown` and paste: each table appears once, whole."""
    from conftest import run_cli

    assert run_cli("config", "--markdown") == 0
    tables = capsys.readouterr().out.strip("\n").split("\n\n")
    readme = (REPO / "README.md").read_text()
    assert len(tables) == len(_readme_config_tables(readme))
    for table in tables:
        assert readme.count(table + "\n\n") == 1, table.splitlines()[0]
