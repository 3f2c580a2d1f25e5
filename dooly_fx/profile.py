"""Stages 6–8: plan what is missing from the latency DB, and profile it.

    collect(models) -> Collection        capture every phase, one UnitCase per unique signature
    environment(device) -> Env           fingerprint: device, driver, library versions
    plan(db, collection, env, bounds)    covered / missing points per model, and the dedup saving
    profile(db, collection, env, ...)    measure only missing points, resumable, several GPUs

Profiling each unique signature once, for every model that contains it, is the point of the
tool: `plan` reports the device time that saves against profiling each model on its own with
the same grid (the Dooly paper's baseline).
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import Empty
from typing import TypeVar

import torch

from dooly_fx.capture import capture
from dooly_fx.costs import cost
from dooly_fx.db import (
    DEFAULT_TIMER,
    UNNAMED_TIMER,
    LatencyDB,
    Timing,
    canonical_point,
    env_timer,
    fingerprint,
)
from dooly_fx.engine import EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.fused import fused_signature
from dooly_fx.hostinfo import cpu_name, require_device
from dooly_fx.lowering import Runnable, UnitCase, lower
from dooly_fx.names import ENGINE_PREPARE_ROLE, FORWARD_HOST_ROLE, HOST_KINDS, SHAPE_BUILD_SUFFIX
from dooly_fx.paged import release_models
from dooly_fx.passes.partition import partition, unit_outputs, unit_subgraph
from dooly_fx.passes.signature import binding, signature, signature_of
from dooly_fx.passes.taint import META_KEY, Config, TensorLabel, taint
from dooly_fx.spec import ModelSpec
from dooly_fx.sweep import Bounds, points, spread, sweep_points
from dooly_fx.timing import SUSTAIN_MIN_MS, host_issue, measure, replay_overhead_ms, sustained

T = TypeVar("T")

TIMING_VERSION = 2
"""Bumped when the timing method changes, so old timings never answer for new ones (the
timer chosen, `db.TIMERS`, is part of the environment too)."""
POINT_OVERHEAD_S = 0.2
"""Estimated fixed device seconds per point (warm-up and repetition budgets, input setup)."""


@dataclass
class Collection:
    """The unique signatures of some models, and each model's unit counts."""

    cases: dict[str, UnitCase] = field(default_factory=dict)
    units: dict[str, list[tuple[str, str, str, str, int, dict]]] = field(default_factory=dict)
    """model -> rows of (phase, regime, role, signature, count, binding)."""
    configs: dict[str, dict] = field(default_factory=dict)
    engine: str = EngineProfile().label
    """The engine profile the models were captured for (its label)."""

    def signatures_of(self, model: str) -> list[str]:
        return sorted({row[3] for row in self.units[model]})

    def unit_rows(self, model: str) -> list[dict]:
        """A model's units as `LatencyDB.model_units` returns recorded ones (dicts, in phase,
        regime and role order), for what reads either."""
        keys = ("phase", "regime", "role", "signature", "count", "binding")
        return sorted((dict(zip(keys, row, strict=True)) for row in self.units[model]),
                      key=lambda r: (r["phase"], r["regime"], r["role"]))


@dataclass(frozen=True)
class Env:
    fingerprint: str
    device: str
    info: dict


def collect(specs: Sequence[ModelSpec], engine: EngineProfile, phases: Sequence[str],
            on_model: Callable[[str], None] | None = None) -> Collection:
    """Capture every phase of every model; keep one extracted case per unique signature."""
    out = Collection(engine=engine.label)
    for spec in specs:
        rows: dict[tuple[str, str, str, str], int] = {}
        bindings: dict[tuple[str, str, str, str], dict] = {}
        builds: dict[tuple[str, str, str, str], set[str]] = {}
        for phase in phases:
            for cap in capture(spec, engine, phase):
                taint(cap.gm, cap.symbols)
                for unit in partition(cap.gm):
                    sig = signature(unit)
                    if engine.kernels == "triton":  # timed as the fused engine's kernel
                        sig = fused_signature(unit.kind, sig.data) or sig
                    count = cap.plan.count(unit.layer)
                    key = (phase, cap.regime, unit.role, sig.key)
                    rows[key] = rows.get(key, 0) + count
                    bindings[key] = binding(unit)
                    if sig.key not in out.cases:
                        out.cases[sig.key] = _case(cap.gm, unit, sig)
                    if spec.name not in out.cases[sig.key].models:
                        out.cases[sig.key].models.append(spec.name)
                    if unit.kind == "paged_attention":
                        _add_shape_build(out, spec.name, builds, key, sig.data)
        for k, attentions in builds.items():  # one setup per attention group and step
            rows[k], bindings[k] = len(attentions), {}
        if engine.engine == "paged":
            _add_per_step_units(out, spec, engine, rows, bindings)
        out.units[spec.name] = [(*k, c, bindings[k]) for k, c in rows.items() if c > 0]
        out.configs[spec.name] = spec.config.to_dict()
        if on_model is not None:
            on_model(spec.name)
    return out


