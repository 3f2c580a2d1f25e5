"""Adaptive sweeps (`profile --adaptive`) replayed on a measured DB: how many points they
profile and how well the fit from those points predicts the ones they leave out.

    python bench/adaptive_sweep.py --db bench/results/h100.db

For every one-variable signature whose full grid is measured (status `ok`) in the DB, the
adaptive sweep (`dooly_fx.sweep.sweep_points`) is run with the DB's own medians standing in for
the GPU: every other grid value, then the values beside each bend, until it asks for nothing
new. Each signature is then fitted (`dooly_fx.fit.fit_unit`, the library's selection) on
(a) the adaptive points and (b) the coarse first round alone, and scored (MAPE) on the grid
points each left out. Writes `bench/results/adaptive_sweep.{json,md}`.

`--profiled DB` adds a real adaptive profile: a DB whose run 1 was `profile --adaptive` and
run 2 the same command without it (the rest of the grid). From its run records: points and
device seconds of each run; whether replaying the sweep on the DB's medians picks exactly
run 1's points; and the error of fits from run 1's points on run 2's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from db_fit import load  # noqa: E402

from dooly_fx.db import LatencyDB, canonical_point  # noqa: E402
from dooly_fx.fit import fit_unit  # noqa: E402
from dooly_fx.sweep import BEND, Bounds, points, sweep_points  # noqa: E402


def rounds(canonical: dict, bounds: Bounds, latency: dict[int, float]) -> list[set[int]]:
    """The points of each round of an adaptive sweep whose measurements are `latency`."""
    known: dict[int, float] = {}
    out: list[set[int]] = []
    while new := {next(iter(p.values())) for p in sweep_points(canonical, bounds, known)} \
            - set(known):
        out.append(new)
        known.update({x: latency[x] for x in new})
    return out


def held_out_mape(u: dict, keep: np.ndarray) -> float | None:
    test = ~keep
    if not test.any():
        return None
    model = fit_unit(u["kind"], u["names"], u["X"][keep], u["flops"][keep], u["bytes"][keep],
                     u["y"][keep])
    pred = model.predict_many(u["X"][test], u["flops"][test], u["bytes"][test])
    return float(np.mean(np.abs(pred - u["y"][test]) / u["y"][test]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/adaptive_sweep.json"))
    parser.add_argument("--profiled", type=Path,
                        help="a DB profiled with --adaptive (run 1), then without (run 2)")
    args = parser.parse_args()
    info, units = load(args.db)
    with LatencyDB.open(args.db, create=False, readonly=True) as db:
        canonical = {u["key"]: db.signature(u["key"])["canonical"] for u in units}
    rows = []
    for u in units:
        if len(u["names"]) != 1 or u["X"].shape[1] != 1:
            continue
        xs = u["X"][:, 0].astype(int)
        top = int(xs.max())
        bounds = Bounds(top, top, top + 1, adaptive=True)
        grid = {next(iter(p.values())) for p in points(canonical[u["key"]], bounds)}
        if grid != set(xs.tolist()) or len(grid) < 5:
            continue  # not a complete one-variable grid
        steps = rounds(canonical[u["key"]], bounds, dict(zip(xs.tolist(), u["y"], strict=True)))
        adaptive = set().union(*steps)
        rows.append({
            "signature": u["key"][:12], "kind": u["kind"], "var": u["names"][0],
            "grid": len(grid), "coarse": len(steps[0]), "adaptive": len(adaptive),
            "rounds": len(steps),
            "adaptive_mape": held_out_mape(u, np.isin(xs, list(adaptive))),
            "coarse_mape": held_out_mape(u, np.isin(xs, list(steps[0])))})
    summary = _summary(rows)
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    payload = {"meta": {"command": " ".join(["python", *sys.argv]), "db": str(args.db),
                        "environment": info, "bend": BEND},
               "summary": summary,
               "by_kind": {k: _summary(rs) for k, rs in sorted(by_kind.items())},
               "signatures": rows}
    if args.profiled:
        payload["profiled"] = profiled(args.profiled)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


def profiled(path: Path) -> dict:
    """Run 1 (`--adaptive`) against run 2 (the rest of the grid) of one DB."""
    info, units = load(path)
    with LatencyDB.open(path, create=False, readonly=True) as db:
        runs = [dict(r) for r in db.conn.execute(
            "SELECT r.id, r.command, SUM(s.device_seconds) AS device_seconds, "
            "SUM(s.points) AS points FROM runs r JOIN run_signatures s ON s.run_id = r.id "
            "GROUP BY r.id ORDER BY r.id")]
        first = {(k, p) for k, p in db.conn.execute(
            "SELECT signature, point FROM points WHERE env = ? AND run_id = 1 AND status = 'ok'",
            (info["fingerprint"],))}
        canonical = {u["key"]: db.signature(u["key"])["canonical"] for u in units}
    if [r["id"] for r in runs] != [1, 2]:
        sys.exit(f"{path}: want run 1 (--adaptive) and run 2 (without), found {runs}")
    replayed, errors = 0, []
    one_var = [u for u in units if len(u["names"]) == 1 and u["X"].shape[1] == 1]
    for u in one_var:
        xs = u["X"][:, 0].astype(int)
        top = int(xs.max())
        bounds = Bounds(top, top, top + 1, adaptive=True)
        chosen = set().union(*rounds(canonical[u["key"]], bounds,
                                     dict(zip(xs.tolist(), u["y"], strict=True))))
        var = u["names"][0]
        measured = {x for x in xs.tolist()
                    if (u["key"], canonical_point({var: x})) in first}
        replayed += chosen == measured
        error = held_out_mape(u, np.isin(xs, list(measured)))
        if error is not None:
            errors.append(error)
    return {"db": str(path), "environment": info, "runs": runs,
            "one_variable_signatures": len(one_var), "replay_matches": replayed,
            "left_out_mape_median": float(np.median(errors)) if errors else None,
            "left_out_mape_max": float(np.max(errors)) if errors else None}


def _summary(rows: list[dict]) -> dict:
    def errors(key: str) -> list[float]:
        return [r[key] for r in rows if r[key] is not None]

    grid = sum(r["grid"] for r in rows)
    return {"signatures": len(rows), "refined": sum(r["adaptive"] > r["coarse"] for r in rows),
            "grid_points": grid, "coarse_points": sum(r["coarse"] for r in rows),
            "adaptive_points": sum(r["adaptive"] for r in rows),
            "points_saved": 1 - sum(r["adaptive"] for r in rows) / grid,
            **{f"{name}_left_out_mape_{stat}": float(fn(errors(f"{name}_mape")))
               if errors(f"{name}_mape") else None
               for name in ("adaptive", "coarse")
               for stat, fn in (("median", np.median), ("p90", lambda e: np.percentile(e, 90)),
                                ("max", np.max))}}


def markdown(payload: dict) -> str:
    meta, s = payload["meta"], payload["summary"]
    env = meta["environment"]
    lines = ["# Adaptive sweeps replayed on measured profiles", "",
             f"- command: `{meta['command']}`",
             f"- profiles: `{meta['db']}` ({env['device']}, torch {env['torch']}); bend "
             f"threshold {meta['bend']:.0%} (`dooly_fx.sweep.BEND`)", "",
             f"Over {s['signatures']} one-variable signatures with complete grids, the "
             f"adaptive sweep profiles {s['adaptive_points']} of {s['grid_points']} points "
             f"({s['points_saved']:.1%} fewer; the coarse round alone: {s['coarse_points']}) and "
             f"refines {s['refined']} signatures. Fitted on its points, the left-out points are "
             f"predicted with median {_pct(s['adaptive_left_out_mape_median'])}, p90 "
             f"{_pct(s['adaptive_left_out_mape_p90'])}, worst "
             f"{_pct(s['adaptive_left_out_mape_max'])} MAPE per signature (the coarse round "
             f"alone: {_pct(s['coarse_left_out_mape_median'])}, "
             f"{_pct(s['coarse_left_out_mape_p90'])}, {_pct(s['coarse_left_out_mape_max'])}).",
             "", "| kind | signatures | refined | grid points | adaptive points | saved | "
             "left-out MAPE median / p90 / max | coarse only: median / p90 / max |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for kind, k in payload["by_kind"].items():
        lines.append(
            f"| {kind} | {k['signatures']} | {k['refined']} | {k['grid_points']} | "
            f"{k['adaptive_points']} | {k['points_saved']:.1%} | "
            f"{_pct(k['adaptive_left_out_mape_median'])} / {_pct(k['adaptive_left_out_mape_p90'])}"
            f" / {_pct(k['adaptive_left_out_mape_max'])} | "
            f"{_pct(k['coarse_left_out_mape_median'])} / {_pct(k['coarse_left_out_mape_p90'])} / "
            f"{_pct(k['coarse_left_out_mape_max'])} |")
    if "profiled" in payload:
        r = payload["profiled"]
        (adaptive, rest) = r["runs"]
        total_s = adaptive["device_seconds"] + rest["device_seconds"]
        total_points = adaptive["points"] + rest["points"]
        lines += ["", f"## A real adaptive profile (`{r['db']}`, {r['environment']['device']})",
                  "", f"- run 1: `{adaptive['command']}`", f"- run 2: `{rest['command']}`", "",
                  f"Run 1 measured {adaptive['points']} of the {total_points} grid points in "
                  f"{adaptive['device_seconds']:.1f} of {total_s:.1f} device seconds "
                  f"({1 - adaptive['device_seconds'] / total_s:.1%} saved; the multi-variable "
                  f"attention sweeps are not adaptive). Replaying the sweep on the DB's medians "
                  f"picks exactly run 1's points for {r['replay_matches']} of "
                  f"{r['one_variable_signatures']} one-variable signatures; fitted on run 1's "
                  f"points they predict run 2's with {_pct(r['left_out_mape_median'])} median "
                  f"(worst {_pct(r['left_out_mape_max'])}) MAPE per signature."]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


if __name__ == "__main__":
    main()
