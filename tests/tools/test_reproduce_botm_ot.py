"""Claim ``botm_ot`` of ``tools.reproduce``: the two arms differ only in the OT blocks, per-frame values are read
without losing frames, the test frames are not training frames, and the smoke run writes a well-formed report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.reproduce import botm_ot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_JSON = Path(botm_ot.CONFIGS) / "train.json"


def _network(arm: str) -> torch.nn.Module:
    """``network_def`` of the bundle's train.json with the overrides the claim passes for ``arm`` (smoke size)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN_JSON))
    # num_classes is given so that parsing needs no dataset; the rest is exactly what the claim overrides
    parser.update({**botm_ot.arm_overrides(botm_ot.SIZES["smoke"], arm, seed=0, device="cpu"), "num_classes": 4})
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def", instantiate=True).eval()


def test_arms_are_the_same_network_with_and_without_ot_pairing():
    method, baseline = _network(botm_ot.METHOD), _network(botm_ot.BASELINE)
    # the baseline is the method's encoder and decoder without the BOTM blocks: its parameters are a subset
    m_params = {k: v.shape for k, v in method.named_parameters()}
    b_params = {k: v.shape for k, v in baseline.named_parameters()}
    assert b_params.items() <= m_params.items() and len(m_params) > len(b_params)
    x = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 1] = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(2))  # another second frame
    with torch.no_grad():
        # output channels 0-3: the first frame's logits; they may depend on the other frame only through OT
        m_change = (method(x)[:, :4] - method(y)[:, :4]).abs().max()
        b_change = (baseline(x)[:, :4] - baseline(y)[:, :4]).abs().max()
    assert m_change > 1e-4
    assert b_change == 0.0


def test_frame_values_keys_every_frame_and_rejects_gaps(tmp_path):
    path = tmp_path / "per_frame.csv"
    path.write_text("case,patient,view,frame,phase,dice_mean,hd_mean\n"
                    "patient0001_2CH,patient0001,2CH,0,ED,0.9,5.0\n"
                    "patient0001_2CH,patient0001,2CH,1,ES,0.8,7.5\n"
                    "patient0001_4CH,patient0001,4CH,0,ED,0.7,inf\n")
    assert botm_ot.frame_values(path, "dice_mean") == {"patient0001_2CH:ED": 0.9, "patient0001_2CH:ES": 0.8,
                                                       "patient0001_4CH:ED": 0.7}
    with pytest.raises(ValueError, match=r"hd_mean of frame patient0001_4CH:ED is 'inf'"):
        botm_ot.frame_values(path, "hd_mean")
    with pytest.raises(ValueError, match="no column 'hd95_mean'"):
        botm_ot.frame_values(path, "hd95_mean")


@pytest.mark.slow
def test_smoke_claim_writes_the_contract_json(tmp_path):
    from tools.reproduce.__main__ import run_claim

    run_claim("botm_ot", size="smoke", seeds=1, out_dir=tmp_path, command="pytest smoke")
    data = json.loads((tmp_path / "botm_ot.json").read_text())
    for key, kind in {"claim": str, "metric": str, "method": str, "baseline": str, "method_values": list,
                      "baseline_values": list, "n": int, "holds": bool, "test": str}.items():
        assert isinstance(data[key], kind), key
    assert data["p_value"] is None or 0.0 <= data["p_value"] <= 1.0
    assert (data["claim"], data["method"], data["baseline"]) == ("botm_ot", "BOTM", "no OT (single frame)")
    # one test patient: 2 views x ED/ES = 4 frames, scored for both arms and both metrics in the same order
    assert data["n"] == 4 and len(data["method_values"]) == len(data["baseline_values"]) == 4
    dice, hd = data["comparisons"]
    assert dice["cases"] == hd["cases"] == data["cases"]
    assert all(0.0 <= v <= 1.0 for v in dice["method_values"] + dice["baseline_values"])
    assert all(v > 0.0 for v in hd["method_values"] + hd["baseline_values"]) and not hd["higher_is_better"]
    assert len(dice["per_seed_method"]) == len(dice["per_seed_baseline"]) == 1
    assert data["details"]["test_data"]["seed"] != data["details"]["train_data"]["seed"]
    assert (tmp_path / "botm_ot.md").read_text().startswith("# Claim `botm_ot`")
    assert (tmp_path / "botm_ot.png").read_bytes()[:4] == b"\x89PNG"

    # the test frames are simulated apart from the training frames: no test image is a training image
    from common.data.camus import load_echo_frame

    data_dir = tmp_path / "botm_ot" / "data"
    train = [load_echo_frame(p)[0] for p in sorted((data_dir / "train").rglob("*_E[DS].nii.gz"))]
    test = [load_echo_frame(p)[0] for p in sorted((data_dir / "test").rglob("*_E[DS].nii.gz"))]
    assert len(train) == 12 and len(test) == 4
    assert not any(np.array_equal(a, b) for a in test for b in train)
