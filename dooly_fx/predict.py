"""Stages 9–10 glue: fit every profiled unit of a DB, load a model's units, predict a step.

    fit_db(db, env) -> FitSummary             fit what is stale or missing (idempotent)
    load(db, model, env, engine) -> Loaded    a model's units and their fitted latencies
    predict_step(loaded, batch) -> Step       Σ count × unit latency at the batch's point

A batch is a list of (new tokens, cached tokens) per sequence. The padded engine runs it as
`input_ids[B, S]` over a cache of P tokens per sequence: B = len(batch), S = max new,
P = max cached (shorter sequences are padded). The flattened engine sees T = Σ new tokens over
N sequences. Each unit's point comes from these values; a token-wise unit's `m` from its
recorded binding (`{"m": "B*S"}`, or `{"m": "B"}` for an LM head that keeps one token).

Host and device overlap: transformers issues kernels asynchronously, so a step whose kernels
take longer on the GPU than the host needs to issue them is GPU-bound, and one whose Python and
dispatch cost dominate is host-bound. Layers repeat, so after the first the issue queue is in
a steady state and the step takes max(Σ host, Σ GPU) (see docs/predict.md); on a paged
profile the host term is the engine's whole forward, timed per model (`forward_host`), as the
units' sum leaves out transformers' Python between them. The paged engine
prepares each batch on the host before its forward (`engine_prepare`), which adds to that, and
a step whose attention shape is new to it also pays the attention's per-shape setup
(`shape_build`, `Step.setup_ms`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from dooly_fx.costs import cost, dim_value, key_class, step_keys
from dooly_fx.db import LatencyDB
from dooly_fx.errors import UserError
from dooly_fx.fit import LatencyModel, fit_key_classes, fit_unit, key_class_ratio
from dooly_fx.hostinfo import device_sms
from dooly_fx.names import ENGINE_PREPARE_ROLE, FORWARD_HOST_ROLE, SHAPE_BUILD_SUFFIX
from dooly_fx.sweep import request_vars

FIT_VERSION = 6
"""Bumped when the fitting changes, so stale fits are redone."""
DEFAULT_SKEW = 0.0
"""MoE routing skew assumed when predicting (0: every expert gets the same share)."""

Batch = Sequence[tuple[int, int]]


# --- fit -----------------------------------------------------------------------------------------


def unit_vars(canonical: dict) -> list[str]:
    """The variables a unit's latency is fitted over: its request variables, plus the routing
    skew of MoE experts (a sweep dimension)."""
    names = request_vars(canonical)
    return [*names, "skew"] if canonical.get("kind") == "moe_experts" else names


def features(canonical: dict, points: Sequence[dict], sms: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, FLOPs, bytes) of a unit at its points: X is (n, d) over `unit_vars(canonical)`;
    FLOPs as the kernels occupy a device of `sms` multiprocessors (`costs.cost`)."""
    names = unit_vars(canonical)
    X = np.array([[float(p.get(n, 0.0)) for n in names] for p in points]).reshape(len(points),
                                                                                   len(names))
    fb = np.array([cost(canonical, p, sms) for p in points],
                  dtype=float).reshape(len(points), 2)
    return X, fb[:, 0], fb[:, 1]


def keys_ratio(classes: dict, point: dict, keys: int | None = None) -> float:
    """A paged attention call's latency at `point` over its latency with aligned keys
    (`fit.key_class_ratio`): the keys read are `keys`, or N·P + T as profiled at `point`."""
    if not classes:
        return 1.0
    cls = key_class(step_keys(point) if keys is None else keys)
    return key_class_ratio(classes, cls, point)


