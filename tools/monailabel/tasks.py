"""MONAI Label tasks that run this repository's bundles: infer (all four) and train (the segmentation bundles).

Infer: :class:`BundleWorkflowInfer` is a MONAI Label ``BasicInferTask`` whose pipeline is the bundle's own
``configs/inference.json`` workflow (its network, pre-processing, inferer, post-processing, checkpoint loader and
writer), run on the one requested image through ``monai.bundle.ConfigWorkflow`` with overrides (``input_path``,
``ckpt_path``, ``output_dir``, ``device`` and the app's per-model overrides). Nothing of a bundle is re-implemented
here: each subclass only turns the request into bundle overrides and the bundle's written outputs into MONAI Label's
``(label file, result JSON)``. The label the viewer receives is the file the bundle wrote, so it has the image's
shape and geometry and equals the bundle's own inference output.

Train: :class:`BundleFineTune` is MONAI Label's ``BundleTrainTask`` on the bundle's ``configs/train.json`` (same
loss, optimiser, transforms and checkpointing), with the datastore's labelled images as the training and validation
data, starting from the current checkpoint; the validation's key-metric checkpoint (``model.pt``) then replaces the
infer task's checkpoint, which the infer task reads on every request, so the next ``/infer`` uses it.
:class:`LsscFineTune` does the same for ``lssc_multimodal``: the labelled CT and MR volumes become the two unpaired
training sets of the bundle's trainer (one modality alone trains as the bundle's single-modality loss).
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import gzip
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask
from monailabel.utils.others.generic import device_list

__all__ = [
    "AdacsInfer",
    "BotmFineTune",
    "BotmInfer",
    "BundleFineTune",
    "BundleWorkflowInfer",
    "EntropyStrategy",
    "LsscFineTune",
    "LsscInfer",
    "SpecknetInfer",
    "image_modality",
    "inference_value",
    "lssc_label_convention",
    "names_to_labels",
    "render_points",
    "run_bundle_workflow",
]

logger = logging.getLogger(__name__)


def run_bundle_workflow(config_file: str | Path, overrides: Mapping[str, Any]) -> None:
    """Run a bundle config (``initialize`` -> ``run`` -> ``finalize``) in this process with ``overrides``.

    This is what ``python -m monai.bundle run --config_file <file> --<key> <value> ...`` does; ``strict`` inference
    makes a bad input raise (naming it) instead of being listed in ``failed_inputs.json``.
    """
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(config_file), workflow_type="infer", **dict(overrides))
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()


def inference_value(bundle_dir: str | Path, overrides: Mapping[str, Any] | None, key: str) -> Any:
    """The value of ``key`` in a bundle's ``inference.json`` with ``overrides`` applied (e.g. its class names)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_dir) / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_dir), **{k: v for k, v in (overrides or {}).items() if "#" not in k}})
    return parser.get_parsed_content(key)


def names_to_labels(names: Sequence[str]) -> dict[str, int]:
    """Foreground class names in label order -> ``{name: value}`` (1, 2, ...), background 0 left out."""
    return {str(n): i for i, n in enumerate(names, start=1)}


def _as_overrides(value: Any, name: str) -> dict[str, Any]:
    """Per-model bundle overrides given to the app (``--conf <model>_overrides '<JSON object>'``)."""
    if value in (None, ""):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(str(value))
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf {name}: not a JSON object of bundle overrides ({e}): {value!r}") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"--conf {name}: expected a JSON object of bundle overrides, got {type(parsed).__name__}")
    return parsed


def _client_error(model: str, error: BaseException) -> Exception:
    """The error a viewer shows: the innermost cause's message (MONAI wraps a failing config expression in
    "Failed to evaluate ..."), as HTTP 400 for a bad input or a missing checkpoint, else 500."""
    from common.data.io import DataError

    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    bad_input = isinstance(root, (DataError, FileNotFoundError, ValueError))
    return HTTPException(status_code=400 if bad_input else 500, detail=f"{model}: {type(root).__name__}: {root}")


