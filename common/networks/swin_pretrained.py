"""Load a user-supplied Swin-T checkpoint (Microsoft or timm key names) into the Swin blocks of LSSC's Swin-Unet.

The LSSC paper (Sec. 4.2) fine-tunes from ImageNet-pretrained Swin weights, as Swin-Unet does. Nothing is
downloaded here: the user gives the file (e.g. ``swin_tiny_patch4_window7_224.pth`` of the official Swin repository,
or a timm ``pytorch_model.bin`` of ``swin_tiny_patch4_window7_224``). :func:`load_swin_pretrained` maps its tensors
onto :class:`common.networks.lssc.LSSCSwinUnet` and returns a :class:`SwinLoadReport` saying what went where.

Key names understood (``i`` = stage 0-3, ``j`` = block):

=================================================  ==========================================================
checkpoint (Microsoft; timm differs as noted)      LSSC target (for every encoder ``e``; blocks also decoder)
=================================================  ==========================================================
``patch_embed.proj.*``, ``patch_embed.norm.*``     ``encoders.e.patch_embed.proj.*``, ``...patch_embed.norm.*``
``layers.i.blocks.j.norm1/norm2.*``                ``encoders.e.stages.i.blocks.j.norm1/norm2.*``
``layers.i.blocks.j.attn.qkv/proj.*``              ``encoders.e.stages.i.blocks.j.attn.qkv/proj.*``
``layers.i.blocks.j.attn.relative_position_``      ``...attn.relative_position_bias_table`` (resized bicubically
``bias_table``                                     when the window differs)
``layers.i.blocks.j.mlp.fc1/fc2.*``                ``encoders.e.stages.i.blocks.j.mlp.linear1/linear2.*``
``layers.i.downsample.reduction/norm.*``           ``encoders.e.merges.i.reduction/norm.*`` (timm >= 0.9 stores
                                                   the merging of stage ``i`` as ``layers.{i+1}.downsample``)
``norm.*``                                         ``encoders.e.norm.*`` (the bottleneck LayerNorm, ``8C``)
``head.*`` (timm: ``head.fc.*``)                   none: the ImageNet classifier (reported as unused)
``...relative_position_index``, ``...attn_mask``   none: derived buffers the network recomputes (unused)
=================================================  ==========================================================

With ``load_decoder=True`` (Swin-Unet's ``load_from``) decoder stage ``lambda`` (1-3) also receives the blocks of
encoder stage ``3 - lambda`` (same width and heads): ``decoder.{lambda-1}.blocks.blocks.j.*`` <- ``layers.{3-lambda}
.blocks.j.*``. Everything else (image embeddings, class embeddings and the channel-wise multiplication weights
``w1, W2, W3``, skip fusions, patch expanding, head, EAMs) keeps its initialisation. Blocks of the checkpoint beyond
the network's depth (Swin-T has 6 blocks in stage 3, Swin-Unet uses 2) are reported as unused; blocks of the
network beyond the checkpoint's depth keep their initialisation and are reported as ``not_loaded``.

Why the mapping is exact: MONAI's 2D ``PatchMerging`` concatenates the four ``2 x 2`` neighbours in the order of the
original Swin (``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``), and MONAI's window attention indexes
its relative-position table as the original does, so the tensors are copied as they are (the tests check both).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SwinLoadReport", "load_swin_pretrained", "normalise_swin_keys", "read_swin_checkpoint"]

logger = logging.getLogger(__name__)

_NUM_STAGES = 4
# checkpoint sub-key of a block -> our sub-key (MONAI's SwinTransformerBlock / MLPBlock names)
_BLOCK_KEYS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.linear1.weight",
    "mlp.fc1.bias": "mlp.linear1.bias",
    "mlp.fc2.weight": "mlp.linear2.weight",
    "mlp.fc2.bias": "mlp.linear2.bias",
}
_DERIVED = ("relative_position_index", "attn_mask")  # buffers a network recomputes from its window/shift
_TABLE = "attn.relative_position_bias_table"
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MERGE_RE = re.compile(r"^layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")


@dataclass
class SwinLoadReport:
    """What :func:`load_swin_pretrained` did.

    Attributes:
        loaded: target parameter -> checkpoint key it was copied from.
        resized: targets whose relative-position table was interpolated to the network's window.
        unused: checkpoint keys with a known meaning and no target (classifier head, derived buffers, blocks beyond
            the network's depth).
        unknown: checkpoint keys that are not Swin-T key names.
        mismatched: ``(checkpoint key, target, checkpoint shape, target shape)`` of skipped shape mismatches.
        not_loaded: target Swin parameters (patch embedding, blocks, merging, bottleneck norm) that got nothing.
    """

    loaded: dict[str, str] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts, followed by the skipped keys (for the log)."""
        lines = [
            f"Swin pretrained weights: {len(self.loaded)} tensors loaded ({len(self.resized)} position tables "
            f"resized), {len(self.unused)} checkpoint keys unused, {len(self.unknown)} unknown, "
            f"{len(self.mismatched)} shape mismatches, {len(self.not_loaded)} Swin parameters not loaded"
        ]
        if self.unknown:
            lines.append(f"  unknown keys: {self.unknown}")
        for src, dst, s_src, s_dst in self.mismatched:
            lines.append(f"  shape mismatch: {src} {s_src} -> {dst} {s_dst}")
        if self.not_loaded:
            lines.append(f"  not loaded: {self.not_loaded}")
        return "\n".join(lines)


def read_swin_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a Swin checkpoint file (``torch.save`` format, read weights-only).

    Unwraps a ``{"model": ...}`` (Microsoft) or ``{"state_dict": ...}`` dict and a ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no tensor dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Swin checkpoint {str(p)!r} does not exist (pretrained_path)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-torch file: say which file
        raise ValueError(f"cannot read Swin checkpoint {str(p)!r}: {exc}") from exc
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"Swin checkpoint {str(p)!r} holds no dict of tensors")
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, Tensor)
    }


