"""tools.adacs_compare: Table 1 means and the paired t-tests of Table 2, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.adacs_compare import compare_tables, markdown_tables


def _rows(dice, hd, asd):
    return {f"p{i}": {"dice": d, "hd": h, "asd": a, "nonpositive_jacobian_percent": 0.1 * i}
            for i, (d, h, a) in enumerate(zip(dice, hd, asd))}


def test_tables_and_paired_t_test_against_hand_computation():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, 12)
    ours = base + rng.normal(0.02, 0.01, 12)
    hd_b, hd_o = rng.uniform(4, 6, 12), rng.uniform(3.5, 5.5, 12)
    per_pair = {"ACDC:x": {"voxelmorph": {
        "adacs": _rows(ours, hd_o, hd_o / 4),
        "plain": _rows(base, hd_b, hd_b / 4),
        "adareg": {k: v for k, v in _rows(base - 0.01, hd_b, hd_b / 4).items() if k != "p3"},  # one pair missing
    }}}
    res = compare_tables(per_pair)
    t1 = res["table1"]["ACDC:x"]["voxelmorph"]
    assert t1["adacs"]["DSC"] == pytest.approx(100 * ours.mean()) and t1["plain"]["HD"] == pytest.approx(hd_b.mean())
    assert t1["adacs"]["folding"] == pytest.approx(np.mean(0.1 * np.arange(12))) and t1["adareg"]["n"] == 11
    d = 100 * (ours - base)
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    test = res["table2"]["ACDC:x"]["voxelmorph"]["plain"]["DSC"]
    assert test["t"] == pytest.approx(t_hand, rel=1e-9) and test["n"] == 12 and test["p"] < 1e-3
    assert test["mean_difference"] == pytest.approx(d.mean())
    assert res["table2"]["ACDC:x"]["voxelmorph"]["adareg"]["DSC"]["n"] == 11  # joined by pair name
    assert "adacs" not in res["table2"]["ACDC:x"]["voxelmorph"]
    md = markdown_tables(res)
    assert "| CNN | Voxelmorph |" in md and "|  | AdaCS (Ours) |" in md and "|  | AdaReg |" in md
    assert f"{100 * ours.mean():.2f}" in md and "Table 2" in md


def test_identical_methods_give_no_test():
    rows = _rows([0.7, 0.8, 0.75], [4, 5, 6], [1, 1, 1])
    res = compare_tables({"D": {"voxelmorph": {"adacs": rows, "plain": rows}}})
    assert res["table2"]["D"]["voxelmorph"]["plain"]["DSC"]["p"] is None
    assert "–" in markdown_tables(res)
