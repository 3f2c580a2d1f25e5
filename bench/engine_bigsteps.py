"""Kernel time of the engine's steps by category, big prefill chunks included, against the
prediction from a latency DB.

    python bench/engine_bigsteps.py measure MODEL OUT.json     # GPU machine
    python bench/engine_bigsteps.py report OUT.json --db DB    # anywhere: writes OUT.md

`measure` builds MODEL (random weights) behind transformers continuous batching as
validate-serving runs it (sync, no CUDA graphs, FIFO, block size 256), brings 48 requests of
600 tokens to decoding, then three times adds 6 requests of 2000 tokens and profiles the next
6 steps (torch.profiler): each step's batch (new and cached tokens per sequence) and its CUDA
kernel time by category (attention: the SDPA kernel; copy: `repeat_kv`'s contiguous K/V and
other copies; index: the cache reads; gemm; other). `report` predicts every step from the DB
(`predict_step`: `paged_attention` units against attention + copy + index, GEMM and LM-head
units against gemm, the rest against other) and writes the comparison.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

CATEGORIES = {"attention": ("sdpa", "cudnn", "flash", "fmha"),
              "gemm": ("nvjet", "gemm", "cutlass", "sm90_xmma"),
              "copy": ("copy", "memcpy", "memset"), "index": ("index", "gather", "scatter")}
UNIT_CATEGORY = {"paged_attention": ("attention", "copy", "index"), "gemm": ("gemm",),
                 "lm_head": ("gemm",)}


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((c for c, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")


def measure(model_name: str, out: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from dooly_fx.engine import EngineProfile
    from dooly_fx.spec import resolve_model
    from dooly_fx.validate import build_model

    model = build_model(resolve_model(model_name), EngineProfile(engine="paged"), "cuda")
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
    cb = ContinuousBatchingConfig(max_blocks_per_request=0, allow_block_sharing=False,
                                  use_cuda_graph=False, use_async_batching=False,
                                  block_size=256, scheduler_type="fifo")
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=cb)
    manager.warmup()
    processor = manager.batch_processor
    manager.current_batch = 0
    seen: dict = {}
    prepare = processor.prepare_next_batch

    def timed_prepare():
        ready = prepare()
        if ready:
            batch = processor.inputs_and_outputs.requests_in_batch
            seen["new"] = [fs.query_length for fs in batch]
            seen["cached"] = [fs.state.position_offset - fs.query_length for fs in batch]
        return ready

    processor.prepare_next_batch = timed_prepare
    ids = iter(range(10**6))

    def add(n: int, prompt: int) -> None:
        for _ in range(n):
            manager.add_request(list(range(3, 3 + prompt)), request_id=str(next(ids)),
                                max_new_tokens=200, eos_token_id=-1)

    add(48, 600)
    for _ in range(30):
        manager._generation_loop_body(processor, False)
    records = []
    for _ in range(3):
        add(6, 2000)
        for _ in range(6):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                manager._generation_loop_body(processor, False)
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) * 1e3
            by = collections.Counter()
            for e in prof.key_averages():
                if e.device_type.name == "CUDA" and e.device_time_total > 0:
                    by[category(e.key)] += e.device_time_total / 1e3
            records.append({"new": seen["new"], "cached": seen["cached"], "wall_ms": wall,
                            "kernel_ms": dict(by)})
            print(sum(seen["new"]), len(seen["new"]), round(wall, 1),
                  {k: round(v, 1) for k, v in by.items()}, flush=True)
    out.write_text(json.dumps(records))


def report(path: Path, db_path: Path, model: str, engine: str) -> None:
    from dooly_fx.db import LatencyDB
    from dooly_fx.predict import load, predict_step

    with LatencyDB.open(db_path, create=False, readonly=True) as db:
        env = db.environments()[-1]
        loaded = load(db, model, env["fingerprint"], engine)
    lines = [f"# Engine steps of {model}: kernel time by category vs `predict_step`", "",
             f"- measured: `python bench/engine_bigsteps.py measure {model} {path.name}` "
             "(GPU machine); predicted: "
             f"`python {' '.join(sys.argv)}` from `{db_path}` ({env['device']}, {engine})", "",
             "| new tokens T | sequences N | mean cached | attention (+copy, index) ms "
             "measured / predicted | GEMM ms measured / predicted | GPU total ms measured / "
             "predicted |", "|---:|---:|---:|---|---|---|"]
    for r in json.loads(path.read_text()):
        step = predict_step(loaded, list(zip(r["new"], r["cached"], strict=True)))
        by = collections.Counter()
        for u in step.units:
            by[UNIT_CATEGORY.get(u.kind, ("other",))] += u.count * u.gpu_ms
        km = r["kernel_ms"]
        attn, gemm = UNIT_CATEGORY["paged_attention"], UNIT_CATEGORY["gemm"]
        measured = {cats: sum(km.get(c, 0.0) for c in cats) for cats in (attn, gemm)}
        lines.append(f"| {sum(r['new'])} | {len(r['new'])} | "
                     f"{sum(r['cached']) / len(r['cached']):.0f} | "
                     f"{measured[attn]:.1f} / {by[attn]:.1f} | "
                     f"{measured[gemm]:.1f} / {by[gemm]:.1f} | "
                     f"{sum(km.values()):.1f} / {step.gpu_ms:.1f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("out", type=Path)
    r = sub.add_parser("report")
    r.add_argument("file", type=Path)
    r.add_argument("--db", type=Path, default=Path("bench/results/h100.db"))
    r.add_argument("--model", default="llama-3.1-8b")
    r.add_argument("--engine", default="paged|sdpa|bfloat16")
    args = parser.parse_args()
    if args.mode == "measure":
        measure(args.model, args.out)
    else:
        report(args.file, args.db, args.model, args.engine)


if __name__ == "__main__":
    main()
