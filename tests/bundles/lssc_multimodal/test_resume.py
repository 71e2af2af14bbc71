"""lssc_multimodal resumes training: a run stopped after epoch 1 and resumed with ``--resume_from`` ends exactly
where an uninterrupted run ends (weights with the training-only EAMs, Adam moments, the polynomial LR schedule,
engine state, best-model record)."""

from __future__ import annotations

import pytest
import torch

from .conftest import CONFIGS, TINY

pytestmark = pytest.mark.slow


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path, lssc_env, run_training):
    # augmentation and drop-path on (the RNG must follow the epoch); PolynomialLR decays every epoch
    cfg = {**TINY, "epochs": 3, "epoch_length": 2, "val_interval": 2, "augment_prob": 0.5, "drop_path_rate": 0.1}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_training(CONFIGS, ["train.json"], bundle_root=str(straight), **cfg)
    run_training(CONFIGS, ["train.json"], stop_after_epoch=1, bundle_root=str(interrupted), **cfg)
    epoch1 = interrupted / "models" / "train_checkpoint_epoch=1.pt"
    assert torch.load(epoch1, weights_only=True)["lr_scheduler"]["last_epoch"] == 1
    run_training(CONFIGS, ["train.json"], bundle_root=str(interrupted), resume_from=str(epoch1), **cfg)

    a = torch.load(straight / "models" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "models" / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 3 * 2
    assert any("eam" in k.lower() for k in a["network"]), "the training checkpoint must hold the training-only EAMs"
    torch.testing.assert_close(b["network"], a["network"], rtol=1e-6, atol=1e-7)
    # Adam's moments and step counts, and the schedule: a resumed run without them would take other steps
    torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"], rtol=1e-6, atol=1e-7)
    assert b["lr_scheduler"] == a["lr_scheduler"] and a["lr_scheduler"]["last_epoch"] == 3
    assert b["validation"] == a["validation"] and a["validation"]["best_metric_epoch"] == 2
    # the inference weights written at the end (model.pt) agree too
    torch.testing.assert_close(torch.load(interrupted / "models" / "model.pt", weights_only=True),
                               torch.load(straight / "models" / "model.pt", weights_only=True), rtol=1e-6, atol=1e-7)
