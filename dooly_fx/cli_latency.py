"""CLI verbs of the latency stages: fit, predict, validate-steps (see docs/cli.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from dooly_fx.cli_args import (
    add_verb,
    check_measured,
    collect_models,
    db_option,
    engine_args,
    host_probe_arg,
    host_probe_option,
    non_negative_float,
    open_db,
    positive_int,
)
from dooly_fx.db import LatencyDB
from dooly_fx.engine import EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.hostinfo import require_device
from dooly_fx.ui import err, out, progress, write_json


def _environment(db: LatencyDB, device: str) -> dict:
    """The DB's environment for `device`: the newest recorded one of that device type (a CPU
    machine can predict for a GPU from a GPU-profiled DB)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    envs = [e for e in db.environments() if e.get("device_type") == kind]
    if not envs:
        have = ", ".join(f"{e['device']} ({e.get('device_type')})" for e in db.environments())
        raise UserError(f"{db.path}: no {kind} environment profiled in this DB (it has: "
                        f"{have or 'none'})")
    return envs[-1]


def model_name(db: LatencyDB, ref: str) -> str:
    """A model as the DB names it: a name recorded there as given, the zoo name of a zoo HF id,
    else the zoo name, HF id, config.json or folder resolved to its model name (only this
    case imports transformers); a reference that resolves to nothing is returned as given."""
    from dooly_fx.zoo import ZOO

    if any(m["name"] == ref for m in db.models()):
        return ref
    zoo = next((e.name for e in ZOO.values() if e.hf_id.lower() == ref.lower()), None)
    if zoo is not None:
        return zoo
    from dooly_fx.spec import resolve_model

    try:
        return resolve_model(ref).name
    except UserError:
        if Path(ref).exists():
            raise  # a config or folder that is not a model: say why
        return ref  # not a model anywhere: `load` says what the DB has


def load_model(db: LatencyDB, ref: str, env: dict, engine: EngineProfile):
    """`predict.load` of a model as the DB names it (`model_name`); a model the DB never
    recorded under `engine` is captured here instead and its units looked up by signature,
    so any model whose units other models already profiled needs no profile of its own.
    Signatures the DB lacks are the returned `Loaded.missing`; a reference that names no
    model is `load`'s UserError (it lists what the DB has)."""
    from dooly_fx.engine import PHASES
    from dooly_fx.predict import from_units, load
    from dooly_fx.spec import resolve_model

    name = model_name(db, ref)
    if db.model_units(name, env["fingerprint"], engine.label):
        return load(db, name, env["fingerprint"], engine.label)
    try:
        spec = resolve_model(ref)
    except UserError:
        return load(db, name, env["fingerprint"], engine.label)
    coll = collect_models([spec], engine, PHASES)
    rows = coll.unit_rows(spec.name)
    loaded = from_units(db, spec.name, env["fingerprint"], engine.label, rows,
                        coll.configs[spec.name])
    covered = len({r["signature"] for r in rows}) - len(loaded.missing)
    out.print(f"{spec.name}: not recorded in the DB under {engine.label}; captured here, "
              f"{covered} of its {covered + len(loaded.missing)} unit signatures are profiled "
              f"on {env['device']}")
    return loaded


def model_spec(ref: str, name: str, config: dict, source: str):
    """The model to build for a measurement: `ref` resolved (zoo, config, HF cache), else the
    config the DB recorded for it under `name` (`source` says where it came from)."""
    from dooly_fx.spec import resolve_model, spec_from_config

    try:
        return resolve_model(ref)
    except UserError:
        return spec_from_config(name, config, source)


def _engine(args: argparse.Namespace) -> EngineProfile:
    return EngineProfile(engine=args.engine, attn_impl=args.attn, dtype=args.dtype,
                         kernels=args.kernels)