def _digest(rows: Sequence[tuple[dict, float]]) -> str:
    text = json.dumps([FIT_VERSION, rows], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FitSummary:
    fitted: list[dict] = field(default_factory=list)
    """One row per signature fitted now: key, kind, method, cv_mape, n_points."""
    unchanged: int = 0
    seconds: float = 0.0


def fit_db(db: LatencyDB, env: str, on_unit: Callable[[], None] | None = None) -> FitSummary:
    """Fit every signature with measured points in `env` whose fit is missing or stale (its
    points or the fitting changed since); store each with its held-out error. Idempotent."""
    started = time.perf_counter()
    existing = db.fits(env)
    sms = environment_sms(db, env)
    keys = [r[0] for r in db.conn.execute(
        "SELECT DISTINCT signature FROM points WHERE env = ? AND status = 'ok' "
        "ORDER BY signature", (env,))]
    probe, elasticity = environment_host(db, env)
    summary, rows = FitSummary(), []
    for key in keys:
        points = db.ok_points(env, key)
        host = db.host_points(env, key)
        digest = _digest([sms, points, host, probe, elasticity])
        if existing.get(key, {}).get("points_digest") == digest:
            summary.unchanged += 1
        else:
            sig = db.signature(key)
            classes = fit_key_classes(points)
            # The grid, each point brought to aligned keys: the model is of aligned latency.
            grid = [(p, ms / keys_ratio(classes, p)) for p, ms in points if "A" not in p]
            X, flops, moved = features(sig["canonical"], [p for p, _ in grid], sms)
            model = fit_unit(sig["kind"], unit_vars(sig["canonical"]), X, flops, moved,
                             np.array([ms for _, ms in grid]))
            payload = {"gpu": model.to_json(),
                       "host_ms": host_at_speed(host, probe, elasticity),
                       "key_classes": classes, "fit_version": FIT_VERSION}
            rows.append((key, model.method, payload, model.cv_mape, len(points), digest))
            summary.fitted.append({"signature": key, "kind": sig["kind"],
                                   "method": model.method, "cv_mape": model.cv_mape,
                                   "n_points": len(points)})
        if on_unit:
            on_unit()
    if rows:
        db.save_fits(env, rows)
    summary.seconds = time.perf_counter() - started
    return summary


def host_at_speed(host: Sequence[tuple[float, float | None]], probe: float | None,
                  elasticity: float = 1.0) -> float:
    """A unit's host ms at the host speed `probe` (the environment's median host probe):
    the median over its points of host ms × (`probe` / the probe measured beside it) **
    `elasticity`; points recorded without a probe count as measured, and only when no
    point has one."""
    scaled = [ms * (probe / own) ** elasticity for ms, own in host if own and probe]
    values = scaled or [ms for ms, _ in host]
    return float(np.median(values)) if values else 0.0


def host_elasticity(samples: Iterable[Sequence[tuple[float, float]]]) -> float:
    """How host times follow the host probe: the slope of log host ms on log probe ms, each
    group of samples (one signature's points: (host ms, probe ms)) about its own means,
    pooled over the groups, clipped to [0, 1]. 1 (host work slows exactly as the probe
    does) when the probes give no spread to fit."""
    num = den = 0.0
    for group in samples:
        pairs = np.log([(ms, probe) for ms, probe in group if ms > 0 and probe > 0])
        if len(pairs) < 2:
            continue
        work, probe = (pairs - pairs.mean(axis=0)).T
        num, den = num + float(work @ probe), den + float(probe @ probe)
    return min(1.0, max(0.0, num / den)) if den > 1e-9 else 1.0


def environment_host(db: LatencyDB, env: str) -> tuple[float | None, float]:
    """(probe ms, elasticity) of an environment: its host speed (`LatencyDB.host_probe_ms`)
    and how its units' host times follow the probe (`host_elasticity` over the signatures
    whose host work is per call; `engine_prepare`'s grows with the batch, and a
    `forward_host` sample spans seconds of a whole forward's calls, over which a probe
    timed before and after says little, so both are left out)."""
    return db.host_probe_ms(env), host_elasticity(
        samples for kind, samples in db.host_samples(env)
        if kind not in ("engine_prepare", "forward_host"))


def environment_sms(db: LatencyDB, env: str) -> int | None:
    """The multiprocessor count of a DB's environment (`hostinfo.device_sms`)."""
    return next((device_sms(e) for e in db.environments() if e["fingerprint"] == env), None)


# --- load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """One unit of a model in one phase: `count` calls per step."""

    role: str
    signature: str
    count: int
    binding: dict


@dataclass
class UnitFit:
    kind: str
    canonical: dict
    names: list[str]
    gpu: LatencyModel
    host_ms: float
    cv_mape: float | None
    key_classes: dict = field(default_factory=dict)
    """Paged attention: the fitted cost of keys not a multiple of 8 (`fit.fit_key_classes`);
    `gpu` models the aligned latency."""
    sms: int | None = None
    """Multiprocessors of the environment's device (the FLOPs are counted as its kernels
    occupy it, `costs.cost`)."""
    sustained: tuple[float, float] | None = None
    """(slowdown, FLOPs per ms) measured under sustained load (`timing.sustained`): its time
    held over its burst time (at least 1) at its point of most FLOPs, and its FLOP rate
    there; None where it was not timed so (see `held_ms`)."""


@dataclass
class Loaded:
    """A model's units per (phase, regime) and the fitted latency of each signature."""

    model: str
    engine: str
    env: str
    config: dict
    uses: dict[tuple[str, str], list[Use]]
    fits: dict[str, UnitFit]
    missing: list[str]
    """Signatures of the model with no fit in this environment (not profiled)."""
    builds: dict[tuple[str, str], list[Use]] = field(default_factory=dict)
    """Per-shape setup units (`shape_build`) per (phase, regime): paid by a step whose
    attention shape is new to the engine, so they are not part of `uses`."""
    engine_units: dict[tuple[str, str], list[Use]] = field(default_factory=dict)
    """The engine's own per-step host work before the forward (`engine_prepare`) per (phase,
    regime): serial with the forward, so not part of `uses` either."""
    forward_units: dict[tuple[str, str], list[Use]] = field(default_factory=dict)
    """The engine's whole forward timed for its host issue (`forward_host`) per (phase,
    regime): where there is one, it is the step's host time, not the sum of its units'."""
    host_probe_ms: float | None = None
    """The environment's host speed (`LatencyDB.host_probe_ms`): its units' host times are
    at this speed."""
    host_elasticity: float = 1.0
    """How its host times follow the probe (`host_elasticity`)."""
    speed_probe_ms: float | None = None
    """The host speed predicted for (`at_host_speed`); None: the environment's own."""

    @property
    def probe_ms(self) -> float | None:
        """The host probe ms this predicts for."""
        return self.speed_probe_ms or self.host_probe_ms

    @property
    def host_scale(self) -> float:
        """Host-side times (issue, batch preparation, shape setup) are predicted × this:
        (probe predicted for / the environment's) ** elasticity; 1 at the environment's own
        speed."""
        if not self.speed_probe_ms or not self.host_probe_ms:
            return 1.0
        return (self.speed_probe_ms / self.host_probe_ms) ** self.host_elasticity

    @property
    def window(self) -> int | None:
        types = self.config.get("layer_types") or ()
        window = self.config.get("sliding_window")
        return int(window) if window and (not types or "sliding_attention" in types) else None


def load(db: LatencyDB, model: str, env: str, engine: str) -> Loaded:
    """A model's recorded units under `engine` in `env`, with the fits of their signatures
    (run `fit_db` first). A model that was never profiled there is a UserError."""
    rows = db.model_units(model, env, engine)
    if not rows:
        engines = sorted(m["engine"] for m in db.models(env) if m["name"] == model)
        if engines:
            raise UserError(f"{model}: not profiled in this environment under engine {engine} "
                            f"(its engines: {', '.join(engines)})")
        known = sorted({m["name"] for m in db.models(env)})
        close = difflib.get_close_matches(model, known, n=3)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"{model}: not profiled in this environment under engine {engine} "
                        f"(profiled: {', '.join(known) or 'none'}){hint}")
    config = next(m["config"] for m in db.models(env, engine) if m["name"] == model)
    return from_units(db, model, env, engine, rows, config)


