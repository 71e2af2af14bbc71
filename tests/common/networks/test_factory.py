"""Tests of common/networks/factory.py: BOTM and the MONAI baselines behind BOTM's paired interface."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, SwinUNETR, UNet

from common.networks.botm import BOTMSegNet
from common.networks.factory import SEGMENTATION_NETWORKS, FramewiseSegNet, build_segmentation_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "botm": dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), decoder_width=16,
                 sinkhorn_iters=5),
    "unet": dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
    "attentionunet": dict(channels=(4, 8, 16), strides=(2, 2)),
    "swinunetr": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
}


def build(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_segmentation_network(name, num_classes=4, **{**TINY[name], **kw}).eval()


@pytest.mark.parametrize("name", SEGMENTATION_NETWORKS)
def test_pair_and_single_frame_shapes(name):
    net = build(name)
    x = torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pair = net(x)
        single = net(x[:, :1])
    assert pair.shape == (2, 8, 64, 64)
    assert single.shape == (2, 4, 64, 64)
    assert torch.isfinite(pair).all()
    assert isinstance(net.size_multiple, int) and 64 % net.size_multiple == 0


@pytest.mark.parametrize("name, cls", [("unet", UNet), ("attentionunet", AttentionUnet), ("swinunetr", SwinUNETR)])
def test_baseline_is_the_monai_network_applied_to_each_frame(name, cls):
    net = build(name)
    assert isinstance(net, FramewiseSegNet) and isinstance(net.net, cls)
    x = torch.rand(3, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pair = net(x)
        # the reference: the wrapped single-frame network called on each frame separately
        ref_src, ref_tgt = net.net(x[:, :1]), net.net(x[:, 1:])
    torch.testing.assert_close(pair[:, :4], ref_src, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pair[:, 4:], ref_tgt, rtol=1e-4, atol=1e-5)


def test_botm_is_the_botm_network_and_kwargs_reach_it():
    net = build("botm", use_ot=False, pairing="add")
    assert isinstance(net, BOTMSegNet) and net.pairing == "add" and net.botm is None
    assert net.num_classes == 4


def test_names_are_case_and_separator_insensitive():
    assert isinstance(build_segmentation_network("Attention_UNet", 3, **TINY["attentionunet"]).net, AttentionUnet)
    assert isinstance(build_segmentation_network("attn-unet", 3, **TINY["attentionunet"]).net, AttentionUnet)
    assert isinstance(build_segmentation_network("SwinUNETR", 3, **TINY["swinunetr"]).net, SwinUNETR)


def test_baseline_gradients_reach_every_parameter():
    net = build("unet").train()
    x = torch.rand(2, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    net(x).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown segmentation network 'vnet'"):
        build_segmentation_network("vnet")
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentation_network("unet", num_classes=1)
    net = build("unet")
    with pytest.raises(ValueError, match=r"must have 2 channels .* or 1"):
        net(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 2, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.zeros(2, 32, 32))
