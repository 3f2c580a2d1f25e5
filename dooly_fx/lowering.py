"""Stage 7: turn a unit signature at a sweep point into something runnable, checked, and costed.

Per-kind knowledge lives in registries filled by decorators, keyed by op kind, duplicates
rejected:
* `register_lowering(kind)`: build a `Runnable` (inputs made for the point, the callable, and a
  check run before timing). Kinds without one replay the unit's own extracted subgraph, which is
  exactly what transformers runs for that unit.
FLOPs and bytes of a unit (roofline features, plan estimates) live in `costs.py`: they need only
the signature, not a captured graph.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from dooly_fx.passes.taint import Config, TensorLabel
from dooly_fx.registry import registrar
from dooly_fx.sweep import realise

Point = dict[str, int]


@dataclass
class UnitCase:
    """Everything needed to profile one signature: a representative unit, extracted."""

    key: str
    kind: str
    canonical: dict
    subgraph: torch.fx.GraphModule
    inputs: list[object]
    """Labels of the subgraph's placeholders: TensorLabel, or a DimLabel for SymInt inputs."""
    outputs: list[TensorLabel]
    symbols: list[str]
    """Names of the request symbols the unit's labels use (B, S, P, T, N)."""
    models: list[str] = field(default_factory=list)


@dataclass
class Runnable:
    """A unit ready to time: `fn()` runs it once; `check()` raises if its result is wrong."""

    fn: Callable[[], object]
    check: Callable[[], None]
    graphs: bool = True
    """Time GPU replays of a CUDA graph of `fn` where it can be captured (`timing.measure`)."""
    host_calls: int = 20
    """Calls whose median is its host issue time (`timing.host_issue`)."""


Lowering = Callable[[UnitCase, Point, str], Runnable]
LOWERINGS: dict[str, Lowering] = {}


register_lowering = registrar(LOWERINGS, "lowering")
"""`@register_lowering(kind, ...)`: how units of these kinds are made runnable."""


def lower(case: UnitCase, point: Point, device: str) -> Runnable:
    """The runnable for `case` at `point` on `device`: the fused-engine kernel of a fused
    signature (`fused.py`), else a registered lowering, else subgraph replay."""
    if case.canonical.get("impl") == "triton":
        from dooly_fx.fused import lower_fused

        return lower_fused(case, point, device)
    return LOWERINGS.get(case.kind, replay_subgraph)(case, point, device)


def shape_at(label: TensorLabel, values: dict[sympy.Symbol, int]) -> list[int]:
    """Concrete shape of a labelled tensor once request symbols take `values`."""
    return [d.value if isinstance(d, Config) else int(d.expr.xreplace(values))
            for d in label.dims]


def _make_tensor(label: TensorLabel, shape: list[int], device: str,
                 generator: torch.Generator) -> torch.Tensor:
    dtype = label.dtype
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype, device=device)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype, device=device)  # valid indices, positions
    values = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
    return (values * 0.02).to(dtype)


def materialise(case: UnitCase, point: Point, device: str) -> list[object]:
    """Real arguments for the unit's subgraph at `point`.

    Random values come from a private generator: a unit that could not be captured in a CUDA
    graph must not leave the default generator unusable for the next point.
    """
    values = realise(case.symbols, point)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    args: list[object] = []
    for label in case.inputs:
        if isinstance(label, TensorLabel):
            args.append(_make_tensor(label, shape_at(label, values), device, generator))
        elif isinstance(label, Config):
            args.append(label.value)
        elif label is None:
            args.append(None)
        else:
            args.append(int(label.expr.xreplace(values)))
    return args


# --- the default lowering: replay the unit's own subgraph --------------------------------------


def on_device(gm: torch.fx.GraphModule, device: str) -> torch.fx.GraphModule:
    """`gm` with the device constants it was traced with (`.to("cpu")`, `arange(device=...)`)
    replaced by `device`."""
    if device == "cpu":
        return gm
    target = torch.device(device)

    def retarget(value: object) -> object:
        return target if isinstance(value, torch.device) else value

    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, retarget)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, retarget)
    return torch.fx.GraphModule(gm, graph)


