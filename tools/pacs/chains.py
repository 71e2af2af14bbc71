"""Chained bundles on a PACS: automatic GLS from an echo cine with no human input.

``--bundle echo_gls`` (the flagship chain) runs on one US cine:

1. ``botm_seg`` segments every frame (its own ``inference.json`` pieces, :class:`tools.pacs.model.BundleModel`);
2. its myocardium at specknet_tracking's query frame (the bundle's own choice: ``query_frame`` if >= 0, else
   ``int(query_fraction * T)``) gives the query points: ``n_points`` equidistant points on the myocardial centre
   line, computed by :func:`common.data.centreline.centreline_points_from_mask` -- the function specknet's
   ``QueryPointsd`` applies to a ``mask_path`` (the bundle's documented way to seed it with botm_seg masks);
3. specknet_tracking tracks them through the cine with its own preprocessing (``LoadVideod``, ``ResizeVideod``,
   ``TrackingInputsd``: the ``QueryPointsd`` step is replaced by step 2), its network's ``encode``/``track`` (as its
   ``TrackingEvaluator`` calls them) and the mapping back to the cine's pixels of its ``TrackingPredictionWriter``;
4. GLS comes from :func:`common.metrics.tracking.global_longitudinal_strain` of the tracks, the reference frame being
   ED = the frame of botm_seg's largest LV area (the same ED as the area report), ES = the frame of the shortest
   centre line (specknet's rule);
5. one run stores the multi-frame DICOM SEG and the LV/LA area SR of botm_seg (:mod:`tools.pacs.results`) and the
   GLS SR (:func:`gls_report`).

``--bundle specknet_tracking`` is the same chain storing only the GLS SR (on a PACS there is no human to give query
points; botm_seg provides the mask). Both need a checkpoint per bundle: ``--ckpt
"botm_seg=/path/a.pt,specknet_tracking=/path/b.pt"`` (or a dict); ``overrides`` likewise ``{bundle: {key: value}}``.

The GLS SR (TID 1500, Comprehensive 3D SR) holds: a ``GLS`` group (GLS in %, centre-line lengths at ED and ES in
mm, the ED and ES frames referenced), a ``query points`` group (the seed polyline on the query frame, algorithm
botm_seg + its version) and one group per cine frame (the tracked points as an SCOORD ``POLYLINE`` on that frame,
its strain in % and centre-line length in mm, algorithm specknet_tracking + its version). SCOORD coordinates are
DICOM image coordinates (column, row), (0, 0) being the top-left corner of the top-left pixel, i.e. the tracks'
pixel-centre coordinates + 0.5; a tracked point outside the image is clipped to its border in the SCOORD only (the
strain numbers use the unclipped tracks). The series description says it is not for diagnostic use. Strain has no
standard code in SNOMED CT/DCM that highdicom ships, so strain concepts use the local scheme ``99CARDBNDL``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

__all__ = ["CHAINS", "ChainModel", "TrackResult", "chain_version", "gls_report", "metadata_version", "process_chain",
           "track_cine"]

# chain name -> the bundles it runs, in order
CHAINS: dict[str, tuple[str, ...]] = {
    "echo_gls": ("botm_seg", "specknet_tracking"),
    "specknet_tracking": ("botm_seg", "specknet_tracking"),
}
_SCHEME = "99CARDBNDL"
GLS_CODE = hd.sr.CodedConcept("GLS", _SCHEME, "Global longitudinal strain")
STRAIN_CODE = hd.sr.CodedConcept("STRAIN", _SCHEME, "Longitudinal strain")
LENGTH_CODE = hd.sr.CodedConcept("CLLEN", _SCHEME, "Myocardial centre-line length")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_NOT_DIAGNOSTIC = "not for diagnostic use"


def metadata_version(bundle: str) -> str:
    """The ``version`` of ``bundles/<bundle>/configs/metadata.json``; ``FileNotFoundError`` naming a missing one."""
    from tools.pacs.model import BUNDLES_DIR

    meta = BUNDLES_DIR / bundle / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"bundle {bundle!r}: {meta} not found")
    return str(json.loads(meta.read_text()).get("version", "0"))


def chain_version(chain: str) -> str:
    """``"botm_seg 0.1.1 + specknet_tracking 0.1.1"``: the versions of every bundle of ``chain`` (part of the
    deterministic result UIDs and the ledger key, so a new version of either bundle computes anew)."""
    if chain not in CHAINS:
        raise ValueError(f"unknown chain {chain!r}; chains: {sorted(CHAINS)}")
    return " + ".join(f"{b} {metadata_version(b)}" for b in CHAINS[chain])


def _per_bundle(value: Any, bundles: Sequence[str], what: str) -> dict[str, Any]:
    """``"a=x,b=y"`` or ``{a: x}`` -> ``{bundle: value}``. A malformed item or an unknown bundle raises ``KeyError``
    (as a bad override key does in :class:`tools.pacs.model.BundleModel`): ``run_batch`` then stops the batch
    instead of failing every series with the same configuration error."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        out = dict(value)
    else:
        out = {}
        for item in str(value).split(","):
            if "=" not in item:
                raise KeyError(f"--{what} {item!r}: a chain needs BUNDLE=VALUE items (bundles: {list(bundles)})")
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    unknown = sorted(set(out) - set(bundles))
    if unknown:
        raise KeyError(f"--{what}: {unknown} not in the chain's bundles {list(bundles)}")
    return out


