"""Do serving steps follow the host's speed of the moment?

    python bench/serving_host_phases.py [--db bench/results/h100.db]
        [--runs bench/results/serving bench/results/serving/other_instance
         bench/results/serving/gc] [--out bench/results/serving_host_phases.json]

`validate-serving` predicts a run at one host speed, the mean of the probes its engine's
thread timed every `PROBE_EVERY` steps. The host switches between speeds within a run, so
for each decode-only step that has a probe of its own (the one timed right after it), this
predicts the step (`predict_step`, plus its attention shape's setup where the engine builds
one: every decode step meets a new key count) at the run's speed and at that step's own, and
compares both with the measured step (schedule to update). Per run: the steps, the probes'
10th and 90th percentiles, the correlation of log(measured / predicted at the run's speed)
with log(probe), and the median ratio measured / predicted either way. A ratio above 1 at the
step's own speed is host time the model does not have. CPU only: it reads the committed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dooly_fx.db import LatencyDB
from dooly_fx.predict import at_host_speed, load, predict_step


def _run_row(path: Path, db: LatencyDB, env: str) -> dict | None:
    data = json.loads(path.read_text())
    run_probe = (data.get("host_speed") or {}).get("run_probe_ms")
    steps = [s for s in data["measured"]["steps"]
             if s.get("host_probe_ms") and all(n == 1 for n in s["new"])]
    if not run_probe or len(steps) < 5:
        return None
    loaded = load(db, data["model"], env, data["predicted_from"])

    def predicted(probe: float, step: dict) -> float:
        p = predict_step(at_host_speed(loaded, probe), list(zip(step["new"], step["cached"],
                                                                  strict=True)))
        return p.total_ms + p.setup_ms

    measured = np.array([(s["end_s"] - s["start_s"]) * 1e3 for s in steps])
    probes = np.array([s["host_probe_ms"] for s in steps])
    at_run = measured / np.array([predicted(run_probe, s) for s in steps])
    at_own = measured / np.array([predicted(p, s) for p, s in zip(probes, steps, strict=True)])
    return {"file": str(path), "model": data["model"], "engine": data["engine"],
            "measured_on": data["measured_on"],
            "garbage_collector": data["settings"].get("garbage_collector", True),
            "probed_decode_steps": len(steps), "run_probe_ms": run_probe,
            "probe_p10_ms": float(np.percentile(probes, 10)),
            "probe_p90_ms": float(np.percentile(probes, 90)),
            "corr_log_ratio_log_probe": float(np.corrcoef(np.log(at_run), np.log(probes))[0, 1]),
            "median_ratio_at_run_speed": float(np.median(at_run)),
            "median_ratio_at_own_speed": float(np.median(at_own))}


def _markdown(result: dict) -> str:
    machines = sorted({f"{m['device']}, torch {m['torch']}, transformers {m['transformers']}"
                       for m in (r["measured_on"] for r in result["runs"])})
    lines = ["# Serving decode steps against the host's speed of the moment", "",
             f"- command: `{result['command']}` (CPU; the measurements are those of the GPU "
             f"runs: {'; '.join(machines)})",
             "- each decode-only step timed with a probe right after it: measured / predicted "
             "at the run's mean probe and at its own probe (`predict_step` + shape setup)", "",
             "| run | engine | steps | probe p10 / p90 ms | corr(log ratio, log probe) "
             "| median ratio at run speed | at own speed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        name = Path(r["file"]).relative_to("bench/results") if r["file"].startswith(
            "bench/results") else r["file"]
        gc = "" if r["garbage_collector"] else " (GC off)"
        engine = r["engine"].replace("|", "\\|")
        lines.append(f"| `{name}` | {engine}{gc} | {r['probed_decode_steps']} | "
                     f"{r['probe_p10_ms']:.3f} / {r['probe_p90_ms']:.3f} | "
                     f"{r['corr_log_ratio_log_probe']:.2f} | "
                     f"{r['median_ratio_at_run_speed']:.3f} | "
                     f"{r['median_ratio_at_own_speed']:.3f} |")
    own = [r["median_ratio_at_own_speed"] for r in result["runs"]]
    run = [r["median_ratio_at_run_speed"] for r in result["runs"]]
    lines += ["", f"Median over {len(own)} runs: {np.median(run):.3f} at the run's speed, "
              f"{np.median(own):.3f} at each step's own."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="bench/results/h100.db")
    parser.add_argument("--runs", nargs="+", type=Path,
                        default=[Path("bench/results/serving"),
                                 Path("bench/results/serving/other_instance"),
                                 Path("bench/results/serving/gc")])
    parser.add_argument("--out", type=Path,
                        default=Path("bench/results/serving_host_phases.json"))
    args = parser.parse_args()
    rows = []
    with LatencyDB.open(args.db, create=False) as db:
        env = next(e["fingerprint"] for e in db.environments()
                   if e.get("device_type") == "cuda")
        for folder in args.runs:
            for path in sorted(folder.glob("serving_*.json")):
                row = _run_row(path, db, env)
                if row is not None:
                    rows.append(row)
    result = {"command": "python bench/serving_host_phases.py " + " ".join(sys.argv[1:]),
              "runs": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
