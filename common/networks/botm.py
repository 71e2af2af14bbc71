"""BOTM: echocardiography segmentation by bi-directional optimal token matching (Liu et al., BMVC 2025).

Spec: ``METHODS.md`` §1 and the paper (Sec. 2.2-2.3, Eq. 4-6, Alg. 1). A pair of frames (source, target) goes
through one shared MiT-B2-style encoder (:mod:`common.networks.mit`). After every encoder stage a BOTM block
matches the two frames' tokens by entropic optimal transport (the shared :func:`common.ops.sinkhorn.sinkhorn`),
applies the bi-directional cross-transport attention gated by a learned anatomical-importance policy, and fuses
the result into each frame's features; one shared SegFormer all-MLP decoder segments both frames.

Interface (MONAI bundles): ``BOTMSegNet(...)(image)`` with

* ``image`` ``(B, 2 * in_channels, H, W)``: source frame in channels ``[0, in_channels)``, target frame in
  ``[in_channels, 2 * in_channels)`` (``in_channels = 1`` for echocardiography: ``(B, 2, H, W)``) -> logits
  ``(B, 2 * num_classes, H, W)``: channels ``[0, C)`` segment the source frame, ``[C, 2C)`` the target frame
  (``C = num_classes``; split them with :func:`split_pair_logits`);
* ``image`` ``(B, in_channels, H, W)`` (single frame): the frame is paired with itself -> logits
  ``(B, num_classes, H, W)``, the source half of that pair (the encoder runs once, and the two halves of a
  self-pair agree up to the Sinkhorn iteration error since the design is symmetric).

``H`` and ``W`` must be multiples of :attr:`BOTMSegNet.size_multiple` (32 with the defaults: the encoder's total
stride, and every stage grid must be divisible by its token reduction). Logits are at the input resolution.

Per stage ``l`` with features ``X_s, X_t`` ``(B, D, h, w)`` (``D`` the stage width):

1. Token reduction: ``x_k = AvgPool_r(X_k)`` flattened to ``(B, n, D)``, ``n = (h / r)(w / r)``.
2. Sinkhorn (Alg. 1): ``T = sinkhorn(xs=x_s, xt=x_t, eps=ot_eps, n_iters=sinkhorn_iters)`` with the cost
   ``C = 1 - cos(x_s,i, x_t,j)`` and uniform marginals.
3. Transported (barycentric) embeddings: ``y_s = diag(T 1)^-1 T x_t`` and ``y_t = diag(T^T 1)^-1 T^T x_s``; row
   ``i`` of ``y_k`` is the other frame's embedding matched to token ``i`` of frame ``k``.
4. Cross-transport attention (Sec. 2.3): ``A_k = x_k y_k^T / sqrt(D)`` ``(B, n, n)``.
5. Importance (Eq. 5): ``z_k = Importance(x_k)`` ``(B, n)`` in ``(0, 1)``; policy ``P_k[i, j] = 1`` if ``i = j``
   else ``z_k[j]``.
6. Masked softmax (Eq. 6): ``W_k = MaskedSoftmax(A_k, P_k)``; ``X~_k = W_k y_k`` ``(B, n, D)``.
7. Fusion toward the decoder: ``X_s_in = X_s + alpha Up(X~_s) + (1 - alpha) Up(X~_t)`` and
   ``X_t_in = X_t + alpha Up(X~_t) + (1 - alpha) Up(X~_s)``, ``Up`` = bilinear upsampling back to ``h x w``.

The decoder sees ``X_k_in`` of all stages; the next encoder stage sees the un-fused ``X_k``.

Export: ``torch.jit.trace`` of the eval network works (fixed Sinkhorn iteration count, no data-dependent control
flow in the network; the Sinkhorn op's input checks only raise TracerWarnings) -- use MONAI ``ckpt_export`` with
``--use_trace True --input_shape [1, 2, H, W]``. ``torch.jit.script`` does not compile the shared Sinkhorn op, and
``torch.export`` stops at the op's data-dependent marginal-mass check.

Choices the paper does not state
--------------------------------
1. Encoder: SegFormer MiT-B2 layout as in the authors' code (widths 64/128/256/512 -- SegFormer's own MiT-B2 has
   320 in stage 3 and 5 heads there --, depths 3/4/6/3, heads 1/2/4/8, patch kernels 7/3/3/3, strides 4/2/2/2,
   attention reductions 8/4/2/1, Mix-FFN x4; 20.3M encoder parameters), 1 input channel, trained from scratch with
   SegFormer's initialisation, no stochastic depth by default (``drop_path_rate=0``, as the authors' code).
2. The BOTM block is a side branch, as in the authors' code: its fused output goes only to the decoder; the
   encoder's next stage takes the stage's un-fused features (the paper calls the block a "proxy module" and feeds
   the transported embeddings to the decoder, but does not say whether they also re-enter the encoder).
3. Token reduction before matching: average pooling with kernel = stride = ``botm_reductions[l]`` (default
   4/2/1/1, i.e. 42x42, 42x42, 42x42 and 21x21 tokens at 672x672) on both frames, and bilinear upsampling
   (``align_corners=False``) of the attention output back to the stage grid. (The authors' code shrinks only the
   keys/values with a learned strided convolution + LayerNorm; pooling both frames keeps the plan square, small and
   parameter-free.) ``token_reduction="keys"`` keeps the queries at full resolution instead (choice 13).
4. Sinkhorn: the shared op with cost ``1 - cos``, uniform marginals, ``eps = 0.1``, row update first (Alg. 1), a
   fixed number of iterations (``sinkhorn_iters``, default 50; the paper's ``t`` is not given) and no early stop,
   so the forward pass has no data-dependent control flow and is deterministic; gradients by unrolling the
   iterations (``sinkhorn_grad="unrolled"``; ``"implicit"`` is offered). The whole block is computed in float32
   (float64 inputs stay float64) with autocast disabled: ``exp(-C / eps)`` and the softmax are not safe in half
   precision.
5. Transported embeddings are the exact barycentric projections ``diag(T 1)^-1 T x_t`` (and the transposed form):
   they equal ``n T x_t`` once Sinkhorn has converged, and stay convex combinations of the other frame's tokens
   after few iterations.
6. Attention without learned projections and with one head, exactly the paper's ``A_k = X_k (X_\\k (x) T)^T /
   sqrt(D)`` with ``D`` the stage width; no dropout. (The authors' code uses multi-head q/k/v projections, an output
   projection, dropout and a post-LayerNorm residual, and no real Sinkhorn.)
7. ``X~_k`` (Eq. 6 defines only the weights) is the masked-softmax attention applied to the transported embeddings:
   ``X~_k = MaskedSoftmax(A_k, P_k) y_k`` (keys and values are both ``y_k``).
8. Importance predictor (Eq. 5, the DynamicViT "PredictorLG" pattern): ``LayerNorm -> Linear(D, D) -> GELU``;
   "local" = the first ``D // 2`` channels per token, "global" = the mean over all tokens of the remaining channels;
   concatenated -> ``Linear(D, D // 2) -> GELU -> Linear(D // 2, D // 4) -> GELU -> Linear(D // 4, 2)``; the Softmax
   is over these two (keep, drop) logits per token and ``z_j`` is the keep probability (a softmax over the tokens
   would make every ``z_j ~ 1 / n`` and the policy almost the identity). ``z`` stays soft in training and
   evaluation (no Gumbel or hard sampling), so evaluation is deterministic. One predictor per stage, shared by
   both frames; ``z_k`` is computed from ``x_k`` (Eq. 5) on the matching grid and gates column ``j`` of ``A_k``,
   i.e. the other frame's embedding matched to position ``j`` of frame ``k``.
9. Masked softmax (DynamicViT ``softmax_with_policy``): ``(exp(A - max_row A) P + eps / n) /
   (sum_j exp(A - max_row A) P + eps)`` with ``eps = 1e-6``; it equals the plain softmax up to ``eps`` when ``P`` is
   all ones. The block computes it with ``y`` in one step, ``(W y + eps / n sum_j y_j) / (W 1 + eps)`` with
   ``W = exp(A - max_row A) P``, without forming ``P`` or the normalised weights (and in place when no gradient is
   recorded): the same numbers as :func:`masked_softmax` up to float rounding, at a fraction of the memory traffic.
10. Fusion (authors' code): ``X_s_in = X_s + alpha X~_s + (1 - alpha) X~_t`` position-wise (both frames have the
    same grid), ``alpha = 0.8``, mirrored for the target. ``fusion="transported"`` instead carries ``X~_\\k`` onto
    frame ``k``'s tokens with the same barycentric projection as in 5 before adding it.
11. Decoder: SegFormer all-MLP head (per stage 1x1 conv to ``decoder_width`` = 256, bilinear to 1/4, concat, 1x1
    conv without bias -> ReLU -> BatchNorm, in the authors' order, 1x1 classifier, bilinear to the input size --
    the same logits as the authors' upsample-then-classify, since both steps are linear),
    shared by both frames including the classifier (the authors' code has one head per frame): this makes the
    network symmetric, so swapping the frames swaps the outputs and a frame paired with itself is well defined.
    In training the decoder's BatchNorm sees both frames in one batch. The classifier starts from N(0, 0.01)
    weights (SegFormer's segmentation head), the other layers from SegFormer's initialisation.
12. Ablations (paper Table 6, ``use_ot=False``): ``pairing="single"`` gives ``X_k_in = X_k``; ``pairing="add"``
    gives ``X_s_in = X_s + alpha X_s + (1 - alpha) X_t`` (mirrored), i.e. the BOTM fusion with the cross-transport
    outputs replaced by the untransported tokens (a plain ``X_s + X_t`` would give both frames the same decoder
    input and therefore the same prediction). ``use_importance=False`` sets ``P = 1`` (plain softmax) and creates no
    importance parameters.
13. ``token_reduction="keys"`` (option; the authors' code reduces only the keys/values): at a stage with reduction
    ``r > 1`` the queries are frame ``k``'s ``N = h w`` full-resolution tokens and the keys/values live on its pooled
    grid (``M = N / r^2`` cells). Frame ``k``'s pooled tokens are matched against the other frame's full-resolution
    tokens (a rectangular ``M x N`` plan, one per direction), the keys ``y_k`` ``(B, M, D)`` are the barycentric
    projections of the other frame's full-resolution tokens onto the pooled cells, ``z_k`` comes from the pooled
    tokens, and the policy's "diagonal" (``P = 1``) is the pooled cell that holds the query. ``A_k`` is ``N x M``
    and ``X~_k`` is already at full resolution (no upsampling); ``fusion="transported"`` carries the other frame's
    output onto the pooled grid with the same plan and upsamples it bilinearly. At reduction 1 it is the default
    computation. It costs two ``M x N`` plans per reduced stage instead of one ``M x M`` plan (at 672x672:
    1764 x 28224 at stage 1, 1764 x 7056 at stage 2); see the bundle README's Performance section.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.networks.mit import MixVisionTransformer, SegFormerMLPDecoder
from common.ops.sinkhorn import SinkhornResult, sinkhorn

__all__ = ["AnatomicalImportance", "BOTMBlock", "BOTMSegNet", "masked_softmax", "split_pair_logits"]

_PAIRINGS = ("ot", "single", "add")
_FUSIONS = ("positional", "transported")
_SINKHORN_GRADS = ("unrolled", "implicit")
_TOKEN_REDUCTIONS = ("both", "keys")


def masked_softmax(attn: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """Softmax over the last axis with multiplicative keep weights (paper Eq. 6, DynamicViT ``softmax_with_policy``).

    Args:
        attn: ``(..., n, m)`` attention logits.
        policy: weights in ``[0, 1]`` broadcastable to ``attn``; 0 removes a key, 1 keeps it fully.
        eps: stabiliser; the result is ``(exp(a) p + eps / m) / (sum exp(a) p + eps)`` with ``a`` shifted by its row
            maximum, so a row whose policy is all zero becomes uniform instead of NaN.

    Returns:
        ``(..., n, m)`` weights; each row sums to 1 (up to ``eps``).
    """
    # The row-max shift only guards exp() against overflow (it cancels up to eps), so it gets no gradient.
    shifted = attn - attn.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(shifted) * policy
    m = attn.shape[-1]
    return (weights + eps / m) / (weights.sum(dim=-1, keepdim=True) + eps)


def split_pair_logits(logits: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Split pair logits ``(B, 2 C, ...)`` into the source ``(B, C, ...)`` and target ``(B, C, ...)`` logits."""
    if logits.ndim < 2 or logits.shape[1] != 2 * num_classes:
        raise ValueError(
            f"pair logits must have 2 * num_classes = {2 * num_classes} channels in dim 1, got shape "
            f"{tuple(logits.shape)}"
        )
    return logits[:, :num_classes], logits[:, num_classes:]