def from_units(db: LatencyDB, model: str, env: str, engine: str, rows: Sequence[dict],
               config: dict) -> Loaded:
    """A model given by its unit rows (phase, regime, role, signature, count, binding: as
    `LatencyDB.model_units` returns them, recorded or from a capture) and config, with the
    fits `env` has for their signatures; signatures it has none for are `Loaded.missing`."""
    uses: dict[tuple[str, str], list[Use]] = {}
    builds: dict[tuple[str, str], list[Use]] = {}
    engine_units: dict[tuple[str, str], list[Use]] = {}
    forward_units: dict[tuple[str, str], list[Use]] = {}
    for r in rows:
        into = (builds if r["role"].endswith(SHAPE_BUILD_SUFFIX) else
                engine_units if r["role"] == ENGINE_PREPARE_ROLE else
                forward_units if r["role"] == FORWARD_HOST_ROLE else uses)
        into.setdefault((r["phase"], r["regime"]), []).append(
            Use(r["role"], r["signature"], r["count"], r["binding"]))
    stored = db.fits(env)
    sms = environment_sms(db, env)
    held = db.sustained(env)
    fits, missing = {}, []
    for key in sorted({r["signature"] for r in rows}):
        if key not in stored:
            missing.append(key)
            continue
        sig = db.signature(key)
        model_json = stored[key]["model"]
        if model_json.get("fit_version") != FIT_VERSION:
            raise UserError(f"{model}: the DB's latency models were fitted by an older version "
                            "of dooly_fx; run `python -m dooly_fx fit --db FILE` on it")
        fits[key] = UnitFit(sig["kind"], sig["canonical"], unit_vars(sig["canonical"]),
                            LatencyModel.from_json(model_json["gpu"]), model_json["host_ms"],
                            stored[key]["cv_mape"], model_json.get("key_classes", {}), sms,
                            _slowdown(held.get(key), sig["canonical"], sms))
    return Loaded(model, engine, env, config, uses, fits, missing, builds, engine_units,
                  forward_units, *environment_host(db, env))


