"""Vidur's profile CSVs (`mlp.csv`, `attention.csv`) written from a DB's fitted latencies.

    loaded = load(db, "llama-3.1-8b", env, "padded|sdpa|bfloat16")
    export = export_vidur(loaded, max_tokens=4096)
    export.write("out/")          # out/mlp.csv, out/attention.csv

Vidur (microsoft/vidur) predicts a step from per-layer operator times read from these files
(`--<predictor>_compute_input_file`, `--<predictor>_attention_input_file`). Each row here is a
prediction of our fits, not a measurement, at the points of Vidur's own profiling grids
(`vidur/profiling/utils`): `num_tokens` 1, 2, 4, 8..1016 by 8, 1024..2048 by 16, ... for
`mlp.csv`; chunked and full prefills and decode batches for `attention.csv`. All times are GPU
milliseconds; host (issue) time is not exported, as Vidur models CPU overhead apart. Every
statistic column (min, max, mean, median) holds the prediction and `std` is 0.

Our units map onto Vidur's operators as follows (`MLP_MAP`, first match wins). A per-layer
operator's time is Σ count × latency of its units divided by the number of layers, so Vidur's
sum over layers gives back our step total:

| Vidur op | our units (kind: role) |
|----------|------------------------|
| emb | embedding (and Gemma's embedding scale), per call |
| input_layernorm | norm: `input_layernorm` |
| attn_pre_proj | gemm: `self_attn.{q,k,v,qkv}_proj`, norm: `self_attn.{q,k}_norm` |
| attn_rope | rotary, where its latency depends on the token count alone (a paged     |
|           | capture; a padded one's is per (B, S): an attention-side unit, below); the |
|           | elementwise unit `self_attn:model` (the rotary of a paged capture whose     |
|           | partition skipped transformers' frames, passes/README.md rule 3)           |
| attn_post_proj | gemm: `self_attn.o_proj` |
| post_attention_layernorm | norm: `post_attention_layernorm`, `{pre,post}_feedforward_*` |
| mlp_up_proj | gemm: `mlp.{gate,up,gate_up}_proj`; MoE: router and experts |
| mlp_act | act_mul, act |
| mlp_down_proj | gemm: `mlp.down_proj` |
| add | residual (both adds of a layer) |
| attn_kv_cache_save | kv_cache_write at num_tokens when its latency depends on the token |
|                    | count alone; else it is an attention-side unit (below) |
| attn_prefill | attention-side units (below) of a prefill (B=1, S=chunk), or of a |
|              | chunked prefill (B=1, S=chunk, P=cached) |
| attn_decode | attention-side units of a decode step (B=batch, P=cached) |
| not exported | LM head, final norm, other once-per-step token units |

Attention-side units are those whose latency depends on more than the token count: the
attention unit, the rotary and cache copy of a padded capture (their latency is per (B, S)),
masks, the paged engine's cache write, and the rotary cos/sin table (once per step, spread
over the layers like every op but `emb`).

Every row is predicted at the request values of the profile's own engine (`batch_values`): a
padded profile at (B, S, P), a paged one (`--engine paged`) at (T, N, P) with T = N for a
decode batch, as `FlatStepTime` predicts the steps the simulator runs.
`attn_input_reshape` and `attn_output_reshape` are 0: they are inside our attention units.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from dooly_fx.errors import UserError
from dooly_fx.predict import (
    DEFAULT_SKEW,
    FlatStepTime,
    Loaded,
    Use,
    batch_values,
    unit_ms,
    unit_point,
)

STATS = ("min", "max", "mean", "median", "std")
MLP_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
MLP_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size",
               "use_gated_mlp", "num_tokens", "num_tensor_parallel_workers")
ATTENTION_OPS = ("attn_input_reshape", "attn_kv_cache_save", "attn_prefill", "attn_decode",
                 "attn_output_reshape")
ATTENTION_COLUMNS = ("n_embd", "n_q_head", "n_kv_head", "block_size",
                     "num_tensor_parallel_workers", "max_model_len", "batch_size",
                     "prefill_chunk_size", "kv_cache_size", "is_prefill", "attention_backend")

MLP_MAP: tuple[tuple[str, str, str | None], ...] = (
    ("embedding", r"", "emb"),
    ("elementwise", r"embed_tokens$", "emb"),
    ("norm", r"input_layernorm$", "input_layernorm"),
    ("norm", r"(post_attention|pre_feedforward|post_feedforward)_layernorm$",
     "post_attention_layernorm"),
    ("norm", r"self_attn\.[qk]_norm$", "attn_pre_proj"),
    ("gemm", r"self_attn\.(q|k|v|qkv)_proj$", "attn_pre_proj"),
    ("gemm", r"self_attn\.o_proj$", "attn_post_proj"),
    ("gemm", r"mlp\.(gate|up|gate_up)_proj$", "mlp_up_proj"),
    ("gemm", r"mlp\.gate$", "mlp_up_proj"),
    ("router", r"", "mlp_up_proj"),
    ("moe_experts", r"", "mlp_up_proj"),
    ("act_mul", r"", "mlp_act"),
    ("act", r"", "mlp_act"),
    ("gemm", r"mlp\.down_proj$", "mlp_down_proj"),
    ("residual", r"", "add"),
    ("rotary", r"", "attn_rope"),
    ("elementwise", r"self_attn(:\w+)?$", "attn_rope"),
    ("kv_cache_write", r"", "attn_kv_cache_save"),
)
"""(unit kind, pattern searched in the unit's role, Vidur op) for token-wise units."""


def vidur_op(kind: str, role: str) -> str | None:
    """The Vidur operator a token-wise unit maps to (`MLP_MAP`), None if it is not exported."""
    return next((op for k, pattern, op in MLP_MAP if k == kind and re.search(pattern, role)),
                None)


def num_tokens_grid(max_tokens: int) -> list[int]:
    """Vidur's `get_num_tokens_to_profile` grid up to `max_tokens`, ascending."""
    space = [1, 2, 4, *range(8, 1024, 8)]
    for lo, hi, step in ((1024, 2048, 16), (2048, 4096, 32), (4096, 8192, 64),
                         (8192, 16384, 128), (16384, 32768, 256), (32768, 65536, 512),
                         (65536, 131072, 1024)):
        space += range(lo, hi + 1, step)
    return sorted({n for n in space if n <= max_tokens})


def attention_grid(max_len: int, max_batch: int) -> list[tuple[int, int, int, bool]]:
    """Vidur's `get_attention_input_combinations` as (prefill_chunk_size, kv_cache_size,
    batch_size, is_prefill): chunked prefills, full prefills, then decodes; duplicates once."""
    chunks = [*range(64, 129, 16), *range(128, 1025, 32), *range(1024, 4097, 64),
              *range(4096, 16385, 128), *range(16384, 65537, 256)]
    lengths = [*range(0, 1025, 32), *range(1024, 4097, 64), *range(4096, 65537, 256)]
    batches = [*range(1, 129), *range(128, 1025, 8)]
    combos: list[tuple[int, int, int, bool]] = []
    for c in (c for c in chunks if c <= max_len):
        combos += [(c, i * c, 1, True) for i in range(max_len // c) if c + i * c <= max_len]
    combos += [(n, 0, 1, True) for n in lengths if 0 < n < max_len]
    combos += [(0, p, b, False) for p in lengths if 0 < p < max_len
               for b in batches if b <= max_batch]
    return list(dict.fromkeys(combos))


@dataclass
class VidurExport:
    """Rows of both files (column name -> value) and the units not exported."""

    mlp: list[dict] = field(default_factory=list)
    attention: list[dict] = field(default_factory=list)
    mapping: dict[str, list[str]] = field(default_factory=dict)
    """Vidur op -> roles of the units summed into it."""
    skipped: list[str] = field(default_factory=list)
    """`kind: role` of token-wise units with no Vidur column."""

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write `mlp.csv` and `attention.csv` into folder `out` (created with its parents,
        as Vidur's `data/profiling/compute/<device>/<model>/` layout needs); returns their
        paths."""
        folder = Path(out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create folder {out}: {exc.strerror}") from None
        paths = folder / "mlp.csv", folder / "attention.csv"
        for path, rows, columns in ((paths[0], self.mlp, mlp_header()),
                                    (paths[1], self.attention, attention_header())):
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(path)
        return paths


def mlp_header() -> list[str]:
    return [f"time_stats.{op}.{s}" for op in MLP_OPS for s in STATS] + list(MLP_COLUMNS)


def attention_header() -> list[str]:
    return [f"time_stats.{op}.{s}" for op in ATTENTION_OPS for s in STATS] + \
        list(ATTENTION_COLUMNS)


def _stats(op: str, ms: float) -> dict[str, float]:
    return {f"time_stats.{op}.{s}": 0.0 if s == "std" else ms for s in STATS}


def _gpu_ms(loaded: Loaded, use: Use, values: dict) -> float:
    """GPU ms of one call of a unit at padded `values`, as `predict_step` computes it."""
    fit = loaded.fits[use.signature]
    return unit_ms(fit, unit_point(fit, use, values, DEFAULT_SKEW))


def export_vidur(loaded: Loaded, max_tokens: int = 4096, max_batch: int = 128,
                 block_size: int = 16) -> VidurExport:
    """Both files' rows for `loaded` (a model's units and fits, see `predict.load`):
    `mlp.csv` at Vidur's num_tokens grid up to `max_tokens`, `attention.csv` at its attention
    grid with contexts up to `max_tokens` (Vidur's `max_model_len`) and decode batches up to
    `max_batch`. `block_size` only labels the rows; Vidur keeps rows of its own block size."""
    if max_tokens < 1 or max_batch < 1 or block_size < 1:
        raise UserError("--max-tokens, --max-batch-size and --block-size must be positive")
    if not attention_grid(max_tokens, max_batch):
        raise UserError(f"--max-tokens {max_tokens}: Vidur's attention grid has no point below "
                        "it (its first is a 32-token prefill: give at least 33)")
    flat = FlatStepTime(loaded)  # refuses a model with unfitted units
    cfg = loaded.config
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    prefill = loaded.uses.get(("prefill", "")) or next(
        u for (p, _), u in sorted(loaded.uses.items()) if p == "prefill")
    export = VidurExport()
    tokenwise: list[tuple[str, Use]] = []
    for use in prefill:
        fit = loaded.fits[use.signature]
        if not set(fit.names) <= {"m", "skew"}:
            continue  # attention side: attention.csv
        op = vidur_op(fit.kind, use.role)
        if op is None:
            export.skipped.append(f"{fit.kind}: {use.role}")
            continue
        tokenwise.append((op, use))
        export.mapping.setdefault(op, []).append(use.role)
    gated = any(loaded.fits[u.signature].kind in ("act_mul", "moe_experts") for u in prefill)
    model_cols = {"n_head": heads, "n_kv_head": int(cfg.get("num_key_value_heads") or heads),
                  "n_embd": int(cfg["hidden_size"]),
                  "n_expanded_embd": int(cfg.get("intermediate_size") or 0),
                  "vocab_size": int(cfg["vocab_size"]), "use_gated_mlp": gated,
                  "num_tensor_parallel_workers": 1}

    def tokens_ms(n: int) -> dict[str, float]:
        per_op = dict.fromkeys(MLP_OPS, 0.0) | {"attn_kv_cache_save": 0.0}
        values = batch_values([(n, 0)], loaded.engine)[1]  # one sequence of n new tokens
        for op, use in tokenwise:
            ms = use.count * _gpu_ms(loaded, use, values)
            per_op[op] += ms if op == "emb" else ms / layers
        return per_op

    for n in num_tokens_grid(max_tokens):
        per_op = tokens_ms(n)
        row: dict = {}
        for op in MLP_OPS:
            row |= _stats(op, per_op[op])
        export.mlp.append(row | model_cols | {"num_tokens": n})

    attn_cols = {"n_embd": model_cols["n_embd"], "n_q_head": heads,
                 "n_kv_head": model_cols["n_kv_head"], "block_size": block_size,
                 "num_tensor_parallel_workers": 1, "max_model_len": max_tokens,
                 "attention_backend": loaded.engine}
    saves = [(op, use) for op, use in tokenwise if op == "attn_kv_cache_save"]
    for chunk, cached, batch, is_prefill in attention_grid(max_tokens, max_batch):
        seqs = [(chunk, cached)] if is_prefill else [(1, cached)] * batch
        phase, values = batch_values(seqs, loaded.engine)  # prefill, mixed or decode
        gpu = flat.attention(phase, values)[0]
        tokens = max(chunk, batch)
        save = sum(u.count * _gpu_ms(loaded, u, batch_values([(tokens, 0)], loaded.engine)[1])
                   for _, u in saves) / layers
        row = _stats("attn_input_reshape", 0.0) | _stats("attn_kv_cache_save", save) | \
            _stats("attn_output_reshape", 0.0)
        row |= _stats("attn_prefill" if is_prefill else "attn_decode", gpu / layers)
        export.attention.append(row | attn_cols | {
            "batch_size": batch, "prefill_chunk_size": chunk, "kv_cache_size": cached,
            "is_prefill": is_prefill})
    return export
