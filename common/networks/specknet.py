"""SpeckNet: a purely spatial speckle-tracking network for myocardial point tracking (METHODS.md §4).

Azad et al., "Taming Modern Point Tracking for Speckle Tracking Echocardiography via Impartial Motion", Sec. 4.2.
Training (impartial-motion augmentation, schedule) is not part of this module; the loss is
:mod:`common.losses.tracking`, the metrics and GLS are :mod:`common.metrics.tracking`.

Notation: ``B`` batch, ``T`` frames, ``N`` query points, ``C`` image channels (1, grayscale), ``H x W`` the input
size (the paper uses 512 x 512; resizing is the data pipeline's job, not the network's).

Data flow for one frame ``(C, H, W)`` with intensities in ``[-1, 1]``:

1. ``PixelUnshuffle(2)``: ``(C, H, W) -> (4C, H/2, W/2)``, a lossless, non-learnable space-to-depth.
2. Stem: 7x7 convolution, stride 2, to ``channels[0] = 32`` channels -> ``(32, H/4, W/4)``.
3. Pruned TAP-Net ResNet: four block groups of ``blocks_per_group = 2`` pre-activation residual blocks with
   channels ``(32, 64, 64, 64)`` and strides ``(1, 2, 1, 2)``, InstanceNorm. Group outputs are at
   ``H/4, H/8, H/8, H/16``.
4. Feature maps of the last three groups (``H/8, H/8, H/16``: ``64², 64², 32²`` for a 512 input), L2-normalised over
   channels, finest first.
5. Per query point ``n`` with query frame ``q_n``: bilinear sampling of its feature vector from frame ``q_n`` at each
   scale; cosine cost volume against every frame at each scale; paper form ``((c + 1) / 2) ** 15`` (or the authors'
   later ``c ** 4`` per scale, product squared); upsampling to the finest grid; product over scales; hard argmax,
   then a soft-argmax inside a disc of radius 5 finest-grid cells; scaling to input pixels. This is the shared op
   :func:`common.ops.cost_volume.cost_volume_track` (its docstring fixes every convention). With ``search`` other
   than ``"global"`` the hard argmax is restricted to a search window (a locality prior, see choice 13).
6. On its query frame a point returns the query point itself, bit for bit, with confidence 1.

Pre-activation residual block (ResNet v2, as TAP-Net's ``BlockV2``)::

    a = relu(norm_0(x))
    shortcut = proj(a) if the block has a projection else x     # 1x1 conv, block stride, first block of a group
    y = conv_1(relu(norm_1(conv_0(a))))                          # 3x3 convs, conv_0 carries the stride
    return y + shortcut

Coordinates: points are ``(x, y)`` in input pixels with the pixel-centre convention of the data pipeline
(:mod:`common.transforms.points`, the synthetic simulator and the tracking HDF5 layout): pixel ``[r, c]`` has its
centre at ``(x=c, y=r)``. The cost-volume op puts pixel centres at ``+0.5``; :class:`SpeckNet` converts on the way in
and out, so callers never see that convention.

Input: ``(B, T, H, W)`` or ``(B, T, C, H, W)``, floating point, grayscale in ``[-1, 1]`` (e.g. ``2 * u8 / 255 - 1``);
``H`` and ``W`` must be multiples of 16 (the coarsest feature stride), so every feature cell tiles the image exactly.
Because every convolution is bias-free and each block starts with an InstanceNorm, the features are exactly
invariant to a positive rescaling of the intensities and nearly invariant to an offset (only zero padding at the
border sees it), so a different intensity range degrades gracefully rather than breaking the network; ``uint8``
input is rejected to catch an unnormalised video early.

Output of :meth:`SpeckNet.forward`: ``{"tracks": (B, T, N, 2), "confidence": (B, T, N)}``; ``confidence`` is the
fraction of the combined matching weight inside the soft-argmax window (1 on query frames). :meth:`SpeckNet.encode`
returns the three normalised feature maps (the benchmark times it against the full forward).

MONAI bundles (input key ``image``, output key ``pred``) use :class:`SpeckNetBundleAdapter`, a subclass with the same
parameters (checkpoints are interchangeable) whose forward takes the channel-first video ``image (B, C, T, H, W)``
plus the query points and frames and returns one channel-first tensor ``pred (B, 3, T, N)`` = ``(x, y,
confidence)``. A bundle's trainer passes the query points from the data dict with MONAI's
``monai.engines.PrepareBatchExtraInput(extra_keys=["query_points", "query_frames"])`` and a plain
``SimpleInferer``, which calls ``network(image, query_points, query_frames)``. Called with the video alone (as the
model zoo's ``verify_net_in_out`` and ``ckpt_export --use_trace`` call a bundle network) it tracks a centred grid
of default query points from frame 0. One tensor output keeps ``pred`` decollatable and the adapter traceable.

Export: in eval mode both ``torch.jit.trace`` and ``torch.export.export`` capture the adapter (tests check the
captured programs against eager), but only for the shapes ``(B, T, H, W, N)`` they were captured with: the image size
and the op's frame/point chunk loops are specialised, so a different video length needs a new capture.
``torch.jit.script`` is not supported: the cost-volume op dispatches between a chunked, checkpointed PyTorch path and
Triton kernels (an autograd ``Function``) in Python, which the TorchScript compiler rejects.

Choices the paper does not state
--------------------------------
1. Projection shortcut (1x1 conv with the block stride, no bias) in the first block of every group, as TAP-Net's
   ``use_projection = (True, True, True, True)``; other blocks use the identity shortcut.
2. Convolutions have no bias (TAP-Net); InstanceNorm is affine with eps 1e-5 and no running statistics, so train and
   eval modes compute the same function.
3. Padding: symmetric PyTorch padding (3 for the 7x7 stem, 1 for the 3x3 convs) instead of TAP-Net's JAX "SAME"
   (which pads asymmetrically for stride 2). Each shifts the receptive-field centre of a cell by half an input pixel
   relative to the other; because the query features are sampled and the matches read out on the same grid with
   the same convention, the constant offset cancels in the tracked positions.
4. Initialisation: PyTorch defaults (Kaiming-uniform convolutions, InstanceNorm weight 1 and bias 0).
5. Query features are sampled bilinearly from the L2-normalised maps (``align_corners=False``, border padding, the
   op's :func:`~common.ops.cost_volume.sample_query_features`); the op renormalises them, so the cost volume holds
   true cosines.
6. Scale order for the op: group 1 (``H/8``), group 2 (``H/8``), group 3 (``H/16``); the finest grid ``H/8`` is the
   soft-argmax grid, so the radius of 5 cells is 40 input pixels.
7. The authors' later code adds TAPIR-style extra convolutions after the ResNet; the paper does not, and neither
   does this network. The authors' later cost form (``c ** 4`` per scale, product squared) is ``form="authors"``.
8. Points may have different query frames within a video (``query_frames`` is ``(B, N)``); the paper's setting
   (one query frame per video) is the special case of a constant row.
9. Input sizes other than 512 are accepted (multiples of 16); the feature grids and the soft-argmax window scale
   with them, so the radius in input pixels is ``5 * 8 = 40`` whatever the size (with ``radius_unit="cells"``).
10. API coordinates use the data pipeline's pixel-centre convention (centres at integers); the network adds 0.5
    before the op and subtracts it after, and writes the query points back on their query frames itself so they
    are returned bit for bit.
11. ``query_frames`` defaults to frame 0 when omitted; the bundles pass the diastasis frame ``int(0.72 T)`` at
    inference and a random frame per clip in training (their business, not the network's).
12. The network does not rescale intensities: mapping to ``[-1, 1]`` (and resizing to 512) is the data pipeline's
    job, so the same network serves any input size the bundle chooses.
13. Search (not in the paper, whose argmax is global): ``search="global"`` is the paper and the default;
    ``"chained"`` searches each frame in a ``|dy|, |dx| <= search_radius`` window around the point's estimate in the
    neighbouring frame, chained outward from its query frame in both directions, so a point cannot jump to distant
    look-alike speckle; ``"coarse_to_fine"`` centres that window on the coarsest scale's argmax. The settings are
    plain attributes (no parameters or buffers), so one checkpoint serves every mode, and :meth:`SpeckNet.track`
    takes per-call overrides.
14. Radius units: the paper's "five-pixel radius" is ambiguous between input pixels and feature cells; the
    soft-argmax ``radius`` is in finest-grid cells by default (``radius_unit="cells"``: 5 cells = 40 input pixels,
    the authors' code) and in input pixels with ``radius_unit="pixels"`` (divided by the finest feature stride,
    ``feature_strides[0]`` = 8, before the op; 5 pixels = 0.625 cells: the disc holds the argmax cell alone).
    ``search_radius`` is always in finest-grid cells (it bounds the hard argmax, whose resolution is one cell), so
    switching the soft-argmax unit never changes the search window.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.ops.cost_volume import cost_volume_track, sample_query_features

__all__ = ["PreActBlock", "PreActBlockGroup", "SpeckNet", "SpeckNetBundleAdapter", "centred_grid", "split_pred"]

# The op's pixel centres sit at i + 0.5, the data pipeline's at i.
_OP_OFFSET = 0.5
_SEARCHES = ("global", "chained", "coarse_to_fine")
_RADIUS_UNITS = ("cells", "pixels")


class PreActBlock(nn.Module):
    """Pre-activation residual block with InstanceNorm (TAP-Net ``BlockV2``).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first 3x3 convolution (and of the projection).
        use_projection: 1x1-convolution shortcut from the pre-activated input; required when the shape changes.
        norm_eps: InstanceNorm epsilon.

    Shapes: ``(M, in_channels, h, w) -> (M, out_channels, ceil(h / stride), ceil(w / stride))``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, use_projection: bool = False, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"PreActBlock: stride must be >= 1, got {stride}")
        if not use_projection and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"PreActBlock: an identity shortcut needs stride 1 and in_channels == out_channels, got stride "
                f"{stride}, {in_channels} -> {out_channels}; set use_projection=True"
            )
        self.norm_0 = nn.InstanceNorm2d(in_channels, eps=norm_eps, affine=True, track_running_stats=False)
        self.conv_0 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm_1 = nn.InstanceNorm2d(out_channels, eps=norm_eps, affine=True, track_running_stats=False)
        self.conv_1 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.proj = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if use_projection else None

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.norm_0(x))
        # pre-activation: the projection sees the normalised input, the identity shortcut the raw one (ResNet v2)
        shortcut = x if self.proj is None else self.proj(a)
        y = self.conv_1(F.relu(self.norm_1(self.conv_0(a))))
        return y + shortcut