def cmd_fit(args: argparse.Namespace) -> None:
    """Fit a latency model for every profiled signature whose fit is missing or stale; store
    each with its k-fold held-out error. Idempotent: a second run fits nothing.

        python -m dooly_fx fit --db bench/results/h100.db
        python -m dooly_fx fit --db lat.db --json fits.json
    """
    from dooly_fx.predict import fit_db

    with LatencyDB.open(args.db, create=False) as db:
        envs = db.environments()
        summaries = []
        with progress() as bar:
            for env in envs:
                total = db.conn.execute("SELECT COUNT(DISTINCT signature) FROM points WHERE "
                                        "env = ? AND status = 'ok'",
                                        (env["fingerprint"],)).fetchone()[0]
                task = bar.add_task(f"fit · {env['device']}", total=total)
                summary = fit_db(db, env["fingerprint"], on_unit=lambda t=task: bar.advance(t))
                summaries.append((env, summary))
    table = Table(title=f"fits · {args.db}")
    for col in ("environment", "kind", "fitted now", "methods", "median cv MAPE",
                "worst cv MAPE"):
        table.add_column(col, justify="left" if col in ("environment", "kind", "methods")
                         else "right")
    payload = []
    for env, summary in summaries:
        kinds: dict[str, list[dict]] = {}
        for row in summary.fitted:
            kinds.setdefault(row["kind"], []).append(row)
        for kind, rows in sorted(kinds.items()):
            errs = sorted(r["cv_mape"] for r in rows if r["cv_mape"] is not None)
            methods = {r["method"] for r in rows}
            table.add_row(env["device"], kind, str(len(rows)),
                          ", ".join(f"{m}×{sum(r['method'] == m for r in rows)}"
                                    for m in sorted(methods)),
                          f"{errs[len(errs) // 2]:.1%}" if errs else "-",
                          f"{errs[-1]:.1%}" if errs else "-")
        payload.append({"environment": env["fingerprint"], "device": env["device"],
                        "fitted": summary.fitted, "unchanged": summary.unchanged,
                        "seconds": summary.seconds})
        out.print(f"{env['device']}: {len(summary.fitted)} fitted, {summary.unchanged} "
                  f"unchanged, {summary.seconds:.2f} s")
    if any(s.fitted for _, s in summaries):
        out.print(table)
    if args.json:
        write_json(args.json, {"db": str(args.db), "environments": payload})


