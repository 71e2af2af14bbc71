"""Accelerated ops: batched Sinkhorn optimal transport and multi-scale cost volumes (PyTorch + Triton)."""