def normalise_swin_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename timm (>= 0.9) Swin keys to the Microsoft names; Microsoft (and older timm) keys pass unchanged.

    timm stores the patch merging at the start of the next stage (``layers.{i+1}.downsample``, ``i`` = 0-2) and
    the classifier as ``head.fc``; the Microsoft checkpoint has ``layers.{i}.downsample`` and ``head``. A
    checkpoint with ``layers.3.downsample`` (a merging after the last stage cannot exist) is timm's layout.
    """
    timm_layout = any(k.startswith("layers.3.downsample.") for k in state) and not any(
        k.startswith("layers.0.downsample.") for k in state
    )
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if timm_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


def _resize_table(table: Tensor, target_rows: int) -> Tensor:
    """Bicubic resize of a ``((2w-1)^2, heads)`` relative-position table to ``target_rows`` rows (another window),
    as the Swin authors do when fine-tuning at another window size."""
    side, new_side = round(table.shape[0] ** 0.5), round(target_rows**0.5)
    if side * side != table.shape[0] or new_side * new_side != target_rows:
        raise ValueError(f"relative-position tables must have a square number of rows, got {table.shape[0]}")
    grid = table.T.reshape(1, table.shape[1], side, side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], target_rows).T.to(table.dtype)


def _targets(network: nn.Module, load_decoder: bool) -> dict[str, list[str]]:
    """Checkpoint key (Microsoft names) -> the network's parameter names that receive it."""
    encoders = getattr(network, "encoders", None)
    decoder = getattr(network, "decoder", None)
    if encoders is None or decoder is None:
        raise TypeError(f"expected an LSSCSwinUnet (with encoders and decoder), got {type(network).__name__}")
    targets: dict[str, list[str]] = {}

    def add(src: str, dst: str) -> None:
        targets.setdefault(src, []).append(dst)

    for e, enc in enumerate(encoders):
        p = f"encoders.{e}."
        for sub in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
            add(f"patch_embed.{sub}", f"{p}patch_embed.{sub}")
        for i, stage in enumerate(enc.stages):
            for j in range(len(stage.blocks)):
                for src, dst in _BLOCK_KEYS.items():
                    add(f"layers.{i}.blocks.{j}.{src}", f"{p}stages.{i}.blocks.{j}.{dst}")
        for i in range(len(enc.merges)):
            for sub in ("reduction.weight", "norm.weight", "norm.bias"):
                add(f"layers.{i}.downsample.{sub}", f"{p}merges.{i}.{sub}")
        add("norm.weight", f"{p}norm.weight")
        add("norm.bias", f"{p}norm.bias")
    if load_decoder:
        for d, stage in enumerate(decoder):
            i = _NUM_STAGES - 2 - d  # decoder stage lambda = d + 1 mirrors encoder stage 3 - lambda
            for j in range(len(stage.blocks.blocks)):
                for src, dst in _BLOCK_KEYS.items():
                    add(f"layers.{i}.blocks.{j}.{src}", f"decoder.{d}.blocks.blocks.{j}.{dst}")
    return targets


