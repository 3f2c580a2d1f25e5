"""Fused Triton kernels for op units (profiled as a fused-engine variant)."""
