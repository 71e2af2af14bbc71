"""Dataset readers with a corrupt case: evaluation (a ledger given) records it at stage ``datalist`` and lists the
others unchanged, split included; training (no ledger) stops with an error naming the file. One small synthetic
dataset per reader family, written by ``common.data.synthetic`` in the dataset's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.cases import build_cases
from common.data.loading import DataError
from common.engines.screening import BatchLedger

GARBAGE = b"\x00\x17 not an image header \xff" * 8


def _corrupt(path: Path) -> Path:
    assert path.is_file(), path
    path.write_bytes(GARBAGE)
    return path


def _run_family(list_fn, key: str, corrupt, tmp_path: Path, splits=("all",)) -> tuple[BatchLedger, Path]:
    """List every split cleanly, corrupt one file (``corrupt()`` returns it), list again with a ledger: the
    entries are the clean ones minus the corrupt case's, each in the same split. Returns the ledger and the file."""
    clean = {s: list_fn(s, None) for s in splits}
    bad = corrupt()
    ledger = BatchLedger(tmp_path / "eval", predictions_file=None)
    after = {s: list_fn(s, ledger) for s in splits}
    dropped = set()
    for s in splits:
        before_ids = [e[key] for e in clean[s]]
        after_ids = [e[key] for e in after[s]]
        assert set(after_ids) <= set(before_ids), s  # nobody moved into this subset
        dropped |= set(before_ids) - set(after_ids)
        for e in after[s]:
            assert e == next(c for c in clean[s] if c[key] == e[key]), e[key]  # the other cases, unchanged
    assert dropped, "the corrupt case was listed"
    records = json.loads((tmp_path / "eval" / "failed_inputs.json").read_text())["failed"]
    assert len(records) == 1 and records[0]["stage"] == "datalist", records
    # the record names the corrupt file: as its input, or in the reason (the input is then the case's folder)
    assert records[0]["input"] == str(bad) or str(bad) in records[0]["reason"], records
    # training (no ledger) stops at the corrupt case, naming the file
    with pytest.raises((DataError, FileNotFoundError), match=str(bad.name)):
        for s in splits:
            list_fn(s, None)
    return ledger, bad


def test_camus_and_ted_readers(tmp_path):
    from common.data.camus import camus_datalist
    from common.data.synthetic.echo_layouts import write_camus, write_ted
    from common.data.ted import ted_datalist

    camus = write_camus(tmp_path / "camus", n_patients=3, seed=1, image_size=(40, 32), n_frames=2, progress=False)
    ledger, _ = _run_family(lambda s, led: camus_datalist(camus, split=None, ledger=led), "image_ed",
                            lambda: _corrupt(camus / "patient0002" / "patient0002_4CH_ES_gt.nii.gz"), tmp_path / "c")
    assert ledger.failed[0]["input"] == str(camus / "patient0002" / "patient0002_4CH")

    ted = write_ted(tmp_path / "ted", n_patients=3, seed=2, image_size=(32, 40), n_frames=3, progress=False)
    # a MetaImage header without DimSize: the reader cannot size the sequence
    ledger, _ = _run_family(lambda s, led: ted_datalist(ted, split=None, ledger=led), "image",
                            lambda: _corrupt(ted / "patient0003" / "patient0003_4CH_sequence.mhd"), tmp_path / "t")
    assert ledger.failed[0]["input"] == str(ted / "patient0003")


def test_acdc_reader_and_registration_pairs(tmp_path):
    from common.data.pairs import pair_datalist
    from common.data.synthetic.acdc import write_acdc
    from common.data.synthetic.registration import write_registration_pairs

    acdc = tmp_path / "acdc"
    write_acdc(acdc, n_patients=8, seed=0, shape=(40, 40), n_frames=4, write_displacement=False, progress=False)
    # the ED label is read twice while listing: its header (acdc_datalist) and its slices (pair_datalist)
    _run_family(lambda s, led: pair_datalist(acdc, split=s, layout="acdc", val_fraction=0.25, test_fraction=0.25,
                                             ledger=led), "name",
                lambda: _corrupt(next((acdc / "patient002").glob("patient002_frame*_gt.nii.gz"))), tmp_path / "a",
                splits=("train", "val", "test"))

    pairs = tmp_path / "pairs"
    write_registration_pairs(pairs, n_pairs=10, seed=0, shape=(32, 32), progress=False)
    ledger, _ = _run_family(lambda s, led: pair_datalist(pairs, split=s, layout="pairs", ledger=led), "name",
                            lambda: _corrupt(pairs / "pairs" / "pair0001_target_myo.nii.gz"), tmp_path / "p",
                            splits=("train", "val", "test"))
    assert ledger.failed[0]["input"].endswith("pair0001_source.nii.gz")


def test_tracking_reader(tmp_path):
    from common.data.synthetic.echo_layouts import write_tracking_h5
    from common.data.tracking import tracking_datalist

    root = write_tracking_h5(tmp_path / "tracking", n_videos=8, seed=3, image_size=(32, 32), n_frames=4, n_points=4,
                             progress=False)
    videos = sorted(root.rglob("*.h5"))

    def truncate() -> Path:
        data = videos[1].read_bytes()
        videos[1].write_bytes(data[: len(data) // 3])
        return videos[1]

    _run_family(lambda s, led: tracking_datalist(root, split=s, val_fraction=0.25, test_fraction=0.25, ledger=led),
                "video", truncate, tmp_path / "v", splits=("train", "val", "test"))


def test_mmwhs_reader(tmp_path):
    from common.data.slices import unpaired_datalist
    from common.data.synthetic.mmwhs import write_mmwhs

    root = tmp_path / "mmwhs"
    written = write_mmwhs(root, n_ct=3, n_mr=2, seed=0, ct_shape=(12, 12, 8), mr_shape=(12, 12, 8), progress=False)
    ledger, _ = _run_family(lambda s, led: unpaired_datalist(root, ("ct", "mr"), split=s, ledger=led), "image",
                            lambda: _corrupt(written["ct"][1][1]), tmp_path / "m")
    assert ledger.failed[0]["input"] == str(written["ct"][1][0])


def test_build_cases_without_any_readable_case_names_the_reasons(tmp_path):
    def build(name: str) -> str:
        raise DataError(f"{name}: truncated")

    ledger = BatchLedger(tmp_path, predictions_file=None)
    with pytest.raises(DataError, match=r"folder: no case could be read \(2 failed\): a: truncated; b: truncated"):
        build_cases(["a", "b"], build, str, ledger, "folder")
    assert [f["input"] for f in ledger.failed] == ["a", "b"]
    with pytest.raises(DataError, match="a: truncated"):  # without a ledger: the first error, unchanged
        build_cases(["a", "b"], build, str)
