"""TransMorph (Chen et al., MedIA 2022): a Swin-Transformer encoder and a convolutional decoder for registration.

Written from the TransMorph paper and the AdaCS spec (``METHODS.md`` §3); the Swin parts are MONAI 1.6.1's
(``PatchEmbed``, ``SwinTransformerBlock`` = (shifted-)window attention with relative position bias + MLP, its
attention-mask helper ``compute_mask``, ``PatchMergingV2``). MONAI's ``BasicLayer``/``SwinTransformer`` are not used
because a ``BasicLayer`` returns only its patch-merged output, while TransMorph keeps each stage's output before the
merging as a decoder skip (and ``BasicLayer`` pads with ``np.ceil``, a Python float in traces);
:class:`SwinStage` stacks the blocks the same way (no shift in even blocks, half-window shift in odd blocks).

Layout for an input pair ``(B, 1, *spatial)`` (``spatial = (H, W)``; ``(D, H, W)`` with ``spatial_dims=3``) and
``n = len(depths)`` stages of widths ``C_i = embed_dim * 2**i``:

* ``x = cat(I_s, I_t)`` ``(B, 2, *spatial)``.
* Encoder: 4x4 patch embedding (convolution, then LayerNorm) -> stage ``i`` (``depths[i]`` Swin blocks, windows of
  ``window_size``, shifted every second block) at ``1 / (4 * 2**i)`` of the input with ``C_i`` channels; the
  LayerNorm-ed output of every stage is kept as a skip; patch merging (2x2 -> ``C_{i+1}``) between stages.
* Convolutional skips from the input: ``c_half = ConvBlock(2 -> embed_dim // 2)`` on ``avg_pool(x, 3, stride 2,
  pad 1)`` (``1/2``) and ``c_full = ConvBlock(2 -> reg_head_channels)`` on ``x`` (full resolution).
* Decoder: from the deepest stage, ``n - 1`` blocks ``C_i -> C_{i-1}`` with the stage skips (back to ``1/4``), then
  ``C_0 -> reg_head_channels`` with ``c_half`` (``1/2``) and ``reg_head_channels -> reg_head_channels`` with
  ``c_full`` (full resolution). A decoder block is: upsample x2 (bilinear/trilinear, ``align_corners=False``) ->
  concatenate the skip -> 2 x (3x3 convolution without bias -> InstanceNorm -> LeakyReLU(0.01)); a ``ConvBlock`` is
  one such convolution unit.
* Registration head: 3x3 convolution to ``spatial_dims`` channels, weights ``N(0, 1e-5)``, zero bias -> the
  displacement ``û`` (pixels; TransMorph is not diffeomorphic, there is no integration); the source is warped with
  it (bilinear, zeros outside).

Every spatial size must be divisible by ``4 * 2**(n - 1)`` (32 by default).

Default sizes (TransMorph's 2D configuration; about 31 M parameters in 2D): ``embed_dim=96``,
``depths=(2, 2, 4, 2)``, ``num_heads=(4, 4, 8, 8)``, ``window_size=8``, ``mlp_ratio=4``, ``qkv_bias=False``,
``drop_path_rate=0.3``, ``reg_head_channels=16``. For a 128x128 input the last stage is a 4x4 token grid, where
MONAI shrinks the window to the grid and does not shift. Small CPU test configurations just pass smaller values.

Choices the TransMorph/AdaCS papers leave open, taken from the TransMorph authors' configuration: the decoder
normalisation (InstanceNorm, no affine), LeakyReLU slope 0.01, the half-resolution convolutional skip via 3x3
average pooling, and the tiny-weight initialisation of the registration head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, PatchEmbed
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformerBlock, compute_mask, get_window_size
from torch import Tensor, nn

from common.networks.registration import DisplacementEstimator

__all__ = ["SwinStage", "TransMorph", "TransMorphDecoderBlock"]

PATCH_SIZE = 4  # TransMorph's patch embedding; the two convolutional skips cover the remaining 1/2 and 1 scales


def _conv_unit(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        norm="instance",
        bias=False,
    )


class SwinStage(nn.Module):
    """``depth`` MONAI Swin blocks of one stage on channels-last tokens ``(B, *grid, dim) -> (B, *grid, dim)``.

    Even blocks attend within regular windows, odd blocks within windows shifted by half a window (masked so that
    tokens only attend to tokens that are adjacent in the image). Windows larger than the grid shrink to the grid
    and are not shifted (MONAI's ``get_window_size``); grids not divisible by the window are padded by the blocks.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Sequence[int],
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or len(drop_path) != depth:
            raise ValueError(f"a stage needs depth >= 1 and one drop-path rate per block, got {depth}, {drop_path}")
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(w // 2 for w in self.window_size)
        no_shift = tuple(0 for _ in self.window_size)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=self.window_size,
                shift_size=no_shift if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=float(drop_path[i]),
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        grid = tuple(x.shape[1:-1])
        window, shift = get_window_size(grid, self.window_size, self.shift_size)
        padded = [((g + w - 1) // w) * w for g, w in zip(grid, window)]  # integer ceil: no float in traces
        mask = compute_mask(padded, window, shift, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x


class TransMorphDecoderBlock(nn.Module):
    """Upsample x2, concatenate a skip, two conv-InstanceNorm-LeakyReLU units.

    Input ``x`` ``(B, in_channels, *s)`` and ``skip`` ``(B, skip_channels, *2s)``; output ``(B, out_channels, *2s)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.conv1 = _conv_unit(spatial_dims, in_channels + skip_channels, out_channels)
        self.conv2 = _conv_unit(spatial_dims, out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class TransMorph(DisplacementEstimator):
    """TransMorph displacement estimator ``f(I_s, I_t) -> (warped, displacement)``; see the module docstring.

    Args:
        spatial_dims: 2 (default) or 3.
        embed_dim: width ``C_0`` of the first Swin stage (even).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage (each must divide the stage width ``embed_dim * 2**i``).
        window_size: attention window (int for all axes, or one per axis).
        mlp_ratio: hidden width of the Swin MLP relative to the stage width.
        qkv_bias: learnable bias of the query/key/value projection.
        drop_path_rate: stochastic-depth rate, rising linearly over all blocks from 0 (training only).
        reg_head_channels: width of the two full/half-resolution decoder blocks.

    Input: ``source``, ``target`` ``(B, 1, *spatial)``, every size divisible by ``4 * 2**(len(depths) - 1)``.
    Output: ``warped (B, 1, *spatial)``, ``displacement (B, spatial_dims, *spatial)`` in pixels.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (4, 4, 8, 8),
        window_size: int | Sequence[int] = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path_rate: float = 0.3,
        reg_head_channels: int = 16,
    ) -> None:
        n = len(depths)
        if n < 1 or len(num_heads) != n:
            raise ValueError(f"depths and num_heads need one entry per stage, got {tuple(depths)} / {tuple(num_heads)}")
        super().__init__(spatial_dims=spatial_dims, size_divisor=PATCH_SIZE * 2 ** (n - 1))
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be an even number >= 2, got {embed_dim}")
        widths = [embed_dim * 2**i for i in range(n)]
        for i, (w, h) in enumerate(zip(widths, num_heads)):
            if h < 1 or w % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage width {w}")
        windows = (window_size,) * spatial_dims if isinstance(window_size, int) else tuple(window_size)
        if len(windows) != spatial_dims or min(windows) < 1:
            raise ValueError(f"window_size must be a positive int or {spatial_dims} positive ints, got {window_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if reg_head_channels < 1:
            raise ValueError(f"reg_head_channels must be >= 1, got {reg_head_channels}")

        self.patch_embed = PatchEmbed(
            patch_size=PATCH_SIZE, in_chans=2, embed_dim=embed_dim, norm_layer=nn.LayerNorm, spatial_dims=spatial_dims
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i in range(n):
            self.stages.append(
                SwinStage(
                    dim=widths[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=windows,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                )
            )
            self.out_norms.append(nn.LayerNorm(widths[i]))
            if i < n - 1:
                self.merges.append(PatchMergingV2(dim=widths[i], spatial_dims=spatial_dims))

        self.conv_half = _conv_unit(spatial_dims, 2, embed_dim // 2)
        self.conv_full = _conv_unit(spatial_dims, 2, reg_head_channels)
        self.up_stages = nn.ModuleList(
            TransMorphDecoderBlock(spatial_dims, widths[i], widths[i - 1], widths[i - 1]) for i in range(n - 1, 0, -1)
        )
        self.up_half = TransMorphDecoderBlock(spatial_dims, widths[0], embed_dim // 2, reg_head_channels)
        self.up_full = TransMorphDecoderBlock(spatial_dims, reg_head_channels, reg_head_channels, reg_head_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.reg_head = conv(reg_head_channels, spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.reg_head.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.reg_head.bias)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Swin features of ``x (B, 2, *spatial)``.

        Stage ``i`` gives ``(B, embed_dim * 2**i, *spatial / (4 * 2**i))`` (LayerNorm-ed, before merging).
        """
        feats = []
        x = self.patch_embed(x).movedim(1, -1).contiguous()  # channels-last tokens from here on
        for i, stage in enumerate(self.stages):
            x = stage(x)
            # the skip is the normalised stage output before merging (TransMorph's out_indices)
            feats.append(self.out_norms[i](x).movedim(-1, 1))
            if i < len(self.merges):
                x = self.merges[i](x)
        return feats

    def predict_displacement(self, source: Tensor, target: Tensor) -> Tensor:
        x = torch.cat([source, target], dim=1)
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        skip_half = self.conv_half(pool(x, kernel_size=3, stride=2, padding=1))
        skip_full = self.conv_full(x)
        feats = self.encode(x)
        y = feats[-1]
        for block, skip in zip(self.up_stages, reversed(feats[:-1])):
            y = block(y, skip)
        y = self.up_half(y, skip_half)
        y = self.up_full(y, skip_full)
        return self.reg_head(y)
