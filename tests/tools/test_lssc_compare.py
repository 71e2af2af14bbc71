"""tools.lssc_compare: the report from per-setting evaluations, and clear errors on bad arguments (the training
runs themselves are the bundle's, tested in tests/bundles/lssc_multimodal)."""

from __future__ import annotations

import json

import pytest

from tools.lssc_compare import (
    PAPER_TABLES,
    SETTING_GROUPS,
    SETTINGS,
    comparison_markdown,
    paper_table_markdown,
    plot_comparison,
    run_comparison,
)

STRUCTURES = ["LVM", "LAC", "LVC", "AA"]


def _table2(dice: dict[str, float], asd: dict[str, float]) -> dict:
    def entry(v):
        return {**{s: {"mean": v + i, "std": 0.5, "n": 2} for i, s in enumerate(STRUCTURES)}, "mean": v,
                "n_cases": 2}

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
    row = "| full_mr1 | LSSC (full) | all CT + 1 MRI | 81.2 | 70.5 | 1.50 | 2.25 | 70.5 | 71.5 | 72.5 | 73.5 | 12 |"
    assert row in md
    assert "| baseline_mr | Baseline | all MRI | – | 66.0 | – | 3.00 |" in md


def test_plot_is_written(tmp_path):
    png = plot_comparison(ROWS, tmp_path / "cmp.png")
    assert png.stat().st_size > 10_000


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"unknown settings \['fewshot'\]; choose from .* or the groups"):
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
        assert {k.split("#")[0] for k in keys} <= set(train), (method, data)  # nested ones under a known id


def _fake_row(name: str) -> dict:
    """A run's row as :func:`run_comparison` builds it, with scores that identify the setting and modality."""
    k = list(SETTINGS).index(name)
    mods = SETTINGS[name][2].get("modalities", ["ct", "mr"])
    dice = {m: 50.0 + k + (0.25 if m == "mr" else 0.0) for m in mods}
    asd = {m: 1.0 + k / 10 for m in mods}
    method, data, _ = SETTINGS[name]
    return {"setting": name, "method": method, "data": data, "train_seconds": 1.0, "table2": _table2(dice, asd)}


def test_every_row_of_the_papers_tables_2_and_4_is_produced_from_its_runs():
    rows = [_fake_row(n) for n in SETTING_GROUPS["all"]]
    assert set(SETTING_GROUPS["all"]) == set(SETTINGS) - {"baseline_mr1"}  # every run a paper row needs
    for table, n_rows in (("table2", 8), ("table4", 6)):
        md = paper_table_markdown(rows, STRUCTURES, table)
        body = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| Methods", "| **"))]
        assert [ln.split(" | ")[0][2:] for ln in body] == [r for r, _ in PAPER_TABLES[table]] * 2  # Dice, then ASD
        assert len(body) == 2 * n_rows
    t2 = paper_table_markdown(rows, STRUCTURES, "table2")
    # Backbone combines the CT run (CT columns) and the MRI run (MRI columns); overall = mean of the two means
    k_ct, k_mr = list(SETTINGS).index("backbone_ct"), list(SETTINGS).index("backbone_mr")
    ct, mr = 50.0 + k_ct, 50.25 + k_mr
    assert (f"| Backbone | {ct:.1f}±0.5 | {ct + 1:.1f}±0.5 | {ct + 2:.1f}±0.5 | {ct + 3:.1f}±0.5 | {ct:.1f} | "
            f"{mr:.1f}±0.5 | {mr + 1:.1f}±0.5 | {mr + 2:.1f}±0.5 | {mr + 3:.1f}±0.5 | {mr:.1f} | "
            f"{(ct + mr) / 2:.1f} | backbone_ct, backbone_mr |") in t2
    k = list(SETTINGS).index("joint_v2_cr")
    assert f"| Joint V2+CR | {50 + k:.1f}±0.5 |" in t2 and t2.rstrip().endswith("| full |")
    t4 = paper_table_markdown(rows, STRUCTURES, "table4")
    k = list(SETTINGS).index("full_ct3")
    assert f"| Three annotated CT | {50 + k:.1f}±0.5 |" in t4 and f"{1 + k / 10:.2f}±0.50" in t4
    # a paper row whose runs are missing is left out; a half-run row shows "–" for the missing modality
    part = paper_table_markdown([_fake_row("backbone_ct"), _fake_row("full")], STRUCTURES, "table2")
    assert "| Joint V1 |" not in part and "| Backbone |" in part and "| – | – | – | – | – | – | backbone_ct |" in part
    with pytest.raises(ValueError, match="unknown paper table"):
        paper_table_markdown(rows, STRUCTURES, "table9")


