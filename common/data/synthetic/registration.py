"""2D ED -> ES registration pairs with regions where correspondence is lost, and the ground truth to score them.

Each pair is one mid-ventricular short-axis slice of a random patient (the beating heart of
:mod:`common.data.synthetic.anatomy3d`) at end-diastole (source) and end-systole (target), imaged either as cine MRI
(balanced SSFP, like the ACDC slices AdaCS trains on) or as parasternal short-axis echo (speckle from scatterers that
move with the tissue, a sector, log compression). Regions are then corrupted so that no displacement can explain
them: out-of-plane dropout (signal vanishes in a blob), shadowing (an acoustic shadow wedge in echo, a dark bSSFP
banding stripe in MRI) and noise bursts. Most corruptions hit the target; some hit the source and are carried onto
the target grid through the true motion.

Layout written under ``root/pairs/`` (NIfTI, nibabel axis order (X, Y), array axis 0 along image columns)::

    pairNNNN_source.nii.gz, pairNNNN_target.nii.gz          float32 images, about [0, 1]
    pairNNNN_source_myo.nii.gz, pairNNNN_target_myo.nii.gz  uint8 LV myocardium masks
    pairNNNN_disp.nii.gz    (X, Y, 2) float32 voxels, pull-back: target(x) = source(x + disp(x)) where not lost
    pairNNNN_lost.nii.gz    uint8, 1 where correspondence is lost (on the target grid)
    manifest.csv            pair, modality, group, corruptions, lost fraction

``lost`` marks the pixels whose intensity a corruption changed by more than ``LOST_DELTA`` (judged after light
smoothing; a dropout over black lung loses nothing), the pixels of a noise burst whose expected absolute change
exceeds ``LOST_DELTA``, and in echo the pixels whose source position lies outside the sector (tissue that entered
the view).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from common.data.io import write_nifti
from common.data.synthetic.acdc import SaxGeometry, SaxRenderer, sax_displacement, sax_geometry
from common.data.synthetic.anatomy3d import (
    HEART_GROUPS,
    BiasField,
    ThoraxPhantom,
    Tissue,
    bssfp_table,
    rician_noise,
    tissue_lookup,
)
from common.plotting import save_figure, subplots

__all__ = [
    "PAIR_MODALITIES",
    "CORRUPTIONS",
    "LOST_DELTA",
    "RegistrationPair",
    "warp2d",
    "simulate_registration_pair",
    "write_registration_pairs",
    "plot_registration_pairs",
]

PAIR_MODALITIES = ("mri", "echo")
CORRUPTIONS = ("dropout", "shadow", "noise")
LOST_DELTA = 0.05
_NOISE_SIGMA = 0.3


@dataclass
class RegistrationPair:
    """One pair; arrays ``(X, Y)`` except ``disp`` ``(X, Y, 2)`` (voxels, pull-back target -> source)."""

    source: np.ndarray
    target: np.ndarray
    source_myo: np.ndarray
    target_myo: np.ndarray
    disp: np.ndarray
    lost: np.ndarray
    spacing: tuple[float, float]
    modality: str
    group: str
    corruptions: list[str]


def warp2d(image: np.ndarray, disp: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(x) = image(x + disp(x))`` for ``image`` ``(X, Y)`` and ``disp`` ``(X, Y, 2)`` (voxels), edge-clamped."""
    gx, gy = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    return ndimage.map_coordinates(image, [gx + disp[..., 0], gy + disp[..., 1]], order=order, mode="nearest")


# ----------------------------------------------------------------------------------------------------------------
# echo appearance

_ECHOGENICITY = tissue_lookup({
    Tissue.SOFT: 0.6, Tissue.FAT: 1.2, Tissue.LUNG: 0.25, Tissue.BONE: 1.6, Tissue.CSF: 0.05,
    Tissue.HEART_WALL: 1.0, Tissue.LV_MYO: 1.0, Tissue.PAPILLARY: 1.0, Tissue.LIVER: 0.55,
}, default=0.05)  # blood and everything else: weak scatterers