def _add_shape_build(out: Collection, model: str, builds: dict, key: tuple,
                     attention: dict) -> None:
    """The per-shape setup of a paged attention (`paged.shape_build_canonical`) as its own
    unit, counted once per attention signature (a layer group: its layers share one shape per
    step), so the step-time model can charge it when a step meets a new shape."""
    from dooly_fx.paged import shape_build_canonical

    canonical = shape_build_canonical(attention)
    if canonical is None:
        return
    sig = signature_of(canonical)
    phase, regime, role, attention_key = key
    builds.setdefault((phase, regime, f"{role}{SHAPE_BUILD_SUFFIX}", sig.key),
                      set()).add(attention_key)
    _derived_case(out, sig.key, canonical, ["T"], model)


def _add_per_step_units(out: Collection, spec: ModelSpec, engine: EngineProfile, rows: dict,
                        bindings: dict) -> None:
    """The paged engine's own per-step units, one of each in every step a phase records:
    its batch preparation (`paged.engine_prepare`), and its whole forward, timed for its host
    issue (`paged.engine_forward`: the host work between the units, module calls and
    transformers' Python around each op, is part of every step, and only the whole forward
    has it)."""
    from dooly_fx.paged import engine_prepare_canonical, forward_host_canonical

    steps = sorted({(k[0], k[1]) for k in rows})
    for role, canonical, symbols in (
            (ENGINE_PREPARE_ROLE,
             engine_prepare_canonical(spec.config, engine.dtype, engine.attn_impl),
             ["N", "P", "T"]),
            (FORWARD_HOST_ROLE, forward_host_canonical(spec.config, engine), ["N"])):
        sig = signature_of(canonical)
        for phase, regime in steps:
            rows[(phase, regime, role, sig.key)] = 1
            bindings[(phase, regime, role, sig.key)] = {}
        _derived_case(out, sig.key, canonical, symbols, spec.name)


def _derived_case(out: Collection, key: str, canonical: dict, symbols: list[str],
                  model: str) -> None:
    """A case that is no subgraph of the capture (its lowering builds it from `canonical`)."""
    case = out.cases.setdefault(key, UnitCase(key, canonical["kind"], canonical, None, [], [],
                                              symbols))
    if model not in case.models:
        case.models.append(model)


def _case(gm, unit, sig) -> UnitCase:
    def label(node):
        value = node.meta.get(META_KEY)
        return value[0] if isinstance(value, tuple) and value else value

    sub = unit_subgraph(gm, unit)  # placeholders carry the external nodes' labels
    inputs = [label(n) for n in sub.graph.nodes if n.op == "placeholder"]
    outputs = [label(n) for n in unit_outputs(unit)]
    dims = [d for lab in [*inputs, *outputs] if lab is not None
            for d in (lab.dims if isinstance(lab, TensorLabel) else (lab,))]
    symbols = sorted({str(s) for d in dims if not isinstance(d, Config)
                      for s in d.expr.free_symbols})
    return UnitCase(sig.key, unit.kind, sig.data, sub, inputs,
                    [o for o in outputs if isinstance(o, TensorLabel)], symbols)


