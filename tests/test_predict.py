"""Cost formulas, fits stored in the DB, step prediction and its CLI, on a real tiny profile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sympy
import torch

from dooly_fx import paged
from dooly_fx.costs import cost, dim_value
from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.engine import EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.hostinfo import run_host_probe_ms
from dooly_fx.passes.signature import _is_token_count
from dooly_fx.predict import (
    FlatStepTime,
    at_host_speed,
    attention_shapes,
    batch_values,
    environment_host,
    fit_db,
    host_at_speed,
    host_elasticity,
    load,
    predict_step,
)
from dooly_fx.profile import collect, environment, profile
from dooly_fx.sweep import Bounds
from dooly_fx.validate import parse_batch

from tiny import spec_from_fields, tiny_fields, tiny_spec

GEMM = {"kind": "gemm", "inputs": [["bfloat16", ["m", 64]], ["bfloat16", [32, 64]]],
        "outputs": [["bfloat16", ["m", 32]]]}


def test_gemm_cost_is_2mnk_and_bytes_of_every_tensor():
    flops, moved = cost(GEMM, {"m": 8})
    assert flops == 2 * 8 * 32 * 64
    assert moved == 2 * (8 * 64 + 32 * 64 + 8 * 32)


def test_attention_cost_counts_queries_times_keys():
    decode = {"kind": "attention", "inputs": [["bfloat16", ["B", 1, 256]],
                                              ["bfloat16", ["B", 2, "P", 64]]], "outputs": []}
    flops, moved = cost(decode, {"B": 4, "P": 100})
    assert flops == 4 * (4 * 1 * 256) * (100 + 1)
    assert moved == 2 * (4 * 256 + 4 * 2 * 100 * 64)


def test_paged_attention_cost_scores_every_query_against_every_key_of_the_step():
    """transformers' paged sdpa/eager attention is one dense call over the step's T queries
    and N·P + T keys; it also reads the cache (kv heads), writes and reads K/V with every
    query head (`repeat_kv`) and reads the (T, keys) mask."""
    paged = {"kind": "paged_attention",
             "inputs": [["bfloat16", ["T", 8, 64]], ["bfloat16", ["T", 2, 64]],
                        ["bfloat16", ["T", 2, 64]], ["int32", ["N + 1"]]],
             "outputs": [["bfloat16", ["T", 8, 64]]]}
    flops, moved = cost(paged, {"T": 10, "N": 4, "P": 100})
    keys = 4 * 100 + 10
    assert flops == 4 * (10 * 8 * 64) * keys
    tensors_ = 2 * (10 * 8 * 64 + 2 * 10 * 2 * 64 + 10 * 8 * 64) + 4 * 5
    assert moved == tensors_ + 2 * keys * (2 * 2 * 64 + 4 * 8 * 64 + 10)
    decode = {**paged, "inputs": [["bfloat16", ["N", 8, 64]], ["bfloat16", ["N", 2, 64]],
                                  ["bfloat16", ["N", 2, 64]], ["int32", ["N + 1"]]]}
    assert cost(decode, {"N": 4, "P": 100})[0] == 4 * (4 * 8 * 64) * (4 * 100 + 4)  # T = N


def test_paged_sdpa_flops_count_whole_waves_of_query_tiles():
    """On a GPU of `sms` multiprocessors, `paged|sdpa`'s fused kernel runs one block per
    (128-query tile, head) in whole waves: with 32 heads on 132 SMs a wave is 528 query rows,
    so 544 queries cost as much as 1056 (two waves), and 512 one wave; 24 heads: 704 rows a
    wave. `paged|eager` and a CPU environment are counted as the work itself."""
    from dooly_fx.costs import scheduled_queries
    from dooly_fx.db import fingerprint
    from dooly_fx.hostinfo import device_sms

    assert [scheduled_queries(t, 32, 132) for t in (1, 512, 544, 1024, 1088)] == \
        [528, 528, 1056, 1056, 1584]
    assert [scheduled_queries(t, 24, 132) for t in (640, 672, 1408, 1472)] == \
        [704, 1408, 1408, 2112]
    sdpa = {"kind": "paged_attention",
            "inputs": [["bfloat16", ["T", 32, 128]], ["bfloat16", ["T", 8, 128]],
                       ["bfloat16", ["T", 8, 128]], ["int32", ["N + 1"]]],
            "outputs": [["bfloat16", ["T", 32, 128]]], "scalars": [[0, 0, "sdpa"]]}
    eager = {**sdpa, "scalars": [[0, 0, "eager"]]}
    point = {"T": 544, "N": 32, "P": 992}
    work, moved = cost(sdpa, point)
    assert cost(sdpa, point, 132) == (work * 1056 / 544, moved)
    assert cost(eager, point, 132) == cost(eager, point)
    h100 = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3"}
    assert device_sms(h100) == 132 and device_sms({**h100, "sms": 114}) == 114
    assert device_sms({"device_type": "cpu", "device": "AMD EPYC"}) is None
    assert device_sms({"device_type": "cuda", "device": "Some Future GPU"}) is None
    assert fingerprint({**h100, "sms": 132}) == fingerprint(h100)  # environments keep theirs


def test_dim_expressions_read_S_as_a_symbol():
    assert dim_value("P + S", {"P": 7, "S": 5}) == 12
    assert dim_value("B*S", {"B": 3, "S": 4}) == 12
    assert dim_value("S", {}) == 1  # a variable the point does not give is 1


def test_token_count_is_a_product_of_distinct_symbols():
    b, s, p = sympy.symbols("B S P")
    assert _is_token_count(b * s) and _is_token_count(b)
    assert not _is_token_count(b * s**2)
    assert not _is_token_count(b * (p + 1))


def test_parse_batch_items_and_errors():
    assert parse_batch("prefill:2x3,decode:1x5") == [(3, 0), (3, 0), (1, 5)]
    assert parse_batch("mixed:1x4+8, 2x1+3") == [(4, 8), (1, 3), (1, 3)]
    for bad in ("", "prefill:2x3+1", "decode:2x3+1", "2y3", "prefill:0x3",
                "decode:10000000000x1", "decode:1048576x8,prefill:1x8"):
        with pytest.raises(UserError):
            parse_batch(bad)


def test_batch_values_pick_the_phase():
    assert batch_values([(5, 0), (3, 0)], "padded|sdpa|bfloat16") == \
        ("prefill", {"B": 2, "S": 5, "P": 0})
    assert batch_values([(1, 9), (1, 4)], "padded|sdpa|bfloat16") == \
        ("decode", {"B": 2, "S": 1, "P": 9})
    assert batch_values([(4, 9)], "paged|sdpa|bfloat16")[1] == {"T": 4, "N": 1, "P": 9,
                                                                "keys": 13}


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    """A real CPU profile of a tiny Llama (every phase), fitted."""
    path = tmp_path_factory.mktemp("predict") / "lat.db"
    spec = tiny_spec("llama-3.1-8b")
    engine = EngineProfile()
    coll = collect([spec], engine, ["prefill", "decode", "mixed"])
    env = environment("cpu")
    with LatencyDB.open(path) as db:
        profile(db, coll, env, Bounds(16, 2, 64), "cpu", "test", budget_ms=(0.5, 1.0))
        first = fit_db(db, env.fingerprint)
        again = fit_db(db, env.fingerprint)
    return path, spec, env, coll, first, again


def test_fit_db_fits_every_signature_once(tiny_db):
    path, spec, env, coll, first, again = tiny_db
    assert len(first.fitted) == len(coll.cases)
    assert again.fitted == [] and again.unchanged == len(coll.cases)
    with LatencyDB.open(path) as db:
        fits = db.fits(env.fingerprint)
    assert set(fits) == set(coll.cases)
    for row in first.fitted:
        stored = fits[row["signature"]]
        assert stored["method"] == row["method"] and stored["n_points"] == row["n_points"]
        assert stored["model"]["host_ms"] >= 0


def test_predict_step_sums_count_times_unit_latency(tiny_db):
    path, spec, env, coll, *_ = tiny_db
    with LatencyDB.open(path) as db:
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
    step = predict_step(loaded, [(1, 32)] * 2)
    assert (step.phase, step.values) == ("decode", {"B": 2, "S": 1, "P": 32})
    q_proj = [u for u in step.units if u.role.endswith("q_proj")]
    assert sum(u.count for u in q_proj) == 3 and all(u.point == {"m": 2} for u in q_proj)
    assert step.gpu_ms == pytest.approx(sum(u.count * u.gpu_ms for u in step.units))
    assert step.host_ms == pytest.approx(sum(u.count * u.host_ms for u in step.units))
    assert step.total_ms == max(step.gpu_ms, step.host_ms)
    prefill = predict_step(loaded, [(8, 0)] * 2)
    (head,) = [u for u in prefill.units if u.kind == "lm_head"]
    assert head.point == {"m": 2}  # logits of one token per sequence (binding m = B)
    assert all(u.point == {"m": 16} for u in prefill.units if u.role.endswith("q_proj"))


def test_flat_step_of_one_sequence_is_the_padded_step(tiny_db):
    path, spec, env, *_ = tiny_db
    with LatencyDB.open(path) as db:
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
    flat = FlatStepTime(loaded)
    assert flat([(8, 0)]) * 1e3 == pytest.approx(predict_step(loaded, [(8, 0)]).total_ms)
    assert flat([(8, 0), (4, 0)]) > flat([(8, 0)])


def test_unit_fidelity_attributes_each_leaf_modules_time_in_the_step(tiny_db):
    """Microbenchmark fidelity on CPU: one row per leaf unit role, its calls counted over
    the profiled steps (3 layers x FIDELITY_STEPS), its prediction the unit's own."""
    from dooly_fx.validate import FIDELITY_STEPS, unit_fidelity

    path, spec, env, *_ = tiny_db
    with LatencyDB.open(path) as db:
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
    rows = unit_fidelity(spec, EngineProfile(), loaded, ["decode:2x32", "prefill:1x8"],
                         device="cpu")
    assert {r["step"] for r in rows} == {"decode:2x32", "prefill:1x8"}
    rows = [r for r in rows if r["step"] == "decode:2x32"]
    calls = {r["role"]: r["calls"] for r in rows}
    per_layer = [f"model.layers.*.{m}" for m in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    assert calls == {**{r: 3 * FIDELITY_STEPS for r in per_layer},
                     **{r: FIDELITY_STEPS for r in ("model.embed_tokens", "model.norm",
                                                    "lm_head")}}
    units = {u.role: u for u in predict_step(loaded, [(1, 32)] * 2).units}
    for row in rows:
        assert row["in_step_ms"] > 0 and row["predicted_ms"] == units[row["role"]].gpu_ms
        assert row["error"] == pytest.approx(row["predicted_ms"] / row["in_step_ms"] - 1)
        assert row["loaded_ms"] == row["predicted_ms"]  # no unit timed under load on CPU


def test_a_unit_timed_under_sustained_load_slows_the_steps_that_keep_the_gpu_busy(
        tiny_db, tmp_path, monkeypatch):
    """The profiler times each GPU unit again under sustained load, at its measured point of
    most FLOPs (`timing.sustained`; a unit whose largest point is short is recorded `short`,
    untimed); a step then pays each unit's slowdown, scaled by how compute-bound the unit is
    at the step's point, in the measure the GPU is kept busy (`loaded_gpu_ms`)."""
    import shutil

    from dooly_fx import profile as profiling
    from dooly_fx.costs import cost
    from dooly_fx.predict import held_ms, loaded_gpu_ms
    from dooly_fx.profile import Env, ProfileResult, needs_sustained

    path, spec, env, coll, *_ = tiny_db
    copy = tmp_path / "lat.db"
    shutil.copy(path, copy)
    cuda = Env(env.fingerprint, env.device, {**env.info, "device_type": "cuda",
                                             "timer": "stream"})
    assert needs_sustained(cuda, "gemm") and not needs_sustained(cuda, "forward_host")
    assert not needs_sustained(env, "gemm")  # a CPU
    assert not needs_sustained(Env("f", "gpu", {"device_type": "cuda"}), "gemm")  # do_bench
    with LatencyDB.open(copy) as db:
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
        before = predict_step(loaded, [(8, 0)] * 2)
        (q,) = [u for u in before.units if u.role.endswith("q_proj")]
        case = coll.cases[q.signature]
        timed = []
        monkeypatch.setattr(profiling, "sustained", lambda fn, device, budget, graphs, timer:
                            timed.append(fn) or (0.5, 0.6))
        monkeypatch.setattr(profiling, "SUSTAIN_MIN_MS", 0.0)
        run, result = db.start_run(env.fingerprint, "test"), ProfileResult()
        profiling._sustain(db, case, cuda, "cpu", run, (0.5, 1.0), result)
        profiling._sustain(db, case, cuda, "cpu", run, (0.5, 1.0), result)  # done: nothing
        assert len(timed) == 1 and result.sustained == 1
        largest = max(db.ok_points(env.fingerprint, q.signature),
                      key=lambda pm: cost(case.canonical, pm[0])[0])[0]
        assert db.sustained(env.fingerprint) == {q.signature: {
            "point": largest, "burst_ms": 0.5, "sustained_ms": 0.6}}
        monkeypatch.setattr(profiling, "SUSTAIN_MIN_MS", 1e9)
        head = next(c for c in coll.cases.values() if c.kind == "lm_head")
        profiling._sustain(db, head, cuda, "cpu", run, (0.5, 1.0), result)
        assert len(timed) == 1 and db.sustained_done(env.fingerprint) == {q.signature,
                                                                          head.key}
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
    fit = loaded.fits[q.signature]
    rate = cost(case.canonical, largest)[0] / 0.5
    assert fit.sustained == (pytest.approx(1.2), rate)
    for point in ({"m": 2}, {"m": 16}):
        ms = 0.3
        share = min(1.0, cost(case.canonical, point)[0] / ms / rate)
        assert held_ms(fit, point, ms) == pytest.approx(ms * (1 + 0.2 * share))
    step = predict_step(loaded, [(8, 0)] * 2)
    (u,) = [u for u in step.units if u.role.endswith("q_proj")]
    assert u.gpu_ms == q.gpu_ms and u.sustained_ms == held_ms(fit, u.point, u.gpu_ms)
    assert all(v.sustained_ms == v.gpu_ms for v in step.units if v.signature != u.signature)
    busy = min(1.0, before.gpu_ms / before.host_ms)
    extra = sum(v.count * (v.sustained_ms - v.gpu_ms) for v in step.units)
    assert step.clock_ms == pytest.approx(busy * extra) and step.clock_ms > 0
    assert step.gpu_ms == pytest.approx(before.gpu_ms + step.clock_ms)
    # The same sum in another order: equal to the last bit or two.
    assert step.gpu_ms == pytest.approx(
        loaded_gpu_ms(before.gpu_ms, before.gpu_ms + extra, step.host_ms), rel=1e-12)
    assert step.in_step_ms(u) == pytest.approx(u.gpu_ms + busy * (u.sustained_ms - u.gpu_ms))
    assert FlatStepTime(loaded)([(8, 0)]) * 1e3 == pytest.approx(
        predict_step(loaded, [(8, 0)]).total_ms)
    assert loaded_gpu_ms(2.0, 3.0, 1.0) == 3.0 and loaded_gpu_ms(1.0, 2.0, 4.0) == 1.25


def test_host_times_are_at_the_environments_host_speed(tiny_db):
    """A unit's host time is the median of its points' host times, each brought from the
    host probe measured beside it to the environment's median probe at the environment's
    elasticity; a prediction for a host twice as slow scales every host-side time by
    2 ** elasticity and no GPU time."""
    assert host_at_speed([(2.0, 1.0), (3.0, 2.0), (4.0, None)], 1.5) == 2.625
    assert host_at_speed([(2.0, 1.0)], 4.0, 0.5) == 4.0
    assert host_at_speed([(2.0, None), (4.0, None)], 1.5) == 3.0
    assert host_at_speed([(2.0, 1.0)], None) == 2.0 and host_at_speed([], 1.0) == 0.0
    path, spec, env, *_ = tiny_db
    with LatencyDB.open(path) as db:
        probe, elasticity = environment_host(db, env.fingerprint)
        fits = db.fits(env.fingerprint)
        key = next(iter(fits))
        assert fits[key]["model"]["host_ms"] == host_at_speed(
            db.host_points(env.fingerprint, key), probe, elasticity)
        loaded = load(db, spec.name, env.fingerprint, EngineProfile().label)
    assert probe > 0 and loaded.host_probe_ms == probe and loaded.host_scale == 1.0
    assert loaded.host_elasticity == elasticity and 0 <= elasticity <= 1
    base = predict_step(loaded, [(1, 32)] * 2)
    slow_host = at_host_speed(loaded, 2 * probe)
    slow = predict_step(slow_host, [(1, 32)] * 2)
    assert slow_host.probe_ms == 2 * probe and slow_host.host_scale == 2 ** elasticity
    assert slow.host_ms == pytest.approx(2 ** elasticity * base.host_ms)
    assert slow.gpu_ms == base.gpu_ms
    assert at_host_speed(loaded, None) is loaded
    with pytest.raises(UserError, match="positive"):
        at_host_speed(loaded, -1.0)


def test_host_elasticity_is_the_pooled_within_signature_slope():
    """log host ms on log probe ms, each signature about its own means: a unit that doubles
    when the probe doubles and one that grows by √2 pool to their slopes weighted by their
    probes' spread; a lone point or equal probes add nothing; the slope is clipped to
    [0, 1], and is 1 with nothing to fit."""
    assert host_elasticity([[(2.0, 1.0), (4.0, 2.0)]]) == pytest.approx(1.0)
    assert host_elasticity([[(2.0, 1.0), (2.0 * 2 ** 0.5, 2.0)]]) == pytest.approx(0.5)
    # Probe spreads ln 2 and ln 4 (weights 1 : 4): (1·1 + 4·0.5) / 5.
    assert host_elasticity([[(2.0, 1.0), (4.0, 2.0)], [(1.0, 1.0), (2.0, 4.0)],
                            [(9.0, 3.0)], [(5.0, 1.0), (7.0, 1.0)]]) == pytest.approx(0.6)
    assert host_elasticity([[(4.0, 1.0), (2.0, 2.0)]]) == 0.0
    assert host_elasticity([[(1.0, 1.0), (8.0, 2.0)]]) == 1.0
    assert host_elasticity([]) == 1.0 and host_elasticity([[(1.0, 1.0)]]) == 1.0


def test_a_runs_host_speed_is_the_mean_probe_with_stalls_clipped():
    """Time adds up, so a run's speed is its probes' mean; a stall (beyond twice the
    median) counts as twice the median."""
    assert run_host_probe_ms([0.5, 0.5, 0.9, 6.0]) == pytest.approx((0.5 + 0.5 + 0.9 + 1.4) / 4)
    assert run_host_probe_ms([0.8]) == 0.8 and run_host_probe_ms([]) is None


def test_a_new_attention_shape_is_built_once_per_distinct_shape():
    """Full layers read every key, sliding layers at most window - 1 cached per sequence:
    gemma-2 (both kinds, window 4096) meets one shape while its sequences fit the window."""
    batch = [(1, 100), (1, 5000)]
    assert attention_shapes(batch, None, 1) == {(2, 5102)}
    assert attention_shapes(batch, 4096, 2) == {(2, 5102), (2, 4197)}
    assert attention_shapes(batch, 4096, 1) == {(2, 4197)}
    assert attention_shapes([(1, 100), (1, 4095)], 4096, 2) == {(2, 4197)}
    with LatencyDB.open(SHIPPED_DB, create=False, readonly=True) as db:
        env = next(e["fingerprint"] for e in db.environments() if e["device_type"] == "cuda")
        loaded = load(db, "gemma-2-9b", env, "paged|sdpa|bfloat16")
    both = predict_step(loaded, batch)
    one = predict_step(loaded, [(1, 100), (1, 4095)])
    assert both.setup_ms == pytest.approx(2 * one.setup_ms) and one.setup_ms > 0
    flat = FlatStepTime(loaded)
    first = flat([(1, 100), (1, 4095)])
    assert first - flat([(1, 100), (1, 4095)]) == pytest.approx(one.setup_ms / 1e3)
    # One key more: its one shape is new again, one build. Past the window two shapes, of
    # which the sliding one (2, 4197) has been built already.
    assert flat([(1, 101), (1, 4095)]) == pytest.approx(first, rel=0.05)
    assert flat(batch) - flat(batch) == pytest.approx(one.setup_ms / 1e3)
    fresh = FlatStepTime(loaded)
    assert fresh(batch) - fresh(batch) == pytest.approx(both.setup_ms / 1e3)


def test_load_refuses_a_model_or_engine_not_profiled(tiny_db):
    path, spec, env, *_ = tiny_db
    with LatencyDB.open(path) as db, pytest.raises(UserError, match="not profiled"):
        load(db, spec.name, env.fingerprint, EngineProfile(attn_impl="eager").label)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dooly_fx", *args], capture_output=True,
                          text=True, timeout=300)


