"""Tests of common/metrics/echo_segmentation.py against hand-computed (numpy) references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics.echo_segmentation import (
    FrameDiceMetric,
    consecutive_dice,
    echo_summary,
    frame_rows,
    patient_rows,
    summarise_rows,
    summary_markdown,
    temporal_consistency,
    write_rows_csv,
)

CLASSES = ["LV", "Myo", "LA"]


def box_map(h=40, w=36, shift=0, lv=True, myo=True, la=True):
    m = np.zeros((h, w), dtype=np.int64)
    if myo:
        m[4 + shift : 26 + shift, 6:30] = 2
    if lv:
        m[8 + shift : 24 + shift, 10:26] = 1
    if la:
        m[28:36, 12:24] = 3
    return m


def dice_np(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_frame_rows_dice_iou_specificity_mae_match_numpy():
    y = np.stack([box_map(), box_map(shift=1)])
    p = np.stack([box_map(shift=2), box_map(shift=1)])
    rows = frame_rows(p, y, CLASSES, spacing=(0.5, 0.25), frames=[3, 9], phases=["ED", "ES"],
                      info={"case": "c1", "patient": "p1", "view": "2CH"})
    assert [r["frame"] for r in rows] == [3, 9] and [r["phase"] for r in rows] == ["ED", "ES"]
    assert rows[0]["case"] == "c1" and rows[0]["patient"] == "p1"
    for k, r in enumerate(rows):
        for c, name in enumerate(CLASSES, start=1):
            a, b = p[k] == c, y[k] == c
            assert r[f"dice_{name}"] == pytest.approx(dice_np(a, b))
            assert r[f"iou_{name}"] == pytest.approx(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
            tn = np.logical_and(~a, ~b).sum()
            assert r[f"specificity_{name}"] == pytest.approx(tn / (tn + np.logical_and(a, ~b).sum()))
            assert r[f"mae_{name}"] == pytest.approx(np.abs(a.astype(float) - b).mean())
        assert r["dice_mean"] == pytest.approx(np.mean([r[f"dice_{n}"] for n in CLASSES]))
    # frame 1 is a perfect prediction
    assert rows[1]["dice_mean"] == 1.0 and rows[1]["hd_mean"] == 0.0


def test_hausdorff_is_in_mm_and_infinite_for_a_missed_structure():
    y = box_map()[None]
    p = box_map(shift=2)[None]  # LV and Myo moved 2 rows down
    rows_mm = frame_rows(p, y, CLASSES, spacing=(0.5, 1.0), metrics=["hd", "hd95"])
    rows_px = frame_rows(p, y, CLASSES, spacing=None, metrics=["hd"])
    assert rows_px[0]["hd_LV"] == pytest.approx(2.0)
    assert rows_mm[0]["hd_LV"] == pytest.approx(1.0)  # 2 rows x 0.5 mm
    assert rows_mm[0]["hd_LA"] == 0.0
    missed = frame_rows(box_map(la=False)[None], y, CLASSES, metrics=["dice", "hd", "hd95"])[0]
    assert missed["dice_LA"] == 0.0
    assert math.isinf(missed["hd_LA"]) and math.isinf(missed["hd95_LA"]) and math.isinf(missed["hd95_mean"])
    # a class absent from the reference is undefined, not a failure
    absent = frame_rows(box_map(la=False)[None], box_map(la=False)[None], CLASSES, metrics=["dice", "hd"])[0]
    assert math.isnan(absent["dice_LA"]) and math.isnan(absent["hd_LA"])
    assert absent["dice_mean"] == 1.0


def test_temporal_consistency_against_hand_computed_consecutive_dice():
    y = np.stack([box_map(shift=s) for s in (0, 1, 2, 3)])
    p = np.stack([box_map(shift=s) for s in (0, 3, 0, 3)])  # a flickering prediction
    dp = consecutive_dice(p, 4)
    assert dp.shape == (3, 3)
    assert dp[0, 0] == pytest.approx(dice_np(p[0] == 1, p[1] == 1))
    assert dp[0, 2] == 1.0  # LA does not move
    tc = temporal_consistency(p, y, CLASSES)
    dt = consecutive_dice(y, 4)
    assert tc["pred_consecutive_dice"]["LV"] == pytest.approx(dp[:, 0].mean())
    assert tc["true_consecutive_dice"]["Myo"] == pytest.approx(dt[:, 1].mean())
    assert tc["abs_difference"]["LV"] == pytest.approx(np.abs(dp[:, 0] - dt[:, 0]).mean())
    assert tc["abs_difference"]["LV"] > 0.05 and tc["n_transitions"] == 3
    same = temporal_consistency(y, y, CLASSES)
    assert same["abs_difference"]["mean"] == 0.0
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_consistency(y[:1], y[:1], CLASSES)


def test_summaries_by_phase_view_patient_and_infinite_counts():
    y = box_map()
    rows = []
    rows += frame_rows(np.stack([y, y]), np.stack([y, y]), CLASSES, phases=["ED", "ES"],
                       info={"case": "a", "patient": "p1", "view": "2CH"})
    bad = box_map(la=False)
    rows += frame_rows(np.stack([bad, y]), np.stack([y, y]), CLASSES, phases=["ED", "ES"],
                       info={"case": "b", "patient": "p2", "view": "4CH"})
    s = summarise_rows(rows, CLASSES)
    assert s["dice"]["LA"]["mean"] == pytest.approx(0.75) and s["dice"]["LA"]["n"] == 4
    assert s["hd"]["LA"]["n_inf"] == 1 and s["hd"]["LA"]["n"] == 3
    assert s["dice"]["mean"]["mean"] == pytest.approx(np.mean([1.0, 1.0, 0.75]))
    pr = patient_rows(rows, CLASSES)
    assert [r["patient"] for r in pr] == ["p1", "p2"] and pr[1]["n_frames"] == 2
    assert pr[1]["dice_LA"] == pytest.approx(0.5) and math.isinf(pr[1]["hd_LA"])
    full = echo_summary(rows, CLASSES, temporal=[temporal_consistency(np.stack([y, y, y]), np.stack([y, y, y]),
                                                                      CLASSES)])
    assert full["n_frames"] == 4 and full["n_cases"] == 2 and full["n_patients"] == 2
    assert full["by_phase"]["ED"]["dice"]["LA"]["mean"] == pytest.approx(0.5)
    assert full["by_phase"]["ES"]["dice"]["mean"]["mean"] == 1.0
    assert full["by_view"]["2CH"]["dice"]["mean"]["mean"] == 1.0
    assert full["paper"]["by_phase"]["ED"]["mDice"] == pytest.approx(np.mean([1.0, 1.0, 0.5]))
    assert full["temporal_consistency"]["abs_difference"]["mean"] == 0.0
    md = summary_markdown(full)
    assert "| phase ED |" in md and "Temporal consistency" in md
    with pytest.raises(ValueError, match="no evaluated frames"):
        echo_summary([], CLASSES)


def test_write_rows_csv_roundtrip(tmp_path):
    rows = frame_rows(box_map()[None], box_map()[None], CLASSES, info={"case": "a", "patient": "p", "view": "2CH"})
    path = write_rows_csv(rows, tmp_path / "t.csv")
    header, line = path.read_text().splitlines()
    assert header.startswith("case,patient,view,frame,phase,dice_LV")
    assert line.startswith("a,p,2CH,0,,1,")


def test_frame_dice_metric_per_case_and_aggregate():
    y = np.stack([box_map(), box_map(shift=1)])
    p = np.stack([box_map(shift=2), box_map(la=False)])
    metric = FrameDiceMetric(num_classes=4)
    metric([torch.as_tensor(p)], [torch.as_tensor(y)])
    metric(torch.as_tensor(y)[None], torch.as_tensor(y)[None])
    rows = metric.get_buffer()
    assert rows.shape == (2, 3)
    expected_lv = np.mean([dice_np(p[k] == 1, y[k] == 1) for k in range(2)])
    assert rows[0, 0].item() == pytest.approx(expected_lv)
    assert rows[0, 2].item() == pytest.approx(0.5)  # LA: perfect in frame 0, missed in frame 1
    assert torch.all(rows[1] == 1.0)
    assert metric.aggregate().item() == pytest.approx(rows.mean().item())
    with pytest.raises(ValueError, match="must be equal"):
        FrameDiceMetric(4)(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 8, 8))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differs from label shape"):
        frame_rows(np.zeros((2, 8, 8)), np.zeros((1, 8, 8)), CLASSES)
    with pytest.raises(ValueError, match="unknown metrics"):
        frame_rows(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), CLASSES, metrics=["dsc"])
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        frame_rows(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)), CLASSES)
