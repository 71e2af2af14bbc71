"""Echocardiography segmentation evaluation as in the BOTM paper: per frame, per patient, ED/ES, video consistency.

Builds on :mod:`common.metrics.segmentation` (per-class Dice, IoU, specificity, HD, HD95, MAE on one label map) and
adds the tables of the BOTM paper (Sec. 3.1, Tables 1-4):

* :func:`frame_rows` -- one row per frame of a case (a CAMUS ED/ES pair or a TED sequence): every metric per class,
  plus its mean over the classes (``<metric>_mean``). Frames are scored at the resolution and spacing they are given
  in (the bundle scores at the original resolution, distances in mm).
* :func:`summarise_rows` -- per class and mean over classes of every metric over a set of rows, with counts of
  undefined (NaN: class absent from the reference) and infinite (class missing from the prediction: HD is
  infinite) values; the "mean" of a metric is the mean of its class means ("averaged across all regions and all
  frames", paper Tables 2-3).
* :func:`missed_counts` -- how many structures of the reference the prediction left empty ("missed"), per class.
  A mean HD that leaves them out flatters a model that fails more often, so every report puts this count next to
  mHD/HD95; ``missed_distance`` of :func:`frame_rows` chooses between leaving them out (default) and a penalty.
* :func:`patient_rows` -- the mean of every column over a patient's frames (all views), one row per patient.
* :func:`echo_summary` -- all frames, by phase (ED/ES, Tables 1 and 4), by view (2CH/4CH, Tables 1-2), per
  patient, and the temporal consistency of videos.
* :func:`temporal_consistency` -- for a sequence: Dice between consecutive predicted masks and between consecutive
  reference masks, per class, and their mean absolute difference (0 = the prediction changes from frame to frame
  exactly as much as the anatomy does).
* :class:`FrameDiceMetric` -- a MONAI cumulative metric (mean foreground Dice per case) used as the key metric of
  validation and evaluation, so MONAI's ``MetricsSaver`` writes a per-case CSV.

Label maps are ``(T, H, W)`` integer class ids with 0 the background; class names list the foreground classes
(CAMUS ``["LV", "Myo", "LA"]``, TED ``["LV", "Myo"]``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from common.metrics.segmentation import SEGMENTATION_METRICS, finite_mean_std

__all__ = [
    "ECHO_METRICS",
    "FrameDiceMetric",
    "consecutive_dice",
    "echo_summary",
    "frame_rows",
    "missed_counts",
    "missed_hd_value",
    "patient_rows",
    "summarise_rows",
    "summary_markdown",
    "temporal_consistency",
    "write_rows_csv",
]

ECHO_METRICS = ("dice", "iou", "specificity", "hd", "hd95", "mae")
"""The paper's metrics (Dice, HD, IoU, specificity, MAE) plus HD95."""
_DISTANCES = ("hd", "hd95", "asd")
_ID_COLUMNS = ("case", "patient", "view", "frame", "phase")
MISSED_DISTANCES = ("exclude", "diagonal")
"""Named policies for the distance of a missed structure (a number in mm is also accepted)."""


def _as_maps(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a (T, H, W) stack of label maps (or one (H, W) map), got shape {arr.shape}")
    return arr


def missed_hd_value(missed_distance: str | float, shape: Sequence[int],
                    spacing: Sequence[float] | None = None) -> float:
    """The HD/HD95/ASD given to a structure the prediction misses, under the policy ``missed_distance``.

    ``"exclude"``: infinite (the value is counted as missed and left out of every mean); ``"diagonal"``: the image
    diagonal ``sqrt((H * row_mm)^2 + (W * col_mm)^2)`` of a ``(H, W)`` frame (pixels when ``spacing`` is None), the
    largest distance two points of the frame can have; a number ``>= 0``: that distance (mm, or pixels without
    spacing).
    """
    if isinstance(missed_distance, str):
        if missed_distance == "exclude":
            return math.inf
        if missed_distance == "diagonal":
            h, w = (int(v) for v in shape[-2:])
            sy, sx = (float(v) for v in spacing[:2]) if spacing is not None else (1.0, 1.0)
            return float(math.hypot(h * sy, w * sx))
        raise ValueError(f"missed_distance must be one of {MISSED_DISTANCES} or a distance >= 0, "
                         f"got {missed_distance!r}")
    value = float(missed_distance)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"missed_distance must be one of {MISSED_DISTANCES} or a finite distance >= 0, "
                         f"got {missed_distance!r}")
    return value


