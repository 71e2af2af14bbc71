"""DiffuseMorph's training objective combined with the AdaCS data term (``METHODS.md`` §3; Kim et al., ECCV 2022).

DiffuseMorph trains its diffusion network ``ε_θ`` and its deformation network together with one loss: the DDPM
denoising loss of the noisy target plus the registration loss of the displacement ``û`` that the deformation network
computes from ``ε̂`` (:class:`common.networks.diffusemorph.DiffuseMorph`). The AdaCS authors' DiffuseMorph scripts
combine it with AdaCS as

``L = L_pix + λ_L · mean_x ⌊Ŝ(x)⌋ [I_t(x) - I_s(x + û(x))]² + γ · R(û)``,  ``λ_L = 20``, ``γ = 1``,

``L_pix = mean (ε̂ - ε)²`` (their ``loss_type='l2'``), ``R`` the squared forward-difference gradient
(:func:`common.losses.adacs.gradient_smoothness`). Dividing by ``λ_L`` gives the form used here, with the data term
at weight 1 like every other estimator of the bundle (Adam is invariant to a constant factor of the loss):

``L = mean_x ⌊Ŝ⌋ r(x)² + λ R(û) + η L_pix``,  ``λ = γ / λ_L = 0.05``,  ``η = 1 / λ_L = 0.05``

(:func:`diffusemorph_loss`; with ``Ŝ ≡ 1`` it is DiffuseMorph's own objective with an MSE data term). The baselines
with DiffuseMorph keep their own loss for the data and smoothness terms and add the same ``η L_pix``, as the
authors' baseline scripts do. Shapes: images, ``warped``, ``Ŝ``, ``ε``, ``ε̂`` ``(B, 1, *spatial)``; ``û``
``(B, spatial_dims, *spatial)``. Choices not stated by the papers: no background mask (the authors' code drops
pixels where both images are 0, as for the other estimators here, see :mod:`common.losses.adacs` choice 3).
"""

from __future__ import annotations

from torch import Tensor

from common.losses.adacs import displacement_step_loss

__all__ = ["DIFFUSION_WEIGHT", "SIMILARITY_WEIGHT", "SMOOTHNESS_WEIGHT", "denoising_loss", "diffusemorph_loss"]

#: the AdaCS authors' DiffuseMorph weights: ``λ_L`` (data term) and ``γ`` (smoothness), with ``L_pix`` at weight 1
SIMILARITY_WEIGHT = 20.0
SMOOTHNESS_WEIGHT = 1.0
#: ``η = 1 / λ_L``: the denoising loss's weight once the data term has weight 1
DIFFUSION_WEIGHT = 1.0 / SIMILARITY_WEIGHT


def denoising_loss(noise_pred: Tensor, noise: Tensor) -> Tensor:
    """DDPM's simple loss ``L_pix = mean (ε̂ - ε)²`` over the batch and all pixels (a scalar)."""
    if noise_pred.shape != noise.shape:
        raise ValueError(
            f"noise_pred and noise shapes differ: {tuple(noise_pred.shape)} vs {tuple(noise.shape)}"
        )
    return (noise_pred - noise).pow(2).mean()


def diffusemorph_loss(
    target: Tensor,
    warped: Tensor,
    displacement: Tensor,
    noise_pred: Tensor,
    noise: Tensor,
    score: Tensor | None = None,
    lam: float = SMOOTHNESS_WEIGHT / SIMILARITY_WEIGHT,
    diffusion_weight: float = DIFFUSION_WEIGHT,
) -> Tensor:
    """``mean_x ⌊Ŝ⌋ [I_t - I_s∘û]² + λ R(û) + η mean (ε̂ - ε)²`` (module docstring); ``score=None`` means ``Ŝ ≡ 1``.

    This is the displacement step of AdaCS (Eq. 2, :func:`common.losses.adacs.displacement_step_loss`) plus the
    weighted denoising loss; the score is detached.
    """
    if diffusion_weight < 0:
        raise ValueError(f"diffusion_weight must be >= 0, got {diffusion_weight}")
    if score is None:
        score = target.new_ones(target.shape)
    registration = displacement_step_loss(target, warped, displacement, score, lam)
    return registration + diffusion_weight * denoising_loss(noise_pred, noise)
