"""Our H100 GEMM latencies for Llama-2-7B's shapes against Vidur's published H100 profile.

    python bench/vidur_gemm.py --db bench/results/h100_llama2_fp16.db \\
        --vidur ../shared/data/vidur_profiles/h100/Llama-2-7b-hf.mlp.csv

Both are fp16 on an H100, tensor parallel degree 1. Vidur profiles vLLM-style fused
projections; transformers (which dooly_fx captures) runs separate ones:

| Vidur op       | shape (K -> N)   | ours                                   | same kernel shape |
|----------------|------------------|----------------------------------------|-------------------|
| attn_post_proj | 4096 -> 4096     | o_proj                                 | yes               |
| mlp_down_proj  | 11008 -> 4096    | down_proj                              | yes               |
| attn_pre_proj  | 4096 -> 12288    | q_proj + k_proj + v_proj (3 GEMMs)     | no: sum of three  |
| mlp_up_proj    | 4096 -> 22016    | gate_proj + up_proj (2 GEMMs)          | no: sum of two    |

Ratio = ours / Vidur (median times) at every token count both profiled. Writes a table and
`bench/results/vidur_gemm.{json,md}` with the DB's environment (device, driver, versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Vidur op -> [(N, K), multiplicity]: the transformers GEMMs that do the same work.
OPS = {
    "attn_post_proj": ([(4096, 4096)], 1, True),
    "mlp_down_proj": ([(4096, 11008)], 1, True),
    "attn_pre_proj": ([(4096, 4096)], 3, False),
    "mlp_up_proj": ([(11008, 4096)], 2, False),
}


def ours(db_path: Path) -> tuple[dict, dict[tuple[int, int], dict[int, float]]]:
    """(environment info, {(N, K): {m: median ms}}) for the fp16 GEMMs in the DB."""
    conn = sqlite3.connect(db_path)
    envs = conn.execute("SELECT fingerprint, info FROM environments").fetchall()
    if len(envs) != 1:
        sys.exit(f"{db_path}: expected one environment, found {len(envs)}")
    info = json.loads(envs[0][1])
    table: dict[tuple[int, int], dict[int, float]] = {}
    rows = conn.execute(
        "SELECT s.canonical, p.point, p.median_ms FROM points p JOIN signatures s "
        "ON s.key = p.signature WHERE s.kind = 'gemm' AND p.status = 'ok'")
    for canonical, point, median in rows:
        data = json.loads(canonical)
        (_, x_dims), (_, w_dims) = data["inputs"][:2]
        if x_dims[0] != "m" or len(w_dims) != 2:
            continue
        table.setdefault((w_dims[0], w_dims[1]), {})[json.loads(point)["m"]] = median
    return info, table


def vidur(csv_path: Path) -> dict[str, dict[int, float]]:
    """{op: {num_tokens: median ms}} at tensor-parallel degree 1."""
    out: dict[str, dict[int, float]] = {op: {} for op in OPS}
    with csv_path.open() as fh:
        for row in csv.DictReader(fh):
            if int(row["num_tensor_parallel_workers"]) != 1:
                continue
            for op in OPS:
                out[op][int(row["num_tokens"])] = float(row[f"time_stats.{op}.median"])
    return out


def compare(mine: dict, theirs: dict) -> dict:
    result = {}
    for op, (shapes, times, same) in OPS.items():
        (shape,) = shapes
        common = sorted(set(mine.get(shape, {})) & set(theirs[op]))
        points = [{"num_tokens": m, "ours_ms": round(mine[shape][m] * times, 5),
                   "vidur_ms": theirs[op][m],
                   "ratio": round(mine[shape][m] * times / theirs[op][m], 3)} for m in common]
        ratios = [p["ratio"] for p in points]
        result[op] = {
            "ours": f"{times} x GEMM (N={shape[0]}, K={shape[1]})", "same_shape": same,
            "points": points,
            "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
            "min_ratio": min(ratios, default=None), "max_ratio": max(ratios, default=None),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("bench/results/h100_llama2_fp16.db"))
    parser.add_argument("--vidur", type=Path, default=Path(
        "../shared/data/vidur_profiles/h100/Llama-2-7b-hf.mlp.csv"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/vidur_gemm.json"))
    args = parser.parse_args()
    info, mine = ours(args.db)
    result = compare(mine, vidur(args.vidur))
    payload = {"meta": {"command": " ".join(["python", *sys.argv]), "ours_environment": info,
                        "vidur_profile": str(args.vidur), "dtype": "float16"},
               "ops": result}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    table = Table(title=f"ours ({info['device']}, torch {info['torch']}) / Vidur H100, fp16")
    for col in ("Vidur op", "ours", "same shape", "token counts", "median ratio", "min", "max"):
        table.add_column(col, justify="left" if col in ("Vidur op", "ours") else "right")
    for op, r in result.items():
        table.add_row(op, r["ours"], "yes" if r["same_shape"] else "no",
                      str(len(r["points"])), str(r["median_ratio"]), str(r["min_ratio"]),
                      str(r["max_ratio"]))
    Console(width=140).print(table)
    lines = ["# GEMM latency: ours vs Vidur (H100, fp16)", "",
             f"- command: `{payload['meta']['command']}`",
             f"- ours: {info['device']}, CUDA {info.get('cuda')}, driver {info.get('driver')}, "
             f"torch {info['torch']}, triton {info['triton']}, transformers "
             f"{info['transformers']}, engine {info['engine']}",
             f"- Vidur: `{args.vidur.name}` (microsoft/vidur's published H100 profile)", "",
             "| Vidur op | ours | same shape | token counts | median ratio | min | max |",
             "|---|---|---|---:|---:|---:|---:|"]
    for op, r in result.items():
        lines.append(f"| {op} | {r['ours']} | {'yes' if r['same_shape'] else 'no'} | "
                     f"{len(r['points'])} | {r['median_ratio']} | {r['min_ratio']} | "
                     f"{r['max_ratio']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
