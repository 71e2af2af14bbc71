"""The MONAI Label app through a real server (REST API): info, the four infer tasks, training from a correction.

Labels returned by the server are compared with the bundles' own ``inference.json`` run in this (main) venv on the
same image and checkpoint, and with the image's shape and geometry.
"""

from __future__ import annotations

import base64
import email
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.tools.monailabel.conftest import BUNDLES, TINY, LabelServer

pytestmark = pytest.mark.server


def _multipart(resp) -> tuple[dict, bytes | None]:
    """``output=all`` answer -> ``(params JSON, label file bytes)``."""
    msg = email.message_from_bytes(b"Content-Type: " + resp.headers["content-type"].encode() + b"\r\n\r\n"
                                   + resp.content)
    params, image = {}, None
    for part in msg.get_payload():
        name = part.get_param("name", header="content-disposition")
        body = part.get_payload(decode=True)
        if name == "params":
            params = json.loads(body)
        elif name == "image":
            image = body
    return params, image


def _infer(server: LabelServer, model: str, image: str, tmp_path: Path, params: dict | None = None
           ) -> tuple[dict, nib.Nifti1Image | None]:
    r = server.post(f"/infer/{model}", params={"image": image, "output": "all"},
                    data={"params": json.dumps(params or {})})
    res, body = _multipart(r) if r.headers["content-type"].startswith("multipart") else (r.json(), None)
    if body is None:
        return res, None
    out = tmp_path / f"{model}_{image}.nii.gz"
    out.write_bytes(body)
    return res, nib.load(out)