class ChainModel:
    """The bundles of a chain loaded once per process (``name`` = the chain, ``version`` = :func:`chain_version`).

    Args:
        chain: ``"echo_gls"`` or ``"specknet_tracking"``.
        ckpt: per-bundle checkpoints, ``"botm_seg=a.pt,specknet_tracking=b.pt"`` or a dict (default: each bundle's
            ``models/model.pt``).
        device: as :class:`tools.pacs.model.BundleModel`.
        overrides: ``{bundle: {config id: value}}``.
    """

    def __init__(self, chain: str, ckpt: str | Mapping[str, str] | None = None, device: str | None = None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        from tools.pacs.model import BundleModel

        if chain not in CHAINS:
            raise ValueError(f"unknown chain {chain!r}; chains: {sorted(CHAINS)}")
        bundles = CHAINS[chain]
        ckpts = _per_bundle(ckpt, bundles, "ckpt")
        ovr = _per_bundle(overrides, bundles, "overrides")
        self.name = chain
        self.seg = BundleModel("botm_seg", ckpt_path=ckpts.get("botm_seg"), device=device,
                               overrides=ovr.get("botm_seg"))
        self.tracker = BundleModel("specknet_tracking", ckpt_path=ckpts.get("specknet_tracking"), device=device,
                                   overrides=ovr.get("specknet_tracking"))
        self.version = " + ".join(f"{m.name} {m.version}" for m in (self.seg, self.tracker))
        self.stores_seg = chain == "echo_gls"
        if "Myo" not in self.seg.class_names or "LV" not in self.seg.class_names:
            raise KeyError(f"{chain}: botm_seg classes {self.seg.class_names} lack Myo or LV")


@dataclass
class TrackResult:
    """Tracks of one cine: ``tracks`` (T, N, 2) ``(x, y)`` pixels of the cine, ``confidence`` (T, N), the query
    points (N, 2) and frame, the strain curve (T,) in %, centre-line lengths (T,) in mm, GLS in %, ED/ES frames."""

    tracks: np.ndarray
    confidence: np.ndarray
    query_points: np.ndarray
    query_frame: int
    strain: np.ndarray
    lengths: np.ndarray
    gls: float
    ed_frame: int
    es_frame: int
    spacing: tuple[float, float]


def track_cine(tracker: Any, path: str | Path, labels: np.ndarray, myo_label: int, ed_frame: int,
               timings: dict[str, float] | None = None) -> TrackResult:
    """Track the centre line of ``labels``' myocardium (``myo_label``) at the tracker's query frame through the cine
    at ``path`` with specknet_tracking's own pieces (module docstring, steps 2-4). ``ValueError`` naming the problem
    (no myocardium on the query frame, no pixel spacing, label grid not the cine's)."""
    from common.data.centreline import centreline_points_from_mask
    from common.data.video_io import check_query_points
    from common.engines.tracking import QueryPointsd, scale_points
    from common.metrics.tracking import global_longitudinal_strain
    from common.transforms.video import diastasis_frame

    t0 = time.perf_counter()
    data: dict[str, Any] = {"image": str(path)}
    steps = list(getattr(tracker.preprocessing, "transforms", [tracker.preprocessing]))
    seeded = False
    for step in steps:
        if not isinstance(step, QueryPointsd):
            data = step(data)
            continue
        n_frames = int(data["n_frames"])
        size = (int(data["orig_size"][0]), int(data["orig_size"][1]))
        if labels.shape != (n_frames, *size):
            raise ValueError(f"segmentation {labels.shape} does not match the cine ({n_frames}, {size[0]}, {size[1]})")
        # the query frame exactly as QueryPointsd chooses it for a mask
        q = step.query_frame if 0 <= step.query_frame < n_frames else diastasis_frame(n_frames, step.query_fraction)
        try:
            pts = centreline_points_from_mask(labels[q], step.n_points, myo_label=myo_label)
        except ValueError as e:
            raise ValueError(f"botm_seg myocardium on the query frame {q} gives no centre line: {e}") from e
        frames = np.full(len(pts), q, dtype=np.int64)
        check_query_points(pts, frames, n_frames, size, "botm_seg centre line")
        data["query_points_orig"] = np.asarray(pts, dtype=np.float32)
        data["query_frames_orig"] = frames
        data["query_source"] = f"botm_seg myocardium centre line, frame {q}"
        seeded = True
    if not seeded:
        raise ValueError("specknet_tracking preprocessing has no QueryPointsd step to seed")
    sp = [float(s) for s in data["spacing"]]
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError("no pixel spacing (SequenceOfUltrasoundRegions or PixelSpacing): strain lengths need mm")
    t1 = time.perf_counter()
    net = tracker.network
    image = torch.as_tensor(data["image"], dtype=torch.float32)[None].to(tracker.device)
    size_net = (int(image.shape[-2]), int(image.shape[-1]))
    qp = torch.as_tensor(data["query_points"], dtype=torch.float32)[None].to(tracker.device)
    qf = torch.as_tensor(data["query_frames"], dtype=torch.long)[None].to(tracker.device)
    with torch.no_grad():
        # what TrackingEvaluator does per video: one encoder pass, then tracking from the query points
        out = net.track(net.encode(image.transpose(1, 2)), qp, qf, size_net)
    pred = torch.cat([out["tracks"], out["confidence"][..., None]], -1)[0].cpu()
    # back to the cine's pixels, the query points returned exactly: as TrackingPredictionWriter does
    orig = [int(v) for v in data["orig_size"]]
    tracks = scale_points(pred[..., :2].double().numpy(), size_net, orig)
    qpo, qfo = data["query_points_orig"], data["query_frames_orig"]
    tracks[qfo, np.arange(len(qfo))] = qpo
    res = global_longitudinal_strain(tracks, ed_frame=ed_frame, es_frame=None, spacing=sp)
    if timings is not None:
        timings["decode"] = timings.get("decode", 0.0) + t1 - t0
        timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t1
    return TrackResult(tracks=tracks, confidence=pred[..., 2].float().numpy(), query_points=qpo, query_frame=int(q),
                       strain=np.asarray(res.strain, np.float64), lengths=np.asarray(res.lengths, np.float64),
                       gls=float(res.gls), ed_frame=int(res.ed_frame), es_frame=int(res.es_frame),
                       spacing=(sp[0], sp[1]))


def _polyline(points: np.ndarray, rows: int, cols: int, src_class: str, src_uid: str, frame: int) -> hd.sr.ImageRegion:
    # DICOM image coordinates: pixel centres at +0.5; clipped to the image (SCOORD must lie on it)
    xy = np.asarray(points, np.float64) + 0.5
    xy[:, 0] = np.clip(xy[:, 0], 0.0, cols)
    xy[:, 1] = np.clip(xy[:, 1], 0.0, rows)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=xy.astype(np.float32),
                             source_image=hd.sr.SourceImageForRegion(src_class, src_uid,
                                                                     referenced_frame_numbers=[frame + 1]))


