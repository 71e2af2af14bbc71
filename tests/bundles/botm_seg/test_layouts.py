"""--dataset_dir pointing at folders in the official layouts (CAMUS MetaImage 2019 release, TED) trains and
evaluates unchanged; the layout and the classes are found from the folder. (The CAMUS NIfTI release is the
embedded default, exercised by test_cli.py and by the trained fixture.)"""

from __future__ import annotations

import csv
import json

import pytest

from .conftest import TINY


@pytest.mark.slow
def test_camus_metaimage_release_trains_and_evaluates(tmp_path, botm_data, run_bundle):
    data = botm_data["camus_mhd"]
    run_bundle(["train.json"], tmp_path, dataset_dir=str(data), **TINY)
    assert (tmp_path / "models" / "model.pt").is_file()
    run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(data), output_dir=str(tmp_path / "pairs"),
               **TINY)
    pairs = json.loads((tmp_path / "pairs" / "metrics.json").read_text())["echo"]
    assert pairs["class_names"] == ["LV", "Myo", "LA"]
    assert pairs["n_frames"] == 2 * pairs["n_cases"] and set(pairs["by_phase"]) == {"ED", "ES"}
    # the labelled sequences of the release (ED -> ES), segmented through consecutive pairs
    run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(data), output_dir=str(tmp_path / "seq"),
               **{"validate#camus_eval": "sequences"}, **TINY)
    seq = json.loads((tmp_path / "seq" / "metrics.json").read_text())["echo"]
    assert seq["n_frames"] == 4 * seq["n_cases"]  # 4-frame sequences
    assert seq["temporal_consistency"]["n_sequences"] == seq["n_cases"]


@pytest.mark.slow
def test_ted_layout_trains_on_cyclic_pairs_and_evaluates_videos(tmp_path, botm_data, run_bundle):
    data = botm_data["ted"]
    run_bundle(["train.json"], tmp_path, dataset_dir=str(data), **TINY)
    import torch

    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["decoder.classifier.weight"].shape[0] == 3  # background, LV, Myo
    run_bundle(["train.json", "evaluate.json"], tmp_path, dataset_dir=str(data), output_dir=str(tmp_path / "eval"),
               **TINY)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())["echo"]
    assert report["class_names"] == ["LV", "Myo"]
    assert report["n_frames"] == 5 * report["n_cases"]  # whole 5-frame videos, every frame scored once
    tc = report["temporal_consistency"]
    assert tc["n_transitions"] == 4 * report["n_cases"]
    assert set(tc["true_consecutive_dice"]) == {"LV", "Myo", "mean"}
    with open(tmp_path / "eval" / "per_frame.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["frame"]) for r in rows}) == [0, 1, 2, 3, 4]
    assert {r["phase"] for r in rows} == {"ED", "ES", ""} and "dice_LA" not in rows[0]
