"""Displacement estimators for unsupervised registration behind one interface, and the VoxelMorph estimator.

AdaCS (``METHODS.md`` §3) trains a displacement estimator ``f`` with a correspondence-scoring net ``g``; at inference
only ``f`` is used. Every estimator here is a :class:`DisplacementEstimator`:

``f(I_s, I_t) -> (warped, displacement)``

* ``source`` ``I_s`` and ``target`` ``I_t``: ``(B, 1, *spatial)``, ``spatial = (H, W)`` for ``spatial_dims=2`` and
  ``(D, H, W)`` for ``spatial_dims=3``.
* ``displacement`` ``û``: ``(B, spatial_dims, *spatial)`` in **pixels (voxels)**, channel ``k`` is the displacement
  along spatial axis ``k`` of the tensor (2D: channel 0 along ``H`` (rows, "y"), channel 1 along ``W`` (columns,
  "x")). It is a *backward* (pull) field: ``warped(x) = I_s(x + û(x))``, the MONAI ``Warp`` convention.
* ``warped``: ``(B, 1, *spatial)``, the source resampled at ``x + û(x)`` with bilinear (trilinear in 3D)
  interpolation, pixel centres at integer coordinates (``align_corners=True``) and zeros outside the image (as
  MONAI's ``VoxelMorph`` and the AdaCS authors' ``grid_sample`` calls).

:meth:`DisplacementEstimator.warp` applies a displacement to any image (``mode="bilinear"``) or label map
(``mode="nearest"``). MONAI bundles use one input key ``image`` and one output key ``pred``, so a pair is also
accepted stacked as ``image = (B, 2, *spatial)`` (channel 0 source, channel 1 target):
:meth:`DisplacementEstimator.forward_stacked` and the wrapper :class:`StackedPairAdapter` return the displacement
only; the adapter holds nothing but the estimator, so an exported inference model carries no scoring parameters.

Estimators are built by name with :func:`build_displacement_estimator` (``"voxelmorph"``, ``"transmorph"``,
``"diffusemorph"``: rows of :data:`ESTIMATORS`).

VoxelMorph (:class:`VoxelMorphEstimator`) wraps MONAI 1.6.1's ``VoxelMorph`` (``VoxelMorphUNet`` backbone,
``DVF2DDF`` scaling-and-squaring with 7 steps, ``Warp``). The backbone channels are given in the VoxelMorph paper's
form ``enc = [16, 32, 32, 32]``, ``dec = [32, 32, 32, 32, 32, 16, 16]`` and mapped onto MONAI's
``VoxelMorphUNet(channels, unet_out_channels, final_conv_channels)`` by :func:`voxelmorph_unet_channels`: the
encoder convolutions run at ``1, 1/2, 1/4, 1/8`` of the input, the bottleneck at ``1/16``, so every spatial size must
be divisible by ``2 ** len(enc)`` (16 by default).

Choices made here that neither the paper nor ``METHODS.md`` states:

* The last convolution of the backbone (the velocity head) starts with weights ``N(0, 1e-5)`` and zero bias, as in
  the VoxelMorph authors' code (MONAI keeps PyTorch's default init), so training starts near the identity.
* ``half_res`` (integrate the velocity at half resolution, the authors' ``int_downsize=2``) is off by default
  (MONAI's default). MONAI 1.6.1's own half-resolution path hard-codes ``trilinear`` interpolation (it fails in 2D)
  and scales the field the wrong way round, so with ``half_res=True`` the integration is done here from the MONAI
  modules with VoxelMorph's scaling: ``v_half = 0.5 * down(v)``, ``û = 2 * up(DVF2DDF(v_half))``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.warp import Warp
from monai.networks.nets.voxelmorph import VoxelMorph, VoxelMorphUNet
from torch import Tensor, nn

__all__ = [
    "ESTIMATORS",
    "DisplacementEstimator",
    "ScriptableStackedVoxelMorph",
    "StackedPairAdapter",
    "VoxelMorphEstimator",
    "build_displacement_estimator",
    "pull_warp",
    "voxelmorph_unet_channels",
]

WARP_MODES = ("bilinear", "nearest")


def voxelmorph_unet_channels(
    enc_channels: Sequence[int], dec_channels: Sequence[int]
) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Map VoxelMorph's ``(enc, dec)`` feature lists onto MONAI ``VoxelMorphUNet`` arguments.

    VoxelMorph: encoder convolution ``i`` (``enc[i]`` channels) at ``1 / 2**i``; decoder convolution ``j`` for
    ``j < n = len(enc)`` at ``1 / 2**(n - j)`` followed by nearest upsampling and concatenation with the encoder
    feature of that size; the remaining ``dec[n:]`` convolutions at full resolution. MONAI builds the same U-Net
    recursively from pairs ``(enc[i], dec[n - 1 - i])``, the top decoder convolution ``dec[n]`` and the final
    convolutions ``dec[n + 1:]``.

    Returns:
        ``(channels, unet_out_channels, final_conv_channels)`` for ``VoxelMorphUNet``.
    """
    enc, dec = [int(c) for c in enc_channels], [int(c) for c in dec_channels]
    n = len(enc)
    if n < 1:
        raise ValueError("enc_channels must list at least one encoder convolution")
    if len(dec) < n + 1:
        raise ValueError(f"dec_channels needs at least len(enc_channels) + 1 = {n + 1} entries, got {len(dec)}")
    if min(enc + dec) < 1:
        raise ValueError(f"channel counts must be positive, got enc={enc} dec={dec}")
    channels: list[int] = []
    for i in range(n):
        channels += [enc[i], dec[n - 1 - i]]
    return tuple(channels), dec[n], tuple(dec[n + 1 :])


