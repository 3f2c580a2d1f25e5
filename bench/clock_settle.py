"""A GPU-bound step against its units, each timed as the profiler times them and as the GPU
runs them under sustained load (GPU machine).

    python bench/clock_settle.py [--db bench/results/stream_timer/stream.db]
        [--models llama-3.1-8b qwen2.5-7b] [--batches prefill:4x1024 decode:32x1024]
        [--out bench/results/clock_settle]

For each model and padded-engine batch, with `nvidia-smi` sampling the SM clock and the board
power every 20 ms throughout:

* step: after the GPU has idled 3 s, `--steps` forwards back to back (CUDA events around each,
  as `validate-steps` times them): the step time as the clock settles;
* units: every unit of the step (`predict_step` on the DB gives signature, count and point),
  lowered as the profiler lowers it and timed with `timing.measure` (`stream`) three ways:
  - `burst`: after 1 s idle, 5 ms warm-up and 20 ms of samples, as the DB was profiled;
  - `settled`: after 300 ms of the unit's own warm-up, 100 ms of samples (the profiler's
    `timing.SUSTAIN_WARMUP_MS` and `SUSTAIN_REP_MS`);
  - `after_step`: straight after the step has run back to back for `--heat-ms`, 1 ms warm-up
    and 5 ms of samples: the unit at the clock the step leaves behind;
  Σ count × each against the step's settled time and the DB's prediction;
* trajectory: the step's largest unit run back to back for 1 s after 3 s idle, its mean time
  per 10 ms window: how fast the clock falls under the load of one kernel.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dooly_fx.db import LatencyDB
from dooly_fx.engine import EngineProfile
from dooly_fx.hostinfo import machine
from dooly_fx.lowering import lower
from dooly_fx.predict import load, predict_step
from dooly_fx.profile import _driver_version as driver_version
from dooly_fx.profile import collect
from dooly_fx.spec import resolve_model
from dooly_fx.timing import SUSTAIN_REP_MS, SUSTAIN_WARMUP_MS, measure
from dooly_fx.validate import _padded_calls, _timer, build_model, engine_grad_mode, parse_batch

DEVICE = "cuda"
UNIT_TIMINGS = {"burst": dict(warmup_ms=5, rep_ms=20),
                "settled": dict(warmup_ms=SUSTAIN_WARMUP_MS, rep_ms=SUSTAIN_REP_MS),
                "after_step": dict(warmup_ms=1, rep_ms=5)}


class Sampler:
    """`nvidia-smi` sampling the SM clock and power; `phase(name)` tags what follows."""

    def __init__(self, period_ms: int = 20):
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,"
             "nounits", "-lms", str(period_ms)], stdout=subprocess.PIPE, text=True)
        self.marks: list[tuple[float, str]] = []

    def phase(self, name: str) -> None:
        self.marks.append((time.time(), name))

    def close(self) -> list[dict]:
        self.phase("end")
        time.sleep(0.1)
        self.proc.terminate()
        out = []
        for line in self.proc.stdout.read().strip().splitlines():
            stamp, clock, power = (f.strip() for f in line.split(","))
            day, frac = stamp.split(".")
            when = time.mktime(time.strptime(day, "%Y/%m/%d %H:%M:%S")) + float("0." + frac)
            phase = next((n for t, n in reversed(self.marks) if t <= when), None)
            try:
                out.append({"t": when, "phase": phase, "sm_mhz": float(clock),
                            "power_w": float(power)})
            except ValueError:
                continue
        return out


def trajectory(fn, seconds: float = 1.0, window_ms: float = 10.0) -> list[float]:
    """Mean ms per call of `fn` run back to back for `seconds`, per window of ~`window_ms`."""
    torch.cuda.synchronize()
    one = _timer(DEVICE)(fn)
    per = max(1, int(window_ms / max(one, 1e-3)))
    events = [torch.cuda.Event(enable_timing=True)]
    events[0].record()
    for _ in range(max(1, int(seconds * 1e3 / (per * one)))):
        for _ in range(per):
            fn()
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / per for a, b in zip(events, events[1:], strict=False)]


def run_steps(call_iter, n: int) -> list[float]:
    timer = _timer(DEVICE)
    with engine_grad_mode():
        return [timer(next(call_iter)) for _ in range(n)]


def one_batch(db, env: str, spec, engine, model, coll, text: str, args, smi) -> dict:
    batch = parse_batch(text)
    loaded = load(db, spec.name, env, engine.label)
    pred = predict_step(loaded, batch)
    calls = _padded_calls(model, engine, DEVICE, batch, {})
    run_steps(calls, 2)  # first use
    time.sleep(3.0)
    smi.phase(f"{spec.name} {text} steps")
    steps = run_steps(calls, args.steps)
    units, sums = [], {k: 0.0 for k in UNIT_TIMINGS}
    largest = None
    for u in pred.units:
        case = coll.cases.get(u.signature)
        if case is None:
            continue
        runnable = lower(case, u.point, DEVICE)
        with torch.no_grad():
            runnable.check()
        got = {}
        for how, kw in UNIT_TIMINGS.items():
            if how == "burst":
                time.sleep(1.0)
            elif how == "after_step":
                heat_until = time.perf_counter() + args.heat_ms / 1e3
                while time.perf_counter() < heat_until:
                    run_steps(calls, 1)
            smi.phase(f"{spec.name} {text} {u.role} {how}")
            got[how] = measure(runnable.fn, DEVICE, timer="stream", **kw).median_ms
            sums[how] += u.count * got[how]
        units.append({"role": u.role, "kind": u.kind, "count": u.count, "point": u.point,
                      "db_ms": u.gpu_ms, **got})
        if largest is None or u.count * got["burst"] > largest[0]:
            largest = (u.count * got["burst"], u.role, runnable.fn)
    time.sleep(3.0)
    smi.phase(f"{spec.name} {text} trajectory {largest[1]}")
    traj = trajectory(largest[2])
    settled = statistics.median(steps[len(steps) // 2:])
    row = {"batch": text, "steps_ms": steps, "step_settled_ms": settled,
           "step_first_ms": steps[0], "db_gpu_ms": pred.gpu_ms, "db_host_ms": pred.host_ms,
           "sum_ms": sums, "units": units,
           "trajectory": {"role": largest[1], "window_ms": 10.0, "ms_per_call": traj}}
    print(json.dumps({k: v for k, v in row.items() if k not in ("units", "steps_ms",
                                                                "trajectory")}), flush=True)
    return row


def markdown(result: dict) -> str:
    lines = ["# Steps under sustained load against their units", "",
             f"- command: `{result['command']}`",
             f"- machine: {result['machine']['device']}, driver {result['driver']}, torch "
             f"{result['machine']['torch']}, transformers {result['machine']['transformers']}",
             f"- DB: `{result['db']}` (stream timer); padded engine, sdpa, bfloat16",
             "- step: median of the second half of the steps run back to back after 3 s idle; "
             "first: the first of them", "",
             "| model | batch | step first ms | step settled ms | DB predicted GPU ms "
             "| Σ burst | Σ settled | Σ after step | settled / Σ burst | settled / Σ after step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        for r in run["batches"]:
            s = r["sum_ms"]
            lines.append(
                f"| {run['model']} | {r['batch']} | {r['step_first_ms']:.2f} | "
                f"{r['step_settled_ms']:.2f} | {r['db_gpu_ms']:.2f} | {s['burst']:.2f} | "
                f"{s['settled']:.2f} | {s['after_step']:.2f} | "
                f"{r['step_settled_ms'] / s['burst']:.3f} | "
                f"{r['step_settled_ms'] / s['after_step']:.3f} |")
    lines += ["", "Clock while each phase ran (nvidia-smi, MHz median / W median):", ""]
    for phase, v in result["clock_by_phase"].items():
        lines.append(f"- {phase}: {v['sm_mhz']:.0f} MHz, {v['power_w']:.0f} W ({v['n']} samples)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="bench/results/stream_timer/stream.db")
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b", "qwen2.5-7b"])
    parser.add_argument("--batches", nargs="+", default=["prefill:4x1024", "decode:32x1024"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--heat-ms", type=float, default=500.0)
    parser.add_argument("--out", default="bench/results/clock_settle")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("clock_settle.py needs a CUDA device")
    smi = Sampler()
    engine = EngineProfile()
    runs = []
    with LatencyDB.open(args.db, create=False) as db:
        env = next(e["fingerprint"] for e in db.environments()
                   if e.get("device_type") == "cuda")
        for name in args.models:
            spec = resolve_model(name)
            coll = collect([spec], engine, ["prefill", "decode"])
            model = build_model(spec, engine, DEVICE)
            runs.append({"model": name, "batches": [
                one_batch(db, env, spec, engine, model, coll, text, args, smi)
                for text in args.batches]})
            del model
            torch.cuda.empty_cache()
    samples = smi.close()
    phases: dict[str, list[dict]] = {}
    for s in samples:
        phases.setdefault(s["phase"], []).append(s)
    result = {"command": "python bench/clock_settle.py " + " ".join(sys.argv[1:]),
              "machine": machine(DEVICE), "driver": driver_version(), "db": args.db,
              "runs": runs,
              "clock_by_phase": {p: {"sm_mhz": statistics.median(x["sm_mhz"] for x in v),
                                     "power_w": statistics.median(x["power_w"] for x in v),
                                     "n": len(v)}
                                 for p, v in phases.items() if p not in (None, "end")},
              "samples": samples}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
