"""Tests of the point-tracking workflow pieces (common/engines/tracking.py).

The metric pipeline is checked end to end with an oracle network (returns the reference tracks: every metric must be
perfect after the network-pixel -> original-pixel mapping) and a zero-motion network (must reproduce the reported
zero-motion baseline); the geometry of resizing against an independent blob-centroid measurement.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.transforms import Compose
from torch import nn

from common.data.io import DataError, write_nifti
from common.data.synthetic.echo_layouts import write_tracking_h5
from common.data.tracking import read_tracking_h5, tracking_datalist
from common.engines.handlers import MetricsJSONWriter
from common.engines.tracking import (
    DEFAULT_PHASES,
    GLS_NOT_APPLICABLE,
    RADIUS_VARIANTS,
    GradientClipping,
    LoadTrackingVideod,
    LoadVideod,
    QueryPointsd,
    ResizeVideod,
    TrackingEvaluator,
    TrackingInputsd,
    TrackingMetrics,
    TrackingPredictionWriter,
    TrackingPredLoss,
    TrackingReport,
    as_bool,
    expand_by_segments,
    export_tracker,
    load_exported_tracker,
    one_cycle_scheduler,
    scale_points,
    tracking_collate,
    video_to_unit,
)
from common.losses.tracking import tracking_l1_loss
from common.metrics.tracking import global_longitudinal_strain
from common.networks.specknet import SpeckNetBundleAdapter
from common.transforms.video import QueryFramed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    write_tracking_h5(root, n_videos=3, seed=5, image_size=(64, 80), n_frames=10, n_points=6, progress=False)
    return root


# ----------------------------------------------------------------------------------------------------------------
# geometry and transforms


def test_scale_points_matches_the_resized_image_content():
    # independent check: the intensity centroid of a blob after bilinear resizing (half-pixel centres)
    h, w, x0, y0 = 40, 50, 17.3, 22.6
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 3.0**2))
    for size in ((80, 100), (64, 64)):
        out = F.interpolate(torch.tensor(blob)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        out = out.numpy()
        gy, gx = np.mgrid[0 : size[0], 0 : size[1]]
        centroid = [(out * gx).sum() / out.sum(), (out * gy).sum() / out.sum()]
        np.testing.assert_allclose(scale_points(np.array([x0, y0]), (h, w), size), centroid, atol=0.02)
    pts = torch.tensor([[1.0, 2.0], [30.0, 7.5]])
    back = scale_points(scale_points(pts, (40, 50), (64, 64)), (64, 64), (40, 50))
    torch.testing.assert_close(back, pts)


def test_resize_and_inputs_build_a_consistent_sample(tiny_set):
    entry = tracking_datalist(tiny_set)[0]
    d = LoadTrackingVideod(root=str(tiny_set))(entry)
    assert d["video"].dtype == np.float32 and 0.0 <= d["video"].min() and d["video"].max() <= 1.0
    assert d["dataset"] == tiny_set.name and tuple(d["orig_size"]) == (64, 80)
    d["visible"][:, 1] = True
    d["visible"][4, 1] = False  # point 1 hidden on frame 4
    d["visible"][2, 2] = False  # point 2 hidden on the query frame 2
    d = QueryFramed(fraction=0.2)(d)
    assert d["query_frame"] == 2
    d = ResizeVideod(32, point_keys={"tracks": "tracks_net"})(d)
    assert d["video"].shape == (10, 32, 32)
    np.testing.assert_allclose(d["tracks_net"], scale_points(d["tracks"], (64, 80), (32, 32)), rtol=1e-6)
    d = TrackingInputsd(tracks_key="tracks_net", drop=("video", "tracks_net"))(d)
    assert d["image"].shape == (1, 10, 32, 32) and d["image"].min() >= -1 and d["image"].max() <= 1
    np.testing.assert_array_equal(d["query_frames"], np.full(6, 2))
    np.testing.assert_allclose(d["query_points"], d["label"][2, :, :2])
    w = d["label"][..., 2]
    assert (w[2] == 0).all()  # the query frame carries no loss
    assert w[4, 1] == 0 and w[3, 1] == 1
    assert (w[:, 2] == 0).all()  # a point hidden on its query frame is not tissue there: no loss at all
    assert "video" not in d and "tracks" in d  # originals kept for the metrics


def test_config_switches_parse_command_line_strings():
    # `--augment false` arrives as the string "false", which is truthy in Python
    assert as_bool("false") is False and as_bool("True") is True and as_bool(False) is False and as_bool(1) is True
    with pytest.raises(ValueError, match="augment must be true or false, got 'flase'"):
        as_bool("flase", "augment")


def test_video_to_unit_and_expand_by_segments():
    np.testing.assert_allclose(video_to_unit(np.array([[[0, 255]]], np.uint8)), [[[0.0, 1.0]]])
    np.testing.assert_allclose(video_to_unit(np.array([[[-3.0, 1.0]]])), [[[0.0, 1.0]]])
    assert video_to_unit(np.full((1, 2, 2), 7, np.int16)).max() == 0.0
    data = [{"id": "a", "n_frames": 40}, {"id": "b", "n_frames": 10}]
    out = expand_by_segments(data, clip_len=16, overlap=0.5)
    assert [e["id"] for e in out] == ["a"] * 4 + ["b"]  # starts 0, 8, 16, 24 (last ends at 40); b is one short clip
    with pytest.raises(ValueError, match="n_frames"):
        expand_by_segments([{"id": "c"}])


def test_collate_pads_points_and_reports_counts():
    a = {"query_points": np.ones((2, 2), np.float32), "label": np.ones((3, 2, 3), np.float32), "id": "a", "q": 1}
    b = {"query_points": np.ones((4, 2), np.float32), "label": np.ones((3, 4, 3), np.float32), "id": "b", "q": 2}
    out = tracking_collate([a, b])
    assert out["query_points"].shape == (2, 4, 2) and out["label"].shape == (2, 3, 4, 3)
    assert out["label"][0, :, 2:].abs().sum() == 0  # padded points weigh nothing
    assert out["n_points"].tolist() == [2, 4] and out["id"] == ["a", "b"] and out["q"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="keys"):
        tracking_collate([a, {"id": "c"}])
    with pytest.raises(ValueError, match="batch_size 1"):
        tracking_collate([{"image": np.zeros((1, 3, 4, 4))}, {"image": np.zeros((1, 5, 4, 4))}])


# ----------------------------------------------------------------------------------------------------------------
# training pieces


def test_pred_loss_is_the_masked_l1_on_packed_tensors():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 4, 3, 3, generator=g)
    label = torch.rand(2, 4, 3, 3, generator=g)
    label[..., 2] = (label[..., 2] > 0.5).float()
    expect = (((pred[..., :2] - label[..., :2]).abs().mean(-1)) * label[..., 2]).sum() / label[..., 2].sum()
    channel_first = pred.permute(0, 3, 1, 2)  # the bundle adapter's pred layout (B, 3, T, N)
    torch.testing.assert_close(TrackingPredLoss()(channel_first, label), expect)
    torch.testing.assert_close(TrackingPredLoss()(channel_first, label),
                               tracking_l1_loss(pred[..., :2], label[..., :2], label[..., 2]))
    with pytest.raises(ValueError, match=r"\(B, 3, T, N\)"):
        TrackingPredLoss()(pred, label)  # channels-last is refused, not silently mis-read


def test_gradient_clipping_runs_between_backward_and_step():
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    data = [{"image": torch.randn(8, 4) * 100, "label": torch.randn(8, 1) * 100}]
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: parameters stay, only the gradients are inspected
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=nn.MSELoss(), decollate=False)
    GradientClipping(5.0).attach(trainer)
    norms = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda e: norms.append(float(torch.cat([p.grad.flatten() for p in net.parameters()])
                                                           .norm())))
    trainer.run()
    assert norms and norms[0] == pytest.approx(5.0, rel=1e-5)  # the raw gradient is far larger than 5
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipping(0.0)


def test_one_cycle_schedule_peaks_at_the_learning_rate():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = one_cycle_scheduler(opt, 5e-4, epochs=2, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(5e-4) and lrs[0] < 5e-5 and lrs[-1] < 1e-5
    with pytest.raises(ValueError, match="training set empty"):
        one_cycle_scheduler(opt, 5e-4, epochs=3, steps_per_epoch=0)


# ----------------------------------------------------------------------------------------------------------------
# evaluation: oracle and zero-motion networks through the real evaluator and metric


class _ScriptedTracker(nn.Module):
    """encode/track stand-in: returns ``reference`` (network pixels) or the query points (zero motion)."""

    def __init__(self, reference: torch.Tensor | None) -> None:
        super().__init__()
        self.reference = reference
        self.p = nn.Parameter(torch.zeros(1))

    def encode(self, video):
        return [video]

    def track(self, feats, qp, qf, size):
        b, t = feats[0].shape[:2]
        n = qp.shape[1]
        tracks = self.reference.expand(b, t, n, 2) if self.reference is not None else qp[:, None].expand(b, t, n, 2)
        return {"tracks": tracks.clone(), "confidence": torch.ones(b, t, n)}


def _eval_loader(root, size=48, n_videos=1):
    pre = Compose([LoadTrackingVideod(root=str(root)), QueryFramed(fraction=0.72),
                   ResizeVideod(size, point_keys={"tracks": "tracks_net"}),
                   TrackingInputsd(tracks_key="tracks_net", drop=("video", "tracks_net"))])
    return DataLoader(Dataset(tracking_datalist(root, split="all")[:n_videos], pre), batch_size=1,
                      collate_fn=tracking_collate)


def _run_eval(net, loader, report_dir=None, phases=DEFAULT_PHASES, **kwargs):
    ev = TrackingEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net,
                           key_val_metric={"delta_avg": TrackingMetrics()}, phases=phases, **kwargs)
    report = None
    if report_dir is not None:
        report = TrackingReport(str(report_dir), n_png=1)
        report.attach(ev)
        MetricsJSONWriter(str(report_dir), extra=report.summary).attach(ev)
    ev.run()
    return ev, report


def test_oracle_tracker_gets_perfect_metrics_and_the_reference_gls(tiny_set, tmp_path):
    loader = _eval_loader(tiny_set)
    batch = next(iter(loader))
    ev, report = _run_eval(_ScriptedTracker(batch["label"][:, :, :, :2]), loader, tmp_path)
    m = ev.state.metrics
    assert m["delta_1"] == 100.0 and m["delta_avg"] == 100.0 and m["mte"] < 1e-3
    assert m["n_videos"] == 1 and m["ait_s"] > 0 and m["pgm_gb"] > 0
    ref = read_tracking_h5(tracking_datalist(tiny_set)[0]["video"])
    expect = global_longitudinal_strain(ref["tracks"], ref["ed_frame"], ref["es_frame"], ref["pixel_spacing_mm"]).gls
    # perfect tracks: the only GLS error left is the 6-point polyline's discretisation of the true (continuous)
    # centre line the reference is computed from
    assert m["gls_mad"] == pytest.approx(abs(expect - ref["gls_reference"]), abs=1e-4) and m["gls_mad"] < 2.0
    curve = ev.state.tracking_report["temporal_invariance"]
    assert [r["phase"] for r in curve] == list(DEFAULT_PHASES)
    assert all(r["delta_avg"] == 100.0 for r in curve)
    assert set(ev.state.metric_details) >= {"delta_avg", "mte", "gls"}
    files = report.summary(ev)["report_files"]
    for key in ("per_video_csv", "temporal_invariance_csv", "temporal_invariance_png", "gls_png"):
        assert (tmp_path / files[key].split("/")[-1]).is_file()
    assert len(files["track_pngs"]) == 1


def test_zero_motion_tracker_reproduces_the_zero_motion_baseline(tiny_set):
    loader = _eval_loader(tiny_set)
    ev, _ = _run_eval(_ScriptedTracker(None), loader)
    m = ev.state.metrics
    assert m["delta_avg"] == pytest.approx(m["zero_motion_delta_avg"], abs=1e-6)
    assert m["mte"] == pytest.approx(m["zero_motion_mte"], abs=1e-4)
    assert m["delta_avg"] < 100.0 and m["mte"] > 0.1  # the simulated heart moves


# ----------------------------------------------------------------------------------------------------------------
# GLS only where the data declare ordered centre-line points; both readings of the soft-argmax radius


def _declare(path, value):
    """Set (True/False) or remove (None) a tracking file's ``centreline_ordered`` attribute."""
    with h5py.File(path, "a") as f:
        if value is None:
            del f.attrs["centreline_ordered"]
        else:
            f.attrs["centreline_ordered"] = value