def _num(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, algo: hd.sr.AlgorithmIdentification
         ) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algo)


def gls_report(source: Dataset, result: TrackResult, seg_bundle: tuple[str, str], track_bundle: tuple[str, str],
               chain: str, series_uid: str, sop_uid: str, tracking_uid: str,
               series_number: int = 9003) -> hd.sr.Comprehensive3DSR:
    """The GLS SR of ``result`` over the cine ``source`` (module docstring). ``seg_bundle``/``track_bundle`` are
    ``(name, version)``; ``tracking_uid`` seeds the groups' tracking UIDs (deterministic)."""
    rows, cols = int(source.Rows), int(source.Columns)
    src_class, src_uid = str(source.SOPClassUID), str(source.SOPInstanceUID)
    seg_algo = hd.sr.AlgorithmIdentification(name=seg_bundle[0], version=str(seg_bundle[1]))
    trk_algo = hd.sr.AlgorithmIdentification(name=track_bundle[0], version=str(track_bundle[1]))
    mm = codes.UCUM.Millimeter
    ed, es = result.ed_frame, result.es_frame

    def tid(k: str, label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[tracking_uid, k]), identifier=label)

    groups: list[Any] = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tid("gls", f"GLS (ED frame {ed + 1}, ES frame {es + 1})"), algorithm_id=trk_algo,
        measurements=[_num(GLS_CODE, result.gls, _PERCENT, trk_algo),
                      _num(LENGTH_CODE, result.lengths[ed], mm, trk_algo),
                      _num(LENGTH_CODE, result.lengths[es], mm, trk_algo)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(src_class, src_uid,
                                                            referenced_frame_numbers=sorted({ed + 1, es + 1}))]),
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tid("query", f"query points: {seg_bundle[0]} myocardium centre line, "
                                             f"frame {result.query_frame + 1}"),
            referenced_region=_polyline(result.query_points, rows, cols, src_class, src_uid, result.query_frame),
            algorithm_id=seg_algo)]
    for t in range(result.tracks.shape[0]):
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tid(str(t), f"tracked points, frame {t + 1}"),
            referenced_region=_polyline(result.tracks[t], rows, cols, src_class, src_uid, t), algorithm_id=trk_algo,
            measurements=[_num(STRAIN_CODE, result.strain[t], _PERCENT, trk_algo),
                          _num(LENGTH_CODE, result.lengths[t], mm, trk_algo)]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=hd.sr.CodedConcept("40701008", "SCT", "Echocardiography"),
        imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer="cardiac-bundles", is_complete=True,
        series_description=f"{chain} GLS ({_NOT_DIAGNOSTIC})"[:64])


