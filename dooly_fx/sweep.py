"""Sweep grids: which request points each unit signature is profiled at. See docs/sweeps.md.

A point assigns a value to each request variable of a signature: `{"m": 512}` for token-wise
units (GEMMs, norms, ...), `{"B": 4, "S": 256}` for padded prefill attention, `{"B": 8, "P": 1024}`
for decode attention, and so on. Grids are per variable role, bounded by `Bounds`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import sympy

from dooly_fx.names import REQUEST_SYMBOLS, TOKEN_VAR

TOKEN_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536,
              2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
"""New tokens in a step (m, S, T)."""
SEQ_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Sequences in a step (B, N)."""
CONTEXT_GRID = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
"""Cached tokens per sequence (P)."""

FORWARD_HOST_SEQS = (1, 2, 4, 8)
"""Decode batch sizes at which a `forward_host` unit times the engine's forward: few
sequences, so that the host, not the GPU, sets the pace."""

MOE_SKEWS = (0.0, 1.0, 2.0)
"""Routing skews of MoE expert sweeps: the Zipf exponent of expert popularity (0 = uniform)."""

_ROLE = {TOKEN_VAR: "tokens", "S": "tokens", "T": "tokens", "B": "seqs", "N": "seqs",
         "P": "context"}
_IDENT = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class Bounds:
    """Caps on the sweep (users set them to what they will serve; CPU tests use small ones)."""

    max_tokens: int = 16384
    """New tokens in one step (m, B*S, T)."""
    max_seqs: int = 256
    """Sequences in one step (B, N)."""
    max_context: int = 32768
    """Tokens of one sequence, cached plus new (P + S)."""
    adaptive: bool = False
    """Sweep one-variable signatures adaptively (`sweep_points`): every other grid value,
    then the skipped ones only where the latency curve bends."""

    def grid(self, var: str) -> list[int]:
        role = _ROLE[var]
        if role == "tokens":
            return [v for v in TOKEN_GRID if v <= self.max_tokens]
        if role == "seqs":
            return [v for v in SEQ_GRID if v <= self.max_seqs]
        return [v for v in CONTEXT_GRID if v < self.max_context]


def request_vars(canonical: dict) -> list[str]:
    """Request variables appearing in a signature's canonical dims, in a fixed order."""
    found: set[str] = set()
    for _, dims in [*canonical.get("inputs", []), *canonical.get("outputs", [])]:
        for dim in dims:
            if isinstance(dim, str):
                found.update(n for n in _IDENT.findall(dim)
                             if n == TOKEN_VAR or n in REQUEST_SYMBOLS)
    order = [TOKEN_VAR, *REQUEST_SYMBOLS]
    return [v for v in order if v in found]


def _feasible(point: dict[str, int], bounds: Bounds) -> bool:
    b = point.get("B", 1)
    if b * point.get("S", 1) > bounds.max_tokens:
        return False
    if point.get("S", 0) + point.get("P", 0) > bounds.max_context:
        return False
    if point.get("N", 1) > point.get("T", point.get("N", 1)):
        return False  # every sequence brings at least one new token
    # Keep the KV read of one step within what max_seqs sequences of max_context would hold.
    return b * (point.get("P", 0) + point.get("S", 1)) <= bounds.max_seqs * bounds.max_context


def _thin(grid: list[int], step: int) -> list[int]:
    """Every `step`-th value of a grid, its last (the bound) always kept: a fit should
    interpolate up to the bound, not extrapolate to it."""
    kept = grid[::step]
    return kept if kept[-1] == grid[-1] else [*kept, grid[-1]]


def points(canonical: dict, bounds: Bounds) -> list[dict[str, int]]:
    """The sweep points of one signature: the grid product of its variables within bounds."""
    names = request_vars(canonical)
    if not names:
        return [{}]
    grids: list[list] = [bounds.grid(v) for v in names]
    if len(names) >= 3:  # keep 3-variable sweeps (mixed batches) to a few hundred points
        grids = [_thin(g, 2) if len(g) > 6 else g for g in grids]
    if canonical.get("kind") == "shape_build":  # a setup cost, nearly flat in T
        grids = [_thin(g, 4) for g in grids]
    if canonical.get("kind") == "forward_host":  # host-bound steps only (`paged.engine_forward`)
        grids = [[v for v in g if v in FORWARD_HOST_SEQS] for g in grids]
    if canonical.get("kind") == "moe_experts":  # routing is a value: its skew is swept too
        names, grids = [*names, "skew"], [*grids, list(MOE_SKEWS)]
    out = [dict(zip(names, values, strict=True)) for values in itertools.product(*grids)]
    out += _key_class_points(canonical, names, grids)
    return [p for p in out if _feasible(p, bounds)]


