"""Names from an export folder are hostile until shown otherwise: any byte string Linux allows.

A file name can hold bytes that are not UTF-8 (the database and JSON cannot store
them), newlines (a forged log line) or terminal escapes (``ESC[2J`` clears a
nurse's screen). Every name goes through :func:`path_text` once, where it enters
the daemon, and every line shown to a person through :func:`printable`.
"""
from __future__ import annotations

import logging
import os
import re

# C0 controls, DEL and C1 controls, the Unicode line/paragraph separators, and lone surrogates
# (from undecodable bytes or hostile JSON: they cannot even be written to a UTF-8 terminal)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def path_text(name: str | bytes | os.PathLike) -> str:
    """A file name as valid UTF-8 text, reversibly: undecodable bytes become ``\\xNN``.

    Backslashes are doubled first, so two different byte names never map to the
    same text (the journal keys on it).
    """
    raw = os.fsencode(name)
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes, safe for a log line or a terminal."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"
                                             if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"), text)


class EscapingFilter(logging.Filter):
    """Renders each record's message with control characters escaped (one record, one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must still be logged
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = printable(message), None
        return True
