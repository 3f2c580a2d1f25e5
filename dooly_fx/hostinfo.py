"""What machine this is, for result files and environment fingerprints (no heavy imports)."""

from __future__ import annotations

import platform


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


def machine(device: str) -> dict:
    """What a measurement ran on: the device's name, torch and transformers versions."""
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__}
    info["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name()
    return info