def _nifti_b64(path: str | Path) -> str:
    """A NIfTI file as base64 text of its gzip bytes (so a JSON result can carry a second image)."""
    data = Path(path).read_bytes()
    if not str(path).endswith(".gz"):
        data = gzip.compress(data)
    return base64.b64encode(data).decode("ascii")


class BundleWorkflowInfer(BasicInferTask):
    """A MONAI Label infer task that runs a bundle's ``inference.json`` on the requested image.

    Args:
        bundle_dir: the bundle folder (``bundles/<name>``).
        ckpt_path: the ``model.pt`` the bundle's ``CheckpointLoader`` loads (read on every request, so a checkpoint
            written by training is used by the next request).
        overrides: bundle overrides applied to every request (e.g. a smaller network that matches ``ckpt_path``).
        labels: ``{name: value}`` of the returned label map.
        dimension: 2 or 3 (what MONAI Label clients show).
        description: shown in the viewers' model list.
        infer_type: MONAI Label's infer type (``segmentation``, ...).
        config: request parameters offered to clients, with their defaults.
    """

    #: request parameters (besides ``image``/``device``) a subclass turns into bundle overrides
    request_params: Sequence[str] = ()

    def __init__(self, bundle_dir: str | Path, ckpt_path: str | Path, overrides: Mapping[str, Any] | None = None,
                 labels: Mapping[str, int] | None = None, dimension: int = 2, description: str = "",
                 infer_type: str = InferType.SEGMENTATION, config: Mapping[str, Any] | None = None) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.config_file = self.bundle_dir / "configs" / "inference.json"
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.bundle_dir}: no configs/inference.json (is this a bundle folder?)")
        self.ckpt_path = Path(ckpt_path).resolve()
        self.overrides = dict(overrides or {})
        meta = json.loads((self.bundle_dir / "configs" / "metadata.json").read_text())
        super().__init__(path=str(self.ckpt_path), network=None, type=infer_type,
                         labels=dict(labels or {}),
                         dimension=dimension, description=description or meta.get("description", ""),
                         config={"device": device_list(), **dict(config or {})})
        self.version = meta.get("version")

    # MONAI Label lists a model only when it is valid; a bundle without a checkpoint is still listed (the viewer
    # shows it, and a segmentation bundle can be trained from labels) and its inference fails naming the checkpoint
    def is_valid(self) -> bool:
        return self.config_file.is_file()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update({"version": self.version, "bundle": str(self.bundle_dir), "checkpoint": str(self.ckpt_path),
                     "checkpoint_exists": self.ckpt_path.is_file()})
        return info

    # the bundle's own pipeline runs in __call__; these abstract hooks of BasicInferTask are not used
    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        return []

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return []

    def bundle_overrides(self, request: dict[str, Any], work_dir: Path) -> dict[str, Any]:
        """Request -> bundle overrides (besides input/checkpoint/output/device); subclasses add their parameters."""
        return {}

    def collect(self, request: dict[str, Any], out_dir: Path, work_dir: Path) -> tuple[str | None, dict[str, Any]]:
        """The bundle's outputs in ``out_dir`` -> ``(label file, result JSON)``. ``work_dir`` (holding ``out_dir``)
        is deleted after the call: the label file must be moved out (:meth:`_keep`); MONAI Label deletes it once
        it is sent."""
        raise NotImplementedError

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str | None, dict[str, Any]]:
        begin = time.time()
        req = copy.deepcopy(self._config)
        req.update(request)
        image = req.get("image")
        if not isinstance(image, str) or not os.path.exists(image):
            raise FileNotFoundError(f"{self.bundle_dir.name}: image {image!r} not found")
        device = req.get("device") or "cpu"
        if isinstance(device, (list, tuple)):  # the choices offered to clients; the first is the default
            device = device[0] if device else "cpu"
        device = str(device)
        # one folder per request: the bundle writes there; the returned label is moved out before it is deleted
        work_dir = Path(tempfile.mkdtemp(prefix=f"cardiac-label-{self.bundle_dir.name}-"))
        out_dir = work_dir / "out"
        overrides = {"bundle_root": str(self.bundle_dir), "ckpt_path": str(self.ckpt_path), "output_dir": str(out_dir),
                     "input_path": image, "strict": True, **self.overrides,
                     **self.bundle_overrides(req, work_dir),
                     "device": f"$torch.device({device!r})"}
        logger.info(f"{self.bundle_dir.name}: running {self.config_file} on {image}")
        try:
            if not self.ckpt_path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {self.ckpt_path} not found: train the bundle (its train.json, or POST "
                    f"/train/{self.bundle_dir.name} after saving labels, where offered) or start the server with "
                    f"--conf {self.bundle_dir.name}_ckpt_path=<model.pt>")
            run_bundle_workflow(self.config_file, overrides)
            label, result = self.collect(req, out_dir, work_dir)
        except Exception as e:
            raise _client_error(self.bundle_dir.name, e) from e
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        result.update({"label_names": self.labels, "bundle": self.bundle_dir.name, "checkpoint": str(self.ckpt_path),
                       "latencies": {"total": round(time.time() - begin, 2)}})
        return label, result

    @staticmethod
    def _keep(path: str | Path, work_dir: Path | None = None) -> str:
        """Move a bundle output out of the request's folder (deleted after the request) to a temporary file."""
        name = Path(path).name
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        fd, dest = tempfile.mkstemp(prefix=name[: -len(suffix)] + "-", suffix=suffix)
        os.close(fd)
        shutil.move(str(path), dest)
        return dest


