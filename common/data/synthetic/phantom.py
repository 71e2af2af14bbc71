"""Anatomy-free speckle phantoms with exact trajectories, written in the tracking HDF5 layout.

A speckle-tracking method is first validated on a phantom: fully developed speckle moving with a known smooth
motion, no anatomy, no sector edges. This module draws such videos independently of the echo simulator
(``common.data.synthetic.echo``), so a tracker tuned on one is tested on data drawn differently.

Image model (per frame): a field of point scatterers with zero-mean Gaussian amplitudes, uniform in a region larger
than the image (so motion never uncovers empty tissue); a separable PSF ``exp(-dx²/2σ_lat² - dy²/2σ_ax²)
cos(2π f0 dy)`` along the axial (y) direction. Quadrature demodulation of the RF line gives the complex baseband
``Σ a_k g(r - r_k) exp(-i 2π f0 y_k)`` whose modulus is the envelope: the scatterers' complex weights are spread on the
pixel grid (bilinear) and filtered by the Gaussian ``g``. Complex white noise is added before the envelope (thermal
noise), then log compression to a dynamic range in dB and 8-bit quantisation.

Motion model (about a centre ``c`` near the image centre)::

    x(t) = c + d(t) + k(t) R(θ(t)) (x0 - c),    s(t) = (1 - cos(2π f_m t)) / 2  (0 at frame 0, smooth)

with ``θ(t) = θ_max s(t)`` (rotation), ``k(t) = 1 - κ s(t)`` (contraction) and ``d(t) = D s(t) u`` (translation).
``amplitude`` is the peak displacement (pixels) that each active component gives a point at the reference radius
``r_ref = 0.3 min(H, W)``; ``mixed`` splits it among the three components with random weights. Scatterers and query
points move with the same map, so the trajectories are exact (computed from the model, never by tracking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["MOTIONS", "PhantomParams", "draw_phantom_params", "motion_map", "render_envelope", "log_compress",
           "simulate_phantom", "write_phantom_h5", "phantom_training_set", "phantom_training_datalist"]

MOTIONS = ("rotation", "contraction", "translation", "mixed")


@dataclass
class PhantomParams:
    """Parameters of one phantom video (see the module docstring); every length is in pixels."""

    motion: str = "rotation"
    amplitude: float = 6.0
    fps: float = 40.0
    motion_hz: float = 1.0
    density: float = 2.0
    sigma_axial: float = 1.0
    sigma_lateral: float = 1.6
    f0: float = 0.25
    noise_db: float = -30.0
    dynamic_range_db: float = 40.0
    centre_offset: tuple[float, float] = (0.0, 0.0)
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)
    direction: float = 0.0


def _check(name: str, value: float, lo: float, hi: float | None = None) -> float:
    v = float(value)
    if not np.isfinite(v) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"phantom: {name} must be {bound}, got {value!r}")
    return v


def draw_phantom_params(seed: int, motion: str = "mixed", amplitude: float | Sequence[float] = (2.0, 10.0),
                        fps: float | Sequence[float] = (25.0, 60.0),
                        density: float | Sequence[float] = (1.0, 4.0),
                        sigma_axial: float | Sequence[float] = (0.8, 1.4),
                        sigma_lateral: float | Sequence[float] = (1.2, 2.2)) -> PhantomParams:
    """Random phantom parameters for ``seed``; each knob is a number or a ``(low, high)`` uniform range.

    The default ranges (amplitude 2-10 px, 25-60 fps, 1-4 scatterers per pixel, axial PSF sigma 0.8-1.4 px, lateral
    1.2-2.2 px) are the **training ranges**: :func:`phantom_training_set` (phantoms mixed into SpeckNet training) and
    :func:`write_phantom_h5` use them by default. A test of generalisation draws its phantoms outside them (other
    seeds and at least one knob out of range), so it never scores data the tracker was trained on.
    """
    if motion not in MOTIONS:
        raise ValueError(f"phantom: unknown motion {motion!r}; choose one of {MOTIONS}")
    rng = np.random.default_rng(seed)

    def pick(name: str, v: float | Sequence[float], lo: float) -> float:
        if np.ndim(v) == 0:
            return _check(name, v, lo)
        if len(v) != 2 or float(v[0]) > float(v[1]):
            raise ValueError(f"phantom: {name} must be a number or a (low, high) range, got {v!r}")
        return _check(name, rng.uniform(float(v[0]), float(v[1])), lo)

    weights = {"rotation": (1.0, 0.0, 0.0), "contraction": (0.0, 1.0, 0.0), "translation": (0.0, 0.0, 1.0)}
    w = weights.get(motion) or tuple(float(x) for x in rng.dirichlet((1.0, 1.0, 1.0)))
    return PhantomParams(motion=motion, amplitude=pick("amplitude", amplitude, 0.0), fps=pick("fps", fps, 1.0),
                         motion_hz=float(rng.uniform(0.7, 1.5)), density=pick("density", density, 0.01),
                         sigma_axial=pick("sigma_axial", sigma_axial, 0.3),
                         sigma_lateral=pick("sigma_lateral", sigma_lateral, 0.3), f0=float(rng.uniform(0.18, 0.3)),
                         noise_db=float(rng.uniform(-35.0, -25.0)), dynamic_range_db=float(rng.uniform(35.0, 50.0)),
                         centre_offset=(float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))), weights=w,
                         direction=float(rng.uniform(0.0, 2 * np.pi)))


def motion_map(points: np.ndarray, t: float, params: PhantomParams, image_size: Sequence[int]) -> np.ndarray:
    """Positions at time ``t`` (s) of reference points ``(N, 2)`` (x, y) px given at ``t = 0`` (the analytic model)."""
    H, W = int(image_size[0]), int(image_size[1])
    r_ref = 0.3 * min(H, W)
    c = np.array([(W - 1) / 2 + params.centre_offset[0], (H - 1) / 2 + params.centre_offset[1]])
    s = 0.5 * (1.0 - np.cos(2 * np.pi * params.motion_hz * t))
    w_rot, w_con, w_tra = params.weights
    theta = w_rot * params.amplitude / r_ref * s  # arc length = amplitude at r_ref
    k = 1.0 - w_con * params.amplitude / r_ref * s
    d = w_tra * params.amplitude * s * np.array([np.cos(params.direction), np.sin(params.direction)])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    p = np.asarray(points, dtype=np.float64)
    return c + d + k * (p - c) @ rot.T


def render_envelope(xy: np.ndarray, amp: np.ndarray, image_size: Sequence[int], params: PhantomParams,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Envelope (H, W) float64 of scatterers at ``xy`` (K, 2) with real amplitudes ``amp`` (K,), before log
    compression; complex noise at ``params.noise_db`` below the mean speckle power is added when ``rng`` is given."""
    H, W = int(image_size[0]), int(image_size[1])
    w = amp * np.exp(-2j * np.pi * params.f0 * xy[:, 1])  # demodulated phase of each scatterer's echo
    x0, y0 = np.floor(xy[:, 0]).astype(np.int64), np.floor(xy[:, 1]).astype(np.int64)
    fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
    grid = np.zeros(H * W, dtype=np.complex128)
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        idx = yi[ok] * W + xi[ok]
        grid += np.bincount(idx, weights=(w[ok] * wt[ok]).real, minlength=H * W)
        grid += 1j * np.bincount(idx, weights=(w[ok] * wt[ok]).imag, minlength=H * W)
    grid = grid.reshape(H, W)
    sig = (params.sigma_axial, params.sigma_lateral)
    iq = gaussian_filter(grid.real, sig, mode="constant") + 1j * gaussian_filter(grid.imag, sig, mode="constant")
    if rng is not None:
        power = float(np.mean(np.abs(iq) ** 2))
        scale = np.sqrt(power * 10 ** (params.noise_db / 10) / 2)
        iq = iq + scale * (rng.standard_normal((H, W)) + 1j * rng.standard_normal((H, W)))
    return np.abs(iq)


