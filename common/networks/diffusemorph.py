"""DiffuseMorph (Kim, Han & Ye, ECCV 2022): a diffusion network and a deformation network for registration.

Written from the DiffuseMorph paper, the AdaCS paper (``METHODS.md`` §3) and a reading of both author groups' public
code; built from MONAI 1.6.1 blocks: the diffusion network is MONAI's ``DiffusionModelUNet`` (time-conditioned
residual U-Net with self-attention, sinusoidal timestep embedding), the forward process is MONAI's ``DDPMScheduler``
(``add_noise``), the deformation network is MONAI's ``BasicUNet``.

Shapes for a pair ``(B, 1, *spatial)`` (``spatial = (H, W)``, or ``(D, H, W)`` with ``spatial_dims=3``), images in
``[0, 1]`` as everywhere in this repository:

* The diffusion part works on ``x = 2 I - 1`` (the DDPM data range ``[-1, 1]``, as the authors' data loaders).
* **Diffusion network** ``ε_θ``: ``cat(I_s, I_t, x_t)`` ``(B, 3, *spatial)`` and a timestep ``t`` ``(B,)`` ->
  ``ε̂ = ε_θ(I_s, I_t, x_t, t)`` ``(B, 1, *spatial)``: the noise in the noisy target ``x_t``, i.e. (up to the factor
  ``-sqrt(1 - ᾱ_t)``) the conditional score of ``x_t``; it is the "latent feature" handed to the deformation
  network.
* **Deformation network**: ``cat(I_s, ε̂)`` ``(B, 2, *spatial)`` -> displacement ``û`` ``(B, spatial_dims,
  *spatial)`` in pixels (no integration; channel ``k`` along spatial axis ``k``); the source is warped with it
  (:class:`~common.networks.registration.DisplacementEstimator`, bilinear, zeros outside).
* **Training forward** (:meth:`DiffuseMorph.diffusion_forward`, used whenever the module is in training mode):
  ``t ~ U{0, ..., T-1}`` per pair, ``ε ~ N(0, I)``, ``x_t = sqrt(ᾱ_t) (2 I_t - 1) + sqrt(1 - ᾱ_t) ε``; the
  denoising loss ``mean (ε̂ - ε)²`` (:func:`common.losses.diffusemorph.denoising_loss`) trains ``ε_θ`` and the
  registration losses reach both networks through ``û``.
* **Registration** (evaluation mode, deterministic): ``t = 0`` and ``x_t = 2 I_t - 1`` (the target itself), as the
  authors' ``registration()``; their deformation-scaling ``η ∈ [0, 1]`` (``ε̂ · η``) is exposed as ``eta`` (1 for
  the final field).

The noise schedule is the authors': linear ``β`` from ``1e-6`` to ``1e-2`` over ``T = 2000`` steps.

Every spatial size must be divisible by ``lcm(2 ** (len(diffusion_channels) - 1), 16)`` (16 by default; the
deformation U-Net downsamples 4 times).

Default sizes are a reduced configuration that trains on a CPU at 64-128 px (about 0.85 M parameters in 2D); the
authors' 2D configuration is ``diffusion_channels=(64, 128, 256, 256)`` (attention only in the middle block),
``deformation_features=(64, 128, 256, 512, 1024, 64)`` (about 40 M parameters). Choices the papers do not state
(listed in the bundle README, "Deviations and choices", DiffuseMorph): the MONAI blocks (GroupNorm + SiLU residual
blocks; max-pooling instead of stride-2 convolutions in the deformation U-Net, no normalisation there, LeakyReLU
0.2 as the authors), the tiny-weight ``N(0, 1e-5)`` 3x3 head of the deformation network (training starts at the
identity, like the other estimators here), and the ``[0, 1] -> [-1, 1]`` mapping inside the module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from monai.networks.nets import BasicUNet, DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import Tensor, nn

from common.losses.diffusemorph import denoising_loss
from common.networks.registration import DisplacementEstimator

__all__ = ["DiffuseMorph", "DiffusionForward"]

DEFORMATION_DOWNSAMPLING = 16  # BasicUNet: four 2x max-poolings


class DiffusionForward(NamedTuple):
    """One training forward of :class:`DiffuseMorph` (all tensors on the input's device).

    Attributes:
        displacement: ``(B, spatial_dims, *spatial)`` in pixels.
        noise_pred: ``ε̂`` ``(B, 1, *spatial)``, the diffusion network's output (the deformation network's input).
        noise: ``ε`` ``(B, 1, *spatial)``, the noise added to the target.
        timesteps: ``t`` ``(B,)`` int64.
        noisy_target: ``x_t`` ``(B, 1, *spatial)`` (in the ``[-1, 1]`` data range).
    """

    displacement: Tensor
    noise_pred: Tensor
    noise: Tensor
    timesteps: Tensor
    noisy_target: Tensor


class DiffuseMorph(DisplacementEstimator):
    """DiffuseMorph displacement estimator ``f(I_s, I_t) -> (warped, displacement)``; see the module docstring.

    Args:
        spatial_dims: 2 or 3.
        diffusion_channels: widths of the diffusion U-Net levels (``len - 1`` downsamplings).
        diffusion_attention: self-attention per level (``len(diffusion_channels)`` booleans; the middle block always
            attends); default: the deepest level only.
        diffusion_res_blocks: residual blocks per level (the authors use 1).
        norm_num_groups: GroupNorm groups of the diffusion U-Net (must divide every width).
        num_head_channels: channels per attention head.
        deformation_features: the six ``BasicUNet`` widths (input level, four downsampled levels, output level).
        num_train_timesteps: ``T`` of the forward diffusion.
        beta_start, beta_end: linear ``β`` schedule.
        eta: scale of ``ε̂`` fed to the deformation network at registration (1 = the full deformation).
    """

    has_training_loss = True

    def __init__(
        self,
        spatial_dims: int = 2,
        diffusion_channels: Sequence[int] = (16, 32, 64),
        diffusion_attention: Sequence[bool] | None = None,
        diffusion_res_blocks: int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int = 16,
        deformation_features: Sequence[int] = (16, 32, 32, 32, 32, 16),
        num_train_timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
        eta: float = 1.0,
    ) -> None:
        channels = tuple(int(c) for c in diffusion_channels)
        features = tuple(int(c) for c in deformation_features)
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"diffusion_channels must be positive widths, got {diffusion_channels}")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every diffusion_channels width must be divisible by norm_num_groups={norm_num_groups}, "
                f"got {channels}"
            )
        if len(features) != 6 or min(features) < 1:
            raise ValueError(f"deformation_features must be 6 positive widths (BasicUNet), got {deformation_features}")
        attention = (
            tuple(i == len(channels) - 1 for i in range(len(channels)))
            if diffusion_attention is None
            else tuple(bool(a) for a in diffusion_attention)
        )
        if len(attention) != len(channels):
            raise ValueError(
                f"diffusion_attention needs one flag per level ({len(channels)}), got {diffusion_attention}"
            )
        heads = [c for c, a in zip(channels, attention) if a] + [channels[-1]]  # the middle block always attends
        if any(c % num_head_channels for c in heads):
            raise ValueError(
                f"widths of attending levels {heads} must be divisible by num_head_channels={num_head_channels}"
            )
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        divisor = math.lcm(2 ** (len(channels) - 1), DEFORMATION_DOWNSAMPLING)
        super().__init__(spatial_dims, size_divisor=divisor)
        self.eta = float(eta)
        self.num_train_timesteps = int(num_train_timesteps)
        self.diffusion = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=3,
            out_channels=1,
            num_res_blocks=int(diffusion_res_blocks),
            channels=channels,
            attention_levels=attention,
            norm_num_groups=int(norm_num_groups),
            num_head_channels=int(num_head_channels),
        )
        self.deformation = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=2,
            out_channels=spatial_dims,
            features=features,
            act=("LeakyReLU", {"negative_slope": 0.2, "inplace": True}),
            norm=None,
        )
        # a 3x3 head (the authors' outconv) starting near zero, so that training starts at the identity warp
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.deformation.final_conv = conv(features[5], spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.deformation.final_conv.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.deformation.final_conv.bias)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            schedule="linear_beta",
            beta_start=float(beta_start),
            beta_end=float(beta_end),
        )

    @staticmethod
    def _centred(image: Tensor) -> Tensor:
        return 2.0 * image - 1.0

    def _deform(self, source: Tensor, noise_pred: Tensor, eta: float = 1.0) -> Tensor:
        return self.deformation(torch.cat([source, noise_pred * eta], dim=1))

    def diffusion_forward(
        self, source: Tensor, target: Tensor, noise: Tensor | None = None, timesteps: Tensor | None = None
    ) -> DiffusionForward:
        """The training forward: noise the target at a random ``t``, predict the noise, deform with the prediction.

        Args:
            source: ``(B, 1, *spatial)`` in ``[0, 1]``.
            target: ``(B, 1, *spatial)`` in ``[0, 1]``.
            noise: ``ε`` ``(B, 1, *spatial)``; drawn from ``N(0, I)`` when ``None``.
            timesteps: ``t`` ``(B,)`` integers in ``[0, T)``; drawn uniformly when ``None``.

        Returns:
            :class:`DiffusionForward`.
        """
        self.check_pair(source, target)
        b = source.shape[0]
        if noise is None:
            noise = torch.randn_like(target)
        elif noise.shape != target.shape:
            raise ValueError(f"noise must have the target's shape {tuple(target.shape)}, got {tuple(noise.shape)}")
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (b,), device=source.device)
        timesteps = timesteps.to(device=source.device, dtype=torch.long)
        if timesteps.shape != (b,) or int(timesteps.min()) < 0 or int(timesteps.max()) >= self.num_train_timesteps:
            raise ValueError(
                f"timesteps must be {b} integers in [0, {self.num_train_timesteps}), got {timesteps.tolist()}"
            )
        src, tgt = self._centred(source), self._centred(target)
        noisy = self.scheduler.add_noise(tgt, noise, timesteps)
        noise_pred = self.diffusion(torch.cat([src, tgt, noisy], dim=1), timesteps)
        displacement = self._deform(source, noise_pred)
        return DiffusionForward(displacement, noise_pred, noise, timesteps, noisy)

    def register(self, source: Tensor, target: Tensor, eta: float | None = None) -> Tensor:
        """Deterministic registration: ``ε̂`` at ``t = 0`` with ``x_0 = `` the target, deformed with ``η · ε̂``.

        Returns the displacement ``(B, spatial_dims, *spatial)`` in pixels.
        """
        self.check_pair(source, target)
        tgt = self._centred(target)
        t = torch.zeros(source.shape[0], dtype=torch.long, device=source.device)
        noise_pred = self.diffusion(torch.cat([self._centred(source), tgt, tgt], dim=1), t)
        return self._deform(source, noise_pred, self.eta if eta is None else float(eta))

    def predict_displacement(self, source: Tensor, target: Tensor) -> Tensor:
        """Training mode: the stochastic training forward (as the authors' training code, also for the scoring
        step's ``⌊û⌋``); evaluation mode: :meth:`register`."""
        if self.training:
            return self.diffusion_forward(source, target).displacement
        return self.register(source, target)

    def predict_displacement_and_training_loss(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(displacement, denoising loss)`` of one training forward (:meth:`diffusion_forward`), whatever the mode.

        The loss is :func:`common.losses.diffusemorph.denoising_loss` ``mean (ε̂ - ε)²``; the trainer adds it, weighted,
        to the registration loss of the same forward.
        """
        out = self.diffusion_forward(source, target)
        return out.displacement, denoising_loss(out.noise_pred, out.noise)
