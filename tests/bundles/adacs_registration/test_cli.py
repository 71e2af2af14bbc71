"""adacs_registration from the command line: train -> evaluate -> inference, export checks, clear failures, resume."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from common.data.io import DataError, read_image, write_nifti

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "adacs_registration" / "configs"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]


ESTIMATOR_KWARGS = {"enc_channels": [8, 8, 8, 8], "dec_channels": [8] * 7, "integration_steps": 3}
TINY_SCORING = {"scoring_def#enc_channels": [8] * 4, "scoring_def#dec_channels": [8] * 7}


def _tiny_inference_overrides() -> dict:
    """The tiny network of the CLI run, as Python values for in-process calls (nested ``network_def`` overrides)."""
    return {**{f"network_def#estimator#{k}": v for k, v in ESTIMATOR_KWARGS.items()}, "spatial_size": [64, 64]}


# ------------------------------------------------------------------------------------------- inputs on disk
def _write_dicom(path: Path, array: np.ndarray, spacing=(0.5, 0.7), position=(10.0, 20.0, 30.0)) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "US", "anon"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [str(s) for s in spacing]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = [str(p) for p in position]
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-5"
    ds.PixelData = array.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _inference_inputs(folder: Path, cache: Path) -> dict[str, tuple[int, int]]:
    """Three pairs: NIfTI with a source mask (128x128), PNG (96x80, resized for the net) and DICOM (64x72).

    Returns each pair's array shape as read (index order (x, y) for every format: (W, H) for PNG and DICOM)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pairs = cache / "registration-seed0" / "pairs"
    for suffix, out in (("source", "caseA_source"), ("target", "caseA_target"), ("source_myo", "caseA_source_mask")):
        img = nib.load(str(pairs / f"pair0001_{suffix}.nii.gz"))
        nib.save(img, str(folder / f"{out}.nii.gz"))
    yy, xx = np.mgrid[0:96, 0:80]
    for name, c in (("caseB_source", 40), ("caseB_target", 43)):
        arr = 200 * np.exp(-((yy - c) ** 2 + (xx - 40) ** 2) / 300.0) + 20
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"{name}.png")
    yy, xx = np.mgrid[0:64, 0:72]
    for name, c in (("caseC_source", 30), ("caseC_target", 32)):
        _write_dicom(folder / f"{name}.dcm", 1000 * np.exp(-((yy - c) ** 2 + (xx - 36) ** 2) / 200.0) + 100)
    return {"caseA": (128, 128), "caseB": (80, 96), "caseC": (72, 64)}


