"""3D ED -> ES echo volume pairs with regions where correspondence is lost, in a one-folder-per-case NIfTI layout.

Each case is an apical 3D echocardiogram of one random heart (:class:`common.data.synthetic.anatomy3d.HeartModel`,
whose closed-form contraction gives the exact ED -> ES motion) at end-diastole (source) and end-systole (target).
Appearance: tissue echogenicity times a speckle envelope that is evaluated at the tissue's end-diastolic position
(so the speckle moves with the myocardium), log-compressed, with depth attenuation from a probe above the apex.
Corruptions then remove correspondence that no displacement can explain: **dropout** (signal vanishes in a blob on
the myocardium, as where the beam runs parallel to the wall), **shadow** (a cone behind an occluder, as a rib shadow,
from the probe outwards) and **noise** bursts (clutter). Most hit the target; some hit the source and are carried
onto the target grid through the true motion.

Layout (the layout real 3D echo datasets use: one folder per case, NIfTI, nibabel axis order ``(X, Y, Z)``)::

    caseNNN/caseNNN_ED.nii.gz, caseNNN_ES.nii.gz           float32 volumes in [0, 1]
    caseNNN/caseNNN_ED_gt.nii.gz, caseNNN_ES_gt.nii.gz     uint8 labels: 0 background, 1 LV cavity, 2 LV myocardium
    caseNNN/caseNNN_lost.nii.gz                            uint8, 1 where correspondence is lost (ES grid)
    caseNNN/caseNNN_ED2ES_disp.nii.gz                      (X, Y, Z, 3) float32 voxels, pull-back
                                                           ES(x) = ED(x + disp(x)) where not lost
    manifest.csv                                           case, group, corruptions, lost fraction

All files of a case share one oblique RAS affine (the grid follows the heart's long axis, tilted at random), with
anisotropic voxels. ``lost`` follows the 2D pairs' rule (:mod:`common.data.synthetic.registration`): voxels whose
intensity a corruption changed by more than ``LOST_DELTA`` after light smoothing, and the voxels of a noise burst whose
expected absolute change exceeds it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.io import write_nifti
from common.data.synthetic.anatomy3d import HEART_GROUPS, HeartModel, Tissue, lps_to_ras_affine, rotation_matrix
from common.data.synthetic.registration import LOST_DELTA

__all__ = ["CORRUPTIONS_3D", "VOLUME_LABELS", "VolumePair", "warp3d", "simulate_volume_pair", "write_volume_pairs",
           "plot_volume_pairs"]

CORRUPTIONS_3D = ("dropout", "shadow", "noise")
VOLUME_LABELS = {"lv_cavity": 1, "lv_myocardium": 2}
_NOISE_SIGMA = 0.3
# echogenicity per tissue (myocardium and walls bright, blood dark, surrounding tissue in between)
_ECHO = {Tissue.LV_MYO: 1.0, Tissue.HEART_WALL: 0.9, Tissue.PAPILLARY: 0.9, Tissue.SOFT: 0.45}
_BLOOD = 0.06


@dataclass
class VolumePair:
    """One case; arrays ``(X, Y, Z)`` except ``disp`` ``(X, Y, Z, 3)`` (voxels, pull-back ES -> ED)."""

    source: np.ndarray
    target: np.ndarray
    source_label: np.ndarray
    target_label: np.ndarray
    disp: np.ndarray
    lost: np.ndarray
    affine: np.ndarray  # RAS voxel -> mm
    group: str
    corruptions: list[str]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def warp3d(volume: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(x) = volume(x + disp(x))`` for ``volume`` ``(X, Y, Z)`` and ``disp`` ``(X, Y, Z, 3)`` (voxels)."""
    grid = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    coords = [g + disp[..., k] for k, g in enumerate(grid)]
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")


def _labels(tissue: np.ndarray) -> np.ndarray:
    lab = np.zeros(tissue.shape, dtype=np.uint8)
    lab[(tissue == Tissue.LV_BLOOD) | (tissue == Tissue.PAPILLARY)] = VOLUME_LABELS["lv_cavity"]
    lab[tissue == Tissue.LV_MYO] = VOLUME_LABELS["lv_myocardium"]
    return lab


def _echogenicity(tissue: np.ndarray) -> np.ndarray:
    out = np.full(tissue.shape, _BLOOD, dtype=np.float32)
    for t, v in _ECHO.items():
        out[tissue == t] = v
    return out


