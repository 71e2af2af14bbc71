"""Registration inference: the network's displacement on the input grid and the writer of per-pair predictions.

Split out of :mod:`common.engines.registration` (training) by job; its names are re-exported there, so configs keep
using ``common.engines.registration.RegistrationInferenceWriter``. The small warp/batch helpers here are shared with
:mod:`common.engines.registration_eval`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common.data.io import DataError
from common.engines.registration import unwrap
from common.metrics.registration import nonpositive_jacobian_percent, warp_mask

__all__ = ["RegistrationInferenceWriter", "displacement_on_grid"]


# ---------------------------------------------------------------------- shared by evaluation and inference
_WARPERS: dict[str, Any] = {}


def _warp_image(image: Tensor, displacement: Tensor) -> Tensor:
    """Bilinear pull-back warp with zeros outside (the estimators' convention) on one shared MONAI ``Warp``."""
    if "bilinear" not in _WARPERS:
        from monai.networks.blocks.warp import Warp

        with warnings.catch_warnings():
            # MONAI announces its PyTorch resampler on construction
            warnings.filterwarnings("ignore", message="monai.networks.blocks.Warp: Using PyTorch native grid_sample",
                                    category=UserWarning)
            _WARPERS["bilinear"] = Warp(mode="bilinear", padding_mode="zeros")
    return _WARPERS["bilinear"](image.float(), displacement.float().to(image.device))


def _batch_items(engine) -> list[dict]:
    """``engine.state.batch`` as one dict per pair (MONAI decollates it after the forward when ``decollate=True``)."""
    from monai.data import decollate_batch

    batch = engine.state.batch
    if isinstance(batch, list):
        return batch
    return decollate_batch(batch, detach=True)


def _plain(t: Any) -> Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


# ------------------------------------------------------------------------------------------------- inference
def displacement_on_grid(displacement: Tensor, shape: Sequence[int]) -> Tensor:
    """The network's displacement ``(n, *net)`` (pixels of its grid, ``n`` = 2 or 3 spatial dims) on an input grid
    ``shape``: ``(1, n, *shape)`` in pixels of that grid (bi/trilinear, ``align_corners=False`` like the input
    resize, channel ``k`` scaled by ``shape[k] / net[k]``). Used by :class:`RegistrationInferenceWriter`, the 3D
    evaluation and the PACS path so all report the same."""
    import torch.nn.functional as F

    ddf = displacement.detach().float().cpu()[None]
    n = ddf.shape[1]
    target = tuple(int(s) for s in shape)
    if len(target) != n or ddf.ndim != n + 2:
        raise ValueError(f"displacement {tuple(displacement.shape)} does not fit a {len(target)}D grid {target}")
    net = tuple(ddf.shape[2:])
    if net != target:
        ddf = F.interpolate(ddf, size=target, mode="bilinear" if n == 2 else "trilinear", align_corners=False)
        ddf = ddf * torch.tensor([t / s for t, s in zip(target, net)]).view(1, n, *([1] * n))
    return ddf


class RegistrationInferenceWriter:
    """Write each registered pair on the input grid: ``<name>_warped``, ``<name>_disp``, ``<name>_warped_mask`` (and
    ``<name>_score``).

    The network's displacement (pixels of its ``h x w [x d]`` grid) is resampled onto the input ``H x W [x D]`` grid
    (bi/trilinear, ``align_corners=False`` like the input resize) and scaled by ``H / h``, ``W / w`` [, ``D / d``]; the
    original source image (its own intensities) and, when given, its mask or label map (one-hot linear warp, labels
    kept) are warped with it. Files are NIfTI with the target image's affine; the displacement is stored
    channel-last ``(H, W[, D], n)`` in voxels of the input grid, channel ``k`` along array axis ``k``, pull-back
    ``warped(x) = source(x + disp(x))`` (the layout of the repository's registration pairs). 2D and 3D pairs alike
    (the dimension is the displacement's). ``inference_summary.json`` lists the files and each pair's folding %.

    With ``scoring_network`` (AdaCS's ``ScoringNet``) and a ``scoring_checkpoint`` holding its trained weights (the
    ``auxiliary`` entry of the training checkpoint), ``<name>_score.nii.gz`` is the score map ``Ŝ = g(target)``
    (float32 in [0, 1], low where correspondence is lost) resampled onto the input grid (bi/trilinear). A missing
    or non-matching checkpoint only logs a warning: the score map is an extra, the registration does not need it.

    Args:
        output_dir: output folder (created).
        ledger: a :class:`common.engines.screening.BatchLedger`: a pair whose outputs cannot be written is recorded
            there (stage ``writing``) and the run goes on; written pairs are recorded with their files. Without it,
            a writing error stops the run.
        scoring_network: the scoring net definition (``None``: no score map).
        scoring_checkpoint: training checkpoint (``checkpoint.pt``) with the ``auxiliary`` weights.
    """

    def __init__(self, output_dir: str, ledger: Any = None, scoring_network: nn.Module | None = None,
                 scoring_checkpoint: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.ledger = ledger
        self.records: list[dict] = []
        self.scoring_network = scoring_network
        self.scoring_checkpoint = scoring_checkpoint
        self._scoring: nn.Module | None | bool = False  # False: not loaded yet; None: no usable scoring net

    def _scorer(self, logger: Any) -> nn.Module | None:
        """The scoring net with its trained weights (loaded once), or None with one warning saying why."""
        if self._scoring is not False:
            return self._scoring
        self._scoring = None
        if self.scoring_network is None:
            return None
        path = Path(self.scoring_checkpoint) if self.scoring_checkpoint else None
        if path is None or not path.is_file():
            logger.warning(f"training checkpoint {path} not found: no score maps are written")
            return None
        net = unwrap(self.scoring_network)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["auxiliary"])
        except (KeyError, RuntimeError, TypeError) as e:  # e.g. a model trained without AdaCS has no scoring net
            logger.warning(f"{path}: no scoring-net weights usable for the score map ({type(e).__name__}: {e}); "
                           "no score maps are written")
            return None
        self._scoring = net.cpu().eval()
        return self._scoring

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def __call__(self, engine) -> None:
        from common.engines.screening import describe_error

        outputs = engine.state.output
        if not outputs:
            return  # a pair that failed before (recorded by common.engines.screening.CaseGuard)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        items = _batch_items(engine)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        scorer = self._scorer(engine.logger)
        for item, out in zip(items, outputs):
            try:
                rec = self._write_pair(item, out, scorer)
            except Exception as e:  # one pair's writing failure (e.g. a bad mask file) is its own
                if self.ledger is None or self.ledger.strict:
                    raise
                self.ledger.fail(str(item["source"]), describe_error(e), "writing")
                continue
            self.records.append(rec)
            if self.ledger is not None:
                self.ledger.succeed(str(item["source"]), {k: v for k, v in rec.items() if k != "source"})
            engine.logger.info(f"{rec['pair']}: wrote {rec['warped']}")

    def _write_pair(self, item: dict, out: dict, scorer: nn.Module | None = None) -> dict:
        """Write one pair's warped image, displacement (warped mask, score map); its summary record."""
        import torch.nn.functional as F

        from common.data.io import write_nifti
        from common.data.loading import write_like
        from common.data.pairs import read_pair_image

        source, target, mask_path = item["source"], item["target"], item.get("source_mask") or ""
        pred = _plain(out["pred"])
        n = int(pred.shape[0])  # spatial dims of the model: its displacement has one channel per axis
        src, _, _ = read_pair_image(source, n)
        _, affine, _ = read_pair_image(target, n)
        ddf = displacement_on_grid(pred, src.shape)
        warped = _warp_image(torch.from_numpy(src)[None, None], ddf)[0, 0].numpy()
        name = str(item["name"])
        rec = {"pair": name, "source": str(source), "target": str(target),
               # on the target's own grid: its shape and affine (a NIfTI target also passes on its header)
               "warped": str(write_like(self.output_dir / f"{name}_warped.nii.gz", warped, reference=target)),
               "displacement": str(write_nifti(self.output_dir / f"{name}_disp.nii.gz",
                                               np.ascontiguousarray(ddf[0].movedim(0, -1).numpy()), affine)),
               "nonpositive_jacobian_percent": float(nonpositive_jacobian_percent(ddf)[0]),
               "mean_displacement_pixels": float(ddf.norm(dim=1).mean())}
        if mask_path:
            mask, _, _ = read_pair_image(mask_path, n)
            if mask.shape != src.shape:
                raise DataError(f"{mask_path}: mask shape {mask.shape} differs from source {src.shape}")
            labels = torch.from_numpy(np.rint(mask).astype(np.int64))[None, None]
            if int(labels.min()) < 0:
                raise DataError(f"{mask_path}: mask has negative labels")
            wm = warp_mask(labels, ddf)[0, 0].numpy().astype(np.uint8)
            rec["warped_mask"] = str(write_like(self.output_dir / f"{name}_warped_mask.nii.gz", wm, reference=target))
        if scorer is not None:
            with torch.no_grad():  # Ŝ = g(I_t) on the network grid (the normalised target), then onto the input grid
                score = scorer(_plain(item["image"])[1:2][None].float().cpu())
            score = F.interpolate(score, size=tuple(src.shape), mode="bilinear" if n == 2 else "trilinear",
                                  align_corners=False)[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)
            rec["score_map"] = str(write_like(self.output_dir / f"{name}_score.nii.gz", score, reference=target))
        return rec

    def _completed(self, engine) -> None:
        from common.engines.handlers import write_json_atomic

        path = write_json_atomic(self.output_dir / "inference_summary.json", {"pairs": self.records})
        engine.logger.info(f"{len(self.records)} pair(s) registered; summary {path}")

