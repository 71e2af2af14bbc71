"""Synthetic cine MRI in the ACDC layout, with ground-truth motion between end-diastole and end-systole.

Layout written (one folder per patient, as in the ACDC release)::

    patientNNN/Info.cfg                      ED: 1 / ES: k / Group / Height / NbFrame / Weight
    patientNNN/patientNNN_4d.nii.gz          (X, Y, Z, T) int16 short-axis cine
    patientNNN/patientNNN_frameNN.nii.gz     (X, Y, Z) ED and ES frames (copies of the 4D volume's frames)
    patientNNN/patientNNN_frameNN_gt.nii.gz  (X, Y, Z) uint8 labels: 0 bg, 1 RV cavity, 2 LV myocardium, 3 LV cavity
    patientNNN/patientNNN_ed2es_disp.nii.gz  (X, Y, Z, 3) float32, extra to ACDC: ED->ES displacement

The displacement is in voxels along the array axes and pulls back: ``ES(x) = ED(x + disp(x))`` (MONAI ``Warp``
convention, ``ddf`` channel order = array axes). The motion is in the short-axis plane, so its third component is 0.

Images are balanced-SSFP-like: bright blood, dark myocardium, bright fat, dark lung, with partial volume across the
thick slice, a smooth coil bias field fixed in scanner space and Rician noise. Array axes: x along the image rows
(RV on the low-x side), y towards the patient's back, z from base to apex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.io import write_nifti
from common.data.synthetic.anatomy3d import (
    HEART_GROUPS,
    BiasField,
    ThoraxPhantom,
    Tissue,
    bssfp_table,
    cardiac_phase_curve,
    lps_to_ras_affine,
    render_tissues,
    rician_noise,
    tissue_lookup,
)
from common.plotting import save_figure, subplots

__all__ = [
    "ACDC_LABELS",
    "ACDC_GROUPS",
    "SaxGeometry",
    "AcdcCase",
    "acdc_label_map",
    "sax_geometry",
    "SaxRenderer",
    "render_sax_frame",
    "sax_displacement",
    "simulate_acdc_patient",
    "acdc_displacement",
    "write_acdc",
    "plot_acdc",
]

ACDC_LABELS = {"RV": 1, "Myo": 2, "LV": 3}
ACDC_GROUPS = HEART_GROUPS


def acdc_label_map() -> np.ndarray:
    """Dense tissue -> ACDC label lookup ``(N_TISSUES,)`` uint8 (papillary muscles count as LV cavity)."""
    return tissue_lookup({Tissue.RV_BLOOD: 1, Tissue.LV_MYO: 2, Tissue.LV_BLOOD: 3, Tissue.PAPILLARY: 3}).astype(
        np.uint8)


@dataclass
class SaxGeometry:
    """A short-axis stack in the heart frame of a :class:`ThoraxPhantom`.

    Voxel ``(i, j, k)`` sits at heart-frame ``origin + i * sx * u + j * sy * v + slice_z[k] * e_z`` where ``u``,
    ``v`` are unit in-plane axes; ``thickness`` is the slab each slice integrates over.
    """

    shape: tuple[int, int]
    spacing: tuple[float, float]
    slice_z: np.ndarray  # (Z,) mm from the LV base along the long axis
    origin: np.ndarray  # (2,) heart-frame (x, y) of voxel (0, 0)
    u: np.ndarray  # (2,) in-plane unit vector of array axis 0 (heart-frame x, y)
    v: np.ndarray  # (2,) of array axis 1
    thickness: float

    @property
    def slice_spacing(self) -> float:
        return float(self.slice_z[1] - self.slice_z[0]) if len(self.slice_z) > 1 else self.thickness

    def heart_points(self, dz: float = 0.0) -> np.ndarray:
        """Heart-frame points ``(X*Y*Z, 3)`` of all voxel centres (C order of ``(X, Y, Z)``), shifted by ``dz``."""
        nx, ny = self.shape
        i = np.arange(nx, dtype=np.float32)[:, None, None] * self.spacing[0]
        j = np.arange(ny, dtype=np.float32)[None, :, None] * self.spacing[1]
        z = np.asarray(self.slice_z, dtype=np.float32)[None, None, :] + dz
        full = (nx, ny, len(self.slice_z))
        x = np.broadcast_to(self.origin[0] + i * self.u[0] + j * self.v[0], full)
        y = np.broadcast_to(self.origin[1] + i * self.u[1] + j * self.v[1], full)
        return np.stack([x.ravel(), y.ravel(), np.broadcast_to(z, full).ravel()], 1).astype(np.float32)

    def affine_lps(self, phantom: ThoraxPhantom) -> np.ndarray:
        """Voxel -> world (LPS) 4x4 affine."""
        f = phantom.heart.frame
        a = np.eye(4)
        a[:3, 0] = f @ np.array([self.u[0], self.u[1], 0.0]) * self.spacing[0]
        a[:3, 1] = f @ np.array([self.v[0], self.v[1], 0.0]) * self.spacing[1]
        a[:3, 2] = f[:, 2] * self.slice_spacing
        a[:3, 3] = phantom.heart.to_world(np.array([[self.origin[0], self.origin[1], self.slice_z[0]]]))[0]
        return a


def sax_geometry(phantom: ThoraxPhantom, rng: np.random.Generator, shape: tuple[int, int] = (128, 128),
                 spacing: tuple[float, float] = (1.5, 1.5), slice_spacing: float = 10.0,
                 slice_thickness: float = 8.0, n_slices: int | None = None) -> SaxGeometry:
    """Short-axis stack from just below the base to the apex, anterior up and the RV on the image left.

    ``n_slices=None`` covers the ventricle (as the ACDC acquisitions do), so the count varies with heart size.
    """
    hm = phantom.heart
    f = hm.frame
    # in-plane axis 1 must point to the patient's back so that displayed rows run anterior -> posterior
    v = np.array([0.0, 1.0]) if f[1, 1] > 0 else np.array([0.0, -1.0])
    u = np.array([1.0, 0.0])  # away from the RV (which lies at theta ~ pi)
    centre = np.array([-0.3 * hm.ra, 0.0]) + rng.normal(0, 4, 2)
    origin = centre - ((shape[0] - 1) / 2 * spacing[0]) * u - ((shape[1] - 1) / 2 * spacing[1]) * v
    z0 = rng.uniform(1.0, 4.0)
    if n_slices is None:
        n_slices = int(np.clip(math.ceil((hm.za + hm.apex_wall - z0) / slice_spacing), 5, 16))
    slice_z = z0 + slice_spacing * np.arange(n_slices)
    return SaxGeometry(tuple(shape), tuple(spacing), slice_z, origin, u, v, float(slice_thickness))


class SaxRenderer:
    """Renders a :class:`SaxGeometry` of a phantom at any contraction phase, noise-free.

    The slab of each slice is integrated with ``n_sub`` planes (odd; the middle one gives the tissue map) to model
    partial volume. Everything outside the heart's motion support is the same at every phase, so it is rendered once
    at end-diastole and only moving points are redrawn per frame.
    """

    def __init__(self, phantom: ThoraxPhantom, geom: SaxGeometry, table: tuple[np.ndarray, np.ndarray],
                 bias: BiasField | None = None, n_sub: int = 3):
        if n_sub < 1 or n_sub % 2 == 0:
            raise ValueError(f"n_sub must be odd and positive, got {n_sub}")
        self.phantom, self.geom, self.table = phantom, geom, table
        self.shape = (*geom.shape, len(geom.slice_z))
        offs = np.linspace(-geom.thickness / 3, geom.thickness / 3, n_sub) if n_sub > 1 else np.zeros(1)
        hm = phantom.heart
        self.planes = []
        for dz in offs:
            h = geom.heart_points(float(dz))
            p = hm.to_world(h)
            b = bias(p) if bias is not None else np.ones(len(p), dtype=np.float32)
            t, p0 = phantom.tissues(p, 0.0)
            img = render_tissues(t, phantom.texture(p0), *table, relative=True) * b
            self.planes.append((p, b, t, img, np.nonzero(hm.motion_support(h))[0]))

    def render(self, phase: float) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(X, Y, Z)`` float32 and tissue ids at slab centres ``(X, Y, Z)`` at ``phase``."""
        acc = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        centre = None
        for n, (p, b, t, img, mov) in enumerate(self.planes):
            if phase != 0.0 and len(mov):
                t = t.copy()
                img = img.copy()
                tm, p0 = self.phantom.tissues(p[mov], phase)
                t[mov] = tm
                img[mov] = render_tissues(tm, self.phantom.texture(p0), *self.table, relative=True) * b[mov]
            acc += img
            if n == len(self.planes) // 2:
                centre = t
        return (acc / len(self.planes)).reshape(self.shape), centre.reshape(self.shape)


