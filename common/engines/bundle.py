"""Helpers called from the bundles' JSON configs.

``check_overrides()`` makes ``python -m monai.bundle run ... --epochs 3 --epohcs 5`` fail with a clear message
instead of silently adding an unused key: MONAI merges any ``--key value`` into the config without checking it.
A nested override (``--network_def#use_ot False``) is accepted when MONAI can merge it and its target takes it:
the parent id exists and is a dict, and, when that dict has a ``_target_``, the target takes an argument of that
name (or ``**kwargs``).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import pydoc
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["RUN_ARGUMENTS", "check_overrides", "end_distributed", "override_keys", "override_problem",
           "target_arguments"]

# the named arguments of `monai.bundle run` (and torchrun's re-invocation of it): not config overrides
RUN_ARGUMENTS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
     "workflow_type", "workflow_name", "properties_path"}
)
# keys MONAI itself reads in any component dict (`_target_`, `_disabled_`, `_requires_`, `_desc_`, `_mode_`)
_RESERVED_PREFIX = "_"


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


def target_arguments(target: str) -> list[str] | None:
    """Argument names the ``_target_`` of a config component accepts; None when it takes ``**kwargs`` (anything)
    or cannot be inspected here (then the component's own instantiation reports a bad argument)."""
    from monai.bundle.config_item import ComponentLocator

    # MONAI resolves short names ("Compose", "SupervisedTrainer") through its component locator, others by path
    module = ComponentLocator().get_component_module_name(target)
    if isinstance(module, list):
        module = module[0]
    obj = pydoc.locate(f"{module}.{target}" if module else target)
    if obj is None:
        return None
    # a class whose __init__ passes **kwargs on to its base (an adapter subclass) takes the base's arguments too
    callables = [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    names: list[str] = []
    for func in callables:
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature
            return None
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def override_problem(parser: Any, key: str) -> str | None:
    """Why MONAI cannot apply ``--key`` to the merged config in ``parser`` (a ``ConfigParser``), or None if it can.

    A key that exists is fine. A new key is fine under an existing dict parent (MONAI adds it) unless the parent
    is a component whose ``_target_`` takes no argument of that name; an expression (``$...``) or reference
    (``@...``) parent has no parts to override.
    """
    if key in parser:
        return None
    parent_id, sep, leaf = key.rpartition("#")
    if not sep:
        return "no config file defines this id"
    if parent_id not in parser:
        top = key.split("#")[0]
        if top not in parser:
            known = [k for k in parser.get().keys() if isinstance(k, str)]
            close = difflib.get_close_matches(top, known, n=3)
            return f"no config file defines '{top}'" + (f"; did you mean {', '.join(close)}?" if close else "")
        return f"its parent id '{parent_id}' does not exist"
    parent = parser[parent_id]
    if isinstance(parent, dict):
        target = parent.get("_target_")
        if not isinstance(target, str) or target.startswith(("$", "@")) or leaf.startswith(_RESERVED_PREFIX):
            return None
        accepted = target_arguments(target)
        if accepted is None or leaf in accepted:
            return None
        close = difflib.get_close_matches(leaf, accepted, n=3)
        hint = f"did you mean {', '.join(parent_id + '#' + c for c in close)}? " if close else ""
        return f"{hint}'{parent_id}' builds {target}, which takes no argument '{leaf}' (it takes {accepted})"
    if isinstance(parent, list):
        return f"'{parent_id}' is a list of {len(parent)} items: '{leaf}' is not one of its indices"
    if isinstance(parent, str) and parent.startswith("$"):
        return (f"'{parent_id}' is an expression ({parent[:60]}...), not a dict: override the whole "
                f"--{parent_id} instead")
    if isinstance(parent, str) and parent.startswith("@"):
        return f"'{parent_id}' is a reference to {parent}: override --{parent[1:]}#{leaf} instead"
    return f"'{parent_id}' is a {type(parent).__name__} value, not a dict"


def check_overrides(argv: Sequence[str] | None = None, allowed: Sequence[str] = ()) -> bool:
    """Raise ``ValueError`` naming any ``--key`` override that the merged config files cannot take.

    Top-level keys must be defined by a config file (a misspelt ``--epohcs`` fails with a suggestion); nested keys
    follow :func:`override_problem`. Only acts when the process is ``python -m monai.bundle`` (``argv`` defaults
    to ``sys.argv``), so in-process workflows built by tests or tools are unaffected. Returns True when the check
    ran.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
        return False
    files, keys = override_keys(argv[1:])
    if not files or not keys:
        return True
    parser = ConfigParser(ConfigParser.load_config_files(files))
    problems = {k: override_problem(parser, k) for k in keys if k not in allowed}
    problems = {k: p for k, p in problems.items() if p is not None}
    if problems:
        known = [k for k in parser.get().keys() if isinstance(k, str)]
        hints = []
        for k, why in problems.items():
            if "#" not in k:
                close = difflib.get_close_matches(k, known, n=3)
                hints.append(f"--{k}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
            else:
                hints.append(f"--{k} ({why})")
        raise ValueError(
            f"unknown override key(s): {'; '.join(hints)}. The config files {files} define no such id; "
            "nested ids are written with '#', e.g. --train#trainer#max_epochs 2."
        )
    return True


def end_distributed() -> None:
    """Leave the process group at the end of a multi-process run (the ``finalize`` of the ``multi_gpu_*`` configs).

    Every rank first waits at a barrier: a rank that finishes early (no checkpoint to save) and destroys its gloo
    group while rank 0 still talks to it can abort the process ("terminate called without an active exception"),
    which fails the whole torchrun although the run itself completed. Does nothing outside a distributed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
