"""Fused rotate-half (NeoX/HF) rotary embedding of q and k in one Triton launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
# One program rotates a (heads, D/2) tile of about this many elements, with NUM_WARPS warps
# (H100, bf16, T=4096: ~2.1 TB/s; one head per program reached ~0.8 TB/s).
HEADS_X_HALF = 512
NUM_WARPS = 2


@triton.jit(do_not_specialize=["Hq", "Hk"])
def _rotary_kernel(
    q_ptr,  # (T, Hq, D)
    k_ptr,  # (T, Hk, D)
    cos_ptr,  # (T, D)
    sin_ptr,  # (T, D)
    qo_ptr,  # (T, Hq, D), contiguous
    ko_ptr,  # (T, Hk, D), contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    Hq,
    Hk,
    HALF,
    HEADS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Head block `program_id(1)` (q blocks first, then k blocks) of token `program_id(0)`:
    out = x * cos + rotate_half(x) * sin for HEADS heads, in fp32."""
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    q_blocks = tl.cdiv(Hq, HEADS)
    if hb < q_blocks:
        heads = hb * HEADS + tl.arange(0, HEADS)  # (HEADS,)
        n_heads = Hq
        src = q_ptr + tok * stride_qt + heads * stride_qh
        dst = qo_ptr + (tok * Hq + heads) * (2 * HALF)
    else:
        heads = (hb - q_blocks) * HEADS + tl.arange(0, HEADS)
        n_heads = Hk
        src = k_ptr + tok * stride_kt + heads * stride_kh
        dst = ko_ptr + (tok * Hk + heads) * (2 * HALF)
    cols = tl.arange(0, BLOCK)  # (BLOCK,)
    col_mask = cols < HALF
    mask = (heads < n_heads)[:, None] & col_mask[None, :]  # (HEADS, BLOCK)
    src = src[:, None] + cols[None, :]
    dst = dst[:, None] + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    cos_row = cos_ptr + tok * stride_cos
    sin_row = sin_ptr + tok * stride_sin
    c1 = tl.load(cos_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # rotate_half(x) = cat(-x2, x1)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    tl.store(dst, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(dst.dtype.element_ty), mask=mask)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return new (q_out, k_out) = x * cos + rotate_half(x) * sin for q (T, Hq, D) and
    k (T, Hk, D) of one dtype with per-token cos, sin (T, D), computed in fp32 (D even, <= 256)."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary wants q (T, Hq, D) and k (T, Hk, D), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    t, hq, d = q.shape
    hk = k.shape[1]
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"rotary wants cos, sin ({t}, {d}), got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if d % 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"rotary wants an even head dim <= {MAX_HEAD_DIM}, got {d}")
    if q.dtype != k.dtype:
        raise ValueError(f"rotary wants q and k of one dtype, got {q.dtype} and {k.dtype}")
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)  # (T, Hq, D)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)  # (T, Hk, D)
    if t == 0 or hq + hk == 0:
        return q_out, k_out
    half = d // 2
    block = triton.next_power_of_2(half)
    heads = min(triton.next_power_of_2(max(hq, hk)), max(HEADS_X_HALF // block, 1))
    grid = (t, triton.cdiv(hq, heads) + triton.cdiv(hk, heads))
    _rotary_kernel[grid](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        hq, hk, half, HEADS=heads, BLOCK=block, num_warps=NUM_WARPS,
    )
    return q_out, k_out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Return cat(-x2, x1) of the two halves of x's last dim, as transformers' `rotate_half`."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return transformers' `apply_rotary_pos_emb` of q (T, Hq, D), k (T, Hk, D) with cos, sin
    (T, D) broadcast over heads (unsqueeze_dim=1), in the input dtype."""
    cos = cos.unsqueeze(1)  # (T, 1, D)
    sin = sin.unsqueeze(1)  # (T, 1, D)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def rotary_flops(t: int, hq: int, hk: int, d: int) -> int:
    """Flops of rotary: 3 per element of q and k (two multiplies, one add or subtract)."""
    return 3 * t * (hq + hk) * d


def rotary_bytes(t: int, hq: int, hk: int, d: int, itemsize: int) -> int:
    """Bytes moved by rotary: q and k read and written once each, cos and sin read once per token
    (they stay in cache across heads), all at `itemsize` bytes per element."""
    return (2 * t * (hq + hk) * d + 2 * t * d) * itemsize