def replay_subgraph(case: UnitCase, point: Point, device: str,
                    args: list[object] | None = None,
                    gm: torch.fx.GraphModule | None = None) -> Runnable:
    """Run the extracted subgraph (what the engine runs for this unit) on fresh inputs
    (or `gm`, the subgraph with some ops swapped for the engine's own implementation)."""
    args = materialise(case, point, device) if args is None else args
    values = realise(case.symbols, point)
    expected = [shape_at(label, values) for label in case.outputs]
    gm = on_device(case.subgraph if gm is None else gm, device)

    def fn() -> object:
        return gm(*args)

    def check() -> None:
        out = fn()
        outs = list(out) if isinstance(out, tuple | list) else [out]
        got = [list(t.shape) for t in outs if isinstance(t, torch.Tensor)]
        if got != expected:
            raise AssertionError(f"output shapes {got} != labels {expected}")
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and \
                    not torch.isfinite(t).all():
                raise AssertionError("non-finite output")

    return Runnable(fn, check)


def split_tokens(tokens: int, seqs: int) -> list[int]:
    """`tokens` new tokens split as evenly as possible over `seqs` sequences."""
    return [round((i + 1) * tokens / seqs) - round(i * tokens / seqs) for i in range(seqs)]


@register_lowering("kv_cache_write")
def _kv_cache_write(case: UnitCase, point: Point, device: str) -> Runnable:
    """The marker op alone: the engine writes the step's K/V inside its attention function,
    so that cost is timed with `paged_attention`. T new tokens split evenly over N sequences
    (`cu_seqlens_q`, the only int32 input, gets real offsets)."""
    n = point.get("N", 1)
    t = point.get("T", n)
    offsets = torch.tensor([0, *itertools.accumulate(split_tokens(t, n))], dtype=torch.int32,
                           device=device)
    args = [offsets if isinstance(a, torch.Tensor) and a.dtype == torch.int32 else a
            for a in materialise(case, point, device)]
    return replay_subgraph(case, point, device, args)


@register_lowering("paged_attention")
def _paged_attention(case: UnitCase, point: Point, device: str) -> Runnable:
    """One layer of the paged engine's attention, as the engine runs it (`paged.
    engine_attention`): N sequences, T new tokens split evenly, P cached tokens each, on a
    `PagedAttentionCache` built by transformers; checked against plain attention first.
    A sliding-window layer (the op's first scalar) runs the engine's rolling-buffer path.
    A point with `A` (a `costs.KEY_CLASSES` class) gives the first sequence up to 7 more
    cached tokens, so that the keys read, N·P + T, fall in that class."""
    from dooly_fx.costs import to_key_class
    from dooly_fx.paged import engine_attention

    values = realise(case.symbols, point)
    q, k = (shape_at(lab, values) for lab in case.inputs[:2])  # (T, H, D), (T, Hkv, D)
    n, t, cached = point.get("N", 1), point.get("T", point.get("N", 1)), point.get("P", 0)
    new = split_tokens(t, n)
    window, *_, impl = case.canonical["scalars"][-1]
    lengths = [cached] * n
    if "A" in point:
        lengths[0] += to_key_class(n * cached + t, point["A"])
    fn, reference = engine_attention(q[1], k[1], q[2], case.inputs[0].dtype, device, impl,
                                     new, lengths, window=window)

    def check() -> None:
        got = fn()
        if list(got.shape) != [1, t, q[1], q[2]]:
            raise AssertionError(f"paged attention output {list(got.shape)} != {[1, *q]}")
        torch.testing.assert_close(got.float(), reference(), rtol=0.05, atol=0.05)

    return Runnable(fn, check)


@register_lowering("shape_build")
def _shape_build(case: UnitCase, point: Point, device: str) -> Runnable:
    """The engine's attention call at T queries, a new key count every call (`paged.
    new_shape_attention`): its host time is the per-shape setup a step pays."""
    from dooly_fx.paged import new_shape_attention

    (dtype, (_, heads, head_dim)) = case.canonical["inputs"][0]
    tokens = point.get("T", 1)
    fn = new_shape_attention(heads, head_dim, getattr(torch, dtype), device, tokens)

    def check() -> None:
        got = fn()
        if list(got.shape) != [1, heads, tokens, head_dim] or not torch.isfinite(got).all():
            raise AssertionError(f"attention output {list(got.shape)} or non-finite")

    return Runnable(fn, check)