def process_chain(job: Any, model: ChainModel, source: Any, dest: Any, tmp_dir: Path
                  ) -> tuple[list[str], dict[str, float], str]:
    """One series through ``model``'s chain (``tools.pacs.run._process`` for chains): existence check of every
    result at ``dest`` first, then retrieve, segment, track, encode, store only the missing results."""
    from common.data.loading import dicom_inplane_spacing, save_dicom
    from tools.pacs.ledger import TIMINGS
    from tools.pacs.results import echo_area_report, echo_seg
    from tools.pacs.uids import hash_uid, result_uid

    info, timings = job.info, dict.fromkeys(TIMINGS, 0.0)
    src = [info.study_uid, info.series_uid, job.sop_uid]
    gls_series = result_uid("gls-sr-series", src[:2], model.name, model.version)
    gls_uid = result_uid("gls-sr", src, model.name, model.version)
    wanted = {gls_uid: gls_series}
    if model.stores_seg:
        wanted = {job.seg_uid: job.seg_series, job.sr_uid: job.sr_series, **wanted}
    missing = [u for u, s in wanted.items() if not dest.exists(info.study_uid, s, u)]
    if not missing:
        return list(wanted), timings, "already at the destination"
    t = time.perf_counter()
    instances = source.retrieve(info.study_uid, info.series_uid)
    timings["retrieve"] = time.perf_counter() - t
    if len(instances) != 1:
        raise ValueError(f"expected one cine instance in the series, retrieved {len(instances)}")
    ds = instances[0]
    tmp = tmp_dir / f"{hash_uid(job.sop_uid)[1:]}.dcm"
    try:
        t = time.perf_counter()
        save_dicom(ds, tmp, file_format=False)
        timings["retrieve"] += time.perf_counter() - t
        labels, _ = model.seg.predict(tmp, timings)
        names = model.seg.class_names
        lv = (labels == names.index("LV") + 1).reshape(labels.shape[0], -1).sum(1)
        ed = int(np.argmax(lv))  # the area report's ED: the frame of the largest LV
        result = track_cine(model.tracker, tmp, labels, names.index("Myo") + 1, ed, timings)
    finally:
        tmp.unlink(missing_ok=True)
    t = time.perf_counter()
    out = []
    if job.seg_uid in missing:
        out.append(echo_seg(ds, labels, names, model.seg.name, model.seg.version, job.seg_series, job.seg_uid))
    if job.sr_uid in missing:
        spacing = dicom_inplane_spacing(ds)
        if spacing is None:
            raise ValueError("no pixel spacing (SequenceOfUltrasoundRegions or PixelSpacing): areas cannot be measured")
        out.append(echo_area_report(ds, labels, names, spacing, model.seg.name, model.seg.version, job.sr_series,
                                    job.sr_uid, job.tracking_uid))
    if gls_uid in missing:
        out.append(gls_report(ds, result, (model.seg.name, model.seg.version),
                              (model.tracker.name, model.tracker.version), model.name, gls_series, gls_uid,
                              result_uid("gls-tracking", src, model.name, model.version)))
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    dest.store(out)
    timings["store"] = time.perf_counter() - t
    return list(wanted), timings, "" if len(missing) == len(wanted) else "partly at the destination: stored the rest"