class BotmInfer(BundleWorkflowInfer):
    """``botm_seg``: a 2D frame -> an LV/Myo/LA label; a 2D+t cine -> a label per frame (the bundle pairs the frames
    as it does itself: a frame with itself, consecutive frames cyclically in a sequence)."""

    def bundle_overrides(self, request: dict[str, Any], work_dir: Path) -> dict[str, Any]:
        wanted = str(request.get("uncertainty", "")).strip().lower() in ("1", "true", "yes")
        return {"save_png": False, "save_uncertainty": wanted}

    def collect(self, request: dict[str, Any], out_dir: Path, work_dir: Path) -> tuple[str | None, dict[str, Any]]:
        cases = json.loads((out_dir / "predictions.json").read_text())["cases"]
        case = cases[0]
        label = self._keep(case["masks"][0], work_dir)
        result = {"n_frames": case["n_frames"], "area_mm2": case["area_mm2"], "spacing_mm": case["spacing_mm"]}
        if case.get("uncertainty"):
            import nibabel as nib

            # the bundle's normalised softmax entropy (0 certain .. 1 uniform), averaged over the image
            result["mean_entropy"] = float(np.mean(np.asarray(nib.load(case["uncertainty"][0]).dataobj)))
        return label, result


class EntropyStrategy(Strategy):
    """Epistemic active learning for ``botm_seg``: the unlabelled image (matching ``images`` patterns) whose
    prediction has the highest mean normalised softmax entropy (the bundle's own uncertainty map) is annotated next.
    Each call runs the model on up to ``max_images`` unlabelled images (sorted by id), so it suits small datastores.
    """

    def __init__(self, task: BotmInfer, images: str = "*", max_images: int = 20) -> None:
        super().__init__("Highest mean prediction entropy (botm_seg)")
        self.task = task
        self.images = images or "*"
        self.max_images = int(max_images)

    def __call__(self, request: Mapping[str, Any], datastore: Any) -> dict[str, Any] | None:
        patterns = [p.strip() for p in str(request.get("images") or self.images).split(",") if p.strip()]
        ids = sorted(i for i in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
                     if any(fnmatch.fnmatch(i, p) for p in patterns))[: self.max_images]
        scores = {}
        for image_id in ids:
            label, result = self.task({"image": datastore.get_image_uri(image_id), "uncertainty": True,
                                       "device": request.get("device", "cpu")})
            if label and os.path.exists(label):
                os.unlink(label)
            scores[image_id] = result["mean_entropy"]
        if not scores:
            return None
        best = max(scores, key=lambda k: scores[k])
        logger.info(f"entropy strategy: {best} (mean entropy {scores[best]:.4f} of {len(scores)} images)")
        return {"id": best, "mean_entropy": scores[best], "scores": scores}