def test_predict_cli_json_contract_and_bad_batch(tiny_db, tmp_path):
    path, spec, *_ = tiny_db
    out = tmp_path / "step.json"
    result = _cli("predict", spec.name, "--db", str(path), "--device", "cpu",
                  "--batch", "decode:2x32", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["total_ms"] == pytest.approx(max(report["gpu_ms"], report["host_ms"]))
    assert {u["role"] for u in report["units"]} >= {"lm_head"}
    assert all(u["gpu_ms"] > 0 for u in report["units"])
    inside = _cli("predict", spec.name, "--db", str(path), "--device", "cpu",
                  "--batch", "decode:2x16")  # the profiled decode points: B 1..2, P 16
    assert inside.returncode == 0 and "warning" not in inside.stderr, inside.stderr
    outside = _cli("predict", spec.name, "--db", str(path), "--device", "cpu",
                   "--batch", "decode:2x4096")
    assert outside.returncode == 0, outside.stderr
    (line,) = [ln for ln in outside.stderr.splitlines() if ln.startswith("warning: ")]
    assert line.startswith("warning: 3 of ") and "are predicted outside the points profiled " \
        "for them (extrapolated)" in line
    bad = _cli("predict", spec.name, "--db", str(path), "--device", "cpu", "--batch", "2y3")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad batch" in bad.stderr
    slow = tmp_path / "slow.json"
    result = _cli("predict", spec.name, "--db", str(path), "--device", "cpu",
                  "--batch", "decode:2x32", "--host-probe", "1000", "--json", str(slow))
    assert result.returncode == 0, result.stderr
    assert "1000.000 ms per host probe" in result.stdout
    # Host times follow the probe at the elasticity fitted from the DB's own samples: on a
    # noisy host that may be 0 (then host times stay as they are), so check the scaling
    # exactly rather than its direction.
    slow = json.loads(slow.read_text())
    speed = slow["host_speed"]
    assert speed["probe_ms"] == 1000.0 and report["host_speed"]["host_scale"] == 1.0
    assert speed["host_scale"] == pytest.approx(
        (1000.0 / speed["db_probe_ms"]) ** speed["elasticity"])
    assert slow["host_ms"] == pytest.approx(report["host_ms"] * speed["host_scale"])
    assert slow["gpu_ms"] == pytest.approx(report["gpu_ms"])
    bad = _cli("predict", spec.name, "--db", str(path), "--device", "cpu", "--batch",
               "decode:2x32", "--host-probe", "fast")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--host-probe" in bad.stderr


def test_a_model_the_db_never_recorded_is_predicted_from_its_units_signatures(tiny_db,
                                                                             tmp_path, capsys):
    """A config the DB has no record of is captured and its units looked up by signature:
    the same architecture under another name is predicted as the profiled model, to the last
    digit; one whose MLP is wider lacks those units and says which (one line, exit 2)."""
    from dooly_fx.cli_latency import _environment, load_model

    path, spec, env, coll, *_ = tiny_db
    same, wider = tmp_path / "same", tmp_path / "wider"
    spec.config.save_pretrained(same)
    spec_from_fields("wider", tiny_fields("llama-3.1-8b", intermediate_size=192)
                     ).config.save_pretrained(wider)
    batch = [(8, 0), (8, 0), (1, 16), (1, 16), (1, 16)]
    with LatencyDB.open(path) as db:
        profiled = load(db, spec.name, env.fingerprint, EngineProfile().label)
        unseen = load_model(db, str(same), _environment(db, "cpu"), EngineProfile())
    n = len(coll.cases)
    assert f"{same}: not recorded in the DB under padded|sdpa|bfloat16; captured here, {n} of " \
           f"its {n} unit signatures are profiled on {env.device}" in capsys.readouterr().out
    assert unseen.model == str(same) and unseen.missing == []
    assert unseen.uses == profiled.uses
    assert predict_step(unseen, batch).total_ms == predict_step(profiled, batch).total_ms
    bad = _cli("predict", str(wider), "--db", str(path), "--device", "cpu",
               "--batch", "decode:3x16")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "3 of its unit signatures have no fit" in bad.stderr
    assert "model.layers.*.mlp.act_fn, model.layers.*.mlp.down_proj" in bad.stderr


def test_coverage_cli_reports_every_unit_with_plots(tiny_db, tmp_path):
    path, spec, env, coll, *_ = tiny_db
    out = tmp_path / "cov.json"
    result = _cli("coverage", spec.name, "--db", str(path), "--device", "cpu",
                  "--html", str(tmp_path / "html"), "--json", str(out))
    assert result.returncode == 0, result.stderr
    (model,) = json.loads(out.read_text())["models"]
    assert {u["signature"] for u in model["units"]} == set(coll.cases)
    assert all(u["covered"] and u["method"] for u in model["units"])
    assert sum(u["share"].get("decode", 0.0) for u in model["units"]) == pytest.approx(1.0)
    page = tmp_path / "html" / spec.name / "index.html"
    assert page.exists() and (page.parent / "fits_vs_measured.png").stat().st_size > 0


@pytest.fixture(scope="module")
def paged_db(tmp_path_factory):
    """A real CPU profile of a tiny Llama under the paged engine (`paged|eager`; decode and
    mixed steps), fitted: (path, spec, engine, the attention case)."""
    spec = tiny_spec("llama-3.1-8b")
    engine = EngineProfile(engine="paged", attn_impl="eager")
    coll = collect([spec], engine, ["decode", "mixed"])
    (attn,) = [c for c in coll.cases.values() if c.kind == "paged_attention"
               and len(c.symbols) == 3]
    path = tmp_path_factory.mktemp("paged") / "lat.db"
    env = environment("cpu")
    with LatencyDB.open(path) as db:
        result = profile(db, coll, env, Bounds(8, 2, 64), "cpu", "test", budget_ms=(0.5, 1.0))
        assert result.failed == 0 and result.measured > 0
        fit_db(db, env.fingerprint)
    assert not paged._FORWARD_MODELS  # the whole model built for `forward_host` is freed
    return path, spec, engine, attn


def test_paged_engine_profiles_the_engines_own_attention_and_predicts_flat_steps(paged_db):
    """--engine paged: the attention unit is swept over (T, N, P) and timed as transformers'
    `paged|eager` on its own PagedAttentionCache; a continuous-batching step is then predicted
    at (T, N, mean cached) directly."""
    path, spec, engine, attn = paged_db
    assert sorted(attn.symbols) == ["N", "P", "T"] and attn.canonical["scalars"][0][-1] == "eager"
    env = environment("cpu")
    with LatencyDB.open(path, create=False) as db:
        loaded = load(db, spec.name, env.fingerprint, engine.label)
    from dooly_fx.predict import predict_uses

    step = FlatStepTime(loaded)
    # The engine's batch preparation: one unit per step of each phase, outside `uses`.
    assert {k: [u.role for u in us] for k, us in loaded.engine_units.items()} == {
        ("decode", ""): ["engine:prepare_batch"], ("mixed", ""): ["engine:prepare_batch"]}

    def prepare(phase: str, values: dict) -> float:
        return predict_uses(loaded, loaded.engine_units[(phase, "")], values)[1]

    # The engine's whole forward, timed for its host issue (`forward_host`): one per step of
    # each phase, outside `uses`; it is the step's host time, the units' own sum kept beside.
    assert {k: [u.role for u in us] for k, us in loaded.forward_units.items()} == {
        ("decode", ""): ["engine:forward"], ("mixed", ""): ["engine:forward"]}
    (whole,) = loaded.forward_units[("mixed", "")]

    # Two decodes with 32 cached tokens and a 4-token chunk on top of 32: T=6, N=3, P=32.
    expected = predict_step(loaded, [(1, 32), (1, 32), (4, 32)])
    assert expected.values == {"T": 6, "N": 3, "P": 32, "keys": 102}
    assert expected.phase == "mixed"
    assert expected.prepare_ms == prepare("mixed", expected.values) > 0
    assert expected.total_ms == pytest.approx(
        expected.prepare_ms + max(expected.gpu_ms, expected.host_ms))
    assert expected.setup_ms == 0.0  # paged|eager builds nothing per shape
    assert expected.host_ms == loaded.fits[whole.signature].host_ms * loaded.host_scale > 0
    assert expected.units_host_ms == pytest.approx(
        sum(u.count * u.host_ms for u in expected.units))
    assert step([(1, 32), (1, 32), (4, 32)]) * 1e3 == pytest.approx(expected.total_ms)
    decode = predict_step(loaded, [(1, 32), (1, 32)])
    assert decode.prepare_ms == prepare("decode", decode.values)
    assert step([(1, 16), (1, 48)]) * 1e3 == pytest.approx(decode.total_ms)  # same keys read

    # The attention was also measured in every key class, and a step pays its own class:
    # one more cached token turns 102 keys (even) into 103 (odd) at the same (T, N, P).
    from dooly_fx.fit import key_class_ratio

    fit = loaded.fits[attn.key]
    assert set(fit.key_classes) == {"1", "2", "axes"}

    def attention_ms(batch):
        return next(u.gpu_ms for u in predict_step(loaded, batch).units
                    if u.signature == attn.key)

    even = attention_ms([(1, 32), (1, 32), (4, 32)])
    odd = attention_ms([(1, 33), (1, 32), (4, 32)])
    at = {"T": 6, "N": 3, "P": 32}
    assert odd / even == pytest.approx(key_class_ratio(fit.key_classes, 1, at)
                                       / key_class_ratio(fit.key_classes, 2, at))


def test_paged_sdpa_pays_the_attention_setup_once_per_new_shape(tmp_path):
    """paged|sdpa gets one `shape_build` unit per attention group (gemma-2: sliding and full),
    paged|eager none; FlatStepTime charges its host time only when a step's (T, keys) is new."""
    from dooly_fx.predict import predict_uses

    for name, groups in (("llama-3.1-8b", 1), ("gemma-2-9b", 2)):
        coll = collect([tiny_spec(name)], EngineProfile(engine="paged"), ["decode"])
        builds = [r for r in coll.units[f"tiny-{name}"] if r[2].endswith(":shape_build")]
        assert [(r[0], r[4]) for r in builds] == [("decode", groups)]
    eager = collect([tiny_spec("llama-3.1-8b")], EngineProfile(engine="paged", attn_impl="eager"),
                    ["decode"])
    assert not any(c.kind == "shape_build" for c in eager.cases.values())

    spec = tiny_spec("llama-3.1-8b")
    engine = EngineProfile(engine="paged", dtype="float32")
    coll = collect([spec], engine, ["decode"])
    (build,) = [c for c in coll.cases.values() if c.kind == "shape_build"]
    assert build.symbols == ["T"] and build.canonical["scalars"] == [["sdpa"]]
    env = environment("cpu")
    with LatencyDB.open(tmp_path / "lat.db") as db:
        result = profile(db, coll, env, Bounds(8, 2, 64), "cpu", "test", budget_ms=(0.5, 1.0))
        assert result.failed == 0
        fit_db(db, env.fingerprint)
        loaded = load(db, spec.name, env.fingerprint, engine.label)
    assert all(not u.role.endswith(":shape_build") for us in loaded.uses.values() for u in us)
    (uses,) = loaded.builds.values()
    setup_ms = predict_uses(loaded, uses, {"T": 2, "N": 2, "P": 32})[2]
    assert setup_ms > 0
    step = FlatStepTime(loaded)
    first, again = step([(1, 32), (1, 32)]), step([(1, 32), (1, 32)])
    assert first - again == pytest.approx(setup_ms / 1e3)
    # 66 -> 68 keys: a new shape, in the same key class (even, not a multiple of 8)
    assert step([(1, 34), (1, 32)]) == pytest.approx(first)


def test_key_classes_of_paged_attention():
    from dooly_fx.costs import key_class, to_key_class
    from dooly_fx.sweep import points

    assert [key_class(k) for k in (64, 66, 68, 67, 1)] == [8, 2, 2, 1, 1]
    assert [to_key_class(64, c) for c in (8, 2, 1)] == [0, 2, 1]
    assert [to_key_class(67, c) for c in (8, 2, 1)] == [5, 1, 0]
    with pytest.raises(ValueError, match="key class 3"):
        to_key_class(64, 3)
    decode = {"kind": "paged_attention", "inputs": [["bfloat16", ["N", 32, 64]],
                                                    ["bfloat16", ["N", 8, 64]],
                                                    ["symint", ["P"]]],
              "outputs": [], "scalars": [[0, "eager"]]}
    classed = [p for p in points(decode, Bounds()) if "A" in p]
    # N (the queries) at three spread grid values, P at two, each in every class.
    assert sorted({(p["N"], p["P"]) for p in classed}) == [
        (2, 128), (2, 4096), (16, 128), (16, 4096), (128, 128), (128, 4096)]
    assert sorted(p["A"] for p in classed) == [1] * 6 + [2] * 6 + [8] * 6
    sliding = {**decode, "scalars": [[4096, "eager"]]}  # a rolling buffer reads other counts
    assert not any("A" in p for p in points(sliding, Bounds()))
    assert not any("A" in p for p in points(GEMM, Bounds()))


@pytest.mark.parametrize("engine", [EngineProfile(engine="paged", attn_impl="eager"),
                                    EngineProfile(attn_impl="eager")])
def test_validate_steps_times_forwards_in_the_engines_grad_mode(engine, monkeypatch):
    """Both engines' forwards run under `torch.no_grad()` (not `inference_mode`, whose
    cheaper dispatch would time a faster step than the engine's), warm-up included, with
    the parameters requiring grad as the engine leaves them."""
    from dooly_fx import validate

    modes, build = [], validate.build_model

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda mod, _: modes.append(
            (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
             all(p.requires_grad for p in mod.parameters()))))
        return model

    monkeypatch.setattr(validate, "build_model", recording)
    (step,) = validate.measure_steps(tiny_spec("llama-3.1-8b"), engine, ["decode:2x16"], "cpu",
                                     warmup=1, reps=2)
    assert step.reps == 2 and step.median_ms > 0
    assert len(modes) == 2 + 1 + 2 and set(modes) == {(False, False, True)}


