"""BatchLedger in a torch.distributed run (2 processes, gloo): every rank's records reach failed_inputs.json once,
only rank 0 writes, and every rank ends with the same exit status."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(ledger, finish) -> dict:
    from common.data.loading import DataError
    from common.engines.screening import InputsFailed

    try:
        finish()
    except InputsFailed as e:
        return {"status": e.code, "message": str(e)}
    except DataError as e:
        return {"status": 1, "message": str(e)}
    return {"status": 0, "message": ledger.summary()}


def _rank_main(rank: int, port: int, tmp: str) -> None:
    from common.engines.screening import BatchLedger

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tmp_path = Path(tmp)
    result: dict = {}
    # some inputs failed: rank 1 alone fails b (only it processed b); both ranks screened "shared" and failed it
    mixed = BatchLedger(tmp_path / "mixed")
    mixed.fail("shared.nii", "shared.nii: file is empty", "screening")
    if rank == 0:
        mixed.fail("a.nii", "NaN pixels", "screening")
        mixed.succeed("d.nii", {"output": "d_seg.nii.gz"})
    else:
        mixed.fail("b.nii", "ValueError: boom", "inference")
        mixed.succeed("c.nii", {"output": "c_seg.nii.gz"})
    dist.barrier()
    failed_file = tmp_path / "mixed" / "failed_inputs.json"
    # before merging, the file holds rank 0's records only: rank 1 does not write (two writers would lose records)
    result["before"] = sorted(r["input"] for r in json.loads(failed_file.read_text())["failed"])
    mixed.gather()
    # nothing processed anywhere: every rank fails its own input
    none_left = BatchLedger(tmp_path / "none")
    none_left.fail(f"only_rank{rank}.nii", "truncated", "screening")
    none_left.gather()
    dist.destroy_process_group()  # finish() needs no process group once gathered (the configs destroy it first)
    result["mixed"] = _outcome(mixed, mixed.finish)
    result["none"] = _outcome(none_left, none_left.finish)
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_gather_merges_every_ranks_records_and_all_ranks_exit_alike(tmp_path):
    mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["before"] == ["a.nii", "shared.nii"]
    failed = json.loads((tmp_path / "mixed" / "failed_inputs.json").read_text())
    assert failed["n_failed"] == 3  # "shared" once, although both ranks recorded it
    assert {f["input"]: f["stage"] for f in failed["failed"]} == {"a.nii": "screening", "b.nii": "inference",
                                                                  "shared.nii": "screening"}
    preds = json.loads((tmp_path / "mixed" / "predictions.json").read_text())["predictions"]
    assert sorted(p["input"] for p in preds) == ["c.nii", "d.nii"]
    # the same status and summary on both ranks: 3 of the 5 inputs failed -> exit status 3
    assert r0["mixed"] == r1["mixed"] and r0["mixed"]["status"] == 3 and "3 of 5 input(s) failed" in r0["mixed"][
        "message"]
    # no input processed on any rank -> both ranks fail (status 1) naming both ranks' inputs
    assert r0["none"] == r1["none"] and r0["none"]["status"] == 1
    assert "only_rank0.nii" in r0["none"]["message"] and "only_rank1.nii" in r0["none"]["message"]
    none_failed = json.loads((tmp_path / "none" / "failed_inputs.json").read_text())
    assert sorted(f["input"] for f in none_failed["failed"]) == ["only_rank0.nii", "only_rank1.nii"]
