"""LSSC: one 2D Swin-Unet for unpaired multi-modal (CT/MRI) segmentation with External Attention Modules.

Yang et al., "Toward Unpaired Multi-modal Medical Image Segmentation via Learning Structured Semantic Consistency"
(MIDL 2023), Sec. 3; ``METHODS.md`` §2. The losses of Eq. 12-15 live in :mod:`common.losses.lssc`.

Notation: ``B`` batch, ``M`` number of modalities, ``Z`` number of classes including background, ``C`` the embedding
dimension (``embed_dim``), ``P`` the patch size, ``N`` the number of EAM heads of a scale, ``H x W`` the input size.

Data flow (2D, input ``(B, in_channels, H, W)``, three consecutive slices as channels by default):

1. Modality-specific image embedding: two 1x1 convolutions per modality, ``(B, in, H, W) -> (B, in, H, W)``.
2. Shared Swin-Unet encoder: patch embedding to ``(B, H/P, W/P, C)`` and four stages of Swin Transformer blocks at
   ``C, 2C, 4C, 8C`` channels and ``H/P, H/2P, H/4P, H/8P`` rows, patch merging between stages; the fourth stage is
   the bottleneck.
3. Decoder stages ``lambda = 1, 2, 3`` ("scales 1..3"): patch expanding (x2), concatenation with the skip of the
   encoder stage of the same size, a linear fusion and Swin blocks; outputs ``F_1 (H/4P, 4C)``, ``F_2 (H/2P, 2C)``,
   ``F_3 (H/P, C)``. A final x``P`` patch expanding and a 1x1 convolution give the logits ``(B, Z, H, W)``.
4. Every Swin block (encoder and decoder) carries the modality-aware channel-wise multiplication of Eq. 1-3,
   driven by the modality-specific class embeddings ``Q_M in R^{Z x 4C}``::

       Omega = w1 Q_M,  Phi1 = diag(Omega W2),  Phi2 = diag(Omega W3)
       X'  = X  + Phi1 (x) MSA(LN(X))
       X'' = X' + Phi2 (x) FFN(LN(X'))

5. Training only: one External Attention Module (EAM) per decoder scale (Eq. 4-11). The EAM of scale 1 takes
   ``Q_M`` and ``F_1``; multi-head cross attention (queries from the class embeddings, keys/values from the feature
   map) gives image-specific class embeddings ``Q_1 in R^{Z x 2C}`` (after a width-halving projection) and the
   semantic-aware maps ``A_1 in R^{Z x N x H/4P x W/4P}`` (per-head ``q k^T``); semantic filtering, re-weighting and
   aggregation of ``A_1`` give the correlation matrix ``E_1 in R^{Z x Z}``. Scales 2 and 3 do the same with
   ``(Q_1, F_2)`` and ``(Q_2, F_3)``. Auxiliary 1x1-conv predictions are made from each ``A_lambda``.

The image embedding, the Swin stage (regular and shifted windows of the modality-aware block) and the EAM take
``spatial_dims`` (2 here): the 3D configuration (:class:`common.networks.lssc3d.LSSCnnFormer`, nnFormer-style backbone)
builds them with 3 and inherits this class's modality handling, ``forward_train``, variants and export.

EAMs never feed the segmentation path, so the inference network (:meth:`LSSCSwinUnet.inference_network`,
:meth:`LSSCSwinUnet.export_state_dict`) drops them and predicts exactly what the training network predicts.

Modality argument (``forward`` and ``forward_train``): a modality name (``"ct"``; the whole batch has that
modality), a sequence of ``B`` names, or a ``(B,)`` integer tensor of indices into ``modalities`` (mixed batches,
and the form to use with ``torch.jit.trace`` / ``torch.export``). ``None`` means ``default_modality``.

Variants (paper Sec. 4.3) are constructor switches; :func:`lssc_variant_kwargs` gives them by name:

============  =========  ============  ====  ===========  =================  =================
name          image emb  channel mult  EAMs  E (for CR)   encoder            EAM sets
============  =========  ============  ====  ===========  =================  =================
backbone      no         no            no    no           shared             -
baseline      no         no            yes   no           shared             shared
joint_v1      yes        no            yes   no           per modality       per modality
joint_v2      yes        no            yes   no           shared             per modality
joint_v3      yes        yes           yes   no           shared             per modality
joint_v1+cr   yes        no            yes   yes          per modality       per modality
joint_v2+cr   yes        no            yes   yes          shared             per modality
full          yes        yes           yes   yes          shared             per modality
============  =========  ============  ====  ===========  =================  =================

"+ CR" (consistency regularisation, ``L_mcr`` and ``L_icr``) is chiefly a loss switch
(:func:`common.losses.lssc.lssc_loss_kwargs`); in the network it only adds the semantic-filtering weights that
produce ``E`` (``use_correlations``), which nothing else trains, so variants without ``L_icr`` carry no parameter
without a gradient (DistributedDataParallel needs that). "full" = "joint_v3+cr", the paper's method. Backbone and
Baseline are trained on one modality each (one network per modality, ``modalities=("ct",)`` etc.); that is the
training workflow's business, the network only provides the architecture.

Choices the paper does not state
--------------------------------
1. Image embedding: ``Conv1x1(in, in) -> GELU -> Conv1x1(in, in)`` with biases. The paper names two consecutive
   1x1 convolutions that keep resolution and width; without an activation they would collapse into one affine
   map. Backbone and Baseline have no image embedding (they are the plain Swin-Unet).
2. Backbone details follow Swin-Unet (Cao et al. 2021, the 2D Transformer of the paper's Table 1): convolutional
   patch embedding (kernel = stride = ``P``) with LayerNorm and no absolute position embedding; MONAI's
   ``SwinTransformerBlock`` (relative position bias, qkv bias, MLP ratio 4 with GELU, regular and shifted windows
   alternating, shift = ``window_size // 2``; a window shrinks to the feature map when the map is smaller, and
   maps that are not a multiple of the window are zero-padded as in MONAI); MONAI's 2D ``PatchMerging``; LayerNorm
   after the bottleneck stage and before the final expanding; patch expanding = ``Linear(d, 2d, bias=False)``,
   pixel shuffle to ``(2h, 2w, d/2)``, LayerNorm; skip fusion = concatenation then ``Linear(d, d/2)``; final
   expanding = ``Linear(C, P^2 C, bias=False)``, pixel shuffle to ``(H, W, C)``, LayerNorm; head = 1x1 convolution
   without bias. Decoder stage ``lambda`` uses ``num_heads[3 - lambda]`` heads. Linear weights are
   truncated-normal (std 0.02) with zero bias, LayerNorms start at (1, 0).
3. Decoder depths are three numbers ``(L1, L2, L3)``, the blocks of decoder stages 1-3. Table 1 lists four decoder
   depths ``[2, 2, 2, 2]``, but the Swin-Unet it names has Transformer blocks in three decoder stages only (its
   other decoder layers are the block-free x2 expanding after the bottleneck and the final x``P`` expanding), so
   the fourth number has nothing to count; a four-entry ``decoder_depths`` is rejected with that explanation.
4. Skip connections carry each encoder stage's output (after its blocks, before patch merging), as the paper's
   text says ("multi-scale representations from the corresponding encoder stages"); Swin-Unet's public code
   passes the stage input instead.
5. Channel-wise multiplication: every block has its own ``w1 in R^Z`` (initialised to ``1/Z``, so ``Omega``
   starts as the mean class embedding) and its own ``W2, W3`` (``4C -> D`` linear maps with a bias; weights
   truncated-normal std 0.02, biases 1). ``Phi`` therefore starts close to the identity and every block starts
   as the plain Swin block (LayerScale instead starts near zero; the paper fine-tunes ImageNet-pretrained Swin
   weights, which a near-zero start would mute). ``Phi`` scales the residual branch before stochastic depth.
6. Class embeddings ``Q in R^{M x Z x 4C}`` are independent per modality, initialised ``N(0, 1)``. They exist when
   the channel-wise multiplication or the EAMs use them; when only the EAMs use them (Baseline, Joint V1, V2)
   they are training-only and dropped from the inference network with the EAMs.
7. EAM: separate LayerNorms for ``Q`` and ``F`` (Eq. 7) and for ``Q_hat`` (Eq. 8); q/k/v projections with bias;
   ``N = num_heads[3 - lambda]`` (the decoder stage's heads) unless ``eam_num_heads`` is given; MLP ratio 4 with
   GELU; the width-halving "1x1 convolution" on ``Q_tilde`` is a linear map over channels (a 1x1 Conv1d over the
   ``Z`` class tokens). ``A`` is the raw per-head ``q k^T`` (the numerator of Eq. 5); ``1/sqrt(d)`` only enters
   the softmax of the cross attention. The semantic kernels ``K^i = Q^i W^i`` use the EAM's input embeddings
   (not their LayerNorm), ``W^i`` truncated-normal std 0.02 without bias. The softmax of Eq. 10 runs over the
   classes ``j`` at each position; Eq. 11 divides per ``(i, j)`` by ``sum_x softmax(S^i)_j`` (clamped at 1e-12
   only against float underflow) and is computed as ``sum_x sigma_ij(x) sum_n A_jn(x)``, which equals the
   literal Eq. 10-11. The scale-3 EAM has no value/output projection, MLP or width reduction: its ``Q_3`` feeds
   nothing, so those parameters would never receive a gradient.
8. Auxiliary heads: a grouped 1x1 convolution (``groups = Z``, with bias) maps the ``N`` head maps of class ``j``
   to the logit of class ``j`` (Eq. 12 "reduces the dimension of multi-head"), at scales 1-3, i.e. at
   ``H/4P, H/2P, H/P``.
9. Joint V1's modality-specific encoder is the patch embedding, the four encoder stages, patch merging and the
   bottleneck LayerNorm; decoder, EAM inputs and head stay shared. With ``modality_specific_eam=False`` one EAM
   set serves all modalities (still fed with modality-specific class embeddings).
10. Mixed-modality batches given as a tensor run every modality-specific branch (image embedding, encoder of
    Joint V1, EAM set) on the whole batch and pick each sample's branch with ``torch.where``; this keeps the graph
    static for tracing/export. In eager mode a tensor holding a single modality runs only that branch (same
    result, less work).
11. Stochastic depth rises linearly from 0 to ``drop_path_rate`` (default 0.1) over the encoder blocks; each
    decoder stage reuses the rates of the encoder stage of the same size. Dropouts default to 0.
12. Variant mapping (the table above): Backbone is the plain Swin-Unet; Baseline adds EAMs only to obtain the maps
    ``A`` for the auxiliary loss, so it carries (EAM-only) class embeddings as their queries; all joint variants
    keep the modality-specific image embedding (Fig. 3 does not show it); Joint V1's encoders are plain (no
    channel-wise multiplication), as in Fig. 3a. The correlation path (``W^i`` of Eq. 9) is built only for
    "+ CR" variants.
13. Initialisation is random unless ``pretrained_path`` names a Swin-T checkpoint supplied by the user (the paper
    fine-tunes from ImageNet-pretrained Swin weights; nothing is downloaded). :mod:`common.networks.swin_pretrained`
    maps its Microsoft or timm key names onto the patch embedding, every encoder's Swin blocks, patch merging and
    bottleneck LayerNorm and, as Swin-Unet does (``pretrained_decoder``), onto the decoder blocks of the same size;
    relative-position tables of another window size are resized bicubically. The image and class embeddings,
    ``w1, W2, W3``, fusions, expandings, head and EAMs keep their initialisation, so each loaded block starts close
    to the pretrained Swin block (``Phi = 1 + W Omega``, about 1 +- 0.18 per channel at the paper's width, choice 5).

Export: the inference network traces (``torch.jit.trace``) and exports (``torch.export.export``) with
``(image, modality_index_tensor)`` inputs, the modality staying a graph input; ``torch.jit.script`` does not work
because MONAI's ``PatchEmbed`` and Swin blocks are not scriptable. With ``default_modality`` set, a single-input
trace bakes that modality in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.layers import trunc_normal_
from torch import Tensor

from common.networks.lssc_blocks import (  # the public blocks are re-exported (__all__)
    _NUM_STAGES,
    ExternalAttentionModule,
    ModalityAwareSwinBlock,
    ModalityImageEmbedding,
    PatchExpanding,
    _DecoderStage,
    _is_tracing,
    _SwinEncoder,
)
from common.networks.swin_pretrained import SwinLoadReport, load_swin_pretrained

__all__ = [
    "LSSC_VARIANTS",
    "ExternalAttentionModule",
    "LSSCSwinUnet",
    "ModalityAwareSwinBlock",
    "ModalityImageEmbedding",
    "PatchExpanding",
    "lssc_variant_kwargs",
]

_VARIANT_SWITCHES = (
    "use_image_embedding",
    "use_class_embeddings",
    "use_eam",
    "use_correlations",
    "modality_specific_encoder",
    "modality_specific_eam",
)

LSSC_VARIANTS: dict[str, dict[str, bool]] = {
    "backbone": dict(zip(_VARIANT_SWITCHES, (False, False, False, False, False, False))),
    "baseline": dict(zip(_VARIANT_SWITCHES, (False, False, True, False, False, False))),
    "joint_v1": dict(zip(_VARIANT_SWITCHES, (True, False, True, False, True, True))),
    "joint_v2": dict(zip(_VARIANT_SWITCHES, (True, False, True, False, False, True))),
    "joint_v3": dict(zip(_VARIANT_SWITCHES, (True, True, True, False, False, True))),
    "joint_v1+cr": dict(zip(_VARIANT_SWITCHES, (True, False, True, True, True, True))),
    "joint_v2+cr": dict(zip(_VARIANT_SWITCHES, (True, False, True, True, False, True))),
    "joint_v3+cr": dict(zip(_VARIANT_SWITCHES, (True, True, True, True, False, True))),
    "full": dict(zip(_VARIANT_SWITCHES, (True, True, True, True, False, True))),
}
"""Network switches of the paper's variants (Sec. 4.3). "+ CR" adds the loss terms
(:func:`common.losses.lssc.lssc_loss_kwargs`) and, in the network, only the training-only semantic filtering
weights that produce the correlation matrices ``E`` (``use_correlations``); "full" is "joint_v3+cr"."""


def lssc_variant_kwargs(name: str) -> dict[str, bool]:
    """Constructor switches of :class:`LSSCSwinUnet` for a paper variant.

    Args:
        name: ``"backbone"``, ``"baseline"``, ``"joint_v1"``, ``"joint_v2"``, ``"joint_v3"``, the three joint
            variants with ``"+cr"`` (or ``"_cr"``), or ``"full"`` (= ``"joint_v3+cr"``). Case-insensitive.

    Returns:
        A new dict with ``use_image_embedding``, ``use_class_embeddings``, ``use_eam``, ``use_correlations``,
        ``modality_specific_encoder`` and ``modality_specific_eam``, to be merged with the size arguments.

    Raises:
        ValueError: unknown name.
    """
    key = name.strip().lower().replace("-", "_").replace(" ", "")
    if key.endswith("_cr"):
        key = key[:-3] + "+cr"
    if key not in LSSC_VARIANTS:
        raise ValueError(f"unknown LSSC variant {name!r}; expected one of {sorted(LSSC_VARIANTS)}")
    return dict(LSSC_VARIANTS[key])


class LSSCSwinUnet(nn.Module):
    """LSSC 2D network: modality-specific image embeddings, Swin-Unet with modality-aware blocks, training-only EAMs.

    ``forward(image, modality) -> logits (B, Z, H, W)``; ``forward_train(image, modality) -> dict`` (see there).
    ``image`` is ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of ``patch_size * 8``; sizes other than
    ``img_size`` are accepted. See the module docstring for the modality argument, the variants and every choice
    the paper leaves open.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        modalities: Sequence[str] = ("ct", "mr"),
        img_size: int | Sequence[int] = 224,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        decoder_depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_image_embedding: bool = True,
        use_class_embeddings: bool = True,
        use_eam: bool = True,
        use_correlations: bool = True,
        modality_specific_encoder: bool = False,
        modality_specific_eam: bool = True,
        eam_num_heads: Sequence[int] | None = None,
        eam_mlp_ratio: float = 4.0,
        default_modality: str | None = None,
        pretrained_path: str = "",
        pretrained_decoder: bool = True,
    ) -> None:
        """
        Args:
            in_channels: input channels (3 consecutive slices).
            num_classes: ``Z``, classes including background.
            modalities: modality names; index ``m`` of a modality tensor refers to ``modalities[m]``.
            img_size: nominal input size (int or ``(H, W)``), checked against the divisibility rule; other sizes
                that obey the rule are accepted at run time.
            embed_dim: ``C``.
            depths: ``[G1..G4]``, Swin blocks of the four encoder stages (the fourth is the bottleneck).
            decoder_depths: ``[L1, L2, L3]``, Swin blocks of decoder stages 1-3 (choice 3 of the module doc).
            num_heads: heads of encoder stages 1-4; decoder stage ``l`` uses ``num_heads[3 - l]``.
            window_size: Swin window (7 in the paper).
            patch_size: ``P`` (4 in the paper).
            mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: Swin block settings.
            use_image_embedding: modality-specific two-1x1-conv image embedding.
            use_class_embeddings: modality-aware channel-wise multiplication (Eq. 1-3) in every block; ``False``
                gives plain Swin blocks (inference without class embeddings).
            use_eam: build the EAMs and auxiliary heads (training only; ``forward`` never uses them).
            use_correlations: let the EAMs compute the correlation matrices ``E`` (needed by ``L_icr`` only).
            modality_specific_encoder: one encoder per modality (Joint V1).
            modality_specific_eam: one EAM set per modality (Joint V1-V3) instead of one shared set.
            eam_num_heads: heads ``N`` of the EAMs at scales 1-3; default ``num_heads[2], num_heads[1],
                num_heads[0]``.
            eam_mlp_ratio: MLP width ratio of Eq. 8.
            default_modality: modality used when ``forward`` gets ``modality=None`` (e.g. single-input export
                checks); ``None`` makes a missing modality an error.
            pretrained_path: a user-supplied Swin-T checkpoint (Microsoft or timm key names) loaded after the
                random initialisation (choice 13; :func:`common.networks.swin_pretrained.load_swin_pretrained`,
                strict: shape mismatches and unknown keys are errors); ``""`` = none.
            pretrained_decoder: with ``pretrained_path``, also initialise the decoder blocks from the encoder stage
                of the same size (Swin-Unet).
        """
        super().__init__()
        dims = self._init_modality_parts(
            in_channels, num_classes, modalities, embed_dim, depths, decoder_depths, num_heads, use_image_embedding,
            use_class_embeddings, use_eam, use_correlations, modality_specific_encoder, modality_specific_eam,
            default_modality, spatial_dims=2,
        )
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.size_multiple = patch_size * 2 ** (_NUM_STAGES - 1)
        if len(self.img_size) != 2 or any(s % self.size_multiple for s in self.img_size):
            raise ValueError(f"img_size {img_size} must be two multiples of patch_size * 8 = {self.size_multiple}")
        self.patch_size = patch_size
        num_mod = len(self.modalities)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        enc_dpr = [dpr[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(_NUM_STAGES)]
        block_class_dim = self.class_dim if use_class_embeddings else None
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate)
        self.encoders = nn.ModuleList(
            _SwinEncoder(
                in_channels,
                embed_dim,
                patch_size,
                depths,
                num_heads,
                window_size,
                num_classes,
                block_class_dim,
                enc_dpr,
                **common,
            )
            for _ in range(num_mod if modality_specific_encoder else 1)
        )
        # decoder stage l (1..3) mirrors encoder stage 3 - l (0-based): same width, heads and drop-path schedule
        self.decoder = nn.ModuleList()
        for lam in range(1, _NUM_STAGES):
            i = _NUM_STAGES - 1 - lam
            rates = enc_dpr[i] + [enc_dpr[i][-1] if enc_dpr[i] else 0.0] * max(0, decoder_depths[lam - 1] - depths[i])
            self.decoder.append(
                _DecoderStage(
                    dims[i],
                    decoder_depths[lam - 1],
                    num_heads[i],
                    window_size,
                    num_classes,
                    block_class_dim,
                    rates[: decoder_depths[lam - 1]],
                    **common,
                )
            )
        self.norm_up = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpanding(embed_dim, embed_dim, patch_size)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)

        self._build_eams(dims, num_heads, eam_num_heads, eam_mlp_ratio, qkv_bias, spatial_dims=2)
        self._init_weights()
        self.pretrained_report: SwinLoadReport | None = None
        if pretrained_path:
            self.pretrained_report = load_swin_pretrained(self, pretrained_path, load_decoder=pretrained_decoder)

    # ----------------------------------------------------------- shared build
    def _init_modality_parts(
        self,
        in_channels: int,
        num_classes: int,
        modalities: Sequence[str],
        embed_dim: int,
        depths: Sequence[int],
        decoder_depths: Sequence[int],
        num_heads: Sequence[int],
        use_image_embedding: bool,
        use_class_embeddings: bool,
        use_eam: bool,
        use_correlations: bool,
        modality_specific_encoder: bool,
        modality_specific_eam: bool,
        default_modality: str | None,
        spatial_dims: int,
    ) -> list[int]:
        """Argument checks and the parts every LSSC backbone (2D here, 3D in :mod:`common.networks.lssc3d`) builds
        before its encoder: the switches, the modality-specific image embeddings and the class embeddings. Returns
        the stage widths ``[C, 2C, 4C, 8C]``."""
        self.modalities = tuple(str(m) for m in modalities)
        if len(self.modalities) == 0 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and unique, got {modalities!r}")
        if default_modality is not None and default_modality not in self.modalities:
            raise ValueError(f"default_modality {default_modality!r} is not one of {self.modalities}")
        if len(depths) != _NUM_STAGES or len(num_heads) != _NUM_STAGES:
            raise ValueError(f"depths and num_heads need {_NUM_STAGES} entries, got {list(depths)}, {list(num_heads)}")
        if len(decoder_depths) != _NUM_STAGES - 1:
            raise ValueError(
                f"decoder_depths needs 3 entries (blocks of decoder stages 1-3), got {list(decoder_depths)}; the "
                "U-shaped backbone has no Transformer blocks in a fourth decoder stage (see the module docstring)"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        dims = [embed_dim * 2**i for i in range(_NUM_STAGES)]
        for d, nh in zip(dims, num_heads):
            if d % nh != 0:
                raise ValueError(f"stage width {d} (embed_dim {embed_dim}) is not divisible by {nh} heads")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.class_dim = dims[2]  # 4C
        self.use_image_embedding = use_image_embedding
        self.use_class_embeddings = use_class_embeddings
        self.use_eam = use_eam
        self.use_correlations = use_correlations and use_eam
        self.modality_specific_encoder = modality_specific_encoder
        self.modality_specific_eam = modality_specific_eam
        self.default_modality = default_modality
        num_mod = len(self.modalities)
        self.image_embeddings = (
            nn.ModuleList(ModalityImageEmbedding(in_channels, spatial_dims) for _ in range(num_mod))
            if use_image_embedding
            else None
        )
        if use_class_embeddings or use_eam:
            self.class_embeddings = nn.Parameter(torch.empty(num_mod, num_classes, self.class_dim))
        else:
            self.register_parameter("class_embeddings", None)
        return dims

    def _build_eams(self, dims: Sequence[int], num_heads: Sequence[int], eam_num_heads: Sequence[int] | None,
                    eam_mlp_ratio: float, qkv_bias: bool, spatial_dims: int) -> None:
        """The training-only EAM sets of decoder scales 1-3 (widths ``4C, 2C, C``), or ``eams = None``."""
        num_classes, num_mod = self.num_classes, len(self.modalities)
        use_eam, use_correlations = self.use_eam, self.use_correlations
        modality_specific_eam = self.modality_specific_eam
        if use_eam:
            heads = list(eam_num_heads) if eam_num_heads is not None else [num_heads[2], num_heads[1], num_heads[0]]
            if len(heads) != _NUM_STAGES - 1:
                raise ValueError(f"eam_num_heads needs 3 entries (scales 1-3), got {heads}")
            scale_dims = [dims[2], dims[1], dims[0]]
            self.eams = nn.ModuleList(
                nn.ModuleList(
                    ExternalAttentionModule(
                        scale_dims[s],
                        num_classes,
                        heads[s],
                        scale_dims[s + 1] if s + 1 < len(scale_dims) else None,
                        eam_mlp_ratio,
                        qkv_bias,
                        use_correlations,
                        spatial_dims,
                    )
                    for s in range(_NUM_STAGES - 1)
                )
                for _ in range(num_mod if modality_specific_eam else 1)
            )
        else:
            self.eams = None

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ModalityAwareSwinBlock):
                m.reset_modulation()
        if self.class_embeddings is not None:
            nn.init.normal_(self.class_embeddings, std=1.0)

    # ------------------------------------------------------------- modality
    def modality_index(self, modality: str | Sequence[str] | Tensor | None, batch_size: int) -> int | Tensor:
        """Normalise the modality argument: an ``int`` when the whole batch has one modality, else a ``(B,)`` long
        tensor of indices into ``modalities`` (always a tensor under tracing/export when a tensor is given)."""
        if modality is None:
            if self.default_modality is None:
                raise ValueError(f"no modality given and no default_modality set; expected one of {self.modalities}")
            modality = self.default_modality
        if isinstance(modality, str):
            if modality not in self.modalities:
                raise ValueError(f"unknown modality {modality!r}; this network knows {self.modalities}")
            return self.modalities.index(modality)
        if isinstance(modality, Tensor):
            if modality.dim() != 1 or modality.shape[0] != batch_size:
                raise ValueError(f"modality tensor must have shape ({batch_size},), got {tuple(modality.shape)}")
            if modality.dtype.is_floating_point or modality.dtype == torch.bool:
                raise ValueError(f"modality tensor must hold integer indices, got dtype {modality.dtype}")
            idx = modality.long()
            if _is_tracing():
                return idx
            if batch_size and (int(idx.min()) < 0 or int(idx.max()) >= len(self.modalities)):
                raise ValueError(f"modality indices must lie in [0, {len(self.modalities)}), got {idx.tolist()}")
            if batch_size and bool((idx == idx[0]).all()):
                return int(idx[0])
            return idx
        names = list(modality)
        if len(names) != batch_size or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"modality must be a name, {batch_size} names or a ({batch_size},) tensor, got {modality!r}"
            )
        unknown = sorted({n for n in names if n not in self.modalities})
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this network knows {self.modalities}")
        if len(set(names)) == 1:
            return self.modalities.index(names[0])
        return torch.tensor([self.modalities.index(n) for n in names], dtype=torch.long)

    @staticmethod
    def _select(outputs: list[Any], index: Tensor) -> Any:
        """Per-sample choice among per-modality outputs (tensors or nested lists/tuples/dicts of tensors)."""
        first = outputs[0]
        if first is None:
            return None
        if isinstance(first, Tensor):
            out = first
            for m in range(1, len(outputs)):
                cond = (index == m).to(first.device).view((-1,) + (1,) * (first.dim() - 1))
                out = torch.where(cond, outputs[m], out)
            return out
        if isinstance(first, dict):
            return {k: LSSCSwinUnet._select([o[k] for o in outputs], index) for k in first}
        return type(first)(LSSCSwinUnet._select([o[i] for o in outputs], index) for i in range(len(first)))

    def _per_modality(self, modules: nn.ModuleList, index: int | Tensor, fn: Callable[[nn.Module, int], Any]) -> Any:
        """``fn(module, m)`` with the batch's modality module (``index`` an int, or a single shared module), or with
        every modality's module on the whole batch, keeping each sample's own result (``index`` a tensor)."""
        if len(modules) == 1:
            return fn(modules[0], 0)
        if isinstance(index, int):
            return fn(modules[index], index)
        return self._select([fn(mod, m) for m, mod in enumerate(modules)], index)

    # --------------------------------------------------------------- forward
    def _check_image(self, image: Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must be (B, {self.in_channels}, H, W) (consecutive slices as channels), "
                f"got {tuple(image.shape)}"
            )
        h, w = image.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"image size {h}x{w} must be a multiple of patch_size * 8 = {self.size_multiple} in both dimensions"
            )

    def _class_embeddings_for(self, index: int | Tensor, batch_size: int) -> Tensor:
        q = self.class_embeddings
        if isinstance(index, int):
            return q[index].unsqueeze(0).expand(batch_size, -1, -1)
        return q[index.to(q.device)]

    def _backbone(self, image: Tensor, index: int | Tensor) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """Segmentation path: logits ``(B, Z, H, W)``, decoder features at scales 1-3 (channel-last) and the
        per-sample class embeddings ``(B, Z, 4C)`` (``None`` when the network has none)."""
        self._check_image(image)
        b = image.shape[0]
        q = self._class_embeddings_for(index, b) if self.class_embeddings is not None else None
        q_blocks = q if self.use_class_embeddings else None
        x = image
        if self.image_embeddings is not None:
            x = self._per_modality(self.image_embeddings, index, lambda mod, m: mod(image))
        skips, x = self._per_modality(self.encoders, index, lambda mod, m: mod(x, q_blocks))
        features = []
        for lam, stage in enumerate(self.decoder):
            x = stage(x, skips[_NUM_STAGES - 2 - lam], q_blocks)
            features.append(x)
        x = self.final_expand(self.norm_up(x))
        logits = self.head(x.permute(0, 3, 1, 2))
        return logits, features, q

    def forward(self, image: Tensor, modality: str | Sequence[str] | Tensor | None = None) -> Tensor:
        """Segmentation logits.

        Args:
            image: ``(B, in_channels, H, W)``, ``H, W`` multiples of ``patch_size * 8``.
            modality: a name of ``modalities`` (whole batch), ``B`` names, a ``(B,)`` integer tensor of indices
                into ``modalities``, or ``None`` for ``default_modality``.

        Returns:
            ``(B, num_classes, H, W)`` logits (no softmax). EAMs are not run.
        """
        index = self.modality_index(modality, image.shape[0])
        return self._backbone(image, index)[0]

    def forward_train(self, image: Tensor, modality: str | Sequence[str] | Tensor | None = None) -> dict[str, Any]:
        """Training forward: logits plus everything the LSSC losses need.

        Args:
            image, modality: as :meth:`forward`.

        Returns:
            dict with

            - ``"logits"``: ``(B, Z, H, W)``.
            - ``"aux_logits"``: list of 3 tensors ``(B, Z, H/4P, W/4P)``, ``(B, Z, H/2P, W/2P)``,
              ``(B, Z, H/P, W/P)`` (scales 1-3); empty without EAMs.
            - ``"correlations"``: list of 3 ``E`` matrices ``(B, Z, Z)``; empty without EAMs or with
              ``use_correlations=False``.
            - ``"semantic_maps"``: list of 3 ``A`` tensors ``(B, Z, N_l, h_l, w_l)``; empty without EAMs.
            - ``"image_class_embeddings"``: ``[Q_1 (B, Z, 2C), Q_2 (B, Z, C)]``; empty without EAMs.
            - ``"class_embeddings"``: the modality-specific class embeddings of every modality ``(M, Z, 4C)`` (the
              parameter itself, for ``L_mcr``), or ``None``.
            - ``"modality"``: ``(B,)`` long tensor of modality indices.
        """
        b = image.shape[0]
        index = self.modality_index(modality, b)
        logits, features, q = self._backbone(image, index)
        out: dict[str, Any] = {
            "logits": logits,
            "aux_logits": [],
            "correlations": [],
            "semantic_maps": [],
            "image_class_embeddings": [],
            "class_embeddings": self.class_embeddings,
            "modality": torch.full((b,), index, dtype=torch.long, device=image.device)
            if isinstance(index, int)
            else index.to(image.device),
        }
        if self.eams is None:
            return out

        def run_eams(eam_set: nn.ModuleList, m: int) -> list[dict[str, Tensor | None]]:
            results, queries = [], q
            for eam, feat in zip(eam_set, features):
                r = eam(feat, queries)
                results.append(r)
                queries = r["next_queries"]
            return results

        results = self._per_modality(self.eams, index, run_eams)
        for r in results:
            out["aux_logits"].append(r["aux_logits"])
            if r["correlation"] is not None:
                out["correlations"].append(r["correlation"])
            out["semantic_maps"].append(r["semantic_maps"])
            if r["next_queries"] is not None:
                out["image_class_embeddings"].append(r["next_queries"])
        return out

    # ------------------------------------------------------------- inference
    def _training_only(self, name: str) -> bool:
        if name.startswith("eams."):
            return True
        # without the channel-wise multiplication the class embeddings only feed the EAMs
        return name == "class_embeddings" and not self.use_class_embeddings

    def inference_network(self) -> LSSCSwinUnet:
        """A copy without the EAMs (and without the class embeddings when only the EAMs use them).

        Its ``forward`` gives exactly the logits of this network; it equals
        ``LSSCSwinUnet(**same_kwargs, use_eam=False)`` loaded with :meth:`export_state_dict`.
        """
        net = copy.deepcopy(self)
        net.eams = None
        net.use_eam = False
        if not net.use_class_embeddings:
            net.class_embeddings = None
        return net

    def export_state_dict(self) -> dict[str, Tensor]:
        """State dict of :meth:`inference_network` (no ``eams.*`` keys), without copying the network."""
        return {k: v for k, v in self.state_dict().items() if not self._training_only(k)}

    def example_input(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """``(image, modality)`` of the nominal size for tracing/export: zeros and modality index 0."""
        image = torch.zeros(batch_size, self.in_channels, *self.img_size)
        return image, torch.zeros(batch_size, dtype=torch.long)
