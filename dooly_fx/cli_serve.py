"""CLI verbs of the serving stages: simulate, export-vidur (see docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.table import Table

from dooly_fx.cli_args import add_verb, engine_args, host_probe_arg, host_probe_option
from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.errors import UserError
from dooly_fx.ui import err, out, progress, write_json

PRESET_NAMES = ("transformers", "transformers-prefill-first", "vllm")
DEFAULT_SYNTHETIC_REQUESTS = 1000


def _open_db(path: str | None) -> LatencyDB:
    """The DB at `path`, or the DB shipped with the package (read-only)."""
    if path is None:
        return LatencyDB.open(SHIPPED_DB, create=False, readonly=True)
    return LatencyDB.open(path, create=False)


def _loaded(db: LatencyDB, args: argparse.Namespace):
    """(environment, Loaded) of the asked model, engine profile and device."""
    from dooly_fx.cli_latency import _engine, _environment, model_name
    from dooly_fx.predict import load

    env = _environment(db, args.device)
    loaded = load(db, model_name(db, args.model), env["fingerprint"], _engine(args).label)
    return env, loaded


def _requests(args: argparse.Namespace) -> tuple[list, dict]:
    """The workload's requests and a JSON description of it."""
    from dooly_fx.workload import LengthDist, read_trace, synthetic

    if args.trace:
        reqs = read_trace(args.trace, args.num_requests)
        return reqs, {"source": "trace", "trace": str(args.trace), "num_requests": len(reqs)}
    n = args.num_requests or DEFAULT_SYNTHETIC_REQUESTS
    reqs = synthetic(n, args.qps, args.arrival, args.cv, LengthDist.parse(args.prompt),
                     LengthDist.parse(args.output), args.seed)
    return reqs, {"source": "synthetic", "num_requests": n,
                  "qps": None if math.isinf(args.qps) else args.qps, "arrival": args.arrival,
                  "cv": args.cv, "prompt": args.prompt, "output": args.output, "seed": args.seed}


