"""lssc_multimodal, abdominal task (``configs/abdomen.json``: BTCV CT + CHAOS T2-SPIR MRI; liver, right kidney, left
kidney, spleen): the bundle's label remapping checked on hand-written labels in both release layouts, the task switch
end to end with no dataset given, and a short real training that beats an untrained network on held-out volumes of
both modalities."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import EnsureChannelFirstd, LoadImaged
from PIL import Image

from common.transforms.labels import MapLabelByModalityd
from tools.runs import run_workflow

from .conftest import CONFIGS

ABDOMEN = ["liver", "right_kidney", "left_kidney", "spleen"]

# BTCV label file: every code 0..13 once along x (1 spleen, 2 R kidney, 3 L kidney, 6 liver; the rest are other organs)
BTCV_CODES_ROW = list(range(14))
BTCV_EXPECTED = [0, 4, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # liver 1, R kidney 2, L kidney 3, spleen 4
BTCV_EXPECTED_SPLEEN_LIVER = [0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]  # --structures "['spleen', 'liver']"

# CHAOS ground truth, grey values per voxel (x, y, z): the challenge's codes 63/126/189/252, values inside its
# accepted ranges (55-70 liver, 110-135 R kidney, 175-200 L kidney, 240-255 spleen) and values just outside them
CHAOS_GREY = np.array([
    [[0, 240], [55, 201]], [[63, 255], [70, 174]], [[126, 71], [110, 54]],
    [[189, 109], [135, 0]], [[252, 136], [175, 63]], [[100, 239], [200, 252]],
])  # (X=6, Y=2, Z=2)
CHAOS_EXPECTED = np.array([
    [[0, 4], [1, 0]], [[1, 4], [1, 0]], [[2, 0], [2, 0]],
    [[3, 0], [2, 0]], [[4, 0], [3, 1]], [[0, 0], [3, 4]],
])
CHAOS_EXPECTED_SPLEEN_LIVER = np.array([
    [[0, 1], [2, 0]], [[2, 1], [2, 0]], [[0, 0], [0, 0]],
    [[0, 0], [0, 0]], [[1, 0], [0, 2]], [[0, 0], [0, 1]],
])


def _write_release_layouts(root: Path) -> None:
    """One BTCV case (NIfTI written with nibabel) and one CHAOS case (a DICOM series, one file per slice, and one
    8-bit PNG per slice named as its DICOM file) holding the hand-written labels above."""
    from common.data.synthetic.abdomen import write_dicom_series

    btcv = root / "RawData" / "Training"
    (btcv / "img").mkdir(parents=True)
    (btcv / "label").mkdir(parents=True)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    label = np.broadcast_to(np.array(BTCV_CODES_ROW, dtype=np.uint8)[:, None, None], (14, 3, 2)).copy()
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.int16), affine), btcv / "img" / "img0001.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), btcv / "label" / "label0001.nii.gz")

    case = root / "Train_Sets" / "MR" / "1" / "T2SPIR"
    nz = CHAOS_GREY.shape[2]
    stems = [f"IMG-0002-{i:05d}" for i in range(1, nz + 1)]
    # instance 1 is the last slice along z (write_dicom_series' convention): PNGs must follow the DICOM files
    write_dicom_series(case / "DICOM_anon", np.full(CHAOS_GREY.shape, 100.0), np.diag([1.5, 1.5, 8.0, 1.0]),
                       stems=stems)
    (case / "Ground").mkdir()
    for inst, stem in enumerate(stems, 1):
        Image.fromarray(np.ascontiguousarray(CHAOS_GREY[:, :, nz - inst].T.astype(np.uint8))).save(
            case / "Ground" / f"{stem}.png")


def _bundle_labels(root: Path, out: Path, **overrides) -> dict[str, np.ndarray]:
    """Labels of every case as the bundle's evaluation reads them (``--eval_split all``): its datalist, then the
    configured load and label-mapping transforms; ``{modality: (X, Y, Z) ids}``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.json", "abdomen.json", "evaluate.json")])
    for k, v in {"dataset_dir": str(root), "output_dir": str(out), "eval_split": "all", **overrides}.items():
        parser[k] = v
    datalist = parser.get_parsed_content("validate#datalist")
    steps = [t for t in parser.get_parsed_content("volume_transforms")
             if isinstance(t, (LoadImaged, EnsureChannelFirstd, MapLabelByModalityd))]
    assert [type(t) for t in steps] == [LoadImaged, EnsureChannelFirstd, MapLabelByModalityd]
    out_labels = {}
    for entry in datalist:
        d = dict(entry)
        for t in steps:
            d = t(d)
        out_labels[entry["modality"]] = np.asarray(d["label"])[0]
    return out_labels