class _EchoImager:
    """Parasternal short-axis B-mode of a plane: scatterers fixed at end-diastole, moved by the motion model.

    The complex (IQ) echo field is the scatterer map convolved with a Gaussian point-spread function on a fine grid
    in end-diastolic plane coordinates; a frame samples it at the pulled-back pixel positions, so the speckle moves
    with the tissue, then takes the envelope, applies depth attenuation, a sector and log compression.
    """

    def __init__(self, phantom: ThoraxPhantom, geom: SaxGeometry, rng: np.random.Generator, fine: float = 0.3):
        self.phantom, self.geom = phantom, geom
        hm = phantom.heart
        h = geom.heart_points(0.0)[:, :2]
        lo, hi = h.min(0) - 12.0, h.max(0) + 12.0
        self.lo, self.fine = lo, fine
        nx, ny = (int(math.ceil(v)) for v in (hi - lo) / fine)
        gx, gy = np.meshgrid(lo[0] + fine * np.arange(nx), lo[1] + fine * np.arange(ny), indexing="ij")
        pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, geom.slice_z[0])], 1).astype(np.float32)
        t, _ = phantom.tissues(hm.to_world(pts), 0.0)
        amp = _ECHOGENICITY[t].reshape(nx, ny) * rng.lognormal(0, 0.15, (nx, ny))
        scat = (rng.normal(size=(nx, ny)) + 1j * rng.normal(size=(nx, ny))) * amp
        # beam axis = image axis 1 (depth): sharp axially, wider laterally
        sa, sl = rng.uniform(0.7, 0.9) / fine, rng.uniform(1.5, 2.0) / fine
        ax = np.arange(-int(3 * sl), int(3 * sl) + 1)
        psf = np.exp(-0.5 * (ax[:, None] / sl) ** 2) * np.exp(-0.5 * (ax[None, :] / sa) ** 2)
        self.field = signal.fftconvolve(scat, psf.astype(np.float64), mode="same")
        nxi, nyi = geom.shape
        self.apex = np.array([(nxi - 1) / 2, -rng.uniform(8, 20)])  # transducer above the first row (pixels)
        ii, jj = np.meshgrid(np.arange(nxi), np.arange(nyi), indexing="ij")
        dx, dy = ii - self.apex[0], jj - self.apex[1]
        self.depth_mm = np.hypot(dx * geom.spacing[0], dy * geom.spacing[1])
        self.angle = np.arctan2(dx * geom.spacing[0], dy * geom.spacing[1])
        half = math.radians(rng.uniform(36, 42))
        self.sector = (np.abs(self.angle) < half) & (self.depth_mm > 5.0)
        self.gain = np.exp(-rng.uniform(0.002, 0.006) * self.depth_mm)  # uncompensated attenuation
        self.ref: float | None = None
        self.dyn_range = rng.uniform(45, 55)

    def envelope(self, phase: float) -> np.ndarray:
        hm = self.phantom.heart
        h = hm.inverse_motion(self.geom.heart_points(0.0).astype(np.float64), phase)[:, :2]
        idx = ((h - self.lo) / self.fine).T
        re = ndimage.map_coordinates(self.field.real, idx, order=1, mode="nearest")
        im = ndimage.map_coordinates(self.field.imag, idx, order=1, mode="nearest")
        return np.hypot(re, im).reshape(self.geom.shape) * self.gain

    def bmode(self, env: np.ndarray) -> np.ndarray:
        if self.ref is None:  # one reference level for both frames, as a fixed scanner gain would give
            self.ref = float(np.percentile(env[self.sector], 99.5))
        db = 20 * np.log10(np.maximum(env, 1e-12) / self.ref)
        return (np.clip(1 + db / self.dyn_range, 0, 1) * self.sector).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# corruptions


