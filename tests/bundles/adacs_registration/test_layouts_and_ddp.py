"""``--dataset_dir`` on the official ACDC and CAMUS layouts trains and evaluates unchanged; 2-process DDP training."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def official_layouts(adacs_env, tmp_path_factory) -> dict[str, Path]:
    """ACDC as released (``ACDC/database/{training,testing}/patientNNN``, the synthetic patients linked in) and
    CAMUS as released (``CAMUS_public/database_nifti/patientNNNN``, written by the CAMUS-layout simulator)."""
    from common.data.synthetic.echo_layouts import write_camus

    root = tmp_path_factory.mktemp("official")
    acdc_src = Path(adacs_env["ADACS_CACHE"]) / "acdc-seed0"
    for i, patient in enumerate(sorted(p for p in acdc_src.iterdir() if p.is_dir())):
        subset = "testing" if i == 3 else "training"
        dst = root / "ACDC" / "database" / subset / patient.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(patient, dst)
    camus = root / "CAMUS"
    write_camus(camus / "CAMUS_public" / "database_nifti", n_patients=5, image_size=(128, 128), n_frames=4,
                progress=False)
    return {"acdc": root / "ACDC", "camus": camus}


def _run(configs, overrides, monkeypatch, cache):
    from monai.bundle import ConfigWorkflow

    monkeypatch.setenv("CARDIAC_DATA_DIR", cache)
    configs_dir = Path(__file__).resolve().parents[3] / "bundles" / "adacs_registration" / "configs"
    wf = ConfigWorkflow(config_file=[str(configs_dir / c) for c in configs],
                        meta_file=str(configs_dir / "metadata.json"), logging_file=False, workflow_type="train",
                        **overrides)
    wf.initialize()
    wf.run()
    return wf


@pytest.mark.parametrize("layout", ["acdc", "camus"])
def test_official_layout_trains_and_evaluates_unchanged(layout, official_layouts, adacs_env, tmp_path, monkeypatch):
    from common.data.pairs import pair_datalist

    dataset = official_layouts[layout]
    tiny = {"network_def#estimator#enc_channels": [8] * 4, "network_def#estimator#dec_channels": [8] * 7,
            "network_def#estimator#integration_steps": 3, "scoring_def#enc_channels": [8] * 4,
            "scoring_def#dec_channels": [8] * 7, "spatial_size": [64, 64],
            "epochs": 1, "batch_size": 4, "dataset_dir": str(dataset), "bundle_root": str(tmp_path),
            "output_dir": str(tmp_path / "eval")}
    wf = _run(["train.json"], tiny, monkeypatch, adacs_env["ADACS_CACHE"])
    # the layout is recognised and its preset used (METHODS.md: CAMUS alpha .04, lr 1e-4; ACDC alpha .02, lr 2e-4)
    assert wf.parser.get_parsed_content("layout") == layout
    assert wf.parser.get_parsed_content("alpha") == {"acdc": 0.02, "camus": 0.04}[layout]
    assert wf.parser.get_parsed_content("learning_rate") == {"acdc": 2e-4, "camus": 1e-4}[layout]
    assert (tmp_path / "models" / "model.pt").is_file()
    _run(["train.json", "evaluate.json"], tiny, monkeypatch, adacs_env["ADACS_CACHE"])
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    test_pairs = pair_datalist(dataset, "test")
    assert report["n_pairs"] == len(test_pairs) > 0
    if layout == "acdc":  # the official testing/ folder is the test set
        assert {p["patient"] for p in test_pairs} == {"patient004"}
    assert 0.0 < report["metrics"]["val_dice"] <= 1.0 and report["metrics"]["identity_dice"] > 0.0
    assert (tmp_path / "eval" / "registration.png").is_file()


@pytest.mark.distributed
def test_torchrun_two_processes_gloo(adacs_env, adacs, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "--config_file",
           adacs.config_list("train.json", "multi_gpu_train.json"), "--meta_file",
           str(adacs.CONFIGS / "metadata.json"), "--logging_file", str(adacs.CONFIGS / "logging.conf"),
           *adacs.cli_args({**adacs.TINY_TRAIN, "bundle_root": str(tmp_path), "output_dir": str(tmp_path / "e")})]
    proc = subprocess.run(cmd, cwd=tmp_path, env=adacs_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    state = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    # 1 epoch with warm-up 0: every iteration did a displacement step and a scoring step on each rank
    iterations = state["trainer"]["iteration"]
    assert iterations >= 1 and state["momentum"]["num_updates"] == iterations
    assert {"network", "auxiliary", "optimizer", "optimizer_auxiliary"} <= set(state)
    assert all(k.startswith("estimator.") for k in state["network"])  # DDP unwrapped before saving
    assert (tmp_path / "models" / "model.pt").is_file()
    from common.data.pairs import pair_datalist

    n_train = len(pair_datalist(Path(adacs_env["ADACS_CACHE"]) / "acdc-seed0", "train"))
    per_rank = math.ceil(n_train / 2)  # DistributedSampler pads to an even split
    assert iterations == math.ceil(per_rank / 4)  # batch 4