class LsscInfer(BundleWorkflowInfer):
    """``lssc_multimodal``: a CT or MR volume -> LVM/LAC/LVC/AA labels. The modality comes from the image's metadata
    (DICOM ``Modality``, or a ``ct_``/``mr_`` file name) as in the bundle, or from the request's ``modality``."""

    request_params = ("modality",)

    def bundle_overrides(self, request: dict[str, Any], work_dir: Path) -> dict[str, Any]:
        modality = str(request.get("modality") or "").strip().lower()
        return {"modality": modality} if modality else {}

    def collect(self, request: dict[str, Any], out_dir: Path, work_dir: Path) -> tuple[str | None, dict[str, Any]]:
        preds = sorted((out_dir / "predictions").glob("*_seg.nii*"))
        if len(preds) != 1:
            raise RuntimeError(f"lssc_multimodal wrote {len(preds)} predictions for {request['image']}, expected 1")
        ledger = out_dir / "inference_summary.json"
        result: dict[str, Any] = {"modality": request.get("modality") or "from metadata"}
        if ledger.is_file():
            result["summary"] = json.loads(ledger.read_text())
        return self._keep(preds[0], work_dir), result


class SpecknetInfer(BundleWorkflowInfer):
    """``specknet_tracking``: a cine plus query points (request ``points``: ``[[x, y], ...]`` in pixels of the
    frames, with ``query_frame``) or a myocardium label at the query frame (request ``label``: a mask file, e.g. the
    image's saved label or a ``botm_seg`` result) -> tracks, GLS and the strain curve (JSON) and a label map with the
    tracked points drawn as small disks (value 1) on every frame, for viewers that only show labels."""

    request_params = ("points", "query_frame", "label", "n_points")

    def bundle_overrides(self, request: dict[str, Any], work_dir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"save_png": False}
        points = request.get("points")
        if isinstance(points, str) and points.strip():
            points = json.loads(points)
        query_frame = request.get("query_frame")
        if points:
            qp = work_dir / "query_points.json"
            body: dict[str, Any] = {"points": points}
            if query_frame not in (None, ""):
                body["query_frame"] = int(query_frame)
            qp.write_text(json.dumps(body))
            out.update({"query_points_path": str(qp), "query_source": "points"})
        elif request.get("label"):
            out.update({"mask_path": str(request["label"]), "query_source": "mask"})
        if query_frame not in (None, ""):
            out["query_frame"] = int(query_frame)
        if request.get("n_points") not in (None, ""):
            out["n_points"] = int(request["n_points"])
        return out

    def collect(self, request: dict[str, Any], out_dir: Path, work_dir: Path) -> tuple[str | None, dict[str, Any]]:
        from common.data.io import read_image
        from common.data.loading import from_frames, write_like

        found = sorted((out_dir / "predictions").rglob("*_tracks.json"))
        if len(found) != 1:
            raise RuntimeError(f"specknet_tracking wrote {len(found)} track files for {request['image']}, expected 1")
        payload = json.loads(found[0].read_text())
        payload.pop("files", None)
        tracks = np.asarray(payload["tracks"], dtype=np.float64)  # (T, N, 2) (x, y) pixels
        h, w = (int(s) for s in payload["image_size_hw"])
        shape = tuple(int(s) for s in read_image(request["image"]).array.shape)
        frames = render_points(tracks, (h, w), radius=max(1.0, 0.01 * max(h, w)))
        label = write_like(work_dir / f"{Path(found[0]).name[: -len('_tracks.json')]}_tracked_points.nii.gz",
                           from_frames(frames, shape), reference=request["image"], dtype=np.uint8)
        return self._keep(label), payload