def test_btcv_and_chaos_labels_map_to_the_four_organs(tmp_path):
    _write_release_layouts(tmp_path / "data")
    labels = _bundle_labels(tmp_path / "data", tmp_path / "eval")
    assert sorted(labels) == ["ct", "mr"]
    ct = labels["ct"]
    assert ct.shape == (14, 3, 2) and (ct == np.array(BTCV_EXPECTED)[:, None, None]).all(), ct[:, 0, 0]
    np.testing.assert_array_equal(labels["mr"], CHAOS_EXPECTED)
    # a subset in another order re-indexes both modalities the same way (spleen 1, liver 2, all else background)
    labels = _bundle_labels(tmp_path / "data", tmp_path / "eval", structures=["spleen", "liver"])
    assert (labels["ct"] == np.array(BTCV_EXPECTED_SPLEEN_LIVER)[:, None, None]).all(), labels["ct"][:, 0, 0]
    np.testing.assert_array_equal(labels["mr"], CHAOS_EXPECTED_SPLEEN_LIVER)


def test_loss_switches_given_with_the_variant_win_and_unknown_modalities_fail():
    """The Table 5 rows set one consistency term on top of a variant; a label table must exist per modality."""
    from common.engines.lssc import lssc_loss

    loss = lssc_loss("joint_v3", use_mcr=True)
    assert (loss.use_aux, loss.use_mcr, loss.use_icr) == (True, True, False)
    loss = lssc_loss("full", use_mcr=False)
    assert (loss.use_aux, loss.use_mcr, loss.use_icr) == (True, False, True)
    remap = MapLabelByModalityd("label", {"ct": ([1, 6], [4, 1])})
    assert remap({"label": np.array([[1, 6, 2]]), "modality": "ct"})["label"].tolist() == [[4, 1, 2]]
    with pytest.raises(ValueError, match="modality 'pet' .* has no label table; tables exist for \\['ct'\\]"):
        remap({"label": np.zeros((1, 2)), "modality": "pet"})
    # one table shared by every modality (MM-WHS) needs no modality; different tables (the abdomen) do
    shared = MapLabelByModalityd("label", {"ct": ([205], [1]), "mr": ([205], [1])})
    assert shared({"label": np.array([[205, 3]])})["label"].tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="modality None"):
        MapLabelByModalityd("label", {"ct": ([1], [4]), "mr": ([1], [1])})({"label": np.zeros((1, 2))})


# the synthetic default's writer at a size a test can afford (the shipped default: 30 CT + 20 MRI at 3 mm)
SMALL_DEFAULT = {"n_ct": 4, "n_mr": 4, "ct_shape": (32, 32, 12), "ct_spacing": (12.0, 12.0, 20.0),
                 "mr_shape": (32, 32, 10), "mr_spacing": (12.0, 12.0, 24.0)}
TINY = {"spatial_size": 32, "pixdim": [12.0, 12.0, 24.0], "embed_dim": 8, "num_heads": [1, 1, 1, 1],
        "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 2, "batch_size": 2, "epochs": 1,
        "epoch_length": 2, "val_interval": 1, "augment_prob": 0.0, "torch_threads": 1, "infer_batch_size": 32}


@pytest.mark.slow
def test_task_switch_runs_train_evaluate_inference_on_the_abdominal_default(tmp_path, monkeypatch):
    """No dataset given + abdomen.json: the synthetic BTCV + CHAOS default is generated and used by training,
    evaluation (both modalities, the four organs) and inference (its test split by default, and a CHAOS DICOM
    series folder whose prediction keeps the series' grid). The default's writer runs at a small size here."""
    from common.data import default
    from common.data.abdomen import read_dicom_series

    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "cache"))
    module, func, _ = default.SYNTHETIC_KINDS["abdomen"]
    monkeypatch.setitem(default.SYNTHETIC_KINDS, "abdomen", (module, func, SMALL_DEFAULT))
    root = tmp_path / "bundle"
    run = {**TINY, "bundle_root": str(root), "output_dir": str(root / "eval")}
    run_workflow(CONFIGS, ["train.json", "abdomen.json"], "train", **run)
    data = tmp_path / "cache" / "abdomen-seed0"
    assert (data / "RawData" / "Training" / "img").is_dir() and (data / "Train_Sets" / "MR").is_dir()
    assert (root / "models" / "model.pt").is_file()

    run_workflow(CONFIGS, ["train.json", "abdomen.json", "evaluate.json"], "train", **run)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["class_names"] == ABDOMEN
    cases = {c["case"]: c["modality"] for c in metrics["per_case"]}
    assert sorted(cases.values()) == ["ct", "mr"]  # the test split: 1 of 4 volumes per modality
    assert all(n.startswith("btcv_" if m == "ct" else "chaos_") for n, m in cases.items())
    assert set(metrics["table2"]["dice"]["ct"]) >= {*ABDOMEN, "mean"}

    run_workflow(CONFIGS, ["inference.json", "abdomen.json"], "infer", **run)
    written = sorted(p.name for p in (root / "eval" / "predictions").iterdir())
    assert len(written) == 2 and any(n.startswith("img") for n in written) and any("chaos" in n for n in written)

    series = data / "Train_Sets" / "MR" / "2" / "T2SPIR" / "DICOM_anon"
    out = tmp_path / "dicom_out"
    run_workflow(CONFIGS, ["inference.json", "abdomen.json"], "infer", **{**run, "input_path": str(series),
                                                                        "output_dir": str(out)})
    (pred,) = (out / "predictions").iterdir()
    img, ref = nib.load(pred), read_dicom_series(series)
    assert img.shape == ref.array.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-3)
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2, 3, 4}


