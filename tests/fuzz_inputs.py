"""Malformed medical-image inputs for the bundles' fuzz tests, made from real files.

The sources are files no one here wrote -- nibabel's test data (``anatomical.nii``, ``standard.nii.gz``, the oblique
``reoriented_anat_moved.nii``) and pydicom's / pydicom-data's (``CT_small.dcm``, ``MR_small.dcm``, the multi-frame
``emri_small.dcm``, the ultrasound ``US1_UNCR.dcm``, always fetched one by one with ``get_testdata_file(name)``: its
``'*'`` glob walks every installed data set and hangs) -- re-encoded with our own writers where a test needs another
format. Each generator writes files that no loader may accept: truncations, byte flips and random bytes under
medical-image names, header edits (a crafted header claiming a huge size, missing or short MetaImage ``.raw``, DICOM
without pixel data, rows or with a transfer syntax no decoder handles), and dtype/shape changes (0 frames, 4D/5D,
1x1, a 5000x3 strip, NaN/Inf, complex, constant, object ``.npy``). Every function returns the paths it wrote, each
with a note of what was done to it.

Import with ``from tests.fuzz_inputs import ...`` (pytest's importlib mode; the repository root is on sys.path).
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "HUGE_CLAIM",
    "array_variants",
    "byte_variants",
    "check_fuzz_outcome",
    "copy_good",
    "dicom_file",
    "dicom_variants",
    "mhd_variants",
    "nibabel_file",
    "nifti_header_variants",
    "refused_from_header",
    "run_cli_with_peak_rss",
    "untrained_checkpoint",
    "us_cine",
    "write_array",
]

# a header claiming 30000 x 30000 x 2000 voxels (1.8e12; ~7 TB as float32) over a few hundred real bytes (NIfTI-1
# dimensions are int16)
HUGE_CLAIM = (30000, 30000, 2000)

Made = dict[Path, str]


def nibabel_file(name: str) -> Path:
    """A file of nibabel's test data (e.g. ``anatomical.nii``)."""
    from nibabel.testing import data_path

    return Path(data_path) / name