def _slowdown(row: dict | None, canonical: dict, sms: int | None
              ) -> tuple[float, float] | None:
    """`UnitFit.sustained` from a `LatencyDB.sustained` row."""
    if row is None or not row["burst_ms"] or not row["sustained_ms"]:
        return None
    flops = cost(canonical, row["point"], sms)[0]
    return max(1.0, row["sustained_ms"] / row["burst_ms"]), flops / row["burst_ms"]


def at_host_speed(loaded: Loaded, probe_ms: float | None) -> Loaded:
    """`loaded` predicting for a host whose probe (`hostinfo.host_probe_ms`) takes `probe_ms`:
    host-side times scale by `probe_ms` over the environment's own, to the power of the
    environment's `host_elasticity`. Unchanged when either probe is unknown."""
    if probe_ms is not None and probe_ms <= 0:
        raise UserError(f"a host probe time must be positive, not {probe_ms}")
    if probe_ms is None or not loaded.host_probe_ms:
        return loaded
    return replace(loaded, speed_probe_ms=probe_ms)


# --- predict -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitStep:
    role: str
    kind: str
    signature: str
    count: int
    point: dict
    gpu_ms: float
    """Per call, at the clock of a GPU that has not been busy for long."""
    host_ms: float
    extrapolated: bool
    sustained_ms: float
    """Per call, at the clock the GPU settles at once it has been busy for a while
    (`held_ms`; `gpu_ms` for a unit never timed under load)."""


