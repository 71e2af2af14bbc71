"""Every ``python -m monai.bundle ...`` command that ``README.md`` and ``bundles/*/docs/README.md`` show works.

How a documented command becomes a test run (one rule set for every command, present and future):

1. **Where commands are found**: fenced code blocks and inline ``code`` spans. A command starts at
   ``python -m monai.bundle`` or ``torchrun ... -m monai.bundle``; a trailing ``\\`` joins the next line; a
   trailing ``# comment`` is dropped. Python calls such as ``monai.bundle.verify_net_in_out(...)`` and mentions
   (no arguments, or placeholder config files: ``python -m monai.bundle run --config_file .../inference.json``) are
   not commands.
2. **Working directory**: the repository root; a command whose config files exist only relative to its README's
   bundle folder (``configs/train.json`` after ``cd bundles/<b>``) runs in that bundle folder.
3. **Optional groups** ``[--key value]`` are part of the command (brackets removed).
4. **Placeholders** are dropped, so the config's own default (the synthetic default dataset, a synthetic case) is
   used: a value in ``<...>`` or containing ``...``, or a path (``/data/CAMUS``, ``/path/to/x``, ``ed.nii.gz``,
   ``models/checkpoint.pt``) that does not exist, together with its ``--key``; a bare ``<same overrides>`` too.
   (So ``--resume_from models/checkpoint.pt`` is checked as an accepted knob; resuming itself has its own tests.)
5. **Outputs** never land in the repository: ``--bundle_root``, ``--output_dir``, ``--ckpt_dir`` and ``--filepath``
   point into a fresh temporary folder per command.
6. **Tiny sizes**: the bundle's ``TINY`` overrides below (those its configs have) are appended and win over the
   command's values of the same keys; when the command picks another network (``--network_def#name``,
   ``--architecture``) the tiny settings of the default network are replaced by that network's (or dropped).
   ``--device cuda...`` becomes ``cpu`` (this machine has no GPU).
   Synthetic defaults are small ones generated once under a temporary ``CARDIAC_DATA_DIR``.
7. **How it runs**:

   * a ``run`` command with a nested override (``--network_def#use_ot False``) really runs, end to end, as the
     ``python -m monai.bundle`` subprocess a user types;
   * every other ``run`` command (``torchrun`` ones as one process with gloo) is checked in-process: the override
     check of the CLI (``check_overrides`` on its command line), ``initialize``, and every component its ``run``
     list uses is built (datasets, network, trainer/evaluator and their handlers) — everything but the loop;
   * other sub-commands (``verify_net_in_out``, ``ckpt_export``, ``verify_metadata``) are parsed: the function
     exists, each ``--arg`` is one of its parameters or an override the configs accept, the files exist (their
     execution is the model-zoo check's test).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted(REPO.glob("bundles/*/docs/README.md"))]
MAIN = os.path.join("x", "monai", "bundle", "__main__.py")  # what check_overrides recognises as the CLI

# rule 6: per bundle, the overrides that make any command of it tiny
TINY: dict[str, dict[str, Any]] = {
    "botm_seg": {
        "network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1],
        "network_def#num_heads": [1, 1, 2, 2], "network_def#decoder_width": 16, "network_def#sinkhorn_iters": 5,
        "network_def#botm_reductions": [2, 1, 1, 1], "spatial_size": [64, 64], "num_workers": 0, "batch_size": 4,
        "epochs": 1, "cache_rate": 1.0,
    },
    "adacs_registration": {
        "network_def#estimator#enc_channels": [8] * 4, "network_def#estimator#dec_channels": [8] * 7,
        "network_def#estimator#integration_steps": 3, "scoring_def#enc_channels": [8] * 4,
        "scoring_def#dec_channels": [8] * 7, "spatial_size": [64, 64], "epochs": 1, "batch_size": 4,
        "torch_threads": 1,
    },
    "lssc_multimodal": {
        "spatial_size": 64, "pixdim": [2.4, 2.4, 2.4], "embed_dim": 12, "num_heads": [1, 2, 4, 8],
        "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "window_size": 4, "batch_size": 2, "epochs": 1,
        "epoch_length": 2, "val_interval": 1, "augment_prob": 0.0, "torch_threads": 1,
    },
    "specknet_tracking": {"spatial_size": 64, "clip_len": 12, "segment_overlap": 0.0, "batch_size": 2, "epochs": 1,
                          "val_interval": 1, "phantom_size": 48, "phantom_frames": 12},
}
# rule 6: a command choosing another network: (switch key, prefix of the tiny keys it invalidates, tiny per value)
NETWORK_SWITCH: dict[str, tuple[str, str, dict[str, dict[str, Any]]]] = {
    "botm_seg": ("network_def#name", "network_def#", {}),
    "adacs_registration": ("architecture", "network_def#estimator#", {
        "transmorph": {"network_def#estimator#embed_dim": 8, "network_def#estimator#depths": [1, 1],
                       "network_def#estimator#num_heads": [1, 1], "network_def#estimator#window_size": 4}}),
}
OUTPUT_KEYS = ("bundle_root", "output_dir", "ckpt_dir", "filepath")
RUN_FILE_KEYS = ("config_file", "meta_file", "logging_file")


# ------------------------------------------------------------------------------------------------ extraction
@dataclass
class DocCommand:
    """One documented command: where it is, its text and its parsed parts."""

    doc: Path
    line: int
    text: str
    launcher: str = "python"  # or "torchrun"
    subcommand: str = ""
    positional: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc}:{self.line}"


def _strip_comment(line: str) -> str:
    """``line`` without a shell ``# comment`` (a ``#`` after whitespace, outside quotes; ids like a#b stay)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _unbracket_optional(text: str) -> str:
    """Rule 3: ``[--key value]`` -> ``--key value`` (quoted values may hold brackets of their own)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("[--", i) and (i == 0 or text[i - 1].isspace()):
            depth, quote, j = 0, None, i
            while j < len(text):
                ch = text[j]
                if quote:
                    quote = None if ch == quote else quote
                elif ch in "'\"":
                    quote = ch
                elif ch == "[":
                    depth += 1
                elif ch == "]":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            out.append(text[i + 1 : j])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _is_command(text: str) -> bool:
    return bool(re.match(r"(python3? -m monai\.bundle\b|torchrun\b.*\s-m monai\.bundle\b)", text))


def extract_commands(markdown: str, doc: Path) -> list[DocCommand]:
    """Rule 1: the documented ``monai.bundle`` commands of a Markdown text, in order."""
    found: list[tuple[int, str]] = []
    lines = markdown.splitlines()
    in_block, i = False, 0
    prose: list[tuple[int, str]] = []
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_block = not in_block
            i += 1
            continue
        if not in_block:
            prose.append((i + 1, line))
            i += 1
            continue
        start = i
        text = _strip_comment(line.strip())
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + _strip_comment(lines[i].strip())
        if _is_command(text):
            found.append((start + 1, text))
        i += 1
    # inline spans may wrap over prose lines: join the prose, remember each span's line
    joined = "\n".join(t for _, t in prose)
    starts = [0]
    for _, t in prose:
        starts.append(starts[-1] + len(t) + 1)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        text = " ".join(m.group(1).split())
        if _is_command(text):
            k = max(j for j, s in enumerate(starts) if s <= m.start())
            found.append((prose[min(k, len(prose) - 1)][0], text))
    commands = [parse_command(text, doc, line) for line, text in sorted(found)]
    # a mention, not a command: no arguments, or config files given as a placeholder (`.../inference.json`)
    return [c for c in commands if (c.options or c.positional)
            and not re.search(r"\.\.\.|<", c.options.get("config_file", ""))]


def parse_command(text: str, doc: Path, line: int = 0) -> DocCommand:
    """Split a command into launcher, sub-command, positional arguments and ``--key value`` options (rule 3)."""
    cmd = DocCommand(doc=doc, line=line, text=text)
    # a placeholder such as <tracking folder> is one token
    text = re.sub(r"<([^<>]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", _unbracket_optional(text))
    tokens = shlex.split(text)
    m = tokens.index("-m")
    cmd.launcher = "torchrun" if tokens[0] == "torchrun" else "python"
    rest = tokens[m + 2 :]
    cmd.subcommand = rest[0] if rest else ""
    i = 1
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if not eq:
                has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
                value = rest[i + 1] if has_value else "True"
                i += int(has_value)
            cmd.options[key.replace("-", "_") if key in ("config-file", "meta-file") else key] = value
        elif tok.startswith("<") or tok.endswith(">"):
            cmd.dropped.append(tok)  # rule 4: "<same overrides>"
        else:
            cmd.positional.append(tok)
        i += 1
    return cmd


def documented_commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in extract_commands(doc.read_text(), doc)]


# -------------------------------------------------------------------------------------------------- rewriting
def _config_files(value: str) -> list[str]:
    value = value.strip()
    parsed = ast.literal_eval(value) if value.startswith(("[", "(")) else value
    return [str(p) for p in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]


def _bundle_and_cwd(cmd: DocCommand) -> tuple[str | None, Path]:
    """Rule 2: the bundle a command belongs to and the folder it runs in."""
    files = _config_files(cmd.options["config_file"]) if "config_file" in cmd.options else []
    doc_bundle = cmd.doc.parent.parent if cmd.doc.parent.name == "docs" else None
    cwd = REPO
    if files and doc_bundle is not None and not (REPO / files[0]).exists() and (doc_bundle / files[0]).exists():
        cwd = doc_bundle
    bundle = None
    for f in files:
        path = (cwd / f).resolve()
        if path.parent.name == "configs" and path.parent.parent.parent == REPO / "bundles":
            bundle = path.parent.parent.name
    return bundle, cwd


def _is_placeholder(value: str, cwd: Path) -> bool:
    """Rule 4: ``<...>``, ``...``, or a path that does not exist."""
    if "<" in value and ">" in value or "..." in value:
        return True
    if value.startswith(("$", "[", "{", "(", "%", "@")) or re.fullmatch(r"[-+\d.e]+", value):
        return False
    looks_like_path = value.startswith(("/", "./", "~")) or "/" in value or re.search(r"\.[A-Za-z]{2,4}$", value)
    return bool(looks_like_path) and not (cwd / os.path.expanduser(value)).exists()


@dataclass
class Prepared:
    """A documented command rewritten by rules 4-6, ready to run."""

    cmd: DocCommand
    bundle: str | None  # None for a command outside the bundles (no tiny overrides)
    cwd: Path
    options: dict[str, str]  # as typed (strings), rewritten
    tiny: dict[str, Any]     # rule 6, Python values
    dropped: list[str]       # rule 4, the placeholders left out


def prepare(cmd: DocCommand, tmp: Path) -> Prepared:
    """Rules 2 and 4-6: where ``cmd`` runs, without placeholders, outputs under ``tmp``, tiny sizes."""
    bundle, cwd = _bundle_and_cwd(cmd)
    options: dict[str, str] = {}
    dropped = list(cmd.dropped)
    for key, value in cmd.options.items():
        if key in OUTPUT_KEYS:
            continue  # rule 5, set below
        if key not in RUN_FILE_KEYS and _is_placeholder(value, cwd):
            dropped.append(f"--{key} {value}")
            continue
        if key == "device" and "cuda" in value:
            value = "cpu"
        options[key] = value
    if cmd.subcommand == "run":
        options.update({"bundle_root": str(tmp / "root"), "output_dir": str(tmp / "out"),
                        "ckpt_dir": str(tmp / "models")})
    elif "filepath" in cmd.options:
        options["filepath"] = str(tmp / Path(cmd.options["filepath"]).name)
    tiny = dict(TINY.get(bundle or "", {})) if cmd.subcommand == "run" else {}
    if bundle in NETWORK_SWITCH:
        switch, prefix, variants = NETWORK_SWITCH[bundle]
        if switch in options:
            tiny = {k: v for k, v in tiny.items() if not k.startswith(prefix)}
            tiny.update(variants.get(options[switch], {}))
    if tiny:  # only the knobs these configs have (inference has no epochs)
        from monai.bundle import ConfigParser

        from common.engines.bundle import override_problem

        files = [str(cwd / f) for f in _config_files(options["config_file"])] if "config_file" in options else []
        parser = ConfigParser(ConfigParser.load_config_files(files)) if files else None
        tiny = {k: v for k, v in tiny.items() if parser is not None and override_problem(parser, k) is None}
        if "spatial_size" in tiny and parser is not None:  # a 3D command (three-entry spatial_size) stays 3D
            from fire.parser import DefaultParseValue

            size = DefaultParseValue(options["spatial_size"]) if "spatial_size" in options else parser.get(
                "spatial_size")
            if isinstance(size, (list, tuple)) and len(size) == 3:
                tiny["spatial_size"] = [32, 32, 32]  # the smallest size the 4-level U-Nets train at
    return Prepared(cmd=cmd, bundle=bundle, cwd=cwd, options=options, tiny=tiny, dropped=dropped)


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def cli_args(p: Prepared) -> list[str]:
    """The rewritten command line after the sub-command (tiny overrides win)."""
    merged = {**p.options, **{k: _cli_value(v) for k, v in p.tiny.items()}}
    return [*p.cmd.positional, *[a for k, v in merged.items() for a in (f"--{k}", v)]]


def overrides(p: Prepared) -> dict[str, Any]:
    """The rewritten config overrides as Python values, parsed as ``python -m monai.bundle`` (fire) parses them."""
    from fire.parser import DefaultParseValue

    out = {k: DefaultParseValue(v) for k, v in p.options.items() if k not in RUN_FILE_KEYS}
    return {**out, **p.tiny}


# --------------------------------------------------------------------------------------------------- running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ids(parser) -> list[str]:
    """Ids of the components the config's ``run`` list uses (``$@train#trainer.run()`` -> ``train#trainer``)."""
    ids: list[str] = []
    for expr in parser.get("run", []) or []:
        for ref in re.findall(r"@([\w#]+)", str(expr)):
            if ref not in ids:
                ids.append(ref)
    return ids


