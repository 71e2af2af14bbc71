"""The MONAI Label app of this repository: the four bundles for annotators, and training from their corrections.

MONAI Label loads this file (``--app tools/monailabel``) and instantiates the ``MONAILabelApp`` subclass below.
App settings (``--conf <key> <value>``, all optional):

* ``models``: comma-separated models to serve (default ``all``: botm_seg, lssc_multimodal, specknet_tracking,
  adacs_registration);
* ``bundles_dir``: the folder of the bundles (default: this repository's ``bundles/``);
* ``<model>_ckpt_path``: the checkpoint a model's inference loads and its training replaces (default
  ``bundles/<model>/models/model.pt``, where the bundle's own training writes it);
* ``botm_seg_train_images`` / ``lssc_multimodal_train_images``: comma-separated patterns of the image ids that
  model trains on (default ``*``; ``lssc_multimodal`` also skips labelled images that are not CT/MR volumes);
* ``<model>_overrides``: a JSON object of bundle overrides for that model's inference and training, e.g. a smaller
  network matching the checkpoint (``'{"spatial_size": [64, 64]}'``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from tools.monailabel.tasks import (
    AdacsInfer,
    BotmFineTune,
    BotmInfer,
    EntropyStrategy,
    LsscFineTune,
    LsscInfer,
    SpecknetInfer,
    _as_overrides,
    inference_value,
    names_to_labels,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = ("botm_seg", "lssc_multimodal", "specknet_tracking", "adacs_registration")


class CardiacBundlesApp(MONAILabelApp):
    """Serves ``botm_seg``, ``lssc_multimodal``, ``specknet_tracking`` and ``adacs_registration`` (infer) and
    fine-tunes the segmentation bundles ``botm_seg`` and ``lssc_multimodal`` from the datastore's corrected labels
    (train); ``random``, ``first`` (first unlabelled)
    and ``botm_entropy`` (highest mean prediction entropy) strategies pick the next image to annotate."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.bundles_dir = Path(conf.get("bundles_dir") or REPO_ROOT / "bundles").resolve()
        wanted = [m.strip() for m in str(conf.get("models", "all")).split(",") if m.strip()]
        unknown = [m for m in wanted if m != "all" and m not in MODELS]
        if unknown:
            raise ValueError(f"--conf models: unknown model(s) {unknown}; choose from {', '.join(MODELS)} or all")
        self.models = list(MODELS) if "all" in wanted or not wanted else wanted
        self.ckpt_paths = {m: Path(conf.get(f"{m}_ckpt_path") or self.bundles_dir / m / "models" / "model.pt")
                           for m in MODELS}
        self.model_overrides = {m: _as_overrides(conf.get(f"{m}_overrides"), f"{m}_overrides") for m in MODELS}
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="cardiac-bundles",
                         description="Cardiac bundles (BOTM, LSSC, SpeckNet, AdaCS) for annotators", version="0.1.0")

    def init_infers(self) -> dict[str, InferTask]:
        tasks: dict[str, InferTask] = {}
        for m in self.models:
            args = (self.bundles_dir / m, self.ckpt_paths[m], self.model_overrides[m])
            if m == "botm_seg":
                tasks[m] = BotmInfer(*args, labels=names_to_labels(inference_value(*args[::2], "class_names")),
                                     dimension=2, description="Echo LV/Myo/LA segmentation of a frame, or of every "
                                     "frame of a cine (BOTM)")
            elif m == "lssc_multimodal":
                tasks[m] = LsscInfer(*args, labels=names_to_labels(inference_value(*args[::2], "structures")),
                                     dimension=3, description="Whole-heart CT/MR segmentation (LVM, LAC, LVC, AA); "
                                     "modality from the image's metadata or the 'modality' parameter",
                                     config={"modality": ""})
            elif m == "specknet_tracking":
                tasks[m] = SpecknetInfer(*args, labels={"tracked_points": 1}, dimension=2,
                                         description="Speckle tracking of myocardial points through a cine: tracks, "
                                         "GLS and strain curve (JSON), tracked points as a label",
                                         config={"points": "", "query_frame": "", "n_points": ""})
            else:
                tasks[m] = AdacsInfer(*args, labels=self._acdc_labels(), dimension=2,
                                      description="Registration of a pair (e.g. ED -> ES): warped source label and "
                                      "displacement field", config={"target": ""})
        return tasks

    @staticmethod
    def _acdc_labels() -> dict[str, int]:
        # the registration bundle warps whatever label map it is given; its synthetic and ACDC masks use these values
        return {"RV": 1, "Myo": 2, "LV": 3}

    def init_trainers(self) -> dict[str, TrainTask]:
        tasks: dict[str, TrainTask] = {}
        for m, task in (("botm_seg", BotmFineTune), ("lssc_multimodal", LsscFineTune)):
            if m in self.models:
                tasks[m] = task(self.bundles_dir / m, self.ckpt_paths[m], self.model_overrides[m], self.conf,
                                images=self.conf.get(f"{m}_train_images", "*"))
        return tasks

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        if "botm_seg" in self._infers:
            strategies["botm_entropy"] = EntropyStrategy(self._infers["botm_seg"],
                                                         images=self.conf.get("botm_seg_train_images", "*"))
        return strategies

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, after resolving the datastore references the tracking and registration tasks take:
        ``target`` given as an image id becomes its file, and without ``label`` (or ``points``) the image's saved
        label (tag ``label_tag_in``, default ``final``) is used as the query mask / source label; for
        ``lssc_multimodal`` without a ``modality``, the image's datastore info gives it (a ``modality`` set with
        ``PUT /datastore/image/info``, or the DICOM ``Modality`` a DICOMweb datastore records), as for training."""
        request = dict(request)
        ds = datastore if datastore else self.datastore()
        model = request.get("model")
        image_id = request.get("image")
        if model in ("specknet_tracking", "adacs_registration") and isinstance(image_id, str):
            target = request.get("target")
            if target and not os.path.exists(str(target)):
                request["target"] = ds.get_image_uri(str(target))
            if not request.get("label") and not request.get("points") and not os.path.exists(image_id):
                label_id = ds.get_label_by_image_id(image_id, request.get("label_tag_in", "final"))
                if label_id:
                    request["label"] = ds.get_label_uri(label_id, request.get("label_tag_in", "final"))
        if model == "lssc_multimodal" and not request.get("modality") and isinstance(image_id, str) \
                and not os.path.exists(image_id):
            # a DICOMweb datastore converts the series to NIfTI: take the modality from the series' DICOM header
            # (recorded in the image info once the series is fetched; fetching first is cached for the inference)
            ds.get_image_uri(image_id)
            info = ds.get_image_info(image_id) or {}
            modality = str(info.get("modality") or info.get("Modality") or "").strip().lower()
            if modality in ("ct", "mr", "mri"):
                request["modality"] = modality
        return super().infer(request, ds)
