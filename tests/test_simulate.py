"""The serving simulator and workloads: exact step-by-step batches on tiny cases."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from dooly_fx.errors import UserError
from dooly_fx.simulate import SchedulerConfig, preset, run_events, simulate
from dooly_fx.workload import LengthDist, Request, read_trace, synthetic

BOTH = ["transformers", "vllm"]


class Recorder:
    """A constant step time that remembers every batch it was asked about."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds
        self.batches: list[list[tuple[int, int]]] = []

    def __call__(self, batch):
        self.batches.append(list(batch))
        return self.seconds


def cfg(name: str, **kw) -> SchedulerConfig:
    return preset(name, cuda_graph_padding=False, **kw)


@pytest.mark.parametrize("name", BOTH)
def test_single_request_exact_times(name):
    step = Recorder(0.25)
    res = simulate([Request(0, 1.0, 10, 5)], step, cfg(name))
    assert step.batches == [[(10, 0)], [(1, 10)], [(1, 11)], [(1, 12)], [(1, 13)]]
    assert res.ttft[0] == 0.25 and res.tpot[0] == 0.25 and res.e2e[0] == 1.25
    assert res.queueing[0] == 0.0 and res.finish[0] == 2.25
    s = res.summary()
    assert s["steps"] == 5 and s["completed"] == 1 and s["rejected"] == 0
    assert s["throughput"]["output_tokens_per_s"] == 5 / 1.25


