"""Stage 3: label every dimension of every node as config constant, request expression or mixed.

`taint(gm, symbols) -> TaintSummary` loops over `gm.graph.nodes` once (recursing into the
subgraphs of higher-order ops) and writes `node.meta["dooly.taint"]`: a tuple with one
`TensorLabel` per tensor output (None for non-tensor outputs), or a single `DimLabel` for SymInt
outputs such as `sym_size`.

    %linear : bf16[B, S, num_key_value_heads*head_dim]
        -> (Request(B), Request(S), Config(1024, "head_dim*num_key_value_heads"))

Provenance comes from the symbolic shapes themselves: config fields are symbols while tracing, so
a dimension's expression *is* the arithmetic that produced it. Integer literals in a graph whose
config was symbolic are code constants (`Config(2, "literal")`); in a graph captured elsewhere
(a plain `torch.export` or `torch.compile` graph) integers cannot be attributed and are labelled
`Config(v, "?")` and counted as unattributed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
from torch.utils._sympy.functions import FloorDiv

from dooly_fx.passes.partition import fetch_attr
from dooly_fx.symbols import SymbolTable, named

META_KEY = "dooly.taint"
LITERAL = "literal"
UNATTRIBUTED = "?"


@dataclass(frozen=True)
class Config:
    """A dimension fixed by the model: its value and the config field expression behind it."""

    value: int
    provenance: str

    def __str__(self) -> str:
        return str(self.value) if self.provenance in (LITERAL, UNATTRIBUTED) else self.provenance


@dataclass(frozen=True)
class Request:
    """A dimension set by the batch: a SymPy expression over request symbols (B, S, P, T, N)."""

    expr: sympy.Expr

    def __str__(self) -> str:
        return str(self.expr)


@dataclass(frozen=True)
class Mixed:
    """A dimension depending on both config fields and request symbols."""

    expr: sympy.Expr

    def __str__(self) -> str:
        return str(self.expr)


DimLabel = Config | Request | Mixed


@dataclass(frozen=True)
class TensorLabel:
    """Labels of one tensor value: dtype and one `DimLabel` per dimension."""

    dtype: torch.dtype
    dims: tuple[DimLabel, ...]

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}[{', '.join(str(d) for d in self.dims)}]"


@dataclass
class TaintSummary:
    """Counts over all labelled dimensions of a graph (subgraphs included)."""

    config: int = 0
    request: int = 0
    mixed: int = 0
    unattributed: int = 0
    """Config dims whose provenance cannot be known (graph captured without symbolic config)."""
    unlabelled: list[str] = field(default_factory=list)
    """'node: reason' for every value that could not be labelled (should stay empty)."""


class _Labeller:
    """Turns SymInts / ints into labels for one graph's symbol table (memoised per expression)."""

    def __init__(self, symbols: SymbolTable | None) -> None:
        self.symbols = symbols
        self.summary = TaintSummary()

    def dim(self, size: int | torch.SymInt) -> DimLabel:
        if isinstance(size, int):
            label: DimLabel = Config(size, LITERAL if self.symbols else UNATTRIBUTED)
        else:
            label = self._expr(size.node.expr)
        self._count(label)
        return label

    def _count(self, label: DimLabel) -> None:
        if isinstance(label, Config):
            self.summary.config += 1
            self.summary.unattributed += label.provenance == UNATTRIBUTED
        elif isinstance(label, Request):
            self.summary.request += 1
        else:
            self.summary.mixed += 1

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one labeller per pass run
    def _expr(self, expr: sympy.Expr) -> DimLabel:
        table = self.symbols
        if table is None:  # foreign graph: every free symbol is a dynamic (request) dimension
            return Request(expr) if expr.free_symbols else Config(int(expr), UNATTRIBUTED)
        expr = table.shape_env.replace(expr)
        if expr.is_number:
            return Config(int(expr), LITERAL)
        kind = table.kind_of(expr)
        named = _simplify(table.rename(expr), table)
        if kind == "config":
            return Config(table.value(expr), str(named))
        if kind == "request":
            return Request(named)
        return Mixed(named)


def _simplify(expr: sympy.Expr, table: SymbolTable) -> sympy.Expr:
    """Rewrite `a // b` over config fields as exact division for this model's values.

    `2*((head_dim + 1)//2)` becomes `head_dim` when head_dim is even; the identity holds for the
    model being labelled, which is what its labels describe.
    """
    values = {named(n): table.values[s] for s, n in table.names.items()}

    def floordiv(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
        if not (a.free_symbols | b.free_symbols) <= values.keys():
            return FloorDiv(a, b)
        va, vb = int(a.xreplace(values)), int(b.xreplace(values))
        return (a - va % vb) / b

    if not expr.has(FloorDiv):
        return expr
    return sympy.simplify(expr.replace(FloorDiv, floordiv))


def _tensor_label(value: torch.Tensor, labeller: _Labeller) -> TensorLabel:
    return TensorLabel(value.dtype, tuple(labeller.dim(s) for s in value.shape))


def _label_value(value: object, labeller: _Labeller) -> tuple | DimLabel | None:
    if isinstance(value, torch.Tensor):
        return (_tensor_label(value, labeller),)
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        return labeller.dim(value)
    if isinstance(value, (list, tuple)):
        return tuple(_tensor_label(v, labeller) if isinstance(v, torch.Tensor) else None
                     for v in value)
    return None


def _subgraphs(gm: torch.fx.GraphModule) -> Iterator[torch.fx.GraphModule]:
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            target = fetch_attr(gm, node.target)
            if isinstance(target, torch.fx.GraphModule):
                yield target


def taint(gm: torch.fx.GraphModule, symbols: SymbolTable | None = None) -> TaintSummary:
    """Label all node values of `gm` (and of its higher-order subgraphs) in `meta[META_KEY]`."""
    labeller = _Labeller(symbols)
    _taint_graph(gm, labeller)
    return labeller.summary


def _taint_graph(gm: torch.fx.GraphModule, labeller: _Labeller) -> None:
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is None:
            if node.op == "get_attr":
                value = fetch_attr(gm, node.target)
                if isinstance(value, torch.fx.GraphModule) or value is None:
                    continue
            elif not node.users:  # an effect (grad-mode switch, assert, guard): no value
                continue
            else:
                labeller.summary.unlabelled.append(f"{node.name}: no shape metadata")
                continue
        label = _label_value(value, labeller)
        if label is None and isinstance(value, (torch.Tensor, torch.SymInt)):
            labeller.summary.unlabelled.append(f"{node.name}: unsupported value")
        node.meta[META_KEY] = label
    for sub in _subgraphs(gm):
        _taint_graph(sub, labeller)