@dataclass
class Step:
    phase: str
    regime: str
    values: dict
    units: list[UnitStep]
    gpu_ms: float
    host_ms: float
    prepare_ms: float = 0.0
    """The engine's own batch preparation before the forward (paged engine: `engine_prepare`;
    serial with the forward)."""
    setup_ms: float = 0.0
    """What a step whose attention shape is new to the engine pays on top (paged engine:
    `shape_build`, e.g. cuDNN graph builds); not in `total_ms`."""
    units_host_ms: float | None = None
    """Σ count × host ms of the units, where the host time is the whole forward's
    (`forward_host`) instead; None where it is this sum."""
    busy: float = 0.0
    """How much of its units' slowdown under load the step pays (`gpu_busy`)."""

    def in_step_ms(self, unit: UnitStep) -> float:
        """One call of `unit` in this step: its GPU ms plus its share of `clock_ms`."""
        return unit.gpu_ms + self.busy * (unit.sustained_ms - unit.gpu_ms)

    @property
    def clock_ms(self) -> float:
        """What the GPU's lower clock under load adds to `gpu_ms` (`loaded_gpu_ms`)."""
        return sum(u.count * (self.in_step_ms(u) - u.gpu_ms) for u in self.units)

    @property
    def total_ms(self) -> float:
        """The engine's batch preparation, then the forward, where host issue and GPU
        execution overlap: the slower of the two streams."""
        return self.prepare_ms + max(self.gpu_ms, self.host_ms)

    def to_json(self) -> dict:
        return {"phase": self.phase, "regime": self.regime, "values": self.values,
                "total_ms": self.total_ms, "gpu_ms": self.gpu_ms, "host_ms": self.host_ms,
                "prepare_ms": self.prepare_ms, "setup_ms": self.setup_ms,
                "units_host_ms": self.units_host_ms, "clock_ms": self.clock_ms,
                "units": [vars(u) for u in self.units]}


def batch_values(batch: Batch, engine: str) -> tuple[str, dict[str, int]]:
    """The phase of a batch and its request values: padded, B, S, P; flattened, T, N, P (the
    mean cached) and `keys`, the keys its attention reads (Σ cached + new)."""
    if not batch or any(q < 1 or c < 0 for q, c in batch):
        raise UserError("a batch needs at least one sequence, each with >= 1 new token and "
                        ">= 0 cached tokens")
    new, cached = [q for q, _ in batch], [c for _, c in batch]
    if max(cached) == 0:
        phase = "prefill"
    elif max(new) == 1:
        phase = "decode"
    else:
        phase = "mixed"
    if engine.startswith("paged"):  # the attention reads Σ (cached + new) keys: N·P + T
        return phase, {"T": sum(new), "N": len(batch), "P": round(sum(cached) / len(batch)),
                       "keys": sum(new) + sum(cached)}
    return phase, {"B": len(batch), "S": 1 if phase == "decode" else max(new), "P": max(cached)}


def _regime(loaded: Loaded, phase: str, values: dict) -> str:
    if not any(regime for p, regime in loaded.uses if p == phase):
        return ""
    window = loaded.window or 0
    reach = values.get("S", 1) if phase == "prefill" else values.get("P", 0)
    return "window>=" if reach >= window else "window<"


def unit_point(fit: UnitFit, use: Use, values: dict, skew: float) -> dict:
    """A unit's point in a step: its request variables from the step's values, `m` from the
    unit's binding (all new tokens when none was recorded)."""
    point: dict = {}
    for name in fit.names:
        if name == "m":
            expr = use.binding.get("m")
            point["m"] = dim_value(expr, values) if expr else \
                values.get("T", values.get("B", 1) * values.get("S", 1))
        elif name == "skew":
            point["skew"] = skew
        else:
            point[name] = values.get(name, 1)
    return point


def predict_step(loaded: Loaded, batch: Batch, skew: float = DEFAULT_SKEW) -> Step:
    """Predicted time of one engine step running `batch` ((new, cached) per sequence); its
    `setup_ms` is for the step's distinct attention shapes (`shape_setup_ms`)."""
    phase, values = batch_values(batch, loaded.engine)
    step = predict_at(loaded, phase, values, skew)
    return replace(step, setup_ms=shape_setup_ms(loaded, step, batch)[0])


