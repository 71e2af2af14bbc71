"""Synthetic datasets in the public layouts, from the command line (python-fire).

Examples::

    python -m tools.synth echo --layout camus --out data/camus --patients 20 --seed 0
    python -m tools.synth echo --layout camus_mhd --out data/camus_mhd --patients 5
    python -m tools.synth echo --layout ted --out data/ted --patients 5
    python -m tools.synth echo --layout tracking --out data/tracking --patients 10   # videos
    python -m tools.synth acdc --out data/acdc --patients 10
    python -m tools.synth mmwhs --out data/mmwhs --patients 10                        # per modality
    python -m tools.synth abdomen --out data/abdomen --patients 4
    python -m tools.synth registration --out data/pairs --patients 24                 # pairs
    python -m tools.synth registration3d --out data/echo3d --patients 16              # 3D ED/ES volumes
    python -m tools.synth preview --out echo_preview.png --seed 0 --view 4CH
    python -m tools.synth phantom --out data/phantom --videos 10 --seed 0 --motion mixed --amplitude [2,10]

Generation is deterministic per seed; every generator shows a progress bar. Each command ends by writing a
preview PNG beside the data (``preview.png``) where the generator has a plotting function.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from pathlib import Path
from typing import Any

import fire

from common.data.default import SYNTHETIC_KINDS

__all__ = ["echo", "acdc", "mmwhs", "abdomen", "registration", "registration3d", "phantom", "preview", "main"]

ECHO_LAYOUTS = ("camus", "camus_mhd", "ted", "tracking")
# the writers name their size argument after what they count
_COUNT_ARGS = ("n_patients", "n_videos", "n_pairs", "n_ct", "n_mr", "n_btcv", "n_chaos")


def _write(kind: str, out: str, patients: int | None, seed: int, **kwargs: Any) -> str:
    module, func, defaults = SYNTHETIC_KINDS[kind]
    writer = getattr(importlib.import_module(module), func)
    params = inspect.signature(writer).parameters
    args = {**defaults, **kwargs}
    if patients is not None:
        for name in _COUNT_ARGS:
            if name in params:
                args[name] = int(patients)
    unknown = [k for k in args if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {unknown}; the generator accepts {sorted(params)}")
    t0 = time.time()
    writer(Path(out), seed=seed, progress=True, **args)
    print(f"wrote synthetic {kind} dataset to {out} in {time.time() - t0:.1f} s")
    return str(out)


def echo(out: str, layout: str = "camus", patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """Echocardiography in a CAMUS (NIfTI or MetaImage release), TED or tracking-HDF5 layout."""
    if layout not in ECHO_LAYOUTS:
        raise ValueError(f"unknown echo layout {layout!r}; choose one of {ECHO_LAYOUTS}")
    return _write(layout, out, patients, seed, **kwargs)


def acdc(out: str, patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """Cardiac cine MRI in the ACDC layout, with ground-truth ED→ES motion."""
    return _write("acdc", out, patients, seed, **kwargs)


def mmwhs(out: str, patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """Unpaired CT and MRI volumes in the MM-WHS layout (``patients`` per modality)."""
    return _write("mmwhs", out, patients, seed, **kwargs)


def abdomen(out: str, patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """Abdominal CT (BTCV layout) and T2-SPIR MRI (CHAOS layout: DICOM series + PNG ground truth)."""
    return _write("abdomen", out, patients, seed, **kwargs)


def registration(out: str, patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """2D ED→ES registration pairs with regions that lose correspondence, true displacement and lost-map."""
    return _write("registration", out, patients, seed, **kwargs)


def registration3d(out: str, patients: int | None = None, seed: int = 0, **kwargs: Any) -> str:
    """3D echo ED/ES volume pairs, one folder per case (``*_ED``, ``*_ES``, ``*_ED_gt``, ``*_ES_gt``, ``*_lost``,
    ``*_ED2ES_disp``), with regions that lose correspondence; ``--shape [X,Y,Z]`` sets the volume size."""
    if "shape" in kwargs:
        kwargs["shape"] = tuple(int(s) for s in kwargs["shape"])
    return _write("registration3d", out, patients, seed, **kwargs)


def phantom(out: str, videos: int = 10, seed: int = 0, motion: str = "mixed", amplitude: Any = (2.0, 10.0),
            **kwargs: Any) -> str:
    """Anatomy-free speckle phantoms (tracking HDF5 layout) with exact trajectories of a rotation, contraction,
    translation or mixed motion; ``amplitude`` (peak displacement, px) and the other knobs of
    :func:`common.data.synthetic.phantom.write_phantom_h5` take a number or a ``[low, high]`` range."""
    writer = importlib.import_module("common.data.synthetic.phantom").write_phantom_h5
    params = inspect.signature(writer).parameters
    unknown = [k for k in kwargs if k not in params or k in ("root", "n_videos", "progress")]
    if unknown:
        raise ValueError(f"phantom: unknown option(s) {unknown}; the generator accepts {sorted(params)}")
    t0 = time.time()
    writer(Path(out), n_videos=int(videos), seed=int(seed), motion=motion, amplitude=amplitude, progress=True,
           **kwargs)
    print(f"wrote {videos} speckle phantom videos ({motion}) to {out} in {time.time() - t0:.1f} s")
    return str(out)


def preview(out: str = "echo_preview.png", seed: int = 0, view: str = "4CH", n_frames: int = 16) -> str:
    """Simulate one echo sequence and write a PNG of a few frames with mask contours and tracks."""
    echo_sim = importlib.import_module("common.data.synthetic.echo")
    seq = echo_sim.simulate_echo_sequence(seed=seed, view=view, n_frames=n_frames)
    echo_sim.plot_echo_sequence(seq, out)
    print(f"wrote {out} (true GLS {seq.gls:.1f} %)")
    return out


def main() -> None:
    try:
        fire.Fire({"echo": echo, "acdc": acdc, "mmwhs": mmwhs, "abdomen": abdomen, "registration": registration,
                   "registration3d": registration3d, "phantom": phantom, "preview": preview})
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
