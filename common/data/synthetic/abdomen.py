"""Synthetic unpaired abdominal CT (BTCV layout) and T2-SPIR MRI (CHAOS layout: DICOM series + PNG ground truth).

Layouts written::

    RawData/Training/img/img0001.nii.gz           (X, Y, Z) int16 HU, portal-venous phase
    RawData/Training/label/label0001.nii.gz       (X, Y, Z) uint8 BTCV codes (1 spleen, 2 R kidney, 3 L kidney,
                                                  4 gallbladder, 6 liver, 7 stomach, 8 aorta, 9 IVC)
    Train_Sets/MR/<id>/T2SPIR/DICOM_anon/IMG-SSSS-NNNNN.dcm   one MR Image Storage file per axial slice
    Train_Sets/MR/<id>/T2SPIR/Ground/IMG-SSSS-NNNNN.png       8-bit masks: 63 liver, 126 R kidney, 189 L kidney,
                                                              252 spleen

(``write_btcv``/``write_chaos`` write a single layout directly into their root.) CT and MR cases are different
random patients from the same :class:`~common.data.synthetic.anatomy3d.AbdomenPhantom` family. DICOM files carry
the full geometry (Image Position/Orientation, PixelSpacing, SliceThickness, SpacingBetweenSlices) and Rescale
Slope/Intercept; instance 1 is the most cranial slice, as many scanners number them, so readers must sort by
position rather than by file name.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.abdomen import BTCV_CODES, CHAOS_CODES
from common.data.io import write_nifti
from common.data.loading import save_dicom
from common.data.synthetic.anatomy3d import (
    AbdomenPhantom,
    BiasField,
    Tissue,
    axial_affine,
    ct_table,
    grid_points,
    lps_to_ras_affine,
    render_tissues,
    rician_noise,
    t2spir_table,
    tissue_lookup,
)
from common.plotting import save_figure, subplots

__all__ = [
    "btcv_label_lut",
    "chaos_label_lut",
    "simulate_abdomen_volume",
    "write_dicom_series",
    "write_btcv",
    "write_chaos",
    "write_abdomen",
    "plot_abdomen",
]


def btcv_label_lut() -> np.ndarray:
    """Dense tissue -> BTCV code lookup ``(N_TISSUES,)`` uint8."""
    b = BTCV_CODES
    return tissue_lookup({
        Tissue.SPLEEN: b["spleen"], Tissue.KIDNEY_R: b["right_kidney"], Tissue.KIDNEY_L: b["left_kidney"],
        Tissue.GALLBLADDER: b["gallbladder"], Tissue.LIVER: b["liver"], Tissue.STOMACH: b["stomach"],
        Tissue.STOMACH_GAS: b["stomach"], Tissue.DESC_AORTA_BLOOD: b["aorta"], Tissue.IVC: b["ivc"],
    }).astype(np.uint8)


def chaos_label_lut() -> np.ndarray:
    """Dense tissue -> CHAOS PNG value lookup ``(N_TISSUES,)`` uint8."""
    c = CHAOS_CODES
    return tissue_lookup({Tissue.LIVER: c["liver"], Tissue.KIDNEY_R: c["right_kidney"],
                          Tissue.KIDNEY_L: c["left_kidney"], Tissue.SPLEEN: c["spleen"]}).astype(np.uint8)


def simulate_abdomen_volume(rng: np.random.Generator | int, modality: str = "ct",
                            shape: tuple[int, int, int] = (128, 128, 48),
                            spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
                            slice_thickness: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient: ``(image (X, Y, Z) float32, tissue ids (X, Y, Z) int16, affine (4, 4) voxel -> LPS)``.

    CT images are HU (portal-venous contrast, noise, slight blur); MR images are T2-SPIR-like signal in a.u.
    (fat suppressed, fluid bright) with coil bias and Rician noise, each slice integrating ``slice_thickness``
    (default: the slice spacing) to model the partial volume of thick MR slices.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    ph = AbdomenPhantom.sample(rng)
    center = np.array([0.0, 5.0, 30.0]) + rng.normal(0, [6, 6, 10])
    aff = axial_affine(center, shape, spacing)
    pts = grid_points(aff, shape).astype(np.float32)
    tissue = ph.tissues(pts)
    if modality == "ct":
        img = render_tissues(tissue, ph.texture(pts), *ct_table(rng, "portal"), relative=False).reshape(shape)
        img = ndimage.gaussian_filter(img, 0.6) + rng.normal(0, rng.uniform(10, 20), shape)
        return img.astype(np.float32), tissue.reshape(shape), aff
    table = t2spir_table(rng)
    thick = spacing[2] if slice_thickness is None else slice_thickness
    acc = np.zeros(len(pts), dtype=np.float32)
    for dz in (-thick / 3, 0.0, thick / 3):
        q = pts + np.array([0, 0, dz], dtype=np.float32)
        acc += render_tissues(ph.tissues(q) if dz else tissue, ph.texture(q), *table, relative=True)
    img = acc / 3 * BiasField.sample(rng, center, radius=170.0, strength=rng.uniform(0.3, 0.6))(pts)
    img = ndimage.gaussian_filter(img.reshape(shape), (0.5, 0.5, 0))
    return rician_noise(img, rng.uniform(0.012, 0.025), rng), tissue.reshape(shape), aff


def write_dicom_series(folder: str | Path, volume: np.ndarray, affine_lps: np.ndarray, *, series_number: int = 2,
                       uid_seed: str = "0", patient_id: str = "anon", rescale: tuple[float, float] = (1.0, 0.0),
                       slice_thickness: float | None = None, description: str = "T2SPIR",
                       stems: list[str] | None = None) -> list[Path]:
    """Write ``volume`` (X, Y, Z) (columns, rows, slices; stored values = (value - intercept) / slope, uint16) as an
    MR DICOM series, one file per slice, instance 1 = last (most cranial for an axial grid) slice.

    ``affine_lps`` (4, 4) is voxel -> LPS; its first two columns give Image Orientation and Pixel Spacing, its third
    the slice step. UIDs derive from ``uid_seed`` so output is reproducible. Returns the paths in instance order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = volume.shape
    cx, cy, cz = (affine_lps[:3, i] for i in range(3))
    sx, sy, sz = (float(np.linalg.norm(v)) for v in (cx, cy, cz))
    slope, inter = rescale
    stored = np.clip(np.round((np.asarray(volume, dtype=np.float64) - inter) / slope), 0, 65535).astype(np.uint16)
    uid = lambda *k: generate_uid(entropy_srcs=[uid_seed, *map(str, k)])  # noqa: E731
    study, series, frame_ref = uid("study"), uid("series", series_number), uid("for")
    date = datetime.date(2019, 1, 1).strftime("%Y%m%d")
    paths = []
    for inst in range(1, nz + 1):
        k = nz - inst
        sop = uid("sop", series_number, inst)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientName, ds.PatientID = "Anonymized", patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, series_number, inst
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "SK", "FS", "2D"
        ds.MagneticFieldStrength, ds.RepetitionTime, ds.EchoTime = 1.5, 1600.0, 85.0
        pos = affine_lps[:3, 3] + k * cz
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(cx / sx), *(cy / sy))]
        ds.SliceLocation = f"{float(pos @ (cz / sz)):.4f}"
        ds.PixelSpacing = [f"{sy:.5f}", f"{sx:.5f}"]  # (row spacing, column spacing)
        ds.SliceThickness = f"{(sz if slice_thickness is None else slice_thickness):.4f}"
        ds.SpacingBetweenSlices = f"{sz:.4f}"
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{inter:g}", "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        name = (stems[inst - 1] if stems else f"IMG-{series_number:04d}-{inst:05d}") + ".dcm"
        p = folder / name
        save_dicom(ds, p, file_format=True)
        paths.append(p)
    return paths


