"""Claim ``adacs_lost`` of ``tools.reproduce``: lost regions come from the simulator's own record, training seeds
reach the network, and the smoke run's score values equal an independent recomputation from the simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tools.reproduce import adacs_lost

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")]


def _simulated(seed: int, n: int, shape: tuple[int, int], modality: str, clean: bool = False):
    """Pair ``n`` (0-based) of ``write_registration_pairs(seed=seed, ...)``, simulated again in memory."""
    from common.data.synthetic.registration import simulate_registration_pair

    return simulate_registration_pair(np.random.default_rng([seed, n + 1]), modality, shape, clean=clean)


def test_lost_pairs_follow_the_simulator_record(tmp_path):
    from common.data.synthetic.registration import write_registration_pairs

    # MRI pairs with every second one clean: a clean MRI pair has no lost region at all
    write_registration_pairs(tmp_path, n_pairs=4, seed=5, modality="mri", shape=(32, 32), clean_fraction=0.5,
                             progress=False)
    with_lost, without = adacs_lost.lost_pairs(tmp_path)
    expected = {f"pair{n + 1:04d}": _simulated(5, n, (32, 32), "mri", clean=n % 2 == 1).lost for n in range(4)}
    assert with_lost == sorted(p for p, lost in expected.items() if lost.any() and not lost.all())
    assert without == ["pair0002", "pair0004"]
    (tmp_path / "pairs" / "pair0003_lost.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="pair0003_lost.nii.gz"):
        adacs_lost.lost_pairs(tmp_path)


def test_pair_values_never_drop_a_pair(tmp_path):
    path = tmp_path / "per_pair.csv"
    path.write_text("pair,dice,score_in_lost\npair0001,0.8,0.2\npair0002,0.7,\n")
    assert adacs_lost.pair_values(path, "dice", ["pair0002", "pair0001"]) == {"pair0002": 0.7, "pair0001": 0.8}
    with pytest.raises(ValueError, match="score_in_lost of pair pair0002"):
        adacs_lost.pair_values(path, "score_in_lost", ["pair0001", "pair0002"])
    with pytest.raises(ValueError, match="pair pair0003 was not scored"):
        adacs_lost.pair_values(path, "dice", ["pair0003"])


def test_training_seed_sets_the_initial_weights():
    from monai.bundle import ConfigParser

    def initial_weights(seed: int) -> torch.Tensor:
        parser = ConfigParser()
        parser.read_config(str(adacs_lost.CONFIGS / "train.json"))
        parser.update({"initialize": adacs_lost.seeded_initialize(seed), "spatial_size": [32, 32]})
        parser.get_parsed_content("initialize")  # runs the expressions, set_determinism among them
        net = parser.get_parsed_content("network_def", instantiate=True)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    a0, a0_again, a1 = initial_weights(0), initial_weights(0), initial_weights(1)
    assert torch.equal(a0, a0_again) and not torch.equal(a0, a1)


@pytest.mark.slow
def test_smoke_claim_json_and_score_values_from_the_simulator(tmp_path):
    from monai.bundle import ConfigParser

    from tools.reproduce.__main__ import run_claim

    run_claim("adacs_lost", size="smoke", seeds=1, out_dir=tmp_path, command="pytest smoke")
    data = json.loads((tmp_path / "adacs_lost.json").read_text())
    for key, kind in {"claim": str, "metric": str, "method": str, "baseline": str, "method_values": list,
                      "baseline_values": list, "n": int, "holds": bool, "test": str}.items():
        assert isinstance(data[key], kind), key
    assert data["p_value"] is None or 0.0 <= data["p_value"] <= 1.0
    assert (data["claim"], data["method"], data["baseline"]) == ("adacs_lost", "AdaCS", "VoxelMorph (plain)")
    dice, score = data["comparisons"]
    assert data["n"] == 2 and dice["cases"] == score["cases"] == ["pair0001", "pair0002"]
    assert all(0.0 <= v <= 1.0 for v in dice["method_values"] + dice["baseline_values"])
    assert (score["method_label"], score["baseline_label"]) == ("outside lost", "inside lost")
    assert "outside lost vs inside lost" in (tmp_path / "adacs_lost.md").read_text()
    assert (tmp_path / "adacs_lost.png").read_bytes()[:4] == b"\x89PNG"

    # independent reference: the scoring network of the AdaCS run's final checkpoint on each test target, averaged
    # inside / outside the lost map of the simulator run again in memory (not read from any file the claim read)
    cfg = adacs_lost.SIZES["smoke"]
    parser = ConfigParser()
    parser.read_config(str(adacs_lost.CONFIGS / "train.json"))
    parser.update({"method": "adacs", "spatial_size": [cfg.image_size] * 2})
    net = parser.get_parsed_content("scoring_def", instantiate=True).eval()
    ckpt = tmp_path / "adacs_lost" / "runs" / "adacs" / "seed0" / "models" / "checkpoint.pt"
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["auxiliary"])
    for k, name in enumerate(score["cases"]):
        n = int(name[4:]) - 1
        pair = _simulated(adacs_lost.TEST_DATA_SEED, n, (cfg.image_size,) * 2, ("mri", "echo")[n % 2])
        target = (pair.target - pair.target.min()) / (pair.target.max() - pair.target.min())
        with torch.no_grad():
            s = net(torch.as_tensor(target, dtype=torch.float32)[None, None])[0, 0].numpy()
        lost = pair.lost.astype(bool)
        assert score["baseline_values"][k] == pytest.approx(float(s[lost].mean()), abs=1e-4)
        assert score["method_values"][k] == pytest.approx(float(s[~lost].mean()), abs=1e-4)
