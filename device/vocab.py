"""The project's closed lists, each in one place: priorities, accelerators, error reasons.

Code, config validation, ``--help`` and the README all take these from here
(a test checks the README against them).
"""
from __future__ import annotations

from enum import Enum


class _Listed(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Priority(_Listed):
    """A flag's priority, most pressing first."""

    URGENT = "urgent"
    FLAG = "flag"
    ROUTINE = "routine"


class Accelerator(_Listed):
    """Where the model runs: ``auto`` takes the Edge TPU when it is usable, else the CPU."""

    AUTO = "auto"
    EDGETPU = "edgetpu"
    CPU = "cpu"


class Reason(_Listed):
    """Why a file got an error instead of a flag (the ``reason`` of an error message)."""

    EMPTY_FILE = "empty-file"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    UNSUPPORTED_FORMAT = "unsupported-format"
    UNSUPPORTED_IMAGE = "unsupported-image"
    DECOMPRESSION_BOMB = "decompression-bomb"
    TOO_LARGE = "too-large"
    TOO_SLOW = "too-slow"
    CRASHED_DECODER = "crashed-decoder"
    NOT_A_RADIOGRAPH = "not-a-radiograph"
    PERMISSION_DENIED = "permission-denied"
    NOT_FOUND = "not-found"
    NOT_A_FILE = "not-a-file"
    OUTSIDE_FOLDER = "outside-folder"
    UNREADABLE = "unreadable"
    BAD_ARRAY = "bad-array"
    DICOM_MODALITY = "dicom-modality"
    DICOM_BODY_PART = "dicom-body-part"
    DICOM_UNSUPPORTED = "dicom-unsupported"
    DICOM_NO_PIXELS = "dicom-no-pixels"
    DICOM_INVALID = "dicom-invalid"
    DICOM_UNAVAILABLE = "dicom-unavailable"
    DUPLICATE_OF = "duplicate-of"
    MODEL_OUTPUT = "model-output"
    INTERNAL_ERROR = "internal-error"


#: perceptual colour maps of the heat-map overlays (device/explain.py holds their tables)
COLORMAPS = ("inferno", "magma", "viridis")

PRIORITIES = Priority.values()
ACCELERATORS = Accelerator.values()
REASONS = Reason.values()
