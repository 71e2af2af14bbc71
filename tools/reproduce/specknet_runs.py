"""Train and evaluate ``specknet_tracking`` through its own configs, in process (``ConfigWorkflow`` on ``train.json``
and ``train.json + evaluate.json``: the code path of ``python -m monai.bundle run``), for the SpeckNet claims and
the bundle's impartial-motion learning test.

A training seed changes the network's initialisation (the config's ``set_determinism``) and the per-epoch sampling
of clips and augmentations (``train#seeding``); nothing else differs between seeds. Evaluation returns the report's
per-video rows (``per_video.csv``: δ_avg, MTE, GLS and its reference per video) next to ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tools.runs import run_workflow

__all__ = ["CONFIGS", "device_override", "seed_overrides", "train_specknet", "evaluate_tracker", "read_per_video"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "bundles" / "specknet_tracking" / "configs"


def device_override(device: str) -> str:
    """The ``--device`` override for a device name such as ``cpu`` or ``cuda:0``."""
    return f"$torch.device({str(device)!r})"


def seed_overrides(seed: int) -> dict[str, Any]:
    """Overrides that seed one training run: the ``set_determinism`` call of ``train.json``'s ``initialize`` (network
    initialisation) and ``train#seeding#seed`` (clips, augmentation). Fails clearly if the config changed shape."""
    config = json.loads((CONFIGS / "train.json").read_text())
    hits = [i for i, item in enumerate(config.get("initialize", [])) if "set_determinism" in str(item)]
    if len(hits) != 1 or "seeding" not in config.get("train", {}):
        raise RuntimeError(f"{CONFIGS / 'train.json'}: expected one set_determinism call in 'initialize' and a "
                           "'train#seeding' component to seed a training run; update tools/reproduce/specknet_runs.py")
    return {f"initialize#{hits[0]}": f"$monai.utils.set_determinism(seed={int(seed)})", "train#seeding#seed": int(seed)}


def train_specknet(run_dir: str | Path, dataset_dir: str | Path, overrides: Mapping[str, Any], seed: int = 0,
                   device: str = "cpu", configs: Sequence[str] = ()) -> Path:
    """Train with ``train.json`` (+ ``configs``, e.g. ``reduced.json``) and ``overrides`` on ``dataset_dir``
    (its train/val split; ``test_fraction`` in ``overrides`` decides what is held out), with ``run_dir`` as the
    bundle root (checkpoints in ``run_dir/models``, logs in ``run_dir/train_log``). Returns the ``model.pt`` path."""
    run_dir = Path(run_dir)
    args = {**dict(overrides), **seed_overrides(seed), "bundle_root": str(run_dir), "dataset_dir": str(dataset_dir),
            "output_dir": str(run_dir / "train_log"), "device": device_override(device)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI/ignite deprecation chatter, not results
        run_workflow(CONFIGS, ["train.json", *configs], "train", **args)
    ckpt = run_dir / "models" / "model.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"training in {run_dir} wrote no {ckpt} (no validation epoch ran? check val_interval)")
    return ckpt


def read_per_video(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an evaluation's ``per_video.csv``; numeric cells as floats (empty cells as NaN)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out: dict[str, Any] = {}
            for k, v in row.items():
                if k in ("id", "dataset"):
                    out[k] = v
                    continue
                try:
                    out[k] = float(v) if v != "" else float("nan")
                except ValueError:
                    out[k] = v
            rows.append(out)
    return rows


def evaluate_tracker(out_dir: str | Path, dataset_dir: str | Path, overrides: Mapping[str, Any],
                     ckpt_path: str | Path | None = None, device: str = "cpu", configs: Sequence[str] = (),
                     tracker: str = "specknet") -> dict[str, Any]:
    """Evaluate every video of ``dataset_dir`` (``eval_split all``) with ``train.json + configs + evaluate.json``
    and ``tracker`` (``specknet`` with ``ckpt_path``, or ``ncc``). Returns ``metrics.json`` with the per-video rows
    under ``per_video`` (sorted by dataset, then id)."""
    out_dir = Path(out_dir)
    args = {**dict(overrides), "dataset_dir": str(dataset_dir), "output_dir": str(out_dir), "eval_split": "all",
            "tracker": tracker, "device": device_override(device), "bundle_root": str(out_dir)}
    if tracker == "specknet":
        if ckpt_path is None or not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"evaluate_tracker: SpeckNet checkpoint {ckpt_path} not found")
        args["ckpt_path"] = str(ckpt_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_workflow(CONFIGS, ["train.json", *configs, "evaluate.json"], "train", **args)
    report = json.loads((out_dir / "metrics.json").read_text())
    rows = read_per_video(out_dir / "per_video.csv")
    report["per_video"] = sorted(rows, key=lambda r: (r["dataset"], r["id"]))
    return report
