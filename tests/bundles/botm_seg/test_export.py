"""Export checks: ``monai.bundle verify_net_in_out`` and ``ckpt_export`` (TorchScript through tracing; BOTM's
Sinkhorn op does not compile with torch.jit.script, see common/networks/botm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import TINY_NETWORK

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "botm_seg" / "configs"
SHAPE_64 = {"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]}


def test_verify_net_in_out_with_the_metadata_tensors():
    from monai.bundle import verify_net_in_out

    # checks (1, 2, 64, 64) -> 8 output channels against metadata.json (the tiny network at a test size)
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"), device="cpu", **TINY_NETWORK, **SHAPE_64)
    with pytest.raises(ValueError, match="output channel number"):
        # a TED network (3 classes) does not match the CAMUS metadata: the check can fail
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                          config_file=str(CONFIGS / "inference.json"), device="cpu", layout="ted", **TINY_NETWORK,
                          **SHAPE_64)


@pytest.mark.slow
def test_ckpt_export_torchscript_by_trace_matches_the_eager_network(trained, tmp_path, tiny_json):
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(trained / "models" / "model.pt"), "--meta_file", str(CONFIGS / "metadata.json"),
           "--config_file", f"['{CONFIGS / 'inference.json'}','{tiny_json}']", "--use_trace", "True",
           "--input_shape", "[1, 2, 64, 64]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    exported = torch.jit.load(str(ts), map_location="cpu")

    from common.networks.factory import build_segmentation_network

    kwargs = {k.split("#")[1]: v for k, v in TINY_NETWORK.items()}
    eager = build_segmentation_network("botm", num_classes=4, **kwargs)
    eager.load_state_dict(torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True))
    eager.eval()
    x = torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), eager(x), rtol=1e-4, atol=1e-4)