def log_compress(envelope: np.ndarray, dynamic_range_db: float, reference: float) -> np.ndarray:
    """Envelope -> uint8 by ``20 log10(env / reference)`` over ``dynamic_range_db`` (reference = 0 dB = white)."""
    db = 20 * np.log10(np.maximum(envelope, 1e-12) / reference)
    return np.clip(np.round((db + dynamic_range_db) / dynamic_range_db * 255.0), 0, 255).astype(np.uint8)


def simulate_phantom(seed: int, params: PhantomParams | None = None, n_frames: int = 40,
                     image_size: Sequence[int] = (256, 256), n_points: int = 32,
                     return_envelope: bool = False) -> dict:
    """One phantom video: ``video`` (T, H, W) uint8, ``tracks`` (T, N, 2) float32 (x, y) px, ``visible`` (T, N)
    bool, ``params``; with ``return_envelope`` also ``envelope`` (T, H, W) float32 before log compression."""
    H, W = int(image_size[0]), int(image_size[1])
    if int(n_frames) < 2 or H < 16 or W < 16 or int(n_points) < 1:
        raise ValueError(f"phantom: need n_frames >= 2, image >= 16 x 16, n_points >= 1; got {n_frames}, "
                         f"{image_size}, {n_points}")
    params = params or draw_phantom_params(seed)
    if params.motion not in MOTIONS:
        raise ValueError(f"phantom: unknown motion {params.motion!r}; choose one of {MOTIONS}")
    rng = np.random.default_rng([int(seed), 16])
    # scatterers cover the image plus a margin the motion can bring in (amplitude, plus rotation/scaling about c)
    margin = 4.0 * (params.sigma_axial + params.sigma_lateral) + 2.0 * params.amplitude + 12.0
    lo, hi = np.array([-margin, -margin]), np.array([W - 1 + margin, H - 1 + margin])
    n_scat = int(round(params.density * float(np.prod(hi - lo))))
    scat = rng.uniform(lo, hi, size=(n_scat, 2))
    amp = rng.standard_normal(n_scat)
    c = np.array([(W - 1) / 2 + params.centre_offset[0], (H - 1) / 2 + params.centre_offset[1]])
    rad = 0.3 * min(H, W) * np.sqrt(rng.uniform(0, 1, n_points))
    ang = rng.uniform(0, 2 * np.pi, n_points)
    q0 = c + np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    times = np.arange(int(n_frames)) / params.fps
    tracks = np.stack([motion_map(q0, t, params, (H, W)) for t in times]).astype(np.float32)
    visible = (tracks[..., 0] >= 0) & (tracks[..., 0] <= W - 1) & (tracks[..., 1] >= 0) & (tracks[..., 1] <= H - 1)
    env = np.stack([render_envelope(motion_map(scat, t, params, (H, W)), amp, (H, W), params, rng) for t in times])
    # 0 dB at a high quantile of the first frame: fixed over the video, so brightness does not flicker
    ref = float(np.quantile(env[0], 0.995))
    video = log_compress(env, params.dynamic_range_db, ref)
    out = {"video": video, "tracks": tracks, "visible": visible, "params": params, "times": times}
    if return_envelope:
        out["envelope"] = env.astype(np.float32)
    return out


