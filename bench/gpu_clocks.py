"""A compute-bound GEMM timed alone and inside sustained GPU load, with the SM clock and power
sampled throughout (GPU machine).

    python bench/gpu_clocks.py --json bench/results/gpu_clocks.json

The profiler times a unit in short bursts (`timing.measure`: a few milliseconds of replays,
the L2 flushed between them), where the GPU runs at its boost clock. A GPU-bound prefill step
keeps the tensor cores busy for tens of milliseconds; the board then reaches its power limit
and lowers the SM clock. This times Llama-3.1-8B's q_proj at 4096 tokens (4096×4096×4096,
bf16) both ways, each timer of `timing.measure` alone, then between 8192³ GEMMs in rounds of
100, and samples `nvidia-smi` every 100 ms over both phases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from dooly_fx.db import TIMERS
from dooly_fx.hostinfo import machine
from dooly_fx.profile import _driver_version as driver_version
from dooly_fx.timing import measure

DEVICE, DTYPE = "cuda", torch.bfloat16


def sustained_us(fn, heat, rounds: int = 6, calls: int = 100) -> list[float]:
    """Median µs of `fn` per round of `calls`, each call after a `heat` GEMM."""
    out = []
    for _ in range(rounds):
        events = []
        for _ in range(calls):
            heat()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        out.append(statistics.median(s.elapsed_time(e) for s, e in events) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    args = parser.parse_args()
    x = torch.randn(4096, 4096, dtype=DTYPE, device=DEVICE)
    w = torch.randn(4096, 4096, dtype=DTYPE, device=DEVICE)
    big = torch.randn(8192, 8192, dtype=DTYPE, device=DEVICE)
    gemm = lambda: x @ w.t()  # noqa: E731
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,"
                            "temperature.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    phases = {}
    t0 = time.time()
    alone = {t: [measure(gemm, DEVICE, warmup_ms=5, rep_ms=20, timer=t).median_ms * 1e3
                 for _ in range(5)] for t in TIMERS}
    phases["alone"] = (t0, time.time())
    time.sleep(1.0)
    t0 = time.time()
    loaded = sustained_us(gemm, lambda: big @ big)
    phases["sustained"] = (t0, time.time())
    time.sleep(0.5)
    smi.terminate()
    samples = []
    for line in smi.stdout.read().strip().splitlines():
        stamp, clock, power, temp = (f.strip() for f in line.split(","))
        when = time.mktime(time.strptime(stamp.split(".")[0], "%Y/%m/%d %H:%M:%S")) + \
            float("0." + stamp.split(".")[1])
        phase = next((p for p, (a, b) in phases.items() if a <= when <= b), None)
        samples.append({"t": when, "phase": phase, "sm_mhz": float(clock),
                        "power_w": float(power), "temp_c": float(temp)})
    by_phase = {p: [s["sm_mhz"] for s in samples if s["phase"] == p] for p in phases}
    report = {"command": "python bench/gpu_clocks.py --json FILE", **machine(DEVICE),
              "driver": driver_version(),
              "gemm": "4096x4096x4096 bf16 (x @ w.t())",
              "alone_us": alone, "sustained_rounds_us": loaded,
              "slowdown": statistics.median(loaded) / statistics.median(alone["do_bench"]),
              "sm_mhz": {p: {"min": min(v), "median": statistics.median(v)} if v else None
                         for p, v in by_phase.items()},
              "samples": samples}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
