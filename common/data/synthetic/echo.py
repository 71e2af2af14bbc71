"""Simple but physical 2D echocardiography simulator with exact ground truth (apical 2CH / 4CH views).

Anatomy and motion live in :mod:`common.data.synthetic.echo_anatomy` (exact, invertible deformation ``Φ_t``).
This module renders B-mode frames with a convolution model:

1. tissue scatterers with Gaussian amplitudes are drawn once in the reference (ED) configuration, with density and
   reflectivity set by the tissue they sit in (blood: few and weak; myocardium; bright pericardium; chest wall);
   at frame ``t`` they sit at ``Φ_t(X)``, so the speckle moves with the tissue;
2. the scatterers are splatted (bilinear) onto a polar beam grid (range x angle) of the sector scan and convolved
   with a separable point-spread function: axially a Gaussian-modulated cosine pulse (RF), laterally a Gaussian
   beam profile of fixed angular width (so the beam widens with depth as in a phased array);
3. two-way depth attenuation, a fixed rib shadow (``dropout``), additive electronic noise, time-gain compensation,
   envelope detection (magnitude of the analytic signal, Hilbert transform along range) and log compression;
4. scan conversion to the Cartesian image, zeros outside the sector, apex of the sector at the top centre.

Pixel convention: pixel ``(i, j)`` (row, column) has its centre at ``x = j``, ``y = i``; tracks and displacements
are in pixels in that convention. Spacing is isotropic (mm per pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, sparse

from common.data.synthetic.echo_anatomy import (
    EchoAnatomy,
    contraction,
    sample_patient_params,
    sample_view_params,
)

__all__ = [
    "EchoSequence",
    "simulate_echo_sequence",
    "patient_parameters",
    "plot_echo_sequence",
]

_VIEWS = ("2CH", "4CH")
_VIEW_CODE = {"2CH": 2, "4CH": 4}


@dataclass
class EchoSequence:
    """A simulated apical echo sequence with its ground truth.

    images: (T, H, W) float32 B-mode in [0, 1] after log compression, apex of the sector at the top, 0 outside it.
    labels: (T, H, W) uint8, 0 background, 1 LV cavity, 2 myocardium, 3 LA (inside the sector only).
    tracks: (T, N, 2) float32 (x, y) pixels of myocardial centre-line points, base (left) -> apex -> base (right);
        pixel ``(i, j)`` has its centre at ``x = j``, ``y = i``.
    visible: (T, N) bool, False outside the sector/image or under the rib shadow.
    ed_frame / es_frame: ED (first frame, maximal LV) and ES (minimal centre-line length in the first cycle).
    gls: true GLS (%) between ED and ES of the continuous mid-wall centre line deformed by the motion model
        (:meth:`EchoAnatomy.centre_line_length`), not of the polyline through the N tracked points: the GLS of
        ``tracks`` differs from it by the polyline's discretisation (chords are shorter than arcs; a few tenths
        of a percentage point for 32 points).
    spacing: (row, col) mm per pixel (isotropic); fps: frames per second; view: "2CH" or "4CH".
    params: patient, view and acquisition parameters (JSON-serialisable).
    lv_volume_ml: (T,) single-plane area-length LV volume per frame (ml), from the label masks.
    """

    images: np.ndarray
    labels: np.ndarray
    tracks: np.ndarray
    visible: np.ndarray
    ed_frame: int
    es_frame: int
    gls: float
    spacing: tuple[float, float]
    fps: float
    view: str
    params: dict
    lv_volume_ml: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _sim: _Simulator | None = field(default=None, repr=False)
    _contraction: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def n_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def ef(self) -> float:
        """Single-plane ejection fraction (%) from the ED and ES area-length volumes."""
        v = self.lv_volume_ml
        return float(100.0 * (v[self.ed_frame] - v[self.es_frame]) / v[self.ed_frame])

    def displacement(self, t0: int, t1: int) -> np.ndarray:
        """Dense displacement (2, H, W) float32 (dx, dy) in pixels: the material point at pixel (x, y) in frame
        ``t0`` is at (x + dx, y + dy) in frame ``t1``. Exact everywhere (the motion model is global)."""
        if self._sim is None:
            raise RuntimeError("displacement() needs the simulator state; this EchoSequence was built without it")
        for t in (t0, t1):
            if not 0 <= t < self.n_frames:
                raise ValueError(f"frame {t} out of range for a sequence of {self.n_frames} frames")
        return self._sim.displacement(float(self._contraction[t0]), float(self._contraction[t1]))


class _Simulator:
    """Geometry of the sector, the pixel grid and the beam grid for one simulated view."""

    def __init__(self, anatomy: EchoAnatomy, image_size: tuple[int, int], blur: float):
        self.anat = anatomy
        H, W = image_size
        self.H, self.W = H, W
        v = anatomy.v
        self.depth = v["depth"]
        self.half_angle = math.radians(v["sector_deg"]) / 2.0
        # isotropic spacing: the sector (apex at row 0, centre column) must fit in depth and in width
        self.s = 1.01 * max(self.depth / (H - 1), 2.0 * self.depth * math.sin(self.half_angle) / (W - 1))
        self.x0 = (W - 1) / 2.0
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
        self.gx, self.gy = xx, yy
        X, Y = (xx - self.x0) * self.s, yy * self.s
        self.grid_lv = anatomy.to_lv(X, Y)
        rho, ang = np.hypot(X, Y), np.arctan2(X, Y)
        self.sector = (rho <= self.depth) & (np.abs(ang) <= self.half_angle)
        # PSF in mm, tied to the pixel size so the speckle grain is ~2 px axially whatever the image size
        widen = 1.0 + 0.8 * blur
        self.sig_ax = 0.8 * self.s * widen
        self.wavelength = 1.6 * 0.8 * self.s  # RF period along range (two-way), fixed by the probe
        self.dr = self.wavelength / 4.0
        sig_th0 = 1.2 * self.s / (0.5 * self.depth)
        self.sig_th = sig_th0 * widen
        self.dth = sig_th0 / 2.0
        self.n_r = int(math.ceil(self.depth / self.dr)) + 2
        self.n_th = int(math.ceil(2 * self.half_angle / self.dth)) + 2
        self.ranges = np.arange(self.n_r) * self.dr
        self.angles = -self.half_angle + np.arange(self.n_th) * self.dth
        z = np.arange(-int(4 * self.sig_ax / self.dr) - 1, int(4 * self.sig_ax / self.dr) + 2) * self.dr
        self.k_ax = np.exp(-0.5 * (z / self.sig_ax) ** 2) * np.cos(2 * np.pi * z / self.wavelength)
        a = np.arange(-int(4 * self.sig_th / self.dth) - 1, int(4 * self.sig_th / self.dth) + 2) * self.dth
        self.k_lat = np.exp(-0.5 * (a / self.sig_th) ** 2)
        # unit-energy kernels: diffuse speckle keeps its mean brightness when the blur knob widens the PSF
        self.k_ax /= np.linalg.norm(self.k_ax)
        self.k_lat /= np.linalg.norm(self.k_lat)
        self._scan = self._scan_matrix(rho, ang)
        # axial pulse and Hilbert transform in one pass: the one-sided spectrum of the pulse, doubled (analytic)
        self.nfft = int(sfft.next_fast_len(self.n_r + self.k_ax.size, real=True))
        spec = sfft.rfft(np.roll(np.pad(self.k_ax, (0, self.nfft - self.k_ax.size)), -(self.k_ax.size // 2)))
        h = np.full(spec.size, 2.0)
        h[0] = 1.0
        if self.nfft % 2 == 0:
            h[-1] = 1.0
        self.pulse_analytic = (spec * h)[:, None].astype(np.complex64)
        # pixels whose material never moves (outside the deforming box) keep their reference label
        self.px_moving = self.sector & anatomy._moving(*self.grid_lv)
        self.static_labels = anatomy.ref_labels(*self.grid_lv)
        self.static_labels[~self.sector] = 0

    def _scan_matrix(self, rho: np.ndarray, ang: np.ndarray) -> sparse.csr_matrix:
        """Bilinear beam-grid -> pixel interpolation (H*W, n_r*n_th); empty rows outside the sector."""
        idx = np.flatnonzero(self.sector.ravel())
        fi = rho.ravel()[idx] / self.dr
        fj = (ang.ravel()[idx] + self.half_angle) / self.dth
        i0 = np.clip(np.floor(fi).astype(int), 0, self.n_r - 2)
        j0 = np.clip(np.floor(fj).astype(int), 0, self.n_th - 2)
        wi, wj = np.clip(fi - i0, 0, 1), np.clip(fj - j0, 0, 1)
        rows = np.repeat(idx, 4)
        cols = np.stack([i0 * self.n_th + j0, i0 * self.n_th + j0 + 1, (i0 + 1) * self.n_th + j0,
                         (i0 + 1) * self.n_th + j0 + 1], 1).ravel()
        vals = np.stack([(1 - wi) * (1 - wj), (1 - wi) * wj, wi * (1 - wj), wi * wj], 1).ravel()
        return sparse.csr_matrix((vals, (rows, cols)), shape=(self.H * self.W, self.n_r * self.n_th))

    def splat(self, X: np.ndarray, Y: np.ndarray, amp: np.ndarray) -> np.ndarray:
        """Bilinear splat of scatterers at world (X, Y) mm with amplitudes ``amp`` onto the beam grid (n_r, n_th)."""
        fi = np.hypot(X, Y) / self.dr
        fj = (np.arctan2(X, Y) + self.half_angle) / self.dth
        ok = (fi >= 0) & (fi < self.n_r - 1) & (fj >= 0) & (fj < self.n_th - 1)
        fi, fj, a = fi[ok], fj[ok], amp[ok]
        i0, j0 = fi.astype(np.int64), fj.astype(np.int64)
        wi, wj = fi - i0, fj - j0
        base = i0 * self.n_th + j0
        size = self.n_r * self.n_th
        aw0, aw1 = a * (1 - wi), a * wi
        n = self.n_th
        grid = (np.bincount(base, aw0 * (1 - wj), size) + np.bincount(base + 1, aw0 * wj, size)
                + np.bincount(base + n, aw1 * (1 - wj), size) + np.bincount(base + n + 1, aw1 * wj, size))
        return grid.reshape(self.n_r, self.n_th)

    # ------------------------------------------------------------------ coordinates
    def world_to_px(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return X / self.s + self.x0, Y / self.s

    def lv_to_px(self, l: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.world_to_px(*self.anat.from_lv(l, r))

    def labels(self, c: float) -> np.ndarray:
        lab = self.static_labels.copy()
        m = self.px_moving
        lab[m] = self.anat.ref_labels(*self.anat.inverse(self.grid_lv[0][m], self.grid_lv[1][m], c))
        return lab

    def envelope(self, grid: np.ndarray) -> np.ndarray:
        """Analytic RF signal (n_r, n_th) complex of a scatterer grid: axial pulse convolution and Hilbert transform
        together in the Fourier domain (the analytic signal of ``grid * pulse`` is ``grid * analytic(pulse)``)."""
        spec = sfft.rfft(grid.astype(np.float32), n=self.nfft, axis=0) * self.pulse_analytic  # positive freqs only
        full = np.zeros((self.nfft, grid.shape[1]), dtype=np.complex64)
        full[: spec.shape[0]] = spec
        return sfft.ifft(full, axis=0, overwrite_x=True)[: self.n_r]

    def displacement(self, c0: float, c1: float) -> np.ndarray:
        out = np.zeros((2, self.H, self.W), dtype=np.float32)
        if c0 == c1:
            return out
        l, r = self.grid_lv
        l1, r1 = self.anat.forward(*self.anat.inverse(l, r, c0), c1)
        # rotate the LV-frame displacement to the image, so material outside the moving box gets exactly 0
        dl, dr = l1 - l, r1 - r
        u, w = self.anat.u, self.anat.w
        out[0] = (dl * u[0] + dr * w[0]) / self.s
        out[1] = (dl * u[1] + dr * w[1]) / self.s
        return out

    def in_sector(self, x: np.ndarray, y: np.ndarray, margin_px: float = 1.0) -> np.ndarray:
        X, Y = (x - self.x0) * self.s, y * self.s
        rho, ang = np.hypot(X, Y), np.arctan2(X, Y)
        inside_img = (x >= 0) & (x <= self.W - 1) & (y >= 0) & (y <= self.H - 1)
        m = margin_px * self.s
        return inside_img & (rho <= self.depth - m) & (np.abs(ang) * np.maximum(rho, 1e-6) <= self.half_angle * rho - m)


def _random_field(rng: np.random.Generator, n_modes: int, wl_range: tuple[float, float]):
    """A smooth random field f(X, Y) (unit variance, zero mean) as a sum of random plane waves (mm)."""
    wl = rng.uniform(*wl_range, n_modes)
    th = rng.uniform(0, 2 * np.pi, n_modes)
    ph = rng.uniform(0, 2 * np.pi, n_modes)
    kx, ky = 2 * np.pi / wl * np.cos(th), 2 * np.pi / wl * np.sin(th)

    def f(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        out = np.zeros_like(X)
        for i in range(n_modes):
            out += np.cos(kx[i] * X + ky[i] * Y + ph[i])
        return out * math.sqrt(2.0 / n_modes)

    return f


def _reflectivity(anat: EchoAnatomy, sim: _Simulator, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator,
                  dropout: float) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude scale and keep-probability of reference scatterers at world (X, Y) from the tissue they are in."""
    l, r = anat.to_lv(X, Y)
    side = np.where(r >= 0, 1, -1)
    ar = np.abs(r)
    lab = anat.ref_labels(l, r)
    het = np.exp(0.3 * _random_field(rng, 12, (6.0, 30.0))(X, Y))
    # extra-cardiac tissue and lung: darker than myocardium, patchy
    amp = 0.25 * het * np.exp(0.7 * _random_field(rng, 8, (12.0, 50.0))(X, Y))
    keep = np.ones_like(X)

    # myocardium: brighter where the beam hits the wall face-on (apex, base) than along the lateral walls
    a_l = anat.cL + 0.5 * anat.h_a
    b_r = np.where(side > 0, anat.R[1] + 0.5 * anat.h[1], anat.R[-1] + 0.5 * anat.h[-1])
    nl, nr = (l - anat.cL) / a_l**2, r / b_r**2
    nx, ny = nl * anat.u[0] + nr * anat.w[0], nl * anat.u[1] + nr * anat.w[1]
    nn = np.hypot(nx, ny) + 1e-12
    bb = np.hypot(X, Y) + 1e-12
    cos_inc = np.abs((nx * X + ny * Y) / (nn * bb))
    spec = 1.0 - (0.4 + 0.45 * dropout) * (1.0 - cos_inc) ** 2
    myo = lab == 2
    amp = np.where(myo, 1.0 * het * spec, amp)

    # pericardium: a bright band just outside the epicardium (septum in 4CH borders the RV instead)
    q_e = np.hypot((l - anat.cL) / (anat.cL + anat.h_a), r / np.where(side > 0, anat.R[1] + anat.h[1],
                                                                      anat.R[-1] + anat.h[-1]))
    peri = (q_e > 1.0) & (q_e < 1.0 + 3.5 / (anat.R[1] + anat.h[1])) & (l <= anat.L - 4.0) & (lab == 0)
    if anat.v["view"] == "4CH":
        peri &= ~((side < 0) & (l > 0.12 * anat.L))
    amp = np.where(peri, 2.4 * het, amp)

    # LA wall, annulus (fibrous, bright)
    la_wall = (l > anat.L) & (ar > anat.rho_la(l, side)) & (ar < anat.rho_la(l, side) + anat.p["la_wall"]) & (lab == 0)
    amp = np.where(la_wall, 0.9 * het, amp)
    for s in (-1, 1):
        al, ar_ = anat.L, s * anat.rho_endo(np.array([anat.L - 1e-6]), s)[0]
        d = np.hypot(l - al, r - ar_)
        amp = np.where(d < 3.5, 2.2, amp)

    if anat.v["view"] == "4CH":
        v = anat.v
        l_rv0, l_rv1 = 0.25 * anat.L, anat.L - 6.0
        re_left = anat.rho_epi(np.minimum(l, anat.L), -1)
        w_rv = v["rv_width"] * np.sqrt(np.clip((l - l_rv0) / (l_rv1 - l_rv0), 0.0, 1.0))
        beyond = -r - re_left
        rv_cav = (side < 0) & (l >= l_rv0) & (l <= l_rv1) & (beyond > 0) & (beyond < w_rv)
        rv_wall = (side < 0) & (l >= l_rv0 - v["rv_wall"]) & (l <= l_rv1) & (beyond >= w_rv) & (
            beyond < w_rv + v["rv_wall"])
        rv_peri = (side < 0) & (l >= l_rv0 - 6.0) & (l <= l_rv1) & (beyond >= w_rv + v["rv_wall"]) & (
            beyond < w_rv + v["rv_wall"] + 3.0)
        amp = np.where(rv_wall, 0.85 * het, amp)
        amp = np.where(rv_peri, 2.2 * het, amp)
        # RA under the RV, separated from the LA by the interatrial septum
        ra_c_l = l_rv1 + 0.85 * v["ra_a"]
        ra_c_r = -(anat.la_b[-1] + 3.0 + v["ra_b"])
        q_ra = np.hypot((l - ra_c_l) / v["ra_a"], (r - ra_c_r) / v["ra_b"])
        ra_cav = (q_ra <= 1.0) & (lab == 0)
        ra_wall = (q_ra > 1.0) & (q_ra < 1.0 + 2.5 / v["ra_b"]) & (lab == 0) & ~rv_cav
        amp = np.where(ra_wall, 0.9 * het, amp)
        tri = np.hypot(l - l_rv1, beyond - w_rv) < 3.5
        amp = np.where(tri & (side < 0), 2.0, amp)
        blood = rv_cav | ra_cav
    else:
        blood = np.zeros_like(myo)

    # chest wall between the probe and the heart: layered, with bright fascia lines
    y_apex = anat.from_lv(np.array([-anat.h_a]), np.array([0.0]))[1][0]
    chest = Y < y_apex - 5.0
    bands = 0.7 + 1.2 * (np.cos(2 * np.pi * Y / rng.uniform(5.0, 8.0) + rng.uniform(0, 6.3)) > 0.75)
    amp = np.where(chest & (lab == 0), bands * het, amp)

    blood |= (lab == 1) | (lab == 3)
    amp = np.where(blood, 0.05, amp)
    keep = np.where(blood, 0.15, keep)

    # echo dropout of one myocardial segment (moves with the tissue) for robustness studies
    if dropout > 0:
        d_side = rng.choice([-1, 1])
        d_lo = rng.uniform(0.2, 0.6) * anat.L
        seg = myo & (side == d_side) & (l > d_lo) & (l < d_lo + 0.3 * anat.L)
        amp = np.where(seg, amp * (1.0 - 0.85 * dropout), amp)
    return amp, keep


