"""HeartBoxCropd (LSSC's crop around the heart): on a large field of view whose heart is off-centre, the former
centre crop cuts the heart and the heart-box crop keeps every labelled voxel; a given box survives resampling; the
crop inverts back onto the original grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCropd, Compose, Spacingd

from common.transforms.slices import HeartBoxCropd, crop_window, inplane_size

ROI = inplane_size(48, "coronal")  # [48, -1, 48]


def _off_centre_case(shape=(128, 24, 112), lo=(8, 6, 60), hi=(40, 18, 100)) -> dict:
    """Large-field volume (coronal axis Y) whose labelled 'heart' sits near the left edge in X, high in Z."""
    label = np.zeros((1, *shape), np.uint8)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    label[(0, *sl)] = 1
    label[0, lo[0], lo[1], lo[2]] = 4  # a structure at the box corner: the crop must keep it too
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    return {"image": MetaTensor(torch.from_numpy(image), affine=aff), "label": MetaTensor(torch.from_numpy(label),
                                                                                          affine=aff)}


def test_centre_crop_cuts_an_off_centre_heart_and_the_heart_box_crop_keeps_every_labelled_voxel():
    case = _off_centre_case()
    n_labelled = int((case["label"] > 0).sum())
    centre = CenterSpatialCropd(["image", "label"], ROI)(dict(case))
    assert int((centre["label"] > 0).sum()) < 0.5 * n_labelled  # the former crop loses most of it
    out = HeartBoxCropd(["image", "label"], ROI)(dict(case))
    assert tuple(out["image"].shape) == (1, 48, 24, 48) == tuple(out["label"].shape)
    assert int((out["label"] > 0).sum()) == n_labelled
    assert int((out["label"] == 4).sum()) == 1
    # image and label are cut at the same place
    assert torch.equal(out["image"][0, :, 6, :], case["image"][0, 0:48, 6, 56:104])
    centre_mode = HeartBoxCropd(["image", "label"], ROI, mode="centre")(dict(case))
    assert torch.equal(centre_mode["label"], centre["label"])


def test_paper_box_then_centre_window_and_axes_smaller_than_the_window():
    case = _off_centre_case()
    out = HeartBoxCropd(["image", "label"], ROI, box_size=[64, 64])(dict(case))
    # X: 64-box on the heart centre 24 -> [0, 64) (shifted inside), window = its centre [8, 56) instead of [0, 48);
    # Z: box [48, 112) (shifted inside), window [56, 104)
    assert torch.equal(out["image"][0, :, 0, :], case["image"][0, 8:56, 0, 56:104])
    assert crop_window(24.0, 64, 128) == (0, 64)
    assert crop_window(50.0, 200, 128) == (0, 128)  # smaller than the window: kept whole, padded later
    assert crop_window(120.0, 48, 128) == (80, 128)


def test_crop_inverts_onto_the_original_grid():
    case = _off_centre_case()
    t = HeartBoxCropd(["image", "label"], ROI)
    out = t(dict(case))
    back = t.inverse(out)
    assert tuple(back["label"].shape) == tuple(case["label"].shape)
    assert torch.equal(back["label"], case["label"].to(back["label"].dtype))


def test_a_given_box_in_file_voxels_survives_resampling_and_wins_over_the_label():
    case = _off_centre_case()
    for k in ("image", "label"):
        case[k].meta["original_affine"] = case[k].affine.clone()
        case[k].meta["filename_or_obj"] = "ct_train_9999_image.nii.gz"
    # a box elsewhere than the label, given in the file's voxels; the grid is then resampled 1.5 mm -> 3 mm
    case["heart_box"] = [80, 0, 8, 120, 24, 40]
    res = Compose([Spacingd(["image", "label"], pixdim=[3.0, 3.0, 3.0], mode=["bilinear", "nearest"]),
                   HeartBoxCropd(["image", "label"], inplane_size(16, "coronal"))])(dict(case))
    first = np.asarray(res["image"].affine)[:3, 3] / 1.5  # first kept voxel centre, in the file's voxels
    # the 16-voxel window at 3 mm spans 32 file voxels; its centre must be the given box's centre (100, 24) in x, z
    # to within one resampled voxel (2 file voxels); the label's heart is at (24, 80)
    assert tuple(res["image"].shape) == (1, 16, 12, 16)
    assert abs(first[0] + 15.5 - 100) <= 2 and abs(first[2] + 15.5 - 24) <= 2
    assert int((res["label"] > 0).sum()) == 0  # the label's heart is elsewhere: the given box was used


def test_clear_errors():
    case = _off_centre_case()
    case["label"] = case["label"] * 0
    with pytest.raises(ValueError, match="no labelled structure to place the heart box"):
        HeartBoxCropd(["image", "label"], ROI)(dict(case))
    with pytest.raises(ValueError, match="heart_box must be"):
        HeartBoxCropd(["image"], ROI, source_key=None)({"image": case["image"], "heart_box": [1, 2, 3]})
    with pytest.raises(ValueError, match="no heart box"):
        HeartBoxCropd(["image"], ROI, source_key="label")({"image": case["image"]})
    with pytest.raises(ValueError, match="mode must be one of"):
        HeartBoxCropd(["image"], ROI, mode="middle")


def test_bundle_chain_crops_around_the_heart_by_default_and_centre_on_request(tmp_path, repo_root):
    """MM-WHS default of the lssc_multimodal bundle: a large-field CT whose heart sits off-centre keeps every
    labelled voxel after the training/evaluation chain; ``--crop_mode centre`` (the former crop) loses some."""
    from monai.bundle import ConfigParser

    from common.data.io import write_nifti

    shape = (160, 20, 160)
    label = np.zeros(shape, np.uint16)
    label[10:40, 5:15, 110:150] = 500  # LV cavity near a corner of the coronal plane
    label[12:16, 8:10, 112:116] = 820
    image = np.random.default_rng(1).normal(0, 50, shape).astype(np.int16)
    write_nifti(tmp_path / "ct_train_1001_image.nii.gz", image)
    write_nifti(tmp_path / "ct_train_1001_label.nii.gz", label)
    entry = {"image": str(tmp_path / "ct_train_1001_image.nii.gz"),
             "label": str(tmp_path / "ct_train_1001_label.nii.gz")}
    kept = {}
    for mode in ("heart_box", "centre"):
        parser = ConfigParser()
        parser.read_config(str(repo_root / "bundles/lssc_multimodal/configs/train.json"))
        parser.update({"spatial_size": 64, "crop_mode": mode})
        out = Compose(parser.get_parsed_content("volume_transforms"))(dict(entry))
        assert out["image"].shape[1] == 64 and out["image"].shape[3] == 64
        kept[mode] = int((out["label"] > 0).sum())
    assert kept["heart_box"] == int((label > 0).sum())
    assert kept["centre"] < kept["heart_box"]


def test_inference_chain_takes_a_given_box_and_otherwise_the_centre(tmp_path, repo_root):
    """Inference has no label: ``--heart_box`` (voxels of the input file) places the crop; without it and with
    ``--heart_locate false`` the centre (the network's coarse pass is tested below)."""
    from monai.bundle import ConfigParser

    from common.data.io import write_nifti

    shape = (160, 20, 160)
    image = np.zeros(shape, np.float32)
    image[10:40, 5:15, 110:150] = 100.0  # bright 'heart' near a corner
    write_nifti(tmp_path / "ct_x.nii.gz", image)
    fractions = {}
    for box in ([10, 0, 110, 40, 20, 150], []):
        parser = ConfigParser()
        parser.read_config(str(repo_root / "bundles/lssc_multimodal/configs/inference.json"))
        parser.update({"spatial_size": 64, "heart_box": box, "heart_locate": False})
        out = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "ct_x.nii.gz"), "modality": "ct"})
        assert out["image"].shape[1] == 64 and out["image"].shape[3] == 64
        img = out["image"][0]
        fractions[len(box)] = float((img > img.min() + 1e-3).float().mean())
    assert fractions[6] == pytest.approx(30 * 40 * 10 / (64 * 64 * 20), rel=0.05)  # the whole heart is in the window
    assert fractions[0] < 0.05  # the centre window misses most of it

    # per input: a JSON datalist entry's heart_box travels with its image through the bundle's datalist and batching
    import json

    from monai.data import DataLoader, Dataset

    from common.engines.inference import modality_datalist

    (tmp_path / "list.json").write_text(json.dumps([{"image": "ct_x.nii.gz", "heart_box": [10, 0, 110, 40, 20, 150]}]))
    entries = modality_datalist(str(tmp_path / "list.json"))
    assert entries[0]["heart_box"] == [10, 0, 110, 40, 20, 150]
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles/lssc_multimodal/configs/inference.json"))
    parser.update({"spatial_size": 64})
    batch = next(iter(DataLoader(Dataset(entries, parser.get_parsed_content("preprocessing")), batch_size=1)))
    img = batch["image"][0, 0]
    assert float((img > img.min() + 1e-3).float().mean()) == pytest.approx(fractions[6])


