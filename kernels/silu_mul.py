"""Fused SwiGLU activation `silu(gate) * up` for fused (Phi-3/vLLM) and split (Llama) layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    gate_ptr,  # (T, I), row stride stride_gate
    up_ptr,  # (T, I), row stride stride_up
    out_ptr,  # (T, I)
    stride_gate,
    stride_up,
    stride_out,
    n_cols,
    BLOCK: tl.constexpr,
):
    """Block `program_id(1)` of row `program_id(0)` of out = silu(gate) * up, in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Run the kernel on two (T, I) views with unit column stride; return a new (T, I) tensor."""
    t, i = gate.shape
    out = torch.empty((t, i), dtype=gate.dtype, device=gate.device)  # (T, I)
    if t == 0 or i == 0:
        return out
    block = min(triton.next_power_of_2(i), MAX_BLOCK)
    grid = (t, triton.cdiv(i, block))
    _silu_mul_kernel[grid](gate, up, out, gate.stride(0), up.stride(0), out.stride(0), i,
                           BLOCK=block, num_warps=4)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Return `silu(gate) * up` (T, I) where gate_up (T, 2I) holds gate then up along the last
    dim, computed in fp32 and cast to gate_up.dtype."""
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul wants gate_up (T, 2I), got {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    i = gate_up.shape[1] // 2
    return _launch(gate_up[:, :i], gate_up[:, i:])


def silu_mul_split(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Return `silu(gate) * up` (T, I) for separate gate and up (T, I) of one dtype, computed in
    fp32 and cast to that dtype."""
    if gate.ndim != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul_split wants gate and up (T, I) of one dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    return _launch(gate, up)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Return Phi3MLP's activation of gate_up (T, 2I): `up * silu(gate)` in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
    return up * F.silu(gate)


def silu_mul_split_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Return LlamaMLP's activation `silu(gate) * up` of (T, I) tensors in the input dtype."""
    return F.silu(gate) * up


def silu_mul_flops(t: int, i: int) -> int:
    """Flops of silu_mul per output element: 3 for sigmoid (exp, add, divide) and 2 multiplies
    (by gate, by up), over a (T, I) output."""
    return 5 * t * i


def silu_mul_bytes(t: int, i: int, itemsize: int) -> int:
    """Bytes moved by silu_mul (either layout): gate and up read, out written, `itemsize` each."""
    return 3 * t * i * itemsize
