"""CLI verb validate-serving: the real continuous-batching engine against simulate (see
docs/cli.md)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from dooly_fx.cli_args import (
    add_verb,
    check_measured,
    db_option,
    open_db,
    positive_float,
    positive_int,
)
from dooly_fx.cli_serve import (
    _ms,
    _pyplot,
    _requests,
    _workload_args,
)
from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.errors import UserError
from dooly_fx.hostinfo import require_device
from dooly_fx.ui import out, progress, write_json


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

    with open_db(args.db) as db:
        env = _environment(db, "cuda" if args.device == "cuda" else "cpu")
        name = model_name(db, args.model)
        loaded = _serving_engine(db, name, env, args.attn, args.dtype)
    if args.measured:
        if args.trace is not None or args.qps is not None:
            raise UserError("--measured replays the saved run's own requests; drop "
                            "--trace / --qps")
        try:
            old = json.loads(Path(args.measured).read_text())
            served = Served.from_json(old["measured"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{args.measured}: not a validate-serving JSON ({exc})") from None
        except UserError as exc:
            raise UserError(f"{args.measured}: {exc}") from None
        check_measured(args.measured, old, name, f"paged|{args.attn}|{args.dtype}")
        workload = old.get("workload", {})
    else:
        if args.trace is None and args.qps is None:
            raise UserError("give a workload: --trace CSV or --qps X (or --measured FILE)")
        reqs, workload = _serving_workload(args)
        spec = model_spec(args.model, name, loaded.config, f"{args.db or SHIPPED_DB}: {name}")
        engine = EngineProfile(engine="paged", attn_impl=args.attn, dtype=args.dtype)
        device = "cuda" if args.device == "cuda" else "cpu"
        require_device(device)
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



def add_verbs(verbs) -> None:
    """Register validate-serving on the main parser's subparsers."""
    val = add_verb(verbs, "validate-serving", cmd_validate_serving,
                   "serve a workload on the real engine and compare with simulate")
    val.add_argument("model", metavar="MODEL")
    db_option(val)
    val.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    val.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                     help="the engine's paged|<attn> attention (default sdpa)")
    val.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    _workload_args(val, required=False)
    val.add_argument("--speedup", type=positive_float, default=1.0, metavar="F",
                     help="divide arrival times by F (default 1)")
    val.add_argument("--max-prompt", type=positive_int, metavar="N", help="clip prompts to N")
    val.add_argument("--max-output", type=positive_int, metavar="N", help="clip outputs to N")
    eng = val.add_argument_group("engine (default: as transformers sizes it)")
    eng.add_argument("--max-batch-tokens", type=positive_int, metavar="N")
    eng.add_argument("--max-seqs", type=positive_int, metavar="N")
    eng.add_argument("--block-size", type=positive_int, metavar="N",
                     help="default: transformers' (256)")
    eng.add_argument("--num-blocks", type=positive_int, metavar="N")
    eng.add_argument("--gc", default="on", choices=("on", "off"),
                     help="Python's garbage collector while serving (default on, as the engine "
                          "runs; off separates its pauses from the engine's work)")
    val.add_argument("--time-limit", type=positive_float, default=600.0, metavar="S",
                     help="stop serving S seconds after the last arrival (default 600)")
    val.add_argument("--measured", metavar="FILE",
                     help="re-compare the measurement of a saved validate-serving JSON")
    val.add_argument("--json", metavar="FILE", help="write the report and measurement as JSON")
    val.add_argument("--plot", metavar="PNG", help="plot measured and simulated CDFs")
