"""A real MONAI Label server with this repository's app, in ``.venv-label``, on 127.0.0.1 with a free port.

The venv is built (or found up to date, via its stamp file) by ``tools/setup_label_env.sh``, as ``make label`` and
``make test`` do. The server is started by ``python -m tools.monailabel.serve`` (the ``make label`` launcher) on tiny
synthetic studies with tiny untrained checkpoints of the four bundles, and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLES = REPO_ROOT / "bundles"
LABEL_VENV = REPO_ROOT / ".venv-label"

# CPU-sized networks of the four bundles (the reductions their own tests use), every block still on
TINY = {
    "botm_seg": {
        "network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1],
        "network_def#num_heads": [1, 1, 2, 2], "network_def#decoder_width": 16,
        "network_def#sinkhorn_iters": 5, "network_def#botm_reductions": [2, 1, 1, 1],
        "spatial_size": [64, 64],
    },
    "lssc_multimodal": {
        "spatial_size": 64, "pixdim": [2.4, 2.4, 2.4], "embed_dim": 12, "num_heads": [1, 2, 4, 8],
        "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 4, "torch_threads": 1,
    },
    "specknet_tracking": {"spatial_size": 64},
    "adacs_registration": {
        "network_def#estimator#enc_channels": [8, 8, 8, 8], "network_def#estimator#dec_channels": [8] * 7,
        "network_def#estimator#integration_steps": 3, "spatial_size": [64, 64],
    },
}


@dataclass
class LabelServer:
    """A running server: its ``url``, ``studies`` folder, the checkpoints it loads and its log file."""

    url: str
    studies: Path
    ckpts: dict[str, Path]
    log: Path
    proc: subprocess.Popen

    def get(self, path: str, **kwargs) -> requests.Response:
        r = requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)
        assert r.ok, f"GET {path}: {r.status_code} {r.text[:2000]}\n{self.log_tail()}"
        return r

    def post(self, path: str, **kwargs) -> requests.Response:
        r = requests.post(self.url + path, timeout=kwargs.pop("timeout", 300), **kwargs)
        assert r.ok, f"POST {path}: {r.status_code} {r.text[:2000]}\n{self.log_tail()}"
        return r

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def untrained_checkpoint(model: str, path: Path) -> Path:
    """The untrained weights of a bundle's ``network_def`` with :data:`TINY` applied (seeded)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / model / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLES / model), **TINY[model]})
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def label_python() -> Path:
    """``.venv-label/bin/python``, built by tools/setup_label_env.sh when missing or out of date."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "tools" / "setup_label_env.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"tools/setup_label_env.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    py = LABEL_VENV / "bin" / "python"
    assert py.is_file(), f"{py} missing after tools/setup_label_env.sh"
    return py


@pytest.fixture(scope="session")
def label_server(label_python: Path, tmp_path_factory) -> Iterator[LabelServer]:
    """The app served on tiny synthetic studies with untrained tiny checkpoints (in a temporary folder)."""
    from tools.monailabel.studies import write_studies

    root = tmp_path_factory.mktemp("monailabel")
    studies = write_studies(root / "studies", image_size=64, n_frames=4, volume_size=48)
    ckpts = {m: untrained_checkpoint(m, root / "models" / m / "model.pt") for m in TINY}
    conf = [f"{m}_ckpt_path={p}" for m, p in ckpts.items()]
    conf += [f"{m}_overrides={json.dumps(TINY[m])}" for m in TINY]
    conf += ["botm_seg_train_images=echo_*"]
    with running_server(label_python, str(studies), conf, root, ckpts) as server:
        yield server


@contextlib.contextmanager
def running_server(label_python: Path, studies: str, conf: list[str], root: Path, ckpts: dict[str, Path],
                   env: dict[str, str] | None = None) -> Iterator[LabelServer]:
    """``python -m tools.monailabel.serve`` on ``studies`` (folder or DICOMweb URL) on a free loopback port; waits
    for ``GET /info/``; stops the server by its PID at the end."""
    port = free_port()
    log = root / f"server_{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CARDIAC_DATA_DIR": str(root / "data"), "MPLBACKEND": "Agg", **(env or {})}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(label_python), "-m", "tools.monailabel.serve", "--studies", studies,
                                 "--host", "127.0.0.1", "--port", str(port), "--conf", json.dumps(conf)],
                                cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = LabelServer(f"http://127.0.0.1:{port}", Path(studies), ckpts, log, proc)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(server.url + "/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label server not up after 240 s:\n{server.log_tail()}")
            time.sleep(1.0)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
