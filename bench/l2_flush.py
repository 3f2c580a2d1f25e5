"""Small memory-bound kernels: the timer's number against the same kernels inside a step
(GPU machine).

    python bench/l2_flush.py > bench/results/l2_flush.txt

For decode-sized GEMMs (m = 32, Llama-3.1-8B's projections) and an eager RMSNorm this prints,
in microseconds: `timing.measure`'s number with each timer (`do_bench`, the default, and
`stream`); a graph replay between two events after each of three flushes: zeroing a 256 MB
buffer (as `triton.testing.do_bench` does: L2 is left full of dirty lines, which the next
kernel writes back to HBM while it streams its own weights), reading it (clean lines; the
`stream` timer's flush) and none; and the kernels' own duration in a step-like sequence
(between GEMMs that stream other weights through L2, summed per call by the profiler). Then
the replay floor (a one-element add) after each flush, and the replay overhead the `stream`
timer subtracts (`timing.replay_overhead_ms`).
"""

from __future__ import annotations

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from dooly_fx.db import TIMERS
from dooly_fx.timing import _graph_replay, _l2_flush, _timed, measure, replay_overhead_ms

DEVICE, DTYPE, M = "cuda", torch.bfloat16, 32
SHAPES = {"q_proj 4096x4096": (4096, 4096), "gate_proj 14336x4096": (14336, 4096),
          "down_proj 4096x14336": (4096, 14336)}


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's ops."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def replay_us(fn, flush, n: int = 50) -> float:
    run = _graph_replay(fn, DEVICE)
    for _ in range(10):
        run()
    return statistics.median(_timed(run, flush, n, DEVICE)) * 1e3


def in_step_us(fn, calls: int = 30) -> float:
    """Kernel time per call of `fn` run between two GEMMs on other 128 MB weights (the
    profiler's device time of a host range around each call, as `validate.unit_fidelity`)."""
    from torch.autograd import DeviceType
    from torch.profiler import record_function

    others = [torch.randn(8192, 8192, dtype=DTYPE, device=DEVICE) for _ in range(2)]
    x = torch.randn(M, 8192, dtype=DTYPE, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            for w in others:
                x @ w
            with record_function("unit"):
                fn()
        torch.cuda.synchronize()
    (unit,) = [e for e in prof.key_averages()
               if e.key == "unit" and e.device_type == DeviceType.CPU]
    return unit.device_time_total / unit.count


def main() -> None:
    modes = {"zero flush": _l2_flush(DEVICE, zero=True), "read flush": _l2_flush(DEVICE),
             "no flush": lambda: None}
    fns = {}
    for name, (n, k) in SHAPES.items():
        x = torch.randn(M, k, dtype=DTYPE, device=DEVICE)
        w = torch.randn(n, k, dtype=DTYPE, device=DEVICE)
        fns[f"gemm m={M} {name}"] = lambda x=x, w=w: x @ w.t()
    x = torch.randn(M, 4096, dtype=DTYPE, device=DEVICE)
    fns[f"rmsnorm {M}x4096 (eager, 5 kernels)"] = lambda: rmsnorm(x, x[0])
    one = torch.zeros(1, device=DEVICE)
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__}")
    print(f"{'unit':38s} " + " ".join(f"{t:>8s}" for t in TIMERS) + " "
          + " ".join(f"{m:>10s}" for m in modes) + f" {'in step':>8s}   (us)")
    for name, fn in fns.items():
        timed = [measure(fn, DEVICE, warmup_ms=5, rep_ms=20, timer=t).median_ms * 1e3
                 for t in TIMERS]
        cols = [replay_us(fn, flush) for flush in modes.values()]
        print(f"{name:38s} " + " ".join(f"{t:8.1f}" for t in timed) + " "
              + " ".join(f"{c:10.1f}" for c in cols) + f" {in_step_us(fn):8.1f}")
    floor = [replay_us(lambda: one.add_(1), flush) for flush in modes.values()]
    print(f"{'replay floor (1-element add)':38s} {'':17s} "
          + " ".join(f"{c:10.1f}" for c in floor))
    print(f"replay overhead the stream timer subtracts: {replay_overhead_ms(DEVICE) * 1e3:.2f} us")


if __name__ == "__main__":
    main()