def environment(device: str, timer: str = DEFAULT_TIMER) -> Env:
    """The fingerprint of where timings are taken: device, driver, library versions and timing
    method (hash of the info dict; a timer other than `db.UNNAMED_TIMER` is named in it).
    The engine profile is not part of it: a unit's signature already names its kernels and
    dtypes, so engines share every unit they have in common."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict = {
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "triton": triton_version,
        "transformers": transformers.__version__, "timing_version": TIMING_VERSION,
    }
    if device.startswith("cuda"):
        require_device(device)
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, driver=_driver_version(),
                    memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
        if timer != UNNAMED_TIMER:
            info.update(timer=timer,
                        replay_overhead_us=round(replay_overhead_ms(device) * 1e3, 2))
    else:
        info.update(device=cpu_name(), threads=torch.get_num_threads())
    return Env(fingerprint(info), info["device"], info)


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def plan_environment(db, device: str, timer: str = DEFAULT_TIMER) -> Env:
    """The environment a plan is for: this machine's, or, for `--device cuda` on a machine
    without a GPU, the newest CUDA environment of `timer` recorded in the DB (none: every
    point is missing). A DB whose CUDA samples were all taken with another timer is a
    UserError naming it: a plan against none of them would call its whole profile missing."""
    if device == "cpu" or torch.cuda.is_available():
        return environment(device, timer)
    cuda = [e for e in db.environments() if e.get("device_type") == "cuda"
            and e.get("timing_version") == TIMING_VERSION]
    recorded = [e for e in cuda if env_timer(e) == timer]
    if not recorded and cuda:
        timers = sorted({env_timer(e) for e in cuda})
        raise UserError(f"{db.path}: its CUDA samples were taken with the {' and '.join(timers)} "
                        f"timer, not {timer}: pass --timer {timers[0]}")
    if not recorded:
        info = {"device_type": "cuda", "device": "cuda (none recorded)"}
        return Env("none", info["device"], info)
    env = recorded[-1]
    return Env(env["fingerprint"], env["device"], env)


# --- plan ----------------------------------------------------------------------------------------


def estimate_seconds(case: UnitCase, point: dict, peak_flops: float, peak_bytes: float) -> float:
    """Device seconds to profile one point: the timing budgets plus ~10 roofline-bound calls."""
    flops, moved = cost(case.canonical, point)
    return POINT_OVERHEAD_S + 10 * max(flops / peak_flops, moved / peak_bytes)


HARDWARE_PEAKS = {  # (dense bf16 FLOP/s, memory bytes/s); CPU: a 2-core machine, roughly
    "cuda": (790e12, 3.0e12),
    "cpu": (5e10, 1e10),
}


def _model_signatures(db, coll: Collection, env: Env, model: str,
                      local: bool) -> tuple[list[str], str]:
    """A model's signatures: from this machine's capture when `env` is this machine's
    (`local`), else as recorded in the DB for `env` (captured with that environment's
    software), else from the capture. Returns (signatures, where from)."""
    recorded = [] if local and model in coll.units else \
        db.model_units(model, env.fingerprint, coll.engine)
    if recorded:
        return sorted({u["signature"] for u in recorded}), "db"
    if model not in coll.units:
        raise UserError(f"{model}: not captured and not recorded for {env.device}")
    return coll.signatures_of(model), "capture"


def plan(db: LatencyDB, coll: Collection, env: Env, bounds: Bounds,
         models: Sequence[str], local: bool = False) -> dict:
    """Covered and missing points per model and overall; saving of dedup vs per-model runs.

    A model's units come from the DB when it was profiled in `env` before (library versions
    change which kernels a model runs), else from this machine's capture. With `local` (the
    profiler, whose `env` is this machine's), this machine's capture wins: it is what the
    profile then records, so a unit the recorded one lacks is planned as missing.
    """
    status = db.point_status(env.fingerprint)
    peak_flops, peak_bytes = HARDWARE_PEAKS[env.info["device_type"]]
    sources = {m: _model_signatures(db, coll, env, m, local) for m in models}
    canonical = {key: case.canonical for key, case in coll.cases.items()}
    for sigs, _ in sources.values():
        for key in sigs:
            if key not in canonical:
                canonical[key] = db.signature(key)["canonical"]
    known = _known(status, bounds)
    grid = {key: [canonical_point(p) for p in sweep_points(c, bounds, known.get(key))]
            for key, c in canonical.items()}
    seconds: dict[tuple[str, str], float] = {}
    for key in canonical:
        case = coll.cases.get(key)
        for text in grid[key]:
            seconds[(key, text)] = POINT_OVERHEAD_S if case is None else \
                estimate_seconds(case, json.loads(text), peak_flops, peak_bytes)

    def done(key: str, text: str) -> bool:
        row = status.get((key, text))
        return row is not None and row["status"] in ("ok", "oom")

    per_model = []
    baseline = 0.0
    for model in models:
        sigs, source = sources[model]
        pairs = [(k, t) for k in sigs for t in grid[k]]
        missing = [p for p in pairs if not done(*p)]
        model_seconds = sum(seconds[p] for p in pairs)
        baseline += model_seconds
        captured = set(coll.signatures_of(model)) if model in coll.units else set(sigs)
        per_model.append({
            "model": model, "units_from": source, "signatures": len(sigs),
            # Signatures this machine's capture has that the recorded units lack: a profile
            # on a machine that captures as this one does would measure them too.
            "captured_not_recorded": len(captured - set(sigs)),
            "covered_points": len(pairs) - len(missing),
            "missing_points": len(missing), "points": len(pairs),
            "estimated_missing_seconds": round(sum(seconds[p] for p in missing), 1),
            "estimated_seconds_alone": round(model_seconds, 1),
        })
    unique = {(k, t) for sigs, _ in sources.values() for k in sigs for t in grid[k]}
    dedup = sum(seconds[p] for p in unique)
    missing_unique = [p for p in unique if not done(*p)]
    measured = {k for (k, _), row in status.items() if row["status"] == "ok"}
    settled = db.sustained_done(env.fingerprint)
    unsustained = {k for k, _ in unique if k in measured and k not in settled
                   and needs_sustained(env, canonical[k]["kind"])}
    return {
        "environment": env.fingerprint, "device": env.device, "bounds": vars(bounds),
        "models": per_model,
        "unique_signatures": len({k for k, _ in unique}),
        "unique_points": len(unique), "missing_points": len(missing_unique),
        "estimated_missing_seconds": round(sum(seconds[p] for p in missing_unique), 1),
        "missing_sustained": len(unsustained),
        "estimated_seconds_dedup": round(dedup, 1),
        "estimated_seconds_per_model": round(baseline, 1),
        # Never above the per-model sum; max() keeps float noise from printing as -0.0%.
        "saving": max(0.0, round(1 - dedup / baseline, 4)) if baseline else 0.0,
    }


def savings(db: LatencyDB, env: str, engine: str, models: Sequence[str] | None = None) -> dict:
    """Measured saving of dedup: device seconds the DB's runs spent on the unique signatures of
    `models` against the sum, over models, of the seconds each model's own signatures took.

    Reads only the DB: each model's units as recorded for `env` (`model_units`) and the device
    seconds per signature over all runs in `env` (`run_signatures`).
    """
    recorded = [m["name"] for m in db.models(env, engine)]
    models = list(models) if models else recorded
    spent = db.device_seconds(env)
    per_model, union = [], set()
    for model in models:
        sigs = {u["signature"] for u in db.model_units(model, env, engine)}
        if not sigs:
            raise UserError(f"{model}: no units recorded for environment {env[:12]}; "
                            "profile it there first")
        union |= sigs
        per_model.append({"model": model, "signatures": sorted(sigs),
                          "device_seconds_alone": sum(spent.get(s, 0.0) for s in sorted(sigs)),
                          "unprofiled_signatures": sorted(s for s in sigs if s not in spent)})
    owners: dict[str, int] = {}
    for m in per_model:
        for sig in m["signatures"]:
            owners[sig] = owners.get(sig, 0) + 1
    for m in per_model:
        m["shared_signatures"] = sum(owners[s] > 1 for s in m["signatures"])
        m["unique_signatures"] = len(m.pop("signatures"))
        m["unprofiled_signatures"] = len(m["unprofiled_signatures"])
    alone = sum(m["device_seconds_alone"] for m in per_model)
    # Summed in a fixed order: the same DB gives the same report, to the last digit.
    dedup = sum(spent.get(s, 0.0) for s in sorted(union))
    by_kind: dict[str, dict] = {}
    for sig in sorted(union):  # where the time goes, and how much each kind is shared
        row = by_kind.setdefault(db.signature(sig)["kind"], {
            "signatures": 0, "model_uses": 0, "device_seconds_dedup": 0.0,
            "device_seconds_alone": 0.0})
        row["signatures"] += 1
        row["model_uses"] += owners[sig]
        row["device_seconds_dedup"] += spent.get(sig, 0.0)
        row["device_seconds_alone"] += spent.get(sig, 0.0) * owners[sig]
    return {"environment": env, "models": per_model, "unique_signatures": len(union),
            "device_seconds_dedup": dedup, "device_seconds_per_model": alone,
            "saving": max(0.0, 1 - dedup / alone) if alone else 0.0,
            "by_kind": dict(sorted(by_kind.items(),
                                   key=lambda kv: -kv[1]["device_seconds_dedup"]))}


# --- profile -------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    measured: int = 0
    failed: int = 0
    oom: int = 0
    device_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    sustained: int = 0
    """Signatures timed under sustained load (`timing.sustained`)."""


def record_models(db: LatencyDB, coll: Collection, env: Env,
                  complete: Callable[[str], bool] | None = None) -> None:
    """Record the environment, the signatures and each model's units (as captured here, with
    this environment's software) in the DB. A model the DB has units of already is recorded
    again only where `complete(model)` (None: every model): a capture that names other units
    than the recorded ones replaces them once they are all measured, so a profile cut short
    never leaves a model that predicted before with units it has no fits for."""
    db.add_environment(env.fingerprint, env.device, env.info)
    db.add_signatures((c.key, c.kind, json.dumps(c.canonical, sort_keys=True))
                      for c in coll.cases.values())
    for model, units in coll.units.items():
        if complete is None or complete(model) or \
                not db.model_units(model, env.fingerprint, coll.engine):
            db.set_model(model, env.fingerprint, coll.engine, coll.configs[model], units)


def profile(db: LatencyDB, coll: Collection, env: Env, bounds: Bounds, device: str,
            command: str, on_point: Callable[[], None] | None = None,
            batch: int = 8, budget_ms: tuple[float, float] = (25.0, 100.0),
            stop: Callable[[], bool] | None = None) -> ProfileResult:
    """Measure every missing point of every case on `device`; safe to run concurrently.

    `budget_ms` is the (warm-up, repetition) time budget of each point. `stop()` is asked
    between points: once it says yes, the batch in hand is stored, its other claims are given
    back, and the run ends as `interrupted` (`result.interrupted`). Models are recorded
    (`record_models`) before, where new, and after, where all their points are covered.
    """
    record_models(db, coll, env, complete=lambda model: False)
    run_id = db.start_run(env.fingerprint, command)
    result = ProfileResult()
    status = "done"
    try:
        for case in coll.cases.values():
            offered: set[str] = set()
            # An adaptive sweep asks again after each round, with what is measured by then.
            while todo := _next_points(db, env, case, bounds, offered):
                offered.update(todo)
                for start in range(0, len(todo), batch):
                    if stop is not None and stop():
                        result.interrupted, status = True, "interrupted"
                        return result
                    claimed = db.claim(env.fingerprint, case.key, todo[start:start + batch],
                                       run_id)
                    skipped = len(todo[start:start + batch]) - len(claimed)
                    for _ in range(skipped):
                        if on_point:
                            on_point()
                    if claimed:
                        _measure_batch(db, case, claimed, env, device, run_id, result,
                                       on_point, budget_ms, stop)
            for _ in range(len(points(case.canonical, bounds)) - len(offered)):
                if on_point:  # grid points the adaptive sweep left out
                    on_point()
            if stop is None or not stop():
                _sustain(db, case, env, device, run_id, budget_ms, result)
            release_models()  # a whole model built for this case holds no memory after it
    except BaseException:
        status = "interrupted"
        raise
    finally:
        db.finish_run(run_id, status)
        covered = plan(db, coll, env, bounds, list(coll.units), local=True)["models"]
        record_models(db, coll, env, complete={
            m["model"] for m in covered if m["missing_points"] == 0}.__contains__)
    return result


def _known(status: dict, bounds: Bounds) -> dict[str, dict[int, float]]:
    """What an adaptive sweep knows, per one-variable signature of a `point_status` table:
    value -> median ms of its measured points (nothing when the sweep is not adaptive)."""
    out: dict[str, dict[int, float]] = {}
    if bounds.adaptive:
        for (key, text), row in status.items():
            point = json.loads(text)
            if row["status"] == "ok" and len(point) == 1:
                out.setdefault(key, {})[next(iter(point.values()))] = row["median_ms"]
    return out


def _next_points(db: LatencyDB, env: Env, case: UnitCase, bounds: Bounds,
                 offered: set[str]) -> list[str]:
    """The case's sweep points not offered yet (an adaptive sweep adds some once the points
    before them are measured)."""
    status = db.point_status(env.fingerprint, case.key) if bounds.adaptive else {}
    wanted = sweep_points(case.canonical, bounds, _known(status, bounds).get(case.key))
    return [t for t in map(canonical_point, wanted) if t not in offered]


def _measure_batch(db, case, claimed, env, device, run_id, result, on_point, budget_ms,
                   stop=None) -> None:
    results: list[tuple[str, Timing | str]] = []
    started = time.perf_counter()
    try:
        for text in claimed:
            if stop is not None and stop():
                break  # the finally stores what was measured and gives back the rest
            results.append((text, _measure_point(case, json.loads(text), device, budget_ms,
                                                 env_timer(env.info))))
            if on_point:
                on_point()
    finally:
        elapsed = time.perf_counter() - started
        if results:
            db.record(env.fingerprint, case.key, results, run_id, elapsed)
        unfinished = [t for t in claimed if t not in {r[0] for r in results}]
        if unfinished:
            db.release(env.fingerprint, case.key, unfinished)
    result.device_seconds += elapsed
    for _, outcome in results:
        if isinstance(outcome, Timing):
            result.measured += 1
        elif outcome == "oom":
            result.oom += 1
        else:
            result.failed += 1
            result.errors.append(f"{case.kind} {case.key[:12]}: {outcome}")


def needs_sustained(env: Env, kind: str) -> bool:
    """Whether units of `kind` are timed under sustained load in `env`: GPU work on a CUDA
    device timed with `stream` (a CPU does not lower its clock within a step the way a GPU
    at its power limit does; host-side units have no kernels; `do_bench`'s fixed costs per
    sample already read about as high as the lower clock, `bench/results/stream_timer/`)."""
    return env.info.get("device_type") == "cuda" and env_timer(env.info) == "stream" \
        and kind not in HOST_KINDS


def _sustain(db: LatencyDB, case: UnitCase, env: Env, device: str, run_id: int,
             budget_ms: tuple[float, float], result: ProfileResult) -> None:
    """Time `case` under sustained load (`timing.sustained`) at its measured point of most
    FLOPs, unless done or claimed by another profiler. A unit whose largest point takes
    under `SUSTAIN_MIN_MS` is recorded `short`, untimed."""
    measured = db.ok_points(env.fingerprint, case.key)
    if not needs_sustained(env, case.kind) or not measured or \
            not db.claim_sustained(env.fingerprint, case.key, run_id):
        return
    started = time.perf_counter()
    point, ms = max(measured, key=lambda pm: (cost(case.canonical, pm[0])[0], pm[1]))
    status, burst, held, error = "failed", ms, None, "interrupted"
    try:
        if ms < SUSTAIN_MIN_MS:
            status, error = "short", None
        else:
            outcome = _run_point(case, point, device, lambda run: sustained(
                run.fn, device, budget_ms, run.graphs, env_timer(env.info)))
            if isinstance(outcome, tuple):
                status, (burst, held), error = "ok", outcome, None
            else:
                status, error = ("oom", None) if outcome == "oom" else ("failed", outcome)
    finally:
        elapsed = time.perf_counter() - started
        db.record_sustained(env.fingerprint, case.key, status, canonical_point(point), burst,
                            held, error, run_id, elapsed)
        result.device_seconds += elapsed
    result.sustained += status == "ok"
    if status == "failed":
        result.errors.append(f"{case.kind} {case.key[:12]} under sustained load: {error}")


def _measure_point(case: UnitCase, point: dict, device: str, budget_ms: tuple[float, float],
                   timer: str = DEFAULT_TIMER) -> Timing | str:
    """A Timing, 'oom', or a one-line error; a point is never timed before its check passes."""
    return _run_point(case, point, device, lambda run: measure(
        run.fn, device, warmup_ms=budget_ms[0], rep_ms=budget_ms[1], graphs=run.graphs,
        host_calls=run.host_calls, timer=timer))


def _run_point(case: UnitCase, point: dict, device: str, timed: Callable[[Runnable], T]
               ) -> T | str:
    """`timed(runnable)` of the point's runnable once its check passed; 'oom', or a one-line
    error."""
    try:
        runnable = lower(case, point, device)
        runnable.check()
        return timed(runnable)
    except torch.cuda.OutOfMemoryError:
        return "oom"
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as exc:
        if "out of memory" in str(exc).lower():
            return "oom"
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


REFRESH_AT = (0.0, 0.5, 1.0)
"""Where in a signature's points, smallest to largest, `refresh_host` measures again."""


