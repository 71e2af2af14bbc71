"""LSSC workflow pieces: unpaired loader, unpaired trainer iteration, inference weights, slice-wise inferer,
modality datalists and the Table 2 report."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents

from common.data.slices import VolumeSliceDataset
from common.engines.inference import SliceStackInferer, modality_datalist, modality_from_name
from common.engines.lssc import (
    InferenceWeights,
    ModalityMetricsReport,
    UnpairedForward,
    UnpairedLoader,
    UnpairedMultiModalTrainer,
    lssc_loss,
    lssc_network,
    table2_markdown,
    table2_summary,
)
from common.metrics.segmentation import asd_per_class, dice_per_class

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(img_size=32, embed_dim=12, num_heads=(1, 2, 4, 8), window_size=2, drop_path_rate=0.0, num_classes=3)


def _volume_entries(rng: np.random.Generator, modality: str, n: int, shape: tuple[int, int, int],
                    num_classes: int = 3) -> list[dict]:
    entries = []
    for i in range(n):
        image = rng.normal(size=(1,) + shape).astype(np.float32)
        label = np.zeros((1,) + shape, dtype=np.uint8)
        label[0, 4:-4, :, 4:-4] = rng.integers(0, num_classes, size=(shape[0] - 8, shape[1], shape[2] - 8))
        entries.append({"image": image, "label": label, "modality": modality, "patient": f"{modality}{i}"})
    return entries


def _dataset(rng, ct_shape=(32, 6, 32), mr_shape=(64, 3, 32)) -> VolumeSliceDataset:
    data = _volume_entries(rng, "ct", 2, ct_shape) + _volume_entries(rng, "mr", 1, mr_shape)
    return VolumeSliceDataset(data, lambda d: d, slice_axis="coronal", num_slices=3, slice_selection="all")


def test_unpaired_loader_draws_one_batch_per_modality_and_cycles_the_smaller():
    ds = _dataset(np.random.default_rng(0))
    groups = ds.indices_by("modality")
    assert len(groups["ct"]) == 12 and len(groups["mr"]) == 3
    loader = UnpairedLoader(ds, batch_size=4, modalities=["ct", "mr"])
    assert len(loader) == 3  # one pass over CT (12 / 4); MR (1 batch per pass) starts new passes
    seen_ct = []
    for batch in loader:
        assert list(batch) == ["ct", "mr"]
        assert batch["ct"]["modality"] == ["ct"] * 4
        assert set(batch["mr"]["modality"]) == {"mr"}
        # unpaired batches of different in-plane sizes (CT 32x32, MR 64x32) and different patients
        assert batch["ct"]["image"].shape == (4, 3, 32, 32)
        assert batch["mr"]["image"].shape == (3, 3, 64, 32)
        assert not set(batch["ct"]["patient"]) & set(batch["mr"]["patient"])
        seen_ct += [(p, int(s)) for p, s in zip(batch["ct"]["patient"], batch["ct"]["slice"])]
    assert len(set(seen_ct)) == 12  # every CT slice exactly once per epoch
    assert len(UnpairedLoader(ds, batch_size=4, epoch_length="min")) == 1
    assert len(UnpairedLoader(ds, batch_size=4, epoch_length=7)) == 7


def test_unpaired_loader_errors_name_the_problem():
    ds = _dataset(np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"no training slices of modality \['pet'\]"):
        UnpairedLoader(ds, modalities=["ct", "pet"])
    with pytest.raises(ValueError, match="epoch_length"):
        UnpairedLoader(ds, epoch_length="longest")
    with pytest.raises(TypeError, match="indices_by"):
        UnpairedLoader([1, 2, 3])


def test_variant_builders():
    with pytest.raises(ValueError, match="one network per modality"):
        lssc_network("backbone", ["ct", "mr"], **TINY)
    with pytest.raises(ValueError, match="set by the variant"):
        lssc_network("full", ["ct", "mr"], use_eam=False, **TINY)
    with pytest.raises(ValueError, match="unknown LSSC variant"):
        lssc_network("joint_v4", ["ct", "mr"], **TINY)
    net = lssc_network("joint_v1", ["ct", "mr"], **TINY)
    assert len(net.encoders) == 2 and not net.use_class_embeddings and not net.use_correlations
    assert lssc_network("baseline", ["mr"], **TINY).eams is not None
    loss = lssc_loss("joint_v2+cr")
    assert loss.use_aux and loss.use_mcr and loss.use_icr and loss.tau == 4.0
    assert not lssc_loss("backbone").use_aux


def _trainer(net, loader, lr=1e-3):
    opt = torch.optim.Adam(net.parameters(), lr=lr, eps=1e-8, weight_decay=1e-4)
    return UnpairedMultiModalTrainer("cpu", 1, loader, net, opt, lssc_loss("full"), epoch_length=2)


def test_trainer_iteration_computes_eq15_on_both_unpaired_batches(seeded):
    ds = _dataset(np.random.default_rng(2))
    net = lssc_network("full", ["ct", "mr"], **TINY)
    loader = UnpairedLoader(ds, batch_size=3, modalities=["ct", "mr"])
    trainer = _trainer(net, loader)
    batch = next(iter(loader))
    # the loss of the first iteration, computed independently on a copy of the network
    ref_net = copy.deepcopy(net)
    out_ct = ref_net.forward_train(batch["ct"]["image"], "ct")
    out_mr = ref_net.forward_train(batch["mr"]["image"], "mr")
    expected = lssc_loss("full")(out_ct, batch["ct"]["label"], out_mr, batch["mr"]["label"])
    fired = []
    for ev in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED,
               IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(ev, lambda e, ev=ev: fired.append(ev))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    trainer.state.device = torch.device("cpu")
    output = trainer._iteration(trainer, batch)
    assert set(output) == {"loss", "seg_ct", "aux_ct", "seg_mr", "aux_mr", "mcr", "icr"}
    for k in ("seg_m1", "aux_m1", "seg_m2", "aux_m2", "mcr", "icr"):
        name = k.replace("m1", "ct").replace("m2", "mr")
        assert output[name] == pytest.approx(float(expected[k].detach()), rel=1e-5), name
        assert output[name] > 0, name  # every term of Eq. 15 is active in the full method
    assert float(output["loss"]) == pytest.approx(float(expected["loss"].detach()), rel=1e-5)
    assert len(fired) == 4
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # both modalities' image embeddings and EAM sets and the class embeddings learn in one step
    for prefix in ("image_embeddings.0.", "image_embeddings.1.", "eams.0.", "eams.1.", "class_embeddings", "head"):
        assert any(k.startswith(prefix) for k in changed), prefix


def test_trainer_runs_epochs_and_single_modality_variant(seeded):
    ds = _dataset(np.random.default_rng(3))
    net = lssc_network("baseline", ["mr"], **TINY)
    loader = UnpairedLoader(ds, batch_size=2, modalities=["mr"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    trainer = UnpairedMultiModalTrainer("cpu", 2, loader, net, opt, lssc_loss("baseline"))
    trainer.run()
    assert trainer.state.iteration == 2 * len(loader) and loader.epoch == 2
    out = trainer.state.output
    assert set(out) == {"loss", "seg_mr", "aux_mr", "mcr", "icr"} and out["mcr"] == 0.0 and out["aux_mr"] > 0


def test_trainer_rejects_plain_batches():
    net = lssc_network("full", ["ct", "mr"], **TINY)
    trainer = _trainer(net, UnpairedLoader(_dataset(np.random.default_rng(4)), batch_size=2))
    with pytest.raises(ValueError, match="UnpairedLoader"):
        trainer._iteration(trainer, [torch.zeros(1)])


@pytest.mark.parametrize("variant", ["full", "joint_v2+cr", "baseline"])
def test_inference_weights_have_no_eam_parameters_and_predict_the_same(variant, seeded):
    mods = ["ct"] if variant == "baseline" else ["ct", "mr"]
    train_net = lssc_network(variant, mods, **TINY).eval()
    with torch.no_grad():  # make the EAMs' parameters non-trivial, as after training
        for p in train_net.eams.parameters():
            p.add_(torch.randn_like(p))
    state = InferenceWeights(train_net).state_dict()
    assert state and not any(k.startswith("eams.") for k in state)
    assert any(k.startswith("eams.") for k in train_net.state_dict())
    inf_net = lssc_network(variant, mods, for_inference=True, **TINY).eval()
    assert inf_net.eams is None
    assert set(inf_net.state_dict()) == set(state)
    inf_net.load_state_dict(state, strict=True)
    n_inf = sum(p.numel() for p in inf_net.parameters())
    n_eam = sum(p.numel() for p in train_net.eams.parameters())
    extra = train_net.class_embeddings.numel() if not train_net.use_class_embeddings else 0
    assert n_inf == sum(p.numel() for p in train_net.parameters()) - n_eam - extra
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        for m in mods:
            torch.testing.assert_close(inf_net(x, m), train_net(x, m), rtol=0, atol=0)
            torch.testing.assert_close(inf_net(x, m), train_net.forward_train(x, m)["logits"], rtol=0, atol=0)


def test_inference_weights_round_trip_into_training_network(seeded):
    src = lssc_network("full", ["ct", "mr"], **TINY)
    dst = lssc_network("full", ["ct", "mr"], **TINY)
    eam_before = copy.deepcopy(dst.eams.state_dict())
    InferenceWeights(dst).load_state_dict(InferenceWeights(src).state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x, "mr"), src.eval()(x, "mr"))
    for k, v in dst.eams.state_dict().items():
        torch.testing.assert_close(v, eam_before[k])  # training-only parts are left as they are
    bad = InferenceWeights(src).state_dict()
    bad.pop("head.weight")
    with pytest.raises(RuntimeError, match="head.weight"):
        InferenceWeights(dst).load_state_dict(bad)
    wrapped = UnpairedForward(src)
    assert InferenceWeights(wrapped).state_dict().keys() == InferenceWeights(src).state_dict().keys()


class _RecordingNet(nn.Module):
    """A pointwise 2D 'segmenter' that records the modality it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        self.calls: list = []

    def forward(self, x, modality=None):
        self.calls.append((modality, tuple(x.shape)))
        return self.conv(x)


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_slice_stack_inferer_matches_a_slice_by_slice_loop(axis):
    from common.transforms.slices import consecutive_slices, slice_axis_index

    torch.manual_seed(0)
    net = _RecordingNet()
    vol = torch.randn(2, 1, 13, 10, 11)
    inferer = SliceStackInferer(axis, num_slices=3, batch_size=4, size_multiple=8)
    with torch.no_grad():
        out = inferer(vol, net, modality=["ct", "mr"])
        a = slice_axis_index(axis)
        assert out.shape == (2, 2, 13, 10, 11)
        for b in range(2):
            for s in range(vol.shape[2 + a]):
                stack = consecutive_slices(vol[b], s, axis, 3)
                ref = net.conv(stack[None])[0]
                got = out[b].select(a + 1, s)
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # each volume's own modality; in-plane sizes padded to multiples of 8
    mods = {m for m, _ in net.calls}
    assert mods == {"ct", "mr"}
    assert all(s[-1] % 8 == 0 and s[-2] % 8 == 0 for _, s in net.calls)


