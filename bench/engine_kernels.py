"""Kernel profile of transformers continuous batching at a steady decode batch, against the
paged-attention unit as profiled (GPU machine).

    python bench/engine_kernels.py MODEL N PROMPT > OUT.txt

Builds MODEL (random weights) behind the engine as validate-serving runs it (sync, no CUDA
graphs, FIFO, block size 256, cache sized by transformers), submits N requests of PROMPT
tokens, steps the engine until all N decode together, then prints the step times, a
torch.profiler table of three engine steps (by CUDA time and by CPU time), and the unit's
timing and kernel table at the same (T, N, P). Finds where the engine spends time that the
units do not.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from dooly_fx.engine import EngineProfile
from dooly_fx.lowering import lower
from dooly_fx.profile import _measure_point, collect
from dooly_fx.spec import resolve_model
from dooly_fx.validate import build_model

ACTIVITIES = [ProfilerActivity.CUDA, ProfilerActivity.CPU]


def main() -> None:
    name, nreq, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    spec = resolve_model(name)
    model = build_model(spec, EngineProfile(engine="paged"), "cuda")
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
    cb = ContinuousBatchingConfig(max_blocks_per_request=0, allow_block_sharing=False,
                                  use_cuda_graph=False, use_async_batching=False, block_size=256,
                                  scheduler_type="fifo")
    m = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    m.warmup()
    bp = m.batch_processor
    print("num_blocks", bp.cache.num_blocks, "mem alloc GB", torch.cuda.memory_allocated() / 1e9,
          "reserved", torch.cuda.memory_reserved() / 1e9, flush=True)
    for i in range(nreq):
        m.add_request(list(range(3, 3 + prompt)), request_id=str(i), max_new_tokens=400,
                      eos_token_id=-1)
    m.current_batch = 0

    def step() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        m._generation_loop_body(bp, False)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    for _ in range(60):
        step()
        b = bp.inputs_and_outputs.requests_in_batch
        if all(fs.query_length == 1 for fs in b) and len(b) == nreq:
            break
    b = bp.inputs_and_outputs.requests_in_batch
    cached = b[0].state.position_offset
    print("batch N", len(b), "cached", cached, "step ms", [round(step(), 1) for _ in range(4)],
          flush=True)
    with profile(activities=ACTIVITIES) as prof:
        for _ in range(3):
            step()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))
    cached = b[0].state.position_offset
    coll = collect([spec], EngineProfile(engine="paged"), ["decode"])
    for c in coll.cases.values():
        if c.kind == "paged_attention":
            pt = {"N": nreq, "P": cached, "T": nreq}
            print("unit", c.symbols, pt, _measure_point(c, pt, "cuda", (5.0, 20.0)), flush=True)
            r = lower(c, pt, "cuda")
            r.fn()
            torch.cuda.synchronize()
            with profile(activities=ACTIVITIES) as p2:
                for _ in range(3):
                    r.fn()
                torch.cuda.synchronize()
            print(p2.key_averages().table(sort_by="cuda_time_total", row_limit=10,
                                          max_name_column_width=50))


if __name__ == "__main__":
    main()
