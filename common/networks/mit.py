"""SegFormer building blocks: the Mix Transformer (MiT) hierarchical encoder and the all-MLP decoder.

Written from the SegFormer paper (Xie et al., NeurIPS 2021) and the BOTM spec (``METHODS.md`` §1); used by
:class:`common.networks.botm.BOTMSegNet`, which shares one encoder and one decoder between the two frames.

Encoder (MiT-B2 defaults): four stages; stage ``i`` is an overlapping patch embedding (a ``patch_sizes[i]`` x
``patch_sizes[i]`` convolution with stride ``strides[i]`` and padding ``patch_sizes[i] // 2``, then LayerNorm),
``depths[i]`` transformer blocks, and a final LayerNorm. A block is pre-norm:
``x = x + DropPath(EfficientSelfAttention(LN(x)))``, ``x = x + DropPath(MixFFN(LN(x)))``.
Efficient self-attention shrinks the keys/values by a strided ``sr_ratios[i]`` convolution + LayerNorm (no
shrinking when the ratio is 1). Mix-FFN is Linear(D, r D) -> 3x3 depthwise conv -> GELU -> Linear(r D, D) with
``r = mlp_ratio``. With an input of ``(B, C_in, H, W)`` and ``H, W`` divisible by 32 the stage outputs are
``(B, widths[i], H / s_i, W / s_i)`` with ``s = (4, 8, 16, 32)``.

Decoder (SegFormer all-MLP head, in the order of the BOTM authors' code): per stage a 1x1 convolution to
``decoder_width`` channels and bilinear upsampling to the stage-1 grid (1/4 of the input); concatenation; 1x1
convolution (no bias) -> ReLU -> BatchNorm; bilinear upsampling to the input size (x4); 1x1 classifier. The
classifier is applied before the upsampling, which gives the same logits (both are linear and the bilinear weights
sum to 1) at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn

__all__ = ["MixVisionTransformer", "SegFormerMLPDecoder"]


def _check_lengths(**seqs: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-stage arguments must all have the same length, got {lengths}")
    n = next(iter(lengths.values()))
    if n < 1:
        raise ValueError("at least one encoder stage is needed")
    return n


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``(B, C, H, W)`` -> tokens ``(B, H' W', D)`` and the grid size ``(H', W')``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a grid shrunk ``sr_ratio`` times per axis.

    Input/output: tokens ``(B, h w, D)`` of an ``h`` x ``w`` grid.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"spatial reduction ratio must be >= 1, got {sr_ratio}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
        kv_in = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, d, h, w)
            kv_in = self.sr_norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(kv_in).reshape(b, -1, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MixFFN(nn.Module):
    """Mix-FFN: the 3x3 depthwise convolution gives the positional information SegFormer uses instead of encodings."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, _ = x.shape
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class MiTBlock(nn.Module):
    """Pre-norm transformer block of MiT: efficient self-attention and Mix-FFN, each with a residual."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float, qkv_bias: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, mlp_ratio)
        # MONAI's stochastic depth: per sample, the whole branch is kept (scaled by 1 / keep) or dropped
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.ffn(self.norm2(x), h, w))


class MiTStage(nn.Module):
    """Patch embedding, ``depth`` blocks and a LayerNorm: ``(B, C, H, W)`` -> ``(B, D, H / stride, W / stride)``."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        stride: int,
        sr_ratio: int,
        mlp_ratio: int,
        drop_paths: Sequence[float],
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            [MiTBlock(dim, num_heads, sr_ratio, mlp_ratio, drop_paths[j], qkv_bias) for j in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens, h, w = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        tokens = self.norm(tokens)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class MixVisionTransformer(nn.Module):
    """Hierarchical Mix Transformer encoder (MiT-B2 by default), trained from scratch.

    Args:
        in_channels: channels of the input image.
        widths: token width per stage.
        depths: number of transformer blocks per stage.
        num_heads: attention heads per stage (must divide the width).
        patch_sizes: kernel of the overlapping patch embedding per stage.
        strides: stride of the overlapping patch embedding per stage.
        sr_ratios: key/value spatial reduction of the efficient self-attention per stage.
        mlp_ratio: Mix-FFN expansion.
        qkv_bias: biases in the query/key/value projections.
        drop_path_rate: stochastic-depth rate, linearly increasing over all blocks from 0 to this value.

    Input ``(B, in_channels, H, W)``; output a list of ``len(widths)`` feature maps,
    ``(B, widths[i], H / prod(strides[:i+1]), W / prod(strides[:i+1]))`` (ceil-divided when not divisible).
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        n = _check_lengths(
            widths=widths,
            depths=depths,
            num_heads=num_heads,
            patch_sizes=patch_sizes,
            strides=strides,
            sr_ratios=sr_ratios,
        )
        if in_channels < 1 or mlp_ratio < 1 or min(depths) < 1 or min(widths) < 1 or min(strides) < 1:
            raise ValueError(
                f"in_channels, mlp_ratio, depths, widths and strides must be >= 1, got in_channels={in_channels}, "
                f"mlp_ratio={mlp_ratio}, depths={list(depths)}, widths={list(widths)}, strides={list(strides)}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.widths = [int(w) for w in widths]
        self.strides = [int(s) for s in strides]
        rates = torch.linspace(0.0, float(drop_path_rate), sum(depths)).tolist()
        stages, start, cin = [], 0, in_channels
        for i in range(n):
            stages.append(
                MiTStage(
                    cin,
                    widths[i],
                    depths[i],
                    num_heads[i],
                    patch_sizes[i],
                    strides[i],
                    sr_ratios[i],
                    mlp_ratio,
                    rates[start : start + depths[i]],
                    qkv_bias,
                )
            )
            start += depths[i]
            cin = widths[i]
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SegFormerMLPDecoder(nn.Module):
    """SegFormer all-MLP decoder.

    Args:
        in_widths: channels of the encoder feature maps, finest first.
        decoder_width: common width of the projected features (SegFormer: 256).
        num_classes: output channels.

    ``forward(feats, out_size)``: ``feats[i]`` is ``(B, in_widths[i], h_i, w_i)`` with ``feats[0]`` the finest
    (1/4) grid; returns logits ``(B, num_classes, *out_size)``.
    """

    def __init__(self, in_widths: Sequence[int], decoder_width: int = 256, num_classes: int = 4) -> None:
        super().__init__()
        if decoder_width < 1 or num_classes < 1:
            raise ValueError(f"decoder_width and num_classes must be >= 1, got {decoder_width}, {num_classes}")
        self.proj = nn.ModuleList([nn.Conv2d(c, decoder_width, kernel_size=1) for c in in_widths])
        self.fuse = nn.Sequential(
            nn.Conv2d(decoder_width * len(in_widths), decoder_width, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(decoder_width),
        )
        self.classifier = nn.Conv2d(decoder_width, num_classes, kernel_size=1)
        self.apply(_init_weights)
        # small classifier weights (as SegFormer's segmentation head) so training starts near uniform class scores
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, feats: Sequence[Tensor], out_size: tuple[int, int]) -> Tensor:
        if len(feats) != len(self.proj):
            raise ValueError(f"the decoder expects {len(self.proj)} feature maps, got {len(feats)}")
        size = feats[0].shape[-2:]
        ups = []
        for f, proj in zip(feats, self.proj):
            y = proj(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            ups.append(y)
        x = self.fuse(torch.cat(ups, dim=1))
        # The 1x1 classifier commutes with bilinear upsampling (its weights sum to 1), so classifying on the 1/4 grid
        # and upsampling the logits is the authors' "upsample x4, then classify" at 1/16 of the memory and time.
        return F.interpolate(self.classifier(x), size=out_size, mode="bilinear", align_corners=False)


def _init_weights(m: nn.Module) -> None:
    # SegFormer's own initialisation (truncated-normal linears, fan-out He convs): the encoder is trained from
    # scratch, so its starting point should be the one MiT was designed and tuned with, not PyTorch's defaults.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, mean=0.0, std=(2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
