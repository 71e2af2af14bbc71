"""Claim ``adacs_lost``: AdaCS beats plain VoxelMorph on pairs with lost correspondence, and its score map is low
where the simulator lost the correspondence.

Paper: Zhang et al., AdaCS (ECCV 2024), Tables 1-2 (AdaCS raises the Dice of the warped myocardium over the plain
estimator) and Fig. 4 (the score map is low where correspondence is lost). Method: the ``adacs_registration``
bundle with ``--method adacs``; baseline: the same bundle with ``--method plain`` (VoxelMorph trained with Eq. 1,
no scoring network). Both use the bundle's ``train.json`` and ``evaluate.json`` (in process, through
:func:`tools.runs.run_workflow`) with the same data, training seeds, epochs, learning rate and every other override.

Data (:mod:`common.data.synthetic.registration`, the ``pairs`` layout: ED -> ES short-axis pairs, MRI and echo
alternating, with dropout / shadow / noise-burst regions and the simulator's own ``pairNNNN_lost.nii.gz`` record):

* training + validation: ``write_registration_pairs(seed=TRAIN_DATA_SEED)`` (10 % clean control pairs, as the
  bundle's learning test), split by the bundle (``val_fraction`` 0.2, no test split);
* test: ``write_registration_pairs(seed=TEST_DATA_SEED, clean_fraction=0)``, an independent simulator stream
  (pair ``n`` is drawn from ``(seed, n)`` only), scored with ``--eval_split all``. The claim is about pairs with lost
  correspondence: the test pairs are those whose simulator ``lost`` map (read from the simulator's file, never from
  a prediction) has at least one lost and one kept pixel; the others are listed in ``details`` and left out of both
  comparisons.

Training seeds: the bundle has no ``seed`` knob, so seed ``k`` replaces its ``set_determinism(seed=0)`` (network
initialisation) and the seeds of its sampler and of ``EpochSeed`` (data order and per-epoch draws) by ``k``. Both arms
keep the last epoch's weights (``--model_selection last``, the authors' protocol: no labels are used to train or to
pick a model).

Comparisons, paired over the test pairs (values = mean over the training seeds):

1. Dice of the warped source myocardium vs the target myocardium (the bundle's ``per_pair.csv`` ``dice``):
   AdaCS vs plain.
2. AdaCS's score map ``Ŝ`` (the scoring network of the final training checkpoint on the test target): its mean
   outside vs inside the simulator's lost regions (``score_outside_lost`` vs ``score_in_lost`` of ``per_pair.csv``,
   which the bundle computes from the ``lost`` file); "method" = outside, "baseline" = inside, higher is better.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.reproduce.result import ClaimResult, Comparison, size_config

__all__ = ["AdacsSize", "SIZES", "ARMS", "TRAIN_DATA_SEED", "TEST_DATA_SEED", "make_data", "lost_pairs",
           "pair_values", "seeded_initialize", "arm_overrides", "run"]

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "adacs_registration" / "configs"
TRAIN_DATA_SEED = 18_101  # write_registration_pairs seed of the training/validation pairs
TEST_DATA_SEED = 18_102  # write_registration_pairs seed of the test pairs: an independent simulator stream
ARMS: dict[str, str] = {"AdaCS": "adacs", "VoxelMorph (plain)": "plain"}  # label -> the bundle's --method
METHOD, BASELINE = list(ARMS)
# the bundle's initialisation seed, replaced per training seed (see seeded_initialize)
_DETERMINISM = "$monai.utils.set_determinism(seed=0)"


@dataclass(frozen=True)
class AdacsSize:
    """One size of the claim: data and training budget (the same for both arms)."""

    image_size: int  # simulated pairs are image_size x image_size; also the network input (spatial_size)
    train_pairs: int  # simulated training + validation pairs
    test_pairs: int
    epochs: int  # all epochs, AdaCS's 2 W warm-up epochs included
    warmup_epochs: int | None  # W; None = the bundle's preset (20)
    learning_rate: float | None  # None = the bundle's preset (2e-4 for VoxelMorph on these pairs)
    batch_size: int = 8
    val_fraction: float = 0.2


SIZES: dict[str, AdacsSize] = {
    # CI plumbing: 2 epochs (W = 0: AdaCS alternates from the start) on 6 + 2 tiny pairs
    "smoke": AdacsSize(32, 6, 2, 2, 0, 3e-3, batch_size=4, val_fraction=0.34),
    # the bundle's learning-test setting (64x64, 30 epochs, W = 3, Adam 3e-3), 32 training pairs, 30 test pairs
    "quick": AdacsSize(64, 40, 30, 30, 3, 3e-3),
    # for a GPU (not run here): 128x128 and the bundle's defaults (340 epochs, W = 20, preset learning rate)
    "full": AdacsSize(128, 300, 100, 340, None, None),
}


def make_data(cfg: AdacsSize, data_dir: Path) -> tuple[Path, Path]:
    """Write the training/validation and test pair folders under ``data_dir``; returns both paths."""
    from common.data.synthetic.registration import write_registration_pairs

    if data_dir.exists():  # always the data of this size: never reuse a folder written at another size
        shutil.rmtree(data_dir)
    shape = (cfg.image_size, cfg.image_size)
    write_registration_pairs(data_dir / "train", n_pairs=cfg.train_pairs, seed=TRAIN_DATA_SEED, shape=shape,
                             progress=False)
    write_registration_pairs(data_dir / "test", n_pairs=cfg.test_pairs, seed=TEST_DATA_SEED, shape=shape,
                             clean_fraction=0.0, progress=False)
    return data_dir / "train", data_dir / "test"


def lost_pairs(dataset_dir: Path) -> tuple[list[str], list[str]]:
    """Pairs of a ``pairs``-layout folder whose simulator ``lost`` map has lost and kept pixels, and the others.

    Reads each ``pairs/pairNNNN_lost.nii.gz`` the simulator wrote (its own record of where correspondence is lost);
    returns ``(with_lost, without)`` as sorted pair names. A pair without a lost file is an error naming it."""
    import numpy as np

    from common.data.io import read_image

    sources = sorted((Path(dataset_dir) / "pairs").glob("pair*_source.nii.gz"))
    if not sources:
        raise FileNotFoundError(f"{dataset_dir}: no pairs/pair*_source.nii.gz (not a registration-pair folder)")
    with_lost, without = [], []
    for src in sources:
        name = src.name[: -len("_source.nii.gz")]
        path = src.with_name(f"{name}_lost.nii.gz")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the simulator's lost map of {name} is missing")
        lost = np.asarray(read_image(path).array) > 0
        (with_lost if lost.any() and not lost.all() else without).append(name)
    return with_lost, without


def pair_values(per_pair_csv: Path, column: str, pairs: list[str]) -> dict[str, float]:
    """``{pair: value}`` of one column of the bundle's ``per_pair.csv`` for exactly ``pairs``.

    A pair missing from the file, or a missing or non-finite value, is an error naming the file and the pair: the
    paired test must not silently lose pairs."""
    with open(per_pair_csv, newline="") as f:
        rows = {r["pair"]: r for r in csv.DictReader(f)}
    out: dict[str, float] = {}
    for p in pairs:
        if p not in rows:
            raise ValueError(f"{per_pair_csv}: pair {p} was not scored")
        raw = rows[p].get(column)
        value = float(raw) if raw not in (None, "") else math.nan
        if not math.isfinite(value):
            raise ValueError(f"{per_pair_csv}: {column} of pair {p} is {raw!r}, not a finite number")
        out[p] = value
    return out


def seeded_initialize(seed: int) -> list[str]:
    """The ``initialize`` list of the bundle's ``train.json`` with its determinism seed set to ``seed``."""
    init = json.loads((CONFIGS / "train.json").read_text())["initialize"]
    hits = [i for i, expr in enumerate(init) if expr == _DETERMINISM]
    if len(hits) != 1:
        raise RuntimeError(f"{CONFIGS / 'train.json'}: expected one {_DETERMINISM!r} in 'initialize', found "
                           f"{len(hits)}; update tools.reproduce.adacs_lost.seeded_initialize")
    init[hits[0]] = f"$monai.utils.set_determinism(seed={int(seed)})"
    return init