class PreActBlockGroup(nn.Sequential):
    """``num_blocks`` :class:`PreActBlock` s; the first carries the stride and the projection shortcut.

    Shapes: ``(M, in_channels, h, w) -> (M, out_channels, ceil(h / stride), ceil(w / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int, norm_eps: float = 1e-5):
        if num_blocks < 1:
            raise ValueError(f"PreActBlockGroup: num_blocks must be >= 1, got {num_blocks}")
        blocks = [PreActBlock(in_channels, out_channels, stride, use_projection=True, norm_eps=norm_eps)]
        blocks += [PreActBlock(out_channels, out_channels, 1, False, norm_eps) for _ in range(num_blocks - 1)]
        super().__init__(*blocks)


def _as_int_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    vals = (int(value),) * length if isinstance(value, int) else tuple(int(v) for v in value)
    if len(vals) != length:
        raise ValueError(f"SpeckNet: {name} needs {length} entries (one per block group), got {value!r}")
    return vals


class SpeckNet(nn.Module):
    """SpeckNet point tracker (see the module docstring for the architecture and conventions).

    Args:
        in_channels: image channels ``C`` (1 for grayscale B-mode).
        channels: output channels of the four block groups; ``channels[0]`` is also the stem width.
        blocks_per_group: residual blocks per group (an int for all groups, or four ints).
        strides: stride of each group.
        feature_groups: indices of the groups whose outputs form the feature pyramid (the last three); the first
            listed group must have the finest grid.
        unshuffle: pixel-unshuffle factor in front of the stem.
        form: cost form of the op, ``"paper"`` (``((c + 1) / 2) ** gamma``) or ``"authors"`` (``c ** 4``, squared).
        gamma: exponent of the paper form.
        radius: soft-argmax window radius (strict ``<``), in ``radius_unit``.
        search: where the hard argmax may fall: ``"global"`` (the whole frame, the paper), ``"chained"`` (a
            window around the point's estimate in the neighbouring frame, chained outward from its query frame) or
            ``"coarse_to_fine"`` (a window around the coarsest scale's argmax); see
            :func:`~common.ops.cost_volume.cost_volume_track`.
        search_radius: half-width of the square search window (``|dy|, |dx| <= search_radius``) in finest-grid
            cells, at least 1. Unused by ``"global"``.
        radius_unit: unit of ``radius``: ``"cells"`` (finest feature-grid cells, 8 input pixels by default) or
            ``"pixels"`` (input pixels, divided by the finest feature stride before the op; the paper's "five-pixel
            radius").
        chunk_frames: frames per chunk of the op (memory knob; results do not depend on it).
        chunk_points: query points per chunk of the op.
        encoder_chunk_frames: encode at most this many frames at once (0: all ``B * T`` frames in one call); results do
            not depend on it because InstanceNorm is per frame.
        backend: cost-volume backend, ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        norm_eps: InstanceNorm epsilon.

    Shapes: ``forward(video (B, T, H, W) | (B, T, C, H, W), query_points (B, N, 2), query_frames (B, N))`` ->
    ``{"tracks": (B, T, N, 2), "confidence": (B, T, N)}``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64, 64),
        blocks_per_group: int | Sequence[int] = 2,
        strides: Sequence[int] = (1, 2, 1, 2),
        feature_groups: Sequence[int] = (1, 2, 3),
        unshuffle: int = 2,
        form: str = "paper",
        gamma: float = 15.0,
        radius: float = 5.0,
        search: str = "global",
        search_radius: float = 4.0,
        radius_unit: str = "cells",
        chunk_frames: int = 8,
        chunk_points: int = 64,
        encoder_chunk_frames: int = 0,
        backend: str = "auto",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        num_groups = len(tuple(channels))
        if num_groups < 1:
            raise ValueError("SpeckNet: channels must name at least one block group")
        chans = _as_int_tuple(tuple(channels), num_groups, "channels")
        blocks = _as_int_tuple(blocks_per_group, num_groups, "blocks_per_group")
        strd = _as_int_tuple(tuple(strides), num_groups, "strides")
        groups = tuple(int(g) for g in feature_groups)
        if in_channels < 1 or unshuffle < 1:
            raise ValueError(f"SpeckNet: in_channels and unshuffle must be >= 1, got {in_channels}, {unshuffle}")
        if not groups or any(g < 0 or g >= num_groups for g in groups) or len(set(groups)) != len(groups):
            raise ValueError(f"SpeckNet: feature_groups must be distinct indices in [0, {num_groups}), got {groups}")
        if form not in ("paper", "authors"):
            raise ValueError(f"SpeckNet: form must be 'paper' or 'authors', got {form!r}")
        if not gamma > 0:
            raise ValueError(f"SpeckNet: gamma must be positive, got {gamma}")
        if chunk_frames < 1 or chunk_points < 1 or encoder_chunk_frames < 0:
            raise ValueError(
                f"SpeckNet: chunk sizes must be >= 1 (encoder_chunk_frames >= 0), got {chunk_frames}, "
                f"{chunk_points}, {encoder_chunk_frames}"
            )
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"SpeckNet: backend must be 'auto', 'torch' or 'triton', got {backend!r}")

        self.in_channels = int(in_channels)
        self.unshuffle_factor = int(unshuffle)
        self.feature_groups = groups
        self.form = form
        self.gamma = float(gamma)
        self.chunk_frames = int(chunk_frames)
        self.chunk_points = int(chunk_points)
        self.encoder_chunk_frames = int(encoder_chunk_frames)
        self.backend = backend

        self.unshuffle = nn.PixelUnshuffle(self.unshuffle_factor)
        self.stem = nn.Conv2d(self.in_channels * self.unshuffle_factor**2, chans[0], 7, stride=2, padding=3, bias=False)
        self.groups = nn.ModuleList()
        prev = chans[0]
        for c, n, s in zip(chans, blocks, strd):
            self.groups.append(PreActBlockGroup(prev, c, n, s, norm_eps))
            prev = c

        # input-pixel stride of every group's output; H and W must be multiples of the largest
        total, group_strides = self.unshuffle_factor * 2, []
        for s in strd:
            total *= s
            group_strides.append(total)
        self.group_strides = tuple(group_strides)
        self.feature_strides = tuple(group_strides[g] for g in groups)
        if min(self.feature_strides) != self.feature_strides[0]:
            raise ValueError(
                f"SpeckNet: the first feature group must have the finest grid (the op's soft-argmax grid), got "
                f"strides {self.feature_strides} for feature_groups {groups}"
            )
        self.size_multiple = max(self.group_strides)
        # validated through the same checks as the per-call overrides of track(); plain attributes, no buffers, so
        # checkpoints stay interchangeable whatever the search settings
        self._search_settings(radius, radius_unit, search, search_radius)
        self.radius = float(radius)
        self.radius_unit = radius_unit
        self.search = search
        self.search_radius = float(search_radius)

    # ------------------------------------------------------------------------------------------------------------
    # encoder

    def _frames(self, video: Tensor) -> Tensor:
        """Validate ``video`` and return it as ``(B, T, C, H, W)``."""
        if not isinstance(video, Tensor):
            raise ValueError(f"SpeckNet: video must be a torch.Tensor, got {type(video).__name__}")
        if video.ndim == 4:
            if self.in_channels != 1:
                raise ValueError(
                    f"SpeckNet: a (B, T, H, W) video has one channel but the network expects in_channels="
                    f"{self.in_channels}; pass (B, T, C, H, W)"
                )
            video = video.unsqueeze(2)
        if video.ndim != 5 or video.shape[2] != self.in_channels:
            raise ValueError(
                f"SpeckNet: video must have shape (B, T, H, W) or (B, T, {self.in_channels}, H, W), got "
                f"{tuple(video.shape)}"
            )
        if not video.is_floating_point():
            raise ValueError(
                f"SpeckNet: video must be floating point with intensities in [-1, 1] (e.g. 2 * u8 / 255 - 1), got "
                f"{video.dtype}"
            )
        b, t, _, h, w = video.shape
        m = self.size_multiple
        if b < 1 or t < 1 or h < m or w < m or h % m or w % m:
            raise ValueError(
                f"SpeckNet: video (B, T, C, H, W) = {tuple(video.shape)} needs B, T >= 1 and H, W positive multiples "
                f"of {m} (the coarsest feature stride); resize it (the bundles resize to 512 x 512)"
            )
        return video

    def _encode_frames(self, frames: Tensor) -> list[Tensor]:
        """(M, C, H, W) -> per feature group (M, D_s, H_s, W_s), L2-normalised over D_s."""
        x = self.stem(self.unshuffle(frames))
        outs: dict[int, Tensor] = {}
        last = max(self.feature_groups)
        for i, group in enumerate(self.groups):
            if i > last:
                break  # later groups feed no feature map
            x = group(x)
            if i in self.feature_groups:
                outs[i] = F.normalize(x, dim=1, eps=1e-12)
        return [outs[g] for g in self.feature_groups]

    def encode(self, video: Tensor) -> list[Tensor]:
        """Feature pyramid of every frame.

        Args:
            video: (B, T, H, W) or (B, T, C, H, W) frames in ``[-1, 1]``.

        Returns:
            One ``(B, T, D_s, H / s, W / s)`` map per feature group, finest first, unit vectors over ``D_s``
            (``s = feature_strides``: 8, 8, 16 by default).
        """
        video = self._frames(video)
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)
        step = self.encoder_chunk_frames or frames.shape[0]
        chunks = [self._encode_frames(frames[i : i + step]) for i in range(0, frames.shape[0], step)]
        maps = chunks[0] if len(chunks) == 1 else [torch.cat(parts, dim=0) for parts in zip(*chunks)]
        return [m.view(b, t, *m.shape[1:]) for m in maps]

    # ------------------------------------------------------------------------------------------------------------
    # tracking

    @staticmethod
    def _query_frames(query_frames: Tensor | int | None, b: int, n: int, t: int, device: torch.device) -> Tensor:
        """Normalise ``query_frames`` (None -> 0, int, (B,), (B, N)) to a (B, N) long tensor."""
        if query_frames is None:
            query_frames = 0
        if isinstance(query_frames, int):
            if not 0 <= query_frames < t:
                raise ValueError(f"SpeckNet: query frame {query_frames} is outside [0, {t})")
            return torch.full((b, n), query_frames, dtype=torch.long, device=device)
        if not isinstance(query_frames, Tensor) or query_frames.is_floating_point() or query_frames.is_complex():
            raise ValueError(f"SpeckNet: query_frames must be an int or an integer tensor, got {query_frames!r}")
        qf = query_frames.to(device=device, dtype=torch.long)
        if qf.ndim == 1 and qf.shape[0] == b:
            qf = qf[:, None].expand(b, n)
        if qf.shape != (b, n):
            raise ValueError(
                f"SpeckNet: query_frames must have shape (B,) or (B, N) = {(b, n)}, got {tuple(query_frames.shape)}"
            )
        # a range check reads the values; graph capture cannot branch on them (gather still fails loudly there)
        if not _capturing() and qf.numel() and (int(qf.min()) < 0 or int(qf.max()) >= t):
            raise ValueError(
                f"SpeckNet: query_frames must lie in [0, {t}), got range [{int(qf.min())}, {int(qf.max())}]"
            )
        return qf

    def _search_settings(
        self, radius: float, radius_unit: str, search: str, search_radius: float
    ) -> tuple[float, str, float]:
        """Validate the search settings; return ``(radius, search, search_radius)`` in finest-grid cells."""
        if radius_unit not in _RADIUS_UNITS:
            raise ValueError(f"SpeckNet: radius_unit must be one of {_RADIUS_UNITS}, got {radius_unit!r}")
        if search not in _SEARCHES:
            raise ValueError(f"SpeckNet: search must be one of {_SEARCHES}, got {search!r}")
        for name, value in (("radius", radius), ("search_radius", search_radius)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SpeckNet: {name} must be a finite positive number, got {value!r}")
        stride = self.feature_strides[0] if radius_unit == "pixels" else 1
        cells, search_cells = float(radius) / stride, float(search_radius)
        if search != "global" and search_cells < 1:
            raise ValueError(
                f"SpeckNet: search_radius={search_radius} finest-grid cells; the search window needs at least 1 cell"
            )
        return cells, search, search_cells

    def track(
        self,
        features: Sequence[Tensor],
        query_points: Tensor,
        query_frames: Tensor | int | None,
        image_size: tuple[int, int],
        *,
        radius: float | None = None,
        radius_unit: str | None = None,
        search: str | None = None,
        search_radius: float | None = None,
    ) -> dict[str, Tensor]:
        """Track query points through precomputed features (reuse one :meth:`encode` for several query sets).

        Args:
            features: output of :meth:`encode`, per scale (B, T, D_s, H_s, W_s), finest first.
            query_points: (B, N, 2) ``(x, y)`` input pixels, pixel centres at integers.
            query_frames: (B, N) or (B,) integer query frame per point (or per video), an int, or None (frame 0).
            image_size: (H, W) of the input video.
            radius, radius_unit, search, search_radius: per-call overrides of the module's settings (None: the
                module's), e.g. to report the soft-argmax in cells and in pixels from one encoding. ``radius`` is read
                in the effective ``radius_unit``; ``search_radius`` is always in finest-grid cells.

        Returns:
            ``{"tracks": (B, T, N, 2), "confidence": (B, T, N)}``; ``tracks[b, query_frames[b, n], n]`` equals
            ``query_points[b, n]`` exactly and its confidence is 1.
        """
        if not isinstance(query_points, Tensor) or query_points.ndim != 3 or query_points.shape[-1] != 2:
            raise ValueError(
                f"SpeckNet: query_points must have shape (B, N, 2) holding (x, y), got "
                f"{getattr(query_points, 'shape', type(query_points).__name__)}"
            )
        if not query_points.is_floating_point():
            raise ValueError(f"SpeckNet: query_points must be floating point, got {query_points.dtype}")
        b, t = features[0].shape[:2]
        n = query_points.shape[1]
        if query_points.shape[0] != b:
            raise ValueError(f"SpeckNet: query_points has batch size {query_points.shape[0]}, the video has {b}")
        radius_cells, search, search_cells = self._search_settings(
            self.radius if radius is None else radius,
            self.radius_unit if radius_unit is None else radius_unit,
            self.search if search is None else search,
            self.search_radius if search_radius is None else search_radius,
        )
        device = features[0].device
        qf = self._query_frames(query_frames, b, n, t, device)
        qp = query_points.to(device=device, dtype=features[0].dtype)
        op_points = qp + _OP_OFFSET
        qfeats = [_sample_on_query_frames(f, op_points, qf, image_size) for f in features]
        # the exact replacement on query frames happens below, in the caller's convention, where (q + 0.5) - 0.5
        # rounding cannot disturb it; the op gets the query points only when the chained search starts from them
        chained = search == "chained"
        est = cost_volume_track(
            qfeats,
            list(features),
            image_size,
            form=self.form,
            gamma=self.gamma,
            radius=radius_cells,
            search=search,
            # unused by "global"; a pixel setting may be under one cell there, which the op would reject
            search_radius=search_cells if search != "global" else 4.0,
            query_points=op_points if chained else None,
            query_frames=qf if chained else None,
            chunk_frames=self.chunk_frames,
            chunk_points=self.chunk_points,
            backend=self.backend,
        )
        positions = est.positions - _OP_OFFSET
        is_query = torch.arange(t, device=device)[None, :, None] == qf[:, None, :]  # (B, T, N)
        tracks = torch.where(is_query[..., None], qp[:, None].to(positions.dtype), positions)
        confidence = torch.where(is_query, torch.ones_like(est.confidence), est.confidence)
        return {"tracks": tracks, "confidence": confidence}

    def forward(
        self, video: Tensor, query_points: Tensor, query_frames: Tensor | int | None = None
    ) -> dict[str, Tensor]:
        """Track ``N`` query points through a video.

        Args:
            video: (B, T, H, W) or (B, T, C, H, W) frames in ``[-1, 1]``; H, W multiples of 16.
            query_points: (B, N, 2) ``(x, y)`` input pixels, pixel ``[r, c]`` centred at ``(x=c, y=r)``.
            query_frames: (B, N) or (B,) integer query frame of each point (or video), an int, or None (frame 0).

        Returns:
            ``{"tracks": (B, T, N, 2) (x, y) pixels, "confidence": (B, T, N) in [0, 1]}``.
        """
        video = self._frames(video)
        features = self.encode(video)
        return self.track(features, query_points, query_frames, (int(video.shape[-2]), int(video.shape[-1])))


def _sample_on_query_frames(
    feature_maps: Tensor, points: Tensor, query_frames: Tensor, image_size: tuple[int, int]
) -> Tensor:
    """Bilinear query features of each point on its own query frame: (B, T, D, h, w), (B, N, 2), (B, N) -> (B, N, D).

    Same values as :func:`common.ops.cost_volume.sample_query_features_multiframe` (``align_corners=False``, border
    padding; a test checks the match). It samples every frame and gathers the query frame instead of gathering first:
    ``T`` times more (negligible, ``B * T * N * D``) sampling work, but no data-dependent Python branch, so
    :func:`torch.export.export` can capture the network.
    """
    b, t, d = feature_maps.shape[:3]
    n = points.shape[1]
    frames = sample_query_features(
        feature_maps.flatten(0, 1), points[:, None].expand(b, t, n, 2).reshape(b * t, n, 2), image_size
    ).view(b, t, n, d)
    return frames.gather(1, query_frames[:, None, :, None].expand(b, 1, n, d))[:, 0]


def _capturing() -> bool:
    """True while torch.jit.trace / torch.export / torch.compile capture the graph (no data-dependent checks)."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


class SpeckNetBundleAdapter(SpeckNet):
    """SpeckNet with the MONAI-bundle calling convention: channel-first ``image`` in, one channel-first ``pred`` out.

    Same parameters as :class:`SpeckNet` (state dicts are interchangeable); the one extra constructor argument,
    ``default_grid``, has no weights. Use it with ``PrepareBatchExtraInput(extra_keys=["query_points",
    "query_frames"])`` and ``SimpleInferer`` so that the trainer/evaluator calls ``network(image, query_points,
    query_frames)``.

    Shapes: ``forward(image (B, C, T, H, W) | (B, T, H, W), query_points (B, N, 2) | None, query_frames (B, N) | (B,)
    | None)`` -> ``pred (B, 3, T, N)``: channel 0 x, channel 1 y (input pixels), channel 2 confidence;
    :func:`split_pred` returns them as ``tracks (B, T, N, 2)`` and ``confidence (B, T, N)``.

    ``pred`` is channel-first, like every MONAI network output, so that ``pred.shape[1]`` is the 3 channels that
    ``metadata.json`` declares (MONAI's ``verify_net_in_out`` checks axis 1). Without ``query_points`` the network
    tracks :func:`centred_grid` points (``default_grid x default_grid``, query frame 0): that is how the model zoo's
    checks call a bundle network (``network(image)``) and what ``ckpt_export --use_trace`` captures; real tracking
    always passes its query points.

    Args:
        default_grid: points per axis of the default query grid (``default_grid ** 2`` points).
        kwargs: as :class:`SpeckNet`.
    """

    def __init__(self, *args: Any, default_grid: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if int(default_grid) < 1:
            raise ValueError(f"SpeckNetBundleAdapter: default_grid must be >= 1, got {default_grid}")
        self.default_grid = int(default_grid)

    def forward(  # type: ignore[override]
        self, image: Tensor, query_points: Tensor | None = None, query_frames: Tensor | int | None = None
    ) -> Tensor:
        if isinstance(image, Tensor) and image.ndim == 5:
            if image.shape[1] != self.in_channels:
                raise ValueError(
                    f"SpeckNetBundleAdapter: image must be channel-first (B, {self.in_channels}, T, H, W), got "
                    f"{tuple(image.shape)}"
                )
            image = image.transpose(1, 2)  # (B, T, C, H, W)
        if query_points is None:
            if query_frames is not None:
                raise ValueError("SpeckNetBundleAdapter: query_frames given without query_points")
            video = self._frames(image)
            grid = centred_grid(int(video.shape[-2]), int(video.shape[-1]), self.default_grid, device=video.device,
                                dtype=video.dtype)
            query_points = grid[None].expand(video.shape[0], -1, -1)
        out = super().forward(image, query_points, query_frames)
        # (B, T, N, 3) -> channel-first (B, 3, T, N)
        return torch.cat([out["tracks"], out["confidence"][..., None]], dim=-1).permute(0, 3, 1, 2)


def centred_grid(height: int, width: int, points_per_axis: int, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``points_per_axis ** 2`` query points ``(N, 2)`` ``(x, y)``: the cell centres of a regular
    ``points_per_axis x points_per_axis`` tiling of an ``height x width`` image (pixel centres at integers), so the
    grid is symmetric about the image centre; row-major order (y outer, x inner)."""
    g = int(points_per_axis)
    if g < 1 or height < 1 or width < 1:
        raise ValueError(f"centred_grid: sizes must be positive, got {height} x {width} with {points_per_axis} points")
    steps = (torch.arange(g, device=device, dtype=dtype) + 0.5) / g
    ys, xs = torch.meshgrid(steps * height - 0.5, steps * width - 0.5, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def split_pred(pred: Tensor) -> tuple[Tensor, Tensor]:
    """Split an adapter output ``pred (B, 3, T, N)`` into tracks ``(B, T, N, 2)`` and confidence ``(B, T, N)``."""
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"split_pred: pred must be channel-first (B, 3, T, N) = (x, y, confidence), got "
                         f"{tuple(pred.shape)}")
    return pred[:, :2].permute(0, 2, 3, 1), pred[:, 2]