@pytest.mark.parametrize("name", BOTH)
def test_chunked_prefill_splits_prompt_by_budget(name):
    step = Recorder()
    res = simulate([Request(0, 0.0, 10, 2)], step, cfg(name, max_batch_tokens=4, block_size=4))
    assert step.batches == [[(4, 0)], [(4, 4)], [(2, 8)], [(1, 10)]]
    assert res.ttft[0] == 3 * 0.25  # the first token comes out of the third prefill chunk
    assert res.steps["decodes"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("name", BOTH)
def test_simultaneous_arrivals_share_prefill_and_decode_steps(name):
    step = Recorder()
    res = simulate([Request(0, 0.0, 5, 3), Request(1, 0.0, 7, 3)], step, cfg(name))
    assert step.batches == [[(5, 0), (7, 0)], [(1, 5), (1, 7)], [(1, 6), (1, 8)]]
    assert res.ttft.tolist() == [0.25, 0.25] and res.e2e.tolist() == [0.75, 0.75]


@pytest.mark.parametrize("name", BOTH)
def test_late_arrival_joins_next_step(name):
    step = Recorder()
    simulate([Request(0, 0.0, 5, 3), Request(1, 0.1, 4, 2)], step, cfg(name))
    # transformers FIFO and vLLM both run decodes before the newcomer's prefill.
    assert step.batches == [[(5, 0)], [(1, 5), (4, 0)], [(1, 6), (1, 4)]]


def test_fifo_and_prefill_first_order_differ():
    reqs = [Request(0, 0.0, 2, 3), Request(1, 0.0, 10, 2)]
    fifo, pf = Recorder(), Recorder()
    simulate(reqs, fifo, cfg("transformers", max_batch_tokens=4, block_size=4))
    simulate(reqs, pf, cfg("transformers-prefill-first", max_batch_tokens=4, block_size=4))
    assert fifo.batches[:2] == [[(2, 0), (2, 0)], [(1, 2), (3, 2)]]  # decode first
    assert pf.batches[:2] == [[(2, 0), (2, 0)], [(4, 2)]]  # split prefill takes the budget


def test_transformers_allocates_blocks_with_its_own_formula():
    # scheduler.py `_allocate_blocks_if_needed`: (n - occupancy + 1) // block_size + 1 blocks,
    # so a prompt of exactly one block takes two; vLLM takes ceil(n / block_size).
    hf = simulate([Request(0, 0.0, 16, 1)], Recorder(), cfg("transformers", block_size=16))
    vllm = simulate([Request(0, 0.0, 16, 1)], Recorder(), cfg("vllm", block_size=16))
    assert hf.steps["kv_blocks"].tolist() == [2] and vllm.steps["kv_blocks"].tolist() == [1]


@pytest.mark.parametrize("name", ["transformers", "vllm"])
def test_preemption_when_blocks_run_out_and_everyone_finishes(name):
    # 6 blocks of 4 tokens; two requests of 8 + 8 tokens each need 4 blocks at the end.
    # Worked by hand (same for both policies): both decode until step 6, when the newer one
    # (1) is evicted and recomputed (8 prompt + 5 generated tokens) after 0 finishes.
    step = Recorder()
    res = simulate([Request(0, 0.0, 8, 8), Request(1, 0.0, 8, 8)], step,
                   cfg(name, block_size=4, num_blocks=6))
    assert res.preemptions.tolist() == [0, 1]
    assert len(step.batches) == 11
    assert step.batches[5] == [(1, 12)]  # request 0 alone after the eviction
    assert step.batches[8] == [(13, 0)]  # request 1 recomputes prompt + 5 outputs
    assert res.finish.tolist() == [8 * 0.25, 11 * 0.25]
    assert res.ttft.tolist() == [0.25, 0.25]  # the first token is not re-emitted
    s = res.summary()
    assert s["preemptions"] == 1 and s["completed"] == 2 and s["kv_blocks"]["peak"] == 6


@pytest.mark.parametrize("name", BOTH)
def test_request_larger_than_cache_is_rejected(name):
    reqs = [Request(0, 0.0, 30, 5), Request(1, 0.0, 8, 2)]  # cache: 8 blocks x 4 = 32 tokens
    res = simulate(reqs, Recorder(), cfg(name, block_size=4, num_blocks=8))
    assert res.rejected.tolist() == [True, False]
    assert math.isnan(res.ttft[0]) and res.ttft[1] == 0.25
    s = res.summary()
    assert s["rejected"] == 1 and s["completed"] == 1 and s["ttft"]["p50"] == 0.25


def test_transformers_layer_groups_share_the_blocks():
    # paged cache of a full and a sliding-window group (gemma-2), window of 2 blocks of 16:
    # a 100-token prompt takes (100 + 1) // 16 + 1 = 7 blocks, so 7 full + 2 sliding.
    hybrid = cfg("transformers", block_size=16, num_blocks=40, full_groups=1,
                 sliding_groups=1, sliding_window=32)
    res = simulate([Request(0, 0.0, 100, 1)], Recorder(), hybrid)
    assert res.steps["kv_blocks"].tolist() == [9]
    # The longest request one can hold: 2 blocks in both groups, then 36 in the full one.
    assert hybrid.request_tokens == (2 + 36) * 16
    # Sliding-window groups only (phi-3-mini): a request never holds more than its window,
    # whatever its length, so a 200-token request fits 4 blocks of 16 tokens; each step
    # reads at most the window's 31 tokens of its cache.
    window = cfg("transformers", block_size=16, num_blocks=4, full_groups=0,
                 sliding_groups=1, sliding_window=31)
    res = simulate([Request(0, 0.0, 150, 50)], Recorder(), window)
    assert window.request_tokens == math.inf and window.read_limit == 31
    assert not res.rejected[0] and res.finish[0] == 50 * 0.25
    assert res.steps["kv_blocks"].max() == 2
    # Two requests that fit one full-attention group's blocks do not fit two groups'.
    reqs = [Request(0, 0.0, 40, 1), Request(1, 0.0, 40, 1)]  # 3 blocks each
    one, two = Recorder(), Recorder()
    simulate(reqs, one, cfg("transformers", block_size=16, num_blocks=8, safety_margin=0.0))
    simulate(reqs, two, cfg("transformers", block_size=16, num_blocks=8, safety_margin=0.0,
                            sliding_groups=1, sliding_window=64))
    assert one.batches == [[(40, 0), (40, 0)]]
    assert two.batches == [[(40, 0)], [(40, 0)]]
    with pytest.raises(UserError, match="sliding_window"):
        cfg("transformers", sliding_groups=1)


def test_transformers_safety_margin_holds_back_new_prefills():
    reqs = [Request(0, 0.0, 8, 2), Request(1, 0.0, 2, 1)]  # 3 blocks + 1 block of 4 blocks
    tight, loose = Recorder(), Recorder()
    simulate(reqs, tight, cfg("transformers", block_size=4, num_blocks=4, safety_margin=0.5))
    simulate(reqs, loose, cfg("transformers", block_size=4, num_blocks=4, safety_margin=0.0))
    assert tight.batches == [[(8, 0)], [(1, 8)], [(2, 0)]]  # 1 free block < 2: B waits
    assert loose.batches == [[(8, 0), (2, 0)], [(1, 8)]]


@pytest.mark.parametrize("seed", range(24))
def test_random_configs_respect_limits_and_account_every_token(seed):
    rng = np.random.default_rng(seed)
    name = ["transformers", "transformers-prefill-first", "vllm"][seed % 3]
    config = preset(name, block_size=int(rng.choice([4, 16])),
                    num_blocks=int(rng.integers(4, 80)), max_batch_tokens=int(rng.integers(1, 400)),
                    max_seqs=int(rng.integers(1, 24)), chunked_prefill=bool(seed % 4),
                    cuda_graph_padding=bool(seed % 2))
    reqs = synthetic(int(rng.integers(1, 80)), qps=float(rng.choice([5.0, 500.0, math.inf])),
                     prompt=LengthDist.uniform(1, 200), output=LengthDist.uniform(1, 50), seed=seed)
    res = simulate(reqs, lambda b: 1e-3 + 1e-5 * sum(q for q, _ in b), config)
    st, s = res.steps, res.summary()
    assert s["completed"] + s["rejected"] == len(reqs)
    assert st["kv_blocks"].max(initial=0) <= config.num_blocks
    assert st["tokens"].max(initial=0) <= config.max_batch_tokens
    assert st["seqs"].max(initial=0) <= config.max_seqs
    done = ~res.rejected
    assert np.all(res.ttft[done] > 0) and np.all(res.e2e[done] >= res.ttft[done])
    if s["preemptions"] == 0 and s["dropped"] == 0:  # every prompt and output token once
        assert st["tokens"].sum() == sum(r.prompt_tokens + r.output_tokens - 1
                                         for r, ok in zip(reqs, done, strict=True) if ok)


def test_request_the_engine_can_never_schedule_is_dropped():
    # 12 tokens fit 3 blocks, but transformers asks (11 + 1) // 4 + 1 = 4 blocks for the prompt.
    res = simulate([Request(0, 0.0, 11, 1), Request(1, 1.0, 3, 2)], Recorder(),
                   cfg("transformers", block_size=4, num_blocks=3))
    assert res.rejected.tolist() == [True, False] and res.dropped == 1


def test_cuda_graph_padding_reaches_step_time():
    hf, vllm = Recorder(), Recorder()
    simulate([Request(0, 0.0, 10, 2)], hf, preset("transformers", cuda_graph_padding=True))
    simulate([Request(0, 0.0, 10, 2)], vllm, preset("vllm"))
    assert hf.batches == [[(10, 0), (54, 0)], [(1, 10), (63, 0)]]  # multiple of 64 tokens
    assert vllm.batches == [[(10, 0), (6, 0)], [(1, 10)]]  # capture sizes 1, 2, 4, 8, 16, ...


def test_bad_step_time_is_refused():
    with pytest.raises(ValueError, match="step_time returned"):
        simulate([Request(0, 0.0, 4, 2)], lambda b: float("nan"))


def test_event_loop_orders_ties_by_kind_then_insertion():
    seen = []

    def handler(kind):
        def h(t, payload):
            seen.append((t, kind, payload))
            return [(t, 0, "caused")] if payload == "first" else []
        return h

    n = run_events([(1.0, 1, "b"), (1.0, 0, "first"), (0.5, 1, "a")], [handler(0), handler(1)])
    assert n == 4
    assert seen == [(0.5, 1, "a"), (1.0, 0, "first"), (1.0, 0, "caused"), (1.0, 1, "b")]


def test_summary_and_chrome_trace(tmp_path):
    reqs = synthetic(40, qps=20.0, prompt=LengthDist.uniform(20, 60),
                     output=LengthDist.uniform(1, 10), seed=3)
    res = simulate(reqs, lambda b: 1e-3 + 1e-5 * sum(q for q, _ in b),
                   cfg("vllm", block_size=16, num_blocks=64))
    s = json.loads(json.dumps(res.summary(), allow_nan=False))
    for key in ("num_requests", "rejected", "steps", "preemptions"):
        assert isinstance(s[key], int)
    for key in ("ttft", "tpot", "e2e", "queueing"):
        assert set(s[key]) >= {"p50", "p90", "p99", "mean"}
        assert s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"]
    assert set(s["throughput"]) >= {"requests_per_s", "output_tokens_per_s"}
    assert s["num_requests"] == 40 and s["completed"] == 40
    path = tmp_path / "trace.json"
    res.write_chrome_trace(path)
    events = json.loads(path.read_text())["traceEvents"]
    steps = [e for e in events if e["ph"] == "X"]
    assert len(steps) == s["steps"]
    assert sum(e["args"]["tokens"] for e in steps) == int(res.steps["tokens"].sum())
    assert all(e["args"]["prefills"] + e["args"]["decodes"] == e["args"]["seqs"] for e in steps)
    assert sum(1 for e in events if e["ph"] == "b") == 3 * 40


# --- workloads ---------------------------------------------------------------------------

def test_read_trace_sorts_and_truncates(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens,extra\n"
                    "2.5,100,10,x\n0.0,374,44,y\n1.0,5,1,z\n")
    reqs = read_trace(path)
    assert reqs == [Request(0, 0.0, 374, 44), Request(1, 1.0, 5, 1), Request(2, 2.5, 100, 10)]
    assert read_trace(path, num_requests=2) == reqs[:2]


@pytest.mark.parametrize(("body", "message"), [
    ("0.0,10,5\n1.0,abc,5\n", r"t\.csv:3: num_prefill_tokens is not a number"),
    ("0.0,10,5\n-1.0,10,5\n", r"t\.csv:3: arrived_at is negative"),
    ("0.0,0,5\n", r"t\.csv:2: num_prefill_tokens must be at least 1"),
    ("0.0,10,2.5\n", r"t\.csv:2: num_decode_tokens is not a whole number"),
    ("0.0,10\n", r"t\.csv:2: expected 3 fields"),
])
def test_read_trace_malformed_row_names_the_row(tmp_path, body, message):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + body)
    with pytest.raises(UserError, match=message) as err:
        read_trace(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty trace"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n", "no requests"),
    ("arrived_at,prompt,num_decode_tokens\n0,1,1\n", r":1: missing column\(s\) num_prefill"),
])
def test_read_trace_empty_or_headerless(tmp_path, text, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_trace(path)


def test_read_trace_of_a_compressed_file_or_a_folder(tmp_path):
    packed = tmp_path / "t.csv.gz"
    packed.write_bytes(gzip.compress(b"arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n"))
    with pytest.raises(UserError, match="not a CSV trace \\(not UTF-8 text\\)"):
        read_trace(packed)
    with pytest.raises(UserError, match="cannot read trace: Is a directory"):
        read_trace(tmp_path)


def test_read_real_trace():
    reqs = read_trace("/work/shared/data/traces/splitwise_conv.csv", num_requests=300)
    assert len(reqs) == 300 and reqs[0] == Request(0, 0.0, 374, 44)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))