def _phases(n_frames: int, n_cycles: float, fps: float, systole: float, heart_rate: float,
            half_cycle: bool) -> tuple[np.ndarray, float]:
    """Cycle phase of each frame and the frame rate actually used."""
    if half_cycle:
        # ED (first frame) to ES (last frame): the frame rate follows from the patient's heart rate
        period = 60.0 / heart_rate
        fps = (n_frames - 1) / (systole * period) if n_frames > 1 else fps
        return np.linspace(0.0, systole, n_frames), float(fps)
    return np.arange(n_frames) * n_cycles / max(n_frames - 1, 1), float(fps)


def patient_parameters(seed: int) -> dict:
    """Patient-level parameters (sizes in mm, contraction, heart rate in bpm, age, sex) that
    :func:`simulate_echo_sequence` uses for ``seed``, without simulating anything."""
    return sample_patient_params(np.random.default_rng(np.random.SeedSequence([int(seed), 0])))


def simulate_echo_sequence(seed: int, view: str = "4CH", n_frames: int = 20, image_size: tuple[int, int] = (256, 256),
                           n_cycles: float = 1.0, fps: float = 30.0, n_track_points: int = 32,
                           pathology: float = 0.0, noise: float = 0.0, blur: float = 0.0, dropout: float = 0.0,
                           half_cycle: bool = False) -> EchoSequence:
    """Simulate one apical echo sequence of a patient.

    ``seed`` fixes the patient (sizes, contraction, heart rate are shared by both views of the same seed) and the
    view-specific geometry, speckle and noise; results are identical for identical arguments.
    The sequence spans ``n_cycles`` cardiac cycles from the first frame (ED) to the last; with ``n_cycles = 1`` the
    last frame is again ED. ``half_cycle=True`` makes the frames span ED -> ES exactly (CAMUS half sequences); the
    frame rate then follows from the heart rate and ``fps`` is ignored.
    Severity knobs in [0, 1]: ``noise`` (electronic noise, SNR at full depth from 20 dB down to 0 dB), ``blur``
    (PSF up to 1.8x wider plus a display blur of up to 1.5 px: coarser, hazier speckle), ``dropout`` (rib shadow
    of up to -30 dB, stronger specular dropout of the lateral walls, one weak myocardial segment; points deep in a
    shadow become invisible when ``dropout >= 0.4``). ``pathology`` in [0, 1] makes one segment (apical, mid or
    basal; the segment and wall are patient parameters) hypo- (1: a-) kinetic: less shortening and thickening.
    Labels, tracks, GLS and displacements never depend on the severity knobs.
    Returns an :class:`EchoSequence` with images (T, H, W), labels, tracks (T, N, 2), visibility, ED/ES, GLS.
    """
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {_VIEWS}, got {view!r}")
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    H, W = (int(image_size[0]), int(image_size[1]))
    if H < 32 or W < 32:
        raise ValueError(f"image_size must be at least 32x32, got {image_size}")
    for name, val in (("noise", noise), ("blur", blur), ("dropout", dropout)):
        if not 0.0 <= val <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {val}")
    if n_cycles <= 0 or fps <= 0:
        raise ValueError(f"n_cycles and fps must be positive, got {n_cycles}, {fps}")

    patient = patient_parameters(seed)
    vrng = np.random.default_rng(np.random.SeedSequence([int(seed), _VIEW_CODE[view]]))
    vparams = sample_view_params(vrng, view, patient)
    anat = EchoAnatomy(patient, vparams, pathology)
    sim = _Simulator(anat, (H, W), blur)

    phases, fps_used = _phases(n_frames, n_cycles, fps, patient["systole"], patient["heart_rate"], half_cycle)
    cs = contraction(phases, patient["systole"])
    first = phases < 1.0 - 1e-9
    first[0] = True

    # ---- scatterers in the reference configuration, uniform per unit area over the (slightly enlarged) sector
    srng = np.random.default_rng(np.random.SeedSequence([int(seed), _VIEW_CODE[view], 1]))
    r_max, a_max = sim.depth + 10.0, sim.half_angle + math.radians(4.0)
    area = a_max * r_max**2
    n_scat = int(2.0 * area / sim.s**2)
    rho = r_max * np.sqrt(srng.uniform(0, 1, n_scat))
    ang = srng.uniform(-a_max, a_max, n_scat)
    SX, SY = rho * np.sin(ang), rho * np.cos(ang)
    amp_scale, keep = _reflectivity(anat, sim, SX, SY, srng, dropout)
    kept = srng.uniform(0, 1, n_scat) < keep
    SX, SY, amp = SX[kept], SY[kept], (amp_scale * srng.standard_normal(n_scat))[kept]
    sl, sr = anat.to_lv(SX, SY)

    # ---- fixed acquisition maps on the beam grid: attenuation, rib shadow, TGC
    att_db = 0.3  # two-way attenuation, dB/mm (~0.5 dB/cm/MHz at 3 MHz)
    tgc_db = att_db - srng.uniform(0.0, 0.035)  # TGC leaves a slight darkening with depth
    att = 10 ** (-att_db * sim.ranges / 20.0)[:, None]
    tgc = 10 ** (tgc_db * sim.ranges / 20.0)[:, None]
    shadow = np.ones((sim.n_r, sim.n_th))
    shadow_params = None
    if dropout > 0:
        c_ang = srng.uniform(-0.75, 0.75) * sim.half_angle
        w_ang = math.radians(srng.uniform(6.0, 12.0))
        r0 = srng.uniform(12.0, 30.0)
        in_ang = 1.0 - np.clip((np.abs(sim.angles - c_ang) - w_ang / 2) / math.radians(2.0), 0.0, 1.0)
        in_rng = np.clip((sim.ranges - r0) / 5.0, 0.0, 1.0)
        # a rib blocks most of the beam: up to -30 dB behind it
        shadow = 10 ** (-30.0 * dropout * in_rng[:, None] * in_ang[None, :] / 20.0)
        shadow_params = (c_ang, w_ang, r0)
    gain_map = (att * shadow).astype(np.float32)
    tgc = tgc.astype(np.float32)

    nrng = np.random.default_rng(np.random.SeedSequence([int(seed), _VIEW_CODE[view], 2]))
    images = np.zeros((n_frames, H, W), dtype=np.float32)
    labels = np.zeros((n_frames, H, W), dtype=np.uint8)
    noise_std, ref_db = None, 0.0
    dyn_range = 52.0
    gain_db = float(srng.uniform(-2.0, 2.0))
    # scatterers outside the deforming box never move: splat them once
    mv = anat._moving(sl, sr)
    static_grid = sim.splat(SX[~mv], SY[~mv], amp[~mv])
    sl, sr, amp_mv = sl[mv], sr[mv], amp[mv]
    for t in range(n_frames):
        X, Y = anat.from_lv(*anat.forward(sl, sr, float(cs[t])))
        grid = static_grid + sim.splat(X, Y, amp_mv)
        grid = ndimage.convolve1d(grid, sim.k_lat, axis=1, mode="constant")
        iq = sim.envelope(grid)  # analytic RF before attenuation
        if noise_std is None:
            # noise relative to the tissue echo level, so the SNR knob means the same for every patient
            rms = float(np.sqrt(np.mean(iq.real[sim.ranges < sim.depth] ** 2)))
            snr_db = 20.0 - 20.0 * noise
            noise_std = rms * 10 ** (-att_db * sim.depth / 20.0) * 10 ** (-snr_db / 20.0)
            # display reference: the median echo of the clean first frame (no shadow, no noise) + 27 dB, so neither
            # the blur knob (which spreads bright echoes) nor a shadow or noise shifts the overall brightness
            clean = np.abs(iq * (att * tgc))[sim.ranges < sim.depth]
            ref_db = 20.0 * np.log10(np.median(clean) + 1e-12) + 27.0 + gain_db
        # the gains vary slowly along range, so they commute with the Hilbert transform (Bedrosian); the analytic
        # signal of white electronic noise is circular complex Gaussian noise
        noise_iq = nrng.standard_normal(iq.shape, dtype=np.float32) + 1j * nrng.standard_normal(iq.shape,
                                                                                                 dtype=np.float32)
        env = np.abs((iq * gain_map + np.float32(noise_std) * noise_iq) * tgc)
        img_p = np.clip((20.0 * np.log10(env + np.float32(1e-12)) - np.float32(ref_db - dyn_range)) / dyn_range,
                        0.0, 1.0)
        img = (sim._scan @ img_p.ravel()).reshape(H, W)
        if blur > 0:  # out-of-focus / low-quality haze on top of the wider PSF
            img = ndimage.gaussian_filter(img, 1.5 * blur)
        images[t] = np.where(sim.sector, img, 0.0)
        labels[t] = sim.labels(float(cs[t]))

    # ---- centre-line tracks, visibility, ED/ES, GLS
    cl_l, cl_r = anat.centre_line(n_track_points)
    tracks = np.zeros((n_frames, n_track_points, 2), dtype=np.float32)
    visible = np.zeros((n_frames, n_track_points), dtype=bool)
    for t in range(n_frames):
        x, y = sim.lv_to_px(*anat.forward(cl_l, cl_r, float(cs[t])))
        tracks[t, :, 0], tracks[t, :, 1] = x, y
        vis = sim.in_sector(x, y)
        if shadow_params is not None:
            X, Y = (x - sim.x0) * sim.s, y * sim.s
            c_ang, w_ang, r0 = shadow_params
            # points deep in a strong shadow (>= 12 dB) are occluded
            vis &= ~((np.abs(np.arctan2(X, Y) - c_ang) < w_ang / 2) & (np.hypot(X, Y) > r0 + 5.0) & (dropout >= 0.4))
        visible[t] = vis
    ed = 0
    # the reference comes from the motion model's own geometry (arc length of the deformed continuous line), never
    # from a polyline through the tracks: the GLS of tracks, true or predicted, is what it is compared with
    lengths = np.array([anat.centre_line_length(float(c)) for c in cs])
    es = int(np.argmin(np.where(first, lengths, np.inf)))
    gls = float(100.0 * (lengths[es] - lengths[ed]) / lengths[ed])

    # ---- single-plane area-length LV volumes from the masks, long axis from the exact apex and mitral-plane centre
    vols = np.zeros(n_frames)
    for t in range(n_frames):
        lt, rt = anat.forward(np.array([0.0, anat.L]), np.array([0.0, 0.0]), float(cs[t]))
        length = float(np.hypot(np.diff(lt), np.diff(rt))[0])
        area = float((labels[t] == 1).sum()) * sim.s**2
        vols[t] = 8.0 * area**2 / (3.0 * np.pi * length) / 1000.0

    params = {"seed": int(seed), "view": view, "pathology": float(pathology), "noise": float(noise),
              "blur": float(blur), "dropout": float(dropout), "n_cycles": float(n_cycles), "half_cycle": half_cycle,
              "patient": patient, "view_params": vparams, "gain_db": gain_db, "n_scatterers": int(kept.sum()),
              "spacing_mm": float(sim.s)}
    return EchoSequence(images=images, labels=labels, tracks=tracks, visible=visible, ed_frame=ed, es_frame=es,
                        gls=gls, spacing=(float(sim.s), float(sim.s)), fps=fps_used, view=view,
                        params=_jsonable(params), lv_volume_ml=vols.astype(np.float32), _sim=sim,
                        _contraction=cs)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# drawn in this order so the LV contour stays visible on the LV/Myo border
