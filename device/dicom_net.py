"""The DICOM receiver (C-STORE and C-ECHO SCP): radiographs from modalities and PACS, into a spool folder.

What it guarantees a sender:

- **"Stored" means durable.** A C-STORE is answered success only once the instance is in the spool folder as
  ``<SOPInstanceUID>.dcm`` (Part 10, with its File Meta, the data set byte for byte as received): written under a
  temporary dot-name, ``fsync``'d, renamed into place with ``os.replace``, and the folder ``fsync``'d; with a
  ``journal`` (the daemon's, see ``received``) it is journaled too before the answer, and a journal that cannot
  be written takes the file away again and answers 0xA700. Then, and only then, ``on_stored(path, dataset)``
  runs (the daemon's intake takes the file from there).
- **Failures the sender understands, and nothing half-written.** A full disk or any other write failure is
  0xA700 (Out of Resources) with the temporary file removed; so is an instance over the size limit
  (``watch.max_file_mb``). A data set that cannot be parsed, or whose SOP Instance UID is missing, not a valid
  UID or not the one of the C-STORE request, is 0xC000 (Cannot Understand); one whose SOP class is not the
  request's is 0xA900. The sender's retry brings the instance back; a retry of an instance already in the spool
  (or, with a journal, ever journaled) is answered success without writing it again.
- **Only what the model reads, only from whom it should.** The three radiograph storage SOP classes (CR, DX for
  presentation and for processing) in the transfer syntaxes pydicom has a decoder for on this machine
  (:func:`accepted_transfer_syntaxes`), and C-ECHO; anything else is refused at negotiation. The calling AE title
  must be one of ``allowed_callers`` (``*``: any, logged as a warning), else A-ASSOCIATE-RJ "calling AE title not
  recognised"; the called AE title must be ours; a peer address outside ``allowed_addresses`` (when set) has its
  TCP connection closed unanswered.
- **Bounded.** ACSE, DIMSE and network timeouts drop slow or dead peers; ``max_associations`` run at once, each
  in its own thread; a port already taken stops the start with :class:`DicomNetError`.

pynetdicom receives a whole data set into memory before the handler sees it, so the size limit refuses to
*keep* a large instance; it cannot stop one from being sent.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from .config import ANY_CALLER, Config, check_ae_title, parse_host_port
from .dicom import RADIOGRAPH_STORAGE, is_uid

log = logging.getLogger(__name__)

#: C-STORE statuses (PS3.4 B.2.3) this receiver answers
SUCCESS, OUT_OF_RESOURCES, NOT_MATCHING_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000
#: the transfer syntaxes offered, when pydicom can decode them here: uncompressed, deflate, JPEG baseline/extended,
#: JPEG lossless, JPEG-LS, JPEG 2000, RLE
CANDIDATE_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
)
#: the spool's temporary names: a dot-name ending in .part, which no watcher takes for a finished file
TEMP_PREFIX, TEMP_SUFFIX = ".", ".part"

OnStored = Callable[[Path, Any], None]


class ReceiveJournal(Protocol):
    """Where the receiver journals what it answers "stored" (called from its association threads)."""

    def known(self, sop_instance_uid: str) -> bool:
        """Answered "stored" before: a resend is answered success again, not kept twice."""

    def add(self, sop_instance_uid: str, caller: str, peer: Optional[str]) -> None:
        """Journal it durably; raise when that cannot be done (the instance is then refused)."""


class DicomNetError(RuntimeError):
    """The receiver cannot start (port taken, bad settings); the message says what to change."""


def accepted_transfer_syntaxes() -> list[str]:
    """The candidates whose pixel data an installed pydicom decoder can decode (asked now, not assumed)."""
    from pydicom.pixels import get_decoder

    found = []
    for uid in CANDIDATE_TRANSFER_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
    return found


def _status(code: int, comment: str) -> Any:
    """A C-STORE response status with an Error Comment (LO: 64 characters) the sender's log shows."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if code != SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds


