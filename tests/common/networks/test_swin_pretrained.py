"""Loading a user-supplied Swin-T checkpoint (Microsoft and timm key names) into LSSC's Swin-Unet.

The checkpoints are built here from random tensors in the original naming (no download). The expected target of
every checkpoint tensor is derived in this file by renaming the network's parameter names back to Swin's, not with
the loader's own table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from common.engines.lssc import lssc_network
from common.networks.lssc import LSSCSwinUnet
from common.networks.swin_pretrained import load_swin_pretrained, read_swin_checkpoint

EMBED, HEADS, DEPTHS = 8, (1, 2, 2, 4), (2, 2, 2, 2)
CONFIGS = Path(__file__).resolve().parents[3] / "bundles" / "lssc_multimodal" / "configs"
CKPT_DEPTHS = (2, 2, 3, 2)  # one block more than the network in stage 3, as Swin-T (6) vs Swin-Unet (2)


def _net(window: int = 7, **kwargs) -> LSSCSwinUnet:
    torch.manual_seed(0)
    args = dict(
        img_size=32, embed_dim=EMBED, depths=DEPTHS, decoder_depths=(2, 1, 1), num_heads=HEADS, window_size=window,
        modality_specific_encoder=True, drop_path_rate=0.0,
    )
    args.update(kwargs)
    return LSSCSwinUnet(**args)


def _ms_index(w: int) -> torch.Tensor:
    """relative_position_index of the original Swin code (WindowAttention.__init__), written out here."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[:, :, 0] * (2 * w - 1) + rel[:, :, 1]


