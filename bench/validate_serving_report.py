"""Summarise request-level validation: TTFT/TPOT errors per model and attention, and a plot.

    python bench/validate_serving_report.py [--runs bench/results/serving] [--db FILE]
        [--replayed DIR] [--models a,b,...] [--engine LABEL]

Reads the `serving_*.json` files of `validate-serving --json` (each written on the GPU machine
by bench/validate_serving_gpu.sh: transformers continuous batching serving a trace, and the
simulator on the same requests), and writes `bench/results/validate_serving.{json,md,png}`:
per run the MAPE over requests and the p50/p90 errors of TTFT and TPOT, the step-time model's
error on the engine's own batches, and where the engine's step time went.

With `--db`, every run's measurement is first compared again with the simulator driven by
that DB (`validate-serving MODEL --measured FILE --db DB`, no GPU), into RUNS/replayed/ (or
--replayed DIR), so the table shows the current step-time model against the same GPU
measurements. --models and --engine keep the runs of those models and that engine only (for a
DB that profiled some of them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from validate_steps_report import wanted


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _host(h: dict) -> str:
    """The host-speed cells of a run: its probe and the DB's, and the MAPEs at the DB's."""
    if h.get("run_probe_ms") is None or not h.get("db_probe_ms"):
        return "– | –"
    db = h.get("at_db_speed", {})
    return (f"{h['run_probe_ms']:.3f} / {h['db_probe_ms']:.3f} | {db['ttft_mape']:.1%} / "
            f"{db['tpot_mape']:.1%}")


def _engine(row: dict) -> str:
    """A run's engine cell, marked where it served with the garbage collector off."""
    off = row["settings"].get("garbage_collector") is False
    return _cell(row["engine"]) + (" (GC off)" if off else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("bench/results/serving"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/validate_serving.json"))
    parser.add_argument("--db", type=Path, help="replay every run's prediction with this DB")
    parser.add_argument("--replayed", type=Path, metavar="DIR",
                        help="where --db writes its replays (default: RUNS/replayed)")
    parser.add_argument("--models", help="comma-separated: only these models' runs")
    parser.add_argument("--engine", metavar="LABEL",
                        help="only the runs of this engine (e.g. 'paged|sdpa|bfloat16')")
    args = parser.parse_args()
    files = [p for p in sorted(args.runs.glob("serving_*.json"))
             if wanted(json.loads(p.read_text()), args.engine, args.models)]
    if not files:
        sys.exit(f"{args.runs}: no validate-serving JSON files of the models and engine asked")
    replayed = args.replayed or args.runs / "replayed"
    # As predicted on the GPU machine, with the DB it was given at serving time.
    served = {p.name: json.loads(p.read_text()) for p in files}
    if args.db:
        files = [_replay(path, args.db, replayed) for path in files]
    rows, runs = [], []
    for path in files:
        r = json.loads(path.read_text())
        s = r["steps"]
        row = {"file": path.name, "model": r["model"], "engine": r["engine"],
               "predicted_from": r["predicted_from"], "requests": r["requests"],
               "finished": r["finished"], "timed_out": r["timed_out"],
               "ttft": {k: r["ttft"][k] for k in ("mape", "p50_error", "p90_error")},
               "tpot": {k: r["tpot"][k] for k in ("mape", "p50_error", "p90_error")},
               "step_mape": s["mape"], "step_bias": s["bias"],
               "step_ms": s["measured_ms"], "predicted_step_ms": s["predicted_ms"]["mean"],
               "settings": r["settings"], "workload": r["workload"],
               "measured_on": r["measured_on"],
               "at_serving": {k: served[path.name][k]["mape"] for k in ("ttft", "tpot")},
               "host_speed": r.get("host_speed", {}),
               "by_kind": s.get("by_kind", []), "scheduler": r.get("scheduler")}
        rows.append(row)
        runs.append(r)
    summary = {
        "runs": len(rows),
        "ttft_mape_median": float(np.median([r["ttft"]["mape"] for r in rows])),
        "tpot_mape_median": float(np.median([r["tpot"]["mape"] for r in rows])),
        "step_mape_median": float(np.median([r["step_mape"] for r in rows])),
    }
    locked = [r["scheduler"] for r in rows if r["scheduler"]]
    if locked:
        summary["scheduler"] = {
            "runs": len(locked),
            "runs_every_batch_matched": sum(x["matched"] == x["steps"] for x in locked),
            "batches": sum(x["steps"] for x in locked),
            "batches_matched": sum(x["matched"] for x in locked),
            "ttft_mape_max": max(x["ttft_mape"] for x in locked),
            "tpot_mape_max": max(x["tpot_mape"] for x in locked)}
    at_db = [r["host_speed"]["at_db_speed"] for r in rows if "at_db_speed" in r["host_speed"]]
    if at_db:
        summary["at_db_speed"] = {"runs": len(at_db), **{
            f"{k}_median": float(np.median([a[k] for a in at_db]))
            for k in ("ttft_mape", "tpot_mape", "step_mape")}}
    machine = rows[0]["measured_on"]
    elasticity = next((r["host_speed"]["elasticity"] for r in rows
                       if "elasticity" in r["host_speed"]), None)
    args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1) + "\n")
    counts = [r["workload"].get("num_requests") for r in rows]
    usual = max(set(counts), key=counts.count)
    w = dict(rows[counts.index(usual)]["workload"])
    others = [f"{r['model']}: {n}" for r, n in zip(rows, counts, strict=True) if n != usual]
    w["num_requests"] = "N"
    lines = [
        "# Request-level validation (transformers continuous batching vs simulate)", "",
        f"- summarised by: `python {' '.join(sys.argv)}` from `{args.runs}/serving_*.json`",
        "- each file: `bash bench/validate_serving_gpu.sh OUT DB MODEL:ATTN` on the GPU "
        "machine, i.e. `python -m dooly_fx validate-serving MODEL --db DB --attn ATTN --trace "
        f"{w.get('trace')} --num-requests {w.get('num_requests')} --speedup "
        f"{w.get('speedup')} --max-prompt {w.get('max_prompt')} --max-output "
        f"{w.get('max_output')} --time-limit 120 --json FILE` (eager: `--max-batch-tokens 1024 "
        "--num-blocks 128`)",
        f"- measured on {machine.get('device')}, torch {machine.get('torch')}, transformers "
        f"{machine.get('transformers')}; "
        + (f"predictions replayed from those measurements with `{args.db}` (`validate-serving "
           "MODEL --measured FILE --db DB`, files in "
           f"`{replayed}/`)" if args.db else
           "predictions as computed on the GPU machine from the DB it was given"),
        f"- N = {usual} requests" + (f" ({', '.join(others)})" if others else ""),
        "- MAPE over requests; p50/p90 error = simulated percentile vs measured percentile; "
        "step MAPE = the step-time model on the engine's own recorded batches; at serving time = "
        "the same comparison made on the GPU machine right after the run, with the DB it was "
        "given then",
        "- host probe = the run's host speed (the mean of the probes the engine's thread timed "
        "between steps, each clipped at twice their median: `hostinfo.run_host_probe_ms`) and "
        "the DB's; predictions are for the run's speed (host-side times × (run / DB) ** the "
        "DB's host elasticity" + (f", {elasticity:.2f}" if elasticity is not None else "") +
        ": `predict.host_elasticity`), and the last column makes them at the DB's own speed "
        "instead", "",
        "| model | engine | predicted from | finished | TTFT MAPE | TTFT p50 | TTFT p90 | "
        "TPOT MAPE | TPOT p50 | TPOT p90 | step MAPE | step bias | measured step ms "
        "(prepare + forward; GC pauses) | predicted step ms | TTFT / TPOT MAPE at serving time | "
        "host probe ms (run / DB) | TTFT / TPOT MAPE at the DB's host speed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["step_ms"]
        done = f"{r['finished']}/{r['requests']}" + (" (time limit)" if r["timed_out"] else "")
        gc = "" if ms.get("gc") is None else f"; GC {ms['gc']:.1f}"
        lines.append(
            f"| {r['model']} | {_engine(r)} | {_cell(r['predicted_from'])} | {done} | "
            f"{r['ttft']['mape']:.1%} | {_pct(r['ttft']['p50_error'])} | "
            f"{_pct(r['ttft']['p90_error'])} | {r['tpot']['mape']:.1%} | "
            f"{_pct(r['tpot']['p50_error'])} | {_pct(r['tpot']['p90_error'])} | "
            f"{r['step_mape']:.1%} | {_pct(r['step_bias'])} | {ms['mean']:.1f} "
            f"({ms['prepare']:.1f} + {ms['forward']:.1f}{gc}) | {r['predicted_step_ms']:.1f} | "
            f"{r['at_serving']['ttft']:.1%} / {r['at_serving']['tpot']:.1%} | "
            f"{_host(r['host_speed'])} |")
    lines += ["", f"Median over {summary['runs']} runs: TTFT MAPE "
                  f"{summary['ttft_mape_median']:.1%}, TPOT MAPE "
                  f"{summary['tpot_mape_median']:.1%}, step MAPE "
                  f"{summary['step_mape_median']:.1%}."
              + ("" if not at_db else
                 f" At the DB's host speed instead ({summary['at_db_speed']['runs']} runs with "
                 f"probes): TTFT {summary['at_db_speed']['ttft_mape_median']:.1%}, TPOT "
                 f"{summary['at_db_speed']['tpot_mape_median']:.1%}, step "
                 f"{summary['at_db_speed']['step_mape_median']:.1%}."), ""]
    if locked:
        k = summary["scheduler"]
        lines += [f"The scheduler in lockstep (`validate_serving.lockstep`: the simulator with "
                  f"each step lasting what the engine's step of the same index lasted) forms "
                  f"{k['batches_matched']} of the engine's {k['batches']} batches as the engine "
                  f"did, every batch in {k['runs_every_batch_matched']} of {k['runs']} runs; its "
                  f"TTFT / TPOT MAPE is at most {k['ttft_mape_max']:.1%} / "
                  f"{k['tpot_mape_max']:.1%}. The errors above are the step times'.", ""]
    kinds = [k["kind"] for k in max((r["by_kind"] for r in rows), key=len)]
    if kinds:
        lines += ["Step time by kind of step, on the engine's own batches: steps, measured / "
                  "predicted mean ms (MAPE):", "",
                  "| model | engine | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---:|" * len(kinds)]
        for r in rows:
            cells = {k["kind"]: f"{k['steps']}: {k['measured_ms']:.1f} / "
                     f"{k['predicted_ms']:.1f} ({k['mape']:.1%})" for k in r["by_kind"]}
            lines.append(f"| {r['model']} | {_engine(r)} | "
                         + " | ".join(cells.get(k, "–") for k in kinds) + " |")
        lines.append("")
    lines += [f"![measured vs simulated TPOT]({args.out.with_suffix('.png').name})", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    _plot(runs, args.out.with_suffix(".png"))
    print("\n".join(lines))


def _replay(path: Path, db: Path, out: Path) -> Path:
    """`path`'s measurement compared again with the simulator on `db`; returns the new JSON."""
    run = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    target = out / path.name
    command = [sys.executable, "-m", "dooly_fx", "validate-serving", run["model"], "--db",
               str(db), "--attn", run["engine"].split("|")[1], "--device", "cuda",
               "--measured", str(path), "--json", str(target)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{path}: replay failed: {done.stderr.strip()}")
    replayed = json.loads(target.read_text())  # the measurement stays in `path` only
    replayed["measured"] = {"file": str(path)}
    target.write_text(json.dumps(replayed, indent=1) + "\n")
    return target


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    for ax, key, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        top = 0.0
        for r in runs:
            pairs = np.array([(p[key], p[f"sim_{key}"]) for p in r["per_request"]
                              if p[key] is not None and p[f"sim_{key}"] is not None]) * 1e3
            if pairs.size:
                ax.scatter(pairs[:, 0], pairs[:, 1], s=6, alpha=0.6,
                           label=f"{r['model']} {r['engine'].split('|')[1]}")
                top = max(top, pairs.max())
        ax.plot([0, top], [0, top], color="grey", lw=1)
        ax.set(xlabel=f"measured {name} (ms)", ylabel=f"simulated {name} (ms)",
               title=f"{name} per request", xscale="log", yscale="log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, markerscale=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