def render_points(tracks: np.ndarray, size_hw: tuple[int, int], radius: float = 1.5) -> np.ndarray:
    """``(T, H, W)`` uint8 label map with a disk of ``radius`` pixels (value 1) around every tracked point.

    ``tracks`` is ``(T, N, 2)`` ``(x, y)`` with pixel ``[r, c]`` centred at ``(x=c, y=r)`` (the tracking convention).
    """
    t = tracks.shape[0]
    h, w = size_hw
    out = np.zeros((t, h, w), dtype=np.uint8)
    rows, cols = np.mgrid[0:h, 0:w]
    for f in range(t):
        for x, y in tracks[f]:
            if np.isfinite(x) and np.isfinite(y):
                r0, r1 = max(0, int(y - radius - 1)), min(h, int(y + radius + 2))
                c0, c1 = max(0, int(x - radius - 1)), min(w, int(x + radius + 2))
                disk = (rows[r0:r1, c0:c1] - y) ** 2 + (cols[r0:r1, c0:c1] - x) ** 2 <= radius**2
                out[f, r0:r1, c0:c1][disk] = 1
    return out


class AdacsInfer(BundleWorkflowInfer):
    """``adacs_registration``: a pair -> the warped source label and the displacement field.

    The image is the source (e.g. ED); the target (e.g. ES) is the request's ``target`` (a file path, or a datastore
    image id the app resolves) or the ``<name>_target`` file beside a ``<name>_source`` image. The source label is
    the request's ``label`` (the app passes the image's saved label) or the ``<name>_source_mask`` sibling. The
    returned label is the warped source label on the target's grid; the JSON holds the displacement field
    (``displacement_nifti_gz_b64``: a gzip NIfTI ``(H, W, 2)``, pixels, ``warped(x) = source(x + disp(x))``) and its
    folding percentage."""

    request_params = ("target", "label")

    def bundle_overrides(self, request: dict[str, Any], work_dir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if request.get("target"):
            out["target_path"] = str(request["target"])
        if request.get("label"):
            out["source_mask_path"] = str(request["label"])
        return out

    def collect(self, request: dict[str, Any], out_dir: Path, work_dir: Path) -> tuple[str | None, dict[str, Any]]:
        summary = json.loads((out_dir / "inference_summary.json").read_text())
        pairs = summary.get("pairs") or summary.get("records") or []
        if len(pairs) != 1:
            raise RuntimeError(f"adacs_registration wrote {len(pairs)} pairs for {request['image']}, expected 1")
        rec = pairs[0]
        result = {k: rec[k] for k in ("pair", "target", "nonpositive_jacobian_percent", "mean_displacement_pixels")
                  if k in rec}
        result["displacement_nifti_gz_b64"] = _nifti_b64(rec["displacement"])
        result["warped_image_nifti_gz_b64"] = _nifti_b64(rec["warped"])
        label = self._keep(rec["warped_mask"], work_dir) if rec.get("warped_mask") else None
        if label is None:
            result["note"] = "no source label given: only the displacement field and the warped image are returned"
        return label, result


def _image_id(path: str | Path) -> str:
    """The datastore id of an image file (its name without the image suffix)."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


class _FineTuneConstants(BundleConstants):
    def configs(self) -> Sequence[str]:
        return ["train.json"]


class BundleFineTune(BundleTrainTask):
    """MONAI Label ``BundleTrainTask`` on a segmentation bundle's ``train.json``: fine-tunes the current checkpoint
    on the datastore's labelled images; the ``model.pt`` the bundle's training writes (``botm_seg``: validation's
    key-metric checkpoint; ``lssc_multimodal``: the final weights) then replaces ``ckpt_path``, which the infer task
    loads on its next request. Errors reach the client as HTTP 409 (nothing to train on), 400 (a bad label or
    image, named) or 500, with the reason.

    Args:
        bundle_dir: the bundle folder.
        ckpt_path: the infer task's checkpoint (read as the starting point, replaced by training).
        overrides: bundle overrides for every run (must build the same network as the infer task's).
        conf: the app's ``--conf`` values.
        images: comma-separated ``fnmatch`` patterns of the image ids this bundle trains on (the datastore is shared
            by the four models: an echo model must not train on a CT volume's label); a request's ``images`` wins.
    """

    #: what the served checkpoint is loaded into (a config expression of the train config)
    load_target: str = "@network"

    def __init__(self, bundle_dir: str | Path, ckpt_path: str | Path, overrides: Mapping[str, Any] | None = None,
                 conf: Mapping[str, str] | None = None, images: str = "*") -> None:
        self.ckpt_path = Path(ckpt_path).resolve()
        self.extra_overrides = dict(overrides or {})
        self.images = images or "*"
        super().__init__(str(Path(bundle_dir).resolve()), dict(conf or {}), const=_FineTuneConstants(),
                         load_strict=True)

    def config(self) -> dict[str, Any]:
        return {"device": device_list(), "pretrained": True, "max_epochs": 10, "val_split": 0.2,
                "images": self.images}

    def _fetch_datalist(self, request: Mapping[str, Any], datastore: Any) -> list[dict]:
        patterns = [p.strip() for p in str(request.get("images") or self.images).split(",") if p.strip()]
        out = []
        for d in datastore.datalist():
            name = Path(d["image"]).name
            image_id = _image_id(name)
            if d.get("label") and any(fnmatch.fnmatch(image_id, p) or fnmatch.fnmatch(name, p) for p in patterns):
                out.append(self.entry(d["image"], d["label"]))
        return out

    def entry(self, image: str, label: str) -> dict[str, Any]:
        """One datalist entry of the bundle's training and validation data for a labelled datastore image."""
        return {"image": image, "label": label}

    def _partition_datalist(self, datalist: list[dict], request: Mapping[str, Any], shuffle: bool = False
                            ) -> tuple[list[dict], list[dict]]:
        if not datalist:
            # nothing to train on yet is a state of the datastore, not a server fault
            wanted = request.get("images") or self.images
            raise HTTPException(409, f"{Path(self.bundle_path).name}: no labelled images in the datastore to train "
                                f"on (images matching {wanted!r} with a saved final label)")
        val_split = float(request.get("val_split", 0.2))
        n_val = int(round(len(datalist) * val_split)) if 0.0 < val_split < 1.0 else 0
        if n_val == 0 or n_val == len(datalist):
            # a handful of corrections: validate on them too, so the key-metric checkpoint (model.pt) is written
            return list(datalist), list(datalist)
        return datalist[n_val:], datalist[:n_val]

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        # start from the infer task's checkpoint (not <bundle>/models/model.pt) when there is one; train_handlers is
        # the parsed config's own list, kept between requests, so the loader goes in once
        has_loader = any(isinstance(h, dict) and h.get("_target_") == "CheckpointLoader" for h in train_handlers)
        if pretrained and self.ckpt_path.is_file() and not has_loader:
            train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(self.ckpt_path),
                                      "load_dict": {"model": self.load_target}, "strict": True,
                                      "map_location": "@device"})

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        train = overrides.pop("train#dataset#data")
        val = overrides.pop("validate#dataset#data", None) or train
        epochs = int(overrides.pop("train#trainer#max_epochs"))
        device = str(overrides.pop("device"))
        work = self._work
        overrides.update(self.extra_overrides)
        overrides.update(self.data_overrides(train))
        overrides.update({
            "train#datalist": self.train_entries(train), "validate#datalist": val, "epochs": epochs,
            # checkpoints go to a scratch folder; the best model then replaces ckpt_path in one step
            "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"), "num_workers": 0,
            "device": f"$torch.device({device!r})",
        })
        return overrides

    def train_entries(self, entries: list[dict]) -> list[dict]:
        """Validation-style entries -> the bundle's training entries (a subclass pairs frames)."""
        return entries

    def data_overrides(self, entries: list[dict]) -> dict[str, Any]:
        """Overrides that keep the bundle from reading (or generating) its dataset folder: the data come from the
        datastore."""
        return {}

    def __call__(self, request: Mapping[str, Any], datastore: Any) -> dict[str, Any]:
        request = dict(request)
        request.setdefault("multi_gpu", False)
        device = request.get("device") or "cpu"
        if isinstance(device, (list, tuple)):  # the choices offered to clients; the first is the default
            device = device[0] if device else "cpu"
        request["device"] = str(device)
        begin = time.time()
        name = Path(self.bundle_path).name
        self._work = Path(tempfile.mkdtemp(prefix=f"cardiac-label-train-{name}-"))
        self._report: dict[str, Any] = {}
        try:
            try:
                super().__call__(request, datastore)
            except HTTPException:
                raise
            except Exception as e:
                # a bad label or image (named by the bundle's transforms) is the client's 400, as for /infer
                raise _client_error(name, e) from e
            best = self._work / "models" / "model.pt"
            if not best.is_file():
                raise RuntimeError(f"training of {name} wrote no model.pt (give max_epochs >= 1)")
            # replace the served checkpoint atomically: an inference running meanwhile reads the old or the new one
            self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt_path.with_name(self.ckpt_path.name + ".tmp")
            shutil.copyfile(best, tmp)
            os.replace(tmp, self.ckpt_path)
        finally:
            shutil.rmtree(self._work, ignore_errors=True)
        return {"checkpoint": str(self.ckpt_path), "time_s": round(time.time() - begin, 2), **self._report}


