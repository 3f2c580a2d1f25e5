"""Stage 5: a canonical, model-name-free signature per op unit; its SHA-256 is the DB key.

`signature(unit) -> Signature` reads the labels written by `taint` (`meta["dooly.taint"]`). The
canonical form holds what decides a unit's latency and nothing else:

* kind, ops in order, and the int/bool/str arguments of the ops (floats such as eps, scale or
  rope theta are dropped; window sizes, causality and softcap *ops* stay);
* input and output tensors as dtype + dims, config dims as plain values (provenance differs
  between models that share a kernel and must not split them);
* request dims: for token-wise kinds (GEMMs, norms, activations, residual adds, rotary,
  embedding) every request dim collapses into one token variable `m`, so the same GEMM keys the
  same in the padded `[B, S, K]` and the flattened `[1, T, K]` layout; for attention, cache and
  mask units the request expressions over (B, S, P, T, N) are kept as they are.

    q_proj of Llama-3.1-8B:  {"kind": "gemm", "inputs": [["bfloat16", ["m", 4096]],
                              ["bfloat16", [4096, 4096]]], "ops": ["linear"], ...}  -> 3f2a...
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import sympy
import torch
import torch.fx

from dooly_fx.names import TOKEN_VAR
from dooly_fx.passes.partition import OpUnit, kernel_ops, unit_inputs, unit_outputs
from dooly_fx.passes.taint import META_KEY as TAINT_KEY
from dooly_fx.passes.taint import Config, Mixed, Request, TensorLabel

TOKENWISE = {"gemm", "lm_head", "norm", "act", "act_mul", "residual", "rotary", "embedding",
             "router", "moe_experts", "elementwise", "gather"}


@dataclass(frozen=True)
class Signature:
    """Canonical JSON of a unit and its SHA-256 hex digest."""

    key: str
    canonical: str

    @property
    def data(self) -> dict:
        return json.loads(self.canonical)


def _dims(label: TensorLabel, tokenwise: bool) -> list:
    dims: list = []
    for dim in label.dims:
        if isinstance(dim, Config):
            if not (tokenwise and dim.value == 1):
                dims.append(dim.value)
        elif tokenwise:
            if TOKEN_VAR not in dims:
                dims.append(TOKEN_VAR)
        else:
            dims.append(str(dim))
    return dims


def _tensor(node: torch.fx.Node, tokenwise: bool) -> list | None:
    """[dtype, dims] of a tensor value, or ["symint", [dim]] of a SymInt (an `arange(S)` bound)."""
    labels = node.meta.get(TAINT_KEY)
    if isinstance(labels, Config | Request | Mixed):
        return ["symint", _dims(TensorLabel(torch.int64, (labels,)), tokenwise)]
    if not isinstance(labels, tuple) or not labels or not isinstance(labels[0], TensorLabel):
        return None
    label = labels[0]
    return [str(label.dtype).removeprefix("torch."), _dims(label, tokenwise)]


def _scalars(node: torch.fx.Node) -> list:
    out: list = []
    for arg in [*node.args, *node.kwargs.values()]:
        if isinstance(arg, bool | str) or (isinstance(arg, int) and not isinstance(arg, bool)):
            out.append(arg)
        elif isinstance(arg, torch.dtype):
            out.append(str(arg).removeprefix("torch."))
    return out


def _token_products(nodes: list[torch.fx.Node]) -> dict[str, sympy.Expr]:
    """Distinct products of request dims over the tensors of `nodes` (text -> expression)."""
    products = {}
    for node in nodes:
        labels = node.meta.get(TAINT_KEY)
        if isinstance(labels, tuple) and labels and isinstance(labels[0], TensorLabel):
            request = [d.expr for d in labels[0].dims if not isinstance(d, Config)]
            if request:
                product = sympy.Mul(*request)
                products[str(product)] = product
    return products


def _is_token_count(expr: sympy.Expr) -> bool:
    """A product of distinct request symbols (`B*S`, `T`, `N`): a count of tokens or rows.
    A mask over `B*S**2` or `B*(P + S)` elements is not: sweeping it as tokens would leave
    every real step far outside the profiled range."""
    powers = expr.as_powers_dict()
    return all(isinstance(base, sympy.Symbol) and exp == 1 for base, exp in powers.items())


def _tokenwise(unit: OpUnit) -> bool:
    """Collapse to one token variable only if every tensor sees the same token count (a gather
    of N rows out of T tokens keeps both)."""
    if unit.kind not in TOKENWISE:
        return False
    products = _token_products([*unit_inputs(unit), *unit_outputs(unit)])
    return len(products) <= 1 and all(_is_token_count(e) for e in products.values())


def binding(unit: OpUnit) -> dict[str, str]:
    """What the token variable stands for in this unit: `{"m": "B*S"}` for a GEMM over every
    token, `{"m": "B"}` for an LM head that sees one token per sequence; `{}` when the
    signature keeps its request expressions (or has none). Predicting a step needs it."""
    if not _tokenwise(unit):
        return {}
    products = _token_products([*unit_inputs(unit), *unit_outputs(unit)])
    return {TOKEN_VAR: next(iter(products))} if products else {}


def canonical(unit: OpUnit) -> dict:
    """The signature's content as a dict (see module docstring)."""
    tokenwise = _tokenwise(unit)
    inputs = [d for d in (_tensor(n, tokenwise) for n in unit_inputs(unit)) if d is not None]
    outputs = [d for d in (_tensor(n, tokenwise) for n in unit_outputs(unit)) if d is not None]
    # A SymInt input only says something when its symbols appear in no tensor of the unit (the
    # bound of an `arange(S)`); otherwise whether the tracer reused a `sym_size` from an earlier
    # layer would split identical layers into two signatures.
    seen = {str(d) for desc in [*inputs, *outputs] if desc[0] != "symint" for d in desc[1]}
    inputs = [d for d in inputs if d[0] != "symint"
              or any(isinstance(x, str) and x not in seen for x in d[1])]
    compute = unit.compute_nodes
    return {
        "kind": unit.kind,
        "ops": [name for n in compute for name in kernel_ops(n)],
        "scalars": [_scalars(n) for n in compute],
        "inputs": inputs,
        "outputs": outputs,
    }


def signature(unit: OpUnit) -> Signature:
    """The unit's signature: canonical JSON (sorted keys) and its SHA-256."""
    return signature_of(canonical(unit))


def signature_of(data: dict) -> Signature:
    """The signature of canonical content `data`: its JSON (sorted keys) and SHA-256."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return Signature(hashlib.sha256(text.encode()).hexdigest(), text)
