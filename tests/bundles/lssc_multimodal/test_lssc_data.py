"""LSSC data path: slice stacks, slice datasets, unpaired datalists and the bundle's volume preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.slices import VolumeSliceDataset, unpaired_datalist
from common.transforms.slices import (
    ConsecutiveSlicesd,
    consecutive_slices,
    foreground_slices,
    inplane_size,
    slice_axis_index,
    stacks_to_volume,
    volume_to_slice_stacks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ref_stack(vol: np.ndarray, s: int, axis: int, n: int) -> np.ndarray:
    """Reference slice stack with explicit loops: neighbours clamped to the volume (edge replication)."""
    depth = vol.shape[axis + 1]
    chans = []
    for c in range(vol.shape[0]):
        for k in range(s - n // 2, s + n // 2 + 1):
            chans.append(np.take(vol[c], min(max(k, 0), depth - 1), axis=axis))
    return np.stack(chans)


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial", 2])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_consecutive_slices_match_reference(axis, n):
    vol = np.random.default_rng(0).normal(size=(2, 5, 6, 7))
    a = slice_axis_index(axis)
    for s in range(vol.shape[a + 1]):
        ref = _ref_stack(vol, s, a, n)
        np.testing.assert_array_equal(consecutive_slices(vol, s, axis, n), ref)
        np.testing.assert_array_equal(consecutive_slices(torch.from_numpy(vol), s, axis, n).numpy(), ref)
    stacks = volume_to_slice_stacks(torch.from_numpy(vol), axis, n)
    assert stacks.shape[0] == vol.shape[a + 1]
    for s in range(stacks.shape[0]):
        np.testing.assert_array_equal(stacks[s].numpy(), _ref_stack(vol, s, a, n))
    # reassembly puts slice s back at position s of the slicing axis
    centre = stacks[:, [c * n + n // 2 for c in range(2)]]
    np.testing.assert_array_equal(stacks_to_volume(centre, axis).numpy(), vol)


def test_slice_helpers_and_errors():
    assert inplane_size(224, "coronal") == [224, -1, 224]
    assert inplane_size((64, 32), "axial") == [64, 32, -1]
    assert inplane_size(16, 0) == [-1, 16, 16]
    with pytest.raises(ValueError, match="unknown slice axis 'transverse'"):
        slice_axis_index("transverse")
    with pytest.raises(ValueError, match="spatial axis"):
        slice_axis_index(3)
    with pytest.raises(ValueError, match="odd"):
        consecutive_slices(np.zeros((1, 4, 4, 4)), 0, "axial", 2)
    with pytest.raises(IndexError, match="outside"):
        consecutive_slices(np.zeros((1, 4, 4, 4)), 4, "axial", 3)
    with pytest.raises(ValueError, match="channel-first"):
        consecutive_slices(np.zeros((4, 4, 4)), 0)
    label = np.zeros((1, 4, 10, 4), dtype=np.uint8)
    label[0, 1, 3] = 2
    label[0, 2, 6] = 1
    assert foreground_slices(label, "coronal") == [3, 4, 5, 6]
    assert foreground_slices(label, "coronal", margin=4) == list(range(10))
    assert foreground_slices(np.zeros_like(label), "coronal") == []
    d = ConsecutiveSlicesd("image", label_keys="label", slice_axis="coronal")(
        {"image": np.arange(160.0).reshape(1, 4, 10, 4), "label": label, "slice": 3, "patient": "p"})
    assert d["image"].shape == (3, 4, 4) and d["label"].shape == (1, 4, 4) and d["patient"] == "p"
    np.testing.assert_array_equal(d["label"][0], label[0, :, 3])


def test_volume_slice_dataset_items_and_selection():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 6, 9, 5)).astype(np.float32)
    label = np.zeros((1, 6, 9, 5), dtype=np.uint8)
    label[0, 2:4, 3:6, 1:4] = 2
    entries = [{"image": image, "label": label, "modality": "ct", "patient": "a", "spacing": [1.0, 1.0, 1.0]},
               {"image": image * 2, "label": label, "modality": "mr", "patient": "b"}]
    calls = []

    def vt(d):
        calls.append(d.get("patient"))
        return d

    ds = VolumeSliceDataset(entries, vt, slice_axis="coronal", num_slices=3)
    assert calls == ["a", "b"]  # every volume is preprocessed once, up front
    assert len(ds) == 6  # the 3 foreground slices (3, 4, 5) of each volume
    assert ds.indices_by("modality") == {"ct": [0, 1, 2], "mr": [3, 4, 5]}
    item = ds[4]
    assert item["modality"] == "mr" and item["patient"] == "b" and item["slice"] == 4 and item["volume"] == 1
    assert "spacing" not in item  # lists do not collate next to slices; plain values only
    torch.testing.assert_close(item["image"], torch.from_numpy(_ref_stack(image * 2, 4, 1, 3)).float())
    assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 6, 5)
    assert len(VolumeSliceDataset(entries, vt, slice_selection="all")) == 18
    assert len(VolumeSliceDataset(entries, vt, margin=1)) == 10
    flipped = VolumeSliceDataset(entries, vt, transform=lambda d: {**d, "image": -d["image"]})
    torch.testing.assert_close(flipped[0]["image"], -ds[0]["image"])
    with pytest.raises(ValueError, match="slice_selection"):
        VolumeSliceDataset(entries, vt, slice_selection="some")
    with pytest.raises(ValueError, match="differ in size"):
        VolumeSliceDataset([{"image": image, "label": label[:, :3]}], vt)
    with pytest.raises(ValueError, match="no slice selected"):
        VolumeSliceDataset([{"image": image, "label": np.zeros_like(label)}], vt)


def test_unpaired_datalist_split_and_few_shot(tmp_path):
    from common.data.synthetic.mmwhs import write_mmwhs

    write_mmwhs(tmp_path, n_ct=10, n_mr=10, seed=3, ct_shape=(8, 8, 6), mr_shape=(8, 8, 6), progress=False)
    train = unpaired_datalist(tmp_path, ["ct", "mr"], "train")
    val = unpaired_datalist(tmp_path, ["ct", "mr"], "val")
    test = unpaired_datalist(tmp_path, ["ct", "mr"], "test")
    for mod in ("ct", "mr"):
        sizes = [len([e for e in part if e["modality"] == mod]) for part in (train, val, test)]
        assert sizes == [7, 1, 2]  # 70/10/20 per modality
        names = [{e["patient"] for e in part if e["modality"] == mod} for part in (train, val, test)]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    one = unpaired_datalist(tmp_path, ["ct", "mr"], "train", labelled={"mr": 1})
    three = unpaired_datalist(tmp_path, ["ct", "mr"], "train", labelled={"mr": 3})
    mr1 = {e["patient"] for e in one if e["modality"] == "mr"}
    mr3 = {e["patient"] for e in three if e["modality"] == "mr"}
    assert len(mr1) == 1 and len(mr3) == 3 and mr1 < mr3
    assert mr3 <= {e["patient"] for e in train if e["modality"] == "mr"}
    assert [e for e in one if e["modality"] == "ct"] == [e for e in train if e["modality"] == "ct"]
    # the test split is never reduced by the few-shot protocol
    assert unpaired_datalist(tmp_path, ["ct", "mr"], "test", labelled={"mr": 1}) == test
    with pytest.raises(ValueError, match="8 labelled mr volumes requested, the training split has 7"):
        unpaired_datalist(tmp_path, ["ct", "mr"], "train", labelled={"mr": 8})
    with pytest.raises(ValueError, match="few-shot modality 'ct' is not among"):
        unpaired_datalist(tmp_path, ["mr"], "train", labelled={"ct": 1})
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        unpaired_datalist(tmp_path, ["ct", "pet"], "train")


def test_bundle_volume_preprocessing(tmp_path, repo_root):
    """The bundle's volume chain: label remap, resampling, in-plane crop/pad, top-2% clip and z-score."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from common.data.io import read_image
    from common.data.synthetic.mmwhs import write_mmwhs

    write_mmwhs(tmp_path, n_ct=1, n_mr=0, seed=1, progress=False)
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles/lssc_multimodal/configs/train.json"))
    parser.update({"spatial_size": 64, "pixdim": [2.4, 2.4, 2.4]})
    vt = Compose(parser.get_parsed_content("volume_transforms"))
    entry = unpaired_datalist(tmp_path, ["ct"], None)[0]
    out = vt(dict(entry))
    img, lab, ref = out["image"], out["label"], out["reference"]
    assert img.shape[1] == 64 and img.shape[3] == 64 and lab.shape == img.shape
    assert img.shape[2] == round(96 * 1.6 / 2.4)  # the slicing (coronal) axis is resampled, not cropped
    assert set(np.unique(lab.numpy()).tolist()) <= {0, 1, 2, 3, 4}
    # the reference keeps the original grid with the remapped ids
    raw = read_image(entry["label"]).array
    assert ref.shape[1:] == raw.shape
    np.testing.assert_array_equal(ref[0].numpy() == 4, raw == 820)
    np.testing.assert_array_equal(ref[0].numpy() == 1, raw == 205)
    # z-scored after clipping: within the unpadded region the mean is 0 and the std 1; top 2% share one value
    padded = (img[0] == 0).all(dim=0).all(dim=0)  # padded rows along the last axis are exactly 0
    core = img[0][..., ~padded].numpy()
    assert abs(core.mean()) < 1e-3 and abs(core.std() - 1.0) < 1e-3
    assert (core >= core.max() - 1e-5).mean() >= 0.015


def test_inputs_whose_predictions_would_share_a_name_are_refused(tmp_path):
    """ct_x.nii.gz and ct_x.mha would both be saved as ct_x_seg.nii.gz: the second is recorded, not overwritten."""
    from common.data.io import write_mhd, write_nifti
    from common.engines.inference import modality_datalist, refuse_shared_output_names
    from common.engines.screening import BatchLedger, screen_inputs

    vol = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    write_nifti(tmp_path / "ct_x.nii.gz", vol)
    write_mhd(tmp_path / "ct_x.mha", vol, (1.0, 1.0, 1.0))
    write_nifti(tmp_path / "mr_y.nii.gz", vol)
    ledger = BatchLedger(tmp_path / "out")
    entries = refuse_shared_output_names(screen_inputs(modality_datalist(tmp_path, ledger=ledger), ledger), ledger)
    assert [Path(e["image"]).name for e in entries] == ["ct_x.mha", "mr_y.nii.gz"]
    (failure,) = ledger.failed
    assert failure["input"].endswith("ct_x.nii.gz") and "would overwrite" in failure["reason"]
    assert failure["stage"] == "datalist"
    with pytest.raises(ValueError, match="would overwrite"):
        refuse_shared_output_names(modality_datalist(tmp_path))
