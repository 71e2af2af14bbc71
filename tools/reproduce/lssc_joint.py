"""Claim ``lssc_joint``: in the few-shot setting (few labelled MRI volumes, all CT volumes), LSSC trained jointly on
both modalities with its consistency terms segments held-out MRI volumes better than the same network family trained
on the scarce MRI alone (paper Table 4 direction).

Arms (everything else equal):

- method: ``variant full`` (Joint V3 + Lmcr + Licr, every term of Eq. 15), ``modalities [ct, mr]``,
  ``few_shot {mr: k}``: ``k`` labelled MRI training volumes and every CT training volume;
- baseline: ``variant baseline`` (the paper's single-modality Baseline: Swin-Unet + EAM auxiliary loss),
  ``modalities [mr]``, ``few_shot {mr: k}``: the same ``k`` MRI volumes only.

Both are trained by the bundle's ``train.json`` and scored by its ``train.json + evaluate.json`` (in-process
``ConfigWorkflow``, as ``tools.lssc_compare`` does), with the same data folder, split, few-shot draw, seed,
iterations (``epochs x epoch_length``, fixed: the bundle's ``epoch_length "max"`` would give the joint model one pass
over the CT slices and the MRI-only model one pass over its one volume), MRI batch size, optimiser and schedule. The
method additionally sees a CT batch every iteration: that is its idea.

Data: the training folder (CT + MRI, simulator seed :data:`TRAIN_DATA_SEED`, case ids from 1001) is split by the
bundle's per-modality patient split with ``test_fraction 0`` (its test role is taken by the separate folder) and
``val_fraction 0.1``; the few-shot draw and ``seed`` vary with the training seed, so each seed labels other MRI
volumes. The held-out test folder holds MRI volumes only, drawn by the simulator with another seed
(:data:`TEST_DATA_SEED`, case ids from :data:`TEST_FIRST_ID`); every case of it is scored (``eval_split all``).
Nothing is tuned on it. Metric: per test volume, the mean Dice (%) of the four structures (LVM, LAC, LVC, AA) in the
volume's original geometry; per case the mean over the training seeds; one-sided Wilcoxon over the test volumes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.reproduce.result import ClaimResult, Comparison, size_config

__all__ = ["CLAIM", "TRAIN_DATA_SEED", "TEST_DATA_SEED", "TEST_FIRST_ID", "ClaimSize", "CLAIM_SIZES",
           "arm_overrides", "prepare_data", "labelled_volumes", "case_dice", "paired_case_values", "run"]

CLAIM = "lssc_joint"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "bundles" / "lssc_multimodal" / "configs"
TRAIN_DATA_SEED = 0
TEST_DATA_SEED = 1  # another simulator stream than the training folder's: (seed, modality, case id) seeds a case
TEST_FIRST_ID = 2001  # test case names (mr_train_2001, ...) never collide with training names (1001, ...)
VAL_FRACTION = 0.1
ARMS = ("method", "baseline")
EVAL_MR_ONLY = "$common.data.slices.unpaired_datalist(@data_root, ['mr'], @validate#split, ledger=@eval_ledger)"
"""``validate#datalist`` of the evaluation: the MRI volumes of the test folder only. The joint model is configured
for ``[ct, mr]`` and the test folder holds no CT, which the bundle's datalist would refuse."""

# smoke-size volumes: an eighth of the voxels, the same field of view (fast to simulate)
_SMOKE_SHAPES = {"ct_shape": (48, 48, 32), "ct_spacing": (3.2, 3.2, 4.0),
                 "mr_shape": (40, 40, 28), "mr_spacing": (4.0, 4.0, 4.8)}


