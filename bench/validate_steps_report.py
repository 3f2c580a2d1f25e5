"""Summarise step-level validation results: a table per model/engine and a scatter plot.

    python bench/validate_steps_report.py [--steps bench/results/steps] [--db FILE]

Reads the `steps_*.json` files of `validate-steps --json` (each written on the GPU machine by
`python -m dooly_fx validate-steps MODEL --db ... --device cuda [--engine paged] --json FILE`,
see bench/validate_steps_gpu.sh), and writes `bench/results/validate_steps.{json,md,png}`: per
file the median and p90 absolute percentage error over its steps, how many steps were GPU- or
host-bound by the prediction and how many were outside the profiled range (paged engine: also
the first runs, at an attention shape new to the engine, against the prediction plus its
per-shape setup); over each engine's files the same; and measured vs predicted step time for
every step. Where a fidelity run
(`validate-steps --measured FILE --fidelity SPECS`) sits beside a steps file, its per-unit rows
(each leaf unit's prediction against the same module's kernel time inside the real step) are
summarised per phase of the profiled step.

With `--db`, every file's measured steps are first predicted again from that DB
(`validate-steps MODEL --measured FILE --db DB`, no GPU) into STEPS/replayed/, as the
serving report does: the measurements stay as they were taken, the predictions are the current
code's on the current DB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=Path, default=Path("bench/results/steps"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/validate_steps.json"))
    parser.add_argument("--db", type=Path, help="predict every file's steps again with this DB")
    parser.add_argument("--engine", metavar="LABEL",
                        help="only the files of this engine (e.g. 'padded|sdpa|bfloat16')")
    parser.add_argument("--models", help="comma-separated: only these models' files")
    parser.add_argument("--replayed", type=Path, metavar="DIR",
                        help="where --db writes its predictions (default: STEPS/replayed)")
    parser.add_argument("--fidelity", type=Path, metavar="DIR",
                        help="the fidelity files' folder (default: beside the steps files)")
    args = parser.parse_args()
    files = [f for f in sorted(args.steps.glob("steps_*.json"))
             if wanted(json.loads(f.read_text()), args.engine, args.models)]
    if not files:
        sys.exit(f"{args.steps}: no validate-steps JSON files")
    rows, everything, fidelity_rows = [], [], []
    for path in files:
        report = json.loads((_replay(path, args.db, args.replayed or args.steps / "replayed")
                             if args.db else path).read_text())
        steps = [s for s in report["steps"] if not s["skipped"]]
        errors = np.abs([s["error"] for s in steps])
        everything += [(report["model"], report["engine"], s) for s in steps]
        # A fidelity run (`--measured` + `--fidelity`) sits beside its steps file.
        beside = (args.fidelity or path.parent) / path.name.replace("steps_", "fidelity_", 1)
        extra = json.loads(beside.read_text()) if beside.exists() else report
        units = extra.get("fidelity", {}).get("units", [])
        fidelity = {phase: _median_abs([u["error"] for u in units
                                        if u["step"].startswith(phase)])
                    for phase in ("prefill", "decode")} if units else None
        fidelity_rows += [{"model": report["model"], **u} for u in units]
        rows.append({
            "file": path.name, "model": report["model"], "engine": report["engine"],
            "measured_on": report.get("measured_on"), "steps": len(steps),
            "skipped": len(report["steps"]) - len(steps),
            "median_ape": float(np.median(errors)), "p90_ape": float(np.percentile(errors, 90)),
            "host_bound": sum(s["host_ms"] > s["gpu_ms"] for s in steps),
            "extrapolated": sum(bool(s["extrapolated"]) for s in steps),
            "gpu_bound_median_ape": float(np.median([abs(s["error"]) for s in steps
                                                     if s["gpu_ms"] >= s["host_ms"]] or [np.nan])),
            "unit_fidelity_median_ape": fidelity,
            "first_median_ape": report.get("first_median_ape"),
            "at_host_median_ape": report.get("at_host_median_ape"),
            "at_host_p90_ape": report.get("at_host_p90_ape"),
        })
    fidelity_all = {phase: _median_abs([u["error"] for u in fidelity_rows
                                        if u["step"].startswith(phase)])
                    for phase in ("prefill", "decode", "")}
    loaded_all = {phase: _median_abs([u["loaded_error"] for u in fidelity_rows
                                      if u["step"].startswith(phase) and "loaded_error" in u])
                  for phase in ("prefill", "decode", "")}
    by_engine = {}
    for kind in sorted({e.split("|")[0] for _, e, _ in everything}):
        steps = [s for _, e, s in everything if e.split("|")[0] == kind]
        errors = np.abs([s["error"] for s in steps])
        gpu = np.abs([s["error"] for s in steps if s["gpu_ms"] >= s["host_ms"]])
        at_host = np.abs([s["at_host_error"] for s in steps if "at_host_error" in s])
        by_engine[kind] = {"steps": len(errors), "median_ape": float(np.median(errors)),
                           "p90_ape": float(np.percentile(errors, 90)),
                           "gpu_bound_steps": len(gpu),
                           "gpu_bound_median_ape": float(np.median(gpu)),
                           "gpu_bound_p90_ape": float(np.percentile(gpu, 90)),
                           "at_host_steps": len(at_host),
                           "at_host_median_ape": float(np.median(at_host)) if len(at_host)
                           else None,
                           "at_host_p90_ape": float(np.percentile(at_host, 90)) if len(at_host)
                           else None}
    summary = {"files": rows, "by_engine": by_engine,
               "unit_fidelity": {"units": len(fidelity_rows),
                                 "median_ape": fidelity_all[""],
                                 "prefill_median_ape": fidelity_all["prefill"],
                                 "decode_median_ape": fidelity_all["decode"],
                                 "loaded_median_ape": loaded_all[""],
                                 "loaded_prefill_median_ape": loaded_all["prefill"],
                                 "loaded_decode_median_ape": loaded_all["decode"]},
               "command": " ".join(["python", *sys.argv])}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Step-level validation (real engine steps vs prediction)", "",
             f"- summarised by: `{summary['command']}` from `{args.steps}/*.json`"
             + (f"; predictions replayed from those measurements with `{args.db}` "
                f"(`validate-steps MODEL --measured FILE --db DB`, files in "
                f"`{args.replayed or args.steps / 'replayed'}/`)" if args.db else "")
             + (f"; fidelity files from `{args.fidelity}`" if args.fidelity else ""),
             "- each file: `python -m dooly_fx validate-steps MODEL --db h100.db --device cuda "
             "[--engine paged] [--attn eager] --json FILE` on the GPU named in it "
             "(`measured_on`); padded: the model's forward (equal-length sequences); paged: "
             "the continuous-batching engine's whole step (batch preparation, forward, "
             "sampling), sequences of different lengths in one step", "",
             "- *at host speed*: the same steps predicted for the speed the host had while each "
             "ran (the host probe timed before each rep, `MeasuredStep.host_probe_ms`; "
             "docs/predict.md, \"Host speed\")", "",
             "| model | engine | steps | median APE | p90 APE | at host speed median / p90 APE "
             "| GPU-bound median APE | host-bound steps | outside profiled range | "
             "unit fidelity prefill / decode | first run (new shape) median APE |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        engine = r["engine"].replace("|", "\\|")
        first = "" if r["first_median_ape"] is None else f"{r['first_median_ape']:.1%}"
        at_host = "" if r["at_host_median_ape"] is None else \
            f"{r['at_host_median_ape']:.1%} / {r['at_host_p90_ape']:.1%}"
        lines.append(f"| {r['model']} | {engine} | {r['steps']} | {r['median_ape']:.1%} | "
                     f"{r['p90_ape']:.1%} | {at_host} | {r['gpu_bound_median_ape']:.1%} | "
                     f"{r['host_bound']} | {r['extrapolated']} | {_fidelity(r)} | {first} |")
    lines.append("")
    for kind, e in by_engine.items():
        lines.append(f"All {e['steps']} {kind}-engine steps: median APE {e['median_ape']:.1%}, "
                     f"p90 APE {e['p90_ape']:.1%}; the {e['gpu_bound_steps']} GPU-bound ones "
                     f"(predicted GPU time >= host time): median {e['gpu_bound_median_ape']:.1%}, "
                     f"p90 {e['gpu_bound_p90_ape']:.1%}."
                     + (f" At the host's speed while each step ran ({e['at_host_steps']} "
                        f"steps): median {e['at_host_median_ape']:.1%}, p90 "
                        f"{e['at_host_p90_ape']:.1%}." if e["at_host_steps"] else ""))
    if fidelity_rows:
        lines += ["", "Unit fidelity (`--fidelity \"prefill:4x1024;decode:32x1024\"`: each "
                  "leaf unit's predicted GPU time against its module's kernel time inside the "
                  "real step, torch.profiler): median APE "
                  f"{fidelity_all['']:.1%} over {len(fidelity_rows)} units "
                  f"(prefill {fidelity_all['prefill']:.1%}, "
                  f"decode {fidelity_all['decode']:.1%})."
                  + (f" With each unit's share of the step's lower clock under load "
                     f"(`Step.in_step_ms`): {loaded_all['']:.1%} (prefill "
                     f"{loaded_all['prefill']:.1%}, decode {loaded_all['decode']:.1%})."
                     if loaded_all[""] is not None else "")]
    lines += ["", f"![measured vs predicted]({args.out.with_suffix('.png').name})"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(everything, args.out.with_suffix(".png"))
    print("\n".join(lines))


def wanted(report: dict, engine: str | None, models: str | None) -> bool:
    """Whether a report (of validate-steps or validate-serving) is of `engine` (if given) and
    one of `models` (comma-separated, if given)."""
    return ((not engine or report["engine"] == engine)
            and (not models or report["model"] in models.split(",")))


def _replay(path: Path, db: Path, out: Path) -> Path:
    """`path`'s measured steps predicted again from `db`; returns the new JSON."""
    report = json.loads(path.read_text())
    kind, attn, _, *kernels = report["engine"].split("|")
    out.mkdir(parents=True, exist_ok=True)
    target = out / path.name
    command = [sys.executable, "-m", "dooly_fx", "validate-steps", report["model"], "--db",
               str(db), "--engine", kind, "--attn", attn, "--kernels",
               kernels[0] if kernels else "eager", "--device", "cuda", "--measured", str(path),
               "--json", str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{path}: replay failed: {done.stderr.strip()}")
    return target


def _median_abs(errors: list[float]) -> float | None:
    return float(np.median(np.abs(errors))) if errors else None


def _fidelity(row: dict) -> str:
    f = row["unit_fidelity_median_ape"]
    return "" if f is None else f"{f['prefill']:.1%} / {f['decode']:.1%}"


def _plot(everything, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    labels = sorted({(m, e) for m, e, _ in everything})
    for i, (model, engine) in enumerate(labels):
        pts = [(s["median_ms"], s["predicted_ms"]) for m, e, s in everything
               if (m, e) == (model, engine)]
        x, y = zip(*pts, strict=True)
        kind, attn = engine.split("|")[:2]
        ax.scatter(x, y, s=14, color=f"C{i % 10}",
                   marker={"padded": "o", "paged": "s"}[kind] if attn == "sdpa" else
                   {"padded": "^", "paged": "D"}[kind],
                   label=f"{model} ({kind}|{attn})")
    lo = min(min(s["median_ms"], s["predicted_ms"]) for _, _, s in everything)
    hi = max(max(s["median_ms"], s["predicted_ms"]) for _, _, s in everything)
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="measured step ms", ylabel="predicted step ms",
           title="validate-steps: measured vs predicted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
