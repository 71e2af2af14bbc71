"""BOTM token reduction options (issue 17, point 9) and the fused cross-transport attention (point 11).

* ``token_reduction="keys"``: full-resolution queries, keys/values on the pooled grid, rectangular (M x N) plans;
  checked against a float64 reference written out entry by entry (no code shared with the block).
* The fused attention (no explicit policy matrix, in-place without autograd) equals the earlier formulation
  ``masked_softmax(A, diag(1 - z) + 1 z^T) @ y`` up to float32 rounding, in eval and with gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.networks.botm import BOTMBlock, BOTMSegNet, masked_softmax

TINY = {"widths": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "decoder_width": 16,
        "sinkhorn_iters": 5}


def _keys_reference(block: BOTMBlock, xs: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_reduction="keys"`` written out in float64 per batch element: for frame k, Sinkhorn (Alg. 1) between
    its pooled tokens (rows) and the other frame's full-resolution tokens (columns); keys = values = the other
    frame's tokens carried onto the pooled grid by the barycentric projection; every full-resolution token of frame
    k queries them, policy 1 on the pooled cell holding the query, z_j elsewhere (Eq. 6); positional fusion."""
    r, eps_ot, n_it = block.reduction, block.ot_eps, block.sinkhorn_iters
    outs = {"s": [], "t": []}
    for b in range(xs.shape[0]):
        full = {"s": xs[b], "t": xt[b]}  # (D, h, w)
        d, h, w = xs.shape[1:]
        att = {}
        for k, o in (("s", "t"), ("t", "s")):
            q = full[k].reshape(d, -1).T  # (N, D)
            pooled = full[k].reshape(d, h // r, r, w // r, r).mean(dim=(2, 4)).reshape(d, -1).T  # (M, D)
            other = full[o].reshape(d, -1).T  # (N, D)
            n_rows, n_cols = pooled.shape[0], other.shape[0]
            cos = (pooled / pooled.norm(dim=1, keepdim=True)) @ (other / other.norm(dim=1, keepdim=True)).T
            K = torch.exp(-(1.0 - cos) / eps_ot)  # (M, N): rectangular
            mu = torch.full((n_rows,), 1.0 / n_rows, dtype=q.dtype)
            nu = torch.full((n_cols,), 1.0 / n_cols, dtype=q.dtype)
            v = torch.ones(n_cols, dtype=q.dtype)
            for _ in range(n_it):
                u = mu / (K @ v)
                v = nu / (K.T @ u)
            plan = u[:, None] * K * v[None, :]
            keys = (plan / plan.sum(1, keepdim=True)) @ other  # (M, D)
            z = block.importance(pooled[None])[0]
            A = q @ keys.T / math.sqrt(d)  # (N, M)
            P = z[None, :].repeat(A.shape[0], 1)
            for i in range(A.shape[0]):
                P[i, (i // w // r) * (w // r) + (i % w) // r] = 1.0
            W = torch.exp(A - A.amax(1, keepdim=True)) * P
            att[k] = (W / W.sum(1, keepdim=True)) @ keys  # (N, D)
        a = block.alpha
        for k, o in (("s", "t"), ("t", "s")):
            outs[k].append(full[k] + (a * att[k] + (1 - a) * att[o]).T.reshape(d, h, w))
    return torch.stack(outs["s"]), torch.stack(outs["t"])


def test_keys_reduction_matches_float64_reference():
    torch.manual_seed(0)
    block = BOTMBlock(6, reduction=2, sinkhorn_iters=20, token_reduction="keys").double().eval()
    xs, xt = torch.randn(2, 6, 8, 12, dtype=torch.float64), torch.randn(2, 6, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        out_s, out_t = block(xs, xt)
        ref_s, ref_t = _keys_reference(block, xs, xt)
        both_s, _ = BOTMBlock(6, reduction=2, sinkhorn_iters=20).double().eval()(xs, xt)
    # masked_softmax's eps = 1e-6 is the only intended difference
    torch.testing.assert_close(out_s, ref_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_t, ref_t, rtol=0, atol=1e-5)
    assert (out_s - both_s).abs().max() > 1e-2  # a different computation from pooling both frames


def test_keys_reduction_shapes_and_difference_in_the_network():
    x = torch.rand(2, 2, 64, 96, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    both = BOTMSegNet(num_classes=3, botm_reductions=(4, 2, 1, 1), **TINY).eval()
    torch.manual_seed(0)
    keys = BOTMSegNet(num_classes=3, botm_reductions=(4, 2, 1, 1), token_reduction="keys", **TINY).eval()
    keys.load_state_dict(both.state_dict())  # same parameters: the option adds none
    with torch.no_grad():
        y_both, y_keys = both(x), keys(x)
        single = keys(x[:, :1])
    assert y_keys.shape == (2, 6, 64, 96) and single.shape == (2, 3, 64, 96)
    assert torch.isfinite(y_keys).all()
    assert (y_keys - y_both).abs().max() > 1e-3
    # without reduction the two options are the same computation
    torch.manual_seed(0)
    r1_both = BOTMSegNet(num_classes=3, botm_reductions=(1, 1, 1, 1), **TINY).eval()
    r1_keys = BOTMSegNet(num_classes=3, botm_reductions=(1, 1, 1, 1), token_reduction="keys", **TINY).eval()
    r1_keys.load_state_dict(r1_both.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(r1_keys(x), r1_both(x), rtol=0, atol=0)


def test_keys_reduction_trains_and_rejects_unknown_mode():
    torch.manual_seed(0)
    block = BOTMBlock(8, reduction=2, sinkhorn_iters=5, token_reduction="keys", fusion="transported")
    xs = torch.randn(2, 8, 8, 8, requires_grad=True)
    xt = torch.randn(2, 8, 8, 8)
    out_s, out_t = block(xs, xt)
    assert out_s.shape == out_t.shape == (2, 8, 8, 8)
    (out_s.square().mean() + out_t.square().mean()).backward()
    assert xs.grad is not None and xs.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.importance.parameters() if p.ndim > 1)
    with pytest.raises(ValueError, match="token_reduction"):
        BOTMBlock(8, reduction=2, token_reduction="queries")


class _OldAttentionBlock(BOTMBlock):
    """The block with the earlier attention: explicit (n, n) policy and :func:`masked_softmax`."""

    def _attend(self, x, y, z_from, own=None):
        attn = torch.bmm(x, y.transpose(1, 2)) / math.sqrt(self.dim)
        z = self.importance(x)
        policy = torch.diag_embed(1.0 - z) + z.unsqueeze(1)
        return torch.bmm(masked_softmax(attn, policy), y)


@pytest.mark.parametrize("kwargs", [{"reduction": 1}, {"reduction": 2, "fusion": "transported"}])
def test_fused_attention_equals_the_earlier_formulation(kwargs):
    torch.manual_seed(0)
    new = BOTMBlock(32, sinkhorn_iters=30, **kwargs)
    old = _OldAttentionBlock(32, sinkhorn_iters=30, **kwargs)
    old.load_state_dict(new.state_dict())
    # float32 at a realistic size (24x24 = 576 tokens per frame), features of a trained-like scale
    xs, xt = 3 * torch.randn(2, 32, 24, 24), 3 * torch.randn(2, 32, 24, 24)
    with torch.no_grad():  # the in-place path
        for a, b in zip(new.eval()(xs, xt), old.eval()(xs, xt)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # with autograd (the out-of-place path): same values and same gradients
    xs_new, xs_old = xs.clone().requires_grad_(), xs.clone().requires_grad_()
    loss_new = sum(o.square().mean() for o in new.train()(xs_new, xt))
    loss_old = sum(o.square().mean() for o in old.train()(xs_old, xt))
    torch.testing.assert_close(loss_new, loss_old, rtol=1e-5, atol=1e-6)
    loss_new.backward()
    loss_old.backward()
    torch.testing.assert_close(xs_new.grad, xs_old.grad, rtol=1e-4, atol=1e-7)
    for (name, p_new), p_old in zip(new.named_parameters(), old.parameters()):
        torch.testing.assert_close(p_new.grad, p_old.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert F.mse_loss(new.eval()(xs, xt)[0], xs) > 1e-4  # the attention does change the features
