"""Start and stop a private Orthanc PACS on loopback (tests, benchmarks, demos).

:class:`OrthancServer` writes an Orthanc ``config.json`` (127.0.0.1 only, free HTTP and DICOM ports, its own storage
folder, the DICOMweb plugin, C-FIND/C-MOVE/C-STORE allowed from any AE on loopback), starts the ``Orthanc`` binary
from the Debian package ``orthanc`` (+ ``orthanc-dicomweb``), waits until ``GET /system`` answers and stops it by
PID. The storage folder survives :meth:`~OrthancServer.stop`, so a test can kill the server in the middle of a batch
and :meth:`~OrthancServer.start` it again on the same data and ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

__all__ = ["DICOMWEB_PLUGIN", "OrthancServer", "free_port"]

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancServer:
    """One Orthanc process with its configuration and storage under ``root``.

    Args:
        root: folder for ``config.json``, ``storage/`` and ``orthanc.log``.
        aet: Orthanc's own AE title.
        modalities: DICOM peers Orthanc may C-MOVE/C-STORE to, ``{name: [AET, host, port]}``.
        binary: the Orthanc executable (``Orthanc`` on the PATH, or ``/usr/sbin/Orthanc``).
        extra: more configuration keys (override the defaults).
        users: HTTP basic-auth users ``{name: password}``: authentication is then required (as a hospital PACS
            does) and the start-up check logs in as the first of them.
    """

    def __init__(self, root: str | Path, aet: str = "ORTHANC", modalities: Mapping[str, list] | None = None,
                 binary: str | None = None, extra: Mapping[str, Any] | None = None,
                 users: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = dict(modalities or {})
        self.binary = binary or shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.extra = dict(extra or {})
        self.users = dict(users or {})
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Orthanc's REST root, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root in the ``dicomweb://`` form ``tools.pacs`` takes."""
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    def config(self) -> dict:
        """The configuration written to ``config.json``."""
        cfg = {
            "Name": f"cardiac-bundles-test-{self.http_port}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            # loopback only: no remote HTTP access, no authentication needed on 127.0.0.1
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": self.modalities,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "StableAge": 1,
        }
        if self.users:
            cfg.update({"AuthenticationEnabled": True, "RegisteredUsers": self.users})
        cfg.update(self.extra)
        return cfg

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers (``RuntimeError`` with the
        log's tail if it exits or does not answer within ``timeout`` s)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"Orthanc binary {self.binary} not found: install the Debian packages "
                                    "orthanc orthanc-dicomweb (tools/setup_env.sh does)")
        if not Path(DICOMWEB_PLUGIN).exists():
            raise FileNotFoundError(f"Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} not found: install orthanc-dicomweb")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "storage").mkdir(exist_ok=True)
        cfg_path = self.root / "config.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 -- kept open for the process's lifetime
        self.proc = subprocess.Popen([self.binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                login = next(iter(self.users.items()), None)
                if requests.get(f"{self.url}/system", timeout=1, auth=login).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url}/system within {timeout} s:\n{self.log_tail()}")

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the process by its PID: SIGTERM (or SIGKILL with ``kill``), then SIGKILL after ``timeout`` s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of ``orthanc.log``."""
        p = self.root / "orthanc.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def upload(self, path: str | Path) -> dict:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer (``ID``, ``Status``)."""
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=60)
        r.raise_for_status()
        return r.json()

    def get(self, route: str, **params: Any) -> Any:
        """``GET <url><route>`` as JSON."""
        r = requests.get(f"{self.url}{route}", params=params or None, timeout=60)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[dict]:
        """Every stored instance's main tags (``/instances?expand``) with ``MainDicomTags`` and ``ParentSeries``."""
        return self.get("/instances", expand="")

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
