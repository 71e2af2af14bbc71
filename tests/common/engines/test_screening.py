"""The shared batch-inference flow: the failure ledger, screening before the network, per-case guards."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.loading import DataError
from common.engines.screening import (
    EXIT_INPUTS_FAILED,
    FAILED_KEY,
    BatchLedger,
    CaseGuard,
    GuardedDataset,
    InputsFailed,
    describe_error,
    screen_inputs,
)


def _records(path):
    return json.loads(path.read_text())


def test_ledger_keeps_one_record_per_input_across_runs(tmp_path):
    first = BatchLedger(tmp_path)
    first.fail("a.nii", "a.nii: file is empty", "screening")
    first.fail("b.nii", "NaN", "screening")
    first.succeed("c.nii", {"output": "c_seg.nii.gz"})
    with pytest.raises(InputsFailed) as info:
        first.finish()
    assert info.value.code == EXIT_INPUTS_FAILED and "2 of 3 input(s) failed" in str(info.value)
    # the same folder again: b is fixed now, a still fails, c is predicted again
    second = BatchLedger(tmp_path)
    second.fail("a.nii", "file is empty", "screening")
    second.succeed("b.nii", {"output": "b_seg.nii.gz"})
    second.succeed("c.nii", {"output": "c_seg.nii.gz"})
    failed = _records(tmp_path / "failed_inputs.json")
    assert failed == {"failed": [{"input": "a.nii", "reason": "file is empty", "stage": "screening"}], "n_failed": 1}
    preds = _records(tmp_path / "predictions.json")["predictions"]
    assert sorted(p["input"] for p in preds) == ["b.nii", "c.nii"]
    # a third run in which everything passes removes the stale failure record and exits normally
    third = BatchLedger(tmp_path)
    third.succeed("a.nii", {"output": "a_seg.nii.gz"})
    third.finish()
    assert not (tmp_path / "failed_inputs.json").exists()
    assert len(_records(tmp_path / "predictions.json")["predictions"]) == 3


def test_ledger_later_stage_failure_wins_and_strict_stops(tmp_path):
    ledger = BatchLedger(tmp_path)
    ledger.succeed("v.h5")  # the network ran ...
    ledger.fail("v.h5", "disk full", "writing")  # ... the writer did not
    ledger.succeed("v.h5", {"output": "late"})  # a success after a failure of the same run changes nothing
    assert [f["stage"] for f in ledger.failed] == ["writing"]
    assert _records(tmp_path / "predictions.json")["predictions"] == []
    with pytest.raises(DataError, match="x.nii: broken .*strict"):
        BatchLedger(tmp_path, strict="true").fail("x.nii", "broken", "screening")


def test_screening_refuses_a_crafted_header_without_calling_the_loader(tmp_path):
    hdr = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).header
    hdr.set_data_shape((30000, 30000, 2000))
    crafted = tmp_path / "crafted.nii.gz"
    crafted.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 64))
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4)), good)
    complex_npy = tmp_path / "c.npy"
    np.save(complex_npy, np.ones((8, 8), np.complex64))
    loaded = []

    def loader(path):
        loaded.append(path)
        return np.load(path) if str(path).endswith(".npy") else np.asarray(nib.load(path).dataobj)

    ledger = BatchLedger(tmp_path / "out")
    kept = screen_inputs([{"image": str(p)} for p in (crafted, good, complex_npy)], ledger, loader=loader)
    assert kept == [{"image": str(good)}]
    assert loaded == [str(good)]  # the crafted header and the complex array were refused from their headers
    reasons = {f["input"]: f["reason"] for f in ledger.failed}
    assert "max_pixels" in reasons[str(crafted)] and "complex" in reasons[str(complex_npy)]
    # nothing usable: the error lists the reasons (exit status 1), the record is written all the same
    with pytest.raises(DataError, match=r"no input could be processed \(1 failed.*crafted.nii.gz: .*max_pixels"):
        screen_inputs([{"image": str(crafted)}], BatchLedger(tmp_path / "out2"), loader=loader)
    assert len(_records(tmp_path / "out2" / "failed_inputs.json")["failed"]) == 1


def test_describe_error_reports_the_innermost_named_error():
    try:
        try:
            raise DataError("scan.nii: truncated")
        except DataError as inner:
            raise RuntimeError("applying transform <Compose>") from inner
    except RuntimeError as outer:
        assert describe_error(outer) == "scan.nii: truncated"
    assert describe_error(KeyError("affine")) == "KeyError: 'affine'"


def test_guards_record_a_failing_transform_and_a_failing_forward_and_go_on(tmp_path):
    """A real ignite engine over a GuardedDataset: case 1 fails in its transform, case 2 in the 'network'; cases 0
    and 3 are processed and the run completes."""
    from ignite.engine import Engine, Events
    from monai.data import DataLoader

    def transform(entry):
        if entry["image"] == "bad_transform":
            raise DataError("bad_transform: cannot read")
        return {"image": torch.tensor([float(len(entry["image"]))])}

    data = [{"image": n} for n in ("good_a", "bad_transform", "bad_forward", "good_b")]
    loader = DataLoader(GuardedDataset(data, transform), batch_size=1)
    seen = []

    def step(engine, batch):
        if batch["input_id"] == ["bad_forward"]:
            raise RuntimeError("shape mismatch in the network")
        return {"pred": batch["image"] * 2}

    engine = Engine(step)
    ledger = BatchLedger(tmp_path)
    CaseGuard(ledger).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
    engine.run(loader)
    assert [bool(o) for o in seen] == [True, False, False, True]
    stages = {f["input"]: (f["stage"], f["reason"]) for f in ledger.failed}
    assert stages == {"bad_transform": ("preprocessing", "cannot read"),
                      "bad_forward": ("inference", "RuntimeError: shape mismatch in the network")}
    assert sorted(p["input"] for p in _records(tmp_path / "predictions.json")["predictions"]) == ["good_a", "good_b"]
    assert FAILED_KEY not in seen[0]