def _scheduler(args: argparse.Namespace, db: LatencyDB, env: dict, loaded):
    """The scheduler config, and how its KV cache was sized (JSON)."""
    from dooly_fx.serving import cache_layout, kv_bytes_per_token, size_kv_cache, weight_bytes
    from dooly_fx.simulate import preset

    overrides = {k: getattr(args, k) for k in ("max_batch_tokens", "max_seqs", "block_size")
                 if getattr(args, k) is not None}
    cfg = preset(args.policy, **overrides)
    if cfg.policy.startswith("transformers"):  # its cache's layer groups share the blocks
        cfg = replace(cfg, **cache_layout(loaded.config))
    if args.num_blocks is not None:
        cfg = replace(cfg, num_blocks=args.num_blocks)
        return cfg, {"source": "--num-blocks", "num_blocks": cfg.num_blocks,
                     "block_size": cfg.block_size, "tokens": cfg.num_pages}
    memory = env.get("memory_gib")
    if not memory:
        raise UserError(f"environment {env['device']} records no GPU memory size; pass "
                        "--num-blocks")
    sizing = size_kv_cache(loaded.model, float(memory) * 2**30, args.gpu_memory_fraction,
                           weight_bytes(db, loaded.model, env["fingerprint"], loaded.engine),
                           kv_bytes_per_token(loaded.config, args.dtype), cfg.block_size,
                           cfg.full_groups + cfg.sliding_groups)
    return replace(cfg, num_blocks=sizing.num_blocks), {"source": "memory", **sizing.to_json()}


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulate serving a workload on one GPU, with step times predicted from a latency DB.

    Step times come from the model's fitted units (FlatStepTime: token-wise units over the
    step's flattened tokens, attention per sequence). The KV cache is sized from the
    environment's GPU memory unless --num-blocks is given. Without --db, the shipped H100 DB.

        python -m dooly_fx simulate llama-3.1-8b --trace splitwise_conv.csv --num-requests 300
        python -m dooly_fx simulate llama-3.1-8b --qps 4 --num-requests 500 \\
            --prompt uniform:128:1024 --output 128 --policy vllm --json run.json
        python -m dooly_fx simulate qwen2.5-7b --qps 8 --arrival gamma --cv 2 \\
            --chrome-trace run.trace.json --plot run.png
    """
    from dooly_fx.predict import FlatStepTime, at_host_speed
    from dooly_fx.simulate import simulate

    reqs, workload = _requests(args)
    probe = host_probe_arg(args.host_probe)
    with _open_db(args.db) as db:
        env, loaded = _loaded(db, args)
        cfg, kv = _scheduler(args, db, env, loaded)
    loaded = at_host_speed(loaded, probe)
    step_time = FlatStepTime(loaded)
    started = time.perf_counter()
    with err.status(f"simulating {len(reqs)} requests"):
        result = simulate(reqs, step_time, cfg)
    wall = time.perf_counter() - started
    summary = result.summary()
    payload = {**summary, "model": loaded.model, "device": env["device"],
               "environment": env["fingerprint"], "engine": loaded.engine,
               "step_time": "FlatStepTime", "workload": workload, "scheduler": asdict(cfg),
               "kv_cache": kv, "wall_s": wall,
               "host_probe_ms": loaded.probe_ms}
    _print_simulation(payload)
    if args.json:
        write_json(args.json, payload)
    if args.chrome_trace:
        _writable(args.chrome_trace)
        result.write_chrome_trace(args.chrome_trace)
    if args.plot:
        _plot(result, args.plot, f"{loaded.model} · {cfg.policy} · {env['device']}")


def _writable(path: str) -> None:
    parent = Path(path).parent
    if not parent.exists():
        raise UserError(f"cannot write {path}: folder {parent} does not exist")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def _print_simulation(p: dict) -> None:
    table = Table(title=f"simulate · {p['model']} · {p['policy']} · {p['device']} · "
                        f"{p['engine']}", title_justify="left")
    for col in ("metric (ms)", "p50", "p90", "p99", "mean", "max"):
        table.add_column(col, justify="left" if col.startswith("metric") else "right")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"),
                       ("queueing", "queueing")):
        s = p[key]
        table.add_row(label, *(_ms(s[k]) for k in ("p50", "p90", "p99", "mean", "max")))
    out.print(table)
    tp, kv, batch = p["throughput"], p["kv_cache"], p["batch"]
    run = Table(show_header=False, title="run", title_justify="left")
    run.add_column("what")
    run.add_column("value", justify="right")
    rows = [
        ("requests", f"{p['num_requests']} ({p['completed']} completed, {p['rejected']} "
                     f"rejected, {p['dropped']} dropped)"),
        ("throughput", "-" if tp["requests_per_s"] is None else
         f"{tp['requests_per_s']:.2f} req/s · {tp['output_tokens_per_s']:,.0f} output tok/s"),
        ("simulated time", f"{tp['duration_s']:,.1f} s (busy {p['busy_s']:,.1f} s)"),
        ("steps", f"{p['steps']} (mean {batch['mean_tokens'] or 0:.1f} tokens, "
                  f"{batch['mean_seqs'] or 0:.1f} sequences)"),
        ("preemptions", f"{p['preemptions']} ({p['preempted_requests']} requests)"),
        ("KV cache", f"{kv['num_blocks']} blocks × {kv['block_size']} tokens, peak "
                     f"{p['kv_blocks']['peak']} ({kv['source']})"),
        ("host speed", "-" if not p["host_probe_ms"] else
         f"{p['host_probe_ms']:.3f} ms per host probe"),
        ("wall time", f"{p['wall_s']:.2f} s"),
    ]
    for row in rows:
        run.add_row(*row)
    out.print(run)


def _pyplot(path: str):
    """(matplotlib.pyplot, numpy) for writing a PNG to `path` (checked writable first)."""
    _writable(path)
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    return plt, np


def _plot(result, path: str, title: str) -> None:
    """PNG: CDFs of TTFT and TPOT, and KV blocks in use over simulated time."""
    plt, np = _pyplot(path)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for ax, values, name in ((axes[0], result.ttft, "TTFT"), (axes[1], result.tpot, "TPOT")):
        x = np.sort(values[np.isfinite(values)]) * 1e3
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size)
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
    start, blocks = result.kv_usage()
    axes[2].step(start, blocks / result.config.num_blocks, where="post")
    axes[2].set(xlabel="simulated time (s)", ylabel="KV blocks in use (fraction)",
                title="KV cache usage", ylim=(0, 1.05))
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_export_vidur(args: argparse.Namespace) -> None:
    """Write Vidur's mlp.csv and attention.csv for a model from the DB's fits, at Vidur's own
    profiling grids (times are predictions in GPU ms; see docs/cli.md for the mapping).

        python -m dooly_fx export-vidur llama-3.1-8b --out vidur/h100/meta-llama/Llama-3.1-8B
        python -m dooly_fx export-vidur qwen2.5-7b --db lat.db --out out/ --max-tokens 8192
    """
    from dooly_fx.vidur import MLP_OPS, export_vidur

    with _open_db(args.db) as db:
        env, loaded = _loaded(db, args)
    export = export_vidur(loaded, args.max_tokens, args.max_batch_size, args.block_size)
    mlp_path, attn_path = export.write(args.out)
    table = Table(title=f"export-vidur · {loaded.model} · {env['device']} · {loaded.engine}",
                  title_justify="left")
    grid = [export.mlp[0]["num_tokens"], *[r["num_tokens"] for r in export.mlp
                                          if r["num_tokens"] == 512], export.mlp[-1]["num_tokens"]]
    grid = list(dict.fromkeys(grid))
    table.add_column("Vidur op")
    table.add_column("our units")
    for n in grid:
        table.add_column(f"ms @ {n} tok", justify="right")
    by_tokens = {r["num_tokens"]: r for r in export.mlp}
    for op in MLP_OPS:
        roles = [r.removeprefix("model.layers.*.") for r in export.mapping.get(op, [])]
        none = "- (inside attention units)" if op == "attn_rope" else "-"
        table.add_row(op, ", ".join(roles) or none,
                      *(f"{by_tokens[n][f'time_stats.{op}.median']:.4f}" for n in grid))
    out.print(table)
    out.print(f"{mlp_path}: {len(export.mlp)} rows (per layer; emb per step) · {attn_path}: "
              f"{len(export.attention)} rows · not exported: "
              f"{', '.join(export.skipped) or 'nothing'}")
    if args.json:
        write_json(args.json, {"model": loaded.model, "device": env["device"],
                               "environment": env["fingerprint"], "engine": loaded.engine,
                               "files": {"mlp": str(mlp_path), "attention": str(attn_path)},
                               "rows": {"mlp": len(export.mlp),
                                        "attention": len(export.attention)},
                               "mapping": export.mapping, "not_exported": export.skipped})


def _serving_engine(db: LatencyDB, model: str, env: dict, attn: str, dtype: str):
    """The DB's profile of `model` for the continuous-batching engine: its own paged profile
    where there is one, else the padded one (FlatStepTime approximates the flat step)."""
    from dooly_fx.predict import load

    for engine in ("paged", "padded"):
        label = f"{engine}|{attn}|{dtype}"
        if any(m["name"] == model and m["engine"] == label for m in db.models(env["fingerprint"])):
            return load(db, model, env["fingerprint"], label)
    return load(db, model, env["fingerprint"], f"paged|{attn}|{dtype}")  # its error lists engines


def _serving_workload(args: argparse.Namespace) -> tuple[list, dict]:
    """The workload of validate-serving: simulate's, clipped and sped up as asked."""
    from dooly_fx.workload import Request

    reqs, workload = _requests(args)
    if args.speedup <= 0:
        raise UserError(f"--speedup must be positive, got {args.speedup}")
    reqs = [Request(r.id, r.arrival_s / args.speedup,
                    min(r.prompt_tokens, args.max_prompt or r.prompt_tokens),
                    min(r.output_tokens, args.max_output or r.output_tokens)) for r in reqs]
    start = reqs[0].arrival_s if reqs else 0.0
    reqs = [replace(r, arrival_s=r.arrival_s - start) for r in reqs]
    workload.update(speedup=args.speedup, max_prompt=args.max_prompt, max_output=args.max_output)
    return reqs, workload


