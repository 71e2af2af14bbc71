"""A DIMSE peer (a PACS's DICOM port) as a ``tools.pacs`` source and destination, through ``pynetdicom``.

Given as ``dimse://AET@host:port`` (``AET``: the peer's called AE title; default ``ANY-SCP``). Our calling AE title is
``ae_title`` (``--ae_title``, default ``CARDIAC_BUNDLES``).

* :meth:`DimseNode.query`: C-FIND at STUDY level with the same filters and ``since`` (``StudyDate >= since``) as
  QIDO-RS, then C-FIND at IMAGE level per study for the instance headers the selection rules need;
* :meth:`DimseNode.retrieve`: C-GET of the series (the default: no inbound association, works through firewalls
  that only allow outbound), or, with ``retrieve="move"``, C-MOVE to our own storage SCP, which listens on
  ``move_port`` of ``move_host`` while the move runs -- the PACS must know our AE title at that address (Orthanc:
  ``DicomModalities``);
* :meth:`DimseNode.exists`: C-FIND at IMAGE level for the deterministic result SOP Instance UID;
* :meth:`DimseNode.store`: C-STORE of each result.

Association failures, aborts and timeouts count as "no answer" and go through
:func:`tools.pacs.nodes.with_retries` (backoff, then :class:`~tools.pacs.nodes.Unreachable`, so the job stays
pending); a C-FIND/C-GET/C-MOVE/C-STORE *refused* by the peer (a failure status) raises :class:`DimseError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from pydicom.dataset import Dataset
from pydicom.uid import UID

from tools.pacs.nodes import HEADER_FIELDS, Node, SeriesInfo, _keep_study, with_retries

__all__ = ["DEFAULT_AE_TITLE", "DimseError", "DimseNode", "parse_dimse"]

log = logging.getLogger("tools.pacs")
T = TypeVar("T")
DEFAULT_AE_TITLE = "CARDIAC_BUNDLES"

# the storage SOP classes a retrieve may bring (sources) and a store may send (our SEG and SR results)
_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
    "1.2.840.10008.5.1.4.1.1.6.1",  # US image
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary capture
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
)


class DimseError(RuntimeError):
    """The peer answered a DIMSE request with a failure status."""


class _NoAnswer(ConnectionError):
    """Association rejected/aborted or no response: retryable (see :func:`~tools.pacs.nodes.with_retries`)."""


def parse_dimse(spec: str) -> tuple[str, str, int]:
    """``dimse://AET@host:port`` -> ``(AET, host, port)``; ``ValueError`` naming the spec if host or port is
    missing."""
    u = urlparse(str(spec))
    if u.scheme != "dimse" or not u.hostname or not u.port:
        raise ValueError(f"node {spec!r}: expected dimse://AET@host:port")
    return (unquote(u.username) if u.username else "ANY-SCP"), u.hostname, int(u.port)


def _transfer_syntaxes() -> list[str]:
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    return list(ALL_TRANSFER_SYNTAXES)


class DimseNode(Node):
    """A DICOM peer over DIMSE (see the module docstring).

    Args:
        spec: ``dimse://AET@host:port``.
        ae_title: our calling AE title (and the move destination's title for C-MOVE).
        retrieve: ``"get"`` (C-GET) or ``"move"`` (C-MOVE to our storage SCP).
        move_host / move_port: where our storage SCP listens during a C-MOVE (required for ``"move"``: the
            address the PACS has for ``ae_title``).
        timeout: seconds for association, DIMSE and network timeouts.
        attempts / backoff: see :func:`~tools.pacs.nodes.with_retries`.
    """

    def __init__(self, spec: str, ae_title: str = DEFAULT_AE_TITLE, retrieve: str = "get",
                 move_host: str = "127.0.0.1", move_port: int = 0, timeout: float = 60.0, attempts: int = 4,
                 backoff: float = 0.5) -> None:
        self.peer_aet, self.host, self.port = parse_dimse(spec)
        if retrieve not in ("get", "move"):
            raise ValueError(f"node {spec!r}: retrieve must be 'get' or 'move', not {retrieve!r}")
        if retrieve == "move" and not move_port:
            raise ValueError(f"node {spec!r}: retrieve='move' needs move_port, the port the PACS knows for AE title "
                             f"{ae_title!r} (its C-MOVE destination)")
        if not ae_title or len(ae_title) > 16:
            raise ValueError(f"ae_title {ae_title!r}: 1 to 16 characters required")
        self.ae_title, self.retrieve_mode = str(ae_title), retrieve
        self.move_host, self.move_port = move_host, int(move_port)
        self.timeout, self.attempts, self.backoff = float(timeout), int(attempts), float(backoff)

    # ------------------------------------------------------------------ associations
    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        return ae

    @contextmanager
    def _assoc(self, contexts: Sequence[tuple[str, list[str] | None]], roles: Sequence[Any] = (),
               handlers: Sequence[Any] = ()) -> Iterator[Any]:
        ae = self._ae()
        for abstract, ts in contexts:
            if ts is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, ts)
        assoc = ae.associate(self.host, self.port, ae_title=self.peer_aet, ext_neg=list(roles) or None,
                             evt_handlers=list(handlers) or None)
        if not assoc.is_established:
            raise _NoAnswer(f"DIMSE association with {self.peer_aet}@{self.host}:{self.port} "
                            f"{'rejected' if assoc.is_rejected else 'failed'}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(f"{what} {self.peer_aet}@{self.host}:{self.port}", fn, self.attempts, self.backoff)

    @staticmethod
    def _check(what: str, status: Dataset | None, ok: Sequence[int] = (0x0000,)) -> int:
        if status is None or "Status" not in status:  # no response: aborted or timed out
            raise _NoAnswer(f"{what}: no response")
        code = int(status.Status)
        if code not in ok and not 0xFF00 <= code <= 0xFF01:
            comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
            raise DimseError(f"{what}: peer answered status 0x{code:04X}{comment}")
        return code

    # ------------------------------------------------------------------ C-FIND
    def _find(self, identifier: Dataset) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        def go() -> list[Dataset]:
            out = []
            with self._assoc([(FIND, None)]) as assoc:
                for status, ident in assoc.send_c_find(identifier, FIND):
                    code = self._check("C-FIND", status)
                    if code in (0xFF00, 0xFF01) and ident is not None:
                        out.append(ident)
            return out

        return self._call("C-FIND", go)

    def query(self, filters: dict[str, str] | None = None, since: str | None = None,
              limit: int | None = None) -> list[SeriesInfo]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.StudyDate = f"{since}-" if since else ""
        for k, v in (filters or {}).items():
            setattr(q, k, v)  # a keyword pydicom does not know raises here, naming it
        studies = sorted({str(d.StudyInstanceUID) for d in self._find(q) if d.get("StudyInstanceUID")})
        if limit:
            studies = studies[: int(limit)]
        out = []
        for study in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study
            for k in HEADER_FIELDS:
                if k != "StudyInstanceUID":
                    setattr(q, k, "" if k not in ("NumberOfFrames", "Rows", "Columns", "InstanceNumber") else None)
            by_series: dict[str, SeriesInfo] = {}
            for ds in self._find(q):
                series = str(ds.get("SeriesInstanceUID", ""))
                if not series:
                    continue
                if series not in by_series:
                    by_series[series] = SeriesInfo(study, series, str(ds.get("StudyDate", "")),
                                                   str(ds.get("Modality", "")))
                by_series[series].instances.append(ds)
            out.extend(by_series[k] for k in sorted(by_series) if _keep_study(by_series[k].study_date, since))
        return out

    def exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, sop_uid
        return any(str(d.get("SOPInstanceUID", "")) == sop_uid for d in self._find(q))

    # ------------------------------------------------------------------ retrieve
    def _series_identifier(self, study_uid: str, series_uid: str) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, series_uid
        return q

    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._call(f"C-{self.retrieve_mode.upper()}",
                          lambda: (self._get if self.retrieve_mode == "get" else self._move)(study_uid, series_uid))

    @staticmethod
    def _on_store(received: list[Dataset]) -> Callable[[Any], int]:
        def handle(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            # as a DICOMweb retrieve gives it: a Part 10 dataset (preamble + file meta), so it is written unchanged
            ds.preamble = b"\0" * 128
            received.append(ds)
            return 0x0000

        return handle

    def _get(self, study_uid: str, series_uid: str) -> list[Dataset]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        received: list[Dataset] = []
        # C-GET: the instances come back on the same association, so we are a storage SCP for their classes
        contexts: list[tuple[str, list[str] | None]] = [(GET, None)]
        contexts += [(c, _transfer_syntaxes()) for c in _STORAGE_CLASSES]
        roles = [build_role(c, scp_role=True) for c in _STORAGE_CLASSES]
        with self._assoc(contexts, roles, [(evt.EVT_C_STORE, self._on_store(received))]) as assoc:
            for status, _ in assoc.send_c_get(self._series_identifier(study_uid, series_uid), GET):
                self._check("C-GET", status)
        return received

    def _move(self, study_uid: str, series_uid: str) -> list[Dataset]:
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        received: list[Dataset] = []
        lock = threading.Lock()

        def handle(event: Any) -> int:
            with lock:
                return self._on_store(received)(event)

        scp = self._ae()
        for cx in AllStoragePresentationContexts:
            scp.add_supported_context(cx.abstract_syntax, _transfer_syntaxes())
        server = scp.start_server((self.move_host, self.move_port), block=False,
                                  evt_handlers=[(evt.EVT_C_STORE, handle)])
        try:
            with self._assoc([(MOVE, None)]) as assoc:
                for status, _ in assoc.send_c_move(self._series_identifier(study_uid, series_uid), self.ae_title,
                                                   MOVE):
                    self._check("C-MOVE", status)
        finally:
            server.shutdown()
        return received

    # ------------------------------------------------------------------ C-STORE
    def store(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            return

        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

        def go() -> None:
            contexts = sorted({str(ds.SOPClassUID) for ds in datasets})
            with self._assoc([(c, list(DEFAULT_TRANSFER_SYNTAXES)) for c in contexts]) as assoc:
                for ds in datasets:
                    self._check(f"C-STORE of a {UID(str(ds.SOPClassUID)).name}", assoc.send_c_store(ds))

        self._call("C-STORE", go)
