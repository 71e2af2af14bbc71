"""Evaluation of the ``adacs_registration`` bundle: per-pair metrics, the figures and the evaluation report.

Split from :mod:`common.engines.registration` (training and inference), which re-exports these names, so configs
keep naming ``common.engines.registration.RegistrationMetric`` etc.

2D and 3D alike: every score works on ``(n, *spatial)`` displacements (``n`` = 2 or 3). 3D pairs are also scored on
the **input grid** (:func:`score_on_input_grid`, the AdaCS supplementary's 3D protocol: the displacement is resized
and rescaled to the original volume, the source labels read from their files are warped with it, and Dice, HD, HD95
and ASD are measured in mm from the files' spacing); the warped label map and the displacement are written there as
NIfTI with the input's affine. 3D figures show the middle slice along the last axis.
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.transforms import Transform
from torch import Tensor, nn

from common.engines.registration import SCORE_COLUMNS, unwrap
from common.engines.registration_inference import _batch_items, _plain, _warp_image
from common.metrics.registration import (
    MASK_BINARIZATIONS,
    mask_overlap_metrics,
    nonpositive_jacobian_percent,
    warp_mask,
)
from common.networks.scoring import ScoringNet

__all__ = ["INPUT_GRID_COLUMNS", "RegistrationMetric", "RegistrationMetricsd", "RegistrationReport",
           "plot_registration_examples", "score_on_input_grid", "score_pair"]

# columns of score_on_input_grid (3D): HD/ASD in mm of the input files
INPUT_GRID_COLUMNS = ("dice_input", "hd_input_mm", "hd95_input_mm", "asd_input_mm", "dice_identity_input",
                      "hd_identity_input_mm", "asd_identity_input_mm", "nonpositive_jacobian_percent_input")

# ------------------------------------------------------------------------------------------------------ metrics
def _quiet(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a metric function without MONAI's per-call deprecation notice from its surface-distance helper."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        return fn(*args, **kwargs)


def _check_binarization(mask_binarization: str) -> str:
    if mask_binarization not in MASK_BINARIZATIONS:
        raise ValueError(f"mask_binarization must be one of {sorted(MASK_BINARIZATIONS)}, got {mask_binarization!r}")
    return mask_binarization


def score_pair(displacement: Tensor, masks: Tensor, metrics: Sequence[str] = SCORE_COLUMNS,
               spacing: Sequence[float] | None = None,
               mask_binarization: str = "argmax") -> tuple[dict[str, float], Tensor]:
    """Registration scores of one pair.

    Args:
        displacement: ``(n, *spatial)`` pixels (``n`` = 2 or 3 spatial dims).
        masks: ``(2, *spatial)`` binary myocardium of source (channel 0) and target (channel 1).
        metrics: the :data:`SCORE_COLUMNS` wanted; ``*_identity`` score the unregistered pair, ``*_mm`` use
            ``spacing``. Only what is asked is computed (the folding % alone costs a batched determinant).
        spacing: pixel size for the ``*_mm`` columns.
        mask_binarization: how the warped source mask is made binary: ``"argmax"`` (ours: one-hot, bilinear,
            argmax) or ``"any"`` (the AdaCS authors' evaluation: bilinear, every value > 0 is foreground); see
            :func:`common.metrics.registration.warp_mask`.

    Returns:
        ``({column: value}, warped source mask (1, H, W) long)``.
    """
    bad = [m for m in metrics if m not in SCORE_COLUMNS]
    if bad:
        raise ValueError(f"unknown registration scores {bad}; choose from {SCORE_COLUMNS}")
    ddf = displacement.detach().float()[None]
    lab = masks.detach().round().long()[None].to(ddf.device)
    src, tgt = lab[:, 0:1], lab[:, 1:2]
    warped = warp_mask(src, ddf, mode=MASK_BINARIZATIONS[_check_binarization(mask_binarization)], num_labels=2)
    out: dict[str, float] = {}
    if any(m in metrics for m in ("dice", "hd", "hd95", "asd")):
        res = _quiet(mask_overlap_metrics, warped, tgt, label=1)
        out.update({k: float(res[k][0]) for k in ("dice", "hd", "hd95", "asd") if k in metrics})
    if "nonpositive_jacobian_percent" in metrics:
        out["nonpositive_jacobian_percent"] = float(nonpositive_jacobian_percent(ddf)[0])
    if any(m.endswith("_identity") for m in metrics):
        res = _quiet(mask_overlap_metrics, src, tgt, label=1)
        out.update({f"{k}_identity": float(res[k][0]) for k in ("dice", "hd", "asd") if f"{k}_identity" in metrics})
    if any(m.endswith("_mm") for m in metrics):
        if spacing is None:
            raise ValueError("hd_mm/asd_mm need the pixel spacing")
        res = _quiet(mask_overlap_metrics, warped, tgt, label=1, spacing=[float(v) for v in spacing])
        out.update({k: float(res[k[:-3]][0]) for k in ("hd_mm", "asd_mm") if k in metrics})
    return {m: out[m] for m in metrics}, warped[0]


def score_on_input_grid(item: dict, displacement: Tensor, mask_binarization: str = "argmax",
                        prediction_dir: str | Path | None = None) -> dict[str, Any]:
    """Score one pair on the grid of its input files and optionally write the predictions there.

    The network's displacement is resized and rescaled onto the source file's grid
    (:func:`common.engines.registration.displacement_on_grid`); the source myocardium read from
    ``item["source_label"]`` is warped with it (``mask_binarization`` as in :func:`score_pair`) and compared with the
    target myocardium of ``item["target_label"]``; HD/HD95/ASD are in mm from the target file's spacing.

    Args:
        item: a datalist entry with ``name``, ``layout``, ``source_label``, ``target_label`` (file paths).
        displacement: ``(n, *net)`` network displacement in pixels of the network grid.
        mask_binarization: ``"argmax"`` or ``"any"``.
        prediction_dir: when given, ``<name>_warped_label.nii.gz`` (the whole source label map warped, uint8, on the
            target file's grid and header) and ``<name>_disp.nii.gz`` (``(*input, n)`` float32 voxels of the input
            grid, channel ``k`` along array axis ``k``, pull-back) are written there with the target's affine.

    Returns:
        ``{column: value}`` for :data:`INPUT_GRID_COLUMNS`, plus ``warped_label_file``/``displacement_file`` paths
        when written.
    """
    from common.data.io import DataError, read_image, write_nifti
    from common.data.loading import write_like
    from common.data.pairs import MYO_LABELS
    from common.engines.registration_inference import displacement_on_grid

    for key in ("source_label", "target_label"):
        if not item.get(key):
            raise ValueError(f"pair {item.get('name')}: scoring on the input grid needs its {key} file")
    src, tgt = read_image(item["source_label"]), read_image(item["target_label"])
    if src.array.shape != tgt.array.shape:
        raise DataError(f"{item['source_label']}: shape {src.array.shape} differs from {item['target_label']} "
                        f"{tgt.array.shape}")
    n = int(displacement.shape[0])
    if src.array.ndim != n:
        raise DataError(f"{item['source_label']}: a {src.array.ndim}D label map for a {n}D displacement")
    ddf = displacement_on_grid(displacement, src.array.shape)
    myo = MYO_LABELS[str(item.get("layout", "volumes"))]
    lab_s = torch.from_numpy(np.rint(src.array).astype(np.int64))[None, None]
    lab_t = torch.from_numpy(np.rint(tgt.array).astype(np.int64))[None, None]
    src_myo, tgt_myo = (lab_s == myo).long(), (lab_t == myo).long()
    mode = MASK_BINARIZATIONS[_check_binarization(mask_binarization)]
    warped = warp_mask(src_myo, ddf, mode=mode, num_labels=2)
    spacing = [float(v) for v in tgt.spacing[:n]]
    res = _quiet(mask_overlap_metrics, warped, tgt_myo, label=1, spacing=spacing)
    ident = _quiet(mask_overlap_metrics, src_myo, tgt_myo, label=1, spacing=spacing)
    out: dict[str, Any] = {
        "dice_input": float(res["dice"][0]), "hd_input_mm": float(res["hd"][0]),
        "hd95_input_mm": float(res["hd95"][0]), "asd_input_mm": float(res["asd"][0]),
        "dice_identity_input": float(ident["dice"][0]), "hd_identity_input_mm": float(ident["hd"][0]),
        "asd_identity_input_mm": float(ident["asd"][0]),
        "nonpositive_jacobian_percent_input": float(nonpositive_jacobian_percent(ddf)[0]),
    }
    if prediction_dir is not None:
        folder = Path(prediction_dir)
        name = str(item.get("name", Path(str(item["source_label"])).name))
        n_labels = int(max(int(lab_s.max()), int(lab_t.max()))) + 1
        full = warp_mask(lab_s, ddf, mode=mode, num_labels=n_labels)[0, 0].numpy().astype(np.uint8)
        out["warped_label_file"] = str(write_like(folder / f"{name}_warped_label.nii.gz", full,
                                                  reference=item["target_label"]))
        out["displacement_file"] = str(write_nifti(folder / f"{name}_disp.nii.gz",
                                                   np.ascontiguousarray(ddf[0].movedim(0, -1).numpy()), tgt.affine))
    return out


class RegistrationMetricsd(Transform):
    """Evaluator postprocessing: score each decollated output once, for every metric handler and the report.

    Reads ``pred`` (displacement ``(2, H, W)``), ``label`` (source/target masks ``(2, H, W)``) and the pixel
    spacing from ``image.meta["spacing"]`` (when a ``*_mm`` column is asked); adds ``scores`` (a float tensor with
    one entry per name in ``metrics``, in that order), ``score_names`` and ``warped_label`` ``(1, H, W)``.

    Args:
        metrics: columns of :data:`SCORE_COLUMNS` to compute (all by default; validation during training needs only
            ``["dice"]``).
        mask_binarization: ``"argmax"`` (default) or ``"any"`` (the AdaCS authors'); see :func:`score_pair`.
    """

    def __init__(self, metrics: Sequence[str] = SCORE_COLUMNS, mask_binarization: str = "argmax") -> None:
        self.mask_binarization = _check_binarization(mask_binarization)
        self.metrics = tuple(metrics)
        bad = [m for m in self.metrics if m not in SCORE_COLUMNS]
        if bad or not self.metrics:
            raise ValueError(f"metrics must be a non-empty subset of {SCORE_COLUMNS}, got {list(metrics)}")

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        spacing = None
        if any(m.endswith("_mm") for m in self.metrics):
            meta = getattr(d.get("image"), "meta", {}) or {}
            spacing = meta.get("spacing")
            n = _plain(d["pred"]).shape[0]
            spacing = None if spacing is None else [float(v) for v in _plain(spacing).reshape(-1)[:n]]
        values, warped = score_pair(_plain(d["pred"]), _plain(d["label"]), self.metrics, spacing,
                                    self.mask_binarization)
        d["scores"] = torch.tensor([values[m] for m in self.metrics], dtype=torch.float64)
        d["score_names"] = list(self.metrics)
        d["mask_binarization"] = self.mask_binarization
        d["warped_label"] = warped
        return d


class RegistrationMetric(CumulativeIterationMetric):
    """One registration score per pair for MONAI's ``IgniteMetricHandler`` (mean over pairs with finite values).

    Two input forms:

    * ``y_pred`` the ``scores`` of :class:`RegistrationMetricsd` ``(B, K)`` and ``y`` its ``score_names`` (one list,
      or one list per pair) — picks column ``metric`` (the evaluator computes each pair once, for all handlers);
    * ``y_pred`` a displacement ``(B, 2, H, W)`` and ``y`` the source/target masks ``(B, 2, H, W)`` — scores here.

    Args:
        metric: a column of :data:`SCORE_COLUMNS` (Dice in [0, 1]; HD, HD95, ASD in pixels of the network grid, as
            in the paper; folding in %; ``*_identity`` for the unregistered pair).
        mask_binarization: for the displacement form only: ``"argmax"`` or ``"any"`` (see :func:`score_pair`).

    HD/ASD are infinite when a warped mask is empty; ``aggregate()`` leaves such pairs out of the mean.
    """

    def __init__(self, metric: str = "dice", mask_binarization: str = "argmax") -> None:
        super().__init__()
        if metric not in SCORE_COLUMNS:
            raise ValueError(f"metric must be one of {SCORE_COLUMNS}, got {metric!r}")
        self.metric = metric
        self.mask_binarization = _check_binarization(mask_binarization)

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> Any:
        # score tables travel with their column names (strings), which the tensor path of IterationMetric rejects
        if isinstance(y_pred, (list, tuple)) and y_pred and _plain(y_pred[0]).ndim == 1:
            names = y if y is not None else [None] * len(y_pred)
            names = names if isinstance(names[0], (list, tuple)) else [names] * len(y_pred)
            col = torch.stack([self._pick(_plain(p), n) for p, n in zip(y_pred, names)]).reshape(-1, 1)
            self.extend(col)
            return col
        return super().__call__(y_pred, y, **kwargs)

    def _pick(self, scores: Tensor, names: Sequence[str] | None) -> Tensor:
        if names is None or self.metric not in list(names):
            raise ValueError(f"score table has columns {names}; {self.metric!r} is not among them (configure "
                             "RegistrationMetricsd(metrics=...) to compute it)")
        return scores[list(names).index(self.metric)].float()

    def _compute_tensor(self, y_pred: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor:
        if y_pred.ndim == 2:
            raise ValueError("a score table needs its score_names as y (from RegistrationMetricsd)")
        if y is None or y.ndim != y_pred.ndim or y.shape[1] != 2:
            raise ValueError("y must stack the source and target masks as 2 channels (B, 2, H, W)")
        vals = [score_pair(p, m, (self.metric,), mask_binarization=self.mask_binarization)[0][self.metric]
                for p, m in zip(y_pred, y)]
        return torch.tensor(vals, dtype=torch.float32).reshape(-1, 1)

    def aggregate(self) -> Tensor:
        data = self.get_buffer()
        if not isinstance(data, Tensor) or data.numel() == 0:
            return torch.tensor(float("nan"))
        finite = data[torch.isfinite(data)]
        return finite.mean() if finite.numel() else torch.tensor(float("nan"))


# ------------------------------------------------------------------------------------------------------ figures


def _display(arr: np.ndarray, transpose: bool) -> np.ndarray:
    return arr.T if transpose else arr


def _grid_lines(ax, displacement: np.ndarray, step: int, transpose: bool) -> None:
    """Deformed grid ``x + û(x)`` in display coordinates (rows down, columns right)."""
    u0, u1 = displacement[0], displacement[1]
    if transpose:  # the display's rows are array axis 1
        u0, u1 = u1.T, u0.T
    h, w = u0.shape
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pr, pc = rr + u0, cc + u1
    for r in range(0, h, step):
        ax.plot(pc[r, :], pr[r, :], color="tab:orange", linewidth=0.6)
    for c in range(0, w, step):
        ax.plot(pc[:, c], pr[:, c], color="tab:orange", linewidth=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")


def plot_registration_examples(rows: Sequence[dict], out_png: str | Path, title: str = "") -> Path:
    """PNG with one row per pair: source, target, warped source, score map, deformed grid.

    Each ``rows`` item: ``name``, ``source``, ``target``, ``warped`` ``(H, W)``, ``displacement`` ``(2, H, W)``,
    optional ``source_mask``, ``target_mask``, ``warped_mask``, ``score`` ``(H, W)`` (with ``score_label``),
    ``lost`` ``(H, W)``, ``dice``/``dice_identity`` numbers and ``transpose`` (show arrays transposed, for NIfTI
    ``(X, Y)`` data).
    """
    from common.plotting import save_figure, subplots

    n = max(len(rows), 1)
    fig, axes = subplots(n, 5, figsize=(15, 3.1 * n), squeeze=False)
    for r, row in enumerate(rows):
        t = bool(row.get("transpose", False))
        panels = [("source (ED)", row["source"], row.get("source_mask")),
                  ("target (ES)", row["target"], row.get("target_mask")),
                  ("warped source", row["warped"], row.get("warped_mask"))]
        for c, (label, img, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(_display(img, t), cmap="gray", vmin=0, vmax=1)
            if mask is not None and np.any(mask):
                ax.contour(_display(mask.astype(float), t), [0.5], colors="tab:green", linewidths=0.8)
            if c == 2 and row.get("target_mask") is not None and np.any(row["target_mask"]):
                ax.contour(_display(row["target_mask"].astype(float), t), [0.5], colors="yellow", linewidths=0.6,
                           linestyles="dashed")
            text = f"{row['name']}: {label}"
            if c == 2 and "dice" in row:
                text += f"\nDice {row['dice']:.3f} (identity {row.get('dice_identity', float('nan')):.3f})"
            ax.set_title(text, fontsize=7)
            ax.axis("off")
        ax = axes[r, 3]
        if row.get("score") is not None:
            im = ax.imshow(_display(row["score"], t), cmap="viridis", vmin=0, vmax=1)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            if row.get("lost") is not None and np.any(row["lost"]):
                ax.contour(_display(row["lost"].astype(float), t), [0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{row.get('score_label', 'score map Ŝ')} (red: lost correspondence)", fontsize=7)
        else:
            ax.text(0.5, 0.5, row.get("score_label", "no score map"), ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        ax.axis("off")
        ax = axes[r, 4]
        ax.imshow(_display(row["target"], t), cmap="gray", vmin=0, vmax=1, alpha=0.5)
        _grid_lines(ax, row["displacement"], max(4, row["target"].shape[0] // 24), t)
        ax.set_title("displacement grid x + û(x)", fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_png, dpi=90)


# ------------------------------------------------------------------------------------------------ evaluation


class RegistrationReport:
    """Per-pair CSV, Table-1 summary and PNG of a registration evaluation (attach to the evaluator).

    At every iteration the decollated outputs (``pred`` displacement, ``label`` source/target masks) give one row
    per pair: the ``scores`` of :class:`RegistrationMetricsd` when it ran with all :data:`SCORE_COLUMNS`, else
    :func:`score_pair` here. ``per_pair.csv`` is written at completion (all ranks' rows, rank 0 writes).
    :meth:`summary` is meant for ``MetricsJSONWriter(extra=...)``. The PNG shows the first ``n_png`` pairs; the score
    map comes from ``auxiliary_network`` loaded from ``auxiliary_checkpoint`` (the ``auxiliary`` entry of the
    training checkpoint) when that file exists. With a ``lost`` map (synthetic pairs) the mean ``Ŝ`` inside and
    outside the lost regions is reported too.

    Args:
        output_dir: folder of ``per_pair.csv`` and the PNG.
        auxiliary_network: the method's ``ScoringNet``/``VarianceNet`` definition, or ``None``.
        auxiliary_checkpoint: training checkpoint holding ``auxiliary`` weights.
        n_png: pairs shown in the PNG.
        png_name: PNG file name.
        mask_binarization: ``"argmax"`` or ``"any"`` (see :func:`score_pair`), for pairs scored here; it is
            recorded in the summary (``mask_binarization``) and must match :class:`RegistrationMetricsd`'s.
        input_grid: also score every pair on the grid of its input label files (:func:`score_on_input_grid`,
            columns :data:`INPUT_GRID_COLUMNS`, summary ``table1_input_grid``); ``None`` (default) = for 3D pairs.
        save_predictions: with ``input_grid``, write each pair's warped label map and displacement (NIfTI, input
            affine) under ``<output_dir>/predictions``.
    """

    def __init__(self, output_dir: str, auxiliary_network: nn.Module | None = None,
                 auxiliary_checkpoint: str | None = None, n_png: int = 4, png_name: str = "registration.png",
                 mask_binarization: str = "argmax", input_grid: bool | None = None,
                 save_predictions: bool = True) -> None:
        self.input_grid = None if input_grid is None else bool(input_grid)
        self.save_predictions = bool(save_predictions)
        self.mask_binarization = _check_binarization(mask_binarization)
        self.output_dir = Path(output_dir)
        self.auxiliary_network = auxiliary_network
        self.auxiliary_checkpoint = auxiliary_checkpoint
        self.n_png = int(n_png)
        self.png_name = png_name
        self.rows: list[dict] = []
        self.figure_rows: list[dict] = []
        self.png_path: Path | None = None
        self.csv_path = self.output_dir / "per_pair.csv"
        self._aux_loaded: bool | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _reset(self, engine=None) -> None:
        self.rows, self.figure_rows = [], []

    def _load_auxiliary(self, device) -> nn.Module | None:
        if self._aux_loaded is None:
            self._aux_loaded = False
            path = Path(self.auxiliary_checkpoint) if self.auxiliary_checkpoint else None
            if self.auxiliary_network is not None and path is not None and path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)
                try:
                    unwrap(self.auxiliary_network).load_state_dict(state["auxiliary"])
                    self._aux_loaded = True
                except (KeyError, RuntimeError) as e:
                    # the score map is an illustration; the metrics do not depend on it, so evaluation goes on
                    self.logger.warning(f"{path}: no usable 'auxiliary' weights ({type(e).__name__}: {e}); "
                                        "the PNG shows no score map")
            elif self.auxiliary_network is not None:
                self.logger.warning(f"training checkpoint {path} not found; the PNG shows no score map")
        if not self._aux_loaded:
            return None
        net = unwrap(self.auxiliary_network).to(device)
        net.eval()
        return net

    def _iteration(self, engine) -> None:
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        items = _batch_items(engine)
        if len(items) != len(outputs):
            raise RuntimeError(f"RegistrationReport: {len(items)} batch items but {len(outputs)} outputs")
        for item, out in zip(items, outputs):
            ddf = _plain(out["pred"]).detach().float()[None]
            masks = _plain(out["label"]).detach().round().long()[None].to(ddf.device)
            row: dict[str, Any] = {"pair": str(item.get("name", f"pair{len(self.rows) + 1}"))}
            scored = "scores" in out and list(out.get("score_names", [])) == list(SCORE_COLUMNS)
            if scored and out.get("mask_binarization", "argmax") != self.mask_binarization:
                raise ValueError(f"RegistrationReport(mask_binarization={self.mask_binarization!r}) got pairs scored "
                                 f"with mask_binarization={out.get('mask_binarization')!r}; configure both alike")
            if scored:
                values, warped = dict(zip(SCORE_COLUMNS, _plain(out["scores"]).tolist())), out["warped_label"]
            else:  # not scored by RegistrationMetricsd(all columns): score here
                spacing = item.get("spacing")
                cols = SCORE_COLUMNS if spacing is not None else SCORE_COLUMNS[:-2]
                sp = None if spacing is None else _plain(spacing).reshape(-1)[:ddf.shape[1]].tolist()
                values, warped = score_pair(ddf[0], masks[0], cols, sp, self.mask_binarization)
            row.update(values)
            if self.input_grid or (self.input_grid is None and ddf.ndim == 5):
                row.update(score_on_input_grid(item, ddf[0], self.mask_binarization,
                                               self.output_dir / "predictions" if self.save_predictions else None))
            warped = _plain(warped)[0]
            image = _plain(out["image"]).detach().float()
            score, score_label = None, "no score map (method has no scoring net)"
            aux = self._load_auxiliary(ddf.device) if self.auxiliary_network is not None else None
            if aux is not None:
                with torch.no_grad():
                    tgt = image[1:2][None].to(ddf.device)
                    if isinstance(aux, ScoringNet):
                        score, score_label = aux(tgt)[0, 0].cpu(), "score map Ŝ"
                    else:
                        w = _warp_image(image[0:1][None].cpu(), ddf.cpu())
                        log_var = aux(tgt, w.to(ddf.device))[0, 0].cpu()
                        # shown as a confidence in [0, 1] so that it reads like Ŝ: low where the variance is high
                        score, score_label = torch.exp(-torch.exp(log_var)), "exp(-σ²) of the variance net"
            lost = item.get("lost")
            lost = None if lost is None else _plain(lost)[0].cpu()
            if score is not None and lost is not None:
                lost_b = lost.bool()
                if lost_b.any() and (~lost_b).any():
                    row["score_in_lost"] = float(score[lost_b].mean())
                    row["score_outside_lost"] = float(score[~lost_b].mean())
            self.rows.append(row)
            if len(self.figure_rows) < self.n_png:
                warped_source = _warp_image(image[0:1][None].cpu(), ddf.cpu())[0, 0]
                # 3D: the middle slice along the last axis, and the in-plane displacement components
                cut = (lambda a: a[..., a.shape[-1] // 2]) if ddf.ndim == 5 else (lambda a: a)
                self.figure_rows.append({
                    "name": row["pair"] + (" (mid slice)" if ddf.ndim == 5 else ""),
                    "source": cut(image[0].cpu().numpy()), "target": cut(image[1].cpu().numpy()),
                    "warped": cut(warped_source.numpy()), "displacement": cut(ddf[0, :2].cpu().numpy()),
                    "source_mask": cut(masks[0, 0].cpu().numpy()), "target_mask": cut(masks[0, 1].cpu().numpy()),
                    "warped_mask": cut(warped.cpu().numpy()), "score": None if score is None else cut(score.numpy()),
                    "score_label": score_label, "lost": None if lost is None else cut(lost.numpy()),
                    "dice": row["dice"], "dice_identity": row["dice_identity"],
                    "transpose": str(item.get("layout", "")) in ("acdc", "pairs", "volumes"),
                })

    def _gather(self) -> list[dict]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.rows)
            return [r for p in parts for r in p]
        return list(self.rows)

    def _completed(self, engine) -> None:
        rows = self._gather()
        self.rows = rows
        if getattr(engine.state, "rank", 0) != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        if self.figure_rows:
            self.png_path = plot_registration_examples(self.figure_rows, self.output_dir / self.png_name,
                                                       title=f"{len(rows)} pairs evaluated")
        engine.logger.info(f"per-pair metrics: {self.csv_path}; picture: {self.png_path}")

    def summary(self, engine=None) -> dict:
        """``{"table1": {...}, "per_pair_csv", "png", "n_pairs", ...}`` over the finite values of every column."""
        out: dict[str, Any] = {"n_pairs": len(self.rows), "per_pair_csv": str(self.csv_path),
                               "mask_binarization": self.mask_binarization,
                               "png": str(self.png_path) if self.png_path else None}
        stats = {}
        keys = [k for k, v in (self.rows[0] if self.rows else {}).items() if k != "pair" and not isinstance(v, str)]
        for k in keys:
            vals = np.asarray([r.get(k, np.nan) for r in self.rows], dtype=np.float64)
            fin = vals[np.isfinite(vals)]
            stats[k] = {"mean": float(fin.mean()) if fin.size else None, "std": float(fin.std()) if fin.size else None,
                        "n": int(fin.size), "n_nonfinite": int(vals.size - fin.size)}
        out["per_metric"] = stats

        def mean(k: str, scale: float = 1.0) -> float | None:
            m = stats.get(k, {}).get("mean")
            return None if m is None else m * scale

        # the paper's Table 1 reports DSC in %, HD and ASD in pixels of the 128x128 grid
        out["table1"] = {"DSC": mean("dice", 100.0), "HD": mean("hd"), "ASD": mean("asd"),
                         "nonpositive_jacobian_percent": mean("nonpositive_jacobian_percent"),
                         "DSC_identity": mean("dice_identity", 100.0)}
        if "dice_input" in stats:  # 3D: on the input files' grid, HD/ASD in mm (the supplementary's Table 4)
            out["table1_input_grid"] = {"DSC": mean("dice_input", 100.0), "HD_mm": mean("hd_input_mm"),
                                        "ASD_mm": mean("asd_input_mm"),
                                        "nonpositive_jacobian_percent": mean("nonpositive_jacobian_percent_input"),
                                        "DSC_identity": mean("dice_identity_input", 100.0),
                                        "HD_identity_mm": mean("hd_identity_input_mm"),
                                        "ASD_identity_mm": mean("asd_identity_input_mm")}
        if "score_in_lost" in stats:
            out["score_map"] = {"mean_in_lost": mean("score_in_lost"), "mean_outside_lost": mean("score_outside_lost")}
        return out
