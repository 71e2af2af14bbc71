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
    path.write_text(json.dumps({"epochs": 2, "train": {"trainer": {"max_epochs": "@epochs"}}, "device": "cpu"}))
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
    with pytest.raises(ValueError, match="train#trainer#max_epoch"):
        check_overrides([MAIN, "run", "--config_file", config, "--train#trainer#max_epoch", "3"])


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