def _check_new(paths: list[Path], overwrite: bool) -> None:
    for p in paths:
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p}: already exists (pass overwrite=True to replace)")


def write_btcv(root: str | Path, n_cases: int = 4, seed: int = 0, *, shape: tuple[int, int, int] = (128, 128, 48),
               spacing: tuple[float, float, float] = (3.0, 3.0, 5.0), first_id: int = 1, overwrite: bool = False,
               progress: bool = True) -> list[tuple[Path, Path]]:
    """Write BTCV-like CT cases ``img/imgNNNN.nii.gz`` + ``label/labelNNNN.nii.gz`` under ``root``."""
    from tqdm.auto import tqdm

    root = Path(root)
    out = []
    for i in tqdm(range(n_cases), desc="btcv", disable=not progress):
        cid = first_id + i
        ip, lp = root / "img" / f"img{cid:04d}.nii.gz", root / "label" / f"label{cid:04d}.nii.gz"
        _check_new([ip, lp], overwrite)
        img, tissue, aff = simulate_abdomen_volume(np.random.default_rng([seed, 0, cid]), "ct", shape, spacing)
        ras = lps_to_ras_affine(aff)
        write_nifti(ip, np.clip(np.round(img), -1024, 3071).astype(np.int16), ras)
        write_nifti(lp, btcv_label_lut()[tissue], ras)
        out.append((ip, lp))
    return out


