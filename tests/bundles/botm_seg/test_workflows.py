"""Bundle workflows in process on the tiny trained model: inference on every input form, baseline networks by
override, the robustness protocol, and clear failures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from common.data.camus import load_echo_frame

from .conftest import TINY, TINY_NETWORK

INFER = {k: v for k, v in TINY.items() if k not in ("epochs", "cache_rate")}


@pytest.mark.slow
def test_inference_on_a_frame_a_pair_a_sequence_and_arrays(trained, botm_data, tmp_path, run_bundle):
    patient = botm_data["camus"] / "patient0001"
    ted = botm_data["ted"] / "patient0002" / "patient0002_4CH_sequence.mhd"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    frame = load_echo_frame(patient / "patient0001_4CH_ED.nii.gz")[0]
    np.save(inputs / "one_frame.npy", frame)
    clip_in = load_echo_frame(ted)[0][:3]
    np.save(inputs / "clip.npy", clip_in)
    out = tmp_path / "out"
    # a list of two frame files is one ED/ES pair
    run_bundle(["inference.json"], trained, output_dir=str(out / "pair"), save_png="false",
               input_path=[str(patient / "patient0001_2CH_ED.nii.gz"), str(patient / "patient0001_2CH_ES.nii.gz")],
               **INFER)
    pair = json.loads((out / "pair" / "predictions.json").read_text())["cases"]
    assert len(pair) == 1 and pair[0]["n_frames"] == 2 and "png" not in pair[0]
    # a TED MetaImage sequence: one NIfTI mask with the sequence's spacing and size
    run_bundle(["inference.json"], trained, output_dir=str(out / "ted"), input_path=str(ted), **INFER)
    seg = sitk.ReadImage(str(out / "ted" / "patient0002_4CH_sequence_seg.nii.gz"))
    ref = sitk.ReadImage(str(ted))
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetSpacing(), ref.GetSpacing())
    assert sitk.GetArrayFromImage(seg).shape == sitk.GetArrayFromImage(ref).shape
    assert sitk.GetArrayFromImage(seg).max() <= 3
    # NumPy arrays: a single frame (paired with itself) and a 3-frame clip
    run_bundle(["inference.json"], trained, output_dir=str(out / "npy"), input_path=str(inputs), **INFER)
    one, _ = load_echo_frame(out / "npy" / "one_frame_seg.nii.gz")
    clip, _ = load_echo_frame(out / "npy" / "clip_seg.nii.gz")
    assert one.shape == frame.shape and clip.shape == clip_in.shape
    preds = json.loads((out / "npy" / "predictions.json").read_text())["cases"]
    assert sorted(c["n_frames"] for c in preds) == [1, 3]


def test_single_frame_inference_equals_the_frame_paired_with_itself(trained):
    from common.engines.echo_inference import EchoSequenceInferer
    from common.networks.factory import build_segmentation_network

    net = build_segmentation_network("botm", 4, **{k.split("#")[1]: v for k, v in TINY_NETWORK.items()})
    net.load_state_dict(torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.rand(1, 1, 72, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = EchoSequenceInferer(spatial_size=(64, 64))(x, net)
        small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        both = net(torch.cat([small, small], dim=1))
        ref = torch.nn.functional.interpolate((both[:, :4] + both[:, 4:]) / 2, size=(72, 64), mode="bilinear",
                                              align_corners=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [
    ("unet", {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}),
    ("attention_unet", {"channels": [4, 8, 16], "strides": [2, 2]}),
    ("swin_unetr", {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}),
])
def test_baseline_networks_by_override_train_and_evaluate(name, kwargs, botm_data, tmp_path, run_bundle):
    overrides = {k: v for k, v in TINY.items() if not k.startswith("network_def#")}
    net = {"network_def#name": name, **{f"network_def#{k}": v for k, v in kwargs.items()}}
    run_bundle(["train.json"], tmp_path, dataset_dir=str(botm_data["camus"]), **net, **overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in state)  # the MONAI network inside the frame-wise wrapper
    run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(botm_data["camus"]),
               output_dir=str(tmp_path / "eval"), **net, **overrides)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["echo"]["n_frames"] > 0


@pytest.mark.slow
def test_robustness_protocol_override(trained, botm_data, tmp_path, run_bundle):
    out = tmp_path / "rob"
    conditions = [["none", 0.0], ["blur", 0.5], ["noise", 0.5]]
    run_bundle(["train.json", "evaluate.json", "evaluate_robustness.json"], trained, output_dir=str(out),
               dataset_dir=str(botm_data["camus"]), robustness_conditions=conditions, **TINY)
    report = json.loads((out / "robustness" / "robustness.json").read_text())
    rows = {r["condition"]: r for r in report["conditions"]}
    assert list(rows) == ["clean", "blur_50", "noise_50"]
    for r in rows.values():
        assert set(r) >= {"mDice", "mHD", "mIoU", "Spe", "MAE", "mDice_ED", "mDice_ES"}
        assert (out / "robustness" / r["condition"] / "per_frame.csv").is_file()
    # the corruption reaches the network: scores change, and they are reproducible (fixed noise per case)
    assert rows["noise_50"]["MAE"] != rows["clean"]["MAE"] and rows["blur_50"]["MAE"] != rows["clean"]["MAE"]
    table = (out / "robustness" / "robustness.md").read_text()
    assert "RandomBlur 10%" in table and "BOTM (paper, CAMUS4CH;" in table and "0.906/0.892" in table
    # the paper's row is never shown without saying what our percentages mean
    assert report["severity_mode"] == "strength" and "severity mode `strength`" in table and "not as a like" in table
    assert all(r["n_missed"] >= 0 for r in rows.values()) and "n_missed" in table
    assert (out / "robustness" / "robustness.png").stat().st_size > 0
    again = tmp_path / "again"
    run_bundle(["train.json", "evaluate.json", "evaluate_robustness.json"], trained, output_dir=str(again),
               dataset_dir=str(botm_data["camus"]), robustness_conditions=[["noise", 0.5]], **TINY)
    rerun = json.loads((again / "robustness" / "robustness.json").read_text())["conditions"][0]
    assert rerun["mDice"] == rows["noise_50"]["mDice"] and rerun["MAE"] == rows["noise_50"]["MAE"]


# ------------------------------------------------------------------------------------------------ clear failures
def _causes(exc: BaseException) -> str:
    text = []
    while exc is not None:
        text.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(text)


def test_missing_checkpoint_fails_clearly(botm_data, tmp_path, run_bundle):
    # MONAI reports a failing config expression as RuntimeError("Failed to evaluate ...") from the original error
    with pytest.raises(Exception) as err:
        run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(botm_data["camus"]),
                   ckpt_path=str(tmp_path / "nowhere.pt"), **TINY)
    assert "nowhere.pt not found: train the bundle first (train.json) or pass --ckpt_path" in _causes(err.value)


def test_nan_image_and_wrong_shape_fail_naming_the_file(trained, tmp_path, run_bundle):
    bad = np.full((40, 48), 100.0, dtype=np.float32)
    bad[3, 4] = np.nan
    nan_file = tmp_path / "nan_frame.nii.gz"
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(nan_file))
    with pytest.raises(Exception) as err:
        run_bundle(["inference.json"], trained, output_dir=str(tmp_path / "o1"), input_path=str(nan_file), **INFER)
    assert "nan_frame.nii.gz: image contains 1 NaN/Inf values" in _causes(err.value)
    volume = tmp_path / "volume4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), dtype=np.float32), np.eye(4)), str(volume))
    with pytest.raises(Exception) as err:
        run_bundle(["inference.json"], trained, output_dir=str(tmp_path / "o2"), input_path=str(volume), **INFER)
    assert "volume4d.nii.gz: expected a 2D image or a 2D+t sequence" in _causes(err.value)
    with pytest.raises(Exception) as err:
        run_bundle(["inference.json"], trained, output_dir=str(tmp_path / "o3"),
                   input_path=str(tmp_path / "missing_folder"), **INFER)
    assert "missing_folder not found" in _causes(err.value)
