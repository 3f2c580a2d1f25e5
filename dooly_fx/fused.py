"""The fused-engine variant: units that a fused engine runs as one Triton kernel.

With `EngineProfile(kernels="triton")` (`--kernels triton`), a unit of a kind in `FUSED` gets
its own signature (its canonical JSON plus `"impl": "triton"`) and is timed as our Triton
kernel from `kernels/` instead of the ATen ops transformers issues for it; every other unit is
shared with the eager engine. The kernel is checked against the unit's own subgraph (what
transformers computes) before it is timed, so a unit whose inputs do not fit the kernel fails
its check and is recorded as failed, never timed wrongly.

    kind      kernel                                  unit inputs (token-wise, m rows)
    norm      rmsnorm(x, weight, eps)                 x (m, H), weight (H,)
    act_mul   silu_mul_split(gate, up)                gate (m, I), up (m, I)
              silu_mul(gate_up)                       gate_up (m, 2I)

`fuse_model` turns a transformers model into that fused engine (its RMSNorms and SiLU-gated
MLPs run the same kernels), so `validate-steps --kernels triton` measures real steps of the
engine whose units were profiled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dooly_fx.lowering import Point, Runnable, UnitCase, materialise, replay_subgraph
from dooly_fx.passes.signature import Signature, signature_of
from dooly_fx.registry import registrar

IMPL = "triton"
FusedLowering = Callable[[list[torch.Tensor]], Callable[[], torch.Tensor]]
FUSED: dict[str, FusedLowering] = {}


register_fused = registrar(FUSED, "fused kernel")
"""`@register_fused(kind, ...)`: a function from the unit's tensor inputs to a callable running
the kind's Triton kernel on them."""


def fused_signature(kind: str, canonical: dict) -> Signature | None:
    """A unit's fused-variant signature (its canonical content plus `"impl": "triton"`), or
    None if `kind` has no kernel."""
    if kind not in FUSED:
        return None
    return signature_of({**canonical, "impl": IMPL})


def lower_fused(case: UnitCase, point: Point, device: str) -> Runnable:
    """The unit's Triton kernel on the unit's inputs at `point`, checked against the unit's
    own subgraph on the same inputs."""
    args = materialise(case, point, device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    fn = FUSED[case.kind](tensors)
    reference = replay_subgraph(case, point, device, args)

    def check() -> None:
        want = reference.fn()
        want = want[0] if isinstance(want, tuple | list) else want
        got = fn()
        if got.shape != want.shape:
            got = got.reshape(want.shape)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    return Runnable(fn, check)


@register_fused("norm")
def _rmsnorm(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    from dooly_fx.kernels.rmsnorm import rmsnorm

    x = next(t for t in tensors if t.dim() >= 2)
    weight = next(t for t in tensors if t.dim() == 1)
    rows = x.reshape(-1, x.shape[-1])
    return lambda: rmsnorm(rows, weight, 1e-6)  # eps is not part of a signature


@register_fused("act_mul")
def _silu_mul(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    from dooly_fx.kernels.silu_mul import silu_mul, silu_mul_split

    rows = [t.reshape(-1, t.shape[-1]) for t in tensors if t.is_floating_point()]
    if len(rows) == 1:
        return lambda: silu_mul(rows[0])
    gate, up = rows[:2]
    return lambda: silu_mul_split(gate, up)


SILU = ("SiLU", "SiLUActivation")
"""Activation modules (torch's and transformers' `ACT2FN["silu"]`) the SiLU·mul kernel computes."""


def fuse_model(model: torch.nn.Module) -> dict[str, int]:
    """Make `model` run as the fused engine, in place: every RMSNorm module (class name ending
    in `RMSNorm`, Gemma's `(1 + w)` scale included) calls `rmsnorm`, and every MLP whose
    activation is SiLU calls `silu_mul_split` on its gate and up projections (`silu_mul` on a
    fused `gate_up_proj`, Phi-3's layout). Other modules keep transformers' code. Returns how
    many modules of each kind were fused."""
    from dooly_fx.kernels.rmsnorm import rmsnorm
    from dooly_fx.kernels.silu_mul import silu_mul, silu_mul_split

    def norm_forward(module, eps: float, offset: float):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return rmsnorm(x.reshape(-1, x.shape[-1]), module.weight, eps,
                           offset).reshape(x.shape)
        return forward

    def split_forward(module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            gate, up = module.gate_proj(x), module.up_proj(x)
            rows = silu_mul_split(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
            return module.down_proj(rows.reshape(*x.shape[:-1], -1))
        return forward

    def packed_forward(module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            gate_up = module.gate_up_proj(x)
            rows = silu_mul(gate_up.reshape(-1, gate_up.shape[-1]))
            return module.down_proj(rows.reshape(*x.shape[:-1], -1))
        return forward

    counts = {"norm": 0, "act_mul": 0}
    for module in model.modules():
        name = type(module).__name__
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if name.endswith("RMSNorm") and getattr(module, "weight", None) is not None \
                and eps is not None:
            module.forward = norm_forward(module, eps, 1.0 if name.startswith("Gemma") else 0.0)
            counts["norm"] += 1
            continue
        act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
        if type(act).__name__ not in SILU or not hasattr(module, "down_proj"):
            continue
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            module.forward = split_forward(module)
        elif hasattr(module, "gate_up_proj"):
            module.forward = packed_forward(module)
        else:
            continue
        counts["act_mul"] += 1
    return counts
