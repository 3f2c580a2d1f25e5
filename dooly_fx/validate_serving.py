"""Request-level validation: serve a workload on transformers' continuous-batching engine and
compare every request's TTFT and TPOT with the simulator's.

`serve` runs on the GPU: the model (random weights) behind a `ContinuousBatchingManager`
(paged attention, FIFO scheduler, sync batching: what `paged|sdpa` and `paged|eager` run),
requests submitted at their arrival times from a feeder loop, each with per-token timestamps.
It also records every engine step: the batch (new and cached tokens per sequence) and when
the step was scheduled, ran its forward (with sampling and the device-to-host copy) and
updated the requests, and every `PROBE_EVERY` steps the host probe (how fast the host ran:
the run is predicted at that speed). That record (`Served`) is plain JSON, so `compare`
(simulate the same requests with the same engine settings, CPU only) can be re-run later on
another machine.

Measured times: TTFT = first token's timestamp - the request's creation in `add_request`;
TPOT = (last - first token timestamp) / (tokens - 1), the simulator's definitions.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from dooly_fx.errors import UserError
from dooly_fx.workload import Request

WARMUP_REQUESTS = 4
"""Requests served before the measured run (CUDA context, cuBLAS handles, allocator)."""

PROBE_EVERY = 16
"""The engine's thread times the host probe (`hostinfo.host_probe_ms`) after the first step
and every this many steps after it, between steps (about 1 ms, never inside a step's times):
the host speed the run had, which `compare` predicts at."""


@dataclass
class ServedRequest:
    """One request as the engine served it; times in seconds from the run's start."""

    id: int
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    """When the workload asked for it."""
    submitted_s: float
    """When `add_request` created it (the feeder's lateness is arrival_s - submitted_s)."""
    first_s: float | None = None
    """Timestamp of the first output token (None: never came)."""
    last_s: float | None = None
    generated: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return math.nan if self.first_s is None else self.first_s - self.submitted_s

    @property
    def tpot(self) -> float:
        if self.first_s is None or self.last_s is None or self.generated < 2:
            return math.nan
        return (self.last_s - self.first_s) / (self.generated - 1)


@dataclass
class EngineStep:
    """One engine step; times in seconds from the run's start."""

    start_s: float
    """`prepare_next_batch` began (scheduling, then the batch's tensors)."""
    forward_s: float
    """The forward began."""
    synced_s: float
    """Forward, sampling and the copy of new tokens to the host finished."""
    end_s: float
    """`update_batch` finished (requests updated, outputs delivered)."""
    new: list[int]
    """New tokens of each sequence in the batch."""
    cached: list[int]
    """Tokens already in the KV cache of each sequence."""
    attention_host_ms: float | None = None
    """Host time inside the forward's `scaled_dot_product_attention` calls (None: it made
    none, e.g. `paged|eager`). Where PyTorch picks cuDNN, a call at a shape not seen before
    builds a graph first: that build is most of this."""
    attention_max_ms: float | None = None
    """The slowest of those calls."""
    host_probe_ms: float | None = None
    """The host probe timed right after this step (every `PROBE_EVERY` steps; else None)."""
    gc_ms: float | None = None
    """Python's garbage-collector pauses that began within the step (a collection in any
    thread stops every thread); None in a run recorded before they were timed."""

    @property
    def batch(self) -> list[tuple[int, int]]:
        return list(zip(self.new, self.cached, strict=True))


def _check_numbers(row: ServedRequest | EngineStep, where: str) -> None:
    """A UserError where a field of a measurement read back from JSON is not the number (or
    list of integers) its annotation says."""
    for f in fields(row):
        value, kind = getattr(row, f.name), str(f.type)
        if kind == "list[int]":
            ok = isinstance(value, list) and all(_is_number(v, int) for v in value)
        elif kind.startswith(("int", "float")):
            ok = _is_number(value, int if kind.startswith("int") else (int, float)) or (
                value is None and "None" in kind)
        else:
            continue
        if not ok:
            raise UserError(f"not a validate-serving measurement ({where}.{f.name} is "
                            f"{value!r}, not {kind})")


def _is_number(value, kinds) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


@dataclass
class Served:
    """A measured serving run: settings, requests and steps (JSON round-trip)."""

    model: str
    engine: str
    settings: dict
    """Engine settings as resolved: block_size, num_blocks, max_batch_tokens, max_seqs."""
    machine: dict
    requests: list[ServedRequest]
    steps: list[EngineStep]
    wall_s: float
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)
    allocator: dict = field(default_factory=dict)
    """CUDA caching-allocator events during the run (`_ALLOCATOR_EVENTS`; empty on CPU):
    device mallocs and frees, and retries after freeing the cache (each one synchronises)."""

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> Served:
        try:
            served = Served(
                model=data["model"], engine=data["engine"], settings=data["settings"],
                machine=data["machine"],
                requests=[ServedRequest(**r) for r in data["requests"]],
                steps=[EngineStep(**s) for s in data["steps"]], wall_s=data["wall_s"],
                timed_out=data.get("timed_out", False), notes=data.get("notes", []),
                allocator=data.get("allocator", {}))
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a validate-serving measurement ({exc!r})") from None
        for kind, rows in (("requests", served.requests), ("steps", served.steps)):
            for i, row in enumerate(rows):
                _check_numbers(row, f"{kind}[{i}]")
        return served

    @property
    def host_probe_ms(self) -> float | None:
        """The host's speed during the run, from the probes its steps recorded
        (`hostinfo.run_host_probe_ms`; None for a run measured without them)."""
        from dooly_fx.hostinfo import run_host_probe_ms

        return run_host_probe_ms([s.host_probe_ms for s in self.steps
                                  if s.host_probe_ms is not None])

    def scheduler(self, config=None):
        """The simulator's scheduler with this run's engine settings (transformers policy).
        The cache's layer groups are the engine's, recorded with the run, or for a run
        recorded before them, those of the model's `config` as the DB records it
        (`serving.cache_layout`; None: one full-attention group)."""
        from dooly_fx.schedulers import preset

        st = self.settings
        groups = {k: st[k] for k in ("full_groups", "sliding_groups", "sliding_window")
                  if k in st}
        if not groups and config is not None:
            from dooly_fx.serving import cache_layout

            groups = cache_layout(config)
        return preset("transformers", block_size=st["block_size"], num_blocks=st["num_blocks"],
                      max_batch_tokens=st["max_batch_tokens"], max_seqs=st["max_seqs"],
                      **groups)

    def workload(self) -> list[Request]:
        """The requests as they reached the engine: arrival = submission time, or for a
        request that never returned (a run cut off by its time limit), its arrival time
        (the feeder is late by about 0.1 ms)."""
        return [Request(r.id, r.submitted_s if math.isfinite(r.submitted_s) else r.arrival_s,
                        r.prompt_tokens, r.output_tokens) for r in self.requests]