def test_groups_expand_to_every_run_of_the_paper_tables(tmp_path):
    from tools.lssc_compare import _split

    assert _split("table4") == ["baseline_ct", "baseline_mr", "full", "full_mr1", "full_mr3", "full_ct1", "full_ct3"]
    assert _split("full,table2")[:2] == ["full", "backbone_ct"] and _split("full,table2").count("full") == 1
    assert len(_split("all")) == 16
    assert _split("table5") == ["joint_v3", "joint_v3_mcr", "joint_v3_icr", "full"]
    assert _split("table3") == _split("table2")


@pytest.mark.slow
def test_tiny_runs_produce_the_paper_rows(tmp_path, monkeypatch):
    """Real training + evaluation at toy size: the single-modality pair (Backbone row), a joint + CR variant and the
    CT few-shot setting each produce their Table 2 / Table 4 row from the bundle's metrics."""
    from common.data.synthetic.mmwhs import write_mmwhs

    data = tmp_path / "mmwhs"
    shape, spacing = (40, 40, 28), (3.6, 3.6, 4.4)
    write_mmwhs(data, n_ct=5, n_mr=5, seed=3, ct_shape=shape, ct_spacing=spacing, mr_shape=shape,
                mr_spacing=spacing, progress=False)
    tiny = {"spatial_size": 32, "pixdim": [4.8, 4.8, 4.8], "embed_dim": 8, "num_heads": [1, 1, 1, 1],
            "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 2, "batch_size": 2, "epochs": 1,
            "epoch_length": 1, "val_interval": 100, "augment_prob": 0.0, "torch_threads": 1, "infer_batch_size": 32}
    out = tmp_path / "cmp"
    result = run_comparison("backbone_ct,backbone_mr,joint_v1_cr,full_ct1", output_dir=str(out),
                            dataset_dir=str(data), overrides=tiny, device="cpu")
    assert [r["setting"] for r in result["rows"]] == ["backbone_ct", "backbone_mr", "joint_v1_cr", "full_ct1"]
    md = (out / "comparison.md").read_text()
    assert "Table 2 layout" in md and "Table 4 layout" in md
    for row in ("| Backbone |", "| Joint V1+CR |", "| One annotated CT |"):
        assert sum(ln.startswith(row) for ln in md.splitlines()) == 2, row  # its Dice and its ASD line
    backbone = next(ln for ln in md.splitlines() if ln.startswith("| Backbone |"))
    assert "–" not in backbone.split(" | ")[1:11]  # CT and MRI columns both filled, from the two runs
    assert result["rows"][3]["table2"]["dice"]["ct"]["n_cases"] >= 1


ABDOMEN = ["liver", "right_kidney", "left_kidney", "spleen"]  # the bundle's class order (common.data.abdomen)