def refresh_plan(db: LatencyDB, coll: Collection, env: Env) -> dict[str, list[str]]:
    """Per case, the points whose host time `refresh_host` would measure: of a signature
    whose points were all recorded without a host probe (profiled before probes were), its
    smallest, middle and largest."""
    return {c.key: spread(sorted(db.host_unprobed(env.fingerprint, c.key),
                                 key=lambda t: sorted(json.loads(t).items())), REFRESH_AT)
            for c in coll.cases.values()}


def refresh_host(db: LatencyDB, coll: Collection, env: Env, device: str, command: str,
                 todo: dict[str, list[str]], on_point: Callable[[], None] | None = None
                 ) -> tuple[int, int]:
    """Measure the host time again, beside a host probe, at the points of `todo`
    (`refresh_plan`); their GPU times stay. One transaction per case, recorded as a run.
    Returns (signatures, points) re-measured."""
    run_id = db.start_run(env.fingerprint, command)
    status, done = "done", (0, 0)
    try:
        for case in coll.cases.values():
            rows, started = [], time.perf_counter()
            for text in todo.get(case.key, []):
                outcome = _run_point(case, json.loads(text), device,
                                     lambda run: host_issue(run.fn, device,
                                                            calls=run.host_calls))
                if isinstance(outcome, tuple):
                    rows.append((text, *outcome))
                if on_point:
                    on_point()
            release_models()
            if rows:
                db.set_host(env.fingerprint, case.key, rows, run_id,
                            time.perf_counter() - started)
                done = (done[0] + 1, done[1] + len(rows))
    except BaseException:
        status = "interrupted"
        raise
    finally:
        db.finish_run(run_id, status)
    return done