def shape_setup_ms(loaded: Loaded, step: Step, batch: Batch,
                   seen: set[tuple[int, int]] | frozenset = frozenset()
                   ) -> tuple[float, set[tuple[int, int]]]:
    """(ms, shapes): the per-shape setup `batch` pays, one build for each of its distinct
    attention shapes (`attention_shapes`) not in `seen`, and those shapes; `step` is its
    `predict_at`, whose `setup_ms` builds every attention group's setup unit once."""
    groups = sum(u.count for u in loaded.builds.get((step.phase, step.regime), []))
    if not groups:
        return 0.0, set()
    shapes = attention_shapes(batch, loaded.window, groups)
    return step.setup_ms / groups * len(shapes - seen), shapes


def attention_shapes(batch: Batch, window: int | None, groups: int) -> set[tuple[int, int]]:
    """The distinct (T, keys) shapes the `groups` attention layer groups of a paged step run
    at; the engine builds each new one once, whichever layer meets it first. A full-attention
    layer reads every cached and new token; a sliding-window layer at most `window` - 1 cached
    tokens of each sequence (`paged.engine_attention`). A model with both kinds of layer
    (gemma-2) so meets one shape while every sequence fits the window, and two after."""
    tokens = sum(q for q, _ in batch)
    full = (tokens, sum(q + c for q, c in batch))
    if not window:
        return {full}
    sliding = (tokens, sum(q + min(c, window - 1) for q, c in batch))
    return {full, sliding} if groups > 1 else {sliding}


def missing_roles(loaded: Loaded) -> list[str]:
    """The roles of the model's units whose signature has no fit (`Loaded.missing`), sorted."""
    missing = set(loaded.missing)
    groups = (loaded.uses, loaded.builds, loaded.engine_units, loaded.forward_units)
    return sorted({u.role for group in groups for units in group.values() for u in units
                   if u.signature in missing})


def _require_fits(loaded: Loaded) -> None:
    if loaded.missing:
        roles = missing_roles(loaded)
        shown = ", ".join(roles[:3]) + (f" and {len(roles) - 3} more" if len(roles) > 3 else "")
        count = len(loaded.missing)
        raise UserError(f"{loaded.model}: {count} of its unit signatures "
                        f"{'has' if count == 1 else 'have'} no fit in this environment "
                        f"({shown}); profile them (`python -m dooly_fx profile`), then "
                        "`python -m dooly_fx fit`")


def _uses(loaded: Loaded, phase: str, values: dict) -> tuple[str, list[Use]]:
    """(regime, units) of `phase` at `values`; a phase never recorded is a UserError."""
    regime = _regime(loaded, phase, values)
    uses = loaded.uses.get((phase, regime))
    if uses is None:
        raise UserError(f"{loaded.model}: no {phase} units recorded"
                        f"{f' for regime {regime}' if regime else ''}; profile that phase")
    return regime, uses


def unit_ms(fit: UnitFit, point: dict, keys: int | None = None) -> float:
    """GPU ms of one call of a unit at its `point`; a paged attention call reading `keys`
    keys (default: N·P + T, as profiled) pays its key class (`keys_ratio`)."""
    flops, moved = cost(fit.canonical, point, fit.sms)
    ms = fit.gpu.predict([point[n] for n in fit.names], flops, moved)
    return ms * keys_ratio(fit.key_classes, point, keys)


def held_ms(fit: UnitFit, point: dict, ms: float) -> float:
    """GPU ms of one call of a unit at `point` under sustained load, from its `ms` at boost
    clock. A kernel slows as the clock falls in proportion to how compute-bound it is, so
    its measured slowdown (`UnitFit.sustained`) applies in full where it computes at least
    at the rate it was timed at under load, and in the ratio of the rates below that; a
    unit never timed under load does not slow."""
    if fit.sustained is None:
        return ms
    slowdown, rate = fit.sustained
    share = 1.0 if rate <= 0 or ms <= 0 else \
        min(1.0, cost(fit.canonical, point, fit.sms)[0] / ms / rate)
    return ms * (1.0 + (slowdown - 1.0) * share)


