"""Stage 2: symbolic capture of one forward step, with no weights and no GPU.

`capture(spec, engine, phase)` returns one `Capture` per regime: an FX graph (pre-dispatch ATen, the
level `torch.export` produces) whose every shape is a SymPy expression over two kinds of symbols:

* request symbols (B, S, P, T, N; see `symbols.py`), which the batch sets, and
* config symbols, one per integer config field (`hidden_size`, `num_key_value_heads`, ...).

Config fields are made symbolic *before the model is built*: the config holds backed SymInts, the
model is constructed under a FakeTensorMode that shares their ShapeEnv, and the forward is traced
with `make_fx(pre_dispatch=True)` (the tracer under non-strict `torch.export`). A weight of shape
`(num_key_value_heads*head_dim, hidden_size)` therefore *is* that expression, and every dimension
derived from it carries its provenance through the arithmetic that produced it. `torch.export`
itself would specialise config values to plain ints, losing exactly that information.

Only the shortest repeating period of decoder layers is built (plus any leading layers that
differ); `LayerPlan.multiplicity` scales counts back to the real depth.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from dooly_fx.engine import PHASES, EngineProfile
from dooly_fx.errors import StageError, UserError
from dooly_fx.spec import ModelSpec
from dooly_fx.symbols import REQUEST_HINTS, SymbolTable
from dooly_fx.tracing import concretise_floats, eager_tracing, symbolic_build

# Integer config fields that are made symbolic, matched by name (the generic path: any
# architecture's dimension fields follow these conventions in transformers).
_DIM_FIELD_EXACT = {
    "hidden_size", "intermediate_size", "vocab_size", "head_dim", "num_attention_heads",
    "num_key_value_heads", "num_local_experts", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "n_routed_experts",
    "n_shared_experts", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
    "v_head_dim", "ffn_hidden_size", "n_embd", "n_head", "n_inner", "num_heads",
}
_DIM_FIELD_SUFFIXES = ("_intermediate_size", "_head_dim", "_hidden_size")
_NOT_DIM_FIELDS = {"num_hidden_layers", "max_position_embeddings", "sliding_window",
                   "max_window_layers", "num_nextn_predict_layers"}


@dataclass(frozen=True)
class LayerPlan:
    """Which decoder layers are built, and how many real layers each one stands for."""

    total_layers: int
    """`num_hidden_layers` of the real model."""
    multiplicity: tuple[int, ...]
    """multiplicity[j]: real layers represented by built layer j (sums to total_layers)."""

    @property
    def built_layers(self) -> int:
        return len(self.multiplicity)

    def count(self, layer: int | None) -> int:
        """Real instances of a unit found in built layer `layer` (None: outside the layers)."""
        return 1 if layer is None or layer >= self.built_layers else self.multiplicity[layer]


@dataclass
class Capture:
    """One traced step: graph, symbols, and how to scale per-layer counts."""

    model: str
    phase: str
    regime: str
    """'' for most graphs; 'window<' / 'window>=' for sliding-window models' cached phases."""
    engine: EngineProfile
    gm: torch.fx.GraphModule
    symbols: SymbolTable
    plan: LayerPlan
    seconds: float
    specialised_fields: tuple[str, ...] = ()
    """Config fields that the model code forced to a constant (their dims lose provenance)."""
    config_fields: dict[str, int] = field(default_factory=dict)
    """The symbolic config fields and their values for this model."""

    @property
    def label(self) -> str:
        return f"{self.phase}[{self.regime}]" if self.regime else self.phase


# --- layer period --------------------------------------------------------------------------------


def layer_kinds(config) -> list[Hashable]:
    """A hashable description per decoder layer; equal descriptions mean identical layers."""
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or [None] * n)
    sparse_step = getattr(config, "decoder_sparse_step", None)
    mlp_only = set(getattr(config, "mlp_only_layers", None) or ())
    first_dense = getattr(config, "first_k_dense_replace", None)
    moe_freq = getattr(config, "moe_layer_freq", None)
    kinds: list[Hashable] = []
    for i in range(n):
        moe: Hashable = None
        if sparse_step:
            moe = i not in mlp_only and (i + 1) % sparse_step == 0
        elif first_dense is not None:
            moe = i >= first_dense and (not isinstance(moe_freq, int) or i % moe_freq == 0)
        kinds.append((types[i] if i < len(types) else None, moe))
    return kinds


