"""How paged attention's latency follows its head counts, from a latency DB's own points.

    python bench/attention_heads.py [--db bench/results/h100.db]

Attention dominates profiling time and is shared least: its signature holds the query and KV
head counts, which differ between most models. This reads every `paged_attention` signature
of the DB, groups those that differ only in their head counts (same impl, scalars, phase and
head dim), and, at the sweep points two layouts share, compares each layout's latency with
the group's reference layout (its most query heads) by quarter of the reference's latency:
the median ratio, its spread, and how far it is from the ratio of query heads (what
attention's work scales with) and of KV heads. Then, where a group has three layouts or more,
each layout left out and predicted from the others at every point they all share (latency =
a + b·query heads, or + c·KV heads, fitted per point over the other layouts): how well a
layout never profiled could be had from profiled ones. Writes
`bench/results/attention_heads.{json,md}`. CPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from dooly_fx.db import LatencyDB

QUARTERS = ("smallest", "second", "third", "largest")
FORMS = {"a + b·Hq": lambda heads, kv: [1.0, heads],
         "a + b·Hq + c·Hkv": lambda heads, kv: [1.0, heads, kv]}
"""Per-point models of latency over the head layout, for the left-out layout's prediction."""


def _layouts(db: LatencyDB, env: str) -> dict[tuple, dict[tuple[int, int], dict[str, float]]]:
    """(impl scalars, phase, head dim, dtype) -> (query heads, KV heads) -> the signature's
    measured median ms per point; the phase is the step the signature was captured in:
    decode (N queries), prefill (T, no cache) or mixed (T, with a cache)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for key, text in db.conn.execute(
            "SELECT key, canonical FROM signatures WHERE kind = 'paged_attention'"):
        canonical = json.loads(text)
        (dtype, (tokens, heads, dim)), (_, (_, kv_heads, _)) = canonical["inputs"][:2]
        cached = any(t == "symint" for t, _ in canonical["inputs"])
        phase = "decode" if tokens == "N" else "mixed" if cached else "prefill"
        points = dict(db.conn.execute(
            "SELECT point, median_ms FROM points WHERE signature = ? AND env = ? AND "
            "status = 'ok'", (key, env)))
        if points:
            group = (json.dumps(canonical["scalars"]), phase, dim, dtype)
            groups[group][(heads, kv_heads)] = points
    return groups


def _compare(ref: dict[str, float], other: dict[str, float]) -> list[dict]:
    """Per quarter of the reference's latency over the shared points: the median ratio
    other / reference and its interquartile range."""
    common = sorted(set(ref) & set(other), key=ref.__getitem__)
    ratios = np.array([other[p] / ref[p] for p in common])
    return [{"quarter": name, "points": int(part.size), "median": float(np.median(part)),
             "p25": float(np.percentile(part, 25)), "p75": float(np.percentile(part, 75))}
            for name, part in zip(QUARTERS, np.array_split(ratios, len(QUARTERS)),
                                  strict=True) if part.size]


def _left_out(layouts: dict[tuple[int, int], dict[str, float]]) -> list[dict]:
    """Each layout predicted from the others at the points every layout measured, with each
    form of `FORMS` that the others determine: its absolute percentage errors."""
    common = sorted(set.intersection(*(set(p) for p in layouts.values())))
    out = []
    for held in sorted(layouts, reverse=True):
        others = [hk for hk in layouts if hk != held]
        lo, hi = min(h for h, _ in others), max(h for h, _ in others)
        for form, row in FORMS.items():
            if len(others) < len(row(0, 0)):
                continue
            x = np.array([row(*hk) for hk in others])
            y = np.array([[layouts[hk][p] for p in common] for hk in others])
            coef = np.linalg.lstsq(x, y, rcond=None)[0]
            pred = np.array(row(*held)) @ coef
            meas = np.array([layouts[held][p] for p in common])
            ape = np.abs(pred - meas) / meas
            upper = meas >= np.median(meas)
            out.append({"layout": list(held), "form": form, "points": len(common),
                        "inside": lo <= held[0] <= hi, "mape": float(ape.mean()),
                        "median_ape": float(np.median(ape)),
                        "upper_half_mape": float(ape[upper].mean()),
                        "max_ape": float(ape.max())})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention_heads.json"))
    args = parser.parse_args()
    with LatencyDB.open(args.db, create=False, readonly=True) as db:
        env = db.environments()[-1]
        groups = _layouts(db, env["fingerprint"])
    rows, left_out = [], []
    for (scalars, phase, dim, dtype), layouts in sorted(groups.items()):
        if len(layouts) < 2:
            continue
        if len(layouts) >= 3:
            left_out += [{"phase": phase, "head_dim": dim, **r} for r in _left_out(layouts)]
        ref = max(layouts)  # most query heads, then most KV heads
        for layout, points in sorted(layouts.items(), reverse=True):
            if layout == ref:
                continue
            rows.append({"scalars": json.loads(scalars), "phase": phase, "head_dim": dim,
                         "dtype": dtype, "reference": list(ref), "layout": list(layout),
                         "query_heads_ratio": layout[0] / ref[0],
                         "kv_heads_ratio": layout[1] / ref[1],
                         "quarters": _compare(layouts[ref], points)})
    if not rows:
        sys.exit(f"{args.db}: no two paged-attention signatures differ only in head counts")
    command = " ".join(["python", *sys.argv])
    args.out.write_text(json.dumps({"command": command, "environment": env, "rows": rows,
                                    "left_out": left_out}, indent=1) + "\n")
    lines = ["# Paged attention's latency against its head counts", "",
             f"- command: `{command}` (CPU, from the DB's measured points)",
             f"- environment: {env['device']}, torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}",
             "- each row: a layout (query × KV heads) against the reference layout of its group "
             "(same impl, phase and head dim), at the sweep points both measured; the points "
             "are split in quarters by the reference's latency; cell: median ratio of latencies "
             "(interquartile range)", "",
             "| phase | head dim | layout / reference | query heads ratio | KV heads ratio | "
             + " | ".join(f"{q} quarter" for q in QUARTERS) + " |",
             "|---|---:|---|---:|---:|" + "---:|" * len(QUARTERS)]
    for r in rows:
        cells = {q["quarter"]: f"{q['median']:.3f} ({q['p25']:.3f}–{q['p75']:.3f})"
                 for q in r["quarters"]}
        lines.append(f"| {r['phase']} | "
                     f"{r['head_dim']} | {r['layout'][0]}×{r['layout'][1]} / "
                     f"{r['reference'][0]}×{r['reference'][1]} | {r['query_heads_ratio']:.3f} | "
                     f"{r['kv_heads_ratio']:.3f} | "
                     + " | ".join(cells.get(q, "–") for q in QUARTERS) + " |")
    if left_out:
        lines += ["", "Each layout left out and predicted from the group's others, per point "
                  "(the points every layout measured): inside = its query heads within the "
                  "others' range; APE of the prediction, the upper half by its own latency", "",
                  "| phase | head dim | layout | inside | form | points | MAPE | median APE | "
                  "upper-half MAPE | max APE |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
        for r in left_out:
            lines.append(f"| {r['phase']} | {r['head_dim']} | {r['layout'][0]}×{r['layout'][1]}"
                         f" | {'yes' if r['inside'] else 'no'} | {r['form']} | {r['points']} | "
                         f"{r['mape']:.1%} | {r['median_ape']:.1%} | {r['upper_half_mape']:.1%} | "
                         f"{r['max_ape']:.1%} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
