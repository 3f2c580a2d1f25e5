"""How small a per-request TTFT/TPOT error can be on these serving runs, whatever predicts the
step times.

    python bench/serving_floor.py [--db bench/results/h100.db]

Reads the measured runs in bench/results/serving/ (`validate-serving --json`) and writes
bench/results/serving_floor.{json,md}. Three checks:

* engine steps replayed: the simulator driven by the engine's own measured step durations
  (a simulated step whose batch the engine also ran takes that step's median duration; any
  other step is predicted from the DB). Where every simulated step is one the engine ran,
  what is left is the scheduler's own error.
* 1% step noise: the simulator with the DB's step times, against itself with every step time
  multiplied by exp(ε), ε ~ N(0, 0.01) (three seeds; the median is shown). A request's TTFT
  is a few steps long and depends on which step it arrives in, so a tiny error in step times
  moves many requests by a whole step.
* the engine against itself: the same workload served twice, on another machine instance
  (`serving/other_instance/`) or back to back on one (`serving/same_instance/`), compared
  per request like a prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dooly_fx.db import LatencyDB
from dooly_fx.predict import FlatStepTime, at_host_speed, load
from dooly_fx.simulate import simulate
from dooly_fx.validate_serving import Served, _metric, compare

SEEDS = (0, 1, 2)
NOISE = 0.01


def _served(path: Path) -> Served:
    return Served.from_json(json.loads(path.read_text())["measured"])


def _replayed(served: Served, loaded) -> tuple[dict, float]:
    """The simulator on the engine's own step durations; the share of simulated steps that
    the engine ran too."""
    durations: dict[tuple, list[float]] = {}
    for step in served.steps:
        durations.setdefault(tuple(sorted(step.batch)), []).append(step.end_s - step.start_s)
    hits = [0, 0]

    def step_time():
        model = FlatStepTime(loaded)

        def time(batch):
            key = tuple(sorted(batch))
            hits[key in durations] += 1
            return float(np.median(durations[key])) if key in durations else model(batch)
        return time

    report, _ = compare(served, step_time, served.scheduler())
    return report, hits[1] / max(1, sum(hits))


def _noise(served: Served, loaded) -> dict:
    """Per-request error of the simulation against itself with 1% noise on every step."""
    reqs, config = served.workload(), served.scheduler()
    base = simulate(reqs, FlatStepTime(loaded), config)
    out = {"ttft": [], "tpot": []}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        model = FlatStepTime(loaded)
        noisy = simulate(reqs, lambda b, model=model, rng=rng:
                         model(b) * float(np.exp(rng.normal(0, NOISE))), config)
        for metric in out:
            out[metric].append(_metric(getattr(base, metric), getattr(noisy, metric)))
    return {m: {k: float(np.median([r[k] for r in rs])) for k in ("mape", "p50_error",
                                                                   "p90_error")}
            for m, rs in out.items()}


def _against(a: Served, b: Served) -> dict:
    """Run b compared with run a request by request, as a prediction of a."""
    by_id = {r.id: r for r in b.requests}
    pairs = [(r, by_id[r.id]) for r in a.requests if r.id in by_id]
    out = {}
    for metric in ("ttft", "tpot"):
        m = np.array([getattr(x, metric) for x, _ in pairs])
        s = np.array([getattr(y, metric) for _, y in pairs])
        out[metric] = {k: _metric(m, s)[k] for k in ("mape", "p50_error", "p90_error")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    parser.add_argument("--runs", type=Path, default=Path("bench/results/serving"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_floor.json"))
    args = parser.parse_args()
    db = LatencyDB.open(args.db, create=False, readonly=True)
    env = db.environments()[-1]["fingerprint"]
    rows = []
    for path in sorted(args.runs.glob("serving_*.json")):
        served = _served(path)
        # At the run's host speed where it recorded one, as validate-serving predicts it.
        loaded = at_host_speed(load(db, served.model, env, served.engine),
                               served.host_probe_ms)
        model, _ = compare(served, lambda loaded=loaded: FlatStepTime(loaded),
                           served.scheduler())
        replayed, hits = _replayed(served, loaded)
        row = {"file": path.name, "model": served.model, "engine": served.engine,
               "requests": len(served.requests),
               "model_error": {m: {k: model[m][k] for k in ("mape", "p50_error", "p90_error")}
                               for m in ("ttft", "tpot")},
               "replayed": {m: {k: replayed[m][k] for k in ("mape", "p50_error", "p90_error")}
                            for m in ("ttft", "tpot")},
               "replayed_steps_share": hits, "noise": _noise(served, loaded)}
        other = args.runs / "other_instance" / path.name
        if other.exists():
            row["other_instance"] = _against(served, _served(other))
        rows.append(row)
        print(path.name, f"model TTFT {model['ttft']['mape']:.1%}",
              f"replayed {replayed['ttft']['mape']:.1%} ({hits:.0%} steps)",
              f"noise {row['noise']['ttft']['mape']:.1%}", flush=True)
    same = []
    for a in sorted((args.runs / "same_instance").glob("serving_*_a.json")):
        b = a.with_name(a.name.replace("_a.json", "_b.json"))
        if b.exists():
            sa = _served(a)
            same.append({"files": [a.name, b.name], "model": sa.model, "engine": sa.engine,
                         **_against(sa, _served(b))})
    meta = {"command": "python bench/serving_floor.py --db " + str(args.db),
            "noise_sd": NOISE, "seeds": list(SEEDS)}
    args.out.write_text(json.dumps({"meta": meta, "runs": rows, "same_instance": same},
                                   indent=1))
    args.out.with_suffix(".md").write_text(_markdown(meta, rows, same))


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.1%}" if signed else f"{x:.1%}"


def _markdown(meta: dict, rows: list[dict], same: list[dict]) -> str:
    lines = [
        "# How small can a per-request error be on these runs?", "",
        f"- command: `{meta['command']}` (CPU; the measurements are the GPU runs in "
        "`bench/results/serving/`, each `validate-serving --json`)",
        "- TTFT / TPOT MAPE over requests, and the p50 error of TTFT; \"DB model\": the "
        "simulator with the DB's step times (as `validate_serving.md`); \"engine steps "
        "replayed\": with the engine's own measured step durations (share of simulated "
        "steps the engine ran too); \"1% step noise\": the DB simulation against itself with "
        f"every step time × exp(N(0, {meta['noise_sd']})), median of {len(meta['seeds'])} "
        "seeds; \"other instance\": the engine's run of the same workload on another machine "
        "instance, compared with this run like a prediction", "",
        "| model | engine | DB model TTFT / TPOT (TTFT p50) | engine steps replayed | "
        "1% step noise | other instance |",
        "|---|---|---:|---:|---:|---:|"]

    def cell(r: dict) -> str:
        return (f"{_pct(r['ttft']['mape'])} / {_pct(r['tpot']['mape'])} "
                f"({_pct(r['ttft']['p50_error'], True)})")

    for r in rows:
        other = cell(r["other_instance"]) if "other_instance" in r else "-"
        lines.append(f"| {r['model']} | {r['engine'].replace('|', chr(92) + '|')} | "
                     f"{cell(r['model_error'])} | {cell(r['replayed'])}, "
                     f"{r['replayed_steps_share']:.0%} | {cell(r['noise'])} | {other} |")
    if same:
        lines += ["", "The engine against itself on one machine instance, back to back "
                  "(`serving/same_instance/`):", "",
                  "| model | engine | runs | TTFT / TPOT MAPE (TTFT p50) |", "|---|---|---|---:|"]
        for s in same:
            lines.append(f"| {s['model']} | {s['engine'].replace('|', chr(92) + '|')} | "
                         f"{' vs '.join(s['files'])} | {cell(s)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
