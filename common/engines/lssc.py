"""LSSC workflow pieces: unpaired two-modality training on MONAI/ignite, variant builders, evaluation report.

Training (Yang et al., Sec. 3.4 and 4.2; ``METHODS.md`` §2): every iteration draws one batch of slice stacks of
each modality from its own shuffled loader (:class:`UnpairedLoader`; different patients, and the two batches may
differ in size), runs both through the network in one call (:class:`UnpairedForward`, so DistributedDataParallel
sees one forward per backward), and minimises Eq. 15 (:class:`common.losses.lssc.LSSCLoss`: both segmentation
losses, both auxiliary losses, ``L_mcr`` and ``L_icr``). :class:`UnpairedMultiModalTrainer` is a MONAI
``SupervisedTrainer`` with that iteration, so MONAI handlers (``StatsHandler``, ``CheckpointSaver``,
``ValidationHandler``, ``LrScheduleHandler``, TensorBoard) work unchanged. Optimiser and schedule come from the
bundle config: ``torch.optim.Adam(lr=1e-4, eps=1e-8, weight_decay=1e-4)`` and ``PolynomialLR(power=0.9)`` stepped
once per epoch, i.e. ``lr = 1e-4 (1 - epoch / max_epoch)^0.9`` as written in the paper.

Variants (Sec. 4.3) are one config switch, ``variant``: :func:`lssc_network` and :func:`lssc_loss` map it to the
network and loss switches of :mod:`common.networks.lssc` and :mod:`common.losses.lssc`. Backbone and Baseline are
single-modality models (one network per modality, as in the paper), so they need exactly one modality.

``models/model.pt`` holds the inference network only (:class:`InferenceWeights`: the EAMs, and class embeddings
only the EAMs use, are training-only), so it loads into ``lssc_network(..., for_inference=True)`` strictly. The
resumable training checkpoint (``models/checkpoint.pt``, :mod:`common.engines.checkpoint`) holds the whole training
network, the optimiser, the LR schedule and the engine state.

Evaluation: :class:`ModalityMetricsReport` scores every volume in its original geometry (Dice in %, ASD in mm, and
optionally the other metrics of :mod:`common.metrics.segmentation`), and writes the paper's Table 2 layout (per
modality and class mean ± std, modality means, overall mean) to JSON, Markdown and CSV, plus a PNG of overlays.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, Subset

from common.losses.lssc import LSSCLoss, lssc_loss_kwargs
from common.metrics.segmentation import finite_mean_std, segmentation_metrics
from common.networks.lssc import LSSCSwinUnet, lssc_variant_kwargs
from common.transforms.slices import slice_axis_index

__all__ = [
    "SINGLE_MODALITY_VARIANTS",
    "InferenceWeights",
    "ModalityMetricsReport",
    "UnpairedForward",
    "UnpairedLoader",
    "UnpairedMultiModalTrainer",
    "lssc_loss",
    "lssc_network",
    "table2_markdown",
    "table2_summary",
    "unwrap_network",
]

SINGLE_MODALITY_VARIANTS = ("backbone", "baseline")
"""Variants the paper trains on one modality at a time (Sec. 4.3, items 1-2)."""


def _variant_key(variant: str) -> str:
    key = variant.strip().lower().replace("-", "_").replace(" ", "")
    return key[:-3] + "+cr" if key.endswith("_cr") else key


def lssc_network(variant: str = "full", modalities: Sequence[str] = ("ct", "mr"), for_inference: bool = False,
                 spatial_dims: int = 2, **kwargs: Any) -> LSSCSwinUnet:
    """:class:`LSSCSwinUnet` (2D) or :class:`common.networks.lssc3d.LSSCnnFormer` (3D) of a paper variant.

    Args:
        variant: ``"backbone"``, ``"baseline"``, ``"joint_v1"``, ``"joint_v2"``, ``"joint_v3"``, each joint one with
            ``"+cr"``, or ``"full"`` (= ``"joint_v3+cr"``, the paper's method).
        modalities: modality names; Backbone and Baseline take exactly one.
        for_inference: build the network without the training-only parts (EAMs, and the class embeddings when
            only the EAMs use them): the architecture ``models/model.pt`` is saved for.
        spatial_dims: 2 (the paper's 2D configuration, Swin-Unet on slice stacks) or 3 (its 3D configuration,
            nnFormer-style on volume patches).
        kwargs: size arguments of the network (``img_size``, ``embed_dim``, ``num_heads``, ...).

    Raises:
        ValueError: unknown variant, a single-modality variant with several modalities, or ``spatial_dims`` not 2/3.
    """
    switches = lssc_variant_kwargs(variant)
    mods = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    if _variant_key(variant) in SINGLE_MODALITY_VARIANTS and len(mods) != 1:
        raise ValueError(
            f"variant {variant!r} trains one network per modality (paper Sec. 4.3); set modalities to one of "
            f"{[[m] for m in mods]}, got {list(mods)}"
        )
    clash = sorted(set(switches) & set(kwargs))
    if clash:
        raise ValueError(f"{clash} are set by the variant {variant!r}; choose another variant instead")
    if for_inference:
        switches["use_eam"] = False
        switches["use_correlations"] = False
    if spatial_dims == 3:
        from common.networks.lssc3d import LSSCnnFormer

        return LSSCnnFormer(modalities=mods, **kwargs, **switches)
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return LSSCSwinUnet(modalities=mods, **kwargs, **switches)


def lssc_loss(variant: str = "full", **kwargs: Any) -> LSSCLoss:
    """:class:`LSSCLoss` with the loss switches (aux, mcr, icr) of a paper variant; ``kwargs`` as ``LSSCLoss``
    (``alpha``, ``beta``, ``gamma``, ``tau``, ``include_background``, ``icr_pairing``, ``icr_reduction``,
    ``dice_reduction``). A switch given in ``kwargs`` wins over the variant's: the paper's Table 5 rows are
    ``joint_v3`` with ``--loss#use_mcr True`` (Joint V3 + L_mcr) and ``full`` with ``--loss#use_mcr False``
    (Joint V3 + L_icr, which needs the correlation path of the ``+cr`` networks)."""
    return LSSCLoss(**{**lssc_loss_kwargs(variant), **kwargs})


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel``/:class:`UnpairedForward` wrappers."""
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(network, UnpairedForward):
            network = network.network
        else:
            return network


class UnpairedForward(nn.Module):
    """Training forward of both modalities in one call: ``forward(images, modalities) -> [forward_train(x, m)]``.

    ``images`` is a sequence of ``(B_m, C, H, W)`` batches (sizes may differ), ``modalities`` the name of each.
    Wrapping this module (not the bare network) in DistributedDataParallel gives one DDP forward per backward.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Sequence[torch.Tensor], modalities: Sequence[str]) -> list[dict[str, Any]]:
        if len(images) != len(modalities):
            raise ValueError(f"{len(images)} image batches for {len(modalities)} modalities")
        return [self.network.forward_train(x, m) for x, m in zip(images, modalities)]


class InferenceWeights:
    """``state_dict``/``load_state_dict`` view of an :class:`LSSCSwinUnet` restricted to its inference weights.

    Give it to ``CheckpointSaver`` so ``model.pt`` holds exactly the state dict of
    ``lssc_network(..., for_inference=True)`` (no EAM parameters). Loading such a file into a training network
    leaves its training-only parts as they are and fails on any other missing or unexpected key.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def _net(self) -> LSSCSwinUnet:
        net = unwrap_network(self.network)
        if not hasattr(net, "export_state_dict"):
            raise TypeError(f"InferenceWeights needs an LSSCSwinUnet, got {type(net).__name__}")
        return net

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._net().export_state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        net = self._net()
        result = net.load_state_dict(dict(state_dict), strict=False)
        missing = [k for k in result.missing_keys if not net._training_only(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"checkpoint does not fit the network: missing {missing}, "
                               f"unexpected {list(result.unexpected_keys)}")


class UnpairedLoader:
    """One shuffled DataLoader per modality over a slice dataset; iterating yields ``{modality: batch}``.

    Args:
        dataset: a dataset with ``indices_by(key)`` (e.g. :class:`common.data.slices.VolumeSliceDataset`).
        batch_size: batch size of every modality (12 per modality in the paper).
        modalities: which groups to draw, in this order (the order of the loss's ``M1``, ``M2``); default: every
            group of the dataset, sorted.
        key: the item key holding the modality.
        shuffle: reshuffle every pass.
        num_workers: workers of each modality's DataLoader.
        drop_last: drop each pass's last incomplete batch.
        epoch_length: iterations per epoch: ``"max"`` (one pass over the modality with the most batches; the other
            modalities start new shuffled passes when exhausted), ``"min"``, or an int.
        distributed: use a ``DistributedSampler`` per modality (each rank sees its share; same epoch length on
            every rank).
        seed: seed of the distributed samplers' shuffling.
    """

    def __init__(self, dataset: Any, batch_size: int = 12, modalities: Sequence[str] | None = None,
                 key: str = "modality", shuffle: bool = True, num_workers: int = 0, drop_last: bool = False,
                 epoch_length: str | int = "max", distributed: bool = False, seed: int = 0) -> None:
        if not hasattr(dataset, "indices_by"):
            raise TypeError(f"UnpairedLoader needs a dataset with indices_by(key), got {type(dataset).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups = dataset.indices_by(key)
        mods = sorted(groups) if modalities is None else [str(m) for m in modalities]
        missing = [m for m in mods if not groups.get(m)]
        if missing:
            raise ValueError(f"no training slices of modality {missing} (dataset has {sorted(groups)})")
        if not mods:
            raise ValueError("UnpairedLoader needs at least one modality")
        self.modalities = mods
        self.distributed = distributed
        self.samplers: dict[str, Any] = {}
        self.loaders: dict[str, DataLoader] = {}
        for m in mods:
            subset = Subset(dataset, groups[m])
            if distributed:
                sampler = DistributedSampler(subset, shuffle=shuffle, seed=seed)
            else:
                sampler = RandomSampler(subset) if shuffle else SequentialSampler(subset)
            self.samplers[m] = sampler
            self.loaders[m] = DataLoader(subset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                         drop_last=drop_last)
            if len(self.loaders[m]) == 0:
                raise ValueError(f"modality {m!r} has {len(subset)} slices, fewer than one batch with drop_last")
        if isinstance(epoch_length, str):
            if epoch_length not in ("max", "min"):
                raise ValueError(f"epoch_length must be 'max', 'min' or a positive int, got {epoch_length!r}")
            sizes = [len(dl) for dl in self.loaders.values()]
            self.length = max(sizes) if epoch_length == "max" else min(sizes)
        else:
            if int(epoch_length) < 1:
                raise ValueError(f"epoch_length must be 'max', 'min' or a positive int, got {epoch_length!r}")
            self.length = int(epoch_length)
        self.epoch = 0
        self._passes = dict.fromkeys(mods, 0)
        self._iters: dict[str, Any] = {}

    def set_epoch(self, epoch: int) -> None:
        """Called at every epoch start (by :class:`UnpairedMultiModalTrainer`): reseeds distributed shuffling.

        The pass counters restart too, so an epoch's permutations depend on the epoch alone and a run resumed at
        that epoch shuffles exactly as an uninterrupted one.
        """
        self.epoch = int(epoch)
        self._passes = dict.fromkeys(self.modalities, 0)

    def _new_iter(self, m: str) -> Any:
        sampler = self.samplers[m]
        if isinstance(sampler, DistributedSampler):
            # every rank counts the same passes, so the ranks keep agreeing on the permutation
            sampler.set_epoch(self.epoch * 10_000 + self._passes[m])
        self._passes[m] += 1
        return iter(self.loaders[m])

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        # an epoch starts every modality afresh, so "max" is exactly one pass over the longest modality
        self._iters = {m: self._new_iter(m) for m in self.modalities}
        for _ in range(self.length):
            batch = {}
            for m in self.modalities:
                try:
                    batch[m] = next(self._iters[m])
                except StopIteration:
                    self._iters[m] = self._new_iter(m)
                    batch[m] = next(self._iters[m])
            yield batch


class UnpairedMultiModalTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` whose iteration trains on one unpaired batch per modality (LSSC, Eq. 15).

    ``train_data_loader`` yields ``{modality: batch}`` (:class:`UnpairedLoader`). Each iteration: prepare every
    modality's batch (``prepare_batch``), one call of ``train_module(images, modalities)`` (default
    :class:`UnpairedForward` around ``network``; DDP-wrap that module for distributed training), then
    ``loss_function(out_1, label_1[, out_2, label_2])`` (:class:`common.losses.lssc.LSSCLoss`), backward and
    optimiser step. ``engine.state.output`` holds ``"loss"`` and the loss components named per modality
    (``seg_ct``, ``aux_mr``, ``mcr``, ``icr``, ...). The iteration events (FORWARD/LOSS/BACKWARD/MODEL_COMPLETED)
    fire as in MONAI. ``inferer`` is not used by the iteration (the losses need ``forward_train``'s extra outputs);
    it is kept for the MONAI train-workflow properties.

    Extra args (the rest as ``SupervisedTrainer``):
        train_module: the module called for the training forward; default ``UnpairedForward(network)``.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Any, network: nn.Module,
                 optimizer: torch.optim.Optimizer, loss_function: Callable[..., Mapping[str, torch.Tensor]],
                 train_module: nn.Module | None = None, epoch_length: int | None = None, non_blocking: bool = False,
                 prepare_batch: Callable = default_prepare_batch, inferer: Any = None,
                 key_train_metric: dict | None = None, additional_metrics: dict | None = None,
                 train_handlers: Sequence | None = None, amp: bool = False, optim_set_to_none: bool = False,
                 to_kwargs: dict | None = None, amp_kwargs: dict | None = None) -> None:
        super().__init__(
            device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
            optimizer=optimizer, loss_function=loss_function, epoch_length=epoch_length, non_blocking=non_blocking,
            prepare_batch=prepare_batch, inferer=inferer, key_train_metric=key_train_metric,
            additional_metrics=additional_metrics, train_handlers=train_handlers, amp=amp,
            decollate=False,  # the output is a dict of scalars; nothing per sample to decollate
            optim_set_to_none=optim_set_to_none, to_kwargs=to_kwargs, amp_kwargs=amp_kwargs,
        )
        self.train_module = train_module if train_module is not None else UnpairedForward(network)
        if hasattr(train_data_loader, "set_epoch"):
            from ignite.engine import Events

            self.add_event_handler(Events.EPOCH_STARTED, lambda e: train_data_loader.set_epoch(e.state.epoch))

    def _iteration(self, engine: Any, batchdata: Mapping[str, Any]) -> dict:
        if not isinstance(batchdata, Mapping) or not batchdata:
            raise ValueError("UnpairedMultiModalTrainer expects {modality: batch} from its data loader "
                             f"(UnpairedLoader), got {type(batchdata).__name__}")
        modalities = list(batchdata)
        if len(modalities) > 2:
            raise ValueError(f"LSSC trains on one or two modalities per iteration, got {modalities}")
        images, labels = [], []
        for m in modalities:
            prepared = engine.prepare_batch(batchdata[m], engine.state.device, engine.non_blocking, **engine.to_kwargs)
            image, label = prepared[0], prepared[1]
            if label is None:
                raise ValueError(f"the {m} training batch has no label")
            images.append(image)
            labels.append(label)
        engine.state.output = {}
        engine.network.train()
        engine.train_module.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def forward_and_loss() -> dict[str, torch.Tensor]:
            outs = engine.train_module(images, modalities)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            args: list[Any] = []
            for o, y in zip(outs, labels):
                args += [o, y]
            parts = engine.loss_function(*args)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return parts

        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                parts = forward_and_loss()
            engine.scaler.scale(parts["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            parts = forward_and_loss()
            parts["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        output: dict[str, Any] = {"loss": parts["loss"].detach()}
        for i, m in enumerate(modalities):
            for part in ("seg", "aux"):
                output[f"{part}_{m}"] = float(parts[f"{part}_m{i + 1}"].detach())
        for part in ("mcr", "icr"):
            output[part] = float(parts[part].detach())
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


# ------------------------------------------------------------------------------------------------ evaluation
_PERCENT_METRICS = ("dice", "iou", "specificity", "mae")
_UNITS = {"dice": "%", "iou": "%", "specificity": "%", "mae": "%", "asd": "mm", "hd": "mm", "hd95": "mm"}


def _lookup(out: Mapping[Hashable, Any], batch: Mapping[Hashable, Any] | None, key: str) -> Any:
    if key in out:
        return out[key]
    if batch is not None and key in batch:
        return batch[key]
    raise KeyError(f"{key!r} is neither in the engine output nor in the batch (keys: {sorted(map(str, out))})")


def _spacing_of(x: Any) -> list[float] | None:
    affine = getattr(x, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.ndim == 3:
        a = a[0]
    return [float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0))]


def _label_map(x: Any, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what} must be a (1, X, Y, Z) label map, got shape {tuple(a.shape)}")
    return np.rint(a).astype(np.int64)


def table2_summary(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], modalities: Sequence[str],
                   metrics: Sequence[str] = ("dice", "asd")) -> dict[str, Any]:
    """The paper's Table 2 layout from per-case rows ``{"modality", metric: [per-class values]}``.

    Returns ``{metric: {modality: {class: {mean, std, n, n_nan, n_inf}, "mean": mean of the class means},
    "overall": mean of the modality means}}``. Non-finite values (absent structures, missed structures for
    distances) are left out of mean and std and counted (``n_nan``, ``n_inf``).
    """
    out: dict[str, Any] = {}
    for metric in metrics:
        per_mod: dict[str, Any] = {}
        for mod in modalities:
            vals = np.array([r[metric] for r in rows if r["modality"] == mod], dtype=np.float64)
            vals = vals.reshape(-1, len(class_names))
            classes = {c: finite_mean_std(vals[:, j]) for j, c in enumerate(class_names)}
            means = [v["mean"] for v in classes.values() if v["mean"] is not None]
            per_mod[mod] = {**classes, "mean": float(np.mean(means)) if means else None, "n_cases": int(len(vals))}
        mod_means = [per_mod[m]["mean"] for m in modalities if per_mod[m]["mean"] is not None]
        out[metric] = {**per_mod, "overall": float(np.mean(mod_means)) if mod_means else None}
    return out


def table2_markdown(summary: Mapping[str, Any], class_names: Sequence[str], modalities: Sequence[str],
                    method: str = "LSSC", labels: Mapping[str, str] | None = None) -> str:
    """Markdown table in the layout of the paper's Table 2 (one block per metric, ``mean±std`` per class)."""
    labels = {"ct": "CT", "mr": "MRI", **(labels or {})}
    head = ["Method"]
    for m in modalities:
        head += [f"{labels.get(m, m)} {c}" for c in class_names] + [f"{labels.get(m, m)} Mean"]
    head.append("Overall Mean")
    lines = []
    for metric, block in summary.items():
        unit = _UNITS.get(metric, "")
        lines += [f"**{metric.upper()} ({unit}, mean ± std over cases)**", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells = [method]
        for m in modalities:
            for c in class_names:
                s = block[m][c]
                if s["mean"] is None:
                    cell = "n/a"
                else:
                    cell = f"{s['mean']:.2f}±{s['std']:.2f}" if unit == "mm" else f"{s['mean']:.1f}±{s['std']:.1f}"
                if s["n_inf"]:
                    cell += f" ({s['n_inf']} missed)"
                cells.append(cell)
            mean = block[m]["mean"]
            cells.append("n/a" if mean is None else (f"{mean:.2f}" if unit == "mm" else f"{mean:.1f}"))
        overall = block["overall"]
        cells.append("n/a" if overall is None else (f"{overall:.2f}" if unit == "mm" else f"{overall:.1f}"))
        lines += ["| " + " | ".join(cells) + " |", ""]
    return "\n".join(lines)


class ModalityMetricsReport:
    """Per-volume metrics grouped by modality, in the paper's Table 2 layout; an ignite handler for evaluators.

    Every iteration scores each volume: ``pred_key`` (prediction in the original geometry, e.g. after ``Invertd``)
    against ``label_key`` (the reference label in the original geometry, remapped to class ids), with the voxel
    spacing of the label's affine. At epoch end it gathers all ranks' rows and writes, under ``output_dir``:
    ``per_case.csv``, ``table2.md``, ``overlays.png`` (image / reference / prediction of ``n_preview`` cases per
    modality, at the slice with the most reference foreground); it also fills ``engine.state.metrics``
    (``dice_<mod>``, ``asd_<mod>``, ``dice_overall``, ..., and per class ``dice_<mod>_<class>``) and
    ``engine.state.metric_details``; :meth:`payload` gives the JSON entries for ``MetricsJSONWriter(extra=...)``.

    Args:
        output_dir: folder of the files.
        class_names: foreground class names in class-id order (``1..Z-1``).
        modalities: modalities in table order.
        metrics: names of :data:`common.metrics.segmentation.SEGMENTATION_METRICS`; Dice-like ones are reported
            in %, distances in mm.
        pred_key, label_key: keys of the original-geometry prediction and reference.
        preview_keys: ``(image, label, pred)`` keys in the network's (preprocessed) geometry for the PNG; ``None``
            skips the PNG.
        slice_axis: slicing axis of the preview (the network's slicing axis).
        modality_key, name_key: batch keys of each case's modality and name.
        n_preview: cases per modality in the PNG.
        method: row name in the Markdown table (e.g. the variant).
        save_rank: only this rank writes files.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], modalities: Sequence[str] = ("ct", "mr"),
                 metrics: Sequence[str] = ("dice", "asd"), pred_key: str = "pred", label_key: str = "reference_eval",
                 preview_keys: Sequence[str] | None = ("image", "label", "network_pred"),
                 slice_axis: str | int = "coronal", modality_key: str = "modality", name_key: str = "patient",
                 n_preview: int = 2, method: str = "LSSC", save_rank: int = 0) -> None:
        from common.metrics.segmentation import SEGMENTATION_METRICS

        unknown = [m for m in metrics if m not in SEGMENTATION_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {sorted(SEGMENTATION_METRICS)}")
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.modalities = list(modalities)
        self.metrics = list(metrics)
        self.pred_key, self.label_key = pred_key, label_key
        self.preview_keys = None if preview_keys is None else list(preview_keys)
        self.slice_axis = slice_axis_index(slice_axis)
        self.modality_key, self.name_key = modality_key, name_key
        self.n_preview = n_preview
        self.method = method
        self.save_rank = save_rank
        self.rows: list[dict[str, Any]] = []
        self.previews: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.files: dict[str, str] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Any = None) -> None:
        self.rows, self.previews, self.summary, self.files = [], [], {}, {}

    def score_case(self, pred: Any, label: Any, modality: str, name: str) -> dict[str, Any]:
        """Metrics of one volume: ``{"case", "modality", metric: [per-class values]}`` (Dice-like in %)."""
        if modality not in self.modalities:
            raise ValueError(f"case {name}: modality {modality!r} is not one of {self.modalities}")
        p, y = _label_map(pred, f"{name} prediction"), _label_map(label, f"{name} reference label")
        if p.shape != y.shape:
            raise ValueError(f"case {name}: prediction {p.shape} and reference {y.shape} differ in size; the "
                             "prediction must be mapped back to the reference geometry (Invertd) first")
        values = segmentation_metrics(p, y, len(self.class_names) + 1, self.metrics, _spacing_of(label))
        row: dict[str, Any] = {"case": name, "modality": modality}
        for m, v in values.items():
            row[m] = [float(x) * (100.0 if m in _PERCENT_METRICS else 1.0) for x in v]
        return row

    def _collect(self, engine: Any) -> None:
        outputs = engine.state.output
        batches = engine.state.batch
        if isinstance(outputs, Mapping):
            raise ValueError("ModalityMetricsReport needs decollated outputs (decollate=True in the evaluator)")
        for i, out in enumerate(outputs):
            batch = batches[i] if isinstance(batches, list) else None
            modality = str(_lookup(out, batch, self.modality_key))
            name = str(_lookup(out, batch, self.name_key)) if self._has(out, batch, self.name_key) else \
                f"case{len(self.rows)}"
            row = self.score_case(_lookup(out, batch, self.pred_key), _lookup(out, batch, self.label_key),
                                  modality, name)
            self.rows.append(row)
            if self.preview_keys and sum(p["modality"] == modality for p in self.previews) < self.n_preview:
                self.previews.append(self._preview(out, batch, modality, name, row))

    @staticmethod
    def _has(out: Mapping, batch: Mapping | None, key: str) -> bool:
        return key in out or (batch is not None and key in batch)

    def _preview(self, out: Mapping, batch: Mapping | None, modality: str, name: str, row: Mapping) -> dict:
        image_key, label_key, pred_key = self.preview_keys
        image = _lookup(out, batch, image_key)
        img = (image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image))
        img = img[img.shape[0] // 2] if img.ndim == 4 else img  # the central slice of a stack, or the volume
        lab = _label_map(_lookup(out, batch, label_key), f"{name} preview label")
        pred = _label_map(_lookup(out, batch, pred_key), f"{name} preview prediction")
        axis = self.slice_axis
        counts = (lab > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        s = int(np.argmax(counts))
        take = lambda a: np.take(a, s, axis=axis)  # noqa: E731
        dice = row.get("dice")
        return {"modality": modality, "case": name, "slice": s, "image": take(img), "label": take(lab),
                "pred": take(pred), "dice": None if dice is None else float(np.nanmean(dice))}

    def _gather(self) -> list[dict[str, Any]]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.rows)
            return [r for p in parts for r in p]
        return list(self.rows)

    def _complete(self, engine: Any) -> None:
        rows = self._gather()
        self.summary = table2_summary(rows, self.class_names, self.modalities, self.metrics)
        details = {}
        for metric, block in self.summary.items():
            if block["overall"] is not None:
                engine.state.metrics[f"{metric}_overall"] = block["overall"]
            for mod in self.modalities:
                if block[mod]["mean"] is not None:
                    engine.state.metrics[f"{metric}_{mod}"] = block[mod]["mean"]
                for c in self.class_names:
                    if block[mod][c]["mean"] is not None:
                        engine.state.metrics[f"{metric}_{mod}_{c}"] = block[mod][c]["mean"]
            details[metric] = torch.tensor([r[metric] for r in rows], dtype=torch.float64).reshape(
                -1, len(self.class_names))
        engine.state.metric_details.update(details)
        self._all_rows = rows
        rank = engine.state.rank if hasattr(engine.state, "rank") else 0
        if rank != self.save_rank:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.output_dir / "per_case.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "modality"] + [f"{m}_{c}" for m in self.metrics for c in self.class_names])
            for r in rows:
                w.writerow([r["case"], r["modality"]] + [f"{v:.4f}" for m in self.metrics for v in r[m]])
        md_path = self.output_dir / "table2.md"
        md_path.write_text(table2_markdown(self.summary, self.class_names, self.modalities, self.method) + "\n")
        self.files = {"per_case_csv": str(csv_path), "table2_md": str(md_path)}
        if self.preview_keys and self.previews:
            self.files["overlays_png"] = str(self._plot(self.output_dir / "overlays.png"))
        engine.logger.info(f"LSSC report: {md_path}" + "".join(f"\n{k}: {v}" for k, v in self.files.items()))

    def payload(self, engine: Any = None) -> dict[str, Any]:
        """JSON entries for ``MetricsJSONWriter(extra=...)``: the Table 2 summary, units, per-case rows, files."""
        return {"table2": self.summary, "units": {m: _UNITS.get(m, "") for m in self.metrics},
                "per_case": getattr(self, "_all_rows", self.rows), "method": self.method,
                "class_names": self.class_names, "modalities": self.modalities, "files": self.files}

    def _plot(self, path: Path) -> Path:
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Rectangle

        from common.plotting import colormap, save_figure, subplots

        # the paper's Fig. 4 and 5 colours: LVM/liver yellow, LAC/R-kidney green, LVC/L-kidney blue, AA/spleen red
        named = {"LVM": "gold", "LAC": "limegreen", "LVC": "royalblue", "AA": "red", "liver": "gold",
                 "right_kidney": "limegreen", "left_kidney": "royalblue", "spleen": "red"}
        fallback = colormap("tab10")
        colours = [named.get(c, fallback(i)) for i, c in enumerate(self.class_names)]
        cmap = ListedColormap(colours)
        previews = sorted(self.previews, key=lambda p: (self.modalities.index(p["modality"]), p["case"]))
        fig, axes = subplots(len(previews), 3, figsize=(9, 3.1 * len(previews)), squeeze=False)
        for r, p in enumerate(previews):
            img = p["image"].T  # in-plane (a, b) shown with b upwards (superior for coronal/sagittal RAS slices)
            lo, hi = np.percentile(img, (1, 99))
            for c, (title, lab) in enumerate((("image", None), ("reference", p["label"]), ("prediction", p["pred"]))):
                ax = axes[r, c]
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
                if lab is not None:
                    lab_t = lab.T.astype(float)
                    ax.imshow(np.ma.masked_where(lab_t == 0, lab_t - 1), cmap=cmap, vmin=0,
                              vmax=len(self.class_names) - 1, alpha=0.5, origin="lower", interpolation="nearest")
                extra = f" (mean Dice {p['dice']:.1f}%)" if c == 2 and p["dice"] is not None else ""
                ax.set_title(f"{p['modality'].upper()} {p['case']} slice {p['slice']}: {title}{extra}", fontsize=7)
                ax.axis("off")
        handles = [Rectangle((0, 0), 1, 1, color=col) for col in colours]
        fig.legend(handles, self.class_names, loc="lower center", ncol=len(self.class_names), fontsize=8)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        return save_figure(fig, path, dpi=90, tight=False)
