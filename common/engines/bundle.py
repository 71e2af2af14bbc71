"""Helpers called from the bundles' JSON configs.

``check_overrides()`` makes ``python -m monai.bundle run ... --epochs 3 --epohcs 5`` fail with a clear message
instead of silently adding an unused key: MONAI merges any ``--key value`` into the config without checking it.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from collections.abc import Sequence

__all__ = ["RUN_ARGUMENTS", "check_overrides", "override_keys"]

# the named arguments of `monai.bundle run` (and torchrun's re-invocation of it): not config overrides
RUN_ARGUMENTS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
     "workflow_type", "workflow_name", "properties_path"}
)


def override_keys(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a ``monai.bundle run`` command line into (config files, override keys)."""
    files: list[str] = []
    keys: list[str] = []
    args = list(argv)
    for i, tok in enumerate(args):
        if not tok.startswith("--") or len(tok) == 2:
            continue
        key, _, inline = tok[2:].partition("=")
        key = key.replace("-", "_") if key in ("config-file", "meta-file", "logging-file") else key
        if key == "config_file":
            value = inline or (args[i + 1] if i + 1 < len(args) else "")
            try:
                parsed = ast.literal_eval(value) if value.strip().startswith(("[", "(")) else value
            except (ValueError, SyntaxError):
                parsed = value
            files += [str(p) for p in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
        elif key not in RUN_ARGUMENTS:
            keys.append(key)
    return files, keys


def check_overrides(argv: Sequence[str] | None = None, allowed: Sequence[str] = ()) -> bool:
    """Raise ``ValueError`` naming any ``--key`` override that no config file defines.

    Only acts when the process is ``python -m monai.bundle`` (``argv`` defaults to ``sys.argv``), so
    in-process workflows built by tests or tools are unaffected. Returns True when the check ran.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        return False
    files, keys = override_keys(argv[1:])
    if not files or not keys:
        return True
    parser = ConfigParser(ConfigParser.load_config_files(files))
    unknown = [k for k in keys if k not in allowed and k not in parser]
    if unknown:
        known = [k for k in parser.get().keys() if isinstance(k, str)]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.split("#")[0], known, n=3)
            hints.append(f"--{k}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
        raise ValueError(
            f"unknown override key(s): {'; '.join(hints)}. The config files {files} define no such id; "
            "nested ids are written with '#', e.g. --train#trainer#max_epochs 2."
        )
    return True
