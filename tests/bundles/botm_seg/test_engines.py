"""Unit tests of the bundle's engine pieces: common/engines/paired.py and common/engines/echo_inference.py."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from common.data.camus import load_echo_frame
from common.data.io import DataError
from common.engines.echo_inference import (
    EchoSequenceInferer,
    FrameArgmaxd,
    LoadEchoFramesd,
    SaveEchoPredictiond,
    as_flag,
    echo_inference_datalist,
    frame_pairs,
    normalised_entropy,
)
from common.engines.paired import EchoCorruptiond, detect_echo_layout, echo_class_names, echo_datalist


# ------------------------------------------------------------------------------------------------------- pairs
def test_frame_pairs():
    assert frame_pairs(1) == [(0, 0)]
    assert frame_pairs(2) == [(0, 1)]
    assert frame_pairs(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert frame_pairs(2, "cyclic") == [(0, 1), (1, 0)]
    assert frame_pairs(3, "self") == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="pairing"):
        frame_pairs(3, "random")


class LinearPairNet(torch.nn.Module):
    """Source logits = w f_src + v f_tgt, target logits = w f_tgt + v f_src (per class weights)."""

    size_multiple = 8

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
        self.v = torch.tensor([0.25, 3.0, -1.0]).view(1, 3, 1, 1)

    def forward(self, x):
        s, t = x[:, :1], x[:, 1:]
        return torch.cat([self.w * s + self.v * t, self.w * t + self.v * s], dim=1)


def test_sequence_inferer_averages_each_frames_logits_over_its_cyclic_pairs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 16, 24, generator=g, dtype=torch.float64).float()
    net = LinearPairNet()
    got = EchoSequenceInferer(spatial_size=None, batch_size=3)(x, net).reshape(2, 5, 3, 16, 24)
    for t in range(5):
        prev, nxt = x[:, (t - 1) % 5 : (t - 1) % 5 + 1], x[:, (t + 1) % 5 : (t + 1) % 5 + 1]
        # frame t is the source of pair (t, t+1) and the target of pair (t-1, t)
        ref = net.w * x[:, t : t + 1] + net.v * (prev + nxt) / 2
        torch.testing.assert_close(got[:, t], ref, rtol=1e-5, atol=1e-6)


def test_inferer_pair_resizes_in_and_back_like_the_training_resize():
    x = torch.rand(1, 2, 20, 12, generator=torch.Generator().manual_seed(1))
    net = LinearPairNet()
    got = EchoSequenceInferer(spatial_size=(16, 8))(x, net)
    small = F.interpolate(x, size=(16, 8), mode="bilinear", align_corners=False)
    ref = F.interpolate(net(small), size=(20, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="multiple of 8"):
        EchoSequenceInferer(spatial_size=(20, 12))(x, net)
    with pytest.raises(ValueError, match="NaN/Inf"):
        EchoSequenceInferer(spatial_size=None)(x * float("nan"), net)
    with pytest.raises(ValueError, match=r"\(B, frames, H, W\)"):
        EchoSequenceInferer(spatial_size=None)(x[0], net)


def test_frame_argmax_and_entropy():
    logits = torch.zeros(2 * 3, 4, 5)
    logits[2] = 5.0  # frame 0 -> class 2
    logits[3 + 1, :2] = 5.0  # frame 1 -> class 1 in the first two rows, uniform elsewhere
    out = FrameArgmaxd("pred", num_classes=3, uncertainty_key="u")({"pred": logits})
    assert out["pred"].dtype == torch.uint8 and out["pred"].shape == (2, 4, 5)
    assert (out["pred"][0] == 2).all() and (out["pred"][1, :2] == 1).all()
    assert out["u"].shape == (2, 4, 5) and torch.allclose(out["u"][1, 2:], torch.ones(2, 5))
    assert out["u"][0].max() < 0.1
    torch.testing.assert_close(normalised_entropy(torch.zeros(4, 2, 2)), torch.ones(2, 2))
    with pytest.raises(ValueError, match="frames \\* 3"):
        FrameArgmaxd("pred", num_classes=3)({"pred": torch.zeros(4, 2, 2)})


def test_as_flag():
    assert as_flag("False") is False and as_flag("true") is True and as_flag(True) is True and as_flag(0) is False
    with pytest.raises(ValueError, match="save_png must be true or false"):
        as_flag("maybe", "save_png")


# ----------------------------------------------------------------------------------------------------- datalists
def test_layout_detection_and_classes(botm_data, tmp_path):
    assert detect_echo_layout(botm_data["camus"]) == "camus"
    assert detect_echo_layout(botm_data["camus_mhd"]) == "camus"
    assert detect_echo_layout(botm_data["ted"]) == "ted"
    assert echo_class_names("ted") == ["LV", "Myo"] and echo_class_names("camus") == ["LV", "Myo", "LA"]
    with pytest.raises(DataError, match="neither a CAMUS folder"):
        detect_echo_layout(tmp_path)
    with pytest.raises(ValueError, match="layout must be"):
        detect_echo_layout(tmp_path, "acdc")


def test_camus_pairs_and_patient_level_split(botm_data):
    root = botm_data["camus"]
    splits = {s: echo_datalist(root, split=s, views=("2CH", "4CH")) for s in ("train", "val", "test")}
    patients = {s: {e["patient"] for e in d} for s, d in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert sum(len(p) for p in patients.values()) == 5 and len(patients["val"]) == 1  # 10 % of 5, at least one
    e = splits["train"][0]
    assert e["image"][0].endswith("_ED.nii.gz") and e["image"][1].endswith("_ES.nii.gz")
    assert e["label"][1].endswith("_ES_gt.nii.gz") and e["phases"] == "ED,ES"
    only_2ch = echo_datalist(root, split="train", views=("2CH",))
    assert {x["view"] for x in only_2ch} == {"2CH"} and len(only_2ch) == len(splits["train"]) // 2


def test_ted_training_pairs_are_consecutive_and_cyclic(botm_data):
    train = echo_datalist(botm_data["ted"], split=None, purpose="train")
    assert len(train) == 4 * 5
    first = [e for e in train if e["patient"] == "patient0001"]
    assert [e["frames"] for e in first] == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 0]]
    loaded = LoadEchoFramesd(["image", "label"])(dict(first[-1]))
    seq, _ = load_echo_frame(first[-1]["image"])
    np.testing.assert_array_equal(loaded["image"].numpy(), seq[[4, 0]].astype(np.float32))
    assert "frames" not in loaded and json.loads(loaded["frame_info"])["frames"] == [4, 0]
    dropped = echo_datalist(botm_data["ted"], split=None, purpose="train", frame_dropout=0.4, seed=3)
    assert len(dropped) == 4 * 3  # 2 of 5 frames removed per patient
    for p in {e["patient"] for e in dropped}:
        pairs = [e["frames"] for e in dropped if e["patient"] == p]
        kept = [a for a, _ in pairs]
        assert kept == sorted(kept) and [b for _, b in pairs] == kept[1:] + kept[:1]
    assert dropped == echo_datalist(botm_data["ted"], split=None, purpose="train", frame_dropout=0.4, seed=3)
    with pytest.raises(ValueError, match="frame_dropout"):
        echo_datalist(botm_data["ted"], frame_dropout=1.0)
    evals = echo_datalist(botm_data["ted"], split=None, purpose="eval")
    assert len(evals) == 4 and "frames" not in evals[0] and len(evals[0]["phases"].split(",")) == 5


def test_loader_rejects_mismatched_label(botm_data, tmp_path):
    e = echo_datalist(botm_data["camus"], split="train")[0]
    small = tmp_path / "small_gt.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10), np.uint8), np.eye(4)), str(small))
    with pytest.raises(DataError, match="small_gt.nii.gz: frame size"):
        LoadEchoFramesd(["image", "label"])({"image": e["image"], "label": [e["label"][0], str(small)]})


def test_inference_datalist_forms(botm_data, tmp_path):
    patient = botm_data["camus"] / "patient0002"
    cases = echo_inference_datalist(patient)
    assert len(cases) == 4  # an ED/ES pair and a half sequence per view; *_gt files skipped
    pairs = [c for c in cases if isinstance(c["image"], list)]
    assert len(pairs) == 2 and all(c["image"][0].endswith("_ED.nii.gz") for c in pairs)
    assert json.loads(pairs[0]["output_stems"]) == ["patient0002_2CH_ED", "patient0002_2CH_ES"]
    single = echo_inference_datalist(patient / "patient0002_2CH_ES.nii.gz")
    assert single[0]["image"].endswith("_ES.nii.gz")
    with pytest.raises(DataError, match="a list input must be 2D frames"):
        echo_inference_datalist([patient / "patient0002_2CH_ED.nii.gz",
                                 patient / "patient0002_2CH_half_sequence.nii.gz"])
    with pytest.raises(DataError, match="unsupported echo file"):
        echo_inference_datalist(botm_data["camus"] / "patient0002" / "Info_2CH.cfg")


# ------------------------------------------------------------------------------------------------------- writing
def _predict(case, tmp_path, uncertainty=True):
    d = LoadEchoFramesd("image")(dict(case))
    t, h, w = d["image"].shape
    masks = (torch.arange(h * w).reshape(1, h, w) % 4).repeat(t, 1, 1).to(torch.uint8)
    d["pred"] = masks
    d["u"] = torch.rand(t, h, w, generator=torch.Generator().manual_seed(0))
    saver = SaveEchoPredictiond("pred", str(tmp_path), uncertainty_key="u" if uncertainty else None, png=False)
    saver(d)
    return masks.numpy(), d


def test_nifti_outputs_keep_the_input_geometry(tmp_path):
    affine = np.array([[0.0, -0.4, 0.0, 12.0], [0.3, 0.0, 0.0, -5.0], [0.0, 0.0, 2.0, 7.0], [0, 0, 0, 1]])
    seq = np.random.default_rng(0).integers(0, 255, (30, 20, 6)).astype(np.uint8)  # (W, H, T)
    nib.save(nib.Nifti1Image(seq, affine), str(tmp_path / "clip.nii.gz"))
    masks, _ = _predict(echo_inference_datalist(tmp_path / "clip.nii.gz")[0], tmp_path / "out")
    out = nib.load(tmp_path / "out" / "clip_seg.nii.gz")
    assert out.shape == seq.shape and np.allclose(out.affine, affine)
    np.testing.assert_array_equal(load_echo_frame(tmp_path / "out" / "clip_seg.nii.gz")[0], masks)
    ent = nib.load(tmp_path / "out" / "clip_entropy.nii.gz")
    assert ent.get_data_dtype() == np.float32 and ent.shape == seq.shape


def test_metaimage_and_numpy_outputs(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 18, 22), np.uint8))
    img.SetSpacing((0.31, 0.27, 1.0))
    img.SetOrigin((3.0, -2.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "seq.mhd"))
    masks, _ = _predict(echo_inference_datalist(tmp_path / "seq.mhd")[0], tmp_path / "out")
    out = sitk.ReadImage(str(tmp_path / "out" / "seq_seg.nii.gz"))
    assert out.GetSize() == img.GetSize()
    assert np.allclose(out.GetSpacing(), img.GetSpacing()) and np.allclose(out.GetOrigin(), img.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), masks)
    np.save(tmp_path / "frame.npy", np.ones((18, 22), np.float32))
    masks, _ = _predict(echo_inference_datalist(tmp_path / "frame.npy")[0], tmp_path / "out", uncertainty=False)
    back, _ = load_echo_frame(tmp_path / "out" / "frame_seg.nii.gz")
    np.testing.assert_array_equal(back, masks[0])
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["cases"]
    assert [r["case"] for r in records] == ["seq", "frame"]  # the earlier run's record is kept
    assert set(records[1]["area_mm2"]) == {"LV", "Myo", "LA"}
    assert records[1]["area_mm2"]["LV"] == [float((masks[0] == 1).sum())]  # spacing 1 mm for arrays


# ----------------------------------------------------------------------------------------------------- corruption
def test_corruption_is_identity_by_default_and_reproducible_per_case():
    img = torch.rand(2, 128, 128, generator=torch.Generator().manual_seed(0))
    c = EchoCorruptiond("image")
    assert torch.equal(c({"image": img, "case": "a"})["image"], img)
    c.set_condition("noise", 0.3)
    n1 = c({"image": img, "case": "a"})["image"]
    n2 = c({"image": img, "case": "a"})["image"]
    n3 = c({"image": img, "case": "b"})["image"]
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    assert 0.1 < float((n1 - img).std()) < 0.2  # std = 0.3 x 50 % of the [0, 1] range
    c.set_condition("blur", 0.5)
    blurred = c({"image": img, "case": "a"})["image"]
    assert blurred.std() < 0.5 * img.std()  # sigma = 0.5 x 2 % of 128 px = 1.3 px averages white noise away
    with pytest.raises(ValueError, match="severity"):
        c.set_condition("blur", 1.5)
    with pytest.raises(ValueError, match="kind"):
        c.set_condition("jpeg", 0.1)
