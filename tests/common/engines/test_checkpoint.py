"""common.engines.checkpoint: the best-model record survives a resume, each epoch's randomness depends on the epoch
only, and a resumable checkpoint loads weights-only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from monai.transforms import RandFlipd

from common.engines.checkpoint import EpochSeed, ResumeFromCheckpoint, ValidationState, epoch_seed, training_state


def _validation_epoch(save_dir, net: torch.nn.Module, score: float, weight: float, state: dict | None = None):
    """One 'validation' epoch scoring ``score`` with the net's weights set to ``weight``; returns (evaluator, tracker).

    The evaluator keeps the best score like MONAI's workflows; ``state`` (a ValidationState state dict) is loaded
    first, as a resumed run does."""
    saver = CheckpointSaver(str(save_dir), {"model": net}, save_key_metric=True, key_metric_name="acc",
                            key_metric_filename="model.pt")
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
    tracker = ValidationState(evaluator, [object(), saver])
    if state is not None:
        tracker.load_state_dict(state)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(e):
        e.state.metrics["acc"] = score
        if score > e.state.best_metric:
            e.state.best_metric, e.state.best_metric_epoch = score, 1

    saver.attach(evaluator)
    with torch.no_grad():
        net.weight.fill_(weight)
    evaluator.run([0], max_epochs=1)
    return evaluator, tracker


def test_resumed_validation_keeps_the_better_model_from_before_the_interruption(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    _, tracker = _validation_epoch(tmp_path, net, score=0.9, weight=1.0)
    state = tracker.state_dict()
    assert state["best_metric"] == 0.9 and state["savers"][0]["saved"][0][0] == 0.9
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain values only

    evaluator, _ = _validation_epoch(tmp_path, net, score=0.5, weight=2.0, state=state)  # resumed, worse model
    assert float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"]) == 1.0
    assert evaluator.state.best_metric == 0.9
    # without the record the worse model replaces the better one: what the state is there for
    _validation_epoch(tmp_path, net, score=0.5, weight=3.0)
    assert float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"]) == 3.0


def test_a_record_without_its_file_is_dropped(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    _, tracker = _validation_epoch(tmp_path / "a", net, score=0.9, weight=1.0)
    # resumed into another folder: no model.pt there to replace, so the first validation writes one
    _validation_epoch(tmp_path / "b", net, score=0.5, weight=2.0, state=tracker.state_dict())
    assert float(torch.load(tmp_path / "b" / "model.pt", weights_only=True)["weight"]) == 2.0


def test_saver_count_mismatch_fails_clearly():
    state = {"best_metric": 1.0, "best_metric_epoch": 1, "savers": [{"saved": []}]}
    with pytest.raises(ValueError, match="tracks 1 key-metric CheckpointSaver"):
        ValidationState(Engine(lambda e, b: None), []).load_state_dict(state)


def test_epoch_randomness_depends_on_the_epoch_only():
    flip = RandFlipd(keys="x", prob=0.5)
    seeding = EpochSeed(seed=3, data=flip)
    engine = Engine(lambda e, b: None)

    def draws(epoch: int) -> tuple:
        engine.state.epoch = epoch
        seeding(engine)
        # numpy's legacy global RNG on purpose: it is what MONAI's set_determinism seeds and old code draws from
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), flip.R.rand(3).tolist())  # noqa: NPY002

    first = draws(2)
    draws(1), draws(5)  # whatever ran before
    assert draws(2) == first
    assert draws(3) != first
    assert epoch_seed(3, 2) != epoch_seed(4, 2)


def test_training_state_round_trips_weights_only(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Engine(lambda e, b: (opt.zero_grad(), net(torch.ones(1, 2)).sum().backward(), opt.step()))
    trainer.network, trainer.optimizer = net, opt
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    trainer.run([0, 1], max_epochs=2)
    state = training_state(trainer, lr_scheduler=sched)
    assert set(state) == {"network", "optimizer", "trainer", "lr_scheduler"}
    torch.save({k: v.state_dict() for k, v in state.items()}, tmp_path / "ckpt.pt")

    net2 = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    trainer2 = Engine(lambda e, b: None)
    trainer2.network, trainer2.optimizer = net2, opt2
    ResumeFromCheckpoint(str(tmp_path / "ckpt.pt"), training_state(trainer2, lr_scheduler=sched2)).attach(trainer2)
    trainer2.run([0, 1], max_epochs=3)  # loads at STARTED, then runs the third epoch
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(0.025)
    assert trainer2.state.iteration == 6
    with pytest.raises(FileNotFoundError, match=r"resume checkpoint .*missing.pt not found \(--resume_from\)"):
        ResumeFromCheckpoint(str(tmp_path / "missing.pt"), state).attach(trainer2)
    # a schedule built for 2 epochs cannot continue as a 5-epoch one: clear error before any training
    trainer3 = Engine(lambda e, b: None)
    trainer3.network, trainer3.optimizer, trainer3.state.max_epochs = net2, opt2, 5
    with pytest.raises(ValueError, match=r"comes from a run with epochs=2; .* resume with --epochs 2 \(got 5\)"):
        ResumeFromCheckpoint(str(tmp_path / "ckpt.pt"), training_state(trainer3, lr_scheduler=sched2)).attach(trainer3)