def build_in_process(p: Prepared, monkeypatch) -> list[str]:
    """Rule 7, second case: CLI override check, ``initialize``, build every component of ``run``; returns the ids."""
    import torch.distributed as dist
    from monai.bundle import ConfigWorkflow

    from common.engines.bundle import check_overrides

    files = [str((p.cwd / f).resolve()) for f in _config_files(p.options["config_file"])]
    monkeypatch.chdir(p.cwd)  # config paths and relative values are as typed in this folder
    argv = [MAIN, "run", *cli_args(p)]
    assert check_overrides(argv), argv
    if p.cmd.launcher == "torchrun":
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
            monkeypatch.setenv(k, v)
    kwargs = {k: str((p.cwd / p.options[k]).resolve()) for k in ("meta_file",) if k in p.options}
    wf = ConfigWorkflow(config_file=files, logging_file=False, **kwargs, **overrides(p))
    try:
        wf.initialize()
        ids = _run_ids(wf.parser)
        for rid in ids:
            wf.parser.get_parsed_content(rid)
    finally:
        if dist.is_initialized():
            import ignite.distributed as idist

            # ignite adopts a process group once it sees one and keeps it: hand it over and let ignite destroy it,
            # which also returns ignite to its serial mode for the commands (and test modules) that follow
            idist.sync()
            idist.finalize()
    return ids