def _blob(shape: tuple[int, int], center: np.ndarray, radii: tuple[float, float], angle: float) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u = ((ii - center[0]) * c + (jj - center[1]) * s) / radii[0]
    v = (-(ii - center[0]) * s + (jj - center[1]) * c) / radii[1]
    # weight 1 in the core, falling linearly to 0 from half to 1.5 radii: >= 0.5 exactly inside the ellipse
    return np.clip(1.5 - np.sqrt(u * u + v * v), 0, 1).astype(np.float32)


def _corruption_weight(kind: str, shape: tuple[int, int], myo: np.ndarray, rng: np.random.Generator,
                       modality: str, echo: _EchoImager | None, spacing: tuple[float, float]) -> np.ndarray:
    """Corruption weight ``(X, Y)`` in [0, 1] of one region, aimed at the myocardium."""
    cand = np.argwhere(myo) if myo.any() else np.argwhere(np.ones(shape, bool))
    c = cand[rng.integers(len(cand))] + rng.normal(0, 2, 2)
    if kind in ("dropout", "noise"):
        r = rng.uniform(6, 12, 2) / np.asarray(spacing)
        return _blob(shape, c, (r[0], r[1]), rng.uniform(0, np.pi))
    if modality == "echo":
        # acoustic shadow: everything behind an occluder at the chosen point, within a narrow beam wedge
        ang_c = echo.angle[int(np.clip(c[0], 0, shape[0] - 1)), int(np.clip(c[1], 0, shape[1] - 1))]
        d0 = echo.depth_mm[int(np.clip(c[0], 0, shape[0] - 1)), int(np.clip(c[1], 0, shape[1] - 1))] - 6.0
        half = math.radians(rng.uniform(3, 7))
        w_ang = np.clip((half - np.abs(echo.angle - ang_c)) / (0.3 * half) + 0.5, 0, 1)
        w_dep = np.clip((echo.depth_mm - d0) / 3.0 + 0.5, 0, 1)
        return (w_ang * w_dep).astype(np.float32)
    # bSSFP banding: a dark stripe along an arc through the chosen point
    rad = rng.uniform(25, 60) / spacing[0]
    phi = rng.uniform(0, 2 * np.pi)
    oc = c - rad * np.array([math.cos(phi), math.sin(phi)])
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    dist = np.abs(np.hypot(ii - oc[0], jj - oc[1]) - rad) * spacing[0]
    width = rng.uniform(2.0, 3.5)
    span = rng.uniform(0.5, 0.9)  # an arc, not a full ring
    off = np.abs((np.arctan2(jj - oc[1], ii - oc[0]) - phi + np.pi) % (2 * np.pi) - np.pi)
    w_arc = np.clip((span - off) / 0.15 + 0.5, 0, 1)
    return (np.clip((width - dist) / 1.5 + 0.5, 0, 1) * w_arc).astype(np.float32)


