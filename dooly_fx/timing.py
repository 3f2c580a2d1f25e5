"""One timing function for every measurement, with `triton.testing.do_bench` semantics.

`measure(fn, device)` warms up for a time budget, then times at least `min_samples` calls:
* CUDA: the call is captured once in a CUDA graph and replayed, one pair of CUDA events per
  replay, the L2 cache flushed before each (a 256 MB buffer is zeroed). Replay runs the unit's
  kernels back to back, so the number is GPU time, not Python's issue time; units that cannot
  be captured (host syncs, data-dependent shapes) are timed on direct calls instead;
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

from dooly_fx.db import Timing
from dooly_fx.hostinfo import host_probe_ms

_L2_FLUSH_BYTES = 256 * 1024 * 1024


def measure(
    fn: Callable[[], object],
    device: str,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_samples: int = 10,
    max_samples: int = 1000,
    graphs: bool = True,
    host_calls: int = 20,
) -> Timing:
    """Median, mean, min, max and std of `fn()`'s run time in ms, plus its host issue time
    (the median of `host_calls` calls, `host_issue`)."""
    if device.startswith("cuda"):
        return _measure_cuda(fn, device, warmup_ms, rep_ms, min_samples, max_samples, graphs,
                             host_calls)
    return _measure_cpu(fn, warmup_ms, rep_ms, min_samples, max_samples)


def _summary(samples: list[float], host: tuple[float, float]) -> Timing:
    return Timing(
        median_ms=statistics.median(samples), mean_ms=statistics.fmean(samples),
        min_ms=min(samples), max_ms=max(samples),
        std_ms=statistics.pstdev(samples) if len(samples) > 1 else 0.0, n=len(samples),
        host_ms=host[0], host_probe_ms=host[1])


def _count(estimate_ms: float, budget_ms: float, low: int, high: int) -> int:
    return max(low, min(high, int(budget_ms / max(estimate_ms, 1e-6))))


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
                  host_calls) -> Timing:
    torch.cuda.synchronize(device)
    cache = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    fn()  # first call: lazy initialisation, autotuning
    torch.cuda.synchronize(device)
    host = host_issue(fn, device, calls=host_calls)
    run = (_graph_replay(fn, device) if graphs else None) or fn
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
    n = _count(estimate, rep_ms, min_samples, max_samples)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return _summary(samples, host)


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
