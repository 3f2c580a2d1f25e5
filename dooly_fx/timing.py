"""One timing function for every measurement, with `triton.testing.do_bench` semantics.

`measure(fn, device)` warms up for a time budget, then times at least `min_samples` calls:
* CUDA: the call is captured once in a CUDA graph and replayed, one pair of CUDA events per
  replay, the L2 cache flushed before each. Replay runs the unit's kernels back to back, so
  the number is GPU time, not Python's issue time; units that cannot be captured (host syncs,
  data-dependent shapes) are timed on direct calls instead. Two timers (`TIMERS`):
  - `do_bench`: as `triton.testing.do_bench`, the flush zeroes a 256 MB buffer
    and a sample is the time between the events. Zeroing leaves L2 full of dirty lines that
    the timed kernel writes back to HBM, and a replay between two events pays a fixed cost
    (the events and the graph launch, microseconds); no kernel inside a step pays either, so
    decode-sized units read high (+49% on a 4096×4096 decode GEMM against its kernel inside
    a step, `bench/results/l2_flush.txt`);
  - `stream` (the default): the flush reads the buffer (L2 is left holding clean lines), and
    each replay's sample is the event time less the replay overhead (`replay_overhead_ms`,
    measured once per device): a unit's number is the time its kernels take in an eager
    stream of kernels, each with its slot to the next (units timed on direct calls keep the
    event time);
* CPU: `time.perf_counter` around each call.
It also returns `host_ms`, the host cost of issuing one call eagerly, which a launch-bound
engine pays whether or not the GPU is busy; the predictor combines the two. Host costs move
with the host's speed of the moment, so `host_probe_ms` (`hostinfo.host_probe_ms`, run beside
each issue timed) says how fast the host was while `host_ms` was measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from dooly_fx.db import DEFAULT_TIMER, TIMERS, Timing
from dooly_fx.hostinfo import host_probe_ms

_L2_FLUSH_BYTES = 256 * 1024 * 1024
_SPACING_KERNELS = 64
"""One-element adds queued eagerly whose spacing `replay_overhead_ms` times."""
_MIN_SAMPLE_MS = 5e-4
"""A replay's sample, less the replay overhead, is never taken below this (0.5 µs): a unit
has at least one kernel, and the fits need positive latencies."""
_overheads: dict[str, float] = {}
SUSTAIN_IDLE_S = 0.2
"""The GPU idles this long before a unit's burst time is taken (`sustained`)."""
SUSTAIN_WARMUP_MS = 300.0
"""Back-to-back calls before a unit's sustained time is taken: under a compute-bound load the
board reaches its power limit and the SM clock settles lower within about this long
(`bench/results/clock_settle.json`, `trajectory`)."""
SUSTAIN_REP_MS = 100.0
SUSTAIN_MIN_MS = 0.05
"""A unit whose largest point takes less than this (ms) is not timed under sustained load:
its kernels are too short to be compute-bound for long."""


def measure(
    fn: Callable[[], object],
    device: str,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_samples: int = 10,
    max_samples: int = 1000,
    graphs: bool = True,
    host_calls: int = 20,
    timer: str = DEFAULT_TIMER,
) -> Timing:
    """Median, mean, min, max and std of `fn()`'s run time in ms, plus its host issue time
    (the median of `host_calls` calls, `host_issue`); `timer`: one of `TIMERS` (CUDA)."""
    if device.startswith("cuda"):
        return _measure_cuda(fn, device, warmup_ms, rep_ms, min_samples, max_samples, graphs,
                             host_calls, timer)
    return _measure_cpu(fn, warmup_ms, rep_ms, min_samples, max_samples)


def _summary(samples: list[float], host: tuple[float, float]) -> Timing:
    return Timing(
        median_ms=statistics.median(samples), mean_ms=statistics.fmean(samples),
        min_ms=min(samples), max_ms=max(samples),
        std_ms=statistics.pstdev(samples) if len(samples) > 1 else 0.0, n=len(samples),
        host_ms=host[0], host_probe_ms=host[1])


def _count(estimate_ms: float, budget_ms: float, low: int, high: int) -> int:
    return max(low, min(high, int(budget_ms / max(estimate_ms, 1e-6))))


def sustained(fn: Callable[[], object], device: str, budget_ms: tuple[float, float],
              graphs: bool = True, timer: str = DEFAULT_TIMER) -> tuple[float, float]:
    """(burst ms, sustained ms) of `fn` on a CUDA device: its median as the profiler times
    a point (`budget_ms` of warm-up and samples) after the GPU idled `SUSTAIN_IDLE_S`, then
    after `SUSTAIN_WARMUP_MS` of back-to-back calls. A long GPU-bound step keeps the GPU busy
    long enough for the power limit to lower its clock; a profiled point does not."""
    torch.cuda.synchronize(device)
    time.sleep(SUSTAIN_IDLE_S)
    burst = measure(fn, device, warmup_ms=budget_ms[0], rep_ms=budget_ms[1], graphs=graphs,
                    host_calls=1, timer=timer)
    held = measure(fn, device, warmup_ms=SUSTAIN_WARMUP_MS, rep_ms=SUSTAIN_REP_MS,
                   max_samples=100_000, graphs=graphs, host_calls=1, timer=timer)
    return burst.median_ms, held.median_ms