@dataclass(frozen=True)
class ClaimSize:
    """One size of the claim: data, few-shot ``k``, training budget and bundle overrides for both arms.

    ``config_files`` are extra bundle config files layered on ``train.json`` (names in the bundle's ``configs/``);
    ``overrides`` are bundle overrides applied after them; ``simulator`` are :func:`write_mmwhs` shape arguments."""

    n_ct: int  # CT volumes of the training folder (90 % train, 10 % validation)
    n_mr: int  # MRI volumes of the training folder; k of its training split are labelled, the rest unused
    n_test: int  # held-out MRI volumes (the paired cases)
    labelled_mr: int  # few-shot k
    epochs: int
    epoch_length: int  # iterations per epoch (one MRI batch, plus one CT batch for the method)
    batch_size: int  # per modality
    config_files: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    simulator: Mapping[str, Any] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        """Training iterations of each arm."""
        return self.epochs * self.epoch_length


CLAIM_SIZES: dict[str, ClaimSize] = {
    # CI plumbing: a toy network, 2 iterations, 2 test volumes (its p-value means nothing)
    "smoke": ClaimSize(n_ct=2, n_mr=2, n_test=2, labelled_mr=1, epochs=1, epoch_length=2, batch_size=2,
                       config_files=("cpu_reduced.json",),
                       overrides={"embed_dim": 12, "num_heads": [1, 2, 4, 8], "infer_batch_size": 32},
                       simulator=_SMOKE_SHAPES),
    # CPU: the bundle's reduced configuration (64 x 64 crops at 2.4 mm, embed 32), 360 iterations per arm so that
    # 5 seeds x 2 arms fit ~12 CPU-minutes on one thread; 16 CT volumes -> 14 training CT (MM-WHS's 70 % of 20);
    # 1 labelled MRI as the paper's Table 4 row
    "quick": ClaimSize(n_ct=16, n_mr=10, n_test=10, labelled_mr=1, epochs=4, epoch_length=90, batch_size=8,
                       config_files=("cpu_reduced.json",)),
    # GPU: train.json as shipped (224 x 224 at 1 mm, embed 96, batch 12, lr 1e-4) for 100 x 100 iterations
    "full": ClaimSize(n_ct=16, n_mr=10, n_test=20, labelled_mr=1, epochs=100, epoch_length=100, batch_size=12),
}


def arm_overrides(arm: str, size: ClaimSize, seed: int) -> dict[str, Any]:
    """Bundle overrides of one arm at one training seed (the data folder and paths are added by the caller).

    The arms differ only in the variant and the modalities; ``seed`` sets both the training seed and the split seed,
    so the few-shot draw (which MRI volume is labelled) changes with the seed and is the same in both arms."""
    from tools.lssc_compare import SETTINGS

    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    setting = SETTINGS["full" if arm == "method" else "baseline_mr"][2]  # the comparison tool's definition of the run
    common = {**size.overrides, "epochs": size.epochs, "epoch_length": size.epoch_length,
              "batch_size": size.batch_size, "val_fraction": VAL_FRACTION, "test_fraction": 0.0,
              "val_interval": size.epochs + 1,  # nothing is selected on validation: model.pt is the last epoch
              "seed": seed, "split_seed": seed, "few_shot": {"mr": size.labelled_mr}}
    if "torch_threads" not in size.overrides:
        common["torch_threads"] = 0  # cpu_reduced.json pins one thread; let OMP_NUM_THREADS decide
    return {**common, **setting}


def prepare_data(size: ClaimSize, data_dir: Path) -> tuple[Path, Path]:
    """Generate (once; cached by :func:`common.data.default.generate_dataset`) the training folder and the held-out
    MRI test folder of ``size`` under ``data_dir``; returns ``(train_root, test_root)``."""
    from common.data.default import generate_dataset

    train = generate_dataset("mmwhs", data_dir / "train", seed=TRAIN_DATA_SEED, progress=False, n_ct=size.n_ct,
                             n_mr=size.n_mr, **size.simulator)
    test = generate_dataset("mmwhs", data_dir / "test", seed=TEST_DATA_SEED, progress=False, n_ct=0,
                            n_mr=size.n_test, first_id=TEST_FIRST_ID, **size.simulator)
    return Path(train), Path(test)


