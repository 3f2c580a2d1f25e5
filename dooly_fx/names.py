"""Request-variable names, torch-free (the simulator and `predict` import only these).

`symbols.py` builds the SymPy/ShapeEnv machinery on top of them for capture.
"""

from __future__ import annotations

REQUEST_SYMBOLS: dict[str, str] = {
    "B": "sequences in the batch (padded layout)",
    "S": "new tokens per sequence (padded layout)",
    "P": "cached tokens per sequence before the step (padded layout)",
    "T": "new tokens over all sequences (flattened layout)",
    "N": "sequences in the step (flattened layout)",
}

TOKEN_VAR = "m"
"""The one variable a token-wise signature's request dims collapse into (a token count)."""

SHAPE_BUILD_SUFFIX = ":shape_build"
"""Role suffix of a paged attention's per-shape setup unit (charged to steps with a new shape)."""
ENGINE_PREPARE_ROLE = "engine:prepare_batch"
"""Role of the paged engine's per-step batch preparation unit (host work before the forward)."""
FORWARD_HOST_ROLE = "engine:forward"
"""Role of the paged engine's whole forward, timed for its host issue (`forward_host`)."""
HOST_KINDS = ("shape_build", "engine_prepare", "forward_host")
"""Unit kinds that are host work (their timings are host time), not kernels."""
