"""LSSC 3D configuration: an nnFormer-style U-shaped volume Transformer carrying every LSSC part of the 2D network.

Yang et al., "Toward Unpaired Multi-modal Medical Image Segmentation via Learning Structured Semantic Consistency"
(MIDL 2023), Sec. 4.2 "3D model configuration" and Table 1; ``METHODS.md`` §2. The backbone follows nnFormer (Zhou et
al. 2021): patch embedding ``4 x 4 x 2``, volume-based windowed self-attention (regular and shifted 3D windows
alternating), strided-convolution down-sampling and transposed-convolution up-sampling, encoder depths ``[2, 2, 2,
2]`` and three decoder stages with Transformer blocks.

Only the backbone is new here. Everything LSSC adds is the 2D implementation of :mod:`common.networks.lssc`, built
with ``spatial_dims=3``: the modality-specific image embeddings (two 1x1x1 convolutions,
:class:`~common.networks.lssc.ModalityImageEmbedding`), the modality-aware channel-wise multiplication of Eq. 1-3 in
every Transformer block (:class:`~common.networks.lssc.ModalityAwareSwinBlock` with 3D windows), the class
embeddings, the EAMs at decoder scales 1-3 (:class:`~common.networks.lssc.ExternalAttentionModule`; semantic maps
``(B, Z, N, h, w, z)``), the modality argument, ``forward_train`` (consumed unchanged by the Eq. 12-15 losses of
:mod:`common.losses.lssc`), the variants and the EAM-free inference network / export state dict. The class inherits
those methods from :class:`~common.networks.lssc.LSSCSwinUnet` and replaces only the backbone (constructor,
:meth:`LSSCnnFormer._backbone`, input check).

Shapes (input ``(B, in_channels, H, W, D)``, patch ``(p1, p2, p3)``, ``C = embed_dim``)::

    image embedding          (B, in, H, W, D)                         (per modality)
    patch embedding          (B, H/p1, W/p2, D/p3, C)                 Conv3d kernel = stride = patch, LayerNorm
    encoder stage i = 1..4   (B, H/(p1 2^(i-1)), ..., 2^(i-1) C)      Transformer blocks, then strided conv (x1/2)
    decoder stage l = 1..3   F_1 (4C), F_2 (2C), F_3 (C)              transposed conv (x2) + skip, blocks, EAM_l
    head                     (B, Z, H, W, D)                          LayerNorm, transposed conv kernel = stride = patch

Sizes: ``H, W, D`` must be multiples of ``8 p1, 8 p2, 8 p3`` (three halvings after the patch embedding); the paper's
``128 x 128 x 64`` patch with ``4 x 4 x 2`` gives token grids ``32^3, 16^3, 8^3, 4^3``. An ``int`` size ``s`` means
``s x s x s/2`` (in-plane ``s x s``, half as many slices, the paper's patch shape) for ``img_size`` and ``patch_size``
alike (:func:`patch_shape`).

Choices the paper does not state (the 2D choices of :mod:`common.networks.lssc` hold where the parts are shared)
---------------------------------------------------------------------------------------------------------------------
1. Transformer block = MONAI's ``SwinTransformerBlock`` with a cubic window (``window_size`` per axis, 4 by default:
   nnFormer's local volume-based MSA and its shifted version, shift ``window_size // 2``); windows shrink to the token
   grid when the grid is smaller, as in MONAI. nnFormer's global volume attention in the bottleneck is not used:
   every stage has the same (shifted) window blocks, so one block class carries the channel-wise multiplication.
2. Patch embedding: one convolution with kernel = stride = patch and LayerNorm (MONAI ``PatchEmbed``, as the 2D
   network); nnFormer's stem of two small strided convolutions is not reproduced.
3. Down-sampling: LayerNorm then ``Conv3d(d, 2d, kernel 2, stride 2)``; up-sampling: LayerNorm then
   ``ConvTranspose3d(2d, d, kernel 2, stride 2)`` (nnFormer's patch merging / expanding); the skip of the encoder
   stage of the same size is added (nnFormer), not concatenated as in the 2D Swin-Unet.
4. Head: LayerNorm, then ``ConvTranspose3d(C, Z, kernel = stride = patch)`` (nnFormer's final patch expanding) straight
   to the logits.
5. Default width ``C = 96``, heads ``[3, 6, 12, 24]`` (Table 1 gives depths and patch size only; these are the 2D
   values, also nnFormer's smallest published setting); decoder stage ``l`` mirrors encoder stage ``4 - l``.
6. No pretrained initialisation (the paper names none for 3D; the 2D Swin-T loader does not apply).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbed
from torch import Tensor

from common.networks.lssc import LSSCSwinUnet
from common.networks.lssc_blocks import _NUM_STAGES, _SwinStage

__all__ = ["LSSCnnFormer", "patch_shape"]


def patch_shape(size: int | Sequence[int]) -> tuple[int, int, int]:
    """A 3D size from an ``int`` ``s`` (``(s, s, max(s // 2, 1))``: in-plane ``s x s``, half as many slices, the
    paper's ``128 x 128 x 64`` from 128 and ``4 x 4 x 2`` from 4) or from three ints (returned as they are).

    Raises:
        ValueError: not one or three positive ints.
    """
    if isinstance(size, (int, torch.SymInt)) and not isinstance(size, bool):
        out = (int(size), int(size), max(int(size) // 2, 1))
    else:
        out = tuple(int(s) for s in size)
    if len(out) != 3 or any(s <= 0 for s in out):
        raise ValueError(f"a 3D size must be one positive int s (= s x s x s/2) or three positive ints, got {size!r}")
    return out  # type: ignore[return-value]


class _ConvDown(nn.Module):
    """nnFormer down-sampling: LayerNorm then ``Conv3d(dim, 2 dim, kernel 2, stride 2)``; channel-last in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv3d(dim, 2 * dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


class _ConvUp(nn.Module):
    """nnFormer up-sampling: LayerNorm then ``ConvTranspose3d(dim, out_dim, kernel 2, stride 2)``; channel-last."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.ConvTranspose3d(dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


class _Encoder3d(nn.Module):
    """Patch embedding, four stages of volume-window blocks with strided-conv down-sampling, bottleneck LayerNorm.

    Input ``(B, C_in, H, W, D)``; returns the skips of stages 1-3 and the bottleneck, channel-last.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int], window_size: int, num_classes: int, class_dim: int | None,
                 drop_path: Sequence[Sequence[float]], **block_kwargs: Any) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size=tuple(patch), in_chans=in_channels, embed_dim=embed_dim,
                                      norm_layer=nn.LayerNorm, spatial_dims=3)
        self.pos_drop = nn.Dropout(block_kwargs["drop"])
        dims = [embed_dim * 2**i for i in range(_NUM_STAGES)]
        self.stages = nn.ModuleList(
            _SwinStage(dims[i], depths[i], num_heads[i], window_size, num_classes, class_dim, drop_path[i],
                       spatial_dims=3, **block_kwargs)
            for i in range(_NUM_STAGES)
        )
        self.downs = nn.ModuleList(_ConvDown(dims[i]) for i in range(_NUM_STAGES - 1))
        self.norm = nn.LayerNorm(dims[-1])

    def forward(self, x: Tensor, class_embeddings: Tensor | None) -> tuple[list[Tensor], Tensor]:
        x = self.pos_drop(self.patch_embed(x).permute(0, 2, 3, 4, 1))
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x, class_embeddings)
            if i < _NUM_STAGES - 1:
                skips.append(x)
                x = self.downs[i](x)
        return skips, self.norm(x)


