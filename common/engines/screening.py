"""Batch inference that survives bad inputs: screening before the network, per-case guards, one record of failures.

Used by every bundle's ``inference.json`` (and by evaluation to leave corrupt cases out):

* :class:`BatchLedger` -- the record of one output folder: ``failed_inputs.json`` (one entry per failed input:
  ``input``, ``reason``, ``stage``) and, optionally, ``predictions.json`` (one entry per written input). Records are
  keyed by input, so re-running into the same folder replaces an input's record instead of adding a second one; the
  latest outcome of an input decides which file lists it. ``strict=True`` makes the first failure fatal.
  :meth:`BatchLedger.finish` (the config's ``finalize``) ends the process with exit status
  :data:`EXIT_INPUTS_FAILED` (3) and a one-line message when some inputs failed -- after every good output is
  written -- so a batch job can tell "some inputs failed" (3) from success (0); when no input could be processed it
  raises a ``DataError`` listing the reasons (exit status 1, like a crash or a configuration error). In a
  ``torch.distributed`` run (``multi_gpu_evaluate.json``) only rank 0 writes the records, and
  :meth:`BatchLedger.gather` merges every rank's records before ``finish``, so all ranks exit alike.
* :func:`screen_inputs` -- reads every input once with the bundle's own loader before the run, checks the header
  against the size limits first (:func:`check_header`: a crafted header cannot make the job allocate tens of GB),
  then the array (:func:`check_loaded`: real numeric dtype, dimensionality, degenerate sizes, frame count, NaN/Inf,
  constant images), and keeps the inputs that pass. The checks themselves are the reading layer's
  (:mod:`common.data.loading`: ``header_shape``, ``check_size``, ``check_image_array``, ``ReadLimits``).
* :class:`GuardedDataset` and :class:`CaseGuard` -- failures after screening (a transform, the network, a writer)
  are recorded for that case and the run goes on with the next one.

Log lines and records name the file and the reason, never header values such as patient names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import Dataset

from common.data.cases import describe_error  # one implementation, shared with the dataset readers
from common.data.loading import DataError, ReadLimits
from common.engines.echo_inference import as_flag
from common.engines.handlers import write_json_atomic

__all__ = [
    "EXIT_INPUTS_FAILED",
    "FAILED_KEY",
    "INPUT_ID_KEY",
    "BatchLedger",
    "CaseGuard",
    "GuardedDataset",
    "InputsFailed",
    "check_header",
    "check_loaded",
    "declared_dtype",
    "describe_error",
    "entry_input",
    "screen_inputs",
]

EXIT_INPUTS_FAILED = 3
FAILED_KEY = "__failed_input__"
INPUT_ID_KEY = "input_id"

_LOG = logging.getLogger(__name__)


class InputsFailed(SystemExit):
    """Raised by :meth:`BatchLedger.finish` when inputs failed: exit status :data:`EXIT_INPUTS_FAILED`.

    A ``SystemExit`` so that ``python -m monai.bundle run`` ends with that status and the message only (no
    traceback: the failures are already listed in ``failed_inputs.json``); in-process callers catch it by type.
    """

    def __init__(self, message: str, code: int = EXIT_INPUTS_FAILED) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def entry_input(entry: Mapping[str, Any], keys: Sequence[str] = ("image",)) -> str:
    """The input a datalist entry stands for, as one string: the first key's path (a list of paths joined by
    ``" + "``, e.g. an ED/ES pair); the record key of :class:`BatchLedger`."""
    for k in keys:
        v = entry.get(k)
        if v:
            return " + ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return json.dumps({k: str(v) for k, v in entry.items()}, sort_keys=True)


# ------------------------------------------------------------------------------------------------------- ledger
class BatchLedger:
    """Outcome of every input of a batch job in ``output_dir`` (see the module docstring).

    Args:
        output_dir: folder of ``failed_inputs.json`` (and ``predictions.json``).
        strict: the first failure raises :class:`~common.data.io.DataError` naming the input (``--strict true``).
        predictions_file: name of the predictions record written here, or ``None`` when the bundle's writer keeps
            its own (botm's ``predictions.json``).
        failures_file: name of the failure record.
    """

    def __init__(self, output_dir: str | Path, strict: bool | str = False,
                 predictions_file: str | None = "predictions.json", failures_file: str = "failed_inputs.json") -> None:
        self.output_dir = Path(output_dir)
        self.strict = as_flag(strict, "strict")
        self.failures_path = self.output_dir / failures_file
        self.predictions_path = None if predictions_file is None else self.output_dir / predictions_file
        self._failed: dict[str, dict] | None = None
        self._predicted: dict[str, dict] | None = None
        self.seen: set[str] = set()
        self.run_failed: set[str] = set()
        self.run_succeeded: set[str] = set()
        # torch.distributed: the rank fixed by gather() (after which the process group may be gone), and whether
        # the ranks' records were merged
        self._rank: int | None = None
        self._gathered = False

    @staticmethod
    def _read(path: Path | None, key: str) -> dict[str, dict]:
        # records of earlier runs into the same folder; a damaged record file is started afresh
        if path is None or not path.is_file():
            return {}
        try:
            items = json.loads(path.read_text()).get(key, [])
        except (OSError, ValueError, AttributeError):
            return {}
        return {str(r["input"]): r for r in items if isinstance(r, dict) and "input" in r}

    def _load(self) -> None:
        if self._failed is None:
            self._failed = self._read(self.failures_path, "failed")
            self._predicted = self._read(self.predictions_path, "predictions")

    def _is_writer(self) -> bool:
        # in a torch.distributed run only rank 0 writes the record files: every rank of a multi-GPU evaluation
        # screens the same inputs, and two writers of one file would lose each other's records
        return (self._rank if self._rank is not None else _process_group()[0]) == 0

    def _write(self) -> None:
        if not self._is_writer():
            return
        failed = list(self._failed.values())
        if failed:
            write_json_atomic(self.failures_path, {"failed": failed, "n_failed": len(failed)})
        elif self.failures_path.is_file():
            self.failures_path.unlink()  # no stale record survives a run in which everything passed
        if self.predictions_path is not None and (self._predicted or self.predictions_path.is_file()):
            preds = list(self._predicted.values())
            write_json_atomic(self.predictions_path, {"predictions": preds, "n_predictions": len(preds)})

    def fail(self, input_id: str, reason: str, stage: str) -> None:
        """Record that ``input_id`` failed at ``stage`` (one log line); with ``strict``, raise instead."""
        input_id = str(input_id)
        reason = " ".join(str(reason).split())
        if reason.startswith(f"{input_id}: "):
            reason = reason[len(input_id) + 2 :]  # the record names the input already
        if self.strict:
            raise DataError(f"{input_id}: {reason} (stage {stage}; strict mode stops at the first failed input)")
        self._load()
        self.seen.add(input_id)
        self.run_failed.add(input_id)
        self._predicted.pop(input_id, None)
        self._failed[input_id] = {"input": input_id, "reason": reason, "stage": stage}
        _LOG.warning("input failed at %s: %s -- %s", stage, input_id, reason)
        self._write()

    def succeed(self, input_id: str, outputs: Mapping[str, Any] | None = None) -> None:
        """Record that ``input_id`` was processed, with its output files (merged into an earlier success record of
        this run); clears an earlier failure record of the same input."""
        input_id = str(input_id)
        self._load()
        self.seen.add(input_id)
        if input_id in self.run_failed:
            return  # a later stage of this run already failed it (e.g. a writer after the network)
        self._failed.pop(input_id, None)
        # an earlier run's record of the input is replaced, this run's is completed (network, then the writer)
        record = self._predicted.get(input_id, {}) if input_id in self.run_succeeded else {}
        self.run_succeeded.add(input_id)
        self._predicted[input_id] = {**record, "input": input_id, **dict(outputs or {})}
        self._write()

    def mark_seen(self, input_id: str) -> None:
        """Count ``input_id`` as an input of this run (it passed screening)."""
        self.seen.add(str(input_id))

    @property
    def failed(self) -> list[dict]:
        """The failure records of this run."""
        self._load()
        return [self._failed[i] for i in sorted(self.run_failed) if i in self._failed]

    def summary(self) -> str:
        """``"k of n inputs failed ..."`` for this run."""
        n, k = len(self.seen), len(self.run_failed)
        return f"{k} of {n} input(s) failed; reasons in {self.failures_path}" if k else f"all {n} input(s) processed"

    def gather(self, engine: Any = None) -> None:
        """Merge the records of this run from every rank of a ``torch.distributed`` process group into every rank;
        rank 0 writes the merged ``failed_inputs.json`` (and ``predictions.json``). A collective call: every rank
        must make it (``multi_gpu_evaluate.json``'s ``finalize`` does, before destroying the process group). Without
        a process group of more than one process it does nothing.

        Records are keyed by input, so an input recorded by several ranks (each rank screens the whole datalist) is
        listed once, and a failure on any rank wins over a success of the same input. Afterwards every rank holds
        the same outcome, so :meth:`finish` ends every rank with the same exit status.
        """
        rank, world = _process_group()
        self._rank = rank
        if world < 2:
            return
        import torch.distributed as dist

        self._load()
        mine = {"seen": sorted(self.seen),
                "failed": [self._failed[i] for i in sorted(self.run_failed) if i in self._failed],
                "predicted": [self._predicted[i] for i in sorted(self.run_succeeded - self.run_failed)
                              if i in self._predicted]}
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        for part in parts:
            self.seen.update(part["seen"])
            for rec in part["failed"]:
                i = str(rec["input"])
                self.run_failed.add(i)
                self.run_succeeded.discard(i)
                self._predicted.pop(i, None)
                self._failed[i] = rec
        for part in parts:
            for rec in part["predicted"]:
                i = str(rec["input"])
                if i in self.run_failed:
                    continue
                self._failed.pop(i, None)  # an earlier run's failure of an input another rank processed now
                # as in succeed(): an earlier run's record is replaced, this run's (from any rank) completed
                earlier = self._predicted.get(i, {}) if i in self.run_succeeded else {}
                self.run_succeeded.add(i)
                self._predicted[i] = {**earlier, **rec}
        self._gathered = True
        self._write()

    def finish(self, engine: Any = None, gather: bool = True) -> None:
        """End of the batch: log the summary. If inputs failed: :class:`InputsFailed` (exit status 3) when others
        were processed; a ``DataError`` listing the reasons when none was (a single bad input fails as it always
        did, with its reason, and a batch that produced nothing is not mistaken for a partial success).

        In a ``torch.distributed`` run the ranks' records are merged first (:meth:`gather`, a collective call, unless
        done already or ``gather=False``), so every rank ends with the same status."""
        if gather and not self._gathered:
            self.gather()
        self._load()
        self._write()
        if self.run_failed and not (self.seen - self.run_failed):
            shown = self.failed[:10]
            more = f"; ... and {len(self.run_failed) - len(shown)} more" if len(self.run_failed) > len(shown) else ""
            raise DataError(f"no input could be processed ({len(self.run_failed)} failed, listed in "
                            f"{self.failures_path}): " + "; ".join(f"{f['input']}: {f['reason']}" for f in shown)
                            + more)
        if self.run_failed:
            msg = f"batch finished with failures: {self.summary()}"
            _LOG.error(msg)
            raise InputsFailed(msg)
        _LOG.info("batch finished: %s", self.summary())


# ---------------------------------------------------------------------------------------------- size checks
def declared_dtype(path: str | Path) -> str | None:
    """The pixel type a NIfTI or ``.npy`` header declares (``None`` for other formats or an unreadable header).

    Checked before the loader runs because loaders that convert to float (the echo frame loader) would turn complex
    pixels into their real part without a word.
    """
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return str(nib.load(str(p)).header.get_data_dtype())
        if name.endswith(".npy"):
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                return str(read(f)[2])
    except Exception:  # the loader names the real problem of an unparsable header
        return None
    return None


def check_header(path: str | Path, limits: ReadLimits | None = None) -> None:
    """Refuse an input from its header alone, before any pixel is read: a declared size above ``limits``
    (:func:`common.data.loading.check_size`), a non-real declared pixel type. Formats the shared header reader
    does not know (HDF5 videos) are left to their loader, which checks the same limits."""
    from common.data.loading import check_size, header_shape, image_format

    if image_format(path) is not None:
        shape, samples = header_shape(path)
        check_size(shape, path, limits, samples)
    dtype = declared_dtype(path)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        raise DataError(f"{path}: pixel type {dtype} is not a real number type; expected real intensities")


def check_loaded(array: Any, path: str | Path, ndim: int | Sequence[int] | None = None,
                 frame_axis: int | None = None, allow_constant: bool = False,
                 limits: ReadLimits | None = None) -> None:
    """Check a loaded input before the network sees it (:func:`common.data.loading.check_image_array`: real dtype,
    dimensionality, empty or degenerate in-plane size, NaN/Inf, constant) plus its pixel and frame counts against
    ``limits``. ``frame_axis``: the frame axis of a ``(T, H, W)`` loader, moved last so the in-plane checks see
    ``(H, W)``."""
    from common.data.loading import check_image_array, get_limits

    lim = limits or get_limits()
    arr = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    if frame_axis is not None and arr.ndim >= 1:
        if arr.shape[frame_axis] > lim.max_frames:
            raise DataError(f"{path}: {arr.shape[frame_axis]} frames, more than the limit max_frames={lim.max_frames}")
        arr = np.moveaxis(arr, frame_axis, -1)
    if arr.size > lim.max_pixels:
        raise DataError(f"{path}: {arr.size:,} pixels, more than the limit max_pixels={lim.max_pixels:,}")
    check_image_array(arr, path, ndims=ndim, allow_constant=allow_constant, limits=lim)


def _as_array(loaded: Any) -> Any:
    # loaders return an array, a tuple whose first item is the array (load_frames) or an object holding it
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    for attr in ("array", "frames"):
        if hasattr(loaded, attr) and not isinstance(loaded, np.ndarray):
            return getattr(loaded, attr)
    return loaded


def _default_loader(path: str) -> Any:
    from common.data.io import read_image

    return read_image(path).array


def _screen_one(value: Any, load: Callable[[Any], Any], input_id: str, ndim: int | Sequence[int] | None,
                frame_axis: int | None, allow_constant: bool, limits: ReadLimits) -> BaseException | None:
    """The error that refuses one input value (a path or a list of paths), or ``None``."""
    paths = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        for p in paths:
            check_header(str(p), limits)
        arr = _as_array(load(value))
        check_loaded(arr, paths[0] if len(paths) == 1 else input_id, ndim=ndim, frame_axis=frame_axis,
                     allow_constant=allow_constant, limits=limits)
    except Exception as e:  # readers of corrupt files raise many unrelated types; each is this input's failure
        return e
    return None


def screen_inputs(entries: Sequence[Mapping[str, Any]], ledger: BatchLedger | str | Path | None = None,
                  loader: Callable[[Any], Any] | None = None, keys: str | Sequence[str] = "image",
                  ndim: int | Sequence[int] | None = None, frame_axis: int | None = None,
                  allow_constant: bool = False, max_pixels: int | None = None, max_frames: int | None = None,
                  stage: str = "screening", id_keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Keep the entries whose inputs pass :func:`check_header`, the bundle's ``loader`` and :func:`check_loaded`.

    Args:
        entries: datalist entries.
        ledger: where failures are recorded (a :class:`BatchLedger`, or an output folder for a new one); ``None``
            raises the first failure.
        loader: the bundle's reader, ``loader(entry[key])`` -> array, ``(array, ...)`` or an object with ``array``
            / ``frames`` (default: :func:`common.data.io.read_image`). Its ``DataError``/``FileNotFoundError`` name
            the file; any other exception is reported with its type.
        keys: the entry keys holding input paths (all are checked; empty values are skipped).
        ndim, frame_axis, allow_constant: see :func:`check_loaded`.
        max_pixels, max_frames: limits for this screening (default: the process-wide
            :func:`common.data.loading.get_limits`, which the bundle configs set from the same knobs).
        stage: the stage name written with each failure.
        id_keys: the entry keys naming the input in the record (default ``keys``; e.g. a pair is recorded under its
            source image while its mask is screened).

    Returns the passing entries (copies). When every input failed, a ``DataError`` lists the reasons (the record
    is written; see :meth:`BatchLedger.finish`); with ``ledger.strict`` the first failure raises ``DataError``.
    """
    from dataclasses import replace

    from common.data.loading import get_limits

    ledger = ledger if isinstance(ledger, BatchLedger) or ledger is None else BatchLedger(ledger)
    load = loader or _default_loader
    key_list = [keys] if isinstance(keys, str) else list(keys)
    id_list = key_list if id_keys is None else ([id_keys] if isinstance(id_keys, str) else list(id_keys))
    limits = get_limits()
    limits = replace(limits, **{k: int(v) for k, v in (("max_pixels", max_pixels), ("max_frames", max_frames))
                                if v is not None})
    kept = []
    # entries may share files (the slices of one volume, one target for many sources): each is read once
    verdicts: dict[str, BaseException | None] = {}
    for entry in entries:
        input_id = entry_input(entry, id_list)
        try:
            for k in key_list:
                value = entry.get(k)
                if not value:
                    continue
                seen_key = json.dumps(value if isinstance(value, (list, tuple)) else str(value), default=str)
                if seen_key not in verdicts:
                    verdicts[seen_key] = _screen_one(value, load, input_id, ndim, frame_axis, allow_constant, limits)
                if verdicts[seen_key] is not None:
                    raise verdicts[seen_key]
        except Exception as e:  # readers of corrupt files raise many unrelated types; each is this input's failure
            if ledger is None:
                raise
            ledger.fail(input_id, describe_error(e), stage)
            continue
        if ledger is not None:
            ledger.mark_seen(input_id)
        kept.append(dict(entry))
    if not kept:
        if ledger is not None and ledger.run_failed and not (ledger.seen - ledger.run_failed):
            # raises DataError with the reasons: nothing left to run. No gathering: every rank of a distributed
            # run screens the same datalist and fails here alike, and a collective call on this error path could
            # wait forever for a rank that did not fail
            ledger.finish(gather=False)
        raise DataError("no input given" if not entries else "no usable input")
    return kept


# ---------------------------------------------------------------------------------------------- per-case guards
class GuardedDataset(Dataset):
    """A MONAI ``Dataset`` whose samples carry their input (``INPUT_ID_KEY``) and which turns a failing transform
    into a failure marker ``{FAILED_KEY: JSON}`` instead of an exception (recorded by :class:`CaseGuard` in the main
    process, so it also works with DataLoader workers). Needs ``batch_size=1`` (a marker does not collate with a
    real sample).

    Args:
        data, transform: as ``monai.data.Dataset``.
        input_keys: the entry keys naming the input (see :func:`entry_input`).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None,
                 input_keys: Sequence[str] = ("image",)) -> None:
        super().__init__(data=data, transform=transform)
        self.input_keys = [input_keys] if isinstance(input_keys, str) else list(input_keys)

    def _transform(self, index: int) -> Any:
        input_id = entry_input(self.data[index], self.input_keys)
        try:
            out = super()._transform(index)
        except Exception as e:  # any transform failure is this case's failure, reported by CaseGuard
            return {FAILED_KEY: json.dumps({"input": input_id, "reason": describe_error(e), "stage": "preprocessing"})}
        if isinstance(out, dict):
            out[INPUT_ID_KEY] = input_id
        return out


def _batch_ids(batch: Any) -> list[str]:
    ids = batch.get(INPUT_ID_KEY) if isinstance(batch, Mapping) else None
    if ids is None:
        return []
    return [str(ids)] if isinstance(ids, str) else [str(i) for i in ids]


class CaseGuard:
    """Per-case isolation for an ignite/MONAI engine: a case whose preprocessing (a :class:`GuardedDataset` marker),
    network or in-iteration postprocessing (e.g. ``SaveImaged``) fails is recorded in the ledger and its iteration
    returns an empty output; the run goes on. Cases that pass are recorded as predictions (with the ``saved_to``
    path of ``SaveImaged(savepath_in_metadict=True)`` outputs). Handlers that run after the iteration must skip
    empty outputs (the bundles' writers do).

    Wraps the engine's process function (ignite keeps it in ``Engine._process_function``; there is no public hook
    that lets an iteration fail without ending the run).

    Args:
        ledger: the :class:`BatchLedger`.
        output_key: the output key whose ``saved_to`` metadata names the written file.
    """

    def __init__(self, ledger: BatchLedger, output_key: str = "pred") -> None:
        self.ledger = ledger
        self.output_key = output_key

    def attach(self, engine: Any) -> None:
        original = engine._process_function

        def guarded(eng: Any, batch: Any) -> Any:
            if isinstance(batch, Mapping) and FAILED_KEY in batch:
                markers = batch[FAILED_KEY]
                for m in [markers] if isinstance(markers, str) else markers:
                    rec = json.loads(m)
                    self.ledger.fail(rec["input"], rec["reason"], rec["stage"])
                return {}
            ids = _batch_ids(batch)
            try:
                out = original(eng, batch)
            except Exception as e:  # this case's failure; the next case is independent
                if self.ledger.strict or not ids:
                    raise
                for i in ids:
                    self.ledger.fail(i, describe_error(e), "inference")
                return {}
            for i, item in zip(ids, out if isinstance(out, list) else [out] * len(ids)):
                self.ledger.succeed(i, self._outputs(item))
            return out

        engine._process_function = guarded

    def _outputs(self, item: Any) -> dict:
        pred = item.get(self.output_key) if isinstance(item, Mapping) else None
        saved = getattr(pred, "meta", {}).get("saved_to") if pred is not None else None
        return {"output": str(saved)} if saved else {}
