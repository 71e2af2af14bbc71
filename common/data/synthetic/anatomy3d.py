"""One 3D anatomy for every CT/MRI generator: a beating heart in a thorax, and an abdomen.

All geometry lives here so the ACDC, MM-WHS, abdomen and registration-pair writers draw the same anatomy family and
differ only in sampling grids and appearance. Coordinates are millimetres in the DICOM patient frame (LPS: +x towards
the patient's left, +y posterior, +z superior). A phantom maps world points ``(N, 3)`` to :class:`Tissue` ids
``(N,)``; writers map tissues to their dataset's label codes and to modality intensities.

Heart frame: origin at the centre of the LV base (mitral plane), ``z`` from base to apex, ``x`` towards the LV lateral
wall; the RV crescent lies around ``theta = pi``. Cardiac motion is radial about the LV long axis and in-plane (no
twist, no long-axis shortening), parametrised by the contraction ``phase`` in [0, 1] (0 = end-diastole, 1 =
end-systole). Per angle and level the map is piecewise linear in the squared radius, so both directions are exact and
closed-form: the LV cavity shrinks, the myocardium keeps (or, by ``kappa``, slightly grows) its cross-sectional area
and therefore thickens, the RV cavity loses a fraction of its area, and tissue beyond the heart is still. Frames at
any phase are drawn by pulling points back to end-diastole (``inverse_motion``), so labels, texture and ground-truth
displacements are consistent by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

__all__ = [
    "Tissue",
    "N_TISSUES",
    "Ellipsoid",
    "Capsule",
    "TextureField",
    "BiasField",
    "HeartModel",
    "ThoraxPhantom",
    "AbdomenPhantom",
    "HEART_GROUPS",
    "rotation_matrix",
    "grid_points",
    "axial_affine",
    "lps_to_ras_affine",
    "tissue_lookup",
    "ct_table",
    "bssfp_table",
    "t2spir_table",
    "render_tissues",
    "rician_noise",
    "cardiac_phase_curve",
]


class Tissue(IntEnum):
    """Tissue classes of the phantoms; appearance tables and label maps are keyed by these ids."""

    AIR = 0
    SOFT = 1  # skeletal muscle and generic soft tissue
    FAT = 2
    LUNG = 3
    BONE = 4
    CSF = 5  # spinal canal
    HEART_WALL = 6  # RV free wall, atrial and great-vessel walls: heart muscle no dataset labels
    LV_MYO = 7
    LV_BLOOD = 8
    PAPILLARY = 9  # papillary muscles: myocardial signal, LV cavity label (ACDC and MM-WHS convention)
    RV_BLOOD = 10
    LA_BLOOD = 11
    RA_BLOOD = 12
    AORTA_BLOOD = 13  # ascending aorta
    PA_BLOOD = 14
    DESC_AORTA_BLOOD = 15  # descending thoracic and abdominal aorta
    LIVER = 16
    SPLEEN = 17
    KIDNEY_R = 18
    KIDNEY_L = 19
    GALLBLADDER = 20
    STOMACH = 21  # wall and fluid contents
    STOMACH_GAS = 22
    BOWEL = 23
    BOWEL_GAS = 24
    IVC = 25


N_TISSUES = len(Tissue)
HEART_GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")


# ----------------------------------------------------------------------------------------------------------------
# geometry primitives


def rotation_matrix(axis: np.ndarray | tuple[float, float, float], angle: float) -> np.ndarray:
    """Rotation (3, 3) by ``angle`` radians about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    return rotation_matrix(axis, math.radians(rng.uniform(-max_deg, max_deg)))


