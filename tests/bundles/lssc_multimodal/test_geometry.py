"""lssc_multimodal inference takes DICOM as a PACS export gives it and writes predictions on the input's grid.

One inference run (the bundle's own workflow, an untrained tiny network) over a folder holding a DICOM series
(oblique, files named against the slice order, modality only in the header) and two pydicom-data files: the series
is segmented and its prediction has the series' shape and GDCM's geometry; ``CT_small.dcm`` (read as CT, one
slice) and ``emri_small.dcm`` (read as MR, no patient geometry) are recorded with their reasons.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file

from tests.dicom_geometry import write_mr_series

from .conftest import CONFIGS


def test_dicom_series_in_prediction_on_its_grid_and_bad_dicom_recorded(tmp_path, lssc_env, tiny_json, monkeypatch):
    from monai.bundle import ConfigWorkflow

    from common.engines.lssc import InferenceWeights, lssc_network

    monkeypatch.setenv("CARDIAC_DATA_DIR", lssc_env["CARDIAC_DATA_DIR"])
    tiny = json.loads(tiny_json.read_text())
    net = lssc_network("full", ["ct", "mr"], for_inference=True, in_channels=3, num_classes=5,
                       img_size=tiny["spatial_size"], embed_dim=tiny["embed_dim"], num_heads=tiny["num_heads"],
                       depths=tiny["depths"], decoder_depths=tiny["decoder_depths"], window_size=tiny["window_size"])
    ckpt = tmp_path / "model.pt"
    torch.save(InferenceWeights(net).state_dict(), ckpt)

    inputs = tmp_path / "export"
    zz, yy, xx = np.mgrid[0:10, 0:36, 0:40]
    volume = 800 * np.exp(-((zz - 5) ** 2 / 8 + (yy - 15) ** 2 / 60 + (xx - 22) ** 2 / 80)) + 40 * (xx % 3)
    a, b = 0.35, -0.5
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    write_mr_series(inputs / "series_301", volume, rot, origin=(-60.0, 25.0, 110.0), spacing=(1.3, 1.1), step=2.5,
                    name="IM{n:04d}", instance_numbers=False)  # no suffix, as PACS exports
    shutil.copy(get_testdata_file("CT_small.dcm"), inputs / "scan_a.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), inputs / "scan_b.dcm")

    out = tmp_path / "out"
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "inference.json"), str(tiny_json)],
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, workflow_type="infer",
                        bundle_root=str(tmp_path), ckpt_path=str(ckpt), input_path=str(inputs), output_dir=str(out))
    wf.initialize()
    wf.run()

    written = nib.load(str(out / "predictions" / "series_301_seg.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "series_301")))
    ref = reader.Execute()
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    gdcm = np.eye(4)
    gdcm[:3, :3] = d @ np.diag(ref.GetSpacing())
    gdcm[:3, 3] = ref.GetOrigin()
    assert written.shape == (40, 36, 10)  # (Columns, Rows, slices)
    np.testing.assert_allclose(written.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ gdcm, atol=1e-4)

    record = json.loads((out / "failed_inputs.json").read_text())
    reasons = {Path(f["input"]).name: f["reason"] for f in record["failed"]}
    assert set(reasons) == {"scan_a.dcm", "scan_b.dcm"}
    assert "expected a 3D image" in reasons["scan_a.dcm"]  # CT by its header, but a single slice
    assert "MR image lacks patient geometry" in reasons["scan_b.dcm"]  # MR by its header
