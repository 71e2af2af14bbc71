"""Bundle conformance checks: model-zoo layout, strict metadata, parseable configs, workflow properties.

Usage::

    python -m tools.check_bundle bundles/botm_seg          # one bundle
    python -m tools.check_bundle all                       # every folder under bundles/

Exits non-zero and lists every problem when a bundle does not conform.
"""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["REQUIRED_FILES", "STRICT_SCHEMA", "discover_bundles", "check_bundle", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
STRICT_SCHEMA = REPO_ROOT / "tools" / "schemas" / "bundle_metadata_strict.json"
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/multi_gpu_evaluate.json",
    "configs/logging.conf",
    "LICENSE",
    "docs/README.md",
)
DEVIATIONS_HEADING = "deviations and choices"


def discover_bundles(root: str | Path = REPO_ROOT / "bundles") -> list[Path]:
    """Every folder directly under ``root`` (hidden folders and ``__pycache__`` excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _verify_metadata_cli(meta_file: Path, schema: Path) -> str | None:
    """Run ``python -m monai.bundle verify_metadata`` against a local copy of ``schema``; return an error or None."""
    with tempfile.TemporaryDirectory() as tmp:
        # verify_metadata "downloads" the schema URL to --filepath unless a file is already there: give it ours
        local = Path(tmp) / schema.name
        shutil.copy(schema, local)
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
             "--filepath", str(local)],
            capture_output=True, text=True, timeout=300,
        )
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "Failed" in ln), lines[-1] if lines else "")
        return f"metadata.json fails verify_metadata against {schema.name}: {reason.strip()[:500]}"
    return None


def _schema_errors(meta: dict, schema: Path) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft201909Validator(json.loads(schema.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(meta)]


def _check_workflow(bundle: Path, workflow_type: str, config: str, overrides: dict) -> str | None:
    from monai.bundle import ConfigWorkflow

    try:
        wf = ConfigWorkflow(
            config_file=str(bundle / "configs" / config),
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            bundle_root=str(bundle),
            **overrides,
        )
        # properties are resolved from the parsed config, which needs `initialize` first (it also runs the
        # bundle's `initialize` expressions, so a broken expression is caught here too)
        wf.initialize()
        missing = wf.check_properties()
    except Exception as e:  # a broken config raises anything from the parser; report it, don't crash the harness
        return f"{config}: ConfigWorkflow({workflow_type!r}) failed: {type(e).__name__}: {e}"
    if missing is None:
        return f"{config}: ConfigWorkflow({workflow_type!r}) could not check properties"
    if missing:
        return f"{config}: missing {workflow_type} properties {missing}"
    return None


def check_bundle(bundle: str | Path, schema: str | Path = STRICT_SCHEMA, run_cli: bool = True,
                 overrides: dict | None = None) -> list[str]:
    """Return the list of conformance problems of one bundle folder (empty when it conforms).

    ``overrides`` are passed to ``ConfigWorkflow`` (e.g. ``{"dataset_dir": tmp}`` to keep the check's data apart).
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    problems: list[str] = []
    if not bundle.is_dir():
        return [f"{bundle}: not a directory"]
    for rel in REQUIRED_FILES:
        if not (bundle / rel).is_file():
            problems.append(f"missing {rel}")
    readme = bundle / "docs" / "README.md"
    if readme.is_file():
        headings = [ln.lstrip("#").strip().lower() for ln in readme.read_text().splitlines() if ln.startswith("#")]
        if not any(h.startswith(DEVIATIONS_HEADING) for h in headings):
            problems.append("docs/README.md has no 'Deviations and choices' section")
    meta_file = bundle / "configs" / "metadata.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            return problems + [f"configs/metadata.json is not valid JSON: {e}"]
        version = meta.get("version")
        if version not in (meta.get("changelog") or {}):
            problems.append(f"metadata.json changelog has no entry for the current version {version!r}")
        ndf = meta.get("network_data_format", {})
        if "image" not in ndf.get("inputs", {}):
            problems.append("metadata.json network_data_format.inputs has no 'image'")
        if "pred" not in ndf.get("outputs", {}):
            problems.append("metadata.json network_data_format.outputs has no 'pred'")
        err = _verify_metadata_cli(meta_file, Path(schema)) if run_cli else None
        detail = _schema_errors(meta, Path(schema))
        if err or detail:
            # the CLI only says that validation failed; list which fields fail so the author can fix them
            problems.append((err or f"metadata.json fails {Path(schema).name}") + ": " + "; ".join(detail))
    for cfg in sorted((bundle / "configs").glob("*.json")) if (bundle / "configs").is_dir() else []:
        try:
            ConfigParser.load_config_file(cfg)
        except Exception as e:
            problems.append(f"{cfg.name} does not parse: {e}")
    log_conf = bundle / "configs" / "logging.conf"
    if log_conf.is_file():
        cp = configparser.ConfigParser()
        try:
            cp.read(log_conf)
            if not cp.has_section("loggers"):
                problems.append("logging.conf has no [loggers] section")
        except configparser.Error as e:
            problems.append(f"logging.conf does not parse: {e}")
    if not problems:
        import tempfile

        # building the workflows creates output folders (TensorBoard writers, checkpoint savers): keep them out of
        # the bundle folder, whose models/ and eval/ belong to the user
        with tempfile.TemporaryDirectory(prefix="check-bundle-") as tmp:
            wf_overrides = {"output_dir": str(Path(tmp) / "eval"), "ckpt_dir": str(Path(tmp) / "models"),
                            **(overrides or {})}
            for wf_type, cfg in (("train", "train.json"), ("infer", "inference.json")):
                err = _check_workflow(bundle, wf_type, cfg, wf_overrides)
                if err:
                    problems.append(err)
    return problems


def main(*bundles: str) -> int:
    """Check the given bundle folders (or ``all``); print problems; exit code 1 if any bundle fails."""
    targets = discover_bundles() if not bundles or bundles == ("all",) else [Path(b) for b in bundles]
    failed = 0
    for b in targets:
        problems = check_bundle(b)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"{b}: {status}")
        for p in problems:
            print(f"  - {p}")
        failed += bool(problems)
    if not targets:
        print("no bundles found under bundles/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
