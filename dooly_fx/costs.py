"""FLOPs and bytes of one call of a unit, from its canonical signature and a sweep point.

They are the roofline features of the latency fits and the estimates of `plan`. Everything is
read from the signature's canonical JSON (kind, input/output dtypes and dims), so a DB alone,
with no captured graph, is enough. One small formula per kind, registered by decorator:

    cost({"kind": "gemm", "inputs": [["bfloat16", ["m", 4096]], ["bfloat16", [1024, 4096]]],
          "outputs": [["bfloat16", ["m", 1024]]]}, {"m": 8})
    -> (2·8·1024·4096 FLOPs, bytes of x, W and the output once)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache

import sympy

from dooly_fx.registry import registrar

Point = dict[str, float]
Tensor = tuple[str, list[int]]
"""(dtype name, concrete shape)."""
CostFn = Callable[[list[Tensor], list[Tensor], dict, Point], float]
FLOPS: dict[str, CostFn] = {}


register_flops = registrar(FLOPS, "FLOP formula")
"""`@register_flops(kind, ...)`: the FLOP formula of unit kinds."""

EXTRA_BYTES: dict[str, CostFn] = {}
register_extra_bytes = registrar(EXTRA_BYTES, "extra bytes formula")
"""`@register_extra_bytes(kind, ...)`: bytes a unit kind moves beyond its input and output
tensors (memory it reads that is not an argument, e.g. a KV cache)."""


SCHEDULES: dict[str, Callable[[list[Tensor], dict, Point, int], float]] = {}
register_schedule = registrar(SCHEDULES, "schedule formula")
"""`@register_schedule(kind, ...)`: for a unit kind whose kernel runs in whole waves of
thread blocks, the factor by which its launch grid, rounded up to whole waves over the
device's `sms` multiprocessors, exceeds the work it has (>= 1)."""


_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max,
              "Min": sympy.Min, "Mod": sympy.Mod}


@cache
def _dim_fn(text: str) -> tuple[Callable[..., float], tuple[str, ...]]:
    symbols = {n: sympy.Symbol(n) for n in re.findall(r"[A-Za-z_]\w*", text)
               if n not in _FUNCTIONS}
    expr = sympy.sympify(text, locals={**symbols, **_FUNCTIONS})  # `S` is a symbol here
    names = tuple(sorted(str(s) for s in expr.free_symbols))
    return sympy.lambdify(names, expr, modules="math"), names


def dim_value(dim: int | str, point: Point) -> int:
    """A canonical dim at a point: an int as it is, an expression (`"P + 1"`) evaluated with
    the point's variables (a variable the point does not give is 1)."""
    if isinstance(dim, int):
        return dim
    fn, names = _dim_fn(dim)
    return int(fn(*(point.get(n, 1) for n in names)))


ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "complex64": 8}


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype named as in a signature (`bfloat16`)."""
    if dtype in ITEMSIZE:
        return ITEMSIZE[dtype]
    import torch  # a dtype outside the table

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def tensors(descs: list, point: Point) -> list[Tensor]:
    """Concrete (dtype, shape) of canonical tensor descriptions (SymInt entries dropped)."""
    return [(dtype, [dim_value(d, point) for d in dims]) for dtype, dims in descs
            if dtype != "symint"]


def cost(canonical: dict, point: Point, sms: int | None = None) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of the unit at `point`; bytes count every input and output
    tensor once (what a roofline-bound kernel must move). Given the device's multiprocessor
    count `sms`, a kind with a schedule formula counts the FLOPs its launch grid occupies the
    device for, whole waves of thread blocks (`SCHEDULES`)."""
    ins, outs = tensors(canonical.get("inputs", []), point), \
        tensors(canonical.get("outputs", []), point)
    moved = sum(math.prod(shape) * itemsize(dtype) for dtype, shape in [*ins, *outs])
    kind = canonical.get("kind", "")
    if kind in EXTRA_BYTES:
        moved += EXTRA_BYTES[kind](ins, outs, canonical, point)
    flops = FLOPS.get(kind, _elementwise)(ins, outs, canonical, point)
    if sms and kind in SCHEDULES:
        flops *= SCHEDULES[kind](ins, canonical, point, sms)
    return float(flops), float(moved)


def _elementwise(ins: list[Tensor], outs: list[Tensor], canonical: dict, point: Point) -> float:
    """One FLOP per output element per op."""
    return sum(math.prod(s) for _, s in outs) * max(1, len(canonical.get("ops", [])))


@register_flops("gemm", "lm_head")
def _gemm(ins: list[Tensor], outs: list[Tensor], canonical: dict, point: Point) -> float:
    """2·M·N·K for `x (M, K) @ W (N, K)^T`, W the input whose dims are all config values."""
    weight = next((dims for dtype, dims in canonical.get("inputs", [])
                   if len(dims) == 2 and all(isinstance(d, int) for d in dims)), None)
    if weight is None or not outs:
        return _elementwise(ins, outs, canonical, point)
    n, k = weight
    m = math.prod(outs[0][1]) // n
    return 2.0 * m * n * k


