"""Tiny versions of zoo models: same architecture (MoE layout, sliding pattern, fused
projections, softcapping), small dimensions, so every family captures fast in tests."""

from __future__ import annotations

from typing import Any

import transformers

from dooly_fx.spec import ModelSpec
from dooly_fx.zoo import ZOO

# One zoo model per family, and the decoder depth its tiny version keeps (two periods or more).
FAMILIES: dict[str, int] = {
    "llama-3.1-8b": 3, "qwen2.5-7b": 3, "mistral-7b": 3, "mixtral-8x7b": 3, "qwen3-8b": 3,
    "qwen3-30b-a3b": 3, "qwen1.5-moe-a2.7b": 3, "gemma-2-9b": 5, "phi-3-mini": 3,
    "command-r7b": 9,
}

_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 96, "vocab_size": 256, "num_local_experts": 4,
    "num_experts": 4, "num_experts_per_tok": 2, "sliding_window": 32,
    "query_pre_attn_scalar": 16,
}


def tiny_fields(name: str, layers: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The zoo entry's config fields with tiny dimensions and `layers` decoder layers."""
    fields = ZOO[name].fields()
    layers = layers or FAMILIES[name]
    mha = fields.get("num_key_value_heads") == fields["num_attention_heads"]
    fields.update({k: v for k, v in _TINY.items() if fields.get(k) is not None})
    fields.update(num_attention_heads=4, num_key_value_heads=4 if mha else 2,
                  num_hidden_layers=layers)
    if "head_dim" in fields:
        fields["head_dim"] = 16
    if fields.get("layer_types"):
        fields["layer_types"] = list(fields["layer_types"])[:layers]
    fields.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocab
    fields.update(overrides)
    return fields


def spec_from_fields(name: str, fields: dict[str, Any]) -> ModelSpec:
    config = transformers.AutoConfig.for_model(**fields)
    return ModelSpec(name=name, hf_id=None, source="test", config=config)


def tiny_spec(name: str, layers: int | None = None, **overrides: Any) -> ModelSpec:
    """A ModelSpec of the tiny version of zoo model `name`."""
    return spec_from_fields(f"tiny-{name}", tiny_fields(name, layers, **overrides))
