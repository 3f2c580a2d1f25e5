"""How small a per-request TTFT/TPOT error can be on these serving runs, whatever predicts the
step times.

    python bench/serving_floor.py [--db bench/results/h100.db]

Reads the measured runs in bench/results/serving/ (`validate-serving --json`) and writes
bench/results/serving_floor.{json,md}. Three checks:

* the scheduler in lockstep (`validate_serving.lockstep`): the simulator with step k lasting
  what the engine's step k lasted. Its batches are compared with the engine's, step by step;
  where they all match, the scheduler decides as the engine does, and every per-request
  error of the DB model comes from its step times.
* 1% step noise: the simulator with the DB's step times, against itself with every step time
  multiplied by exp(ε), ε ~ N(0, 0.01) (three seeds; the median is shown). A request's TTFT
  is a few steps long and depends on which step it arrives in, so a tiny error in step times
  moves many requests by a whole step. The same again with the requests arriving `STRETCH`
  times slower (the same requests over that much more time): the floor at a lighter load.
* the engine against itself: the same workload served twice, on another machine instance
  (`serving/other_instance/`) or back to back on one (`serving/same_instance/`), compared
  per request like a prediction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from dooly_fx.db import LatencyDB
from dooly_fx.predict import FlatStepTime, at_host_speed, load
from dooly_fx.simulate import simulate
from dooly_fx.validate_serving import Served, _metric, compare, lockstep

SEEDS = (0, 1, 2)
NOISE = 0.01
STRETCH = 4.0
"""How much slower the requests arrive in the lighter-load noise check."""


def _served(path: Path) -> Served:
    return Served.from_json(json.loads(path.read_text())["measured"])


def _noise(served: Served, loaded, stretch: float = 1.0) -> dict:
    """Per-request error of the simulation against itself with 1% noise on every step, the
    requests arriving `stretch` times slower than they reached the engine; and how much of
    the simulated time the engine was busy (`busy`: Σ step time / the last request's finish)."""
    reqs = [replace(r, arrival_s=r.arrival_s * stretch) for r in served.workload()]
    config = served.scheduler(loaded.config)
    base = simulate(reqs, FlatStepTime(loaded), config)
    out = {"ttft": [], "tpot": []}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        model = FlatStepTime(loaded)
        noisy = simulate(reqs, lambda b, model=model, rng=rng:
                         model(b) * float(np.exp(rng.normal(0, NOISE))), config)
        for metric in out:
            out[metric].append(_metric(getattr(base, metric), getattr(noisy, metric)))
    return {**{m: {k: float(np.median([r[k] for r in rs])) for k in ("mape", "p50_error",
                                                                      "p90_error")}
               for m, rs in out.items()},
            "busy": float(np.sum(base.steps["duration"]) / np.nanmax(base.finish)),
            "ttft_p50_s": float(np.nanmedian(base.ttft))}


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
                           served.scheduler(loaded.config))
        row = {"file": path.name, "model": served.model, "engine": served.engine,
               "requests": len(served.requests),
               "model_error": {m: {k: model[m][k] for k in ("mape", "p50_error", "p90_error")}
                               for m in ("ttft", "tpot")},
               "scheduler": model["scheduler"], "noise": _noise(served, loaded),
               "noise_stretched": _noise(served, loaded, STRETCH)}
        other = args.runs / "other_instance" / path.name
        if other.exists():
            row["other_instance"] = _against(served, _served(other))
        rows.append(row)
        print(path.name, f"model TTFT {model['ttft']['mape']:.1%}",
              f"lockstep {model['scheduler']['matched']}/{model['scheduler']['steps']} steps",
              f"noise {row['noise']['ttft']['mape']:.1%}",
              f"stretched {row['noise_stretched']['ttft']['mape']:.1%}", flush=True)
    same = []
    for a in sorted((args.runs / "same_instance").glob("serving_*_a.json")):
        b = a.with_name(a.name.replace("_a.json", "_b.json"))
        if b.exists():
            sa = _served(a)
            same.append({"files": [a.name, b.name], "model": sa.model, "engine": sa.engine,
                         **_against(sa, _served(b))})
    # The scheduler in lockstep on every recorded run, the other sets' included.
    locked = []
    for path in sorted(args.runs.rglob("serving_*.json")):
        if "replayed" in path.parts:
            continue
        served = _served(path)
        config = load(db, served.model, env, served.engine).config
        locked.append({"file": str(path.relative_to(args.runs)), "model": served.model,
                       "engine": served.engine, "timed_out": served.timed_out,
                       **lockstep(served, served.scheduler(config))})
    meta = {"command": "python bench/serving_floor.py --db " + str(args.db),
            "noise_sd": NOISE, "seeds": list(SEEDS), "stretch": STRETCH}
    args.out.write_text(json.dumps({"meta": meta, "runs": rows, "same_instance": same,
                                    "lockstep": locked}, indent=1))
    args.out.with_suffix(".md").write_text(_markdown(meta, rows, same, locked))


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.1%}" if signed else f"{x:.1%}"


