"""It learns: a short CPU training of VoxelMorph + AdaCS on synthetic pairs with lost-correspondence regions.

Reduced configuration (README "Measured numbers"): 48 synthetic pairs (60/20/20 split), 64x64, the paper's
VoxelMorph and scoring U-Net widths, batch 8, 30 epochs (W = 3: 3 displacement warm-up epochs, 3 scoring warm-up
epochs, 24 alternating), Adam 3e-3, λ = 0.01, α = 0.02, β = 1.5 (the ACDC preset). Held-out pairs must show

* a warped-myocardium Dice clearly above the identity transform (an untrained or broken f stays at identity), and
* a score map Ŝ lower inside the simulated non-correspondence regions than outside (a constant or broken g gives
  equal means).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]

DICE_MARGIN = 0.08  # measured about +0.2 over identity (README)
SCORE_GAP = 0.15  # measured about 0.3 inside vs 0.75 outside the lost regions


def test_adacs_learns_registration_and_scores_lost_regions_low(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    from common.data.synthetic.registration import write_registration_pairs

    data = tmp_path / "pairs48"
    write_registration_pairs(data, n_pairs=48, seed=0, progress=False)
    configs = Path(__file__).resolve().parents[3] / "bundles" / "adacs_registration" / "configs"
    overrides = {"dataset_dir": str(data), "bundle_root": str(tmp_path), "output_dir": str(tmp_path / "eval"),
                 "spatial_size": [64, 64], "batch_size": 8, "epochs": 30, "warmup_epochs": 3, "learning_rate": 3e-3,
                 "val_interval": 10}
    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "no_default_needed"))
    t0 = time.time()
    for files in (["train.json"], ["train.json", "evaluate.json"]):
        wf = ConfigWorkflow(config_file=[str(configs / f) for f in files], meta_file=str(configs / "metadata.json"),
                            logging_file=False, workflow_type="train", **overrides)
        wf.initialize()
        wf.run()
    elapsed = time.time() - t0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    t1, score = report["table1"], report["score_map"]
    print(f"AdaCS learning test: {report['n_pairs']} held-out pairs, DSC {t1['DSC']:.2f} vs identity "
          f"{t1['DSC_identity']:.2f}; HD {t1['HD']:.2f} px, ASD {t1['ASD']:.2f} px, folding "
          f"{t1['nonpositive_jacobian_percent']:.3f} %; score in lost {score['mean_in_lost']:.3f} vs outside "
          f"{score['mean_outside_lost']:.3f}; {elapsed:.0f} s")
    assert report["n_pairs"] >= 8
    assert t1["DSC"] >= t1["DSC_identity"] + 100 * DICE_MARGIN
    assert score["mean_in_lost"] <= score["mean_outside_lost"] - SCORE_GAP
    assert t1["nonpositive_jacobian_percent"] < 1.0  # the diffeomorphic integration keeps the field unfolded
