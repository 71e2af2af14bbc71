"""LSSCnnFormer (common.networks.lssc3d), the LSSC 3D configuration: shapes, the LSSC parts present and active in
3D (image embeddings, Eq. 1-3 in every volume-window block, EAMs at decoder scales 1-3), the Eq. 12-15 losses on 3D
outputs (every parameter gets a gradient), the EAM-free inference network, and the 3D sliding-window inferer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.networks.nets.swin_unetr import SwinTransformerBlock, compute_mask

from common.engines.lssc import InferenceWeights, lssc_network
from common.engines.lssc3d import ModalitySlidingWindowInferer, lssc_inferer
from common.losses.lssc import LSSCLoss, downsample_labels, lssc_loss_kwargs
from common.networks.lssc import ExternalAttentionModule, ModalityAwareSwinBlock, ModalityImageEmbedding
from common.networks.lssc3d import LSSCnnFormer, patch_shape

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# patch 4x4x2 -> token grids 8x8x8, 4x4x4, 2x2x2, 1x1x1 for a 32x32x16 input; window 4 keeps shifted windows at stage 1
SMALL = dict(img_size=(32, 32, 16), embed_dim=8, num_heads=(1, 2, 2, 4), window_size=4, drop_path_rate=0.0)
Z = 5


def make_net(seed: int = 0, **kwargs) -> LSSCnnFormer:
    torch.manual_seed(seed)
    return LSSCnnFormer(**{**SMALL, **kwargs})


def volumes(batch: int, seed: int, size=(32, 32, 16)) -> torch.Tensor:
    return torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(seed))


def labels(batch: int, seed: int, size=(32, 32, 16)) -> torch.Tensor:
    return torch.randint(0, Z, (batch, 1, *size), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_net() -> LSSCnnFormer:
    return make_net().eval()


def test_shapes_of_the_3d_network(full_net):
    x = volumes(2, 1)
    with torch.no_grad():
        assert full_net(x, "ct").shape == (2, Z, 32, 32, 16)
        assert full_net(volumes(1, 2, (64, 32, 48)), "mr").shape == (1, Z, 64, 32, 48)  # other valid sizes
        out = full_net.forward_train(x, torch.tensor([0, 1]))
    # scales 1-3 at 1/(4p), 1/(2p), 1/p per axis of the 4x4x2 patch
    grids = [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [tuple(a.shape) for a in out["aux_logits"]] == [(2, Z, *g) for g in grids]
    assert [tuple(a.shape) for a in out["semantic_maps"]] == [(2, Z, n, *g) for n, g in zip((2, 2, 1), grids)]
    assert [tuple(e.shape) for e in out["correlations"]] == [(2, Z, Z)] * 3
    assert [tuple(q.shape) for q in out["image_class_embeddings"]] == [(2, Z, 16), (2, Z, 8)]
    assert tuple(out["class_embeddings"].shape) == (2, Z, 32)  # (M, Z, 4C)
    assert patch_shape(128) == (128, 128, 64) and patch_shape(4) == (4, 4, 2) and patch_shape([8, 8, 8]) == (8, 8, 8)


def test_modality_aware_parts_are_present_and_active_in_3d(full_net):
    net = full_net
    blocks = [m for m in net.modules() if isinstance(m, ModalityAwareSwinBlock)]
    assert len(blocks) == 8 + 6  # every encoder and decoder block (depths [2, 2, 2, 2] + [2, 2, 2])
    assert all(b.class_dim == 32 and b.w1 is not None and len(b.window_size) == 3 for b in blocks)
    assert len(net.image_embeddings) == 2
    assert all(isinstance(e, ModalityImageEmbedding) and isinstance(e.conv1, nn.Conv3d) for e in net.image_embeddings)
    assert len(net.eams) == 2 and all(len(s) == 3 for s in net.eams)  # per modality, decoder scales 1-3
    assert all(isinstance(e, ExternalAttentionModule) and isinstance(e.aux_head, nn.Conv3d)
               for s in net.eams for e in s)
    # strided-conv down/up sampling of nnFormer (not Swin's patch merging/expanding)
    assert all(isinstance(d.conv, nn.Conv3d) and d.conv.stride == (2, 2, 2) for d in net.encoders[0].downs)
    assert all(isinstance(s.up.conv, nn.ConvTranspose3d) for s in net.decoder)

    x = volumes(2, 3)
    with torch.no_grad():
        assert (net(x, "ct") - net(x, "mr")).abs().max() > 1e-3
        # same image embeddings for both modalities: what is left of the difference comes from Q_M through Eq. 1-3
        shared = make_net().eval()
        shared.image_embeddings[1].load_state_dict(shared.image_embeddings[0].state_dict())
        for blk in (m for m in shared.modules() if isinstance(m, ModalityAwareSwinBlock)):
            for lin in (blk.w2, blk.w3):  # Phi starts near 1 (trained nets move it): make the modulation visible
                lin.weight.normal_(std=0.3)
        assert (shared(x, "ct") - shared(x, "mr")).abs().max() > 1e-3
        shared.class_embeddings[1].copy_(shared.class_embeddings[0])
        torch.testing.assert_close(shared(x, "ct"), shared(x, "mr"), atol=0, rtol=0)


def test_3d_block_follows_eq_1_to_3():
    """The channel-wise multiplication in a 3D (volume-window) block, by hand around MONAI's plain 3D Swin block."""
    torch.manual_seed(1)
    dim, heads, zc, cq = 8, 2, 3, 6
    ws, shift = (4, 4, 4), (2, 2, 2)
    blk = ModalityAwareSwinBlock(dim, heads, ws, shift, num_classes=zc, class_dim=cq).eval().double()
    plain = SwinTransformerBlock(dim, heads, ws, shift, qkv_bias=True).eval().double()
    plain.load_state_dict(blk.state_dict(), strict=False)
    with torch.no_grad():
        blk.w1.normal_()
        for lin in (blk.w2, blk.w3):
            lin.weight.normal_()
            lin.bias.normal_()
        x = torch.randn(2, 8, 8, 8, dim, dtype=torch.float64)
        q = torch.randn(2, zc, cq, dtype=torch.float64)
        mask = compute_mask([8, 8, 8], ws, shift, x.device).double()
        omega = torch.einsum("z,bzc->bc", blk.w1, q)
        phi1 = omega @ blk.w2.weight.T + blk.w2.bias
        phi2 = omega @ blk.w3.weight.T + blk.w3.bias
        x1 = x + phi1[:, None, None, None, :] * plain.forward_part1(x, mask)
        want = x1 + phi2[:, None, None, None, :] * plain.forward_part2(x1)
        torch.testing.assert_close(blk(x, mask, q), want)