def test_slice_stack_inferer_keeps_metadata_and_checks_inputs():
    net = _RecordingNet()
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    vol = MetaTensor(torch.randn(1, 1, 8, 8, 8), affine=affine)
    with torch.no_grad():
        out = SliceStackInferer("axial", size_multiple=1)(vol, net, modality="ct")
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, vol.affine)
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        SliceStackInferer()(torch.zeros(1, 8, 8, 8), net)
    with pytest.raises(ValueError, match="2 modality values for a batch of 1"):
        SliceStackInferer()(torch.zeros(1, 1, 8, 8, 8), net, modality=["ct", "mr"])
    with pytest.raises(ValueError, match="num_slices must be odd"):
        SliceStackInferer(num_slices=2)


def test_modality_datalist_sources(tmp_path):
    (tmp_path / "ct_train_1001_image.nii.gz").write_bytes(b"x")
    (tmp_path / "ct_train_1001_label.nii.gz").write_bytes(b"x")
    (tmp_path / "patient7_MRI.nii").write_bytes(b"x")
    out = modality_datalist(tmp_path)
    assert [(e["image"].split("/")[-1], e["modality"]) for e in out] == [
        ("ct_train_1001_image.nii.gz", "ct"), ("patient7_MRI.nii", "mr")]
    assert modality_datalist(tmp_path / "patient7_MRI.nii", modality="ct")[0]["modality"] == "ct"
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": "scan.nii.gz", "modality": "MR"}]))
    assert modality_datalist(datalist) == [{"image": str(tmp_path / "scan.nii.gz"), "modality": "mr"}]
    assert modality_from_name("case_ct_mr.nii") is None  # ambiguous names tell nothing
    assert modality_from_name("abstract.nii") is None  # 'ct' inside a word does not count


