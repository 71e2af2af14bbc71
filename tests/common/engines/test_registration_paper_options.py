"""AdaCS trainer options of issue 17: the authors' velocity regulariser (point 4) and the per-epoch log of the
momentum weight ``m_T`` with the authors' scaled form (point 1)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader

from common.engines.registration import AdaCSTrainer, EpochMetricsJSONWriter, build_auxiliary_net
from common.losses.adacs import (
    MomentumTVWeight,
    adareg_weight,
    displacement_step_loss,
    gradient_smoothness,
    plain_registration_loss,
    weighted_gradient_smoothness,
)
from common.networks.registration import DisplacementEstimator, StackedPairAdapter, VoxelMorphEstimator

pytestmark = [
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SMALL = {"enc_channels": (4, 8, 8, 8), "dec_channels": (8, 8, 8, 8, 8, 4, 4)}
SIZE = 32


def _adapter(half_res: bool = True, seed: int = 0) -> StackedPairAdapter:
    torch.manual_seed(seed)
    est = VoxelMorphEstimator(**SMALL, integration_steps=3, half_res=half_res)
    with torch.no_grad():  # a visibly non-zero velocity, so that its regulariser is not ~0
        est.net.backbone.net[1].final_conv_out.conv.weight.normal_(0, 1.0)
    return StackedPairAdapter(est)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Bright blobs on [0, 1]; the target is the source moved by 2 pixels (mean squared residual ~0.005-0.02)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = 12 + 6 * torch.rand(2, generator=g)
        src = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
        tgt = torch.exp(-((yy - cy - 2) ** 2 + (xx - cx - 1) ** 2) / 30.0)
        out.append(torch.stack([src, tgt]))
    return torch.stack(out).float()


def _trainer(method: str = "adacs", regularization: str = "displacement", half_res: bool = True, lam: float = 1.0,
             epochs: int = 3, warmup: int = 1, momentum: MomentumTVWeight | None = None,
             momentum_residual: str = "plain", handlers=None, lr: float = 1e-3) -> AdaCSTrainer:
    net = _adapter(half_res)
    torch.manual_seed(1)
    aux = build_auxiliary_net(method, 2, **SMALL)
    data = [{"image": x} for x in _images()]
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    return AdaCSTrainer(
        "cpu", epochs, DataLoader(data, batch_size=2, sampler=sampler), net, torch.optim.Adam(net.parameters(), lr=lr),
        method=method, auxiliary_network=aux,
        auxiliary_optimizer=torch.optim.Adam(aux.parameters(), lr=1e-3) if aux is not None else None,
        lam=lam, alpha=0.02, beta=1.5, warmup_epochs=warmup, momentum=momentum, momentum_residual=momentum_residual,
        regularization=regularization, train_handlers=handlers,
    )


# ------------------------------------------------------------------------------------ point 4: velocity regulariser
@pytest.mark.parametrize("half_res, mult", [(True, 2.0), (False, 1.0)])
def test_velocity_regularizer_is_used_in_the_displacement_step(half_res, mult):
    tr = _trainer(regularization="velocity", half_res=half_res)
    image = _images(2)
    source, target = image[:, :1], image[:, 1:]
    with torch.no_grad():
        est = copy.deepcopy(tr.network.estimator)
        warped, disp, velocity = est.forward_with_velocity(source, target)
        score = tr.auxiliary_network(target)
        expected = float(displacement_step_loss(target, warped, disp, score, 0.0)) + mult * float(
            gradient_smoothness(velocity))
        ours = float(displacement_step_loss(target, warped, disp, score, 1.0))
    assert velocity.shape[2:] == ((SIZE // 2,) * 2 if half_res else (SIZE,) * 2)
    # the two regularisers differ by much more than float noise here, so the check below can tell them apart
    assert abs(expected - ours) > 1e-3 * abs(expected)
    loss, _ = tr._displacement_step(image, use_score=True, epoch=0)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_velocity_regularizer_in_the_baselines():
    image = _images(2)
    source, target = image[:, :1], image[:, 1:]
    for method in ("plain", "adareg"):
        tr = _trainer(method=method, regularization="velocity")
        with torch.no_grad():
            warped, disp, velocity = copy.deepcopy(tr.network.estimator).forward_with_velocity(source, target)
            data = float(plain_registration_loss(target, warped, disp, 0.0))
            if method == "plain":
                reg = float(gradient_smoothness(velocity))
            else:  # AdaReg's weight averaged over 2x2 blocks onto the half-resolution velocity grid
                weight = F.avg_pool2d(adareg_weight(target, warped), 2)
                reg = float(weighted_gradient_smoothness(velocity, weight))
        assert tr._baseline_step(image) == pytest.approx(data + 2.0 * reg, rel=1e-5), method


def test_velocity_regularizer_needs_a_velocity_estimator():
    class Direct(DisplacementEstimator):  # predicts the displacement directly, like TransMorph
        def __init__(self) -> None:
            super().__init__(2, 1)
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def predict_displacement(self, source, target):
            return self.conv(torch.cat([source, target], 1))

    net = StackedPairAdapter(Direct())
    with pytest.raises(ValueError, match="regularization='velocity' needs an estimator.*Direct"):
        AdaCSTrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), method="plain",
                     regularization="velocity")
    with pytest.raises(ValueError, match="no velocity field"):
        net(_images(1), return_velocity=True)
    with pytest.raises(ValueError, match="regularization must be one of"):
        _trainer(regularization="flow")


# --------------------------------------------------------------------------- point 1: m_T moves and is logged
def test_weighted_residual_feeds_the_scaled_momentum():
    tr = _trainer(momentum=MomentumTVWeight(residual_scale=100.0, average="epoch"), momentum_residual="weighted")
    image = _images(2)
    source, target = image[:, :1], image[:, 1:]
    with torch.no_grad():
        warped = tr.network.estimator.warp(source, tr.network(image))
        score = tr.auxiliary_network(target)
        mu_weighted = float((score * (target - warped) ** 2).mean())
        mu_plain = float(((target - warped) ** 2).mean())
    assert 0.002 < mu_plain < 0.03  # a realistic residual magnitude
    tr._displacement_step(image, use_score=True, epoch=0)
    # epoch 0: γ = 0, m = b of the (one-step) epoch mean of the Ŝ-weighted residual
    assert tr.momentum.value == pytest.approx(math.cos(math.pi / 2 * min(100 * mu_weighted, 1.0)), rel=1e-5)
    assert abs(tr.momentum.value - math.cos(math.pi / 2 * min(100 * mu_plain, 1.0))) > 1e-3


def test_momentum_is_logged_per_epoch_to_json_and_tensorboard(tmp_path):
    from monai.handlers import TensorBoardStatsHandler
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    handlers = [TensorBoardStatsHandler(log_dir=str(tmp_path), tag_name="train_loss",
                                        output_transform=lambda out: float(out["loss"])),
                EpochMetricsJSONWriter(str(tmp_path))]
    tr = _trainer(lam=0.01, epochs=4, warmup=1, lr=5e-3, handlers=handlers, momentum_residual="weighted",
                  momentum=MomentumTVWeight(residual_scale=100.0, average="epoch"))
    ends: list[float] = []
    from ignite.engine import Events

    tr.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(e.momentum.value))
    tr.run()
    records = json.loads((tmp_path / "train_metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["tv_weight"] for r in records] == pytest.approx(ends, abs=1e-12)
    assert all(0.0 <= r["tv_weight"] <= 1.0 and 0.0 < r["momentum_mu"] < 0.05 for r in records)
    assert len(set(round(v, 6) for v in ends)) > 1  # it moves: not one value for the whole run
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("tv_weight")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx(ends, abs=1e-6)


def test_epoch_json_of_a_resumed_run_replaces_later_epochs(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "train_metrics.json"
    path.write_text(json.dumps({"epochs": [{"epoch": e, "tv_weight": 0.1 * e} for e in (1, 2, 3)]}))
    writer = EpochMetricsJSONWriter(str(tmp_path))
    # a run resumed from the epoch-1 checkpoint completes epoch 2 again
    writer(SimpleNamespace(state=SimpleNamespace(epoch=2, metrics={"tv_weight": 0.5, "phase": "x"})))
    assert json.loads(path.read_text())["epochs"] == [{"epoch": 1, "tv_weight": 0.1}, {"epoch": 2, "tv_weight": 0.5}]
