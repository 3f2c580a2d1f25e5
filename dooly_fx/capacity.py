"""Serving capacity: one workload simulated at several request rates, checked against SLOs.

    rows = load_sweep([1, 2, 4, 8], lambda qps: synthetic(500, qps, ...),
                      lambda: FlatStepTime(loaded), config, [Slo.parse("ttft:p90:0.5")])
    max_rate(rows)   # the highest rate at which it and every lower one meet every SLO

The requests of every rate come from one seed, so a sweep changes only how fast the same
requests arrive (`workload.synthetic` draws the same gaps and lengths, scaled by the rate).
A rate meets the SLOs when every request completed (none rejected as too long for the KV
cache) and each SLO's statistic is at most its bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dooly_fx.errors import UserError, positive_number

METRICS = ("ttft", "tpot", "e2e", "queueing")
STATS = ("p50", "p90", "p99", "mean", "max")


@dataclass(frozen=True)
class Slo:
    """A latency objective: `stat` of `metric` over the requests at most `seconds`."""

    metric: str
    """ttft, tpot, e2e or queueing (`SimResult` per-request times)."""
    stat: str
    """p50, p90, p99, mean or max over the completed requests."""
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`METRIC:STAT:SECONDS`, e.g. `ttft:p90:0.5` (TTFT p90 at most 500 ms)."""
        parts = text.split(":")
        if len(parts) != 3:
            raise UserError(f"--slo {text!r}: expected METRIC:STAT:SECONDS, e.g. ttft:p90:0.5")
        metric, stat, bound = parts
        if metric not in METRICS:
            raise UserError(f"--slo {text!r}: metric must be one of {', '.join(METRICS)}")
        if stat not in STATS:
            raise UserError(f"--slo {text!r}: statistic must be one of {', '.join(STATS)}")
        return cls(metric, stat, positive_number(bound, f"--slo {text!r}", "a positive time in s"))

    @property
    def label(self) -> str:
        return f"{self.metric} {self.stat} <= {self.seconds * 1e3:g} ms"

    def met(self, summary: dict) -> bool:
        """Whether a simulation's summary (`SimResult.summary`) meets it; no value (no request
        completed) does not."""
        value = summary[self.metric][self.stat]
        return value is not None and value <= self.seconds


def check(summary: dict, slos: Sequence[Slo]) -> dict:
    """{"met": {label: bool}, "all": every SLO met and every request completed}."""
    met = {s.label: s.met(summary) for s in slos}
    return {"met": met, "all": all(met.values()) and summary["rejected"] == 0}


def load_sweep(rates: Sequence[float], requests: Callable[[float], list],
               step_time: Callable[[], Callable], config, slos: Sequence[Slo] = (),
               on_done: Callable[[float], None] | None = None) -> list[dict]:
    """The summary of one simulation per rate, ascending: `requests(qps)` simulated with a
    fresh `step_time()` (step-time functions remember the shapes they have seen) under
    `config`, each row with its `qps` and SLO check."""
    from dooly_fx.simulate import simulate

    rows = []
    for qps in sorted(rates):
        summary = simulate(requests(qps), step_time(), config).summary()
        rows.append({"qps": qps, **summary, "slo": check(summary, slos)})
        if on_done:
            on_done(qps)
    return rows


def max_rate(rows: Sequence[dict]) -> float | None:
    """The highest rate of a sweep (rows ascending by `qps`) at which it and every lower rate
    meet the SLOs; None when the lowest does not."""
    best = None
    for row in rows:
        if not row["slo"]["all"]:
            break
        best = row["qps"]
    return best
