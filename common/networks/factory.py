"""One constructor for the paired-frame segmentation networks of the BOTM bundle: BOTM and the paper's baselines.

``build_segmentation_network(name, num_classes, in_channels=1, **kwargs)`` returns a module with BOTM's interface
(:class:`common.networks.botm.BOTMSegNet`): ``(B, 2 in_channels, H, W)`` (source frame, target frame) -> logits
``(B, 2 num_classes, H, W)`` (source classes first), and ``(B, in_channels, H, W)`` (one frame) ->
``(B, num_classes, H, W)``. Every returned module has an integer attribute ``size_multiple``: ``H`` and ``W`` must be
multiples of it.

Names (case-insensitive; ``-`` and ``_`` ignored):

* ``"botm"``: :class:`~common.networks.botm.BOTMSegNet` (``kwargs`` go to its constructor: ``use_ot``, ``pairing``,
  ``widths``, ``sinkhorn_iters``, ...).
* ``"unet"``: MONAI ``UNet`` (2D; defaults ``channels=(32, 64, 128, 256, 512)``, ``strides=(2, 2, 2, 2)``,
  ``num_res_units=2``), ``"attentionunet"`` (alias ``"attnunet"``): MONAI ``AttentionUnet`` (2D; same channels and
  strides), ``"swinunetr"``: MONAI ``SwinUNETR`` with ``spatial_dims=2`` (default ``feature_size=24``). ``kwargs``
  override these defaults. The baselines are single-frame networks, as in the paper's comparison: the wrapper
  :class:`FramewiseSegNet` runs the same network on each frame of the pair (one batched call) and stacks the
  logits, so a baseline drops into the bundle's configs, loss, inferer and metrics unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from common.networks.botm import BOTMSegNet

__all__ = ["SEGMENTATION_NETWORKS", "FramewiseSegNet", "build_segmentation_network"]

SEGMENTATION_NETWORKS = ("botm", "unet", "attentionunet", "swinunetr")
_ALIASES = {"attnunet": "attentionunet", "swinunetr2d": "swinunetr"}


class FramewiseSegNet(nn.Module):
    """Run a single-frame segmentation network on every frame of a pair; BOTM's input/output convention.

    Args:
        net: ``(N, in_channels, H, W)`` -> ``(N, num_classes, H, W)``.
        in_channels: channels of one frame.
        num_classes: output classes of ``net`` (checked on every call).
        size_multiple: ``H`` and ``W`` must be multiples of this (``net``'s total down-sampling).

    ``forward(image)``: ``(B, 2 in_channels, H, W)`` -> ``(B, 2 num_classes, H, W)`` (frame 1 classes first);
    ``(B, in_channels, H, W)`` -> ``(B, num_classes, H, W)``.
    """

    def __init__(self, net: nn.Module, in_channels: int, num_classes: int, size_multiple: int) -> None:
        super().__init__()
        self.net = net
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.size_multiple = int(size_multiple)

    def forward(self, image: Tensor) -> Tensor:
        if image.ndim != 4:
            raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
        b, c, h, w = image.shape
        if c not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"image must have {2 * self.in_channels} channels (two frames) or {self.in_channels} (one frame), got "
                f"shape {tuple(image.shape)}"
            )
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"image height and width must be multiples of {self.size_multiple}, got {h}x{w} (resize or pad first)"
            )
        if c == self.in_channels:
            return self._checked(self.net(image), b)
        # both frames in one call: the frames are independent inputs of the same single-frame network
        frames = torch.cat([image[:, : self.in_channels], image[:, self.in_channels :]], dim=0)
        out = self._checked(self.net(frames), 2 * b)
        return torch.cat([out[:b], out[b:]], dim=1)

    def _checked(self, out: Tensor, n: int) -> Tensor:
        if out.shape[:2] != (n, self.num_classes):
            raise RuntimeError(
                f"the wrapped network returned shape {tuple(out.shape)}, expected ({n}, {self.num_classes}, H, W)"
            )
        return out


def _normalise(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in SEGMENTATION_NETWORKS:
        raise ValueError(f"unknown segmentation network {name!r}; choose one of {list(SEGMENTATION_NETWORKS)}")
    return key


def build_segmentation_network(name: str = "botm", num_classes: int = 4, in_channels: int = 1,
                               **kwargs: Any) -> nn.Module:
    """Build the network ``name`` with BOTM's paired interface (see the module docstring); ``kwargs`` go to it."""
    key = _normalise(name)
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if key == "botm":
        return BOTMSegNet(num_classes=num_classes, in_channels=in_channels, **kwargs)
    from monai.networks.nets import AttentionUnet, SwinUNETR, UNet

    if key in ("unet", "attentionunet"):
        args: dict[str, Any] = {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2)}
        if key == "unet":
            args["num_res_units"] = 2
        args.update(kwargs)
        cls = UNet if key == "unet" else AttentionUnet
        net = cls(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, **args)
        multiple = math.prod(int(s) for s in args["strides"])
    else:
        args = {"feature_size": 24}
        args.update(kwargs)
        net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=2, **args)
        # MONAI's own input check: every spatial size divisible by patch_size ** 5
        multiple = int(args.get("patch_size", 2)) ** 5
    return FramewiseSegNet(net, in_channels=in_channels, num_classes=num_classes, size_multiple=multiple)
