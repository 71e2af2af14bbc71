"""3D file/folder inference of ``adacs_registration`` (``inference.json`` + ``cpu_reduced_3d.json``).

One tiny 3D model is trained for two epochs at 32^3 (AdaCS from epoch 0, so the training checkpoint holds a
scoring net too; its velocity head is then scaled so that it moves labels by about a voxel); inference then
registers an ED/ES pair and a folder of case folders whose volumes have an oblique, anisotropic grid that is not the
network's. The references are independent of the writer under test: the shapes and affines of the input files, and
the source labels warped by the written displacement with scipy's ``map_coordinates`` (order 1 per one-hot channel,
argmax), not with MONAI's ``Warp``; and ``evaluate.json``'s own predictions for the same cases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "adacs_registration" / "configs"
TINY = {"spatial_size": [32, 32, 32], "network_def#estimator#enc_channels": [4, 4, 4, 4],
        "network_def#estimator#dec_channels": [4, 4, 4, 4, 4, 4, 4], "network_def#estimator#integration_steps": 3,
        "scoring_def#enc_channels": [4, 4, 4, 4], "scoring_def#dec_channels": [4, 4, 4, 4, 4, 4, 4],
        "torch_threads": 1}
SHAPE = (26, 22, 18)  # not the network's 32^3 and not cubic
# oblique (rotated about two axes) and anisotropic (1.5 x 2.0 x 3.5 mm) grid
_ROT = (np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]])
        @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]))
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROT @ np.diag([1.5, 2.0, 3.5])
AFFINE[:3, 3] = (-20.0, 15.0, 7.0)
FLOW_SCALE = 10.0


def _workflow(files: list[str], **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type="train" if "train.json" in files else "infer", **overrides)
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def trained3d(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained 3D model (``models/model.pt`` + ``checkpoint.pt``) and inputs on an oblique anisotropic grid:
    ``cases/caseNNN/`` (ED, ES, ED_gt; case003 has a 2D ED file, case004 no ES) and one ED/ES pair with its labels."""
    from common.data.synthetic.registration3d import write_volume_pairs

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer3d")
    data = root / "train_data"
    write_volume_pairs(data, n_pairs=5, seed=3, shape=(24, 24, 20), progress=False)
    wf = _workflow(["train.json", "cpu_reduced_3d.json"], dataset_dir=str(data), bundle_root=str(root),
                   output_dir=str(root / "train_eval"), epochs=2, warmup_epochs=0, batch_size=1, learning_rate=0.01,
                   val_interval=10, **TINY)
    wf.run()
    wf.finalize()
    # a few iterations barely move anything (< 1 voxel), so that the label check below can tell a warp from none,
    # the trained network's velocity head is scaled: the model stays a smooth 3D VoxelMorph, with larger fields
    model = root / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    for k in [k for k in state if ".final_conv_out." in k]:
        state[k] = state[k] * FLOW_SCALE
    torch.save(state, model)
    # inputs: other synthetic cases, rewritten on the oblique anisotropic grid (arrays unchanged)
    raw = root / "raw"
    write_volume_pairs(raw, n_pairs=3, seed=11, shape=SHAPE, progress=False)
    cases = root / "cases"
    for d in sorted(p for p in raw.iterdir() if p.is_dir()):
        (cases / d.name).mkdir(parents=True)
        for kind in ("ED", "ES", "ED_gt"):
            arr = np.asarray(nib.load(str(d / f"{d.name}_{kind}.nii.gz")).dataobj)
            nib.save(nib.Nifti1Image(arr, AFFINE), str(cases / d.name / f"{d.name}_{kind}.nii.gz"))
    bad = cases / "case003" / "case003_ED.nii.gz"  # a 2D file given to a 3D model
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(bad)).dataobj)[..., 9], AFFINE), str(bad))
    (cases / "case004").mkdir()  # a case without its ES volume
    shutil.copy(cases / "case001" / "case001_ED.nii.gz", cases / "case004" / "case004_ED.nii.gz")
    pair = root / "pair"
    shutil.copytree(cases / "case001", pair)
    return {"root": root, "cases": cases, "pair": pair, "ed": pair / "case001_ED.nii.gz", "data": data}


def _scipy_warp_labels(labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Pull-back warp of a label map with a ``(*shape, 3)`` voxel displacement: each label's indicator resampled
    trilinearly at ``x + disp(x)`` (outside the volume is background), then the argmax."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij")).astype(np.float64)
    coords = grid + np.moveaxis(disp, -1, 0)
    values = np.unique(labels)
    probs = np.stack([ndimage.map_coordinates((labels == v).astype(np.float64), coords, order=1, mode="grid-constant",
                                              cval=1.0 if v == 0 else 0.0) for v in values])
    return values[probs.argmax(0)]


