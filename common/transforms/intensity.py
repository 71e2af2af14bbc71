"""Image (intensity) augmentations for videos and frame pairs, and severity-graded corruptions for robustness tests.

Every transform works on arrays ``(..., H, W)``: the last two axes are spatial and every leading axis (time, stacked
frames, channels) gets the SAME random parameters, as the impartial-motion training of SpeckNet requires (a clip is
augmented as a whole). Only the noise transforms draw fresh noise per pixel and frame, with one noise level per clip.

Intensity-relative parameters use the value range ``[lo, hi]``: ``value_range`` if given, else the min and max of the
whole array (one range per clip, so frames stay comparable). Augmented values are clipped back into that range so an
8-bit video stays 8-bit and a [-1, 1] video stays in [-1, 1]. Outputs keep each input's type and dtype (integer
outputs are rounded). Grayscale data has no hue or saturation, so the paper's hue/saturation augmentation has no
counterpart here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage
from scipy.fft import dctn, idctn

from common.transforms.points import restore_type, to_numpy

__all__ = [
    "gaussian_blur",
    "motion_blur_kernel",
    "jpeg_like_compress",
    "JPEG_LUMINANCE_TABLE",
    "RandMotionBlurd",
    "RandSharpend",
    "RandEmbossd",
    "RandBrightnessContrastd",
    "RandJPEGCompressiond",
    "RandRelativeGaussianNoised",
    "SeverityBlurd",
    "SeverityGaussNoised",
    "severity_blur_sigma",
    "severity_noise_std",
]

# Luminance quantisation table of the JPEG standard (ITU-T T.81, Annex K, Table K.1), row-major 8x8.
JPEG_LUMINANCE_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)


# ----------------------------------------------------------------------------------------------------------------------
# functional helpers (numpy float in, numpy float out, shape (..., H, W))


def _conv2d_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every ``(H, W)`` slice of ``x`` with ``kernel`` (odd size), replicate padding, same size out."""
    shape = x.shape
    flat = np.asarray(x, dtype=np.float32).reshape(-1, *shape[-2:])
    # mode "nearest" replicates the border: zero padding would darken the borders, a cue networks would learn
    out = ndimage.correlate(flat, np.asarray(kernel, dtype=np.float32)[None], mode="nearest")
    return out.reshape(shape)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of every ``(H, W)`` slice of ``x`` ``(..., H, W)`` (never across frames); replicate borders.

    MONAI's ``GaussianSmooth`` zero-pads, which halves the intensity at the image border; we avoid that here.
    """
    x = np.asarray(x, dtype=np.float32)
    if sigma <= 0:
        return x
    return ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3.0, axes=(-2, -1))


def motion_blur_kernel(length: int, angle_deg: float) -> np.ndarray:
    """Normalised ``(length, length)`` line kernel through the centre at ``angle_deg`` (0 = along x).

    Weights fall off linearly with the perpendicular distance to the line (1 pixel wide), so oblique lines are
    anti-aliased instead of staircased.
    """
    if length < 1 or length % 2 == 0:
        raise ValueError(f"motion_blur_kernel: length must be a positive odd integer, got {length}")
    r = (length - 1) / 2.0
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    a = np.deg2rad(angle_deg)
    along = xx * np.cos(a) + yy * np.sin(a)
    perp = np.abs(-xx * np.sin(a) + yy * np.cos(a))
    k = np.clip(1.0 - perp, 0.0, None) * (np.abs(along) <= r + 0.5)
    return k / k.sum()


def _jpeg_table(quality: int) -> np.ndarray:
    # quality scaling of the Independent JPEG Group's reference encoder, so quality q means what it means in libjpeg
    q = int(np.clip(quality, 1, 100))
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    return np.clip(np.floor((JPEG_LUMINANCE_TABLE * scale + 50.0) / 100.0), 1.0, 255.0)


def jpeg_like_compress(x: np.ndarray, quality: int, lo: float, hi: float) -> np.ndarray:
    """Baseline-JPEG-style lossy round trip of every ``(H, W)`` slice of ``x`` ``(..., H, W)`` (grayscale).

    Maps ``[lo, hi]`` to 8 bits, level-shifts by 128, takes the orthonormal 8x8 block DCT-II (edge-padded to a
    multiple of 8), quantises with the standard luminance table scaled for ``quality`` (1..100, IJG scaling),
    inverts, rounds to 8 bits and maps back. Entropy coding is lossless and therefore omitted. Returns float32.
    """
    if hi <= lo:
        return np.asarray(x, dtype=np.float32)
    shape = x.shape
    h, w = shape[-2:]
    v = (np.asarray(x, dtype=np.float64).reshape(-1, h, w) - lo) * (255.0 / (hi - lo))
    v = np.clip(np.rint(v), 0, 255) - 128.0
    ph, pw = (-h) % 8, (-w) % 8
    v = np.pad(v, ((0, 0), (0, ph), (0, pw)), mode="edge")
    n, hp, wp = v.shape
    blocks = v.reshape(n, hp // 8, 8, wp // 8, 8)
    coef = dctn(blocks, type=2, axes=(2, 4), norm="ortho")
    table = _jpeg_table(quality)[None, None, :, None, :]
    coef = np.rint(coef / table) * table
    rec = idctn(coef, type=2, axes=(2, 4), norm="ortho").reshape(n, hp, wp)[:, :h, :w]
    rec = np.clip(np.rint(rec + 128.0), 0, 255)
    return (rec * ((hi - lo) / 255.0) + lo).reshape(shape).astype(np.float32)


def severity_blur_sigma(severity: float, spatial_size: Sequence[int], sigma_fraction: float = 0.02) -> float:
    """Gaussian blur sigma in pixels for a severity: ``severity * sigma_fraction * min(H, W)``.

    Relative to the image size so a severity means the same loss of detail at any resolution (e.g. 672x672 with the
    default fraction: s = 0.1 -> 1.34 px, 0.3 -> 4.03 px, 0.5 -> 6.72 px).
    """
    return float(severity) * float(sigma_fraction) * float(min(spatial_size))


def severity_noise_std(severity: float, lo: float, hi: float, std_fraction: float = 0.5) -> float:
    """Gaussian noise std for a severity: ``severity * std_fraction * (hi - lo)`` (e.g. s = 0.5 -> 25% of range)."""
    return float(severity) * float(std_fraction) * float(hi - lo)


# ----------------------------------------------------------------------------------------------------------------------
# random augmentations


def _interval(value: float | Sequence[float], name: str, low_bound: float = 0.0) -> tuple[float, float]:
    if np.isscalar(value):
        lo = hi = float(value)  # type: ignore[arg-type]
    else:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    if lo > hi or lo < low_bound:
        raise ValueError(f"{name}: expected (low, high) with {low_bound} <= low <= high, got {value!r}")
    return lo, hi


class _ClipIntensityd(RandomizableTransform, MapTransform):
    """Shared frame of the intensity augmentations: one parameter draw per call, applied to all keys and frames."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float,
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{type(self).__name__}: prob must be in [0, 1], got {prob}")
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        if value_range is not None:
            value_range = tuple(float(v) for v in value_range)
            if len(value_range) != 2 or value_range[1] <= value_range[0]:
                raise ValueError(f"{type(self).__name__}: value_range must be (low, high), got {value_range!r}")
        self.value_range = value_range

    def _draw(self) -> None:
        raise NotImplementedError

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        raise NotImplementedError

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        # draw the parameters even when inactive, so the random stream does not depend on the gate's outcome
        self._draw()

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        if randomize:
            self.randomize()
        if not self._do_transform:
            _ = list(self.key_iterator(d))  # still raise for missing keys
            return d
        for key in self.key_iterator(d):
            x = to_numpy(d[key])
            if x.ndim < 2:
                raise ValueError(f"{type(self).__name__}: {key!r} must be (..., H, W), got shape {x.shape}")
            x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
            lo, hi = self.value_range if self.value_range is not None else (float(x.min()), float(x.max()))
            if hi <= lo:
                continue  # a constant image has no contrast to augment
            y = np.clip(self._apply(x, lo, hi), lo, hi)
            d[key] = restore_type(y.astype(x.dtype, copy=False), d[key])
        return d


