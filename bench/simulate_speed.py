"""Wall time of the serving simulator itself (CPU), per scheduler policy.

    python bench/simulate_speed.py
    python bench/simulate_speed.py --trace ../shared/data/traces/splitwise_code.csv --repeats 5

Cases: the first 300 requests of a trace, the whole trace, and 10,000 synthetic requests
(prompts uniform 800-1200, outputs uniform 150-250, Poisson at --qps). Each runs under the
"transformers" and "vllm" presets with a KV cache sized for Llama-3.1-8B in bf16 on an 80 GB
GPU. Times only `simulate()` (best of --repeats); the step-time function is called once per
step and is part of that time. Writes `bench/results/simulate_speed.{json,md}`.

The step-time source is `make_step_time(args)`. `--step-time analytic` (the only one for now)
is a placeholder cost model, not a prediction: 5 ms + 32 us per new token + 40 ns per cached
token (roughly an 8B model's weight read, FLOPs and KV read on one H100).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dooly_fx.simulate import StepTime, num_blocks_for, preset, simulate  # noqa: E402
from dooly_fx.workload import LengthDist, read_trace, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "traces" / "splitwise_conv.csv"
STEP_TIMES = ("analytic",)
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


def make_step_time(args: argparse.Namespace) -> StepTime:
    """The step-time function the simulator calls; chosen by --step-time."""
    if args.step_time == "analytic":
        return analytic_step_time()
    raise SystemExit(f"unknown --step-time {args.step_time!r}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_case(name: str, requests, policy: str, step_time: StepTime, repeats: int) -> dict:
    cfg = preset(policy)
    cfg = preset(policy, num_blocks=num_blocks_for(CACHE_BYTES, KV_BYTES_PER_TOKEN,
                                                   cfg.block_size))
    walls = []
    for _ in range(repeats):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--step-time", choices=STEP_TIMES, default="analytic")
    ap.add_argument("--qps", type=float, default=16.0,
                    help="synthetic arrival rate (default keeps ~64 sequences per step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "simulate_speed.json")
    args = ap.parse_args()

    step_time = make_step_time(args)
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
            row = run_case(name, reqs, policy, step_time, args.repeats)
            print(f"{name:40s} {policy:13s} {row['wall_s']:7.3f} s  {row['steps']:7d} steps  "
                  f"{row['mean_seqs_per_step']:6.1f} seqs/step", flush=True)
            rows.append(row)

    meta = {
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_name(), "logical_cpus": _cpus(), "python": platform.python_version(),
        "numpy": np.__version__, "platform": platform.platform(),
        "step_time": args.step_time, "trace": args.trace.name,
        "trace_read_s": round(read_s, 4), "repeats": args.repeats,
        "kv_cache": f"{CACHE_BYTES / 1e9:g} GB at {KV_BYTES_PER_TOKEN} bytes/token",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2) + "\n")
    lines = [
        "# Simulator speed (CPU wall time of `simulate()`)", "",
        f"- command: `{meta['command']}`",
        f"- CPU: {meta['cpu']} ({meta['logical_cpus']} logical CPUs), Python {meta['python']}, "
        f"numpy {meta['numpy']}",
        f"- step time: `{args.step_time}` (placeholder cost model, see the script); best of "
        f"{args.repeats} runs; reading the whole trace took {read_s:.3f} s (not included)",
        f"- KV cache: {meta['kv_cache']} (Llama-3.1-8B bf16)", "",
        "| case | policy | requests | wall s | steps | steps/s | seqs/step | rejected "
        "| preemptions | simulated s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['policy']} | {r['requests']} | {r['wall_s']:.3f} "
                     f"| {r['steps']} | {r['steps_per_s']} | {r['mean_seqs_per_step']} "
                     f"| {r['rejected']} | {r['preemptions']} | {r['simulated_s']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