def layer_plan(config, full_depth: bool = False) -> LayerPlan:
    """The shortest prefix+period of layers whose repetition reproduces all layer kinds."""
    kinds = layer_kinds(config)
    n = len(kinds)
    if full_depth or n == 0:
        return LayerPlan(n, (1,) * n)
    best: tuple[int, int] = (n, 0)
    for built in range(1, n + 1):
        for prefix in range(built):
            period = built - prefix
            if all(kinds[i] == kinds[prefix + (i - prefix) % period] for i in range(prefix, n)):
                best = (prefix, period)
                break
        else:
            continue
        break
    prefix, period = best
    mult = [1] * prefix + [0] * period
    for i in range(prefix, n):
        mult[prefix + (i - prefix) % period] += 1
    return LayerPlan(n, tuple(mult))


def _truncate_layers(config, built: int) -> None:
    """Cut `config` down to its first `built` decoder layers, keeping per-layer lists aligned."""
    config.num_hidden_layers = built
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:built]
    if getattr(config, "mlp_only_layers", None):
        config.mlp_only_layers = [i for i in config.mlp_only_layers if i < built]


# --- symbolic model construction ------------------------------------------------------------------


def _is_dim_field(name: str, value: object) -> bool:
    if type(value) is not int or value < 2 or name in _NOT_DIM_FIELDS or name.endswith("_id"):
        return False
    return name in _DIM_FIELD_EXACT or name.endswith(_DIM_FIELD_SUFFIXES)


def _symbolic_config(spec: ModelSpec, engine: EngineProfile, plan: LayerPlan, table: SymbolTable):
    """A copy of the model's config, cut to the built layers, with dimension fields as SymInts."""
    config = copy.deepcopy(spec.config)
    _truncate_layers(config, plan.built_layers)
    if engine.engine == "paged":
        from dooly_fx import paged

        paged.register()  # makes attn_implementation="dooly_paged_<impl>" known to transformers
    config._attn_implementation = engine.attn_backend_name
    if has_experts(config):
        from dooly_fx import moe

        moe.register()  # one opaque node per expert block (see moe.py)
        config._experts_implementation = moe.backend_name(engine.experts_impl)
    config.use_cache = True
    fields: dict[str, int] = {}
    for name, value in list(vars(config).items()):
        if _is_dim_field(name, value):
            fields[name] = value
            # Bypass the strict-dataclass validators: the value is a SymInt on purpose.
            config.__dict__[name] = table.new(name, value, "config")
    return config, fields