def serve(spec, engine, requests: Sequence[Request], device: str = "cuda", *,
          num_blocks: int | None = None, max_batch_tokens: int | None = None,
          max_seqs: int | None = None, block_size: int | None = None,
          time_limit_s: float = 600.0,
          on_done: Callable[[int], None] | None = None, seed: int = 0,
          collect_garbage: bool = True) -> Served:
    """Serve `requests` (arrival times honoured) with transformers continuous batching on
    `device`; settings left None are sized by the engine (from free memory) and recorded.
    `collect_garbage=False` turns Python's garbage collector off while the requests run (the
    engine runs with it on; off separates its pauses from the engine's own work).

    Stops after `time_limit_s` (counting from the first arrival): requests not finished
    then keep `first_s`/`last_s` None and the result says `timed_out`.
    """
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from dooly_fx.hostinfo import machine
    from dooly_fx.paged import ENGINE_BLOCK_SIZE
    from dooly_fx.validate import build_model

    if not requests:
        raise UserError("no requests to serve")
    model = build_model(spec, engine, device)
    vocab = model.config.get_text_config().vocab_size
    rng = np.random.default_rng(seed)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
    cb = ContinuousBatchingConfig(
        block_size=block_size or ENGINE_BLOCK_SIZE, num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_seqs,
        max_blocks_per_request=0, allow_block_sharing=False, use_cuda_graph=False,
        use_async_batching=False, scheduler_type="fifo")
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    with _host_memory(device):
        manager.warmup()  # creates the batch processor and its cache
    processor = manager.batch_processor
    cache = processor.cache
    settings = {"block_size": cache.block_size, "num_blocks": cache.num_blocks,
                "full_groups": cache.num_full_attention_groups,
                "sliding_groups": cache.num_sliding_attention_groups,
                "sliding_window": int(getattr(model.config, "sliding_window", None) or 0)
                if cache.num_sliding_attention_groups else 0,
                "max_batch_tokens": cache.max_batch_tokens,
                "max_seqs": manager.continuous_batching_config.max_requests_per_batch,
                "attn_implementation": model.config._attn_implementation,
                "garbage_collector": collect_garbage}
    steps: list[EngineStep] = []
    clock = _StepClock(processor, steps)
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    if longest > cache.num_blocks * cache.block_size:
        raise UserError(f"a request of {longest} tokens does not fit the engine's KV cache "
                        f"({cache.num_blocks} blocks of {cache.block_size})")
    served = [ServedRequest(r.id, r.prompt_tokens, r.output_tokens, r.arrival_s, math.nan)
              for r in requests]
    by_id = {str(r.id): s for r, s in zip(requests, served, strict=True)}
    prompts = {r.id: rng.integers(0, vocab, r.prompt_tokens).tolist() for r in requests}
    manager.start()
    timed_out, collecting = False, gc.isenabled()
    try:
        _warm(manager, rng, vocab, min(512, cache.num_blocks * cache.block_size
                                       // (2 * WARMUP_REQUESTS), cache.max_batch_tokens))
        steps.clear()
        if not collect_garbage:
            gc.disable()
        before = _allocator_events(device)
        t0 = time.perf_counter()
        clock.t0 = t0
        feeder_error: list[BaseException] = []
        feeder = threading.Thread(target=_feed, daemon=True,
                                  args=(manager, requests, prompts, t0, feeder_error))
        feeder.start()
        done = 0
        deadline = t0 + requests[-1].arrival_s + time_limit_s
        while done < len(requests):
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            result = manager.get_result(timeout=min(left, 0.5))
            if result is None:
                _check_alive(manager)
                if not manager.is_running():
                    break
                continue
            s = by_id.get(result.request_id)
            if s is None:
                continue
            stamps = result.timestamps or []
            s.submitted_s = result.created_time - t0
            s.generated = len(result.generated_tokens)
            if stamps:
                s.first_s, s.last_s = stamps[0] - t0, stamps[-1] - t0
            if result.error:
                s.error = str(result.error)
            done += 1
            if on_done:
                on_done(done)
        feeder.join(timeout=5)
        if feeder_error:
            raise feeder_error[0]
        wall = time.perf_counter() - t0
        allocator = {k: v - before[k] for k, v in _allocator_events(device).items()}
    finally:
        if collecting:
            gc.enable()
        manager.stop(block=True, timeout=10, hard_stop=True)
        clock.restore()
        del manager, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    notes = []
    if any(math.isnan(s.submitted_s) for s in served):
        notes.append("some requests never returned: their submission time is unknown")
    return Served(spec.name, engine.label, settings, machine(device), served, steps, wall,
                  timed_out, notes, allocator)


_ALLOCATOR_EVENTS = {"device_mallocs": "num_device_alloc", "device_frees": "num_device_free",
                     "alloc_retries": "num_alloc_retries"}


def _allocator_events(device: str) -> dict[str, int]:
    """Cumulative CUDA caching-allocator counters (none on CPU)."""
    import torch

    if not device.startswith("cuda"):
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: int(stats.get(key, 0)) for name, key in _ALLOCATOR_EVENTS.items()}


class AttentionClock:
    """The host ms of every `torch.nn.functional.scaled_dot_product_attention` call made while
    it is installed (transformers' attention functions look the function up at each call).
    Where PyTorch picks cuDNN, a call at a shape it has not met builds a graph first: that
    build is most of it. `with AttentionClock() as clock:` or `install()` / `remove()`."""

    def __init__(self) -> None:
        import torch

        self.calls: list[float] = []
        self._sdpa = torch.nn.functional.scaled_dot_product_attention

    def install(self) -> None:
        import torch

        sdpa = self._sdpa

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = sdpa(*args, **kwargs)
            self.calls.append((time.perf_counter() - start) * 1e3)
            return out

        torch.nn.functional.scaled_dot_product_attention = timed

    def remove(self) -> None:
        import torch

        torch.nn.functional.scaled_dot_product_attention = self._sdpa

    def __enter__(self) -> AttentionClock:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _StepClock:
    """Times every step of a `ContinuousBatchProcessor` by wrapping three of its methods on
    the instance (the manager's loop calls them through the instance), and the host time of
    the attention calls in each forward (wrapping `torch.nn.functional.
    scaled_dot_product_attention`, which transformers' attention functions look up at each
    call, until `restore`), and the garbage collector's pauses (`gc.callbacks`); every
    `PROBE_EVERY` steps it also times the host probe, after the step's end is taken."""

    def __init__(self, processor, steps: list[EngineStep]) -> None:
        from dooly_fx.hostinfo import host_probe_ms

        self.processor, self.steps, self.t0 = processor, steps, 0.0
        self._pending: tuple | None = None
        self._attention = AttentionClock()
        self._gc_ms, self._gc_start = 0.0, 0.0
        prepare, step, update = (processor.prepare_next_batch, processor._generation_step,
                                 processor.update_batch)

        def timed_prepare():
            start = time.perf_counter()
            self._gc_ms = 0.0
            ready = prepare()
            if ready:
                batch = processor.inputs_and_outputs.requests_in_batch
                new = [fs.query_length for fs in batch]
                cached = [fs.state.position_offset - fs.query_length for fs in batch]
                self._pending = (start, new, cached)
            return ready

        def timed_step(model):
            self._attention.calls.clear()
            forward = time.perf_counter()
            step(model)
            self._synced = (forward, time.perf_counter(), list(self._attention.calls))

        def timed_update():
            update()
            end = time.perf_counter()
            if self._pending is not None:
                start, new, cached = self._pending
                forward, synced, attention = self._synced
                t0 = self.t0
                self.steps.append(EngineStep(
                    start - t0, forward - t0, synced - t0, end - t0, new, cached,
                    sum(attention) if attention else None,
                    max(attention) if attention else None, gc_ms=self._gc_ms))
                self._pending = None
                if (len(self.steps) - 1) % PROBE_EVERY == 0:
                    self.steps[-1].host_probe_ms = host_probe_ms()

        processor.prepare_next_batch = timed_prepare
        processor._generation_step = timed_step
        processor.update_batch = timed_update
        self._attention.install()
        gc.callbacks.append(self._collection)

    def _collection(self, phase: str, info: dict) -> None:
        """`gc.callbacks` hook: add each collection's pause to the step under way."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc_ms += (time.perf_counter() - self._gc_start) * 1e3

    def restore(self) -> None:
        for name in ("prepare_next_batch", "_generation_step", "update_batch"):
            self.processor.__dict__.pop(name, None)
        self._attention.remove()
        if self._collection in gc.callbacks:
            gc.callbacks.remove(self._collection)


def _host_memory(device: str):
    """On CPU, transformers sizes the cache from psutil's free memory (0 without psutil):
    give it the free physical memory instead."""
    from dooly_fx.paged import cache_memory

    if device.startswith("cuda"):
        return contextlib.nullcontext()
    return cache_memory(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _warm(manager, rng: np.random.Generator, vocab: int, longest: int) -> None:
    """Serve a few requests (prefill and decode, two lengths) and wait for them."""
    ids = []
    for i in range(WARMUP_REQUESTS):
        prompt = rng.integers(0, vocab, max(1, longest // 8 if i % 2 else longest - 8)).tolist()
        ids.append(manager.add_request(prompt, request_id=f"warmup-{i}", max_new_tokens=8,
                                       eos_token_id=-1))
    left = set(ids)
    deadline = time.perf_counter() + 300
    while left and time.perf_counter() < deadline:
        result = manager.get_result(timeout=0.5)
        if result is not None:
            left.discard(result.request_id)
        _check_alive(manager)
    if left:
        raise UserError("the engine did not finish its warm-up requests in 300 s")


def _check_alive(manager) -> None:
    """UserError with the engine's own error if its generation thread died."""
    error = manager.background_thread_status.fatal_error
    if error is not None:
        raise UserError(f"the engine stopped: {error}")


def _feed(manager, requests: Sequence[Request], prompts: dict, t0: float,
          errors: list[BaseException]) -> None:
    """Submit each request at its arrival time."""
    try:
        for r in requests:
            wait = t0 + r.arrival_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            manager.add_request(prompts[r.id], request_id=str(r.id),
                                max_new_tokens=r.output_tokens, record_timestamps=True,
                                eos_token_id=-1)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def _ape(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    ok = np.isfinite(pred) & np.isfinite(meas) & (meas > 0)
    return np.abs(pred[ok] - meas[ok]) / meas[ok]


def _metric(measured: np.ndarray, simulated: np.ndarray) -> dict:
    """Per-request MAPE, and the error of p50 and p90 over the requests both finished."""
    ok = np.isfinite(measured) & np.isfinite(simulated)
    m, s = measured[ok], simulated[ok]
    if not m.size:
        return {"requests": 0, "mape": None, "median_ape": None, "p50_error": None,
                "p90_error": None, "measured": None, "simulated": None}
    from dooly_fx.simulate import latency_stats

    ape = _ape(s, m)
    mp, sp = latency_stats(m), latency_stats(s)
    return {"requests": int(m.size), "mape": float(ape.mean()),
            "median_ape": float(np.median(ape)),
            "p50_error": (sp["p50"] - mp["p50"]) / mp["p50"],
            "p90_error": (sp["p90"] - mp["p90"]) / mp["p90"],
            "measured": mp, "simulated": sp}


def compare(served: Served, step_time: Callable[[], Callable], config) -> tuple[dict, object]:
    """Simulate the requests as they reached the engine (same arrivals, lengths and engine
    settings) with a step-time function made by `step_time()`; compare per request, and per
    step on the engine's own batches (with a fresh one: step-time functions remember the
    shapes they have seen). Returns (report, SimResult)."""
    from dooly_fx.simulate import simulate

    reqs = served.workload()
    finished = [r for r in served.requests if r.first_s is not None and r.error is None]
    if not finished:
        raise UserError("no request finished in the measured run: nothing to compare")
    result = simulate(reqs, step_time(), config)
    order = {r.id: i for i, r in enumerate(result.requests)}
    sim_ttft, sim_tpot = result.ttft, result.tpot
    meas_ttft = np.array([r.ttft for r in served.requests])
    meas_tpot = np.array([r.tpot for r in served.requests])
    idx = [order[r.id] for r in served.requests]
    report = {
        "requests": len(served.requests), "finished": len(finished),
        "ttft": _metric(meas_ttft, sim_ttft[idx]),
        "tpot": _metric(meas_tpot, sim_tpot[idx]),
        "steps": step_report(served.steps, step_time()),
        "simulated_steps": int(len(result.steps["duration"])),
        "scheduler": lockstep(served, config),
    }
    report["per_request"] = [
        {"id": r.id, "prompt": r.prompt_tokens, "output": r.output_tokens,
         "arrival_s": r.submitted_s, "ttft": _num(r.ttft), "tpot": _num(r.tpot),
         "sim_ttft": _num(sim_ttft[i]), "sim_tpot": _num(sim_tpot[i])}
        for r, i in zip(served.requests, idx, strict=True)]
    return report, result


def lockstep(served: Served, config) -> dict:
    """The simulator's scheduler (`config`) against the engine's, on the engine's own clock:
    the requests as they reached the engine, simulated with step k lasting what the engine's
    step k lasted (its start to the next step's start, so that idle waits fall where the
    engine had them), and the batches compared step by step. A scheduler that decides as
    the engine does forms the engine's batches, one for one; the per-request error of
    `compare` is then all the step-time model's. Returns the steps of both, how many
    simulated batches are the engine's (the same (new, cached) per sequence), the first that
    is not (None: none; a run cut off by its time limit may be simulated further), and
    TTFT/TPOT MAPE of this simulation against the measurement
    (small, not 0: a step before an idle wait ends, here, when the next one starts)."""
    from dooly_fx.simulate import simulate

    steps = served.steps
    if not steps:
        return {"steps": 0}
    lasted = [b.start_s - a.start_s for a, b in zip(steps, steps[1:], strict=False)]
    lasted.append(steps[-1].end_s - steps[-1].start_s)
    formed: list[list[tuple[int, int]]] = []

    def step_time(batch) -> float:
        formed.append(sorted(batch))
        k = len(formed) - 1
        return lasted[k] if k < len(lasted) else float(np.median(lasted))

    result = simulate(served.workload(), step_time, config)
    same = [a == sorted(b.batch) for a, b in zip(formed, steps, strict=False)]
    order = {r.id: i for i, r in enumerate(result.requests)}
    idx = [order[r.id] for r in served.requests]
    return {"steps": len(steps), "simulated_steps": len(formed), "matched": int(sum(same)),
            "first_mismatch": next((k for k, ok in enumerate(same) if not ok),
                                   None if len(formed) == len(steps) or (
                                       served.timed_out and len(formed) > len(steps))
                                   else len(same)),
            **{f"{m}_mape": _metric(np.array([getattr(r, m) for r in served.requests]),
                                    getattr(result, m)[idx])["mape"]
               for m in ("ttft", "tpot")}}


def step_report(steps: Sequence[EngineStep], step_time) -> dict:
    """The step-time model on the engine's real batches: each step's measured duration
    (schedule to update) against `step_time(batch)`, and where the measured time went."""
    if not steps:
        return {"steps": 0}
    dur = np.array([s.end_s - s.start_s for s in steps])
    pred = np.array([step_time(s.batch) for s in steps])
    prepare = np.array([s.forward_s - s.start_s for s in steps])
    forward = np.array([s.synced_s - s.forward_s for s in steps])
    update = np.array([s.end_s - s.synced_s for s in steps])
    gaps = np.array([b.start_s - a.end_s for a, b in zip(steps, steps[1:], strict=False)]
                    or [0.0])
    ape = _ape(pred, dur)
    decode = np.array([all(n == 1 for n in s.new) for s in steps])
    attention = [s.attention_host_ms for s in steps if s.attention_host_ms is not None]
    collected = [s.gc_ms for s in steps if s.gc_ms is not None]
    return {
        "steps": len(steps), "mape": float(ape.mean()), "median_ape": float(np.median(ape)),
        "bias": float((pred.sum() - dur.sum()) / dur.sum()),
        "decode_only_mape": float(_ape(pred[decode], dur[decode]).mean()) if decode.any()
        else None,
        "measured_ms": {"mean": float(dur.mean() * 1e3), "prepare": float(prepare.mean() * 1e3),
                        "forward": float(forward.mean() * 1e3),
                        "update": float(update.mean() * 1e3),
                        "idle_gap": float(np.median(gaps) * 1e3),
                        "attention_host": float(np.mean(attention)) if attention else None,
                        "attention_host_median": float(np.median(attention)) if attention
                        else None,
                        "gc": float(np.mean(collected)) if collected else None,
                        "gc_max": float(np.max(collected)) if collected else None},
        "predicted_ms": {"mean": float(pred.mean() * 1e3)},
        "busy_s": float(dur.sum()),
        "by_kind": _by_kind(steps, dur, pred, decode),
    }


PREFILL_SPLIT = 1024
"""`step_report` groups the steps with a prefill chunk by whether their new tokens T reach
this."""


def _by_kind(steps: Sequence[EngineStep], dur: np.ndarray, pred: np.ndarray,
             decode: np.ndarray) -> list[dict]:
    """Per kind of step (decode only; with a prefill chunk, T below or from `PREFILL_SPLIT`):
    how many, measured and predicted mean ms, MAPE."""
    tokens = np.array([sum(s.new) for s in steps])
    kinds = {"decode only": decode,
             f"with prefill, T < {PREFILL_SPLIT}": ~decode & (tokens < PREFILL_SPLIT),
             f"with prefill, T >= {PREFILL_SPLIT}": ~decode & (tokens >= PREFILL_SPLIT)}
    rows = []
    for name, sel in kinds.items():
        if sel.any():
            rows.append({"kind": name, "steps": int(sel.sum()),
                         "measured_ms": float(dur[sel].mean() * 1e3),
                         "predicted_ms": float(pred[sel].mean() * 1e3),
                         "mape": float(_ape(pred[sel], dur[sel]).mean())})
    return rows


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)
