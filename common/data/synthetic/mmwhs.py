"""Synthetic unpaired whole-heart CT and MRI volumes in the MM-WHS 2017 layout.

Layout written (as the release)::

    ct_train/ct_train_1001_image.nii.gz   (X, Y, Z) int16 HU, contrast-enhanced (bright blood)
    ct_train/ct_train_1001_label.nii.gz   (X, Y, Z) uint16 MM-WHS codes 205, 420, 500, 550, 600, 820, 850
    mr_train/mr_train_1001_image.nii.gz   (X, Y, Z) int16 balanced-SSFP-like magnitude with coil bias
    mr_train/mr_train_1001_label.nii.gz

CT and MR cases are different random patients (unpaired, as in MM-WHS) drawn from the same anatomy family of
:mod:`common.data.synthetic.anatomy3d`, imaged at a random cardiac phase; MR grids have their own size and spacing
and a small oblique tilt. Arrays are in nibabel order with RAS affines; array axes run to the patient's left, back
and head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.io import write_nifti
from common.data.mmwhs import MMWHS_CODES, MMWHS_MODALITIES
from common.data.synthetic.anatomy3d import (
    BiasField,
    ThoraxPhantom,
    Tissue,
    axial_affine,
    bssfp_table,
    ct_table,
    grid_points,
    lps_to_ras_affine,
    render_tissues,
    rician_noise,
    rotation_matrix,
    tissue_lookup,
)
from common.plotting import colormap, save_figure, subplots

__all__ = ["mmwhs_label_lut", "simulate_mmwhs_volume", "write_mmwhs", "plot_mmwhs"]


def mmwhs_label_lut() -> np.ndarray:
    """Dense tissue -> MM-WHS code lookup ``(N_TISSUES,)`` uint16 (papillary muscles belong to the LV cavity)."""
    c = MMWHS_CODES
    return tissue_lookup({
        Tissue.LV_MYO: c["LVM"], Tissue.LA_BLOOD: c["LAC"], Tissue.LV_BLOOD: c["LVC"], Tissue.PAPILLARY: c["LVC"],
        Tissue.RA_BLOOD: c["RAC"], Tissue.RV_BLOOD: c["RVC"], Tissue.AORTA_BLOOD: c["AA"], Tissue.PA_BLOOD: c["PA"],
    }).astype(np.uint16)


def simulate_mmwhs_volume(rng: np.random.Generator | int, modality: str = "ct",
                          shape: tuple[int, int, int] = (96, 96, 64),
                          spacing: tuple[float, float, float] = (1.6, 1.6, 2.0)) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """One patient's volume: ``(image (X, Y, Z) int16, label (X, Y, Z) uint16 codes, affine (4, 4) RAS)``."""
    if modality not in MMWHS_MODALITIES:
        raise ValueError(f"modality must be one of {MMWHS_MODALITIES}, got {modality!r}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    ph = ThoraxPhantom.sample(rng)
    center = ph.heart_center() + rng.normal(0, 5, 3)
    rot = None
    if modality == "mr":  # whole-heart MR is planned on the heart, so its grid is a little oblique
        rot = rotation_matrix(rng.normal(size=3), np.radians(rng.uniform(-10, 10)))
    aff = axial_affine(center, shape, spacing, rot)
    pts = grid_points(aff, shape).astype(np.float32)
    # CT angiography is gated to any phase; whole-heart MR to mid-diastole
    phase = float(rng.uniform(0.0, 0.6) if modality == "ct" else rng.uniform(0.0, 0.25))
    tissue, p0 = ph.tissues(pts, phase)
    tex = ph.texture(p0)
    if modality == "ct":
        img = render_tissues(tissue, tex, *ct_table(rng, "arterial"), relative=False).reshape(shape)
        img = ndimage.gaussian_filter(img, 0.6) + rng.normal(0, rng.uniform(12, 25), shape)
        img = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    else:
        img = render_tissues(tissue, tex, *bssfp_table(rng), relative=True)
        img *= BiasField.sample(rng, center, radius=110.0, strength=rng.uniform(0.3, 0.7))(pts)
        img = ndimage.gaussian_filter(img.reshape(shape), 0.5)
        img = rician_noise(img, rng.uniform(0.015, 0.035), rng)
        img = np.clip(np.round(img * rng.uniform(500, 1500)), 0, 32767).astype(np.int16)
    label = mmwhs_label_lut()[tissue].reshape(shape)
    return img, label, lps_to_ras_affine(aff)


def write_mmwhs(root: str | Path, n_ct: int = 4, n_mr: int = 4, seed: int = 0, *,
                ct_shape: tuple[int, int, int] = (96, 96, 64), ct_spacing: tuple[float, float, float] = (1.6, 1.6, 2.0),
                mr_shape: tuple[int, int, int] = (80, 80, 56), mr_spacing: tuple[float, float, float] = (2.0, 2.0, 2.4),
                first_id: int = 1001, subfolders: bool = True, overwrite: bool = False,
                progress: bool = True) -> dict[str, list[tuple[Path, Path]]]:
    """Write unpaired CT and MR cases in the MM-WHS layout; returns ``{"ct": [(image, label)], "mr": [...]}``.

    Case ``{mod}_train_{id}`` is drawn from ``(seed, modality, id)`` only, so CT and MR patients differ and a larger
    set extends a smaller one. ``subfolders=False`` writes all files directly into ``root``.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    jobs = [("ct", i) for i in range(n_ct)] + [("mr", i) for i in range(n_mr)]
    out: dict[str, list[tuple[Path, Path]]] = {"ct": [], "mr": []}
    for mod, i in tqdm(jobs, desc="mmwhs", disable=not progress):
        cid = first_id + i
        folder = root / f"{mod}_train" if subfolders else root
        img_p, lab_p = folder / f"{mod}_train_{cid}_image.nii.gz", folder / f"{mod}_train_{cid}_label.nii.gz"
        for p in (img_p, lab_p):
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace)")
        shape, spacing = (ct_shape, ct_spacing) if mod == "ct" else (mr_shape, mr_spacing)
        img, lab, aff = simulate_mmwhs_volume(np.random.default_rng([seed, MMWHS_MODALITIES.index(mod), cid]), mod,
                                              shape, spacing)
        write_nifti(img_p, img, aff)
        write_nifti(lab_p, lab, aff)
        out[mod].append((img_p, lab_p))
    return out


def plot_mmwhs(root: str | Path, out_png: str | Path, n_cases: int = 2) -> Path:
    """PNG of axial and coronal mid-slices of the first CT and MR cases with contours of the seven structures."""

    from common.data.io import DataError, read_image
    from common.data.mmwhs import find_mmwhs_cases

    cases = []
    for mod in MMWHS_MODALITIES:
        try:
            cases += [(mod, *c) for c in find_mmwhs_cases(root, mod)[:n_cases]]
        except DataError:  # a folder may hold only one modality
            continue
    if not cases:
        raise FileNotFoundError(f"{root}: no MM-WHS cases to plot")
    fig, axes = subplots(len(cases), 2, figsize=(7, 3.5 * len(cases)), squeeze=False)
    cmap = colormap("tab10")
    for r, (mod, name, ip, lp) in enumerate(cases):
        img, lab = read_image(ip).array, read_image(lp).array
        zc = int(np.argmax((lab > 0).sum((0, 1))))
        yc = int(np.argmax((lab > 0).sum((0, 2))))
        lo, hi = (-200, 600) if mod == "ct" else np.percentile(img, (1, 99.5))
        for c, (im, lb, title) in enumerate(((img[:, :, zc].T, lab[:, :, zc].T, f"{name} axial z{zc}"),
                                             (img[:, yc, :].T, lab[:, yc, :].T, f"{name} coronal y{yc}"))):
            ax = axes[r, c]
            ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, origin="lower" if c == 1 else "upper")
            for k, code in enumerate(MMWHS_CODES.values()):
                if (lb == code).any():
                    ax.contour((lb == code).astype(float), [0.5], colors=[cmap(k)], linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return save_figure(fig, out_png)