_LABEL_COLOURS = {2: "#40ff60", 3: "#4090ff", 1: "#ff4040"}


def _load_for_plot(src) -> dict:
    """Normalise the inputs of :func:`plot_echo_sequence` to images (T, H, W) [+ labels, tracks, visible]."""
    if isinstance(src, EchoSequence):
        return {"images": src.images, "labels": src.labels, "tracks": src.tracks, "visible": src.visible,
                "title": f"{src.view}  GLS {src.gls:.1f}%  EF {src.ef:.0f}%", "ed": src.ed_frame, "es": src.es_frame}
    if isinstance(src, (str, Path)) and str(src).endswith((".h5", ".hdf5")):
        from common.data.tracking import read_tracking_h5

        d = read_tracking_h5(src)
        return {"images": d["video"].astype(np.float32) / 255.0, "labels": d.get("labels"), "tracks": d["tracks"],
                "visible": d["visible"], "title": f"{Path(src).name}  {d['view']}", "ed": d["ed_frame"],
                "es": d["es_frame"]}
    from common.data.camus import load_echo_frame

    if isinstance(src, dict):  # a datalist entry: prefer the whole sequence over a key frame
        pairs = (("sequence", "sequence_label"), ("image", "label"), ("image_ed", "label_ed"))
        image, label = next(((src[i], src.get(lb)) for i, lb in pairs if src.get(i)), (None, None))
        if image is None:
            raise ValueError(f"datalist entry has no image key (sequence/image/image_ed): {sorted(src)}")
    elif isinstance(src, (list, tuple)):
        image, label = src[0], (src[1] if len(src) > 1 else None)
    else:
        image, label = src, None
    img, _ = load_echo_frame(image)
    img = img.astype(np.float32)
    img = img / 255.0 if img.max() > 1.5 else img
    lab = load_echo_frame(label)[0] if label is not None else None
    if img.ndim == 2:
        img = img[None]
        lab = lab[None] if lab is not None else None
    return {"images": img, "labels": lab, "tracks": None, "visible": None, "title": Path(str(image)).name,
            "ed": 0, "es": img.shape[0] - 1}