def frame_rows(pred: Any, label: Any, class_names: Sequence[str], spacing: Sequence[float] | None = None,
               metrics: Sequence[str] = ECHO_METRICS, frames: Sequence[int] | None = None,
               phases: Sequence[str] | None = None, info: Mapping[str, Any] | None = None,
               missed_distance: str | float = "exclude") -> list[dict]:
    """Score every frame of a case: one row per frame.

    Args:
        pred, label: ``(T, H, W)`` label maps (numpy or torch), ``0..len(class_names)``.
        class_names: foreground class names; ``num_classes = len(class_names) + 1``.
        spacing: ``(row, col)`` mm per pixel for the distances (pixels when None).
        metrics: names from :data:`common.metrics.segmentation.SEGMENTATION_METRICS`.
        frames: frame index of each map in its sequence (default ``0..T-1``).
        phases: ``"ED"``, ``"ES"`` or ``""`` per frame.
        info: columns copied into every row (e.g. ``case``, ``patient``, ``view``).
        missed_distance: HD/HD95/ASD of a class in the reference that the prediction misses (see
            :func:`missed_hd_value`): ``"exclude"`` (infinite, left out of the means: the default), ``"diagonal"``
            (the frame's diagonal in mm, so a miss raises the mean instead of vanishing from it) or a number.

    Returns rows ``{**info, "frame", "phase", "<metric>_<class>", "<metric>_mean", "missed_<class>",
    "missed_mean"}``; ``<metric>_mean`` is the mean over the classes defined in that frame (NaN when none is;
    infinite when one is infinite). ``missed_<class>`` is 1.0 when the reference has the class and the prediction
    does not, 0.0 when both have it, NaN when the reference does not have it; ``missed_mean`` is the fraction of the
    frame's reference classes that were missed.
    """
    p, y = _as_maps(pred, "pred"), _as_maps(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred shape {p.shape} differs from label shape {y.shape}")
    unknown = [m for m in metrics if m not in SEGMENTATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(SEGMENTATION_METRICS)}")
    t = p.shape[0]
    frames = list(range(t)) if frames is None else [int(f) for f in frames]
    phases = [""] * t if phases is None else [str(s) for s in phases]
    if len(frames) != t or len(phases) != t:
        raise ValueError(f"frames ({len(frames)}) and phases ({len(phases)}) must have one entry per map ({t})")
    num_classes = len(class_names) + 1
    penalty = missed_hd_value(missed_distance, p.shape[-2:], spacing)  # validates the policy before any scoring
    rows = []
    for k in range(t):
        row: dict[str, Any] = dict(info or {})
        row["frame"], row["phase"] = frames[k], phases[k]
        present = np.array([bool((y[k] == c).any()) for c in range(1, num_classes)])
        missed = present & np.array([not bool((p[k] == c).any()) for c in range(1, num_classes)])
        for m in metrics:
            kw = {"spacing": spacing} if m in _DISTANCES else {}
            # MONAI's per-call notices are silenced inside the metric functions (monai_distance_notices_ignored)
            values = SEGMENTATION_METRICS[m](p[k], y[k], num_classes, **kw)
            if m in _DISTANCES:
                # a structure the prediction misses has no surface to measure (MONAI gives NaN for HD95, inf for HD):
                # one value by the policy for every distance, so HD and HD95 agree on what a miss costs
                values = np.where(missed, penalty, values)
            for name, v in zip(class_names, values):
                row[f"{m}_{name}"] = float(v)
            defined = values[~np.isnan(values)]
            row[f"{m}_mean"] = float(defined.mean()) if defined.size else math.nan
        for name, ref, miss in zip(class_names, present, missed):
            row[f"missed_{name}"] = float(miss) if ref else math.nan
        row["missed_mean"] = float(missed.sum() / present.sum()) if present.any() else math.nan
        rows.append(row)
    return rows


def consecutive_dice(masks: Any, num_classes: int) -> np.ndarray:
    """Dice between each frame's mask and the next one, per foreground class: ``(T - 1, num_classes - 1)``.

    NaN where the class is absent from both frames.
    """
    m = _as_maps(masks, "masks")
    out = np.full((max(m.shape[0] - 1, 0), num_classes - 1), np.nan)
    for t in range(m.shape[0] - 1):
        for c in range(1, num_classes):
            a, b = m[t] == c, m[t + 1] == c
            denom = int(a.sum()) + int(b.sum())
            if denom:
                out[t, c - 1] = 2.0 * np.logical_and(a, b).sum() / denom
    return out


def temporal_consistency(pred: Any, label: Any, class_names: Sequence[str]) -> dict:
    """Frame-to-frame consistency of a predicted sequence compared with the reference sequence.

    For consecutive frames ``(t, t+1)`` and each class: ``d_pred(t) = Dice(pred_t, pred_t+1)`` and
    ``d_true(t) = Dice(label_t, label_t+1)``. Returns per class (and ``mean`` over classes) the means of ``d_pred``,
    ``d_true`` and ``|d_pred - d_true|`` (the consistency error), and ``n_transitions``.
    """
    p, y = _as_maps(pred, "pred"), _as_maps(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred shape {p.shape} differs from label shape {y.shape}")
    if p.shape[0] < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames, got {p.shape[0]}")
    n = len(class_names) + 1
    dp, dt = consecutive_dice(p, n), consecutive_dice(y, n)
    err = np.abs(dp - dt)

    def per_class(v: np.ndarray) -> dict:
        with np.errstate(all="ignore"):
            means = [float(np.nanmean(v[:, j])) if np.isfinite(v[:, j]).any() else math.nan for j in range(n - 1)]
        out = dict(zip(class_names, means))
        finite = [x for x in means if math.isfinite(x)]
        out["mean"] = float(np.mean(finite)) if finite else math.nan
        return out

    return {"pred_consecutive_dice": per_class(dp), "true_consecutive_dice": per_class(dt),
            "abs_difference": per_class(err), "n_transitions": int(p.shape[0] - 1)}


def missed_counts(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict:
    """Missed structures in ``rows`` of :func:`frame_rows`: ``{class: n, "total": n, "frames": n_frames_with_one,
    "present": n_reference_structures}``.

    A structure is missed when the reference has the class in a frame and the prediction has no pixel of it; its HD
    is infinite (left out of mHD) or penalised depending on ``missed_distance``, so the count goes next to mHD.
    """
    out: dict[str, int] = {}
    present = 0
    frames_with = 0
    for c in class_names:
        vals = [float(r.get(f"missed_{c}", math.nan)) for r in rows]
        out[c] = int(sum(v == 1.0 for v in vals))
        present += sum(not math.isnan(v) for v in vals)
    for r in rows:
        frames_with += any(float(r.get(f"missed_{c}", math.nan)) == 1.0 for c in class_names)
    out["total"] = int(sum(out[c] for c in class_names))
    out["frames"] = int(frames_with)
    out["present"] = int(present)
    return out


def _metric_names(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> list[str]:
    found = []
    for key in rows[0] if rows else ():
        for name in [*class_names, "mean"]:
            suffix = f"_{name}"
            if key.endswith(suffix) and key[: -len(suffix)] not in found and key not in _ID_COLUMNS:
                found.append(key[: -len(suffix)])
    return found


def summarise_rows(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                   metrics: Sequence[str] | None = None) -> dict:
    """``{metric: {class: stats, "mean": stats}}`` over ``rows`` with ``stats`` from
    :func:`common.metrics.segmentation.finite_mean_std` (``mean``, ``std``, ``n``, ``n_nan``, ``n_inf``).

    The ``"mean"`` entry's ``mean`` is the mean of the class means (classes without a finite value left out), its
    ``std`` the standard deviation over rows of the per-row class mean (``<metric>_mean`` column).
    """
    metrics = list(metrics) if metrics is not None else _metric_names(rows, class_names)
    out: dict[str, dict] = {}
    for m in metrics:
        per = {c: finite_mean_std([r.get(f"{m}_{c}", math.nan) for r in rows]) for c in class_names}
        class_means = [s["mean"] for s in per.values() if s["mean"] is not None]
        overall = finite_mean_std([r.get(f"{m}_mean", math.nan) for r in rows])
        overall["mean"] = float(np.mean(class_means)) if class_means else None
        out[m] = {**per, "mean": overall}
    return out


def patient_rows(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                 metrics: Sequence[str] | None = None) -> list[dict]:
    """One row per patient: every ``<metric>_<class>`` averaged over the patient's frames (finite values; an
    infinite value makes the patient's mean infinite, so a missed structure is not hidden), plus ``n_frames``."""
    metrics = list(metrics) if metrics is not None else _metric_names(rows, class_names)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("patient", "")), []).append(r)
    out = []
    for patient in sorted(groups):
        g = groups[patient]
        row: dict[str, Any] = {"patient": patient, "n_frames": len(g)}
        for m in metrics:
            for c in [*class_names, "mean"]:
                v = np.asarray([x.get(f"{m}_{c}", math.nan) for x in g], dtype=np.float64)
                if np.isinf(v).any():
                    row[f"{m}_{c}"] = math.inf
                else:
                    row[f"{m}_{c}"] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        out.append(row)
    return out


def echo_summary(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                 temporal: Sequence[Mapping[str, Any]] = (), metrics: Sequence[str] | None = None,
                 missed_distance: str | float = "exclude") -> dict:
    """The evaluation report as a dict.

    Keys: ``n_frames``, ``n_cases``, ``n_patients``, ``all_frames`` (:func:`summarise_rows` over every frame),
    ``by_phase`` (``ED``/``ES`` frames), ``by_view``, ``per_patient`` (:func:`summarise_rows` over
    :func:`patient_rows`), ``missed`` (:func:`missed_counts` over all frames, by phase and by view),
    ``missed_distance`` (the policy the rows were scored with, as given: recorded, not applied here), ``paper`` (the
    paper's table cells: ``mDice``, ``mHD``, ``mHD95``, ``n_missed``, ``mIoU``, ``Spe``, ``MAE`` over all frames,
    by phase and by view, and per-class Dice/HD/missed) and, when ``temporal`` holds per-sequence results of
    :func:`temporal_consistency`, ``temporal_consistency`` (their mean per class and over classes).
    """
    if not rows:
        raise ValueError("no evaluated frames: the evaluation datalist is empty or nothing was scored")
    metrics = list(metrics) if metrics is not None else _metric_names(rows, class_names)
    out: dict[str, Any] = {
        "class_names": list(class_names),
        "n_frames": len(rows),
        "n_cases": len({r.get("case") for r in rows}),
        "n_patients": len({r.get("patient") for r in rows}),
        "all_frames": summarise_rows(rows, class_names, metrics),
    }
    phases = sorted({r.get("phase") for r in rows if r.get("phase")})
    out["by_phase"] = {ph: summarise_rows([r for r in rows if r.get("phase") == ph], class_names, metrics)
                       for ph in phases}
    views = sorted({str(r.get("view")) for r in rows if r.get("view")})
    out["by_view"] = {v: summarise_rows([r for r in rows if str(r.get("view")) == v], class_names, metrics)
                      for v in views}
    out["per_patient"] = summarise_rows(patient_rows(rows, class_names, metrics), class_names, metrics)
    out["missed_distance"] = missed_distance
    out["missed"] = {
        "all_frames": missed_counts(rows, class_names),
        "by_phase": {ph: missed_counts([r for r in rows if r.get("phase") == ph], class_names) for ph in phases},
        "by_view": {v: missed_counts([r for r in rows if str(r.get("view")) == v], class_names) for v in views},
    }
    out["paper"] = _paper_cells(out, class_names)
    if temporal:
        keys = ("pred_consecutive_dice", "true_consecutive_dice", "abs_difference")
        tc: dict[str, Any] = {"n_sequences": len(temporal), "n_transitions": sum(t["n_transitions"] for t in temporal)}
        for k in keys:
            tc[k] = {}
            for c in [*class_names, "mean"]:
                vals = [t[k][c] for t in temporal if math.isfinite(t[k][c])]
                tc[k][c] = float(np.mean(vals)) if vals else None
        out["temporal_consistency"] = tc
    return out


def _cell(summary: Mapping[str, Any], metric: str, cls: str = "mean") -> float | None:
    return summary.get(metric, {}).get(cls, {}).get("mean")


def _paper_cells(out: Mapping[str, Any], class_names: Sequence[str]) -> dict:
    names = {"mDice": "dice", "mHD": "hd", "mHD95": "hd95", "mIoU": "iou", "Spe": "specificity", "MAE": "mae"}

    missed = out["missed"]

    def cells(s: Mapping[str, Any], n_missed: Mapping[str, int]) -> dict:
        res = {k: _cell(s, m) for k, m in names.items() if m in s}
        res["n_missed"] = n_missed["total"]  # beside mHD: the structures its mean may leave out
        return res

    res = {"all_frames": cells(out["all_frames"], missed["all_frames"]),
           "by_phase": {ph: cells(s, missed["by_phase"][ph]) for ph, s in out["by_phase"].items()},
           "by_view": {v: cells(s, missed["by_view"][v]) for v, s in out["by_view"].items()},
           "per_class": {c: {"Dice": _cell(out["all_frames"], "dice", c), "HD": _cell(out["all_frames"], "hd", c),
                             "missed": missed["all_frames"][c]} for c in class_names}}
    return res


def _missed_note(summary: Mapping[str, Any]) -> str:
    policy = summary.get("missed_distance", "exclude")
    m = summary.get("missed", {}).get("all_frames", {})
    head = (f"Missed structures (in the reference, empty in the prediction): {m.get('total', 0)} of "
            f"{m.get('present', 0)} in {m.get('frames', 0)} frames. ")
    if policy == "exclude":
        return head + "Their HD/HD95 are left out of the HD means (`missed_distance='exclude'`), so compare mHD " \
            "only together with the missed count."
    if policy == "diagonal":
        return head + "Their HD/HD95 count as the frame's diagonal (`missed_distance='diagonal'`)."
    return head + f"Their HD/HD95 count as {policy} (`missed_distance={policy}`)."


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any], title: str = "BOTM evaluation") -> str:
    """The summary of :func:`echo_summary` as Markdown tables in the paper's layouts."""
    cls = summary["class_names"]
    lines = [f"# {title}", "", f"{summary['n_frames']} frames, {summary['n_cases']} cases, "
             f"{summary['n_patients']} patients. Distances in mm when the spacing is known.", ""]
    missed = summary.get("missed", {})
    lines += [_missed_note(summary), ""]
    lines += ["## Per class (Table 1 layout: Dice / HD per structure, with the missed count)", "",
              "| subset | " + " | ".join(f"{c} Dice | {c} HD | {c} missed" for c in cls) + " |",
              "|---|" + "---|---|---|" * len(cls)]
    subsets = [("all frames", summary["all_frames"], missed.get("all_frames", {}))] + \
        [(f"view {v}", s, missed.get("by_view", {}).get(v, {})) for v, s in summary["by_view"].items()] + \
        [(f"phase {p}", s, missed.get("by_phase", {}).get(p, {})) for p, s in summary["by_phase"].items()]
    for name, s, miss in subsets:
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(_cell(s, 'dice', c))} | {_fmt(_cell(s, 'hd', c))} | "
                                                 f"{miss.get(c, '-')}" for c in cls) + " |")
    cols = ["mDice", "mHD", "mHD95", "n_missed", "mIoU", "Spe", "MAE"]
    lines += ["", "## Averaged over regions and frames (Tables 2-3 layout)", "",
              "| subset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    paper = summary["paper"]
    rows = [("all frames", paper["all_frames"])] + [(f"view {v}", c) for v, c in paper["by_view"].items()] + \
        [(f"phase {p}", c) for p, c in paper["by_phase"].items()]
    for name, c in rows:
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, "-")) if k == "n_missed" else _fmt(c.get(k))
                                                 for k in cols) + " |")
    pp = summary["per_patient"]
    n_missed = missed.get("all_frames", {}).get("total", 0)
    lines += ["", f"Per patient (mean over patients of the patient means): mDice {_fmt(_cell(pp, 'dice'))}, "
              f"mHD {_fmt(_cell(pp, 'hd'))} ({n_missed} missed structures; with `missed_distance='exclude'` a "
              "patient with one has an infinite mean and is left out).", ""]
    tc = summary.get("temporal_consistency")
    if tc:
        lines += ["## Temporal consistency of video predictions", "",
                  f"{tc['n_sequences']} sequences, {tc['n_transitions']} frame transitions.", "",
                  "| | " + " | ".join([*cls, "mean"]) + " |", "|---|" + "---|" * (len(cls) + 1)]
        for key, label in (("pred_consecutive_dice", "Dice(pred t, pred t+1)"),
                           ("true_consecutive_dice", "Dice(true t, true t+1)"),
                           ("abs_difference", "mean abs difference")):
            lines.append(f"| {label} | " + " | ".join(_fmt(tc[key][c]) for c in [*cls, "mean"]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_rows_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows (dicts) as CSV; columns in first-seen order, identifiers first."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    columns = [c for c in (*_ID_COLUMNS, "n_frames") if c in columns] + \
        [c for c in columns if c not in (*_ID_COLUMNS, "n_frames")]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)
    return path


class FrameDiceMetric(CumulativeIterationMetric):
    """Per-case foreground Dice of frame stacks: a MONAI cumulative metric (key metric, per-case CSV details).

    ``__call__(y_pred, y)`` with ``y_pred`` and ``y`` ``(B, T, H, W)`` label maps (or lists of ``(T, H, W)``; ``T``
    may differ between cases) -> ``(B, num_classes - 1)``: each class's Dice averaged over the case's frames where
    the class is in the reference (NaN when it is in none). ``aggregate()`` reduces the collected rows with
    ``reduction`` (default: the mean over every defined value, i.e. mean foreground Dice).
    """

    def __init__(self, num_classes: int, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # MONAI calls this once per case for lists and once per batch for tensors
        p, t = y_pred.detach().cpu(), y.detach().cpu()
        if p.shape != t.shape or p.ndim not in (3, 4):
            raise ValueError(f"FrameDiceMetric: y_pred {tuple(p.shape)} and y {tuple(t.shape)} must be equal "
                             "(B, T, H, W) or (T, H, W) label-map stacks")
        batch = p if p.ndim == 4 else p[None]
        ref = t if t.ndim == 4 else t[None]
        out = torch.full((batch.shape[0], self.num_classes - 1), float("nan"), dtype=torch.float64)
        for b in range(batch.shape[0]):
            per = SEGMENTATION_METRICS["dice"]
            vals = np.stack([per(batch[b, k], ref[b, k], self.num_classes) for k in range(batch.shape[1])])
            with np.errstate(all="ignore"):
                ok = np.isfinite(vals)
                mean = np.where(ok.any(0), np.where(ok, vals, 0).sum(0) / np.maximum(ok.sum(0), 1), np.nan)
            out[b] = torch.from_numpy(mean)
        return out if p.ndim == 4 else out[0]

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("FrameDiceMetric: nothing collected; call the metric before aggregate()")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