def test_modality_datalist_errors_name_the_input(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown modality 'xray' for all inputs; this network knows \('ct', 'mr'\)"):
        modality_datalist(tmp_path, modality="xray")
    with pytest.raises(ValueError, match=r"cannot tell the modality of .*scan.nii.gz.*--modality"):
        modality_datalist(tmp_path / "scan.nii.gz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        modality_datalist(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        modality_datalist(empty)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "scan.nii.gz", "modality": "pet"}]))
    with pytest.raises(ValueError, match="unknown modality 'pet'"):
        modality_datalist(bad)


def test_table2_summary_and_markdown():
    rows = [
        {"modality": "ct", "dice": [90.0, 80.0], "asd": [1.0, 2.0]},
        {"modality": "ct", "dice": [94.0, 84.0], "asd": [3.0, np.inf]},
        {"modality": "mr", "dice": [70.0, 60.0], "asd": [2.0, 4.0]},
    ]
    s = table2_summary(rows, ["A", "B"], ["ct", "mr"])
    assert s["dice"]["ct"]["A"]["mean"] == pytest.approx(92.0)
    assert s["dice"]["ct"]["A"]["std"] == pytest.approx(2.0)
    assert s["dice"]["ct"]["mean"] == pytest.approx(87.0)
    assert s["dice"]["mr"]["mean"] == pytest.approx(65.0)
    assert s["dice"]["overall"] == pytest.approx(76.0)  # the mean of the two modality means, as in Table 2
    assert s["asd"]["ct"]["B"] == {"mean": 2.0, "std": 0.0, "n": 1, "n_nan": 0, "n_inf": 1}
    md = table2_markdown(s, ["A", "B"], ["ct", "mr"], method="ours")
    assert "| Method | CT A | CT B | CT Mean | MRI A | MRI B | MRI Mean | Overall Mean |" in md
    assert "| ours | 92.0±2.0 | 82.0±2.0 | 87.0 | 70.0±0.0 | 60.0±0.0 | 65.0 | 76.0 |" in md
    assert "2.00±0.00 (1 missed)" in md


def test_report_scores_in_the_label_geometry():
    rng = np.random.default_rng(5)
    label = np.zeros((1, 12, 10, 8), dtype=np.int64)
    label[0, 3:9, 2:8, 2:6] = 1
    label[0, 5:7, 4:6, 3:5] = 2
    pred = np.roll(label, 1, axis=1)
    affine = torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0]))
    report = ModalityMetricsReport("unused", ["A", "B"], ["ct", "mr"], metrics=("dice", "asd", "iou"))
    row = report.score_case(torch.from_numpy(pred), MetaTensor(torch.from_numpy(label), affine=affine), "mr", "c1")
    np.testing.assert_allclose(row["dice"], 100 * dice_per_class(pred[0], label[0], 3))
    np.testing.assert_allclose(row["asd"], asd_per_class(pred[0], label[0], 3, spacing=(2.0, 1.5, 3.0)))
    assert row["modality"] == "mr" and len(row["iou"]) == 2
    with pytest.raises(ValueError, match="differ in size"):
        report.score_case(torch.zeros(1, 5, 5, 5), torch.zeros(1, 6, 5, 5), "ct", "c2")
    with pytest.raises(ValueError, match="modality 'pet'"):
        report.score_case(torch.from_numpy(pred), torch.from_numpy(label), "pet", "c3")
    assert rng is not None
