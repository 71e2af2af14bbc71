"""A bundle's own inference pieces, in-process: the network, checkpoint, preprocessing, inferer and
post-processing exactly as the bundle's ``configs/inference.json`` defines them.

:class:`BundleModel` parses ``inference.json`` (+ ``metadata.json`` for the name and version) with
``monai.bundle.ConfigParser``, applies overrides (``ckpt_path``, ``device``, ``spatial_size``,
``network_def#...``, ...), builds ``network``, loads the checkpoint the way the bundle's ``CheckpointLoader``
does (``{"model": state_dict}`` or a bare state dict, weights only) and runs ``preprocessing`` -> ``inferer`` ->
``postprocessing`` on one input file. The post-processing's file writers (transforms whose class name starts with
``Save``) are left out: the PACS path encodes the result as DICOM instead; everything before them (e.g. the
per-frame argmax) runs unchanged, so the masks equal what ``python -m monai.bundle run --config_file
inference.json`` writes for the same file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BUNDLES_DIR", "BundleModel"]

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


class BundleModel:
    """One bundle loaded for inference (see the module docstring).

    Args:
        bundle: a folder name under ``bundles/`` (``botm_seg``) or a bundle folder path.
        ckpt_path: the ``model.pt``; default: the bundle's ``ckpt_path`` (``models/model.pt``).
        device: ``"cpu"``, ``"cuda:0"``, ...; default: the bundle's choice (CUDA when available).
        overrides: more config ids and values (``{"spatial_size": [64, 64], "network_def#depths": [1, 1, 1, 1]}``).
    """

    def __init__(self, bundle: str | Path, ckpt_path: str | None = None, device: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        from monai.bundle import ConfigParser

        root = Path(bundle) if Path(str(bundle)).is_dir() else BUNDLES_DIR / str(bundle)
        cfg = root / "configs" / "inference.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"bundle {bundle!r}: {cfg} not found (known bundles: "
                                    f"{sorted(p.name for p in BUNDLES_DIR.iterdir() if p.is_dir())})")
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        self.name = root.name
        self.version = str(meta.get("version", "0"))
        self.root = root
        parser = ConfigParser()
        parser.read_config(str(cfg))
        parser["bundle_root"] = str(root)
        updates = dict(overrides or {})
        if ckpt_path:
            updates["ckpt_path"] = str(ckpt_path)
        if device:
            updates["device"] = f"$torch.device('{device}')"
        for k, v in updates.items():
            # a new nested key (``network_def#depths``) is fine as long as its parent exists: MONAI's own CLI
            # accepts the same overrides
            if k not in parser and k.rsplit("#", 1)[0] not in parser:
                raise KeyError(f"bundle {self.name}: override key {k!r} is not in {cfg.name}")
            parser[k] = v
        self.parser = parser
        self.device = parser.get_parsed_content("device")
        self.ckpt_path = Path(str(parser.get_parsed_content("ckpt_path")))
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"bundle {self.name}: checkpoint {self.ckpt_path} not found (train the bundle, "
                                    "or pass --ckpt)")
        self.network = parser.get_parsed_content("network")
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        # the bundles' CheckpointLoader uses load_dict {"model": network}: accept that or a bare state dict
        state = state.get("model", state) if isinstance(state, dict) else state
        self.network.load_state_dict(state)
        self.network.eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        # adacs_registration has no post-processing (its writer handler resamples the displacement)
        post = parser.get_parsed_content("postprocessing") if "postprocessing" in parser else None
        transforms = [] if post is None else list(getattr(post, "transforms", [post]))
        self.postprocessing = [t for t in transforms if not type(t).__name__.startswith("Save")]
        self.class_names = list(parser.get_parsed_content("class_names")) if "class_names" in parser else []

    def predict(self, path: str | Path | Mapping[str, Any], timings: dict[str, float] | None = None,
                **infer_kwargs: Any) -> tuple[np.ndarray, dict]:
        """Run the bundle on one input file: ``(prediction as a NumPy array, data dict after post-processing)``.
        For botm_seg the prediction is ``(T, H, W)`` uint8 class ids in the file's frame order and pixel grid.
        ``timings`` (if given) receives ``decode`` (reading + preprocessing) and ``model`` (inferer +
        post-processing) seconds. ``path`` may also be a whole input entry (``{"source": ..., "target": ...}`` for
        adacs_registration); ``infer_kwargs`` go to the inferer (``modality="ct"`` for lssc_multimodal)."""
        t0 = time.perf_counter()
        data = self.preprocessing(dict(path) if isinstance(path, Mapping) else {"image": str(path)})
        t1 = time.perf_counter()
        with torch.no_grad():
            pred = self.inferer(torch.as_tensor(data["image"])[None].to(self.device), self.network, **infer_kwargs)
        data["pred"] = pred[0].detach().cpu()
        for t in self.postprocessing:
            data = t(data)
        out = data["pred"]
        if timings is not None:
            timings["decode"] = timings.get("decode", 0.0) + t1 - t0
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t1
        return np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out), data
