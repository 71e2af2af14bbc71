"""tools.lssc_compare: the report from per-setting evaluations, and clear errors on bad arguments (the training
runs themselves are the bundle's, tested in tests/bundles/lssc_multimodal)."""

from __future__ import annotations

import json

import pytest

from tools.lssc_compare import SETTINGS, comparison_markdown, plot_comparison, run_comparison

STRUCTURES = ["LVM", "LAC", "LVC", "AA"]


def _table2(dice: dict[str, float], asd: dict[str, float]) -> dict:
    def entry(v):
        return {**{s: {"mean": v, "std": 0.0, "n": 2} for s in STRUCTURES}, "mean": v, "n_cases": 2}

    return {"dice": {m: entry(v) for m, v in dice.items()}, "asd": {m: entry(v) for m, v in asd.items()}}


ROWS = [
    {"setting": "full_mr1", "method": "LSSC (full)", "data": "all CT + 1 MRI", "train_seconds": 12.0,
     "table2": _table2({"ct": 81.25, "mr": 70.5}, {"ct": 1.5, "mr": 2.25})},
    {"setting": "baseline_mr", "method": "Baseline", "data": "all MRI", "train_seconds": 7.0,
     "table2": _table2({"mr": 66.0}, {"mr": 3.0})},
]


def test_markdown_rows_hold_each_settings_scores_and_mark_untrained_modalities():
    md = comparison_markdown(ROWS, STRUCTURES)
    lines = md.splitlines()
    assert lines[2].startswith("| Setting | Method | Labelled training data | CT Dice | MRI Dice | CT ASD | MRI ASD")
    row = "| full_mr1 | LSSC (full) | all CT + 1 MRI | 81.2 | 70.5 | 1.50 | 2.25 | 70.5 | 70.5 | 70.5 | 70.5 | 12 |"
    assert row in md
    assert "| baseline_mr | Baseline | all MRI | – | 66.0 | – | 3.00 |" in md


def test_plot_is_written(tmp_path):
    png = plot_comparison(ROWS, tmp_path / "cmp.png")
    assert png.stat().st_size > 10_000


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"unknown settings \['fewshot'\]; choose from"):
        run_comparison("full,fewshot", output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset_dir '/no/such/MM-WHS'"):
        run_comparison("full", output_dir=str(tmp_path), dataset_dir="/no/such/MM-WHS")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        run_comparison("full", output_dir=str(tmp_path), overrides=str(bad))


def test_settings_are_bundle_overrides_the_config_knows(repo_root):
    train = json.loads((repo_root / "bundles/lssc_multimodal/configs/train.json").read_text())
    for method, data, keys in SETTINGS.values():
        assert set(keys) <= set(train), (method, data)
