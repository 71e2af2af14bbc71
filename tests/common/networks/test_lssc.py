"""LSSCSwinUnet (common.networks.lssc): shapes, modality handling, Eq. 1-3 and Eq. 4-11 against literal
references, gradient flow, training-only EAMs, variants, tracing/export."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformerBlock, compute_mask

from common.losses.lssc import LSSCLoss, lssc_loss_kwargs
from common.networks.lssc import (
    LSSC_VARIANTS,
    ExternalAttentionModule,
    LSSCSwinUnet,
    ModalityAwareSwinBlock,
    lssc_variant_kwargs,
)

# 64 = patch 4 * 2^3 * 2: token maps 16, 8, 4, 2; window 4 keeps real shifted windows at the two finer stages
SMALL = dict(img_size=64, embed_dim=12, num_heads=(1, 2, 2, 4), window_size=4, drop_path_rate=0.0)
Z = 5


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine OpenMP workers mostly spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_net(seed: int = 0, **kwargs) -> LSSCSwinUnet:
    torch.manual_seed(seed)
    return LSSCSwinUnet(**{**SMALL, **kwargs})


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def labels(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, Z, (batch, 64, 64), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_net() -> LSSCSwinUnet:
    return make_net(**lssc_variant_kwargs("full")).eval()


def test_shapes_for_both_modalities_and_mixed_batches(full_net):
    x = images(3, 1)
    with torch.no_grad():
        for modality in ("ct", "mr", torch.tensor([0, 1, 1]), ["mr", "ct", "mr"]):
            assert full_net(x, modality).shape == (3, Z, 64, 64)
        out = full_net.forward_train(x, torch.tensor([1, 0, 1]))
    assert out["logits"].shape == (3, Z, 64, 64)
    # scales 1..3 sit at H/4P, H/2P, H/P with widths 4C, 2C, C and N = num_heads[2], [1], [0]
    assert [tuple(a.shape) for a in out["aux_logits"]] == [(3, Z, 4, 4), (3, Z, 8, 8), (3, Z, 16, 16)]
    assert [tuple(e.shape) for e in out["correlations"]] == [(3, Z, Z)] * 3
    assert [tuple(a.shape) for a in out["semantic_maps"]] == [(3, Z, 2, 4, 4), (3, Z, 2, 8, 8), (3, Z, 1, 16, 16)]
    assert [tuple(q.shape) for q in out["image_class_embeddings"]] == [(3, Z, 24), (3, Z, 12)]
    assert tuple(out["class_embeddings"].shape) == (2, Z, 48)
    assert out["modality"].tolist() == [1, 0, 1]
    # other sizes obeying the multiple-of-32 rule are accepted (unpaired batches may differ in size)
    with torch.no_grad():
        assert full_net(torch.randn(1, 3, 96, 64), "ct").shape == (1, Z, 96, 64)


@pytest.mark.parametrize("variant", ["full", "joint_v1"])
def test_mixed_batch_equals_per_modality_batches(variant):
    # joint_v1 also routes the encoder per sample
    net = make_net(**lssc_variant_kwargs(variant)).eval()
    x = images(4, 2)
    idx = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        mixed = net.forward_train(x, idx)
        ct = net.forward_train(x[idx == 0], "ct")
        mr = net.forward_train(x[idx == 1], "mr")
    torch.testing.assert_close(mixed["logits"][idx == 0], ct["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed["logits"][idx == 1], mr["logits"], atol=1e-5, rtol=1e-5)
    for key in ("aux_logits", "correlations", "image_class_embeddings"):
        for got, want_ct, want_mr in zip(mixed[key], ct[key], mr[key]):
            torch.testing.assert_close(got[idx == 0], want_ct, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[idx == 1], want_mr, atol=1e-5, rtol=1e-5)
    # the same modality twice in a tensor equals the string form
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.ones(4, dtype=torch.long)), net(x, "mr"), atol=0, rtol=0)


def _share_image_embedding(net: LSSCSwinUnet) -> None:
    """Give the MR branch the CT image embedding, so only the class embeddings tell the modalities apart."""
    net.image_embeddings[1].load_state_dict(net.image_embeddings[0].state_dict())


def test_modality_matters_through_class_embeddings():
    x = images(2, 3)
    net = make_net(**lssc_variant_kwargs("full")).eval()
    _share_image_embedding(net)
    with torch.no_grad():
        diff = (net(x, "ct") - net(x, "mr")).abs().max().item()
    assert diff > 1e-3, f"class embeddings do not change the prediction (max diff {diff})"

    # identical class embeddings -> identical predictions: the difference above comes from Q_M alone
    with torch.no_grad():
        net.class_embeddings[1].copy_(net.class_embeddings[0])
        torch.testing.assert_close(net(x, "ct"), net(x, "mr"), atol=0, rtol=0)

    # plain blocks (Joint V2): the class embeddings do not reach the segmentation path
    plain = make_net(**lssc_variant_kwargs("joint_v2")).eval()
    _share_image_embedding(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, "ct"), plain(x, "mr"), atol=0, rtol=0)
    # ... while the modality-specific image embeddings alone already do
    plain2 = make_net(**lssc_variant_kwargs("joint_v2")).eval()
    with torch.no_grad():
        assert (plain2(x, "ct") - plain2(x, "mr")).abs().max().item() > 1e-3


def test_eval_forward_is_deterministic():
    net = make_net(drop_path_rate=0.3, drop_rate=0.2).eval()  # stochastic layers must be off in eval mode
    x = images(2, 4)
    with torch.no_grad():
        a = net.forward_train(x, "mr")
        b = net.forward_train(x, "mr")
    torch.testing.assert_close(a["logits"], b["logits"], atol=0, rtol=0)
    for ea, eb in zip(a["correlations"], b["correlations"]):
        torch.testing.assert_close(ea, eb, atol=0, rtol=0)
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, "mr"), net(x, "mr")), "train mode should be stochastic with drop rates > 0"


@pytest.mark.parametrize("variant", ["backbone", "baseline", "joint_v1+cr", "joint_v2+cr", "full"])
def test_every_parameter_gets_a_gradient(variant):
    loss_fn = LSSCLoss(**lssc_loss_kwargs(variant))
    single = variant in ("backbone", "baseline")  # trained on one modality each
    net = make_net(modalities=("mr",) if single else ("ct", "mr"), **lssc_variant_kwargs(variant)).train()
    if single:
        out = net.forward_train(images(2, 5), "mr")
        losses = loss_fn(out, labels(2, 6))
    else:
        out_ct = net.forward_train(images(2, 5), "ct")
        out_mr = net.forward_train(images(3, 7), "mr")
        losses = loss_fn(out_ct, labels(2, 6), out_mr, labels(3, 8))
        assert losses["mcr"].item() > 0 and losses["icr"].item() > 0
    losses["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    zero = [n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().max() == 0]
    nonfinite = [n for n, p in net.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not zero and not nonfinite, (missing, zero, nonfinite)
    if variant in ("full", "joint_v1+cr", "joint_v2+cr"):
        assert net.class_embeddings.grad.abs().max() > 0
        assert all(p.grad.abs().max() > 0 for p in net.eams.parameters())


@pytest.mark.parametrize("variant", ["full", "joint_v2", "baseline"])
def test_inference_network_drops_eams_and_predicts_the_same(variant):
    kwargs = {**SMALL, **lssc_variant_kwargs(variant)}
    net = make_net(**lssc_variant_kwargs(variant)).eval()
    x, idx = images(3, 9), torch.tensor([1, 0, 1])
    inf = net.inference_network().eval()
    state = net.export_state_dict()

    assert inf.eams is None and net.eams is not None
    assert not any("eam" in n for n, _ in inf.named_parameters())
    assert not any(k.startswith("eams.") for k in state)
    assert set(state) == set(inf.state_dict())
    # class embeddings stay only where the blocks use them (Eq. 1-3); otherwise they were EAM-only
    assert ("class_embeddings" in state) == (variant == "full")
    n_train = sum(p.numel() for p in net.parameters())
    n_eam = sum(p.numel() for p in net.eams.parameters())
    n_q = 0 if variant == "full" else net.class_embeddings.numel()
    assert sum(p.numel() for p in inf.parameters()) == n_train - n_eam - n_q

    fresh = LSSCSwinUnet(**{**kwargs, "use_eam": False}).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = net(x, idx)
        torch.testing.assert_close(inf(x, idx), want, atol=0, rtol=0)
        torch.testing.assert_close(fresh(x, idx), want, atol=0, rtol=0)
        torch.testing.assert_close(net.forward_train(x, idx)["logits"], want, atol=0, rtol=0)


def test_block_follows_eq_1_to_3():
    torch.manual_seed(1)
    dim, heads, zc, cq = 8, 2, 3, 6
    ws, shift = (4, 4), (2, 2)
    blk = ModalityAwareSwinBlock(dim, heads, ws, shift, num_classes=zc, class_dim=cq).eval()
    plain = SwinTransformerBlock(dim, heads, ws, shift, qkv_bias=True).eval()
    missing, unexpected = plain.load_state_dict(blk.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["w1", "w2.bias", "w2.weight", "w3.bias", "w3.weight"]
    with torch.no_grad():
        blk.w1.normal_()
        for lin in (blk.w2, blk.w3):
            lin.weight.normal_()
            lin.bias.normal_()
    x = torch.randn(2, 8, 8, dim, dtype=torch.float64)
    q = torch.randn(2, zc, cq, dtype=torch.float64)
    blk.double()
    plain.double()
    mask = compute_mask([8, 8], ws, shift, x.device).double()
    with torch.no_grad():
        got = blk(x, mask, q)
        # Eq. 1 by hand: Omega = w1 Q (a row vector times Q), Phi = diag(Omega W + b)
        omega = torch.stack([blk.w1 @ q[b] for b in range(2)])
        phi1 = omega @ blk.w2.weight.T + blk.w2.bias
        phi2 = omega @ blk.w3.weight.T + blk.w3.bias
        # MONAI's plain block supplies MSA(LN(.)) and FFN(LN(.)) (same weights)
        x1 = x + phi1[:, None, None, :] * plain.forward_part1(x, mask)
        want = x1 + phi2[:, None, None, :] * plain.forward_part2(x1)
        torch.testing.assert_close(got, want)
        # without class embeddings, and with Phi = I, the block is MONAI's Swin block
        torch.testing.assert_close(blk(x, mask, None), plain(x, mask))
        for lin in (blk.w2, blk.w3):
            lin.weight.zero_()
            lin.bias.fill_(1.0)
        torch.testing.assert_close(blk(x, mask, q), plain(x, mask))


def test_eam_follows_eq_4_to_11():
    torch.manual_seed(2)
    dim, zc, nh, h, w = 8, 3, 2, 4, 3
    eam = ExternalAttentionModule(dim, zc, nh, out_dim=4).double().eval()
    with torch.no_grad():
        eam.filter_weight.normal_()
    feats = torch.randn(2, h, w, dim, dtype=torch.float64)
    queries = torch.randn(2, zc, dim, dtype=torch.float64)
    with torch.no_grad():
        out = eam(feats, queries)
        d = dim // nh
        fn = eam.norm_f(feats.reshape(2, h * w, dim))
        qp = eam.q_proj(eam.norm_q(queries))
        kp, vp = eam.k_proj(fn), eam.v_proj(fn)
        a_ref = torch.zeros(2, zc, nh, h * w, dtype=torch.float64)
        ca = torch.zeros(2, zc, dim, dtype=torch.float64)
        for b in range(2):
            for n in range(nh):
                qn, kn, vn = (t[b, :, n * d : (n + 1) * d] for t in (qp, kp, vp))
                a_ref[b, :, n] = qn @ kn.T  # Eq. 5 numerator: semantic-aware maps of head n
                ca[b, :, n * d : (n + 1) * d] = torch.softmax(qn @ kn.T / math.sqrt(d), dim=-1) @ vn
        a_ref = a_ref.reshape(2, zc, nh, h, w)
        torch.testing.assert_close(out["semantic_maps"], a_ref)
        # Eq. 6-8 and the width reduction
        q_hat = eam.out_proj(ca) + queries
        q_tilde = eam.mlp(eam.norm_mlp(q_hat)) + q_hat
        torch.testing.assert_close(out["next_queries"], eam.reduce(q_tilde))
        # Eq. 9-11, literally: filter A^j with K^i, softmax over j, gate A, normalised sum
        e_ref = torch.zeros(2, zc, zc, dtype=torch.float64)
        for b in range(2):
            for i in range(zc):
                k_i = queries[b, i] @ eam.filter_weight[i]  # (N,)
                s_i = torch.stack([F.conv2d(a_ref[b, j][None], k_i.view(1, nh, 1, 1))[0, 0] for j in range(zc)])
                sig = torch.softmax(s_i, dim=0)  # (Z, h, w)
                b_i = a_ref[b] * sig[:, None]  # (Z, N, h, w)
                e_ref[b, i] = b_i.sum(dim=(1, 2, 3)) / sig.sum(dim=(1, 2))
        torch.testing.assert_close(out["correlation"], e_ref)
        # auxiliary head: class j's logit from the N maps of class j only
        wt, bias = eam.aux_head.weight.view(zc, nh), eam.aux_head.bias
        aux_ref = torch.einsum("zn,bznhw->bzhw", wt, a_ref) + bias.view(1, zc, 1, 1)
        torch.testing.assert_close(out["aux_logits"], aux_ref)
    last = ExternalAttentionModule(dim, zc, nh, out_dim=None)
    assert last(feats.float(), queries.float())["next_queries"] is None
    assert not hasattr(last, "v_proj") and not hasattr(last, "mlp")


def test_variant_switches():
    assert lssc_variant_kwargs("full") == lssc_variant_kwargs("Joint_V3+CR") == lssc_variant_kwargs("joint_v3_cr")
    # "+ CR" differs from its variant only by the training-only correlation weights
    for v in ("joint_v1", "joint_v2", "joint_v3"):
        with_cr, without = lssc_variant_kwargs(v + "+cr"), LSSC_VARIANTS[v]
        assert with_cr == {**without, "use_correlations": True} and not without["use_correlations"]
    with pytest.raises(ValueError, match="unknown LSSC variant"):
        lssc_variant_kwargs("joint_v4")
    nets = {v: make_net(**lssc_variant_kwargs(v)) for v in ("backbone", "baseline", "joint_v1", "joint_v2", "joint_v3")}
    count = {v: sum(p.numel() for p in n.parameters()) for v, n in nets.items()}
    assert nets["backbone"].eams is None and nets["backbone"].class_embeddings is None
    assert nets["backbone"].image_embeddings is None and nets["baseline"].image_embeddings is None
    assert nets["baseline"].eams is not None and len(nets["baseline"].eams) == 1
    assert len(nets["joint_v1"].encoders) == 2 and len(nets["joint_v2"].encoders) == 1
    assert len(nets["joint_v2"].eams) == 2
    modulated = {
        v: any(isinstance(m, ModalityAwareSwinBlock) and m.w1 is not None for m in n.modules()) for v, n in nets.items()
    }
    assert modulated == {"backbone": False, "baseline": False, "joint_v1": False, "joint_v2": False, "joint_v3": True}
    assert count["joint_v1"] > count["joint_v2"] and count["joint_v3"] > count["joint_v2"]
    assert count["backbone"] < count["baseline"]
    x = images(1, 10)
    with torch.no_grad():
        for v, n in nets.items():
            out = n.eval().forward_train(x, "ct")
            assert out["logits"].shape == (1, Z, 64, 64), v
            assert len(out["correlations"]) == 0, v  # no variant without CR computes E
            assert len(out["aux_logits"]) == (0 if v == "backbone" else 3), v


def test_trace_and_export_of_the_inference_network():
    # fewer blocks keep tracing fast; two blocks at the finest stages keep the shifted-window masks in the graph
    net = make_net(depths=(2, 1, 1, 1), decoder_depths=(1, 1, 2), **lssc_variant_kwargs("full")).eval()
    inf = net.inference_network().eval()
    x, idx = images(2, 11), torch.tensor([0, 1])
    x2, idx2 = images(2, 12), torch.tensor([1, 0])
    with torch.no_grad():
        want2 = net(x2, idx2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(inf, (x, idx), check_trace=False)
        with torch.jit.optimized_execution(False):
            # new image and swapped modalities: the modality is a graph input, not a baked-in constant
            torch.testing.assert_close(traced(x2, idx2), want2, atol=1e-5, rtol=1e-5)
        exported = torch.export.export(inf, (x, idx))
        assert not any("eam" in k for k in exported.state_dict)
        torch.testing.assert_close(exported.module()(x2, idx2), want2, atol=1e-5, rtol=1e-5)


def test_clear_errors(full_net):
    x = images(2, 13)
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        full_net(x, "pet")
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        full_net(torch.randn(2, 1, 64, 64), "ct")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        full_net(torch.randn(1, 3, 60, 64), "ct")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\)"):
        full_net(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="no modality given"):
        full_net(x)
    with pytest.raises(ValueError, match="fourth decoder stage"):
        LSSCSwinUnet(**{**SMALL, "decoder_depths": (2, 2, 2, 2)})
    with pytest.raises(ValueError, match="img_size"):
        LSSCSwinUnet(**{**SMALL, "img_size": 56})
    net = make_net(default_modality="mr").eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x, "mr"), atol=0, rtol=0)
