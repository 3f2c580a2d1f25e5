"""Whether two installs capture the same units: the capture JSONs of the same models and
engine, made on two machines (`python -m dooly_fx capture MODELS --phase all --engine E
--json FILE`), compared unit by unit.

    python bench/capture_portability.py --a cpu=DIR_A --b gpu=DIR_B \\
        --out bench/results/capture_portability.json

Each DIR holds `cap_<engine>.json` files. A unit is (model, phase, regime, role, signature,
count); the report gives, per engine, the units of each side, how many both have, and those
only one has (the first ten), with each side's `captured_with` (torch, transformers, Python,
machine). Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def units(capture: dict) -> set[tuple]:
    """A capture JSON's units as (model, phase, regime, role, signature, count)."""
    return {(m["model"], p["phase"], p["regime"], u["role"], u["signature"], u["count"])
            for m in capture["models"] for p in m["phases"] for u in p["units"]}


def side(text: str) -> tuple[str, Path]:
    label, _, folder = text.partition("=")
    if not folder:
        raise argparse.ArgumentTypeError(f"{text}: expected LABEL=DIR")
    return label, Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=side, required=True, metavar="LABEL=DIR")
    parser.add_argument("--b", type=side, required=True, metavar="LABEL=DIR")
    parser.add_argument("--out", type=Path,
                        default=Path("bench/results/capture_portability.json"))
    args = parser.parse_args()
    (la, da), (lb, db) = args.a, args.b
    rows = []
    for file in sorted(da.glob("cap_*.json")):
        other = db / file.name
        if not other.exists():
            sys.exit(f"{other}: missing (every {da}/cap_*.json needs its pair)")
        a, b = json.loads(file.read_text()), json.loads(other.read_text())
        ua, ub = units(a), units(b)
        rows.append({"engine": a["engine"], "models": [m["model"] for m in a["models"]],
                     la: {"units": len(ua), "captured_with": a.get("captured_with")},
                     lb: {"units": len(ub), "captured_with": b.get("captured_with")},
                     "both": len(ua & ub), "signatures": len({u[4] for u in ua | ub}),
                     f"{la}_only": sorted(ua - ub)[:10], f"{lb}_only": sorted(ub - ua)[:10],
                     "identical": ua == ub})
    report = {"meta": {"command": " ".join(["python", *sys.argv])}, "engines": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# The same models captured on two installs", "",
             f"- command: `{report['meta']['command']}`"]
    for label, folder in ((la, da), (lb, db)):
        first = json.loads(next(folder.glob("cap_*.json")).read_text()).get("captured_with")
        lines.append(f"- {label}: {first}")
    lines += ["", f"| engine | models | units {la} | units {lb} | in both | signatures | "
              "identical |", "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['engine'].replace('|', chr(92) + '|')} | {', '.join(r['models'])} | "
              f"{r[la]['units']} | {r[lb]['units']} | {r['both']} | {r['signatures']} | "
              f"{'yes' if r['identical'] else 'no'} |" for r in rows]
    lines += ["", "A unit: (model, phase, regime, role, signature, count)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