def gpu_busy(gpu: float, host: float) -> float:
    """How busy a step keeps the GPU, whose kernels take `gpu` ms at boost clock, issued by
    a host that takes `host` ms: 1 when GPU-bound, gpu / host when host-bound."""
    return 1.0 if host <= gpu or host <= 0 else gpu / host


def loaded_gpu_ms(gpu: float, held: float, host: float) -> float:
    """GPU ms of a step whose kernels take `gpu` ms at boost clock and `held` ms at the clock
    the GPU settles at under load, issued by a host that takes `host` ms. The board lowers
    its clock with the power it draws, so the step pays the difference in the measure it
    keeps the GPU busy (`gpu_busy`)."""
    return gpu + gpu_busy(gpu, host) * (held - gpu)


def predict_uses(loaded: Loaded, uses: Sequence[Use], values: dict,
                 skew: float = DEFAULT_SKEW) -> tuple[list[UnitStep], float, float, float]:
    """Each unit's prediction at `values`, and Σ count × GPU ms, Σ count × host ms and
    Σ count × GPU ms under sustained load (`held_ms`)."""
    units, gpu, host, held = [], 0.0, 0.0, 0.0
    for use in uses:
        fit = loaded.fits[use.signature]
        point = unit_point(fit, use, values, skew)
        ms = unit_ms(fit, point, values.get("keys"))
        host_ms = fit.host_ms * loaded.host_scale
        sustained = held_ms(fit, point, ms)
        units.append(UnitStep(use.role, fit.kind, use.signature, use.count, point, ms,
                              host_ms, not fit.gpu.in_range(point), sustained))
        gpu += use.count * ms
        host += use.count * host_ms
        held += use.count * sustained
    return units, gpu, host, held


def predict_at(loaded: Loaded, phase: str, values: dict, skew: float = DEFAULT_SKEW) -> Step:
    """Predicted time of one step of `phase` at request values (B, S, P or T, N, P)."""
    regime, uses = _uses(loaded, phase, values)
    _require_fits(loaded)
    units, gpu, host, held = predict_uses(loaded, uses, values, skew)
    # The shape setup is the host time of the attention's first call at a new shape; the
    # preparation is host work end to end, so its timed latency is its cost.
    setup = predict_uses(loaded, loaded.builds.get((phase, regime), []), values)[2]
    prepare = predict_uses(loaded, loaded.engine_units.get((phase, regime), []),
                           values)[1] * loaded.host_scale
    forward = loaded.forward_units.get((phase, regime))
    if not forward:
        return Step(phase, regime, values, units, loaded_gpu_ms(gpu, held, host), host,
                    prepare, setup, busy=gpu_busy(gpu, host))
    # The whole forward's host issue: the units' and the Python between them.
    whole = predict_uses(loaded, forward, values)[2]
    return Step(phase, regime, values, units, loaded_gpu_ms(gpu, held, whole), whole, prepare,
                setup, units_host_ms=host, busy=gpu_busy(gpu, whole))


# --- continuous batching ---------------------------------------------------------------------