def _check_outputs(out: Path, case_dir: Path, name: str) -> None:
    ref = nib.load(str(case_dir / f"{name}_ES.nii.gz"))
    files = {k: nib.load(str(out / f"{name}_{k}.nii.gz")) for k in ("warped", "disp", "warped_mask", "score")}
    assert files["disp"].shape == (*SHAPE, 3)
    for k in ("warped", "warped_mask", "score"):
        assert files[k].shape == SHAPE, k
    assert np.allclose(ref.affine, AFFINE, atol=1e-5) and ref.shape == SHAPE
    for k, img in files.items():
        assert np.allclose(img.affine, ref.affine, atol=1e-5), k  # the input's oblique anisotropic geometry
    disp = np.asarray(files["disp"].dataobj, dtype=np.float64)
    assert np.abs(disp).max() > 0.05  # a trained network moves something (a broken writer writing zeros fails)
    labels = np.rint(np.asarray(nib.load(str(case_dir / f"{name}_ED_gt.nii.gz")).dataobj)).astype(int)
    expected = _scipy_warp_labels(labels, disp)
    written = np.asarray(files["warped_mask"].dataobj).astype(int)
    assert set(np.unique(written)) <= set(np.unique(labels))
    moved = expected != labels
    print(name, "voxels whose label the warp changes:", int(moved.sum()), "agree:", (expected == written).mean(),
          (expected[moved] == written[moved]).mean())
    assert moved.mean() > 0.01  # the check below can tell a warp from none
    # interpolation tolerance: voxels where two labels' weights nearly tie may flip
    assert (expected == written).mean() > 0.99
    assert (expected[moved] == written[moved]).mean() > 0.9
    for v in (1, 2):
        a, b = expected == v, written == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    src = np.asarray(nib.load(str(case_dir / f"{name}_ED.nii.gz")).dataobj, dtype=np.float64)
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")) + np.moveaxis(disp, -1, 0)
    warped_ref = ndimage.map_coordinates(src, coords, order=1, mode="grid-constant", cval=0.0)
    assert np.abs(np.asarray(files["warped"].dataobj) - warped_ref).max() < 1e-3 * np.abs(src).max()
    score = np.asarray(files["score"].dataobj)
    assert score.min() >= 0.0 and score.max() <= 1.0 and score.std() > 0


def test_3d_pair_inference_writes_outputs_in_the_input_geometry(trained3d):
    """One ED/ES pair (ES and ED labels found beside the ED file): warped image, displacement, warped labels and
    score map on the input grid; the labels warped with scipy by the written displacement match."""
    root, out = trained3d["root"], trained3d["root"] / "out_pair"
    wf = _workflow(["inference.json", "cpu_reduced_3d.json"], input_path=str(trained3d["ed"]), bundle_root=str(root),
                   output_dir=str(out), **TINY)
    wf.run()
    wf.finalize()
    _check_outputs(out, trained3d["pair"], "case001")
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [r["pair"] for r in summary["pairs"]] == ["case001"]
    assert not (out / "failed_inputs.json").exists() or not json.loads((out / "failed_inputs.json").read_text())


def test_3d_folder_inference_from_the_cli_lists_bad_cases_and_goes_on(trained3d):
    """A folder of case folders from the CLI: the case whose ED file is 2D and the case without an ES volume are
    listed in ``failed_inputs.json`` with the reason, the other two are written, exit status 3 (some inputs
    failed)."""
    from tools import runs

    root, out = trained3d["root"], trained3d["root"] / "out_folder"
    over = {**TINY, "input_path": str(trained3d["cases"]), "bundle_root": str(root), "output_dir": str(out)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           runs.config_list(CONFIGS, "inference.json", "cpu_reduced_3d.json"), "--meta_file",
           str(CONFIGS / "metadata.json"), *runs.override_args({k: str(v) for k, v in over.items()})]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    failed = json.loads((out / "failed_inputs.json").read_text())
    failed = failed["failed"] if isinstance(failed, dict) else failed
    reasons = {Path(f["input"]).name: f["reason"] for f in failed}
    assert sorted(reasons) == ["case003_ED.nii.gz", "case004_ED.nii.gz"]
    assert "expected one 3D volume" in reasons["case003_ED.nii.gz"] and "(26, 22)" in reasons["case003_ED.nii.gz"]
    assert "case004_ES" in reasons["case004_ED.nii.gz"]
    assert "case003_ED.nii.gz" in proc.stdout + proc.stderr  # the log line names the file
    for name in ("case001", "case002"):
        _check_outputs(out, trained3d["cases"] / name, name)
    assert not list(out.glob("case003_*.nii.gz")) and not list(out.glob("case004_*.nii.gz"))


def test_3d_inference_writes_what_evaluation_predicts(trained3d):
    """Inference prepares volumes exactly as training and evaluation do (resize, then normalise): on the same cases
    its displacement and warped labels equal ``evaluate.json``'s input-grid predictions bit for bit."""
    root, data = trained3d["root"], trained3d["data"]
    wf = _workflow(["train.json", "evaluate.json", "cpu_reduced_3d.json"], dataset_dir=str(data), eval_split="all",
                   bundle_root=str(root), output_dir=str(root / "eval_all"), **TINY)
    wf.run()
    wf.finalize()
    out = root / "infer_all"
    wf = _workflow(["inference.json", "cpu_reduced_3d.json"], input_path=str(data), bundle_root=str(root),
                   output_dir=str(out), **TINY)
    wf.run()
    wf.finalize()
    pred = root / "eval_all" / "predictions"
    cases = sorted(d.name for d in data.iterdir() if d.is_dir())
    assert len(cases) == 5
    for c in cases:
        a, b = nib.load(str(pred / f"{c}_disp.nii.gz")), nib.load(str(out / f"{c}_disp.nii.gz"))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine), c
        assert np.array_equal(np.asarray(nib.load(str(pred / f"{c}_warped_label.nii.gz")).dataobj),
                              np.asarray(nib.load(str(out / f"{c}_warped_mask.nii.gz")).dataobj)), c
