"""Could a signature never profiled be had from its profiled siblings? From a DB's own points.

    python bench/families.py [--db bench/results/h100.db] [--engine padded|sdpa|bfloat16]

Signatures of one kind often differ only in config constants (hidden size, head counts,
intermediate size): a *family* is the signatures whose canonical JSON is the same once every
config dim above 1 is blanked. Each signature of a family of three or more is left out and
its measured points predicted from the others at the same request point, by a per-point line
latency = a + b·W (a, b >= 0) over the siblings' roofline time W = max(FLOPs / peak FLOP/s,
bytes / peak bytes/s) (`costs.cost`, `profile.HARDWARE_PEAKS`). Reported per kind: how many
signatures could be left out, the APE of their points (inside: W within the siblings' range
at that point), and the device seconds their profiling took (`runs`): what deriving them would
save. Then the projection: in every family of a kind whose signatures' median p90 APE is at most
`--within`, the two members of least and most roofline time (over the points all share)
profiled and the others derived; the dedup saving of the DB's models (`profile.savings`) with
the derived signatures' device seconds taken off. Writes `bench/results/families.{json,md}`.
CPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dooly_fx.costs import cost
from dooly_fx.db import LatencyDB, canonical_point
from dooly_fx.profile import HARDWARE_PEAKS, savings

RESULTS = Path(__file__).resolve().parent / "results"


def family_key(canonical: dict) -> str:
    """The canonical JSON with every config dim above 1 blanked (`#`)."""
    def blank(dims):
        return [("#" if isinstance(d, int) and d > 1 else d) for d in dims]

    return json.dumps({**canonical,
                       "inputs": [[t, blank(d)] for t, d in canonical.get("inputs", [])],
                       "outputs": [[t, blank(d)] for t, d in canonical.get("outputs", [])]},
                      sort_keys=True)


def _work_ms(canonical: dict, point: dict) -> float:
    flops, moved = cost(canonical, point)
    peak_flops, peak_bytes = HARDWARE_PEAKS["cuda"]
    return 1e3 * max(flops / peak_flops, moved / peak_bytes)


def _line(ws: np.ndarray, ts: np.ndarray, w: float) -> float:
    """a + b·w from the least-squares line through (ws, ts), clipped to a, b >= 0."""
    if np.ptp(ws) == 0:
        return float(np.mean(ts))
    b, a = np.polyfit(ws, ts, 1)
    if b < 0:
        return float(np.mean(ts))
    if a < 0:
        b, a = float(ts @ ws / (ws @ ws)), 0.0
    return float(a + b * w)


def analyse(db: LatencyDB, env: str, engine: str) -> dict:
    used = {r[0] for r in db.conn.execute(
        "SELECT DISTINCT signature FROM model_units WHERE env = ? AND engine = ?", (env, engine))}
    seconds = db.device_seconds(env)
    families: dict[str, list] = defaultdict(list)
    for key, kind, text in db.conn.execute("SELECT key, kind, canonical FROM signatures"):
        if key not in used:
            continue
        canonical = json.loads(text)
        points = {canonical_point(p): ms for p, ms in db.ok_points(env, key)}
        if points:
            families[family_key(canonical)].append((key, kind, canonical, points))
    rows = []
    for members in families.values():
        if len(members) < 3:
            continue
        for i, (key, kind, canonical, points) in enumerate(members):
            others = members[:i] + members[i + 1:]
            errors = []
            for text, measured in points.items():
                point = json.loads(text)
                sib = [(_work_ms(c, point), pts[text]) for _, _, c, pts in others if text in pts]
                if len(sib) < 2:
                    continue
                ws, ts = np.array(sib).T
                w = _work_ms(canonical, point)
                predicted = _line(ws, ts, w)
                errors.append((abs(predicted / measured - 1), bool(ws.min() <= w <= ws.max())))
            if errors:
                rows.append({"signature": key, "kind": kind, "family_size": len(members),
                             "family": family_key(canonical),
                             "points": len(errors), "device_s": round(seconds.get(key, 0.0), 2),
                             "mape": float(np.mean([e for e, _ in errors])),
                             "median_ape": float(np.median([e for e, _ in errors])),
                             "p90_ape": float(np.percentile([e for e, _ in errors], 90)),
                             "inside": sum(inside for _, inside in errors)})
    anchors = {}
    for fam, members in families.items():
        shared = set.intersection(*(set(m[3]) for m in members))
        work = sorted((sum(_work_ms(c, json.loads(t)) for t in shared), k)
                      for k, _, c, _ in members)
        anchors[fam] = {work[0][1], work[-1][1]}
    return {"engine": engine, "environment": env, "signatures": rows, "anchors": anchors,
            "families_of_three_or_more": sum(len(m) >= 3 for m in families.values())}


def projection(db: LatencyDB, report: dict, within: float) -> dict:
    """The measured dedup saving, and the saving were the derivable kinds' (median p90 APE at
    most `within`) non-anchor family members derived instead of profiled."""
    by_kind: dict[str, list] = defaultdict(list)
    for row in report["signatures"]:
        by_kind[row["kind"]].append(row["p90_ape"])
    kinds = sorted(k for k, p90 in by_kind.items() if np.median(p90) <= within)
    derived = {r["signature"] for r in report["signatures"]
               if r["kind"] in kinds and r["signature"] not in report["anchors"][r["family"]]}
    measured = savings(db, report["environment"], report["engine"])
    spent = db.device_seconds(report["environment"])
    union = {u["signature"] for m in db.models(report["environment"], report["engine"])
             for u in db.model_units(m["name"], report["environment"], report["engine"])}
    dedup = sum(spent.get(s, 0.0) for s in union - derived)
    alone = measured["device_seconds_per_model"]
    return {"within": within, "kinds": kinds, "derived_signatures": len(derived),
            "derived_device_s": round(sum(spent.get(s, 0.0) for s in derived & union), 1),
            "models": len(measured["models"]), "per_model_s": round(alone, 1),
            "dedup_s": round(measured["device_seconds_dedup"], 1),
            "saving": round(measured["saving"], 4),
            "dedup_derived_s": round(dedup, 1), "saving_derived": round(1 - dedup / alone, 4)}


def markdown(report: dict, command: str, device: str) -> str:
    by_kind: dict[str, list] = defaultdict(list)
    for row in report["signatures"]:
        by_kind[row["kind"]].append(row)
    lines = ["# Signatures derived from their siblings", "",
             f"- command: `{command}` (CPU, from the DB's measured points)",
             f"- environment: {device}, engine {report['engine']}",
             "- each signature of a family of three or more (same canonical JSON up to config "
             "dims) left out and its points predicted from the others at the same request point "
             "(a + b·roofline time, per point); APE over its points, then over the kind's "
             "signatures", "",
             "| kind | signatures | points | median of signatures' median APE | worst signature "
             "MAPE | median p90 APE | device s of those signatures | non-anchor signatures: "
             "median p90 APE (worst MAPE) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, rows in sorted(by_kind.items()):
        inner = [r for r in rows if r["signature"] not in report["anchors"][r["family"]]]
        lines.append(
            f"| {kind} | {len(rows)} | {sum(r['points'] for r in rows)} | "
            f"{np.median([r['median_ape'] for r in rows]):.1%} | "
            f"{max(r['mape'] for r in rows):.1%} | "
            f"{np.median([r['p90_ape'] for r in rows]):.1%} | "
            f"{sum(r['device_s'] for r in rows):.1f} | " + (
                f"{len(inner)}: {np.median([r['p90_ape'] for r in inner]):.1%} "
                f"({max(r['mape'] for r in inner):.1%}) |" if inner else "- |"))
    lines.append("")
    p = report["projection"]
    lines += [f"Over the DB's {p['models']} models: dedup {p['dedup_s']} s against "
              f"{p['per_model_s']} s per model, saving {p['saving']:.1%}. Deriving the "
              f"{p['derived_signatures']} non-anchor signatures of the kinds whose median p90 "
              f"APE is at most {p['within']:.0%} ({', '.join(p['kinds'])}; "
              f"{p['derived_device_s']} s): dedup {p['dedup_derived_s']} s, saving "
              f"{p['saving_derived']:.1%}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(RESULTS / "h100.db"))
    parser.add_argument("--engine", default="padded|sdpa|bfloat16")
    parser.add_argument("--within", type=float, default=0.05,
                        help="largest median p90 APE of a kind projected as derived")
    parser.add_argument("--out", default=str(RESULTS / "families.json"))
    args = parser.parse_args(argv)
    with LatencyDB.open(args.db, create=False, readonly=True) as db:
        env = next(e for e in db.environments() if e.get("device_type") == "cuda")
        report = analyse(db, env["fingerprint"], args.engine)
        report["projection"] = projection(db, report, args.within)
    report["anchors"] = {k: sorted(v) for k, v in report["anchors"].items()}
    command = "python bench/families.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report, command.strip(), env["device"]))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
