"""How the engine's host issue and GPU execution overlap, read from step predictions.

    python bench/overlap.py --steps do_bench=bench/results/steps/replayed \\
        --steps stream=bench/results/paged_stream/steps --models a,b,... \\
        --engine 'paged|sdpa|bfloat16' --out bench/results/paged_stream/overlap.json

Reads replayed `validate-steps --json` files (measured steps, each predicted from a DB) for
one or more DBs, and writes `OUT.{json,md}`. A step is predicted as `prepare + max(GPU,
host)` at the host speed it ran at (`at_host_ms`); where host and GPU take about as long,
a queue that does not hide one behind the other would make the step longer than that. So per
DB: the signed error of the steps by their host / GPU ratio, the same with `max` replaced by
the smooth maximum `(GPU^p + host^p)^(1/p)` for a few `p`, and how its predicted GPU time
compares with the first DB's on the same steps. CPU only; the measurements stay as they were.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from validate_steps_report import wanted

BALANCED = (0.6, 1.6)
"""Host / GPU ratios of the steps counted as neither host- nor GPU-bound."""
POWERS = (np.inf, 8.0, 4.0, 3.0)


def _steps(folder: Path, engine: str, models: str | None) -> dict[tuple, dict]:
    """(model, spec) -> the step's measured median and predicted parts at its host speed."""
    out = {}
    for path in sorted(folder.glob("steps_*.json")):
        report = json.loads(path.read_text())
        if not wanted(report, engine, models):
            continue
        for s in report["steps"]:
            if s["skipped"] or s.get("host_scale") is None:
                continue
            scale = s["host_scale"]
            out[(report["model"], s["spec"])] = {
                "phase": s["phase"], "measured": s["median_ms"], "gpu": s["gpu_ms"],
                "host": s["host_ms"] * scale, "prepare": s["prepare_ms"] * scale}
    return out


def _errors(steps: list[dict], p: float) -> np.ndarray:
    """Signed relative error of each step with host and GPU combined by the p-smooth max."""
    gpu = np.array([s["gpu"] for s in steps])
    host = np.array([s["host"] for s in steps])
    both = np.maximum(gpu, host) if np.isinf(p) else (gpu ** p + host ** p) ** (1 / p)
    pred = np.array([s["prepare"] for s in steps]) + both
    meas = np.array([s["measured"] for s in steps])
    return (pred - meas) / meas


def _kinds(steps: list[dict]) -> dict[str, np.ndarray]:
    ratio = np.array([s["host"] / s["gpu"] for s in steps])
    return {"GPU-bound": ratio < BALANCED[0],
            "balanced": (ratio >= BALANCED[0]) & (ratio <= BALANCED[1]),
            "host-bound": ratio > BALANCED[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", action="append", required=True, metavar="LABEL=DIR",
                        help="replayed steps files predicted from one DB (repeat per DB)")
    parser.add_argument("--engine", default="paged|sdpa|bfloat16")
    parser.add_argument("--models", help="comma-separated (default: every file's model)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dbs = {}
    for item in args.steps:
        label, _, folder = item.partition("=")
        if not folder:
            sys.exit(f"--steps {item}: give LABEL=DIR")
        dbs[label] = _steps(Path(folder), args.engine, args.models)
    common = sorted(set.intersection(*(set(d) for d in dbs.values())))
    if not common:
        sys.exit("no step is in every folder")
    first = next(iter(dbs.values()))
    report = {"command": " ".join(["python", *sys.argv]), "steps": len(common),
              "balanced": BALANCED, "dbs": {}}
    for label, by_key in dbs.items():
        steps = [by_key[k] for k in common]
        kinds = _kinds(steps)
        row = {"smooth_max": {}, "kinds": {k: int(sel.sum()) for k, sel in kinds.items()},
               "gpu_ratio": {}}
        for p in POWERS:
            err = _errors(steps, p)
            row["smooth_max"][str(p)] = {
                "median_ape": float(np.median(np.abs(err))),
                "p90_ape": float(np.percentile(np.abs(err), 90)),
                **{f"{k}_signed_median": float(np.median(err[sel])) if sel.any() else None
                   for k, sel in kinds.items()}}
        for phase in ("prefill", "decode", "mixed"):
            ratios = [by_key[k]["gpu"] / first[k]["gpu"] for k in common
                      if by_key[k]["phase"] == phase]
            if ratios:
                row["gpu_ratio"][phase] = float(np.median(ratios))
        report["dbs"][label] = row
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    labels = list(dbs)
    lines = ["# Host and GPU overlap in the engine's steps", "",
             f"- command: `{report['command']}`",
             f"- {len(common)} measured steps ({args.engine}) that every folder predicts, each at "
             "the host speed it ran at; balanced: host / GPU between "
             f"{BALANCED[0]} and {BALANCED[1]} (as predicted from each DB)",
             "- p: how host and GPU time combine, `(GPU^p + host^p)^(1/p)`; inf is "
             "`max(GPU, host)`, the model `predict` uses", "",
             "| DB | p | median APE | p90 APE | GPU-bound signed median (steps) | balanced | "
             "host-bound |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        row = report["dbs"][label]
        for p, r in row["smooth_max"].items():
            cells = [f"{r[f'{k}_signed_median']:+.1%} ({n})" if r[f"{k}_signed_median"]
                     is not None else f"– ({n})" for k, n in row["kinds"].items()]
            lines.append(f"| {label} | {p} | {r['median_ape']:.1%} | {r['p90_ape']:.1%} | "
                         + " | ".join(cells) + " |")
    lines += ["", f"Predicted GPU time against `{labels[0]}`'s on the same steps (median "
              "ratio):", "", "| DB | " + " | ".join(("prefill", "decode", "mixed")) + " |",
              "|---|---:|---:|---:|"]
    for label in labels:
        g = report["dbs"][label]["gpu_ratio"]
        lines.append(f"| {label} | " + " | ".join(f"{g[k]:.3f}" if k in g else "–"
                                                   for k in ("prefill", "decode", "mixed"))
                     + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
