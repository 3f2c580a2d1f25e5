"""Does the serving engine run a decode step slower than the same step run in isolation?

    python bench/engine_thread.py [--runs llama-3.2-1b:eager llama-3.2-1b:sdpa
        llama-3.1-8b:eager mistral-7b:sdpa] [--seqs 8] [--cached 512] [--tokens 96] [--rounds 2]
        [--calls 60] [--device cuda] [--out bench/results/engine_thread]

`validate-serving` finds small models' serving decode steps 9-16% longer than `predict_step`
says, even at the host speed of the moment (`serving_host_phases.md`), while the same
engine's isolated steps (`validate-steps`) are not. The engine runs its steps on a
background thread (`ContinuousBatchingManager`), the harness and profiler on the main one.
On a CUDA machine, for each paged model and attention, round by round:

* engine: transformers' continuous batching serves `--seqs` requests of `--cached` prompt
  tokens, all arriving at once, each generating `--tokens` tokens (`validate_serving.serve`,
  the cache sized by the engine); its decode steps with every sequence in the batch are the
  steady state, timed from scheduling to the outputs back on the host (`validate-serving`
  also counts the request update after that, reported apart);
* main: `paged.EngineBatch.step` (what `validate-steps` times: batch preparation, forward,
  sampling, outputs back to the host) over the same batch at the middle of those steps'
  cached lengths, on the main thread, timed on the host clock like the engine's;
* worker: the same on a worker thread while the main thread waits on a queue, as the
  engine's thread runs.

Each round times the host probe next to each kind. Writes OUT.json and OUT.md: per run the
median step ms (and its preparation and forward parts) of each kind, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from dooly_fx.engine import EngineProfile
from dooly_fx.hostinfo import host_probe_ms, machine
from dooly_fx.paged import EngineBatch
from dooly_fx.spec import resolve_model
from dooly_fx.validate import engine_grad_mode, engine_model
from dooly_fx.validate_serving import AttentionClock, serve
from dooly_fx.workload import Request


def engine_steps(spec, engine: EngineProfile, seqs: int, cached: int, tokens: int,
                 device: str) -> dict:
    """The engine's steady decode steps: every sequence in the batch, one new token each."""
    requests = [Request(i, 0.0, cached, tokens) for i in range(seqs)]
    served = serve(spec, engine, requests, device)
    steady = [s for s in served.steps if len(s.new) == seqs and all(n == 1 for n in s.new)]
    probes = [s.host_probe_ms for s in steady if s.host_probe_ms]
    return {"steps": len(steady),
            "step_ms": [(s.synced_s - s.start_s) * 1e3 for s in steady],
            "update_ms": [(s.end_s - s.synced_s) * 1e3 for s in steady],
            "prepare_ms": [(s.forward_s - s.start_s) * 1e3 for s in steady],
            "forward_ms": [(s.synced_s - s.forward_s) * 1e3 for s in steady],
            "attention_ms": [s.attention_host_ms or 0.0 for s in steady],
            "cached": [statistics.mean(s.cached) for s in steady],
            "probe_ms": probes}


def isolated_steps(model, batch: EngineBatch, calls: int) -> dict:
    """`batch.step(model)` `calls` times (after 5 untimed) on the host clock, its preparation
    apart, in the engine's autograd mode."""
    step, prepare, forward, attention = [], [], [], []
    probe = host_probe_ms()
    with engine_grad_mode():
        runner = batch._model_runner()
        for i in range(calls + 5):
            with AttentionClock() as clock:
                start = time.perf_counter()
                kwargs = batch.prepare()
                mid = time.perf_counter()
                runner.compute_batch(model, kwargs)
                batch.io.retrieve_device_outputs()
                end = time.perf_counter()
            if i >= 5:
                step.append((end - start) * 1e3)
                prepare.append((mid - start) * 1e3)
                forward.append((end - mid) * 1e3)
                attention.append(sum(clock.calls))
    return {"step_ms": step, "prepare_ms": prepare, "forward_ms": forward,
            "attention_ms": attention, "probe_ms": [probe, host_probe_ms()]}