def run_subprocess(p: Prepared, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Rule 7, first case: the command as typed, rewritten, in a ``python -m monai.bundle`` process."""
    cmd = [sys.executable, "-m", "monai.bundle", p.cmd.subcommand, *cli_args(p)]
    return subprocess.run(cmd, cwd=p.cwd, env=env, capture_output=True, text=True, timeout=600)


def parse_only(p: Prepared) -> None:
    """Rule 7, third case: the sub-command exists and every argument is a parameter of it or an accepted override."""
    import monai.bundle
    from monai.bundle import ConfigParser

    from common.engines.bundle import override_problem

    func = getattr(monai.bundle, p.cmd.subcommand, None)
    assert callable(func), f"{p.cmd.where}: monai.bundle has no command {p.cmd.subcommand!r}"
    params = inspect.signature(func).parameters
    files = [(p.cwd / f) for f in _config_files(p.options["config_file"])] if "config_file" in p.options else []
    for key in RUN_FILE_KEYS:
        for f in _config_files(p.options[key]) if key in p.options else []:
            assert (p.cwd / f).is_file(), f"{p.cmd.where}: --{key} {f} does not exist (from {p.cwd})"
    parser = ConfigParser(ConfigParser.load_config_files([str(f) for f in files])) if files else None
    extra = [k for k in p.options if k not in params]
    if extra:
        assert parser is not None, f"{p.cmd.where}: {p.cmd.subcommand} takes no {extra} and no config is given"
        problems = {k: override_problem(parser, k) for k in extra}
        assert not any(problems.values()), f"{p.cmd.where}: unknown override(s) {problems}"
    net_id = p.cmd.positional[0] if p.cmd.positional else p.options.get("net_id")
    if net_id is not None and parser is not None:
        assert net_id in parser, f"{p.cmd.where}: the configs define no {net_id!r}"


def nested(p: Prepared) -> bool:
    return any("#" in k for k in p.cmd.options)


def check(p: Prepared, env: dict[str, str], monkeypatch) -> str:
    """Run one prepared command by rule 7; returns how it was checked. Raises ``AssertionError`` on failure."""
    if p.cmd.subcommand != "run":
        parse_only(p)
        return "parsed"
    assert "config_file" in p.options, f"{p.cmd.where}: no --config_file in {p.cmd.text!r}"
    if nested(p) and p.cmd.launcher == "python":
        proc = run_subprocess(p, env)
        assert proc.returncode == 0, (f"{p.cmd.where}: `{p.cmd.text}` failed (exit {proc.returncode}):\n"
                                      f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        if "train.json" in p.options["config_file"] and "evaluate.json" not in p.options["config_file"]:
            # DESIGN: training logs TensorBoard events to output_dir
            assert list(Path(p.options["output_dir"]).glob("events.out.tfevents.*")), f"{p.cmd.where}: no events"
        return "ran"
    build_in_process(p, monkeypatch)
    return "built"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def small_defaults(tmp_path_factory) -> dict[str, str]:
    """A ``CARDIAC_DATA_DIR`` holding small synthetic defaults of every kind the bundles use (rule 6)."""
    from common.data.default import default_dataset_dir, generate_dataset

    cache = tmp_path_factory.mktemp("doc_cmd_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARDIAC_DATA_DIR", str(cache))
        small = {
            "camus": {"n_patients": 5, "image_size": (72, 64), "n_frames": 3},
            "ted": {"n_patients": 4, "image_size": (64, 72), "n_frames": 5},
            "acdc": {"n_patients": 4},
            "registration": {"n_pairs": 4},
            "registration3d": {"n_pairs": 5, "shape": (24, 24, 20)},
            "mmwhs": {"n_ct": 4, "n_mr": 4, "ct_shape": (48, 48, 32), "mr_shape": (40, 40, 28)},
            "abdomen": {"n_ct": 4, "n_mr": 4, "ct_shape": (48, 48, 20), "mr_shape": (48, 48, 14)},
            "tracking": {"n_videos": 4, "image_size": (96, 96), "n_frames": 24, "n_points": 10},
        }
        for kind, kwargs in small.items():
            generate_dataset(kind, default_dataset_dir(kind), progress=False, **kwargs)
    return {**os.environ, "CARDIAC_DATA_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# ------------------------------------------------------------------------------------------------------- tests
SAMPLE = """
Some prose with an inline command `python -m monai.bundle run --config_file
configs/train.json --epochs 2` that wraps.

```bash
cd bundles/specknet_tracking
python -m monai.bundle run --config_file configs/train.json \\
    --network_def#gamma 10.0 [--dataset_dir /data/tracking_h5]   # a comment with --fake 1
torchrun --standalone --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['configs/train.json','configs/multi_gpu_train.json']" <same overrides>
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m tools.synth echo --out data   # not a monai.bundle command
```
"""


def test_extractor_reads_blocks_continuations_inline_spans_and_placeholders(tmp_path):
    doc = REPO / "bundles" / "specknet_tracking" / "docs" / "README.md"
    cmds = extract_commands(SAMPLE, doc)
    assert [c.subcommand for c in cmds] == ["run", "run", "run", "verify_net_in_out"]
    inline, block, ddp, verify = cmds
    assert inline.line == 2 and inline.options == {"config_file": "configs/train.json", "epochs": "2"}
    assert block.options == {"config_file": "configs/train.json", "network_def#gamma": "10.0",
                             "dataset_dir": "/data/tracking_h5"}  # optional group kept, comment dropped
    assert ddp.launcher == "torchrun" and ddp.dropped == ["<same_overrides>"]
    assert verify.positional == ["network_def"]
    p = prepare(block, tmp_path)
    assert p.bundle == "specknet_tracking" and p.cwd == doc.parent.parent
    assert "dataset_dir" not in p.options and p.dropped == ["--dataset_dir /data/tracking_h5"]
    assert p.options["bundle_root"] == str(tmp_path / "root") and nested(p)
    assert p.tiny["spatial_size"] == 64 and "--network_def#gamma" in cli_args(p)


def test_a_broken_documented_command_fails(small_defaults, tmp_path, monkeypatch):
    """The checks fail for what a broken README would show: a misspelt knob, a bad nested override, a missing
    config file, an unknown sub-command argument, a nested override the network does not take."""
    monkeypatch.setenv("CARDIAC_DATA_DIR", small_defaults["CARDIAC_DATA_DIR"])
    doc = REPO / "bundles" / "specknet_tracking" / "docs" / "README.md"
    broken = {
        "python -m monai.bundle run --config_file configs/train.json --epohcs 2":
            r"unknown override key\(s\): --epohcs \(did you mean --epochs\?\)",
        "torchrun --nproc_per_node=2 -m monai.bundle run --config_file \"['configs/train.json',"
        "'configs/multi_gpu_train.json']\" --train#trainer#max_epoch 2": r"did you mean train#trainer#max_epochs\?",
    }
    for text, message in broken.items():
        with pytest.raises(ValueError, match=message):
            check(prepare(parse_command(text, doc), tmp_path / "b"), small_defaults, monkeypatch)
    missing = parse_command("python -m monai.bundle verify_net_in_out network_def --config_file configs/nope.json "
                            "--meta_file configs/metadata.json", doc)
    with pytest.raises(AssertionError, match="nope.json does not exist"):
        check(prepare(missing, tmp_path / "m"), small_defaults, monkeypatch)
    typo = parse_command("python -m monai.bundle ckpt_export network_def --config_file configs/inference.json "
                         "--use_trce True", doc)
    with pytest.raises(AssertionError, match="use_trce"):
        check(prepare(typo, tmp_path / "t"), small_defaults, monkeypatch)
    # really run (subprocess): the override check passes (the factory takes **kwargs) but the network refuses it
    bad_net = parse_command("python -m monai.bundle run --config_file configs/train.json --network_def#gama 1.0", doc)
    with pytest.raises(AssertionError, match=r"(?s)exit 1.*did you mean network_def#gamma\?"):
        check(prepare(bad_net, tmp_path / "n"), small_defaults, monkeypatch)


def test_the_extractor_finds_the_documented_commands():
    cmds = documented_commands()
    by_doc = {doc: [c for c in cmds if c.doc == doc] for doc in DOCS}
    assert all(by_doc.values()), {d.name: len(c) for d, c in by_doc.items()}  # every README documents commands
    assert any(c.launcher == "torchrun" for c in cmds)
    assert any(nested(prepare(c, Path("/nonexistent"))) for c in cmds if c.subcommand == "run")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", documented_commands(), ids=lambda c: c.where)
def test_documented_command_runs(cmd, small_defaults, tmp_path, monkeypatch):
    monkeypatch.setenv("CARDIAC_DATA_DIR", small_defaults["CARDIAC_DATA_DIR"])
    check(prepare(cmd, tmp_path), small_defaults, monkeypatch)


CANONICAL_TRAIN = ("dataset_dir", "output_dir", "ckpt_dir", "ckpt_path", "device", "epochs", "batch_size",
                   "learning_rate", "spatial_size", "val_fraction", "test_fraction", "split_seed", "resume_from")
CANONICAL_INFER = ("dataset_dir", "output_dir", "ckpt_dir", "ckpt_path", "device", "spatial_size", "input_path",
                   "strict")
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


def _parser(bundle: str, *names: str, **values: Any):
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser(ConfigParser.load_config_files([str(configs / n) for n in names]))
    parser.update(values)
    return parser


@pytest.mark.parametrize("bundle", BUNDLES)
def test_common_knobs_have_one_name_and_eval_split_all_is_every_case(bundle, small_defaults, monkeypatch):
    """The canonical knobs exist in every bundle, and ``--eval_split all`` evaluates every case of the folder: the
    union of the test, val and train cases, without a split."""
    monkeypatch.setenv("CARDIAC_DATA_DIR", small_defaults["CARDIAC_DATA_DIR"])
    evaluate = _parser(bundle, "train.json", "evaluate.json")
    missing = [k for k in (*CANONICAL_TRAIN, "eval_split") if k not in evaluate]
    missing += [f"inference.json:{k}" for k in CANONICAL_INFER if k not in _parser(bundle, "inference.json")]
    assert not missing, f"{bundle} lacks the common knob(s) {missing} (docs/BUNDLE_GUIDE.md)"
    assert evaluate["eval_split"] == "test"

    def cases(split: str) -> list[str]:
        datalist = _parser(bundle, "train.json", "evaluate.json", eval_split=split).get_parsed_content(
            "validate#datalist")
        return sorted(repr(sorted(e.items())) for e in datalist)

    everything = cases("all")
    parts = {s: cases(s) for s in ("train", "val", "test")}
    assert all(parts.values()) and sorted(sum(parts.values(), [])) == everything


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_logs_tensorboard_and_multi_gpu_picks_the_local_rank(bundle, monkeypatch):
    """TensorBoard events for the training loss and the validation metrics in every bundle; on GPUs each process
    takes the GPU of its LOCAL_RANK (the global RANK is larger than the node's GPU count on a second node)."""
    import torch

    train = _parser(bundle, "train.json")
    for section in ("train#handlers", "validate#handlers"):
        targets = [h.get("_target_") for h in train[section] if isinstance(h, dict)]
        tb = [h for h in train[section] if isinstance(h, dict) and h.get("_target_") == "TensorBoardStatsHandler"]
        assert tb and tb[0]["log_dir"] == "@output_dir", f"{bundle} {section}: no TensorBoard handler in {targets}"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "5")  # second node of a 2 x 4 GPU run
    for multi in ("multi_gpu_train.json", "multi_gpu_evaluate.json"):
        device = _parser(bundle, "train.json", multi).get_parsed_content("device")
        assert device == torch.device("cuda", 1), f"{bundle}/{multi}: device {device} for LOCAL_RANK=1, RANK=5"