class FlatStepTime:
    """Step time (seconds) of a continuous-batching step: `FlatStepTime(loaded)(batch)` for a
    batch of (new, cached) per sequence.

    From a paged-engine profile (`--engine paged`), the step is predicted at (T, N, mean
    cached) directly: the engine's attention reads N·P + T keys in one call; a step whose
    (T, keys) this instance has not seen before also pays the attention's per-shape setup
    (`shape_build` units, e.g. cuDNN graph builds), so use one instance per simulated run;
    the engine's batch preparation (`engine_prepare`) is added to every step. From a
    padded-engine profile it is approximated: every token-wise unit (GEMMs, norms,
    activations, ...) runs once over T = Σ new tokens (an LM head over one row per sequence),
    so it is predicted at m = T (or N). Attention is per sequence: prefills (no cache) at
    (B=1, S=q), decodes together at (B=n, P=mean cached), chunked prefills at
    (B=1, S=q, P=c), each with the phase's own attention-side units. Host and GPU overlap as
    in `predict_step`. Values are memoised (token counts exactly, cached lengths to 16
    tokens), so a simulator can call it for every step of a long trace.
    """

    CONTEXT_BUCKET = 16

    def __init__(self, loaded: Loaded, skew: float = DEFAULT_SKEW) -> None:
        _require_fits(loaded)
        self.loaded, self.skew = loaded, skew
        self._memo: dict[tuple, np.ndarray] = {}
        self._steps: dict[tuple, Step] = {}
        self._shapes: set[tuple[int, int]] = set()
        if loaded.engine.startswith("paged"):
            return  # profiled as the engine runs: every unit at (T, N, P) directly
        prefill = loaded.uses.get(("prefill", "")) or next(
            (u for (p, _), u in loaded.uses.items() if p == "prefill"), None)
        if prefill is None:
            raise UserError(f"{loaded.model}: no prefill units recorded; profile that phase")
        self._tokenwise = [u for u in prefill if self._token_only(u)]

    def _token_only(self, use: Use) -> bool:
        """A unit whose latency depends on the step's token count alone (and MoE skew)."""
        return set(self.loaded.fits[use.signature].names) <= {"m", "skew"}

    def _units(self, uses: Sequence[Use], values: dict) -> np.ndarray:
        _, gpu, host, held = predict_uses(self.loaded, uses, values, self.skew)
        return np.array([gpu, host, held])

    def attention(self, phase: str, values: dict) -> np.ndarray:
        """(GPU ms, host ms, GPU ms under sustained load) of one step's attention-side units
        (every unit whose latency depends on more than the token count) in `phase` at padded
        `values` (B, S, P)."""
        key = (phase, *sorted(values.items()))
        if key not in self._memo:
            _, uses = _uses(self.loaded, phase, values)
            self._memo[key] = self._units([u for u in uses if not self._token_only(u)], values)
        return self._memo[key]

    def __call__(self, batch: Batch) -> float:
        if self.loaded.engine.startswith("paged"):
            return self._paged(batch)
        tokens = sum(q for q, _ in batch)
        key = ("tokens", tokens, len(batch))
        if key not in self._memo:
            # B*S = T and B = N for the bindings of the padded capture.
            self._memo[key] = self._units(self._tokenwise, {"B": len(batch),
                                                            "S": tokens / len(batch)})
        total = self._memo[key]
        bucket = self.CONTEXT_BUCKET
        decodes = [c for q, c in batch if q == 1 and c > 0]
        if decodes:
            mean = max(1, round(sum(decodes) / len(decodes) / bucket)) * bucket
            total = total + self.attention("decode", {"B": len(decodes), "S": 1, "P": mean})
        for q, c in batch:
            if q == 1 and c > 0:
                continue
            if c == 0:
                total = total + self.attention("prefill", {"B": 1, "S": q, "P": 0})
            else:
                total = total + self.attention("mixed", {"B": 1, "S": q,
                                                         "P": max(1, round(c / bucket)) * bucket})
        gpu, host, held = total
        return max(loaded_gpu_ms(gpu, held, host), host) / 1e3

    def _paged(self, batch: Batch) -> float:
        """A paged-engine profile: the step at (T, N, mean cached), cached to 16 tokens, plus
        the attention's per-shape setup for each of its shapes (`attention_shapes`) new to
        this engine."""
        phase, values = batch_values(batch, self.loaded.engine)
        values["P"] = round(values["P"] / self.CONTEXT_BUCKET) * self.CONTEXT_BUCKET
        key = (phase, values["T"], values["N"], values["P"], key_class(values["keys"]))
        if key not in self._steps:
            self._steps[key] = predict_at(self.loaded, phase, values, self.skew)
        step = self._steps[key]
        setup, shapes = shape_setup_ms(self.loaded, step, batch, self._shapes)
        self._shapes |= shapes
        # The batch preparation and the shape setup run on the host before the first kernel.
        return (step.total_ms + setup) / 1e3
