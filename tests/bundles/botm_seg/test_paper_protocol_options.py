"""Issue 17, BOTM points 8 and 10: the robustness percentage read as a probability (next to our strength mapping),
the report saying which reading was used, and frame dropout that keeps (t, t+1) adjacency; plus the config knobs
(`severity_mode`, `severity_strength`, `frame_dropout_mode`, `missed_distance`) reaching the objects they set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from common.engines.paired import EchoCorruptiond, EchoSegmentationReport, echo_datalist, run_robustness

from .conftest import CONFIGS

CLASSES = ["LV", "Myo", "LA"]


def stack(seed: int, t: int = 2, size: int = 24) -> torch.Tensor:
    return torch.rand(t, size, size, generator=torch.Generator().manual_seed(seed))


def hand_blur(x: torch.Tensor, level: float) -> np.ndarray:
    """Our blur mapping written out: sigma = level x 2 % of min(H, W) pixels, per frame, replicated borders."""
    sigma = level * 0.02 * min(x.shape[-2:])
    return np.stack([ndimage.gaussian_filter(f.numpy().astype(np.float64), sigma, mode="nearest", truncate=3.0)
                     for f in x])


# ------------------------------------------------------------------------------------------- point 8: severity mode
def test_probability_mode_corrupts_that_fraction_of_frames_at_a_fixed_strength():
    c = EchoCorruptiond("image", mode="probability", strength=0.5, seed=1)
    hits: dict[float, set] = {}
    for p in (0.1, 0.3, 0.5):
        c.set_condition("blur", p)
        hits[p] = set()
        for k in range(150):
            x = stack(k)
            y = c({"image": x, "case": f"case{k}"})["image"]
            ref = hand_blur(x, 0.5)
            for f in range(x.shape[0]):
                if torch.equal(y[f], x[f]):
                    continue
                # a corrupted frame is the full-strength blur, never a weaker one
                np.testing.assert_allclose(y[f].numpy(), ref[f], atol=1e-5)
                hits[p].add((k, f))
        # 300 frames per severity: the corrupted fraction is the probability (binomial sd <= 0.03)
        assert abs(len(hits[p]) / 300 - p) < 0.08, (p, len(hits[p]))
    # one draw per frame serves every probability: the frames hit at 10 % are among those hit at 30 % and 50 %
    assert hits[0.1] <= hits[0.3] <= hits[0.5]


def test_the_severity_mode_changes_what_a_percentage_does():
    x = stack(7, t=40)
    strength = EchoCorruptiond("image", kind="noise", severity=0.3, seed=0)
    prob = EchoCorruptiond("image", kind="noise", severity=0.3, seed=0, mode="probability", strength=0.5)
    a = (strength({"image": x, "case": "c"})["image"] - x).reshape(40, -1).std(1)
    b = (prob({"image": x, "case": "c"})["image"] - x).reshape(40, -1).std(1)
    rng = float(x.max() - x.min())
    # strength: every frame, std = 0.3 x 50 % of the range; probability: some frames at 0.5 x 50 %, the rest clean
    np.testing.assert_allclose(a.numpy(), 0.15 * rng, rtol=0.15)
    hit = b > 0
    assert 0 < int(hit.sum()) < 40
    np.testing.assert_allclose(b[hit].numpy(), 0.25 * rng, rtol=0.15)
    # reproducible per case, different between cases
    again = prob({"image": x, "case": "c"})["image"]
    assert torch.equal(again, prob({"image": x, "case": "c"})["image"])
    assert not torch.equal(again, prob({"image": x, "case": "d"})["image"])
    with pytest.raises(ValueError, match="mode"):
        EchoCorruptiond("image", mode="often")
    with pytest.raises(ValueError, match="strength"):
        EchoCorruptiond("image", mode="probability", strength=0.0)


class _OneCaseEvaluator:
    """Stands in for the bundle's evaluator (not under test): segments one fixed ED/ES case through the report,
    missing LA whenever the corruption changed the ED frame."""

    def __init__(self, corruption: EchoCorruptiond, report: EchoSegmentationReport) -> None:
        self.corruption, self.report = corruption, report

    def run(self) -> None:
        ref = np.zeros((2, 24, 24), dtype=np.int64)
        ref[:, 4:12, 4:12], ref[:, 14:20, 6:18], ref[:, 2:20, 14:22] = 1, 3, 2
        image = stack(3)
        seen = self.corruption({"image": image, "case": "c"})["image"]
        pred = ref.copy()
        if not torch.equal(seen[0], image[0]):
            pred[0][pred[0] == 3] = 0
        self.report._reset()
        self.report.add_case({"pred": pred, "label": ref, "image": image, "case": "c", "patient": "p",
                              "view": "4CH", "phases": "ED,ES"})
        self.report.finalize()


@pytest.mark.parametrize("mode", ["strength", "probability"])
def test_robustness_report_states_the_mode_beside_the_papers_row(mode, tmp_path):
    corruption = EchoCorruptiond("image", mode=mode, strength=0.5)
    report = EchoSegmentationReport(str(tmp_path), CLASSES, num_overlays=0)
    rows = run_robustness(_OneCaseEvaluator(corruption, report), corruption, report,
                          [["none", 0.0], ["blur", 1.0]], str(tmp_path / "rob"))
    assert [r["n_missed"] for r in rows] == [0, 1] and {r["severity_mode"] for r in rows} == {mode}
    saved = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert saved["severity_mode"] == mode and "like-for-like" in saved["paper_note"]
    table = (tmp_path / "rob" / "robustness.md").read_text()
    assert f"severity mode `{mode}`" in table and "reference only" in table and "not as a like-for-like" in table
    assert "| condition | mDice | mHD | mHD95 | n_missed |" in table
    assert corruption.kind == "none"  # switched back after the run


# --------------------------------------------------------------------------------------- point 10: frame dropout
def test_pair_dropout_keeps_adjacency_frame_dropout_does_not(botm_data):
    ted = botm_data["ted"]  # 4 patients x 5 frames
    full = echo_datalist(ted, split=None, purpose="train")
    pairs = echo_datalist(ted, split=None, purpose="train", frame_dropout=0.4, frame_dropout_mode="pairs", seed=3)
    frames = echo_datalist(ted, split=None, purpose="train", frame_dropout=0.4, frame_dropout_mode="frames", seed=3)
    assert len(pairs) == len(frames) == 4 * 3  # round(0.4 x 5) = 2 pairs / frames dropped per patient
    full_pairs = {(e["patient"], tuple(e["frames"])) for e in full}
    for e in pairs:
        t, u = e["frames"]
        assert u == (t + 1) % 5 and (e["patient"], (t, u)) in full_pairs  # consecutive, as the test pairs
    # dropping frames first: 3 kept frames of a 5-frame cycle leave at least one pair that skips a frame
    for patient in {e["patient"] for e in frames}:
        steps = [(u - t) % 5 for t, u in (e["frames"] for e in frames if e["patient"] == patient)]
        assert sum(steps) == 5 and max(steps) >= 2
    assert pairs == echo_datalist(ted, split=None, purpose="train", frame_dropout=0.4, frame_dropout_mode="pairs",
                                  seed=3)
    with pytest.raises(ValueError, match="frame_dropout_mode"):
        echo_datalist(ted, split=None, purpose="train", frame_dropout=0.4, frame_dropout_mode="clips")


# ------------------------------------------------------------------------------------------------- config knobs
def test_config_knobs_reach_the_corruption_the_report_and_the_datalist(botm_data, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.json", "evaluate.json", "evaluate_robustness.json")])
    defaults = (parser["severity_mode"], parser["missed_distance"], parser["frame_dropout_mode"])
    assert defaults == ("strength", "exclude", "frames")  # our readings stay the defaults
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(botm_data["ted"]), "layout": "ted",
                   "severity_mode": "probability", "severity_strength": 0.3, "missed_distance": "diagonal",
                   "frame_dropout": 0.4, "frame_dropout_mode": "pairs"})
    corruption = parser.get_parsed_content("validate#corruption")
    assert (corruption.mode, corruption.strength) == ("probability", 0.3)
    assert parser.get_parsed_content("echo_report").missed_distance == "diagonal"
    datalist = parser.get_parsed_content("train#datalist")
    assert datalist and all(u == (t + 1) % 5 for t, u in (e["frames"] for e in datalist))