def dicom_file(name: str) -> Path:
    """A pydicom / pydicom-data test file by exact name (never the ``'*'`` glob)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    return Path(path)


# --------------------------------------------------------------------------------------------------- writers
def write_array(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI (``.nii``/``.nii.gz``), MetaImage (``.mha``/``.mhd``) or NumPy (``.npy``) with no
    checks, whatever its dtype or shape."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    elif name.endswith((".mha", ".mhd")):
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    elif name.endswith(".npy"):
        np.save(path, array, allow_pickle=True)
    else:
        raise ValueError(f"write_array: unknown format {path}")
    return path


# --------------------------------------------------------------------------------------------- byte mutations
def byte_variants(source: Path, folder: Path, prefix: str, suffix: str, seed: int = 0,
                  fractions: Sequence[float] = (0.02, 0.3, 0.7), header_flips: int = 2) -> Made:
    """Zero-byte file, random bytes, truncations of ``source`` at ``fractions`` of its size, and the first
    bytes (magic number, header size) overwritten -- all named ``<prefix>_...<suffix>``."""
    rng = np.random.default_rng(seed)
    data = source.read_bytes()
    out: Made = {}

    def put(tag: str, payload: bytes, note: str) -> None:
        p = folder / f"{prefix}_{tag}{suffix}"
        p.write_bytes(payload)
        out[p] = note

    put("zero", b"", "zero-byte file")
    put("random", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "random bytes with a medical extension")
    for f in fractions:
        put(f"trunc{int(f * 100):02d}", data[: max(1, int(len(data) * f))], f"{source.name} truncated at {f:.0%}")
    # where each format keeps its magic number: overwriting it (and the bytes after the start) breaks the file
    # (a NIfTI reader repairs a wrong header size at byte 0, a DICOM reader ignores the 128-byte preamble)
    magic = {".nii": 344, ".dcm": 128, ".dicom": 128}.get(suffix, 0)
    for i in range(header_flips):
        flipped = bytearray(data)
        start = magic + i * 2
        flipped[start : start + 4] = bytes((b ^ 0xA5) for b in flipped[start : start + 4])
        flipped[i * 4 : i * 4 + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        if suffix.endswith(".gz"):
            flipped[:2] = b"\x00\x00"  # never a valid gzip magic by chance
        put(f"flip{i}", bytes(flipped), f"{source.name} with its magic bytes flipped")
    return out


def nifti_header_variants(volume: np.ndarray, folder: Path, prefix: str) -> Made:
    """NIfTI files whose header lies: dimensions claiming :data:`HUGE_CLAIM` voxels over a few real bytes (plain and
    gzipped), a voxel offset past the end of the file, a wrong magic string."""
    import nibabel as nib

    out: Made = {}
    img = nib.Nifti1Image(volume.astype(np.float32), np.eye(4))
    raw = img.header.binaryblock + b"\x00" * 4 + volume.astype(np.float32).tobytes()
    hdr = img.header.copy()
    hdr.set_data_shape(HUGE_CLAIM)
    huge = hdr.binaryblock + b"\x00" * 4 + volume.astype(np.float32).tobytes()[:512]
    for name, payload, note in [
        (f"{prefix}_hugeclaim.nii", huge, f"header claims {HUGE_CLAIM} voxels"),
        (f"{prefix}_hugeclaim.nii.gz", gzip.compress(huge), f"gzipped header claims {HUGE_CLAIM} voxels"),
    ]:
        (folder / name).write_bytes(payload)
        out[folder / name] = note
    hdr = img.header.copy()
    hdr["vox_offset"] = len(raw) + 4096
    p = folder / f"{prefix}_offset.nii"
    p.write_bytes(hdr.binaryblock + b"\x00" * 4 + volume.astype(np.float32).tobytes())
    out[p] = "voxel offset past the end of the file"
    bad_magic = bytearray(raw)
    bad_magic[344:348] = b"xx1\x00"
    p = folder / f"{prefix}_magic.nii"
    p.write_bytes(bytes(bad_magic))
    out[p] = "wrong NIfTI magic"
    return out


def mhd_variants(volume: np.ndarray, folder: Path, prefix: str) -> Made:
    """MetaImage ``.mhd`` files: the ``.raw`` missing, the ``.raw`` short by half, ``DimSize`` claiming
    :data:`HUGE_CLAIM`, an unknown ``ElementType``, and a ``.mha`` whose header says 5 dimensions."""
    import SimpleITK as sitk

    out: Made = {}
    vol = np.ascontiguousarray(volume.astype(np.float32))
    base = folder / f"{prefix}_mhdbase.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(base), useCompression=False)
    header = base.read_text()
    raw = base.with_suffix(".raw").read_bytes()
    base.unlink()
    base.with_suffix(".raw").unlink()

    def put(tag: str, text: str, raw_bytes: bytes | None, note: str) -> None:
        p = folder / f"{prefix}_{tag}.mhd"
        p.write_text(text.replace(f"{prefix}_mhdbase.raw", f"{prefix}_{tag}.raw"))
        if raw_bytes is not None:
            p.with_suffix(".raw").write_bytes(raw_bytes)
        out[p] = note

    dims = " ".join(str(s) for s in reversed(vol.shape))
    put("noraw", header, None, "MetaImage without its .raw")
    put("shortraw", header, raw[: len(raw) // 2], "MetaImage with a .raw half as long as the header says")
    put("hugeclaim", header.replace(f"DimSize = {dims}", "DimSize = " + " ".join(map(str, HUGE_CLAIM))), raw,
        f"DimSize claims {HUGE_CLAIM} voxels")
    put("eltype", header.replace("MET_FLOAT", "MET_NOSUCHTYPE"), raw, "unknown ElementType")
    p = folder / f"{prefix}_ndims5.mha"
    text = header.replace("NDims = 3", "NDims = 5").replace(f"ElementDataFile = {prefix}_mhdbase.raw",
                                                             "ElementDataFile = LOCAL")
    p.write_bytes(text.encode() + raw)
    out[p] = "MetaImage header with NDims = 5 over 3D data"
    return out


def array_variants(folder: Path, prefix: str, suffixes: Sequence[str], frame: np.ndarray,
                   sequence: bool, seed: int = 0) -> Made:
    """Arrays no image loader may accept, written in each of ``suffixes``: 0 frames, 4D and 5D, 1x1, a 5000x3
    strip, NaN, +Inf, complex, constant (and, for ``.npy``, object and string dtypes). ``frame`` is a good 2D
    image to start from; with ``sequence`` the valid shape is ``(T, H, W)``, else ``(H, W)`` (then a 3D volume is
    ``(H, W, D)``; dimension-count variants are relative to that)."""
    rng = np.random.default_rng(seed)
    f = frame.astype(np.float32)
    good = np.stack([f, f[::-1]], 0) if sequence else f
    variants: dict[str, tuple[np.ndarray, str]] = {
        "zeroframes": (np.zeros((0, *f.shape), np.float32), "0 frames"),
        "dim4": (np.stack([good] * 2, -1).astype(np.float32) if good.ndim == 3 else good[..., None, None] *
                 np.ones((1, 1, 2, 2), np.float32), "4D array"),
        "dim5": (rng.random((2, 3, 8, 8, 8)).astype(np.float32), "5D array"),
        "px1x1": (np.ones((1, 1), np.float32) if not sequence else np.ones((3, 1, 1), np.float32), "1x1 pixels"),
        "strip": (rng.random((5000, 3)).astype(np.float32) if not sequence else
                  rng.random((2, 5000, 3)).astype(np.float32), "5000x3 strip"),
        "nan": (np.where(rng.random(good.shape) < 0.01, np.nan, good).astype(np.float32), "NaN pixels"),
        "inf": (np.where(rng.random(good.shape) < 0.01, np.inf, good).astype(np.float32), "+Inf pixels"),
        "complex": ((good + 1j * good[..., ::-1]).astype(np.complex64), "complex pixels"),
        "constant": (np.full(good.shape, 7.0, np.float32), "constant image"),
    }
    out: Made = {}
    for suffix in suffixes:
        tag = suffix.strip(".").replace(".", "")
        for name, (arr, note) in variants.items():
            if suffix in (".mha", ".mhd") and (name == "complex" or arr.size == 0 or arr.ndim > 4):
                continue  # SimpleITK cannot write these; the NIfTI/NumPy copies cover them
            p = folder / f"{prefix}_{name}_{tag}{suffix}"
            write_array(p, arr)
            out[p] = f"{note} ({suffix})"
        if suffix == ".npy":
            p = folder / f"{prefix}_object.npy"
            np.save(p, np.array([{"pickled": "payload"}, None], dtype=object), allow_pickle=True)
            out[p] = "object .npy (would need allow_pickle)"
            p = folder / f"{prefix}_strings.npy"
            np.save(p, np.array([["a", "b"], ["c", "d"]]))
            out[p] = "string .npy"
    return out


def dicom_variants(folder: Path, prefix: str, source: Path | None = None, suffix: str = ".dcm") -> Made:
    """DICOM files made from ``source`` (default pydicom's ``CT_small.dcm``): truncated in the header and in the
    pixel data, the ``DICM`` prefix overwritten, ``PixelData`` deleted, ``Rows`` deleted, a transfer syntax no
    installed decoder handles (MPEG2), rows/columns/frames claiming :data:`HUGE_CLAIM` voxels, and, for a
    multi-frame source, ``NumberOfFrames = 0``."""
    import pydicom

    src = source or dicom_file("CT_small.dcm")
    data = src.read_bytes()
    multiframe = "NumberOfFrames" in pydicom.dcmread(str(src), stop_before_pixels=True)
    out: Made = {}

    def put(tag: str, payload: bytes, note: str) -> None:
        p = folder / f"{prefix}_{tag}{suffix}"
        p.write_bytes(payload)
        out[p] = note

    def edited(tag: str, note: str, edit: Callable[[pydicom.Dataset], None]) -> None:
        ds = pydicom.dcmread(str(src))
        edit(ds)
        p = folder / f"{prefix}_{tag}{suffix}"
        ds.save_as(str(p), enforce_file_format=True)
        out[p] = note

    put("dcmtrunchdr", data[:300], f"{src.name} truncated in the header")
    put("dcmtruncpix", data[: len(data) - len(data) // 3], f"{src.name} truncated in the pixel data")
    bad = bytearray(data)
    bad[128:132] = b"XXXX"
    put("dcmnomagic", bytes(bad), "DICM prefix overwritten")
    edited("dcmnopixels", "PixelData deleted", lambda ds: delattr(ds, "PixelData"))
    edited("dcmnorows", "Rows deleted", lambda ds: delattr(ds, "Rows"))

    def mpeg2(ds: pydicom.Dataset) -> None:
        from pydicom.encaps import encapsulate

        # the native pixel bytes encapsulated as if they were an MPEG2 Main Profile stream: no decoder exists
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")

    edited("dcmmpeg2", "transfer syntax MPEG2 (no decoder)", mpeg2)

    def huge(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = HUGE_CLAIM[0], HUGE_CLAIM[1]
        ds.NumberOfFrames = HUGE_CLAIM[2]

    edited("dcmhugeclaim", f"rows/columns/frames claim {HUGE_CLAIM} voxels", huge)
    if multiframe:
        edited("dcmzeroframes", "NumberOfFrames = 0", lambda ds: setattr(ds, "NumberOfFrames", 0))
    return out


def us_cine(path: Path, n_frames: int = 3) -> Path:
    """A multi-frame ultrasound DICOM made from pydicom's single-frame ``US1_UNCR.dcm`` (RGB, 480 x 640): its
    frame shifted by a few pixels per frame, ``NumberOfFrames`` set, everything else as the scanner wrote it."""
    import pydicom

    ds = pydicom.dcmread(str(dicom_file("US1_UNCR.dcm")))
    frame = ds.pixel_array
    ds.NumberOfFrames = n_frames
    ds.PixelData = np.ascontiguousarray(np.stack([np.roll(frame, 3 * t, axis=1) for t in range(n_frames)])).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------------------ running
# The peak is read from /proc/self/status (VmHWM, the high-water mark of this process's own address space), not
# from getrusage: Linux carries ru_maxrss across fork + exec, so it would report the parent pytest process's size.
_RSS_WRAPPER = """
import runpy, sys
out = sys.argv[1]
sys.argv = ["monai.bundle", *sys.argv[2:]]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(peak_kib)
"""


def run_cli_with_peak_rss(args: Sequence[str], rss_file: Path, env: dict[str, str] | None = None,
                          cwd: Path | None = None, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m monai.bundle <args>`` in a subprocess that reports its own peak RSS; returns the completed
    process and the peak in MiB (VmHWM is in KiB)."""
    proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    rss = float(rss_file.read_text()) / 1024 if rss_file.is_file() else float("nan")
    return proc, rss


def copy_good(source: Path, folder: Path, name: str) -> Path:
    """A copy of a good input under ``name``."""
    dst = folder / name
    shutil.copyfile(source, dst)
    return dst



def untrained_checkpoint(config_file: Path, overrides: dict, path: Path) -> Path:
    """Save the (untrained) weights of the config's ``network_def`` with ``overrides`` applied: a checkpoint the
    bundle's ``CheckpointLoader`` accepts, made in a second instead of a training run."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(dict(overrides))
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


def check_fuzz_outcome(proc: subprocess.CompletedProcess, out_dir: Path, bad: Sequence[str],
                       good: Sequence[str]) -> dict[str, dict]:
    """Assert the batch contract on a finished CLI run: exit status 3, no traceback, every ``bad`` input listed
    once in ``failed_inputs.json`` with a reason and a stage, no ``good`` input listed. Returns the records by
    input."""
    from common.engines.screening import EXIT_INPUTS_FAILED

    log = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_INPUTS_FAILED, f"exit {proc.returncode}:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-6000:]
    assert "batch finished with failures" in proc.stderr + proc.stdout
    records = json.loads((out_dir / "failed_inputs.json").read_text())["failed"]
    by_input = {r["input"]: r for r in records}
    assert len(by_input) == len(records), "an input is listed twice"
    missing = sorted(set(bad) - set(by_input))
    assert not missing, f"bad inputs not listed in failed_inputs.json: {missing}"
    wrongly = sorted(set(good) & set(by_input))
    assert not wrongly, f"good inputs listed as failed: {[by_input[g] for g in wrongly]}"
    for r in records:
        assert r["reason"].strip() and r["stage"] in ("datalist", "screening", "preprocessing", "inference",
                                                      "writing"), r
    return by_input


def refused_from_header(reason: str) -> bool:
    """True when a failure reason says the input was refused from its header (the size limit, or an uncompressed
    file shorter than its header claims) -- not after allocating what a crafted header asks for."""
    return "max_pixels" in reason or "where the header needs" in reason
