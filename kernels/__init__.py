"""Fused Triton kernels for the ALIP loss. See gated_clip_loss.py; benchmark: python -m kernels.bench; spill check
for H100 without a GPU: python -m kernels.compile_check."""

from .gated_clip_loss import fused_available, gated_clip_loss, gated_clip_loss_reference

__all__ = ["gated_clip_loss", "gated_clip_loss_reference", "fused_available"]