def kv_geometry(config) -> tuple[int, int]:
    """(KV heads, head dim) of a transformers config: what one cached token holds per layer."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


def has_experts(config) -> bool:
    return any(getattr(config, f, None) for f in ("num_local_experts", "num_experts",
                                                   "n_routed_experts"))


def _build(config, fields: dict[str, int], mode: FakeTensorMode, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with mode, symbolic_build(fields):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    concretise_floats(model)
    return model.eval()


# --- phase wrappers ------------------------------------------------------------------------------


class _PaddedStep(nn.Module):
    """`model(input_ids[B, S], past_key_values=DynamicCache)` with the cache built from inputs.

    The cache layers are filled directly (no ops), so only the model's own cache updates appear.
    """

    def __init__(self, model: nn.Module, config, cached: SymbolicCache | None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.cached = cached

    def forward(self, input_ids, past, *symbols):
        # As in `generate`: logits only for each sequence's last position.
        kwargs: dict = {"use_cache": False, "logits_to_keep": 1}
        if self.cached is not None:
            kwargs.update(use_cache=True, past_key_values=self.cached.build(past))
        return self.model(input_ids, **kwargs).logits


class _FlatStep(nn.Module):
    """The continuous-batching layout: all new tokens flattened into `input_ids[1, T]`."""

    def __init__(self, model: nn.Module, cached: bool) -> None:
        super().__init__()
        self.model = model
        self.cached = cached
        """Whether the last symbol input is P (cached tokens per sequence) for the attention."""

    def forward(self, input_ids, position_ids, cu_seqlens_q, logits_indices, *symbols):
        extra = {"dooly_cached": symbols[-1]} if self.cached else {}
        out = self.model(input_ids, position_ids=position_ids, cu_seq_lens_q=cu_seqlens_q,
                         logits_to_keep=logits_indices, use_cache=False, **extra)
        return out.logits


@dataclass
class SymbolicCache:
    """How to rebuild a `DynamicCache` holding P cached tokens per sequence inside `forward`."""

    config: object
    cached: torch.SymInt | None
    """P, or None for an empty cache (prefill)."""
    above_window: bool

    def build(self, past: Sequence[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        if self.cached is None:
            return cache
        for layer, k, v in zip(cache.layers, past[0::2], past[1::2], strict=True):
            layer.dtype, layer.device = k.dtype, k.device
            layer.keys, layer.values = k, v
            layer.is_initialized = True
            if getattr(layer, "is_sliding", False):
                layer.cumulative_length = self.cached
        return cache


def _cache_lengths(config, table_p: torch.SymInt, above_window: bool) -> list[object]:
    """Stored cache length per layer: P, or `sliding_window - 1` for full sliding layers."""
    from transformers import DynamicCache

    lengths: list[object] = []
    for layer in DynamicCache(config=config).layers:
        if getattr(layer, "is_sliding", False) and above_window:
            lengths.append(layer.sliding_window - 1)
        else:
            lengths.append(table_p)
    return lengths


def _window(config) -> int | None:
    types = getattr(config, "layer_types", None) or ()
    window = getattr(config, "sliding_window", None)
    if window and (not types or "sliding_attention" in types):
        return int(window)
    return None


def _trace(module: nn.Module, args: tuple) -> torch.fx.GraphModule:
    def fn(*a):
        return module(*a)

    fn._orig_mod = module  # make_fx records nn_module_stack for this root
    with eager_tracing():
        return make_fx(fn, tracing_mode="fake", pre_dispatch=True, record_module_stack=True)(*args)


# --- the stage -----------------------------------------------------------------------------------


def capture(
    spec: ModelSpec,
    engine: EngineProfile,
    phase: str,
    full_depth: bool = False,
) -> list[Capture]:
    """Trace one phase of `spec` under `engine`: one `Capture` per sliding-window regime.

    Graphs are cached per config *structure*: every dimension is symbolic, so a model that
    differs from an earlier one only in dimension values (Llama-3.1-8B and -70B) reuses its
    graph with its own values, provided every guard recorded while tracing holds for them.
    """
    if phase not in PHASES:
        raise UserError(f"unknown phase '{phase}'; choose from {', '.join(PHASES)}")
    window = _window(spec.config)
    regimes = [""]
    if window and engine.engine == "padded":
        regimes = ["window<", "window>="]
    out = []
    for regime in regimes:
        plan = layer_plan(spec.config, full_depth)
        key = _structure_key(spec.config, engine, phase, regime, plan)
        cached = _CACHE.get(key)
        reused = _reuse(cached, spec, plan) if cached is not None else None
        if reused is None:
            reused = _capture_one(spec, engine, phase, regime, window, plan)
            _CACHE[key] = reused
        out.append(reused)
    return out


_CACHE: dict[str, Capture] = {}


def clear_cache() -> None:
    """Forget cached graphs (benchmarks measure cold captures)."""
    _CACHE.clear()


def _structure_key(config, engine: EngineProfile, phase: str, regime: str,
                   plan: LayerPlan) -> str:
    """Everything about a capture except dimension values and depth beyond the built layers."""
    def norm(name: str, value: object) -> object:
        if _is_dim_field(name, value):
            return "<dim>"
        if isinstance(value, float):
            return "<float>"  # eps, rope theta, softcap: constants, never shapes or branches
        if isinstance(value, dict):
            return {k: norm(k, v) for k, v in value.items()}
        if name in ("layer_types", "mlp_only_layers") and isinstance(value, list):
            return value[:plan.built_layers] if name == "layer_types" else \
                [i for i in value if i < plan.built_layers]
        return value

    fields = {k: norm(k, v) for k, v in config.to_dict().items()
              if k not in ("num_hidden_layers", "_name_or_path", "transformers_version")}
    return json.dumps([fields, layer_kinds(config)[:plan.built_layers], plan.built_layers,
                       engine.label, phase, regime], sort_keys=True, default=str)


def _reuse(cached: Capture, spec: ModelSpec, plan: LayerPlan) -> Capture | None:
    """`cached` relabelled with `spec`'s dimension values, or None if a guard fails for them."""
    start = time.perf_counter()
    fields = {k: v for k, v in vars(spec.config).items() if _is_dim_field(k, v)}
    old = cached.symbols
    if set(fields) != set(cached.config_fields):
        return None
    values = {sym: fields[old.names[sym]] if old.kinds[sym] == "config" else value
              for sym, value in old.values.items()}
    for guard in old.shape_env.guards:
        try:
            holds = bool(guard.expr.xreplace({s: sympy.Integer(v) for s, v in values.items()}))
        except TypeError:  # not decidable from the values alone
            holds = False
        if not holds:
            return None
    table = SymbolTable(shape_env=old.shape_env, names=old.names, kinds=old.kinds,
                        values=values)
    # A graph of its own (node metadata is per model once tainted); the nodes' fake values and
    # the ShapeEnv are shared, read-only.
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(cached.gm.graph, {}))
    return Capture(model=spec.name, phase=cached.phase, regime=cached.regime,
                   engine=cached.engine, gm=torch.fx.GraphModule(cached.gm, graph),
                   symbols=table, plan=plan,
                   seconds=time.perf_counter() - start,
                   specialised_fields=cached.specialised_fields, config_fields=fields)


