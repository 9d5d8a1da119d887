"""The bundled sample radiographs and their reference probabilities (package data, credit in README.md here).

`pneumoflag selftest`, `demo` and `bench` read them at run time, so they ship with the device package;
the tests use the same folder through :data:`SAMPLES_DIR`.
"""
from pathlib import Path

#: the one name of the sample folder: NORMAL/ and PNEUMONIA/ radiographs and reference.json
SAMPLES_DIR: Path = Path(__file__).resolve().parent
