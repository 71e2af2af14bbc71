"""Missed structures in the BOTM evaluation (issue 17, point 7): counted next to mHD/HD95, and the optional penalised
HD (``missed_distance``), checked against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.engines.paired import EchoSegmentationReport
from common.metrics.echo_segmentation import echo_summary, frame_rows, missed_counts, summary_markdown

CLASSES = ["LV", "Myo", "LA"]
H, W = 40, 36
SPACING = (0.5, 1.0)  # mm per row, per column
DIAGONAL_MM = math.sqrt((H * 0.5) ** 2 + (W * 1.0) ** 2)  # sqrt(20^2 + 36^2) = 41.18 mm


def box_map(lv=True, myo=True, la=True):
    m = np.zeros((H, W), dtype=np.int64)
    if myo:
        m[4:26, 6:30] = 2
    if lv:
        m[8:24, 10:26] = 1
    if la:
        m[28:36, 12:24] = 3
    return m


def ed_es_case():
    """ED: the prediction misses LA (LV and Myo perfect); ES: a perfect prediction."""
    ref = np.stack([box_map(), box_map()])
    pred = np.stack([box_map(la=False), box_map()])
    return pred, ref


@pytest.mark.parametrize("policy, la_hd, m_hd", [
    # exclude: LA's ED HD is infinite and left out, so every class mean is 0 and mHD = 0 despite the miss
    ("exclude", math.inf, 0.0),
    # diagonal: LA = (41.18 + 0) / 2 over ED and ES; mHD = mean(LV 0, Myo 0, LA 20.59)
    ("diagonal", DIAGONAL_MM, DIAGONAL_MM / 2 / 3),
    # a fixed distance of 30 mm: LA = 15, mHD = 5
    (30.0, 30.0, 5.0),
])
def test_missed_structure_is_counted_and_penalised_by_policy(policy, la_hd, m_hd):
    pred, ref = ed_es_case()
    rows = frame_rows(pred, ref, CLASSES, spacing=SPACING, metrics=["dice", "hd", "hd95"], phases=["ED", "ES"],
                      info={"case": "c", "patient": "p", "view": "4CH"}, missed_distance=policy)
    assert rows[0]["hd_LA"] == la_hd and rows[0]["hd95_LA"] == la_hd
    assert rows[0]["hd_LV"] == 0.0 and rows[1]["hd_LA"] == 0.0
    assert [rows[0][f"missed_{c}"] for c in CLASSES] == [0.0, 0.0, 1.0] and rows[0]["missed_mean"] == 1 / 3
    assert rows[1]["missed_mean"] == 0.0
    s = echo_summary(rows, CLASSES, missed_distance=policy)
    assert s["paper"]["all_frames"]["mHD"] == pytest.approx(m_hd)
    assert s["paper"]["all_frames"]["mHD95"] == pytest.approx(m_hd)
    # the count sits next to mHD whatever the policy, overall and by phase
    assert s["paper"]["all_frames"]["n_missed"] == 1
    assert s["paper"]["by_phase"]["ED"]["n_missed"] == 1 and s["paper"]["by_phase"]["ES"]["n_missed"] == 0
    assert s["paper"]["by_view"]["4CH"]["n_missed"] == 1 and s["paper"]["per_class"]["LA"]["missed"] == 1
    assert s["missed"]["all_frames"] == {"LV": 0, "Myo": 0, "LA": 1, "total": 1, "frames": 1, "present": 6}
    md = summary_markdown(s)
    assert "| LA missed |" in md and "n_missed" in md and "1 of 6 in 1 frames" in md
    assert f"missed_distance={policy!r}" in md or f"missed_distance={policy}" in md


def test_the_policy_changes_mhd_only_when_something_is_missed():
    pred, ref = ed_es_case()
    by_policy = {p: echo_summary(frame_rows(pred, ref, CLASSES, spacing=SPACING, metrics=["hd"],
                                            missed_distance=p), CLASSES)["paper"]["all_frames"]["mHD"]
                 for p in ("exclude", "diagonal")}
    assert by_policy["diagonal"] > by_policy["exclude"] + 6.0
    perfect = {p: frame_rows(ref, ref, CLASSES, spacing=SPACING, metrics=["hd"], missed_distance=p)[0]["hd_mean"]
               for p in ("exclude", "diagonal")}
    assert perfect == {"exclude": 0.0, "diagonal": 0.0}
    # the diagonal is in pixels without a spacing: sqrt(40^2 + 36^2)
    px = frame_rows(pred[:1], ref[:1], CLASSES, metrics=["hd"], missed_distance="diagonal")[0]
    assert px["hd_LA"] == pytest.approx(math.sqrt(40**2 + 36**2))


def test_only_reference_structures_can_be_missed():
    ref = np.stack([box_map(la=False), box_map()])
    pred = np.stack([box_map(), box_map(lv=False, la=False)])  # frame 0: extra LA; frame 1: LV and LA missed
    rows = frame_rows(pred, ref, CLASSES, metrics=["hd"])
    assert math.isnan(rows[0]["missed_LA"]) and rows[0]["missed_mean"] == 0.0  # a false positive is no miss
    assert rows[1]["missed_LV"] == 1.0 and rows[1]["missed_Myo"] == 0.0 and rows[1]["missed_LA"] == 1.0
    assert missed_counts(rows, CLASSES) == {"LV": 1, "Myo": 0, "LA": 1, "total": 2, "frames": 1, "present": 5}


@pytest.mark.parametrize("bad", ["max", -1.0, math.inf])
def test_bad_missed_distance_is_named(bad):
    with pytest.raises(ValueError, match="missed_distance"):
        frame_rows(box_map()[None], box_map()[None], CLASSES, missed_distance=bad)
    with pytest.raises(ValueError, match="missed_distance"):
        EchoSegmentationReport("unused", CLASSES, missed_distance=bad)


def test_report_handler_writes_the_count_and_the_penalised_hd(tmp_path):
    pred, ref = ed_es_case()
    report = EchoSegmentationReport(str(tmp_path), CLASSES, num_overlays=0, missed_distance="diagonal")
    report.add_case({"pred": pred, "label": ref, "image": ref.astype(np.float32), "case": "c", "patient": "p",
                     "view": "4CH", "phases": "ED,ES", "frame_info": json.dumps({"spacing": list(SPACING)})})
    s = report.finalize()
    assert s["paper"]["all_frames"]["mHD"] == pytest.approx(DIAGONAL_MM / 6)
    assert s["paper"]["all_frames"]["n_missed"] == 1 and s["missed_distance"] == "diagonal"
    assert "missed_distance='diagonal'" in (tmp_path / "report.md").read_text()
    header = (tmp_path / "per_frame.csv").read_text().splitlines()[0].split(",")
    assert {"missed_LV", "missed_LA", "missed_mean"} <= set(header)