def arm_overrides(cfg: AdacsSize, arm: str, device: str) -> dict[str, Any]:
    """The bundle overrides of ``arm`` shared by training and evaluation (the training seed is set apart)."""
    out: dict[str, Any] = {"method": ARMS[arm], "spatial_size": [cfg.image_size, cfg.image_size],
                           "batch_size": cfg.batch_size, "epochs": cfg.epochs, "val_interval": cfg.epochs,
                           "val_fraction": cfg.val_fraction, "test_fraction": 0.0, "model_selection": "last",
                           "device": f"$torch.device({device!r})"}
    if cfg.warmup_epochs is not None:
        out["warmup_epochs"] = cfg.warmup_epochs
    if cfg.learning_rate is not None:
        out["learning_rate"] = cfg.learning_rate
    return out


def _train_and_score(cfg: AdacsSize, arm: str, seed: int, root: Path, train_dir: Path, test_dir: Path,
                     device: str) -> dict[str, Any]:
    from tools.runs import run_workflow

    if root.exists():  # a fresh run: no checkpoint of an earlier run may be resumed or scored
        shutil.rmtree(root)
    ov = arm_overrides(cfg, arm, device)
    t0 = time.perf_counter()
    run_workflow(CONFIGS, ["train.json"], "train", bundle_root=str(root), dataset_dir=str(train_dir),
                 output_dir=str(root / "train_log"), initialize=seeded_initialize(seed),
                 **{"train#seeding#seed": seed, "train#sampler#seed": seed}, **ov)
    t1 = time.perf_counter()
    # evaluate.json keeps its own initialize (evaluation draws nothing at random)
    run_workflow(CONFIGS, ["train.json", "evaluate.json"], "train", bundle_root=str(root),
                 dataset_dir=str(test_dir), output_dir=str(root / "eval"), eval_split="all", **ov)
    return {"per_pair_csv": root / "eval" / "per_pair.csv", "train_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def run(size: str, seeds: int, work_dir: Path, device: str) -> ClaimResult:
    """Train both arms with ``seeds`` training seeds; compare warped-label Dice and AdaCS's score map, paired."""
    cfg = size_config(SIZES, size)
    work_dir = Path(work_dir)
    t0 = time.perf_counter()
    train_dir, test_dir = make_data(cfg, work_dir / "data")
    pairs, left_out = lost_pairs(test_dir)
    if len(pairs) < 2:
        raise RuntimeError(f"{test_dir}: only {len(pairs)} test pair(s) with lost correspondence; a paired test "
                           "needs at least 2 (raise test_pairs)")
    data_s = time.perf_counter() - t0
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            logger.info("adacs_lost: %s, training seed %d", arm, seed)
            root = work_dir / "runs" / ARMS[arm] / f"seed{seed}"
            runs[arm].append(_train_and_score(cfg, arm, seed, root, train_dir, test_dir, device))
    dice = Comparison.from_seeds(
        "Dice of the warped myocardium", True,
        [pair_values(r["per_pair_csv"], "dice", pairs) for r in runs[METHOD]],
        [pair_values(r["per_pair_csv"], "dice", pairs) for r in runs[BASELINE]],
        note="Dice: per test pair with lost correspondence, mean over training seeds")
    score = Comparison.from_seeds(
        "AdaCS score Ŝ", True,
        [pair_values(r["per_pair_csv"], "score_outside_lost", pairs) for r in runs[METHOD]],
        [pair_values(r["per_pair_csv"], "score_in_lost", pairs) for r in runs[METHOD]],
        method_label="outside lost", baseline_label="inside lost",
        note=("AdaCS score Ŝ: mean of AdaCS's score map outside (method column) vs inside (baseline column) the "
              "simulator's lost regions (its pairNNNN_lost.nii.gz) of each test pair, mean over training seeds"))
    details = {
        "size": asdict(cfg),
        "training_seeds": list(range(seeds)),
        "train_data": {"folder": str(train_dir),
                       "writer": "common.data.synthetic.registration.write_registration_pairs",
                       "seed": TRAIN_DATA_SEED, "pairs": cfg.train_pairs, "val_fraction": cfg.val_fraction,
                       "clean_fraction": 0.1, "modality": "mixed (MRI, echo alternating)"},
        "test_data": {"folder": str(test_dir), "writer": "common.data.synthetic.registration.write_registration_pairs",
                      "seed": TEST_DATA_SEED, "pairs": cfg.test_pairs, "clean_fraction": 0.0,
                      "pairs_with_lost_correspondence": len(pairs), "left_out_without_lost_region": left_out,
                      "lost_regions": "the simulator's pairNNNN_lost.nii.gz"},
        "arms": {arm: f"--method {m}" for arm, m in ARMS.items()},
        "budget": {"epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs or "bundle preset",
                   "learning_rate": cfg.learning_rate or "bundle preset", "batch_size": cfg.batch_size,
                   "model_pt": "last epoch (--model_selection last)"},
        "data_s": data_s,
        "runs": {arm: [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for r in rs]
                 for arm, rs in runs.items()},
        "bundle": "bundles/adacs_registration (train.json, evaluate.json)",
    }
    return ClaimResult(
        claim="adacs_lost",
        statement=("AdaCS beats plain VoxelMorph on synthetic pairs with lost correspondence (higher Dice of the "
                   "warped myocardium, paired over test pairs), and its score map is lower inside the simulator's "
                   "lost regions than outside (paper Tables 1-2, Fig. 4 direction)."),
        method=METHOD, baseline=BASELINE, comparisons=[dice, score], details=details)
