"""How fast the GPU machine's host was: the host probe across a latency DB's points and the
validate-steps runs, and what predicting each step for its host's speed does to its error.

    python bench/host_speed.py [--db bench/results/h100.db] [--steps bench/results/steps/replayed]

The host probe (`hostinfo.host_probe_ms`, a fixed pure-Python loop) is timed beside every host
time the profiler records (`points.host_probe_ms`) and before every rep of a validate-steps
run (`host_probe_ms` per step). Prints and writes (bench/results/host_speed.{json,md}): the
quantiles of the DB's probes and the ratio of their 90th to 10th percentile (the two speed
levels of the host); per replayed validate-steps file, the median probe of its steps and
the signed median error of its host-bound steps as predicted for the DB's host speed and for
the speed each step's host had (`at_host_error`).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    parser.add_argument("--steps", type=Path, default=Path("bench/results/steps/replayed"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/host_speed.json"))
    args = parser.parse_args()
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    probes = np.array([r[0] for r in conn.execute(
        "SELECT host_probe_ms FROM points WHERE status = 'ok' AND host_probe_ms IS NOT NULL")])
    if not len(probes):
        sys.exit(f"{args.db}: no point has a host probe")
    quantiles = dict(zip(map(str, QUANTILES), np.quantile(probes, QUANTILES).tolist(),
                         strict=True))
    runs = []
    for path in sorted(args.steps.glob("steps_*.json")):
        report = json.loads(path.read_text())
        steps = [s for s in report["steps"] if not s["skipped"] and "at_host_error" in s]
        bound = [s for s in steps if s["host_ms"] > s["gpu_ms"]]
        if not bound:
            continue
        runs.append({"model": report["model"], "engine": report["engine"],
                     "probe_ms": float(np.median([s["host_probe_ms"] for s in steps])),
                     "host_bound": len(bound),
                     "error": float(np.median([s["error"] for s in bound])),
                     "at_host_error": float(np.median([s["at_host_error"] for s in bound]))})
    summary = {"db": str(args.db), "probed_points": len(probes), "probe_quantiles_ms": quantiles,
               "p90_over_p10": quantiles["0.9"] / quantiles["0.1"], "runs": runs,
               "command": " ".join(["python", *sys.argv])}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    q = " / ".join(f"{v:.3f}" for v in quantiles.values())
    lines = ["# Host speed on the GPU machine", "",
             f"- command: `{summary['command']}` (the probes of `{args.db}` and the "
             f"validate-steps files of `{args.steps}`, measured on the H100 machine)", "",
             f"{len(probes)} probed points of the DB: probe p10 / p25 / p50 / p75 / p90 {q} ms; "
             f"p90 / p10 = {summary['p90_over_p10']:.2f}.", "",
             "| model | engine | median probe ms | host-bound steps | signed median error: "
             "DB's speed | at host speed |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['engine'].replace('|', chr(92) + '|')} | "
                     f"{r['probe_ms']:.3f} | {r['host_bound']} | {r['error']:+.1%} | "
                     f"{r['at_host_error']:+.1%} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