def _reference_warp(image: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """Independent pull-back warp: image sampled at x + disp(x), zeros beyond the border (as grid_sample)."""
    g = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")
    return ndimage.map_coordinates(image, [g[0] + disp[..., 0], g[1] + disp[..., 1]], order=order,
                                   mode="grid-constant", cval=0.0)


# ---------------------------------------------------------------------------------------------------- tests
def test_train_evaluate_inference_cli(trained_bundle, adacs_env, adacs, tmp_path):
    from common.data.pairs import pair_datalist

    models = trained_bundle / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint.pt").is_file()
    assert list(models.glob("train_checkpoint_epoch=1.pt"))

    # evaluation: metrics JSON (paper metrics), per-pair CSV, PNG
    out = tmp_path / "eval"
    adacs.run_bundle(["train.json", "evaluate.json"], {**adacs.TINY_NETS, "bundle_root": str(trained_bundle),
                                                       "output_dir": str(out)}, adacs_env, cwd=tmp_path)
    report = json.loads((out / "metrics.json").read_text())
    acdc = Path(adacs_env["ADACS_CACHE"]) / "acdc-seed0"
    n_test = len(pair_datalist(acdc, "test"))
    assert set(report["metrics"]) >= {"val_dice", "hd", "hd95", "asd", "nonpositive_jacobian_percent",
                                      "identity_dice"}
    assert report["n_pairs"] == n_test and report["table1"]["DSC"] == pytest.approx(100 * report["metrics"]["val_dice"])
    rows = list(csv.DictReader(open(out / "per_pair.csv")))
    assert len(rows) == n_test and {"pair", "dice", "hd", "asd", "nonpositive_jacobian_percent", "dice_identity",
                                    "hd_mm", "asd_mm"} <= set(rows[0])
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(report["metrics"]["val_dice"], rel=1e-5)
    png = out / "registration.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "val_dice_raw.csv").is_file()  # MONAI's MetricsSaver per-case table

    # inference: a folder of pairs in three formats -> warped image, displacement, warped mask on the input grid
    inputs = tmp_path / "pairs_in"
    shapes = _inference_inputs(inputs, Path(adacs_env["ADACS_CACHE"]))
    pred = tmp_path / "pred"
    # inference builds only f: the scoring net's settings are not inference keys (unknown overrides fail)
    infer_nets = {k: v for k, v in adacs.TINY_NETS.items() if not k.startswith("scoring_def")}
    adacs.run_bundle(["inference.json"], {**infer_nets, "bundle_root": str(trained_bundle),
                                          "input_path": str(inputs), "output_dir": str(pred)}, adacs_env, cwd=tmp_path)
    summary = json.loads((pred / "inference_summary.json").read_text())
    assert sorted(r["pair"] for r in summary["pairs"]) == ["caseA", "caseB", "caseC"]
    for name, shape in shapes.items():
        disp_img = nib.load(str(pred / f"{name}_disp.nii.gz"))
        disp = np.asarray(disp_img.dataobj)
        warped = np.asarray(nib.load(str(pred / f"{name}_warped.nii.gz")).dataobj)
        assert disp.shape == (*shape, 2) and warped.shape == shape and np.isfinite(disp).all()
        src_file = next(inputs.glob(f"{name}_source.*"))
        from common.data.pairs import read_pair_image

        src, _, _ = read_pair_image(src_file)
        np.testing.assert_allclose(warped, _reference_warp(src, disp), atol=1e-3 * max(1.0, float(np.abs(src).max())))
    # geometry: NIfTI keeps the target's affine, DICOM's patient geometry is converted to RAS
    np.testing.assert_allclose(nib.load(str(pred / "caseA_disp.nii.gz")).affine,
                               nib.load(str(inputs / "caseA_target.nii.gz")).affine)
    dicom_affine = nib.load(str(pred / "caseC_warped.nii.gz")).affine
    # index order: axis 0 runs along a row (column spacing 0.7 mm, LPS +x = RAS -x), axis 1 down the rows
    np.testing.assert_allclose(dicom_affine[:3, 0], [-0.7, 0, 0], atol=1e-6)
    np.testing.assert_allclose(dicom_affine[:3, 1], [0, -0.5, 0], atol=1e-6)
    np.testing.assert_allclose(dicom_affine[:3, 3], [-10, -20, 30], atol=1e-6)
    # the warped mask is the source mask pulled through the written field
    mask = read_image(inputs / "caseA_source_mask.nii.gz").array.astype(float)
    disp = np.asarray(nib.load(str(pred / "caseA_disp.nii.gz")).dataobj)
    expected = _reference_warp(mask, disp) > 0.5
    got = np.asarray(nib.load(str(pred / "caseA_warped_mask.nii.gz")).dataobj) > 0
    assert (got == expected).mean() > 0.995 and got.sum() > 0.5 * mask.sum()
    assert not list(pred.glob("caseB_warped_mask*"))  # no mask given, none written


def test_exported_model_holds_only_the_displacement_estimator(trained_bundle):
    from common.engines.registration import build_auxiliary_net
    from common.networks.registration import StackedPairAdapter, build_displacement_estimator

    model = torch.load(trained_bundle / "models" / "model.pt", weights_only=True)
    assert model and all(k.startswith("estimator.") for k in model)
    adapter = StackedPairAdapter(build_displacement_estimator("voxelmorph", spatial_dims=2, **ESTIMATOR_KWARGS))
    adapter.load_state_dict(model, strict=True)  # exactly the inference network, nothing else
    full = torch.load(trained_bundle / "models" / "checkpoint.pt", weights_only=True)
    scoring = build_auxiliary_net("adacs", 2, enc_channels=[8] * 4, dec_channels=[8] * 7)
    scoring.load_state_dict(full["auxiliary"])  # the training checkpoint does hold g ...
    n_scoring = sum(p.numel() for p in scoring.parameters())
    n_model = sum(v.numel() for v in model.values())
    assert n_model == sum(v.numel() for v in adapter.state_dict().values())
    assert not set(full["auxiliary"]) & {k.removeprefix("estimator.") for k in model}  # ... model.pt does not
    assert n_scoring > 0 and full["momentum"]["num_updates"] >= 1


def test_verify_net_in_out_and_torchscript_export(trained_bundle, adacs_env, adacs, tmp_path):
    common_args = ["--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
                   *adacs.cli_args({k: v for k, v in adacs.TINY_NETS.items() if k.startswith("network_def")})]
    verify = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
                             "--device", "cpu", "--n", "4", *common_args], cwd=tmp_path, env=adacs_env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert "verified with no error" in verify.stdout + verify.stderr
    ts = tmp_path / "adacs_f.ts"
    export = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
                             "--filepath", str(ts), "--ckpt_file", str(trained_bundle / "models" / "model.pt"),
                             *common_args],  # no --use_trace: the README's scripted export
                            cwd=tmp_path, env=adacs_env, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    from common.networks.registration import StackedPairAdapter, build_displacement_estimator

    adapter = StackedPairAdapter(build_displacement_estimator("voxelmorph", spatial_dims=2, **ESTIMATOR_KWARGS))
    adapter.load_state_dict(torch.load(trained_bundle / "models" / "model.pt", weights_only=True))
    adapter.eval()
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(ts), _extra_files=extra)
    version = json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert json.loads(extra["metadata.json"])["version"] == version
    x = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapter(x), rtol=1e-4, atol=1e-5)
    assert not any("scoring" in k or "unet" in k for k in loaded.state_dict())  # f only


