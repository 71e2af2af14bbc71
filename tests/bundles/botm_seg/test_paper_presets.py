"""The paper-protocol presets of botm_seg (issue 17, point 6): ``camus_2ch.json``, ``camus_4ch.json`` (per-view
CAMUS models, paper Tables 1-2) and ``ted.json`` (TED, 20 test patients out of 98, Table 3) parse on top of
``train.json`` and select what they say on small synthetic datasets in the official layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from common.data.splits import patient_split
from common.data.ted import find_ted_patients

from .conftest import CONFIGS


def _parser(preset: str, dataset_dir: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / preset)])
    parser.update({"bundle_root": ".", "dataset_dir": str(dataset_dir), **overrides})
    return parser


def _datalist(parser: ConfigParser, split: str) -> list[dict]:
    parser.update({"validate#split": split})
    return parser.get_parsed_content("validate#datalist", lazy=False)


@pytest.mark.parametrize("preset, view", [("camus_2ch.json", "2CH"), ("camus_4ch.json", "4CH")])
def test_camus_view_presets_select_one_view(botm_data, preset, view):
    # the synthetic CAMUS set holds both views for every patient, so a preset that forgot the view would see both
    both = ConfigParser()
    both.read_config(str(CONFIGS / "train.json"))
    both.update({"bundle_root": ".", "dataset_dir": str(botm_data["camus"])})
    assert {e["view"] for e in _datalist(both, "all")} == {"2CH", "4CH"}

    parser = _parser(preset, botm_data["camus"])
    assert parser.get_parsed_content("echo_layout") == "camus"
    assert parser.get_parsed_content("num_classes") == 4
    train = parser.get_parsed_content("train#datalist", lazy=False)
    every = _datalist(parser, "all")
    assert train and {e["view"] for e in train} == {view}
    assert {e["view"] for e in every} == {view}
    # one ED/ES pair per patient of that view, and the usual patient-level split is kept
    assert len(every) == len({e["patient"] for e in every}) == 5
    parts = {s: {e["patient"] for e in _datalist(parser, s)} for s in ("train", "val", "test")}
    assert set().union(*parts.values()) == {e["patient"] for e in every}
    assert all(a.isdisjoint(b) for a in parts.values() for b in parts.values() if a is not b)


def test_camus_preset_refuses_a_ted_folder(botm_data):
    parser = _parser("camus_2ch.json", botm_data["ted"])
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#datalist", lazy=False)
    # MONAI wraps the reader's error; the cause names the missing CAMUS 2CH file of the first TED patient
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("patient0001_2CH_ED" in m and "not found" in m for m in chain), chain


def test_ted_preset_is_the_papers_20_of_98_split(botm_data):
    parser = _parser("ted.json", botm_data["ted"])
    assert parser.get_parsed_content("synthetic_kind") == "ted"  # the synthetic default becomes a TED set too
    assert parser.get_parsed_content("echo_layout") == "ted"
    assert parser.get_parsed_content("num_classes") == 3
    val, test = parser.get_parsed_content("val_fraction"), parser.get_parsed_content("test_fraction")
    # the same patient-level split the TED reader makes, on the 98 patients of the real dataset
    ids = [f"patient{i:04d}" for i in range(1, 99)]
    split = patient_split(ids, (1.0 - val - test, val, test), parser.get_parsed_content("split_seed"))
    assert len(split["test"]) == 20
    assert len(split["train"]) + len(split["val"]) == 78
    # on the small synthetic TED set: consecutive-frame TED cases, every patient in exactly one subset
    patients = {p.name for p in find_ted_patients(botm_data["ted"])}
    parts = {s: {e["patient"] for e in _datalist(parser, s)} for s in ("train", "val", "test")}
    assert set().union(*parts.values()) == patients
    assert sum(len(p) for p in parts.values()) == len(patients)
    assert parts["test"]
    assert all(e["view"] == "4CH" for e in parser.get_parsed_content("train#datalist", lazy=False))
