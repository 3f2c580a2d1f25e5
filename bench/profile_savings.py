"""The saving of profiling each unique op once, measured from a latency DB's own run records.

    python bench/profile_savings.py --db bench/results/h100.db [--models a,b,...]

For every model recorded in the DB's environment: its unique signatures, how many it shares
with the other models, and the device seconds its signatures took in the DB's profiling runs
(what profiling that model alone, over the same grid, would have cost). The saving is
1 - (device seconds of the union of signatures) / (sum of the per-model seconds): the Dooly
paper's comparison against profiling each model separately. Writes a table and
`bench/results/profile_savings.{json,md}` with the environment (device, driver, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dooly_fx.db import LatencyDB
from dooly_fx.profile import savings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--models", help="comma-separated (default: every recorded model)")
    parser.add_argument("--engine", default="padded|sdpa|bfloat16",
                        help="engine profile label the models were profiled under")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_savings.json"))
    args = parser.parse_args()
    with LatencyDB.open(args.db, create=False) as db:
        envs = db.environments()
        if len(envs) != 1:
            sys.exit(f"{args.db}: expected one environment, found {len(envs)}")
        env = envs[0]
        report = savings(db, env["fingerprint"], args.engine,
                         args.models.split(",") if args.models else None)
    report["meta"] = {"command": " ".join(["python", *sys.argv]), "environment": env}
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"dedup saving · {env['device']} · {args.engine}")
    for col in ("model", "unique signatures", "shared with others", "unprofiled",
                "device s alone"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report["models"]:
        table.add_row(m["model"], str(m["unique_signatures"]), str(m["shared_signatures"]),
                      str(m["unprofiled_signatures"]), f"{m['device_seconds_alone']:.1f}")
    console = Console(width=120)
    console.print(table)
    summary = (f"per-model total {report['device_seconds_per_model']:.1f} s · dedup "
               f"{report['device_seconds_dedup']:.1f} s over {report['unique_signatures']} "
               f"signatures · saving {report['saving']:.1%}")
    console.print(summary)
    lines = ["# Dedup saving, measured", "", f"- command: `{report['meta']['command']}`",
             f"- environment: {env['device']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, engine {args.engine}", "",
             "| model | unique signatures | shared with others | unprofiled | device s alone |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {m['model']} | {m['unique_signatures']} | {m['shared_signatures']} | "
              f"{m['unprofiled_signatures']} | {m['device_seconds_alone']:.1f} |"
              for m in report["models"]]
    lines += ["", summary, "", "By unit kind (model uses: how many models run each signature, "
              "summed):", "",
              "| kind | signatures | model uses | device s dedup | device s alone |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {r['signatures']} | {r['model_uses']} | "
              f"{r['device_seconds_dedup']:.1f} | {r['device_seconds_alone']:.1f} |"
              for kind, r in report["by_kind"].items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