def _swin_t_like(window: int = 7, in_chans: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """A Microsoft-layout Swin checkpoint of this test's widths, random values (each tensor distinct)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {"patch_embed.proj.weight": r(EMBED, in_chans, 4, 4), "patch_embed.proj.bias": r(EMBED),
          "patch_embed.norm.weight": r(EMBED), "patch_embed.norm.bias": r(EMBED)}
    for i, (depth, heads) in enumerate(zip(CKPT_DEPTHS, HEADS)):
        d = EMBED * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd.update({
                p + "norm1.weight": r(d), p + "norm1.bias": r(d),
                p + "attn.relative_position_bias_table": r((2 * window - 1) ** 2, heads),
                p + "attn.relative_position_index": _ms_index(window),
                p + "attn.qkv.weight": r(3 * d, d), p + "attn.qkv.bias": r(3 * d),
                p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d),
                p + "norm2.weight": r(d), p + "norm2.bias": r(d),
                p + "mlp.fc1.weight": r(4 * d, d), p + "mlp.fc1.bias": r(4 * d),
                p + "mlp.fc2.weight": r(d, 4 * d), p + "mlp.fc2.bias": r(d),
            })
            if j % 2:
                sd[p + "attn_mask"] = r(4, window * window, window * window)
        if i < 3:
            sd.update({f"layers.{i}.downsample.reduction.weight": r(2 * d, 4 * d),
                       f"layers.{i}.downsample.norm.weight": r(4 * d), f"layers.{i}.downsample.norm.bias": r(4 * d)})
    sd.update({"norm.weight": r(8 * EMBED), "norm.bias": r(8 * EMBED), "head.weight": r(10, 8 * EMBED),
               "head.bias": r(10)})
    return sd


def _to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm >= 0.9 naming: merging of stage i stored as layers.{i+1}.downsample, classifier as head.fc."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d)\.downsample\.(.*)", k)
        k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else k
        out[k.replace("head.", "head.fc.")] = v
    return out


def _swin_source(name: str) -> str | None:
    """The Swin checkpoint key that should land in our parameter ``name`` (None: not a Swin parameter)."""
    m = re.match(r"decoder\.(\d)\.blocks\.blocks\.(\d+)\.(.*)", name)
    if m:  # Swin-Unet: decoder stage lambda = d + 1 <- encoder stage 3 - lambda
        name, rest = f"layers.{2 - int(m.group(1))}.blocks.{m.group(2)}", m.group(3)
    else:
        m = re.match(r"encoders\.\d+\.(.*)", name)
        if not m:
            return None
        rest = m.group(1)
        name = ""
        if rest.startswith("stages."):
            rest = "layers." + rest[len("stages."):]
        rest = re.sub(r"^merges\.(\d)\.", r"layers.\1.downsample.", rest)
    full = f"{name}.{rest}" if name else rest
    if re.search(r"\.w[123](\.|$)", full):
        return None  # LSSC's channel-wise multiplication: not in Swin
    return full.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")


def test_every_swin_tensor_lands_in_its_parameter_ms_and_timm_names(tmp_path):
    sd = _swin_t_like()
    torch.save({"model": sd}, tmp_path / "ms.pth")  # the official release wraps the weights in "model"
    torch.save(_to_timm(sd), tmp_path / "timm.bin")
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_swin_pretrained(net, tmp_path / "ms.pth")

    checked = 0
    for name, param in net.named_parameters():
        src = _swin_source(name)
        if src is None:  # image/class embeddings, w1-3, fusions, expandings, head, EAMs: untouched
            assert torch.equal(param, before[name]), name
            continue
        assert torch.equal(param, sd[src]), f"{name} should hold {src}"
        assert report.loaded[name] == src
        checked += 1
    # two encoders (Joint V1 layout) + decoder blocks (2 + 1 + 1); every Swin parameter was loaded
    assert checked == len(report.loaded) and not report.not_loaded and not report.resized
    assert any(k.startswith("encoders.1.stages.3.") for k in report.loaded)
    assert any(k.startswith("decoder.2.blocks.blocks.0.") for k in report.loaded)
    # derived buffers, the classifier and stage 3's extra block are reported, nothing is unknown
    assert set(report.unused) == {k for k in sd if k.startswith(("head.", "layers.2.blocks.2."))
                                  or k.endswith(("relative_position_index", "attn_mask"))}
    assert report.unknown == [] and report.mismatched == []

    net_timm = _net()
    report_timm = load_swin_pretrained(net_timm, read_swin_checkpoint(tmp_path / "timm.bin"))
    assert report_timm.loaded == report.loaded
    for (k, a), b in zip(net.state_dict().items(), net_timm.state_dict().values()):
        assert torch.equal(a, b), k


def test_loaded_merging_and_position_index_follow_the_original_swin():
    """The copy is exact only if MONAI's merging order and position index equal the original code's."""
    sd = _swin_t_like()
    net = _net()
    load_swin_pretrained(net, sd)
    x = torch.randn(2, 8, 8, EMBED)
    # original Swin PatchMerging: cat(x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]), norm, reduction
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    ref = torch.nn.functional.layer_norm(cat, (4 * EMBED,), sd["layers.0.downsample.norm.weight"],
                                         sd["layers.0.downsample.norm.bias"])
    ref = ref @ sd["layers.0.downsample.reduction.weight"].T
    torch.testing.assert_close(net.encoders[0].merges[0](x), ref)
    attn = net.encoders[0].stages[0].blocks[0].attn
    assert torch.equal(attn.relative_position_index.long(), _ms_index(7))


def test_relative_position_tables_are_resized_to_another_window():
    sd = _swin_t_like(window=7)
    for k in sd:
        if k.endswith("relative_position_bias_table"):  # a per-head constant survives any interpolation
            sd[k] = torch.arange(1.0, sd[k].shape[1] + 1).expand_as(sd[k]).clone()
    net = _net(window=4)
    report = load_swin_pretrained(net, sd)
    tables = [k for k in report.loaded if k.endswith("relative_position_bias_table")]
    assert sorted(report.resized) == sorted(tables) and len(tables) == 2 * sum(DEPTHS) + 4
    for k in tables:
        t = net.get_parameter(k)
        assert t.shape[0] == 49  # (2 * 4 - 1)^2
        torch.testing.assert_close(t, torch.arange(1.0, t.shape[1] + 1).expand_as(t))


def test_mismatches_and_unknown_keys_fail_clearly_or_are_reported(tmp_path):
    sd = _swin_t_like()
    sd["layers.1.blocks.0.attn.qkv.weight"] = torch.randn(5, 16)
    sd["backbone.extra.weight"] = torch.randn(3)
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.attn\.qkv\.weight.*\(5, 16\)") as err:
        load_swin_pretrained(_net(), sd)
    assert "backbone.extra.weight" in str(err.value) and "strict=False" in str(err.value)

    net = _net()
    before = net.encoders[0].stages[1].blocks[0].attn.qkv.weight.clone()
    report = load_swin_pretrained(net, sd, strict=False)
    assert report.unknown == ["backbone.extra.weight"]
    assert {m[1] for m in report.mismatched} == {"encoders.0.stages.1.blocks.0.attn.qkv.weight",
                                                 "encoders.1.stages.1.blocks.0.attn.qkv.weight",
                                                 "decoder.1.blocks.blocks.0.attn.qkv.weight"}
    assert set(report.not_loaded) == {m[1] for m in report.mismatched}
    assert torch.equal(net.encoders[0].stages[1].blocks[0].attn.qkv.weight, before)
    assert torch.equal(net.encoders[0].stages[1].blocks[0].attn.proj.weight, sd["layers.1.blocks.0.attn.proj.weight"])

    with pytest.raises(ValueError, match="no tensor .* fits this network"):  # another width, e.g. Swin-T on C=32
        load_swin_pretrained(_net(embed_dim=16, num_heads=(2, 4, 8, 16)), sd, strict=False)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_swin_pretrained(_net(), tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_swin_pretrained(_net(), tmp_path / "junk.pth")


def test_pretrained_path_knob_of_the_bundle(tmp_path):
    from monai.bundle import ConfigParser

    torch.save({"model": _swin_t_like(window=4)}, tmp_path / "swin.pth")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["pretrained_path"] == ""  # default: no pretrained weights
    parser.update({"spatial_size": 32, "embed_dim": EMBED, "num_heads": list(HEADS), "depths": list(DEPTHS),
                   "decoder_depths": [1, 1, 1], "window_size": 4, "pretrained_path": str(tmp_path / "swin.pth")})
    net = parser.get_parsed_content("network_def")
    assert net.pretrained_report is not None and not net.pretrained_report.mismatched
    assert torch.equal(net.encoders[0].stages[2].blocks[1].mlp.linear2.bias,
                       _swin_t_like(window=4)["layers.2.blocks.1.mlp.fc2.bias"])
    # evaluation builds the network for the checkpoint it loads next: no pretrained loading there
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    assert parser["network_def"]["pretrained_path"] == ""
    plain = lssc_network("backbone", modalities=["ct"], img_size=32, embed_dim=EMBED, num_heads=HEADS,
                         depths=DEPTHS, decoder_depths=(1, 1, 1), window_size=4)
    assert plain.pretrained_report is None
