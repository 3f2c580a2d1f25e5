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
    rotary    rotary(q, k, cos, sin) on token rows    q (B, Hq, S, D), k (B, Hk, S, D),
                                                      cos, sin (B, S, D)

`fuse_model` turns a transformers model into that fused engine (its RMSNorms, SiLU-gated
MLPs and rotary embeddings run the same kernels), so `validate-steps --kernels triton`
measures real steps of the engine whose units were profiled.
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


@register_fused("rotary")
def _rotary(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    q, k = (t for t in tensors if t.dim() == 4)  # in the order transformers uses them
    cos, sin = (t for t in tensors if t.dim() == 3)
    # The model's q and k are (B, S, H, D) projections seen as (B, H, S, D): lay the unit's
    # inputs out that way, so each token's heads are rows of one stride, as in the model.
    q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    return lambda: fused_rotary(q, k, cos, sin)[0]


def fused_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` for q (B, Hq, S, D), k (B, Hk, S,
    D), cos and sin (B, S, D), as one `rotary` launch over the B*S token rows; the outputs are
    (B, H, S, D) views of token-major results, as the projections were."""
    from dooly_fx.kernels.rotary import rotary

    b, hq, s, d = q.shape
    if cos.shape[-1] != d:
        raise ValueError(f"rotary kernel: partial rotary ({cos.shape[-1]} of {d} dims)")
    cos, sin = (x.expand(b, s, d).reshape(b * s, d) for x in (cos, sin))  # may be (1, S, D)
    q_out, k_out = rotary(q.transpose(1, 2).reshape(b * s, hq, d),
                          k.transpose(1, 2).reshape(b * s, k.shape[1], d), cos, sin)
    return (q_out.view(b, s, hq, d).transpose(1, 2),
            k_out.view(b, s, k.shape[1], d).transpose(1, 2))


SILU = ("SiLU", "SiLUActivation")
"""Activation modules (torch's and transformers' `ACT2FN["silu"]`) the SiLU·mul kernel computes."""


def profiled_kinds(loaded) -> set[str]:
    """The unit kinds a model's fused-engine profile (`predict.Loaded`) ran as our kernels: a
    kind its capture never split out (rotary inside the attention unit) is not among them."""
    return {fit.kind for fit in loaded.fits.values() if fit.canonical.get("impl") == IMPL}


def fuse_model(model: torch.nn.Module, kinds=None) -> dict[str, int]:
    """Make `model` run as the fused engine, in place: every RMSNorm module (class name ending
    in `RMSNorm`, Gemma's `(1 + w)` scale included) calls `rmsnorm`, every MLP whose
    activation is SiLU calls `silu_mul_split` on its gate and up projections (`silu_mul` on a
    fused `gate_up_proj`, Phi-3's layout), and every attention module applies its rotary
    embedding with `rotary` (`fused_rotary`; a partial rotary keeps transformers' code); each
    only where its kind is in `kinds` (`profiled_kinds`: what the profile being validated
    fused; default every kind in `FUSED`). Other modules keep transformers' code. Returns how
    many modules of each kind were fused."""
    from dooly_fx.kernels.rmsnorm import rmsnorm
    from dooly_fx.kernels.silu_mul import silu_mul, silu_mul_split

    kinds = set(FUSED) if kinds is None else set(kinds)

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

    def rotary_forward(module, forward):
        # The attention's forward calls its modeling module's `apply_rotary_pos_emb`; swap
        # that global for this module's calls only, so other models keep transformers' code.
        scope = forward.__func__.__globals__
        eager = scope["apply_rotary_pos_emb"]

        def apply(q, k, cos, sin, unsqueeze_dim=1):
            if unsqueeze_dim != 1 or cos.shape[-1] != q.shape[-1] or q.dim() != 4:
                return eager(q, k, cos, sin, unsqueeze_dim)
            return fused_rotary(q, k, cos, sin)

        def wrapped(*args, **kwargs):
            scope["apply_rotary_pos_emb"] = apply
            try:
                return forward(*args, **kwargs)
            finally:
                scope["apply_rotary_pos_emb"] = eager
        return wrapped

    counts = {"norm": 0, "act_mul": 0, "rotary": 0}
    for module in model.modules():
        name = type(module).__name__
        if "rotary" in kinds and name.endswith("Attention") and "apply_rotary_pos_emb" in \
                getattr(type(module).forward, "__globals__", {}):
            module.forward = rotary_forward(module, module.forward)
            counts["rotary"] += 1
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if "norm" in kinds and name.endswith("RMSNorm") and eps is not None \
                and getattr(module, "weight", None) is not None:
            module.forward = norm_forward(module, eps, 1.0 if name.startswith("Gemma") else 0.0)
            counts["norm"] += 1
            continue
        act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
        if "act_mul" not in kinds or type(act).__name__ not in SILU \
                or not hasattr(module, "down_proj"):
            continue
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            module.forward = split_forward(module)
        elif hasattr(module, "gate_up_proj"):
            module.forward = packed_forward(module)
        else:
            continue
        counts["act_mul"] += 1
    return counts