def test_echo_simulator_declares_its_ordered_centre_line(tiny_set):
    for e in tracking_datalist(tiny_set):
        v = read_tracking_h5(e["video"])
        assert v["centreline_ordered"] is True and e["centreline_ordered"] is True
        for t in range(v["tracks"].shape[0]):  # the declaration is true: each point's nearest neighbours are k +- 1
            tr = v["tracks"][t].astype(np.float64)
            d = np.linalg.norm(tr[:, None] - tr[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            assert np.all(np.abs(d.argmin(1) - np.arange(len(tr))) == 1)


def test_gls_only_where_the_data_declare_ordered_centre_line_points(tiny_set, tmp_path):
    files = sorted(tiny_set.glob("*.h5"))[:2]
    undeclared, mixed = tmp_path / "undeclared", tmp_path / "mixed"
    for folder, values in ((undeclared, (None, False)), (mixed, (True, None))):
        folder.mkdir()
        for src, value in zip(files, values):
            shutil.copy(src, folder / src.name)
            _declare(folder / src.name, value)

    ev, report = _run_eval(_ScriptedTracker(None), _eval_loader(undeclared, n_videos=2), tmp_path / "rep", phases=())
    m = ev.state.metrics
    assert "gls_mad" in m and m["gls_mad"] is None and m["n_videos"] == 2
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["metrics"]["gls_mad"] is None and saved["gls_note"] == GLS_NOT_APPLICABLE
    assert all(e["gls_mad"] is None and e["gls_note"] == GLS_NOT_APPLICABLE for e in saved["per_dataset"].values())
    assert "gls" not in ev.state.metric_details and "gls_png" not in saved["report_files"]
    assert not any("gls" in r for r in ev.state.tracking_report["per_video"])
    assert "gls" not in (tmp_path / "rep" / "per_video.csv").read_text().splitlines()[0].split(",")

    ev, report = _run_eval(_ScriptedTracker(None), _eval_loader(mixed, n_videos=2), tmp_path / "rep2", phases=())
    rows = {r["id"]: r for r in ev.state.tracking_report["per_video"]}
    declared_ref = read_tracking_h5(mixed / files[0].name)["gls_reference"]
    assert "gls" in rows[files[0].stem] and "gls" not in rows[files[1].stem]
    # zero motion: the centre line keeps its length, so the tracked GLS is 0 and the MAD is |reference|
    assert ev.state.metrics["gls_mad"] == pytest.approx(abs(declared_ref), abs=1e-6)
    assert report.summary(ev)["gls_note"].startswith("GLS of the tracked points of the 1 of 2 video(s)")
    assert (tmp_path / "rep2" / "gls.png").is_file()


def test_radius_variants_report_both_readings_from_one_encoding(tiny_set):
    torch.manual_seed(0)
    net = SpeckNetBundleAdapter(channels=(8, 16, 16, 16), backend="torch").eval()  # radius 5 cells
    loader = _eval_loader(tiny_set, size=32, n_videos=2)
    ev, _ = _run_eval(net, loader, phases=())
    m, report = ev.state.metrics, ev.state.tracking_report
    assert [radius_label for radius_label in report["radius_variants"]] == ["5 cells", "5 px"]
    assert report["radius_variants"]["5 cells"]["configured"] and not report["radius_variants"]["5 px"]["configured"]
    assert m["radius_5cells_delta_avg"] == m["delta_avg"] and m["radius_5cells_mte"] == m["mte"]
    # the 5 px reading is the network's own per-call override on the same features, scored like the main output
    batch = next(iter(loader))
    with torch.no_grad():
        feats = net.encode(batch["image"].transpose(1, 2))
        o = net.track(feats, batch["query_points"], batch["query_frames"], (32, 32), radius=5.0, radius_unit="pixels")
    pred = scale_points(o["tracks"][0].double().numpy(), (32, 32), batch["orig_size"][0].tolist())
    from common.metrics.tracking import tracking_metrics

    vis = batch["visible"][0].numpy() & batch["visible"][0].numpy()[int(batch["query_frames"][0, 0])][None]
    direct = tracking_metrics(pred, batch["tracks"][0].double().numpy(), vis, int(batch["query_frames"][0, 0]),
                              tuple(batch["orig_size"][0].tolist()))
    first = ev.state.tracking_report["per_video"][0]
    assert first["radius_5px_delta_avg"] == pytest.approx(float(direct["delta_avg"]))
    assert first["radius_5px_mte"] == pytest.approx(float(direct["mte"]))
    # 40 px = 5 cells of the stride-8 grid: a network configured that way scores what the "5 cells" reading scored
    px = SpeckNetBundleAdapter(channels=(8, 16, 16, 16), backend="torch", radius=40.0, radius_unit="pixels").eval()
    px.load_state_dict(net.state_dict())
    ev_px, _ = _run_eval(px, loader, phases=())
    assert ev_px.state.metrics["delta_avg"] == pytest.approx(m["radius_5cells_delta_avg"])
    assert ev_px.state.tracking_report["radius_variants"]["5 cells"]["configured"] is False
    # trackers without a radius (NCC, the scripted ones) simply have no variants
    ev0, _ = _run_eval(_ScriptedTracker(None), _eval_loader(tiny_set), phases=())
    assert ev0.state.tracking_report["radius_variants"] == {} and RADIUS_VARIANTS == ((5.0, "cells"), (5.0, "pixels"))
    with pytest.raises(ValueError, match="radius_variants"):
        TrackingEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net, radius_variants=[(5, "mm")])


def test_inference_gls_follows_the_source_of_the_query_points(tiny_set, tmp_path):
    from common.data.synthetic.phantom import write_phantom_h5

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sorted(tiny_set.glob("*.h5"))[0], videos / "echo.h5")
    write_phantom_h5(tmp_path / "ph", n_videos=1, seed=1, image_size=(48, 48), n_frames=6, n_points=5, progress=False)
    shutil.copy(tmp_path / "ph" / "phantom0001.h5", videos / "phantom.h5")
    pre = Compose([LoadVideod(), QueryPointsd(source="tracks"),
                   ResizeVideod(32, point_keys={"query_points_orig": "query_points"}), TrackingInputsd(drop=["video"])])
    data = [{"image": str(videos / "echo.h5")}, {"image": str(videos / "phantom.h5")}]
    loader = DataLoader(Dataset(data, pre), batch_size=1, collate_fn=tracking_collate)
    writer = TrackingPredictionWriter(str(tmp_path / "pred"), save_png=False)
    TrackingEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=_ScriptedTracker(None),
                      val_handlers=[writer]).run()
    out = {r["id"]: r for r in json.loads((tmp_path / "pred" / "inference_summary.json").read_text())["videos"]}
    assert out["echo"]["gls_percent"] == pytest.approx(0.0, abs=1e-6) and "declared" in out["echo"]["gls_note"]
    assert out["phantom"]["gls_percent"] is None and out["phantom"]["gls_note"].startswith("not applicable")
    echo = json.loads((tmp_path / "pred" / "echo" / "echo_tracks.json").read_text())
    assert echo["gls_note"] == out["echo"]["gls_note"] and echo["strain_curve"] is not None
    d = LoadVideod()({"image": str(videos / "echo.h5")})
    assert QueryPointsd(n_points=5)(d)["gls_applicable"]  # automatic centre-line points from the labels
    (tmp_path / "pts.json").write_text(json.dumps({"query_frame": 1, "points": [[10, 12], [20, 30]]}))
    given = QueryPointsd(points_path=str(tmp_path / "pts.json"))(d)
    assert given["gls_applicable"] and given["gls_note"].startswith("assumes")