def spread(grid: Sequence, fractions: tuple[float, ...]) -> list:
    """The values of `grid` (in its order) at `fractions` of the way from its first to its
    last, each once."""
    picked = {min(len(grid) - 1, round(f * (len(grid) - 1))) for f in fractions if grid}
    return [grid[i] for i in sorted(picked)]


def _key_class_points(canonical: dict, names: list[str], grids: list[list]) -> list[dict]:
    """Paged attention over a cache (P swept, no sliding window) reads N·P + T keys, a
    multiple of 8 at nearly every grid point; real steps read any count, and odd or unaligned
    counts run slower kernels (`costs.KEY_CLASSES`). So a few grid points are measured again
    in every key class (`A`): the query count (T, or N in a decode step) at three spread grid
    values, P at two, N (beside T) at one."""
    from dooly_fx.costs import KEY_CLASSES

    if canonical.get("kind") != "paged_attention" or "P" not in names or \
            canonical["scalars"][-1][0]:
        return []
    queries = "T" if "T" in names else "N"
    picks = {"N": (1 / 2,), "P": (1 / 4, 3 / 4), queries: (1 / 6, 1 / 2, 5 / 6)}
    chosen = [spread(g, picks[n]) for n, g in zip(names, grids, strict=True)]
    return [{**dict(zip(names, values, strict=True)), "A": cls}
            for values in itertools.product(*chosen) for cls in KEY_CLASSES]


BEND = 0.05
"""Adaptive sweeps: a measured point off the log-log line through its measured neighbours by
more than this fraction is a bend, and the grid values skipped beside it are measured."""


def sweep_points(canonical: dict, bounds: Bounds,
                 measured: dict[int, float] | None = None) -> list[dict[str, int]]:
    """The points to profile for one signature: `points`, or with `bounds.adaptive` and one
    request variable (no MoE skew), every other grid value (both ends kept) plus, for each
    bend among the points `measured` so far (the variable's value -> median ms), the values
    skipped on either side of it. Measure these, then ask again: the set only grows, never
    past the full grid, and stops growing where the curve is straight."""
    full = points(canonical, bounds)
    names = request_vars(canonical)
    if not bounds.adaptive or len(names) != 1 or len(full) < 5 or \
            canonical.get("kind") == "moe_experts":
        return full
    (var,) = names
    grid = sorted(p[var] for p in full)
    chosen = {*grid[::2], grid[-1]}
    measured = measured or {}
    known = [g for g in grid if g in chosen and measured.get(g, 0) > 0]
    log = {g: (math.log(g), math.log(measured[g])) for g in known}
    for a, b, c in zip(known, known[1:], known[2:], strict=False):
        (xa, ya), (xb, yb), (xc, yc) = log[a], log[b], log[c]
        if abs(yb - (ya + (yc - ya) * (xb - xa) / (xc - xa))) > math.log1p(BEND):
            chosen.update(g for g in grid if a < g < c)
    return [p for p in full if p[var] in chosen]


def realise(unit_symbols: list[str], point: dict[str, int]) -> dict[sympy.Symbol, int]:
    """Values for a unit's own request symbols (names) at a sweep point.

    The token variable `m` of a token-wise point goes to the unit's token symbol (S, T, or B/N
    in decode) and every other symbol of the token product is 1: a GEMM sees `B*S` rows either
    way. Symbols the signature does not depend on (a tensor read only for one dimension of its
    shape) are 1 as well.
    """
    from dooly_fx.symbols import named  # capture-side machinery: torch

    values = {named(k): v for k, v in point.items() if k in REQUEST_SYMBOLS}
    if TOKEN_VAR in point:
        names = list(unit_symbols)
        target = next((n for n in ("S", "T", "N", "B") if n in names), None)
        for n in names:
            values[named(n)] = point[TOKEN_VAR] if n == target else 1
    for n in unit_symbols:
        values.setdefault(named(n), 1)
    return values
