"""Tests of the BOTM network (common/networks/botm.py) and its SegFormer parts (common/networks/mit.py).

Tiny widths/depths and 64x64-ish inputs keep the whole file well under a minute on CPU.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks import layers as monai_layers

from common.networks.botm import (
    AnatomicalImportance,
    BOTMBlock,
    BOTMSegNet,
    masked_softmax,
    split_pair_logits,
)
from common.networks.mit import MixVisionTransformer, SegFormerMLPDecoder

TINY = dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), decoder_width=16)


def tiny_net(seed: int = 0, **kwargs) -> BOTMSegNet:
    torch.manual_seed(seed)
    args = dict(TINY, num_classes=3, sinkhorn_iters=20)
    args.update(kwargs)
    return BOTMSegNet(**args)


def pair(b: int = 2, h: int = 64, w: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 2, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# shapes and interface
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
def test_output_shapes_pair_and_single(hw):
    net = tiny_net().eval()
    h, w = hw
    with torch.no_grad():
        y = net(pair(2, h, w))
        y1 = net(pair(2, h, w)[:, :1])
    assert y.shape == (2, 6, h, w)
    assert y1.shape == (2, 3, h, w)
    src, tgt = split_pair_logits(y, 3)
    assert src.shape == tgt.shape == (2, 3, h, w)
    assert torch.equal(src, y[:, :3]) and torch.equal(tgt, y[:, 3:])


def test_encoder_stage_shapes_mit_b2_defaults():
    enc = MixVisionTransformer()  # MiT-B2
    assert [len(s.blocks) for s in enc.stages] == [3, 4, 6, 3]
    assert [s.blocks[0].attn.num_heads for s in enc.stages] == [1, 2, 4, 8]
    assert [s.blocks[0].attn.sr_ratio for s in enc.stages] == [8, 4, 2, 1]
    assert [s.patch_embed.proj.kernel_size[0] for s in enc.stages] == [7, 3, 3, 3]
    assert [s.patch_embed.proj.stride[0] for s in enc.stages] == [4, 2, 2, 2]
    assert enc.stages[0].blocks[0].ffn.fc1.out_features == 4 * 64
    # Hand count for widths 64/128/256/512 (the authors' code; SegFormer's own MiT-B2 has 320 in stage 3 and ~24M):
    # blocks 0.31M x 3 + 0.46M x 4 + 1.05M x 6 + 3.16M x 3, patch embeddings 1.55M -> ~20.2M
    n = sum(p.numel() for p in enc.parameters())
    assert 20.0e6 < n < 20.5e6, n
    with torch.no_grad():
        enc_args = {k: v for k, v in TINY.items() if k != "decoder_width"}
        feats = MixVisionTransformer(**enc_args)(torch.zeros(1, 1, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 24, 4, 6), (1, 32, 2, 3)]


def test_stochastic_depth_rates_and_per_sample_drop():
    # MONAI's DropPath in every MiT block, rates rising linearly from 0 to drop_path_rate over all blocks
    enc = MixVisionTransformer(widths=(8, 16), depths=(2, 3), num_heads=(1, 2), patch_sizes=(7, 3), strides=(4, 2),
                               sr_ratios=(2, 1), drop_path_rate=0.4)
    blocks = [b for s in enc.stages for b in s.blocks]
    assert all(isinstance(b.drop_path, monai_layers.DropPath) for b in blocks)
    np.testing.assert_allclose([b.drop_path.drop_prob for b in blocks], np.linspace(0.0, 0.4, 5), atol=1e-7)
    # the formula of the replaced implementation, drawn from the same generator state: per sample the whole branch
    # is kept and scaled by 1 / keep, or dropped; identity in eval mode
    dp = blocks[-1].drop_path.train()
    x = torch.randn(64, 5, 3)
    torch.manual_seed(3)
    out = dp(x)
    torch.manual_seed(3)
    keep = torch.empty(64, 1, 1).bernoulli_(0.6)
    torch.testing.assert_close(out, x * keep / 0.6)
    assert 0 < int(keep.sum()) < 64
    assert torch.equal(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop_path_rate"):
        MixVisionTransformer(drop_path_rate=1.0)


def test_decoder_equals_upsample_then_classify():
    # the decoder classifies on the 1/4 grid and upsamples the logits; the authors upsample the features first
    torch.manual_seed(0)
    dec = SegFormerMLPDecoder((8, 16), decoder_width=12, num_classes=3).double().eval()
    feats = [torch.randn(2, 8, 6, 10, dtype=torch.float64), torch.randn(2, 16, 3, 5, dtype=torch.float64)]
    with torch.no_grad():
        ups = [F.interpolate(p(f), size=(6, 10), mode="bilinear", align_corners=False) for p, f in zip(dec.proj, feats)]
        ups[0] = dec.proj[0](feats[0])
        fused = dec.fuse(torch.cat(ups, dim=1))
        expected = dec.classifier(F.interpolate(fused, size=(24, 40), mode="bilinear", align_corners=False))
        torch.testing.assert_close(dec(feats, (24, 40)), expected, rtol=1e-10, atol=1e-10)


def test_single_frame_is_the_frame_paired_with_itself():
    net = tiny_net().eval()
    x = pair(2, 64, 64)[:, :1]
    with torch.no_grad():
        single = net(x)
        self_pair = net(torch.cat([x, x], dim=1))
    torch.testing.assert_close(single, self_pair[:, :3], rtol=1e-5, atol=1e-5)
    # symmetric design: both halves of a self-pair agree up to the Sinkhorn iteration error
    torch.testing.assert_close(self_pair[:, :3], self_pair[:, 3:], rtol=1e-3, atol=1e-3)


def test_bad_inputs_raise():
    net = tiny_net().eval()
    assert net.size_multiple == 32
    with pytest.raises(ValueError, match="channels"):
        net(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.zeros(1, 2, 64, 80))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="2 \\* num_classes"):
        split_pair_logits(torch.zeros(1, 5, 4, 4), 3)
    with pytest.raises(ValueError, match="contradicts"):
        tiny_net(use_ot=False, pairing="ot")
    with pytest.raises(ValueError, match="contradicts"):
        tiny_net(use_ot=True, pairing="add")
    with pytest.raises(ValueError, match="pairing"):
        tiny_net(use_ot=False, pairing="concat")
    with pytest.raises(ValueError, match="alpha"):
        tiny_net(alpha=1.5)


def test_ablation_switches_build_the_right_modules():
    full = tiny_net()
    assert full.pairing == "ot" and len(full.botm) == 4
    assert all(b.importance is not None for b in full.botm)
    assert all(b.sinkhorn_iters == 20 and b.ot_eps == 0.1 and b.alpha == 0.8 for b in full.botm)
    assert [b.reduction for b in full.botm] == [4, 2, 1, 1]
    no_imp = tiny_net(use_importance=False)
    assert all(b.importance is None for b in no_imp.botm)
    single = tiny_net(use_ot=False)
    assert single.pairing == "single" and single.botm is None
    add = tiny_net(use_ot=False, pairing="add")
    # OT off = the same encoder/decoder, no extra parameters; importance off = only the importance MLPs removed
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    n_imp = sum(n(b.importance) for b in full.botm)
    assert n(single) == n(add) == n(no_imp) == n(full) - n_imp
    assert n_imp > 0


# ---------------------------------------------------------------------------------------------------------------
# determinism, gradients, use of the other frame, symmetry
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"fusion": "transported"}, {"use_ot": False, "pairing": "add"}])
def test_eval_forward_is_deterministic(kwargs):
    net = tiny_net(**kwargs).eval()
    x = pair()
    with torch.no_grad():
        y1, y2 = net(x), net(x)
    assert torch.equal(y1, y2)
    assert torch.isfinite(y1).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_importance": False},
        {"fusion": "transported"},
        {"sinkhorn_grad": "implicit", "sinkhorn_iters": 100},
        {"use_ot": False},
        {"use_ot": False, "pairing": "add"},
    ],
)
def test_gradient_reaches_every_parameter(kwargs):
    net = tiny_net(**kwargs).train()
    x = pair(2, 64, 64)
    labels = torch.randint(0, 3, (2, 2, 64, 64), generator=torch.Generator().manual_seed(3))
    src, tgt = split_pair_logits(net(x), 3)
    loss = F.cross_entropy(src, labels[:, 0]) + F.cross_entropy(tgt, labels[:, 1])
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().max() > 0, f"zero gradient for {name}"
    if net.botm is not None and net.botm[0].importance is not None:
        assert any("importance" in name for name, _ in net.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "uses_other_frame"),
    [
        ({}, True),
        ({"fusion": "transported"}, True),
        ({"use_ot": False, "pairing": "add"}, True),
        ({"use_ot": False}, False),
    ],
)
def test_source_output_depends_on_target_frame_only_when_paired(kwargs, uses_other_frame):
    net = tiny_net(**kwargs).eval()
    x = pair()
    x2 = x.clone()
    x2[:, 1] = torch.randn(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        src1, _ = split_pair_logits(net(x), 3)
        src2, _ = split_pair_logits(net(x2), 3)
    if uses_other_frame:
        assert (src1 - src2).abs().max() > 1e-3 * src1.abs().max()
    else:
        assert torch.equal(src1, src2)


@pytest.mark.parametrize("kwargs", [{}, {"fusion": "transported"}, {"use_importance": False}])
def test_swapping_frames_swaps_outputs(kwargs):
    # Sinkhorn run long enough that the plan of the swapped pair is the transpose to float32 precision
    net = tiny_net(sinkhorn_iters=200, **kwargs).eval()
    x = pair()
    with torch.no_grad():
        y = net(x)
        y_sw = net(x.flip(1))
    src, tgt = split_pair_logits(y, 3)
    src_sw, tgt_sw = split_pair_logits(y_sw, 3)
    scale = y.abs().max()
    torch.testing.assert_close(src_sw, tgt, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(tgt_sw, src, rtol=0, atol=1e-4 * scale)
    # and the two frames really get different predictions (the check above is not vacuous)
    assert (src - tgt).abs().max() > 1e-2 * scale


def test_sinkhorn_iterations_switch_changes_the_output():
    x = pair()
    with torch.no_grad():
        y1 = tiny_net(sinkhorn_iters=1).eval()(x)
        y50 = tiny_net(sinkhorn_iters=50).eval()(x)
    assert (y1 - y50).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the BOTM block against an independent float64 reference
# ---------------------------------------------------------------------------------------------------------------


def test_masked_softmax_all_ones_is_softmax():
    a = torch.randn(3, 7, 11, dtype=torch.float64) * 5
    torch.testing.assert_close(masked_softmax(a, torch.ones_like(a)), torch.softmax(a, -1), rtol=0, atol=1e-6)


def test_masked_softmax_matches_policy_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 5, generator=g, dtype=torch.float64) * 3
    p = torch.rand(2, 5, 5, generator=g, dtype=torch.float64)
    p[:, :, 2] = 0.0  # a dropped key gets (almost) no weight
    expected = torch.exp(a) * p / (torch.exp(a) * p).sum(-1, keepdim=True)
    torch.testing.assert_close(masked_softmax(a, p, eps=0.0), expected, rtol=1e-12, atol=1e-12)
    out = masked_softmax(a, p)  # eps = 1e-6 relative to row sums >= min policy weight of the row maximum
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    assert out[:, :, 2].max() < 1e-4
    # an all-zero policy row is uniform, not NaN
    torch.testing.assert_close(masked_softmax(a, torch.zeros_like(a)), torch.full_like(a, 0.2))


def test_importance_is_a_token_probability_with_global_context():
    torch.manual_seed(0)
    imp = AnatomicalImportance(8).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    z = imp(x)
    assert z.shape == (2, 10) and (z > 0).all() and (z < 1).all()
    perm = torch.randperm(10)
    torch.testing.assert_close(imp(x[:, perm]), z[:, perm])  # per-token, order-free global pooling
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 5, 8, dtype=torch.float64)  # other tokens reach token 0 through the global branch
    assert (imp(x2)[:, 0] - z[:, 0]).abs().max() > 1e-6


def _ref_attend(block: BOTMBlock, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6 with the policy built entry by entry: P[i, j] = z[j], P[i, i] = 1."""
    A = x @ y.T / math.sqrt(x.shape[1])
    P = torch.ones_like(A)
    if block.importance is not None:
        z = block.importance(x[None])[0]
        for i in range(A.shape[0]):
            for j in range(A.shape[1]):
                if i != j:
                    P[i, j] = z[j]
    W = torch.exp(A) * P
    return (W / W.sum(1, keepdim=True)) @ y