def profile_worker(args: tuple) -> ProfileResult:
    """One profiler process on one device (for `--devices 0,1,...`); captures on its own."""
    refs, engine, phases, bounds, db_path, device, command, queue, budget_ms, timer = args
    from dooly_fx.spec import resolve_model

    coll = collect([resolve_model(r) for r in refs], engine, phases)
    with LatencyDB.open(db_path) as db:
        env = environment(device, timer)
        return profile(db, coll, env, bounds, device, command,
                       on_point=lambda: queue.put(1) if queue is not None else None,
                       budget_ms=budget_ms)


def spawn_workers(refs, engine, phases, bounds, db_path, devices, command, on_point, budget_ms,
                  timer: str = DEFAULT_TIMER):
    """Run one profiler process per device (`cuda:0`, `cuda:1`, ...) on one DB; the DB's claims
    split the points between them. Returns their results."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Manager().Queue()
    with ctx.Pool(len(devices)) as pool:
        jobs = pool.map_async(profile_worker, [(refs, engine, phases, bounds, db_path,
                                                device, command, queue, budget_ms, timer)
                                               for device in devices])
        while not jobs.ready():
            try:
                queue.get(timeout=0.5)
            except Empty:
                continue
            on_point()
        return jobs.get()


def command_line() -> str:
    return " ".join(["python -m dooly_fx", *sys.argv[1:]])
