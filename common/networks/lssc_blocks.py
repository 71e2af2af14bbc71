"""Building blocks of the LSSC networks (2D Swin-Unet and the 3D nnFormer-style backbone).

Split out of :mod:`common.networks.lssc` so the network module stays one network: the modality-specific image
embedding, the modality-aware Swin block (Eq. 1-3), the encoder/decoder stages, patch expanding and the External
Attention Module. Each takes ``spatial_dims`` where the 2D and 3D logic is the same. Shapes and the paper's equations
are documented in :mod:`common.networks.lssc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbed
from monai.networks.layers import trunc_normal_
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformerBlock, compute_mask, get_window_size
from torch import Tensor

__all__ = ["ExternalAttentionModule", "ModalityAwareSwinBlock", "ModalityImageEmbedding", "PatchExpanding"]

_NUM_STAGES = 4  # Swin-Unet: 4 encoder stages (the last is the bottleneck), EAMs at the 3 decoder scales


def _is_tracing() -> bool:
    """True under torch.jit.trace, torch.compile or torch.export, where data-dependent Python branches are banned."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _conv_class(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``; any other dimension is an error naming it."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


class ModalityImageEmbedding(nn.Module):
    """Modality-specific image embedding: two 1x1 convolutions, resolution and width unchanged.

    Input ``(B, C_in, H, W)`` (``spatial_dims=2``) or ``(B, C_in, H, W, D)`` (``spatial_dims=3``), output the same.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = _conv_class(spatial_dims)
        self.conv1 = conv(in_channels, in_channels, kernel_size=1)
        self.act = nn.GELU()
        self.conv2 = conv(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class ModalityAwareSwinBlock(SwinTransformerBlock):
    """MONAI's Swin Transformer block with the modality-aware channel-wise multiplication of Eq. 1-3.

    ``forward(x, mask, class_embeddings)``: ``x`` is channel-last ``(B, H, W, D)``; ``class_embeddings`` is the
    ``(B, Z, class_dim)`` class-embedding matrix of each sample's modality, or ``None`` for the plain Swin block
    (Backbone/Baseline/Joint V1-V2, or a block built with ``class_dim=None``). Output ``(B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shift_size: Sequence[int],
        num_classes: int,
        class_dim: int | None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        """
        Args:
            dim: token width ``D``.
            num_heads: attention heads.
            window_size: ``(wh, ww)``.
            shift_size: ``(0, 0)`` for regular windows, ``(wh // 2, ww // 2)`` for shifted windows.
            num_classes: ``Z``.
            class_dim: width of the class embeddings (``4C``); ``None`` builds a plain block without ``w1, W2, W3``.
            mlp_ratio, qkv_bias, drop, attn_drop, drop_path: as MONAI's ``SwinTransformerBlock``.
        """
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            window_size=tuple(window_size),
            shift_size=tuple(shift_size),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop=drop,
            attn_drop=attn_drop,
            drop_path=drop_path,
        )
        self.num_classes = num_classes
        self.class_dim = class_dim
        if class_dim is not None:
            self.w1 = nn.Parameter(torch.empty(num_classes))
            self.w2 = nn.Linear(class_dim, dim)
            self.w3 = nn.Linear(class_dim, dim)
            self.reset_modulation()
        else:
            self.register_parameter("w1", None)
            self.w2 = None
            self.w3 = None

    def reset_modulation(self) -> None:
        """``w1 = 1/Z``, ``W2, W3 ~ TN(0, 0.02)`` with bias 1: ``Phi`` starts near the identity (see module doc)."""
        if self.class_dim is None:
            return
        with torch.no_grad():
            self.w1.fill_(1.0 / self.num_classes)
            for lin in (self.w2, self.w3):
                trunc_normal_(lin.weight, std=0.02)
                lin.bias.fill_(1.0)

    def channel_weights(self, class_embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 1: ``(B, Z, class_dim)`` class embeddings -> the diagonals of ``Phi1, Phi2``, each ``(B, D)``."""
        omega = torch.einsum("z,bzc->bc", self.w1, class_embeddings)
        return self.w2(omega), self.w3(omega)

    def forward(self, x: Tensor, mask_matrix: Tensor | None, class_embeddings: Tensor | None = None) -> Tensor:
        if class_embeddings is None or self.class_dim is None:
            return super().forward(x, mask_matrix)
        phi1, phi2 = self.channel_weights(class_embeddings)
        shape = (phi1.shape[0],) + (1,) * (x.dim() - 2) + (phi1.shape[1],)
        x = x + self.drop_path(phi1.view(shape) * self.forward_part1(x, mask_matrix))  # Eq. 2
        # forward_part2 already applies stochastic depth; a per-sample 0/scale commutes with the channel product
        return x + phi2.view(shape) * self.forward_part2(x)  # Eq. 3


class _SwinStage(nn.Module):
    """``depth`` Swin blocks at one resolution, regular and shifted windows alternating. Channel-last in and out:
    ``(B, H, W, D)`` with ``spatial_dims=2``, ``(B, H, W, Z, D)`` (volume-based windows) with ``spatial_dims=3``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        num_classes: int,
        class_dim: int | None,
        drop_path: Sequence[float],
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.window_size = (window_size,) * spatial_dims
        self.shift_size = (window_size // 2,) * spatial_dims
        self.blocks = nn.ModuleList(
            ModalityAwareSwinBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=self.window_size,
                shift_size=(0,) * spatial_dims if i % 2 == 0 else self.shift_size,
                num_classes=num_classes,
                class_dim=class_dim,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, class_embeddings: Tensor | None) -> Tensor:
        sizes = tuple(x.shape[1:-1])
        window, shift = get_window_size(sizes, self.window_size, self.shift_size)
        mask = None
        if any(s > 0 for s in shift) and len(self.blocks) > 1:
            # the shifted-window mask is defined on the padded map, as in MONAI's BasicLayer
            padded = [int(math.ceil(n / w)) * w for n, w in zip(sizes, window)]
            mask = compute_mask(padded, window, shift, x.device)
        for blk in self.blocks:
            x = blk(x, mask, class_embeddings)
        return x


class PatchExpanding(nn.Module):
    """Swin-Unet patch expanding: ``Linear(dim, scale^2 out_dim, bias=False)``, pixel shuffle, LayerNorm.

    Input channel-last ``(B, h, w, dim)``, output ``(B, scale h, scale w, out_dim)``.
    """

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, self.out_dim)
        return self.norm(x)


class _SwinEncoder(nn.Module):
    """Patch embedding, four Swin stages with patch merging, bottleneck LayerNorm.

    Input ``(B, C_in, H, W)``; returns the skips ``[(B, H/P, W/P, C), (B, H/2P, W/2P, 2C), (B, H/4P, W/4P, 4C)]``
    and the bottleneck ``(B, H/8P, W/8P, 8C)`` (channel-last).
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        patch_size: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        num_classes: int,
        class_dim: int | None,
        drop_path: Sequence[Sequence[float]],
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(
            patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim, norm_layer=nn.LayerNorm, spatial_dims=2
        )
        self.pos_drop = nn.Dropout(drop)
        dims = [embed_dim * 2**i for i in range(_NUM_STAGES)]
        self.stages = nn.ModuleList(
            _SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                window_size,
                num_classes,
                class_dim,
                drop_path[i],
                mlp_ratio,
                qkv_bias,
                drop,
                attn_drop,
            )
            for i in range(_NUM_STAGES)
        )
        self.merges = nn.ModuleList(
            PatchMerging(dim=dims[i], norm_layer=nn.LayerNorm, spatial_dims=2) for i in range(_NUM_STAGES - 1)
        )
        self.norm = nn.LayerNorm(dims[-1])

    def forward(self, x: Tensor, class_embeddings: Tensor | None) -> tuple[list[Tensor], Tensor]:
        x = self.pos_drop(self.patch_embed(x).permute(0, 2, 3, 1))
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x, class_embeddings)
            if i < _NUM_STAGES - 1:
                skips.append(x)
                x = self.merges[i](x)
        return skips, self.norm(x)


class _DecoderStage(nn.Module):
    """Patch expanding (x2), concatenation with the skip, ``Linear(2d, d)`` fusion, Swin blocks; channel-last."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        num_classes: int,
        class_dim: int | None,
        drop_path: Sequence[float],
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
    ) -> None:
        super().__init__()
        self.expand = PatchExpanding(2 * dim, dim, 2)
        self.fuse = nn.Linear(2 * dim, dim)
        self.blocks = _SwinStage(
            dim, depth, num_heads, window_size, num_classes, class_dim, drop_path, mlp_ratio, qkv_bias, drop, attn_drop
        )

    def forward(self, x: Tensor, skip: Tensor, class_embeddings: Tensor | None) -> Tensor:
        x = self.fuse(torch.cat([self.expand(x), skip], dim=-1))
        return self.blocks(x, class_embeddings)