class BotmFineTune(BundleFineTune):
    """``botm_seg`` from corrected labels: a labelled frame trains as the pair (frame, frame); a labelled cine as
    its consecutive frame pairs (t, t+1), cyclically -- the pairs the bundle's inference uses."""

    def data_overrides(self, entries: list[dict]) -> dict[str, Any]:
        # train.json derives the layout (and so the class names) from its dataset folder; here it is the
        # inference's layout (CAMUS unless the app's overrides say "layout": "ted")
        return {"data_root": str(Path(entries[0]["image"]).parent),
                "echo_layout": str(self.extra_overrides.get("layout", "camus"))}

    def train_entries(self, entries: list[dict]) -> list[dict]:
        from common.engines.echo_inference import load_frames

        out = []
        for e in entries:
            t = load_frames(e["image"])[0].shape[0]
            if t == 1:
                out.append({"image": [e["image"], e["image"]], "label": [e["label"], e["label"]]})
            else:
                out.extend({**e, "frames": [i, (i + 1) % t]} for i in range(t))
        return out


def image_modality(image: str | Path, info: Mapping[str, Any] | None, modalities: Sequence[str]) -> str:
    """The modality of a datastore volume, told as the ``lssc_multimodal`` infer task tells it: a ``modality`` (or
    DICOM ``Modality``, recorded by a DICOMweb datastore) in the image's datastore info, else the bundle's own rule
    (:func:`common.engines.inference.modality_datalist`: the file's DICOM ``Modality``, then a ``ct``/``mr`` token in
    its name).

    Raises:
        ValueError: the modality cannot be told, or is not one of ``modalities`` (the message says why).
    """
    from common.engines.inference import modality_datalist

    info = info or {}
    given = next((str(info[k]) for k in ("modality", "Modality") if info.get(k)), "")
    try:
        return modality_datalist([str(image)], modality=given, modalities=modalities)[0]["modality"]
    except (ValueError, FileNotFoundError) as e:
        source = f"its datastore info says {given!r}" if given else str(e)
        raise ValueError(f"modality not one of {tuple(modalities)}: {source}") from e


