"""Suite-wide test setup: run Triton kernels under the CPU interpreter.

`TRITON_INTERPRET` is read when a kernel module is imported (`@triton.jit` then builds an
interpreted or a compiled function), so it must be set before any test module imports one;
conftest.py is imported before every test module, which makes this the one safe place.
`setdefault` lets `TRITON_INTERPRET=0` on a GPU machine run the same tests compiled.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