class _DecoderStage3d(nn.Module):
    """Transposed-conv up-sampling (x2) of the ``2 dim`` input, plus the skip, then volume-window blocks."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, num_classes: int,
                 class_dim: int | None, drop_path: Sequence[float], **block_kwargs: Any) -> None:
        super().__init__()
        self.up = _ConvUp(2 * dim, dim)
        self.blocks = _SwinStage(dim, depth, num_heads, window_size, num_classes, class_dim, drop_path,
                                 spatial_dims=3, **block_kwargs)

    def forward(self, x: Tensor, skip: Tensor, class_embeddings: Tensor | None) -> Tensor:
        return self.blocks(self.up(x) + skip, class_embeddings)


class LSSCnnFormer(LSSCSwinUnet):
    """LSSC 3D network: modality-specific image embeddings, an nnFormer-style backbone with modality-aware blocks,
    training-only EAMs at decoder scales 1-3.

    ``forward(image, modality) -> logits (B, Z, H, W, D)``; ``forward_train(image, modality) -> dict`` as
    :meth:`LSSCSwinUnet.forward_train` with 3D tensors (``aux_logits`` at ``1/(4p)``, ``1/(2p)``, ``1/p`` of the
    input per axis, ``semantic_maps`` ``(B, Z, N, h, w, z)``). ``image`` is ``(B, in_channels, H, W, D)``; see the
    module docstring for sizes and :class:`LSSCSwinUnet` for the modality argument and the variant switches.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        modalities: Sequence[str] = ("ct", "mr"),
        img_size: int | Sequence[int] = (128, 128, 64),
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        decoder_depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        patch_size: int | Sequence[int] = (4, 4, 2),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_image_embedding: bool = True,
        use_class_embeddings: bool = True,
        use_eam: bool = True,
        use_correlations: bool = True,
        modality_specific_encoder: bool = False,
        modality_specific_eam: bool = True,
        eam_num_heads: Sequence[int] | None = None,
        eam_mlp_ratio: float = 4.0,
        default_modality: str | None = None,
        pretrained_path: str = "",
    ) -> None:
        """
        Args:
            in_channels: input channels (1: a single-channel CT or MRI patch).
            img_size: nominal input size ``(H, W, D)`` or ``s`` (= ``s x s x s/2``); other sizes obeying the
                divisibility rule are accepted at run time (sliding-window patches have this size).
            patch_size: patch embedding size ``(p1, p2, p3)`` or ``p`` (= ``p x p x p/2``); ``4 x 4 x 2`` in the paper.
            window_size: edge of the cubic attention window.
            pretrained_path: must be ``""`` (no 3D pretrained weights; the argument exists so that one bundle config
                serves 2D and 3D).
            others: as :class:`LSSCSwinUnet`.
        """
        # the 2D constructor builds a Swin-Unet; this class shares LSSCSwinUnet's modality logic, EAMs, forward and
        # export methods but builds its own backbone, so it initialises nn.Module directly and then the shared parts
        nn.Module.__init__(self)
        if pretrained_path:
            raise ValueError(f"pretrained_path {pretrained_path!r}: the 3D network has no pretrained initialisation "
                             "(the Swin-T loader is 2D only); leave it empty")
        dims = self._init_modality_parts(
            in_channels, num_classes, modalities, embed_dim, depths, decoder_depths, num_heads, use_image_embedding,
            use_class_embeddings, use_eam, use_correlations, modality_specific_encoder, modality_specific_eam,
            default_modality, spatial_dims=3,
        )
        self.patch_size = patch_shape(patch_size)
        self.size_multiple = tuple(p * 2 ** (_NUM_STAGES - 1) for p in self.patch_size)
        self.img_size = patch_shape(img_size)
        if any(s % m for s, m in zip(self.img_size, self.size_multiple)):
            raise ValueError(f"img_size {self.img_size} must be multiples of patch_size * 8 = {self.size_multiple}")
        num_mod = len(self.modalities)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        enc_dpr = [dpr[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(_NUM_STAGES)]
        block_class_dim = self.class_dim if use_class_embeddings else None
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate)
        self.encoders = nn.ModuleList(
            _Encoder3d(in_channels, embed_dim, self.patch_size, depths, num_heads, window_size, num_classes,
                       block_class_dim, enc_dpr, **block_kwargs)
            for _ in range(num_mod if modality_specific_encoder else 1)
        )
        self.decoder = nn.ModuleList()
        for lam in range(1, _NUM_STAGES):
            i = _NUM_STAGES - 1 - lam  # decoder stage lam mirrors encoder stage i (0-based), as in 2D
            depth = decoder_depths[lam - 1]
            rates = enc_dpr[i] + [enc_dpr[i][-1] if enc_dpr[i] else 0.0] * max(0, depth - depths[i])
            self.decoder.append(_DecoderStage3d(dims[i], depth, num_heads[i], window_size, num_classes,
                                                block_class_dim, rates[:depth], **block_kwargs))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.head = nn.ConvTranspose3d(embed_dim, num_classes, kernel_size=self.patch_size, stride=self.patch_size)
        self._build_eams(dims, num_heads, eam_num_heads, eam_mlp_ratio, qkv_bias, spatial_dims=3)
        self._init_weights()
        self.pretrained_report = None

    def _check_image(self, image: Tensor) -> None:
        if image.dim() != 5 or image.shape[1] != self.in_channels:
            raise ValueError(f"image must be a (B, {self.in_channels}, H, W, D) volume patch, got {tuple(image.shape)}")
        if any(s % m for s, m in zip(image.shape[2:], self.size_multiple)):
            raise ValueError(f"volume size {tuple(image.shape[2:])} must be a multiple of patch_size * 8 = "
                             f"{self.size_multiple} per axis (sliding-window patches of img_size {self.img_size} are)")

    def _backbone(self, image: Tensor, index: int | Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Segmentation path: logits ``(B, Z, H, W, D)``, decoder features of scales 1-3 (channel-last) and the
        per-sample class embeddings ``(B, Z, 4C)`` (``None`` when the network has none)."""
        self._check_image(image)
        b = image.shape[0]
        q = self._class_embeddings_for(index, b) if self.class_embeddings is not None else None
        q_blocks = q if self.use_class_embeddings else None
        x = image
        if self.image_embeddings is not None:
            x = self._per_modality(self.image_embeddings, index, lambda mod, m: mod(image))
        skips, x = self._per_modality(self.encoders, index, lambda mod, m: mod(x, q_blocks))
        features = []
        for lam, stage in enumerate(self.decoder):
            x = stage(x, skips[_NUM_STAGES - 2 - lam], q_blocks)
            features.append(x)
        logits = self.head(self.norm_up(x).permute(0, 4, 1, 2, 3))
        return logits, features, q

    def example_input(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """``(image, modality)`` of the nominal size for tracing/export: zeros and modality index 0."""
        return torch.zeros(batch_size, self.in_channels, *self.img_size), torch.zeros(batch_size, dtype=torch.long)
