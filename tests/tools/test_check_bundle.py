"""The bundle conformance harness itself: it passes a conforming bundle and an empty bundles/, and fails broken ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools.check_bundle import REQUIRED_FILES, check_bundle, discover_bundles

TENSOR = {
    "type": "image", "format": "magnitude", "modality": "US", "num_channels": 1, "spatial_shape": [64, 64],
    "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"},
}


def _metadata() -> dict:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "initial"},
        "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.4.0",
        "required_packages_version": {}, "optional_packages_version": {},
        "task": "toy", "description": "toy bundle", "authors": "tests", "copyright": "tests",
        "data_source": "synthetic", "data_type": "nibabel", "image_classes": "one channel",
        "label_classes": "bg, fg", "pred_classes": "bg, fg", "intended_use": "tests",
        "eval_metrics": {"mean_dice": 0.0}, "references": ["none"],
        "network_data_format": {
            "inputs": {"image": dict(TENSOR)},
            "outputs": {"pred": dict(TENSOR, type="probabilities", format="segmentation", num_channels=2,
                                     channel_def={"0": "background", "1": "foreground"})},
        },
    }


_COMMON = {
    "bundle_root": ".", "device": "$torch.device('cpu')", "dataset_dir": "/tmp/none", "output_dir": "/tmp/none",
    "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2]},
    "network": "$@network_def.to(@device)",
    "imports": ["$import torch"],
}
_TRAIN = dict(_COMMON, train={
    "dataset": {"_target_": "Dataset", "data": [], "transform": None},
    "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 1},
    "inferer": {"_target_": "SimpleInferer"},
    "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.01},
    "trainer": {"_target_": "SupervisedTrainer", "max_epochs": 1, "device": "@device",
                "train_data_loader": "@train#dataloader", "network": "@network",
                "loss_function": "$torch.nn.CrossEntropyLoss()", "optimizer": "@train#optimizer",
                "inferer": "@train#inferer"},
}, run=["$@train#trainer.run()"])
_INFER = dict(_COMMON,
              dataset={"_target_": "Dataset", "data": [], "transform": None},
              dataloader={"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1},
              inferer={"_target_": "SimpleInferer"},
              evaluator={"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                         "network": "@network", "inferer": "@inferer"},
              run=["$@evaluator.run()"])
_LOGGING = """[loggers]
keys=root
[handlers]
keys=consoleHandler
[formatters]
keys=fullFormatter
[logger_root]
level=INFO
handlers=consoleHandler
[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)
[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def make_toy_bundle(root: Path) -> Path:
    """A minimal bundle that satisfies every conformance rule (the harness's positive control)."""
    (root / "configs").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(_metadata(), indent=2))
    (root / "configs" / "train.json").write_text(json.dumps(_TRAIN, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(_INFER, indent=2))
    (root / "configs" / "evaluate.json").write_text(json.dumps({"validate#evaluator#max_epochs": 1}))
    (root / "configs" / "multi_gpu_train.json").write_text(json.dumps({"device": "$torch.device('cpu')"}))
    (root / "configs" / "multi_gpu_evaluate.json").write_text(json.dumps({"device": "$torch.device('cpu')"}))
    (root / "configs" / "logging.conf").write_text(_LOGGING)
    (root / "LICENSE").write_text("Apache-2.0\n")
    (root / "docs" / "README.md").write_text("# Toy\n\n## Deviations and choices\n\nNone.\n")
    return root


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundles") / "toy")


def test_toy_bundle_conforms(toy_bundle):
    assert check_bundle(toy_bundle) == []


def test_empty_bundles_folder_passes(tmp_path):
    assert discover_bundles(tmp_path) == []
    (tmp_path / "bundles").mkdir()
    assert discover_bundles(tmp_path / "bundles") == []


def test_cli_exit_code_says_pass_or_fail(toy_bundle, tmp_path, capsys):
    # the repository's own bundles go through the same check in tests/bundles/test_conformance.py
    from tools.check_bundle import main

    assert main(str(toy_bundle)) == 0
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    (broken / "LICENSE").unlink()
    assert main(str(broken)) == 1
    out = capsys.readouterr().out
    assert f"{toy_bundle}: OK" in out and f"{broken}: 1 problem" in out and "LICENSE" in out


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_fails(toy_bundle, tmp_path, missing):
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    (broken / missing).unlink()
    problems = check_bundle(broken, run_cli=False)
    assert any(missing in p for p in problems), problems


@pytest.mark.parametrize(
    "field, mutate, expected",
    [
        ("modality", lambda m: m["network_data_format"]["inputs"]["image"].pop("modality"), "modality"),
        ("channel_def", lambda m: m["network_data_format"]["outputs"]["pred"].pop("channel_def"), "channel_def"),
        ("is_patch_data", lambda m: m["network_data_format"]["inputs"]["image"].pop("is_patch_data"), "is_patch_data"),
        ("changelog", lambda m: m.__setitem__("changelog", {"0.0.1": "old"}), "changelog"),
        ("references", lambda m: m.pop("references"), "references"),
        ("pred key", lambda m: m["network_data_format"].__setitem__(
            "outputs", {"seg": m["network_data_format"]["outputs"]["pred"]}), "pred"),
    ],
)
def test_broken_metadata_fails_verify_metadata(toy_bundle, tmp_path, field, mutate, expected):
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    mutate(meta)
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    problems = check_bundle(broken, run_cli=True)
    assert problems and any(expected in p for p in problems), problems


def test_missing_deviations_section_fails(toy_bundle, tmp_path):
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    (broken / "docs" / "README.md").write_text("# Toy\n\nno such section\n")
    assert any("Deviations" in p for p in check_bundle(broken, run_cli=False))


def test_missing_workflow_property_fails(toy_bundle, tmp_path):
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    train = json.loads((broken / "configs" / "train.json").read_text())
    del train["train"]["inferer"]
    train["train"]["trainer"]["inferer"] = {"_target_": "SimpleInferer"}  # still runs, but the property is gone
    (broken / "configs" / "train.json").write_text(json.dumps(train))
    problems = check_bundle(broken, run_cli=False)
    assert any("train_inferer" in p for p in problems), problems


def test_unparseable_config_fails(toy_bundle, tmp_path):
    broken = shutil.copytree(toy_bundle, tmp_path / "broken")
    (broken / "configs" / "evaluate.json").write_text("{not json")
    assert any("evaluate.json" in p for p in check_bundle(broken, run_cli=False))
