"""Command line: `python -m dooly_fx <verb> ...`.

User mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from rich.markup import escape
from rich.table import Table

from dooly_fx.cli_args import (
    OneLineErrors,
    add_verb,
    check_paths,
    collect_models,
    engine_args,
    non_negative_float,
    positive_float,
    positive_int,
)
from dooly_fx.db import DEFAULT_TIMER, TIMERS
from dooly_fx.engine import PHASES, EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.ui import err as _err
from dooly_fx.ui import out as _out
from dooly_fx.ui import progress as _progress
from dooly_fx.ui import write_json as _write_json


def cmd_zoo(args: argparse.Namespace) -> None:
    """List the built-in models.

        python -m dooly_fx zoo
        python -m dooly_fx zoo --json zoo.json
    """
    from dooly_fx.zoo import ZOO

    rows = []
    for entry in ZOO.values():
        c = entry.config
        rows.append({
            "name": entry.name, "hf_id": entry.hf_id, "family": entry.family,
            "layers": c.get("num_hidden_layers"), "hidden_size": c.get("hidden_size"),
            "heads": c.get("num_attention_heads"), "kv_heads": c.get("num_key_value_heads"),
            "intermediate_size": c.get("intermediate_size"), "vocab_size": c.get("vocab_size"),
            "experts": c.get("num_local_experts") or c.get("num_experts"),
            "sliding_window": c.get("sliding_window"),
        })
    if args.json:
        _write_json(args.json, {"models": rows})
    table = Table(title=f"dooly_fx zoo ({len(rows)} models)")
    for col in ("name", "hf_id", "family", "layers", "hidden_size", "heads", "kv_heads",
                "intermediate_size", "vocab_size", "experts", "sliding_window"):
        table.add_column(col, justify="left" if col in ("name", "hf_id", "family") else "right")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    _out.print(table)


def cmd_capture(args: argparse.Namespace) -> None:
    """Capture models symbolically and print their labelled op units.

        python -m dooly_fx capture llama-3.1-8b
        python -m dooly_fx capture qwen2.5-7b --phase decode --engine paged --json out.json
        python -m dooly_fx capture llama-3.1-8b mistral-7b qwen2.5-7b --shared
        python -m dooly_fx capture path/to/config.json --full-depth
    """
    from dooly_fx.hostinfo import machine
    from dooly_fx.report import analyze_model, shared_signatures
    from dooly_fx.spec import resolve_model

    engine = EngineProfile(engine=args.engine, attn_impl=args.attn, dtype=args.dtype,
                           kernels=args.kernels)
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    specs = [resolve_model(ref) for ref in args.models]
    reports = []
    with _progress() as progress:
        task = progress.add_task("capture", total=len(specs) * len(phases))
        for spec in specs:
            progress.update(task, description=f"capture {spec.name}")
            reports.append(analyze_model(spec, engine, phases, full_depth=args.full_depth,
                                         on_phase=lambda: progress.advance(task)))
    payload: dict = {"engine": engine.label, "models": [r.to_json() for r in reports],
                     "captured_with": {**machine("cpu"), "python": platform.python_version()}}
    shared = shared_signatures(reports) if len(reports) > 1 else []
    if len(reports) > 1:
        payload["shared"] = shared
    if args.json:
        _write_json(args.json, payload)
    if not args.quiet:
        for report in reports:
            if not args.shared:
                _print_units(report)
        _print_summary(reports)
        if args.shared:
            _print_shared(reports, shared)


def _sweep_args(args: argparse.Namespace):
    from dooly_fx.spec import resolve_model
    from dooly_fx.sweep import Bounds

    for name in ("max_tokens", "max_seqs", "max_context"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
    engine = EngineProfile(engine=args.engine, attn_impl=args.attn, dtype=args.dtype,
                           kernels=args.kernels)
    bounds = Bounds(args.max_tokens, args.max_seqs, args.max_context, args.adaptive)
    phases = list(PHASES) if args.phase == "all" else [args.phase]
    return [resolve_model(ref) for ref in args.models], engine, bounds, phases


def cmd_plan(args: argparse.Namespace) -> None:
    """What is covered and missing in a latency DB, and what dedup saves.

        python -m dooly_fx plan llama-3.1-8b mistral-7b qwen2.5-7b --db lat.db --device cuda
        python -m dooly_fx plan llama-3.1-8b --db lat.db --device cpu --max-tokens 64 --json p.json
    """
    from dooly_fx.db import LatencyDB
    from dooly_fx.profile import plan, plan_environment

    specs, engine, bounds, phases = _sweep_args(args)
    coll = collect_models(specs, engine, phases)
    with LatencyDB.open_existing_or_empty(args.db) as db:
        env = plan_environment(db, args.device, args.timer)
        report = plan(db, coll, env, bounds, [s.name for s in specs])
    if args.json:
        _write_json(args.json, report)
    _print_plan(report)


def _print_plan(report: dict) -> None:
    table = Table(title=f"plan · {report['device']} · env {report['environment'][:12]}",
                  title_justify="left")
    for col in ("model", "signatures", "points", "covered", "missing", "est. missing s",
                "est. s alone"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report["models"]:
        table.add_row(m["model"], str(m["signatures"]), str(m["points"]),
                      str(m["covered_points"]), str(m["missing_points"]),
                      f"{m['estimated_missing_seconds']:.0f}",
                      f"{m['estimated_seconds_alone']:.0f}")
    _out.print(table)
    for m in report["models"]:
        if m["captured_not_recorded"]:
            _out.print(f"{m['model']}: planned from its units as recorded in the DB; this "
                       f"machine's capture of it has {m['captured_not_recorded']} signatures "
                       "they lack, which `profile` measures where it captures so too")
    _out.print(
        f"unique signatures {report['unique_signatures']} · unique points "
        f"{report['unique_points']} · missing {report['missing_points']} "
        f"(~{report['estimated_missing_seconds']:.0f} s) · dedup "
        f"~{report['estimated_seconds_dedup']:.0f} s vs per-model "
        f"~{report['estimated_seconds_per_model']:.0f} s · saving {report['saving']:.1%}")


def cmd_profile(args: argparse.Namespace) -> None:
    """Profile the missing points of the given models into a latency DB (resumable).

        python -m dooly_fx profile llama-3.1-8b mistral-7b --db lat.db --device cuda
        python -m dooly_fx profile llama-3.1-70b --db lat.db --devices 0,1,2,3
        python -m dooly_fx profile llama-3.1-8b --db lat.db --device cpu --max-tokens 64 \\
            --max-seqs 4 --max-context 256
    """
    from dooly_fx.db import LatencyDB
    from dooly_fx.profile import (
        command_line,
        environment,
        plan,
        profile,
        record_models,
        spawn_workers,
    )

    specs, engine, bounds, phases = _sweep_args(args)
    devices = _devices(args)
    budget = (args.warmup_ms, args.rep_ms)
    coll = collect_models(specs, engine, phases)
    with LatencyDB.open(args.db) as db:
        env = environment(devices[0], args.timer)
        if args.refresh_host:
            _refresh_host(db, coll, env, devices[0])
            return
        before = plan(db, coll, env, bounds, [s.name for s in specs], local=True)
        for m in before["models"]:
            if m["missing_points"] == 0:
                _out.print(f"{m['model']}: all {m['points']} points covered on {env.device}; "
                           "nothing to profile")
        if before["missing_points"] == 0 and before["missing_sustained"] == 0:
            record_models(db, coll, env)  # this machine's capture of their units
            if args.json:
                _write_json(args.json, before)
            return
        if before["missing_sustained"]:
            _out.print(f"{before['missing_sustained']} measured signatures are not yet timed "
                       "under sustained load; timing them too")
        total = sum(len(points_of) for points_of in _grids(coll, bounds))
        with _progress(eta=True) as progress:
            task = progress.add_task(f"profile on {env.device}", total=total)
            advance = lambda: progress.advance(task)  # noqa: E731
            interrupted = "interrupted: measured points are saved; run the same command " \
                "again to finish the rest"
            try:
                if len(devices) > 1:
                    results = spawn_workers([s.name for s in specs], engine, phases, bounds,
                                            args.db, devices, command_line(), advance, budget,
                                            args.timer)
                else:
                    # Ctrl-C only raises a flag that the profiler reads between points: a
                    # KeyboardInterrupt raised inside a finaliser would be swallowed.
                    with _stop_on_sigint() as stop:
                        results = [profile(db, coll, env, bounds, devices[0], command_line(),
                                           on_point=advance, budget_ms=budget, stop=stop)]
                    if results[0].interrupted:
                        raise UserError(interrupted)
            except KeyboardInterrupt:
                raise UserError(interrupted) from None
        after = plan(db, coll, env, bounds, [s.name for s in specs], local=True)
    if args.json:
        _write_json(args.json, after)
    _print_profile(results, before, after)


def _refresh_host(db, coll, env, device: str) -> None:
    """`profile --refresh-host`: host times measured again beside a host probe."""
    from dooly_fx.profile import command_line, record_models, refresh_host, refresh_plan

    record_models(db, coll, env)
    todo = refresh_plan(db, coll, env)
    total = sum(map(len, todo.values()))
    if total == 0:
        _out.print(f"every measured signature on {env.device} has host times with a host "
                   "probe; nothing to refresh")
        return
    with _progress(eta=True) as progress:
        task = progress.add_task(f"host times on {env.device}", total=total)
        signatures, points = refresh_host(db, coll, env, device, command_line(), todo,
                                          on_point=lambda: progress.advance(task))
    _out.print(f"host time measured again with a host probe at {points} points of "
               f"{signatures} signatures; run `python -m dooly_fx fit --db {db.path}`")


@contextmanager
def _stop_on_sigint():
    """SIGINT sets a flag instead of raising; yields the function that reads it."""
    import signal
    import threading

    flag = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _grids(coll, bounds):
    from dooly_fx.sweep import points

    return [points(case.canonical, bounds) for case in coll.cases.values()]


def _devices(args: argparse.Namespace) -> list[str]:
    if args.devices:
        try:
            ids = [int(d) for d in args.devices.split(",")]
        except ValueError:
            raise UserError(f"--devices takes GPU indices like 0,1,2; got '{args.devices}'") \
                from None
        return [f"cuda:{i}" for i in ids]
    return [args.device]


def _print_profile(results, before: dict, after: dict) -> None:
    table = Table(title="profile", title_justify="left")
    for col in ("measured", "failed", "oom (infeasible)", "sustained", "device seconds",
                "missing before", "missing after"):
        table.add_column(col, justify="right")
    table.add_row(str(sum(r.measured for r in results)), str(sum(r.failed for r in results)),
                  str(sum(r.oom for r in results)), str(sum(r.sustained for r in results)),
                  f"{sum(r.device_seconds for r in results):.1f}",
                  str(before["missing_points"]), str(after["missing_points"]))
    _out.print(table)
    errors = [e for r in results for e in r.errors]
    for line in errors[:10]:
        _err.print(f"[yellow]failed: {escape(line)}")
    if len(errors) > 10:
        _err.print(f"[yellow]... and {len(errors) - 10} more failures")


def _print_units(report) -> None:
    for phase in report.phases:
        regime = f" [{phase.regime}]" if phase.regime else ""
        title = escape(f"{report.model} · {phase.phase}{regime} · {report.engine.label}")
        table = Table(title=title, title_justify="left")
        table.add_column("unit")
        table.add_column("kind")
        table.add_column("count", justify="right")
        table.add_column("config dims (provenance = value)")
        table.add_column("request dims")
        table.add_column("signature")
        for row in phase.graph.units:
            config = ", ".join(f"{k}={v}" for k, v in row.config_dims.items())
            table.add_row(row.role, row.kind, str(row.count), config,
                          ", ".join(row.request_dims), row.signature.key[:12])
        _out.print(table)


def _print_summary(reports) -> None:
    table = Table(title="summary", title_justify="left")
    for col in ("model", "layers (built/total)", "units", "unit instances", "unique signatures",
                "config dims", "request dims", "unlabelled dims", "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for report in reports:
        s = report.summary()
        table.add_row(report.model, f"{s['built_layers']}/{s['total_layers']}", str(s["units"]),
                      str(s["unit_instances"]), str(s["unique_signatures"]),
                      str(s["config_dims"]), str(s["request_dims"]), str(s["unlabelled_dims"]),
                      f"{s['capture_seconds']:.2f}")
    _out.print(table)
    for report in reports:
        s = report.summary()
        if s["unlabelled"]:
            _err.print(f"[yellow]{report.model}: unlabelled values: {s['unlabelled']}")
        if s["specialised_fields"]:
            _err.print(f"[yellow]{report.model}: config fields forced to constants by the model "
                       f"code (no provenance): {', '.join(s['specialised_fields'])}")


def _print_shared(reports, shared: list[dict]) -> None:
    table = Table(title="signatures shared across models", title_justify="left")
    table.add_column("signature")
    table.add_column("kind")
    table.add_column("example unit")
    table.add_column("config dims")
    table.add_column("models")
    for entry in shared:
        dims = ", ".join(f"{k}={v}" for k, v in entry["config_dims"].items())
        table.add_row(entry["signature"][:12], entry["kind"], entry["role"], dims,
                      ", ".join(entry["models"]))
    _out.print(table)
    per_model = Table(title="shared per model", title_justify="left")
    for col in ("model", "unique signatures", "shared with another model"):
        per_model.add_column(col, justify="left" if col == "model" else "right")
    shared_keys = {e["signature"] for e in shared}
    for report in reports:
        sigs = report.signatures
        per_model.add_row(report.model, str(len(sigs)), str(len(sigs & shared_keys)))
    _out.print(per_model)


def cmd_upgrade_db(args: argparse.Namespace) -> None:
    """Upgrade a latency DB file in place to this version's schema (one transaction: all or
    nothing; timings, runs and model rows are kept).

    example:
      python -m dooly_fx upgrade-db bench/results/h100.db
    """
    from dooly_fx.db import upgrade

    start, end = upgrade(args.db)
    print(f"{args.db}: schema v{start} -> v{end}" if start != end
          else f"{args.db}: already at schema v{end}")


def cmd_forget(args: argparse.Namespace) -> None:
    """Mark the measured points of some unit kinds of the given models to be measured again,
    e.g. after their lowering changed; the next `profile` of those models re-measures them
    (resumable as usual). The models' units are read from the DB as profiled for `--device`.

    example:
      python -m dooly_fx forget phi-3-mini gemma-2-9b --kind paged_attention --engine paged \
          --db bench/results/h100.db --device cuda
    """
    from dooly_fx.cli_latency import _environment, model_name
    from dooly_fx.db import LatencyDB

    engine = EngineProfile(engine=args.engine, attn_impl=args.attn, dtype=args.dtype,
                           kernels=args.kernels).label
    with LatencyDB.open(args.db, create=False) as db:
        env = _environment(db, args.device)["fingerprint"]
        sigs: set[str] = set()
        kinds: set[str] = set()
        for ref in args.models:
            units = db.model_units(model_name(db, ref), env, engine)
            if not units:
                raise UserError(f"{ref}: not profiled for {engine} in {args.db}")
            for u in units:
                kinds.add(kind := db.signature(u["signature"])["kind"])
                if kind in args.kind:
                    sigs.add(u["signature"])
        if unknown := sorted(set(args.kind) - kinds):
            raise UserError(f"no unit of kind {', '.join(unknown)} in {', '.join(args.models)} "
                            f"(their kinds: {', '.join(sorted(kinds))})")
        marked = db.forget(env, sorted(sigs), f"forgotten: measure again ({' '.join(sys.argv)})")
    print(f"{marked} points of {len(sigs)} signatures will be measured again by the next "
          f"profile of {' '.join(args.models)}")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="python -m dooly_fx",
        description="Predict LLM serving latency from symbolic captures and per-op profiles.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    zoo = add_verb(verbs, "zoo", cmd_zoo, "list the built-in models")
    zoo.add_argument("--json", metavar="FILE", help="also write the list as JSON")

    cap = add_verb(verbs, "capture", cmd_capture,
                   "capture models and print labelled op units")
    cap.add_argument("models", nargs="+", metavar="MODEL",
                     help="zoo name, HF id (zoo or local HF cache), config.json or model folder")
    cap.add_argument("--phase", default="all", choices=[*PHASES, "all"])
    engine_args(cap)
    cap.add_argument("--full-depth", action="store_true",
                     help="build every decoder layer instead of the repeating period")
    cap.add_argument("--shared", action="store_true",
                     help="show which signatures the given models share")
    cap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    cap.add_argument("--quiet", action="store_true", help="print no tables")

    for name, func, text in (("plan", cmd_plan, "covered vs missing points, and the dedup saving"),
                             ("profile", cmd_profile, "profile missing points into a latency DB")):
        verb = add_verb(verbs, name, func, text)
        verb.add_argument("models", nargs="+", metavar="MODEL")
        verb.add_argument("--db", required=True, metavar="FILE", help="latency DB (SQLite)")
        verb.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
        verb.add_argument("--max-tokens", type=positive_int, default=16384,
                          help="new tokens per step")
        verb.add_argument("--max-seqs", type=positive_int, default=256,
                          help="sequences per step")
        verb.add_argument("--max-context", type=positive_int, default=32768,
                          help="cached + new tokens of one sequence")
        verb.add_argument("--adaptive", action="store_true",
                          help="one-variable sweeps: every other grid value, the rest only "
                          "where latency bends")
        engine_args(verb)
        verb.add_argument("--phase", default="all", choices=[*PHASES, "all"])
        verb.add_argument("--timer", default=DEFAULT_TIMER, choices=TIMERS,
                          help="CUDA timer (docs/sweeps.md): do_bench (zeroing L2 flush, "
                          "event time) or stream (reading flush, replay overhead subtracted: "
                          "kernels as in an eager stream); each is its own environment")
        verb.add_argument("--json", metavar="FILE",
                          help="write the plan (for profile: after profiling) as JSON")
        if name == "profile":
            verb.add_argument("--devices", metavar="IDS",
                              help="GPU indices, one profiler process each (e.g. 0,1,2,3)")
            verb.add_argument("--warmup-ms", type=non_negative_float, default=25.0,
                              help="warm-up budget per point")
            verb.add_argument("--rep-ms", type=positive_float, default=100.0,
                              help="timed repetitions budget per point (>= 10 samples)")
            verb.add_argument("--refresh-host", action="store_true",
                              help="instead of profiling: measure the host time again, beside "
                                   "a host probe, at a few points of each signature profiled "
                                   "without one (DBs from before host probes)")

    up = add_verb(verbs, "upgrade-db", cmd_upgrade_db,
                  "upgrade a latency DB to this version's schema")
    up.add_argument("db", metavar="FILE")

    forget = add_verb(verbs, "forget", cmd_forget,
                      "mark units' points to be measured again")
    forget.add_argument("models", nargs="+", metavar="MODEL")
    forget.add_argument("--db", required=True, metavar="FILE")
    forget.add_argument("--kind", required=True, action="append",
                        help="unit kind (repeatable), e.g. paged_attention")
    forget.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    engine_args(forget)

    from dooly_fx.cli_latency import add_verbs

    add_verbs(verbs)
    from dooly_fx.cli_serve import add_verbs as add_serve_verbs
    from dooly_fx.cli_validate_serving import add_verbs as add_validate_serving_verbs

    add_serve_verbs(verbs)
    add_validate_serving_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        check_paths(args)
        func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