def on_worker(fn, *args) -> dict:
    """`fn(*args)` on a worker thread, the main thread polling a queue meanwhile."""
    done: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: done.put(fn(*args)))
    thread.start()
    while True:
        try:
            result = done.get(timeout=0.5)
            thread.join()
            return result
        except queue.Empty:
            continue


KINDS = ("engine", "main", "worker")


def run(item: str, seqs: int, cached: int, tokens: int, rounds: int, calls: int,
        device: str) -> dict:
    name, attn = item.split(":")
    spec = resolve_model(name)
    engine = EngineProfile(engine="paged", attn_impl=attn)
    middle = cached + tokens // 2
    per_kind: dict[str, dict[str, list]] = {k: {} for k in KINDS}
    for rnd in range(rounds):
        got = {"engine": engine_steps(spec, engine, seqs, cached, tokens, device)}
        model = engine_model(spec, engine, device)
        batch = EngineBatch(model.config, engine.torch_dtype, device, [1] * seqs,
                            [middle] * seqs)
        got["main"] = isolated_steps(model, batch, calls)
        got["worker"] = on_worker(isolated_steps, model, batch, calls)
        del model, batch
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        for kind, values in got.items():
            for key, v in values.items():
                if isinstance(v, list):
                    per_kind[kind].setdefault(key, []).extend(v)
        print(json.dumps({"run": item, "round": rnd, **{
            k: round(statistics.median(v["step_ms"]), 3) for k, v in got.items()}}),
            flush=True)
    row = {"run": item, "seqs": seqs, "cached": cached, "tokens": tokens,
           "isolated_cached": middle, "rounds": rounds}
    for kind, values in per_kind.items():
        row[kind] = {key: statistics.median(v) for key, v in values.items() if v}
        row[kind]["n"] = len(values["step_ms"])
        # The step less its attention's host time: what a step pays besides cuDNN builds.
        row[kind]["step_less_attention_ms"] = statistics.median(
            a - b for a, b in zip(values["step_ms"], values["attention_ms"], strict=True))
    for kind in ("engine", "worker"):
        row[f"{kind}_over_main"] = row[kind]["step_ms"] / row["main"]["step_ms"]
        row[f"{kind}_over_main_less_attention"] = (row[kind]["step_less_attention_ms"]
                                                    / row["main"]["step_less_attention_ms"])
    return row


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# A decode step in the serving engine and in isolation", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['device']}, torch {m['torch']}, transformers {m['transformers']}",
             "- median ms over the rounds' steps (host clock: schedule/prepare to outputs "
             "back); prepare + forward parts; probe = median host probe ms", "",
             "| run | N × cached | engine ms (prep + fwd) | main ms (prep + fwd) "
             "| worker ms (prep + fwd) | engine / main | worker / main "
             "| less sdpa host: engine / main, worker / main | probe engine / main / worker |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = [f"{r[k]['step_ms']:.2f} ({r[k]['prepare_ms']:.2f} + {r[k]['forward_ms']:.2f})"
                 for k in KINDS]
        probes = " / ".join(f"{r[k].get('probe_ms', float('nan')):.3f}" for k in KINDS)
        lines.append(f"| {r['run']} | {r['seqs']} × {r['isolated_cached']} | "
                     + " | ".join(cells)
                     + f" | {r['engine_over_main']:.3f} | {r['worker_over_main']:.3f} "
                     f"| {r['engine_over_main_less_attention']:.3f}, "
                     f"{r['worker_over_main_less_attention']:.3f} | {probes} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+",
                        default=["llama-3.2-1b:eager", "llama-3.2-1b:sdpa",
                                 "llama-3.1-8b:eager", "mistral-7b:sdpa"])
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--cached", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=60,
                        help="isolated steps per thread and round")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results/engine_thread")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu for a smoke run")
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine(args.device),
              "rows": []}
    out = Path(args.out)
    for item in args.runs:  # written after each run, so a cut-off call keeps what it did
        result["rows"].append(run(item, args.seqs, args.cached, args.tokens, args.rounds,
                                  args.calls, args.device))
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
