"""The PACS batch: query -> select -> (shard) -> ledger -> existence check -> retrieve -> infer -> SEG + SR -> store.

:func:`run_batch` is what ``python -m tools.pacs run`` does; :func:`status` what ``python -m tools.pacs status``
prints. Guarantees (each one tested against a real Orthanc in ``tests/tools/pacs``):

* never lose a result: a row is ``done`` only after the destination accepted every result instance; a crash,
  a kill or Ctrl-C leaves it ``running``/``queued`` and the rerun redoes it;
* never store one twice: result UIDs are derived from the source UIDs + bundle name and version
  (:mod:`tools.pacs.uids`) and the destination is asked for them before any computing; only missing ones are stored;
* never stop the batch for one bad study: a corrupt or unsupported series is ``failed`` with the reason, a series no
  rule selects is ``skipped``; an unreachable PACS (after retries with backoff) leaves the row ``queued`` with the
  reason, and after ``max_unreachable`` such rows in a row the batch stops (the rerun resumes);
* scale-out: with ``RANK``/``WORLD_SIZE`` set (torchrun) each process takes the studies whose StudyInstanceUID hash
  falls on its rank; nothing is shared but the destination;
* privacy: logs name studies by hashed UIDs only; the ledger holds UIDs, states, reasons and timings, never patient
  name, ID or birth date.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from common.data.loading import save_dicom
from tools.pacs.ledger import STATES, TIMINGS, Ledger
from tools.pacs.nodes import Node, SeriesInfo, Unreachable, open_node
from tools.pacs.selection import DEFAULT_RULES, rules_for, select
from tools.pacs.uids import hash_uid, result_uid, scrub_uids, shard_of

__all__ = ["BatchStopped", "parse_filters", "run_batch", "status"]

log = logging.getLogger("tools.pacs")


class BatchStopped(Exception):
    """Raised inside a job when a stop was requested twice (second Ctrl-C): the job is requeued."""


class _StopFlag:
    """SIGINT/SIGTERM: the first asks for a clean stop after the current series, the second interrupts it."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the defaults
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise BatchStopped(f"signal {signum} received twice")
        self.requested = True
        log.warning("stop requested (signal %d): finishing the current series, then stopping", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def parse_filters(filters: str | Mapping[str, Any] | None) -> dict[str, str]:
    """``"ModalitiesInStudy=US,StudyDescription=Echo*"`` (or a dict) -> ``{keyword: value}``; ``ValueError`` naming
    the bad item."""
    if not filters:
        return {}
    if isinstance(filters, Mapping):
        return {str(k): str(v) for k, v in filters.items()}
    out = {}
    for item in str(filters).split(","):
        if "=" not in item:
            raise ValueError(f"--filter item {item!r} is not KEYWORD=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _setup_logging(run_dir: Path, rank: int) -> logging.Handler:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / ("pacs.log" if rank == 0 else f"pacs.rank{rank}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(message)s"))
    handler.addFilter(lambda rec: setattr(rec, "rank", rank) or True)
    log.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(stream)
    log.setLevel(logging.INFO)
    return handler


def _reason(e: BaseException, tmp_dir: Path) -> str:
    """``"<Type>: <first line>"`` of an error, the temporary folder's path replaced (the ledger row names the
    series by its UIDs already)."""
    # MONAI wraps a reader's clear error in "applying transform <...>": report the error it wraps
    while e.__cause__ is not None and str(e).startswith("applying transform"):
        e = e.__cause__
    text = str(e).replace(str(tmp_dir) + os.sep, "<retrieved>/").replace(str(tmp_dir), "<retrieved>")
    return scrub_uids(f"{type(e).__name__}: {text.splitlines()[0][:500] if text else ''}")


class _Job:
    """One series through the pipeline (state transitions in :func:`run_batch`)."""

    def __init__(self, info: SeriesInfo, bundle: str, version: str) -> None:
        self.info = info
        # the smallest SOP UID: a series of slices names the same instance whatever order the query returns
        self.sop_uid = min(str(d.SOPInstanceUID) for d in info.instances)
        src = [info.study_uid, info.series_uid, self.sop_uid]
        self.seg_series = result_uid("seg-series", src[:2], bundle, version)
        self.seg_uid = result_uid("seg", src, bundle, version)
        self.sr_series = result_uid("sr-series", src[:2], bundle, version)
        self.sr_uid = result_uid("sr", src, bundle, version)
        self.tracking_uid = result_uid("sr-tracking", src, bundle, version)


def _process(job: _Job, model: Any, source: Node, dest: Node, tmp_dir: Path) -> tuple[list[str], dict[str, float],
                                                                                      str]:
    """Compute and store the results of one series; returns ``(result UIDs, timings, note)``."""
    from common.data.loading import dicom_inplane_spacing
    from tools.pacs.cine import as_cine
    from tools.pacs.results import echo_area_report, echo_seg
    from tools.pacs.volumes import PACS_VOLUME_BUNDLES, process_series

    if model.name in PACS_VOLUME_BUNDLES:  # lssc_multimodal (CT/MR series -> SEG), adacs_registration (ED/ES -> SR)
        return process_series(job, model, source, dest, tmp_dir)
    info, timings = job.info, dict.fromkeys(TIMINGS, 0.0)
    wanted = {job.seg_uid: job.seg_series, job.sr_uid: job.sr_series}
    missing = [u for u, s in wanted.items() if not dest.exists(info.study_uid, s, u)]
    if not missing:
        return list(wanted), timings, "already at the destination"
    t = time.perf_counter()
    instances = source.retrieve(info.study_uid, info.series_uid)
    timings["retrieve"] = time.perf_counter() - t
    # one multi-frame cine, or single-frame US instances stacked in InstanceNumber order (frame_sources: each
    # frame's own instance, referenced by the SEG and SR)
    ds, frame_sources = as_cine(instances)
    tmp = tmp_dir / f"{hash_uid(job.sop_uid)[1:]}.dcm"
    try:
        t = time.perf_counter()
        save_dicom(ds, tmp, file_format=False)
        timings["retrieve"] += time.perf_counter() - t
        labels, _ = model.predict(tmp, timings)
    finally:
        tmp.unlink(missing_ok=True)
    spacing = dicom_inplane_spacing(ds)
    if spacing is None:
        raise ValueError("no pixel spacing (SequenceOfUltrasoundRegions or PixelSpacing): areas cannot be measured")
    t = time.perf_counter()
    out = []
    if job.seg_uid in missing:
        out.append(echo_seg(ds, labels, model.class_names, model.name, model.version, job.seg_series, job.seg_uid,
                            frame_sources=frame_sources))
    if job.sr_uid in missing:
        out.append(echo_area_report(ds, labels, model.class_names, spacing, model.name, model.version, job.sr_series,
                                    job.sr_uid, job.tracking_uid, frame_sources=frame_sources))
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    dest.store(out)
    timings["store"] = time.perf_counter() - t
    return list(wanted), timings, "" if len(missing) == 2 else "partly at the destination: stored the rest"


def run_batch(bundle: str = "botm_seg", source: str = "", dest: str | None = None,
              ledger: str = "output/pacs/ledger.sqlite", ckpt: str | None = None, filter: str | None = None,  # noqa: A002
              since: str | None = None, limit: int | None = None, dry_run: bool = False, device: str | None = None,
              overrides: Mapping[str, Any] | None = None, user: str | None = None, password: str | None = None,
              token: str | None = None, ca_bundle: str | None = None, retry_failed: bool = False,
              attempts: int = 4, backoff: float = 0.5, max_unreachable: int = 3, ae_title: str | None = None,
              retrieve: str | None = None, move_port: int | None = None) -> dict:
    """Run ``bundle`` on every matching series of ``source`` and store the results at ``dest`` (module docstring).

    Returns a summary: ``{"rank", "world_size", "selected", "counts_this_run": {state: n}, "ledger": {state: n},
    "stopped": reason or ""}``. ``password``/``token`` may also come from ``PACS_PASSWORD``/``PACS_TOKEN``.
    DIMSE nodes (``dimse://AET@host:port``): ``ae_title`` is our calling AE title, ``retrieve`` ``"get"`` (C-GET,
    default) or ``"move"`` (C-MOVE to our storage SCP on ``move_port``, which the PACS must know for ``ae_title``).
    """
    if not source:
        raise ValueError("--source is required (dicomweb://host:port/path, dicomwebs://..., or a folder)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _rank_device(device)
    rules = rules_for(bundle, DEFAULT_RULES)
    auth = {"user": user, "password": password or os.environ.get("PACS_PASSWORD"),
            "token": token or os.environ.get("PACS_TOKEN"), "ca_bundle": ca_bundle}
    auth.update(ae_title=ae_title, retrieve=retrieve, move_port=move_port)  # DIMSE only (open_node drops them)
    auth = {k: v for k, v in auth.items() if v}
    src = open_node(source, attempts=attempts, backoff=backoff, **auth) if "://" in source and not \
        source.startswith("file://") else open_node(source)
    dst = src if not dest or dest == source else (
        open_node(dest, attempts=attempts, backoff=backoff, **auth) if "://" in dest and not
        dest.startswith("file://") else open_node(dest))
    ledger_path = Path(ledger)
    handler = _setup_logging(ledger_path.parent, rank)
    counts = dict.fromkeys(STATES, 0)
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "selected": 0, "counts_this_run": counts,
                               "stopped": ""}
    try:
        try:
            series = src.query(parse_filters(filter), since, limit)
        except Unreachable as e:  # nothing is queued yet: stop with the reason (exit 2), as an outage mid-batch does
            summary["stopped"] = f"source unreachable while querying: {scrub_uids(str(e))}"
            log.error("%s", summary["stopped"])
            return summary
        mine = [s for s in series if shard_of(s.study_uid, world) == rank]
        log.info("%d series queried, %d for rank %d of %d", len(series), len(mine), rank, world)
        summary["selected"] = len(mine)
        if dry_run:
            plan = []
            for s in mine:
                rule, why = select(s.instances, rules)
                plan.append({"study": hash_uid(s.study_uid), "series": hash_uid(s.series_uid),
                             "action": f"run {rule.bundle}" if rule else f"skip: {why}"})
            summary["plan"] = plan
            return summary
        from tools.pacs.chains import CHAINS, ChainModel, process_chain
        from tools.pacs.model import BundleModel

        model: BundleModel | ChainModel | None = None
        book = Ledger(ledger_path)
        recovered = book.recover()
        if recovered:
            log.warning("%d series of dead workers requeued", recovered)
        if retry_failed:
            book.requeue_failed()
        tmp_dir = ledger_path.parent / "tmp" / f"rank{rank}"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        unreachable_run = 0
        with _StopFlag() as stop:
            for info in mine:
                if stop.requested:
                    summary["stopped"] = "stop requested"
                    break
                rule, why = select(info.instances, rules)
                version = model.version if model else _bundle_version(bundle)
                row = book.add(info.study_uid, info.series_uid, bundle, version, rank)
                if row["state"] in ("done", "failed", "skipped"):
                    continue
                tag = f"study {hash_uid(info.study_uid)} series {hash_uid(info.series_uid)}"
                if rule is None:
                    book.finish(info.study_uid, info.series_uid, bundle, version, "skipped", why)
                    counts["skipped"] += 1
                    log.info("%s: skipped (%s)", tag, why)
                    continue
                if not book.claim(info.study_uid, info.series_uid, bundle, version):
                    continue  # another process on this host took it
                try:
                    if model is None:
                        model = ChainModel(bundle, ckpt, device, overrides) if bundle in CHAINS else BundleModel(
                            bundle, ckpt_path=ckpt, device=device, overrides=overrides)
                    job = _Job(info, model.name, model.version)
                    if isinstance(model, ChainModel):  # echo_gls, specknet_tracking: botm_seg seeds the tracker
                        results, timings, note = process_chain(job, model, src, dst, tmp_dir)
                    else:
                        results, timings, note = _process(job, model, src, dst, tmp_dir)
                except Unreachable as e:
                    book.finish(info.study_uid, info.series_uid, bundle, version, "queued",
                                f"pending: {scrub_uids(str(e))}")
                    counts["queued"] += 1
                    unreachable_run += 1
                    log.error("%s: pending, PACS unreachable (%s)", tag, scrub_uids(str(e)))
                    if unreachable_run >= max_unreachable:
                        summary["stopped"] = f"PACS unreachable for {unreachable_run} series in a row"
                        break
                    continue
                except (BatchStopped, KeyboardInterrupt) as e:
                    book.finish(info.study_uid, info.series_uid, bundle, version, "queued", f"interrupted: {e}")
                    counts["queued"] += 1
                    summary["stopped"] = "interrupted"
                    break
                except (FileNotFoundError, KeyError) as e:
                    if model is None:  # the bundle or its checkpoint: fatal for the whole batch, the row stays
                        book.finish(info.study_uid, info.series_uid, bundle, version, "queued", f"pending: {e}")
                        raise
                    book.finish(info.study_uid, info.series_uid, bundle, version, "failed", _reason(e, tmp_dir))
                    counts["failed"] += 1
                    log.error("%s: failed (%s)", tag, type(e).__name__)
                    continue
                except Exception as e:  # a bad study must not stop the batch; the reason is recorded
                    book.finish(info.study_uid, info.series_uid, bundle, version, "failed", _reason(e, tmp_dir))
                    counts["failed"] += 1
                    log.error("%s: failed (%s)", tag, _reason(e, tmp_dir)[:300])
                    continue
                unreachable_run = 0
                book.finish(info.study_uid, info.series_uid, bundle, version, "done", note, results, timings)
                counts["done"] += 1
                log.info("%s: done%s (%s)", tag, f", {note}" if note else "",
                         ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
        summary["ledger"] = book.counts()
        book.close()
        return summary
    finally:
        log.removeHandler(handler)
        handler.close()


def _rank_device(device: str | None) -> str | None:
    """``cuda`` (or no choice, on a CUDA machine) under torchrun -> ``cuda:<LOCAL_RANK>``: one GPU per process."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or (device not in (None, "cuda")):
        return device
    import torch

    if device == "cuda" or torch.cuda.is_available():
        return f"cuda:{int(local)}"
    return device


def _bundle_version(bundle: str) -> str:
    """The version a ledger row and the result UIDs carry: a chain's (every bundle's version) or the bundle's."""
    from tools.pacs.chains import CHAINS, chain_version, metadata_version

    return chain_version(bundle) if bundle in CHAINS else metadata_version(bundle)


def status(ledger: str = "output/pacs/ledger.sqlite") -> dict:
    """Counts by state and every failed or pending row with its reason (UIDs hashed)."""
    path = Path(ledger)
    if not path.is_file():
        raise FileNotFoundError(f"ledger {path} not found (run 'python -m tools.pacs run' first)")
    book = Ledger(path)
    try:
        problems = [{"study": hash_uid(r["study_uid"]), "series": hash_uid(r["series_uid"]), "bundle": r["bundle"],
                     "state": r["state"], "attempts": r["attempts"], "reason": r["reason"]}
                    for r in book.rows() if r["state"] in ("failed", "queued", "running") and
                    (r["state"] != "queued" or r["reason"])]
        return {"ledger": str(path), "counts": book.counts(), "problems": problems}
    finally:
        book.close()
