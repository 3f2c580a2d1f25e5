"""The paged engine's whole forward against its units: per model, the host time of the whole
forward (`forward_host`, timed per model) and the sum of its units' host times, both at the
DB's host speed, for a decode step of one sequence, from one or more DBs (e.g. the same
profile made on two machine instances). CPU only: reads the DBs.

    python bench/forward_host.py --db shipped=bench/results/h100.db --db other=OTHER.db \\
        --out bench/results/forward_host
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dooly_fx.db import LatencyDB
from dooly_fx.predict import load, predict_step

STEP = [(1, 16)]
"""A decode step of one sequence over 16 cached tokens."""


def measure(path: str) -> dict:
    out = {}
    with LatencyDB.open(path, create=False) as db:
        env = next(e for e in db.environments() if e.get("device_type") == "cuda")
        for model in db.models(env["fingerprint"]):
            if not model["engine"].startswith("paged"):
                continue
            loaded = load(db, model["name"], env["fingerprint"], model["engine"])
            if not loaded.forward_units:
                continue
            step = predict_step(loaded, STEP)
            (use,) = loaded.forward_units[(step.phase, step.regime)]
            points = db.point_status(env["fingerprint"], use.signature)
            out[f"{model['name']} {model['engine']}"] = {
                "whole_ms": step.host_ms, "units_ms": step.units_host_ms,
                "ratio": step.host_ms / step.units_host_ms,
                "points": {p: [r["host_ms"], r["host_probe_ms"]] for (_, p), r in
                           sorted(points.items())}}
    return out


def _markdown(result: dict) -> str:
    labels = list(result["dbs"])
    lines = ["# The engine's whole forward against its units' sum", "",
             f"- command: `{result['command']}`",
             "- host ms of a decode step of one sequence at each DB's host speed: the whole "
             "forward (`forward_host`) / the sum of its units' host times", "",
             "| model | engine | " + " | ".join(f"{label}: whole / units ms (ratio)"
                                                for label in labels) + " |",
             "|---|---|" + "---:|" * len(labels)]
    keys = sorted({k for db in result["dbs"].values() for k in db["models"]})
    for key in keys:
        cells = []
        for label in labels:
            row = result["dbs"][label]["models"].get(key)
            cells.append(f"{row['whole_ms']:.1f} / {row['units_ms']:.1f} ({row['ratio']:.3f})"
                         if row else "-")
        name, engine = key.split(" ", 1)
        lines.append(f"| {name} | {engine.replace('|', chr(92) + '|')} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        ratios = [r["ratio"] for r in result["dbs"][label]["models"].values()]
        lines.append(f"{label} ({result['dbs'][label]['path']}): ratio median "
                     f"{statistics.median(ratios):.3f}, {min(ratios):.3f}–{max(ratios):.3f} "
                     f"over {len(ratios)} models.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", action="append", required=True, metavar="LABEL=FILE")
    parser.add_argument("--out", default="bench/results/forward_host")
    args = parser.parse_args()
    dbs = {}
    for item in args.db:
        label, _, path = item.partition("=")
        dbs[label] = {"path": path, "models": measure(path)}
    import sys

    result = {"command": "python bench/forward_host.py " + " ".join(sys.argv[1:]), "dbs": dbs}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