def test_eq_12_to_15_losses_reach_every_parameter_in_3d():
    net = make_net().train()
    loss_fn = LSSCLoss(**lssc_loss_kwargs("full"))
    size = (64, 64, 32)  # a 2x2x2 bottleneck: a single token would leave its position bias without a gradient
    out_ct, out_mr = net.forward_train(volumes(2, 5, size), "ct"), net.forward_train(volumes(2, 7, size), "mr")
    parts = loss_fn(out_ct, labels(2, 6, size), out_mr, labels(2, 8, size))
    assert all(parts[k].item() > 0 for k in ("seg_m1", "seg_m2", "aux_m1", "aux_m2", "mcr", "icr"))
    parts["loss"].backward()
    bad = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0
           or not torch.isfinite(p.grad).all()]
    assert not bad, bad
    # Laux's labels on each scale's grid: the label at the centre of each token's footprint (nearest-exact)
    y = labels(1, 9)
    down = downsample_labels(y, (8, 8, 8))
    assert down.shape == (1, 1, 8, 8, 8)
    torch.testing.assert_close(down, y[:, :, 2::4, 2::4, 1::2])


def test_exported_eam_free_network_equals_the_training_networks_main_output(full_net):
    x, idx = volumes(3, 9), torch.tensor([1, 0, 1])
    inf = full_net.inference_network().eval()
    state = InferenceWeights(full_net).state_dict()
    assert inf.eams is None and not any(k.startswith("eams.") for k in state) and set(state) == set(inf.state_dict())
    # the bundle's builder for the 3D configuration (spatial_dims=3), loaded strictly with model.pt's content
    fresh = lssc_network("full", ["ct", "mr"], for_inference=True, spatial_dims=3, **SMALL).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = full_net.forward_train(x, idx)["logits"]
        torch.testing.assert_close(inf(x, idx), want, atol=0, rtol=0)
        torch.testing.assert_close(fresh(x, idx), want, atol=0, rtol=0)
        a, b = fresh(x, idx), fresh(x, idx)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # eval-mode determinism


class _PointwiseByModality(nn.Module):
    """A per-voxel network (so stitched windows must equal the whole-volume result) that records its input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []
        self.windows = 0

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[2:]))
        self.windows += x.shape[0]
        scale = {"ct": 1.0, "mr": -2.0}[modality]
        return torch.cat([x * scale, x**2], dim=1)


def test_sliding_window_inference_in_the_input_geometry():
    """Windows of the training patch size, 25 % overlap, stitched back on the volume's own grid and metadata."""
    net = _PointwiseByModality()
    vol = torch.randn(2, 1, 50, 37, 21, generator=torch.Generator().manual_seed(3))
    affine = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0], dtype=torch.float64))
    inputs = MetaTensor(vol, affine=affine)
    inferer = lssc_inferer(3, roi_size=[32, 32, 16], overlap=0.25, batch_size=2)
    assert isinstance(inferer, ModalitySlidingWindowInferer)
    with torch.no_grad():
        out = inferer(inputs, net, modality=["ct", "mr"])
    assert out.shape == (2, 2, 50, 37, 21) and isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, affine)
    assert set(net.sizes) == {(32, 32, 16)}
    torch.testing.assert_close(out[0].as_tensor(), torch.cat([vol[0], vol[0] ** 2]))
    torch.testing.assert_close(out[1].as_tensor(), torch.cat([-2 * vol[1], vol[1] ** 2]))
    # 25 % overlap: windows start every 24 voxels in-plane (ceil((50 - 32) / 24) + 1 = 2 along x) and every 12 in z
    assert net.windows == 2 * (2 * 2 * 2)


def test_clear_errors(full_net):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W, D\) volume patch"):
        full_net(torch.zeros(1, 1, 32, 32), "ct")
    with pytest.raises(ValueError, match=r"multiple of patch_size \* 8 = \(32, 32, 16\)"):
        full_net(torch.zeros(1, 1, 32, 32, 20), "ct")
    with pytest.raises(ValueError, match="img_size"):
        LSSCnnFormer(img_size=(100, 128, 64))
    with pytest.raises(ValueError, match="no pretrained initialisation"):
        LSSCnnFormer(**SMALL, pretrained_path="swin_tiny.pth")
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        lssc_network("full", ["ct", "mr"], spatial_dims=4)
    with pytest.raises(ValueError, match="3D size"):
        patch_shape([128, 64])
