"""torchrun --standalone --nproc_per_node=2 on CPU (gloo): train.json + multi_gpu_train.json for a few iterations,
then train.json + evaluate.json + multi_gpu_evaluate.json, which must report what a single process reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from .conftest import TINY

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "botm_seg" / "configs"


def torchrun_command(configs, *args) -> list[str]:
    """``torchrun --standalone --nproc_per_node=2 -m monai.bundle run`` of this bundle's configs (names or paths)."""
    cfg = "[" + ",".join(f"'{c if os.path.isabs(str(c)) else CONFIGS / c}'" for c in configs) + "]"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
            "run", "--config_file", cfg, *map(str, args)]


def torchrun(configs, *args):
    cmd = torchrun_command(configs, *args)
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
        log = proc.stdout + proc.stderr
        # Once in CI (0 of 21 runs since) a gloo rank aborted natively mid-training on the loaded 2-core machine:
        # "terminate called without an active exception", exit -6. Only that exact signature is retried, once; any
        # other failure, or the same one twice, fails the test.
        if proc.returncode == 0 or attempt == 2 or "terminate called without an active exception" not in log:
            break
        warnings.warn(f"torchrun: a rank aborted natively (gloo); retrying once. Log tail:\n{log[-1500:]}",
                      stacklevel=2)
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_gloo(tmp_path, botm_data, tiny_json, run_bundle):
    root = tmp_path / "bundle"
    data = botm_data["camus"]
    log = torchrun(["train.json", "multi_gpu_train.json", tiny_json], "--bundle_root", root, "--dataset_dir", data,
                   "--epochs", 2, "--batch_size", 2)
    # 3 training patients x 2 views = 6 pairs, split over 2 ranks in batches of 2: 2 iterations per epoch and rank
    assert "Epoch: 2/2, Iter: 2/2" in log
    assert "Got new best metric of val_mean_dice" in log
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    # saved from rank 0 without the DistributedDataParallel wrapper, so single-process evaluation loads it
    assert "decoder.classifier.weight" in state and not any(k.startswith("module.") for k in state)

    torchrun(["train.json", "evaluate.json", "multi_gpu_evaluate.json", tiny_json], "--bundle_root", root,
             "--dataset_dir", data, "--output_dir", root / "ddp_eval")
    run_bundle(["train.json", "evaluate.json"], root, dataset_dir=str(data), output_dir=str(root / "eval"), **TINY)
    ddp, single = (json.loads((root / d / "metrics.json").read_text()) for d in ("ddp_eval", "eval"))
    # the test cases are split over the ranks and gathered: every frame scored once, the same numbers
    assert ddp["echo"]["n_frames"] == single["echo"]["n_frames"] == 2 * single["echo"]["n_cases"]
    assert ddp["metrics"]["val_mean_dice"] == pytest.approx(single["metrics"]["val_mean_dice"], abs=1e-6)
    assert ddp["echo"]["paper"]["all_frames"]["mHD"] == pytest.approx(single["echo"]["paper"]["all_frames"]["mHD"])
