"""The DICOM sender (C-STORE and C-ECHO SCU): one instance to one peer, an answer a person can read.

A PACS that is down, refuses the association or answers a failure status is an everyday event, not a crash:
:func:`send` and :func:`echo` return a :class:`SendResult` whose ``message`` says which of these happened
(connection refused, no answer in time, A-ASSOCIATE-RJ with its reason, the peer's status code and meaning),
and raise nothing for what the network or the peer does. Every wait is bounded by ``timeout``: the TCP
connection, the association (ACSE), each DIMSE message and the network idle time.

Nothing here retries or queues: the caller's outbox decides when to try again and deletes only on ``ok``.
pynetdicom is imported only when a peer is contacted (it is part of the ``dicom`` extra).
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Optional

from .config import PacsConfig, parse_destination

log = logging.getLogger(__name__)

#: the AE title the peer is called with when an address gives none (dcmtk's default too)
DEFAULT_CALLED_AE = "ANY-SCP"
#: statuses a storage SCP may answer that still mean "stored" (PS3.4 B.2.3: coercion, element discarded...)
WARNING_STATUSES = (0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: its AE title and network address."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str = "destination", default_ae: Optional[str] = None) -> "Destination":
        """``AE@HOST:PORT`` (or ``HOST:PORT`` when ``default_ae`` is given); a ``ValueError`` names what is wrong.

        An AE title is 1-16 characters without backslash or control characters (PS3.5 AE).
        """
        if "@" not in text and default_ae is not None:
            text = f"{default_ae}@{text}"
        ae, host, port = parse_destination(text, key)
        return cls(ae, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class SendResult:
    """What one C-STORE or C-ECHO came to: ``ok`` only on the peer's success (or warning) status."""

    ok: bool
    message: str
    #: the DIMSE status the peer answered; None when no answer came (no connection, rejected, timed out)
    status: Optional[int] = None


def destinations(cfg: PacsConfig) -> list[Destination]:
    """``pacs.destinations``, parsed (the configuration has checked them already)."""
    return [Destination.parse(d, "pacs.destinations") for d in cfg.destinations]


def instances_to_send(cfg: PacsConfig, sr: Any, heatmap: Optional[Any] = None) -> list[Any]:
    """What goes to each destination for one study result, in order: the SR, then the heat map when
    ``pacs.send_heatmap`` asks for it and there is one."""
    return [sr] + ([heatmap] if cfg.send_heatmap and heatmap is not None else [])


def _new_ae(calling_ae: str, timeout: float) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(ae: Any, dest: Destination) -> tuple[Any, str]:
    """(association, how far it got: "closed", "connected" or "answered"); pynetdicom reports a refused
    connection and an ACSE timeout alike as aborted, and these tell them apart."""
    from pynetdicom import evt

    seen = ["closed"]
    handlers = [(evt.EVT_CONN_OPEN, lambda event: seen.append("connected")),
                (evt.EVT_ACSE_RECV, lambda event: seen.append("answered"))]
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers)
    return assoc, seen[-1]


def _not_connected(assoc: Any, got: str, dest: Destination, timeout: float) -> str:
    """Why an association did not come up, in words: rejected (with the peer's reason), aborted, unreachable."""
    if assoc.is_rejected:
        rj = getattr(assoc.acceptor, "primitive", None)
        reason = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}" if rj is not None else "no reason given"
        return f"{dest} rejected the association ({reason})"
    if got == "answered":
        return f"{dest} aborted the association"
    if got == "connected":
        return f"{dest}: no association answer within {timeout:g} s (is it a DICOM node?)"
    # The TCP connection failed; only now (the peer is not working anyway) a plain connection says why.
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            pass
    except socket.timeout:
        return f"{dest}: no connection within {timeout:g} s (host down or filtered?)"
    except OSError as exc:
        return f"{dest}: cannot connect ({exc.strerror or exc})"
    return f"{dest}: the connection failed, and works now: try again"


def _status_message(status: Any, dest: Destination, what: str, timeout: float) -> SendResult:
    """A DIMSE response status dataset -> SendResult; an empty one means no response came in time."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    code = getattr(status, "Status", None)
    if code is None:
        return SendResult(False, f"{dest}: no {what} response within {timeout:g} s (or the association was lost)")
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("Unknown", "unknown status"))
    comment = str(getattr(status, "ErrorComment", "") or "").strip()
    detail = f"0x{code:04X} {meaning}" + (f": {comment}" if comment else "")
    if code == 0x0000:
        return SendResult(True, f"{dest}: {what} success", code)
    if code in WARNING_STATUSES:
        return SendResult(True, f"{dest}: {what} stored with a warning ({detail})", code)
    return SendResult(False, f"{dest}: {what} failed ({category.lower()} {detail})", code)


def send(ds: Any, dest: Destination, calling_ae: str, timeout: float) -> SendResult:
    """C-STORE one dataset (a pydicom ``Dataset`` with its File Meta) to ``dest``; never raises for the peer.

    The presentation context offered is the dataset's SOP class in its own transfer syntax and in the two
    uncompressed ones, so a peer that does not take the first still gets the instance.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = _new_ae(calling_ae, timeout)
    own = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian
    syntaxes = list(dict.fromkeys([own, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    assoc, got = _associate(ae, dest)
    if not assoc.is_established:
        return _failed(_not_connected(assoc, got, dest, timeout))
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, RuntimeError) as exc:  # no accepted context for this SOP class / syntax
        assoc.abort()
        return _failed(f"{dest}: cannot send {getattr(ds.SOPClassUID, 'name', ds.SOPClassUID)}: {exc}")
    result = _status_message(status, dest, "C-STORE", timeout)
    _close(assoc)
    log.debug("%s", result.message)
    return result


def echo(dest: Destination, calling_ae: str, timeout: float) -> SendResult:
    """C-ECHO ``dest``: the network path, the AE titles and the peer's DICOM service, checked in one round."""
    from pynetdicom.sop_class import Verification

    ae = _new_ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc, got = _associate(ae, dest)
    if not assoc.is_established:
        return _failed(_not_connected(assoc, got, dest, timeout))
    result = _status_message(assoc.send_c_echo(), dest, "C-ECHO", timeout)
    _close(assoc)
    return result


def _failed(message: str) -> SendResult:
    log.debug("%s", message)  # the caller says it, once: an outbox retrying every minute must not repeat it
    return SendResult(False, message)


def _close(assoc: Any) -> None:
    """Release when the association still stands (a DIMSE timeout has aborted it already)."""
    if assoc.is_established:
        assoc.release()
