"""Paired-frame workflow pieces for BOTM that MONAI's SupervisedTrainer/Evaluator do not provide.

Training itself is a plain ``SupervisedTrainer`` (image ``(B, 2, H, W)`` = two frames, label ``(B, 2, H, W)``,
:class:`common.losses.paired.PairedDiceCELoss`); evaluation a plain ``SupervisedEvaluator`` with
:class:`common.engines.echo_inference.EchoSequenceInferer`. What they lack, and this module adds:

* :func:`echo_datalist` -- frame-pair datalists of the two public layouts. CAMUS (either release): one ED/ES pair
  per patient and view, for training and evaluation (or, for evaluation, the labelled half sequence). TED: for
  training every consecutive pair ``(t, t+1)`` of a patient's sequence, the last frame paired with the first
  (cyclic); for evaluation the whole sequence, segmented through its cyclic pairs. Splits are patient level.
* :func:`detect_echo_layout` and :func:`echo_class_names` -- CAMUS (bg/LV/Myo/LA) or TED (bg/LV/Myo) from a folder.
* :class:`EchoCorruptiond` -- the robustness protocol's test-time corruption (paper Table 4): Gaussian blur or
  Gaussian noise, the percentage read either as a strength (``mode="strength"``) or as the probability that a frame
  is corrupted (``mode="probability"``); reproducible per case; identity by default, switchable between runs.
* :class:`EchoSegmentationReport` -- an ignite handler scoring every evaluated frame
  (:mod:`common.metrics.echo_segmentation`) and writing ``per_frame.csv``, ``per_patient.csv``, ``report.md`` and
  PNG overlays; its :meth:`~EchoSegmentationReport.summary` feeds ``MetricsJSONWriter``.
* :func:`run_robustness` -- runs an evaluator once per corruption condition and writes the Table 4 comparison.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.data.io import DataError
from common.data.splits import resolve_split
from common.engines.echo_inference import plot_echo_overlay
from common.metrics.echo_segmentation import (
    ECHO_METRICS,
    echo_summary,
    frame_rows,
    missed_hd_value,
    patient_rows,
    summary_markdown,
    temporal_consistency,
    write_rows_csv,
)
from common.transforms.intensity import SeverityBlurd, SeverityGaussNoised

__all__ = [
    "ECHO_CLASS_NAMES",
    "FRAME_DROPOUT_MODES",
    "SEVERITY_MODES",
    "PAPER_TABLE4_BOTM",
    "EchoCorruptiond",
    "EchoSegmentationReport",
    "detect_echo_layout",
    "echo_class_names",
    "echo_datalist",
    "run_robustness",
]

FRAME_DROPOUT_MODES = ("frames", "pairs")
"""How ``frame_dropout`` removes TED training data: frames before pairing, or whole consecutive pairs."""

SEVERITY_MODES = ("strength", "probability")
"""How a robustness percentage is read: the corruption's strength, or the probability of corrupting a frame."""

ECHO_CLASS_NAMES = {"camus": ("LV", "Myo", "LA"), "ted": ("LV", "Myo")}
"""Foreground classes of each layout (label ids 1, 2, ...; 0 is the background)."""

PAPER_TABLE4_BOTM = {
    "blur_10": (0.906, 0.892), "blur_30": (0.895, 0.887), "blur_50": (0.862, 0.858),
    "noise_10": (0.900, 0.907), "noise_30": (0.873, 0.887), "noise_50": (0.832, 0.841),
}
"""BOTM's mean Dice (ED, ES) on CAMUS4CH under test-time corruption, paper Table 4."""