def _apply(kind: str, img: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        bad = np.clip(img + rng.normal(0, _NOISE_SIGMA, img.shape), 0, None)
    else:  # dropout and shadow: the signal is (almost) gone
        bad = img * rng.uniform(0.05, 0.15)
    return ((1 - w) * img + w * bad).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------


def simulate_registration_pair(rng: np.random.Generator | int, modality: str = "mri",
                               shape: tuple[int, int] = (128, 128), spacing: tuple[float, float] | None = None,
                               corruptions: tuple[str, ...] = CORRUPTIONS, max_regions: int = 3,
                               p_source: float = 0.3, clean: bool = False) -> RegistrationPair:
    """Simulate one ED -> ES pair (see the module docstring); ``clean=True`` applies no corruption.

    ``spacing`` defaults to 1.5 mm (MRI) or a 140 mm deep field of view (echo); 1 to ``max_regions`` regions of the
    given kinds are drawn, each on the source with probability ``p_source``.
    """
    if modality not in PAIR_MODALITIES:
        raise ValueError(f"modality must be one of {PAIR_MODALITIES}, got {modality!r}")
    for k in corruptions:
        if k not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {k!r}; choose from {CORRUPTIONS}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if spacing is None:  # MRI: ACDC-like pixels; echo: a 140 mm deep parasternal view whatever the matrix
        spacing = (1.5, 1.5) if modality == "mri" else (140.0 / shape[1], 140.0 / shape[1])
    group = str(rng.choice(HEART_GROUPS))
    ph = ThoraxPhantom.sample(rng, group)
    geom = sax_geometry(ph, rng, shape, spacing, 10.0, 8.0, n_slices=1)
    geom = dataclasses.replace(geom, slice_z=np.array([ph.heart.za * rng.uniform(0.25, 0.55)]))
    echo = None
    if modality == "mri":
        bias = BiasField.sample(rng, ph.heart.base, radius=120.0, strength=rng.uniform(0.2, 0.5))
        rend = SaxRenderer(ph, geom, bssfp_table(rng), bias)
        (s_img, s_t), (t_img, t_t) = rend.render(0.0), rend.render(1.0)
        s_img, t_img = s_img[..., 0], t_img[..., 0]
        ref = float(np.percentile(s_img, 99.5))
        sig = rng.uniform(0.01, 0.025)
        s_img = rician_noise(ndimage.gaussian_filter(s_img / ref, 0.5), sig, rng)
        t_img = rician_noise(ndimage.gaussian_filter(t_img / ref, 0.5), sig, rng)
    else:
        echo = _EchoImager(ph, geom, rng)
        s_img = echo.bmode(echo.envelope(0.0))
        t_img = echo.bmode(echo.envelope(1.0))
        sig = rng.uniform(0.01, 0.02)  # electronic noise on top of the speckle
        s_img = np.clip(s_img + rng.normal(0, sig, shape) * echo.sector, 0, 1).astype(np.float32)
        t_img = np.clip(t_img + rng.normal(0, sig, shape) * echo.sector, 0, 1).astype(np.float32)
        s_t = ph.tissues(ph.heart.to_world(geom.heart_points(0.0)), 0.0)[0].reshape(*shape, 1)
        t_t = ph.tissues(ph.heart.to_world(geom.heart_points(0.0)), 1.0)[0].reshape(*shape, 1)
    s_myo = (s_t[..., 0] == Tissue.LV_MYO).astype(np.uint8)
    t_myo = (t_t[..., 0] == Tissue.LV_MYO).astype(np.uint8)
    disp = sax_displacement(ph, geom, 0.0, 1.0)[:, :, 0, :2].copy()

    lost = np.zeros(shape, dtype=bool)
    applied: list[str] = []
    n_regions = 0 if clean or not corruptions else int(rng.integers(1, max_regions + 1))
    src, tgt = s_img.copy(), t_img.copy()
    for _ in range(n_regions):
        kind = str(rng.choice(corruptions))
        on_source = bool(rng.random() < p_source)
        myo = s_myo if on_source else t_myo
        w = _corruption_weight(kind, shape, myo.astype(bool), rng, modality, echo, spacing)
        before = src if on_source else tgt
        after = _apply(kind, before, w, rng)
        if echo is not None:
            after *= echo.sector
        if kind == "noise":  # where the expected absolute change of the burst exceeds the threshold
            region = w * _NOISE_SIGMA * math.sqrt(2 / math.pi) > LOST_DELTA
        else:  # judged on the smoothed change so that pixel noise does not fray the region's edge
            region = ndimage.gaussian_filter(np.abs(after - before), 1.0) > LOST_DELTA
        if on_source:
            src = after
            lost |= warp2d(region.astype(np.float32), disp) >= 0.5
        else:
            tgt = after
            lost |= region
        applied.append(f"{'source' if on_source else 'target'}:{kind}")
    if echo is not None:
        # tissue that moves in from outside the sector has no counterpart in the source either
        lost |= echo.sector & (warp2d(echo.sector.astype(np.float32), disp) < 0.5)
    return RegistrationPair(src, tgt, s_myo, t_myo, disp.astype(np.float32), lost.astype(np.uint8), tuple(spacing),
                            modality, group, applied)


def write_registration_pairs(root: str | Path, n_pairs: int = 20, seed: int = 0, *, modality: str = "mixed",
                             shape: tuple[int, int] = (128, 128), corruptions: tuple[str, ...] = CORRUPTIONS,
                             max_regions: int = 3, clean_fraction: float = 0.1, overwrite: bool = False,
                             progress: bool = True) -> list[Path]:
    """Write ``n_pairs`` pairs under ``root/pairs/`` plus ``manifest.csv``; returns the source image paths.

    ``modality``: ``"mri"``, ``"echo"`` or ``"mixed"`` (alternating). Pair ``n`` is drawn from ``(seed, n)`` only; a
    ``clean_fraction`` of pairs (every ``round(1/clean_fraction)``-th) carries no corruption, as a control.
    """
    from tqdm.auto import tqdm

    if modality not in (*PAIR_MODALITIES, "mixed"):
        raise ValueError(f"modality must be 'mri', 'echo' or 'mixed', got {modality!r}")
    out_dir = Path(root) / "pairs"
    out_dir.mkdir(parents=True, exist_ok=True)
    every = round(1 / clean_fraction) if clean_fraction > 0 else 0
    rows, out = [], []
    for n in tqdm(range(n_pairs), desc="registration pairs", disable=not progress):
        name = f"pair{n + 1:04d}"
        src_p = out_dir / f"{name}_source.nii.gz"
        if src_p.exists() and not overwrite:
            raise FileExistsError(f"{src_p}: already exists (pass overwrite=True to replace)")
        mod = PAIR_MODALITIES[n % 2] if modality == "mixed" else modality
        clean = bool(every) and (n % every == every - 1)
        pair = simulate_registration_pair(np.random.default_rng([seed, n + 1]), mod, shape, None, corruptions,
                                          max_regions, clean=clean)
        aff = np.diag([pair.spacing[0], pair.spacing[1], 1.0, 1.0])
        for suffix, arr in (("source", pair.source), ("target", pair.target), ("source_myo", pair.source_myo),
                            ("target_myo", pair.target_myo), ("disp", pair.disp), ("lost", pair.lost)):
            write_nifti(out_dir / f"{name}_{suffix}.nii.gz", arr, aff)
        rows.append([name, mod, pair.group, ";".join(pair.corruptions), f"{pair.lost.mean():.4f}"])
        out.append(src_p)
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "modality", "group", "corruptions", "lost_fraction"])
        w.writerows(rows)
    return out


