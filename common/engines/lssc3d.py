"""LSSC 3D configuration in the bundle: patch training data, sliding-window inference, and the 2D/3D switch.

The paper's 3D configuration (Sec. 4.2; ``METHODS.md`` §2) trains the nnFormer-style network
(:class:`common.networks.lssc3d.LSSCnnFormer`) on random ``128 x 128 x 64`` crops, 2 per modality and iteration, and
predicts a volume with a sliding window of the same size and 25 % overlap, stitched in the volume's geometry.

- :class:`VolumePatchDataset`: preprocesses every volume once (the bundle's deterministic volume chain, cached like
  :class:`common.data.slices.VolumeSliceDataset`) and returns one random patch per item (MONAI
  ``RandCropByPosNegLabeld``: half of the patches centred on a labelled voxel, half anywhere), then the random
  augmentation; :meth:`VolumePatchDataset.indices_by` groups items by modality for
  :class:`common.engines.lssc.UnpairedLoader`, so the unpaired trainer is the 2D one.
- :class:`ModalitySlidingWindowInferer`: MONAI's ``SlidingWindowInferer`` run per volume with that volume's modality
  passed to the network; the output keeps the input's metadata, so ``Invertd`` maps it back to the file's grid and
  the evaluation (:class:`common.engines.lssc.ModalityMetricsReport`: Dice %, ASD mm with the file's spacing) scores
  3D predictions exactly as 2D ones.
- :func:`lssc_train_dataset` and :func:`lssc_inferer`: the components the bundle configs build, chosen by the
  ``spatial_dims`` knob (2: slice stacks and :class:`common.engines.inference.SliceStackInferer`; 3: the above).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import RandCropByPosNegLabeld
from torch.utils.data import Dataset

from common.data.slices import VolumeSliceDataset
from common.engines.inference import SliceStackInferer, predict_each_volume
from common.networks.lssc3d import patch_shape

__all__ = ["ModalitySlidingWindowInferer", "VolumePatchDataset", "lssc_inferer", "lssc_train_dataset"]


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (slice stacks, Swin-Unet) or 3 (patches, nnFormer-style), "
                         f"got {spatial_dims!r}")
    return int(spatial_dims)


class VolumePatchDataset(Dataset):
    """Random 3D patches of preprocessed volumes, for unpaired patch training.

    Item ``i`` is a patch of volume ``i // samples_per_volume``: a dict with ``image_key`` ``(C, *patch)`` float32,
    ``label_key`` ``(1, *patch)`` int64, ``"volume"`` and the volume entry's plain keys (``modality``, ``patient``);
    then ``transform`` (augmentation) is applied.

    Args:
        data: volume entries (e.g. :func:`common.data.slices.unpaired_datalist`), with labels.
        volume_transform: deterministic chain applied once per volume (cached); must return channel-first
            ``(C, X, Y, Z)`` image and label at least ``patch_size`` large (pad in the chain).
        patch_size: patch ``(X, Y, Z)`` or ``s`` (= ``s x s x s/2``, :func:`common.networks.lssc3d.patch_shape`).
        transform: per-patch random transform (augmentation).
        samples_per_volume: items (patches) per volume and pass.
        pos, neg: MONAI ``RandCropByPosNegLabeld`` ratio of foreground- to anywhere-centred patches.
        image_key, label_key: keys of the volumes.
    """

    def __init__(self, data: Sequence[Mapping[Hashable, Any]], volume_transform: Callable[[dict], Mapping],
                 patch_size: int | Sequence[int], transform: Callable[[dict], Any] | None = None,
                 samples_per_volume: int = 1, pos: float = 1.0, neg: float = 1.0, image_key: str = "image",
                 label_key: str = "label") -> None:
        if samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
        self.data = list(data)
        if not self.data:
            raise ValueError("VolumePatchDataset got an empty datalist")
        self.patch_size = patch_shape(patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self.crop = RandCropByPosNegLabeld(keys=[image_key, label_key], label_key=label_key,
                                           spatial_size=self.patch_size, pos=pos, neg=neg, num_samples=1,
                                           allow_smaller=False)
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        for entry in self.data:
            out = volume_transform(dict(entry))
            name = entry.get(image_key)
            image = VolumeSliceDataset._plain(out[image_key], f"{name}: transformed image", torch.float32)
            if out.get(label_key) is None:
                raise ValueError(f"{name}: patch training needs a label, the volume transform returned none")
            label = VolumeSliceDataset._plain(out[label_key], f"{entry.get(label_key)}: transformed label", torch.uint8)
            if label.shape[1:] != image.shape[1:]:
                raise ValueError(f"{entry.get(label_key)}: label {tuple(label.shape)} and image {tuple(image.shape)} "
                                 "differ in size after the volume transform")
            small = [s for s, p in zip(image.shape[1:], self.patch_size) if s < p]
            if small:
                raise ValueError(f"{name}: volume {tuple(image.shape[1:])} is smaller than the patch "
                                 f"{self.patch_size}; pad it in the volume transform (SpatialPadd)")
            self.images.append(image)
            self.labels.append(label)

    def __len__(self) -> int:
        return len(self.data) * self.samples_per_volume

    def indices_by(self, key: str = "modality") -> dict[Any, list[int]]:
        """Item indices grouped by the volume entries' ``key`` (e.g. per modality), in item order."""
        groups: dict[Any, list[int]] = {}
        for i in range(len(self)):
            entry = self.data[i // self.samples_per_volume]
            if key not in entry:
                raise KeyError(f"volume entry {i // self.samples_per_volume} has no {key!r} key")
            groups.setdefault(entry[key], []).append(i)
        return groups

    def __getitem__(self, index: int) -> Any:
        v = index // self.samples_per_volume
        entry = self.data[v]
        item: dict[Hashable, Any] = {k: val for k, val in entry.items() if k not in (self.image_key, self.label_key)
                                     and isinstance(val, (str, int, float, bool))}
        patch = self.crop({self.image_key: self.images[v], self.label_key: self.labels[v]})[0]
        item[self.image_key] = torch.as_tensor(patch[self.image_key]).float()
        item[self.label_key] = torch.as_tensor(patch[self.label_key]).long()
        item["volume"] = v
        return self.transform(item) if self.transform is not None else item


class ModalitySlidingWindowInferer(Inferer):
    """Sliding-window prediction of a batch of volumes with a 3D network that takes the modality as an argument.

    ``__call__(inputs, network, *args, modality=None, **kwargs)``: ``inputs`` ``(B, C, X, Y, Z)``; each volume runs
    through MONAI's ``SlidingWindowInferer`` with its own modality (``None``, one value for the batch, or ``B``
    values), passed to the network as ``modality``. Windows are ``roi_size`` (the training patch), blended with
    ``mode`` (``"constant"``: plain average of the overlaps) and padded with zeros (the mean of a z-scored volume)
    where the volume is smaller. Returns ``(B, K, X, Y, Z)``, a MetaTensor with the input's metadata when the input is
    one.

    Args:
        roi_size: window ``(X, Y, Z)`` or ``s`` (= ``s x s x s/2``).
        sw_batch_size: windows per network call.
        overlap: fraction of overlap of neighbouring windows (0.25 in the paper).
        mode: MONAI blend mode, ``"constant"`` or ``"gaussian"``.
        progress: tqdm bar over the windows.
    """

    def __init__(self, roi_size: int | Sequence[int], sw_batch_size: int = 2, overlap: float = 0.25,
                 mode: str = "constant", progress: bool = False) -> None:
        super().__init__()
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = patch_shape(roi_size)
        self.sliding = SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=sw_batch_size, overlap=overlap,
                                            mode=mode, padding_mode="constant", cval=0.0, progress=progress)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 modality: Any = None, **kwargs: Any) -> torch.Tensor:
        return predict_each_volume(inputs, modality, kwargs,
                                   lambda vol, kw: self.sliding(vol, network, *args, **kw),
                                   "ModalitySlidingWindowInferer")


