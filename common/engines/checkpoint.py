"""Resumable training shared by every bundle: what a training checkpoint holds, how a run resumes from it, and the
per-epoch seeding that makes a resumed run continue exactly as an uninterrupted one.

A bundle's ``train.json`` wires four pieces, attached in its ``run`` list (``--resume_from <checkpoint>`` resumes,
``""`` starts fresh)::

    "train#state":        "$common.engines.checkpoint.training_state(@train#trainer, lr_scheduler=...,
                               validation=@validate#evaluator, validation_handlers=@validate#handlers)"
    "train#checkpointer": CheckpointSaver(save_dict=@train#state, every epoch + final "checkpoint.pt")
    "train#resume":       common.engines.checkpoint.ResumeFromCheckpoint(@resume_from, @train#state)
    "train#seeding":      common.engines.checkpoint.EpochSeed(seed, @train#dataset)

Why each part is needed for an exact continuation:

* :func:`training_state` -- network(s), optimiser(s), LR scheduler, AMP scaler, the engine (epoch, iteration) and
  what validation remembers across epochs (:class:`ValidationState`: the best key metric and which ``model.pt``
  the key-metric ``CheckpointSaver`` has kept), so the resumed run keeps the same best model. Everything saved is
  tensors and plain values (MONAI 1.6 loads checkpoints weights-only).
* :class:`EpochSeed` -- data order (shuffling samplers, DataLoader worker seeds), random augmentation and dropout
  draw from the global RNGs and the transforms' own random states. Instead of saving all of those (the transforms'
  states live in DataLoader workers), every epoch reseeds them from ``(seed, epoch)``: the randomness of epoch
  ``e`` is then the same whether the run started at epoch 1 or was resumed at epoch ``e``.
* :class:`ResumeFromCheckpoint` -- MONAI's ``CheckpointLoader`` (weights-only, keeps the configured
  ``max_epochs``) when a path is given, a clear error when that path is missing.

A checkpoint written at the end of an epoch (``train_checkpoint_epoch=N.pt``, or ``checkpoint.pt`` at the end of a
run) resumes exactly. ``checkpoint.pt`` written when a run stops on an error mid-epoch resumes at that iteration;
the rest of that epoch then sees the epoch's batches from the start, so it is close to, not equal to, an
uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["EpochSeed", "ResumeFromCheckpoint", "ValidationState", "epoch_seed", "training_state"]

_MAX_SEED = 2**32


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of 1-based ``epoch`` of a run seeded with ``seed``: distinct per epoch and per seed, in ``[0, 2**32)``."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % _MAX_SEED


class EpochSeed:
    """Reseed every random source of training at the start of each epoch (ignite handler).

    At ``Events.EPOCH_STARTED`` (before the epoch's data iterator is created) it calls MONAI's
    ``set_determinism(seed=epoch_seed(seed, epoch))`` (torch, numpy, python ``random``) and MONAI's ``set_rnd`` on
    ``data`` (the random states of its transforms, as MONAI's DataLoader does once at construction). Worker
    processes get their seeds from the torch RNG at iterator creation, so they follow too.

    Args:
        seed: base seed of the run.
        data: the training dataset (or anything holding its random transforms); default: the engine's
            ``data_loader.dataset`` when it has one.
    """

    def __init__(self, seed: int = 0, data: Any = None) -> None:
        self.seed = int(seed)
        self.data = data

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Any) -> None:
        from monai.data.utils import set_rnd
        from monai.utils import set_determinism

        seed = epoch_seed(self.seed, engine.state.epoch)
        set_determinism(seed=seed)
        data = self.data if self.data is not None else getattr(getattr(engine, "data_loader", None), "dataset", None)
        if data is not None:
            set_rnd(data, seed)


class ValidationState:
    """What validation remembers across epochs, as ``state_dict``/``load_state_dict`` for a training checkpoint.

    The evaluator's best key metric and its epoch, and the list of files each key-metric ``CheckpointSaver`` among
    ``handlers`` has kept (with their scores): without it a resumed run would overwrite ``model.pt`` at its first
    validation even when that model is worse than the best one before the interruption. A record whose file is
    not in the saver's folder (resumed into another ``ckpt_dir``) is dropped.

    Args:
        evaluator: the validation engine (a MONAI ``Workflow``: ``state.best_metric``, ``state.best_metric_epoch``).
        handlers: the evaluator's handlers; the ``CheckpointSaver`` instances with ``save_key_metric`` are tracked,
            in order (default: none).
    """

    def __init__(self, evaluator: Any, handlers: Iterable[Any] | None = None) -> None:
        from monai.handlers import CheckpointSaver

        self.evaluator = evaluator
        # MONAI keeps the key-metric tracker in `_key_metric_checkpoint` (an ignite Checkpoint); CheckpointSaver
        # has the public load_state_dict for it but no state_dict, so the saving side reads the tracker directly.
        self.savers = [h for h in (handlers or []) if isinstance(h, CheckpointSaver)
                       and getattr(h, "_key_metric_checkpoint", None) is not None]

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "savers": [{"saved": [[float(p), str(f)] for p, f in s._key_metric_checkpoint.state_dict()["_saved"]]}
                       for s in self.savers],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        savers = list(state_dict.get("savers", []))
        if len(savers) != len(self.savers):
            raise ValueError(f"the checkpoint tracks {len(savers)} key-metric CheckpointSaver(s) of validation, this "
                             f"configuration has {len(self.savers)}")
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        for saver, saved in zip(self.savers, savers):
            disk = saver._key_metric_checkpoint.save_handler
            # only records of files that exist in this run's checkpoint folder: resuming into another folder (or
            # after deleting model.pt) starts a new best-model record there, instead of failing to remove a file
            kept = [(float(p), str(f)) for p, f in saved["saved"]
                    if (Path(disk.dirname) / (getattr(disk, "filename", None) or f)).is_file()]
            saver.load_state_dict({"_saved": kept})


def training_state(trainer: Any, lr_scheduler: Any = None, validation: Any = None,
                   validation_handlers: Iterable[Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The objects of a resumable training checkpoint, for ``CheckpointSaver(save_dict=...)`` and
    :class:`ResumeFromCheckpoint` (``load_dict``).

    Args:
        trainer: the training engine. A trainer with ``checkpoint_dict()`` (e.g. ``AdaCSTrainer``: two networks,
            two optimisers, its momentum state) gives its own objects; any other MONAI trainer gives ``network``,
            ``optimizer`` (and its AMP ``scaler`` when amp is on). The engine itself (``trainer``: epoch,
            iteration) is always included.
        lr_scheduler: the scheduler stepped by an ``LrScheduleHandler`` (saved as ``lr_scheduler``).
        validation: the validation evaluator, saved as ``validation`` (:class:`ValidationState`).
        validation_handlers: the evaluator's handlers, i.e. the config's ``@validate#handlers`` (MONAI engines do
            not keep the list); its key-metric ``CheckpointSaver`` is tracked.
        extra: more objects with ``state_dict``/``load_state_dict``.
    """
    if hasattr(trainer, "checkpoint_dict"):
        state = dict(trainer.checkpoint_dict())
    else:
        state = {"network": trainer.network, "optimizer": trainer.optimizer}
        if getattr(trainer, "amp", False) and getattr(trainer, "scaler", None) is not None:
            state["scaler"] = trainer.scaler
    state["trainer"] = trainer
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler
    if validation is not None:
        state["validation"] = ValidationState(validation, validation_handlers)
    state.update(extra)
    return state


class ResumeFromCheckpoint:
    """Resume training from a checkpoint of :func:`training_state` objects (no-op for an empty path).

    Delegates to MONAI's ``CheckpointLoader`` (weights-only loading; the engine's epoch and iteration are restored,
    its configured ``max_epochs`` kept) at ``Events.STARTED``. A path that is given but missing raises
    ``FileNotFoundError`` naming it when attached, before any training; so does (``ValueError``) a checkpoint with
    an LR scheduler from a run with another number of epochs (the schedule's length is part of its state).

    Args:
        load_path: the checkpoint (``--resume_from``); ``""``/None: start fresh.
        load_dict: the objects to restore (``training_state(...)`` of the same configuration).
        map_location: ``torch.load`` map location (the training device).
    """

    def __init__(self, load_path: str | None, load_dict: dict, map_location: Any = None) -> None:
        self.load_path = str(load_path) if load_path else ""
        self.load_dict = load_dict
        self.map_location = map_location

    def attach(self, engine: Any) -> None:
        if not self.load_path:
            return
        if not Path(self.load_path).is_file():
            raise FileNotFoundError(f"resume checkpoint {self.load_path} not found (--resume_from)")
        import torch
        from monai.handlers import CheckpointLoader

        if "lr_scheduler" in self.load_dict:
            # the schedule was built for the epochs of the first run (PolynomialLR's total_iters, OneCycleLR's
            # total_steps) and its state carries them: another --epochs would silently keep the old schedule
            # (or fail when stepping past its end), so say so before training
            saved = torch.load(self.load_path, map_location="cpu", weights_only=True).get("trainer", {})
            want = getattr(getattr(engine, "state", None), "max_epochs", None)
            if saved.get("max_epochs") is not None and want is not None and int(saved["max_epochs"]) != int(want):
                raise ValueError(f"resume checkpoint {self.load_path} comes from a run with epochs="
                                 f"{saved['max_epochs']}; its learning-rate schedule spans those epochs, so resume "
                                 f"with --epochs {saved['max_epochs']} (got {want})")

        CheckpointLoader(self.load_path, self.load_dict, map_location=self.map_location).attach(engine)
