"""``make demo`` (tools/demo.py) writes only under its output folder: the user's ``bundles/<b>/models`` checkpoints
and ``bundles/<b>/eval`` outputs are never touched (issue 12, point 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from tools.demo import BUNDLES, REPO_ROOT, bundle_stage_args, run_demo

# the botm CLI tests' tiny network (all BOTM blocks still on) at 64x64, one epoch
TINY_BOTM = {
    "network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1], "network_def#num_heads": [1, 1, 2, 2],
    "network_def#decoder_width": 16, "network_def#sinkhorn_iters": 5, "network_def#botm_reductions": [2, 1, 1, 1],
    "spatial_size": [64, 64], "batch_size": 4, "epochs": 1, "val_interval": 1,
}


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty when the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folders() -> dict[str, dict[str, str]]:
    return {f"{b}/{sub}": tree_digest(REPO_ROOT / "bundles" / b / sub) for b in BUNDLES for sub in ("models", "eval")}


def _args_dict(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--config_file "[...]" --key value ...`` -> (config files, overrides), as ``monai.bundle run`` reads them."""
    config_file = args[args.index("--config_file") + 1]
    rest = args[args.index("--config_file") + 2:]
    overrides = dict(zip(rest[::2], rest[1::2]))
    return [f.strip("'") for f in config_file.strip("[]").split(",")], {k.lstrip("-"): v for k, v in overrides.items()}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_demo_stage_resolves_its_output_and_checkpoint_paths_under_the_demo_folder(bundle, tmp_path):
    """Cheap check of all four bundles: MONAI resolves ``output_dir``, ``ckpt_dir`` and ``ckpt_path`` of each demo
    stage (train, evaluate, inference) exactly as ``monai.bundle run`` would, and all lie under the demo folder."""
    out = tmp_path / "demo" / bundle
    stages = bundle_stage_args(bundle, out)
    assert [s for s, _ in stages] == ["train", "evaluate", "inference"]
    for stage, args in stages:
        files, overrides = _args_dict(args)
        parser = ConfigParser()
        parser.read_config(files)
        parser.update(overrides)
        for key in ("output_dir", "ckpt_dir", "ckpt_path"):
            value = Path(str(parser.get_parsed_content(key))).resolve()
            assert value.is_relative_to(out), f"{bundle} {stage}: {key} = {value} is outside the demo folder {out}"
        assert Path(str(parser.get_parsed_content("ckpt_path"))).resolve() == (out / "models" / "model.pt")


@pytest.mark.slow
def test_a_demo_run_leaves_the_bundle_models_and_eval_folders_unchanged(tmp_path, monkeypatch):
    """A real (reduced) demo run of botm_seg: its train, evaluate and inference stages write the demo model and
    results under ``output_dir`` and leave every ``bundles/*/models`` and ``bundles/*/eval`` byte for byte as
    they were."""
    from common.data.default import default_dataset_dir, generate_dataset

    monkeypatch.setenv("CARDIAC_DATA_DIR", str(tmp_path / "data_home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    generate_dataset("camus", default_dataset_dir("camus"), n_patients=4, image_size=(72, 64), n_frames=3,
                     progress=False)
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_BOTM))
    before = user_folders()
    out = tmp_path / "demo"

    assert run_demo(output_dir=str(out), only="botm_seg", extra_config=str(tiny)) == 0

    assert user_folders() == before
    assert (out / "botm_seg" / "models" / "model.pt").is_file()
    assert (out / "botm_seg" / "metrics.json").is_file()
    assert any((out / "botm_seg").rglob("*.png"))


def test_bad_demo_arguments_fail_naming_them(tmp_path):
    with pytest.raises(ValueError, match="botm_segg"):
        run_demo(output_dir=str(tmp_path / "demo"), only="botm_segg")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run_demo(output_dir=str(tmp_path / "demo"), only="botm_seg", extra_config=str(tmp_path / "missing.json"))
    assert not (tmp_path / "demo").exists()