def _measure_cpu(fn, warmup_ms, rep_ms, min_samples, max_samples) -> Timing:
    start = time.perf_counter()
    calls = 0
    while calls < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        calls += 1
    estimate = (time.perf_counter() - start) * 1e3 / calls
    samples = []
    for _ in range(_count(estimate, rep_ms, min_samples, max_samples)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples, (statistics.median(samples), host_probe_ms(5)))


def _measure_cuda(fn, device, warmup_ms, rep_ms, min_samples, max_samples, graphs,
                  host_calls, timer) -> Timing:
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; one of {', '.join(TIMERS)}")
    torch.cuda.synchronize(device)
    flush = _l2_flush(device, zero=timer == "do_bench")
    fn()  # first call: lazy initialisation, autotuning
    torch.cuda.synchronize(device)
    host = host_issue(fn, device, calls=host_calls)
    replay = _graph_replay(fn, device) if graphs else None
    run = replay or fn
    # Estimate one call, then warm up for the budget.
    first = torch.cuda.Event(enable_timing=True)
    last = torch.cuda.Event(enable_timing=True)
    first.record()
    for _ in range(5):
        run()
    last.record()
    torch.cuda.synchronize(device)
    estimate = first.elapsed_time(last) / 5
    for _ in range(_count(estimate, warmup_ms, 1, max_samples)):
        run()
    torch.cuda.synchronize(device)
    samples = _timed(run, flush, _count(estimate, rep_ms, min_samples, max_samples), device)
    if replay is not None and timer == "stream":
        overhead = replay_overhead_ms(device)
        samples = [max(ms - overhead, _MIN_SAMPLE_MS) for ms in samples]
    return _summary(samples, host)


def _l2_flush(device, zero: bool = False) -> Callable[[], object]:
    """Evicts L2: zeroes a 256 MB buffer (leaving dirty lines), or reads it (clean lines)."""
    if zero:
        return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device).zero_
    return torch.ones(_L2_FLUSH_BYTES // 2, dtype=torch.float16, device=device).amax


def _timed(run, flush, n: int, device) -> list[float]:
    """ms of `n` calls of `run` between CUDA events, the L2 flushed before each."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def replay_overhead_ms(device, samples: int = 200) -> float:
    """What a graph replay timed between two CUDA events pays beyond its kernels' slots in
    an eager stream of kernels: the replay time of a graph of one one-element add (the L2
    flushed before each, read-only, as for units), less the spacing of such adds queued
    eagerly behind a GPU sleep, so that the GPU never waits for the host; medians of
    `samples` each. Measured once per device per process."""
    key = str(torch.device(device))
    if key not in _overheads:
        flush, x = _l2_flush(device), torch.zeros(1, device=device)
        one = _graph_replay(lambda: x.add_(1), device)
        _timed(one, flush, 20, device)  # warm-up
        t_one = statistics.median(_timed(one, flush, samples, device))
        spacing = statistics.median(_eager_spacing(lambda: x.add_(1), device)
                                    for _ in range(5))
        _overheads[key] = max(0.0, t_one - spacing)
    return _overheads[key]


def _eager_spacing(fn, device, calls: int = _SPACING_KERNELS) -> float:
    """ms per call of `calls` calls of a one-kernel `fn` issued behind a GPU sleep long
    enough to queue them all, timed between events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(2_000_000)  # ~1 ms: the host queues every call meanwhile
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls


def host_issue(fn, device, calls: int = 20, probes: int = 3) -> tuple[float, float]:
    """(host ms, probe ms): the median host time to issue one call while the GPU keeps up
    (eager dispatch cost), calls back to back as an engine makes them, and the median of
    host probes run just before and just after them. (A probe between calls would leave
    each call to run on caches the probe took over, which the engine's calls do not.)"""
    before = [host_probe_ms() for _ in range(probes)]
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    after = [host_probe_ms() for _ in range(probes)]
    return statistics.median(samples), statistics.median(before + after)


def _graph_replay(fn, device) -> Callable[[], object] | None:
    """`fn` captured in a CUDA graph (replayed per call), or None if it cannot be captured."""
    import warnings

    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The CUDA Graph is empty": a unit of no kernels
            with torch.cuda.graph(graph):
                fn()
    except Exception:  # data-dependent or host-syncing code cannot be captured
        torch.cuda.synchronize(device)
        return None
    return graph.replay