class RandMotionBlurd(_ClipIntensityd):
    """Linear motion blur: a line kernel of random odd length in ``kernel_size`` and random direction in [0, 180).

    Args:
        keys: arrays ``(..., H, W)``; all frames share the kernel.
        prob: probability of blurring a sample.
        kernel_size: ``(min, max)`` kernel length in pixels (odd lengths are used; >= 3).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        kernel_size: Sequence[int] = (3, 9),
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        lo, hi = (int(v) for v in _interval(kernel_size, "kernel_size", low_bound=3))
        self.lengths = [k for k in range(lo, hi + 1) if k % 2 == 1]
        if not self.lengths:
            raise ValueError(f"RandMotionBlurd: kernel_size {kernel_size!r} contains no odd length")
        self.kernel = motion_blur_kernel(self.lengths[0], 0.0)

    def _draw(self) -> None:
        length = self.lengths[self.R.randint(len(self.lengths))]
        self.kernel = motion_blur_kernel(length, self.R.uniform(0.0, 180.0))

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return _conv2d_same(x, self.kernel)


class RandSharpend(_ClipIntensityd):
    """Unsharp masking: ``x + amount * (x - gaussian_blur(x, sigma))`` with ``amount`` uniform in ``amount``."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        amount: Sequence[float] = (0.3, 1.0),
        sigma: float = 1.0,
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        self.amount_range = _interval(amount, "amount")
        if sigma <= 0:
            raise ValueError(f"RandSharpend: sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.amount = self.amount_range[0]

    def _draw(self) -> None:
        self.amount = self.R.uniform(*self.amount_range)

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return x + self.amount * (x - gaussian_blur(x, self.sigma))


class RandEmbossd(_ClipIntensityd):
    """Emboss (relief) effect blended with the image.

    The relief is ``mid + strength * d_theta(x)`` with ``d_theta`` the central-difference derivative along a random
    direction ``theta`` and ``mid`` the clip mean (a flat area becomes mid-gray, edges light on one side and dark on
    the other); the output is ``(1 - alpha) * x + alpha * relief``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.2,
        alpha: Sequence[float] = (0.1, 0.4),
        strength: Sequence[float] = (0.5, 1.5),
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        self.alpha_range = _interval(alpha, "alpha")
        if self.alpha_range[1] > 1:
            raise ValueError(f"RandEmbossd: alpha must be within [0, 1], got {alpha!r}")
        self.strength_range = _interval(strength, "strength")
        self.alpha, self.strength, self.theta = self.alpha_range[0], self.strength_range[0], 0.0

    def _draw(self) -> None:
        self.alpha = self.R.uniform(*self.alpha_range)
        self.strength = self.R.uniform(*self.strength_range)
        self.theta = self.R.uniform(0.0, 2.0 * np.pi)

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        dx = np.array([[0.0, 0.0, 0.0], [-0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
        kernel = np.cos(self.theta) * dx + np.sin(self.theta) * dx.T
        relief = float(x.mean()) + self.strength * _conv2d_same(x, kernel)
        return (1.0 - self.alpha) * x + self.alpha * relief


class RandBrightnessContrastd(_ClipIntensityd):
    """``(x - mean) * c + mean + b * (hi - lo)`` with ``c`` in ``1 ± contrast`` and ``b`` in ``± brightness``.

    Contrast pivots on the clip mean so it does not also shift the brightness.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        brightness: float = 0.2,
        contrast: float = 0.2,
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(
                f"RandBrightnessContrastd: need brightness >= 0 and 0 <= contrast < 1, got {brightness}, {contrast}"
            )
        self.brightness_limit, self.contrast_limit = float(brightness), float(contrast)
        self.brightness, self.contrast = 0.0, 1.0

    def _draw(self) -> None:
        self.brightness = self.R.uniform(-self.brightness_limit, self.brightness_limit)
        self.contrast = 1.0 + self.R.uniform(-self.contrast_limit, self.contrast_limit)

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        mean = float(x.mean())
        return (x - mean) * self.contrast + mean + self.brightness * (hi - lo)


class RandJPEGCompressiond(_ClipIntensityd):
    """JPEG-like compression artefacts (:func:`jpeg_like_compress`) at a random integer quality in ``quality``."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        quality: Sequence[int] = (20, 90),
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        self.quality_range = tuple(int(q) for q in _interval(quality, "quality", low_bound=1))
        if self.quality_range[1] > 100:
            raise ValueError(f"RandJPEGCompressiond: quality must be within [1, 100], got {quality!r}")
        self.quality = self.quality_range[0]

    def _draw(self) -> None:
        self.quality = int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return jpeg_like_compress(x, self.quality, lo, hi)


class RandRelativeGaussianNoised(_ClipIntensityd):
    """Additive Gaussian noise with std uniform in ``std`` times ``(hi - lo)``; fresh noise for every pixel/frame.

    Unlike MONAI's ``RandGaussianNoised`` the level is relative to the data range, so the same setting suits 8-bit
    and normalised videos.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        std: Sequence[float] = (0.01, 0.05),
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, value_range, allow_missing_keys)
        self.std_range = _interval(std, "std")
        self.std, self.noise_seed = self.std_range[0], 0

    def _draw(self) -> None:
        self.std = self.R.uniform(*self.std_range)
        # a seed rather than the noise itself: the array shape is only known when the data arrives
        self.noise_seed = int(self.R.randint(0, 2**31 - 1))

    def _apply(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        rng = np.random.default_rng(self.noise_seed)
        return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.std * (hi - lo))