def write_phantom_h5(root: str | Path, n_videos: int = 10, seed: int = 0, motion: str = "mixed",
                     amplitude: float | Sequence[float] = (2.0, 10.0), fps: float | Sequence[float] = (25.0, 60.0),
                     density: float | Sequence[float] = (1.0, 4.0), sigma_axial: float | Sequence[float] = (0.8, 1.4),
                     sigma_lateral: float | Sequence[float] = (1.2, 2.2), image_size: Sequence[int] = (256, 256),
                     n_frames: int = 40, n_points: int = 32, pixel_spacing_mm: float = 0.3,
                     progress: bool = True) -> Path:
    """Write ``n_videos`` phantom videos ``phantomNNNN.h5`` in the tracking HDF5 layout under ``root``.

    Video ``i`` depends only on ``(seed, i)`` and the knobs (each a number or a ``(low, high)`` range). Attributes:
    the layout's required ones (``view = "phantom"``, ``ed_frame = 0``, ``es_frame`` = frame of peak motion),
    ``centreline_ordered = False`` (the tracks are scattered points, so GLS is not applicable; no ``gls_reference``)
    and the drawn parameters (``motion``, ``amplitude_px``, ``density``, ``sigma_axial``, ``sigma_lateral``, ...).
    """
    import h5py
    from tqdm import tqdm

    if int(n_videos) < 1:
        raise ValueError(f"phantom: n_videos must be >= 1, got {n_videos}")
    if motion not in MOTIONS:
        raise ValueError(f"phantom: unknown motion {motion!r}; choose one of {MOTIONS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(1, int(n_videos) + 1), desc="phantom HDF5", disable=not progress):
        vseed = int(np.random.SeedSequence([int(seed), i, 16]).generate_state(1)[0])
        p = draw_phantom_params(vseed, motion, amplitude, fps, density, sigma_axial, sigma_lateral)
        sim = simulate_phantom(vseed, p, n_frames=n_frames, image_size=image_size, n_points=n_points)
        s = 0.5 * (1.0 - np.cos(2 * np.pi * p.motion_hz * sim["times"]))
        path = root / f"phantom{i:04d}.h5"
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("video", data=sim["video"], compression="gzip", compression_opts=4)
            f.create_dataset("tracks", data=sim["tracks"])
            f.create_dataset("visible", data=sim["visible"])
            f.attrs.update({"fps": float(p.fps), "pixel_spacing_mm": float(pixel_spacing_mm), "view": "phantom",
                            "ed_frame": 0, "es_frame": int(np.argmax(s)), "patient": f"phantom{i:04d}",
                            "centreline_ordered": False, "motion": p.motion, "amplitude_px": float(p.amplitude),
                            "motion_hz": float(p.motion_hz), "density": float(p.density),
                            "sigma_axial": float(p.sigma_axial), "sigma_lateral": float(p.sigma_lateral),
                            "f0": float(p.f0), "noise_db": float(p.noise_db),
                            "dynamic_range_db": float(p.dynamic_range_db), "seed": int(vseed)})
        tmp.replace(path)  # never leave a half-written file under the final name
    return root


def phantom_training_set(n_videos: int, seed: int = 0, image_size: int | Sequence[int] = (256, 256),
                         n_frames: int = 40, n_points: int = 32, cache_dir: str | Path | None = None) -> Path:
    """A cached folder of ``n_videos`` training phantoms (the default, i.e. training, parameter ranges, mixed motion).

    Deterministic in ``(n_videos, seed, image_size, n_frames, n_points)``, which name the folder under ``cache_dir``
    (default ``common.data.default.cache_root()``, i.e. ``$CARDIAC_DATA_DIR``); generated once, atomically and under a
    lock (:func:`common.data.default.generate_once`): a complete folder is reused, an interrupted generation is
    redone, concurrent processes (``torchrun`` ranks) wait for one writer.
    """
    from common.data.default import cache_root, generate_once

    if int(n_videos) < 1:
        raise ValueError(f"phantom_training_set: n_videos must be >= 1, got {n_videos}")
    size = (int(image_size), int(image_size)) if np.ndim(image_size) == 0 else tuple(int(v) for v in image_size)
    if len(size) != 2:
        raise ValueError(f"phantom_training_set: image_size must be an int or (H, W), got {image_size!r}")
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    root = base / f"phantom-train-n{int(n_videos)}-{size[0]}x{size[1]}-t{int(n_frames)}-p{int(n_points)}-seed{seed}"

    def write(tmp: Path) -> None:
        write_phantom_h5(tmp, n_videos=int(n_videos), seed=int(seed), motion="mixed", image_size=size,
                         n_frames=int(n_frames), n_points=int(n_points), progress=False)

    return generate_once(root, write, f"phantom-train n={n_videos} seed={seed} size={size} frames={n_frames}")


def phantom_training_datalist(n_videos: int, seed: int = 0, image_size: int | Sequence[int] = (256, 256),
                              n_frames: int = 40, n_points: int = 32,
                              cache_dir: str | Path | None = None) -> list[dict]:
    """Datalist entries (as :func:`common.data.tracking.tracking_datalist`) of :func:`phantom_training_set`, for
    appending to a **training** datalist; ``n_videos = 0`` gives ``[]`` (the switch is off).

    Ids are ``phantom/<file stem>`` (their own dataset in reports) and ``split`` is ``"train"``: these videos are
    never meant for validation or test.
    """
    if int(n_videos) < 0:
        raise ValueError(f"phantom_videos must be >= 0, got {n_videos}")
    if int(n_videos) == 0:
        return []
    from common.data.tracking import tracking_datalist

    root = phantom_training_set(n_videos, seed, image_size, n_frames, n_points, cache_dir)
    entries = tracking_datalist(root, split=None)
    for e in entries:
        e["id"] = f"phantom/{e['id']}"
        e["split"] = "train"
    return entries
