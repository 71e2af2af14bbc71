"""torchrun evaluation (2 processes, gloo) of a dataset with one corrupt case: the case is recorded once in
failed_inputs.json, the others are scored, and every rank ends with the ledger's exit status 3 (not 0)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests import fuzz_inputs as fz

from .conftest import CONFIGS, TINY_NETWORK
from .test_distributed import torchrun_command


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_evaluation_records_a_corrupt_case_and_exits_nonzero(tmp_path, tiny_json):
    from common.data.synthetic.echo_layouts import write_camus

    data = write_camus(tmp_path / "camus", n_patients=2, seed=11, image_size=(48, 40), n_frames=2, progress=False)
    root = tmp_path / "bundle"
    # untrained weights: the test is about the failure record and the exit status, not the scores
    ckpt = fz.untrained_checkpoint(CONFIGS / "train.json", {**TINY_NETWORK, "dataset_dir": str(data)},
                                   tmp_path / "model.pt")
    # a zero-byte ES frame of one view: its header cannot be read while the cases are listed (stage datalist)
    bad = data / "patient0002" / "patient0002_2CH_ES.nii.gz"
    assert bad.is_file()
    bad.write_bytes(b"")
    out = root / "ddp_eval"
    cmd = torchrun_command(["train.json", "evaluate.json", "multi_gpu_evaluate.json", tiny_json], "--bundle_root",
                           root, "--dataset_dir", data, "--ckpt_path", ckpt, "--output_dir", out, "--eval_split", "all")
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    # the ranks (no hang) end with the ledger's status 3, "some inputs failed", counting the merged record.
    # torchrun reports the first rank that exits and may stop the other with SIGTERM (-15) as it exits too, even
    # before that one logs; that every rank ends alike is shown in tests/common/engines/test_screening_distributed.py
    assert 1 <= log.count("batch finished with failures: 1 of 4 input(s) failed") <= 2, log[-4000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", log)
    assert "3" in codes and set(codes) <= {"3", "-15"}, (codes, log[-4000:])
    # the one traceback is torchrun's own report of the failed ranks (ChildFailedError), none comes from a rank
    assert log.count("Traceback (most recent call last)") == 1 and "ChildFailedError" in log, log[-4000:]
    failed = json.loads((out / "failed_inputs.json").read_text())
    assert failed["n_failed"] == 1, failed
    rec = failed["failed"][0]
    assert rec["stage"] == "datalist" and rec["input"].endswith("patient0002_2CH") and str(bad) in rec["reason"]
    metrics = json.loads((out / "metrics.json").read_text())
    # 2 patients x 2 views, one left out: the 3 others are scored across the two ranks (ED + ES frames each)
    assert metrics["echo"]["n_cases"] == 3 and metrics["echo"]["n_frames"] == 6, metrics["echo"]