def _is_known(key: str) -> bool:
    """A Swin-T key name (whether or not this network has a place for it)."""
    if key.startswith(("patch_embed.", "head.")) or key in ("norm.weight", "norm.bias"):
        return True
    m = _BLOCK_RE.match(key)
    if m:
        return m.group(3) in _BLOCK_KEYS or m.group(3).endswith(_DERIVED)
    return bool(_MERGE_RE.match(key))


def load_swin_pretrained(
    network: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    load_decoder: bool = True,
    strict: bool = True,
) -> SwinLoadReport:
    """Copy Swin-T weights into ``network`` (an :class:`common.networks.lssc.LSSCSwinUnet`) in place.

    Args:
        network: the network; every encoder (one per modality in Joint V1) receives the same weights.
        source: a checkpoint path (:func:`read_swin_checkpoint`) or a state dict, Microsoft or timm key names.
        load_decoder: also initialise the decoder's Swin blocks from the encoder stage of the same size
            (Swin-Unet's ``load_from``).
        strict: raise on shape mismatches (other than relative-position tables of another window size, which are
            resized) and on keys that are not Swin-T names; ``False`` skips them and lists them in the report.

    Returns:
        The :class:`SwinLoadReport` (also logged at INFO, skips at WARNING).

    Raises:
        ValueError: with ``strict``, shape mismatches or unknown keys (all of them named); always, when not a single
            tensor could be loaded.
    """
    name = str(source) if isinstance(source, (str, Path)) else "the given state dict"
    state = normalise_swin_keys(read_swin_checkpoint(source) if isinstance(source, (str, Path)) else source)
    params = dict(network.named_parameters())
    targets = _targets(network, load_decoder)
    report = SwinLoadReport()
    updates: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in targets:
            (report.unused if _is_known(key) else report.unknown).append(key)
            continue
        for dst in targets[key]:
            want = tuple(params[dst].shape)
            if tuple(value.shape) != want:
                resizable = (
                    key.endswith(_TABLE) and value.dim() == 2 and len(want) == 2 and value.shape[1] == want[1]
                )
                if not resizable:
                    report.mismatched.append((key, dst, tuple(value.shape), want))
                    continue
                updates[dst] = _resize_table(value, want[0])
                report.resized.append(dst)
            else:
                updates[dst] = value
            report.loaded[dst] = key
    mapped = {dst for dsts in targets.values() for dst in dsts}
    report.not_loaded = sorted(mapped - set(report.loaded))
    problems = []
    if report.mismatched:
        problems.append(
            "shape mismatches: "
            + "; ".join(f"{s} {tuple(a)} -> {d} {tuple(b)}" for s, d, a, b in report.mismatched[:10])
            + (f" (+{len(report.mismatched) - 10} more)" if len(report.mismatched) > 10 else "")
        )
    if report.unknown:
        problems.append(f"keys that are not Swin-T names: {report.unknown[:10]}")
    if not updates:
        raise ValueError(
            f"no tensor of {name} fits this network ({'; '.join(problems) or 'no Swin-T keys'}); it needs a Swin "
            "checkpoint with the network's embed_dim, num_heads and in_channels (Swin-T: 96, [3, 6, 12, 24], 3)"
        )
    if strict and problems:
        raise ValueError(
            f"Swin checkpoint {name} does not match the network: {'; '.join(problems)}. Use a checkpoint of the same "
            "embed_dim/num_heads/in_channels, or load with strict=False to skip these keys"
        )
    with torch.no_grad():
        for dst, value in updates.items():
            params[dst].copy_(value.to(params[dst].dtype))
    logger.info(report.summary().splitlines()[0])
    if report.mismatched or report.unknown or report.not_loaded:
        logger.warning(report.summary())
    return report
