"""AdaCS training (Algorithm 1), its four baselines, registration metrics, evaluation and inference handlers.

Training (:class:`AdaCSTrainer`, a MONAI ``Trainer``): a displacement estimator ``f`` (the bundle network, a
:class:`~common.networks.registration.StackedPairAdapter`: stacked pair ``image (B, 2, H, W)`` -> displacement) and,
depending on ``method``, an auxiliary network with its own Adam optimiser:

* ``"adacs"`` (``METHODS.md`` §3, Algorithm 1) with the scoring net ``g`` (:class:`~common.networks.scoring.ScoringNet`)
  — epochs ``[0, W)``: displacement steps with ``Ŝ ≡ 1`` (Eq. 2 = Eq. 1); ``[W, 2W)``: scoring steps only (``f``
  frozen); from ``2W`` on every iteration does a displacement step (Eq. 2, ``⌊Ŝ⌋``) and then a scoring step (Eq. 9)
  on a **fresh** forward of the just-updated ``f`` (``⌊û⌋``). The momentum weight ``m_T`` (Eq. 5-7,
  :class:`~common.losses.adacs.MomentumTVWeight`) is updated after every displacement step with ``μ_T`` from that
  step's forward (``momentum_residual``: the plain mean squared residual of Eq. 5, or the ``Ŝ``-weighted data term of
  the authors' code); scoring steps use the current ``m_T``.
* ``"plain"`` (Eq. 1), ``"adareg"``, ``"adaframe"`` — one displacement step per iteration, no auxiliary net.
* ``"nll"``, ``"beta_nll"`` — ``f`` and a variance U-Net (:class:`~common.networks.scoring.VarianceNet`) trained
  jointly by one loss; both optimisers step every iteration.
* every method: ``bidir=True`` (the authors' ``--bidir``) adds the reverse direction ES -> ED from the same forward:
  the target warped onto the source with the inverse field (:meth:`DisplacementEstimator.inverse_displacement`:
  ``-v`` integrated for VoxelMorph, ``-û`` otherwise, as in the authors' networks), scored by ``g(I_s)``; every loss
  (displacement, scoring, baseline) is the **mean** of the two single-direction losses (the authors' weights 0.5/0.5)
  and ``μ_T`` the mean of the two directions'.
* every method: ``regularization="displacement"`` puts ``λ R(·)`` on ``û`` (paper), ``"velocity"`` on the velocity
  field VoxelMorph integrates (×2 at half resolution: the VoxelMorph/AdaCS authors' form).

Everything a resumed run needs — both networks, both optimisers, the momentum state (plain numbers) and the engine's
epoch/iteration — is :meth:`AdaCSTrainer.checkpoint_dict`; :func:`common.engines.checkpoint.training_state` adds
what validation remembers and :class:`common.engines.checkpoint.ResumeFromCheckpoint` loads it back, so a run
resumed from an epoch checkpoint continues exactly as an uninterrupted one (the data order depends on the epoch
only: the bundle uses a seeded ``DistributedSampler``, also with one process, and reseeds every epoch).

DDP: both networks may be ``DistributedDataParallel`` modules. Each optimisation step runs exactly one forward with
gradients of the network it updates and every parameter of that network receives a gradient; the other network runs
under ``torch.no_grad()`` (no DDP reducer is armed), so no ``find_unused_parameters`` is needed. All ranks are in the
same phase because phases follow the epoch.

Evaluation: :class:`RegistrationMetricsd` (evaluator postprocessing) scores every pair once — Dice, HD, HD95, ASD of
the warped source myocardium against the target myocardium, % non-positive Jacobian determinants, the same for the
unregistered pair (``*_identity``) and HD/ASD in mm — and :class:`RegistrationMetric` hands one column to MONAI's
``IgniteMetricHandler``; :class:`RegistrationReport` writes ``per_pair.csv``, the paper's Table-1 summary for the
metrics JSON and a PNG (source, target, warped source with contours, score map ``Ŝ``, deformed grid); these live in
:mod:`common.engines.registration_eval`. :class:`RegistrationInferenceWriter`
(:mod:`common.engines.registration_inference`) writes, per pair (2D or 3D), the warped source, the displacement
field, the warped source mask and optionally AdaCS's score map as NIfTI on the input grid.

Presets (:func:`adacs_preset`): the authors' per-architecture/dataset hyper-parameters from ``METHODS.md`` for
VoxelMorph, TransMorph and DiffuseMorph.

DiffuseMorph (:class:`~common.networks.diffusemorph.DiffuseMorph`, ``has_training_loss``): in training mode its
forward noises the target at a random diffusion step, and every optimisation step of ``f`` (AdaCS displacement step
and every baseline) adds ``diffusion_weight · mean (ε̂ - ε)²`` of that same forward to the method's loss
(:mod:`common.losses.diffusemorph`; 0.05 = the AdaCS authors' ``1 / λ_L``); scoring steps use the training-mode
forward too (``⌊û⌋``), as the authors' code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.engines.trainer import Trainer
from monai.engines.utils import default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from torch import Tensor, nn

from common.losses.adacs import (
    MomentumTVWeight,
    adaframe_loss,
    adareg_loss,
    adareg_weight,
    beta_nll_loss,
    displacement_step_loss,
    gaussian_nll_loss,
    gradient_smoothness,
    plain_registration_loss,
    residual_energy,
    scoring_step_loss,
    weighted_gradient_smoothness,
)
from common.networks.scoring import ScoringNet, VarianceNet

# Evaluation (metrics, figures, report) lives in common.engines.registration_eval, which imports constants from
# this module; its names are re-exported lazily so that configs and callers keep using this module's names.
_EVAL_NAMES = ("RegistrationMetric", "RegistrationMetricsd", "RegistrationReport", "plot_registration_examples",
               "score_pair")
# Inference (displacement on the input grid, the prediction writer) lives in common.engines.registration_inference.
_INFERENCE_NAMES = ("RegistrationInferenceWriter", "displacement_on_grid")


def __getattr__(name: str) -> Any:
    """Public names of the evaluation and inference modules, re-exported lazily (see the comments above)."""
    if name in _EVAL_NAMES:
        from common.engines import registration_eval

        return getattr(registration_eval, name)
    if name in _INFERENCE_NAMES:
        from common.engines import registration_inference

        return getattr(registration_inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MOMENTUM_RESIDUALS",
    "REGULARIZATIONS",
    "EpochMetricsJSONWriter",
    "LastEpochModelSaver",
    "MODEL_SELECTIONS",
    "PRESETS",
    "WARMUP_EPOCHS",
    "REGISTRATION_METRICS",
    "SCORE_COLUMNS",
    "AdaCSTrainer",
    "adacs_preset",
    "build_auxiliary_net",
    "training_phase",
    "unwrap",
]
__all__ += [*_EVAL_NAMES, *_INFERENCE_NAMES]

METHODS = ("adacs", "plain", "adareg", "adaframe", "nll", "beta_nll")
# μ_T of Eq. 5 fed to m_T: "plain" = unweighted mean squared residual (paper), "weighted" = the Ŝ-weighted data term of
# the displacement step (the authors' code, whose scale 100 was tuned with it)
MOMENTUM_RESIDUALS = ("plain", "weighted")
# field of λ‖∇·‖²: "displacement" = û (paper Eq. 1-2), "velocity" = the pre-integration velocity (VoxelMorph authors)
REGULARIZATIONS = ("displacement", "velocity")
# which weights become models/model.pt: "best_val" = best validation Dice (uses labels), "last" = the last epoch's
# (the AdaCS authors' protocol for AdaCS and the baselines)
MODEL_SELECTIONS = ("best_val", "last")
REGISTRATION_METRICS = ("dice", "hd", "hd95", "asd", "nonpositive_jacobian_percent")
SCORE_COLUMNS = (*REGISTRATION_METRICS, "dice_identity", "hd_identity", "asd_identity", "hd_mm", "asd_mm")

# (architecture, dataset) -> hyper-parameters of the authors' scripts (METHODS.md §3). alpha: L_reg weight, beta:
# smoothness weight, lam: displacement smoothness, lr: Adam learning rate of both nets, warmup_epochs: W.
PRESETS: dict[tuple[str, str], dict[str, float | int]] = {
    ("voxelmorph", "acdc"): {"alpha": 0.02, "beta": 1.5, "lam": 0.01, "lr": 2e-4, "warmup_epochs": 20},
    ("voxelmorph", "camus"): {"alpha": 0.04, "beta": 1.5, "lam": 0.01, "lr": 1e-4, "warmup_epochs": 20},
    ("transmorph", "acdc"): {"alpha": 0.01, "beta": 0.6, "lam": 0.01, "lr": 1e-4, "warmup_epochs": 20},
    ("transmorph", "camus"): {"alpha": 0.03, "beta": 5.0, "lam": 0.03, "lr": 1e-4, "warmup_epochs": 20},
    # DiffuseMorph: α, β of METHODS.md; λ = γ / λ_L = 1 / 20 and lr 2e-5 of the authors' scripts and 2D config
    ("diffusemorph", "acdc"): {"alpha": 0.1, "beta": 5.0, "lam": 0.05, "lr": 2e-5, "warmup_epochs": 20},
    ("diffusemorph", "camus"): {"alpha": 0.5, "beta": 0.1, "lam": 0.05, "lr": 2e-5, "warmup_epochs": 20},
}
# the repository's synthetic registration pairs mix MRI and echo; they use the ACDC (MRI) row. The 3D volume-pair
# layout is 3D echo, whose hyper-parameters the paper does not give: it uses the CAMUS (echo) row
DATASET_ALIASES = {"pairs": "acdc", "volumes": "camus"}
# W of Algorithm 1 per spatial dimension (METHODS.md §3: 20 epochs, 10 for 3D)
WARMUP_EPOCHS = {2: 20, 3: 10}


def adacs_preset(architecture: str, dataset: str, spatial_dims: int = 2) -> dict[str, float | int]:
    """Hyper-parameters ``{alpha, beta, lam, lr, warmup_epochs}`` for an architecture and a dataset layout.

    ``dataset`` is ``"acdc"``, ``"camus"``, ``"pairs"`` (uses the ACDC row) or ``"volumes"`` (3D echo: the CAMUS
    row). ``spatial_dims`` sets the warm-up ``W`` (:data:`WARMUP_EPOCHS`: 20 in 2D, 10 in 3D). A copy is returned.
    """
    if spatial_dims not in WARMUP_EPOCHS:
        raise ValueError(f"spatial_dims must be one of {sorted(WARMUP_EPOCHS)}, got {spatial_dims!r}")
    arch, ds = str(architecture).lower(), str(dataset).lower()
    ds = DATASET_ALIASES.get(ds, ds)
    if (arch, ds) not in PRESETS:
        known = sorted({a for a, _ in PRESETS}), sorted({d for _, d in PRESETS} | set(DATASET_ALIASES))
        raise ValueError(f"no AdaCS preset for architecture {architecture!r} and dataset {dataset!r}; "
                         f"architectures {known[0]}, datasets {known[1]}")
    out = dict(PRESETS[(arch, ds)])
    if int(spatial_dims) == 3:  # the rows hold the authors' 2D scripts' W
        out["warmup_epochs"] = WARMUP_EPOCHS[3]
    return out


def build_auxiliary_net(method: str, spatial_dims: int = 2, enc_channels: Sequence[int] = (16, 32, 32, 32),
                        dec_channels: Sequence[int] = (32, 32, 32, 32, 32, 16, 16)) -> nn.Module | None:
    """Training-only second net of ``method``: ``ScoringNet`` (adacs), ``VarianceNet`` (nll, beta_nll), else None."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "adacs":
        return ScoringNet(spatial_dims, enc_channels, dec_channels)
    if method in ("nll", "beta_nll"):
        return VarianceNet(spatial_dims, enc_channels, dec_channels)
    return None


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (or the module itself)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def training_phase(epoch: int, method: str, warmup_epochs: int) -> str:
    """Phase of 0-based ``epoch``: ``"displacement"`` (f only, Ŝ ≡ 1), ``"scoring"`` (g only), ``"alternating"``.

    Only AdaCS has phases; the baselines are ``"joint"`` throughout.
    """
    if method != "adacs":
        return "joint"
    if epoch < warmup_epochs:
        return "displacement"
    if epoch < 2 * warmup_epochs:
        return "scoring"
    return "alternating"