def test_synthetic_is_deterministic_and_has_the_asked_rate():
    a = synthetic(20000, qps=8.0, seed=7)
    assert a == synthetic(20000, qps=8.0, seed=7)
    assert a != synthetic(20000, qps=8.0, seed=8)
    gaps = np.diff([r.arrival_s for r in a])
    assert a[0].arrival_s == 0.0
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    bursty = np.diff([r.arrival_s for r in synthetic(20000, 8.0, "gamma", cv=3.0, seed=1)])
    assert bursty.mean() == pytest.approx(1 / 8.0, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    assert all(r.arrival_s == 0.0 for r in synthetic(5, qps=math.inf))


def test_length_distributions():
    reqs = synthetic(2000, 1.0, prompt=LengthDist.uniform(3, 5),
                     output=LengthDist.sampled([7, 11]), seed=0)
    assert {r.prompt_tokens for r in reqs} == {3, 4, 5}
    assert {r.output_tokens for r in reqs} == {7, 11}
    assert LengthDist.parse("512") == LengthDist.fixed(512)
    assert LengthDist.parse("uniform:3:5") == LengthDist.uniform(3, 5)
    with pytest.raises(UserError, match="bad length"):
        LengthDist.parse("uniform:3")
    with pytest.raises(UserError, match="empty"):
        LengthDist.uniform(5, 3)
