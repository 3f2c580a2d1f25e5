"""Opaque attention ops that stand for transformers' paged attention during capture.

In the continuous-batching engine, attention is stateful: it writes the step's K/V into the paged
cache and reads each sequence's context back. For capture that is two opaque ops with fake
(shape-only) implementations, so the graph holds exactly one node for each:

    kv_cache_write(k: (T, Hkv, D), v: (T, Hkv, D), cu_seqlens_q: (N+1,)) -> None
    paged_attention(q: (T, H, D), k, v, cu_seqlens_q) -> (T, H, D)

Their latency depends on the per-sequence (new, cached) token lists, not on shapes alone; at
profile time they are replaced by the engine's own attention on its own cache objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REGISTERED = False


@torch.library.custom_op("dooly::kv_cache_write", mutates_args=())
def kv_cache_write(k: Tensor, v: Tensor, cu_seqlens_q: Tensor) -> Tensor:
    """Stand-in for writing the step's K/V into the paged cache; returns a 0-d marker."""
    return torch.zeros((), dtype=k.dtype, device=k.device)


@kv_cache_write.register_fake
def _(k: Tensor, v: Tensor, cu_seqlens_q: Tensor) -> Tensor:
    return k.new_empty(())


@torch.library.custom_op("dooly::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, written: Tensor,
    sliding_window: int, softcap: float,
) -> Tensor:
    """Causal attention of each sequence's new tokens over themselves (reference semantics)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    groups = q.shape[1] // k.shape[1]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[lo:hi].transpose(0, 1)  # (H, q, D)
        ks = k[lo:hi].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[lo:hi].transpose(0, 1).repeat_interleave(groups, 0)
        out[lo:hi] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


@paged_attention.register_fake
def _(q, k, v, cu_seqlens_q, written, sliding_window, softcap):
    return torch.empty_like(q)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None, **kwargs):
    """`attn_implementation="dooly_paged"`: (1, H, T, D) q/k/v in, (1, T, H, D) out."""
    cu_seqlens = kwargs["cu_seq_lens_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    written = torch.ops.dooly.kv_cache_write(k, v, cu_seqlens)
    out = torch.ops.dooly.paged_attention(
        q, k, v, cu_seqlens, written, int(sliding_window or 0), float(softcap or 0.0))
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """The paged engine builds its masks outside the model (host side)."""
    return None


def register() -> None:
    """Make `attn_implementation="dooly_paged"` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("dooly_paged", _attention)
    AttentionMaskInterface.register("dooly_paged", _no_mask)
    _REGISTERED = True
