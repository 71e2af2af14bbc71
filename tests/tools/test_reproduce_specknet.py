"""The SpeckNet claims of ``tools.reproduce`` (``specknet_impartial``, ``specknet_gls``): their case bookkeeping, the
training seed they vary, the independent GLS reference, and each claim end to end at smoke size (strict JSON with the
contract's fields). The simulator's reference GLS itself is tested in ``tests/common/data/test_echo_sim.py``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tools.reproduce.__main__ import run_claim
from tools.reproduce.specknet_gls import gls_errors, perfect_tracks_errors
from tools.reproduce.specknet_impartial import video_values
from tools.reproduce.specknet_runs import CONFIGS, seed_overrides

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

FIELDS = {"claim": str, "metric": str, "method": str, "baseline": str, "method_values": list,
          "baseline_values": list, "n": int, "holds": bool, "test": str}


def test_video_values_average_the_ood_views_of_each_video_and_refuse_a_missing_one():
    rows = [{"dataset": "rot90", "id": "rot90/video0001", "delta_avg": 80.0},
            {"dataset": "vflip", "id": "vflip/video0001", "delta_avg": 60.0},
            {"dataset": "upright", "id": "upright/video0001", "delta_avg": 99.0},  # context only, never scored
            {"dataset": "rot90", "id": "rot90/video0002", "delta_avg": 50.0},
            {"dataset": "vflip", "id": "vflip/video0002", "delta_avg": 40.0}]
    assert video_values(rows, "delta_avg") == {"video0001": 70.0, "video0002": 45.0}
    with pytest.raises(ValueError, match="video0002.*vflip"):
        video_values(rows[:4], "delta_avg")
    with pytest.raises(ValueError, match="video0001"):
        video_values([{**rows[0], "delta_avg": math.nan}, rows[1]], "delta_avg")


def test_gls_errors_are_absolute_and_never_drop_a_video():
    rows = [{"dataset": "test", "id": "video0001", "gls": -15.0, "gls_reference": -17.5},
            {"dataset": "test", "id": "video0002", "gls": -20.0, "gls_reference": -18.0}]
    assert gls_errors(rows) == {"video0001": pytest.approx(2.5), "video0002": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="video0003"):
        gls_errors([*rows, {"dataset": "test", "id": "video0003", "gls": math.nan, "gls_reference": -18.0}])


def test_seed_overrides_address_the_configs_seeding_calls():
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / "train.json")]))
    ov = seed_overrides(7)
    (init_key,) = [k for k in ov if k.startswith("initialize#")]
    assert "set_determinism(seed=0)" in parser[init_key] and ov[init_key].endswith("set_determinism(seed=7)")
    assert parser["train#seeding#seed"] == 0 and ov["train#seeding#seed"] == 7


def test_perfect_tracks_do_not_reproduce_the_reference_gls(tmp_path):
    """The reference is not the polyline GLS of the true tracks (that would make the metric its own reference):
    perfect tracks miss it by the polyline's discretisation, more with fewer points."""
    from common.data.synthetic.echo_layouts import write_tracking_h5

    floors = []
    for n in (6, 24):
        folder = write_tracking_h5(tmp_path / f"n{n}", n_videos=2, seed=3, image_size=(48, 48), n_frames=8,
                                   n_points=n, progress=False)
        floors.append(np.mean(list(perfect_tracks_errors(folder).values())))
    assert 0.0 < floors[1] < floors[0] < 5.0, floors


def _check_payload(payload: dict, out_dir, claim: str) -> dict:
    saved = json.loads((out_dir / f"{claim}.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    for key, typ in FIELDS.items():
        assert isinstance(saved[key], typ), (key, saved[key])
    assert "p_value" in saved and (saved["p_value"] is None or 0.0 <= saved["p_value"] <= 1.0)
    assert saved["claim"] == claim and saved["n"] == len(saved["method_values"]) == len(saved["baseline_values"])
    assert all(isinstance(v, float) and math.isfinite(v) for v in saved["method_values"] + saved["baseline_values"])
    assert (out_dir / f"{claim}.md").is_file() and (out_dir / f"{claim}.png").is_file()
    assert saved["size"] == "smoke" and "smoke_note" in saved["details"]
    return saved


def test_specknet_impartial_smoke(tmp_path):
    from tools.reproduce.specknet_impartial import SIZES

    payload = run_claim("specknet_impartial", "smoke", seeds=1, out_dir=tmp_path, device="cpu")
    saved = _check_payload(payload, tmp_path, "specknet_impartial")
    assert saved["n"] == SIZES["smoke"].test_videos and saved["cases"] == ["video0001", "video0002"]
    assert [c["metric"] for c in saved["comparisons"]] == ["δ_avg (rotated/flipped views)",
                                                           "MTE (rotated/flipped views)"]
    assert [c["higher_is_better"] for c in saved["comparisons"]] == [True, False]
    runs = saved["details"]["runs"]
    assert set(runs) == {"impartial motion", "baseline training"} and all(len(r) == 1 for r in runs.values())
    # both arms scored every view; upright is reported for context, not scored
    views = saved["details"]["per_view_mean_over_seeds"]["impartial motion"]["delta_avg"]
    assert set(views) == {"upright", "rot90", "vflip"}


def test_specknet_gls_smoke(tmp_path):
    payload = run_claim("specknet_gls", "smoke", seeds=1, out_dir=tmp_path, device="cpu")
    saved = _check_payload(payload, tmp_path, "specknet_gls")
    assert saved["metric"] == "|GLS error|" and not saved["comparisons"][0]["higher_is_better"]
    assert all(v >= 0 for v in saved["method_values"] + saved["baseline_values"])
    (crit,) = saved["criteria"]
    assert crit["threshold"] == 1.5 and crit["comparison"] == "<="
    assert crit["value"] == pytest.approx(np.mean(saved["method_values"]))
    # the NCC baseline's per-video errors reproduce its own reported MAD (same cases, same order of magnitude)
    assert np.mean(saved["baseline_values"]) == pytest.approx(saved["details"]["ncc"]["gls_mad"])
    assert saved["details"]["perfect_tracks_mad"] > 0
