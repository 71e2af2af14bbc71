"""Start the MONAI Label server with this repository's app (what ``make label`` runs, in ``.venv-label``).

``python -m tools.monailabel.serve [--studies DIR|URL] [--host 127.0.0.1] [--port 8000] [--conf key=value ...]``

* ``studies``: a local folder (the datastore; created with the synthetic studies of
  :mod:`tools.monailabel.studies` when it does not exist or is the default), or a DICOMweb URL such as
  ``http://127.0.0.1:8042/dicom-web`` (e.g. Orthanc) used as the datastore;
* ``host``/``port``: where the server listens (loopback by default: expose it deliberately with ``--host 0.0.0.0``);
* ``conf``: app settings passed on as ``--conf key value`` (see ``tools/monailabel/main.py``), e.g.
  ``--conf "botm_seg_ckpt_path=/models/botm.pt"``.

It prints the server's URL, then replaces itself with ``python -m monailabel.main start_server`` (so the process id
it was started with is the server's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import fire

__all__ = ["DEFAULT_STUDIES", "server_command", "main", "serve"]

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parents[1]
DEFAULT_STUDIES = REPO_ROOT / "output" / "label_studies"


def _conf_list(conf: str | Sequence[str] | None) -> list[str]:
    return [conf] if isinstance(conf, str) else [str(c) for c in (conf or [])]


def _conf_pairs(conf: str | Sequence[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for item in _conf_list(conf):
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--conf {item!r}: expected key=value")
        pairs.append((key.strip(), value))
    return pairs


def server_command(studies: str, host: str = "127.0.0.1", port: int = 8000,
                   conf: str | Sequence[str] | None = None) -> list[str]:
    """The ``monailabel.main start_server`` command line for ``studies`` (folder or DICOMweb URL)."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", str(host), "--port", str(int(port)),
           # nothing is downloaded at run time: the local model zoo and no SAM2 weights
           "--conf", "zoo_source", "local", "--conf", "sam2", "false"]
    for key, value in _conf_pairs(conf):
        cmd += ["--conf", key, value]
    return cmd


def serve(studies: str = "", host: str = "127.0.0.1", port: int = 8000, conf: str | Sequence[str] | None = None,
          dry_run: bool = False) -> list[str]:
    """Prepare the studies, print the URL and exec the server (``dry_run``: return the command instead)."""
    studies = str(studies or DEFAULT_STUDIES)
    remote = studies.startswith(("http://", "https://"))
    if not remote:
        path = Path(studies).expanduser().resolve()
        if Path(studies).resolve() == DEFAULT_STUDIES.resolve() or not path.exists():
            from tools.monailabel.studies import write_studies

            print(f">> writing synthetic studies into {path}", flush=True)
            write_studies(path)
            # the synthetic folder also holds labelled CT/registration studies: botm_seg trains on the echo ones
            conf = [*_conf_list(conf), "botm_seg_train_images=echo_*"]
        elif not path.is_dir():
            raise NotADirectoryError(f"--studies {studies}: not a folder (give a folder of images or a DICOMweb URL)")
        studies = str(path)
    cmd = server_command(studies, host, port, conf)
    if dry_run:
        return cmd
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(f">> MONAI Label server for {studies}\n>> URL: http://{shown}:{int(port)}/  (Ctrl+C stops it)", flush=True)
    # the venv's bin first on PATH: MONAI Label looks for dcmqi's itkimage2segimage there (installed by pip with
    # dcmqi) and would otherwise try to download it from GitHub for a DICOMweb datastore
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.execv(cmd[0], cmd)
    return cmd  # not reached


def main() -> None:
    """Command line entry (python-fire)."""
    fire.Fire(serve)


if __name__ == "__main__":
    main()