def lssc_label_convention(label: str | Path, structures: Sequence[str]) -> str:
    """``"class ids"`` when ``label`` holds the bundle's class ids (0, 1..K in ``structures`` order: what the
    ``lssc_multimodal`` infer task returns, so what a viewer saves), ``"MM-WHS codes"`` when it holds MM-WHS codes (a
    dataset's own ground truth). Both train as they are: the bundle's label mapping (MONAI ``MapLabelValue`` per
    modality, ``common.transforms.labels.MapLabelByModalityd``) maps the codes and leaves the ids (which are no
    codes) unchanged.

    Raises:
        ValueError: other values, or both conventions in one label (naming the file and the values).
    """
    from common.data.io import read_image
    from common.data.mmwhs import MMWHS_CODES

    values = {float(v) for v in np.unique(read_image(label).array)}
    ids = {float(i) for i in range(len(structures) + 1)}
    codes = {0.0, *(float(c) for c in MMWHS_CODES.values())}
    if values <= ids:
        return "class ids"
    if values <= codes:
        return "MM-WHS codes"
    names = ", ".join(f"{n} {i}" for i, n in enumerate(structures, start=1))
    found = [int(v) if v.is_integer() else v for v in sorted(values)]
    raise ValueError(f"{label}: label values {found} are not all lssc_multimodal class ids (0, {names}) nor all "
                     f"MM-WHS codes (0, {', '.join(f'{k} {c}' for k, c in MMWHS_CODES.items())})")


