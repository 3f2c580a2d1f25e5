"""Put back a model's recorded units from an earlier copy of a latency DB.

    python bench/restore_units.py --db bench/results/h100.db --from OLD.db \\
        --engine 'padded|sdpa|bfloat16' gemma-2-9b phi-3-mini

For a DB whose profile re-recorded models and was cut short before their new units were all
measured (as `profile` did before it kept a model's units until then, `record_models`): each
model's units and config under ENGINE in every environment of OLD replace those in DB (the
timings are not touched), so it predicts again from the units it has fits for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dooly_fx.db import LatencyDB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--from", dest="old", type=Path, required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    with LatencyDB.open(args.old, create=False, readonly=True) as old, \
            LatencyDB.open(args.db, create=False) as db:
        for env in old.environments():
            fp = env["fingerprint"]
            configs = {m["name"]: m["config"] for m in old.models(fp, args.engine)}
            for model in args.models:
                units = old.model_units(model, fp, args.engine)
                if not units:
                    sys.exit(f"{args.old}: {model} has no units under {args.engine}")
                db.set_model(model, fp, args.engine, configs[model],
                             [(u["phase"], u["regime"], u["role"], u["signature"], u["count"],
                               u["binding"]) for u in units])
                print(f"{model}: {len(units)} units put back ({env['device']})")


if __name__ == "__main__":
    main()