class ExternalAttentionModule(nn.Module):
    """External Attention Module of one decoder scale (Eq. 4-11) with its auxiliary head (Eq. 12's ``F_1x1``).

    ``forward(features, queries)``:

    - ``features``: channel-last decoder features ``F`` ``(B, h, w, D)`` (``(B, h, w, z, D)`` in 3D).
    - ``queries``: class embeddings entering this scale, ``(B, Z, D)`` (``Q_M`` at scale 1, ``Q_1``/``Q_2`` after).

    Returns a dict:

    - ``"semantic_maps"``: ``A`` ``(B, Z, N, h, w)``, the per-head ``q k^T`` (Eq. 5-6).
    - ``"correlation"``: ``E`` ``(B, Z, Z)``; row ``i`` is ``E^i`` of Eq. 11 (``None`` when built with
      ``compute_correlations=False``).
    - ``"aux_logits"``: ``(B, Z, h, w)``, grouped 1x1 convolution of ``A`` (softmax is left to the loss).
    - ``"next_queries"``: ``Q_lambda`` ``(B, Z, out_dim)`` (Eq. 7-8 and the width reduction), or ``None`` when
      built with ``out_dim=None`` (last scale).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_heads: int,
        out_dim: int | None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        compute_correlations: bool = True,
        spatial_dims: int = 2,
    ) -> None:
        """
        Args:
            dim: width ``D`` of the features and of the incoming class embeddings.
            num_classes: ``Z``.
            num_heads: ``N``; must divide ``dim``.
            out_dim: width of the image-specific class embeddings passed to the next scale (``D/2``), or ``None``
                when no scale follows (then the value/output projections and the MLP are not built).
            mlp_ratio: hidden width of the MLP of Eq. 8 relative to ``dim``.
            qkv_bias: bias of the q/k/v projections.
            compute_correlations: build the semantic filtering weights ``W^i`` and compute ``E`` (Eq. 9-11); only
                ``L_icr`` uses ``E``.
            spatial_dims: 2 (features ``(B, h, w, D)``) or 3 (``(B, h, w, z, D)``; maps and aux logits get a third
                spatial axis).
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"EAM width {dim} is not divisible by its number of heads {num_heads}")
        self.dim = dim
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_f = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.computes_correlations = compute_correlations
        if compute_correlations:
            # Eq. 9 kernels: K^i = Q^i W^i with one (D, N) matrix per class
            self.filter_weight = nn.Parameter(torch.empty(num_classes, dim, num_heads))
            trunc_normal_(self.filter_weight, std=0.02)
        else:
            self.register_parameter("filter_weight", None)
        self.aux_head = _conv_class(spatial_dims)(num_classes * num_heads, num_classes, kernel_size=1,
                                                  groups=num_classes)
        self.updates_queries = out_dim is not None
        if out_dim is not None:
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.out_proj = nn.Linear(dim, dim)
            self.norm_mlp = nn.LayerNorm(dim)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            self.reduce = nn.Linear(dim, out_dim)

    def correlation(self, queries: Tensor, semantic_maps: Tensor) -> Tensor:
        """Eq. 9-11: ``queries (B, Z, D)`` and ``A (B, Z, N, h, w)`` -> ``E (B, Z, Z)``."""
        b, z, n = semantic_maps.shape[:3]
        a = semantic_maps.reshape(b, z, n, -1)
        kernels = torch.einsum("bzd,zdn->bzn", queries, self.filter_weight)  # K^i, (B, Z_i, N)
        sim = torch.einsum("bin,bjnl->bijl", kernels, a)  # S^{ij}: 1x1 conv of K^i over A^j, (B, Z_i, Z_j, L)
        weights = torch.softmax(sim, dim=2)  # Eq. 10: softmax over the classes j at each position
        num = (weights * a.sum(dim=2).unsqueeze(1)).sum(dim=-1)  # sum over (N, h, w) of B^{ij}
        den = weights.sum(dim=-1).clamp_min(1e-12)  # sum over (h, w) of sigma(S^i)_j
        return num / den

    def forward(self, features: Tensor, queries: Tensor) -> dict[str, Tensor | None]:
        b, *grid, d = features.shape
        n_pos = math.prod(grid)
        if d != self.dim or queries.shape[-1] != self.dim or queries.shape[1] != self.num_classes:
            raise ValueError(
                f"EAM of width {self.dim} and {self.num_classes} classes got features {tuple(features.shape)} "
                f"and queries {tuple(queries.shape)}"
            )
        f = self.norm_f(features.reshape(b, n_pos, d))
        q = self.q_proj(self.norm_q(queries)).view(b, self.num_classes, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(f).view(b, n_pos, self.num_heads, self.head_dim).transpose(1, 2)
        logits = q @ k.transpose(-2, -1)  # (B, N, Z, L): semantic-aware maps of every head
        semantic_maps = logits.transpose(1, 2).reshape(b, self.num_classes, self.num_heads, *grid)
        aux_logits = self.aux_head(semantic_maps.reshape(b, self.num_classes * self.num_heads, *grid))
        corr = self.correlation(queries, semantic_maps) if self.computes_correlations else None
        next_queries = None
        if self.updates_queries:
            v = self.v_proj(f).view(b, n_pos, self.num_heads, self.head_dim).transpose(1, 2)
            attn = torch.softmax(logits * self.head_dim**-0.5, dim=-1)  # Eq. 5: softmax over positions
            ca = (attn @ v).transpose(1, 2).reshape(b, self.num_classes, d)
            q_hat = self.out_proj(ca) + queries  # Eq. 6-7
            q_tilde = self.mlp(self.norm_mlp(q_hat)) + q_hat  # Eq. 8
            next_queries = self.reduce(q_tilde)
        return {
            "semantic_maps": semantic_maps,
            "correlation": corr,
            "aux_logits": aux_logits,
            "next_queries": next_queries,
        }