class AnatomicalImportance(nn.Module):
    """Token importance ``z`` (paper Eq. 5): local and global MLP features -> keep probability per token.

    Input ``(B, n, D)`` tokens (``D >= 2``); output ``(B, n)`` in ``(0, 1)``. See choice 8 of the module docstring.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"the importance predictor needs a token width >= 2, got {dim}")
        self.local_dim = dim // 2
        self.in_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        h1, h2 = max(dim // 2, 1), max(dim // 4, 1)
        self.out_mlp = nn.Sequential(nn.Linear(dim, h1), nn.GELU(), nn.Linear(h1, h2), nn.GELU(), nn.Linear(h2, 2))

    def forward(self, x: Tensor) -> Tensor:
        f = self.in_mlp(x)
        local = f[..., : self.local_dim]
        glob = f[..., self.local_dim :].mean(dim=1, keepdim=True).expand(-1, f.shape[1], -1)
        logits = self.out_mlp(torch.cat([local, glob], dim=-1))
        return torch.softmax(logits, dim=-1)[..., 0]


class BOTMBlock(nn.Module):
    """One BOTM block: Sinkhorn token matching, cross-transport attention with importance policy, fusion.

    Args:
        dim: token width ``D`` of the stage.
        reduction: average-pooling factor applied to both frames before matching (1 = none).
        ot_eps: entropic regularisation of the Sinkhorn problem.
        sinkhorn_iters: number of Sinkhorn iterations (fixed; no early stop).
        use_importance: learned importance policy (Eq. 5-6); False gives a plain softmax.
        alpha: fusion weight of a frame's own cross-transport output.
        fusion: ``"positional"`` or ``"transported"`` (choice 10 of the module docstring).
        sinkhorn_grad: ``"unrolled"`` or ``"implicit"`` differentiation of the Sinkhorn op.
        token_reduction: ``"both"`` (pool both frames, square plan, update upsampled; choice 3) or ``"keys"``
            (full-resolution queries, keys/values on the pooled grid, rectangular plans; choice 13).

    ``forward(xs, xt)``: two ``(B, D, h, w)`` feature maps (``h, w`` divisible by ``reduction``) -> the fused
    decoder inputs ``(X_s_in, X_t_in)``, both ``(B, D, h, w)``.
    """

    def __init__(
        self,
        dim: int,
        reduction: int = 1,
        ot_eps: float = 0.1,
        sinkhorn_iters: int = 50,
        use_importance: bool = True,
        alpha: float = 0.8,
        fusion: str = "positional",
        sinkhorn_grad: str = "unrolled",
        token_reduction: str = "both",
    ) -> None:
        super().__init__()
        if token_reduction not in _TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduction must be one of {_TOKEN_REDUCTIONS}, got {token_reduction!r}")
        if reduction < 1:
            raise ValueError(f"BOTM token reduction must be >= 1, got {reduction}")
        if not ot_eps > 0:
            raise ValueError(f"ot_eps must be > 0, got {ot_eps}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {_FUSIONS}, got {fusion!r}")
        if sinkhorn_grad not in _SINKHORN_GRADS:
            raise ValueError(f"sinkhorn_grad must be one of {_SINKHORN_GRADS}, got {sinkhorn_grad!r}")
        self.dim = dim
        self.reduction = int(reduction)
        self.ot_eps = float(ot_eps)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.alpha = float(alpha)
        self.fusion = fusion
        self.sinkhorn_grad = sinkhorn_grad
        self.token_reduction = token_reduction
        self.importance = AnatomicalImportance(dim) if use_importance else None

    def _attend(self, x: Tensor, y: Tensor, z_from: Tensor, own: Tensor | None = None) -> Tensor:
        """Cross-transport attention (Eq. 6) of queries ``x`` (B, N, D) over keys = values ``y`` (B, M, D).

        ``z_from`` (B, M, D): the tokens the importance ``z`` is predicted from (frame k on the key grid). ``own``
        (N,) long: the key index of each query's own position (the policy's "diagonal"); None means ``N = M`` and
        query ``i`` owns key ``i``. Returns (B, N, D).
        """
        # scaled in place: bmm's backward does not need its output, and a second (B, N, M) buffer costs fresh pages
        attn = torch.bmm(x, y.transpose(1, 2)).div_(math.sqrt(self.dim))
        if self.importance is None:
            return torch.bmm(torch.softmax(attn, dim=-1), y)
        z = self.importance(z_from)  # (B, M)
        # masked_softmax(attn, P) @ y with P[i, j] = z[j] and P[i, own(i)] = 1, without building P or the normalised
        # weights: (W + eps/m) / (W 1 + eps) @ y = (W y + eps/m * sum_j y_j) / (W 1 + eps), W = exp(A - max A) * P.
        # On the 1764x1764 plans of a 672x672 input this saves four full-size temporaries and passes per direction.
        eps, m = 1e-6, attn.shape[-1]
        inplace = not (torch.is_grad_enabled() and (attn.requires_grad or z.requires_grad))
        shifted = attn.sub_(attn.amax(dim=-1, keepdim=True).detach())
        expd = shifted.exp_() if inplace else shifted.exp()
        rows = torch.arange(expd.shape[1], device=expd.device)
        cols = rows if own is None else own
        own_e = expd[:, rows, cols]  # a copy: the own entries keep weight exp(A) (policy 1) instead of exp(A) z
        weights = expd.mul_(z.unsqueeze(1)) if inplace else expd * z.unsqueeze(1)
        weights[:, rows, cols] = own_e
        num = torch.bmm(weights, y) + (eps / m) * y.sum(dim=1, keepdim=True)
        return num / (weights.sum(dim=-1, keepdim=True) + eps)

    def _match(self, queries: Tensor, others: Tensor) -> SinkhornResult:
        """Sinkhorn plan between ``queries`` (B, N, D) (rows) and ``others`` (B, M, D) (columns), cost 1 - cos."""
        return sinkhorn(xs=queries, xt=others, eps=self.ot_eps, n_iters=self.sinkhorn_iters, grad=self.sinkhorn_grad)

    def forward(self, xs: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        if xs.shape != xt.shape or xs.ndim != 4 or xs.shape[1] != self.dim:
            raise ValueError(
                f"BOTM block expects two (B, {self.dim}, h, w) maps of equal shape, got {tuple(xs.shape)} and "
                f"{tuple(xt.shape)}"
            )
        b, d, h, w = xs.shape
        if h % self.reduction or w % self.reduction:
            raise ValueError(f"stage grid {h}x{w} is not divisible by the BOTM token reduction {self.reduction}")
        work = torch.float64 if xs.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=xs.device.type, enabled=False):
            if self.reduction > 1 and self.token_reduction == "keys":
                upd = self._forward_keys(xs.to(work), xt.to(work))
            else:
                upd = self._forward_both(xs.to(work), xt.to(work))
        upd = upd.to(xs.dtype)
        return xs + upd[:b], xt + upd[b:]

    @staticmethod
    def _tokens(x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)

    def _mix(self, att_s: Tensor, att_t: Tensor, cross_s: Tensor, cross_t: Tensor, grid: tuple[int, int]) -> Tensor:
        """Fusion updates of both frames stacked on the batch axis: (2B, D, *grid)."""
        upd_s = self.alpha * att_s + (1.0 - self.alpha) * cross_s
        upd_t = self.alpha * att_t + (1.0 - self.alpha) * cross_t
        return torch.cat([upd_s, upd_t], dim=0).transpose(1, 2).reshape(-1, self.dim, *grid)

    def _forward_both(self, xs: Tensor, xt: Tensor) -> Tensor:
        """Both frames pooled: a square plan on the reduced grid, the update upsampled back (choice 3)."""
        h, w = xs.shape[-2:]
        ps, pt = xs, xt
        if self.reduction > 1:
            ps, pt = F.avg_pool2d(xs, self.reduction), F.avg_pool2d(xt, self.reduction)
        grid = tuple(ps.shape[-2:])
        ts, tt = self._tokens(ps), self._tokens(pt)
        res = self._match(ts, tt)
        att_s = self._attend(ts, _barycentric(res, tt, to_rows=True), ts)
        att_t = self._attend(tt, _barycentric(res, ts, to_rows=False), tt)
        if self.fusion == "transported":
            cross_s, cross_t = _barycentric(res, att_t, to_rows=True), _barycentric(res, att_s, to_rows=False)
        else:
            cross_s, cross_t = att_t, att_s
        upd = self._mix(att_s, att_t, cross_s, cross_t, grid)
        if self.reduction > 1:
            upd = F.interpolate(upd, size=(h, w), mode="bilinear", align_corners=False)
        return upd

    def _forward_keys(self, xs: Tensor, xt: Tensor) -> Tensor:
        """Full-resolution queries, keys/values on the reduced grid (choice 13): rectangular plans."""
        r = self.reduction
        h, w = xs.shape[-2:]
        hr, wr = h // r, w // r
        fs, ft = self._tokens(xs), self._tokens(xt)  # (B, N, D), N = h w
        ps, pt = self._tokens(F.avg_pool2d(xs, r)), self._tokens(F.avg_pool2d(xt, r))  # (B, M, D), M = N / r^2
        # each frame's pooled grid matched against the other frame's full-resolution tokens (M x N plans)
        res_s, res_t = self._match(ps, ft), self._match(pt, fs)
        keys_s = _barycentric(res_s, ft, to_rows=True)  # the target's tokens carried onto the source's pooled grid
        keys_t = _barycentric(res_t, fs, to_rows=True)
        rows = torch.arange(h, device=xs.device).div(r, rounding_mode="floor")
        cols = torch.arange(w, device=xs.device).div(r, rounding_mode="floor")
        own = (rows[:, None] * wr + cols[None, :]).flatten()  # pooled cell of every full-resolution position
        att_s = self._attend(fs, keys_s, ps, own)  # (B, N, D)
        att_t = self._attend(ft, keys_t, pt, own)
        if self.fusion == "transported":
            # the other frame's output carried onto this frame's pooled grid by the same plans, then upsampled
            carried = torch.cat([_barycentric(res_s, att_t, to_rows=True), _barycentric(res_t, att_s, to_rows=True)])
            carried = carried.transpose(1, 2).reshape(-1, self.dim, hr, wr)
            carried = F.interpolate(carried, size=(h, w), mode="bilinear", align_corners=False)
            cross_s, cross_t = self._tokens(carried[: xs.shape[0]]), self._tokens(carried[xs.shape[0] :])
        else:
            cross_s, cross_t = att_t, att_s
        return self._mix(att_s, att_t, cross_s, cross_t, (h, w))


def _barycentric(res: SinkhornResult, values: Tensor, to_rows: bool) -> Tensor:
    """Exact barycentric projection through a plan ``T``: ``diag(T 1)^-1 T v`` onto the rows (``to_rows``; ``values``
    on the columns) or ``diag(T^T 1)^-1 T^T v`` onto the columns (choice 5)."""
    # one transport of [values, 1] gives T v and the row sums T 1 together
    out = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
    out = res.transport(out) if to_rows else res.transport_t(out)
    return out[..., :-1] / out[..., -1:]


class BOTMSegNet(nn.Module):
    """BOTM paired-frame segmentation network (see the module docstring for the method and every choice).

    Args:
        num_classes: segmentation classes per frame, background included (CAMUS 4, TED 3).
        in_channels: channels of one frame (1 for echocardiography).
        widths, depths, num_heads, patch_sizes, strides, sr_ratios, mlp_ratio, qkv_bias, drop_path_rate: the MiT
            encoder (:class:`common.networks.mit.MixVisionTransformer`; defaults = MiT-B2).
        decoder_width: width of the SegFormer MLP decoder.
        botm_reductions: per-stage average-pooling factor before token matching.
        use_ot: BOTM blocks on (True) or off (False: the same encoder/decoder, frames combined by ``pairing``).
        pairing: ``"ot"`` (BOTM), ``"single"`` (each frame alone) or ``"add"`` (paper Table 6); default ``"ot"``
            when ``use_ot`` else ``"single"``; ``"ot"`` requires ``use_ot=True`` and the others ``use_ot=False``.
        use_importance: learned anatomical importance policy in the cross-transport attention.
        sinkhorn_iters: Sinkhorn iterations per BOTM block.
        ot_eps: entropic regularisation of the OT problem.
        alpha: fusion weight of a frame's own cross-transport output (and of the frame itself for ``"add"``).
        fusion: ``"positional"`` (authors' code) or ``"transported"`` cross-frame term of the fusion.
        sinkhorn_grad: ``"unrolled"`` or ``"implicit"`` differentiation through Sinkhorn.
        token_reduction: where ``botm_reductions`` applies: ``"both"`` (default; both frames pooled, choice 3) or
            ``"keys"`` (queries stay at full resolution, only the keys/values are reduced, choice 13).

    Shapes: ``(B, 2 in_channels, H, W)`` -> ``(B, 2 num_classes, H, W)`` (source classes first, then target);
    ``(B, in_channels, H, W)`` -> ``(B, num_classes, H, W)`` (the frame paired with itself). ``H`` and ``W`` must be
    multiples of :attr:`size_multiple`.
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        decoder_width: int = 256,
        botm_reductions: Sequence[int] = (4, 2, 1, 1),
        use_ot: bool = True,
        pairing: str | None = None,
        use_importance: bool = True,
        sinkhorn_iters: int = 50,
        ot_eps: float = 0.1,
        alpha: float = 0.8,
        fusion: str = "positional",
        sinkhorn_grad: str = "unrolled",
        token_reduction: str = "both",
    ) -> None:
        super().__init__()
        if pairing is None:
            pairing = "ot" if use_ot else "single"
        if pairing not in _PAIRINGS:
            raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}")
        if (pairing == "ot") != bool(use_ot):
            raise ValueError(
                f"pairing={pairing!r} contradicts use_ot={use_ot}: 'ot' needs use_ot=True, 'single' and 'add' need "
                "use_ot=False"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if len(botm_reductions) != len(widths):
            raise ValueError(
                f"botm_reductions needs one entry per encoder stage ({len(widths)}), got {list(botm_reductions)}"
            )
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.pairing = pairing
        self.alpha = float(alpha)
        self.encoder = MixVisionTransformer(
            in_channels=in_channels,
            widths=widths,
            depths=depths,
            num_heads=num_heads,
            patch_sizes=patch_sizes,
            strides=strides,
            sr_ratios=sr_ratios,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
        )
        self.botm = None
        if pairing == "ot":
            self.botm = nn.ModuleList(
                [
                    BOTMBlock(
                        w,
                        reduction=r,
                        ot_eps=ot_eps,
                        sinkhorn_iters=sinkhorn_iters,
                        use_importance=use_importance,
                        alpha=alpha,
                        fusion=fusion,
                        sinkhorn_grad=sinkhorn_grad,
                        token_reduction=token_reduction,
                    )
                    for w, r in zip(widths, botm_reductions)
                ]
            )
        self.decoder = SegFormerMLPDecoder(widths, decoder_width=decoder_width, num_classes=num_classes)
        # every stage grid (input / cumulative stride) must split evenly into its pooling windows
        multiple, cum = 1, 1
        for s, r in zip(strides, botm_reductions if pairing == "ot" else [1] * len(strides)):
            cum *= int(s)
            multiple = math.lcm(multiple, cum * int(r))
        self.size_multiple = multiple

    def _fuse(self, fs: Tensor, ft: Tensor, stage: int) -> tuple[Tensor, Tensor]:
        if self.botm is not None:
            return self.botm[stage](fs, ft)
        if self.pairing == "add":
            a = self.alpha
            return fs + a * fs + (1.0 - a) * ft, ft + a * ft + (1.0 - a) * fs
        return fs, ft

    def forward(self, image: Tensor) -> Tensor:
        if image.ndim != 4:
            raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
        c, h, w = image.shape[1:]
        if c not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"image must have {2 * self.in_channels} channels (source and target frames) or {self.in_channels} "
                f"(one frame, paired with itself), got shape {tuple(image.shape)}"
            )
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"image height and width must be multiples of {self.size_multiple}, got {h}x{w} (resize or pad first)"
            )
        b = image.shape[0]
        pair = c == 2 * self.in_channels
        if pair:
            # one encoder pass over the stacked frames: the encoder is shared and per-sample
            frames = torch.cat([image[:, : self.in_channels], image[:, self.in_channels :]], dim=0)
            feats = self.encoder(frames)
            split = [(f[:b], f[b:]) for f in feats]
        else:
            split = [(f, f) for f in self.encoder(image)]
        fused_s, fused_t = [], []
        for i, (fs, ft) in enumerate(split):
            ys, yt = self._fuse(fs, ft, i)
            fused_s.append(ys)
            fused_t.append(yt)
        if not pair:
            return self.decoder(fused_s, (h, w))
        logits = self.decoder([torch.cat([ys, yt], dim=0) for ys, yt in zip(fused_s, fused_t)], (h, w))
        return torch.cat([logits[:b], logits[b:]], dim=1)