# ----------------------------------------------------------------------------------------------------------------------
# severity-graded corruptions (evaluation, BOTM Table 4)


def _check_severity(severity: float) -> float:
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must be in [0, 1] (0.1, 0.3, 0.5 in the BOTM study), got {severity}")
    return float(severity)


class SeverityBlurd(MapTransform):
    """Deterministic Gaussian blur whose sigma grows with ``severity`` (see :func:`severity_blur_sigma`).

    Blurs each ``(H, W)`` slice of ``(..., H, W)`` separately (never across frames). Apply to image keys only.

    Args:
        keys: image keys ``(..., H, W)``.
        severity: in [0, 1]; 0 is the identity.
        sigma_fraction: sigma in pixels per unit severity, as a fraction of ``min(H, W)``.
    """

    def __init__(
        self, keys: KeysCollection, severity: float, sigma_fraction: float = 0.02, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.severity = _check_severity(severity)
        if sigma_fraction <= 0:
            raise ValueError(f"SeverityBlurd: sigma_fraction must be > 0, got {sigma_fraction}")
        self.sigma_fraction = float(sigma_fraction)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = to_numpy(d[key])
            sigma = severity_blur_sigma(self.severity, x.shape[-2:], self.sigma_fraction)
            if sigma > 0:
                d[key] = restore_type(gaussian_blur(x, sigma), d[key])
        return d


class SeverityGaussNoised(RandomizableTransform, MapTransform):
    """Additive Gaussian noise whose std grows with ``severity`` (see :func:`severity_noise_std`).

    The std uses the sample's own range ``max - min`` unless ``value_range`` is given; the output is not clipped
    (as TorchIO's ``RandomNoise`` used in the BOTM study), except by an integer dtype. Noise is drawn per pixel and
    frame from the transform's random state, so ``set_random_state`` makes an evaluation reproducible.
    """

    def __init__(
        self,
        keys: KeysCollection,
        severity: float,
        std_fraction: float = 0.5,
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, 1.0)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.severity = _check_severity(severity)
        if std_fraction <= 0:
            raise ValueError(f"SeverityGaussNoised: std_fraction must be > 0, got {std_fraction}")
        self.std_fraction = float(std_fraction)
        self.value_range = tuple(float(v) for v in value_range) if value_range is not None else None
        self.noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.noise_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping, randomize: bool = True) -> dict:
        d = dict(data)
        if randomize:
            self.randomize()
        rng = np.random.default_rng(self.noise_seed)
        for key in self.key_iterator(d):
            x = to_numpy(d[key]).astype(np.float32)
            lo, hi = self.value_range if self.value_range is not None else (float(x.min()), float(x.max()))
            std = severity_noise_std(self.severity, lo, hi, self.std_fraction)
            if std > 0:
                d[key] = restore_type(x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std), d[key])
        return d