class DisplacementEstimator(nn.Module):
    """Base class of the displacement estimators ``f(I_s, I_t) -> (warped, displacement)``.

    Subclasses implement :meth:`predict_displacement`; :meth:`forward` checks the pair, predicts ``û`` and warps the
    source with it. See the module docstring for the conventions (shapes, units, channel order, interpolation).

    Args:
        spatial_dims: 2 or 3.
        size_divisor: every spatial size of an input must be a multiple of this (the network's total downsampling).
    """

    def __init__(self, spatial_dims: int = 2, size_divisor: int = 1) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self.spatial_dims = int(spatial_dims)
        self.size_divisor = int(size_divisor)
        # one resampler per mode: MONAI's Warp caches its reference grid, so they are not shared with the nets
        self.warp_linear = Warp(mode="bilinear", padding_mode="zeros")
        self.warp_nearest = Warp(mode="nearest", padding_mode="zeros")

    def _apply(self, fn, recurse=True):
        # MONAI's Warp caches its reference grid as a plain attribute (not a buffer) and reuses it whenever the shape
        # matches, so after .to(device/dtype) a stale grid would be reused: drop the caches with every move
        for module in self.modules():
            if isinstance(module, Warp):
                module.ref_grid = None
        return super()._apply(fn, recurse)

    def check_pair(self, source: Tensor, target: Tensor) -> None:
        """Raise ``ValueError`` unless ``source`` and ``target`` are single-channel images of one valid shape."""
        for name, t in (("source", source), ("target", target)):
            if t.ndim != self.spatial_dims + 2:
                raise ValueError(
                    f"{name} must have shape (B, 1, {'D, ' if self.spatial_dims == 3 else ''}H, W) "
                    f"for spatial_dims={self.spatial_dims}, got {tuple(t.shape)}"
                )
            if t.shape[1] != 1:
                raise ValueError(f"{name} must have 1 channel, got {t.shape[1]} (shape {tuple(t.shape)})")
        if source.shape != target.shape:
            raise ValueError(f"source and target shapes differ: {tuple(source.shape)} vs {tuple(target.shape)}")
        bad = [s for s in source.shape[2:] if s % self.size_divisor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(source.shape[2:])} of source/target must be divisible by "
                f"{self.size_divisor} for {type(self).__name__}"
            )

    def predict_displacement(self, source: Tensor, target: Tensor) -> Tensor:
        """Displacement ``(B, spatial_dims, *spatial)`` in pixels for a checked pair; implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_displacement")

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Register ``source`` to ``target``.

        Args:
            source: ``(B, 1, *spatial)`` moving image ``I_s``.
            target: ``(B, 1, *spatial)`` fixed image ``I_t``.

        Returns:
            ``(warped, displacement)``: ``(B, 1, *spatial)`` and ``(B, spatial_dims, *spatial)`` (pixels).
        """
        self.check_pair(source, target)
        displacement = self.predict_displacement(source, target)
        return self.warp(source, displacement, "bilinear"), displacement

    def warp(self, image: Tensor, displacement: Tensor, mode: str = "bilinear") -> Tensor:
        """Resample ``image`` at ``x + displacement(x)``.

        Args:
            image: ``(B, C, *spatial)``; any number of channels (e.g. a one-hot label map).
            displacement: ``(B, spatial_dims, *spatial)`` in pixels.
            mode: ``"bilinear"`` for images (trilinear in 3D) or ``"nearest"`` for label maps.

        Returns:
            ``(B, C, *spatial)``; zeros where ``x + û(x)`` falls outside the image.
        """
        if mode not in WARP_MODES:
            raise ValueError(f"warp mode must be one of {WARP_MODES}, got {mode!r}")
        expected = (image.shape[0], self.spatial_dims, *image.shape[2:])
        if image.ndim != self.spatial_dims + 2 or tuple(displacement.shape) != expected:
            raise ValueError(
                f"displacement shape {tuple(displacement.shape)} does not fit image shape {tuple(image.shape)}; "
                f"expected {expected}"
            )
        warper = self.warp_linear if mode == "bilinear" else self.warp_nearest
        # grid_sample needs one dtype: label maps (int/bool) are resampled as float and cast back
        if not image.is_floating_point():
            return warper(image.to(displacement.dtype), displacement).round().to(image.dtype)
        return warper(image, displacement.to(image.dtype))

    #: ``True`` when :meth:`predict_displacement_and_velocity` exists (a velocity-field estimator such as VoxelMorph)
    has_velocity: bool = False

    def predict_displacement_and_velocity(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(displacement, velocity)`` for a checked pair; only estimators that integrate a velocity field have it."""
        raise ValueError(
            f"{type(self).__name__} predicts the displacement directly and has no velocity field to regularise; "
            "use the displacement regulariser (regularization='displacement') or a VoxelMorph estimator"
        )

    #: ``True`` when the estimator's training objective has a term of its own (DiffuseMorph's denoising loss),
    #: returned by :meth:`predict_displacement_and_training_loss` from the same forward as the displacement
    has_training_loss: bool = False

    def predict_displacement_and_training_loss(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(displacement, the estimator's own training loss)``; only estimators with such a term have it."""
        raise ValueError(f"{type(self).__name__} has no training loss of its own (has_training_loss is False)")

    def forward_stacked(self, image: Tensor, return_velocity: bool = False,
                        return_training_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Displacement for a stacked pair ``image = (B, 2, *spatial)`` (channel 0 source, channel 1 target).

        Args:
            image: the stacked pair.
            return_velocity: also return the velocity field that was integrated
                (:meth:`predict_displacement_and_velocity`; training with the authors' regulariser).
            return_training_loss: also return the estimator's own training loss
                (:meth:`predict_displacement_and_training_loss`; DiffuseMorph's denoising loss).

        Returns:
            ``(B, spatial_dims, *spatial)`` displacement in pixels, ``(displacement, velocity)`` or
            ``(displacement, training loss)``.
        """
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != 2:
            raise ValueError(
                f"image must stack source and target as 2 channels, shape (B, 2, *spatial) with "
                f"{self.spatial_dims} spatial dims; got {tuple(image.shape)}"
            )
        source, target = image[:, 0:1], image[:, 1:2]
        self.check_pair(source, target)
        if return_velocity and return_training_loss:
            raise ValueError("return_velocity and return_training_loss cannot be combined")
        if return_velocity:
            return self.predict_displacement_and_velocity(source, target)
        if return_training_loss:
            return self.predict_displacement_and_training_loss(source, target)
        return self.predict_displacement(source, target)  # inference needs no warped image

    def inverse_displacement(self, displacement: Tensor, velocity: Tensor | None = None) -> Tensor:
        """Approximate inverse of ``displacement`` for bidirectional training: ``-û`` (the TransMorph/AdaCS authors'
        ``neg_flow``). Velocity estimators override it with the integral of ``-v``."""
        return -displacement

    def scriptable_stacked(self) -> nn.Module:
        """A ``torch.jit.script``-able module computing :meth:`forward_stacked` with this estimator's weights.

        Raises:
            RuntimeError: the estimator has no scriptable form (export it by tracing instead).
        """
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled with torch.jit.script (MONAI's Swin blocks and Warp are not "
            "scriptable); export it by tracing: `python -m monai.bundle ckpt_export ... --use_trace True "
            "--input_shape \"[1, 2, H, W]\"` (see the bundle README, section Export)"
        )


class StackedPairAdapter(nn.Module):
    """Bundle-facing wrapper: ``image (B, 2, *spatial) -> displacement (B, spatial_dims, *spatial)``.

    Channel 0 of ``image`` is the source, channel 1 the target. The adapter owns only ``estimator`` (its state-dict
    keys are ``estimator.*``), which is what gets exported: the scoring net is never part of it.
    """

    def __init__(self, estimator: DisplacementEstimator) -> None:
        super().__init__()
        if not isinstance(estimator, DisplacementEstimator):
            raise ValueError(f"estimator must be a DisplacementEstimator, got {type(estimator).__name__}")
        self.estimator = estimator

    def forward(self, image: Tensor, return_velocity: bool = False,
                return_training_loss: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Displacement of the stacked pair; ``return_velocity`` also returns the integrated velocity,
        ``return_training_loss`` the estimator's own training loss (training only)."""
        return self.estimator.forward_stacked(image, return_velocity, return_training_loss)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script (and so `monai.bundle ckpt_export` without --use_trace) calls this hook first and
        # compiles what it returns. The eager estimators hold MONAI's Warp, which TorchScript rejects (it caches its
        # grid in a plain attribute and branches on a compile-time flag); inference needs only the displacement, so
        # the estimator hands over an equivalent TorchScript-compatible module that shares its weights.
        return self.estimator.scriptable_stacked()


class VoxelMorphEstimator(DisplacementEstimator):
    """VoxelMorph (Balakrishnan et al. 2019, diffeomorphic variant) on MONAI's ``VoxelMorph``.

    ``cat(I_s, I_t)`` -> ``VoxelMorphUNet`` -> stationary velocity ``v`` ``(B, spatial_dims, *spatial)`` ->
    ``DVF2DDF`` (scaling and squaring, ``integration_steps`` steps) -> displacement ``û``; ``integration_steps=0``
    gives the non-diffeomorphic variant (``û = v``).

    Args:
        spatial_dims: 2 or 3.
        enc_channels: encoder convolution widths (VoxelMorph form), default ``(16, 32, 32, 32)``.
        dec_channels: decoder convolution widths (VoxelMorph form), default ``(32, 32, 32, 32, 32, 16, 16)``.
        integration_steps: scaling-and-squaring steps, default 7.
        half_res: integrate at half resolution (the authors' ``int_downsize=2``); default ``False``.

    Input ``(B, 1, *spatial)`` pairs with every spatial size divisible by ``2 ** len(enc_channels)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        enc_channels: Sequence[int] = (16, 32, 32, 32),
        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        integration_steps: int = 7,
        half_res: bool = False,
    ) -> None:
        super().__init__(spatial_dims=spatial_dims, size_divisor=2 ** len(enc_channels))
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        if half_res and integration_steps == 0:
            raise ValueError("half_res integration needs integration_steps > 0")
        channels, unet_out, final_convs = voxelmorph_unet_channels(enc_channels, dec_channels)
        backbone = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            unet_out_channels=unet_out,
            channels=channels,
            final_conv_channels=final_convs,
        )
        head = backbone.net[1].final_conv_out.conv
        nn.init.normal_(head.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(head.bias)
        self.half_res = bool(half_res)
        self.integration_steps = int(integration_steps)
        # MONAI's own half-res branch is never used (half_res=False here); see the module docstring
        self.net = VoxelMorph(
            backbone=backbone, integration_steps=integration_steps, half_res=False, spatial_dims=spatial_dims
        )

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(warped (B, 1, *spatial), displacement (B, spatial_dims, *spatial))``; see the class docstring."""
        if not self.half_res:
            self.check_pair(source, target)
            return self.net(source, target)
        return super().forward(source, target)

    has_velocity = True

    def predict_displacement(self, source: Tensor, target: Tensor) -> Tensor:
        return self._integrate(self.net.backbone(torch.cat([source, target], dim=1)))[0]

    def predict_displacement_and_velocity(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(displacement, velocity)``; see :meth:`forward_with_velocity` for the velocity's grid and units."""
        return self._integrate(self.net.backbone(torch.cat([source, target], dim=1)))

    def _integrate(self, velocity: Tensor) -> tuple[Tensor, Tensor]:
        """``(displacement, integrated velocity)``; the latter is on the half-resolution grid when ``half_res``."""
        if self.integration_steps == 0:
            return velocity, velocity
        if not self.half_res:
            return self.net.dvf2ddf(velocity), velocity
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        # a displacement of d pixels is d / 2 pixels on the half-resolution grid, and back
        half = 0.5 * F.interpolate(velocity, scale_factor=0.5, mode=mode, align_corners=True)
        ddf = 2.0 * F.interpolate(self.net.dvf2ddf(half), size=velocity.shape[2:], mode=mode, align_corners=True)
        return ddf, half

    def inverse_displacement(self, displacement: Tensor, velocity: Tensor | None = None) -> Tensor:
        """Inverse field by integrating ``-v`` (the VoxelMorph authors' bidirectional form), on ``displacement``'s grid.

        ``velocity`` is the field :meth:`predict_displacement_and_velocity` returned (half resolution with
        ``half_res``).
        """
        if velocity is None:
            raise ValueError("VoxelMorph's inverse displacement integrates -v: pass the velocity returned by "
                             "predict_displacement_and_velocity")
        if self.integration_steps == 0:
            return -velocity
        if not self.half_res:
            return self.net.dvf2ddf(-velocity)
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return 2.0 * F.interpolate(self.net.dvf2ddf(-velocity), size=displacement.shape[2:], mode=mode,
                                   align_corners=True)

    def scriptable_stacked(self) -> nn.Module:
        """:class:`ScriptableStackedVoxelMorph` sharing this estimator's backbone (see :meth:`forward_stacked`)."""
        warp = self.net.dvf2ddf.warp_layer if self.integration_steps > 0 else self.warp_linear
        return ScriptableStackedVoxelMorph(
            self.net.backbone, self.spatial_dims, self.size_divisor, self.integration_steps, self.half_res,
            warp._interp_mode_native, warp._padding_mode_native,
        )

    def forward_with_velocity(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(warped, displacement, velocity)``: also the stationary velocity field that was integrated.

        ``velocity`` is ``(B, spatial_dims, *spatial)``, or ``(B, spatial_dims, *spatial / 2)`` in half-resolution
        pixels when ``half_res`` — the field the VoxelMorph/AdaCS authors' code regularises (their
        ``preint_flow``), for engines that want that form of ``λ‖∇·‖²`` instead of the paper's ``‖∇û‖²``.
        """
        self.check_pair(source, target)
        displacement, velocity = self.predict_displacement_and_velocity(source, target)
        return self.warp(source, displacement, "bilinear"), displacement, velocity


def pull_warp(image: Tensor, ddf: Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """``image`` resampled at ``x + ddf(x)`` (TorchScript-compatible; the PyTorch path of MONAI's ``Warp``).

    Args:
        image: ``(B, C, *spatial)``.
        ddf: ``(B, len(spatial), *spatial)`` displacement in pixels, channel ``k`` along spatial axis ``k``.
        mode, padding_mode: as ``torch.nn.functional.grid_sample``.

    Pixel centres are at integer coordinates (``align_corners=True``); a singleton axis maps to -1 as in MONAI.
    """
    nd = ddf.dim() - 2
    ranges = [torch.arange(int(ddf.shape[2 + i]), device=ddf.device, dtype=ddf.dtype) for i in range(nd)]
    position = torch.stack(torch.meshgrid(ranges, indexing="ij"), dim=0).unsqueeze(0) + ddf
    # grid_sample wants normalised coordinates in [-1, 1] with the last spatial axis first (x, y[, z])
    axes: list[Tensor] = []
    for i in range(nd - 1, -1, -1):
        axes.append(position[:, i] * 2.0 / max(int(ddf.shape[2 + i]) - 1, 1) - 1.0)
    return F.grid_sample(image, torch.stack(axes, dim=-1), mode=mode, padding_mode=padding_mode, align_corners=True)


class ScriptableStackedVoxelMorph(nn.Module):
    """TorchScript form of ``StackedPairAdapter(VoxelMorphEstimator)``: ``image (B, 2, *spatial) -> displacement
    (B, spatial_dims, *spatial)`` in pixels, with the estimator's own backbone module (shared weights).

    Same computation as :meth:`VoxelMorphEstimator.forward_stacked`: backbone on the stacked pair (channel 0 source,
    channel 1 target = ``cat(source, target)``), then scaling and squaring (MONAI ``DVF2DDF``: ``v / 2**steps``,
    ``steps`` times ``u <- u + warp(u, u)``) with :func:`pull_warp` in place of MONAI's ``Warp`` (equal to its
    PyTorch path; a test compares the scripted module with the eager estimator).
    """

    def __init__(self, backbone: nn.Module, spatial_dims: int, size_divisor: int, integration_steps: int,
                 half_res: bool, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = int(spatial_dims)
        self.size_divisor = int(size_divisor)
        self.integration_steps = int(integration_steps)
        self.half_res = bool(half_res)
        self.mode = str(mode)
        self.padding_mode = str(padding_mode)
        self.resize_mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def _integrate(self, velocity: Tensor) -> Tensor:
        ddf = velocity / float(2**self.integration_steps)
        for _ in range(self.integration_steps):
            ddf = ddf + pull_warp(ddf, ddf, self.mode, self.padding_mode)
        return ddf

    def forward(self, image: Tensor) -> Tensor:
        if image.dim() != self.spatial_dims + 2 or image.shape[1] != 2:
            raise ValueError("image must stack source and target as 2 channels, shape (B, 2, *spatial) with "
                             + str(self.spatial_dims) + " spatial dims; got " + str(list(image.shape)))
        for s in image.shape[2:]:
            if s % self.size_divisor != 0:
                raise ValueError("spatial size " + str(list(image.shape[2:])) + " of the pair must be divisible by "
                                 + str(self.size_divisor))
        velocity = self.backbone(image)
        if self.integration_steps == 0:
            return velocity
        if not self.half_res:
            return self._integrate(velocity)
        # as VoxelMorphEstimator._integrate: a displacement of d pixels is d / 2 on the half-resolution grid
        half = 0.5 * F.interpolate(velocity, scale_factor=0.5, mode=self.resize_mode, align_corners=True)
        size = [int(v) for v in velocity.shape[2:]]
        return 2.0 * F.interpolate(self._integrate(half), size=size, mode=self.resize_mode, align_corners=True)


# name -> "module:class"; imported lazily so that estimator files may import this module (no import cycle)
ESTIMATORS: dict[str, str] = {
    "voxelmorph": "common.networks.registration:VoxelMorphEstimator",
    "transmorph": "common.networks.transmorph:TransMorph",
    "diffusemorph": "common.networks.diffusemorph:DiffuseMorph",
}


def build_displacement_estimator(name: str, **kwargs) -> DisplacementEstimator:
    """Build a displacement estimator by name (a key of :data:`ESTIMATORS`) with its constructor kwargs."""
    key = str(name).lower()
    if key not in ESTIMATORS:
        raise ValueError(f"unknown displacement estimator {name!r}; known: {sorted(ESTIMATORS)}")
    module_name, class_name = ESTIMATORS[key].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
