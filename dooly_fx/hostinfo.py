"""What machine this is, for result files and environment fingerprints (no heavy imports)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def require_device(device: str) -> None:
    """A UserError where `device` is CUDA and this machine has none (before any work)."""
    import torch

    from dooly_fx.errors import UserError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device on this machine")


def machine(device: str) -> dict:
    """What a measurement ran on: the device's name, torch and transformers versions."""
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    info["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return info


PROBE_LOOP = 10_000
"""Iterations of the host probe's loop (about half a millisecond on a server core)."""


def host_probe_ms(runs: int = 1) -> float:
    """How fast this host runs the interpreter right now: the median time, in ms, of `runs`
    runs of a fixed pure-Python loop. A step's host side (Python, dispatch, launches) takes
    longer when the CPU is slower, by less than the probe does (`predict.host_elasticity`);
    a shared or throttled CPU changes this from second to second (docs/predict.md, "Host
    speed"), so it is measured beside what it calibrates."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        total = 0
        for i in range(PROBE_LOOP):
            total += i * i
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run_host_probe_ms(probes: Sequence[float]) -> float | None:
    """The host speed of a stretch of work from probes sampled through it (None: no probe):
    their mean, each clipped at twice their median. The host switches between speeds from
    one second to the next, and time adds up, so the mean weighs each speed by how long the
    work ran at it (a median would keep only the majority speed); a probe caught in a stall
    (a GC pause, another thread holding the GIL) is clipped, since it says nothing of speed."""
    if not probes:
        return None
    cap = 2 * statistics.median(probes)
    return statistics.fmean(min(p, cap) for p in probes)


DEVICE_SMS = {"H100 80GB HBM3": 132, "H100 SXM": 132, "H100 PCIe": 114, "H100 NVL": 132,
              "H200": 132, "A100": 108, "L40S": 142, "L40": 142, "L4": 58}
"""Multiprocessors of GPUs by (part of) their name, first match in this order, for
environments recorded without their own count (`device_sms`)."""


def device_sms(info: dict) -> int | None:
    """The multiprocessor count of an environment: as recorded (`sms`), else by its device
    name (`DEVICE_SMS`); None for a CPU or an unknown GPU (no wave rounding then)."""
    if info.get("device_type") != "cuda":
        return None
    if info.get("sms"):
        return int(info["sms"])
    name = str(info.get("device", ""))
    return next((n for part, n in DEVICE_SMS.items() if part in name), None)