@register_lowering("engine_prepare")
def _engine_prepare(case: UnitCase, point: Point, device: str) -> Runnable:
    """The engine's batch preparation for N sequences, T new tokens split evenly, P cached
    tokens each (`paged.engine_prepare`)."""
    from dooly_fx.paged import engine_prepare

    n, t, cached = point.get("N", 1), point.get("T", point.get("N", 1)), point.get("P", 0)
    new = split_tokens(t, n)
    fn = engine_prepare(case.canonical, device, new, [cached] * n)

    def check() -> None:
        kwargs = fn()
        if list(kwargs["input_ids"].shape) != [1, t] or kwargs["cu_seq_lens_q"].tolist() != [
                sum(new[:i]) for i in range(n + 1)]:
            raise AssertionError(f"the engine prepared {kwargs['cu_seq_lens_q'].tolist()} "
                                 f"for {n} sequences of {new} new tokens")

    return Runnable(fn, check)


@register_lowering("forward_host")
def _forward_host(case: UnitCase, point: Point, device: str) -> Runnable:
    """The paged engine's whole forward over a decode step of N sequences on the model of
    the signature (`paged.engine_forward`); its host issue time is what the unit is for."""
    from dooly_fx.paged import engine_forward

    seqs = point.get("N", 1)
    fn, batch = engine_forward(case.canonical, device, seqs)

    def check() -> None:
        fn()
        batch.io.retrieve_device_outputs()
        ids = batch.io.output_ids[0, :seqs]
        vocab = case.canonical["config"]["vocab_size"]
        if not bool(((ids >= 0) & (ids < vocab)).all()):
            raise AssertionError(f"the engine sampled {ids.tolist()}, not token ids < {vocab}")

    # Only its host issue is used; 60 calls of a whole forward span seconds, over which the
    # host's speed moves between levels (docs/predict.md, "Host speed").
    return Runnable(fn, check, graphs=False, host_calls=60)


def moe_routing(tokens: int, top_k: int, experts: int, skew: float,
                device: str) -> torch.Tensor:
    """(tokens, top_k) expert ids: each token's k distinct experts drawn with popularity
    p_e ∝ (e + 1)^-skew; skew 0 is round-robin, every expert getting the same share."""
    if skew == 0:
        return (torch.arange(tokens * top_k, device=device) % experts).reshape(tokens, top_k)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0)
    weights = (torch.arange(experts, dtype=torch.float64) + 1) ** -skew
    ids = torch.multinomial(weights.expand(tokens, experts), top_k, replacement=False,
                            generator=generator)
    return ids.to(device)


@register_lowering("moe_experts")
def _moe_experts(case: UnitCase, point: Point, device: str) -> Runnable:
    """transformers' experts implementation (the op's `impl` argument) with synthesised
    routing at the point's skew (`moe_routing`), each choice weighted 1/k; checked against the
    op's reference semantics on the same inputs before timing.

    The routing ids are the op's int64 (T, k) input; E is the experts weight's first dim.
    """
    from dooly_fx.moe import run_engine_experts

    args = materialise(case, point, device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    experts = next(t.shape[0] for t in tensors if t.is_floating_point() and t.dim() == 3)
    routed: list[object] = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.dtype == torch.int64 and arg.dim() == 2:
            arg = moe_routing(arg.shape[0], arg.shape[1], experts, point.get("skew", 0.0),
                              device)
        elif isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dim() == 2 \
                and routed and isinstance(routed[-1], torch.Tensor) and \
                routed[-1].dtype == torch.int64 and arg.shape == routed[-1].shape:
            arg = torch.full_like(arg, 1.0 / arg.shape[1])
        routed.append(arg)
    engine_gm = copy.deepcopy(case.subgraph)
    for node in engine_gm.graph.nodes:
        if node.target is torch.ops.dooly.moe_experts.default:
            node.target = run_engine_experts
    engine_gm.recompile()
    runnable = replay_subgraph(case, point, device, routed, engine_gm)
    reference = on_device(case.subgraph, device)

    def check() -> None:
        runnable.check()
        got, want = runnable.fn(), reference(*routed)
        got, want = (x[0] if isinstance(x, tuple | list) else x for x in (got, want))
        torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05 * float(
            want.float().abs().max()) + 1e-3)

    return Runnable(runnable.fn, check)