class _BrightIsHeart(torch.nn.Module):
    """Stand-in segmentation network: class 1 where the centre slice is brighter than 1 SD above the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        assert modality == "ct"
        centre = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
        return torch.cat([torch.zeros_like(centre), (centre - 1.0) * 10 + self.w], dim=1)


def test_coarse_network_pass_locates_an_off_centre_heart_without_label_or_box():
    from common.engines.inference import SliceStackInferer
    from common.transforms.slices import NetworkHeartLocator

    shape = (160, 20, 160)
    image = np.zeros((1, *shape), np.float32)
    image[0, 10:40, :, 110:150] = 100.0  # > 2 % of the voxels, so the top-2 % clip keeps it bright
    case = {"image": MetaTensor(torch.from_numpy(image)), "modality": "ct"}
    locator = NetworkHeartLocator(_BrightIsHeart(), SliceStackInferer("coronal", 3, size_multiple=32), "coronal",
                                  slice_step=4)
    mask = locator(case["image"], "ct")
    assert tuple(mask.shape) == (1, *shape)
    fg = np.argwhere(mask[0].numpy())
    assert fg[:, 0].min() == 10 and fg[:, 0].max() == 39 and fg[:, 2].min() == 110 and fg[:, 2].max() == 149
    out = HeartBoxCropd(["image"], inplane_size(64, "coronal"), source_key=None, locator=locator,
                        missing="centre")(dict(case))
    assert float(out["image"].sum()) == float(image.sum())  # the whole heart is inside the crop
    centre = HeartBoxCropd(["image"], inplane_size(64, "coronal"), mode="centre")(dict(case))
    assert float(centre["image"].sum()) < 0.1 * float(image.sum())