def plot_echo_sequence(seq_or_paths, out_png: str | Path, frames: Sequence[int] | None = None,
                       tail: int = 4) -> Path:
    """Write a PNG of a few frames with label contours (LV red, Myo green, LA blue) and point tracks.

    ``seq_or_paths``: an :class:`EchoSequence`; a tracking HDF5 file; an image file (CAMUS/TED, any release);
    an ``(image, label)`` pair of files; or a datalist dict with ``image``/``label`` (or ``sequence``/
    ``sequence_label``) keys. ``frames`` defaults to ED, mid-systole, ES and mid-diastole when present.
    Visible points are filled dots with a short trail of the previous ``tail`` frames; invisible ones are crosses.
    """
    from common.plotting import save_figure, subplots

    d = _load_for_plot(seq_or_paths)
    imgs = d["images"]
    T = imgs.shape[0]
    if frames is None:
        ed, es = int(d["ed"]), int(d["es"])
        cand = [ed, (ed + es) // 2, es, min(T - 1, es + (T - 1 - es) // 2)]
        frames = list(dict.fromkeys(f for f in cand if 0 <= f < T))
    frames = [int(f) for f in frames]
    for f in frames:
        if not 0 <= f < T:
            raise ValueError(f"frame {f} out of range for a sequence of {T} frames")
    n = len(frames)
    h, w = imgs.shape[1:]
    fig, axes = subplots(1, n, figsize=(4.0 * n * w / h, 4.3), squeeze=False)
    for ax, f in zip(axes[0], frames):
        ax.imshow(imgs[f], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if d["labels"] is not None:
            lab = d["labels"][f]
            for k, col in _LABEL_COLOURS.items():
                if (lab == k).any():
                    ax.contour((lab == k).astype(float), levels=[0.5], colors=[col], linewidths=0.8)
        if d["tracks"] is not None:
            tr, vis = d["tracks"], d["visible"]
            t0 = max(0, f - tail)
            for p in range(tr.shape[1]):
                ax.plot(tr[t0 : f + 1, p, 0], tr[t0 : f + 1, p, 1], "-", color="yellow", lw=0.6, alpha=0.7)
            v = vis[f]
            ax.scatter(tr[f, v, 0], tr[f, v, 1], s=7, c=np.arange(tr.shape[1])[v], cmap="autumn", zorder=3)
            ax.scatter(tr[f, ~v, 0], tr[f, ~v, 1], s=9, marker="x", c="cyan", lw=0.7, zorder=3)
        tag = " ED" if f == d["ed"] else (" ES" if f == d["es"] else "")
        ax.set_title(f"frame {f}{tag}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(d["title"], fontsize=9)
    return save_figure(fig, out_png, dpi=110)
