"""MONAI Label with a DICOMweb datastore: a real Orthanc (``tools.pacs.orthanc``, as the PACS tests use) holding an
MR series; the server lists it, infers on it (modality from the DICOM header) and stores a saved label back as
DICOM SEG."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import requests

from tests.tools.monailabel.conftest import TINY, running_server, untrained_checkpoint

pytestmark = pytest.mark.server


def test_dicomweb_datastore_lists_infers_and_stores_seg(label_python, tmp_path):
    from common.data.synthetic.abdomen import write_dicom_series
    from common.data.synthetic.mmwhs import write_mmwhs
    from tools.pacs.orthanc import OrthancServer

    cases = write_mmwhs(tmp_path / "mmwhs", n_ct=0, n_mr=1, seed=1, mr_shape=(40, 40, 32), progress=False)
    mr = nib.load(cases["mr"][0][0])
    vol = np.asarray(mr.dataobj, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ mr.affine
    files = write_dicom_series(tmp_path / "dcm", vol - vol.min(), lps, uid_seed="label-test", description="MR heart")
    ckpt = untrained_checkpoint("lssc_multimodal", tmp_path / "models" / "model.pt")
    conf = ["models=lssc_multimodal", f"lssc_multimodal_ckpt_path={ckpt}",
            f"lssc_multimodal_overrides={json.dumps(TINY['lssc_multimodal'])}"]
    with OrthancServer(tmp_path / "orthanc") as pacs:
        for f in files:
            pacs.upload(f)
        series = pacs.get("/series")
        assert len(series) == 1
        series_uid = pacs.get(f"/series/{series[0]}")["MainDicomTags"]["SeriesInstanceUID"]
        env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "MR"}),
               "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
        with running_server(label_python, f"{pacs.url}/dicom-web", conf, tmp_path, {"lssc_multimodal": ckpt},
                            env=env) as server:
            # OHIF (MONAI Label's bundled viewer) is served for this PACS
            assert "<html" in server.get("/ohif/").text.lower()
            # the PACS' series are the datastore's images: the "first unlabelled" strategy offers ours
            assert server.post("/activelearning/first").json()["id"] == series_uid
            r = server.post("/infer/lssc_multimodal", params={"image": series_uid, "output": "image"})
            label_file = tmp_path / "label.nii.gz"
            label_file.write_bytes(r.content)
            label = nib.load(label_file)
            assert label.shape == vol.shape
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1, 2, 3, 4}
            res = server.post("/infer/lssc_multimodal", params={"image": series_uid, "output": "json"}).json()
            assert res["modality"] == "mr"
            # the annotator's corrected label goes back to the PACS as a DICOM SEG of that study
            corrected = np.zeros(vol.shape, np.uint8)
            corrected[10:30, 10:30, 8:24] = 1
            nib.save(nib.Nifti1Image(corrected, label.affine), label_file)
            with open(label_file, "rb") as fh:
                r = requests.put(server.url + "/datastore/label", params={"image": series_uid, "tag": "final"},
                                 data={"params": json.dumps({"label_info": [{"name": "LVM"}]})},
                                 files={"label": ("label.nii.gz", fh)}, timeout=120)
            assert r.ok, f"{r.status_code} {r.text[:2000]}\n{server.log_tail()}"
        segs = [s for s in pacs.get("/series", expand="") if s["MainDicomTags"].get("Modality") == "SEG"]
        assert len(segs) == 1, pacs.get("/series", expand="")
        study = pacs.get(f"/series/{series[0]}")["ParentStudy"]
        assert segs[0]["ParentStudy"] == study