def render_sax_frame(phantom: ThoraxPhantom, geom: SaxGeometry, phase: float, table: tuple[np.ndarray, np.ndarray],
                     bias: BiasField | None = None, n_sub: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One noise-free frame ``(X, Y, Z)`` and its slab-centre tissue ids (see :class:`SaxRenderer`)."""
    return SaxRenderer(phantom, geom, table, bias, n_sub).render(phase)


def sax_displacement(phantom: ThoraxPhantom, geom: SaxGeometry, phase_src: float, phase_tgt: float) -> np.ndarray:
    """Pull-back displacement ``(X, Y, Z, 3)`` float32 in voxels: ``frame_tgt(x) = frame_src(x + d(x))``.

    Target-grid points are mapped to end-diastole and then forward to the source phase.
    """
    hm = phantom.heart
    h_t = geom.heart_points(0.0).astype(np.float64)
    h_s = hm.forward_motion(hm.inverse_motion(h_t, phase_tgt), phase_src)
    d = (h_s - h_t)[:, :2]
    full = (*geom.shape, len(geom.slice_z))
    out = np.zeros((*full, 3), dtype=np.float32)
    out[..., 0] = ((d @ geom.u) / geom.spacing[0]).reshape(full)
    out[..., 1] = ((d @ geom.v) / geom.spacing[1]).reshape(full)
    return out


@dataclass
class AcdcCase:
    """One simulated ACDC patient (arrays in nibabel axis order, see the module docstring)."""

    patient: str
    group: str
    height: float
    weight: float
    frames: np.ndarray  # (X, Y, Z, T) int16
    labels: dict[int, np.ndarray]  # 1-based frame -> (X, Y, Z) uint8, for ED and ES
    disp: np.ndarray  # (X, Y, Z, 3) float32 ED -> ES pull-back, voxels
    ed: int
    es: int
    phases: np.ndarray  # (T,) contraction phase per frame
    affine: np.ndarray  # (4, 4) RAS
    spacing: tuple[float, float, float]
    phantom: ThoraxPhantom
    geometry: SaxGeometry


def simulate_acdc_patient(rng: np.random.Generator | int, patient: str = "patient001", group: str = "NOR",
                          shape: tuple[int, int] = (128, 128), spacing: tuple[float, float] = (1.5, 1.5),
                          slice_spacing: float = 10.0, slice_thickness: float = 8.0, n_frames: int = 20,
                          noise: float = 0.02) -> AcdcCase:
    """Simulate one cine MRI patient: a short-axis 4D stack ``(X, Y, Z, T)``, ED/ES labels and ED->ES motion.

    ``noise`` is the Rician noise level relative to the blood signal (about 0.85 before gain).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if n_frames < 3:
        raise ValueError(f"n_frames must be >= 3, got {n_frames}")
    phantom = ThoraxPhantom.sample(rng, group)
    geom = sax_geometry(phantom, rng, shape, spacing, slice_spacing, slice_thickness)
    table = bssfp_table(rng)
    bias = BiasField.sample(rng, phantom.heart.base, radius=120.0, strength=rng.uniform(0.2, 0.6))
    es = int(np.clip(round(n_frames * rng.uniform(0.33, 0.45)) + 1, 2, n_frames))
    phases = cardiac_phase_curve(n_frames, es)
    gain = rng.uniform(300, 900)  # scanners store arbitrary magnitude scales
    lab = acdc_label_map()
    frames, labels = [], {}
    renderer = SaxRenderer(phantom, geom, table, bias)
    for t, ph in enumerate(phases):
        img, tissue = renderer.render(float(ph))
        # in-plane point spread of the finite k-space sampling
        img = ndimage.gaussian_filter(img, (0.5, 0.5, 0))
        img = rician_noise(img, noise, rng)
        frames.append(np.clip(np.round(img * gain), 0, 32767).astype(np.int16))
        if t + 1 in (1, es):
            labels[t + 1] = lab[tissue]
    disp = sax_displacement(phantom, geom, 0.0, float(phases[es - 1]))
    affine = lps_to_ras_affine(geom.affine_lps(phantom))
    height = float(np.round(rng.normal(171, 9), 1))
    weight = float(np.round(max(45.0, rng.normal(76 if group != "DCM" else 85, 13)), 1))
    return AcdcCase(patient, group, height, weight, np.stack(frames, -1), labels, disp, 1, es, phases, affine,
                    (*spacing, geom.slice_spacing), phantom, geom)


def acdc_displacement(case: AcdcCase, src_frame: int | None = None, tgt_frame: int | None = None) -> np.ndarray:
    """Ground-truth pull-back displacement ``(X, Y, Z, 3)`` (voxels) between any two 1-based frames of a case.

    Defaults to ED -> ES, i.e. ``frames[..., tgt-1](x) = frames[..., src-1](x + d(x))``.
    """
    src = case.ed if src_frame is None else src_frame
    tgt = case.es if tgt_frame is None else tgt_frame
    n = len(case.phases)
    for f in (src, tgt):
        if not 1 <= f <= n:
            raise ValueError(f"frame {f} outside 1..{n} of {case.patient}")
    return sax_displacement(case.phantom, case.geometry, float(case.phases[src - 1]), float(case.phases[tgt - 1]))


def _info_cfg(case: AcdcCase) -> str:
    return (f"ED: {case.ed}\nES: {case.es}\nGroup: {case.group}\nHeight: {case.height:.1f}\n"
            f"NbFrame: {case.frames.shape[-1]}\nWeight: {case.weight:.1f}\n")


def write_acdc(root: str | Path, n_patients: int = 5, seed: int = 0, *, shape: tuple[int, int] = (128, 128),
               spacing: tuple[float, float] = (1.5, 1.5), slice_spacing: float = 10.0, slice_thickness: float = 8.0,
               n_frames: int = 20, groups: tuple[str, ...] = ACDC_GROUPS, first_id: int = 1,
               write_displacement: bool = True, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Write ``n_patients`` synthetic patients in the ACDC layout under ``root``; returns the patient folders.

    Patient ``patientNNN`` is drawn from ``seed`` and its number only, so a larger set extends a smaller one; groups
    cycle through ``groups``. Existing patient folders are an error unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    for g in groups:
        if g not in ACDC_GROUPS:
            raise ValueError(f"unknown ACDC group {g!r}; choose from {ACDC_GROUPS}")
    out = []
    for i in tqdm(range(n_patients), desc="acdc", disable=not progress):
        num = first_id + i
        pid = f"patient{num:03d}"
        pdir = root / pid
        if pdir.exists() and not overwrite:
            raise FileExistsError(f"{pdir}: already exists (pass overwrite=True to replace)")
        case = simulate_acdc_patient(np.random.default_rng([seed, num]), pid, groups[(num - 1) % len(groups)], shape,
                                     spacing, slice_spacing, slice_thickness, n_frames)
        pdir.mkdir(parents=True, exist_ok=True)
        sp4 = (*case.spacing, 1000.0 / n_frames)  # the time step of a 60 bpm cycle, in ms
        write_nifti(pdir / f"{pid}_4d.nii.gz", case.frames, case.affine, spacing=sp4)
        for f, lab in case.labels.items():
            write_nifti(pdir / f"{pid}_frame{f:02d}.nii.gz", case.frames[..., f - 1], case.affine)
            write_nifti(pdir / f"{pid}_frame{f:02d}_gt.nii.gz", lab, case.affine)
        if write_displacement:
            write_nifti(pdir / f"{pid}_ed2es_disp.nii.gz", case.disp, case.affine, spacing=(*case.spacing, 1.0))
        (pdir / "Info.cfg").write_text(_info_cfg(case))
        out.append(pdir)
    return out


def plot_acdc(patient_dir: str | Path, out_png: str | Path, n_slices: int = 3) -> Path:
    """PNG of ED and ES at ``n_slices`` levels (base to apex) with label contours (RV blue, Myo green, LV red)."""

    from common.data.acdc import load_acdc_patient

    pat = load_acdc_patient(patient_dir, load_arrays=True)
    nz = pat["image_ed_array"].shape[2]
    ks = np.linspace(0, nz - 1, n_slices + 2)[1:-1].round().astype(int) if nz > n_slices else np.arange(nz)
    fig, axes = subplots(2, len(ks), figsize=(3 * len(ks), 6), squeeze=False)
    colors = {1: "tab:blue", 2: "tab:green", 3: "tab:red"}
    for row, key in enumerate(("ed", "es")):
        img, lab = pat[f"image_{key}_array"], pat[f"label_{key}_array"]
        for c, k in enumerate(ks):
            ax = axes[row, c]
            ax.imshow(img[:, :, k].T, cmap="gray")
            for v, col in colors.items():
                if (lab[:, :, k] == v).any():
                    ax.contour((lab[:, :, k] == v).T.astype(float), [0.5], colors=col, linewidths=0.8)
            ax.set_title(f"{pat['patient']} {key.upper()} (frame {pat[key]}) z{k}", fontsize=8)
            ax.axis("off")
    return save_figure(fig, out_png)
