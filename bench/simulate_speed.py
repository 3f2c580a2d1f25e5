"""Wall time of the serving simulator itself (CPU), per scheduler policy.

    python bench/simulate_speed.py
    python bench/simulate_speed.py --step-time analytic --repeats 5
    python bench/simulate_speed.py --trace ../shared/data/traces/splitwise_code.csv

Cases: the first 300 requests of a trace, the whole trace, and 10,000 synthetic requests
(prompts uniform 800-1200, outputs uniform 150-250, Poisson at --qps). Each runs under the
"transformers" and "vllm" presets. Times `simulate()` (best of --repeats) with the step-time
function called once per step inside it; every run starts from a fresh step-time object, so
its memo is empty each time. Then, per preset, the whole command line
`python -m dooly_fx simulate MODEL --trace TRACE --num-requests 300` in a fresh process
(start-up, imports, DB, simulation and table; best of --repeats). Writes
`bench/results/simulate_speed.{json,md}`.

Step times (`make_step_time`):
* `predictor` (default): `FlatStepTime` over the shipped H100 DB's fits of --model
  (llama-3.1-8b), KV cache sized by `dooly_fx.serving` from the GPU's memory as `simulate` does.
* `analytic`: a placeholder cost model, not a prediction: 5 ms + 32 us per new token + 40 ns
  per cached token (roughly an 8B model's weight read, FLOPs and KV read on one H100), with a
  54 GB cache for Llama-3.1-8B in bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dooly_fx.db import SHIPPED_DB, LatencyDB  # noqa: E402
from dooly_fx.hostinfo import cpu_name  # noqa: E402
from dooly_fx.predict import FlatStepTime, load  # noqa: E402
from dooly_fx.serving import kv_bytes_per_token, size_kv_cache, weight_bytes  # noqa: E402
from dooly_fx.simulate import StepTime, num_blocks_for, preset, simulate  # noqa: E402
from dooly_fx.workload import LengthDist, read_trace, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "traces" / "splitwise_conv.csv"
STEP_TIMES = ("predictor", "analytic")
ENGINE = "padded|sdpa|bfloat16"
# Llama-3.1-8B bf16: 2 (K, V) x 32 layers x 8 KV heads x 128 head_dim x 2 bytes per token;
# ~54 GB left for the cache on an 80 GB GPU after 16 GB of weights and a 10% reserve.
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
CACHE_BYTES = 54e9
POLICIES = ("transformers", "vllm")


def analytic_step_time(overhead_s: float = 5e-3, per_token_s: float = 32e-6,
                       per_cached_s: float = 40e-9) -> StepTime:
    """overhead + per_token x new tokens + per_cached x cached tokens, for one step."""

    def step_time(batch: Sequence[tuple[int, int]]) -> float:
        new = cached = 0
        for q, c in batch:
            new += q
            cached += c
        return overhead_s + per_token_s * new + per_cached_s * cached

    return step_time


class Source:
    """Where step times and the KV-cache size come from: `make()` returns a fresh step-time
    function (an empty memo), `blocks(block_size)` the cache size in blocks."""

    def __init__(self, make: Callable[[], StepTime], blocks: Callable[[int], int],
                 meta: dict) -> None:
        self.make, self.blocks, self.meta = make, blocks, meta


def make_step_time(args: argparse.Namespace) -> Source:
    """The step-time source the simulator calls; chosen by --step-time."""
    if args.step_time == "analytic":
        return Source(analytic_step_time,
                      lambda bs: num_blocks_for(CACHE_BYTES, KV_BYTES_PER_TOKEN, bs),
                      {"kv_cache": f"{CACHE_BYTES / 1e9:g} GB at {KV_BYTES_PER_TOKEN} "
                                   "bytes/token (Llama-3.1-8B bf16)"})
    t0 = time.perf_counter()
    with LatencyDB.open(SHIPPED_DB, create=False, readonly=True) as db:
        env = next(e for e in db.environments() if e.get("device_type") == "cuda")
        loaded = load(db, args.model, env["fingerprint"], ENGINE)
        weights = weight_bytes(db, args.model, env["fingerprint"], ENGINE)
    load_s = time.perf_counter() - t0
    memory = env["memory_gib"] * 2**30
    per_token = kv_bytes_per_token(loaded.config, "bfloat16")

    def blocks(block_size: int) -> int:
        return size_kv_cache(args.model, memory, 0.9, weights, per_token, block_size).num_blocks

    cache = memory * 0.9 - weights
    return Source(lambda: FlatStepTime(loaded), blocks, {
        "model": args.model, "engine": ENGINE, "device": env["device"],
        "db": "dooly_fx/data/h100.db.gz (shipped)", "db_load_s": round(load_s, 4),
        "kv_cache": f"{cache / 1e9:.1f} GB ({env['memory_gib']} GiB x 0.9 - "
                    f"{weights / 1e9:.2f} GB weights) at {per_token} bytes/token"})


def run_case(name: str, requests, policy: str, source: Source, repeats: int) -> dict:
    cfg = preset(policy)
    cfg = preset(policy, num_blocks=source.blocks(cfg.block_size))
    walls = []
    for _ in range(repeats):
        step_time = source.make()
        t0 = time.perf_counter()
        result = simulate(requests, step_time, cfg)
        walls.append(time.perf_counter() - t0)
    s = result.summary()
    best = min(walls)
    return {
        "case": name, "policy": policy, "requests": len(requests),
        "num_blocks": cfg.num_blocks, "block_size": cfg.block_size,
        "wall_s": round(best, 4), "wall_s_runs": [round(w, 4) for w in walls],
        "steps": s["steps"], "steps_per_s": round(s["steps"] / best),
        "mean_seqs_per_step": round(s["batch"]["mean_seqs"], 2),
        "completed": s["completed"], "rejected": s["rejected"], "preemptions": s["preemptions"],
        "simulated_s": round(s["throughput"]["duration_s"], 3),
        "ttft_p50_s": s["ttft"]["p50"], "tpot_p50_s": s["tpot"]["p50"],
    }


def run_cli(args: argparse.Namespace, policy: str, requests: int) -> dict:
    """Wall time of the whole `simulate` command in a fresh process (best of --repeats)."""
    command = [sys.executable, "-m", "dooly_fx", "simulate", args.model, "--trace",
               str(args.trace), "--num-requests", str(requests), "--policy", policy]
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    shown = ["python", *command[1:6], args.trace.name, *command[7:]]
    return {"command": " ".join(shown), "policy": policy, "requests": requests,
            "wall_s": round(min(walls), 3), "wall_s_runs": [round(w, 3) for w in walls]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--step-time", choices=STEP_TIMES, default="predictor")
    ap.add_argument("--model", default="llama-3.1-8b",
                    help="predictor: a model of the shipped DB")
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line timing")
    ap.add_argument("--qps", type=float, default=16.0,
                    help="synthetic arrival rate (default 16: an overloaded engine running large "
                         "batches, the simulator's slowest regime)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "simulate_speed.json")
    args = ap.parse_args()

    source = make_step_time(args)
    t0 = time.perf_counter()
    whole = read_trace(args.trace)
    read_s = time.perf_counter() - t0
    cases = [
        (f"{args.trace.name} first 300", whole[:300]),
        (f"{args.trace.name} all", whole),
        (f"synthetic 10k @ {args.qps:g} qps", synthetic(
            10_000, args.qps, prompt=LengthDist.uniform(800, 1200),
            output=LengthDist.uniform(150, 250), seed=0)),
    ]
    rows = []
    for name, reqs in cases:
        for policy in POLICIES:
            row = run_case(name, reqs, policy, source, args.repeats)
            print(f"{name:40s} {policy:13s} {row['wall_s']:7.3f} s  {row['steps']:7d} steps  "
                  f"{row['mean_seqs_per_step']:6.1f} seqs/step", flush=True)
            rows.append(row)
    cli = []
    if args.step_time == "predictor" and not args.no_cli:
        for policy in POLICIES:
            cli.append(run_cli(args, policy, 300))
            print(f"{cli[-1]['command']}: {cli[-1]['wall_s']:.3f} s", flush=True)

    meta = {
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_name(), "logical_cpus": _cpus(), "python": platform.python_version(),
        "numpy": np.__version__, "platform": platform.platform(),
        "step_time": args.step_time, "trace": args.trace.name,
        "trace_read_s": round(read_s, 4), "repeats": args.repeats,
        **source.meta,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cases": rows, "cli": cli}, indent=2) + "\n")
    if args.step_time == "predictor":
        what = (f"`predictor`: FlatStepTime over the shipped H100 DB's fits of {args.model} "
                f"({ENGINE}; loading them took {meta['db_load_s']:.3f} s, not included)")
    else:
        what = "`analytic` (placeholder cost model, see the script)"
    lines = [
        "# Simulator speed (CPU wall time of `simulate()`)", "",
        f"- command: `{meta['command']}`",
        f"- CPU: {meta['cpu']} ({meta['logical_cpus']} logical CPUs), Python {meta['python']}, "
        f"numpy {meta['numpy']}",
        f"- step time: {what}; a fresh step-time object per run; best of {args.repeats} runs; "
        f"reading the whole trace took {read_s:.3f} s (not included)",
        f"- KV cache: {meta['kv_cache']}", "",
        "| case | policy | requests | wall s | steps | steps/s | seqs/step | rejected "
        "| preemptions | simulated s | TTFT p50 s | TPOT p50 s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['policy']} | {r['requests']} | {r['wall_s']:.3f} "
                     f"| {r['steps']} | {r['steps_per_s']} | {r['mean_seqs_per_step']} "
                     f"| {r['rejected']} | {r['preemptions']} | {r['simulated_s']} "
                     f"| {r['ttft_p50_s']:.4g} | {r['tpot_p50_s']:.4g} |")
    if cli:
        lines += ["", "Whole command in a fresh process (interpreter start-up, imports, DB, "
                      f"simulation, table; best of {args.repeats}):", "",
                  "| command | wall s |", "|---|---:|"]
        lines += [f"| `{c['command']}` | {c['wall_s']:.3f} |" for c in cli]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
