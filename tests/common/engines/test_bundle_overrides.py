"""check_overrides: unknown `--key` overrides of `python -m monai.bundle run` fail with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.engines.bundle import check_overrides, override_keys

MAIN = os.path.join("x", "site-packages", "monai", "bundle", "__main__.py")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "train.json"
    trainer = {"_target_": "SupervisedTrainer", "max_epochs": "@epochs"}
    path.write_text(json.dumps({"epochs": 2, "train": {"trainer": trainer}, "device": "cpu"}))
    return str(path)


def test_override_keys_parses_run_command_lines(config):
    files, keys = override_keys(["run", "--config_file", f"['{config}']", "--epochs", "3", "--train#trainer#amp=1"])
    assert files == [config] and keys == ["epochs", "train#trainer#amp"]
    files, keys = override_keys(["run", f"--config_file={config}", "--meta_file", "m.json", "--device", "cpu"])
    assert files == [config] and keys == ["device"]


def test_known_and_nested_keys_pass(config):
    assert check_overrides([MAIN, "run", "--config_file", config, "--epochs", "3", "--train#trainer#max_epochs", "1"])


def test_unknown_key_fails_with_suggestion(config):
    with pytest.raises(ValueError, match=r"--epohcs \(did you mean --epochs\?\)"):
        check_overrides([MAIN, "run", "--config_file", config, "--epohcs", "3"])
    with pytest.raises(ValueError, match=r"--train#trainer#max_epoch \(did you mean train#trainer#max_epochs\?"):
        check_overrides([MAIN, "run", "--config_file", config, "--train#trainer#max_epoch", "3"])


@pytest.fixture
def component_config(tmp_path):
    """A config whose parts are a component with named arguments, one taking **kwargs, a plain dict, a list and an
    expression: the shapes of the bundles' ``network_def``/``scoring_def``/``train#handlers``."""
    path = tmp_path / "nested.json"
    path.write_text(json.dumps({
        "net": {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 2},
        "built": {"_target_": "common.networks.factory.build_segmentation_network", "name": "botm"},
        "opts": {"depth": 2},
        "handlers": [{"_target_": "StatsHandler"}],
        "expr": "$dict(a=1)",
        "alias": "@net",
    }))
    return str(path)


def test_new_nested_key_accepted_when_the_target_takes_it(component_config):
    run = [MAIN, "run", "--config_file", component_config]
    # BasicUNet has a `features` argument that the config does not set; MONAI merges it and the target accepts it
    assert check_overrides(run + ["--net#features", "[4,4,8,16,32,4]", "--net#_disabled_", "True"])
    # the target takes **kwargs (botm's network factory): any new argument is the target's to check
    assert check_overrides(run + ["--built#use_ot", "False", "--built#sinkhorn_iters", "3"])
    # a plain dict takes any new key, a list an existing index
    assert check_overrides(run + ["--opts#width", "3", "--handlers#0#tag_name", "x"])


def test_nested_key_rejected_when_monai_cannot_merge_or_the_target_refuses(component_config):
    run = [MAIN, "run", "--config_file", component_config]
    with pytest.raises(ValueError, match=r"--net#featurs \(did you mean net#features\?.*BasicUNet"):
        check_overrides(run + ["--net#featurs", "[4]"])
    with pytest.raises(ValueError, match=r"--nett#features \(no config file defines 'nett'; did you mean net\?"):
        check_overrides(run + ["--nett#features", "[4]"])
    with pytest.raises(ValueError, match=r"--expr#a \('expr' is an expression .*override the whole --expr"):
        check_overrides(run + ["--expr#a", "2"])
    with pytest.raises(ValueError, match=r"--alias#features \('alias' is a reference to @net: override --net#feat"):
        check_overrides(run + ["--alias#features", "[4]"])
    with pytest.raises(ValueError, match=r"--handlers#3#tag_name \(its parent id 'handlers#3' does not exist"):
        check_overrides(run + ["--handlers#3#tag_name", "x"])


def test_inactive_outside_monai_bundle_cli(config):
    assert check_overrides(["pytest", "--epohcs", "3"]) is False


def test_real_cli_reports_unknown_key(config, tmp_path):
    cfg = json.loads(open(config).read())
    cfg["initialize"] = ["$common.engines.bundle.check_overrides()"]
    cfg["imports"] = ["$import common", "$import common.engines.bundle"]
    cfg["run"] = ["$print('ran', @epochs)"]
    path = tmp_path / "cli.json"
    path.write_text(json.dumps(cfg))
    ok = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(path), "--epochs", "5"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ran 5" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(path), "--epoch", "5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown override key(s): --epoch" in bad.stderr