def cmd_validate_serving(args: argparse.Namespace) -> None:
    """Serve a workload on transformers' continuous-batching engine (random weights, paged
    attention, requests submitted at their arrival times) and compare each request's TTFT and
    TPOT with the simulator's prediction of the same requests under the same engine settings
    (MAPE over requests, error of p50 and p90). Every engine step is recorded too, so the
    step-time model is also checked on the engine's real batches. --measured re-compares a
    saved run without a GPU.

        python -m dooly_fx validate-serving llama-3.2-1b --trace splitwise_conv.csv \\
            --num-requests 200 --max-prompt 2048 --max-output 256 --json serve.json
        python -m dooly_fx validate-serving qwen2.5-7b --attn eager --qps 4 --num-requests 100
        python -m dooly_fx validate-serving llama-3.2-1b --measured serve.json --db h100.db
    """
    from dooly_fx.cli_latency import _environment, model_name, model_spec
    from dooly_fx.engine import EngineProfile
    from dooly_fx.predict import FlatStepTime, at_host_speed
    from dooly_fx.validate_serving import Served, compare, serve

    with _open_db(args.db) as db:
        env = _environment(db, "cuda" if args.device == "cuda" else "cpu")
        name = model_name(db, args.model)
        loaded = _serving_engine(db, name, env, args.attn, args.dtype)
    if args.measured:
        try:
            old = json.loads(Path(args.measured).read_text())
            served = Served.from_json(old["measured"])
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            raise UserError(f"{args.measured}: not a validate-serving JSON ({exc})") from None
        workload = old.get("workload", {})
    else:
        if args.trace is None and args.qps is None:
            raise UserError("give a workload: --trace CSV or --qps X (or --measured FILE)")
        reqs, workload = _serving_workload(args)
        spec = model_spec(args.model, name, loaded.config, f"{args.db or SHIPPED_DB}: {name}")
        engine = EngineProfile(engine="paged", attn_impl=args.attn, dtype=args.dtype)
        device = "cuda" if args.device == "cuda" else "cpu"
        with progress() as bar:
            task = bar.add_task(f"serving {len(reqs)} requests · {spec.name} · paged|{args.attn}",
                                total=len(reqs))
            served = serve(spec, engine, reqs, device, num_blocks=args.num_blocks,
                           max_batch_tokens=args.max_batch_tokens, max_seqs=args.max_seqs,
                           block_size=args.block_size, time_limit_s=args.time_limit,
                           collect_garbage=args.gc == "on",
                           on_done=lambda n: bar.update(task, completed=n))
    st = served.settings
    at_host = at_host_speed(loaded, served.host_probe_ms)
    sched = served.scheduler(loaded.config)
    report, result = compare(served, lambda: FlatStepTime(at_host), sched)
    host = {"run_probe_ms": served.host_probe_ms, "db_probe_ms": loaded.host_probe_ms,
            "elasticity": loaded.host_elasticity, "host_scale": at_host.host_scale,
            "probes": sum(s.host_probe_ms is not None for s in served.steps)}
    if at_host is not loaded:  # also at the DB's own host speed, to show what it changes
        at_db, _ = compare(served, lambda: FlatStepTime(loaded), sched)
        host["at_db_speed"] = {"ttft_mape": at_db["ttft"]["mape"],
                               "tpot_mape": at_db["tpot"]["mape"],
                               "step_mape": at_db["steps"].get("mape")}
    payload = {"model": name, "device": env["device"], "environment": env["fingerprint"],
               "engine": served.engine, "predicted_from": loaded.engine,
               "measured_on": served.machine, "workload": workload, "settings": st,
               "timed_out": served.timed_out, "wall_s": served.wall_s, **report,
               "host_speed": host, "simulated": result.summary(),
               "measured": served.to_json()}
    _print_serving(payload)
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        _plot_serving(payload, args.plot)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def _print_serving(p: dict) -> None:
    table = Table(title=f"validate-serving · {p['model']} · {p['engine']} · "
                        f"{p['measured_on'].get('device', '?')} · predicted from "
                        f"{p['predicted_from']}", title_justify="left")
    for col in ("metric", "requests", "measured p50 ms", "simulated p50 ms", "p50 error",
                "measured p90 ms", "simulated p90 ms", "p90 error", "MAPE"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT")):
        m = p[key]
        if m["measured"] is None:
            table.add_row(label, "0", *["-"] * 7)
            continue
        table.add_row(label, str(m["requests"]), _ms(m["measured"]["p50"]),
                      _ms(m["simulated"]["p50"]), _pct(m["p50_error"], True),
                      _ms(m["measured"]["p90"]), _ms(m["simulated"]["p90"]),
                      _pct(m["p90_error"], True), _pct(m["mape"]))
    out.print(table)
    s = p["steps"]
    if s.get("steps"):
        ms = s["measured_ms"]
        out.print(f"engine steps: {s['steps']} measured ({p['simulated_steps']} simulated) · "
                  f"mean {ms['mean']:.2f} ms = prepare {ms['prepare']:.2f} + forward "
                  f"{ms['forward']:.2f} + update {ms['update']:.2f} · predicted mean "
                  f"{s['predicted_ms']['mean']:.2f} ms · step MAPE {_pct(s['mape'])} "
                  f"(bias {_pct(s['bias'], True)})")
        for k in s.get("by_kind", []):
            out.print(f"  {k['kind']}: {k['steps']} steps, measured {k['measured_ms']:.1f} ms, "
                      f"predicted {k['predicted_ms']:.1f} ms (MAPE {_pct(k['mape'])})")
        if ms.get("attention_host") is not None:
            out.print(f"attention calls on the host per forward: mean "
                      f"{ms['attention_host']:.2f} ms, median {ms['attention_host_median']:.2f} "
                      "ms (new shapes' setup: the shape_build units)")
        if ms.get("gc") is not None:
            out.print(f"garbage-collector pauses per step: mean {ms['gc']:.2f} ms, longest "
                      f"{ms['gc_max']:.1f} ms")
    lock = p.get("scheduler") or {}
    if lock.get("steps"):
        first = lock["first_mismatch"]
        out.print(f"scheduler in lockstep (each step as long as the engine's): "
                  f"{lock['matched']}/{lock['steps']} batches as the engine formed them"
                  + ("" if first is None else f", the first different at step {first}")
                  + f" · TTFT / TPOT MAPE {_pct(lock['ttft_mape'])} / "
                  f"{_pct(lock['tpot_mape'])}")
    out.print(f"{p['finished']}/{p['requests']} requests finished in {p['wall_s']:.1f} s"
              + (" (time limit reached)" if p["timed_out"] else ""))
    host = p["host_speed"]
    if host["run_probe_ms"] is not None and host["db_probe_ms"]:
        db = host.get("at_db_speed", {})
        out.print(f"predicted at the run's host speed: probe {host['run_probe_ms']:.3f} ms "
                  f"(from {host['probes']} probes) vs the DB's {host['db_probe_ms']:.3f} ms, "
                  f"host-side times ×{host['host_scale']:.2f}; at the DB's speed TTFT / TPOT "
                  f"MAPE {_pct(db.get('ttft_mape'))} / {_pct(db.get('tpot_mape'))}")
    alloc = p["measured"].get("allocator")
    if alloc:
        out.print(f"CUDA allocator during the run: {alloc['device_mallocs']} device mallocs, "
                  f"{alloc['device_frees']} frees, {alloc['alloc_retries']} retries "
                  "(each free or retry synchronises the device)")


def _plot_serving(p: dict, path: str) -> None:
    """PNG: measured vs simulated TTFT and TPOT per request, and their CDFs."""
    plt, np = _pyplot(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    rows = p["per_request"]
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        pairs = [(r[key], r[f"sim_{key}"]) for r in rows
                 if r[key] is not None and r[f"sim_{key}"] is not None]
        for values, label in ((sorted(m for m, _ in pairs), "measured"),
                              (sorted(s for _, s in pairs), "simulated")):
            x = np.asarray(values) * 1e3
            ax.plot(x, np.arange(1, x.size + 1) / max(x.size, 1), label=label)
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests",
               title=f"{name} CDF · MAPE {_pct(p[key]['mape'])}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{p['model']} · {p['engine']} · {p['measured_on'].get('device', '?')}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _workload_args(parser: argparse.ArgumentParser, required: bool) -> None:
    work = parser.add_argument_group("workload (one of --trace, --qps)")
    source = work.add_mutually_exclusive_group(required=required)
    source.add_argument("--trace", metavar="CSV",
                        help="arrived_at,num_prefill_tokens,num_decode_tokens per request")
    source.add_argument("--qps", type=float, metavar="X",
                        help="synthetic arrivals at this mean rate (inf: all at once)")
    work.add_argument("--num-requests", type=_positive_int, metavar="N",
                      help=f"first N trace rows; synthetic: N requests "
                           f"(default {DEFAULT_SYNTHETIC_REQUESTS})")
    work.add_argument("--prompt", default="uniform:128:1024", metavar="DIST",
                      help="synthetic prompt lengths: N, uniform:LO:HI or trace:CSV:prompt")
    work.add_argument("--output", default="128", metavar="DIST",
                      help="synthetic output lengths (same forms; default 128)")
    work.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    work.add_argument("--cv", type=float, default=1.0,
                      help="gamma arrivals: coefficient of variation of the gaps")
    work.add_argument("--seed", type=int, default=0)


def add_verbs(verbs) -> None:
    """Register this module's verbs on the main parser's subparsers."""
    sim = add_verb(verbs, "simulate", cmd_simulate,
                   "simulate serving a workload with predicted steps")
    sim.add_argument("model", metavar="MODEL")
    sim.add_argument("--db", metavar="FILE", help="latency DB (default: the shipped H100 DB)")
    sim.add_argument("--device", default="cuda", choices=("cpu", "cuda"),
                     help="which of the DB's environments to predict for")
    engine_args(sim)
    host_probe_option(sim)
    _workload_args(sim, required=True)
    sched = sim.add_argument_group("scheduler")
    sched.add_argument("--policy", default="transformers", choices=PRESET_NAMES,
                       help="scheduler preset (default: transformers)")
    sched.add_argument("--max-batch-tokens", type=_positive_int, metavar="N")
    sched.add_argument("--max-seqs", type=_positive_int, metavar="N")
    sched.add_argument("--block-size", type=_positive_int, metavar="N")
    sched.add_argument("--num-blocks", type=_positive_int, metavar="N",
                       help="KV-cache blocks (default: sized from GPU memory)")
    sched.add_argument("--gpu-memory-fraction", type=float, default=0.9, metavar="F",
                       help="share of GPU memory for weights + KV cache (default 0.9)")
    sim.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    sim.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome/Perfetto trace")
    sim.add_argument("--plot", metavar="PNG", help="plot TTFT/TPOT CDFs and KV usage")

    val = add_verb(verbs, "validate-serving", cmd_validate_serving,
                   "serve a workload on the real engine and compare with simulate")
    val.add_argument("model", metavar="MODEL")
    val.add_argument("--db", metavar="FILE", help="latency DB (default: the shipped H100 DB)")
    val.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    val.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                     help="the engine's paged|<attn> attention (default sdpa)")
    val.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    _workload_args(val, required=False)
    val.add_argument("--speedup", type=float, default=1.0, metavar="F",
                     help="divide arrival times by F (default 1)")
    val.add_argument("--max-prompt", type=_positive_int, metavar="N", help="clip prompts to N")
    val.add_argument("--max-output", type=_positive_int, metavar="N", help="clip outputs to N")
    eng = val.add_argument_group("engine (default: as transformers sizes it)")
    eng.add_argument("--max-batch-tokens", type=_positive_int, metavar="N")
    eng.add_argument("--max-seqs", type=_positive_int, metavar="N")
    eng.add_argument("--block-size", type=_positive_int, metavar="N",
                     help="default: transformers' (256)")
    eng.add_argument("--num-blocks", type=_positive_int, metavar="N")
    eng.add_argument("--gc", default="on", choices=("on", "off"),
                     help="Python's garbage collector while serving (default on, as the engine "
                          "runs; off separates its pauses from the engine's work)")
    val.add_argument("--time-limit", type=float, default=600.0, metavar="S",
                     help="stop serving S seconds after the last arrival (default 600)")
    val.add_argument("--measured", metavar="FILE",
                     help="re-compare the measurement of a saved validate-serving JSON")
    val.add_argument("--json", metavar="FILE", help="write the report and measurement as JSON")
    val.add_argument("--plot", metavar="PNG", help="plot measured and simulated CDFs")

    vid = add_verb(verbs, "export-vidur", cmd_export_vidur,
                   "write Vidur's mlp.csv and attention.csv")
    vid.add_argument("model", metavar="MODEL")
    vid.add_argument("--db", metavar="FILE", help="latency DB (default: the shipped H100 DB)")
    vid.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    engine_args(vid)
    vid.add_argument("--out", required=True, metavar="DIR", help="folder for the two CSVs")
    vid.add_argument("--max-tokens", type=_positive_int, default=4096, metavar="N",
                     help="largest num_tokens and context (Vidur's max_model_len; default 4096)")
    vid.add_argument("--max-batch-size", type=_positive_int, default=128, metavar="N",
                     help="largest decode batch in attention.csv (default 128)")
    vid.add_argument("--block-size", type=_positive_int, default=16, metavar="N",
                     help="block_size column; must match Vidur's scheduler (default 16)")
    vid.add_argument("--json", metavar="FILE", help="write what was exported as JSON")