def _markdown(meta: dict, rows: list[dict], same: list[dict], locked: list[dict]) -> str:
    lines = [
        "# How small can a per-request error be on these runs?", "",
        f"- command: `{meta['command']}` (CPU; the measurements are the GPU runs in "
        "`bench/results/serving/`, each `validate-serving --json`)",
        "- TTFT / TPOT MAPE over requests, and the p50 error of TTFT; \"DB model\": the "
        "simulator with the DB's step times (as `validate_serving.md`); \"scheduler in "
        "lockstep\": the simulator with each step lasting what the engine's step of the same "
        "index lasted: its batches that are the engine's, and TTFT / TPOT MAPE; \"1% step "
        "noise\": the DB simulation against itself with "
        f"every step time × exp(N(0, {meta['noise_sd']})), median of {len(meta['seeds'])} "
        "seeds; \"arrivals ×" + f"{meta['stretch']:g}" + " slower\": the same with the requests "
        f"arriving {meta['stretch']:g} times slower, and the simulated engine's busy share of "
        "the run (Σ step time / last finish) and its TTFT p50 there; \"other instance\": the "
        "engine's run of the same workload on another machine instance, compared with this run "
        "like a prediction", "",
        "| model | engine | DB model TTFT / TPOT (TTFT p50) | scheduler in lockstep | "
        f"1% step noise | 1% step noise, arrivals ×{meta['stretch']:g} slower (busy, TTFT p50) | "
        "other instance |",
        "|---|---|---:|---:|---:|---:|---:|"]

    def cell(r: dict) -> str:
        return (f"{_pct(r['ttft']['mape'])} / {_pct(r['tpot']['mape'])} "
                f"({_pct(r['ttft']['p50_error'], True)})")

    def lock(r: dict) -> str:
        return (f"{r['matched']}/{r['steps']} batches, {_pct(r['ttft_mape'])} / "
                f"{_pct(r['tpot_mape'])}")

    for r in rows:
        other = cell(r["other_instance"]) if "other_instance" in r else "-"
        lines.append(f"| {r['model']} | {r['engine'].replace('|', chr(92) + '|')} | "
                     f"{cell(r['model_error'])} | {lock(r['scheduler'])} | "
                     f"{cell(r['noise'])} | {cell(r['noise_stretched'])} "
                     f"({r['noise_stretched']['busy']:.0%}, "
                     f"{r['noise_stretched']['ttft_p50_s'] * 1e3:.0f} ms) | {other} |")
    if same:
        lines += ["", "The engine against itself on one machine instance, back to back "
                  "(`serving/same_instance/`):", "",
                  "| model | engine | runs | TTFT / TPOT MAPE (TTFT p50) |", "|---|---|---|---:|"]
        for s in same:
            lines.append(f"| {s['model']} | {s['engine'].replace('|', chr(92) + '|')} | "
                         f"{' vs '.join(s['files'])} | {cell(s)} |")
    if locked:
        matched = sum(r["matched"] for r in locked)
        steps = sum(r["steps"] for r in locked)
        lines += ["", f"The scheduler in lockstep on every recorded run ({len(locked)} runs, "
                  f"{steps} engine steps; `validate_serving.lockstep`): {matched} batches "
                  "formed as the engine formed them.", "",
                  "| run | model | engine | batches as the engine's | first different | "
                  "TTFT / TPOT MAPE |", "|---|---|---|---:|---:|---:|"]
        for r in locked:
            first = "-" if r["first_mismatch"] is None else str(r["first_mismatch"])
            lines.append(f"| `{r['file']}`{' (time limit)' if r['timed_out'] else ''} | "
                         f"{r['model']} | {r['engine'].replace('|', chr(92) + '|')} | "
                         f"{r['matched']}/{r['steps']} | {first} | "
                         f"{_pct(r['ttft_mape'])} / {_pct(r['tpot_mape'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