def lssc_train_dataset(spatial_dims: int, data: Sequence[Mapping[Hashable, Any]],
                       volume_transform: Callable[[dict], Mapping], transform: Callable[[dict], Any] | None = None,
                       slice_axis: str | int = "coronal", num_slices: int = 3, slice_selection: str = "foreground",
                       patch_size: int | Sequence[int] = 128, samples_per_volume: int = 1
                       ) -> VolumeSliceDataset | VolumePatchDataset:
    """The bundle's training dataset: slice stacks (``spatial_dims=2``; ``slice_axis``, ``num_slices``,
    ``slice_selection``) or random patches (``spatial_dims=3``; ``patch_size``, ``samples_per_volume``)."""
    if _check_spatial_dims(spatial_dims) == 2:
        return VolumeSliceDataset(data, volume_transform, slice_axis=slice_axis, num_slices=num_slices,
                                  transform=transform, slice_selection=slice_selection)
    return VolumePatchDataset(data, volume_transform, patch_size, transform=transform,
                              samples_per_volume=samples_per_volume)


def lssc_inferer(spatial_dims: int, slice_axis: str | int = "coronal", num_slices: int = 3, batch_size: int = 16,
                 size_multiple: int = 32, roi_size: int | Sequence[int] = 128, overlap: float = 0.25
                 ) -> SliceStackInferer | ModalitySlidingWindowInferer:
    """The bundle's volume inferer: slice-wise (``spatial_dims=2``; ``slice_axis``, ``num_slices``,
    ``size_multiple``) or sliding-window (``spatial_dims=3``; ``roi_size`` windows with ``overlap``); ``batch_size``
    slice stacks or windows per network call."""
    if _check_spatial_dims(spatial_dims) == 2:
        return SliceStackInferer(slice_axis=slice_axis, num_slices=num_slices, batch_size=batch_size,
                                 size_multiple=size_multiple)
    return ModalitySlidingWindowInferer(roi_size, sw_batch_size=batch_size, overlap=overlap)
