"""Benchmark: where the time of one PACS study goes -- retrieve, decode, model, encode, store (``tools.pacs``).

A private Orthanc (DICOMweb) is started on loopback (or, without the Debian ``orthanc`` package, a folder is the
source and destination; the report says which), synthetic echo cines are uploaded as US multi-frame DICOM
(:mod:`common.data.synthetic.echo_dicom`) and ``python -m tools.pacs run --bundle botm_seg`` is run on them
in-process with a randomly initialised full-size botm_seg network (the time does not depend on the weights). The
ledger's per-study timings give the split; the first study (which also pays for building the network and imports)
is reported but left out of the medians.

Goal (issue 14): everything but the model is at most 15 % of a study's time on this CPU with the full-size network,
``(retrieve + decode + encode + store) / total <= 0.15``. ``--quick`` uses a tiny network and 64x64 frames (a smoke
run: there the model is cheap and the goal is not expected to hold).

Usage: ``python -m tools.bench pacs [--quick] [--device cpu] [--repeats 3] [--out_dir output/bench]``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tools.bench.report import write_report

__all__ = ["STEPS", "run"]

STEPS = ("retrieve", "decode", "model", "encode", "store")
_TINY = {"network_def#widths": [8, 16, 24, 32], "network_def#depths": [1, 1, 1, 1],
         "network_def#num_heads": [1, 1, 2, 2], "network_def#decoder_width": 16, "network_def#sinkhorn_iters": 5,
         "network_def#botm_reductions": [2, 1, 1, 1], "spatial_size": [64, 64]}


def _random_checkpoint(path: Path, overrides: dict[str, Any]) -> Path:
    import torch
    from monai.bundle import ConfigParser

    from tools.pacs.model import BUNDLES_DIR

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "botm_seg" / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    for k, v in overrides.items():
        parser[k] = v
    torch.manual_seed(0)
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, path)
    return path


def run(out_dir: str = "output/bench", quick: bool = False, device: str = "cpu", repeats: int = 3) -> dict:
    """Run the benchmark (module docstring); ``repeats`` timed studies after one warm-up study. Returns the
    summary written to ``<out_dir>/pacs.json``."""
    from common.data.synthetic.echo_dicom import write_echo_dicom_study
    from tools.pacs.orthanc import DICOMWEB_PLUGIN, OrthancServer
    from tools.pacs.run import run_batch

    out = Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_pacs_"))
    overrides = dict(_TINY) if quick else {}
    n_frames, size = (6, (64, 64)) if quick else (20, (256, 256))
    try:
        ckpt = _random_checkpoint(work / "model.pt", overrides)
        cines = write_echo_dicom_study(work / "cines", n_studies=int(repeats) + 1, seed=11, n_frames=n_frames,
                                       image_size=size)
        server = None
        if shutil.which("Orthanc") and Path(DICOMWEB_PLUGIN).exists():
            server = OrthancServer(work / "orthanc").start()
            for p in cines:
                server.upload(p)
            source, dest, node = server.dicomweb_url, None, "Orthanc DICOMweb (loopback)"
        else:
            source, dest, node = str(work / "cines"), str(work / "results"), "folder (Orthanc not installed)"
        try:
            summary = run_batch(bundle="botm_seg", source=source, dest=dest, ledger=str(work / "run" / "l.sqlite"),
                                ckpt=str(ckpt), device=device, overrides=overrides)
        finally:
            if server is not None:
                server.stop()
        with sqlite3.connect(work / "run" / "l.sqlite") as db:
            done = [json.loads(t) for (t,) in db.execute(
                "SELECT timings FROM jobs WHERE state = 'done' ORDER BY started")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if summary["ledger"]["done"] != len(cines):
        raise RuntimeError(f"benchmark batch did not finish: {summary}")
    rows = []
    for k, t in enumerate(done):
        total = sum(t[s] for s in STEPS)
        rows.append({"study": k, "warm_up": k == 0, **{f"{s}_s": t[s] for s in STEPS}, "total_s": total,
                     "non_model_pct": 100.0 * (total - t["model"]) / total})
    timed = rows[1:] or rows
    median = {s: statistics.median(r[f"{s}_s"] for r in timed) for s in (*STEPS, "total")}
    share = 100.0 * (median["total"] - median["model"]) / median["total"]
    extra = {"node": node, "network": "tiny (quick)" if quick else "full-size botm_seg (inference.json)",
             "cine": {"frames": n_frames, "size": list(size)}, "device": device, "median_s": median,
             "non_model_pct_of_median": share, "goal_non_model_pct": 15.0, "goal_met": share <= 15.0}

    def plot(ax: Any) -> None:
        left = 0.0
        for s in STEPS:
            ax.barh([0], [median[s]], left=left, label=f"{s} {median[s]:.3f} s")
            left += median[s]
        ax.set_yticks([])
        ax.set_xlabel("median seconds per study")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8)

    paths = write_report(out, "pacs", rows, ["study", "warm_up", *[f"{s}_s" for s in STEPS], "total_s",
                                             "non_model_pct"], plot=plot, extra=extra,
                         title=f"tools.pacs per-study time split ({extra['network']})")
    return {**extra, "paths": {k: str(v) for k, v in paths.items()}}