# ----------------------------------------------------------------------------------------------------------------
# inference query points


def test_query_point_sources_and_errors(tiny_set, tmp_path):
    path = str(sorted(tiny_set.glob("*.h5"))[0])
    d = LoadVideod()({"image": path})
    assert "ref_labels" in d and "ref_tracks" in d and d["first_frame"].shape == (64, 80)
    q = diastasis_q = int(0.72 * 10)
    auto = QueryPointsd(n_points=5)(d)
    assert "labels (centre line" in auto["query_source"] and auto["query_points_orig"].shape == (5, 2)
    np.testing.assert_array_equal(auto["query_frames_orig"], np.full(5, diastasis_q))
    assert "ref_labels" not in auto
    tr = QueryPointsd(source="tracks")(d)
    np.testing.assert_allclose(tr["query_points_orig"], d["ref_tracks"][q])
    (tmp_path / "pts.json").write_text(json.dumps({"query_frame": 1, "points": [[10, 12], [20, 30]]}))
    given = QueryPointsd(points_path=str(tmp_path / "pts.json"))(d)
    np.testing.assert_array_equal(given["query_frames_orig"], [1, 1])
    mask = np.zeros((10, 64, 80), np.uint8)
    mask[q] = read_tracking_h5(path)["labels"][q]
    write_nifti(tmp_path / "mask.nii.gz", mask.transpose(2, 1, 0))
    from_mask = QueryPointsd(mask_path=str(tmp_path / "mask.nii.gz"), n_points=5)(d)
    np.testing.assert_allclose(from_mask["query_points_orig"], auto["query_points_orig"], atol=1e-4)
    (tmp_path / "out.json").write_text(json.dumps({"points": [[10, 12], [95, 30]]}))
    with pytest.raises(DataError, match=r"out\.json: 1 query point\(s\) lie outside the 80 x 64"):
        QueryPointsd(points_path=str(tmp_path / "out.json"))(d)
    bare = {k: v for k, v in d.items() if not k.startswith("ref_")}
    with pytest.raises(DataError, match="no query points for this video"):
        QueryPointsd()(bare)
    with pytest.raises(FileNotFoundError, match="mask_path"):
        QueryPointsd(mask_path=str(tmp_path / "nope.nii.gz"))


# ----------------------------------------------------------------------------------------------------------------
# export (the documented alternative to ckpt_export)


def test_export_tracker_round_trip(tmp_path):
    torch.manual_seed(0)
    net = SpeckNetBundleAdapter(channels=(8, 16, 16, 16), backend="torch").eval()
    path = export_tracker(net, tmp_path / "specknet.pt2", n_frames=3, image_size=32, n_points=2)
    program = load_exported_tracker(path)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 1, 3, 32, 32, generator=g) * 2 - 1
    qp = torch.tensor([[[10.0, 12.0], [20.5, 7.0]]])
    qf = torch.tensor([[1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(program(image, qp, qf), net(image, qp, qf))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_exported_tracker(tmp_path / "missing.pt2")