def write_chaos(root: str | Path, n_cases: int = 4, seed: int = 0, *, shape: tuple[int, int, int] = (128, 128, 26),
                spacing: tuple[float, float, float] = (3.0, 3.0, 8.0), first_id: int = 1,
                rescale: tuple[float, float] = (1.0, 0.0), overwrite: bool = False,
                progress: bool = True) -> list[Path]:
    """Write CHAOS-like T2-SPIR cases ``MR/<id>/T2SPIR/{DICOM_anon,Ground}`` under ``root``; returns case folders.

    ``rescale`` = (slope, intercept) stored in the DICOM files (the reader must apply them). Slices are 1 mm thinner
    than their spacing (a gap, as in many abdominal protocols), so the spacing must come from the positions.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    root = Path(root)
    out = []
    for i in tqdm(range(n_cases), desc="chaos", disable=not progress):
        cid = first_id + i
        case = root / "MR" / str(cid)
        if case.exists() and not overwrite:
            raise FileExistsError(f"{case}: already exists (pass overwrite=True to replace)")
        rng = np.random.default_rng([seed, 1, cid])
        img, tissue, aff = simulate_abdomen_volume(rng, "mr", shape, spacing, slice_thickness=spacing[2] - 1.0)
        series = int(rng.integers(2, 30))
        nz = shape[2]
        stems = [f"IMG-{series:04d}-{inst:05d}" for inst in range(1, nz + 1)]
        write_dicom_series(case / "T2SPIR" / "DICOM_anon", img * rng.uniform(600, 1400), aff, series_number=series,
                           uid_seed=f"chaos-{seed}-{cid}", patient_id=f"chaos{cid}", rescale=rescale,
                           slice_thickness=spacing[2] - 1.0, stems=stems)
        lab = chaos_label_lut()[tissue]
        gdir = case / "T2SPIR" / "Ground"
        gdir.mkdir(parents=True, exist_ok=True)
        for inst, stem in enumerate(stems, 1):
            Image.fromarray(np.ascontiguousarray(lab[:, :, nz - inst].T)).save(gdir / f"{stem}.png")
        out.append(case)
    return out


def write_abdomen(root: str | Path, n_ct: int = 4, n_mr: int = 4, seed: int = 0, *,
                  ct_shape: tuple[int, int, int] = (128, 128, 48),
                  ct_spacing: tuple[float, float, float] = (3.0, 3.0, 5.0),
                  mr_shape: tuple[int, int, int] = (128, 128, 26),
                  mr_spacing: tuple[float, float, float] = (3.0, 3.0, 8.0), overwrite: bool = False,
                  progress: bool = True) -> dict[str, list]:
    """Both abdominal sets under one root, in the releases' own sub-folders: ``RawData/Training`` (BTCV) and
    ``Train_Sets/MR`` (CHAOS); ``btcv_datalist(root)`` and ``chaos_datalist(root)`` find them there."""
    root = Path(root)
    return {
        "btcv": write_btcv(root / "RawData" / "Training", n_ct, seed, shape=ct_shape, spacing=ct_spacing,
                           overwrite=overwrite, progress=progress),
        "chaos": write_chaos(root / "Train_Sets", n_mr, seed, shape=mr_shape, spacing=mr_spacing,
                             overwrite=overwrite, progress=progress),
    }


def plot_abdomen(root: str | Path, out_png: str | Path) -> Path:
    """PNG of an axial slice through the kidneys of the first BTCV and first CHAOS case, with organ contours."""

    from common.data.abdomen import (
        ABDOMEN_STRUCTURES,
        find_btcv_cases,
        find_chaos_cases,
        load_chaos_case,
        remap_btcv_labels,
    )
    from common.data.io import DataError, read_image

    panels = []
    try:
        _, ip, lp = find_btcv_cases(root)[0]
        panels.append(("BTCV CT " + ip.name, read_image(ip).array, remap_btcv_labels(read_image(lp).array),
                       (-160, 240)))
    except DataError:
        pass
    try:
        name, d = find_chaos_cases(root)[0]
        img, lab = load_chaos_case(d)
        panels.append((f"CHAOS T2SPIR {name}", img.array, lab.array, tuple(np.percentile(img.array, (1, 99.5)))))
    except DataError:
        pass
    if not panels:
        raise FileNotFoundError(f"{root}: no BTCV or CHAOS case to plot")
    fig, axes = subplots(1, 2 * len(panels), figsize=(6.5 * len(panels), 3.5), squeeze=False)
    colors = ("tab:red", "tab:green", "tab:blue", "tab:orange")
    for n, (title, img, lab, (lo, hi)) in enumerate(panels):
        kid = ((lab == 2) | (lab == 3)).sum((0, 1))
        zs = [int(np.argmax(kid)), int(np.argmax((lab == 1).sum((0, 1))))]
        for c, z in enumerate(zs):
            ax = axes[0, 2 * n + c]
            ax.imshow(img[:, :, z].T, cmap="gray", vmin=lo, vmax=hi)
            for k, col in enumerate(colors, 1):
                if (lab[:, :, z] == k).any():
                    ax.contour((lab[:, :, z] == k).T.astype(float), [0.5], colors=col, linewidths=0.8)
            ax.set_title(f"{title} z{z} ({', '.join(ABDOMEN_STRUCTURES)})", fontsize=6)
            ax.axis("off")
    return save_figure(fig, out_png)
