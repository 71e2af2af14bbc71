"""specknet_tracking resumes training: a run stopped after epoch 1 and resumed with ``--resume_from`` ends exactly
where an uninterrupted run ends (weights, AdamW moments, the per-iteration one-cycle schedule, engine state,
best-model record)."""

from __future__ import annotations

import ast

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path, specknet, specknet_env, run_training):
    # the conftest's CLI strings as Python values; the impartial-motion augmentation stays on (random per epoch)
    tiny = {k: ast.literal_eval(v) for k, v in specknet.TINY.items()}
    cfg = {**tiny, "dataset_dir": specknet_env["SPECKNET_DEFAULT"], "epochs": 3, "val_interval": 1, "augment": True}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_training(specknet.CONFIGS, ["train.json"], bundle_root=str(straight), **cfg)
    run_training(specknet.CONFIGS, ["train.json"], stop_after_epoch=1, bundle_root=str(interrupted), **cfg)
    epoch1 = interrupted / "models" / "train_checkpoint_epoch=1.pt"
    state = torch.load(epoch1, weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == state["trainer"]["iteration"] == state["trainer"]["epoch_length"]
    run_training(specknet.CONFIGS, ["train.json"], bundle_root=str(interrupted), resume_from=str(epoch1), **cfg)

    a = torch.load(straight / "models" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "models" / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 3 * a["trainer"]["epoch_length"]
    torch.testing.assert_close(b["network"], a["network"], rtol=1e-6, atol=1e-7)
    # AdamW's moments and the one-cycle position: a resumed run without them would take other steps
    torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"], rtol=1e-6, atol=1e-7)
    assert b["lr_scheduler"] == a["lr_scheduler"] and a["lr_scheduler"]["last_epoch"] == a["trainer"]["iteration"]
    assert b["validation"] == a["validation"] and a["validation"]["best_metric_epoch"] >= 1
    torch.testing.assert_close(torch.load(interrupted / "models" / "model.pt", weights_only=True),
                               torch.load(straight / "models" / "model.pt", weights_only=True), rtol=1e-6, atol=1e-7)
