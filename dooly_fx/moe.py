"""An opaque MoE experts op for capture: one graph node per expert block.

transformers' `grouped_mm` experts path is data dependent (sort, histc over the routing), and
`histc(bins=num_experts)` would force the expert count to a constant. Capture therefore runs the
experts through one custom op whose fake implementation only gives the output shape:

    moe_experts(hidden: (T, H), top_k_index: (T, k), top_k_weights: (T, k),
                up: (E, [2]I, H) | (E, H, [2]I), down: (E, H, I) | (E, I, H)) -> (T, H)

Routing is a value, not a shape: the profiler synthesises it (uniform and skewed) and times the
engine's real experts implementation in the op's place.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REGISTERED = False


@torch.library.custom_op("dooly::moe_experts", mutates_args=())
def moe_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, up: Tensor, down: Tensor,
    gated: bool, transposed: bool,
) -> Tensor:
    """Reference semantics: each token's top-k experts, SiLU-gated when `gated`, weighted sum."""
    out = torch.zeros_like(hidden)
    for expert in range(up.shape[0]):
        rows, slot = torch.nonzero(top_k_index == expert, as_tuple=True)
        if rows.numel() == 0:
            continue
        w_up = up[expert] if transposed else up[expert].T  # (H, [2]I)
        w_down = down[expert] if transposed else down[expert].T  # (I, H)
        h = hidden[rows] @ w_up
        if gated:
            gate, val = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * val
        else:
            h = torch.nn.functional.silu(h)
        out.index_add_(0, rows, (h @ w_down) * top_k_weights[rows, slot, None].to(h.dtype))
    return out


@moe_experts.register_fake
def _(hidden, top_k_index, top_k_weights, up, down, gated, transposed):
    return torch.empty_like(hidden)


def _experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
    """`experts_implementation="dooly_opaque"` for transformers' experts modules."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    return torch.ops.dooly.moe_experts(hidden_states, top_k_index, top_k_weights, up,
                                       self.down_proj, bool(self.has_gate),
                                       bool(self.is_transposed))


def register() -> None:
    """Make `experts_implementation="dooly_opaque"` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("dooly_opaque", _experts_forward)
    _REGISTERED = True