def _affine3(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``p @ m.T`` for ``(N, 3)`` points, column by column (numpy's matmul is slow for a 3-wide inner dimension)."""
    out = np.empty(p.shape, dtype=np.result_type(p.dtype, np.float32))
    for i in range(3):
        out[:, i] = p[:, 0] * m[i, 0] + p[:, 1] * m[i, 1] + p[:, 2] * m[i, 2]
    return out


def _in_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return ((p[:, 0] >= lo[0]) & (p[:, 0] <= hi[0]) & (p[:, 1] >= lo[1]) & (p[:, 1] <= hi[1])
            & (p[:, 2] >= lo[2]) & (p[:, 2] <= hi[2]))


def _culled(fn, p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``fn`` on the points inside the box, +inf elsewhere: the shapes are small next to the volumes sampled."""
    m = _in_box(p, lo, hi)
    out = np.full(len(p), np.inf, dtype=np.float32)
    if m.any():
        out[m] = fn(p[m])
    return out


@dataclass
class Ellipsoid:
    """Solid ellipsoid: ``center`` (3,), semi-axes ``axes`` (3,) in mm, ``rotation`` (3, 3) columns = its axes."""

    center: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        u = _affine3(p - self.center, self.rotation.T) / self.axes
        k = np.sqrt(u[:, 0] ** 2 + u[:, 1] ** 2 + u[:, 2] ** 2)
        g = np.sqrt((u[:, 0] / self.axes[0]) ** 2 + (u[:, 1] / self.axes[1]) ** 2 + (u[:, 2] / self.axes[2]) ** 2)
        return (k - 1.0) * k / np.maximum(g, 1e-9)

    def sdf(self, p: np.ndarray, within: float = 20.0) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) of points ``(N, 3)``; exact on the surface.

        First-order: ``(k - 1) / |grad k|`` with ``k`` the normalised radius, which stays accurate near the surface
        even for flat ellipsoids (a plain ``(k - 1) * min(axes)`` would make walls of uneven thickness).
        Points farther than ``within`` mm outside the bounding box get +inf.
        """
        ext = np.sqrt(((self.rotation * self.axes) ** 2).sum(1)) + within
        return _culled(self._sdf, p, self.center - ext, self.center + ext)

    def inside(self, p: np.ndarray) -> np.ndarray:
        return self.sdf(p, 0.0) < 0


@dataclass
class Capsule:
    """Tube of ``radius`` mm around the segment ``a`` -> ``b`` (each (3,))."""

    a: np.ndarray
    b: np.ndarray
    radius: float

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        ab = self.b - self.a
        t = np.clip(((p - self.a) @ ab) / float(ab @ ab), 0.0, 1.0)
        d = p - (self.a + t[:, None] * ab)
        return np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 2] ** 2) - self.radius

    def sdf(self, p: np.ndarray, within: float = 20.0) -> np.ndarray:
        """Signed distance (mm) of points ``(N, 3)``; +inf farther than ``within`` mm outside the bounding box."""
        pad = self.radius + within
        return _culled(self._sdf, p, np.minimum(self.a, self.b) - pad, np.maximum(self.a, self.b) + pad)


def _ellipse2d(p: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    """Inside test of an infinite elliptic cylinder along z."""
    return ((p[:, 0] - cx) / ax) ** 2 + ((p[:, 1] - cy) / ay) ** 2 < 1.0


@dataclass
class TextureField:
    """Smooth random field (unit std) on a coarse grid, sampled trilinearly at world points.

    Evaluated at end-diastolic (tissue) coordinates, so the texture moves with the tissue.
    """

    origin: np.ndarray  # (3,) world position of voxel 0
    spacing: float
    values: np.ndarray  # (nx, ny, nz)

    @classmethod
    def sample(cls, rng: np.random.Generator, center: np.ndarray, half_size: tuple[float, float, float],
               spacing: float = 5.0, smooth_vox: float = 1.2) -> TextureField:
        half = np.asarray(half_size, dtype=np.float64)
        shape = tuple(int(math.ceil(2 * h / spacing)) + 2 for h in half)
        v = ndimage.gaussian_filter(rng.normal(size=shape), smooth_vox, mode="wrap")
        v = (v - v.mean()) / (v.std() + 1e-12)
        return cls(np.asarray(center, dtype=np.float64) - half, float(spacing), v.astype(np.float32))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        idx = ((p - self.origin) / self.spacing).T
        return ndimage.map_coordinates(self.values, idx, order=1, mode="nearest").astype(np.float32)


@dataclass
class BiasField:
    """Smooth multiplicative MRI coil-sensitivity field fixed in scanner space, mean about 1.

    ``1 + sum_i a_i * exp(-|p - c_i|^2 / (2 s_i^2))`` rescaled so that its value at ``center`` is 1.
    """

    centers: np.ndarray  # (K, 3)
    widths: np.ndarray  # (K,)
    gains: np.ndarray  # (K,)
    norm: float = 1.0

    @classmethod
    def sample(cls, rng: np.random.Generator, center: np.ndarray, radius: float, strength: float = 0.4,
               n_coils: int = 3) -> BiasField:
        dirs = rng.normal(size=(n_coils, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        centers = np.asarray(center) + dirs * radius * rng.uniform(0.9, 1.4, size=(n_coils, 1))
        widths = radius * rng.uniform(0.6, 1.2, size=n_coils)
        gains = strength * rng.uniform(0.5, 1.5, size=n_coils)
        out = cls(centers, widths, gains)
        out.norm = float(out(np.asarray(center, dtype=np.float64)[None])[0])
        return out

    def __call__(self, p: np.ndarray) -> np.ndarray:
        d2 = ((p[:, None, :] - self.centers[None]) ** 2).sum(-1)
        v = 1.0 + (self.gains * np.exp(-d2 / (2 * self.widths**2))).sum(-1)
        return (v / self.norm).astype(np.float32)


def grid_points(affine_lps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (LPS) points of every voxel of a grid: ``(prod(shape), 3)`` in C order of ``shape`` (2D or 3D)."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    idx = idx.reshape(-1, len(shape))
    idx = np.concatenate([idx, np.zeros((idx.shape[0], 3 - len(shape)))], 1)
    return idx @ affine_lps[:3, :3].T + affine_lps[:3, 3]


def axial_affine(center: np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                 rotation: np.ndarray | None = None) -> np.ndarray:
    """Voxel -> LPS 4x4 affine of a grid centred on ``center``: array axes along +x (left), +y (back), +z (up).

    ``rotation`` (3, 3) tilts the grid (an oblique acquisition).
    """
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(np.asarray(spacing, dtype=np.float64))
    a[:3, 3] = np.asarray(center, dtype=np.float64) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def lps_to_ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """NIfTI (RAS) affine of a voxel-to-LPS affine: flip the first two world axes."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


# ----------------------------------------------------------------------------------------------------------------
# heart


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


@dataclass
class HeartModel:
    """LV, RV, atria and great vessels of one patient, with the radial contraction model.

    Lengths in mm, angles in radians. ``frame`` (3, 3) has the heart-frame axes (x, y, z) as columns in LPS;
    ``base`` (3,) is the LV base centre in LPS. LA/RA/vessels are world-space shapes; the ventricles are polar about
    the LV axis so the motion can be written per angle.
    """

    base: np.ndarray
    frame: np.ndarray
    group: str
    ra: float  # end-diastolic LV endocardial radius at the base
    za: float  # LV cavity length (base plane to endocardial apex)
    wall: float  # LV wall thickness
    apex_wall: float
    ellip: float  # cross-section ellipticity (cos 2 theta term)
    ellip_phase: float
    fs: float  # end-systolic fractional shortening of the endocardial radius
    fs_var: float  # regional variation of fs (cos theta term)
    fs_phase: float
    kappa: float  # end-systolic myocardial area factor (>1: thickening beyond incompressibility, standing in
    #               for the long-axis shortening the in-plane model leaves out)
    infarct: tuple[float, float, float] | None  # (centre angle, half-width, fraction of fs lost)
    rv_angle: float
    rv_half: float  # half opening angle of the RV crescent
    rv_thick: float  # maximal RV cavity thickness at the base
    rv_len: float  # RV length along the LV axis
    rv_fs: float  # end-systolic fraction of RV cavity area lost
    thin_wall: float  # RV free wall / atrial wall thickness
    papillary: list[tuple[float, float, float]]  # (angle, radius fraction of the cavity, muscle radius)
    la: Ellipsoid
    ra_: Ellipsoid
    aorta: Capsule
    pa: Capsule
    rvot: Capsule
    margin: float = 25.0  # radial extent beyond the heart over which motion fades out

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def sample(cls, rng: np.random.Generator, group: str = "NOR", base: np.ndarray | None = None) -> HeartModel:
        """Draw one patient's heart. ``group`` is an ACDC pathology group (NOR, DCM, HCM, MINF, RV)."""
        if group not in HEART_GROUPS:
            raise ValueError(f"unknown heart group {group!r}; choose one of {HEART_GROUPS}")
        if base is None:
            base = np.array([0.0, -5.0, 0.0]) + rng.normal(0, 4, size=3)
        # long axis towards the patient's left, anterior and inferior, as in a normal chest
        ez = np.array([0.55, -0.45, -0.70]) + rng.normal(0, 0.06, size=3)
        ez /= np.linalg.norm(ez)
        rv_dir = np.array([-0.6, -0.7, -0.1])  # the RV lies right-anterior of the LV
        ex = -(rv_dir - (rv_dir @ ez) * ez)
        ex /= np.linalg.norm(ex)
        ey = np.cross(ez, ex)
        frame = np.stack([ex, ey, ez], 1)

        ra = rng.uniform(21.5, 26.0)
        za = rng.uniform(66.0, 80.0)
        wall = rng.uniform(7.0, 9.5)
        fs = rng.uniform(0.30, 0.37)
        kappa = rng.uniform(1.08, 1.18)
        rv_thick = rng.uniform(19.0, 26.0)
        rv_half = rng.uniform(1.3, 1.5)
        rv_fs = rng.uniform(0.40, 0.50)
        infarct = None
        if group == "DCM":
            ra *= rng.uniform(1.3, 1.45)
            za *= rng.uniform(1.08, 1.18)
            wall *= 0.85
            fs *= rng.uniform(0.35, 0.5)
            kappa = 1.03
        elif group == "HCM":
            wall *= rng.uniform(1.5, 1.8)
            ra *= 0.85
            fs *= 1.15
        elif group == "MINF":
            fs *= 0.85
            infarct = (rng.uniform(-np.pi, np.pi), rng.uniform(0.5, 0.9), rng.uniform(0.7, 0.95))
        elif group == "RV":
            rv_thick *= rng.uniform(1.5, 1.8)
            rv_fs *= 0.5
        rb = ra + wall
        to_world = lambda h: base + frame @ np.asarray(h, dtype=np.float64)  # noqa: E731

        # atria and vessels: offsets in the body frame (LPS) from the base centre, where the anatomy is usually
        # described (left atrium posterior and superior, right atrium to the right), then clipped above the base
        s = ra / 24.0
        la = Ellipsoid(base + s * np.array([8.0, 28.0, 22.0]) + rng.normal(0, 3, 3),
                       s * np.array([26.0, 18.0, 20.0]) * rng.uniform(0.9, 1.1, 3), _random_rotation(rng, 15))
        ra_ = Ellipsoid(base + s * np.array([-40.0, 8.0, 12.0]) + rng.normal(0, 3, 3),
                        s * np.array([22.0, 22.0, 27.0]) * rng.uniform(0.9, 1.1, 3), _random_rotation(rng, 15))
        ao0 = to_world([-0.45 * ra, -0.15 * ra, -3.0])
        ao_dir = np.array([-0.2, -0.15, 1.0]) + rng.normal(0, 0.08, 3)
        aorta = Capsule(ao0, ao0 + 70.0 * ao_dir / np.linalg.norm(ao_dir), rng.uniform(11.5, 14.5))
        # the RV outflow tract leaves the anterior horn of the RV crescent and climbs to the pulmonary valve
        ant = frame.T @ np.array([0.0, -1.0, 0.0])  # body-anterior direction in the heart frame
        th = max((np.pi + 0.55 * rv_half, np.pi - 0.55 * rv_half),
                 key=lambda a: ant[0] * math.cos(a) + ant[1] * math.sin(a))
        r_h = rb + 0.5 * rv_thick
        rvot0 = to_world([r_h * math.cos(th), r_h * math.sin(th), 8.0])
        pa0 = rvot0 + np.array([4.0, 4.0, 22.0])
        pa_dir = np.array([0.55, 0.75, 0.9]) + rng.normal(0, 0.08, 3)
        pa = Capsule(pa0, pa0 + 45.0 * pa_dir / np.linalg.norm(pa_dir), rng.uniform(10.5, 13.0))
        rvot = Capsule(rvot0, pa0, 11.0)
        paps = [(math.radians(rng.uniform(40, 70)), 0.62, rng.uniform(3.0, 4.5)),
                (math.radians(rng.uniform(-110, -80)), 0.62, rng.uniform(3.0, 4.5))]
        return cls(base=base, frame=frame, group=group, ra=ra, za=za, wall=wall,
                   apex_wall=wall * rng.uniform(0.6, 0.8), ellip=rng.uniform(0.0, 0.07),
                   ellip_phase=rng.uniform(0, np.pi), fs=fs, fs_var=rng.uniform(0.05, 0.15),
                   fs_phase=rng.uniform(-np.pi, np.pi), kappa=kappa, infarct=infarct,
                   rv_angle=np.pi + rng.normal(0, 0.08), rv_half=rv_half, rv_thick=rv_thick,
                   rv_len=za * rng.uniform(0.72, 0.85), rv_fs=rv_fs, thin_wall=rng.uniform(2.5, 3.5),
                   papillary=paps, la=la, ra_=ra_, aorta=aorta, pa=pa, rvot=rvot)

    # ---- frames ------------------------------------------------------------------------------------------------
    def to_heart(self, p: np.ndarray) -> np.ndarray:
        """World (LPS) points ``(N, 3)`` -> heart-frame points ``(N, 3)``."""
        return _affine3(p - self.base, self.frame.T)

    def to_world(self, h: np.ndarray) -> np.ndarray:
        """Heart-frame points ``(N, 3)`` -> world (LPS) points ``(N, 3)``."""
        return _affine3(h, self.frame) + self.base

    # ---- ventricular geometry (ED) ---------------------------------------------------------------------------
    def _ell(self, theta: np.ndarray) -> np.ndarray:
        return 1.0 + self.ellip * np.cos(2 * (theta - self.ellip_phase))

    def lv_radii(self, theta: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """End-diastolic endo- and epicardial radii at angle/level; levels above the base use the base values."""
        zc = np.maximum(z, 0.0)
        e = self._ell(theta)
        zb = self.za + self.apex_wall
        a0 = self.ra * e * np.sqrt(np.clip(1 - (zc / self.za) ** 2, 0, 1))
        b0 = (self.ra * e + self.wall) * np.sqrt(np.clip(1 - (zc / zb) ** 2, 0, 1))
        return a0, b0

    def rv_thickness(self, theta: np.ndarray, z: np.ndarray, extra_angle: float = 0.0,
                     extra: float = 0.0) -> np.ndarray:
        """RV crescent thickness beyond the LV epicardium (0 outside the crescent)."""
        zc = np.maximum(z, 0.0)
        half = self.rv_half + extra_angle
        prof = np.clip(1 - (_wrap(theta - self.rv_angle) / half) ** 2, 0, 1) ** 0.6
        hz = (self.rv_thick + extra) * np.sqrt(np.clip(1 - (zc / self.rv_len) ** 2, 0, 1))
        return hz * prof

    def _fs_theta(self, theta: np.ndarray) -> np.ndarray:
        f = self.fs * (1 + self.fs_var * np.cos(theta - self.fs_phase))
        if self.infarct is not None:
            c, w, depth = self.infarct
            bump = np.clip(1 - (_wrap(theta - c) / w) ** 2, 0, 1)
            f = f * (1 - depth * bump)
        return f

    # ---- motion ------------------------------------------------------------------------------------------------
    def _knots(self, theta: np.ndarray, z: np.ndarray, phase: float) -> tuple[np.ndarray, np.ndarray]:
        """Squared-radius knots (N, 5) at ED and at ``phase``: centre, endo, epi, RV free wall, outer limit."""
        a0, b0 = self.lv_radii(theta, z)
        hr = self.rv_thickness(theta, z)
        # the motion fades out above the base plane (atria and vessels are not modelled as moving)
        taper = np.where(z >= 0, 1.0, np.exp(-((z / 10.0) ** 2)))
        p = phase * taper
        a1 = a0 * (1 - self._fs_theta(theta) * p)
        qa0, qa1 = a0**2, a1**2
        qb0 = b0**2
        qb1 = qa1 + (1 + (self.kappa - 1) * p) * (qb0 - qa0)
        qr0 = (b0 + hr) ** 2
        qr1 = qb1 + (1 - self.rv_fs * p) * (qr0 - qb0)
        qo = (b0 + hr + self.margin) ** 2
        zero = np.zeros_like(qa0)
        k0 = np.stack([zero, qa0, qb0, qr0, qo], 1)
        k1 = np.stack([zero, qa1, qb1, np.minimum(qr1, qo - 1e-3), qo], 1)
        return k0, k1

    @staticmethod
    def _piecewise(q: np.ndarray, kin: np.ndarray, kout: np.ndarray) -> np.ndarray:
        out = q.copy()  # beyond the outer knot the map is the identity
        done = np.zeros(q.shape, dtype=bool)
        for i in range(4):
            m = (~done) & (q < kin[:, i + 1])
            den = kin[:, i + 1] - kin[:, i]
            slope = np.where(den > 1e-9, (kout[:, i + 1] - kout[:, i]) / np.maximum(den, 1e-9), 1.0)
            out = np.where(m, kout[:, i] + (q - kin[:, i]) * slope, out)
            done |= m
        return out

    def _radial_map(self, h: np.ndarray, phase: float, inverse: bool) -> np.ndarray:
        if phase == 0.0:
            return h.copy()
        x, y, z = h[:, 0], h[:, 1], h[:, 2]
        q = x * x + y * y
        theta = np.arctan2(y, x)
        k0, k1 = self._knots(theta, z, phase)
        q_new = self._piecewise(q, k1, k0) if inverse else self._piecewise(q, k0, k1)
        f = np.sqrt(np.maximum(q_new, 0) / np.maximum(q, 1e-12))
        f = np.where(q > 1e-12, f, 1.0)
        return np.stack([x * f, y * f, z], 1)

    def motion_support(self, h: np.ndarray) -> np.ndarray:
        """Bool ``(N,)``: heart-frame points that move at some phase (all others are still at every phase)."""
        z = h[:, 2]
        theta = np.arctan2(h[:, 1], h[:, 0])
        _, b0 = self.lv_radii(theta, z)
        qo = (b0 + self.rv_thickness(theta, z) + self.margin) ** 2
        # exp(-(z/10)^2) of the above-base taper is below 1e-7 beyond 40 mm
        return (h[:, 0] ** 2 + h[:, 1] ** 2 < qo) & (z > -40.0)

    def inverse_motion(self, h: np.ndarray, phase: float) -> np.ndarray:
        """Heart-frame points ``(N, 3)`` at contraction ``phase`` -> their end-diastolic positions ``(N, 3)``."""
        return self._radial_map(h, phase, inverse=True)

    def forward_motion(self, h: np.ndarray, phase: float) -> np.ndarray:
        """End-diastolic heart-frame points ``(N, 3)`` -> their positions at ``phase`` ``(N, 3)``."""
        return self._radial_map(h, phase, inverse=False)

    # ---- labelling (ED geometry) -----------------------------------------------------------------------------
    def paint(self, tissue: np.ndarray, p: np.ndarray, fat: float = 0.0) -> None:
        """Paint the heart (ED geometry) into ``tissue`` (N,) at world points ``p`` (N, 3), in place.

        Walls of ``thin_wall`` mm surround every chamber; ``fat`` > 0 adds a pericardial fat layer of that thickness
        over lung.
        """
        h = self.to_heart(p)
        zb = self.za + self.apex_wall
        reach = self.ra * (1 + self.ellip) + self.wall + self.rv_thick + self.thin_wall + fat + 2.0
        z_all = h[:, 2]
        r2_all = h[:, 0] ** 2 + h[:, 1] ** 2
        # polar work only near the ventricles; atria and vessels cull themselves by bounding box
        vent = np.nonzero((z_all > -self.thin_wall - fat - 2) & (z_all < zb + self.thin_wall + fat + 2)
                          & (r2_all < reach**2))[0]
        pad = self.thin_wall + fat + 1.0
        zz = z_all
        sd_la = np.maximum(self.la.sdf(p, pad), zz + 1)
        sd_ra = np.maximum(self.ra_.sdf(p, pad), zz + 1)
        sd_ao = np.maximum(self.aorta.sdf(p, pad), zz)
        sd_pa = self.pa.sdf(p, pad)
        sd_rvot = self.rvot.sdf(p, pad)
        sd = np.minimum(np.minimum(sd_la, sd_ra), np.minimum(np.minimum(sd_ao, sd_pa), sd_rvot))

        x, y, z = h[vent, 0], h[vent, 1], h[vent, 2]
        r = np.sqrt(r2_all[vent])
        theta = np.arctan2(y, x)
        e = self._ell(theta)
        rb = self.ra * e + self.wall
        k = np.sqrt((r / rb) ** 2 + (np.maximum(z, 0) / zb) ** 2)
        lv = np.maximum((k - 1) * np.minimum(rb, zb), -z)
        a0, b0 = self.lv_radii(theta, z)
        hr_out = self.rv_thickness(theta, z, 0.15, self.thin_wall)
        rv = np.maximum(np.maximum(r - b0 - hr_out, -z), z - self.rv_len)
        rv = np.where(hr_out > 0, rv, np.inf)
        sd[vent] = np.minimum(sd[vent], np.minimum(lv, rv))

        if fat > 0:
            tissue[(sd < self.thin_wall + fat) & (tissue == Tissue.LUNG)] = Tissue.FAT
        tissue[sd < self.thin_wall] = Tissue.HEART_WALL
        tissue[sd_ra < 0] = Tissue.RA_BLOOD
        tissue[sd_la < 0] = Tissue.LA_BLOOD
        tissue[sd_pa < 0] = Tissue.PA_BLOOD
        tissue[sd_rvot < 0] = Tissue.RV_BLOOD
        tissue[sd_ao < 0] = Tissue.AORTA_BLOOD

        tv = tissue[vent]
        ventricle = (z >= 0) & (z < zb)
        hr = self.rv_thickness(theta, z)
        tv[ventricle & (r >= b0) & (r < b0 + hr) & (z < self.rv_len)] = Tissue.RV_BLOOD
        tv[ventricle & (r < b0)] = Tissue.LV_MYO
        cav = ventricle & (r < a0)
        tv[cav] = Tissue.LV_BLOOD
        for ang, frac, rad in self.papillary:
            # papillary muscles run from the mid-wall towards the base, thinning as they go
            c = frac * a0
            d2 = (x - c * math.cos(ang)) ** 2 + (y - c * math.sin(ang)) ** 2
            zrel = (z - 0.2 * self.za) / (0.45 * self.za)
            tv[cav & (d2 < (rad * np.clip(1 - zrel**2, 0, 1)) ** 2)] = Tissue.PAPILLARY
        tissue[vent] = tv


# ----------------------------------------------------------------------------------------------------------------
# thorax and abdomen


@dataclass
class ThoraxPhantom:
    """Chest (body wall, lungs, spine, descending aorta, liver dome) around a :class:`HeartModel`."""

    heart: HeartModel
    body: tuple[float, float]  # semi-axes (x, y) of the body cross-section
    fat: float  # subcutaneous fat thickness
    muscle: float
    mediastinum: tuple[float, float, float, float]  # elliptic column (cx, cy, ax, ay) between the lungs
    spine_y: float
    liver: Ellipsoid  # right diaphragmatic dome
    abdomen: Ellipsoid  # left dome (stomach, spleen)
    pericardial_fat: float
    texture: TextureField

    @classmethod
    def sample(cls, rng: np.random.Generator, group: str = "NOR") -> ThoraxPhantom:
        heart = HeartModel.sample(rng, group)
        bx, by = rng.uniform(140, 165), rng.uniform(100, 118)
        medi = (rng.uniform(-5, 5), rng.uniform(0, 15), rng.uniform(28, 38), rng.uniform(85, 100))
        zb = heart.base[2]
        liver = Ellipsoid(np.array([-55.0, 8.0, zb - 120.0]) + rng.normal(0, 5, 3), np.array([90.0, 85.0, 70.0]))
        abdomen = Ellipsoid(np.array([60.0, 10.0, zb - 140.0]) + rng.normal(0, 5, 3), np.array([90.0, 85.0, 70.0]))
        tex = TextureField.sample(rng, heart.base, (170.0, 130.0, 170.0), spacing=5.0)
        return cls(heart, (bx, by), rng.uniform(6, 16), rng.uniform(8, 12), medi, by - rng.uniform(35, 42),
                   liver, abdomen, rng.uniform(1.5, 3.5), tex)

    def heart_center(self) -> np.ndarray:
        """World point near the centre of the whole heart (between ventricles and atria)."""
        hm = self.heart
        return hm.to_world(np.array([[-8.0, 0.0, 0.3 * hm.za]]))[0] * 0.7 + 0.3 * (hm.la.center + hm.ra_.center) / 2

    def pull_back(self, p: np.ndarray, phase: float) -> np.ndarray:
        """World points at ``phase`` -> their end-diastolic world positions (same shape (N, 3))."""
        if phase == 0.0:
            return p
        return self.heart.to_world(self.heart.inverse_motion(self.heart.to_heart(p), phase))

    def tissues(self, p: np.ndarray, phase: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Tissue ids ``(N,)`` of world points ``(N, 3)`` at contraction ``phase``, and their ED positions."""
        p0 = self.pull_back(p, phase)
        x, y = p0[:, 0], p0[:, 1]
        bx, by = self.body
        t = np.full(len(p0), Tissue.AIR, dtype=np.int16)
        t[_ellipse2d(p0, 0, 0, bx, by)] = Tissue.FAT
        inner = (bx - self.fat, by - self.fat)
        t[_ellipse2d(p0, 0, 0, *inner)] = Tissue.SOFT
        cavity = _ellipse2d(p0, 0, 0, inner[0] - self.muscle, inner[1] - self.muscle)
        t[cavity] = Tissue.LUNG  # the lungs fill what mediastinum, heart and diaphragm leave
        t[cavity & _ellipse2d(p0, *self.mediastinum)] = Tissue.FAT
        t[cavity & self.abdomen.inside(p0)] = Tissue.SOFT
        t[cavity & self.liver.inside(p0)] = Tissue.LIVER
        sy = self.spine_y
        t[(x / 30) ** 2 + ((y - sy - 22) / 20) ** 2 < 1] = Tissue.SOFT  # paraspinal muscles
        t[x**2 + (y - sy) ** 2 < 17**2] = Tissue.BONE
        t[x**2 + (y - sy - 26) ** 2 < 12**2] = Tissue.BONE
        t[x**2 + (y - sy - 26) ** 2 < 7**2] = Tissue.CSF
        t[(x / 13) ** 2 + ((y + by - self.fat - self.muscle + 2) / 6) ** 2 < 1] = Tissue.BONE  # sternum
        d = (x - 20) ** 2 + (y - sy + 28) ** 2
        t[d < 13.5**2] = Tissue.HEART_WALL
        t[d < 11**2] = Tissue.DESC_AORTA_BLOOD
        self.heart.paint(t, p0, fat=self.pericardial_fat)
        return t, p0


@dataclass
class AbdomenPhantom:
    """Upper abdomen: liver (+ gallbladder), spleen, kidneys, stomach, bowel, aorta, IVC, spine, lung bases."""

    body: tuple[float, float]
    fat: float
    muscle: float
    spine_y: float
    liver: list[Ellipsoid]
    gallbladder: Ellipsoid
    spleen: Ellipsoid
    kidneys: list[tuple[Ellipsoid, Ellipsoid]]  # (right, sinus), (left, sinus)
    stomach: Ellipsoid
    bowel: list[tuple[Ellipsoid, bool]]
    lungs: list[Ellipsoid]
    texture: TextureField

    @classmethod
    def sample(cls, rng: np.random.Generator) -> AbdomenPhantom:
        bx, by = rng.uniform(140, 170), rng.uniform(100, 125)
        j = lambda s: rng.normal(0, s, 3)  # noqa: E731
        sc = rng.uniform(0.9, 1.1)
        liver = [
            Ellipsoid(np.array([-55.0, -5.0, 50.0]) + j(4), sc * np.array([72.0, 82.0, 72.0]),
                      rotation_matrix((0, 0, 1), rng.uniform(-0.2, 0.2))),
            Ellipsoid(np.array([5.0, -45.0, 68.0]) + j(4), sc * np.array([55.0, 33.0, 33.0]),
                      rotation_matrix((0, 0, 1), rng.uniform(-0.2, 0.2))),
        ]
        gb = Ellipsoid(np.array([-38.0, -52.0, 2.0]) + j(3), np.array([14.0, 13.0, 28.0]) * rng.uniform(0.8, 1.1),
                       rotation_matrix((1, 0, 0), 0.4))
        spleen = Ellipsoid(np.array([85.0, 38.0, 62.0]) + j(4), np.array([22.0, 48.0, 48.0]) * rng.uniform(0.85, 1.15),
                           rotation_matrix((0, 0, 1), -0.5 + rng.normal(0, 0.1)))
        kid = []
        for side, c in ((-1, np.array([-62.0, 52.0, -18.0])), (1, np.array([62.0, 50.0, 0.0]))):
            c = c + j(4)
            # hilum faces antero-medially; upper pole tilted towards the spine
            rot = rotation_matrix((0, 0, 1), side * -0.55) @ rotation_matrix((0, 1, 0), side * -0.2)
            k = Ellipsoid(c, np.array([25.0, 21.0, 52.0]) * rng.uniform(0.9, 1.1), rot)
            sinus = Ellipsoid(c + rot @ np.array([-side * 15.0, 0.0, 0.0]), np.array([11.0, 9.0, 24.0]), rot)
            kid.append((k, sinus))
        stomach = Ellipsoid(np.array([55.0, -35.0, 70.0]) + j(6), np.array([45.0, 30.0, 48.0]) * rng.uniform(0.8, 1.1),
                            rotation_matrix((0, 1, 0), 0.5))
        bowel = []
        for _ in range(int(rng.integers(6, 11))):
            c = np.array([rng.uniform(-90, 90), rng.uniform(-80, 10), rng.uniform(-120, -10)])
            bowel.append((Ellipsoid(c, rng.uniform(12, 24, 3), _random_rotation(rng, 90)), bool(rng.random() < 0.4)))
        lungs = [Ellipsoid(np.array([85.0, 25.0, 205.0]) + j(5), np.array([70.0, 85.0, 110.0])),
                 Ellipsoid(np.array([-85.0, 25.0, 200.0]) + j(5), np.array([72.0, 85.0, 110.0]))]
        tex = TextureField.sample(rng, np.array([0.0, 0.0, 30.0]), (180.0, 140.0, 200.0), spacing=5.0)
        return cls((bx, by), rng.uniform(10, 28), rng.uniform(8, 12), by - rng.uniform(48, 58), liver, gb, spleen,
                   kid, stomach, bowel, lungs, tex)

    def tissues(self, p: np.ndarray) -> np.ndarray:
        """Tissue ids ``(N,)`` of world (LPS) points ``(N, 3)``."""
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        bx, by = self.body
        t = np.full(len(p), Tissue.AIR, dtype=np.int16)
        t[_ellipse2d(p, 0, 0, bx, by)] = Tissue.FAT
        inner = (bx - self.fat, by - self.fat)
        t[_ellipse2d(p, 0, 0, *inner)] = Tissue.SOFT
        cavity = _ellipse2d(p, 0, 0, inner[0] - self.muscle, inner[1] - self.muscle)
        t[cavity] = Tissue.FAT  # intra- and retroperitoneal fat
        sy = self.spine_y
        for s in (-1, 1):
            t[((x - s * 38) / 26) ** 2 + ((y - sy - 32) / 22) ** 2 < 1] = Tissue.SOFT  # paraspinal
            grow = np.clip((40 - z) / 120, 0.2, 1.0)  # psoas grows caudally
            t[((x - s * 30) / (15 * grow)) ** 2 + ((y - sy + 5) / (16 * grow)) ** 2 < 1] = Tissue.SOFT
        for lung in self.lungs:
            t[cavity & lung.inside(p)] = Tissue.LUNG
        for b, gas in self.bowel:
            m = cavity & b.inside(p)
            t[m] = Tissue.BOWEL
            if gas:
                t[m & (b.sdf(p) < -6)] = Tissue.BOWEL_GAS
        m = self.stomach.inside(p)
        t[m] = Tissue.STOMACH
        # swallowed air floats anteriorly in a supine patient
        t[m & (self.stomach.sdf(p) < -4) & (y < self.stomach.center[1] - 0.35 * self.stomach.axes[1])] = \
            Tissue.STOMACH_GAS
        for lobe in self.liver:
            t[lobe.inside(p) & cavity] = Tissue.LIVER
        t[self.gallbladder.inside(p)] = Tissue.GALLBLADDER
        t[self.spleen.inside(p) & cavity] = Tissue.SPLEEN
        for (k, sinus), tid in zip(self.kidneys, (Tissue.KIDNEY_R, Tissue.KIDNEY_L)):
            t[k.inside(p) & ~sinus.inside(p)] = tid
            t[k.inside(p) & sinus.inside(p)] = Tissue.FAT
        t[x**2 + (y - sy) ** 2 < 19**2] = Tissue.BONE
        t[x**2 + (y - sy - 28) ** 2 < 13**2] = Tissue.BONE
        t[x**2 + (y - sy - 28) ** 2 < 7.5**2] = Tissue.CSF
        t[(x - 14) ** 2 + (y - sy + 30) ** 2 < 10.5**2] = Tissue.DESC_AORTA_BLOOD
        t[((x + 22) / 13) ** 2 + ((y - sy + 32) / 9) ** 2 < 1] = Tissue.IVC
        return t


# ----------------------------------------------------------------------------------------------------------------
# appearance shared by the generators


def tissue_lookup(table: dict[Tissue, float], default: float = 0.0) -> np.ndarray:
    """Dense ``(N_TISSUES,)`` array of a per-tissue table."""
    out = np.full(N_TISSUES, default, dtype=np.float32)
    for k, v in table.items():
        out[int(k)] = v
    return out


def ct_table(rng: np.random.Generator, contrast: str = "arterial") -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue CT mean (HU) and texture amplitude (HU), with patient-level variation.

    ``contrast="arterial"``: cardiac CT angiography (bright left heart, dimmer right heart);
    ``"portal"``: abdominal portal-venous phase (enhanced liver, spleen, kidneys).
    """
    left = rng.uniform(280, 430) if contrast == "arterial" else rng.uniform(140, 190)
    right = left * (rng.uniform(0.55, 0.95) if contrast == "arterial" else rng.uniform(0.85, 1.0))
    enh = 1.0 if contrast == "portal" else 0.6
    mean = {
        Tissue.AIR: -1000, Tissue.SOFT: rng.uniform(40, 60), Tissue.FAT: rng.uniform(-110, -85),
        Tissue.LUNG: rng.uniform(-880, -820), Tissue.BONE: rng.uniform(450, 750), Tissue.CSF: 10,
        Tissue.HEART_WALL: rng.uniform(80, 110), Tissue.LV_MYO: rng.uniform(95, 135), Tissue.PAPILLARY: 110,
        Tissue.LV_BLOOD: left, Tissue.LA_BLOOD: left, Tissue.AORTA_BLOOD: left, Tissue.DESC_AORTA_BLOOD: left,
        Tissue.RV_BLOOD: right, Tissue.RA_BLOOD: right * 0.95, Tissue.PA_BLOOD: right, Tissue.IVC: right * 0.8,
        Tissue.LIVER: 55 + enh * rng.uniform(40, 60), Tissue.SPLEEN: 50 + enh * rng.uniform(55, 80),
        Tissue.KIDNEY_R: 40 + enh * rng.uniform(110, 150), Tissue.GALLBLADDER: rng.uniform(0, 20),
        Tissue.STOMACH: rng.uniform(15, 40), Tissue.STOMACH_GAS: -950, Tissue.BOWEL: rng.uniform(25, 50),
        Tissue.BOWEL_GAS: -900,
    }
    mean[Tissue.KIDNEY_L] = mean[Tissue.KIDNEY_R]
    amp = {Tissue.LUNG: 60, Tissue.BONE: 150, Tissue.FAT: 12, Tissue.SOFT: 10, Tissue.LIVER: 10, Tissue.SPLEEN: 10,
           Tissue.KIDNEY_R: 18, Tissue.KIDNEY_L: 18, Tissue.BOWEL: 20, Tissue.STOMACH: 10, Tissue.LV_MYO: 8}
    return tissue_lookup(mean), tissue_lookup(amp, 5.0)


def bssfp_table(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue balanced-SSFP (cine / whole-heart MRI) signal (a.u., blood ~0.85) and relative texture."""
    blood = rng.uniform(0.75, 0.95)
    myo = rng.uniform(0.17, 0.26)
    mean = {
        Tissue.AIR: 0.0, Tissue.SOFT: rng.uniform(0.2, 0.28), Tissue.FAT: rng.uniform(0.65, 0.9), Tissue.LUNG: 0.04,
        Tissue.BONE: rng.uniform(0.3, 0.45), Tissue.CSF: 0.9, Tissue.HEART_WALL: myo * 1.1, Tissue.LV_MYO: myo,
        Tissue.PAPILLARY: myo, Tissue.LV_BLOOD: blood, Tissue.RV_BLOOD: blood * rng.uniform(0.92, 1.05),
        Tissue.LA_BLOOD: blood * 0.95, Tissue.RA_BLOOD: blood * 0.95, Tissue.AORTA_BLOOD: blood * 0.9,
        Tissue.PA_BLOOD: blood * 0.9, Tissue.DESC_AORTA_BLOOD: blood * 0.85, Tissue.IVC: blood * 0.85,
        Tissue.LIVER: rng.uniform(0.25, 0.35), Tissue.SPLEEN: 0.4, Tissue.KIDNEY_R: 0.5, Tissue.KIDNEY_L: 0.5,
        Tissue.GALLBLADDER: 0.85, Tissue.STOMACH: 0.55, Tissue.BOWEL: 0.4,
    }
    amp = {Tissue.LUNG: 0.5, Tissue.BONE: 0.15, Tissue.LV_BLOOD: 0.04, Tissue.RV_BLOOD: 0.06}
    return tissue_lookup(mean), tissue_lookup(amp, 0.05)


def t2spir_table(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-tissue T2-weighted fat-suppressed (SPIR) signal (a.u.): fluid bright, fat dark, flow voids."""
    mean = {
        Tissue.AIR: 0.0, Tissue.SOFT: rng.uniform(0.1, 0.16), Tissue.FAT: rng.uniform(0.05, 0.1), Tissue.LUNG: 0.02,
        Tissue.BONE: 0.1, Tissue.CSF: 1.0, Tissue.HEART_WALL: 0.2, Tissue.LV_MYO: 0.2, Tissue.PAPILLARY: 0.2,
        Tissue.DESC_AORTA_BLOOD: 0.05, Tissue.IVC: rng.uniform(0.05, 0.2), Tissue.LIVER: rng.uniform(0.22, 0.32),
        Tissue.SPLEEN: rng.uniform(0.5, 0.62), Tissue.KIDNEY_R: rng.uniform(0.55, 0.7),
        Tissue.GALLBLADDER: rng.uniform(0.85, 1.0), Tissue.STOMACH: rng.uniform(0.6, 0.8), Tissue.STOMACH_GAS: 0.0,
        Tissue.BOWEL: rng.uniform(0.35, 0.55), Tissue.BOWEL_GAS: 0.0,
    }
    mean[Tissue.KIDNEY_L] = mean[Tissue.KIDNEY_R]
    for t in (Tissue.LV_BLOOD, Tissue.RV_BLOOD, Tissue.LA_BLOOD, Tissue.RA_BLOOD, Tissue.AORTA_BLOOD, Tissue.PA_BLOOD):
        mean[t] = 0.08
    amp = {Tissue.LIVER: 0.06, Tissue.SPLEEN: 0.05, Tissue.BOWEL: 0.2, Tissue.STOMACH: 0.1}
    return tissue_lookup(mean), tissue_lookup(amp, 0.05)


def render_tissues(tissue: np.ndarray, texture: np.ndarray, mean: np.ndarray, amp: np.ndarray,
                   relative: bool) -> np.ndarray:
    """Noise-free intensity of tissue ids (any shape) with a texture field of the same shape.

    ``relative``: texture scales the mean (MRI: ``mean * (1 + amp * tex)``), else adds (CT: ``mean + amp * tex``).
    """
    ti = tissue.astype(np.intp)
    m, a = mean[ti], amp[ti]
    return (m * (1 + a * texture) if relative else m + a * texture).astype(np.float32)


def rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (the noise of magnitude MR images)."""
    re = signal + rng.normal(0, sigma, signal.shape)
    im = rng.normal(0, sigma, signal.shape)
    return np.sqrt(re * re + im * im).astype(np.float32)


def cardiac_phase_curve(n_frames: int, es_frame: int) -> np.ndarray:
    """Contraction phase (T,) over one cycle: 0 at frame 1 (ED), 1 at ``es_frame`` (1-based), back to 0.

    Systole is a raised cosine; diastole is rapid filling, diastasis and an atrial kick.
    """
    if not 1 < es_frame <= n_frames:
        raise ValueError(f"es_frame {es_frame} must be in 2..{n_frames}")
    t = np.arange(n_frames, dtype=np.float64)
    e = es_frame - 1
    p = np.empty(n_frames)
    sys = t <= e
    p[sys] = 0.5 * (1 - np.cos(np.pi * t[sys] / e))
    u = (t[~sys] - e) / max(n_frames - e, 1)
    s = np.clip((u - 0.7) / 0.3, 0, 1)
    p[~sys] = 0.85 * 0.5 * (1 + np.cos(np.pi * np.minimum(u / 0.5, 1))) + 0.15 * (1 - s * s * (3 - 2 * s))
    return p
