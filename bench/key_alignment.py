"""One layer of the paged engine's attention by the class of its key count (GPU machine).

    python bench/key_alignment.py --out bench/results/key_alignment

The engine's attention scores all T queries of a step against all K = N·P + T keys it reads
(`paged.engine_attention`, transformers' `paged|sdpa` and `paged|eager`). K is the row
length of the (T, K) scores and mask; when K is odd, or even but not a multiple of 8, rows
are not 16 bytes aligned and cuBLAS and cuDNN choose slower kernels. This times decode steps
(N sequences of one new token on P cached each) with the first sequence given up to 7 more
cached tokens so that K is a multiple of 8, K mod 8 = 1, 2 and 4, and prints each time
against the aligned one. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dooly_fx.costs import to_key_class
from dooly_fx.hostinfo import machine
from dooly_fx.paged import engine_attention
from dooly_fx.timing import measure

HEADS = ((32, 8, 64), (32, 8, 128))
"""(query heads, KV heads, head dim): Llama-3.2-1B's and Llama-3.1-8B's attention."""
STEPS = ((8, 2000), (16, 1500), (32, 1024), (52, 856), (64, 512))
"""(N, P) decode steps."""
REMAINDERS = (0, 1, 2, 4)
"""K mod 8 of each timing; 0 is the aligned reference."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    rows = []
    for impl in ("eager", "sdpa"):
        for heads, kv_heads, dim in HEADS:
            for n, p in STEPS:
                row = {"impl": impl, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                       "N": n, "P": p, "ms": {}}
                for rem in REMAINDERS:
                    cached = [p] * n
                    keys = n * (p + 1)
                    cached[0] += to_key_class(keys, 8) + rem  # aligned, then rem more
                    fn, _ = engine_attention(heads, kv_heads, dim, torch.bfloat16, "cuda",
                                             impl, [1] * n, cached)
                    row["ms"][str(rem)] = measure(fn, "cuda", timer="do_bench").median_ms
                rows.append(row)
                print(impl, heads, kv_heads, dim, n, p,
                      {k: round(v / row["ms"]["0"], 2) for k, v in row["ms"].items()},
                      flush=True)
    meta = {"command": "python bench/key_alignment.py --out " + str(args.out),
            "machine": machine("cuda")}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                        indent=1))
    lines = [
        "# Paged attention by the key count's class", "",
        f"- command: `{meta['command']}`",
        f"- machine: {', '.join(f'{k} {v}' for k, v in meta['machine'].items())}",
        "- one decode step's attention layer (transformers' `paged|<impl>` on its own paged "
        "cache), N sequences of one new token on P cached, K = N·(P + 1) keys moved to the "
        "remainder shown; ms (ratio to the aligned K)", "",
        "| impl | heads / kv / dim | N | P | K % 8 = 0 | K % 8 = 1 | K % 8 = 2 | K % 8 = 4 |",
        "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = r["ms"]["0"]
        cells = [f"{r['ms'][str(k)]:.3f} ({r['ms'][str(k)] / base:.2f}x)" for k in REMAINDERS]
        lines.append(f"| {r['impl']} | {r['heads']} / {r['kv_heads']} / {r['head_dim']} | "
                     f"{r['N']} | {r['P']} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