def labelled_volumes(train_root: Path, size: ClaimSize, seed: int) -> list[str]:
    """Names of the MRI volumes both arms train on at ``seed`` (the bundle's few-shot draw, recomputed)."""
    from common.data.slices import unpaired_datalist

    entries = unpaired_datalist(train_root, ["mr"], "train", labelled={"mr": size.labelled_mr}, seed=seed,
                                fractions=[1.0 - VAL_FRACTION, VAL_FRACTION, 0.0])
    return [e["patient"] for e in entries]


def case_dice(metrics: Mapping[str, Any], source: str = "metrics.json") -> dict[str, float]:
    """Per MRI case of an evaluation's ``metrics.json`` payload: the mean Dice (%) over the structures.

    A structure absent from the reference (NaN) is left out of that case's mean; a case with no finite value, a
    non-MRI case or a repeated case name is an error naming ``source``."""
    rows = metrics.get("per_case")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: no 'per_case' rows (was it written by the lssc_multimodal evaluation?)")
    out: dict[str, float] = {}
    for row in rows:
        name, modality = str(row.get("case")), row.get("modality")
        if modality != "mr":
            raise ValueError(f"{source}: case {name} has modality {modality!r}; the claim scores MRI volumes only")
        if name in out:
            raise ValueError(f"{source}: case {name} appears twice")
        values = [float(v) for v in (row.get("dice") or []) if v is not None and math.isfinite(float(v))]
        if not values:
            raise ValueError(f"{source}: case {name} has no finite Dice value ({row.get('dice')})")
        out[name] = statistics.fmean(values)
    return out


def paired_case_values(per_seed: Sequence[Mapping[str, Mapping[str, float]]]
                       ) -> tuple[list[str], dict[str, list[float]], dict[str, list[float]]]:
    """Pair the arms over the test cases.

    ``per_seed[s][arm][case]`` is the score of ``arm`` on ``case`` at training seed ``s``. Returns the sorted cases,
    per arm the per-case mean over the seeds (in case order), and per arm the per-seed mean over the cases. Every
    run must have scored exactly the same cases (else a ``ValueError`` names the seed, arm and the difference)."""
    if not per_seed:
        raise ValueError("no training seed was run")
    cases = sorted(per_seed[0][ARMS[0]])
    for s, runs in enumerate(per_seed):
        for arm in ARMS:
            if arm not in runs:
                raise ValueError(f"seed {s}: no result for the {arm}")
            got = set(runs[arm])
            if got != set(cases):
                raise ValueError(f"seed {s}, {arm}: scored cases differ from the others (missing "
                                 f"{sorted(set(cases) - got)}, extra {sorted(got - set(cases))})")
    per_case = {arm: [statistics.fmean(runs[arm][c] for runs in per_seed) for c in cases] for arm in ARMS}
    per_seed_mean = {arm: [statistics.fmean(runs[arm][c] for c in cases) for runs in per_seed] for arm in ARMS}
    return cases, per_case, per_seed_mean