LEARN = {"spatial_size": 32, "pixdim": [12.0, 12.0, 12.0], "embed_dim": 16, "num_heads": [1, 2, 4, 8],
         "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 4, "drop_path_rate": 0.0,
         "batch_size": 8, "epochs": 1, "epoch_length": 200, "learning_rate": 0.003, "augment_prob": 0.0,
         "val_interval": 1000, "torch_threads": 1, "val_fraction": 0.0, "test_fraction": 0.34}


@pytest.mark.slow
def test_2d_abdomen_learns_beyond_untrained_and_all_background(tmp_path):
    """Real training of the full method (200 iterations of 8 CT + 8 MRI axial slice stacks, 32 x 32 at 12 mm) on 4 +
    4 volumes; scored on 2 + 2 held-out volumes in their own geometry against an untrained network of the same
    configuration. Every held-out volume holds all four organs, so predicting background scores 0 Dice."""
    from common.data.synthetic.abdomen import write_abdomen

    data = tmp_path / "abdomen"
    write_abdomen(data, n_ct=6, n_mr=6, seed=2, ct_shape=(48, 48, 20), ct_spacing=(8.0, 8.0, 12.5),
                  mr_shape=(48, 48, 14), mr_spacing=(8.0, 8.0, 16.0), progress=False)
    files = ["train.json", "abdomen.json", "evaluate.json"]
    scores = {}
    for name in ("untrained", "trained"):
        root = tmp_path / name
        run = {**LEARN, "dataset_dir": str(data), "bundle_root": str(root), "output_dir": str(root / "eval")}
        if name == "trained":
            run_workflow(CONFIGS, files[:2], "train", **run)
        else:  # the evaluation network as initialised (same seed, same configuration), saved as its model.pt
            parser = ConfigParser()
            parser.read_config([str(CONFIGS / f) for f in files])
            for k, v in run.items():
                parser[k] = v
            torch.manual_seed(0)
            (root / "models").mkdir(parents=True)
            torch.save(parser.get_parsed_content("network").state_dict(), root / "models" / "model.pt")
        run_workflow(CONFIGS, files, "train", **run)
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        dice = metrics["table2"]["dice"]
        scores[name] = {m: dice[m]["mean"] for m in ("ct", "mr")}
        assert {m: dice[m]["n_cases"] for m in ("ct", "mr")} == {"ct": 2, "mr": 2}
        for case in metrics["per_case"]:  # no organ is missing from a held-out reference (n_nan would count it)
            assert all(dice[case["modality"]][s]["n_nan"] == 0 for s in ABDOMEN)
    print("abdomen held-out mean Dice %:", scores)
    for m in ("ct", "mr"):
        assert scores["trained"][m] >= 25.0, (m, scores)
        assert scores["trained"][m] >= scores["untrained"][m] + 15.0, (m, scores)


def test_abdomen_file_composes_with_the_3d_configuration():
    """``abdomen.json`` sets no key of the 3D switch (``3d.json``): the 3D abdominal run keeps 3D patches of the
    paper's 128 x 128 x 64 and takes the abdominal task's data settings."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.json", "3d.json", "abdomen.json")])
    assert parser.get_parsed_content("spatial_dims") == 3
    assert list(parser.get_parsed_content("inplane_size")) == [128, 128, 64]
    assert parser.get_parsed_content("pixdim") == [1.5, 1.5, 8.0]
    assert parser.get_parsed_content("structures") == ABDOMEN
    assert parser.get_parsed_content("label_mapping")["mr"] == ([1, 2, 3, 4], [1, 2, 3, 4])