@register_flops("attention")
def _attention(ins: list[Tensor], outs: list[Tensor], canonical: dict, point: Point) -> float:
    """4·|q|·(P + S) (QK^T and PV over every query element and the P + S keys of its own
    sequence): |q| = tokens·heads·head_dim of the first input (the query, however laid out);
    causal masking is a constant factor the fit absorbs."""
    return 4.0 * math.prod(ins[0][1]) * (point.get("P", 0) + point.get("S", 1)) if ins else 0.0


def step_keys(point: Point) -> int:
    """Keys one flattened (`paged_attention`) call reads: N·P cached plus T new (T = N in a
    decode step)."""
    return int(point.get("N", 1) * point.get("P", 0) + point.get("T", point.get("N", 1)))


KEY_CLASSES = (8, 2, 1)
"""Classes of the key count K one paged attention call reads: a multiple of 8 (8), even but
not a multiple of 8 (2), odd (1). `paged|eager` writes the (T, K) scores of a step as a new
tensor with rows K long; rows that are not 16 bytes aligned make cuBLAS and the softmax take
slower kernels: on an H100, odd K costs 1.5-2.9x and other unaligned K 1.07-1.45x the aligned
time (`bench/results/key_alignment.md`; `paged|sdpa`, whose mask rows keep the engine's
buffer stride, shows none). A sweep grid of round numbers has aligned K at nearly every
point, a serving engine's steps any K, so the profile also measures some points in each class
(`sweep.points`) and the fit carries the ratio (`fit.fit_key_classes`)."""


def key_class(keys: int) -> int:
    """The class (`KEY_CLASSES`) of a key count."""
    return 8 if keys % 8 == 0 else 2 if keys % 2 == 0 else 1


def to_key_class(keys: int, cls: int) -> int:
    """The fewest extra keys (0-7) that put `keys` in class `cls`."""
    if cls not in KEY_CLASSES:
        raise ValueError(f"key class {cls!r}: expected one of {KEY_CLASSES}")
    return next(d for d in range(8) if key_class(keys + d) == cls)


@register_flops("paged_attention")
def _paged_attention(ins: list[Tensor], outs: list[Tensor], canonical: dict,
                     point: Point) -> float:
    """4·|q|·(N·P + T): transformers' paged sdpa and eager attention score all T queries of
    the step against all of its keys in one call, the mask removing other sequences' keys only
    after the work is done."""
    return 4.0 * math.prod(ins[0][1]) * step_keys(point) if ins else 0.0


ATTENTION_QUERY_TILE = 128
"""Query rows per thread block of the fused attention kernel `paged|sdpa` reaches on the GPU
(cuDNN's flash forward on Hopper, head dims 64 and 128)."""


def scheduled_queries(tokens: int, heads: int, sms: int,
                      tile: int = ATTENTION_QUERY_TILE) -> float:
    """The query rows a fused attention call over `tokens` queries and `heads` heads occupies
    the device for: one thread block per (tile of queries, head), run in whole waves of `sms`
    blocks, so every wave costs as much as `sms · tile / heads` rows. On an H100 (132 SMs)
    with 32 heads, 512 queries fill one wave and 544 two, which cost as much as 1024; the
    measured latency steps where the waves do (`bench/results/attention_waves.md`)."""
    waves = math.ceil(math.ceil(tokens / tile) * heads / sms)
    return waves * sms * tile / heads


@register_schedule("paged_attention")
def _paged_attention_schedule(ins: list[Tensor], canonical: dict, point: Point,
                              sms: int) -> float:
    """`paged|sdpa` runs one fused kernel over the step's T queries (`scheduled_queries`);
    `paged|eager`'s matmuls and softmax have no such schedule here (factor 1)."""
    if not ins or canonical.get("scalars", [[]])[-1][-1:] != ["sdpa"]:
        return 1.0
    tokens, heads, _ = ins[0][1]
    return scheduled_queries(tokens, heads, sms) / max(tokens, 1)


@register_extra_bytes("paged_attention")
def _paged_attention_bytes(ins: list[Tensor], outs: list[Tensor], canonical: dict,
                           point: Point) -> float:
    """The step's K and V read from the paged cache (kv-heads wide), written again with every
    query head (`repeat_kv`, contiguous) and read by the kernel, and the (T, keys) mask."""
    if len(ins) < 2:
        return 0.0
    (dtype, (tokens, heads, dim)), (_, (_, kv_heads, _)) = ins[0], ins[1]
    keys = step_keys(point)
    return itemsize(dtype) * keys * (2 * kv_heads * dim + 4 * heads * dim + tokens)


@register_flops("moe_experts")
def _moe(ins: list[Tensor], outs: list[Tensor], canonical: dict, point: Point) -> float:
    """2·T·k·(|up| + |down|)/E: each token runs its k experts' up and down projections."""
    experts = [s for d, s in ins if len(s) == 3 and d != "int64"]
    routes = next((s for d, s in ins if d == "int64" and len(s) == 2), None)
    if len(experts) < 2 or routes is None:
        return _elementwise(ins, outs, canonical, point)
    tokens, k = routes
    per_expert = sum(math.prod(s[1:]) for s in experts[:2])
    return 2.0 * tokens * k * per_expert