def plot_registration_pairs(root: str | Path, out_png: str | Path, n: int = 4) -> Path:
    """PNG per pair: source, target, |target - warped source| and the lost map (red) with myocardium contours."""

    from common.data.io import read_image
    from common.data.registration import read_displacement, registration_pairs_datalist

    dl = registration_pairs_datalist(root)[:n]
    fig, axes = subplots(len(dl), 4, figsize=(12, 3 * len(dl)), squeeze=False)
    for r, e in enumerate(dl):
        s, t = read_image(e["source"]).array, read_image(e["target"]).array
        sm, tm = read_image(e["source_myo"]).array, read_image(e["target_myo"]).array
        lost = read_image(e["lost"]).array
        d = np.moveaxis(read_displacement(e["disp"]), 0, -1)
        diff = np.abs(t - warp2d(s, d))
        for c, (im, title) in enumerate(((s, "source (ED)"), (t, "target (ES)"), (diff, "|target - warp(source)|"),
                                         (t, "lost (red)"))):
            ax = axes[r, c]
            ax.imshow(im.T, cmap="gray", vmin=0, vmax=1)
            if c in (0, 1):
                ax.contour((sm if c == 0 else tm).T.astype(float), [0.5], colors="tab:green", linewidths=0.8)
            if c == 3 and lost.any():
                ax.contour(lost.T.astype(float), [0.5], colors="red", linewidths=0.8)
            ax.set_title(f"{e['pair']} {title}", fontsize=8)
            ax.axis("off")
    return save_figure(fig, out_png)
