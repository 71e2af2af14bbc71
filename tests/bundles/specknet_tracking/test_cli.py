"""specknet_tracking from the command line: train -> evaluate -> inference (synthetic HDF5 and the real ultrasound
DICOM with given query points), export checks and clear failures."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# an apical view: points along the ventricle wall of pydicom-data's color3d_jpeg_baseline.dcm (640 x 480, 120 frames)
DICOM_POINTS = [[262, 330], [265, 290], [272, 250], [282, 210], [298, 170], [322, 140], [350, 160], [370, 200],
                [385, 245], [395, 290], [400, 330]]
DICOM_QUERY_FRAME = 86  # int(0.72 * 120), diastasis


def _us_dicom() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("color3d_jpeg_baseline.dcm"))


def _chain_text(exc: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_train_evaluate_inference_from_the_cli(specknet, specknet_env, trained_bundle, tmp_path):
    root = trained_bundle
    assert (root / "models" / "model.pt").is_file()
    # tensors only (MONAI 1.6 loads weights-only); one saved object, so ignite stores its state dict unnested
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "stem.weight" in state and all(torch.is_tensor(v) for v in state.values())

    # evaluate: the paper's metrics, temporal-invariance table + PNG, GLS MAD, per-video CSV
    out = root / "eval"
    specknet.run_bundle(["train.json", "evaluate.json"], {**specknet.TINY, "bundle_root": str(root),
                                                          "output_dir": str(out)}, specknet_env, cwd=root)
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    for key in ("delta_1", "delta_2", "delta_4", "delta_8", "delta_16", "delta_avg", "mte", "ait_s", "pgm_gb",
                "gls_mad", "zero_motion_delta_avg", "zero_motion_mte"):
        assert key in m and np.isfinite(m[key]), key
    assert 0.0 <= m["delta_1"] <= m["delta_2"] <= m["delta_4"] <= m["delta_8"] <= m["delta_16"] <= 100.0
    assert m["n_videos"] == 1 and m["ait_s"] > 0 and m["pgm_gb"] > 0.05
    assert [r["phase"] for r in report["temporal_invariance"]] == [round(0.1 * i, 1) for i in range(11)]
    assert list(report["per_dataset"]) == ["tracking-seed0"]
    for name in ("temporal_invariance.png", "temporal_invariance.csv", "per_video.csv", "gls.png", "metrics.csv",
                 "delta_avg_raw.csv"):
        assert (out / name).is_file(), name
    with open(out / "per_video.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["query_frame"]) == int(0.72 * 24)

    # inference on a folder: a synthetic HDF5 video (query points from its labels' centre line, automatic) and the
    # real multi-frame ultrasound DICOM with query points given in a JSON file named after it
    inputs, points = tmp_path / "videos", tmp_path / "points"
    inputs.mkdir()
    points.mkdir()
    h5 = sorted(Path(specknet_env["SPECKNET_DEFAULT"]).glob("*.h5"))[0]
    shutil.copy(h5, inputs / "echo.h5")
    shutil.copy(_us_dicom(), inputs / "us_cine.dcm")
    (points / "us_cine.json").write_text(json.dumps({"query_frame": DICOM_QUERY_FRAME, "points": DICOM_POINTS}))
    pred_root = tmp_path / "inference_out"
    specknet.run_bundle(["inference.json"], {"spatial_size": "64", "bundle_root": str(root), "input_path": str(inputs),
                                            "query_points_path": str(points), "n_points": "9",
                                            "output_dir": str(pred_root)}, specknet_env, cwd=root)
    summary = json.loads((pred_root / "predictions" / "inference_summary.json").read_text())
    assert summary["n_videos"] == 2

    echo = json.loads((pred_root / "predictions" / "echo" / "echo_tracks.json").read_text())
    assert np.asarray(echo["tracks"]).shape == (24, 9, 2) and np.asarray(echo["confidence"]).shape == (24, 9)
    assert "labels (centre line" in echo["query_source"]
    assert echo["es_frame_source"] == "file" and np.isfinite(echo["gls_percent"])
    assert echo["gls_reference_percent"] < 0 and len(echo["strain_curve"]["strain_percent"]) == 24
    assert echo["strain_curve"]["time_s"][1] == pytest.approx(1 / 40.0)

    us = json.loads((pred_root / "predictions" / "us_cine" / "us_cine_tracks.json").read_text())
    tracks = np.asarray(us["tracks"])
    assert us["source_format"] == "dicom" and tracks.shape == (120, len(DICOM_POINTS), 2)
    np.testing.assert_allclose(tracks[DICOM_QUERY_FRAME], DICOM_POINTS, atol=1e-3)  # query points returned exactly
    assert np.isfinite(tracks).all() and (tracks[..., 0] > -1).all() and (tracks[..., 0] < 640).all()
    assert us["image_size_hw"] == [480, 640] and us["fps"] == pytest.approx(30.0, rel=1e-3)
    assert us["es_frame_source"] == "minimal centre-line length"
    assert us["pixel_spacing_mm"][0] == pytest.approx(0.5105, abs=1e-4)
    with h5py.File(pred_root / "predictions" / "us_cine" / "us_cine_tracks.h5") as f:
        np.testing.assert_allclose(f["tracks"][()], tracks, atol=1e-3)
        assert f["visible"].shape == (120, len(DICOM_POINTS)) and f["visible"].dtype == bool
        assert f.attrs["query_source"].endswith("us_cine.json")
    for stem in ("echo", "us_cine"):
        for kind in ("tracks", "strain"):
            assert (pred_root / "predictions" / stem / f"{stem}_{kind}.png").stat().st_size > 5000


def test_bad_inputs_fail_clearly_in_inference(specknet, specknet_env, trained_bundle, tmp_path, monkeypatch):
    import pydicom
    from monai.bundle import run

    monkeypatch.setenv("CARDIAC_DATA_DIR", specknet_env["CARDIAC_DATA_DIR"])

    def infer(**overrides):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(config_file=str(specknet.CONFIGS / "inference.json"), meta_file=str(specknet.CONFIGS / "metadata.json"),
                logging_file=str(specknet.CONFIGS / "logging.conf"), bundle_root=str(trained_bundle),
                spatial_size=64, output_dir=str(tmp_path / "out"), **overrides)

    (tmp_path / "q.json").write_text(json.dumps({"query_frame": 3, "points": [[300, 200], [320, 210]]}))
    # no checkpoint: the first handler stops the run before any video is read
    with pytest.raises(Exception) as err:
        infer(ckpt_path=str(tmp_path / "nowhere" / "model.pt"))
    assert (f"checkpoint {tmp_path / 'nowhere' / 'model.pt'} not found: train the bundle first (train.json) or pass "
            "--ckpt_path") in _chain_text(err.value)

    # a DICOM that lost the tag saying how many frames it holds
    ds = pydicom.dcmread(_us_dicom())
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "no_frames.dcm")
    with pytest.raises(Exception) as err:
        infer(input_path=str(tmp_path / "no_frames.dcm"), query_points_path=str(tmp_path / "q.json"))
    assert "no_frames.dcm: DICOM file lacks required tag(s) ['NumberOfFrames']" in _chain_text(err.value)

    # query points outside the 640 x 480 image
    (tmp_path / "far.json").write_text(json.dumps({"query_frame": 3, "points": [[100, 100], [700, 20]]}))
    with pytest.raises(Exception) as err:
        infer(input_path=str(_us_dicom()), query_points_path=str(tmp_path / "far.json"))
    assert "far.json: 1 query point(s) lie outside the 640 x 480 (W x H) image" in _chain_text(err.value)

    # a still image is not a video
    from common.data.io import write_nifti

    write_nifti(tmp_path / "still.nii.gz", np.zeros((32, 32, 1), np.uint8))
    with pytest.raises(Exception) as err:
        infer(input_path=str(tmp_path / "still.nii.gz"), query_points_path=str(tmp_path / "far.json"))
    assert "still.nii.gz: the image has 1 frame(s); tracking needs a video" in _chain_text(err.value)


def test_export_checks(specknet, trained_bundle, tmp_path):
    """verify_net_in_out with given query points passes; ckpt_export's scripting path is rejected by TorchScript (the
    README says so; its traced path is run by tests/tools/test_verify_bundle.py); the documented alternative for
    one's own query points, trace_tracker (TorchScript + metadata with all three inputs), gives a program equal to
    the eager network on the trained checkpoint."""
    from monai.bundle import ckpt_export, verify_net_in_out
    from monai.data import load_net_with_metadata

    from common.engines.tracking import trace_tracker
    from common.networks.specknet import SpeckNetBundleAdapter

    cfg, meta = str(specknet.CONFIGS / "inference.json"), str(specknet.CONFIGS / "metadata.json")
    ckpt = trained_bundle / "models" / "model.pt"
    qp = torch.tensor([[[4.0, 5.0], [10.0, 3.5]]])
    # pred is channel-first (B, 3, T, N): MONAI checks its 3 channels on axis 1 whatever the video length (any=2)
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu", any=2,
                      extra_forward_args={"query_points": qp, "query_frames": 1}, bundle_root=str(trained_bundle))

    common = {"net_id": "network_def", "ckpt_file": str(ckpt), "meta_file": meta, "config_file": cfg,
              "bundle_root": str(trained_bundle)}
    with pytest.raises(RuntimeError) as err:  # `python -m monai.bundle ckpt_export` without --use_trace
        ckpt_export(filepath=str(tmp_path / "script.ts"), **common)
    assert any("torch/jit" in str(entry.path) for entry in err.traceback)  # TorchScript's compiler rejects it
    assert not (tmp_path / "script.ts").exists()

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 4, 64, 64, generator=g) * 2 - 1
    qf = torch.tensor([[2, 2]])
    net = SpeckNetBundleAdapter().eval()
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    with torch.no_grad():
        eager = net(image, qp, qf)
    ts_path = trace_tracker(net, tmp_path / "specknet", n_frames=4, image_size=64, n_points=2, meta_file=meta)
    traced, ts_meta, _ = load_net_with_metadata(str(ts_path))
    assert ts_path.name == "specknet.ts" and ts_meta["version"] == json.loads(Path(meta).read_text())["version"]
    assert ts_meta["traced_input_shapes"]["image"] == [1, 1, 4, 64, 64]
    with torch.no_grad():
        torch.testing.assert_close(traced(image, qp, qf), eager)
    # export_tracker (torch.export) is checked against eager in tests/common/engines/test_tracking_engine.py
