"""Transforms on MONAI base classes: paired-frame spatial transforms (BOTM), video + trajectory transforms and the
impartial-motion augmentation (SpeckNet), image augmentations and severity-graded corruptions.

Conventions: arrays are ``(..., H, W)`` with the spatial axes last; videos are time-major ``(T, H, W)``; points are
``(x, y)`` pixels with x the column and y the row index of a pixel centre. Every random transform draws one parameter
set per sample and applies it to all its keys and frames, honours ``set_random_state`` and composes with MONAI's
``Compose`` (which seeds its members from ``monai.utils.set_determinism``).
"""

from common.transforms.intensity import (
    JPEG_LUMINANCE_TABLE,
    RandBrightnessContrastd,
    RandEmbossd,
    RandJPEGCompressiond,
    RandMotionBlurd,
    RandRelativeGaussianNoised,
    RandSharpend,
    SeverityBlurd,
    SeverityGaussNoised,
    gaussian_blur,
    jpeg_like_compress,
    motion_blur_kernel,
    severity_blur_sigma,
    severity_noise_std,
)
from common.transforms.paired import (
    AffineParams,
    RandPairedAffined,
    SharedAffined,
    paired_frame_augmentation,
    warp_affine,
)
from common.transforms.points import (
    affine_matrix,
    apply_affine_to_points,
    inside_image,
    restore_type,
    to_numpy,
    update_visibility,
)
from common.transforms.video import (
    QueryFramed,
    RandFrameSkipd,
    RandImpartialAffined,
    RandQueryFramed,
    RandReverseSequenced,
    SampleClipd,
    diastasis_frame,
    impartial_motion_augmentation,
    overlapping_segments,
)

__all__ = [
    # points
    "affine_matrix",
    "apply_affine_to_points",
    "inside_image",
    "update_visibility",
    "to_numpy",
    "restore_type",
    # paired / spatial
    "AffineParams",
    "warp_affine",
    "SharedAffined",
    "RandPairedAffined",
    "paired_frame_augmentation",
    # intensity
    "JPEG_LUMINANCE_TABLE",
    "gaussian_blur",
    "motion_blur_kernel",
    "jpeg_like_compress",
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
    # video
    "RandImpartialAffined",
    "RandFrameSkipd",
    "RandReverseSequenced",
    "overlapping_segments",
    "SampleClipd",
    "RandQueryFramed",
    "QueryFramed",
    "diastasis_frame",
    "impartial_motion_augmentation",
]
