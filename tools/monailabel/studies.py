"""Synthetic studies for the MONAI Label server: one study per kind of input the four bundles take.

``python -m tools.monailabel.studies <out_dir> [--image_size 128] [--seed 0]`` writes a MONAI Label local datastore
folder (images at the top, saved labels under ``labels/final/``):

* ``echo_4ch_ed.nii.gz`` (a 2D apical frame) and ``echo_4ch_cine.nii.gz`` (its ED -> ES cine, 2D+t) for
  ``botm_seg``; the cine's reference label is saved as its label (``specknet_tracking`` takes its myocardium at the
  query frame as the points to track);
* ``ct_heart.nii.gz`` and ``mr_heart.nii.gz`` (whole-heart volumes, modality told by the file name) for
  ``lssc_multimodal``;
* ``pair0001_source.nii.gz`` and ``pair0001_target.nii.gz`` (a registration pair) for ``adacs_registration``, the
  source's myocardium saved as its label (the label the registration warps).

Everything comes from the simulators of :mod:`common.data.synthetic` (deterministic in ``seed``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import fire

__all__ = ["write_studies", "main"]


def write_studies(out_dir: str | Path, image_size: int = 128, n_frames: int = 8, seed: int = 0,
                  volume_size: int = 64) -> Path:
    """Write the synthetic studies (module docstring) into ``out_dir`` (created; existing files are kept and a
    complete folder is left as it is). Returns ``out_dir``."""
    from common.data.synthetic.echo_layouts import write_camus
    from common.data.synthetic.mmwhs import write_mmwhs
    from common.data.synthetic.registration import write_registration_pairs

    out = Path(out_dir)
    names = ["echo_4ch_ed.nii.gz", "echo_4ch_cine.nii.gz", "ct_heart.nii.gz", "mr_heart.nii.gz",
             "pair0001_source.nii.gz", "pair0001_target.nii.gz"]
    if all((out / n).is_file() for n in names):
        return out
    labels = out / "labels" / "final"
    labels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cardiac-label-studies-") as tmp:
        t = Path(tmp)
        camus = write_camus(t / "camus", n_patients=1, seed=seed, image_size=(image_size, image_size),
                            n_frames=n_frames, views=("4CH",), progress=False) / "patient0001"
        shutil.copy(camus / "patient0001_4CH_ED.nii.gz", out / names[0])
        shutil.copy(camus / "patient0001_4CH_half_sequence.nii.gz", out / names[1])
        shutil.copy(camus / "patient0001_4CH_half_sequence_gt.nii.gz", labels / names[1])
        cases = write_mmwhs(t / "mmwhs", n_ct=1, n_mr=1, seed=seed, ct_shape=(volume_size,) * 3,
                            mr_shape=(volume_size,) * 3, progress=False)
        shutil.copy(cases["ct"][0][0], out / names[2])
        shutil.copy(cases["mr"][0][0], out / names[3])
        src = write_registration_pairs(t / "reg", n_pairs=1, seed=seed, modality="echo",
                                       shape=(image_size, image_size), progress=False)[0]
        shutil.copy(src, out / names[4])
        shutil.copy(src.with_name("pair0001_target.nii.gz"), out / names[5])
        shutil.copy(src.with_name("pair0001_source_myo.nii.gz"), labels / names[4])
    return out


def main() -> None:
    """Command line: ``python -m tools.monailabel.studies <out_dir> [--image_size N] [--seed S]``."""
    fire.Fire(write_studies)


if __name__ == "__main__":
    main()
