"""``make label`` as the README documents it: builds nothing when ``.venv-label`` is up to date (its stamp), prints
the server's URL, and serves the MONAI Label REST API on the given host and port until it is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
import requests

from tests.tools.monailabel.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.server


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> bool:
    """SIGTERM the process group ``make`` leads (make and the server it runs; started with ``start_new_session``,
    so the group id is make's PID), SIGKILL what is left after ``timeout``. Returns whether the group is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(proc.pid):
            break
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + timeout
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reap make: a zombie still counts as a member of its group
            time.sleep(0.2)
    proc.wait(timeout=timeout)
    return not _group_alive(proc.pid)


def test_make_label_serves_the_studies_on_the_given_host_and_port(label_python, tmp_path):
    from tools.monailabel.studies import write_studies

    # label_python has built (or found) .venv-label and its stamp, so `make label-venv` is a no-op here
    studies = write_studies(tmp_path / "studies", image_size=64, n_frames=4, volume_size=48)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CARDIAC_DATA_DIR": str(tmp_path / "data")})
    proc = subprocess.Popen(["make", "label", f"STUDIES={studies}", f"PORT={port}", "HOST=127.0.0.1"], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        info = None
        while info is None:
            assert proc.poll() is None, f"make label exited with {proc.returncode}:\n{''.join(lines)[-4000:]}"
            assert time.monotonic() < deadline, f"no server at {url} after 240 s:\n{''.join(lines)[-4000:]}"
            if any(f">> URL: {url}/" in line for line in lines):
                try:
                    r = requests.get(url + "/info/", timeout=5)
                    info = r.json() if r.ok else None
                except requests.ConnectionError:
                    pass
            time.sleep(1.0)
        assert f">> MONAI Label server for {studies}" in "".join(lines)
        assert set(info["models"]) == {"botm_seg", "lssc_multimodal", "specknet_tracking", "adacs_registration"}
        assert {"botm_seg", "lssc_multimodal"} <= set(info["trainers"])
        # the datastore is the given folder: its six studies, two of them with a saved label
        assert info["datastore"]["total"] == 6 and info["datastore"]["completed"] == 2, info["datastore"]
    finally:
        gone = _stop_group(proc)
    assert gone, "a process of make label's group survived SIGKILL"
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/info/", timeout=5)