def _corruption(kind: str, idx: np.ndarray, world_probe: np.ndarray, myo: np.ndarray, affine_h: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Weight in [0, 1] per voxel ``(N,)`` of one corruption (1 = fully affected); ``idx`` ``(N, 3)`` voxel indices,
    ``affine_h`` voxel -> heart-frame mm, ``world_probe`` the probe position (heart frame)."""
    pts = idx @ affine_h[:3, :3].T + affine_h[:3, 3]
    cand = np.nonzero(myo.reshape(-1))[0]
    centre = pts[rng.choice(cand)] if cand.size else pts.mean(0)
    if kind == "shadow":
        # a cone from the probe through a point near the myocardium, starting a little before it
        ray = centre - world_probe
        depth0 = np.linalg.norm(ray) * rng.uniform(0.55, 0.85)
        ray /= np.linalg.norm(ray)
        v = pts - world_probe
        along = v @ ray
        ang = np.arccos(np.clip(along / (np.linalg.norm(v, axis=1) + 1e-9), -1, 1))
        half = math.radians(rng.uniform(7, 12))
        edge = np.clip((half - ang) / math.radians(3.0), 0, 1)  # soft lateral edge
        start = np.clip((along - depth0) / 6.0, 0, 1)
        return (edge * start).astype(np.float32)
    radii = rng.uniform(8, 14, size=3)
    rot = rotation_matrix(rng.normal(size=3), rng.uniform(0, math.pi))
    q = ((pts - centre) @ rot) / radii
    return np.exp(-0.5 * (q**2).sum(1) * 2.0).astype(np.float32)


def simulate_volume_pair(rng: np.random.Generator | int, shape: tuple[int, int, int] = (40, 40, 40),
                         fov_mm: tuple[float, float, float] = (96.0, 96.0, 112.0),
                         corruptions: tuple[str, ...] = CORRUPTIONS_3D, max_regions: int = 3,
                         p_source: float = 0.3, clean: bool = False) -> VolumePair:
    """Simulate one ED -> ES volume pair (see the module docstring); ``clean=True`` applies no corruption.

    ``fov_mm`` is the field of view per array axis (voxel size ``fov / shape``, jittered by ±5 %); 1 to
    ``max_regions`` corruptions of the given kinds are drawn, each on the source with probability ``p_source``.
    """
    for k in corruptions:
        if k not in CORRUPTIONS_3D:
            raise ValueError(f"unknown corruption {k!r}; choose from {CORRUPTIONS_3D}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    group = str(rng.choice(HEART_GROUPS))
    hm = HeartModel.sample(rng, group)
    spacing = np.asarray(fov_mm, dtype=np.float64) / np.asarray(shape) * rng.uniform(0.95, 1.05, 3)
    # grid in the heart frame (z base -> apex), centred on the LV and RV, tilted by a few degrees
    tilt = rotation_matrix(rng.normal(size=3), math.radians(rng.uniform(0, 12)))
    centre_h = np.array([-8.0, 0.0, 0.42 * hm.za]) + rng.normal(0, 2.0, 3)
    affine_h = np.eye(4)
    affine_h[:3, :3] = tilt @ np.diag(spacing)
    affine_h[:3, 3] = centre_h - affine_h[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    h = idx @ affine_h[:3, :3].T + affine_h[:3, 3]
    # ED position of every ES voxel: the exact inverse of the contraction model
    h0 = h.copy()
    moving = hm.motion_support(h)
    h0[moving] = hm.inverse_motion(h[moving], 1.0)
    disp = ((h0 - affine_h[:3, 3]) @ np.linalg.inv(affine_h[:3, :3]).T - idx).reshape(*shape, 3)

    def tissue_at(points_h: np.ndarray) -> np.ndarray:
        t = np.full(len(points_h), Tissue.SOFT, dtype=np.int16)
        hm.paint(t, hm.to_world(points_h))
        return t

    t_ed, t_es = tissue_at(h).reshape(shape), tissue_at(h0).reshape(shape)
    # speckle: a smoothed complex Gaussian field on a fine grid, read at the tissue's ED position
    fine = 1.2
    lo = h.min(0) - 12.0
    n_fine = np.ceil((h.max(0) + 12.0 - lo) / fine).astype(int) + 1
    field = [ndimage.gaussian_filter(rng.normal(size=tuple(n_fine)).astype(np.float32), (0.9, 0.9, 1.4))
             for _ in range(2)]

    def speckle(points_h: np.ndarray) -> np.ndarray:
        c = ((points_h - lo) / fine).T
        re, im = (ndimage.map_coordinates(f, c, order=1, mode="nearest") for f in field)
        env = np.sqrt(re**2 + im**2)
        return (env / (env.mean() + 1e-9)).reshape(shape)

    probe = np.array([0.0, 0.0, hm.za + hm.apex_wall + rng.uniform(12, 20)])
    depth = np.linalg.norm(h - probe, axis=1).reshape(shape)
    attenuation = np.exp(-depth / rng.uniform(160, 220)).astype(np.float32)

    def bmode(tissue: np.ndarray, points_h: np.ndarray) -> np.ndarray:
        env = _echogenicity(tissue) * speckle(points_h) * attenuation
        return env

    def compress(env: np.ndarray) -> np.ndarray:
        return np.clip(np.log1p(20.0 * env) / np.log1p(20.0 * 2.5), 0, 1).astype(np.float32)

    env_s, env_t = bmode(t_ed, h), bmode(t_es, h0)
    src, tgt = compress(env_s), compress(env_t)
    lab_s, lab_t = _labels(t_ed), _labels(t_es)
    lost = np.zeros(shape, dtype=bool)
    applied: list[str] = []
    n_regions = 0 if clean or not corruptions else int(rng.integers(1, max_regions + 1))
    for _ in range(n_regions):
        kind = str(rng.choice(corruptions))
        on_source = bool(rng.random() < p_source)
        myo = (lab_s if on_source else lab_t) == VOLUME_LABELS["lv_myocardium"]
        w = _corruption(kind, idx, probe, myo, affine_h, rng).reshape(shape)
        env = env_s if on_source else env_t
        before = src if on_source else tgt
        if kind == "noise":
            after = np.clip(before + w * rng.normal(0, _NOISE_SIGMA, shape), 0, 1).astype(np.float32)
            region = w * _NOISE_SIGMA * math.sqrt(2 / math.pi) > LOST_DELTA
        else:
            keep = rng.uniform(0.05, 0.2)
            env = env * (1 - (1 - keep) * w)
            after = compress(env)
            region = ndimage.gaussian_filter(np.abs(after - before), 1.0) > LOST_DELTA
        if on_source:
            env_s, src = env, after
            lost |= warp3d(region.astype(np.float32), disp) >= 0.5
        else:
            env_t, tgt = env, after
            lost |= region
        applied.append(f"{'source' if on_source else 'target'}:{kind}")
    affine = lps_to_ras_affine(np.concatenate([np.concatenate([hm.frame @ affine_h[:3, :3],
                                                               (hm.to_world(affine_h[:3, 3][None])[0])[:, None]], 1),
                                               [[0, 0, 0, 1]]], 0))
    return VolumePair(src, tgt, lab_s, lab_t, disp.astype(np.float32), lost.astype(np.uint8), affine, group, applied)


def write_volume_pairs(root: str | Path, n_pairs: int = 16, seed: int = 0, *,
                       shape: tuple[int, int, int] = (40, 40, 40), corruptions: tuple[str, ...] = CORRUPTIONS_3D,
                       max_regions: int = 3, clean_fraction: float = 0.1, overwrite: bool = False,
                       progress: bool = True) -> list[Path]:
    """Write ``n_pairs`` cases ``root/caseNNN/`` plus ``root/manifest.csv``; returns the case folders.

    Case ``n`` is drawn from ``(seed, n)`` only; every ``round(1/clean_fraction)``-th case carries no corruption, as
    a control.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    every = round(1 / clean_fraction) if clean_fraction > 0 else 0
    rows, out = [], []
    for n in tqdm(range(int(n_pairs)), desc="3D registration pairs", disable=not progress):
        name = f"case{n + 1:03d}"
        folder = root / name
        if (folder / f"{name}_ED.nii.gz").exists() and not overwrite:
            raise FileExistsError(f"{folder}: already exists (pass overwrite=True to replace)")
        clean = bool(every) and (n % every == every - 1)
        pair = simulate_volume_pair(np.random.default_rng([seed, n + 1, 3]), tuple(int(s) for s in shape),
                                    corruptions=corruptions, max_regions=max_regions, clean=clean)
        for suffix, arr in (("ED", pair.source), ("ES", pair.target), ("ED_gt", pair.source_label),
                            ("ES_gt", pair.target_label), ("lost", pair.lost), ("ED2ES_disp", pair.disp)):
            write_nifti(folder / f"{name}_{suffix}.nii.gz", arr, pair.affine)
        rows.append([name, pair.group, ";".join(pair.corruptions), f"{pair.lost.mean():.4f}"])
        out.append(folder)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "group", "corruptions", "lost_fraction"])
        w.writerows(rows)
    return out


