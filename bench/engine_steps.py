"""Engine steps around new prefills, and where their host time goes (GPU machine).

    OUT=DIR python bench/engine_steps.py MODEL N PROMPT > DIR/MODEL_steps.txt

Builds MODEL (random weights) behind transformers continuous batching as validate-serving runs
it (sync, no CUDA graphs, FIFO, block size 256), brings N requests of PROMPT tokens to a
steady decode, then adds one request of 128, 512, 1024, 2048, 4096, 6000, 2048 and 512 tokens
in turn, stepping three times after each (a mixed step, then decodes). Every step is recorded
as validate-serving records it (prepare, forward, update; batch) with the CUDA allocator's
events. Then one decode step and one mixed step (a new 2048-token request) run under
torch.profiler, which lists the host time of each cuDNN attention call and of each GEMM:
the first attention call of a step builds a cuDNN graph for the step's new shape.
Writes OUT/steps_MODEL.json (steps, allocator events) and prints one line per step:
sequences, tokens, prepare ms, forward ms, update ms, allocator events.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from dooly_fx.engine import EngineProfile
from dooly_fx.spec import resolve_model
from dooly_fx.validate import build_model
from dooly_fx.validate_serving import _allocator_events, _StepClock

NEW_PROMPTS = (128, 512, 1024, 2048, 4096, 6000, 2048, 512)
LISTED = ("aten::_cudnn_attention_forward", "aten::mm")


def main() -> None:
    name, nreq, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = build_model(resolve_model(name), EngineProfile(engine="paged"), "cuda")
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
    cb = ContinuousBatchingConfig(max_blocks_per_request=0, allow_block_sharing=False,
                                  use_cuda_graph=False, use_async_batching=False,
                                  block_size=256, scheduler_type="fifo")
    m = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    m.warmup()
    bp = m.batch_processor
    steps, allocs = [], []
    clock = _StepClock(bp, steps)
    clock.t0 = time.perf_counter()
    m.current_batch = 0

    def step() -> None:
        before = _allocator_events("cuda")
        torch.cuda.synchronize()
        m._generation_loop_body(bp, False)
        torch.cuda.synchronize()
        after = _allocator_events("cuda")
        allocs.append({k: after[k] - before[k] for k in before})

    added = [0]

    def add(tokens: int) -> None:
        m.add_request(list(range(3, 3 + tokens)), request_id=str(added[0]),
                      max_new_tokens=3000, eos_token_id=-1)
        added[0] += 1

    def host_calls(prof) -> None:
        for op in LISTED:
            events = [e for e in prof.events() if e.name == op]
            print(op, len(events), [round(e.self_cpu_time_total / 1e3, 2) for e in events][:45])

    for _ in range(nreq):
        add(prompt)
    for _ in range(80):
        step()
        if all(q == 1 for q in steps[-1].new) and len(steps[-1].new) == nreq:
            break
    for _ in range(3):
        step()
    for tokens in NEW_PROMPTS:
        add(tokens)
        for _ in range(3):
            step()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
    print("profiled decode step", len(steps[-1].new), flush=True)
    host_calls(prof)
    add(2048)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
    print("profiled step", steps[-1].new[-1], len(steps[-1].new), flush=True)
    host_calls(prof)
    out = os.environ.get("OUT", "/tmp")
    with open(f"{out}/steps_{name}.json", "w") as fh:
        json.dump({"model": name, "steps": [vars(s) for s in steps], "allocs": allocs}, fh)
    for s, a in zip(steps, allocs, strict=True):
        print(len(s.new), sum(s.new), round(1e3 * (s.forward_s - s.start_s), 1),
              round(1e3 * (s.synced_s - s.forward_s), 1), round(1e3 * (s.end_s - s.synced_s), 1),
              a)


if __name__ == "__main__":
    main()
