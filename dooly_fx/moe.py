"""An opaque MoE experts op for capture: one graph node per expert block.

transformers' `grouped_mm` experts path is data dependent (sort, histc over the routing), and
`histc(bins=num_experts)` would force the expert count to a constant. Capture therefore runs the
experts through one custom op whose fake implementation only gives the output shape:

    moe_experts(hidden: (T, H), top_k_index: (T, k), top_k_weights: (T, k),
                up: (E, [2]I, H) | (E, H, [2]I), down: (E, H, I) | (E, I, H),
                gated, transposed, impl) -> (T, H)

`impl` names the engine's experts implementation (`grouped_mm`, `batched_mm`), so it is part of
the unit's signature. Routing is a value, not a shape: the profiler synthesises it (uniform and
skewed) and times that implementation of transformers in the op's place (`run_engine_experts`).
"""

from __future__ import annotations

import torch
from torch import Tensor

_REGISTERED = False


@torch.library.custom_op("dooly::moe_experts", mutates_args=())
def moe_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, up: Tensor, down: Tensor,
    gated: bool, transposed: bool, impl: str,
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
def _(hidden, top_k_index, top_k_weights, up, down, gated, transposed, impl):
    return torch.empty_like(hidden)


IMPLS = ("grouped_mm", "batched_mm")


def backend_name(impl: str) -> str:
    """The `experts_implementation` that captures the engine's `impl` as one opaque op."""
    return f"dooly_opaque_{impl}"


def _forward_for(impl: str):
    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
        up = self.gate_up_proj if self.has_gate else self.up_proj
        return torch.ops.dooly.moe_experts(hidden_states, top_k_index, top_k_weights, up,
                                           self.down_proj, bool(self.has_gate),
                                           bool(self.is_transposed), impl)
    return forward


def register() -> None:
    """Make `experts_implementation="dooly_opaque_<impl>"` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.integrations.moe import ExpertsInterface

    for impl in IMPLS:
        ExpertsInterface.register(backend_name(impl), _forward_for(impl))
    _REGISTERED = True


class _Experts(torch.nn.Module):
    """The attributes transformers' experts implementations read, around given weights."""

    def __init__(self, up: Tensor, down: Tensor, gated: bool, transposed: bool) -> None:
        super().__init__()
        self.num_experts = up.shape[0]
        self.has_gate, self.is_transposed, self.has_bias = gated, transposed, False
        if gated:
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = down
        self.act_fn = torch.nn.functional.silu

    def _apply_gate(self, gate_up: Tensor) -> Tensor:  # (S, 2I) -> (S, I)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def run_engine_experts(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, up: Tensor,
                       down: Tensor, gated: bool, transposed: bool, impl: str) -> Tensor:
    """The op as the engine runs it: transformers' `impl` experts function (what the profiler
    times in place of the opaque op)."""
    from transformers.integrations.moe import ExpertsInterface

    experts = _Experts(up, down, gated, transposed)
    return ExpertsInterface._global_mapping[impl](experts, hidden, top_k_index, top_k_weights)
