"""Reader of the TED dataset (CAMUS full-cycle apical 4CH sequences with per-frame labels) as a MONAI datalist.

Layout (real downloads load unchanged)::

    root/patientNNNN/patientNNNN_4CH_sequence.mhd (+ .raw)      (T, H, W) images, ED -> ES -> ED
    root/patientNNNN/patientNNNN_4CH_sequence_gt.mhd (+ .raw)   (T, H, W) labels 0 bg / 1 LV / 2 Myo
    root/patientNNNN/patientNNNN_4CH_info.cfg                   ED, ES (1-based), NbFrame, ...

``root`` may also be a parent folder holding a single ``database``-like folder of patient folders. Images load
with :func:`common.data.camus.load_echo_frame` (apex at the top).
Splits are seeded and patient level.
"""

from __future__ import annotations

from pathlib import Path

from common.data.camus import _PATIENT_RE, image_header, read_info_cfg
from common.data.cases import FailureRecorder, build_cases
from common.data.io import DataError
from common.data.splits import patient_split

__all__ = ["TED_LABELS", "ted_datalist", "find_ted_patients"]

TED_LABELS = {"background": 0, "LV": 1, "Myo": 2}


def find_ted_patients(root: str | Path) -> list[Path]:
    """Patient folders (``patientNNNN``) under ``root`` or under its only sub-folder that holds them."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, found a file")

    def patients(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT_RE.match(p.name))

    found = patients(root)
    if not found:
        subs = [d for d in root.iterdir() if d.is_dir() and patients(d)]
        if len(subs) == 1:
            found = patients(subs[0])
    if not found:
        raise DataError(f"{root}: no patientNNNN folders found")
    return found


def ted_datalist(root: str | Path, split: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0, require_labels: bool = True, validate: bool = True,
                 ledger: FailureRecorder | None = None) -> list[dict]:
    """MONAI datalist of a TED folder: one dict per patient.

    Keys: ``image`` / ``label`` (sequence paths, (T, H, W) once loaded), ``patient``, ``view`` (``"4CH"``), ``ed``,
    ``es`` (0-based), ``n_frames``, ``spacing`` ([row, col] mm, when ``validate``), ``quality``, ``ef``, ``fps`` and
    ``split``. ``split``: None for all patients, else ``"train"``/``"val"``/``"test"`` of a seeded patient-level
    split with the given fractions. Raises ``FileNotFoundError``/``DataError`` naming the first bad file; with
    ``ledger`` (evaluation) a patient whose files cannot be read is recorded there instead (stage ``datalist``,
    input the patient folder) and left out (:func:`common.data.cases.build_cases`).
    """
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be None, 'train', 'val' or 'test', got {split!r}")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"invalid fractions val={val_fraction}, test={test_fraction}")
    pdirs = find_ted_patients(root)
    subsets = patient_split([p.name for p in pdirs], (1.0 - val_fraction - test_fraction, val_fraction,
                                                      test_fraction), seed, names=("train", "val", "test"))
    subset_of = {k: s for s, ks in subsets.items() for k in ks}

    def build(pdir: Path) -> dict:
        pid = pdir.name
        image = pdir / f"{pid}_4CH_sequence.mhd"
        label = pdir / f"{pid}_4CH_sequence_gt.mhd"
        cfg_path = pdir / f"{pid}_4CH_info.cfg"
        if not image.is_file():
            raise FileNotFoundError(f"{image}: file not found")
        entry = {"image": str(image), "patient": pid, "view": "4CH", "split": subset_of[pid]}
        if label.is_file():
            entry["label"] = str(label)
        elif require_labels:
            raise FileNotFoundError(f"{label}: file not found")
        cfg = read_info_cfg(cfg_path)
        n_frames = cfg.get("NbFrame")
        if validate:
            shape, spacing = image_header(image)
            if len(shape) != 3:
                raise DataError(f"{image}: expected a (T, H, W) sequence, got shape {shape}")
            if "label" in entry and image_header(label)[0] != shape:
                raise DataError(f"{label}: shape {image_header(label)[0]} differs from {image.name} {shape}")
            n_frames = shape[0]
            entry["spacing"] = [spacing[0], spacing[1]]
        try:
            ed, es = int(cfg["ED"]) - 1, int(cfg["ES"]) - 1
        except KeyError as e:
            raise DataError(f"{cfg_path}: missing key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise DataError(f"{cfg_path}: ED/ES are not frame numbers ({e})") from e
        if isinstance(n_frames, int) and not (0 <= ed < n_frames and 0 <= es < n_frames):
            raise DataError(f"{cfg_path}: ED={ed + 1}/ES={es + 1} out of range 1..{n_frames}")
        ef = cfg.get("EF", cfg.get("LVef"))
        entry.update({"ed": ed, "es": es, "n_frames": int(n_frames) if isinstance(n_frames, int) else None,
                      "quality": cfg.get("ImageQuality"), "ef": float(ef) if isinstance(ef, (int, float)) else None,
                      "fps": float(cfg["FrameRate"]) if isinstance(cfg.get("FrameRate"), (int, float)) else None})
        return entry

    cases = [p for p in pdirs if split is None or subset_of[p.name] == split]
    out = build_cases(cases, build, str, ledger, root)
    if not out:
        raise DataError(f"{root}: no TED patients in split {split!r}")
    return out
