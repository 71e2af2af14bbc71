"""Claim ``lssc_joint`` of ``tools.reproduce``: the arms differ only in the method's idea, the held-out MRI volumes
come from another simulator seed than the training data, per-case Dice is read and paired correctly, and the smoke
size runs end to end through ``run_claim`` (the bundle's own train/evaluate workflows) into a well-formed JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tools.reproduce.lssc_joint import (
    CLAIM_SIZES,
    CONFIGS,
    TEST_DATA_SEED,
    TEST_FIRST_ID,
    TRAIN_DATA_SEED,
    arm_overrides,
    case_dice,
    paired_case_values,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_arms_differ_only_in_variant_and_modalities():
    size = CLAIM_SIZES["quick"]
    method, baseline = arm_overrides("method", size, seed=3), arm_overrides("baseline", size, seed=3)
    differing = {k for k in method.keys() | baseline.keys() if method.get(k) != baseline.get(k)}
    assert differing == {"variant", "modalities"}
    assert method["variant"] == "full" and baseline["variant"] == "baseline" and baseline["modalities"] == ["mr"]
    assert "modalities" not in method  # the bundle default: both modalities
    assert method["few_shot"] == {"mr": 1} and method["seed"] == method["split_seed"] == 3
    # a fixed iteration budget: the bundle's epoch_length "max" would differ between a CT+MRI and an MRI-only run
    assert isinstance(method["epoch_length"], int) and method["epochs"] * method["epoch_length"] == size.iterations
    train = json.loads((CONFIGS / "train.json").read_text())
    assert set(method) | set(baseline) <= set(train), "every override must be a knob of train.json"
    with pytest.raises(ValueError, match="arm must be one of"):
        arm_overrides("ours", size, seed=0)


def test_case_dice_is_the_mean_over_structures_skipping_absent_ones():
    metrics = {"per_case": [{"case": "mr_train_2001", "modality": "mr", "dice": [80.0, 70.0, 90.0, 60.0]},
                            {"case": "mr_train_2002", "modality": "mr", "dice": [50.0, float("nan"), None, 20.0]}]}
    assert case_dice(metrics) == {"mr_train_2001": 75.0, "mr_train_2002": 35.0}
    with pytest.raises(ValueError, match=r"m\.json: case ct_train_1001 has modality 'ct'"):
        case_dice({"per_case": [{"case": "ct_train_1001", "modality": "ct", "dice": [1.0]}]}, "m.json")
    with pytest.raises(ValueError, match="case a has no finite Dice"):
        case_dice({"per_case": [{"case": "a", "modality": "mr", "dice": [float("nan")]}]})
    with pytest.raises(ValueError, match="case a appears twice"):
        case_dice({"per_case": [{"case": "a", "modality": "mr", "dice": [1.0]}] * 2})
    with pytest.raises(ValueError, match="no 'per_case' rows"):
        case_dice({"metrics": {}})


def test_pairing_averages_seeds_per_case_and_cases_per_seed():
    per_seed = [{"method": {"b": 60.0, "a": 80.0}, "baseline": {"a": 70.0, "b": 40.0}},
                {"method": {"a": 90.0, "b": 50.0}, "baseline": {"b": 30.0, "a": 50.0}}]
    cases, per_case, per_seed_mean = paired_case_values(per_seed)
    assert cases == ["a", "b"]
    assert per_case == {"method": [85.0, 55.0], "baseline": [60.0, 35.0]}
    assert per_seed_mean == {"method": [70.0, 70.0], "baseline": [55.0, 40.0]}
    per_seed[1]["baseline"] = {"a": 50.0, "c": 1.0}
    with pytest.raises(ValueError, match=r"seed 1, baseline: .*missing \['b'\], extra \['c'\]"):
        paired_case_values(per_seed)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tools.reproduce.__main__ import run_claim

    out = tmp_path_factory.mktemp("reproduce")
    payload = run_claim("lssc_joint", size="smoke", seeds=1, out_dir=out, device="cpu")
    return out, payload


def test_smoke_claim_writes_a_well_formed_report(smoke):
    out, payload = smoke
    data = json.loads((out / "lssc_joint.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    for key in ("claim", "metric", "method", "baseline", "method_values", "baseline_values", "n", "p_value", "holds",
                "test"):
        assert key in data, key
    assert data["claim"] == "lssc_joint" and data["metric"] == "MRI Dice" and isinstance(data["holds"], bool)
    assert data["n"] == CLAIM_SIZES["smoke"].n_test == len(data["cases"]) == 2
    assert data["cases"] == [f"mr_train_{TEST_FIRST_ID}", f"mr_train_{TEST_FIRST_ID + 1}"]
    for values in (data["method_values"], data["baseline_values"]):
        assert len(values) == 2 and all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in values)
    assert data["p_value"] is None or 0.0 <= data["p_value"] <= 1.0
    comp = data["comparisons"][0]
    assert len(comp["per_seed_method"]) == len(comp["per_seed_baseline"]) == 1
    assert (out / "lssc_joint.md").read_text().startswith("# Claim `lssc_joint`")
    assert (out / "lssc_joint.png").stat().st_size > 5_000
    details = data["details"]
    assert details["train_data"]["simulator_seed"] == TRAIN_DATA_SEED != details["test_data"]["simulator_seed"]
    assert len(details["labelled_mr_per_seed"]["0"]) == 1 and len(details["runs"]) == 2

    # the report's values are the evaluations' own per-case scores, method and baseline from their own runs
    runs = {r["arm"]: r for r in details["runs"]}
    for arm, values in (("method", data["method_values"]), ("baseline", data["baseline_values"])):
        metrics = json.loads((out / "lssc_joint" / "runs" / "smoke" / "seed0" / arm / "eval_test" /
                              "metrics.json").read_text())
        rows = {r["case"]: r["dice"] for r in metrics["per_case"]}
        assert values == pytest.approx([float(np.nanmean(rows[c])) for c in data["cases"]])
        assert runs[arm]["mean_dice"] == pytest.approx(float(np.mean(values)))


def test_smoke_arms_are_the_joint_and_the_mri_only_networks(smoke):
    import torch

    out, _ = smoke
    runs = out / "lssc_joint" / "runs" / "smoke" / "seed0"
    weights = {arm: torch.load(runs / arm / "models" / "model.pt", weights_only=True) for arm in ("method", "baseline")}
    # the joint network: class embeddings and image embeddings of two modalities (CT, MRI); the MRI-only Baseline
    # is a plain Swin-Unet without either
    assert weights["method"]["class_embeddings"].shape[0] == 2
    assert {k.split(".")[1] for k in weights["method"] if k.startswith("image_embeddings.")} == {"0", "1"}
    assert not any("embeddings" in k for k in weights["baseline"])
    # the shared-name weights are finite after training
    shared = set(weights["method"]) & set(weights["baseline"])
    assert shared and all(torch.isfinite(weights["method"][k]).all() for k in shared)


def test_held_out_mri_volumes_are_other_simulator_draws(smoke):
    import nibabel as nib

    out, _ = smoke
    data = out / "lssc_joint" / "data" / "smoke"
    test_images = sorted((data / "test").rglob("*_image.nii.gz"))
    train_mr = sorted((data / "train").rglob("mr_train_*_image.nii.gz"))
    assert [p.name for p in test_images] == [f"mr_train_{TEST_FIRST_ID + i}_image.nii.gz" for i in range(2)]
    assert not list((data / "test").rglob("ct_*")) and len(train_mr) == CLAIM_SIZES["smoke"].n_mr
    assert TEST_DATA_SEED != TRAIN_DATA_SEED
    train_arrays = [np.asarray(nib.load(p).dataobj) for p in train_mr]
    for p in test_images:
        a = np.asarray(nib.load(p).dataobj)
        assert all(a.shape != b.shape or not np.array_equal(a, b) for b in train_arrays), p.name
        assert math.isfinite(float(a.mean())) and a.std() > 0
