"""Distributed training of the specknet_tracking bundle: torchrun with 2 processes on CPU (gloo) for a few
iterations, train.json + multi_gpu_train.json as a user would run them on GPUs (nccl + cuda chosen there)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_torchrun_two_processes_train_and_validate(specknet, specknet_env, tmp_path):
    root = tmp_path / "ddp_bundle"
    root.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", specknet.config_list("train.json", "multi_gpu_train.json"),
           "--meta_file", str(specknet.CONFIGS / "metadata.json"), "--logging_file",
           str(specknet.CONFIGS / "logging.conf"), "--bundle_root", str(root), "--output_dir", str(root / "eval"),
           *specknet.cli_args({**specknet.TINY_TRAIN, "epochs": "2", "val_interval": "2"})]
    proc = subprocess.run(cmd, cwd=root, env=specknet_env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # 2 training videos x 2 clips = 4 clips: one batch of 2 per rank and epoch, 2 epochs
    assert re.search(r"Epoch\[2\] Complete", log)
    # the one validation video is evaluated on both ranks (evenly divisible sampler) and counted once
    assert re.search(r"n_videos: 1\.0000", log), log[-4000:]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved from the DDP module: loads into the plain net
    from common.networks.specknet import SpeckNetBundleAdapter

    SpeckNetBundleAdapter().load_state_dict(state)
