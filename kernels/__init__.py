"""Fused Triton kernels for the ALIP loss: the module kernels.gated_clip_loss (gated_clip_loss, choose_impl,
launch_plan, gated_clip_loss_reference). Benchmark: python -m kernels.bench; spill check for H100 without a GPU:
python -m kernels.compile_check."""

from . import gated_clip_loss
from .gated_clip_loss import fused_available, gated_clip_loss_reference

__all__ = ["gated_clip_loss", "gated_clip_loss_reference", "fused_available"]