def test_abdominal_tables_3_and_5_in_the_papers_column_order():
    """Table 3 has Table 2's rows, Table 5 the consistency ablation; columns follow the paper (Liver, Spleen, R-kdy,
    L-kdy), each cell the score of that structure whatever its position in the bundle's class order."""
    from tools.lssc_compare import TASKS

    def row(name: str) -> dict:
        k = list(SETTINGS).index(name)
        # per structure a distinct Dice: 10 * (class id) + k, so a column shows which structure it took
        entry = {**{s: {"mean": 10.0 * (i + 1) + k, "std": 0.5} for i, s in enumerate(ABDOMEN)}, "mean": 50.0 + k}
        return {"setting": name, "method": SETTINGS[name][0], "data": SETTINGS[name][1], "train_seconds": 1.0,
                "table2": {"dice": {"ct": entry, "mr": entry}, "asd": {"ct": entry, "mr": entry}}}

    rows = [row(n) for n in SETTING_GROUPS["table5"]]
    labels = TASKS["abdomen"]["columns"]
    t5 = paper_table_markdown(rows, list(labels), "table5", labels)
    assert "Table 5 layout" in t5
    assert "| Methods | CT Liver | CT Spleen | CT R-kdy | CT L-kdy | CT Mean | MRI Liver |" in t5
    body = [ln for ln in t5.splitlines() if ln.startswith("| ") and not ln.startswith(("| Methods", "| **"))]
    assert [ln.split(" | ")[0][2:] for ln in body] == ["Joint V3", "Joint V3 + Lmcr", "Joint V3 + Licr",
                                                       "Joint V3 + Lmcr + Licr"] * 2
    k = list(SETTINGS).index("joint_v3_icr")
    # liver (id 1), spleen (id 4), right kidney (id 2), left kidney (id 3)
    assert f"| Joint V3 + Licr | {10 + k:.1f}±0.5 | {40 + k:.1f}±0.5 | {20 + k:.1f}±0.5 | {30 + k:.1f}±0.5 |" in t5
    t3 = paper_table_markdown([row("backbone_ct"), row("full")], list(labels), "table3", labels)
    assert "Table 3 layout" in t3 and "| Ours |" in t3 and "| Backbone |" in t3
    with pytest.raises(ValueError, match="unknown task 'liver'"):
        run_comparison("full", task="liver")


@pytest.mark.slow
def test_tiny_abdominal_run_produces_its_table5_row(tmp_path):
    """Real training + evaluation at toy size on BTCV + CHAOS layouts (the bundle's abdomen.json): a one-term row of
    Table 5 (Joint V3 + L_mcr: a nested loss switch on top of a variant) produces its row from the bundle's
    metrics, with the abdominal columns."""
    from common.data.synthetic.abdomen import write_abdomen

    data = tmp_path / "abdomen"
    write_abdomen(data, n_ct=3, n_mr=3, seed=5, ct_shape=(32, 32, 12), ct_spacing=(12.0, 12.0, 20.0),
                  mr_shape=(32, 32, 10), mr_spacing=(12.0, 12.0, 24.0), progress=False)
    tiny = {"spatial_size": 32, "pixdim": [12.0, 12.0, 24.0], "embed_dim": 8, "num_heads": [1, 1, 1, 1],
            "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 2, "batch_size": 2, "epochs": 1,
            "epoch_length": 1, "val_interval": 100, "augment_prob": 0.0, "torch_threads": 1, "infer_batch_size": 32,
            "val_fraction": 0.0, "test_fraction": 0.34}
    out = tmp_path / "cmp"
    result = run_comparison("joint_v3_mcr", output_dir=str(out), dataset_dir=str(data),
                            overrides=tiny, device="cpu", task="abdomen")
    assert result["task"] == "abdomen" and result["structures"] == ABDOMEN
    md = (out / "comparison.md").read_text()
    assert "Table 5 layout" in md and "Table 2 layout" not in md and "| Methods | CT Liver | CT Spleen |" in md
    assert sum(ln.startswith("| Joint V3 + Lmcr |") for ln in md.splitlines()) == 2  # its Dice and ASD lines
    assert "| Joint V3 + Licr |" not in md  # a row whose run was not asked for is left out
    for r in result["rows"]:
        assert r["table2"]["dice"]["ct"]["n_cases"] == 1 and r["table2"]["dice"]["mr"]["n_cases"] == 1
