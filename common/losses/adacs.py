"""AdaCS losses (``METHODS.md`` §3, Eq. 1-9) and the losses of the four baselines of the AdaCS paper (Sec. 5.3).

Notation: ``I_t`` target, ``I_s`` source, ``û = f_θ(I_s, I_t)`` the displacement, ``I_s∘û`` the warped source
(``warped``), ``r(x) = I_t(x) - I_s(x + û(x))`` the residual, ``Ŝ = g_φ(I_t) ∈ [0, 1]`` the correspondence score,
``⌊·⌋`` stop-gradient (``.detach()``), ``mean_x`` the mean over the batch and all pixels. Shapes: images, ``warped``,
``Ŝ`` and log-variances ``(B, 1, *spatial)``; ``û`` ``(B, spatial_dims, *spatial)`` (pixels). Every loss returns a
scalar tensor.

AdaCS
-----
* Eq. 1 :func:`plain_registration_loss`: ``L = mean_x r(x)² + λ R(û)``.
* Eq. 2 :func:`displacement_step_loss`: ``L_de = mean_x ⌊Ŝ(x)⌋ r(x)² + λ R(û)`` (no gradient to ``g``).
* Eq. 3 :func:`scoring_data_term`: ``L_ucs = mean_x Ŝ(x) [I_t(x) - I_s(x + ⌊û(x)⌋)]²`` (no gradient to ``f``).
* Eq. 4 :func:`score_regularizer`: ``L_reg = mean_x [1 - Ŝ(x)]²``.
* Eq. 5 :func:`residual_energy`: ``μ_T = mean_x [I_t(x) - I_s(x + ⌊û_T(x)⌋)]²`` (a detached number).
* Eq. 6-7 :class:`MomentumTVWeight`: ``b_T = cos((π/2) μ_T)`` (optionally scaled, see choice 4),
  ``m_T = γ_T m_{T-1} + (1 - γ_T) b_T``, ``γ_T = min(1 - 1/(epoch + 1), 0.99)``, ``m_0 = 0``; the state is saved in
  checkpoints.
* Eq. 8-9 :func:`scoring_step_loss`: ``L_se = L_ucs + α L_reg + β L_smooth`` with ``L_smooth = m_T R(Ŝ)``.

``R`` is :func:`gradient_smoothness`, the squared forward-difference gradient (the ``‖∇·‖²`` of Eq. 1, 2 and 8).

Baselines (same displacement estimators; each loss includes ``λ R(û)`` unless stated)
-------------------------------------------------------------------------------------
* AdaReg (Wong & Soatto, CVPR 2019) :func:`adareg_loss`: local residual ``ρ(x) = |r(x)|``, global residual
  ``σ = mean_x ρ`` (per image), adaptive regularisation weight ``w(x) = exp(-c ρ(x) σ)`` (``c = 50``):
  ``L = mean_x r(x)² + λ R_w(û)`` where ``R_w`` weights the squared forward differences leaving pixel ``x`` by
  ``⌊w(x)⌋`` — smoothness is relaxed where the image does not explain the motion.
* AdaFrame (Wong et al., RA-L 2021) :func:`adaframe_loss`: ``ρ(x) = |r(x)|``, per image mean ``μ_ρ`` and standard
  deviation ``s_ρ``, ``ρ̃ = (ρ - μ_ρ) / s_ρ``, ``a = a0 / μ_ρ``, ``b = b0 (1 - cos(π μ_ρ))``, weight
  ``w(x) = 1 - sigmoid(a ρ̃(x) - b)`` (``a0 = 0.1``, ``b0 = 10``): ``L = mean_x ⌊w(x)⌋ r(x)² + λ R(û)``.
* NLL (Kendall & Gal 2017) :func:`gaussian_nll_loss`: with ``s = log σ²`` from the variance net,
  ``L = mean_x [ r(x)² / (2 σ²(x)) + ½ log σ²(x) ] + λ R(û)``; gradients reach both ``f`` and the variance net.
* β-NLL (Seitzer et al., ICLR 2022) :func:`beta_nll_loss`: ``L = mean_x ⌊σ²(x)^β⌋ [ r(x)² / (2 σ²(x)) +
  ½ log σ²(x) ] + λ R(û)`` with ``β = 0.5``; ``β = 0`` is NLL.

Choices the paper does not state
--------------------------------
1. ``R(v) = (1/n) Σ_k mean_{b,c,x} (v_c(x + e_k) - v_c(x))²`` over the ``n`` spatial axes (forward differences, no
   padding): the VoxelMorph authors' ``Grad('l2')`` normalisation, which the published λ, α, β values were tuned
   with. It equals ``mean_x ‖∇v(x)‖²`` divided by ``n · C`` (``C`` channels of ``v``), up to the border row.
2. ``R(û)`` is taken on the returned displacement ``û``. The authors' VoxelMorph code regularises the
   pre-integration velocity at half resolution and multiplies the term by 2 (``int_downsize``); an engine that
   wants that form can pass the velocity from ``VoxelMorphEstimator.forward_with_velocity`` instead.
3. No background mask: every pixel counts (the authors' code drops pixels where source and target are both 0).
4. ``μ_T`` (Eq. 5) is whatever the engine passes to :meth:`MomentumTVWeight.update`; :func:`residual_energy` gives
   the paper's unweighted mean squared residual. The class defaults are the paper's Eq. 6 (``residual_scale=1``,
   ``average="step"``), under which ``m_T`` is ≈ 1 after the first update for realistic residuals (~0.005-0.02).
   The authors' code uses the running epoch mean of the ``Ŝ``-weighted data term and ``b_T = cos(3.14 · 50 · μ_T)``:
   ``MomentumTVWeight(residual_scale=100, average="epoch")`` is that form (``π/2 · 100 = π · 50``), with the
   cosine's argument clipped at ``π/2`` (``clip=True``) so that ``b_T`` stays in ``[0, 1]`` as the paper states
   (the authors' code lets it go negative for ``μ_T > 0.01``; ``clip=False`` reproduces that).
5. The time step ``T`` of Eq. 7 is one call of :meth:`MomentumTVWeight.update` (the authors call it after every
   displacement step) and ``epoch`` is the 0-based epoch counted from the start of training, warm-up included.
6. AdaReg: the weight multiplies the per-pixel squared gradient and is detached (a weight, like ``⌊Ŝ⌋``); the
   authors' code multiplies the displacement by the weight before differencing and keeps its gradient.
7. AdaReg ``c = 50``, AdaFrame ``a0 = 0.1``, ``b0 = 10`` are the authors' code defaults (the paper's values were
   lost in extraction); AdaFrame's weight is detached (as in the authors' ``WeightedMSE``); ``ε = 1e-7`` guards the
   divisions by ``μ_ρ`` and ``s_ρ``; ``π`` is used where the code writes 3.14.
8. NLL / β-NLL: the variance net predicts ``log σ²``; the mean over pixels replaces a sum (a constant factor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "MOMENTUM_AVERAGES",
    "MomentumTVWeight",
    "adaframe_loss",
    "adaframe_weight",
    "adareg_loss",
    "adareg_weight",
    "beta_nll_loss",
    "displacement_step_loss",
    "gaussian_nll_loss",
    "gradient_smoothness",
    "plain_registration_loss",
    "residual_energy",
    "score_regularizer",
    "scoring_data_term",
    "scoring_step_loss",
    "weighted_gradient_smoothness",
]

EPS = 1e-7


def _check_images(**images: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in images.items()}
    first = next(iter(images.values()))
    if first.ndim < 4 or first.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, *spatial) with 2 or 3 spatial dims, got {shapes}")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"image shapes must match, got {shapes}")


def _check_field(field: Tensor, like: Tensor, name: str = "displacement") -> None:
    expected = (like.shape[0], like.ndim - 2, *like.shape[2:])
    if tuple(field.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} to match the images, got {tuple(field.shape)}")


def _forward_differences(field: Tensor) -> list[Tensor]:
    """``field (B, C, *spatial)`` -> one tensor per spatial axis ``k`` of ``v(x + e_k) - v(x)`` (size - 1 on ``k``)."""
    return [torch.diff(field, dim=axis) for axis in range(2, field.ndim)]


def gradient_smoothness(field: Tensor) -> Tensor:
    """``R(v) = (1/n) Σ_k mean_{b,c,x} (v_c(x + e_k) - v_c(x))²`` for ``v (B, C, *spatial)`` (n spatial axes)."""
    if field.ndim < 3:
        raise ValueError(f"field must be (B, C, *spatial), got {tuple(field.shape)}")
    diffs = _forward_differences(field)
    return torch.stack([d.pow(2).mean() for d in diffs]).mean()


def weighted_gradient_smoothness(field: Tensor, weight: Tensor) -> Tensor:
    """``(1/n) Σ_k mean_{b,c,x} w(x) (v_c(x + e_k) - v_c(x))²``; ``w (B, 1, *spatial)`` taken at the base pixel ``x``.

    With ``w ≡ 1`` this is :func:`gradient_smoothness`.
    """
    if weight.shape[0] != field.shape[0] or weight.shape[1] != 1 or weight.shape[2:] != field.shape[2:]:
        raise ValueError(f"weight must be (B, 1, *spatial) of field {tuple(field.shape)}, got {tuple(weight.shape)}")
    terms = []
    for axis, d in zip(range(2, field.ndim), _forward_differences(field)):
        w = weight.narrow(axis, 0, field.shape[axis] - 1)
        terms.append((w * d.pow(2)).mean())
    return torch.stack(terms).mean()


def plain_registration_loss(target: Tensor, warped: Tensor, displacement: Tensor, lam: float = 0.01) -> Tensor:
    """Eq. 1: ``mean_x [I_t - I_s∘û]² + λ R(û)``."""
    _check_images(target=target, warped=warped)
    _check_field(displacement, target)
    return (target - warped).pow(2).mean() + lam * gradient_smoothness(displacement)


def displacement_step_loss(
    target: Tensor, warped: Tensor, displacement: Tensor, score: Tensor, lam: float = 0.01
) -> Tensor:
    """Eq. 2: ``mean_x ⌊Ŝ⌋ [I_t - I_s∘û]² + λ R(û)``; the score is detached, so ``g`` gets no gradient."""
    _check_images(target=target, warped=warped, score=score)
    _check_field(displacement, target)
    return (score.detach() * (target - warped).pow(2)).mean() + lam * gradient_smoothness(displacement)


def scoring_data_term(target: Tensor, warped: Tensor, score: Tensor) -> Tensor:
    """Eq. 3: ``L_ucs = mean_x Ŝ [I_t - I_s∘⌊û⌋]²``; the warped source is detached, so ``f`` gets no gradient."""
    _check_images(target=target, warped=warped, score=score)
    return (score * (target - warped.detach()).pow(2)).mean()


def score_regularizer(score: Tensor) -> Tensor:
    """Eq. 4: ``L_reg = mean_x [1 - Ŝ]²`` (keeps ``g`` away from the all-zero score)."""
    return (1.0 - score).pow(2).mean()


def residual_energy(target: Tensor, warped: Tensor) -> Tensor:
    """Eq. 5: ``μ_T = mean_x [I_t - I_s∘⌊û_T⌋]²``, a detached 0-dim tensor."""
    _check_images(target=target, warped=warped)
    return (target - warped).detach().pow(2).mean()


def scoring_step_loss(
    target: Tensor, warped: Tensor, score: Tensor, alpha: float, beta: float, tv_weight: float
) -> Tensor:
    """Eq. 9: ``L_se = L_ucs + α L_reg + β m_T R(Ŝ)`` (Eq. 3, 4 and 8; ``tv_weight`` is ``m_T``).

    Only ``g`` receives gradients: the warped source is detached (``⌊û⌋``).
    """
    smooth = float(tv_weight) * gradient_smoothness(score)
    return scoring_data_term(target, warped, score) + alpha * score_regularizer(score) + beta * smooth


MOMENTUM_AVERAGES = ("step", "epoch")


class MomentumTVWeight:
    """Momentum-guided adaptive TV weight ``m_T`` of Eq. 6-7, with checkpointable state.

    ``update(μ, epoch)``: ``μ_T`` is ``μ`` (``average="step"``, the paper's Eq. 5 at step ``T``) or the mean of every
    ``μ`` passed during the current epoch so far (``average="epoch"``, the authors' code);
    ``b_T = cos((π/2) · min(residual_scale · μ_T, 1))`` (``clip=True``) or ``cos((π/2) · residual_scale · μ_T)``;
    ``γ_T = min(1 - 1/(epoch + 1), max_decay)``, ``m_T = γ_T m_{T-1} + (1 - γ_T) b_T``; ``m_0 = 0``.

    Why a scale: on ``[0, 1]`` images the mean squared residual of a registration is ~0.005-0.02, where the paper's
    ``cos(π/2 · μ)`` is 0.9995-0.99997, so ``m`` is ≈ 1 from the first update and never follows training (Sec. 4.4,
    Fig. 5). The authors' code computes ``cos(3.14 · 50 · μ)`` (``residual_scale=100``): ``b`` then falls from 1 at
    ``μ = 0`` to 0 at ``μ = 0.01``, i.e. it rises from ~0 to ~0.7-0.9 as the residual drops from 0.01-0.02 to
    0.002-0.005. Beyond ``μ = 1/residual_scale`` the unclipped cosine turns negative (a negative weight would reward
    rough score maps), hence ``clip``. With ``residual_scale=1`` and ``μ ≤ 1`` the clip never acts: Eq. 6 exactly.

    The state (``m``, number of updates, the running epoch mean) is plain Python numbers: ``state_dict()`` can go
    into a weights-only checkpoint and ``load_state_dict()`` makes a resumed run continue exactly. Arithmetic is in
    Python floats (double precision).

    Args:
        max_decay: upper bound of the EMA decay ``γ`` (0.99).
        residual_scale: multiplies ``μ_T`` inside the cosine; 1 is the paper's Eq. 6, 100 the authors' code.
        clip: clip the cosine's argument at ``π/2`` so that ``b_T ∈ [0, 1]`` (the authors' code does not).
        average: ``"step"`` (paper) or ``"epoch"`` (running mean over the epoch's updates, the authors' code).
    """

    def __init__(self, max_decay: float = 0.99, residual_scale: float = 1.0, clip: bool = True,
                 average: str = "step") -> None:
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"max_decay must be in [0, 1), got {max_decay}")
        if residual_scale <= 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
        if average not in MOMENTUM_AVERAGES:
            raise ValueError(f"average must be one of {MOMENTUM_AVERAGES}, got {average!r}")
        self.max_decay = float(max_decay)
        self.residual_scale = float(residual_scale)
        self.clip = bool(clip)
        self.average = average
        self.m = 0.0
        self.num_updates = 0
        # running mean of μ over the current epoch (average="epoch")
        self.epoch = -1
        self.epoch_sum = 0.0
        self.epoch_count = 0

    @property
    def value(self) -> float:
        """The current weight ``m_T``."""
        return self.m

    @property
    def epoch_mean(self) -> float:
        """Mean of the ``μ`` passed during the latest epoch (NaN before the first update)."""
        return self.epoch_sum / self.epoch_count if self.epoch_count else float("nan")

    def decay(self, epoch: int) -> float:
        """``γ = min(1 - 1/(epoch + 1), max_decay)`` for a 0-based ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return min(1.0 - 1.0 / (epoch + 1), self.max_decay)

    def activation(self, mu: float) -> float:
        """``b = cos(π/2 · residual_scale · μ)``, the argument clipped at ``π/2`` when ``clip``."""
        x = self.residual_scale * float(mu)
        return math.cos(0.5 * math.pi * (min(x, 1.0) if self.clip else x))

    def update(self, residual: float | Tensor, epoch: int) -> float:
        """Fold ``μ`` (``residual``, e.g. :func:`residual_energy`) into ``m``; returns the new ``m_T``."""
        mu = float(residual.detach()) if isinstance(residual, Tensor) else float(residual)
        if not math.isfinite(mu):
            raise ValueError(f"residual energy must be finite, got {mu}")
        gamma = self.decay(epoch)
        if epoch != self.epoch:
            self.epoch, self.epoch_sum, self.epoch_count = int(epoch), 0.0, 0
        self.epoch_sum += mu
        self.epoch_count += 1
        b = self.activation(self.epoch_mean if self.average == "epoch" else mu)
        self.m = gamma * self.m + (1.0 - gamma) * b
        self.num_updates += 1
        return self.m

    def state_dict(self) -> dict[str, float | int]:
        return {"m": float(self.m), "num_updates": int(self.num_updates), "epoch": int(self.epoch),
                "epoch_sum": float(self.epoch_sum), "epoch_count": int(self.epoch_count)}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        missing = {"m", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"MomentumTVWeight state is missing {sorted(missing)}; got keys {sorted(state)}")
        m = float(state["m"])
        if not math.isfinite(m):
            raise ValueError(f"MomentumTVWeight state 'm' must be finite, got {m}")
        self.m = m
        self.num_updates = int(state["num_updates"])
        # checkpoints written before the running epoch mean existed hold no such entry: it restarts at the next epoch
        self.epoch = int(state.get("epoch", -1))
        self.epoch_sum = float(state.get("epoch_sum", 0.0))
        self.epoch_count = int(state.get("epoch_count", 0))

    def __repr__(self) -> str:
        return (
            f"MomentumTVWeight(m={self.m}, num_updates={self.num_updates}, max_decay={self.max_decay}, "
            f"residual_scale={self.residual_scale}, clip={self.clip}, average={self.average!r})"
        )


def _per_image_mean(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def adareg_weight(target: Tensor, warped: Tensor, c: float = 50.0) -> Tensor:
    """AdaReg weight ``w = exp(-c ρ σ)``, ``ρ = |I_t - I_s∘û|``, ``σ`` = per-image mean of ``ρ``.

    Returns the detached weight ``(B, 1, *spatial)``.
    """
    _check_images(target=target, warped=warped)
    rho = (target - warped).detach().abs()
    return torch.exp(-c * rho * _per_image_mean(rho))


def adareg_loss(target: Tensor, warped: Tensor, displacement: Tensor, lam: float = 0.01, c: float = 50.0) -> Tensor:
    """AdaReg baseline: ``mean_x [I_t - I_s∘û]² + λ R_w(û)`` with ``w`` from :func:`adareg_weight`."""
    _check_field(displacement, target)
    weight = adareg_weight(target, warped, c)
    return (target - warped).pow(2).mean() + lam * weighted_gradient_smoothness(displacement, weight)


def adaframe_weight(target: Tensor, warped: Tensor, a0: float = 0.1, b0: float = 10.0) -> Tensor:
    """AdaFrame weight ``w = 1 - sigmoid(a ρ̃ - b)`` (see the module docstring); detached, ``(B, 1, *spatial)``."""
    _check_images(target=target, warped=warped)
    rho = (target - warped).detach().abs()
    mean = _per_image_mean(rho)
    std = _per_image_mean((rho - mean).pow(2)).sqrt()
    normalised = (rho - mean) / (std + EPS)
    a = a0 / (mean + EPS)
    b = b0 * (1.0 - torch.cos(math.pi * mean))
    return 1.0 - torch.sigmoid(a * normalised - b)


def adaframe_loss(
    target: Tensor, warped: Tensor, displacement: Tensor, lam: float = 0.01, a0: float = 0.1, b0: float = 10.0
) -> Tensor:
    """AdaFrame baseline: ``mean_x ⌊w⌋ [I_t - I_s∘û]² + λ R(û)`` with ``w`` from :func:`adaframe_weight`."""
    _check_field(displacement, target)
    weight = adaframe_weight(target, warped, a0, b0)
    return (weight * (target - warped).pow(2)).mean() + lam * gradient_smoothness(displacement)


def _nll_map(target: Tensor, warped: Tensor, log_var: Tensor) -> Tensor:
    _check_images(target=target, warped=warped, log_var=log_var)
    return 0.5 * (target - warped).pow(2) * torch.exp(-log_var) + 0.5 * log_var


def gaussian_nll_loss(
    target: Tensor, warped: Tensor, log_var: Tensor, displacement: Tensor, lam: float = 0.01
) -> Tensor:
    """NLL baseline: ``mean_x [ r² / (2σ²) + ½ log σ² ] + λ R(û)``; ``log_var`` = ``log σ²`` ``(B, 1, *spatial)``."""
    _check_field(displacement, target)
    return _nll_map(target, warped, log_var).mean() + lam * gradient_smoothness(displacement)


def beta_nll_loss(
    target: Tensor, warped: Tensor, log_var: Tensor, displacement: Tensor, lam: float = 0.01, beta: float = 0.5
) -> Tensor:
    """β-NLL baseline: ``mean_x ⌊σ^(2β)⌋ [ r² / (2σ²) + ½ log σ² ] + λ R(û)`` (Seitzer et al.; ``β = 0`` is NLL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _check_field(displacement, target)
    weight = torch.exp(beta * log_var.detach())
    return (weight * _nll_map(target, warped, log_var)).mean() + lam * gradient_smoothness(displacement)