def _root_cause(exc: BaseException, kind: type) -> BaseException:
    """The error of type ``kind`` behind MONAI's "Failed to evaluate ConfigExpression" wrappers."""
    seen = exc
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no {kind.__name__} behind {exc!r}"
    return seen


def _run_inprocess(configs: list[str], overrides: dict, monkeypatch, cache: str) -> None:
    from monai.bundle import run

    monkeypatch.setenv("CARDIAC_DATA_DIR", cache)
    run(config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False, **overrides)


def test_missing_checkpoint_fails_clearly(adacs_env, tmp_path, monkeypatch):
    overrides = {**_tiny_inference_overrides(), "bundle_root": str(tmp_path), "output_dir": str(tmp_path / "o"),
                 **TINY_SCORING}
    with pytest.raises(Exception) as info:
        _run_inprocess(["train.json", "evaluate.json"], overrides, monkeypatch, adacs_env["ADACS_CACHE"])
    assert re.search(r"checkpoint .*models/model.pt not found: train the bundle first",
                     str(_root_cause(info.value, FileNotFoundError)))
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize("problem", ["nan", "shape", "unreadable"])
def test_bad_inference_images_fail_clearly(problem, trained_bundle, adacs_env, tmp_path, monkeypatch):
    src = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    tgt = src.copy()
    if problem == "nan":
        tgt[10, 10] = np.nan
    if problem == "shape":
        tgt = tgt[:, :48]
    write_nifti(tmp_path / "bad_source.nii.gz", src)
    write_nifti(tmp_path / "bad_target.nii.gz", tgt)
    if problem == "unreadable":
        (tmp_path / "bad_target.nii.gz").write_bytes(b"this is not a NIfTI file")
    expected = {"nan": r"bad_target.nii.gz: image contains 1 NaN/Inf values",
                "shape": r"bad_source.nii.gz has shape \(64, 64\) but .*bad_target.nii.gz has \(64, 48\)",
                "unreadable": r"bad_target.nii.gz: not a readable NIfTI file"}[problem]
    overrides = {**_tiny_inference_overrides(), "bundle_root": str(trained_bundle),
                 "input_path": str(tmp_path / "bad_source.nii.gz"), "output_dir": str(tmp_path / "o")}
    with pytest.raises(Exception) as info:
        _run_inprocess(["inference.json"], overrides, monkeypatch, adacs_env["ADACS_CACHE"])
    assert re.search(expected, str(_root_cause(info.value, DataError)))
    assert not list((tmp_path / "o").glob("*_disp.nii.gz")) if (tmp_path / "o").exists() else True


def test_bundle_resume_continues_identically(adacs_env, tmp_path, monkeypatch):
    """``--resume_from`` restores f, g, both optimisers, the momentum state and the epoch (bundle wiring)."""
    tiny = {**_tiny_inference_overrides(), **TINY_SCORING,
            "batch_size": 4, "warmup_epochs": 0, "val_interval": 5}
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    _run_inprocess(["train.json"], {**tiny, "epochs": 2, "bundle_root": str(straight)}, monkeypatch,
                   adacs_env["ADACS_CACHE"])
    _run_inprocess(["train.json"], {**tiny, "epochs": 1, "bundle_root": str(first)}, monkeypatch,
                   adacs_env["ADACS_CACHE"])
    _run_inprocess(["train.json"], {**tiny, "epochs": 2, "bundle_root": str(resumed),
                                    "resume_from": str(first / "models" / "checkpoint.pt")},
                   monkeypatch, adacs_env["ADACS_CACHE"])
    a = torch.load(straight / "models" / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "models" / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 2 * a["trainer"]["epoch_length"]
    assert a["momentum"] == b["momentum"] and a["momentum"]["num_updates"] > 0
    for part in ("network", "auxiliary"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs between the straight and the resumed run"
