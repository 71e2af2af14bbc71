"""Writers of simulated echocardiography datasets in the public layouts.

* CAMUS, NIfTI release (2023)::

      root/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}[_gt].nii.gz           (W, H) uint8, spacing in the header
      root/patientNNNN/patientNNNN_{2CH,4CH}_half_sequence[_gt].nii.gz     (W, H, T) uint8, ED -> ES
      root/patientNNNN/Info_{2CH,4CH}.cfg                                 ED, ES, NbFrame, Sex, Age, ImageQuality,
                                                                          EF, FrameRate

  The NIfTI arrays are stored transposed (width first), as in the release.
* CAMUS, original MetaImage release (2019): the same patient folders with ``.mhd`` + ``.raw`` files, SimpleITK
  arrays (1, H, W) for ED/ES and (T, H, W) for the ED -> ES sequence, which that release names
  ``patientNNNN_{view}_sequence[_gt].mhd``; ``Info_{view}.cfg`` with ``LVedv``/``LVesv``/``LVef``.
* TED: ``root/patientNNNN/patientNNNN_4CH_sequence.mhd`` and ``..._4CH_sequence_gt.mhd`` (T, H, W) over a full cycle
  (ED -> ES -> ED), labels background/LV/Myo (the LA is background), ``patientNNNN_4CH_info.cfg``.
* Tracking HDF5 (``METHODS.md`` §4): one ``videoNNNN.h5`` per video with ``video`` (T, H, W) uint8, ``tracks``
  (T, N, 2) float32 (x, y) pixels, ``visible`` (T, N) bool and attributes ``fps``, ``pixel_spacing_mm``, ``view``,
  ``ed_frame``, ``es_frame`` plus ``gls_reference`` (the simulator's true GLS, %) and ``labels`` (T, H, W) uint8.

Every writer is deterministic per ``seed``: patient ``i`` always gets the same simulated heart whatever
``n_patients`` is, and both views of a patient share the same heart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.io import write_mhd, write_nifti
from common.data.synthetic.echo import EchoSequence, patient_parameters, simulate_echo_sequence

__all__ = ["write_camus", "write_ted", "write_tracking_h5", "patient_acquisition"]

# image-quality classes and the severity ranges of the simulator knobs that produce them
_QUALITY = {
    "Good": {"noise": (0.0, 0.15), "blur": (0.0, 0.1), "dropout": (0.0, 0.0)},
    "Medium": {"noise": (0.2, 0.4), "blur": (0.1, 0.3), "dropout": (0.0, 0.3)},
    "Poor": {"noise": (0.45, 0.7), "blur": (0.3, 0.5), "dropout": (0.3, 0.6)},
}


def _patient_seed(seed: int, index: int, stream: int) -> int:
    """Independent simulator seed of patient ``index`` (1-based) in writer ``stream``."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1)[0])


