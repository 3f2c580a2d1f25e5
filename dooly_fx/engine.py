"""Engine profiles: which engine executes the model, with which attention and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PHASES = ("prefill", "decode", "mixed")
ENGINES = ("padded", "paged")
ATTN_IMPLS = ("sdpa", "eager")
_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineProfile:
    """How a model is executed; part of every environment fingerprint."""

    engine: str = "padded"
    """'padded': `model(input_ids[B, S], past_key_values=DynamicCache)`.
    'paged': transformers continuous batching, tokens flattened to `[1, T]`, paged KV cache."""
    attn_impl: str = "sdpa"
    """Attention implementation: 'sdpa' or 'eager' (paged: the backend behind `paged|<impl>`)."""
    dtype: str = "bfloat16"
    """Activation and weight dtype."""
    experts_impl: str = "grouped_mm"
    """MoE experts implementation in transformers ('grouped_mm' or 'batched_mm')."""
    tp: int = 1
    """Tensor-parallel degree (1: no sharding)."""
    kernels: str = "eager"
    """'eager': the ATen ops transformers issues; 'triton': a fused engine, where norms and
    SiLU·mul run as one Triton kernel each (`fused.py`)."""

    def __post_init__(self) -> None:
        from dooly_fx.errors import UserError

        if self.engine not in ENGINES:
            raise UserError(f"unknown engine '{self.engine}'; choose from {', '.join(ENGINES)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise UserError(
                f"unknown attention '{self.attn_impl}'; choose from {', '.join(ATTN_IMPLS)}")
        if self.dtype not in _DTYPES:
            raise UserError(f"unknown dtype '{self.dtype}'; choose from {', '.join(_DTYPES)}")
        if self.experts_impl not in ("grouped_mm", "batched_mm"):
            raise UserError(f"unknown experts implementation '{self.experts_impl}'; choose from "
                            "grouped_mm, batched_mm")
        if self.kernels not in ("eager", "triton"):
            raise UserError(f"unknown kernels '{self.kernels}'; choose from eager, triton")
        if self.tp != 1:
            raise UserError("tensor parallelism (--tp > 1) is not supported yet")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # imported here: the simulator and `predict` never need it

        return getattr(torch, self.dtype)

    @property
    def attn_backend_name(self) -> str:
        """The `attn_implementation` string the model is built with."""
        if self.engine == "paged":
            from dooly_fx.paged import backend_name

            return backend_name(self.attn_impl)
        return self.attn_impl

    @property
    def label(self) -> str:
        """`engine|attn|dtype`, plus `|experts` when MoE experts do not use grouped_mm and
        `|triton` for the fused-kernel variant."""
        base = f"{self.engine}|{self.attn_impl}|{self.dtype}"
        if self.experts_impl != "grouped_mm":
            base += f"|{self.experts_impl}"
        return base if self.kernels == "eager" else f"{base}|{self.kernels}"
