"""Export checks beyond the model zoo's (tests/tools/test_verify_bundle.py runs the zoo's steps on every bundle, the
traced ``ckpt_export`` of BOTM included): ``metadata.json`` is true for the default (CAMUS) configuration and the
README's override makes it true for TED."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import TINY_NETWORK

CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "botm_seg" / "configs"
SHAPE_64 = {"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]}
TED_CHANNELS = {"_meta_#network_data_format#outputs#pred#num_channels": 6}  # the README's override for TED


def test_verify_net_in_out_with_the_metadata_tensors():
    from monai.bundle import verify_net_in_out

    common = {"net_id": "network_def", "meta_file": str(CONFIGS / "metadata.json"),
              "config_file": str(CONFIGS / "inference.json"), "device": "cpu", **TINY_NETWORK, **SHAPE_64}
    # checks (1, 2, 64, 64) -> 8 output channels against metadata.json (the tiny network at a test size)
    verify_net_in_out(**common)
    with pytest.raises(ValueError, match="output channel number `6`"):
        # a TED network (3 classes) does not match the CAMUS metadata: the check can fail
        verify_net_in_out(layout="ted", **common)
    verify_net_in_out(layout="ted", **common, **TED_CHANNELS)  # 2 frames x (background, LV, Myo)
