"""How far apart two measurements of the same engine step can be, host-bound or GPU-bound.

    python bench/host_noise.py [--steps bench/results/steps] [--a llama-3.1-8b] [--b mistral-7b]

Llama-3.1-8B and Mistral-7B have the same layers (32 × hidden 4096, 32/8 heads of 128,
MLP 14336); only the vocabulary (one LM head over one row per sequence) and the rotary base
differ, so each engine step costs both the same GPU and host work. Their validate-steps files
(measured one after the other on one machine) are compared step by step: the ratio of measured
times where the step is GPU-bound in both predictions, and where it is host-bound (Python and
kernel issue). The spread of the host-bound ratios is a floor under the error of any host-time
prediction on that machine. Writes bench/results/host_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=Path, default=Path("bench/results/steps/replayed"))
    parser.add_argument("--a", default="llama-3.1-8b")
    parser.add_argument("--b", default="mistral-7b")
    parser.add_argument("--engine", default="paged_sdpa", help="the files' engine suffix")
    parser.add_argument("--out", type=Path, default=Path("bench/results/host_noise.json"))
    args = parser.parse_args()
    runs = [json.loads((args.steps / f"steps_{m}_{args.engine}.json").read_text())
            for m in (args.a, args.b)]
    rows = []
    for x, y in zip(runs[0]["steps"], runs[1]["steps"], strict=True):
        if x["spec"] != y["spec"] or x["skipped"] or y["skipped"]:
            continue
        bound = "host" if x["host_ms"] > x["gpu_ms"] and y["host_ms"] > y["gpu_ms"] else \
            "gpu" if x["gpu_ms"] >= x["host_ms"] and y["gpu_ms"] >= y["host_ms"] else "mixed"
        rows.append({"step": x["spec"], "bound": bound, "a_ms": x["median_ms"],
                     "b_ms": y["median_ms"], "ratio": x["median_ms"] / y["median_ms"]})
    summary = {}
    for bound in ("gpu", "host"):
        logs = np.abs(np.log([r["ratio"] for r in rows if r["bound"] == bound]))
        summary[bound] = {"steps": int(logs.size),
                          "median_abs_log_ratio": float(np.median(logs)) if logs.size else None,
                          "max_abs_log_ratio": float(logs.max()) if logs.size else None}
    result = {"a": args.a, "b": args.b, "engine": runs[0]["engine"],
              "measured_on": [r.get("measured_on") for r in runs], "rows": rows,
              "summary": summary, "command": " ".join(["python", *sys.argv])}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# The same step on two models of identical layers ({args.a} / {args.b}, "
             f"{result['engine']})", "",
             f"- command: `{result['command']}` (the GPU measurements of "
             f"`{args.steps}/steps_*_{args.engine}.json`, on "
             f"{runs[0].get('measured_on', {}).get('device')})", "",
             "| step | bound (predicted) | measured ms | ratio |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['bound']} | {r['a_ms']:.1f} / {r['b_ms']:.1f} | "
                     f"{r['ratio']:.2f} |")
    lines.append("")
    for bound, s in summary.items():
        if s["steps"]:
            lines.append(f"{bound}-bound: {s['steps']} steps, median |ratio - 1| "
                         f"{np.expm1(s['median_abs_log_ratio']):.1%}, largest "
                         f"{np.expm1(s['max_abs_log_ratio']):.1%}.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
