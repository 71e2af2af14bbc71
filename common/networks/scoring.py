"""AdaCS scoring estimator ``g`` and the variance estimator of the NLL / β-NLL baselines (``METHODS.md`` §3).

Both are a VoxelMorph-style U-Net (:class:`VoxelMorphStyleUNet`) followed by a 3x3 convolution to one channel:

* :class:`ScoringNet` ``g_φ(I_t) -> Ŝ``: target image ``(B, 1, *spatial)`` -> sigmoid -> correspondence score
  ``Ŝ ∈ [0, 1]`` ``(B, 1, *spatial)`` (high where the residual can be trusted). Training-only: inference needs only
  the displacement estimator.
* :class:`VarianceNet`: ``cat(I_t, warped source)`` ``(B, 2, *spatial)`` -> predicted log-variance
  ``log σ²`` ``(B, 1, *spatial)`` of the residual (paper Sec. 5.3.2: "a U-Net as variance estimator that takes target
  image and warped source as input"), trained jointly with the displacement estimator under NLL / β-NLL.

U-Net (the VoxelMorph authors' ``Unet``, default features ``enc = [16, 32, 32, 32]``,
``dec = [32, 32, 32, 32, 32, 16, 16]``): encoder convolution ``i`` at ``1 / 2**i`` of the input followed by 2x2 max
pooling; decoder convolution ``j < len(enc)`` at ``1 / 2**(len(enc) - j)`` followed by nearest x2 upsampling and
concatenation with the encoder feature of that size; the remaining ``dec`` convolutions at full resolution. Every
convolution is 3x3 (3x3x3) with bias and LeakyReLU(0.2). Spatial sizes must be divisible by ``2 ** len(enc)``.
MONAI's ``VoxelMorphUNet`` has the same layout but insists on an even number of input channels and ends in a
``spatial_dims``-channel head, so the U-Net is assembled here from MONAI ``Convolution`` blocks.

Choices the paper does not state: the score head keeps PyTorch's default initialisation (so ``Ŝ`` starts near 0.5,
as in the authors' code); the variance head outputs the log-variance (unconstrained, numerically safe) and, by
default, the warped source enters the variance net detached, so the NLL gradient reaches the displacement
estimator only through the residual, not through the variance net's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import Tensor, nn

__all__ = ["ScoringNet", "VarianceNet", "VoxelMorphStyleUNet"]


def _conv(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    return Convolution(
        spatial_dims, in_channels, out_channels, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.2}), bias=True
    )


class VoxelMorphStyleUNet(nn.Module):
    """VoxelMorph U-Net: ``(B, in_channels, *spatial) -> (B, dec_channels[-1], *spatial)``; see the module docstring.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        enc_channels: encoder widths, one per level.
        dec_channels: decoder widths, at least ``len(enc_channels)``; entries beyond that are full-resolution convs.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        enc_channels: Sequence[int] = (16, 32, 32, 32),
        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        enc, dec = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
        if not enc or len(dec) < len(enc):
            raise ValueError(f"need >= 1 encoder level and >= len(enc) decoder convs, got enc={enc} dec={dec}")
        if in_channels < 1 or min(enc + dec) < 1:
            raise ValueError(f"channel counts must be positive, got in={in_channels} enc={enc} dec={dec}")
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** len(enc)
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        self.pool = pool(kernel_size=2, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.encoder = nn.ModuleList()
        prev = in_channels
        for c in enc:
            self.encoder.append(_conv(spatial_dims, prev, c))
            prev = c
        self.decoder = nn.ModuleList()
        for j in range(len(enc)):
            self.decoder.append(_conv(spatial_dims, prev, dec[j]))
            prev = dec[j] + enc[len(enc) - 1 - j]  # concatenated with the skip of the level it is upsampled to
        self.remaining = nn.ModuleList()
        for c in dec[len(enc) :]:
            self.remaining.append(_conv(spatial_dims, prev, c))
            prev = c
        self.out_channels = prev

    def forward(self, x: Tensor) -> Tensor:
        bad = [s for s in x.shape[2:] if s % self.size_divisor]
        if x.ndim != self.spatial_dims + 2 or bad:
            raise ValueError(
                f"input must be (B, C, *spatial) with {self.spatial_dims} spatial sizes divisible by "
                f"{self.size_divisor}, got {tuple(x.shape)}"
            )
        skips = []
        for conv in self.encoder:
            x = conv(x)
            skips.append(x)
            x = self.pool(x)
        for conv in self.decoder:
            x = torch.cat([self.up(conv(x)), skips.pop()], dim=1)
        for conv in self.remaining:
            x = conv(x)
        return x


class ScoringNet(nn.Module):
    """AdaCS correspondence scoring estimator ``g_φ``: target ``(B, 1, *spatial)`` -> ``Ŝ (B, 1, *spatial)`` in [0, 1].

    Args:
        spatial_dims: 2 or 3.
        enc_channels: U-Net encoder widths (default ``(16, 32, 32, 32)``).
        dec_channels: U-Net decoder widths (default ``(32, 32, 32, 32, 32, 16, 16)``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        enc_channels: Sequence[int] = (16, 32, 32, 32),
        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
    ) -> None:
        super().__init__()
        self.unet = VoxelMorphStyleUNet(spatial_dims, 1, enc_channels, dec_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(self.unet.out_channels, 1, kernel_size=3, padding=1)

    def forward(self, target: Tensor) -> Tensor:
        if target.shape[1] != 1:
            raise ValueError(f"target must have 1 channel, got shape {tuple(target.shape)}")
        return torch.sigmoid(self.head(self.unet(target)))


class VarianceNet(nn.Module):
    """Variance estimator of the NLL / β-NLL baselines: ``(target, warped)`` -> ``log σ² (B, 1, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        enc_channels: U-Net encoder widths (default ``(16, 32, 32, 32)``).
        dec_channels: U-Net decoder widths (default ``(32, 32, 32, 32, 32, 16, 16)``).
        detach_warped_input: feed the warped source without gradient (default ``True``; see the module docstring).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        enc_channels: Sequence[int] = (16, 32, 32, 32),
        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        detach_warped_input: bool = True,
    ) -> None:
        super().__init__()
        self.detach_warped_input = bool(detach_warped_input)
        self.unet = VoxelMorphStyleUNet(spatial_dims, 2, enc_channels, dec_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv(self.unet.out_channels, 1, kernel_size=3, padding=1)

    def forward(self, target: Tensor, warped: Tensor) -> Tensor:
        """``target``, ``warped``: ``(B, 1, *spatial)``; returns the log-variance ``(B, 1, *spatial)``."""
        if target.shape != warped.shape or target.shape[1] != 1:
            raise ValueError(
                f"target and warped must be single-channel images of one shape, got {tuple(target.shape)} and "
                f"{tuple(warped.shape)}"
            )
        if self.detach_warped_input:
            warped = warped.detach()
        return self.head(self.unet(torch.cat([target, warped], dim=1)))
