"""Accelerated ops: batched Sinkhorn optimal transport and multi-scale cost volumes.

Each op has one PyTorch path for every device and fused Triton kernels that are used for CUDA tensors when
``triton`` is installed (same API, same results). Import the functions from their modules, e.g.
``from common.ops.sinkhorn import sinkhorn`` (the package re-exports every name except ``sinkhorn`` itself,
which would shadow the ``common.ops.sinkhorn`` module).
"""

from common.ops.cost_volume import (
    TrackEstimate,
    cost_volume_track,
    sample_query_features,
    sample_query_features_multiframe,
)
from common.ops.sinkhorn import SinkhornResult, cosine_cost, sinkhorn_transport

__all__ = [
    "SinkhornResult",
    "TrackEstimate",
    "cosine_cost",
    "cost_volume_track",
    "sample_query_features",
    "sample_query_features_multiframe",
    "sinkhorn_transport",
]