def _bundle_inference(model: str, image: Path, ckpt: Path, out_dir: Path, **extra) -> Path:
    """Run the bundle's own inference.json (this venv, in process) on ``image``; returns the output folder."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(BUNDLES / model / "configs" / "inference.json"), workflow_type="infer",
                        bundle_root=str(BUNDLES / model), ckpt_path=str(ckpt), output_dir=str(out_dir),
                        input_path=str(image), device="$torch.device('cpu')", strict=True, **TINY[model], **extra)
    wf.initialize()
    wf.run()
    wf.finalize()
    return out_dir


def _same_grid(label: nib.Nifti1Image, image: Path) -> None:
    ref = nib.load(image)
    assert label.shape == ref.shape, f"label shape {label.shape} != image shape {ref.shape}"
    np.testing.assert_allclose(label.affine, ref.affine, atol=1e-5)


def test_info_lists_the_four_models_with_their_labels(label_server):
    info = label_server.get("/info/").json()
    models = info["models"]
    assert set(models) == {"botm_seg", "lssc_multimodal", "specknet_tracking", "adacs_registration"}
    assert models["botm_seg"]["labels"] == {"LV": 1, "Myo": 2, "LA": 3}
    assert models["lssc_multimodal"]["labels"] == {"LVM": 1, "LAC": 2, "LVC": 3, "AA": 4}
    assert models["specknet_tracking"]["labels"] == {"tracked_points": 1}
    assert models["adacs_registration"]["labels"] == {"RV": 1, "Myo": 2, "LV": 3}
    assert all(m["checkpoint_exists"] for m in models.values())
    assert "botm_seg" in info["trainers"]
    assert {"random", "first"} <= set(info["strategies"])


@pytest.mark.parametrize("image", ["echo_4ch_ed", "echo_4ch_cine"])
def test_botm_infer_equals_the_bundles_own_inference(label_server, tmp_path, image):
    res, label = _infer(label_server, "botm_seg", image, tmp_path)
    src = label_server.studies / f"{image}.nii.gz"
    _same_grid(label, src)
    got = np.asarray(label.dataobj)
    assert set(np.unique(got).tolist()) <= {0, 1, 2, 3}
    assert res["n_frames"] == (1 if image.endswith("_ed") else nib.load(src).shape[-1])
    out = _bundle_inference("botm_seg", src, label_server.ckpts["botm_seg"], tmp_path / "ref", save_png=False)
    ref = json.loads((out / "predictions.json").read_text())["cases"][0]["masks"][0]
    np.testing.assert_array_equal(got, np.asarray(nib.load(ref).dataobj))


def test_a_bad_input_gets_a_clear_message(label_server):
    import requests

    # a registration needs a pair: an image that is not a *_source file, without a target, is refused by the bundle
    r = requests.post(label_server.url + "/infer/adacs_registration", params={"image": "ct_heart", "output": "json"},
                      timeout=120)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("adacs_registration: ValueError") and "ct_heart.nii.gz" in detail, detail
    assert "target" in detail, detail


@pytest.mark.parametrize(("image", "params"), [("ct_heart", {}), ("mr_heart", {"modality": "mr"})])
def test_lssc_infer_ct_and_mr(label_server, tmp_path, image, params):
    res, label = _infer(label_server, "lssc_multimodal", image, tmp_path, params)
    src = label_server.studies / f"{image}.nii.gz"
    _same_grid(label, src)
    got = np.asarray(label.dataobj)
    assert set(np.unique(got).tolist()) <= {0, 1, 2, 3, 4}
    out = _bundle_inference("lssc_multimodal", src, label_server.ckpts["lssc_multimodal"], tmp_path / "ref",
                            **({"modality": params["modality"]} if params else {}))
    (ref,) = sorted((out / "predictions").glob("*_seg.nii*"))
    np.testing.assert_array_equal(got, np.asarray(nib.load(ref).dataobj))


def test_specknet_tracks_gls_and_label_rendering(label_server, tmp_path):
    # the cine's saved label (its myocardium at the query frame) gives the points to track
    res, label = _infer(label_server, "specknet_tracking", "echo_4ch_cine", tmp_path, {"n_points": 12})
    src = label_server.studies / "echo_4ch_cine.nii.gz"
    t = nib.load(src).shape[-1]
    tracks = np.asarray(res["tracks"])
    assert tracks.shape == (t, 12, 2)
    assert res["gls_percent"] is not None and np.isfinite(res["gls_percent"])
    assert len(res["strain_curve"]["strain_percent"]) == t
    assert "centre line" in res["query_source"]
    _same_grid(label, src)
    frames = np.asarray(label.dataobj).transpose(2, 1, 0)  # (T, H, W): index order (W, H, T) of the cine
    assert set(np.unique(frames).tolist()) == {0, 1}
    for f in range(t):  # every tracked point is drawn where it is, on its frame
        for x, y in tracks[f]:
            assert frames[f, int(round(y)), int(round(x))] == 1


def test_specknet_with_query_points(label_server, tmp_path):
    pts = [[20.0, 30.0], [40.0, 30.0], [32.0, 12.0]]
    res, _ = _infer(label_server, "specknet_tracking", "echo_4ch_cine", tmp_path,
                    {"points": pts, "query_frame": 1})
    tracks = np.asarray(res["tracks"])
    assert tracks.shape[1] == 3
    np.testing.assert_allclose(tracks[1], pts, atol=1e-3)  # query points are returned exactly on their frame


def test_adacs_pair_warped_label_and_displacement(label_server, tmp_path):
    res, label = _infer(label_server, "adacs_registration", "pair0001_source", tmp_path,
                        {"target": "pair0001_target"})
    target = label_server.studies / "pair0001_target.nii.gz"
    _same_grid(label, target)
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) <= {0, 1}
    disp_file = tmp_path / "disp.nii.gz"
    raw = base64.b64decode(res["displacement_nifti_gz_b64"])
    assert gzip.decompress(raw)[344:348] == b"n+1\0"  # a gzip of a single-file NIfTI-1
    disp_file.write_bytes(raw)
    disp = nib.load(disp_file)
    assert disp.shape == (*nib.load(target).shape, 2)
    assert np.isfinite(np.asarray(disp.dataobj)).all()
    assert 0.0 <= res["nonpositive_jacobian_percent"] <= 100.0


def test_strategies_pick_an_unlabelled_image(label_server):
    first = label_server.post("/activelearning/first").json()
    labelled = {"echo_4ch_cine", "pair0001_source"}
    assert first["id"] not in labelled
    rand = label_server.post("/activelearning/random").json()
    assert rand["id"] not in labelled
    # epistemic: BOTM's mean softmax entropy over the unlabelled echo images (botm_seg_train_images=echo_*)
    ent = label_server.post("/activelearning/botm_entropy").json()
    assert set(ent["scores"]) == {"echo_4ch_ed"}
    assert ent["id"] == max(ent["scores"], key=ent["scores"].get)
    assert 0.0 < ent["mean_entropy"] <= 1.0


@pytest.mark.slow
def test_corrected_label_trains_botm_and_next_infer_uses_it(label_server, tmp_path):
    import torch

    ckpt = label_server.ckpts["botm_seg"]
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    # the mean softmax entropy is a continuous function of the weights: it tells which checkpoint an inference used
    entropy_before = _infer(label_server, "botm_seg", "echo_4ch_ed", tmp_path, {"uncertainty": True})[0]["mean_entropy"]
    # the annotator's correction of the ED frame: the cine's reference label at ED (its first frame)
    cine_label = nib.load(label_server.studies / "labels" / "final" / "echo_4ch_cine.nii.gz")
    ed = nib.load(label_server.studies / "echo_4ch_ed.nii.gz")
    corrected = tmp_path / "echo_4ch_ed_corrected.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(cine_label.dataobj)[..., 0].astype(np.uint8), ed.affine), corrected)
    import requests

    with open(corrected, "rb") as fh:
        r = requests.put(label_server.url + "/datastore/label", params={"image": "echo_4ch_ed", "tag": "final"},
                         files={"label": ("echo_4ch_ed.nii.gz", fh)}, timeout=60)
    assert r.ok, r.text
    r = label_server.post("/train/botm_seg", params={"run_sync": "true"},
                          json={"max_epochs": 1, "val_split": 0.0}, timeout=600)
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    after = after.get("model", after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"training did not change {ckpt}:\n{label_server.log_tail()}"
    # the next inference loads the new checkpoint: it equals the bundle's own inference with that checkpoint
    res, label = _infer(label_server, "botm_seg", "echo_4ch_ed", tmp_path, {"uncertainty": True})
    out = _bundle_inference("botm_seg", label_server.studies / "echo_4ch_ed.nii.gz", ckpt, tmp_path / "ref",
                            save_png=False, save_uncertainty=True)
    case = json.loads((out / "predictions.json").read_text())["cases"][0]
    np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(nib.load(case["masks"][0]).dataobj))
    entropy_ref = float(np.mean(np.asarray(nib.load(case["uncertainty"][0]).dataobj)))
    assert res["mean_entropy"] == pytest.approx(entropy_ref, rel=1e-5)
    assert abs(res["mean_entropy"] - entropy_before) > 1e-4, (res["mean_entropy"], entropy_before)


def _put_label(server: LabelServer, image_id: str, array: np.ndarray, affine: np.ndarray, tmp_path: Path) -> None:
    import requests

    path = tmp_path / f"{image_id}_label.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), path)
    with open(path, "rb") as fh:
        r = requests.put(server.url + "/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": (f"{image_id}.nii.gz", fh)}, timeout=60)
    assert r.ok, r.text


def test_lssc_training_without_usable_labels_is_refused_clearly(label_server):
    import requests

    # the echo studies' labels are no CT/MR volumes: nothing to train lssc_multimodal on
    r = requests.post(label_server.url + "/train/lssc_multimodal", params={"run_sync": "true"},
                      json={"max_epochs": 1, "images": "echo_*,pair*"}, timeout=120)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert "no labelled CT or MR volume" in detail and "echo_4ch_cine" in detail, detail


@pytest.mark.slow
def test_corrected_ct_and_mr_labels_train_lssc_and_next_infer_uses_it(label_server, tmp_path):
    import shutil

    import torch

    from common.data.mmwhs import remap_mmwhs_labels
    from common.data.synthetic.mmwhs import write_mmwhs

    info = label_server.get("/info/").json()
    assert "lssc_multimodal" in info["trainers"]
    # the studies' CT and MR volumes are the simulator's (seed 0, 48^3): regenerate them for their ground truth
    cases = write_mmwhs(tmp_path / "mmwhs", n_ct=1, n_mr=1, seed=0, ct_shape=(48,) * 3, mr_shape=(48,) * 3,
                        progress=False)
    for modality in ("ct", "mr"):
        image, truth = cases[modality][0]
        served = nib.load(label_server.studies / f"{modality}_heart.nii.gz")
        np.testing.assert_array_equal(np.asarray(nib.load(image).dataobj), np.asarray(served.dataobj))
        codes = np.asarray(nib.load(truth).dataobj).astype(np.int16)
        # the two conventions a datastore may hold: MM-WHS codes (a dataset's ground truth) for the CT, class ids
        # 1..4 (what the infer task returns, so what a viewer saves after correcting it) for the MR
        array = codes if modality == "ct" else remap_mmwhs_labels(codes)
        _put_label(label_server, f"{modality}_heart", array, served.affine, tmp_path)

    ckpt = label_server.ckpts["lssc_multimodal"]
    old = tmp_path / "old_model.pt"
    shutil.copyfile(ckpt, old)
    before = torch.load(old, map_location="cpu", weights_only=True)
    r = label_server.post("/train/lssc_multimodal", params={"run_sync": "true"},
                          json={"max_epochs": 1, "val_split": 0.0}, timeout=600)
    res = r.json()
    assert res["trained_on"] == {"ct": ["ct_heart"], "mr": ["mr_heart"]}, res
    assert res["label_values"] == {"ct_heart": "MM-WHS codes", "mr_heart": "class ids"}, res
    assert {"echo_4ch_cine", "pair0001_source"} <= set(res["skipped"]), res  # labelled, but no CT/MR volumes
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    after = after.get("model", after)
    assert set(after) == set(before), "the new checkpoint must hold the inference network's weights only"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"training did not change {ckpt}:\n{label_server.log_tail()}"
    # fine-tuning starts from the served checkpoint (loaded into the training network's inference part)
    assert f"UnpairedMultiModalTrainer - INFO - Restored all variables from {ckpt}" in label_server.log.read_text()
    for modality in ("ct", "mr"):
        src = label_server.studies / f"{modality}_heart.nii.gz"
        _, label = _infer(label_server, "lssc_multimodal", f"{modality}_heart", tmp_path)
        got = np.asarray(label.dataobj)
        preds = {}
        for name, weights in (("new", ckpt), ("old", old)):
            out = _bundle_inference("lssc_multimodal", src, weights, tmp_path / f"ref_{modality}_{name}")
            (pred,) = sorted((out / "predictions").glob("*_seg.nii*"))
            preds[name] = np.asarray(nib.load(pred).dataobj)
        # the next inference equals the bundle's own with the new checkpoint, and differs from the old one's
        np.testing.assert_array_equal(got, preds["new"])
        assert not np.array_equal(got, preds["old"]), f"{modality}: same prediction as the old checkpoint"

    # MR labels alone (here: only the MR images selected) train the MR path alone, as the bundle's loss allows:
    # the CT-specific image embedding (index 0 of the modalities ["ct", "mr"]; the encoder is shared) is not run, so
    # Adam leaves it as it is
    res = label_server.post("/train/lssc_multimodal", params={"run_sync": "true"},
                            json={"max_epochs": 1, "val_split": 0.0, "images": "mr_*"}, timeout=600).json()
    assert res["trained_on"] == {"ct": [], "mr": ["mr_heart"]}, res
    mr_only = torch.load(ckpt, map_location="cpu", weights_only=True)
    mr_only = mr_only.get("model", mr_only)
    moved = {k for k in after if not torch.equal(after[k], mr_only[k])}
    ct_keys = {k for k in after if k.startswith("image_embeddings.0.")}
    mr_keys = {k for k in after if k.startswith("image_embeddings.1.")}
    assert ct_keys and mr_keys
    assert not moved & ct_keys, sorted(moved & ct_keys)
    assert mr_keys <= moved and any(k.startswith("encoders.") for k in moved), "the MR path was not trained"


def test_lssc_modality_from_image_info_and_a_label_of_other_values_is_named(label_server, tmp_path):
    import requests

    # a CT volume whose name does not tell its modality: the annotator sets it in the image's datastore info
    served = nib.load(label_server.studies / "ct_heart.nii.gz")
    with open(label_server.studies / "ct_heart.nii.gz", "rb") as fh:
        r = requests.put(label_server.url + "/datastore/image", params={"image": "volume_x"},
                         files={"file": ("volume_x.nii.gz", fh)}, timeout=60)
    assert r.ok, r.text
    try:
        r = requests.post(label_server.url + "/infer/lssc_multimodal", params={"image": "volume_x", "output": "json"},
                          timeout=120)
        assert r.status_code == 400 and "cannot tell the modality" in r.json()["detail"], r.text
        r = requests.put(label_server.url + "/datastore/image/info", params={"image": "volume_x"},
                         data={"info": json.dumps({"modality": "ct"})}, timeout=60)
        assert r.ok, r.text
        _, label = _infer(label_server, "lssc_multimodal", "volume_x", tmp_path)
        _same_grid(label, label_server.studies / "ct_heart.nii.gz")
        # a label that is neither class ids 0..4 nor MM-WHS codes (e.g. another task's labels) is refused, named
        wrong = np.zeros(served.shape, dtype=np.uint8)
        wrong[10:20, 10:20, 10:20] = 7
        _put_label(label_server, "volume_x", wrong, served.affine, tmp_path)
        r = requests.post(label_server.url + "/train/lssc_multimodal", params={"run_sync": "true"},
                          json={"max_epochs": 1, "images": "volume_x"}, timeout=120)
        assert r.status_code == 400, r.text  # not 409: the info's modality made it a CT volume to train on
        detail = r.json()["detail"]
        assert "volume_x" in detail and "[0, 7]" in detail and "MM-WHS codes" in detail, detail
    finally:
        requests.delete(label_server.url + "/datastore/image", params={"id": "volume_x"}, timeout=60)
