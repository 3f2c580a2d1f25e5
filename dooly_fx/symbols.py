"""Named symbols: request dimensions (set by the batch) and config fields (set by the model).

Every dimension in a captured graph is a SymPy expression over these symbols or a plain integer
literal. The table below is the single definition of the request symbols; `docs/request_symbols.md`
is its prose version.

| symbol | layout    | meaning                                                        |
|--------|-----------|----------------------------------------------------------------|
| B      | padded    | sequences in the batch (`input_ids` is `[B, S]`)               |
| S      | padded    | new tokens per sequence in this step (1 in decode)             |
| P      | padded    | cached tokens per sequence before this step (0 in prefill)     |
| T      | flattened | new tokens in the step over all sequences, `T = sum(q_i)`      |
| N      | flattened | sequences in the step                                          |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

# Example sizes used while tracing. Guards are evaluated against them, so they must be >= 2
# (0 and 1 specialise) and distinct from each other; they never reach a label or a signature.
REQUEST_HINTS: dict[str, int] = {"B": 3, "S": 17, "P": 29, "T": 37, "N": 5}


def named(name: str) -> sympy.Symbol:
    """The SymPy symbol that stands for request symbol or config field `name` in labels."""
    return sympy.Symbol(name, integer=True, positive=True)


class ProvenanceShapeEnv(ShapeEnv):
    """A ShapeEnv that never substitutes one config field for another.

    When model code tests `num_key_value_heads == num_attention_heads` (true in MHA models),
    a plain ShapeEnv records the replacement kv -> heads and rewrites every later shape with it,
    so k_proj would claim `num_attention_heads` as its provenance. Here such a fact stays a
    guard (still checked, against the example values) and expressions keep their own symbols.
    """

    config_symbols: set[sympy.Symbol]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_symbols = set()

    def _set_replacement(self, a: sympy.Symbol, tgt: sympy.Expr, msg: str) -> None:
        if a in self.config_symbols and not tgt.is_number:
            return
        super()._set_replacement(a, tgt, msg)


@dataclass
class SymbolTable:
    """Maps the SymPy symbols of one capture to their names and kinds.

    `config` symbols stand for integer config fields (`hidden_size`, ...); `request` symbols for
    the request dimensions above. Both live in one ShapeEnv, so every shape the tracer computes is
    an exact expression over them.
    """

    shape_env: ProvenanceShapeEnv = field(
        default_factory=lambda: ProvenanceShapeEnv(duck_shape=False, specialize_zero_one=False)
    )
    names: dict[sympy.Symbol, str] = field(default_factory=dict)
    kinds: dict[sympy.Symbol, str] = field(default_factory=dict)
    values: dict[sympy.Symbol, int] = field(default_factory=dict)

    def new(self, name: str, value: int, kind: str) -> torch.SymInt:
        """Create a backed SymInt named `name` with example value `value`."""
        source = ConstantSource(f"{kind}:{name}")
        sym = self.shape_env.create_symbol(value, source, dynamic_dim=DimDynamic.DYNAMIC)
        if not isinstance(sym, sympy.Symbol):
            raise AssertionError(f"{name} was specialised to {sym} at creation")
        self.names[sym] = name
        self.kinds[sym] = kind
        if kind == "config":
            self.shape_env.config_symbols.add(sym)
        self.values[sym] = value
        return self.shape_env.create_symintnode(sym, hint=value, source=source)

    def request(self, name: str) -> torch.SymInt:
        """A request symbol from `names.REQUEST_SYMBOLS`."""
        return self.new(name, REQUEST_HINTS[name], "request")

    def rename(self, expr: sympy.Expr) -> sympy.Expr:
        """`expr` with hashed tracer symbols (`s72`) replaced by their names (`hidden_size`)."""
        expr = self.shape_env.replace(expr)
        subs = {s: named(self.names[s]) for s in expr.free_symbols if s in self.names}
        return expr.xreplace(subs)

    def kind_of(self, expr: sympy.Expr) -> str:
        """'config', 'request', 'mixed' or 'unknown' for a (non-constant) expression."""
        expr = self.shape_env.replace(expr)
        kinds = {self.kinds.get(s, "unknown") for s in expr.free_symbols}
        if kinds == {"config"}:
            return "config"
        if kinds == {"request"}:
            return "request"
        if "unknown" in kinds:
            return "unknown"
        return "mixed"

    def value(self, expr: sympy.Expr) -> int:
        """The integer value of a config-only expression for this model."""
        expr = self.shape_env.replace(expr)
        return int(expr.xreplace({s: sympy.Integer(v) for s, v in self.values.items()}))
