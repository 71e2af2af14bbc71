"""It learns: a short CPU training of the bundle beats the zero-motion predictor on held-out synthetic videos.

The data are written in the open tracking HDF5 layout in two sub-folders (two "datasets") and reached through
``--dataset_dir``, so this is also the real-layout check: the bundle trains and evaluates such a folder unchanged.
Reduced configuration (README, "Measured numbers"): 128 x 128 input, 8-frame clips, batch 2, 6 epochs (168
iterations), the paper's baseline training (``augment=false``: the full impartial-motion set needs more iterations
than a CI test has); network, loss, optimiser, schedule and evaluation are the bundle's.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest

from common.data.synthetic.echo_layouts import write_tracking_h5

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

LEARNING = {"spatial_size": 128, "clip_len": 8, "batch_size": 2, "epochs": 6, "val_interval": 6, "augment": False,
            "val_fraction": 0.1, "test_fraction": 0.4}


def test_short_training_beats_zero_motion_on_held_out_videos(specknet, tmp_path):
    from monai.bundle import run

    data = tmp_path / "tracking_layout"
    for name, seed in (("D", 11), ("E", 12)):
        write_tracking_h5(data / name, n_videos=7, seed=seed, image_size=(128, 128), n_frames=32, n_points=16,
                          progress=False)
    root, out = tmp_path / "bundle", tmp_path / "bundle" / "eval"
    common = {"meta_file": str(specknet.CONFIGS / "metadata.json"), "logging_file": str(specknet.CONFIGS /
              "logging.conf"), "bundle_root": str(root), "output_dir": str(out), "dataset_dir": str(data), **LEARNING}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(specknet.CONFIGS / "train.json"), **common)
        train_s = time.perf_counter() - t0
        run(config_file=[str(specknet.CONFIGS / "train.json"), str(specknet.CONFIGS / "evaluate.json")], **common)
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    print(f"\nlearning test: train {train_s:.0f} s, total {time.perf_counter() - t0:.0f} s on {int(m['n_videos'])} "
          f"held-out videos: delta_avg {m['delta_avg']:.1f} (zero motion {m['zero_motion_delta_avg']:.1f}), "
          f"MTE {m['mte']:.2f} px (zero motion {m['zero_motion_mte']:.2f}), GLS MAD {m['gls_mad']:.2f} %")
    assert m["n_videos"] == 4
    # an untrained network reaches delta_avg ~47 here, the zero-motion answer ~80: only real tracking beats it
    assert m["delta_avg"] >= m["zero_motion_delta_avg"] + 5.0
    assert m["mte"] <= 0.75 * m["zero_motion_mte"]
    assert set(report["per_dataset"]) == {"D", "E"}  # the sub-folders are the datasets of the per-dataset table
