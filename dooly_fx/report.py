"""The shape report: capture -> taint -> partition -> signature, per phase and per model.

`analyze_graph(gm, symbols)` is the library entry point for any `torch.fx.GraphModule` with
symbolic shapes (from our capture, `torch.export`, or a `torch.compile` backend); `analyze_model`
runs the whole front end for one model spec.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx

from dooly_fx.capture import Capture, LayerPlan, capture, layer_plan
from dooly_fx.engine import EngineProfile
from dooly_fx.passes.partition import OpUnit, partition, unit_inputs
from dooly_fx.passes.signature import Signature, signature
from dooly_fx.passes.taint import (
    LITERAL,
    UNATTRIBUTED,
    Config,
    Mixed,
    Request,
    TaintSummary,
    TensorLabel,
    taint,
)
from dooly_fx.passes.taint import META_KEY as TAINT_KEY
from dooly_fx.spec import ModelSpec
from dooly_fx.symbols import SymbolTable


@dataclass
class UnitRow:
    """All instances of one unit role with one signature in one phase."""

    signature: Signature
    kind: str
    role: str
    count: int
    modules: list[str]
    inputs: list[str]
    """Input tensors with labelled dims, e.g. 'bfloat16[B, S, hidden_size]'."""
    config_dims: dict[str, int]
    """Provenance -> value for every config-field dim the unit touches."""
    request_dims: list[str]
    """Distinct request (and mixed) dim expressions the unit touches."""

    def to_json(self) -> dict:
        return {
            "signature": self.signature.key, "kind": self.kind, "role": self.role,
            "count": self.count, "modules": self.modules, "inputs": self.inputs,
            "config_dims": self.config_dims, "request_dims": self.request_dims,
            "canonical": self.signature.data,
        }


@dataclass
class GraphReport:
    """Labelled units of one graph and the taint counts behind them."""

    units: list[UnitRow]
    taint: TaintSummary

    @property
    def signatures(self) -> set[str]:
        return {u.signature.key for u in self.units}


@dataclass
class PhaseReport:
    phase: str
    regime: str
    graph: GraphReport
    capture_seconds: float
    analysis_seconds: float
    specialised_fields: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "phase": self.phase, "regime": self.regime,
            "units": [u.to_json() for u in self.graph.units],
            "unlabelled_dims": len(self.graph.taint.unlabelled),
            "capture_seconds": round(self.capture_seconds, 4),
            "analysis_seconds": round(self.analysis_seconds, 4),
        }


@dataclass
class ModelReport:
    model: str
    engine: EngineProfile
    plan: LayerPlan
    phases: list[PhaseReport] = field(default_factory=list)

    @property
    def signatures(self) -> set[str]:
        return set().union(*(p.graph.signatures for p in self.phases)) if self.phases else set()

    def summary(self) -> dict:
        taints = [p.graph.taint for p in self.phases]
        return {
            "units": sum(len(p.graph.units) for p in self.phases),
            "unit_instances": sum(u.count for p in self.phases for u in p.graph.units),
            "unique_signatures": len(self.signatures),
            "config_dims": sum(t.config for t in taints),
            "request_dims": sum(t.request for t in taints),
            "mixed_dims": sum(t.mixed for t in taints),
            "unattributed_dims": sum(t.unattributed for t in taints),
            "unlabelled_dims": sum(len(t.unlabelled) for t in taints),
            "unlabelled": [u for t in taints for u in t.unlabelled],
            "specialised_fields": sorted({f for p in self.phases for f in p.specialised_fields}),
            "built_layers": self.plan.built_layers,
            "total_layers": self.plan.total_layers,
            "capture_seconds": round(sum(p.capture_seconds + p.analysis_seconds
                                         for p in self.phases), 4),
        }

    def to_json(self) -> dict:
        return {
            "model": self.model, "engine": self.engine.label,
            "phases": [p.to_json() for p in self.phases], "summary": self.summary(),
        }


def _tensor_labels(node: torch.fx.Node) -> list[TensorLabel]:
    labels = node.meta.get(TAINT_KEY)
    return [x for x in labels if isinstance(x, TensorLabel)] if isinstance(labels, tuple) else []


def _labels(unit: OpUnit) -> tuple[list[str], dict[str, int], list[str]]:
    """Labelled input tensors, config dims (provenance -> value) and request dims of a unit."""
    inputs = [str(lab) for n in unit_inputs(unit) for lab in _tensor_labels(n)]
    config: dict[str, int] = {}
    request: list[str] = []
    for node in [*unit_inputs(unit), *unit.nodes]:
        for label in _tensor_labels(node):
            for dim in label.dims:
                if isinstance(dim, Config) and dim.provenance not in (LITERAL, UNATTRIBUTED):
                    config[dim.provenance] = dim.value
                elif isinstance(dim, Request | Mixed) and str(dim) not in request:
                    request.append(str(dim))
    return inputs, config, request


def analyze_graph(
    gm: torch.fx.GraphModule,
    symbols: SymbolTable | None = None,
    plan: LayerPlan | None = None,
) -> GraphReport:
    """Taint, partition and sign `gm`; count units (scaled by `plan` for period captures).

    Works on any GraphModule whose `node.meta["val"]` holds (fake) tensors with symbolic shapes.
    Without a `SymbolTable`, free symbols count as request dims and integers as unattributed
    config dims.
    """
    summary = taint(gm, symbols)
    rows: dict[tuple[str, str], UnitRow] = {}
    for unit in partition(gm):
        sig = signature(unit)
        count = plan.count(unit.layer) if plan is not None else 1
        key = (unit.role, sig.key)
        if key in rows:
            rows[key].count += count
            rows[key].modules.append(unit.module)
            continue
        inputs, config, request = _labels(unit)
        rows[key] = UnitRow(sig, unit.kind, unit.role, count, [unit.module], inputs, config,
                            request)
    return GraphReport([r for r in rows.values() if r.count > 0], summary)


def analyze_capture(cap: Capture) -> PhaseReport:
    start = time.perf_counter()
    graph = analyze_graph(cap.gm, cap.symbols, cap.plan)
    return PhaseReport(cap.phase, cap.regime, graph, cap.seconds, time.perf_counter() - start,
                       cap.specialised_fields)


def analyze_model(
    spec: ModelSpec,
    engine: EngineProfile,
    phases: Sequence[str],
    full_depth: bool = False,
    on_phase: Callable[[], None] | None = None,
) -> ModelReport:
    """Capture and analyse every phase (and sliding-window regime) of one model."""
    report = ModelReport(spec.name, engine, layer_plan(spec.config, full_depth))
    for phase in phases:
        for cap in capture(spec, engine, phase, full_depth):
            report.phases.append(analyze_capture(cap))
        if on_phase is not None:
            on_phase()
    return report


def shared_signatures(reports: Sequence[ModelReport]) -> list[dict]:
    """Signatures present in more than one model: key, kind, example role and the models."""
    owners: dict[str, dict] = {}
    for rep in reports:
        for phase in rep.phases:
            for row in phase.graph.units:
                entry = owners.setdefault(row.signature.key, {
                    "signature": row.signature.key, "kind": row.kind, "role": row.role,
                    "config_dims": row.config_dims, "models": []})
                if rep.model not in entry["models"]:
                    entry["models"].append(rep.model)
    return sorted((e for e in owners.values() if len(e["models"]) > 1),
                  key=lambda e: (-len(e["models"]), e["kind"], e["role"]))