def cmd_predict(args: argparse.Namespace) -> None:
    """Predict one engine step of a model from a fitted latency DB, unit by unit.

    A batch is comma-separated items: prefill:BxS (B sequences of S new tokens), decode:BxP
    (B sequences, one new token, P cached), mixed:BxS+P.

        python -m dooly_fx predict llama-3.1-8b --db bench/results/h100.db --device cuda \\
            --batch prefill:2x512
        python -m dooly_fx predict qwen2.5-7b --db lat.db --device cpu --batch decode:30x1024 \\
            --json step.json
    """
    from dooly_fx.predict import at_host_speed, predict_step
    from dooly_fx.validate import parse_batch

    batch = parse_batch(args.batch)
    probe = host_probe_arg(args.host_probe)
    with open_db(args.db) as db:
        env = _environment(db, args.device)
        loaded = at_host_speed(load_model(db, args.model, env, _engine(args)), probe)
        name = loaded.model
    step = predict_step(loaded, batch, skew=args.skew)
    table = Table(title=f"{name} · {step.phase} {step.values} · {env['device']} · "
                        f"{loaded.engine}")
    dev = "GPU" if env.get("device_type") == "cuda" else "CPU"  # what runs the kernels
    for col in ("unit", "kind", "count", "point", f"{dev} ms/call", f"{dev} ms", "host ms",
                "share"):
        table.add_column(col, justify="left" if col in ("unit", "kind", "point") else "right")
    for u in sorted(step.units, key=lambda u: -u.count * step.in_step_ms(u)):
        flag = " (extrapolated)" if u.extrapolated else ""
        ms = step.in_step_ms(u)
        table.add_row(u.role, u.kind, str(u.count), json.dumps(u.point) + flag,
                      f"{ms:.4f}", f"{u.count * ms:.3f}", f"{u.count * u.host_ms:.3f}",
                      f"{u.count * ms / step.gpu_ms:.1%}" if step.gpu_ms else "-")
    out.print(table)
    bound = dev if step.gpu_ms >= step.host_ms else "host"
    engine = f"engine batch preparation {step.prepare_ms:.3f} ms, then " \
        if step.prepare_ms else ""
    out.print(f"total {step.total_ms:.3f} ms ({engine}{bound}-bound forward: {dev} "
              f"{step.gpu_ms:.3f} ms, host {step.host_ms:.3f} ms)")
    if step.clock_ms:
        out.print(f"GPU: {step.clock_ms:.3f} ms of it is the lower clock of a GPU kept busy "
                  "(units timed under sustained load; docs/predict.md, \"Sustained load\")")
    if step.units_host_ms is not None:
        out.print(f"host: the engine's whole forward as profiled (forward_host); the units' "
                  f"own issue times sum to {step.units_host_ms:.3f} ms")
    if loaded.probe_ms:
        out.print(f"host-side times at a host speed of {loaded.probe_ms:.3f} ms per host probe" + (
            f" (×{loaded.host_scale:.2f} the DB's: host work follows the probe at elasticity "
            f"{loaded.host_elasticity:.2f})" if probe else
            " (the DB's; --host-probe sets another)"))
    if step.setup_ms:
        out.print(f"a step at an attention shape new to the engine also pays "
                  f"{step.setup_ms:.3f} ms of per-shape setup")
    outside = [u for u in step.units if u.extrapolated]
    if outside:
        share = sum(u.count * u.gpu_ms for u in outside) / step.gpu_ms if step.gpu_ms else 1.0
        err.print(f"[yellow]warning: {len(outside)} of {len(step.units)} units ({share:.0%} of "
                  "the GPU time) are predicted outside the points profiled for them "
                  "(extrapolated): profile with larger bounds to measure this step's range",
                  soft_wrap=True)
    if args.json:
        write_json(args.json, {"model": name, "environment": env["fingerprint"],
                               "device": env["device"], "batch": batch, **step.to_json(),
                               "host_speed": {"probe_ms": loaded.probe_ms,
                                              "db_probe_ms": loaded.host_probe_ms,
                                              "elasticity": loaded.host_elasticity,
                                              "host_scale": loaded.host_scale}})


