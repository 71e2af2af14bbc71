"""botm_seg resumes training: a run stopped after epoch 1 and resumed with ``--resume_from`` ends exactly where an
uninterrupted run ends (weights, SGD momentum, engine state, best-model record)."""

from __future__ import annotations

import pytest
import torch

from .conftest import CONFIGS, TINY

pytestmark = pytest.mark.slow


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path, botm_data, run_training):
    # random flips on (data order and augmentation must follow the epoch), SGD with momentum (optimiser state)
    cfg = {**TINY, "dataset_dir": str(botm_data["camus"]), "epochs": 3, "val_interval": 1, "flip_prob": 0.5}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_training(CONFIGS, ["train.json"], bundle_root=str(straight), **cfg)
    run_training(CONFIGS, ["train.json"], stop_after_epoch=1, bundle_root=str(interrupted), **cfg)
    epoch1 = interrupted / "models" / "train_checkpoint_epoch=1.pt"
    state = torch.load(epoch1, weights_only=True)["trainer"]
    assert state["iteration"] == state["epoch_length"]  # saved at the end of epoch 1
    # resumed in the same bundle_root, as a user does after a crash
    run_training(CONFIGS, ["train.json"], bundle_root=str(interrupted), resume_from=str(epoch1), **cfg)

    a = torch.load(straight / "models" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "models" / "checkpoint.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 3 * a["trainer"]["epoch_length"]
    torch.testing.assert_close(b["network"], a["network"], rtol=1e-6, atol=1e-7)
    # the momentum buffers: a resumed run that restarted SGD without them would end elsewhere
    torch.testing.assert_close(b["optimizer"]["state"], a["optimizer"]["state"], rtol=1e-6, atol=1e-7)
    assert b["validation"] == a["validation"] and a["validation"]["best_metric_epoch"] >= 1
    best_a = torch.load(straight / "models" / "model.pt", weights_only=True)
    best_b = torch.load(interrupted / "models" / "model.pt", weights_only=True)
    torch.testing.assert_close(best_b, best_a, rtol=1e-6, atol=1e-7)


def test_missing_resume_checkpoint_fails_naming_it(tmp_path, botm_data, run_training):
    missing = tmp_path / "models" / "nothing_here.pt"
    with pytest.raises(Exception) as info:
        run_training(CONFIGS, ["train.json"], bundle_root=str(tmp_path), dataset_dir=str(botm_data["camus"]),
                     resume_from=str(missing), **TINY)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any(f"resume checkpoint {missing} not found (--resume_from)" in m for m in chain), chain