def _global_mean(value: Tensor) -> float:
    """Mean of a scalar over all ranks, so that every rank folds the same ``μ_T`` into ``m_T`` (one for one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = value.detach().reshape(1).clone()
        dist.all_reduce(v)
        return float(v) / dist.get_world_size()
    return float(value)


class AdaCSTrainer(Trainer):
    """Algorithm 1 of AdaCS and the baselines as a MONAI/ignite trainer; see the module docstring.

    Args:
        device: device of the batches.
        max_epochs: total epochs, warm-up included (AdaCS alternates from epoch ``2 * warmup_epochs``).
        train_data_loader: batches with ``image`` ``(B, 2, H, W)`` (channel 0 source, channel 1 target); labels are
            never used (unsupervised).
        network: the displacement estimator as a stacked-pair module (``StackedPairAdapter``, possibly DDP-wrapped):
            ``network(image) -> displacement (B, 2, H, W)``.
        optimizer: optimiser of ``network``.
        method: one of :data:`METHODS`.
        auxiliary_network: ``ScoringNet`` for adacs, ``VarianceNet`` for nll/beta_nll, ``None`` otherwise.
        auxiliary_optimizer: its optimiser.
        momentum: :class:`MomentumTVWeight` state of the AdaCS smoothness weight (a new one by default).
        lam: weight of the displacement smoothness ``λ R(û)``.
        alpha: weight of ``L_reg`` (Eq. 9).
        beta: weight of ``L_smooth`` (Eq. 9).
        warmup_epochs: ``W`` of Algorithm 1 (AdaCS only).
        momentum_residual: ``μ_T`` fed to ``m_T`` (:data:`MOMENTUM_RESIDUALS`): ``"plain"`` the unweighted mean
            squared residual of the displacement step's forward (paper Eq. 5), ``"weighted"`` its ``Ŝ``-weighted data
            term (the authors' code; equal during warm-up, where ``Ŝ ≡ 1``).
        regularization: field of ``λ R(·)`` (:data:`REGULARIZATIONS`): ``"displacement"`` ``û`` (paper), or
            ``"velocity"`` the stationary velocity the estimator integrates, multiplied by 2 when it integrates at half
            resolution (the VoxelMorph/AdaCS authors' ``Grad(loss_mult=int_downsize)`` on ``preint_flow``; VoxelMorph
            only). AdaReg's weight is area-averaged onto the velocity grid.
        bidir: also register target -> source with the inverse field and average the two directions' losses (see the
            module docstring); evaluation and inference stay source -> target.
        adareg_c, adaframe_a0, adaframe_b0, beta_nll: baseline constants (see :mod:`common.losses.adacs`).
        diffusion_weight: weight ``η`` of an estimator's own training loss (DiffuseMorph's denoising loss, see
            :mod:`common.losses.diffusemorph`) in every step of ``f``; unused by the other estimators.
        inferer: runs ``network`` on ``image`` (``SimpleInferer`` by default).
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, event_names, event_to_attr, decollate, to_kwargs:
            as for MONAI's ``SupervisedTrainer``.

    ``engine.state.output`` per iteration: ``loss`` (the last step's loss), ``loss_displacement``, ``loss_scoring``
    (NaN when the step did not run), ``tv_weight`` (``m_T``), ``score_mean`` (mean ``Ŝ`` of the batch) and
    ``phase``. AdaCS also keeps ``engine.state.metrics["tv_weight"]`` (``m_T``) and ``["momentum_mu"]`` (the
    epoch's mean ``μ``) current, so epoch-level handlers (``StatsHandler``, ``TensorBoardStatsHandler``,
    :class:`EpochMetricsJSONWriter`) log them once per epoch.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str = "adacs",
        auxiliary_network: nn.Module | None = None,
        auxiliary_optimizer: torch.optim.Optimizer | None = None,
        momentum: MomentumTVWeight | None = None,
        lam: float = 0.01,
        alpha: float = 0.02,
        beta: float = 1.5,
        warmup_epochs: int = 20,
        momentum_residual: str = "plain",
        regularization: str = "displacement",
        bidir: bool = False,
        adareg_c: float = 50.0,
        adaframe_a0: float = 0.1,
        adaframe_b0: float = 10.0,
        beta_nll: float = 0.5,
        diffusion_weight: float = 0.05,
        inferer: Inferer | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        to_kwargs: dict | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        inner = unwrap(network)
        if not hasattr(inner, "estimator") or not hasattr(inner.estimator, "warp"):
            raise ValueError("network must be a StackedPairAdapter (image (B, 2, ...) -> displacement) around a "
                             f"DisplacementEstimator, got {type(inner).__name__}")
        aux = unwrap(auxiliary_network)
        wanted = {"adacs": ScoringNet, "nll": VarianceNet, "beta_nll": VarianceNet}.get(method)
        if wanted is None and auxiliary_network is not None:
            raise ValueError(f"method {method!r} takes no auxiliary network, got {type(aux).__name__}")
        if wanted is not None:
            if not isinstance(aux, wanted):
                raise ValueError(f"method {method!r} needs a {wanted.__name__} as auxiliary_network, got "
                                 f"{type(aux).__name__}")
            if auxiliary_optimizer is None:
                raise ValueError(f"method {method!r} needs auxiliary_optimizer for its {wanted.__name__}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if momentum_residual not in MOMENTUM_RESIDUALS:
            raise ValueError(f"momentum_residual must be one of {MOMENTUM_RESIDUALS}, got {momentum_residual!r}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
        if regularization == "velocity" and not getattr(inner.estimator, "has_velocity", False):
            raise ValueError(f"regularization='velocity' needs an estimator that integrates a velocity field "
                             f"(VoxelMorph); {type(inner.estimator).__name__} predicts the displacement directly")
        if min(lam, alpha, beta, diffusion_weight) < 0:
            raise ValueError(f"lam, alpha, beta and diffusion_weight must be >= 0, got {lam}, {alpha}, {beta}, "
                             f"{diffusion_weight}")
        if method == "adacs" and max_epochs <= 2 * warmup_epochs:
            warnings.warn(f"max_epochs={max_epochs} <= 2 * warmup_epochs={2 * warmup_epochs}: AdaCS never reaches "
                          "the alternating phase", stacklevel=2)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=False,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.method = method
        self.auxiliary_network = auxiliary_network
        self.auxiliary_optimizer = auxiliary_optimizer
        self.momentum = momentum if momentum is not None else (MomentumTVWeight() if method == "adacs" else None)
        self.lam, self.alpha, self.beta = float(lam), float(alpha), float(beta)
        self.warmup_epochs = int(warmup_epochs)
        self.momentum_residual = momentum_residual
        self.regularization = regularization
        self.bidir = bool(bidir)
        # the authors multiply the velocity's Grad loss by int_downsize (2 at half resolution)
        self.velocity_mult = 2.0 if getattr(inner.estimator, "half_res", False) else 1.0
        self.adareg_c, self.adaframe_a0, self.adaframe_b0 = float(adareg_c), float(adaframe_a0), float(adaframe_b0)
        self.beta_nll = float(beta_nll)
        self.diffusion_weight = float(diffusion_weight)
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.logger.info(
            f"AdaCSTrainer: method={method} lam={lam} alpha={alpha} beta={beta} warmup_epochs={warmup_epochs} "
            f"max_epochs={max_epochs} regularization={regularization} momentum={self.momentum!r} "
            f"momentum_residual={momentum_residual} bidir={self.bidir}"
        )

    def checkpoint_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: networks, optimisers, momentum state and this engine (epoch, iteration)."""
        out: dict[str, Any] = {"network": self.network, "optimizer": self.optimizer, "trainer": self}
        if self.auxiliary_network is not None:
            out["auxiliary"] = self.auxiliary_network
            out["optimizer_auxiliary"] = self.auxiliary_optimizer
        if self.momentum is not None:
            out["momentum"] = self.momentum
        return out

    # ------------------------------------------------------------------------------------------------ steps
    def _estimator(self):
        return unwrap(self.network).estimator

    def _forward_f(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | float]:
        """``(source, target, displacement, warped, velocity, own_term)``; ``velocity`` only when the velocity
        regulariser or the bidirectional inverse of a velocity estimator needs it; ``own_term`` =
        ``diffusion_weight ·`` the estimator's own training loss from the same forward (DiffuseMorph), else 0."""
        source, target = image[:, 0:1], image[:, 1:2]
        velocity, own_term = None, 0.0
        if getattr(self._estimator(), "has_training_loss", False):
            # the denoising loss must come from the forward that produced û (same t and noise)
            displacement, own_loss = self.inferer(image, self.network, return_training_loss=True)
            own_term = self.diffusion_weight * own_loss
        elif self.regularization == "velocity" or (self.bidir and getattr(self._estimator(), "has_velocity", False)):
            displacement, velocity = self.inferer(image, self.network, return_velocity=True)
        else:
            displacement = self.inferer(image, self.network)
        warped = self._estimator().warp(source, displacement, "bilinear")
        return source, target, displacement, warped, velocity, own_term

    def _directions(self, image: Tensor) -> tuple[list[tuple[Tensor, Tensor, Tensor, Tensor | None]], Tensor | float]:
        """One forward of ``f``: per direction ``(fixed, warped moving, displacement, velocity)`` — source -> target,
        and with ``bidir`` target -> source on the inverse field (``-v`` for a velocity, whose ``R`` is the same) — and
        the estimator's own weighted training term (0 for VoxelMorph/TransMorph), added once per step of ``f``."""
        source, target, displacement, warped, velocity, own_term = self._forward_f(image)
        out = [(target, warped, displacement, velocity)]
        if self.bidir:
            est = self._estimator()
            inverse = est.inverse_displacement(displacement, velocity)
            out.append((source, est.warp(target, inverse, "bilinear"), inverse,
                        None if velocity is None else -velocity))
        return out, own_term

    def _auxiliary(self, *inputs: list[Tensor]) -> list[Tensor]:
        """The auxiliary net on every direction's inputs in ONE forward (one DDP forward per step), split back."""
        if len(inputs[0]) == 1:
            return [self.auxiliary_network(*(x[0] for x in inputs))]
        return list(self.auxiliary_network(*(torch.cat(x) for x in inputs)).chunk(len(inputs[0])))

    @property
    def _lam_displacement(self) -> float:
        """``λ`` handed to the loss functions: 0 when the velocity carries the regulariser instead."""
        return 0.0 if self.regularization == "velocity" else self.lam

    def _velocity_term(self, velocity: Tensor | None, weight: Tensor | None = None) -> Tensor | float:
        """``λ · mult · R(v)`` (``R_w`` with AdaReg's weight on the velocity grid), or 0 for the displacement form."""
        if velocity is None or self.regularization != "velocity":
            return 0.0
        if weight is None:
            return self.lam * self.velocity_mult * gradient_smoothness(velocity)
        if weight.shape[2:] != velocity.shape[2:]:
            weight = torch.nn.functional.interpolate(weight, size=velocity.shape[2:], mode="area")
        return self.lam * self.velocity_mult * weighted_gradient_smoothness(velocity, weight)

    def _displacement_step(self, image: Tensor, use_score: bool, epoch: int) -> tuple[float, float]:
        """Eq. 2 (``Ŝ ≡ 1`` during warm-up); updates ``m_T`` with this step's ``μ_T``. Returns (loss, mean Ŝ)."""
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        dirs, own_term = self._directions(image)
        if use_score:
            with torch.no_grad():  # ⌊Ŝ⌋: g is only evaluated here
                scores = self._auxiliary([d[0] for d in dirs])
        else:
            scores = [torch.ones_like(d[0]) for d in dirs]
        losses, mus = [], []
        for (target, warped, displacement, velocity), score in zip(dirs, scores):
            losses.append(displacement_step_loss(target, warped, displacement, score, self._lam_displacement)
                          + self._velocity_term(velocity))
            if self.momentum_residual == "weighted":
                mus.append((score * (target - warped).detach().pow(2)).mean())
            else:
                mus.append(residual_energy(target, warped))
        loss = torch.stack(losses).mean() + own_term
        loss.backward()
        self.optimizer.step()
        self.momentum.update(_global_mean(torch.stack(mus).mean()), epoch)
        return float(loss.detach()), float(torch.stack([s.mean() for s in scores]).mean())

    def _scoring_step(self, image: Tensor) -> tuple[float, float]:
        """Eq. 9 on a fresh forward of ``f`` (``⌊û⌋``). Returns (loss, mean Ŝ)."""
        self.auxiliary_network.train()
        self.auxiliary_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            dirs, _ = self._directions(image)
        scores = self._auxiliary([d[0] for d in dirs])
        loss = torch.stack([scoring_step_loss(target, warped, score, self.alpha, self.beta, self.momentum.value)
                            for (target, warped, _, _), score in zip(dirs, scores)]).mean()
        loss.backward()
        self.auxiliary_optimizer.step()
        return float(loss.detach()), float(torch.stack([s.detach().mean() for s in scores]).mean())

    def _baseline_step(self, image: Tensor) -> float:
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.auxiliary_optimizer is not None:
            self.auxiliary_network.train()
            self.auxiliary_optimizer.zero_grad(set_to_none=True)
        dirs, own_term = self._directions(image)
        lam = self._lam_displacement
        log_vars = self._auxiliary([d[0] for d in dirs], [d[1] for d in dirs]) if self.method in ("nll", "beta_nll") \
            else [None] * len(dirs)
        losses = []
        for (target, warped, displacement, velocity), log_var in zip(dirs, log_vars):
            if self.method == "plain":
                loss = plain_registration_loss(target, warped, displacement, lam)
            elif self.method == "adareg":
                loss = adareg_loss(target, warped, displacement, lam, self.adareg_c)
            elif self.method == "adaframe":
                loss = adaframe_loss(target, warped, displacement, lam, self.adaframe_a0, self.adaframe_b0)
            elif self.method == "nll":
                loss = gaussian_nll_loss(target, warped, log_var, displacement, lam)
            else:
                loss = beta_nll_loss(target, warped, log_var, displacement, lam, self.beta_nll)
            weight = adareg_weight(target, warped, self.adareg_c) if self.method == "adareg" and velocity is not None \
                else None
            losses.append(loss + self._velocity_term(velocity, weight))
        loss = (torch.stack(losses).mean() if len(losses) > 1 else losses[0]) + own_term
        loss.backward()
        self.optimizer.step()
        if self.auxiliary_optimizer is not None:
            self.auxiliary_optimizer.step()
        return float(loss.detach())

    def _iteration(self, engine: AdaCSTrainer, batchdata: dict[str, Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image = batch[0]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        if image.ndim < 4 or image.shape[1] != 2:
            raise ValueError(f"training batches need image (B, 2, *spatial) = stacked source/target, got "
                             f"{tuple(image.shape)}")
        epoch = engine.state.epoch - 1
        phase = training_phase(epoch, engine.method, engine.warmup_epochs)
        nan = float("nan")
        out: dict[str, Any] = {"phase": phase, "loss_displacement": nan, "loss_scoring": nan, "score_mean": nan}
        if phase == "joint":
            out["loss_displacement"] = engine._baseline_step(image)
        if phase in ("displacement", "alternating"):
            out["loss_displacement"], out["score_mean"] = engine._displacement_step(
                image, use_score=phase == "alternating", epoch=epoch)
        if phase in ("scoring", "alternating"):
            out["loss_scoring"], out["score_mean"] = engine._scoring_step(image)
        out["loss"] = torch.tensor(out["loss_scoring"] if phase == "scoring" else out["loss_displacement"])
        out["tv_weight"] = engine.momentum.value if engine.momentum is not None else nan
        if engine.momentum is not None:
            # kept current every iteration, so epoch-level handlers log the value at the end of each epoch
            engine.state.metrics["tv_weight"] = engine.momentum.value
            engine.state.metrics["momentum_mu"] = engine.momentum.epoch_mean
        engine.state.output = out
        return out


class LastEpochModelSaver:
    """Training handler for ``model_selection``: with ``"last"`` it writes the network's weights (state dict) to
    ``<save_dir>/<filename>`` after every epoch (atomically), so the file holds the last epoch's weights when training
    ends (the last completed epoch's after an interruption) — the AdaCS authors' protocol, which needs no labels.
    With ``"best_val"`` it does nothing: the validation ``CheckpointSaver`` (``save_key_metric``) keeps the weights
    of the best validation Dice instead. The file has the layout MONAI's
    ``CheckpointSaver(save_dict={"model": network})`` writes (one object: its state dict alone), so the
    bundle's evaluation/inference ``CheckpointLoader`` reads it.

    Args:
        save_dir: checkpoint folder (``@ckpt_dir``).
        network: the trained network (DDP-wrapped or not; the inner module's weights are saved).
        model_selection: one of :data:`MODEL_SELECTIONS`.
        filename: file name (``model.pt``).
    """

    def __init__(self, save_dir: str, network: nn.Module, model_selection: str = "best_val",
                 filename: str = "model.pt") -> None:
        if model_selection not in MODEL_SELECTIONS:
            raise ValueError(f"model_selection must be one of {MODEL_SELECTIONS}, got {model_selection!r}")
        self.path = Path(save_dir) / filename
        self.network = network
        self.model_selection = model_selection

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.model_selection == "last":
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # written aside and renamed, so an interruption never leaves a truncated model.pt
        torch.save(unwrap(self.network).state_dict(), tmp)
        os.replace(tmp, self.path)


class EpochMetricsJSONWriter:
    """Training handler: one JSON record per epoch of the trainer's ``state.metrics`` (e.g. ``tv_weight`` = ``m_T``).

    ``<output_dir>/<filename>`` holds ``{"epochs": [{"epoch": 1, "tv_weight": ..., ...}, ...]}``, rewritten
    (atomically) after every epoch. A resumed run keeps the records of the epochs before the one it resumes at and
    replaces the rest, so the file always describes the run that produced the checkpoint.

    Args:
        output_dir: folder of the file.
        filename: file name (``train_metrics.json``).
        keys: the ``state.metrics`` entries to record (all numeric entries by default).
    """

    def __init__(self, output_dir: str, filename: str = "train_metrics.json",
                 keys: Sequence[str] | None = None) -> None:
        self.path = Path(output_dir) / filename
        self.keys = None if keys is None else list(keys)
        self.records: list[dict] | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        import json

        from common.engines.handlers import write_json_atomic

        epoch = int(engine.state.epoch)
        if self.records is None:  # first epoch of this run: keep what an earlier (resumed) run wrote before it
            self.records = []
            if self.path.is_file():
                try:
                    old = json.loads(self.path.read_text()).get("epochs", [])
                except (OSError, ValueError, AttributeError) as e:
                    raise ValueError(f"{self.path}: unreadable epoch metrics file ({e}); move it away") from e
                self.records = [r for r in old if isinstance(r, dict) and int(r.get("epoch", 0)) < epoch]
        metrics = engine.state.metrics
        keys = self.keys if self.keys is not None else list(metrics)
        record: dict[str, Any] = {"epoch": epoch}
        for k in keys:
            v = metrics.get(k)
            v = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                record[k] = float(v) if np.isfinite(v) else None
        self.records = [r for r in self.records if int(r["epoch"]) != epoch] + [record]
        write_json_atomic(self.path, {"epochs": self.records})
