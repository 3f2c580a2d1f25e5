"""Serving workloads: requests with arrival times and token counts, from a trace or synthesised.

    reqs = read_trace("splitwise_conv.csv", num_requests=300)
    reqs = synthetic(1000, qps=4.0, prompt=LengthDist.uniform(128, 1024),
                     output=LengthDist.fixed(128), seed=0)

A request's first output token comes out of the step that finishes its prefill, so every
request asks for at least one output token.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dooly_fx.errors import UserError

TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True, slots=True)
class Request:
    """One serving request. Ids are positions in arrival order, starting at 0."""

    id: int
    arrival_s: float
    """Arrival time in seconds from the start of the workload."""
    prompt_tokens: int
    """Prompt length (>= 1)."""
    output_tokens: int
    """Tokens to generate (>= 1); generation never stops early."""


def read_trace(path: str | Path, num_requests: int | None = None) -> list[Request]:
    """Requests of a CSV trace (`arrived_at` in seconds, `num_prefill_tokens`,
    `num_decode_tokens`; other columns ignored), sorted by arrival, the first `num_requests`.

    Raises UserError naming the file and line for a missing column, a value that is not a
    number, a negative time, or a token count below 1; and for a trace with no requests.
    """
    path = Path(path)
    if num_requests is not None and num_requests < 1:
        raise UserError(f"number of requests must be positive, got {num_requests}")
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: cannot read trace: {err.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a CSV trace (not UTF-8 text)") from None
    rows: list[tuple[float, int, int]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise UserError(f"{path}: empty trace (no header, no requests)")
    names = [h.strip() for h in header]
    missing = [c for c in TRACE_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{path}:1: missing column(s) {', '.join(missing)} "
                        f"(need {', '.join(TRACE_COLUMNS)})")
    cols = [names.index(c) for c in TRACE_COLUMNS]
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(cols):
            raise UserError(f"{path}:{line}: expected {len(names)} fields, got {len(row)}")
        t, prompt, output = (row[c].strip() for c in cols)
        arrival = _number(path, line, "arrived_at", t)
        if arrival < 0:
            raise UserError(f"{path}:{line}: arrived_at is negative ({t})")
        rows.append((arrival, _count(path, line, "num_prefill_tokens", prompt),
                     _count(path, line, "num_decode_tokens", output)))
    if not rows:
        raise UserError(f"{path}: trace has a header but no requests")
    rows.sort(key=lambda r: r[0])  # stable: equal times keep file order
    rows = rows[:num_requests]
    return [Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)]


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}:{line}: {column} is not a number ({text!r})") from None
    if not math.isfinite(value):
        raise UserError(f"{path}:{line}: {column} is not finite ({text!r})")
    return value


def _count(path: Path, line: int, column: str, text: str) -> int:
    value = _number(path, line, column, text)
    if value != int(value):
        raise UserError(f"{path}:{line}: {column} is not a whole number ({text!r})")
    if value < 1:
        raise UserError(f"{path}:{line}: {column} must be at least 1, got {text}")
    return int(value)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-length distribution: `fixed(n)`, `uniform(lo, hi)` (inclusive) or
    `sampled(values)` (drawn with replacement, e.g. a trace's prompt lengths)."""

    kind: str
    """"fixed", "uniform" or "sampled"."""
    values: tuple[int, ...]
    """(n,) for fixed, (lo, hi) for uniform, the population for sampled."""

    @staticmethod
    def fixed(n: int) -> LengthDist:
        return LengthDist("fixed", (_positive(n),))

    @staticmethod
    def uniform(lo: int, hi: int) -> LengthDist:
        if _positive(lo) > _positive(hi):
            raise UserError(f"uniform length range is empty: {lo} > {hi}")
        return LengthDist("uniform", (lo, hi))

    @staticmethod
    def sampled(values: Sequence[int]) -> LengthDist:
        if len(values) == 0:
            raise UserError("cannot sample lengths from an empty list")
        return LengthDist("sampled", tuple(_positive(int(v)) for v in values))

    @staticmethod
    def parse(spec: str) -> LengthDist:
        """`"512"`, `"uniform:128:1024"`, or `"trace:PATH:prompt"` / `"trace:PATH:output"`."""
        kind, _, rest = spec.partition(":")
        try:
            if not rest:
                return LengthDist.fixed(int(kind))
            if kind == "uniform":
                lo, hi = rest.split(":")
                return LengthDist.uniform(int(lo), int(hi))
        except ValueError:
            raise UserError(f"bad length {spec!r}: expected N or uniform:LO:HI") from None
        if kind == "trace":
            path, _, field = rest.rpartition(":")
            if field not in ("prompt", "output") or not path:
                raise UserError(f"bad length {spec!r}: expected trace:PATH:prompt|output")
            reqs = read_trace(path)
            return LengthDist.sampled([r.prompt_tokens if field == "prompt" else r.output_tokens
                                       for r in reqs])
        raise UserError(f"bad length {spec!r}: expected N, uniform:LO:HI or trace:PATH:FIELD")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` lengths, int64, from `rng`."""
        if self.kind == "fixed":
            return np.full(n, self.values[0], dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.values[0], self.values[1], size=n, endpoint=True)
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)


def _positive(n: int) -> int:
    if n < 1:
        raise UserError(f"token lengths must be at least 1, got {n}")
    return n


def synthetic(num_requests: int, qps: float, arrival: str = "poisson", cv: float = 1.0,
              prompt: LengthDist | None = None, output: LengthDist | None = None,
              seed: int = 0) -> list[Request]:
    """`num_requests` requests at mean rate `qps` (math.inf: all at time 0), the first at 0.

    Inter-arrival gaps are exponential ("poisson") or gamma with coefficient of variation `cv`
    ("gamma": shape 1/cv^2, mean 1/qps; cv 1 is Poisson, cv > 1 burstier). Lengths default
    to 512 prompt and 128 output tokens. The same arguments always give the same requests.
    """
    if num_requests < 1:
        raise UserError(f"number of requests must be positive, got {num_requests}")
    if not qps > 0:
        raise UserError(f"qps must be positive, got {qps}")
    if arrival not in ARRIVALS:
        raise UserError(f"unknown arrival process {arrival!r} (choose from {', '.join(ARRIVALS)})")
    if not cv > 0:
        raise UserError(f"cv must be positive, got {cv}")
    rng = np.random.default_rng(seed)
    if math.isinf(qps):
        gaps = np.zeros(num_requests - 1)
    elif arrival == "poisson":
        gaps = rng.exponential(1.0 / qps, size=num_requests - 1)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (qps * shape), size=num_requests - 1)
    times = np.concatenate(([0.0], np.cumsum(gaps)))
    prompts = (prompt or LengthDist.fixed(512)).sample(rng, num_requests)
    outputs = (output or LengthDist.fixed(128)).sample(rng, num_requests)
    return [Request(i, float(t), int(p), int(o))
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))]