def cmd_validate_steps(args: argparse.Namespace) -> None:
    """Time real forward steps of a model (random weights) and compare with the prediction
    from the DB: per-step error, median and p90 absolute percentage error.

        python -m dooly_fx validate-steps llama-3.1-8b --db h100.db --device cuda \\
            --json steps.json
        python -m dooly_fx validate-steps llama-3.1-8b --db h100.db --device cuda \\
            --steps prefill:1x512,decode:8x1024
        python -m dooly_fx validate-steps llama-3.1-8b --db h100.db --measured steps.json
    """
    from dooly_fx.fused import profiled_kinds
    from dooly_fx.hostinfo import machine
    from dooly_fx.predict import load
    from dooly_fx.validate import (
        PAGED_STEPS,
        STANDARD_STEPS,
        MeasuredStep,
        compare,
        measure_steps,
    )

    engine = _engine(args)
    with open_db(args.db) as db:
        env = _environment(db, args.device)
        name = model_name(db, args.model)
        loaded = load(db, name, env["fingerprint"], engine.label)
    if args.fidelity and engine.engine != "padded":
        raise UserError("--fidelity profiles the padded engine's forward; use it without "
                        "--engine paged")
    if args.fidelity or not args.measured:
        spec = model_spec(args.model, name, loaded.config, f"{args.db}: {name}")
    if args.measured:
        try:
            old = json.loads(Path(args.measured).read_text())
            measured = [MeasuredStep(**{k: s[k] for k in MeasuredStep.__dataclass_fields__
                                        if k in s}) for s in old["steps"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{args.measured}: not a validate-steps JSON ({exc})") from None
        check_measured(args.measured, old, name, engine.label)
        measured_on = old.get("measured_on")
    else:
        steps = args.steps.split(";") if args.steps is not None else \
            list(PAGED_STEPS if engine.engine == "paged" else STANDARD_STEPS)
        device = "cuda" if args.device == "cuda" else "cpu"
        require_device(device)
        with progress() as bar:
            task = bar.add_task(f"steps · {spec.name}", total=len(steps))
            measured = measure_steps(spec, engine, steps, device, reps=args.reps,
                                     on_step=lambda: bar.advance(task),
                                     fused_kinds=profiled_kinds(loaded))
        measured_on = machine(device)
    report = compare(loaded, measured)
    report.update(environment=env["fingerprint"], device=env["device"],
                  measured_on=measured_on)
    if args.fidelity:
        from dooly_fx.validate import unit_fidelity

        require_device(args.device)
        rows = unit_fidelity(spec, engine, loaded, args.fidelity.split(";"),
                             "cuda" if args.device == "cuda" else "cpu")
        errors = sorted(abs(r["error"]) for r in rows if r["error"] is not None)
        loaded_errors = sorted(abs(r["loaded_error"]) for r in rows
                               if r["loaded_error"] is not None)
        report["fidelity"] = {"units": rows,
                              "median_ape": errors[len(errors) // 2] if errors else None,
                              "loaded_median_ape": loaded_errors[len(loaded_errors) // 2]
                              if loaded_errors else None}
        if errors:
            out.print(f"unit fidelity (prediction vs the unit's kernels inside the step): "
                      f"median APE {report['fidelity']['median_ape']:.1%} over {len(rows)} "
                      f"units ({report['fidelity']['loaded_median_ape']:.1%} with each "
                      "unit's share of the step's clock under load)")
    elif args.measured and "fidelity" in old:
        report["fidelity"] = old["fidelity"]
    paged = engine.engine == "paged"
    table = Table(title=f"validate-steps · {name} · {engine.label} · {env['device']}")
    columns = ["step", "phase", "measured ms", "predicted ms", "GPU ms", "host ms", "error",
               "at host speed"]
    if paged:  # the engine's batch preparation, and the first run at a new shape
        columns[4:4] = ["prepare ms"]
        columns += ["first run ms", "+ setup ms", "first error"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("step", "phase") else "right")
    for row in report["steps"]:
        if row["skipped"]:
            table.add_row(row["spec"], "-", "-", "-", "-", "-", row["skipped"])
            continue
        flag = " *" if row["extrapolated"] else ""
        cells = [row["spec"], row["phase"], f"{row['median_ms']:.3f}",
                 f"{row['predicted_ms']:.3f}", f"{row['gpu_ms']:.3f}", f"{row['host_ms']:.3f}",
                 f"{row['error']:+.1%}{flag}",
                 f"{row['at_host_error']:+.1%}" if "at_host_error" in row else "-"]
        if paged:
            cells[4:4] = [f"{row.get('prepare_ms', 0.0):.3f}"]
            first = row.get("first_ms")
            cells += ["-" if first is None else f"{first:.3f}",
                      f"{row.get('setup_ms', 0.0):.3f}",
                      f"{row['first_error']:+.1%}" if "first_error" in row else "-"]
        table.add_row(*cells)
    out.print(table)
    if report["median_ape"] is not None:
        out.print(f"median APE {report['median_ape']:.1%} · p90 APE {report['p90_ape']:.1%}"
                  " (* = outside the profiled range)")
    if "at_host_median_ape" in report:
        out.print(f"at the speed the host had while each step ran (host probe): median APE "
                  f"{report['at_host_median_ape']:.1%} · p90 APE {report['at_host_p90_ape']:.1%}")
    if "first_median_ape" in report:
        out.print(f"first runs (a new attention shape, prediction + per-shape setup): median "
                  f"APE {report['first_median_ape']:.1%}")
    if args.json:
        write_json(args.json, report)


def cmd_coverage(args: argparse.Namespace) -> None:
    """Per unit of each model: covered or not in the DB's environment, profiled range, points,
    fit method and held-out error, and share of a reference prefill and decode step.

        python -m dooly_fx coverage llama-3.1-8b qwen2.5-7b --db bench/results/h100.db
        python -m dooly_fx coverage gemma-2-9b --db h100.db --html coverage/ --json cov.json
    """
    from dataclasses import asdict

    from dooly_fx.coverage import coverage, write_html

    engine = _engine(args)
    payload = []
    with open_db(args.db) as db:
        env = _environment(db, args.device)
        for ref in args.models:
            loaded = load_model(db, ref, env, engine)
            name = loaded.model
            rows = coverage(db, loaded)
            table = Table(title=f"coverage · {name} · {engine.label} · {env['device']}")
            for col in ("unit", "kind", "covered", "ok/failed/oom", "range", "fit", "cv MAPE",
                        "prefill share", "decode share"):
                table.add_column(col, justify="left" if col in ("unit", "kind", "range", "fit")
                                 else "right")
            for r in rows:
                table.add_row(", ".join(r.roles)[:60], r.kind,
                              "yes" if r.covered else "[red]NO[/red]",
                              f"{r.ok}/{r.failed}/{r.oom}",
                              ", ".join(f"{n} {lo:g}–{hi:g}" for n, (lo, hi) in r.ranges.items()),
                              r.method or "-", "-" if r.cv_mape is None else f"{r.cv_mape:.1%}",
                              f"{r.share['prefill']:.1%}" if "prefill" in r.share else "-",
                              f"{r.share['decode']:.1%}" if "decode" in r.share else "-")
            out.print(table)
            uncovered = sum(not r.covered for r in rows)
            out.print(f"{name}: {len(rows) - uncovered}/{len(rows)} unit signatures covered")
            entry = {"model": name, "engine": engine.label, "units": [
                {**asdict(r), "covered": r.covered} for r in rows]}
            if args.html:
                entry["html"] = str(write_html(db, loaded, rows, Path(args.html)))
                out.print(f"report: {entry['html']}")
            payload.append(entry)
    if args.json:
        write_json(args.json, {"environment": env["fingerprint"], "device": env["device"],
                               "models": payload})


def add_verbs(verbs) -> None:
    """Register this module's verbs on the main parser's subparsers."""
    fit = add_verb(verbs, "fit", cmd_fit, "fit latency models for profiled signatures")
    fit.add_argument("--db", required=True, metavar="FILE")
    fit.add_argument("--json", metavar="FILE", help="write what was fitted as JSON")

    cov = add_verb(verbs, "coverage", cmd_coverage,
                   "per-unit coverage and fit quality of models")
    cov.add_argument("models", nargs="+", metavar="MODEL")
    db_option(cov)
    cov.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    engine_args(cov)
    cov.add_argument("--html", metavar="DIR", help="write plots and an index.html per model")
    cov.add_argument("--json", metavar="FILE")

    for name, func, text in (
            ("predict", cmd_predict, "predict one engine step from the DB"),
            ("validate-steps", cmd_validate_steps, "time real steps and compare with predict")):
        verb = add_verb(verbs, name, func, text)
        verb.add_argument("model", metavar="MODEL")
        db_option(verb)
        verb.add_argument("--device", default="cuda", choices=("cpu", "cuda"),
                          help="which of the DB's environments (and where to measure)")
        engine_args(verb)
        verb.add_argument("--json", metavar="FILE")
        if name == "predict":
            verb.add_argument("--batch", required=True,
                              help="e.g. prefill:2x512 or decode:30x1024 or mixed:2x256+1024")
            verb.add_argument("--skew", type=non_negative_float, default=0.0,
                              help="MoE routing skew (Zipf exponent; 0 = uniform)")
            host_probe_option(verb)
        else:
            verb.add_argument("--steps", metavar="SPECS",
                              help="';'-separated batch specs (default: a standard set)")
            verb.add_argument("--reps", type=positive_int, default=10,
                              help="timed repetitions per step")
            verb.add_argument("--fidelity", metavar="SPECS",
                              help="';'-separated steps at which to compare each leaf unit's "
                                   "prediction with its kernels' time inside the real step")
            verb.add_argument("--measured", metavar="FILE",
                              help="re-predict the steps of an earlier validate-steps JSON "
                                   "instead of measuring")
