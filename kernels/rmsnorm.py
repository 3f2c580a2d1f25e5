"""Fused RMSNorm: one Triton program normalizes one row in fp32 (Llama and Gemma variants)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program holds a whole row in registers; beyond 64 KB per row it would spill.
MAX_ROW_BYTES = 65536


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # (T, H)
    w_ptr,  # (H,)
    out_ptr,  # (T, H)
    stride_x,
    stride_out,
    H,
    eps,
    offset,
    BLOCK: tl.constexpr,
):
    """Row `program_id(0)` of out = x * rsqrt(mean(x^2) + eps) * (offset + w), all in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * (offset + w)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            offset: float = 0.0) -> torch.Tensor:
    """Return `x * rsqrt(mean(x^2, -1) + eps) * (offset + weight)` for x (T, H), computed in fp32
    and cast to x.dtype (offset=1.0 is Gemma's `(1 + w)` scale)."""
    if x.ndim != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm wants x (T, H) and weight (H,), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    t, h = x.shape
    block = triton.next_power_of_2(h)
    if block * x.element_size() > MAX_ROW_BYTES:
        raise ValueError(f"rmsnorm keeps one row per program; H={h} exceeds {MAX_ROW_BYTES} bytes")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)  # (T, H)
    if t == 0:
        return out
    num_warps = min(max(block // 256, 1), 8)
    _rmsnorm_kernel[(t,)](x, weight, out, x.stride(0), out.stride(0), h, eps, offset,
                          BLOCK=block, num_warps=num_warps)
    return out


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                offset: float = 0.0) -> torch.Tensor:
    """Return RMSNorm of x (T, H) in transformers' op order: LlamaRMSNorm when offset == 0,
    GemmaRMSNorm (scale by `offset + w` in fp32, then cast) otherwise."""
    input_dtype = x.dtype
    hidden = x.float()  # (T, H)
    var = hidden.pow(2).mean(-1, keepdim=True)  # (T, 1)
    hidden = hidden * torch.rsqrt(var + eps)
    if offset == 0.0:
        return weight * hidden.to(input_dtype)
    return (hidden * (offset + weight.float())).to(input_dtype)


def rmsnorm_flops(t: int, h: int) -> int:
    """Flops of rmsnorm: 4 per element (square, accumulate, scale by rstd, scale by weight) plus 3
    per row (divide by H, add eps, rsqrt); the per-column `offset + w` add is not counted."""
    return 4 * t * h + 3 * t


def rmsnorm_bytes(t: int, h: int, itemsize: int) -> int:
    """Bytes moved by rmsnorm: x read and out written once each, the weight read once (it stays
    in cache across rows), all at `itemsize` bytes per element."""
    return (2 * t * h + h) * itemsize
