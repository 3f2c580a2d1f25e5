"""Fused attention latency against the query count: where it steps, and where waves do.

    python bench/attention_waves.py --out bench/results/attention_waves   (GPU machine)

The engine's `paged|sdpa` attention (`paged.engine_attention`, the unit the profiler times) is
measured at a fixed key count (about 32K keys: 32 sequences) for T = 32, 64, ... queries, for
several head layouts. On a GPU the fused kernel runs one thread block per (128-query tile,
head) in whole waves over the multiprocessors, so its latency should be flat while the wave
count (`costs.scheduled_queries`) is, and step where it grows. The report lists, per layout,
the T at which the measured latency jumps (by more than `JUMP` over the previous T) and the T
at which the wave count grows, and the median latency per wave count. Writes OUT.json and
OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYOUTS = ((32, 8, 128), (24, 8, 128), (28, 4, 128), (32, 8, 64))
"""(heads, kv heads, head dim): Llama-3.1-8B, Llama-3.2-3B, Qwen2.5-7B, Llama-3.2-1B."""
QUERIES = (*range(32, 1025, 32), *range(1088, 2241, 64))
KEYS = 32768
SEQUENCES = 32
JUMP = 0.12


def measure(device: str) -> dict:
    import torch

    from dooly_fx.lowering import split_tokens
    from dooly_fx.paged import engine_attention
    from dooly_fx.timing import measure as time_it

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    layouts = []
    for heads, kv_heads, head_dim in LAYOUTS:
        rows = []
        for t in QUERIES:
            cached = max(16, (KEYS - t) // SEQUENCES)
            fn, _ = engine_attention(heads, kv_heads, head_dim, torch.bfloat16, device, "sdpa",
                                     split_tokens(t, SEQUENCES), [cached] * SEQUENCES)
            timing = time_it(fn, device, warmup_ms=5, rep_ms=20)
            rows.append({"T": t, "keys": SEQUENCES * cached + t, "ms": timing.median_ms})
        layouts.append({"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                        "points": rows})
        print(f"{heads}x{kv_heads}x{head_dim}: " + " ".join(f"{r['T']}:{r['ms']:.3f}"
                                                           for r in rows), flush=True)
    return {"sms": sms, "layouts": layouts}


def report(data: dict) -> list[str]:
    from dooly_fx.costs import ATTENTION_QUERY_TILE, scheduled_queries

    sms = data["sms"]
    lines = [f"# Fused attention latency vs queries ({data['meta']['device']}, {sms} SMs)", "",
             f"- command: `{data['meta']['command']}`",
             f"- versions: torch {data['meta']['torch']}, transformers "
             f"{data['meta']['transformers']}",
             f"- `paged|sdpa` attention of {SEQUENCES} sequences, about {KEYS} keys, T queries; "
             f"a jump: latency up by more than {JUMP:.0%} from the previous T; waves: "
             f"ceil(ceil(T / {ATTENTION_QUERY_TILE}) · heads / SMs)", "",
             "| heads × kv × dim | measured jumps at T | wave count grows at T | "
             "median ms by wave count |", "|---|---|---|---|"]
    for layout in data["layouts"]:
        pts, heads = layout["points"], layout["heads"]
        waves = [scheduled_queries(p["T"], heads, sms) * heads / (sms * ATTENTION_QUERY_TILE)
                 for p in pts]
        after = range(1, len(pts))
        jumps = [pts[i]["T"] for i in after if pts[i]["ms"] > pts[i - 1]["ms"] * (1 + JUMP)]
        grows = [pts[i]["T"] for i in after if waves[i] > waves[i - 1]]
        by_wave = {}
        for p, w in zip(pts, waves, strict=True):
            by_wave.setdefault(round(w), []).append(p["ms"])
        layout["jumps"], layout["wave_steps"] = jumps, grows
        layout["ms_by_waves"] = {w: statistics.median(v) for w, v in sorted(by_wave.items())}
        lines.append(f"| {heads} × {layout['kv_heads']} × {layout['head_dim']} | "
                     f"{', '.join(map(str, jumps))} | {', '.join(map(str, grows))} | "
                     + ", ".join(f"{w}: {ms:.2f}" for w, ms in layout["ms_by_waves"].items())
                     + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    from dooly_fx.hostinfo import machine

    data = measure(args.device)
    data["meta"] = {**machine(args.device), "command": " ".join(["python", *sys.argv])}
    lines = report(data)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
