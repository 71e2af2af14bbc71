"""The claim report of ``tools.reproduce``: paired p-values against exact hand values, ``holds`` logic, strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from tools.reproduce.result import ClaimResult, Comparison, Criterion, paired_p_value, write_claim_report


def test_p_value_matches_exact_signed_rank_distribution():
    # 5 pairs, all differences favour the method: only 1 of the 2**5 sign patterns is as extreme -> p = 1/32
    assert paired_p_value([2, 3, 4, 5, 6], [1, 1, 1, 1, 1], higher_is_better=True) == pytest.approx(1 / 32)
    # lower is better and the method is higher everywhere: every sign pattern is at least as extreme -> p = 1
    assert paired_p_value([2, 3, 4, 5, 6], [1, 1, 1, 1, 1], higher_is_better=False) == pytest.approx(1.0)
    # differences +1 +2 +3 -4 +5: W+ = 11; the exact p is the share of the 32 sign patterns with W+ >= 11,
    # enumerated here directly (no scipy)
    diffs = [1, 2, 3, -4, 5]
    w_plus = sum(r for r, d in zip(range(1, 6), diffs) if d > 0)
    extreme = sum(1 for mask in range(32) if sum(r for r in range(1, 6) if mask >> (r - 1) & 1) >= w_plus)
    assert paired_p_value([d + 10 for d in diffs], [10] * 5, higher_is_better=True) == pytest.approx(extreme / 32)


def test_p_value_edge_cases():
    assert paired_p_value([1, 2], [1, 2], higher_is_better=True) == 1.0
    assert math.isnan(paired_p_value([1.0], [0.0], higher_is_better=True))
    with pytest.raises(ValueError, match="length"):
        paired_p_value([1, 2], [1], higher_is_better=True)
    with pytest.raises(ValueError, match="NaN"):
        paired_p_value([1, float("nan")], [1, 2], higher_is_better=True)


def _result(method_values, baseline_values, criteria=()):
    cases = [f"case{i}" for i in range(len(method_values))]
    return ClaimResult(claim="toy", statement="the method is better", method="m", baseline="b",
                       comparisons=[Comparison("dice", True, cases, method_values, baseline_values, unit="%")],
                       criteria=list(criteria))


def test_holds_needs_direction_significance_and_criteria(tmp_path):
    better = _result([80, 82, 85, 90, 91, 88], [70, 71, 72, 75, 74, 73]).to_json("quick", 1, "cmd", 1.0)
    assert better["holds"] and better["p_value"] == pytest.approx(1 / 64)
    worse = _result([70, 71, 72, 75, 74, 73], [80, 82, 85, 90, 91, 88]).to_json("quick", 1, "cmd", 1.0)
    assert not worse["holds"]
    too_few = _result([80, 82], [70, 71]).to_json("quick", 1, "cmd", 1.0)  # right direction, p = 1/4: not shown
    assert not too_few["holds"]
    failed_criterion = _result([80, 82, 85, 90, 91, 88], [70, 71, 72, 75, 74, 73],
                               [Criterion("gls mad", 2.0, 1.5, "<=")]).to_json("quick", 1, "cmd", 1.0)
    assert not failed_criterion["holds"] and not failed_criterion["criteria"][0]["holds"]
    with pytest.raises(ValueError, match="comparison"):
        Criterion("x", 1.0, 1.0, "=")


def test_report_files_are_strict_json_markdown_and_png(tmp_path):
    payload = _result([1.0], [0.0]).to_json("smoke", 1, "python -m tools.reproduce toy --smoke", 0.5)
    paths = write_claim_report(payload, tmp_path)
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    for key in ("claim", "metric", "method", "baseline", "method_values", "baseline_values", "n", "p_value", "holds",
                "test"):
        assert key in data
    assert data["p_value"] is None and data["holds"] is False
    assert "does NOT hold" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_from_seeds_averages_each_case_over_seeds_and_keeps_every_case():
    method = [{"b": 2.0, "a": 1.0}, {"a": 3.0, "b": 4.0}]
    baseline = [{"a": 0.0, "b": 1.0}, {"a": 2.0, "b": 1.0}]
    c = Comparison.from_seeds("dice", True, method, baseline, unit="%", method_label="m*")
    assert c.cases == ["a", "b"]
    assert c.method_values == [2.0, 3.0] and c.baseline_values == [1.0, 1.0]
    assert c.per_seed_method == [1.5, 3.5] and c.per_seed_baseline == [0.5, 1.5]
    assert (c.unit, c.method_label, c.baseline_label) == ("%", "m*", "")
    with pytest.raises(ValueError, match=r"run 3 scored other cases than run 0 \(differing: \['b'\]\)"):
        Comparison.from_seeds("dice", True, method, [{"a": 0.0, "b": 1.0}, {"a": 2.0}])
    with pytest.raises(ValueError, match="same number"):
        Comparison.from_seeds("dice", True, method, baseline[:1])
