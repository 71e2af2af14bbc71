"""A real Orthanc (Debian packages orthanc + orthanc-dicomweb) on 127.0.0.1 with free ports, per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.pacs.orthanc import OrthancServer


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module(one_torch_thread):
    """Tiny networks in-process: one torch thread (tests/conftest.py); subprocesses get OMP_NUM_THREADS from CI."""


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthancs under ``tmp_path`` (``make(name="pacs", **kwargs)``); every one is stopped by PID at the end."""
    servers: list[OrthancServer] = []

    def make(name: str = "pacs", **kwargs) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc_{name}", **kwargs).start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """One running Orthanc with the DICOMweb plugin (``.url``, ``.dicomweb_url``, ``.dicom_port``)."""
    return orthanc_factory()


# a BOTM small enough for CPU tests (the same reduction tests/bundles/botm_seg uses), at 64x64
TINY_BOTM = {
    "network_def#widths": [8, 16, 24, 32],
    "network_def#depths": [1, 1, 1, 1],
    "network_def#num_heads": [1, 1, 2, 2],
    "network_def#decoder_width": 16,
    "network_def#sinkhorn_iters": 5,
    "network_def#botm_reductions": [2, 1, 1, 1],
    "spatial_size": [64, 64],
}


@pytest.fixture(scope="session")
def tiny_botm_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny botm_seg checkpoint (``{"model": state_dict}``, as the bundle's CheckpointSaver writes),
    built from the bundle's own ``network_def`` with :data:`TINY_BOTM`."""
    import torch
    from monai.bundle import ConfigParser

    from tools.pacs.model import BUNDLES_DIR

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "botm_seg" / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    for k, v in TINY_BOTM.items():
        parser[k] = v
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("pacs_ckpt") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def synth_cines(tmp_path_factory) -> list[Path]:
    """Four synthetic echo cines (6 frames, 64x64) as US multi-frame DICOM, one study each."""
    from common.data.synthetic.echo_dicom import write_echo_dicom_study

    return write_echo_dicom_study(tmp_path_factory.mktemp("pacs_cines"), n_studies=4, seed=7, n_frames=6,
                                  image_size=(64, 64))


@pytest.fixture(scope="session")
def jpeg_cine(tmp_path_factory) -> Path:
    """A 10-frame excerpt of pydicom-data's real US cine ``color3d_jpeg_baseline.dcm`` (YBR JPEG baseline, 480x640,
    calibrated by ultrasound regions only): its first JPEG frames copied byte for byte (no re-encoding) under a
    new SOP Instance UID, so a test pays for 10 frames instead of 120."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_frames

    src = get_testdata_file("color3d_jpeg_baseline.dcm")  # by name: never the '*' glob (it hangs offline)
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))[:10]
    ds.PixelData = encapsulate(frames)
    ds.NumberOfFrames = len(frames)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["tests/tools/pacs excerpt", str(ds.SOPInstanceUID)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path_factory.mktemp("pacs_jpeg") / "color3d_excerpt.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
