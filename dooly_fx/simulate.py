"""Discrete-event simulation of one LLM serving engine (one GPU) over a workload.

    from dooly_fx.simulate import preset, simulate
    from dooly_fx.workload import read_trace

    step_time = lambda batch: 1e-3 + 1e-5 * sum(q for q, _ in batch)  # seconds per step
    result = simulate(read_trace("splitwise_conv.csv", 300), step_time, preset("vllm"))
    result.summary()                       # JSON-ready percentiles, throughput, steps
    result.write_chrome_trace("run.json")  # open in ui.perfetto.dev

The simulator never measures anything: the caller's `step_time(batch)` returns the seconds of
one engine step whose batch lists (new_tokens, cached_tokens) per sequence. The event loop
(`run_events`) pops events in time order and pushes the events each handler returns; the
engine starts a step whenever it is idle and the scheduler has work.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dooly_fx.schedulers import (
    POLICIES,
    PRESETS,
    SchedulerConfig,
    Seq,
    make_scheduler,
    num_blocks_for,
    preset,
)
from dooly_fx.workload import Request

__all__ = ["POLICIES", "PRESETS", "SchedulerConfig", "SimResult", "StepTime", "num_blocks_for",
           "preset", "run_events", "simulate"]

StepTime = Callable[[Sequence[tuple[int, int]]], float]
"""Seconds of one engine step; its argument lists (new_tokens, cached_tokens) per sequence."""

Event = tuple[float, int, object]
"""(time in seconds, kind, payload). At equal times lower kinds go first."""

ARRIVAL, STEP_END, WAKE = 0, 1, 2


def run_events(initial: Iterable[Event],
               handlers: Sequence[Callable[[float, object], Iterable[Event]]]) -> int:
    """Handle events in (time, kind, insertion) order until none are left; `handlers[kind]
    (time, payload)` returns the events the event causes. Returns the number handled."""
    order = itertools.count()
    heap = [(t, kind, next(order), payload) for t, kind, payload in initial]
    heapq.heapify(heap)
    handled = 0
    while heap:
        t, kind, _, payload = heapq.heappop(heap)
        for ev_t, ev_kind, ev_payload in handlers[kind](t, payload):
            heapq.heappush(heap, (ev_t, ev_kind, next(order), ev_payload))
        handled += 1
    return handled


def simulate(requests: Sequence[Request], step_time: StepTime,
             config: SchedulerConfig | None = None) -> SimResult:
    """Serve `requests` (any order; simulated by arrival) on one engine scheduled by `config`
    (default: the "transformers" preset) with steps lasting `step_time(batch)` seconds.

    A request whose prompt + output exceeds the KV cache (or, without chunked prefill, the
    token budget) is rejected at arrival; if the engine has work but can schedule nothing
    even after evicting, the blocking request is dropped and counted as rejected too. Every
    request either finishes or is rejected, so the simulation always ends.
    """
    config = config or PRESETS["transformers"]
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    engine = _Engine(reqs, step_time, config)
    if reqs:
        run_events([(reqs[0].arrival_s, ARRIVAL, 0)],
                   [engine.on_arrival, engine.on_step_end, engine.on_wake])
    return engine.result()


class _Engine:
    """One GPU: a scheduler, the step being run, and what every step looked like."""

    def __init__(self, requests: list[Request], step_time: StepTime,
                 cfg: SchedulerConfig) -> None:
        self.requests = requests
        self.step_time = step_time
        self.cfg = cfg
        self.sched = make_scheduler(cfg)
        self.seqs: list[Seq | None] = [None] * len(requests)
        self.busy = False
        self.wake_pending = False
        self.dropped = 0
        limit = cfg.request_tokens if cfg.chunked_prefill else min(cfg.request_tokens,
                                                                   cfg.max_batch_tokens)
        self.max_len = limit
        total = sum(r.prompt_tokens + r.output_tokens for r in requests)
        self.max_steps = 64 * total + 1000  # every step computes >= 1 token: a livelock guard
        # One entry per step.
        self.start: list[float] = []
        self.dur: list[float] = []
        self.tokens: list[int] = []
        self.nseqs: list[int] = []
        self.decodes: list[int] = []
        self.padding: list[int] = []
        self.kv_blocks: list[int] = []

    def on_arrival(self, now: float, i: object) -> list[Event]:
        assert isinstance(i, int)
        req = self.requests[i]
        out: list[Event] = []
        if i + 1 < len(self.requests):
            out.append((self.requests[i + 1].arrival_s, ARRIVAL, i + 1))
        if req.prompt_tokens + req.output_tokens <= self.max_len:
            seq = Seq(i, req.prompt_tokens, req.output_tokens)
            self.seqs[i] = seq
            self.sched.add(seq)
            if not self.busy and not self.wake_pending:
                # After the other arrivals at this instant: they join the same first step.
                self.wake_pending = True
                out.append((now, WAKE, None))
        return out

    def on_wake(self, now: float, _: object) -> list[Event]:
        self.wake_pending = False
        return [] if self.busy else self._start(now)

    def on_step_end(self, now: float, batch: object) -> list[Event]:
        assert isinstance(batch, list)
        self.busy = False
        release = self.sched.release
        for s in batch:
            c = s.computed + s.chunk
            s.computed = c
            if c == s.tokens:  # the step emits this sequence's next token
                g = s.generated + 1
                s.generated = g
                s.tokens = c + 1
                if g == 1:
                    s.first = now
                if g == s.output:
                    s.finish = now
                    release(s)
        return self._start(now)

    def _start(self, now: float) -> list[Event]:
        sched = self.sched
        batch = sched.schedule(now)
        if not batch and sched.has_work():
            batch = sched.schedule(now)  # the first call may only have preempted
            while not batch and sched.has_work():
                sched.drop_blocked()  # can never run: counted as rejected
                self.dropped += 1
                batch = sched.schedule(now)
        if not batch:
            return []
        if len(self.start) >= self.max_steps:
            raise RuntimeError(f"simulation made no progress in {self.max_steps} steps")
        pairs = [(s.chunk, s.computed) for s in batch]
        tokens = sum([s.chunk for s in batch])
        pad = 0
        if self.cfg.cuda_graph_padding:
            extra = sched.padding(tokens, len(batch))
            if extra:
                pairs.extend(extra)
                pad = sum(q for q, _ in extra)
        dur = self.step_time(pairs)
        if not dur >= 0:
            raise ValueError(f"step_time returned {dur!r} for a batch of {len(batch)} "
                             f"sequences; it must be a non-negative number of seconds")
        self.start.append(now)
        self.dur.append(dur)
        self.tokens.append(tokens)
        self.nseqs.append(len(batch))
        self.decodes.append(sum([1 for s in batch if s.generated and s.tokens - s.computed == 1]))
        self.padding.append(pad)
        self.kv_blocks.append(self.cfg.num_blocks - sched.free_blocks)
        self.busy = True
        return [(now + dur, STEP_END, batch)]

    def result(self) -> SimResult:
        n = len(self.requests)
        times = np.full((4, n), np.nan)
        preemptions = np.zeros(n, dtype=np.int64)
        for i, s in enumerate(self.seqs):
            if s is not None and s.finish >= 0:
                times[:, i] = (self.requests[i].arrival_s, s.started, s.first, s.finish)
                preemptions[i] = s.preemptions
            elif s is not None:
                preemptions[i] = s.preemptions
        steps = {k: np.asarray(v) for k, v in (
            ("start", self.start), ("duration", self.dur), ("tokens", self.tokens),
            ("seqs", self.nseqs), ("decodes", self.decodes), ("padding", self.padding),
            ("kv_blocks", self.kv_blocks))}
        return SimResult(self.requests, self.cfg, times[1], times[2], times[3], preemptions,
                         self.dropped, steps)


def latency_stats(x: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/mean/max of the finite values, None when there are none."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return dict.fromkeys(("p50", "p90", "p99", "mean", "max"))
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(x.mean()),
            "max": float(x.max())}


@dataclass
class SimResult:
    """Per-request times (seconds, NaN for rejected requests) and per-step records."""

    requests: list[Request]
    """The simulated requests, sorted by arrival; arrays below are indexed like it."""
    config: SchedulerConfig
    started: np.ndarray
    """First time each request was scheduled."""
    first_token: np.ndarray
    """End of the step that finished each request's prefill."""
    finish: np.ndarray
    """End of the step that produced each request's last token."""
    preemptions: np.ndarray
    """Times each request was preempted (its KV dropped and recomputed)."""
    dropped: int
    """Requests dropped at run time because the engine could never schedule them."""
    steps: dict[str, np.ndarray]
    """Per step: start, duration (s), tokens and seqs (real, without padding), decodes,
    padding (pseudo-tokens), kv_blocks (blocks in use while it ran)."""

    @property
    def arrival(self) -> np.ndarray:
        return np.array([r.arrival_s for r in self.requests], dtype=float)

    @property
    def rejected(self) -> np.ndarray:
        """True for requests that never finished (too long for the cache, or dropped)."""
        return np.isnan(self.finish)

    @property
    def ttft(self) -> np.ndarray:
        """Time to first token: arrival to the end of the step that finished the prefill."""
        return self.first_token - self.arrival

    @property
    def tpot(self) -> np.ndarray:
        """Mean time between output tokens after the first, (finish - first) / (outputs - 1);
        NaN for one-token requests."""
        out = np.array([r.output_tokens for r in self.requests], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(out > 1, (self.finish - self.first_token) / (out - 1), np.nan)

    @property
    def e2e(self) -> np.ndarray:
        """Arrival to last token."""
        return self.finish - self.arrival

    @property
    def queueing(self) -> np.ndarray:
        """Arrival to first scheduled."""
        return self.started - self.arrival

    def kv_usage(self) -> tuple[np.ndarray, np.ndarray]:
        """(step start times, KV blocks in use during that step)."""
        return self.steps["start"], self.steps["kv_blocks"]

    def summary(self) -> dict:
        """JSON-ready summary; all times in seconds."""
        done = ~self.rejected
        n_done = int(done.sum())
        out_tokens = sum(r.output_tokens for r, ok in zip(self.requests, done, strict=True) if ok)
        span = float(np.nanmax(self.finish) - self.arrival.min()) if n_done else 0.0
        st = self.steps
        dur = st["duration"]
        busy = float(dur.sum())
        return {
            "policy": self.config.policy,
            "config": asdict(self.config),
            "num_requests": len(self.requests),
            "completed": n_done,
            "rejected": len(self.requests) - n_done,
            "dropped": self.dropped,
            "preemptions": int(self.preemptions.sum()),
            "preempted_requests": int((self.preemptions > 0).sum()),
            "ttft": latency_stats(self.ttft),
            "tpot": latency_stats(self.tpot),
            "e2e": latency_stats(self.e2e),
            "queueing": latency_stats(self.queueing),
            "throughput": {
                "duration_s": span,
                "requests_per_s": n_done / span if span > 0 else None,
                "output_tokens_per_s": out_tokens / span if span > 0 else None,
            },
            "steps": len(dur),
            "busy_s": busy,
            "batch": {
                "mean_tokens": float(st["tokens"].mean()) if len(dur) else None,
                "mean_seqs": float(st["seqs"].mean()) if len(dur) else None,
                "max_tokens": int(st["tokens"].max()) if len(dur) else None,
                "max_seqs": int(st["seqs"].max()) if len(dur) else None,
                "padding_tokens": int(st["padding"].sum()),
            },
            "kv_blocks": {
                "num_blocks": self.config.num_blocks,
                "peak": int(st["kv_blocks"].max()) if len(dur) else 0,
                "mean": float(np.average(st["kv_blocks"], weights=dur)) if busy > 0 else None,
            },
        }

    def write_chrome_trace(self, path: str | Path, requests: bool = True) -> None:
        """Chrome/Perfetto JSON: one complete event per step (args: tokens, seqs, prefills,
        decodes, padding, kv_blocks), a KV-blocks counter, and with `requests` each
        request's queued / prefill / decode phases as async slices."""
        us = 1e6
        st = self.steps
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "engine"}},
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "requests"}},
        ]
        for t, d, tok, seqs, dec, pad, kv in zip(
                st["start"].tolist(), st["duration"].tolist(), st["tokens"].tolist(),
                st["seqs"].tolist(), st["decodes"].tolist(), st["padding"].tolist(),
                st["kv_blocks"].tolist(), strict=True):
            name = "decode" if dec == seqs else ("prefill" if dec == 0 else "mixed")
            events.append({"name": name, "cat": "step", "ph": "X", "pid": 0, "tid": 0,
                           "ts": t * us, "dur": d * us,
                           "args": {"tokens": tok, "seqs": seqs, "prefills": seqs - dec,
                                    "decodes": dec, "padding": pad, "kv_blocks": kv}})
            events.append({"name": "kv_blocks", "ph": "C", "pid": 0, "ts": t * us,
                           "args": {"used": kv}})
        if requests:
            for i, r in enumerate(self.requests):
                if math.isnan(self.finish[i]):
                    continue
                marks = (r.arrival_s, self.started[i], self.first_token[i], self.finish[i])
                for name, a, b in zip(("queued", "prefill", "decode"), marks, marks[1:],
                                      strict=False):
                    common = {"name": name, "cat": "request", "id": r.id, "pid": 1}
                    events.append({**common, "ph": "b", "ts": a * us,
                                   "args": {"prompt": r.prompt_tokens,
                                            "output": r.output_tokens}})
                    events.append({**common, "ph": "e", "ts": b * us})
        with Path(path).open("w") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)
