"""Where studies come from and where results go: a DICOMweb server or a local folder of DICOM files.

A node is given as a string:

* ``dicomweb://host:port/path`` (HTTP) or ``dicomwebs://host:port/path`` (HTTPS; also plain ``http(s)://``) -- QIDO-RS
  to query, WADO-RS to retrieve (original transfer syntax), STOW-RS to store, through ``dicomweb-client``; basic
  (``user``/``password``) or bearer (``token``) authentication and a CA bundle (``ca_bundle``) for TLS;
* a folder path (or ``file:///path``) -- every ``*.dcm``/DICOM file below it is indexed by its header; results are
  written as ``<folder>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

Every node offers :meth:`~Node.query` (series of the matching studies with the instance headers selection rules
need), :meth:`~Node.retrieve` (a series' instances with pixels), :meth:`~Node.exists` (is a result instance there
already?) and :meth:`~Node.store`. Network calls go through :func:`with_retries`: connection errors, timeouts and
HTTP 5xx/429 are retried with exponential backoff; when the attempts run out :class:`Unreachable` is raised so the
job stays pending with the reason instead of failing.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pydicom
import requests
from pydicom.dataset import Dataset

from common.data.loading import save_dicom

__all__ = ["DicomWebNode", "FolderNode", "Node", "SeriesInfo", "Unreachable", "open_node", "with_retries"]

log = logging.getLogger("tools.pacs")
T = TypeVar("T")

# instance-level attributes the selection rules and the ledger need (never patient identifiers)
HEADER_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "StudyDate",
                 "NumberOfFrames", "Rows", "Columns", "BodyPartExamined", "InstanceNumber")


class Unreachable(RuntimeError):
    """The node did not answer (connection error, timeout, HTTP 5xx/429) after every retry."""


@dataclass
class SeriesInfo:
    """One series to process: its UIDs and its instances' headers (the :data:`HEADER_FIELDS`, no pixels)."""

    study_uid: str
    series_uid: str
    study_date: str = ""
    modality: str = ""
    instances: list[Dataset] = field(default_factory=list)


def _retryable(e: BaseException) -> bool:
    if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return e.response.status_code >= 500 or e.response.status_code == 429
    return False