def _capture_one(spec, engine, phase, regime, window, plan) -> Capture:
    start = time.perf_counter()
    table = SymbolTable()
    try:
        config, fields = _symbolic_config(spec, engine, plan, table)
        mode = FakeTensorMode(shape_env=table.shape_env, allow_non_fake_inputs=True)
        model = _build(config, fields, mode, engine.torch_dtype)
    except UserError:
        raise
    except Exception as exc:  # an architecture transformers cannot build from this config
        raise StageError("build", spec.name, _one_line(exc)) from exc
    symbols = [config.__dict__[name] for name in fields]
    try:
        with mode:
            module, args, extra = _phase_inputs(model, config, engine, phase, regime, window, table)
        gm = _trace(module, (*args, *symbols, *extra))
    except UserError:
        raise
    except Exception as exc:
        raise StageError(f"capture ({phase})", spec.name, _one_line(exc)) from exc
    specialised = tuple(
        name for sym, name in table.names.items()
        if table.kinds[sym] == "config" and sym in table.shape_env.replacements
        and table.shape_env.replacements[sym].is_number
    )
    return Capture(
        model=spec.name, phase=phase, regime=regime, engine=engine, gm=gm, symbols=table,
        plan=plan, seconds=time.perf_counter() - start, specialised_fields=specialised,
        config_fields=fields,
    )


def _phase_inputs(model, config, engine, phase, regime, window, table):
    """The traced module, its example inputs, and request SymInts that must be graph inputs.

    A SymInt used by the model code (a sliding cache's `cumulative_length = P`) must be a traced
    input; one read off an input tensor's shape is tracked already.
    """
    if engine.engine == "paged":
        if phase == "decode":
            n = t = table.request("N")
        else:
            t, n = table.request("T"), table.request("N")
        ids = torch.empty((1, t), dtype=torch.long)
        positions = torch.empty((1, t), dtype=torch.long)
        cu_seqlens = torch.empty((n + 1,), dtype=torch.int32)
        logits_indices = torch.empty((n,), dtype=torch.long)
        if phase == "prefill":
            return _FlatStep(model, False), (ids, positions, cu_seqlens, logits_indices), ()
        p = table.new("P", REQUEST_HINTS["P"], "request")  # cached tokens per sequence
        return _FlatStep(model, True), (ids, positions, cu_seqlens, logits_indices), (p,)

    above = regime == "window>="
    b = table.request("B")
    if phase == "decode":
        s: object = 1
    else:  # a prefill at or above the window needs a real sliding mask
        s_hint = window + REQUEST_HINTS["S"] if above and phase == "prefill" else REQUEST_HINTS["S"]
        s = table.new("S", s_hint, "request")
    ids = torch.empty((b, s), dtype=torch.long)
    if phase == "prefill":  # generate() passes an empty DynamicCache: the first write is a copy
        return _PaddedStep(model, config, SymbolicCache(config, None, False)), (ids, []), ()
    p_hint = (window + REQUEST_HINTS["P"]) if above else REQUEST_HINTS["P"]
    p = table.new("P", p_hint, "request")
    kv_heads, head_dim = kv_geometry(config)
    past = []
    for length in _cache_lengths(config, p, above):
        for _ in ("k", "v"):
            past.append(torch.empty((b, kv_heads, length, head_dim), dtype=engine.torch_dtype))
    return _PaddedStep(model, config, SymbolicCache(config, p, above)), (ids, past), (p,)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]