def plot_volume_pairs(root: str | Path, out_png: str | Path, n: int = 4) -> Path:
    """PNG per case: mid slices (along Z) of ED and ES with myocardium contours and the lost map (red)."""
    from common.data.io import read_image
    from common.plotting import save_figure, subplots

    cases = sorted(d for d in Path(root).iterdir() if d.is_dir() and (d / f"{d.name}_ED.nii.gz").is_file())[:n]
    fig, axes = subplots(max(len(cases), 1), 2, figsize=(6, 3 * max(len(cases), 1)), squeeze=False)
    for r, d in enumerate(cases):
        arrays = {k: read_image(d / f"{d.name}_{k}.nii.gz").array for k in ("ED", "ES", "ED_gt", "ES_gt", "lost")}
        z = arrays["ED"].shape[2] // 2
        for c, key in enumerate(("ED", "ES")):
            ax = axes[r, c]
            ax.imshow(arrays[key][..., z].T, cmap="gray", vmin=0, vmax=1)
            myo = arrays[f"{key}_gt"][..., z] == VOLUME_LABELS["lv_myocardium"]
            if myo.any():
                ax.contour(myo.T.astype(float), [0.5], colors="tab:green", linewidths=0.8)
            if key == "ES" and arrays["lost"][..., z].any():
                ax.contour(arrays["lost"][..., z].T.astype(float), [0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{d.name} {key} (slice {z})", fontsize=8)
            ax.axis("off")
    return save_figure(fig, out_png)
