"""Held-out error and fit time of dooly_fx.fit on every signature of one of our latency DBs,
including the two- and three-variable attention sweeps.

    python bench/db_fit.py --db bench/results/h100.db

For each signature with measured points (status `ok`) in the DB's one environment, two splits,
each fitted on one part and scored on the other (MAPE of the median latency):

* `checkerboard`: points whose grid indices sum to an odd number are held out, so every
  held-out point keeps its measured grid neighbours (pure interpolation);
* `random`: a seeded random half, which also leaves holes and edges to extrapolate to.

Variables and roofline features are the library's own (`dooly_fx.predict.features`, from the
cost formulas of `dooly_fx/costs.py` on the signature's canonical JSON). Writes
`bench/results/db_fit.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import sklearn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dooly_fx.db import LatencyDB  # noqa: E402
from dooly_fx.fit import METHODS, fit_unit  # noqa: E402
from dooly_fx.hostinfo import cpu_name, device_sms  # noqa: E402
from dooly_fx.predict import features, unit_vars  # noqa: E402


def load(db: Path) -> tuple[dict, list[dict]]:
    """(environment info, [{key, kind, names, X, flops, bytes, y}]) per signature, with the
    library's own variables and roofline features (`dooly_fx.predict.features`)."""
    with LatencyDB.open(db, create=False) as handle:
        (info,) = handle.environments()
        keys = [r[0] for r in handle.conn.execute(
            "SELECT DISTINCT signature FROM points WHERE env = ? AND status = 'ok' "
            "ORDER BY signature", (info["fingerprint"],))]
        units = []
        for key in keys:
            sig = handle.signature(key)
            # the sweep grid: points remeasured in another key class (`A`) are not on it
            rows = [r for r in handle.ok_points(info["fingerprint"], key) if "A" not in r[0]]
            X, flops, moved = features(sig["canonical"], [p for p, _ in rows],
                                       device_sms(info))
            units.append({"key": key, "kind": sig["kind"], "names": unit_vars(sig["canonical"]),
                          "X": X, "flops": flops, "bytes": moved,
                          "y": np.array([y for _, y in rows])})
    return info, units


def splits(X: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ranks = sum(np.unique(X[:, j], return_inverse=True)[1] for j in range(X.shape[1]))
    perm = np.random.default_rng(seed).permutation(len(X))
    return {"checkerboard": (np.flatnonzero(ranks % 2 == 0), np.flatnonzero(ranks % 2 == 1)),
            "random": (np.sort(perm[: len(X) // 2]), np.sort(perm[len(X) // 2:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/db_fit.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-points", type=int, default=8,
                        help="signatures with fewer points are fitted and timed, not scored")
    args = parser.parse_args()
    info, units = load(args.db)
    fit_unit("warm-up", ["m"], [[1.0], [2.0], [4.0], [8.0]], [1.0, 2, 4, 8], [1.0, 2, 4, 8],
             [1.0, 2, 4, 8])  # imports scikit-learn and scipy outside the timed region
    start = time.perf_counter()
    chosen = [fit_unit(u["kind"], u["names"], u["X"], u["flops"], u["bytes"], u["y"],
                       seed=args.seed) for u in units]
    fit_s = time.perf_counter() - start
    rows = []
    for u, whole in zip(units, chosen, strict=True):
        row = {"signature": u["key"][:12], "kind": u["kind"], "vars": u["names"],
               "points": len(u["y"]), "method": whole.method, "cv_mape": whole.cv_mape,
               "splits": {}}
        if len(u["y"]) >= args.min_points and u["names"]:
            for split, (tr, te) in splits(u["X"], args.seed).items():
                args_tr = (u["X"][tr], u["flops"][tr], u["bytes"][tr], u["y"][tr])
                test = (u["X"][te], u["flops"][te], u["bytes"][te])
                r = {}
                for name, methods in [("selected", METHODS), *((m, (m,)) for m in METHODS)]:
                    model = fit_unit(u["kind"], u["names"], *args_tr, seed=args.seed,
                                     methods=methods)
                    pred = model.predict_many(*test)
                    r[name] = float(np.mean(np.abs(pred - u["y"][te]) / u["y"][te]))
                    if name == "selected":
                        r["method"] = model.method
                row["splits"][split] = r
        rows.append(row)
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["splits"]:
            groups[f"{row['kind']} ({', '.join(row['vars'])})"].append(row)
    summary = {}
    for group, rs in sorted(groups.items()):
        summary[group] = {"signatures": len(rs),
                          "mean_points": float(np.mean([r["points"] for r in rs]))}
        for split in ("checkerboard", "random"):
            summary[group][split] = {
                name: float(np.mean([r["splits"][split][name] for r in rs]))
                for name in ("selected", *METHODS)} | {
                "methods": {m: sum(r["splits"][split]["method"] == m for r in rs)
                            for m in METHODS if any(r["splits"][split]["method"] == m
                                                    for r in rs)}}
    payload = {"meta": {"command": " ".join(["python", *sys.argv]), "db": str(args.db),
                        "environment": info, "cpu": cpu_name(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "numpy": np.__version__, "sklearn": sklearn.__version__,
                        "seed": args.seed},
               "fit": {"signatures": len(units), "points": int(sum(len(u["y"]) for u in units)),
                       "seconds": fit_s,
                       "methods": {m: sum(c.method == m for c in chosen)
                                   for m in ("constant", *METHODS)}},
               "summary": summary, "signatures": rows}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


def markdown(payload: dict) -> str:
    meta, fit = payload["meta"], payload["fit"]
    env = meta["environment"]
    lines = ["# dooly_fx.fit on our own latency DB: held-out error", "",
             f"- command: `{meta['command']}`",
             f"- profiles: `{meta['db']}` ({env['device']}, torch {env['torch']}, "
             f"transformers {env['transformers']}; every engine profiled in it)",
             f"- fitted on: {meta['cpu']} ({meta['cpu_count']} cores), Python {meta['python']}, "
             f"numpy {meta['numpy']}, scikit-learn {meta['sklearn']}", "",
             f"Fitting all {fit['signatures']} signatures ({fit['points']} points, 5-fold "
             f"selection) took {fit['seconds']:.2f} s; methods chosen: "
             + ", ".join(f"{m} {n}" for m, n in fit["methods"].items() if n) + ".", "",
             "Held-out MAPE, mean over the signatures of each group. `checkerboard` holds out "
             "every other grid point (interpolation); `random` a seeded half.", ""]
    for split in ("checkerboard", "random"):
        lines += [f"## {split}", "", "| unit (variables) | signatures | mean points | selected | "
                  + " | ".join(METHODS) + " | chosen |", "|---|---:|---:|---:|"
                  + "---:|" * len(METHODS) + "---|"]
        for group, s in payload["summary"].items():
            r = s[split]
            lines.append(f"| {group} | {s['signatures']} | {s['mean_points']:.0f} | "
                         f"{r['selected']:.2%} | "
                         + " | ".join(f"{r[m]:.2%}" for m in METHODS) + " | "
                         + ", ".join(f"{m} {n}" for m, n in r["methods"].items()) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