def _ref_up(u: torch.Tensor, d: int, h: int, w: int, r: int) -> torch.Tensor:
    grid = u.T.reshape(1, d, h // r, w // r)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0] if r > 1 else grid[0]


def _reference_block(block: BOTMBlock, xs: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Alg. 1 + Sec. 2.3 written out in float64 per batch element (no shared code with the block)."""
    r = block.reduction
    outs_s, outs_t = [], []
    for b in range(xs.shape[0]):
        fs, ft = xs[b], xt[b]  # (D, h, w)
        d, h, w = fs.shape
        ps = fs.reshape(d, h // r, r, w // r, r).mean(dim=(2, 4))
        pt = ft.reshape(d, h // r, r, w // r, r).mean(dim=(2, 4))
        S, Tt = ps.reshape(d, -1).T, pt.reshape(d, -1).T  # (n, D)
        n, m = S.shape[0], Tt.shape[0]
        M = (S / S.norm(dim=1, keepdim=True)) @ (Tt / Tt.norm(dim=1, keepdim=True)).T
        K = torch.exp(-(1.0 - M) / block.ot_eps)
        mu, nu = torch.full((n,), 1.0 / n, dtype=S.dtype), torch.full((m,), 1.0 / m, dtype=S.dtype)
        bv = torch.ones(m, dtype=S.dtype)
        for _ in range(block.sinkhorn_iters):
            av = mu / (K @ bv)
            bv = nu / (K.T @ av)
        plan = av[:, None] * K * bv[None, :]
        rows, cols = plan / plan.sum(1, keepdim=True), (plan / plan.sum(0, keepdim=True)).T
        at_s, at_t = _ref_attend(block, S, rows @ Tt), _ref_attend(block, Tt, cols @ S)
        cross_s, cross_t = (rows @ at_t, cols @ at_s) if block.fusion == "transported" else (at_t, at_s)
        a = block.alpha
        outs_s.append(fs + _ref_up(a * at_s + (1 - a) * cross_s, d, h, w, r))
        outs_t.append(ft + _ref_up(a * at_t + (1 - a) * cross_t, d, h, w, r))
    return torch.stack(outs_s), torch.stack(outs_t)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reduction": 2},
        {"reduction": 1, "use_importance": False},
        {"reduction": 2, "fusion": "transported", "alpha": 0.6},
        {"reduction": 4, "sinkhorn_iters": 3},
    ],
)
def test_botm_block_matches_float64_reference(kwargs):
    torch.manual_seed(0)
    block = BOTMBlock(6, **{"sinkhorn_iters": 30, **kwargs}).double().eval()
    xs = torch.randn(2, 6, 8, 12, dtype=torch.float64)
    xt = torch.randn(2, 6, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        out_s, out_t = block(xs, xt)
        ref_s, ref_t = _reference_block(block, xs, xt)
    # masked_softmax's eps = 1e-6 is the only intended difference
    torch.testing.assert_close(out_s, ref_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_t, ref_t, rtol=0, atol=1e-5)
    assert (out_s - xs).abs().max() > 1e-2  # the block does change the features


def test_botm_block_half_precision_input_is_computed_in_float32():
    torch.manual_seed(0)
    block = BOTMBlock(6, reduction=2, sinkhorn_iters=30).eval()
    xs, xt = torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        ref_s, _ = block(xs, xt)
        out_s, _ = block(xs.bfloat16(), xt.bfloat16())
    assert out_s.dtype == torch.bfloat16 and torch.isfinite(out_s).all()
    torch.testing.assert_close(out_s.float(), ref_s, rtol=0.05, atol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def test_torchscript_trace_of_eval_network():
    # torch.jit.script cannot compile the shared Sinkhorn op (keyword-only API, result object); the bundle exports
    # with tracing (MONAI ckpt_export --use_trace). The op's input checks only emit TracerWarnings (they are
    # evaluated once at trace time); the traced graph has no data-dependent control flow.
    net = tiny_net(sinkhorn_iters=5).eval()  # few iterations: the trace records every one of them
    x = pair(1, 64, 64, seed=4)
    with warnings.catch_warnings():
        # TracerWarnings from the op's checks and torch.jit's deprecation notices
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(net, x, check_trace=False)  # outputs are checked below instead
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    x_new = pair(1, 64, 64, seed=5)
    with torch.no_grad():
        expected = net(x_new)
        torch.testing.assert_close(loaded(x_new), expected, rtol=1e-5, atol=1e-5)
