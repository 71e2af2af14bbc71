"""AdaCS trainer (Algorithm 1 and baselines), checkpoint/resume, registration metrics and report handlers."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from common.engines.checkpoint import ResumeFromCheckpoint
from common.engines.registration import (
    METHODS,
    PRESETS,
    SCORE_COLUMNS,
    AdaCSTrainer,
    RegistrationMetric,
    RegistrationMetricsd,
    adacs_preset,
    build_auxiliary_net,
    score_pair,
    training_phase,
)
from common.losses.adacs import (
    MomentumTVWeight,
    displacement_step_loss,
    plain_registration_loss,
    residual_energy,
    scoring_step_loss,
)
from common.networks.registration import StackedPairAdapter, VoxelMorphEstimator
from common.networks.scoring import ScoringNet, VarianceNet

pytestmark = [
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]

SMALL = {"enc_channels": (4, 8, 8, 8), "dec_channels": (8, 8, 8, 8, 8, 4, 4)}
SIZE = 32


def _adapter(seed: int = 0) -> StackedPairAdapter:
    torch.manual_seed(seed)
    est = VoxelMorphEstimator(**SMALL, integration_steps=3)
    with torch.no_grad():  # wake the near-zero head so that steps visibly move the displacement
        est.net.backbone.net[1].final_conv_out.conv.weight.normal_(0, 0.02)
    return StackedPairAdapter(est)


def _aux(method: str, seed: int = 1):
    torch.manual_seed(seed)
    return build_auxiliary_net(method, 2, **SMALL)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Smooth blobs: the target is the source shifted by 2 pixels, with a dark 'lost' square on half of them."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = []
    for i in range(n):
        cy, cx = 12 + 6 * torch.rand(2, generator=g)
        src = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        tgt = torch.exp(-((yy - cy - 2) ** 2 + (xx - cx) ** 2) / 40.0)
        if i % 2:
            tgt[4:10, 4:10] = 0.9
        out.append(torch.stack([src, tgt]))
    return torch.stack(out).float()


def _loader(n: int = 4, batch: int = 2) -> DataLoader:
    data = [{"image": x} for x in _images(n)]
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(data, batch_size=batch, sampler=sampler)


def _trainer(method: str = "adacs", epochs: int = 3, warmup: int = 1, lr: float = 1e-3, aux_lr: float = 1e-3,
             loader=None) -> AdaCSTrainer:
    net = _adapter()
    aux = _aux(method) if method in ("adacs", "nll", "beta_nll") else None
    return AdaCSTrainer(
        "cpu", epochs, loader if loader is not None else _loader(), net, torch.optim.Adam(net.parameters(), lr=lr),
        method=method, auxiliary_network=aux,
        auxiliary_optimizer=torch.optim.Adam(aux.parameters(), lr=aux_lr) if aux is not None else None,
        lam=0.01, alpha=0.02, beta=1.5, warmup_epochs=warmup,
    )


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _changed(before: list[torch.Tensor], m: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


# ------------------------------------------------------------------------------------------------ presets
def test_presets_follow_methods_md():
    assert adacs_preset("voxelmorph", "acdc") == {"alpha": 0.02, "beta": 1.5, "lam": 0.01, "lr": 2e-4,
                                                  "warmup_epochs": 20}
    assert adacs_preset("VoxelMorph", "CAMUS")["alpha"] == 0.04 and adacs_preset("voxelmorph", "camus")["lr"] == 1e-4
    assert (adacs_preset("transmorph", "acdc")["alpha"], adacs_preset("transmorph", "acdc")["beta"]) == (0.01, 0.6)
    assert (adacs_preset("transmorph", "camus")["beta"], adacs_preset("transmorph", "camus")["lam"]) == (5.0, 0.03)
    assert adacs_preset("voxelmorph", "pairs") == adacs_preset("voxelmorph", "acdc")
    p = adacs_preset("voxelmorph", "acdc")
    p["alpha"] = 99.0  # a copy: the table is not changed
    assert PRESETS[("voxelmorph", "acdc")]["alpha"] == 0.02
    with pytest.raises(ValueError, match="no AdaCS preset.*diffusemorf"):
        adacs_preset("diffusemorf", "acdc")


def test_auxiliary_nets_and_phases():
    assert isinstance(build_auxiliary_net("adacs"), ScoringNet)
    assert isinstance(build_auxiliary_net("nll"), VarianceNet) and isinstance(build_auxiliary_net("beta_nll"),
                                                                               VarianceNet)
    assert all(build_auxiliary_net(m) is None for m in ("plain", "adareg", "adaframe"))
    with pytest.raises(ValueError, match="method must be one of"):
        build_auxiliary_net("adacz")
    assert [training_phase(e, "adacs", 2) for e in range(6)] == ["displacement"] * 2 + ["scoring"] * 2 + [
        "alternating"] * 2
    assert training_phase(0, "adacs", 0) == "alternating" and training_phase(0, "plain", 5) == "joint"


def test_trainer_rejects_mismatched_networks():
    net = _adapter()
    opt = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="needs a ScoringNet"):
        AdaCSTrainer("cpu", 1, _loader(), net, opt, method="adacs", auxiliary_network=None)
    with pytest.raises(ValueError, match="needs auxiliary_optimizer"):
        AdaCSTrainer("cpu", 1, _loader(), net, opt, method="adacs", auxiliary_network=_aux("adacs"))
    with pytest.raises(ValueError, match="takes no auxiliary network"):
        AdaCSTrainer("cpu", 1, _loader(), net, opt, method="plain", auxiliary_network=_aux("adacs"))
    with pytest.raises(ValueError, match="StackedPairAdapter"):
        AdaCSTrainer("cpu", 1, _loader(), net.estimator, opt, method="plain")


# ---------------------------------------------------------------------------------------- Algorithm 1 steps
def test_displacement_step_detaches_the_score_and_matches_eq2():
    tr = _trainer()
    image = _images(2)
    source, target = image[:, :1], image[:, 1:]
    g_before, f_before = _params(tr.auxiliary_network), _params(tr.network)
    with torch.no_grad():
        disp = tr.network(image)
        warped = tr.network.estimator.warp(source, disp)
        score = tr.auxiliary_network(target)
        expected = float(displacement_step_loss(target, warped, disp, score, 0.01))
        mu = float(residual_energy(target, warped))
    loss, score_mean = tr._displacement_step(image, use_score=True, epoch=0)
    assert loss == pytest.approx(expected, rel=1e-5) and score_mean == pytest.approx(float(score.mean()), rel=1e-5)
    assert _changed(f_before, tr.network)
    assert not _changed(g_before, tr.auxiliary_network)  # ⌊Ŝ⌋: g gets no update ...
    assert all(p.grad is None for p in tr.auxiliary_network.parameters())  # ... and no gradient at all
    # m_T: one update with this step's residual, gamma = 0 at epoch 0 -> m = cos(pi/2 mu)
    assert tr.momentum.num_updates == 1 and tr.momentum.value == pytest.approx(math.cos(0.5 * math.pi * mu), rel=1e-6)


def test_warmup_displacement_step_uses_unit_score_eq1():
    tr = _trainer()
    image = _images(2)
    with torch.no_grad():
        disp = tr.network(image)
        warped = tr.network.estimator.warp(image[:, :1], disp)
        expected = float(plain_registration_loss(image[:, 1:], warped, disp, 0.01))
    loss, score_mean = tr._displacement_step(image, use_score=False, epoch=0)
    assert loss == pytest.approx(expected, rel=1e-5) and score_mean == 1.0


def test_scoring_step_freezes_f_and_matches_eq9():
    tr = _trainer()
    tr.momentum.load_state_dict({"m": 0.7, "num_updates": 3})
    image = _images(2)
    f_before, g_before = _params(tr.network), _params(tr.auxiliary_network)
    with torch.no_grad():
        warped = tr.network.estimator.warp(image[:, :1], tr.network(image))
        expected = float(scoring_step_loss(image[:, 1:], warped, tr.auxiliary_network(image[:, 1:]), 0.02, 1.5, 0.7))
    loss, _ = tr._scoring_step(image)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert not _changed(f_before, tr.network) and all(p.grad is None for p in tr.network.parameters())
    assert _changed(g_before, tr.auxiliary_network)
    assert tr.momentum.num_updates == 3  # scoring steps read m_T, they do not update it


def test_alternating_iteration_scores_a_fresh_forward_of_the_updated_f():
    # g's learning rate is 0, so after the iteration g is what the scoring step saw and f is the updated estimator:
    # the reported scoring loss must equal Eq. 9 recomputed with the *updated* f (a stale forward would differ)
    tr = _trainer(warmup=0, aux_lr=0.0, lr=5e-3)
    batch = {"image": _images(2)}
    f_before = copy.deepcopy(tr.network)
    tr.state.epoch, tr.state.iteration = 1, 1
    out = tr._iteration(tr, batch)
    assert out["phase"] == "alternating" and math.isfinite(out["loss_displacement"])
    image = batch["image"]
    with torch.no_grad():
        target = image[:, 1:]
        score = tr.auxiliary_network(target)
        fresh = tr.network.estimator.warp(image[:, :1], tr.network(image))
        stale = f_before.estimator.warp(image[:, :1], f_before(image))
        m = tr.momentum.value
        fresh_loss = float(scoring_step_loss(target, fresh, score, 0.02, 1.5, m))
        stale_loss = float(scoring_step_loss(target, stale, score, 0.02, 1.5, m))
    assert abs(fresh_loss - stale_loss) > 1e-6 * abs(fresh_loss)
    assert out["loss_scoring"] == pytest.approx(fresh_loss, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_displacement"], rel=1e-6)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "adacs"])
def test_baselines_train_their_networks(method):
    tr = _trainer(method, epochs=1)
    f_before = _params(tr.network)
    aux_before = _params(tr.auxiliary_network) if tr.auxiliary_network is not None else None
    tr.run()
    assert tr.state.output["phase"] == "joint" and math.isfinite(tr.state.output["loss_displacement"])
    assert _changed(f_before, tr.network)
    if aux_before is not None:
        assert _changed(aux_before, tr.auxiliary_network)  # NLL / beta-NLL: the variance net is trained jointly
    assert tr.momentum is None and "momentum" not in tr.checkpoint_dict()


def test_full_schedule_runs_each_phase():
    tr = _trainer(epochs=3, warmup=1)
    phases = []
    from ignite.engine import Events

    tr.add_event_handler(Events.ITERATION_COMPLETED, lambda e: phases.append(e.state.output["phase"]))
    tr.run()
    assert phases == ["displacement"] * 2 + ["scoring"] * 2 + ["alternating"] * 2
    assert tr.momentum.num_updates == 4  # after every displacement step (phases 1 and 3)


# ------------------------------------------------------------------------------------------ checkpoint/resume
def _final_state(tr: AdaCSTrainer) -> dict:
    return {"f": {k: v.clone() for k, v in tr.network.state_dict().items()},
            "g": {k: v.clone() for k, v in tr.auxiliary_network.state_dict().items()},
            "m": tr.momentum.state_dict()}


def test_resume_from_checkpoint_continues_identically(tmp_path):
    from monai.handlers import CheckpointSaver

    torch.manual_seed(0)
    full = _trainer(epochs=4, warmup=1)
    full.run()
    reference = _final_state(full)

    torch.manual_seed(0)
    first = _trainer(epochs=3, warmup=1)
    CheckpointSaver(str(tmp_path), first.checkpoint_dict(), save_final=True, final_filename="ckpt.pt").attach(first)
    first.run()
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # tensors and plain values only
    assert {"network", "optimizer", "auxiliary", "optimizer_auxiliary", "momentum", "trainer"} <= set(state)
    assert state["momentum"]["num_updates"] == 4 and isinstance(state["momentum"]["m"], float)

    torch.manual_seed(123)  # different global RNG: the continuation must not depend on it
    resumed = _trainer(epochs=4, warmup=1)
    ResumeFromCheckpoint(str(tmp_path / "ckpt.pt"), resumed.checkpoint_dict()).attach(resumed)
    resumed.run()
    assert resumed.state.epoch == 4 and resumed.momentum.num_updates == reference["m"]["num_updates"] == 6
    got = _final_state(resumed)
    assert got["m"]["m"] == reference["m"]["m"]
    for part in ("f", "g"):
        for k, v in reference[part].items():
            assert torch.equal(got[part][k], v), f"{part}.{k} differs after resume"
    # without the momentum state the continuation differs (the test can fail)
    fresh = _trainer(epochs=4, warmup=1)
    load = fresh.checkpoint_dict()
    load.pop("momentum")
    ResumeFromCheckpoint(str(tmp_path / "ckpt.pt"), load).attach(fresh)
    fresh.run()
    assert fresh.momentum.state_dict() != reference["m"]


def test_resume_path_errors(tmp_path):
    tr = _trainer(epochs=1, warmup=0)
    ResumeFromCheckpoint("", tr.checkpoint_dict()).attach(tr)  # empty path: nothing to do
    with pytest.raises(FileNotFoundError, match="resume checkpoint .*missing.pt not found"):
        ResumeFromCheckpoint(str(tmp_path / "missing.pt"), tr.checkpoint_dict()).attach(tr)


def test_momentum_state_roundtrip_through_weights_only_load(tmp_path):
    m = MomentumTVWeight()
    for e, mu in enumerate((0.1, 0.05, 0.02)):
        m.update(mu, e)
    torch.save({"momentum": m.state_dict()}, tmp_path / "m.pt")
    m2 = MomentumTVWeight()
    m2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True)["momentum"])
    assert m2.state_dict() == m.state_dict()


# ----------------------------------------------------------------------------------------------- DDP (1 rank)
@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():  # left by another test: usable only if it is a single-rank group
        assert dist.get_world_size() == 1, "a multi-rank process group is already initialised in this session"
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["adacs", "nll"])
def test_ddp_wrapped_networks_have_no_unused_parameters(gloo_group, method):
    # DDP raises on the iteration after a step that left a parameter without gradient; every phase runs twice
    ddp = torch.nn.parallel.DistributedDataParallel
    net = ddp(_adapter())
    aux = ddp(_aux(method))
    tr = AdaCSTrainer("cpu", 3, _loader(), net, torch.optim.Adam(net.parameters(), lr=1e-3), method=method,
                      auxiliary_network=aux, auxiliary_optimizer=torch.optim.Adam(aux.parameters(), lr=1e-3),
                      warmup_epochs=1)
    tr.run()
    assert tr.state.epoch == 3 and math.isfinite(tr.state.output["loss_displacement"])
    assert set(tr.checkpoint_dict()) >= {"network", "auxiliary"}


# ---------------------------------------------------------------------------------------------------- metrics
def _ring(center: tuple[float, float], r_in: float = 6, r_out: float = 10, size: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    d = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2).float().sqrt()
    return ((d >= r_in) & (d <= r_out)).float()


def test_score_pair_against_independent_values():
    src, tgt = _ring((14, 16)), _ring((17, 16))
    masks = torch.stack([src, tgt])
    shift = torch.zeros(2, SIZE, SIZE)
    shift[0] = -3.0  # pull-back: warped(x) = src(x - 3 rows) moves the ring 3 rows down onto the target
    vals, warped = score_pair(shift, masks, SCORE_COLUMNS, spacing=(2.0, 2.0))
    assert vals["dice"] == pytest.approx(1.0) and vals["hd"] == 0.0 and vals["asd"] == 0.0
    assert torch.equal(warped[0], tgt.long())
    ident = float(2 * (src * tgt).sum() / (src.sum() + tgt.sum()))
    assert vals["dice_identity"] == pytest.approx(ident, rel=1e-6) and vals["dice_identity"] < 0.9
    assert vals["nonpositive_jacobian_percent"] == 0.0
    folded = torch.zeros(2, SIZE, SIZE)
    folded[1, :, 10:20] = torch.linspace(0, -25, 10)  # d u_1 / d x_1 < -1: columns pulled past each other
    assert score_pair(folded, masks, ("nonpositive_jacobian_percent",))[0]["nonpositive_jacobian_percent"] > 0
    no_shift, _ = score_pair(torch.zeros(2, SIZE, SIZE), masks, ("hd", "hd_mm", "asd", "asd_mm"), spacing=(2.0, 2.0))
    assert no_shift["hd"] == pytest.approx(3.0) and no_shift["hd_mm"] == pytest.approx(6.0)
    assert no_shift["asd_mm"] == pytest.approx(2 * no_shift["asd"])
    with pytest.raises(ValueError, match="unknown registration scores"):
        score_pair(shift, masks, ("dsc",))


def test_registration_metric_both_input_forms_agree():
    masks = torch.stack([_ring((14, 16)), _ring((17, 16))])
    ddf = torch.zeros(2, SIZE, SIZE)
    ddf[0] = -1.5
    direct = RegistrationMetric("dice")
    direct(y_pred=[ddf, torch.zeros_like(ddf)], y=[masks, masks])
    post = RegistrationMetricsd(("dice", "hd"))
    outs = [post({"pred": d, "label": masks}) for d in (ddf, torch.zeros_like(ddf))]
    table = RegistrationMetric("dice")
    table(y_pred=[o["scores"] for o in outs], y=[o["score_names"] for o in outs])
    assert torch.allclose(direct.get_buffer(), table.get_buffer().float())
    assert float(direct.aggregate()) == pytest.approx(float(direct.get_buffer().mean()))
    missing = RegistrationMetric("asd")
    with pytest.raises(ValueError, match="'asd' is not among them"):
        missing(y_pred=[o["scores"] for o in outs], y=[o["score_names"] for o in outs])
    with pytest.raises(ValueError, match="metric must be one of"):
        RegistrationMetric("jaccard")


def test_registration_metric_ignores_infinite_pairs_in_the_mean():
    m = RegistrationMetric("hd")
    m.extend(torch.tensor([[1.0], [float("inf")], [3.0]]))
    assert float(m.aggregate()) == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(float(RegistrationMetric("hd").aggregate()))
