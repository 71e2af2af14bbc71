"""The MONAI model zoo's submission check (its ``ci/verify_bundle.py`` in ``full`` mode), done with MONAI's public API.

Usage::

    python -m tools.verify_bundle bundles/botm_seg        # one bundle
    python -m tools.verify_bundle all                     # every folder under bundles/
    python -m tools.verify_bundle all --mode min          # directory, version/changelog, metadata only

Steps, in the zoo's order (``min`` mode stops after the third):

1. ``directory``: ``configs/metadata.json`` and ``LICENSE`` exist, and an inference config
   (``configs/inference.{json,yaml,yml}``).
2. ``version``: ``version`` and ``changelog`` exist, the version is ``MAJOR.MINOR.PATCH``, has a changelog entry and
   is the newest entry (the zoo refuses a version it has already published).
3. ``metadata``: ``monai.bundle.verify_metadata`` against the model zoo's schema (vendored in ``tools/schemas`` for
   offline use; ``tools.check_bundle`` also checks the stricter project schema).
4. ``properties``: ``monai.bundle.ConfigWorkflow(workflow_type="inference")`` initialises and
   ``check_properties()`` reports no missing inference property.
5. ``net_in_out``: ``monai.bundle.verify_net_in_out`` with **default arguments** (``network_def`` of the inference
   config; a fake input from ``network_data_format`` with ``n = p = any = 1``; no extra forward arguments), as the
   zoo calls it.
6. ``export``: ``python -m monai.bundle ckpt_export network_def`` in a subprocess, as a user types it: TorchScript
   by scripting (the zoo's default), or, for the bundles in :data:`TRACE_EXPORT` (networks TorchScript cannot
   compile, as the zoo excludes its Swin bundles), by tracing (``--use_trace True --input_shape`` of the step-5
   input), which the bundle README's "Export" section must state. The exported file is then loaded and compared
   with the eager network on a new random input, and must carry the bundle metadata.

The weights exported are those of ``--ckpt_file``, else ``models/model.pt`` when it exists; without either, the
untrained network's weights (slightly jittered, so that no output is trivially near zero) are saved in the work
folder first, as the zoo's CI makes fake weights.
Nothing is written into the bundle folder: the inference workflow's outputs and the export go to ``--work_dir``
(a temporary folder by default).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.check_bundle import REPO_ROOT, discover_bundles

__all__ = [
    "MODES",
    "STEPS",
    "TRACE_EXPORT",
    "ZOO_SCHEMA",
    "StepResult",
    "fake_input_shape",
    "main",
    "verify_bundle",
]

ZOO_SCHEMA = REPO_ROOT / "tools" / "schemas" / "model_zoo_meta_schema.json"
STEPS = ("directory", "version", "metadata", "properties", "net_in_out", "export")
MODES = {"min": STEPS[:3], "full": STEPS}
NET_ID = "network_def"
# Bundles whose network TorchScript cannot compile, with the reason; they export by tracing (the model zoo keeps
# such bundles in its exclude_verify_torchscript_list and states the alternative in their README).
TRACE_EXPORT: dict[str, str] = {
    "botm_seg": "the Sinkhorn optimal-transport op and the MiT encoder use Python control flow that "
                "torch.jit.script rejects",
    "lssc_multimodal": "MONAI's PatchEmbed and Swin blocks (as in the model zoo's Swin bundles) are not scriptable",
    "specknet_tracking": "the cost-volume op dispatches in Python between a chunked, checkpointed PyTorch path and "
                         "Triton kernels (an autograd Function), which torch.jit.script rejects",
}
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass
class StepResult:
    """Outcome of one step: ``ok`` and a one-line ``detail`` (the reason when it failed)."""

    step: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"{self.step:<11} {'OK  ' if self.ok else 'FAIL'} {self.detail}".rstrip()


def _inference_config(bundle: Path) -> Path | None:
    for suffix in ("json", "yaml", "yml"):
        if (bundle / "configs" / f"inference.{suffix}").is_file():
            return bundle / "configs" / f"inference.{suffix}"
    return None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(v) for v in version.split("."))


def fake_input_shape(meta: str | Path | Mapping[str, Any], n: int = 1, p: int = 1, any: int = 1) -> list[int]:  # noqa: A002
    """``[1, num_channels, *spatial]`` of the input ``image`` that ``verify_net_in_out`` builds from the metadata
    (a ``metadata.json`` path or its parsed content; ``"32*n"`` -> ``32 * n``, ``"2**p"`` -> ``2 ** p``, ``"*"`` ->
    ``any``: MONAI's rule, same defaults)."""
    # the helper verify_net_in_out itself uses, so an export traced at this shape is the input step 5 verified
    from monai.bundle.scripts import _get_fake_spatial_shape

    meta = meta if isinstance(meta, Mapping) else json.loads(Path(meta).read_text())
    fmt = meta["network_data_format"]["inputs"]["image"]
    spatial = _get_fake_spatial_shape(fmt["spatial_shape"], p=p, n=n, any=any)
    return [1, int(fmt["num_channels"]), *(int(s) for s in spatial)]


def _export_section(readme: Path) -> str:
    """Text of the ``## Export`` section of a bundle README ('' when there is none)."""
    if not readme.is_file():
        return ""
    match = re.search(r"^## Export[ \t]*\n(.*?)(?=^## |\Z)", readme.read_text(), re.S | re.M)
    return match.group(1) if match else ""


def _cli_value(value: Any) -> str:
    """A config value as a ``monai.bundle`` CLI argument (python-fire reads Python literals)."""
    return repr(value) if isinstance(value, (list, tuple, dict)) else str(value)


class _Verifier:
    """One bundle's steps; each step raises with a clear message or returns a detail line."""

    def __init__(self, bundle: Path, work_dir: Path, ckpt_file: str | Path | None, overrides: Mapping[str, Any],
                 export_overrides: Mapping[str, Any], schema: Path, meta_file: Path | None = None) -> None:
        self.bundle = bundle
        self.work_dir = work_dir
        self.ckpt_file = None if ckpt_file is None else Path(ckpt_file)
        self.overrides = dict(overrides)
        self.export_overrides = {**self.overrides, **export_overrides}
        self.schema = schema
        self.meta_file = bundle / "configs" / "metadata.json" if meta_file is None else Path(meta_file)
        self.config_file = _inference_config(bundle)

    # 1
    def directory(self) -> str:
        missing = [f for f in ("configs/metadata.json", "LICENSE") if not (self.bundle / f).is_file()]
        if self.config_file is None:
            missing.append("configs/inference.json (or .yaml/.yml)")
        if missing:
            raise FileNotFoundError(f"{self.bundle}: missing {', '.join(missing)}")
        model = self.bundle / "models" / "model.pt"
        return "files present" + ("" if model.is_file() else "; no models/model.pt (not committed: weights come "
                                                             "from training, the export step makes its own)")

    # 2
    def version(self) -> str:
        meta = json.loads(self.meta_file.read_text())
        for key in ("version", "changelog"):
            if key not in meta:
                raise ValueError(f"{self.meta_file}: '{key}' is missing")
        version, changelog = str(meta["version"]), meta["changelog"]
        if not _SEMVER.match(version):
            raise ValueError(f"{self.meta_file}: version {version!r} is not MAJOR.MINOR.PATCH")
        if version not in changelog:
            raise ValueError(f"{self.meta_file}: version {version} has no entry in 'changelog'")
        bad = [v for v in changelog if not _SEMVER.match(str(v))]
        if bad:
            raise ValueError(f"{self.meta_file}: changelog keys {bad} are not MAJOR.MINOR.PATCH versions")
        newest = max(changelog, key=_version_key)
        if newest != version:
            raise ValueError(f"{self.meta_file}: version {version} is older than changelog entry {newest}; bump it")
        return f"version {version}"

    # 3
    def metadata(self) -> str:
        from monai.bundle import verify_metadata

        local = self.work_dir / "schema" / self.schema.name
        local.parent.mkdir(parents=True, exist_ok=True)
        # verify_metadata fetches the metadata's schema URL into `filepath` unless a file is already there
        shutil.copy(self.schema, local)
        verify_metadata(meta_file=str(self.meta_file), filepath=str(local))
        return f"valid against {self.schema.name}"

    # 4
    def properties(self) -> str:
        from monai.bundle import ConfigWorkflow

        workflow = ConfigWorkflow(
            config_file=str(self.config_file), meta_file=str(self.meta_file), logging_file=False,
            workflow_type="inference", bundle_root=str(self.bundle), **self._workflow_overrides(),
        )
        workflow.initialize()  # as the zoo's create_workflow: properties resolve from the initialised config
        missing = workflow.check_properties()
        if missing is None:
            raise RuntimeError("ConfigWorkflow could not check the inference properties")
        if missing:
            raise ValueError(f"{self.config_file.name} misses inference properties {missing}")
        return "inference properties present"

    # 5
    def net_in_out(self) -> str:
        from monai.bundle import verify_net_in_out

        # default arguments, as the zoo calls it: only the files, the bundle root and (tests only) overrides
        verify_net_in_out(net_id=NET_ID, meta_file=str(self.meta_file), config_file=str(self.config_file),
                          bundle_root=str(self.bundle), **self.overrides)
        return f"input {fake_input_shape(self.meta_file)} -> output channels and dtype as metadata.json"

    # 6
    def export(self) -> str:
        import torch

        name = self.bundle.name
        traced = name in TRACE_EXPORT
        if traced and "--use_trace" not in _export_section(self.bundle / "docs" / "README.md"):
            raise ValueError(f"{name} exports by tracing ({TRACE_EXPORT[name]}), but docs/README.md has no "
                             "'## Export' section showing `ckpt_export ... --use_trace True`")
        ckpt = self._checkpoint()
        shape = fake_input_shape(self._parser(self.export_overrides).get("_meta_"))
        out = self.work_dir / "export" / f"{name}.ts"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", NET_ID, "--filepath", str(out),
               "--ckpt_file", str(ckpt), "--meta_file", str(self.meta_file), "--config_file", str(self.config_file),
               "--bundle_root", str(self.bundle)]
        if traced:
            cmd += ["--use_trace", "True", "--input_shape", json.dumps(shape)]
        for key, value in self.export_overrides.items():
            cmd += [f"--{key}", _cli_value(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not out.is_file():
            tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-3:]
            raise RuntimeError(f"`{' '.join(cmd[1:5])} ...` failed (exit {proc.returncode}): {' | '.join(tail)}")

        extra = {"metadata.json": ""}
        program = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
        version = json.loads(extra["metadata.json"] or "{}").get("version")
        expected = json.loads(self.meta_file.read_text())["version"]
        if version != expected:
            raise ValueError(f"{out.name} carries metadata version {version!r}, expected {expected!r}")
        eager = self._network()
        eager.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        eager.eval()
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))  # not the tensor the export traced
        with torch.no_grad():
            want, got = eager(x), program(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"exported {out.name} differs from the eager network: {m}")
        how = "traced (--use_trace True: not scriptable)" if traced else "scripted"
        return (f"ckpt_export {how}; output equals the eager network on a {shape} input "
                f"(max |output| {float(want.abs().max()):.3g})")

    # helpers
    def _workflow_overrides(self) -> dict[str, Any]:
        # the inference workflow's outputs go to the work folder, never into the bundle
        return {"output_dir": str(self.work_dir / "eval"), **self.overrides}

    def _parser(self, overrides: Mapping[str, Any]):
        """The inference config with the metadata under ``_meta_`` and ``overrides`` applied, as MONAI's scripts
        read it."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(f=str(self.config_file))
        parser.read_meta(f=str(self.meta_file))
        parser["bundle_root"] = str(self.bundle)
        for key, value in overrides.items():
            parser[key] = value
        return parser

    def _network(self):
        return self._parser(self.export_overrides).get_parsed_content(NET_ID).to("cpu")

    def _checkpoint(self) -> Path:
        if self.ckpt_file is not None:
            if not self.ckpt_file.is_file():
                raise FileNotFoundError(f"checkpoint {self.ckpt_file} not found")
            return self.ckpt_file
        model = self.bundle / "models" / "model.pt"
        if model.is_file() and not self.export_overrides:
            return model
        import torch

        fake = self.work_dir / "export" / "untrained_model.pt"
        fake.parent.mkdir(parents=True, exist_ok=True)
        network = self._network()
        # jitter the initial weights: some heads start near zero (VoxelMorph's velocity head is N(0, 1e-5)), and an
        # export that returned zeros would then still "match" the eager network within any tolerance
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in network.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param))
        torch.save(network.state_dict(), fake)
        return fake


def verify_bundle(bundle: str | Path, mode: str = "full", work_dir: str | Path | None = None,
                  ckpt_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                  export_overrides: Mapping[str, Any] | None = None, steps: Sequence[str] | None = None,
                  schema: str | Path = ZOO_SCHEMA,
                  report: Callable[[StepResult], None] | None = None,
                  meta_file: str | Path | None = None) -> list[StepResult]:
    """Run the model zoo's checks on one bundle folder; one :class:`StepResult` per step, in order.

    A failed step is reported and the remaining independent steps still run (``directory`` failing stops the
    rest: nothing else can be read).

    Args:
        bundle: the bundle folder.
        mode: ``"full"`` (every step) or ``"min"`` (directory, version, metadata).
        work_dir: where the workflow outputs, the schema copy and the export go (a temporary folder by default).
        ckpt_file: weights to export (default: ``models/model.pt`` if present, else the untrained network's).
        overrides: config ids and values applied to every step that reads the config (the zoo passes none).
        export_overrides: further overrides for the export step only (tests export tiny networks; the zoo's
            ``verify_net_in_out`` still sees the bundle as shipped). ``_meta_#...`` ids change the metadata, e.g.
            the input shape the export traces.
        steps: run only these steps of the mode (default: all of them, in order).
        schema: the JSON schema for ``verify_metadata``.
        report: called with each result as soon as it is known (the CLI prints it).
        meta_file: another metadata file of the bundle for every step (default ``configs/metadata.json``), e.g. a
            configuration selected by ``overrides`` whose tensors differ (lssc_multimodal's ``metadata_3d.json`` with
            the overrides of ``configs/3d.json``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    unknown = sorted(set(steps or ()) - set(MODES[mode]))
    if unknown:
        raise ValueError(f"steps {unknown} are not steps of mode {mode!r}: {list(MODES[mode])}")
    selected = [s for s in MODES[mode] if steps is None or s in steps]
    bundle = Path(bundle)
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix=f"verify-{bundle.name}-")) if owned else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    verifier = _Verifier(bundle, work, ckpt_file, overrides or {}, export_overrides or {}, Path(schema), meta_file)
    results: list[StepResult] = []
    try:
        for step in selected:
            t0 = time.perf_counter()
            try:
                result = StepResult(step, True, getattr(verifier, step)())
            except Exception as e:  # every failure becomes a report line; the harness itself must not crash
                where = traceback.extract_tb(e.__traceback__)[-1]
                detail = f"{type(e).__name__}: {e}".replace("\n", " ")
                result = StepResult(step, False, f"{detail[:1500]} [{Path(where.filename).name}:{where.lineno}]")
            result.seconds = time.perf_counter() - t0
            results.append(result)
            if report is not None:
                report(result)
            if step == "directory" and not result.ok:
                break
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main(*bundles: str, mode: str = "full", work_dir: str | None = None, ckpt_file: str | None = None) -> int:
    """Verify the given bundle folders (or ``all``); print one line per step; exit code 1 if any step failed."""
    targets = discover_bundles() if not bundles or tuple(bundles) == ("all",) else [Path(b) for b in bundles]
    if not targets:
        print("no bundles found under bundles/")
        return 1
    failed = []
    for bundle in targets:
        print(f"{bundle} ({mode}):", flush=True)
        sub = None if work_dir is None else Path(work_dir) / bundle.name
        results = verify_bundle(bundle, mode=mode, work_dir=sub, ckpt_file=ckpt_file,
                                report=lambda r: print(f"  {r}  ({r.seconds:.1f} s)", flush=True))
        if not all(r.ok for r in results):
            failed.append(bundle.name)
    print("all bundles pass" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def _exit_with(*bundles: str, mode: str = "full", work_dir: str | None = None, ckpt_file: str | None = None) -> None:
    # fire prints a returned value: exit with main's code instead of printing it
    sys.exit(main(*bundles, mode=mode, work_dir=work_dir, ckpt_file=ckpt_file))


if __name__ == "__main__":
    import fire

    fire.Fire(_exit_with, name="python -m tools.verify_bundle")
