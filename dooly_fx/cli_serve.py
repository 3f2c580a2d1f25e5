"""CLI verbs of the serving stages: simulate, export-vidur (see docs/cli.md)."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.table import Table

from dooly_fx.cli_args import (
    add_verb,
    db_option,
    engine_args,
    host_probe_arg,
    host_probe_option,
    non_negative_int,
    open_db,
    positive_float,
    positive_int,
)
from dooly_fx.db import LatencyDB
from dooly_fx.errors import UserError, positive_number
from dooly_fx.ui import err, out, progress, write_json

PRESET_NAMES = ("transformers", "transformers-prefill-first", "vllm")
DEFAULT_SYNTHETIC_REQUESTS = 1000
DEFAULT_MEMORY_FRACTION = 0.9


def _loaded(db: LatencyDB, args: argparse.Namespace):
    """(environment, Loaded) of the asked model, engine profile and device."""
    from dooly_fx.cli_latency import _engine, _environment, load_model

    env = _environment(db, args.device)
    return env, load_model(db, args.model, env, _engine(args))


def _rates(text: str) -> list[float]:
    """`--qps`: one rate or several, comma-separated (requests per second; inf: all at once)."""
    rates = [positive_number(item, f"--qps {text}", "a positive rate in requests per second",
                             allow_inf=True)
             for item in text.split(",")]
    if len(set(rates)) != len(rates):
        raise UserError(f"--qps {text}: a rate is given twice")
    return rates


def _requests(args: argparse.Namespace, qps: float | None = None) -> tuple[list, dict]:
    """The workload's requests and a JSON description of it; synthetic at rate `qps`
    (default: the one --qps gives)."""
    from dooly_fx.workload import LengthDist, read_trace, synthetic

    if args.trace:
        reqs = read_trace(args.trace, args.num_requests)
        return reqs, {"source": "trace", "trace": str(args.trace), "num_requests": len(reqs)}
    if qps is None:
        rates = _rates(args.qps)
        if len(rates) > 1:
            raise UserError(f"--qps {args.qps}: give one rate here (simulate sweeps several)")
        qps = rates[0]
    if args.cv is not None and args.arrival != "gamma":
        raise UserError("--cv shapes gamma arrivals; add --arrival gamma")
    n = args.num_requests or DEFAULT_SYNTHETIC_REQUESTS
    cv = 1.0 if args.cv is None else args.cv
    reqs = synthetic(n, qps, args.arrival, cv, LengthDist.parse(args.prompt),
                     LengthDist.parse(args.output), args.seed)
    return reqs, {"source": "synthetic", "num_requests": n,
                  "qps": None if math.isinf(qps) else qps, "arrival": args.arrival,
                  "cv": cv, "prompt": args.prompt, "output": args.output, "seed": args.seed}


def _scheduler(args: argparse.Namespace, db: LatencyDB, env: dict, loaded):
    """The scheduler config, and how its KV cache was sized (JSON)."""
    from dooly_fx.serving import (
        cache_layout,
        kv_bytes_per_token,
        loaded_weight_bytes,
        size_kv_cache,
    )
    from dooly_fx.simulate import preset

    overrides = {k: getattr(args, k) for k in ("max_batch_tokens", "max_seqs", "block_size")
                 if getattr(args, k) is not None}
    cfg = preset(args.policy, **overrides)
    if cfg.policy.startswith("transformers"):  # its cache's layer groups share the blocks
        cfg = replace(cfg, **cache_layout(loaded.config))
    if args.num_blocks is not None:
        if args.gpu_memory_fraction is not None:
            raise UserError("give --num-blocks or --gpu-memory-fraction, not both")
        cfg = replace(cfg, num_blocks=args.num_blocks)
        return cfg, {"source": "--num-blocks", "num_blocks": cfg.num_blocks,
                     "block_size": cfg.block_size, "tokens": cfg.num_pages}
    memory = env.get("memory_gib")
    if not memory:
        raise UserError(f"environment {env['device']} records no GPU memory size; pass "
                        "--num-blocks")
    fraction = args.gpu_memory_fraction or DEFAULT_MEMORY_FRACTION
    sizing = size_kv_cache(loaded.model, float(memory) * 2**30, fraction,
                           loaded_weight_bytes(db, loaded),
                           kv_bytes_per_token(loaded.config, args.dtype), cfg.block_size,
                           cfg.full_groups + cfg.sliding_groups)
    return replace(cfg, num_blocks=sizing.num_blocks), {"source": "memory", **sizing.to_json()}


def cmd_simulate(args: argparse.Namespace) -> None:
    """Simulate serving a workload on one GPU, with step times predicted from a latency DB.

    Step times come from the model's fitted units (FlatStepTime: token-wise units over the
    step's flattened tokens, attention per sequence). The KV cache is sized from the
    environment's GPU memory unless --num-blocks is given. Without --db, the shipped H100 DB.
    Several rates (--qps 1,2,4,8) simulate the same requests arriving at each rate and, with
    --slo, give the highest rate that meets every objective.

        python -m dooly_fx simulate llama-3.1-8b --trace splitwise_conv.csv --num-requests 300
        python -m dooly_fx simulate llama-3.1-8b --qps 4 --num-requests 500 \\
            --prompt uniform:128:1024 --output 128 --policy vllm --json run.json
        python -m dooly_fx simulate qwen2.5-7b --qps 8 --arrival gamma --cv 2 \\
            --chrome-trace run.trace.json --plot run.png
        python -m dooly_fx simulate llama-3.1-8b --qps 1,2,4,8,16 --num-requests 500 \\
            --slo ttft:p90:0.5 --slo tpot:p90:0.05 --plot sweep.png --json sweep.json
    """
    from dooly_fx.capacity import Slo, check
    from dooly_fx.predict import FlatStepTime, at_host_speed
    from dooly_fx.simulate import simulate

    slos = [Slo.parse(text) for text in args.slo or ()]
    rates = _rates(args.qps) if args.qps else []
    if len(rates) > 1 and args.chrome_trace:
        raise UserError("--chrome-trace traces one simulation; give one --qps rate")
    if len(rates) > 1 and any(math.isinf(q) for q in rates):
        raise UserError(f"--qps {args.qps}: a sweep takes finite rates (inf: one run alone)")
    reqs, workload = _requests(args, rates[0] if rates else None)
    probe = host_probe_arg(args.host_probe)
    with open_db(args.db) as db:
        env, loaded = _loaded(db, args)
        cfg, kv = _scheduler(args, db, env, loaded)
    loaded = at_host_speed(loaded, probe)
    head = {"model": loaded.model, "device": env["device"], "environment": env["fingerprint"],
            "engine": loaded.engine, "step_time": "FlatStepTime"}
    if len(rates) > 1:
        _sweep(args, rates, slos, loaded, cfg, {**head, "workload": workload, "kv_cache": kv,
                                                 "host_probe_ms": loaded.probe_ms})
        return
    step_time = FlatStepTime(loaded)
    started = time.perf_counter()
    with err.status(f"simulating {len(reqs)} requests"):
        result = simulate(reqs, step_time, cfg)
    wall = time.perf_counter() - started
    summary = result.summary()
    payload = {**summary, **head, "workload": workload, "scheduler": asdict(cfg),
               "kv_cache": kv, "wall_s": wall, "host_probe_ms": loaded.probe_ms}
    if slos:
        payload["slo"] = check(summary, slos)
    _print_simulation(payload)
    if args.json:
        write_json(args.json, payload)
    if args.chrome_trace:
        _writable(args.chrome_trace)
        result.write_chrome_trace(args.chrome_trace)
    if args.plot:
        _plot(result, args.plot, f"{loaded.model} · {cfg.policy} · {env['device']}")


def _sweep(args: argparse.Namespace, rates: list[float], slos: list, loaded, cfg,
           head: dict) -> None:
    """simulate at several rates (`head`: the payload's model, engine, workload and cache
    keys): a table a rate, the highest rate within the SLOs, JSON and a plot of the
    percentiles against the rate."""
    from dooly_fx.capacity import load_sweep, max_rate
    from dooly_fx.predict import FlatStepTime

    if args.plot:
        _writable(args.plot)
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"simulating {len(rates)} rates", total=len(rates))
        rows = load_sweep(rates, lambda qps: _requests(args, qps)[0],
                          lambda: FlatStepTime(loaded), cfg, slos,
                          on_done=lambda _: bar.advance(task))
    best = max_rate(rows) if slos else None
    payload = {**head, "workload": {**head["workload"], "qps": sorted(rates)},
               "scheduler": asdict(cfg),
               "wall_s": time.perf_counter() - started, "slo": [s.label for s in slos],
               "max_qps_within_slo": best, "sweep": rows}
    _print_sweep(payload)
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        _plot_sweep(payload, slos, args.plot)


def _print_sweep(p: dict) -> None:
    table = Table(title=f"simulate · {p['model']} · {p['scheduler']['policy']} · {p['device']} · "
                        f"{p['engine']} · {p['workload']['num_requests']} requests a rate",
                  title_justify="left")
    cols = ("qps", "completed", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p90", "E2E p90 ms",
            "output tok/s", "preemptions") + (("SLO",) if p["slo"] else ())
    for col in cols:
        table.add_column(col, justify="right")
    for r in p["sweep"]:
        tp = r["throughput"]["output_tokens_per_s"]
        table.add_row(f"{r['qps']:g}", f"{r['completed']}/{r['num_requests']}",
                      *(_ms(r[m][k]) for m, k in (("ttft", "p50"), ("ttft", "p90"),
                                                  ("ttft", "p99"), ("tpot", "p50"),
                                                  ("tpot", "p90"), ("e2e", "p90"))),
                      "-" if tp is None else f"{tp:,.0f}", str(r["preemptions"]),
                      *(("yes" if r["slo"]["all"] else "no",) if p["slo"] else ()))
    out.print(table)
    if p["slo"]:
        best = p["max_qps_within_slo"]
        top = p["sweep"][-1]["qps"]
        out.print(f"SLO: {'; '.join(p['slo'])} · highest rate within it: "
                  + ("none of these" if best is None else f"{best:g} requests/s"
                     + (" (the highest tried: try higher rates)" if best == top else "")))


def _plot_sweep(p: dict, slos: list, path: str) -> None:
    """PNG: TTFT and TPOT percentiles against the request rate, with the SLO bounds."""
    plt, _ = _pyplot(path)
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    qps = [r["qps"] for r in p["sweep"]]
    for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for stat in ("p50", "p90", "p99"):
            values = [r[metric][stat] for r in p["sweep"]]
            ax.plot(qps, [float("nan") if v is None else v * 1e3 for v in values], marker="o",
                    label=stat)
        for slo in slos:
            if slo.metric == metric:
                ax.axhline(slo.seconds * 1e3, color="red", ls="--", lw=1,
                           label=f"SLO: {slo.stat} {slo.seconds * 1e3:g} ms")
        ax.set(xlabel="request rate (requests/s)", ylabel=f"{name} (ms)", title=name,
               yscale="log")
        if max(qps) / min(qps) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(qps, [f"{q:g}" for q in qps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{p['model']} · {p['scheduler']['policy']} · {p['device']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


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

    with open_db(args.db) as db:
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
        none = "- (with the attention-side units)" if op == "attn_rope" else "-"
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


def _workload_args(parser: argparse.ArgumentParser, required: bool) -> None:
    work = parser.add_argument_group("workload (one of --trace, --qps)")
    source = work.add_mutually_exclusive_group(required=required)
    source.add_argument("--trace", metavar="CSV",
                        help="arrived_at,num_prefill_tokens,num_decode_tokens per request")
    source.add_argument("--qps", metavar="X[,X...]",
                        help="synthetic arrivals at this mean rate (inf: all at once); "
                             "simulate takes several, comma-separated, and sweeps them")
    work.add_argument("--num-requests", type=positive_int, metavar="N",
                      help=f"first N trace rows; synthetic: N requests "
                           f"(default {DEFAULT_SYNTHETIC_REQUESTS})")
    work.add_argument("--prompt", default="uniform:128:1024", metavar="DIST",
                      help="synthetic prompt lengths: N, uniform:LO:HI or trace:CSV:prompt")
    work.add_argument("--output", default="128", metavar="DIST",
                      help="synthetic output lengths (same forms; default 128)")
    work.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    work.add_argument("--cv", type=positive_float,
                      help="gamma arrivals: coefficient of variation of the gaps (default 1)")
    work.add_argument("--seed", type=non_negative_int, default=0)


def add_verbs(verbs) -> None:
    """Register this module's verbs on the main parser's subparsers."""
    sim = add_verb(verbs, "simulate", cmd_simulate,
                   "simulate serving a workload with predicted steps")
    sim.add_argument("model", metavar="MODEL")
    db_option(sim)
    sim.add_argument("--device", default="cuda", choices=("cpu", "cuda"),
                     help="which of the DB's environments to predict for")
    engine_args(sim)
    host_probe_option(sim)
    _workload_args(sim, required=True)
    sched = sim.add_argument_group("scheduler")
    sched.add_argument("--policy", default="transformers", choices=PRESET_NAMES,
                       help="scheduler preset (default: transformers)")
    sched.add_argument("--max-batch-tokens", type=positive_int, metavar="N")
    sched.add_argument("--max-seqs", type=positive_int, metavar="N")
    sched.add_argument("--block-size", type=positive_int, metavar="N")
    sched.add_argument("--num-blocks", type=positive_int, metavar="N",
                       help="KV-cache blocks (default: sized from GPU memory)")
    sched.add_argument("--gpu-memory-fraction", type=positive_float, metavar="F",
                       help="share of GPU memory for weights + KV cache (default "
                            f"{DEFAULT_MEMORY_FRACTION})")
    sim.add_argument("--slo", action="append", metavar="METRIC:STAT:SECONDS",
                     help="latency objective, e.g. ttft:p90:0.5 (repeatable; metric ttft, tpot, "
                          "e2e or queueing; stat p50, p90, p99, mean or max)")
    sim.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    sim.add_argument("--chrome-trace", metavar="FILE", help="write a Chrome/Perfetto trace")
    sim.add_argument("--plot", metavar="PNG", help="plot TTFT/TPOT CDFs and KV usage")

    vid = add_verb(verbs, "export-vidur", cmd_export_vidur,
                   "write Vidur's mlp.csv and attention.csv")
    vid.add_argument("model", metavar="MODEL")
    db_option(vid)
    vid.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    engine_args(vid)
    vid.add_argument("--out", required=True, metavar="DIR", help="folder for the two CSVs")
    vid.add_argument("--max-tokens", type=positive_int, default=4096, metavar="N",
                     help="largest num_tokens and context (Vidur's max_model_len; default 4096)")
    vid.add_argument("--max-batch-size", type=positive_int, default=128, metavar="N",
                     help="largest decode batch in attention.csv (default 128)")
    vid.add_argument("--block-size", type=positive_int, default=16, metavar="N",
                     help="block_size column; must match Vidur's scheduler (default 16)")
    vid.add_argument("--json", metavar="FILE", help="write what was exported as JSON")
