"""Every bundle's evaluate.json hands its ledger to the dataset reader: a case with a corrupt header is recorded in
failed_inputs.json at stage ``datalist`` and left out, the rest of the folder is evaluated (``eval_split all``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GARBAGE = b"\x00\x17 not an image header \xff" * 8


def _camus(tmp: Path) -> tuple[Path, Path]:
    from common.data.synthetic.echo_layouts import write_camus

    root = write_camus(tmp / "camus", n_patients=2, seed=1, image_size=(40, 32), n_frames=2, progress=False)
    return root, root / "patient0001" / "patient0001_2CH_ED_gt.nii.gz"


def _pairs(tmp: Path) -> tuple[Path, Path]:
    from common.data.synthetic.registration import write_registration_pairs

    write_registration_pairs(tmp / "reg", n_pairs=3, seed=0, shape=(32, 32), progress=False)
    return tmp / "reg", tmp / "reg" / "pairs" / "pair0002_source.nii.gz"


def _mmwhs(tmp: Path) -> tuple[Path, Path]:
    from common.data.synthetic.mmwhs import write_mmwhs

    written = write_mmwhs(tmp / "mmwhs", n_ct=2, n_mr=2, seed=0, ct_shape=(12, 12, 8), mr_shape=(12, 12, 8),
                          progress=False)
    return tmp / "mmwhs", written["mr"][0][1]


def _tracking(tmp: Path) -> tuple[Path, Path]:
    from common.data.synthetic.echo_layouts import write_tracking_h5

    root = write_tracking_h5(tmp / "tracking", n_videos=3, seed=0, image_size=(32, 32), n_frames=4, n_points=4,
                             progress=False)
    return root, sorted(root.rglob("*.h5"))[1]


@pytest.mark.parametrize(("bundle", "write", "n_cases"), [
    ("botm_seg", _camus, 4),  # 2 patients x 2 views
    ("adacs_registration", _pairs, 3),
    ("lssc_multimodal", _mmwhs, 4),  # 2 CT + 2 MR volumes
    ("specknet_tracking", _tracking, 3),
])
def test_evaluation_datalist_records_a_corrupt_header(bundle, write, n_cases, tmp_path):
    from monai.bundle import ConfigParser

    data, bad = write(tmp_path)
    bad.write_bytes(GARBAGE)
    out = tmp_path / "eval"
    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser.update({"dataset_dir": str(data), "output_dir": str(out), "eval_split": "all"})
    # the evaluation dataset's entries: listed (ledger given to the reader), then screened
    entries = parser.get_parsed_content("validate#dataset#data")
    assert len(entries) < n_cases and not any(str(bad) in json.dumps(e, default=str) for e in entries)
    failed = json.loads((out / "failed_inputs.json").read_text())["failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "datalist", failed
    assert str(bad) in failed[0]["input"] + " " + failed[0]["reason"], failed
