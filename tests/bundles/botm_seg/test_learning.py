"""It learns: a reduced BOTM trained for ~2 CPU minutes on synthetic CAMUS-layout data reaches a held-out mean
foreground Dice that an untrained network, an all-background prediction and the best image-independent prediction
(the training set's per-pixel majority mask) cannot reach.

Reduced configuration (recorded in the bundle README): 128x128, MiT widths 16/32/64/128 with one block per stage,
decoder width 64, 10 Sinkhorn iterations, AdamW lr 3e-3 (the paper's SGD lr 1e-3 needs hundreds of epochs), batch 8,
20 epochs over 21 training patients x 2 views; 6 held-out test patients (24 frames).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from common.data.camus import load_echo_frame
from common.data.synthetic.echo_layouts import write_camus
from common.engines.paired import echo_datalist
from common.metrics.echo_segmentation import frame_rows

LEARN_NETWORK = {
    "network_def#widths": [16, 32, 64, 128],
    "network_def#depths": [1, 1, 1, 1],
    "network_def#num_heads": [1, 1, 2, 4],
    "network_def#decoder_width": 64,
    "network_def#sinkhorn_iters": 10,
    "network_def#botm_reductions": [2, 1, 1, 1],
}
LEARN = {
    **LEARN_NETWORK,
    "spatial_size": [128, 128],
    "batch_size": 8,
    "num_workers": 0,
    "cache_rate": 1.0,
    "epochs": 20,
    "val_interval": 20,
    "test_fraction": 0.2,
    "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": 0.003,
                  "weight_decay": 0.0001},
}
CLASSES = ["LV", "Myo", "LA"]


def _labels(entries):
    return [np.stack([load_echo_frame(p)[0] for p in e["label"]]).astype(np.int64) for e in entries]


def _mean_dice(preds, labels):
    rows = [r for p, y in zip(preds, labels) for r in frame_rows(p, y, CLASSES, metrics=["dice"])]
    return float(np.mean([r["dice_mean"] for r in rows]))


@pytest.mark.slow
def test_reduced_botm_learns_synthetic_camus(tmp_path, run_bundle):
    data = write_camus(tmp_path / "camus", n_patients=30, seed=11, image_size=(128, 128), n_frames=2, progress=False)
    root = tmp_path / "bundle"
    t0 = time.time()
    run_bundle(["train.json"], root, dataset_dir=str(data), **LEARN)
    train_s = time.time() - t0
    run_bundle(["train.json", "evaluate.json"], root, dataset_dir=str(data), output_dir=str(root / "eval"), **LEARN)
    report = json.loads((root / "eval" / "metrics.json").read_text())["echo"]
    dice = report["paper"]["all_frames"]["mDice"]
    per_class = {c: report["paper"]["per_class"][c]["Dice"] for c in CLASSES}
    print(f"\nlearning test: held-out mean foreground Dice {dice:.3f} {per_class}, "
          f"mHD {report['paper']['all_frames']['mHD']:.2f} mm ({report['paper']['all_frames']['n_missed']} missed "
          f"structures), {report['n_frames']} frames, training {train_s:.0f} s")
    assert report["n_frames"] == 24

    # references a model that did not learn from the images cannot beat
    test = echo_datalist(data, split="test", val_fraction=0.1, test_fraction=0.2)
    train = echo_datalist(data, split="train", val_fraction=0.1, test_fraction=0.2)
    test_labels = _labels(test)
    background = _mean_dice([np.zeros_like(y) for y in test_labels], test_labels)
    votes = np.zeros((4, 128, 128))
    for y in _labels(train):
        for c in range(4):
            votes[c] += (y == c).sum(0)
    prior = votes.argmax(0)  # the training set's per-pixel majority class, the same for every test frame
    prior_dice = _mean_dice([np.broadcast_to(prior, y.shape) for y in test_labels], test_labels)
    untrained_ckpt = tmp_path / "untrained.pt"
    from common.networks.factory import build_segmentation_network

    torch.manual_seed(0)
    net = build_segmentation_network("botm", 4, **{k.split("#")[1]: v for k, v in LEARN_NETWORK.items()})
    torch.save(net.state_dict(), untrained_ckpt)
    run_bundle(["train.json", "evaluate.json"], root, dataset_dir=str(data), output_dir=str(root / "untrained"),
               ckpt_path=str(untrained_ckpt), **LEARN)
    untrained = json.loads((root / "untrained" / "metrics.json").read_text())["echo"]["paper"]["all_frames"]["mDice"]
    print(f"references: all-background {background:.3f}, training-majority mask {prior_dice:.3f}, "
          f"untrained network {untrained:.3f}")

    assert dice >= 0.80
    assert min(per_class.values()) >= 0.65
    assert background == 0.0 and untrained < 0.35 and prior_dice < dice - 0.1
