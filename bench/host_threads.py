"""Does host work slow down as the host probe does, and the same way on an engine's thread?

    python bench/host_threads.py [--rounds 80] [--out bench/results/host_threads.json]

On a CUDA machine, alternates the host probe (`hostinfo.host_probe_ms`) with two kinds of
host work: a cuDNN graph build (the engine's sdpa attention at a shape it has not met,
`paged.new_shape_attention`, the `shape_build` units) and a burst of small-op dispatch (200
eager adds on a one-element tensor, the host side of a launch-bound step). Each round times
the probe just before and just after the work. It runs once on the main thread, then on a
worker thread while the main thread waits on a queue, as `validate-serving`'s engine thread
runs. Writes (bench/results/host_threads.{json,md}), per thread and work: the mean work ms
at the probe's fast and slow level (rounds split at the midpoint of the probes' 10th and 90th
percentiles), the ratio of the two against the probes' own, and the elasticity (the slope of
log work ms on log probe ms; 1 = the work scales as the probe does).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dooly_fx.hostinfo import host_probe_ms, machine
from dooly_fx.paged import new_shape_attention

DISPATCH_OPS = 200


def _works(device: str) -> dict:
    build = new_shape_attention(32, 128, torch.bfloat16, device, 1)
    tiny = torch.zeros(1, device=device)

    def dispatch() -> None:
        for _ in range(DISPATCH_OPS):
            tiny.add_(1)

    return {"shape build": build, "dispatch": dispatch}


def _rounds(work, rounds: int, device: str) -> list[tuple[float, float]]:
    """(probe ms, work ms) per round; the probe is the mean of the one before and after."""
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        before = host_probe_ms()
        start = time.perf_counter()
        work()
        ms = (time.perf_counter() - start) * 1e3
        after = host_probe_ms()
        out.append(((before + after) / 2, ms))
    torch.cuda.synchronize(device)
    return out


def _on_worker(work, rounds: int, device: str) -> list[tuple[float, float]]:
    """`_rounds` on a worker thread, the main thread polling a queue meanwhile."""
    done: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: done.put(_rounds(work, rounds, device)))
    thread.start()
    while True:
        try:
            return done.get(timeout=0.5)
        except queue.Empty:
            continue


def _summary(pairs: list[tuple[float, float]]) -> dict:
    probe, work = (np.array(x) for x in zip(*pairs, strict=True))
    split = (np.quantile(probe, 0.1) + np.quantile(probe, 0.9)) / 2
    fast, slow = probe < split, probe >= split
    row = {"rounds": len(pairs), "split_ms": float(split), "fast_rounds": int(fast.sum()),
           "slow_rounds": int(slow.sum()), "mean_probe_ms": float(probe.mean()),
           "mean_work_ms": float(work.mean()),
           "elasticity": float(np.polyfit(np.log(probe), np.log(work), 1)[0])}
    if fast.any() and slow.any():
        row.update(fast_probe_ms=float(probe[fast].mean()), slow_probe_ms=float(probe[slow].mean()),
                   fast_work_ms=float(work[fast].mean()), slow_work_ms=float(work[slow].mean()))
        row["probe_ratio"] = row["slow_probe_ms"] / row["fast_probe_ms"]
        row["work_ratio"] = row["slow_work_ms"] / row["fast_work_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path("bench/results/host_threads.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("host_threads needs a CUDA device")
    device = "cuda"
    rows = []
    for name, work in _works(device).items():
        for _ in range(3):
            work()  # first calls: cuDNN handles, the caching allocator
        for where, run in (("main thread", _rounds), ("worker thread", _on_worker)):
            rows.append({"work": name, "thread": where, **_summary(run(work, args.rounds,
                                                                      device))})
    command = " ".join(["python", *sys.argv])
    args.out.write_text(json.dumps({"command": command, "machine": machine(device),
                                    "rows": rows}, indent=1) + "\n")
    m = machine(device)
    lines = ["# Host work against the host probe, by thread", "",
             f"- command: `{command}` on {m.get('device')}, torch {m.get('torch')}", "",
             "| work | thread | rounds (fast / slow) | probe ms fast / slow | work ms fast / slow "
             "| work ratio / probe ratio | elasticity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "probe_ratio" in r:
            cells = (f"{r['fast_probe_ms']:.3f} / {r['slow_probe_ms']:.3f} | "
                     f"{r['fast_work_ms']:.2f} / {r['slow_work_ms']:.2f} | "
                     f"{r['work_ratio']:.2f} / {r['probe_ratio']:.2f}")
        else:
            cells = f"{r['mean_probe_ms']:.3f} | {r['mean_work_ms']:.2f} | one level only"
        lines.append(f"| {r['work']} | {r['thread']} | {r['fast_rounds']} / {r['slow_rounds']} "
                     f"| {cells} | {r['elasticity']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
