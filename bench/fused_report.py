"""The fused engine against the eager one: measured and predicted step speed-up.

    python bench/fused_report.py [--steps bench/results/fused]

Reads the pairs `steps_MODEL_eager.json` / `steps_MODEL_triton.json` that bench/fused_gpu.sh
writes (`validate-steps MODEL --kernels eager|triton` run one after the other on one GPU
machine: the same steps through transformers' model and through the model whose RMSNorms and
SiLU·mul MLPs run our Triton kernels) and writes `bench/results/fused.{json,md}`: per step the
measured and predicted time of both engines, the measured speed-up and the predicted one, and
whether the prediction calls the step GPU- or host-bound; per model and overall, the median
error of the predicted speed-up over GPU-bound steps and over all steps.

`--other-instance DIR` also compares each eager steps file with `DIR/steps_MODEL_sdpa.json`,
the same steps of the same engine measured on another instance of the machine: the ratio of
the two measurements per step, apart for GPU- and host-bound steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=Path, default=Path("bench/results/fused"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fused.json"))
    parser.add_argument("--other-instance", type=Path,
                        help="folder of validate-steps files of the eager engine measured on "
                             "another machine instance")
    args = parser.parse_args()
    pairs = [(path, path.with_name(path.name.replace("_eager.json", "_triton.json")))
             for path in sorted(args.steps.glob("steps_*_eager.json"))]
    pairs = [(e, t) for e, t in pairs if t.exists()]
    if not pairs:
        sys.exit(f"{args.steps}: no steps_*_eager.json / steps_*_triton.json pairs")
    models, rows = [], []
    for eager_path, fused_path in pairs:
        eager, fused = (json.loads(p.read_text()) for p in (eager_path, fused_path))
        mine = []
        for e, f in zip(eager["steps"], fused["steps"], strict=True):
            if e["skipped"] or f["skipped"]:
                continue
            measured = e["median_ms"] / f["median_ms"]
            predicted = e["predicted_ms"] / f["predicted_ms"]
            mine.append({"model": eager["model"], "step": e["spec"],
                         "eager_ms": e["median_ms"], "fused_ms": f["median_ms"],
                         "eager_predicted_ms": e["predicted_ms"],
                         "fused_predicted_ms": f["predicted_ms"],
                         "speedup": measured, "predicted_speedup": predicted,
                         "speedup_error": predicted / measured - 1,
                         "fused_error": f["error"],
                         "gpu_bound": f["gpu_ms"] >= f["host_ms"]})
        rows += mine
        models.append({"model": eager["model"], "engines": [eager["engine"], fused["engine"]],
                       "measured_on": fused.get("measured_on"), **_summary(mine)})
    summary = {"models": models, "steps": rows, **_summary(rows),
               "command": " ".join(["python", *sys.argv])}
    if args.other_instance:
        summary["other_instance"] = _instances([e for e, _ in pairs], args.other_instance)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Fused engine (`--kernels triton`) vs eager: step speed-up, measured and predicted",
             "", f"- summarised by: `{summary['command']}` from `{args.steps}/`",
             "- measured by: `bash bench/fused_gpu.sh OUT_DIR` on the GPU named in each file "
             "(`validate-steps MODEL --kernels eager|triton --db h100.db --device cuda`)", "",
             "| model | GPU-bound steps | speed-up error (GPU-bound) | all steps | "
             "speed-up error (all) | fused step APE (GPU-bound) | fused step APE (all) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        lines.append(f"| {m['model']} | {m['gpu_bound_steps']} | "
                     f"{_pct(m['gpu_bound_median_error'])} | {m['steps']} | "
                     f"{_pct(m['median_error'])} | {_pct(m['gpu_bound_fused_ape'])} | "
                     f"{_pct(m['fused_ape'])} |")
    lines += ["", f"Over {summary['steps']} steps: median |speed-up error| "
              f"{_pct(summary['median_error'])}; over the {summary['gpu_bound_steps']} GPU-bound "
              f"ones {_pct(summary['gpu_bound_median_error'])}.", "",
              "| model | step | eager ms | fused ms | speed-up | predicted | bound |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['step']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} "
                     f"| {r['speedup']:.3f} | {r['predicted_speedup']:.3f} | "
                     f"{'GPU' if r['gpu_bound'] else 'host'} |")
    if "other_instance" in summary:
        o = summary["other_instance"]
        lines += ["", f"## The eager engine on two machine instances (`{args.other_instance}/`)",
                  "", f"Measured here / measured there, over {o['steps']} steps of "
                  f"{len(pairs)} models: GPU-bound steps {o['gpu_bound']['min']:.3f}–"
                  f"{o['gpu_bound']['max']:.3f}, host-bound steps {o['host_bound']['min']:.3f}–"
                  f"{o['host_bound']['max']:.3f} (bound as predicted for the step)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _instances(eager_files: list[Path], other: Path) -> dict:
    """Per-step ratios of each eager file's measurements to the same steps in `other`."""
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for path in eager_files:
        here = json.loads(path.read_text())
        there_path = other / f"steps_{here['model']}_sdpa.json"
        if not there_path.exists():
            continue
        there = {s["spec"]: s for s in json.loads(there_path.read_text())["steps"]}
        for s in here["steps"]:
            t = there.get(s["spec"])
            if t and not s["skipped"] and not t["skipped"]:
                ratios[s["gpu_ms"] >= s["host_ms"]].append(s["median_ms"] / t["median_ms"])
    return {"steps": sum(map(len, ratios.values())),
            **{name: {"min": min(r), "max": max(r)} if r else None
               for name, r in (("gpu_bound", ratios[True]), ("host_bound", ratios[False]))}}


def _summary(rows: list[dict]) -> dict:
    def median(key: str, gpu_only: bool) -> float | None:
        xs = [abs(r[key]) for r in rows if r["gpu_bound"] or not gpu_only]
        return float(np.median(xs)) if xs else None

    return {"steps": len(rows), "gpu_bound_steps": sum(r["gpu_bound"] for r in rows),
            "median_error": median("speedup_error", False),
            "gpu_bound_median_error": median("speedup_error", True),
            "fused_ape": median("fused_error", False),
            "gpu_bound_fused_ape": median("fused_error", True)}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


if __name__ == "__main__":
    main()