class LsscFineTune(BundleFineTune):
    """``lssc_multimodal`` from corrected labels, with the bundle's ``train.json`` (its unpaired two-modality
    trainer, LSSC loss, Adam, slice-stack transforms).

    Every labelled volume gets its modality as the infer task tells it (:func:`image_modality`); the volumes of
    each modality form that modality's unpaired training set (the entries the bundle's
    :func:`common.data.slices.unpaired_datalist` would give: ``image``, ``label``, ``patient``, ``modality``). With
    labels of one modality only, the trainer draws that modality alone, which the bundle's loss supports (the
    consistency terms need both and are then 0; the network keeps both modalities' parts). Labelled images whose
    modality cannot be told or is not CT/MR (e.g. the echo studies of a shared datastore) are skipped and listed in
    the answer. Labels may be class ids or MM-WHS codes (:func:`lssc_label_convention`). Training starts from the
    served checkpoint (inference weights, loaded into the training network's inference part) and the final
    ``model.pt`` the bundle writes replaces it (the bundle's own ``model.pt`` is its final weights).
    """

    load_target = "$common.engines.lssc.InferenceWeights(@network)"

    def _config_value(self, key: str) -> Any:
        # the app's overrides (which build the served network) win over train.json
        return self.extra_overrides[key] if key in self.extra_overrides else self.bundle_config[key]

    def _fetch_datalist(self, request: Mapping[str, Any], datastore: Any) -> list[dict]:
        modalities = [str(m) for m in self._config_value("modalities")]
        structures = [str(s) for s in self._config_value("structures")]
        out, skipped, labels = [], {}, {}
        for e in super()._fetch_datalist(request, datastore):
            image_id = _image_id(e["image"])
            try:
                modality = image_modality(e["image"], datastore.get_image_info(image_id), modalities)
            except ValueError as err:
                skipped[image_id] = str(err)
                continue
            try:
                labels[image_id] = lssc_label_convention(e["label"], structures)
            except ValueError as err:
                raise HTTPException(400, f"lssc_multimodal: label of {image_id}: {err}") from err
            out.append({**e, "patient": image_id, "modality": modality})
        if skipped:
            logger.info(f"lssc_multimodal training skips {sorted(skipped)}: {skipped}")
        if not out:
            raise HTTPException(409, "lssc_multimodal: no labelled CT or MR volume in the datastore to train on "
                                f"(skipped: {skipped or 'no labelled image'}). Save a final label of a CT/MR volume; "
                                "a volume whose modality is not in its DICOM header or file name (ct_/mr_) needs "
                                "'modality' in its info (PUT /datastore/image/info)")
        self._report = {"trained_on": {m: [e["patient"] for e in out if e["modality"] == m] for m in modalities},
                        "label_values": labels, "skipped": skipped}
        return out

    def data_overrides(self, entries: list[dict]) -> dict[str, Any]:
        # the modalities with training volumes, in the bundle's order (the loss's M1, M2): one alone is allowed
        present = [m for m in self._config_value("modalities") if any(e["modality"] == m for e in entries)]
        return {"data_root": str(Path(entries[0]["image"]).parent), "train#dataloader#modalities": present}