def patient_acquisition(seed: int) -> dict:
    """Image quality, severity knobs and pathology of one simulated patient (deterministic per ``seed``)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    quality = str(rng.choice(list(_QUALITY), p=[0.5, 0.35, 0.15]))
    knobs = {k: float(rng.uniform(*r)) for k, r in _QUALITY[quality].items()}
    pathology = float(rng.uniform(0.4, 1.0)) if rng.uniform() < 0.25 else 0.0
    return {"quality": quality, "pathology": pathology, **knobs}


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="patient")


def _check_common(n: int, image_size: Sequence[int], n_frames: int, what: str = "n_patients") -> tuple[int, int]:
    if int(n) < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {image_size}")
    if int(n_frames) < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    return int(image_size[0]), int(image_size[1])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _cfg_text(entries: dict) -> str:
    return "".join(f"{k}: {v}\n" for k, v in entries.items())


def _biplane_ef(seqs: dict[str, EchoSequence]) -> tuple[float, float, float]:
    """EDV, ESV (ml) and EF (%): geometric mean of the single-plane area-length volumes of the views."""
    ed = float(np.exp(np.mean([np.log(s.lv_volume_ml[s.ed_frame]) for s in seqs.values()])))
    es = float(np.exp(np.mean([np.log(s.lv_volume_ml[s.es_frame]) for s in seqs.values()])))
    return ed, es, 100.0 * (ed - es) / ed


def write_camus(root: str | Path, n_patients: int = 10, seed: int = 0, release: str = "nifti",
                image_size: Sequence[int] = (256, 256), n_frames: int = 16, views: Sequence[str] = ("2CH", "4CH"),
                progress: bool = True) -> Path:
    """Write ``n_patients`` simulated CAMUS patients (``patient0001`` ...) under ``root``; returns ``root``.

    ``release``: ``"nifti"`` (2023 release) or ``"mhd"`` (original MetaImage release). Each view is an ED -> ES
    half cycle of ``n_frames`` frames (ED is frame 1, ES frame ``n_frames`` in the 1-based cfg convention); images
    are uint8, labels 0 bg / 1 LV / 2 Myo / 3 LA. Image quality (Good/Medium/Poor) sets the noise, blur and dropout
    knobs; a quarter of the patients have a hypokinetic segment.
    """
    if release not in ("nifti", "mhd"):
        raise ValueError(f"release must be 'nifti' or 'mhd', got {release!r}")
    bad = [v for v in views if v not in ("2CH", "4CH")]
    if bad or not views:
        raise ValueError(f"views must be a non-empty subset of ('2CH', '4CH'), got {tuple(views)}")
    H, W = _check_common(n_patients, image_size, n_frames)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in _progress(range(1, int(n_patients) + 1), int(n_patients), f"CAMUS ({release})", progress):
        pseed = _patient_seed(seed, i, 1)
        acq = patient_acquisition(pseed)
        seqs = {v: simulate_echo_sequence(pseed, view=v, n_frames=n_frames, image_size=(H, W), half_cycle=True,
                                          pathology=acq["pathology"], noise=acq["noise"], blur=acq["blur"],
                                          dropout=acq["dropout"]) for v in views}
        edv, esv, ef = _biplane_ef(seqs)
        pid = f"patient{i:04d}"
        pdir = root / pid
        pdir.mkdir(parents=True, exist_ok=True)
        for view, seq in seqs.items():
            _write_camus_view(pdir, pid, view, seq, release, acq["quality"], edv, esv, ef)
    return root


def _write_camus_view(pdir: Path, pid: str, view: str, seq: EchoSequence, release: str, quality: str, edv: float,
                      esv: float, ef: float) -> None:
    img, lab = _to_uint8(seq.images), seq.labels.astype(np.uint8)
    sr, sc = seq.spacing
    ed, es, T = seq.ed_frame, seq.es_frame, seq.n_frames
    patient = seq.params["patient"]
    cfg = {"ED": ed + 1, "ES": es + 1, "NbFrame": T, "Sex": patient["sex"], "Age": patient["age"],
           "ImageQuality": quality}
    if release == "nifti":
        for phase, t in (("ED", ed), ("ES", es)):
            write_nifti(pdir / f"{pid}_{view}_{phase}.nii.gz", img[t].T, spacing=(sc, sr))
            write_nifti(pdir / f"{pid}_{view}_{phase}_gt.nii.gz", lab[t].T, spacing=(sc, sr))
        write_nifti(pdir / f"{pid}_{view}_half_sequence.nii.gz", img.transpose(2, 1, 0), spacing=(sc, sr, 1.0))
        write_nifti(pdir / f"{pid}_{view}_half_sequence_gt.nii.gz", lab.transpose(2, 1, 0), spacing=(sc, sr, 1.0))
        cfg.update({"EF": round(ef), "FrameRate": round(seq.fps)})
    else:
        for phase, t in (("ED", ed), ("ES", es)):
            write_mhd(pdir / f"{pid}_{view}_{phase}.mhd", img[t][None], spacing=(1.0, sr, sc))
            write_mhd(pdir / f"{pid}_{view}_{phase}_gt.mhd", lab[t][None], spacing=(1.0, sr, sc))
        write_mhd(pdir / f"{pid}_{view}_sequence.mhd", img, spacing=(1.0, sr, sc))
        write_mhd(pdir / f"{pid}_{view}_sequence_gt.mhd", lab, spacing=(1.0, sr, sc))
        cfg.update({"LVedv": round(edv, 2), "LVesv": round(esv, 2), "LVef": round(ef, 2)})
    (pdir / f"Info_{view}.cfg").write_text(_cfg_text(cfg))


def write_ted(root: str | Path, n_patients: int = 10, seed: int = 0, image_size: Sequence[int] = (256, 256),
              n_frames: int = 20, progress: bool = True) -> Path:
    """Write ``n_patients`` simulated TED patients (apical 4CH, one full cycle ED -> ES -> ED) under ``root``.

    Per patient: ``patientNNNN_4CH_sequence.mhd`` (T, H, W) uint8, ``..._sequence_gt.mhd`` (T, H, W) uint8 with
    0 bg / 1 LV / 2 Myo, ``patientNNNN_4CH_info.cfg`` (ED, ES, NbFrame 1-based, ...). Returns ``root``.
    """
    H, W = _check_common(n_patients, image_size, n_frames)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in _progress(range(1, int(n_patients) + 1), int(n_patients), "TED", progress):
        pseed = _patient_seed(seed, i, 2)
        acq = patient_acquisition(pseed)
        # one cycle over the sequence (the last frame is the next ED): the frame rate follows from the heart rate
        fps = (n_frames - 1) * patient_parameters(pseed)["heart_rate"] / 60.0
        seq = simulate_echo_sequence(pseed, view="4CH", n_frames=n_frames, image_size=(H, W), n_cycles=1.0,
                                     fps=fps, pathology=acq["pathology"], noise=acq["noise"], blur=acq["blur"],
                                     dropout=acq["dropout"])
        pid = f"patient{i:04d}"
        pdir = root / pid
        pdir.mkdir(parents=True, exist_ok=True)
        lab = seq.labels.copy()
        lab[lab == 3] = 0
        sr, sc = seq.spacing
        write_mhd(pdir / f"{pid}_4CH_sequence.mhd", _to_uint8(seq.images), spacing=(1.0, sr, sc))
        write_mhd(pdir / f"{pid}_4CH_sequence_gt.mhd", lab, spacing=(1.0, sr, sc))
        patient = seq.params["patient"]
        cfg = {"ED": seq.ed_frame + 1, "ES": seq.es_frame + 1, "NbFrame": seq.n_frames, "Sex": patient["sex"],
               "Age": patient["age"], "ImageQuality": acq["quality"], "EF": round(seq.ef), "FrameRate": round(seq.fps)}
        (pdir / f"{pid}_4CH_info.cfg").write_text(_cfg_text(cfg))
    return root


def write_tracking_h5(root: str | Path, n_videos: int = 10, seed: int = 0, image_size: Sequence[int] = (256, 256),
                      n_frames: int = 40, n_points: int = 32, progress: bool = True, fps: float = 40.0) -> Path:
    """Write ``n_videos`` simulated speckle-tracking videos ``videoNNNN.h5`` under ``root``; returns ``root``.

    Views alternate at random between 2CH and 4CH; the sequence starts at ED and runs at ``fps`` frames per second
    at the patient's heart rate (so it usually covers more than one cycle). ``tracks`` are the true myocardial
    centre-line trajectories, ordered base -> apex -> base (attribute ``centreline_ordered = True``, which lets
    evaluation compute GLS), ``gls_reference`` the true GLS (%) between ``ed_frame`` and ``es_frame``.
    """
    import h5py

    H, W = _check_common(n_videos, image_size, n_frames, "n_videos")
    if int(n_points) < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in _progress(range(1, int(n_videos) + 1), int(n_videos), "tracking HDF5", progress):
        pseed = _patient_seed(seed, i, 3)
        acq = patient_acquisition(pseed)
        view = "2CH" if np.random.default_rng(pseed).uniform() < 0.5 else "4CH"
        n_cycles = (n_frames - 1) / fps * patient_parameters(pseed)["heart_rate"] / 60.0
        # speckle-tracking studies keep trackable recordings: the severity knobs are capped below "Poor"
        seq = simulate_echo_sequence(pseed, view=view, n_frames=n_frames, image_size=(H, W), n_cycles=n_cycles,
                                     fps=fps, n_track_points=n_points, pathology=acq["pathology"],
                                     noise=min(acq["noise"], 0.4), blur=min(acq["blur"], 0.3),
                                     dropout=min(acq["dropout"], 0.3))
        path = root / f"video{i:04d}.h5"
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("video", data=_to_uint8(seq.images), compression="gzip", compression_opts=4)
            f.create_dataset("tracks", data=seq.tracks.astype(np.float32))
            f.create_dataset("visible", data=seq.visible.astype(bool))
            f.create_dataset("labels", data=seq.labels.astype(np.uint8), compression="gzip", compression_opts=4)
            f.attrs["fps"] = float(seq.fps)
            f.attrs["pixel_spacing_mm"] = float(seq.spacing[0])
            f.attrs["view"] = view
            f.attrs["ed_frame"] = int(seq.ed_frame)
            f.attrs["es_frame"] = int(seq.es_frame)
            f.attrs["gls_reference"] = float(seq.gls)
            # the tracks are the simulator's mid-wall centre line, base -> apex -> base: GLS of them is meaningful
            f.attrs["centreline_ordered"] = True
            f.attrs["patient"] = f"video{i:04d}"
            f.attrs["image_quality"] = acq["quality"]
            f.attrs["pathology"] = float(acq["pathology"])
        tmp.replace(path)  # never leave a half-written file under the final name
    return root