def with_retries(what: str, fn: Callable[[], T], attempts: int = 4, backoff: float = 0.5) -> T:
    """``fn()``, retried on connection errors/timeouts/HTTP 5xx/429 with delays ``backoff * 2**k`` s; other errors
    pass through. Raises :class:`Unreachable` naming ``what`` when every attempt failed."""
    for k in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _retryable(e):
                raise
            if k == attempts - 1:
                raise Unreachable(f"{what}: no answer after {attempts} attempts ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
            log.warning("%s: %s, retrying in %.1f s", what, type(e).__name__, backoff * 2**k)
            time.sleep(backoff * 2**k)
    raise AssertionError("unreachable")  # pragma: no cover


class Node(ABC):
    """Interface of a source/destination (see the module docstring)."""

    @abstractmethod
    def query(self, filters: dict[str, str] | None = None, since: str | None = None,
              limit: int | None = None) -> list[SeriesInfo]:
        """Series of the studies matching ``filters`` (DICOM keyword -> value) and ``StudyDate >= since``
        (YYYYMMDD), at most ``limit`` studies, in a stable order (study UID, series UID)."""
        raise NotImplementedError

    @abstractmethod
    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """The series' instances with pixel data."""
        raise NotImplementedError

    @abstractmethod
    def exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """True if the instance ``sop_uid`` is stored."""
        raise NotImplementedError

    @abstractmethod
    def store(self, datasets: Sequence[Dataset]) -> None:
        """Store result instances."""
        raise NotImplementedError


def _keep_study(date: str, since: str | None) -> bool:
    return not since or (bool(date) and date >= str(since))


class FolderNode(Node):
    """A folder of DICOM files (searched recursively) as a source, and as a destination."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def _index(self) -> dict[tuple[str, str], tuple[SeriesInfo, list[Path]]]:
        out: dict[tuple[str, str], tuple[SeriesInfo, list[Path]]] = {}
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {self.root} not found")
        for p in sorted(self.root.rglob("*")):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
                study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            except Exception:  # not DICOM, or no UIDs: not part of any series
                continue
            key = (study, series)
            if key not in out:
                out[key] = (SeriesInfo(study, series, str(ds.get("StudyDate", "")), str(ds.get("Modality", ""))), [])
            out[key][0].instances.append(ds)
            out[key][1].append(p)
        return out

    def query(self, filters: dict[str, str] | None = None, since: str | None = None,
              limit: int | None = None) -> list[SeriesInfo]:
        series = []
        for info, _ in self._index().values():
            hdr = info.instances[0]
            if filters and any(str(hdr.get(k, "")) != str(v) and not (k == "ModalitiesInStudy" and
                                                                     info.modality == str(v))
                               for k, v in filters.items()):
                continue
            if _keep_study(info.study_date, since):
                series.append(info)
        series.sort(key=lambda s: (s.study_uid, s.series_uid))
        if limit:
            studies = sorted({s.study_uid for s in series})[: int(limit)]
            series = [s for s in series if s.study_uid in set(studies)]
        return series

    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        entry = self._index().get((study_uid, series_uid))
        if entry is None:
            raise FileNotFoundError(f"series {series_uid} of study {study_uid} not found under {self.root}")
        return [pydicom.dcmread(p) for p in entry[1]]

    def _path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        return self._path(study_uid, series_uid, sop_uid).is_file()

    def store(self, datasets: Sequence[Dataset]) -> None:
        for ds in datasets:
            p = self._path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".part")
            save_dicom(ds, tmp, file_format=True)
            tmp.replace(p)  # atomic: a crash never leaves a half-written result that "exists"


class DicomWebNode(Node):
    """A DICOMweb server (QIDO-RS / WADO-RS / STOW-RS) through ``dicomweb-client``."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, token: str | None = None,
                 ca_bundle: str | None = None, timeout: float = 60.0, attempts: int = 4,
                 backoff: float = 0.5) -> None:
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if user:
            session.auth = (user, password or "")
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        if ca_bundle:
            if not Path(ca_bundle).is_file():
                raise FileNotFoundError(f"ca_bundle {ca_bundle} not found")
            session.verify = str(ca_bundle)
        self.url = url
        self.attempts, self.backoff = int(attempts), float(backoff)
        self.client = DICOMwebClient(url=url, session=session, timeout=timeout)
        # dicomweb-client's own retry (the `retrying` package) also retries every exception, up to 5 times with
        # waits of seconds growing exponentially, outside our control: off; with_retries() does it, bounded
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(what, fn, self.attempts, self.backoff)

    def _search_all(self, what: str, search: Callable[..., list[dict]], key: str, page: int = 500,
                    **kwargs: Any) -> list[dict]:
        """Every match of a QIDO search, page by page (``limit``/``offset``). dicomweb-client's own
        ``get_remaining`` loops forever on a server that ignores ``offset`` for some filters (Orthanc 1.10 with
        ``ModalitiesInStudy``), so paging stops at a short page or at a page with nothing new."""
        out: dict[str, dict] = {}
        offset = 0
        while True:
            found = self._call(what, lambda offset=offset: search(limit=page, offset=offset, **kwargs))
            new = {str(Dataset.from_json(j).get(key, "")): j for j in found}
            fresh = {k: v for k, v in new.items() if k not in out}
            out.update(fresh)
            if len(found) < page or not fresh:
                return list(out.values())
            offset += len(found)

    def query(self, filters: dict[str, str] | None = None, since: str | None = None,
              limit: int | None = None) -> list[SeriesInfo]:
        study_filters = dict(filters or {})
        if since:
            study_filters["StudyDate"] = f"{since}-"
        studies = self._search_all("QIDO-RS studies", self.client.search_for_studies, "StudyInstanceUID",
                                   search_filters=study_filters)
        uids = sorted({str(Dataset.from_json(s).StudyInstanceUID) for s in studies})
        if limit:
            uids = uids[: int(limit)]
        out = []
        for study in uids:
            insts = self._search_all("QIDO-RS instances", self.client.search_for_instances, "SOPInstanceUID",
                                     study_instance_uid=study, fields=list(HEADER_FIELDS))
            by_series: dict[str, SeriesInfo] = {}
            for j in insts:
                ds = Dataset.from_json(j)
                series = str(ds.SeriesInstanceUID)
                if series not in by_series:
                    by_series[series] = SeriesInfo(study, series, str(ds.get("StudyDate", "")),
                                                   str(ds.get("Modality", "")))
                by_series[series].instances.append(ds)
            out.extend(by_series[k] for k in sorted(by_series))
        return out

    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        # transfer-syntax=* asks for the stored encoding: no lossy re-encoding on the server
        return self._call("WADO-RS series", lambda: self.client.retrieve_series(
            study_uid, series_uid, media_types=(("application/dicom", "*"),)))

    def exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        found = self._call("QIDO-RS exists", lambda: self.client.search_for_instances(
            study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_uid}, fields=["SOPInstanceUID"]))
        return any(str(Dataset.from_json(j).get("SOPInstanceUID", "")) == sop_uid for j in found)

    def store(self, datasets: Sequence[Dataset]) -> None:
        self._call("STOW-RS", lambda: self.client.store_instances(list(datasets)))


def open_node(spec: str, **auth: Any) -> Node:
    """A node from ``dicomweb://``, ``dicomwebs://``, ``http(s)://``, ``dimse://AET@host:port``
    (:class:`tools.pacs.dimse.DimseNode`), ``file://`` or a folder path (module docstring); ``auth``: ``user``,
    ``password``, ``token``, ``ca_bundle``, ``timeout``, ``attempts``, ``backoff``; for DIMSE ``ae_title``,
    ``retrieve`` (``get``/``move``), ``move_host``, ``move_port`` (the others are ignored there, and these elsewhere).
    Raises ``ValueError`` naming the spec for an unknown scheme."""
    spec = str(spec)
    u = urlparse(spec)
    dimse_keys = ("ae_title", "retrieve", "move_host", "move_port")
    if u.scheme == "dimse":  # a PACS's DICOM port (tools.pacs.dimse): no HTTP credentials apply
        from tools.pacs.dimse import DimseNode

        keep = (*dimse_keys, "timeout", "attempts", "backoff")
        return DimseNode(spec, **{k: v for k, v in auth.items() if k in keep})
    auth = {k: v for k, v in auth.items() if k not in dimse_keys}
    if u.scheme in ("dicomweb", "dicomwebs", "http", "https"):
        scheme = "https" if u.scheme in ("dicomwebs", "https") else "http"
        if not u.hostname:
            raise ValueError(f"node {spec!r}: no host")
        return DicomWebNode(f"{scheme}://{u.netloc}{u.path.rstrip('/')}", **auth)
    if u.scheme == "file":
        return FolderNode(u.path)
    if u.scheme in ("", ) or (len(u.scheme) == 1 and spec[1:3] in (":\\", ":/")):  # a path (or a Windows drive)
        return FolderNode(spec)
    raise ValueError(f"node {spec!r}: unknown scheme {u.scheme!r} (use dicomweb://, dicomwebs://, http(s)://, "
                     "dimse://AET@host:port, file:// or a folder)")