def test_validate_steps_times_whole_paged_engine_steps(paged_db, tmp_path):
    """validate-steps --engine paged times the continuous-batching engine's own steps, with
    sequences of different lengths in one batch; each is predicted as the engine's batch
    preparation then the forward, and --measured predicts the same steps again unchanged.
    The padded engine refuses unequal sequences with a one-line error."""
    path, spec, *_ = paged_db
    out, again = tmp_path / "steps.json", tmp_path / "again.json"
    base = ("validate-steps", spec.name, "--db", str(path), "--device", "cpu", "--engine",
            "paged", "--attn", "eager")
    result = _cli(*base, "--steps", "decode:1x16,decode:1x33;mixed:1x4+20,decode:1x30",
                  "--reps", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["engine"] == "paged|eager|bfloat16"
    assert [(s["phase"], s["batch"]) for s in report["steps"]] == [
        ("decode", [[1, 16], [1, 33]]), ("mixed", [[4, 20], [1, 30]])]
    for s in report["steps"]:
        assert s["median_ms"] > 0 and s["first_ms"] > 0 and s["reps"] == 2
        # predicted again for the host's speed while the step ran
        assert s["host_probe_ms"] > 0 and s["host_scale"] > 0
        assert s["at_host_error"] == pytest.approx((s["at_host_ms"] - s["median_ms"])
                                                   / s["median_ms"])
        assert s["prepare_ms"] > 0 and s["setup_ms"] == 0.0  # paged|eager: no shape setup
        assert s["predicted_ms"] == pytest.approx(s["prepare_ms"] + max(s["gpu_ms"],
                                                                        s["host_ms"]))
    assert report["at_host_median_ape"] >= 0
    result = _cli(*base, "--measured", str(out), "--json", str(again))
    assert result.returncode == 0, result.stderr
    assert json.loads(again.read_text())["steps"] == report["steps"]
    padded = _cli("validate-steps", spec.name, "--db", str(path), "--device", "cpu",
                  "--engine", "paged", "--attn", "eager", "--fidelity", "decode:2x16")
    assert padded.returncode == 2 and "padded engine's forward" in padded.stderr