# ------------------------------------------------------------------------------------------------------- datalists
def detect_echo_layout(root: str | Path, layout: str = "auto") -> str:
    """``"camus"`` or ``"ted"``: ``layout`` itself unless it is ``"auto"``, else found from the files under ``root``.

    CAMUS patient folders hold ``Info_2CH.cfg``/``Info_4CH.cfg``; TED folders ``patientNNNN_4CH_info.cfg``.
    """
    if layout in ECHO_CLASS_NAMES:
        return layout
    if layout != "auto":
        raise ValueError(f"layout must be 'auto', 'camus' or 'ted', got {layout!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    for pattern in ("*", "*/*", "*/*/*"):
        if next(root.glob(f"{pattern}/Info_[24]CH.cfg"), None) is not None:
            return "camus"
        if next(root.glob(f"{pattern}/patient*_4CH_info.cfg"), None) is not None:
            return "ted"
    raise DataError(f"{root}: neither a CAMUS folder (patientNNNN/Info_2CH.cfg ...) nor a TED folder "
                    "(patientNNNN/patientNNNN_4CH_info.cfg ...)")


def echo_class_names(layout: str) -> list[str]:
    """Foreground class names of ``layout`` (``camus`` or ``ted``)."""
    if layout not in ECHO_CLASS_NAMES:
        raise ValueError(f"unknown echo layout {layout!r}; choose one of {sorted(ECHO_CLASS_NAMES)}")
    return list(ECHO_CLASS_NAMES[layout])


def _phase(t: int, ed: int, es: int) -> str:
    return "ED" if t == ed else "ES" if t == es else ""


def echo_datalist(root: str | Path, split: str | None = "train", layout: str = "auto",
                  views: Sequence[str] = ("2CH", "4CH"), purpose: str = "train", val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0, camus_eval: str = "pairs",
                  frame_dropout: float = 0.0, frame_dropout_mode: str = "frames", ledger: Any = None) -> list[dict]:
    """Datalist of frame pairs (training) or cases (evaluation) of a CAMUS or TED folder.

    Args:
        root: dataset folder in its official layout (see :mod:`common.data.camus`, :mod:`common.data.ted`).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``/None (all patients); patient-level, seeded,
            ``val_fraction`` of the patients for validation (the CAMUS release's own split lists win when present).
        layout: ``"camus"``, ``"ted"`` or ``"auto"`` (:func:`detect_echo_layout`).
        views: CAMUS views (``"2CH"``, ``"4CH"`` or both).
        purpose: ``"train"`` (pairs) or ``"eval"`` (TED: whole sequences).
        camus_eval: for ``purpose="eval"`` on CAMUS: ``"pairs"`` (ED/ES, the paper's protocol) or ``"sequences"``
            (the labelled half sequences ED -> ES, segmented through consecutive pairs).
        frame_dropout: TED training only (paper Table 5, RandomFrameDropout): the fraction of each training
            sequence that is dropped (seeded per patient), as ``frame_dropout_mode`` says.
        frame_dropout_mode: ``"frames"``: that fraction of the frames is removed (at least two stay) and the
            remaining frames are paired consecutively and cyclically, so the network sees fewer frames and pairs
            that span larger motions than the consecutive test pairs. ``"pairs"``: that fraction of the
            consecutive pairs ``(t, t+1)`` (cyclic) is removed (at least one stays); every kept pair is still
            adjacent, so only the amount of training data shrinks.
        ledger: evaluation's :class:`common.engines.screening.BatchLedger`: a case whose files cannot be read is
            recorded there (stage ``datalist``) and left out (:func:`common.data.cases.build_cases`); without it
            (training) the first such case stops with an error naming the file.

    Every entry has ``image`` and ``label`` (a path or a list of paths, loaded by
    :class:`common.engines.echo_inference.LoadEchoFramesd`), optionally ``frames`` (indices into the file),
    ``case``, ``patient``, ``view``, ``phases`` (comma-separated ``ED``/``ES``/empty per frame) and ``frame_ids``
    (comma-separated frame numbers in the patient's sequence, for the per-frame tables).
    """
    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
    if camus_eval not in ("pairs", "sequences"):
        raise ValueError(f"camus_eval must be 'pairs' or 'sequences', got {camus_eval!r}")
    if not 0.0 <= float(frame_dropout) < 1.0:
        raise ValueError(f"frame_dropout must be in [0, 1), got {frame_dropout}")
    if frame_dropout_mode not in FRAME_DROPOUT_MODES:
        raise ValueError(f"frame_dropout_mode must be one of {FRAME_DROPOUT_MODES}, got {frame_dropout_mode!r}")
    split = resolve_split(split)
    kind = detect_echo_layout(root, layout)
    out: list[dict] = []
    if kind == "camus":
        from common.data.camus import camus_datalist
        from common.data.cases import build_cases

        seq = purpose == "eval" and camus_eval == "sequences"

        def camus_case(e: dict) -> dict:
            base = {"case": f"{e['patient'].replace('/', '_')}_{e['view']}", "patient": e["patient"],
                    "view": e["view"]}
            if not seq:
                return {**base, "image": [e["image_ed"], e["image_es"]], "label": [e["label_ed"], e["label_es"]],
                        "phases": "ED,ES", "frame_ids": f"{e['ed']},{e['es']}"}
            if "sequence" not in e or "sequence_label" not in e:
                raise DataError(f"{Path(e['image_ed']).parent}: no labelled {e['view']} half sequence "
                                "(camus_eval='sequences' needs ..._half_sequence[_gt] or ..._sequence[_gt] files)")
            n = int(e["n_frames"])
            return {**base, "image": e["sequence"], "label": e["sequence_label"],
                    "phases": ",".join(_phase(t, e["ed"], e["es"]) for t in range(n))}

        cases = camus_datalist(root, views=tuple(views), split=split, val_fraction=val_fraction, seed=seed,
                               test_fraction=test_fraction, sequences=seq, ledger=ledger)
        # the record names the view as camus_datalist does: <patient folder>/<patient>_<view>
        return build_cases(cases, camus_case, lambda e: Path(e["image_ed"]).parent /
                           f"{Path(e['image_ed']).parent.name}_{e['view']}", ledger, root)
    from common.data.ted import ted_datalist

    for e in ted_datalist(root, split=split, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                          ledger=ledger):
        n = int(e["n_frames"])
        base = {"patient": e["patient"], "view": e["view"], "image": e["image"], "label": e["label"]}
        if purpose == "eval":
            out.append({**base, "case": e["patient"],
                        "phases": ",".join(_phase(t, e["ed"], e["es"]) for t in range(n))})
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(e["patient"].encode())])
        if frame_dropout > 0 and frame_dropout_mode == "frames":
            n_keep = max(2, n - int(round(frame_dropout * n)))
            kept = sorted(rng.choice(n, size=n_keep, replace=False).tolist())
            # cyclic: the last kept frame is paired with the first
            pairs = [(t, kept[(k + 1) % len(kept)]) for k, t in enumerate(kept)]
        else:
            pairs = [(t, (t + 1) % n) for t in range(n)]
            if frame_dropout > 0:  # "pairs": drop whole pairs, the kept ones stay (t, t+1)
                n_keep = max(1, n - int(round(frame_dropout * n)))
                pairs = [pairs[i] for i in sorted(rng.choice(n, size=n_keep, replace=False).tolist())]
        for t, u in pairs:
            out.append({**base, "case": f"{e['patient']}_t{t:03d}", "frames": [t, u], "frame_ids": f"{t},{u}",
                        "phases": f"{_phase(t, e['ed'], e['es'])},{_phase(u, e['ed'], e['es'])}"})
    return out


# ------------------------------------------------------------------------------------------------------ corruption
class EchoCorruptiond(MapTransform):
    """Test-time corruption of the robustness protocol (paper Table 4); identity while ``kind == "none"``.

    The corruptions: ``kind="blur"``: :class:`common.transforms.SeverityBlurd` (Gaussian blur, sigma = level x 2 % of
    the image size); ``kind="noise"``: :class:`common.transforms.SeverityGaussNoised` (additive Gaussian noise, std =
    level x 50 % of the frame stack's value range). The paper gives "10/30/50 %" without saying what the percentage
    is; ``mode`` chooses the reading:

    * ``"strength"`` (default, our mapping): every frame is corrupted at level = ``severity``.
    * ``"probability"``: each frame of a case is corrupted with probability ``severity`` (the ``p`` of TorchIO's
      transforms), at the fixed level ``strength`` (default 0.5: blur sigma 1 % of min(H, W), noise std 25 % of the
      range, TorchIO ``RandomNoise``'s largest default std on [0, 1] images); the others are left untouched. A
      frame's draw depends only on ``seed``, the case, the kind and the frame, and the same draw serves every
      severity, so the frames corrupted at 10 % are among those corrupted at 30 %.

    The noise of a case depends only on ``seed`` and the case (``case_key``), not on the order or the worker that
    loads it, so every run of a condition sees the same corrupted images. Images are ``(T, H, W)`` frame stacks (or
    one ``(H, W)`` frame). :meth:`set_condition` switches the condition between evaluator runs.
    """

    KINDS = ("none", "blur", "noise")

    def __init__(self, keys: KeysCollection, kind: str = "none", severity: float = 0.0, seed: int = 0,
                 case_key: str = "case", mode: str = "strength", strength: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in SEVERITY_MODES:
            raise ValueError(f"corruption mode must be one of {SEVERITY_MODES}, got {mode!r}")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"corruption strength (the level of probability mode) must be in (0, 1], got {strength}")
        self.seed = int(seed)
        self.case_key = case_key
        self.mode = mode
        self.strength = float(strength)
        self.set_condition(kind, severity)

    def set_condition(self, kind: str, severity: float) -> None:
        """Switch to corruption ``kind`` at ``severity`` in [0, 1] (a strength or a probability, see ``mode``)."""
        if kind not in self.KINDS:
            raise ValueError(f"corruption kind must be one of {self.KINDS}, got {kind!r}")
        if not 0.0 <= float(severity) <= 1.0:
            raise ValueError(f"corruption severity must be in [0, 1], got {severity}")
        self.kind, self.severity = kind, float(severity)

    def describe(self) -> str:
        """One sentence saying what the percentages of this corruption mean (for the reports)."""
        if self.mode == "strength":
            return ("severity mode `strength`: every frame corrupted; the percentage scales the corruption (blur "
                    "sigma = p x 2 % of min(H, W) pixels, noise std = p x 50 % of the value range)")
        return (f"severity mode `probability`: each frame corrupted with probability p at a fixed strength "
                f"{self.strength:g} (blur sigma = {2 * self.strength:g} % of min(H, W) pixels, noise std = "
                f"{50 * self.strength:g} % of the value range), the other frames untouched")

    def _corrupt(self, d: dict, level: float, case: str) -> dict:
        if self.kind == "blur":
            return SeverityBlurd(self.keys, level, allow_missing_keys=self.allow_missing_keys)(d)
        noise = SeverityGaussNoised(self.keys, level, allow_missing_keys=self.allow_missing_keys)
        noise.set_random_state(seed=(self.seed + zlib.crc32(case.encode())) % (2**31 - 1))
        return noise(d)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.kind == "none" or self.severity == 0.0:
            return d
        case = str(d.get(self.case_key, ""))
        if self.mode == "strength":
            return self._corrupt(d, self.severity, case)
        out = self._corrupt(d, self.strength, case)
        for key in self.key_iterator(d):
            x, y = d[key], out[key]
            n = x.shape[0] if x.ndim >= 3 else 1
            # one uniform draw per frame, independent of the severity, so a higher probability only adds frames
            draws = np.random.default_rng([self.seed, zlib.crc32(case.encode()), zlib.crc32(self.kind.encode())])
            hit = draws.random(n) < self.severity
            if x.ndim < 3:
                out[key] = y if hit[0] else x
            else:
                mask = torch.as_tensor(hit) if isinstance(x, torch.Tensor) else hit
                out[key] = (torch.where if isinstance(x, torch.Tensor) else np.where)(
                    mask.reshape((n,) + (1,) * (x.ndim - 1)), y, x)
        return out


# --------------------------------------------------------------------------------------------------------- report
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


class EchoSegmentationReport:
    """Ignite handler: score every frame an evaluator segments; write the tables and overlays at epoch end.

    Reads each decollated batch item merged with its output item: ``pred`` and ``label`` ``(T, H, W)`` label maps,
    ``image`` ``(T, H, W)``, ``frame_info`` (spacing, frame indices; from
    :class:`~common.engines.echo_inference.LoadEchoFramesd`) and the datalist's ``case``, ``patient``, ``view`` and
    ``phases``. Distances use the frames' spacing (mm).

    Writes under ``output_dir``: ``per_frame.csv`` (one row per frame), ``per_patient.csv``, ``report.md`` (the
    paper's table layouts, :func:`~common.metrics.echo_segmentation.summary_markdown`) and ``overlays/<case>.png``
    for the first ``num_overlays`` cases. Sequences of three or more frames also get the temporal consistency. With
    ``torch.distributed`` initialised, rows of every rank are gathered and rank ``save_rank`` writes.

    ``summary(engine)`` returns ``{"echo": <echo_summary>, "files": {...}}`` for ``MetricsJSONWriter(extra=...)``.

    ``missed_distance``: HD/HD95 of a structure the prediction misses (:func:`common.metrics.echo_segmentation.
    missed_hd_value`): ``"exclude"`` (left out of the means, the default), ``"diagonal"`` (the frame's diagonal in
    mm) or a distance in mm. Either way the number of missed structures is reported next to mHD.
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], metrics: Sequence[str] = ECHO_METRICS,
                 num_overlays: int = 4, uncertainty_key: str | None = None, title: str = "BOTM evaluation",
                 save_rank: int = 0, missed_distance: str | float = "exclude") -> None:
        missed_hd_value(missed_distance, (1, 1))  # a bad policy fails when the config is parsed, not after a run
        self.missed_distance = missed_distance
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.metrics = list(metrics)
        self.num_overlays = int(num_overlays)
        self.uncertainty_key = uncertainty_key
        self.title = title
        self.save_rank = int(save_rank)
        self.last_summary: dict | None = None
        self.files: dict[str, Any] = {}
        self._reset()

    def _reset(self, engine: Any = None) -> None:
        self.rows: list[dict] = []
        self.temporal: list[dict] = []
        self.overlays: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.finalize)

    def add_case(self, item: Mapping[str, Any]) -> None:
        """Score one decollated output item (see the class docstring)."""
        if item.get("label") is None:
            raise ValueError(f"case {item.get('case')!r}: evaluation needs reference labels ('label')")
        pred, label = _to_numpy(item["pred"]), _to_numpy(item["label"])
        if pred.ndim == 2:
            pred, label = pred[None], label[None]
        info = json.loads(item["frame_info"]) if item.get("frame_info") else {}
        t = pred.shape[0]
        frame_ids = [int(f) for f in str(item["frame_ids"]).split(",")] if item.get("frame_ids") else \
            info.get("frames", list(range(t)))
        phases = str(item.get("phases", "")).split(",") if item.get("phases") is not None else [""] * t
        if len(phases) != t:
            raise ValueError(f"case {item.get('case')!r}: {len(phases)} phases for {t} frames")
        case = str(item.get("case", f"case{len(self.rows)}"))
        meta = {"case": case, "patient": str(item.get("patient", case)), "view": str(item.get("view", ""))}
        rows = frame_rows(pred, np.rint(label).astype(np.int64), self.class_names, spacing=info.get("spacing"),
                          metrics=self.metrics, frames=frame_ids, phases=phases, info=meta,
                          missed_distance=self.missed_distance)
        self.rows.extend(rows)
        if t >= 3:
            self.temporal.append({**temporal_consistency(pred, np.rint(label), self.class_names), "case": case})
        rank, _ = _rank_world()
        if rank == self.save_rank and len(self.overlays) < self.num_overlays:
            frames = list(range(t)) if t <= 4 else [round(x) for x in np.linspace(0, t - 1, 4)]
            titles = [f"{meta['view']} frame {frame_ids[f]} {phases[f]}".strip() +
                      (f"  Dice {rows[f]['dice_mean']:.3f}" if math.isfinite(rows[f]["dice_mean"]) else "")
                      for f in frames]
            unc = item.get(self.uncertainty_key) if self.uncertainty_key else None
            png = plot_echo_overlay(item["image"], pred, self.output_dir / "overlays" / f"{case}.png", label=label,
                                    uncertainty=unc, frames=frames, titles=titles, class_names=self.class_names,
                                    title=f"{case}: reference dashed, prediction solid")
            self.overlays.append(str(png))

    def collect(self, engine: Any) -> None:
        # the evaluator's output holds image/label/pred only; the case's metadata stays in the (decollated) batch
        batch, out = engine.state.batch, engine.state.output
        if not isinstance(out, list):
            batch, out = [batch], [out]
        for b, o in zip(batch, out):
            self.add_case({**b, **o})

    def finalize(self, engine: Any = None) -> dict | None:
        """Gather, summarise and write; returns the summary on the writing rank (None elsewhere)."""
        rows, temporal = self.rows, self.temporal
        rank, world = _rank_world()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (rows, temporal))
            rows = [r for g in gathered for r in g[0]]
            temporal = [t for g in gathered for t in g[1]]
        if rank != self.save_rank:
            return None
        summary = echo_summary(rows, self.class_names, temporal, self.metrics, missed_distance=self.missed_distance)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.files = {
            "per_frame_csv": str(write_rows_csv(rows, self.output_dir / "per_frame.csv")),
            "per_patient_csv": str(write_rows_csv(patient_rows(rows, self.class_names, self.metrics),
                                                  self.output_dir / "per_patient.csv")),
            "overlays": list(self.overlays),
        }
        md = self.output_dir / "report.md"
        md.write_text(summary_markdown(summary, self.title))
        self.files["report_md"] = str(md)
        self.last_summary = summary
        if engine is not None and hasattr(engine, "logger"):
            cells = summary["paper"]["all_frames"]
            engine.logger.info(f"echo report: mean Dice {cells.get('mDice')}, mHD {cells.get('mHD')} "
                               f"({cells.get('n_missed')} missed structures), tables in {self.output_dir}")
        return summary

    def summary(self, engine: Any = None) -> dict:
        """``{"echo": summary, "files": {...}}`` of the last finished epoch (empty before the first)."""
        return {"echo": self.last_summary, "files": dict(self.files)} if self.last_summary is not None else {}


# ----------------------------------------------------------------------------------------------------- robustness
def _condition_name(kind: str, severity: float) -> str:
    return "clean" if kind == "none" or severity == 0 else f"{kind}_{round(100 * severity)}"


def run_robustness(evaluator: Any, corruption: EchoCorruptiond, report: EchoSegmentationReport,
                   conditions: Sequence[Sequence[Any]], output_dir: str) -> list[dict]:
    """Evaluate once per ``(kind, severity)`` condition and write the paper's Table 4 comparison.

    Each condition's tables go to ``<output_dir>/<condition>/`` (``clean``, ``blur_10``, ...; the report's files);
    ``robustness.json`` (every condition's paper-table cells, ED and ES), ``robustness.md`` (Table 4 layout, mean
    Dice ED/ES, with the paper's BOTM row) and ``robustness.png`` (mean Dice against severity) go to ``output_dir``.
    Returns the result rows. The corruption is switched back to ``none`` at the end. The corruption's ``mode``
    (strength or probability, :class:`EchoCorruptiond`) is recorded in the JSON and stated above the table, next to
    the paper's row, whose transform parameters the paper does not give (so it is a reference, not like-for-like).
    """
    from common.engines.handlers import write_json_atomic

    out = Path(output_dir)
    results = []
    try:
        for cond in conditions:
            kind, severity = str(cond[0]), float(cond[1])
            name = _condition_name(kind, severity)
            corruption.set_condition(kind, severity)
            report.output_dir = out / name
            evaluator.run()
            s = report.last_summary
            if s is None:  # a non-writing rank
                continue
            cells = s["paper"]
            results.append({"condition": name, "kind": kind, "severity": severity, "severity_mode": corruption.mode,
                            **cells["all_frames"],
                            "mDice_ED": cells["by_phase"].get("ED", {}).get("mDice"),
                            "mDice_ES": cells["by_phase"].get("ES", {}).get("mDice"),
                            "by_phase": cells["by_phase"], "files": dict(report.files)})
    finally:
        corruption.set_condition("none", 0.0)
    if _rank_world()[0] != report.save_rank:
        return results
    write_json_atomic(out / "robustness.json", {
        "severity_mode": corruption.mode, "strength": corruption.strength if corruption.mode == "probability" else None,
        "severity_meaning": corruption.describe(), "conditions": results, "paper_botm_table4": PAPER_TABLE4_BOTM,
        "paper_note": _PAPER_NOTE})
    (out / "robustness.md").write_text(_robustness_markdown(results, corruption.describe()))
    _robustness_plot(results, out / "robustness.png", corruption.mode)
    return results


def _fmt_pair(ed: Any, es: Any) -> str:
    return "/".join("-" if v is None else f"{v:.3f}" for v in (ed, es))


_PAPER_NOTE = ("The paper's row (BOTM, CAMUS4CH, 500 epochs on the real data) used TorchIO's RandomBlur and "
               "RandomGaussianNoise at '10/30/50 %' without giving their parameters or saying whether the "
               "percentage is a strength or the probability of applying the transform: it is printed for "
               "reference, not as a like-for-like comparison with either severity mode.")


def _robustness_markdown(results: Sequence[Mapping[str, Any]], meaning: str = "") -> str:
    by = {r["condition"]: r for r in results}
    cols = ["blur_10", "blur_30", "blur_50", "noise_10", "noise_30", "noise_50"]
    head = ["RandomBlur 10%", "30%", "50%", "RandomGaussNoise 10%", "30%", "50%"]
    lines = ["# Robustness to test-time corruption (paper Table 4 layout)", "",
             "Mean Dice over the anatomical regions, ED/ES frames (left/right).", "",
             f"This model: {meaning or 'severity mode not recorded'}.", "", _PAPER_NOTE, "",
             "| method | clean | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(cols)]
    clean = by.get("clean")
    lines.append("| this model | " + (_fmt_pair(clean["mDice_ED"], clean["mDice_ES"]) if clean else "-") + " | " +
                 " | ".join(_fmt_pair(by[c]["mDice_ED"], by[c]["mDice_ES"]) if c in by else "-" for c in cols) + " |")
    lines.append("| BOTM (paper, CAMUS4CH; reference only, see above) | - | " +
                 " | ".join(_fmt_pair(*PAPER_TABLE4_BOTM[c]) for c in cols) + " |")
    keys = ("mDice", "mHD", "mHD95", "n_missed", "mIoU", "Spe", "MAE")
    lines += ["", "`n_missed`: structures of the reference the prediction left empty (frame x class); mHD/mHD95 "
              "follow the evaluation's `missed_distance` (by default they leave these out).", "",
              "| condition | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r['condition']} | " + " | ".join(
            "-" if r.get(k) is None else str(r[k]) if k == "n_missed" else f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _robustness_plot(results: Sequence[Mapping[str, Any]], path: Path, mode: str = "strength") -> None:
    from common.plotting import save_figure, subplots

    clean = next((r for r in results if r["condition"] == "clean"), None)
    fig, ax = subplots(figsize=(6.4, 4.0))
    for kind, colour in (("blur", "tab:blue"), ("noise", "tab:red")):
        for phase, style in (("ED", "-"), ("ES", "--")):
            pts = [(0.0, clean[f"mDice_{phase}"])] if clean and clean.get(f"mDice_{phase}") is not None else []
            pts += [(r["severity"], r[f"mDice_{phase}"]) for r in results
                    if r["kind"] == kind and r.get(f"mDice_{phase}") is not None]
            if pts:
                x, y = zip(*sorted(pts))
                ax.plot([100 * v for v in x], y, style, marker="o", color=colour, label=f"{kind} {phase}")
    ax.set_xlabel("probability of corrupting a frame (%)" if mode == "probability" else "severity (strength, %)")
    ax.set_ylabel("mean Dice")
    ax.set_title("Test-time corruption (paper Table 4 protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