class DicomReceiver:
    """A C-STORE/C-ECHO SCP writing into ``spool``; ``start()`` it, ``stop()`` it (or use it as a context)."""

    def __init__(self, spool: Path | str, *, listen: str = "0.0.0.0:11112", ae_title: str = "PNEUMOFLAG",
                 allowed_callers: Sequence[str] = (), allowed_addresses: Sequence[str] = (),
                 timeout: float = 30.0, max_bytes: int = 100 * 2**20, max_associations: int = 8,
                 on_stored: Optional[OnStored] = None, journal: Optional[ReceiveJournal] = None):
        self.spool = Path(spool)
        if listen.endswith(":0"):  # any free port (tests); ``address`` tells which
            self.host, self.port = listen[:-2].strip("[]"), 0
        else:
            self.host, self.port = parse_host_port(listen, "dicom_net.listen")
        self.ae_title = check_ae_title(ae_title, "dicom_net.ae_title")
        if not allowed_callers:
            raise DicomNetError("dicom_net.allowed_callers is empty, which refuses every caller: name the "
                                f'modalities\' calling AE titles, or ["{ANY_CALLER}"] to accept any')
        self.any_caller = ANY_CALLER in allowed_callers
        self.callers = [] if self.any_caller else [check_ae_title(c, "dicom_net.allowed_callers")
                                                   for c in allowed_callers]
        self.networks = [ipaddress.ip_network(a, strict=False) for a in allowed_addresses]
        self.timeout, self.max_bytes, self.max_associations = timeout, max_bytes, max_associations
        self.on_stored = on_stored
        self.journal = journal
        self._lock = threading.Lock()  # the duplicate check and the rename into place, together
        self._ae: Any = None
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_config(cls, cfg: Config, spool: Path | str, on_stored: Optional[OnStored] = None,
                    journal: Optional[ReceiveJournal] = None) -> "DicomReceiver":
        """The receiver ``[dicom_net]`` describes, with ``watch.max_file_mb`` as its size limit."""
        net = cfg.dicom_net
        return cls(spool, listen=net.listen, ae_title=net.ae_title, allowed_callers=net.allowed_callers,
                   allowed_addresses=net.allowed_addresses, timeout=net.timeout_seconds,
                   max_bytes=int(cfg.watch.max_file_mb * 2**20), max_associations=net.max_associations,
                   on_stored=on_stored, journal=journal)

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on; the real port once started (``listen`` may give port 0 in tests)."""
        if self._server is not None:
            return self._server.server_address[:2]
        return self.host, self.port

    def start(self) -> "DicomReceiver":
        from pynetdicom import evt

        self.spool.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        ae = self._make_ae()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ACCEPTED, self._on_accepted)]
        try:
            server = ae.make_server((self.host, self.port), evt_handlers=handlers,
                                     server_class=_filtering_server_class())
        except OSError as exc:
            raise DicomNetError(f"dicom_net.listen {self.host}:{self.port}: cannot listen "
                                f"({exc.strerror or exc}); is another DICOM node using the port?") from None
        server.networks = self.networks
        ae._servers.append(server)  # as ae.start_server does: ae.shutdown() then stops it too
        self._ae, self._server = ae, server
        self._thread = threading.Thread(target=server.serve_forever, name=f"dicom-scp:{self.port}", daemon=True)
        self._thread.start()
        if self.any_caller:
            log.warning("DICOM receiver accepts any calling AE title (dicom_net.allowed_callers = [\"*\"]); "
                        "name the modalities to refuse strangers")
        log.info("DICOM receiver %s listening on %s:%d; callers %s; %d transfer syntaxes", self.ae_title,
                 *self.address, "any" if self.any_caller else ", ".join(self.callers), len(self._syntaxes))
        return self

    def stop(self) -> None:
        """Stop listening and abort the associations still open (their unanswered instances are resent)."""
        if self._server is None:
            return
        self._ae.shutdown()  # the server first, then every association still open
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._ae = self._thread = None

    def __enter__(self) -> "DicomReceiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _make_ae(self) -> Any:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.maximum_associations = self.max_associations
        ae.require_calling_aet = self.callers
        ae.require_called_aet = True
        self._syntaxes = accepted_transfer_syntaxes()
        for sop_class in RADIOGRAPH_STORAGE:
            ae.add_supported_context(sop_class, self._syntaxes)
        ae.add_supported_context(Verification)
        return ae

    def _remove_leftovers(self) -> None:
        """Temporary files of a receiver that died mid-write: never answered stored, so the sender resends."""
        for p in self.spool.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            try:
                p.unlink()
            except OSError as exc:
                log.warning("cannot remove the partial file %s: %s", p, exc.strerror)

    # ------------------------------------------------------------------------------------ events

    def _on_accepted(self, event: Any) -> None:
        req = event.assoc.requestor
        log.info("DICOM association from %s at %s:%s", req.ae_title, req.address, req.port)

    def _on_rejected(self, event: Any) -> None:
        req = event.assoc.requestor
        called = getattr(req.primitive, "called_ae_title", None)
        if not self.any_caller and req.ae_title not in self.callers:
            why = "its calling AE title is not in dicom_net.allowed_callers"
        elif called is not None and called.strip() != self.ae_title:
            why = f"it called {called!r}, not {self.ae_title!r}"
        else:
            why = f"busy: {self.max_associations} associations already (dicom_net.max_associations)"
        log.warning("DICOM association from %r at %s:%s refused: %s", req.ae_title, req.address, req.port, why)

    def _on_store(self, event: Any) -> Any:
        """One C-STORE: checked, made durable, then announced; the status says which step refused it."""
        request = event.request
        size = len(request.DataSet.getvalue())
        caller = event.assoc.requestor.ae_title
        if size > self.max_bytes:
            log.warning("DICOM instance from %s refused: %.1f MiB is over watch.max_file_mb (%.0f MiB)",
                        caller, size / 2**20, self.max_bytes / 2**20)
            return _status(OUT_OF_RESOURCES, f"instance over the {self.max_bytes / 2**20:.0f} MiB limit")
        try:
            ds = event.dataset
            uid = ds.get("SOPInstanceUID")
            sop_class = ds.get("SOPClassUID")
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises for a data set it cannot parse
            log.warning("DICOM instance from %s refused: cannot parse the data set (%s)", caller, exc)
            return _status(CANNOT_UNDERSTAND, "cannot parse the data set")
        uid = str(uid) if uid is not None else None
        if not is_uid(uid) or uid != request.AffectedSOPInstanceUID:
            log.warning("DICOM instance from %s refused: SOP Instance UID %r missing, invalid or not the "
                        "request's (%r)", caller, uid, request.AffectedSOPInstanceUID)
            return _status(CANNOT_UNDERSTAND, "SOP Instance UID missing, invalid or not the request's")
        if sop_class != request.AffectedSOPClassUID:
            return _status(NOT_MATCHING_SOP_CLASS, "SOP Class UID is not the request's")
        return self._keep(uid, event, caller, ds)

    def _keep(self, uid: str, event: Any, caller: str, ds: Any) -> Any:
        final = self.spool / f"{uid}.dcm"
        try:
            again = self.journal.known(uid) if self.journal is not None else final.exists()
        except Exception as exc:  # noqa: BLE001 - a journal that cannot be read cannot say "stored"
            log.error("DICOM instance %s from %s refused: cannot read the journal (%s)", uid, caller, exc)
            return _status(OUT_OF_RESOURCES, "cannot read the journal")
        if again:
            log.info("DICOM instance %s from %s is already stored: answered success again", uid, caller)
            return _status(SUCCESS, "")
        commit = None
        if self.journal is not None:
            journal, peer = self.journal, event.assoc.requestor.address

            def commit() -> None:
                journal.add(uid, caller, peer)
        try:
            self._write_durably(final, event.encoded_dataset(include_meta=True), commit)
        except OSError as exc:
            log.error("DICOM instance %s from %s refused: cannot store it in %s (%s)", uid, caller, self.spool,
                      exc.strerror or exc)
            return _status(OUT_OF_RESOURCES, f"cannot store the instance ({exc.strerror or 'write failed'})")
        except Exception as exc:  # noqa: BLE001 - the journal's failure (disk full, read-only): not stored
            log.error("DICOM instance %s from %s refused: cannot journal it (%s)", uid, caller, exc)
            return _status(OUT_OF_RESOURCES, "cannot journal the instance (state disk full?)")
        log.info("DICOM instance %s from %s stored", uid, caller)
        if self.on_stored is not None:
            try:
                self.on_stored(final, ds)
            except Exception:  # the instance is durable: a failing hook must not unsay "stored"
                log.exception("on_stored failed for %s; the file stays in the spool", final)
        return _status(SUCCESS, "")

    def _write_durably(self, final: Path, data: bytes, commit: Optional[Callable[[], None]] = None) -> None:
        """Temporary name, fsync, rename into place, fsync of the folder, then ``commit`` (the journal); on any
        failure nothing is left. The rename and the commit hold one lock: a concurrent retry of the same
        instance that finds the file in place knows it is journaled too."""
        fd, tmp = tempfile.mkstemp(dir=self.spool, prefix=f"{TEMP_PREFIX}{final.stem}.", suffix=TEMP_SUFFIX)
        placed = False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                if final.exists():  # a concurrent retry of the same instance got there first
                    os.unlink(tmp)
                    return
                os.replace(tmp, final)
                placed = True
                self._fsync_spool()
                if commit is not None:
                    commit()
        except BaseException:
            for leftover in (tmp, final) if placed else (tmp,):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            raise

    def _fsync_spool(self) -> None:
        dir_fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _filtering_server_class() -> type:
    from pynetdicom.transport import ThreadedAssociationServer

    class Filtering(ThreadedAssociationServer):
        """Closes a connection from outside ``networks`` (when any are set) before a byte of DICOM is read."""

        networks: list = []

        def verify_request(self, request: Any, client_address: Any) -> bool:
            if not self.networks:
                return True
            try:
                peer = ipaddress.ip_address(client_address[0])
            except (ValueError, IndexError, TypeError):
                return False
            if any(peer in net for net in self.networks):
                return True
            log.warning("DICOM connection from %s closed: not in dicom_net.allowed_addresses", client_address[0])
            return False

    return Filtering

