"""Evaluation of point trackers (SpeckNet, the NCC baseline) on tracking data: the evaluator, the metric, the report.

Split out of :mod:`common.engines.tracking` (which re-exports every public name here, so bundle configs keep naming
``common.engines.tracking.TrackingEvaluator`` etc.); this module holds what scores a tracker, that one what feeds
and trains it.

:class:`TrackingEvaluator` computes the features of a video once and tracks from the validation query frame (timed:
AIT; peak memory: PGM), from query frames at phases ``0 .. 100 %`` of the video for the temporal-invariance curve,
and, for a SpeckNet, with the soft-argmax radius read both ways (:data:`RADIUS_VARIANTS`: 5 finest-grid cells and 5
input pixels). :class:`TrackingMetrics` scores it per video: TAP-Vid ``delta_x`` for ``x in (1, 2, 4, 8, 16)`` at
256 x 256, ``delta_avg`` and MTE (query frame excluded) in the original video's pixel grid, the zero-motion baseline
(tracks = query points), GLS against the reference GLS stored with each video (MAD) for the videos whose files
declare ordered centre-line points (attribute ``centreline_ordered``; otherwise GLS is reported as not applicable,
:data:`GLS_NOT_APPLICABLE`), per dataset and overall. :class:`TrackingReport` writes the per-video CSV, the
temporal-invariance CSV + PNG, the GLS scatter and track overlays, and the extra entries of ``metrics.json``.

Choices the paper does not state are listed in :mod:`common.engines.tracking` (5, 6, 9 concern this module).
"""

from __future__ import annotations

import csv
import math
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import Tensor, nn

from common.data.tracking import CENTRELINE_ATTR
from common.engines.tracking import plot_tracks_on_frame, scale_points
from common.metrics.tracking import (
    DELTA_THRESHOLDS,
    TAPVID_SIZE,
    global_longitudinal_strain,
    gls_mad,
    tracking_metrics,
)
from common.transforms.video import diastasis_frame

__all__ = [
    "DEFAULT_PHASES",
    "RADIUS_VARIANTS",
    "RADIUS_UNITS",
    "GLS_NOT_APPLICABLE",
    "radius_label",
    "TrackingEvaluator",
    "TrackingMetrics",
    "TrackingReport",
    "summarise_rows",
    "plot_temporal_invariance",
]

DEFAULT_PHASES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
# the paper's "five-pixel radius" read both ways: 5 finest-grid cells (TAP-Net convention, 40 px at 512) and 5 px
RADIUS_VARIANTS: tuple[tuple[float, str], ...] = ((5.0, "cells"), (5.0, "pixels"))
GLS_NOT_APPLICABLE = (f"not applicable: no evaluated video declares its tracks ordered myocardial centre-line points "
                      f"(HDF5 attribute {CENTRELINE_ATTR!r}); GLS of arbitrary points is meaningless")


