"""Serving set-up read from a latency DB: weight bytes, KV bytes per token, KV-cache blocks.

    weights = weight_bytes(db, "llama-3.1-8b", env, "padded|sdpa|bfloat16")   # ~16.1e9
    per_token = kv_bytes_per_token(config, "bfloat16")                        # 131072
    sizing = size_kv_cache("llama-3.1-8b", 79.2 * 2**30, 0.9, weights, per_token, 256)
    sizing.num_blocks

Weights are never loaded: a unit's canonical signature lists its inputs' shapes, and an input
whose dims are all config integers (no request symbol) is a parameter or buffer of the model.
The cache gets what is left of `fraction` of the GPU's memory once the weights are in, as
transformers' `PagedAttentionMemoryHandler` and vLLM's `gpu_memory_utilization` do; the
activation peak and the CUDA context are not subtracted (see docs/simulator.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dooly_fx.costs import itemsize
from dooly_fx.db import LatencyDB
from dooly_fx.errors import UserError
from dooly_fx.schedulers import num_blocks_for


def unit_weight_bytes(canonical: dict) -> int:
    """Bytes of one call's inputs whose dims are all integers (the weights a unit reads);
    SymInt inputs and inputs with a request dim (activations, KV caches) are skipped."""
    total = 0
    for dtype, dims in canonical.get("inputs", []):
        if dtype != "symint" and all(isinstance(d, int) for d in dims):
            total += math.prod(dims) * itemsize(dtype)
    return total


def weight_bytes(db: LatencyDB, model: str, env: str, engine: str) -> int:
    """Bytes of a model's weights: Σ over its prefill units of count × `unit_weight_bytes`.

    Each decoder layer holds its own weights, so a per-layer unit counts once per layer. With
    `tie_word_embeddings` the LM head reads the embedding's matrix, so LM-head units add
    nothing. A model not recorded in `env` under `engine` is a UserError.
    """
    rows = [r for r in db.model_units(model, env, engine) if r["phase"] == "prefill"]
    if not rows:
        known = sorted({m["name"] for m in db.models(env, engine)})
        raise UserError(f"{model}: no prefill units recorded under engine {engine} "
                        f"(recorded: {', '.join(known) or 'none'})")
    config = next((m["config"] for m in db.models(env, engine) if m["name"] == model), {})
    return units_weight_bytes(db, rows, config)


def loaded_weight_bytes(db: LatencyDB, loaded) -> int:
    """`weight_bytes` of a `predict.Loaded` model (recorded or captured here)."""
    rows = [{"regime": regime, "signature": u.signature, "count": u.count}
            for (phase, regime), uses in loaded.uses.items() if phase == "prefill"
            for u in uses]
    return units_weight_bytes(db, rows, loaded.config)


def units_weight_bytes(db: LatencyDB, rows: list[dict], config: dict) -> int:
    """`weight_bytes` of prefill unit rows (regime, signature, count) and the model's config."""
    tied = bool(config.get("tie_word_embeddings", False))
    # A sliding-window model records one regime per window case: count one regime only.
    regime = min(r["regime"] for r in rows)
    total = 0
    for r in rows:
        if r["regime"] != regime:
            continue
        sig = db.signature(r["signature"])
        if sig is None or (tied and sig["kind"] == "lm_head"):
            continue
        total += r["count"] * unit_weight_bytes(sig["canonical"])
    return total


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """2 (K and V) × layers × KV heads × head_dim × bytes per element, from a model config.

    Every layer counts, sliding-window ones included: transformers' paged cache gives each
    layer group the same number of pages, so a sliding-window layer reserves as much memory as
    a global one; it only takes fewer blocks per request (`cache_layout`).
    """
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config lacks a field needed to size the KV cache: {exc}") \
            from None
    return 2 * layers * kv_heads * head_dim * itemsize(dtype)


def cache_layout(config: dict) -> dict[str, int]:
    """transformers' paged-cache layer groups of a model config as the DB records it
    (`paged.cache_groups`), as `SchedulerConfig` fields."""
    from dooly_fx.paged import cache_groups
    from dooly_fx.spec import spec_from_config

    return cache_groups(spec_from_config("model", config, "the DB's model config").config)


@dataclass(frozen=True)
class KVSizing:
    """How a KV cache was sized; every byte count is in bytes."""

    memory_bytes: float
    """GPU memory (the environment's `memory_gib`)."""
    fraction: float
    """Share of it the engine may use (weights + cache)."""
    weight_bytes: int
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    groups: int = 1
    """Layer groups sharing the blocks: a block holds `block_size` tokens of one group."""

    @property
    def cache_bytes(self) -> float:
        return self.memory_bytes * self.fraction - self.weight_bytes

    def to_json(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "fraction": self.fraction,
                "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "cache_bytes": self.cache_bytes, "block_size": self.block_size,
                "num_blocks": self.num_blocks, "groups": self.groups,
                "tokens": self.num_blocks * self.block_size // self.groups}


def size_kv_cache(model: str, memory_bytes: float, fraction: float, weights: int,
                  per_token: int, block_size: int, groups: int = 1) -> KVSizing:
    """Blocks of `block_size` tokens of one of `groups` equal layer groups (transformers'
    paged cache; 1: every layer) that fit in memory × fraction − weights. A model whose
    weights leave no room for even one block is a UserError."""
    if not 0 < fraction <= 1:
        raise UserError(f"--gpu-memory-fraction must be in (0, 1], got {fraction}")
    free = memory_bytes * fraction - weights
    blocks = num_blocks_for(free * groups, per_token, block_size) if free > 0 else 0
    if blocks < 1:
        raise UserError(
            f"{model} does not fit: {weights / 2**30:.1f} GiB of weights in "
            f"{fraction:g} × {memory_bytes / 2**30:.1f} GiB leaves no room for one KV block "
            f"({per_token * block_size / groups / 2**20:.1f} MiB); use a larger GPU or "
            "--gpu-memory-fraction, or pass --num-blocks")
    return KVSizing(memory_bytes, fraction, weights, per_token, block_size, blocks, groups)