def _run_arm(arm: str, size: ClaimSize, seed: int, train_root: Path, test_root: Path, run_dir: Path,
             device: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Train one arm with the bundle's ``train.json`` and score it on the test folder with ``evaluate.json``.

    A finished run whose recorded overrides equal this one's is reused (an interrupted claim resumes)."""
    from tools.runs import run_workflow

    overrides = {**arm_overrides(arm, size, seed), "dataset_dir": str(train_root), "bundle_root": str(run_dir),
                 "output_dir": str(run_dir / "eval_train"), "device": f"$torch.device({device!r})"}
    evaluation = {**overrides, "dataset_dir": str(test_root), "eval_split": "all", "eval_metrics": ["dice"],
                  "validate#datalist": EVAL_MR_ONLY, "output_dir": str(run_dir / "eval_test")}
    record = run_dir / "claim_run.json"
    metrics_path = run_dir / "eval_test" / "metrics.json"
    files = [*size.config_files]
    wanted = {"config_files": files, "train": overrides, "evaluate": evaluation}
    timing: dict[str, Any] = {}
    if record.is_file() and metrics_path.is_file() and json.loads(record.read_text()).get("run") == wanted:
        timing = json.loads(record.read_text()).get("seconds", {})
        timing["reused"] = True
    else:
        record.unlink(missing_ok=True)
        t0 = time.perf_counter()
        run_workflow(CONFIGS, ["train.json", *files], "train", **overrides)
        t1 = time.perf_counter()
        run_workflow(CONFIGS, ["train.json", "evaluate.json", *files], "train", **evaluation)
        timing = {"train": t1 - t0, "evaluate": time.perf_counter() - t1}
        record.write_text(json.dumps({"run": wanted, "seconds": timing}, indent=1))
    return case_dice(json.loads(metrics_path.read_text()), str(metrics_path)), timing


def run(size: str, seeds: int, work_dir: Path, device: str) -> ClaimResult:
    """Train both arms at ``seeds`` training seeds on the ``size`` data and compare them on the held-out MRI."""
    cfg = size_config(CLAIM_SIZES, size)
    work_dir = Path(work_dir).resolve()
    t0 = time.perf_counter()
    train_root, test_root = prepare_data(cfg, work_dir / "data" / size)
    data_seconds = time.perf_counter() - t0
    per_seed: list[dict[str, dict[str, float]]] = []
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        scores = {}
        for arm in ARMS:
            run_dir = work_dir / "runs" / size / f"seed{seed}" / arm
            scores[arm], seconds = _run_arm(arm, cfg, seed, train_root, test_root, run_dir, device)
            runs.append({"seed": seed, "arm": arm, "run_dir": str(run_dir), "seconds": seconds,
                         "mean_dice": statistics.fmean(scores[arm].values())})
        per_seed.append(scores)
    cases, per_case, per_seed_mean = paired_case_values(per_seed)
    k = cfg.labelled_mr
    shots = f"{k} labelled MRI volume{'s' if k > 1 else ''}"
    comparison = Comparison(
        metric="MRI Dice", higher_is_better=True, cases=cases, method_values=per_case["method"],
        baseline_values=per_case["baseline"], unit="%", per_seed_method=per_seed_mean["method"],
        per_seed_baseline=per_seed_mean["baseline"],
        note=f"mean Dice of LVM, LAC, LVC, AA per held-out MRI volume (original geometry), mean over {seeds} "
             f"training seed(s); {shots} per seed (+ all CT for the method); {cfg.iterations} iterations per arm")
    details = {
        "bundle": "lssc_multimodal", "configs": ["train.json", *cfg.config_files],
        "size": asdict(cfg), "iterations": cfg.iterations,
        "arm_overrides_seed0": {arm: arm_overrides(arm, cfg, 0) for arm in ARMS},
        "train_data": {"root": str(train_root), "simulator_seed": TRAIN_DATA_SEED, "ct_volumes": cfg.n_ct,
                       "mr_volumes": cfg.n_mr, "case_ids": f"1001..{1000 + max(cfg.n_ct, cfg.n_mr)}",
                       "split": f"per modality {1 - VAL_FRACTION:.0%} train / {VAL_FRACTION:.0%} validation "
                                "(split_seed = training seed); validation is not used for selection"},
        "test_data": {"root": str(test_root), "simulator_seed": TEST_DATA_SEED, "mr_volumes": cfg.n_test,
                      "case_ids": f"{TEST_FIRST_ID}..{TEST_FIRST_ID + cfg.n_test - 1}",
                      "note": "MRI only, another simulator seed than the training folder; every case is scored"},
        "labelled_mr_per_seed": {str(s): labelled_volumes(train_root, cfg, s) for s in range(seeds)},
        "data_seconds": data_seconds, "runs": runs,
    }
    return ClaimResult(
        claim=CLAIM,
        statement=(f"LSSC (full: joint CT + MRI training with the consistency terms) segments held-out MRI volumes "
                   f"better than the single-modality Baseline trained on the same {shots} alone (few-shot, paper "
                   f"Table 4 direction)."),
        method=f"LSSC full ({k} MRI + CT)", baseline=f"Baseline ({k} MRI)",  # short: they label the plot's axis
        comparisons=[comparison], details=details)