# ----------------------------------------------------------------------------------------------------------------
# evaluation / inference engine


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if hasattr(network, "module") and not hasattr(network, "encode") else network


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class TrackingEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` for point tracking: one encoder pass per video, tracking from the sample's query
    points (timed) and, with ``phases``, from the reference tracks at query frames ``int(p T)``.

    Takes the same arguments as ``SupervisedEvaluator`` plus ``phases`` (fractions of the video, e.g.
    :data:`DEFAULT_PHASES`; empty: no temporal-invariance sweep) and ``radius_variants`` (``(radius, unit)`` pairs,
    unit ``"cells"`` or ``"pixels"``, default :data:`RADIUS_VARIANTS`): for a network whose ``track`` takes
    per-call ``radius``/``radius_unit`` overrides (SpeckNet), the sample's query points are also tracked with each
    of them from the same features (not timed); other trackers (NCC) skip this. ``decollate`` defaults to False
    (outputs are whole videos). The network must expose ``encode``/``track`` (SpeckNet or the NCC tracker),
    possibly wrapped in DDP.

    ``engine.state.output`` holds ``pred`` (B, T, N, 3) in network pixels (on CPU), ``time_s`` (seconds of the
    timed forward), ``peak_memory_bytes``, with ``phases`` ``phase_preds`` = ``{p: (pred (B, T, N, 3), q)}`` and
    ``radius_preds`` = ``{label: pred (B, T, N, 3)}`` (labels as :func:`radius_label`; empty when skipped) with
    ``radius_configured``, the label of the network's own setting (its readout is ``pred`` itself).
    """

    def __init__(self, *args: Any, phases: Sequence[float] = (),
                 radius_variants: Sequence[Sequence[Any]] | None = RADIUS_VARIANTS, decollate: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, decollate=decollate, **kwargs)
        self.phases = tuple(float(p) for p in phases)
        for p in self.phases:
            diastasis_frame(1, p)
        variants = []
        for v in radius_variants or ():
            if len(v) != 2 or str(v[1]) not in RADIUS_UNITS or not float(v[0]) > 0:
                raise ValueError(f"TrackingEvaluator: radius_variants entries must be (radius > 0, unit in "
                                 f"{RADIUS_UNITS}), got {v!r}")
            variants.append((float(v[0]), str(v[1])))
        self.radius_variants = tuple(variants)

    def _iteration(self, engine: Any, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = torch.device(engine.state.device)
        image = batchdata["image"].to(device=device, dtype=torch.float32)
        qp = batchdata["query_points"].to(device=device, dtype=torch.float32)
        qf = batchdata["query_frames"].to(device=device, dtype=torch.long)
        net = _unwrap(engine.network)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        video = image.transpose(1, 2)  # (B, C, T, H, W) -> (B, T, C, H, W)
        with engine.mode(engine.network), torch.no_grad():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            feats = net.encode(video)
            out = net.track(feats, qp, qf, size)
            _sync(device)
            elapsed = time.perf_counter() - t0
            peak = _peak_memory_bytes(device)
            pred = torch.cat([out["tracks"], out["confidence"][..., None]], -1).cpu()
            radius_preds: dict[str, Tensor] = {}
            configured = None
            if self.radius_variants and _takes_radius(net):
                configured = radius_label(float(net.radius), str(getattr(net, "radius_unit", "cells")))
                for r, unit in self.radius_variants:
                    label = radius_label(r, unit)
                    if label == configured:
                        radius_preds[label] = pred
                        continue
                    o = net.track(feats, qp, qf, size, radius=r, radius_unit=unit)
                    radius_preds[label] = torch.cat([o["tracks"], o["confidence"][..., None]], -1).cpu()
            phase_preds = {}
            if self.phases and "label" in batchdata:
                label = batchdata["label"].to(device=device, dtype=torch.float32)
                t = label.shape[1]
                for p in self.phases:
                    q = diastasis_frame(t, p)
                    o = net.track(feats, label[:, q, :, :2], q, size)
                    phase_preds[p] = (torch.cat([o["tracks"], o["confidence"][..., None]], -1).cpu(), q)
        engine.state.output = {Keys.PRED: pred, "time_s": elapsed, "peak_memory_bytes": peak,
                               "phase_preds": phase_preds, "radius_preds": radius_preds,
                               "radius_configured": configured}
        if "label" in batchdata:
            engine.state.output[Keys.LABEL] = batchdata["label"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


RADIUS_UNITS = ("cells", "pixels")


def radius_label(radius: float, unit: str) -> str:
    """Human label of a soft-argmax radius setting: ``"5 cells"`` (finest feature-grid cells) or ``"5 px"``."""
    if unit not in RADIUS_UNITS:
        raise ValueError(f"radius unit must be one of {RADIUS_UNITS}, got {unit!r}")
    return f"{float(radius):g} {'px' if unit == 'pixels' else 'cells'}"


def _radius_slug(label: str) -> str:
    """Key fragment of a radius label for flat metric names and CSV columns: ``"5 px"`` -> ``"5px"``."""
    return label.replace(" ", "")


def _takes_radius(net: nn.Module) -> bool:
    """Whether ``net.track`` accepts per-call ``radius``/``radius_unit`` overrides (SpeckNet, not the NCC tracker)."""
    import inspect

    try:
        params = inspect.signature(net.track).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "radius" in params and "radius_unit" in params and hasattr(net, "radius")


def _gather_rows(rows: list[dict]) -> list[dict]:
    """Concatenate per-rank row lists in rank order (the order MetricsSaver uses for file names), once per video."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    # an evenly divisible DistributedSampler repeats videos to fill the last rank: count each video once
    seen: set[str] = set()
    out = []
    for r in (r for part in parts for r in part):
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def _to_orig(pred_xy: Tensor, size_net: tuple[int, int], orig_size: Sequence[int]) -> np.ndarray:
    return scale_points(pred_xy.double().numpy(), size_net, orig_size)


def _metric_pair(pred: np.ndarray, ref: np.ndarray, vis: np.ndarray, q: int, size: Sequence[int],
                 thresholds: Sequence[float]) -> dict:
    """tracking_metrics with trajectories invisible on the query frame excluded (their query is not tissue)."""
    vis = vis & vis[q][None, :]
    if not vis.any():
        return {}
    return tracking_metrics(pred, ref, vis, q, tuple(int(s) for s in size), thresholds=thresholds)


class TrackingMetrics(Metric):
    """Ignite metric over a :class:`TrackingEvaluator` epoch: TAP-Vid metrics, zero-motion baseline, AIT, PGM,
    GLS MAD, the temporal-invariance curve and per-dataset tables.

    ``compute()`` returns a dict of scalars that ignite flattens into ``engine.state.metrics``: ``delta_1`` ..
    ``delta_16``, ``delta_avg``, ``mte``, ``zero_motion_delta_avg``, ``zero_motion_mte``, ``ait_s``, ``pgm_gb``,
    ``n_videos``, with ``compute_gls`` ``gls_mad`` (None when no video declares ordered centre-line points, see
    below), and for each radius variant of the evaluator ``radius_<label>_delta_avg`` / ``radius_<label>_mte``
    (label without spaces, e.g. ``radius_5px_delta_avg``). Register it under the name ``delta_avg`` to use
    ``delta_avg`` as key metric. On completion it also sets ``engine.state.metric_details`` (per-video columns, for
    MONAI's ``MetricsSaver``) and ``engine.state.tracking_report`` (per-video rows, per-dataset table,
    temporal-invariance curve, ``radius_variants`` = ``{"5 cells": {"delta_avg", "mte", "configured"}, ...}``, and
    ``gls_note``). In distributed evaluation the rows of all ranks are gathered (rank order).

    GLS is the length change of the polyline through the points, meaningful only for ordered centre-line points:
    it is computed for the videos whose sample has ``centreline_ordered`` true (:class:`LoadTrackingVideod` reads
    the file attribute); the others get no ``gls`` value. Without any such video, ``gls_mad`` is None and the
    ``gls_note`` says why (:data:`GLS_NOT_APPLICABLE`).

    Args:
        thresholds: ``delta_x`` thresholds (256-scale pixels).
        compute_gls: compute GLS of the predicted tracks where the data declare ordered centre-line points.
    """

    def __init__(self, thresholds: Sequence[float] = DELTA_THRESHOLDS, compute_gls: bool = True) -> None:
        self.thresholds = tuple(thresholds)
        self.compute_gls = bool(compute_gls)
        self._rows: list[dict] = []
        self._all_rows: list[dict] = []
        self._radius_labels: dict[str, str] = {}  # slug -> label, in the evaluator's order
        self._radius_configured: str | None = None
        super().__init__(output_transform=lambda out: out, device="cpu", metrics_result_mode="flatten")

    def reset(self) -> None:
        self._rows = []
        self._radius_labels = {}
        self._radius_configured = None

    def iteration_completed(self, engine: Any) -> None:
        # the rows need the batch (reference tracks, sizes, ids) as well as the output, so read the engine directly
        self.update(engine)

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        self.publish(engine)

    # -- per iteration
    def update(self, engine: Any) -> None:
        out, batch = engine.state.output, engine.state.batch
        pred_all = out[Keys.PRED]
        size_net = (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
        for b in range(pred_all.shape[0]):
            n = int(batch["n_points"][b]) if "n_points" in batch else pred_all.shape[2]
            orig = [int(v) for v in batch["orig_size"][b]]
            ref = batch["tracks"][b, :, :n].double().numpy()
            vis = batch["visible"][b, :, :n].numpy().astype(bool)
            q = int(batch["query_frames"][b, 0])
            pred = _to_orig(pred_all[b, :, :n, :2], size_net, orig)
            row: dict[str, Any] = {"id": batch["id"][b], "dataset": batch["dataset"][b], "n_frames": int(ref.shape[0]),
                                   "n_points": n, "query_frame": q, "time_s": float(out["time_s"]) / pred_all.shape[0],
                                   "peak_memory_bytes": int(out["peak_memory_bytes"])}
            m = _metric_pair(pred, ref, vis, q, orig, self.thresholds)
            row.update({k: float(v) for k, v in m.items()})
            zero = np.broadcast_to(ref[q], ref.shape)
            mz = _metric_pair(zero, ref, vis, q, orig, self.thresholds)
            if mz:
                row["zero_motion_delta_avg"], row["zero_motion_mte"] = float(mz["delta_avg"]), float(mz["mte"])
            row["mean_confidence"] = float(pred_all[b, :, :n, 2].mean())
            ordered = "centreline_ordered" in batch and bool(batch["centreline_ordered"][b])
            if self.compute_gls and n >= 2 and ordered:
                ed, es = int(batch["ed"][b]), int(batch["es"][b])
                spacing = [float(s) for s in batch["spacing"][b]]
                try:
                    res = global_longitudinal_strain(pred, ed_frame=ed, es_frame=es, spacing=spacing)
                    row["gls"] = res.gls
                except ValueError:
                    row["gls"] = float("nan")
                row["gls_reference"] = float(batch["gls_reference"][b])
            for label, rp in (out.get("radius_preds") or {}).items():
                slug = _radius_slug(label)
                self._radius_labels[slug] = label
                mr = _metric_pair(_to_orig(rp[b, :, :n, :2], size_net, orig), ref, vis, q, orig, self.thresholds)
                if mr:
                    row[f"radius_{slug}_delta_avg"] = float(mr["delta_avg"])
                    row[f"radius_{slug}_mte"] = float(mr["mte"])
            if out.get("radius_configured"):
                self._radius_configured = str(out["radius_configured"])
            for p, (pp, qp) in out.get("phase_preds", {}).items():
                mp = _metric_pair(_to_orig(pp[b, :, :n, :2], size_net, orig), ref, vis, qp, orig, self.thresholds)
                if mp:
                    row[f"phase_{p:.2f}_delta_avg"] = float(mp["delta_avg"])
                    row[f"phase_{p:.2f}_mte"] = float(mp["mte"])
            self._rows.append(row)

    # -- per epoch
    def compute(self) -> dict:
        """Epoch scalars over the gathered per-video rows (see the class docstring)."""
        rows = _gather_rows(self._rows)
        self._all_rows = rows
        if not rows:
            raise RuntimeError("TrackingMetrics: no video was evaluated (empty evaluation set?)")
        out: dict[str, float | None] = {}
        keys = [f"delta_{t:g}" for t in self.thresholds] + ["delta_avg", "mte", "zero_motion_delta_avg",
                                                            "zero_motion_mte"]
        for k in keys:
            vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
            if vals:
                out[k] = float(np.mean(vals))
        out["ait_s"] = float(np.mean([r["time_s"] for r in rows]))
        out["pgm_gb"] = float(max(r["peak_memory_bytes"] for r in rows) / 1e9)
        out["n_videos"] = float(len(rows))
        if self.compute_gls:
            pairs = [(r["gls"], r["gls_reference"]) for r in rows
                     if "gls" in r and math.isfinite(r["gls"]) and math.isfinite(r.get("gls_reference", float("nan")))]
            # None (not NaN): "not applicable" must read as such in metrics.json, not as a failed computation
            out["gls_mad"] = gls_mad([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        for slug in self._radius_labels:
            for k in ("delta_avg", "mte"):
                vals = [r[f"radius_{slug}_{k}"] for r in rows if math.isfinite(r.get(f"radius_{slug}_{k}", math.nan))]
                if vals:
                    out[f"radius_{slug}_{k}"] = float(np.mean(vals))
        return out

    def publish(self, engine: Any) -> None:
        rows = self._all_rows
        details = {}
        # no GLS column when no video has one (GLS not applicable), rather than a column of NaN
        for k in ("delta_avg", "mte") + (("gls",) if any("gls" in r for r in rows) else ()):
            details[k] = torch.tensor([[r.get(k, float("nan"))] for r in rows], dtype=torch.float64)
        if not hasattr(engine.state, "metric_details") or engine.state.metric_details is None:
            engine.state.metric_details = {}
        engine.state.metric_details.update(details)
        report = summarise_rows(rows)
        report["radius_variants"] = {
            label: {"delta_avg": _mean([r.get(f"radius_{slug}_delta_avg", math.nan) for r in rows]),
                    "mte": _mean([r.get(f"radius_{slug}_mte", math.nan) for r in rows]),
                    "configured": label == self._radius_configured}
            for slug, label in self._radius_labels.items()}
        engine.state.tracking_report = report


def _mean(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _gls_note(rows: list[dict]) -> str:
    """Why GLS (MAD) covers the videos it covers: all of them, some (the others' files do not declare ordered
    centre-line points), or none (:data:`GLS_NOT_APPLICABLE`)."""
    with_gls = sum("gls" in r for r in rows)
    if with_gls == 0:
        return GLS_NOT_APPLICABLE
    note = (f"GLS of the tracked points of the {with_gls} of {len(rows)} video(s) whose files declare ordered "
            f"centre-line points ({CENTRELINE_ATTR})")
    return note + ("" if with_gls == len(rows) else "; not applicable to the others")


def summarise_rows(rows: list[dict]) -> dict:
    """Per-dataset means (GLS MAD None with a ``gls_note`` where not applicable), the temporal-invariance curve
    (overall and per dataset), the overall ``gls_note`` and the per-video rows."""
    datasets = sorted({r["dataset"] for r in rows})
    radius_keys = sorted({k for r in rows for k in r if k.startswith("radius_")})
    metric_keys = ["delta_1", "delta_2", "delta_4", "delta_8", "delta_16", "delta_avg", "mte", "zero_motion_delta_avg",
                   "zero_motion_mte", "time_s", "gls"] + radius_keys
    per_dataset = {}
    for ds in datasets:
        sub = [r for r in rows if r["dataset"] == ds]
        entry = {k: _mean([r.get(k, float("nan")) for r in sub]) for k in metric_keys}
        entry["n_videos"] = len(sub)
        entry["peak_memory_gb"] = max(r["peak_memory_bytes"] for r in sub) / 1e9
        pairs = [(r["gls"], r["gls_reference"]) for r in sub
                 if math.isfinite(r.get("gls", float("nan"))) and math.isfinite(r.get("gls_reference", float("nan")))]
        entry["gls_mad"] = gls_mad([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        entry["gls_note"] = _gls_note(sub)
        per_dataset[ds] = entry
    phases = sorted({float(k.split("_")[1]) for r in rows for k in r if k.startswith("phase_") and
                     k.endswith("_delta_avg")})
    curve = []
    for p in phases:
        row = {"phase": p, "delta_avg": _mean([r.get(f"phase_{p:.2f}_delta_avg", float("nan")) for r in rows]),
               "mte": _mean([r.get(f"phase_{p:.2f}_mte", float("nan")) for r in rows])}
        for ds in datasets:
            sub = [r for r in rows if r["dataset"] == ds]
            row[f"{ds}/delta_avg"] = _mean([r.get(f"phase_{p:.2f}_delta_avg", float("nan")) for r in sub])
            row[f"{ds}/mte"] = _mean([r.get(f"phase_{p:.2f}_mte", float("nan")) for r in sub])
        curve.append(row)
    return {"per_dataset": per_dataset, "temporal_invariance": curve, "per_video": rows, "gls_note": _gls_note(rows)}

# ----------------------------------------------------------------------------------------------------------------
# report


def plot_temporal_invariance(curve: Sequence[Mapping], out_png: str | Path, title: str = "") -> Path:
    """PNG of delta_avg (top) and MTE (bottom) against the query-frame phase (paper Fig. 2/8), per dataset."""
    from common.plotting import save_figure, subplots
    fig, (a1, a2) = subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
    phases = [100.0 * r["phase"] for r in curve]
    series = sorted({k.split("/")[0] for r in curve for k in r if "/" in k})
    series = series if len(series) > 1 else []  # one dataset: its curve is the overall one
    for name, style in [("all videos", "-o")] + [(s, "--.") for s in series]:
        key = "" if name == "all videos" else f"{name}/"
        d = [r.get(f"{key}delta_avg") for r in curve]
        m = [r.get(f"{key}mte") for r in curve]
        a1.plot(phases, [np.nan if v is None else v for v in d], style, label=name)
        a2.plot(phases, [np.nan if v is None else v for v in m], style, label=name)
    a1.set_ylabel("delta_avg (%)")
    a2.set_ylabel("MTE (px @ 256)")
    a2.set_xlabel("query frame phase (% of the video)")
    a1.axvline(72, color="gray", lw=0.6, ls=":")
    a2.axvline(72, color="gray", lw=0.6, ls=":")
    a1.legend(fontsize=7)
    a1.set_title(title or "temporal invariance: accuracy vs query-frame phase", fontsize=9)
    return save_figure(fig, out_png, dpi=120)


class TrackingReport:
    """Evaluation report: per-video CSV, temporal-invariance CSV + PNG, GLS scatter PNG and track overlays of the
    first ``n_png`` videos (prediction vs reference over frame 0). ``summary(engine)`` gives the dict for
    :class:`common.engines.handlers.MetricsJSONWriter` (``extra``).

    Args:
        output_dir: report folder.
        n_png: number of videos with an overlay PNG.
        save_rank: only this rank writes.
    """

    def __init__(self, output_dir: str, n_png: int = 2, save_rank: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.n_png = int(n_png)
        self.save_rank = save_rank
        self._overlays: list[dict] = []
        self.paths: dict[str, str] = {}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._overlays.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._grab)
        engine.add_event_handler(Events.COMPLETED, self)

    def _grab(self, engine: Any) -> None:
        if len(self._overlays) >= self.n_png:
            return
        batch, out = engine.state.batch, engine.state.output
        size_net = (int(batch["image"].shape[-2]), int(batch["image"].shape[-1]))
        n = int(batch["n_points"][0]) if "n_points" in batch else out[Keys.PRED].shape[2]
        orig = [int(v) for v in batch["orig_size"][0]]
        frame = batch["image"][0, 0, 0].numpy() * 0.5 + 0.5
        # the overlay is drawn on the network-size frame, so the tracks are shown in network pixels
        self._overlays.append({"id": batch["id"][0], "frame": frame, "orig": orig,
                               "pred": out[Keys.PRED][0, :, :n, :2].numpy(),
                               "ref": batch["label"][0, :, :n, :2].numpy() if "label" in batch else None,
                               "q": int(batch["query_frames"][0, 0]), "size": size_net})

    def __call__(self, engine: Any) -> None:
        from monai.utils import min_version, optional_import

        idist, _ = optional_import("ignite", "0.4.10", min_version, "distributed")
        if idist.get_rank() != self.save_rank:
            return
        report = getattr(engine.state, "tracking_report", None)
        if report is None:
            raise RuntimeError("TrackingReport: no tracking_report on the engine state; attach TrackingMetrics")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = report["per_video"]
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("id", "dataset"), k))
        per_video = self.output_dir / "per_video.csv"
        with open(per_video, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols)
            wr.writeheader()
            wr.writerows(rows)
        self.paths["per_video_csv"] = str(per_video)
        curve = report["temporal_invariance"]
        if curve:
            ti = self.output_dir / "temporal_invariance.csv"
            with open(ti, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=list(curve[0].keys()))
                wr.writeheader()
                wr.writerows(curve)
            self.paths["temporal_invariance_csv"] = str(ti)
            self.paths["temporal_invariance_png"] = str(
                plot_temporal_invariance(curve, self.output_dir / "temporal_invariance.png"))
        pairs = [(r["gls_reference"], r["gls"]) for r in rows if math.isfinite(r.get("gls", float("nan")))
                 and math.isfinite(r.get("gls_reference", float("nan")))]
        if pairs:
            self.paths["gls_png"] = str(self._plot_gls(pairs))
        for ov in self._overlays:
            png = self.output_dir / f"tracks_{Path(ov['id']).name}.png"
            plot_tracks_on_frame(ov["frame"], ov["pred"], png, ov["q"], ov["ref"],
                                 title=f"{ov['id']}: prediction (colour) vs reference (green)")
            self.paths.setdefault("track_pngs", []).append(str(png))  # type: ignore[union-attr]
        engine.logger.info(f"tracking report written to {self.output_dir}")

    def _plot_gls(self, pairs: list[tuple[float, float]]) -> Path:
        from common.plotting import save_figure, subplots
        ref, est = np.array(pairs).T
        fig, ax = subplots(figsize=(4.2, 4.0))
        lo, hi = float(min(ref.min(), est.min())) - 2, float(max(ref.max(), est.max())) + 2
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
        ax.scatter(ref, est, s=14)
        ax.set_xlabel("reference GLS (%)")
        ax.set_ylabel("tracked GLS (%)")
        ax.set_title(f"GLS: MAD {np.mean(np.abs(est - ref)):.2f} %", fontsize=9)
        return save_figure(fig, self.output_dir / "gls.png", dpi=120)

    def summary(self, engine: Any) -> dict:
        """Extra entries of ``metrics.json``: per-dataset table, temporal-invariance curve, ``gls_note``,
        ``radius_variants`` (δ_avg and MTE per soft-argmax radius reading), report files."""
        report = getattr(engine.state, "tracking_report", {}) or {}
        return {"per_dataset": report.get("per_dataset", {}), "temporal_invariance": report.get("temporal_invariance",
                                                                                                   []),
                "gls_note": report.get("gls_note"), "radius_variants": report.get("radius_variants", {}),
                "report_files": dict(self.paths), "tapvid_size": TAPVID_SIZE}
