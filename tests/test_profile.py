"""The profiler on CPU: plan, profile, resume after kill -9, nothing twice."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dooly_fx.db import LatencyDB, fingerprint
from dooly_fx.engine import EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.profile import TIMING_VERSION, collect, environment, plan, plan_environment, profile
from dooly_fx.sweep import Bounds, points, request_vars, sweep_points
from dooly_fx.timing import measure

from tiny import spec_from_fields, tiny_fields, tiny_spec

BOUNDS = ["--max-tokens", "16", "--max-seqs", "2", "--max-context", "64"]
QUICK = ["--warmup-ms", "1", "--rep-ms", "2"]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dooly_fx", *args], capture_output=True,
                          text=True, timeout=timeout)


def _config(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_fields(name)))
    return str(path)


def test_measure_cpu_statistics():
    timing = measure(lambda: time.sleep(0.002), "cpu", warmup_ms=5, rep_ms=30)
    assert timing.n >= 10
    assert 2.0 <= timing.median_ms < 10.0
    assert timing.min_ms <= timing.median_ms <= timing.max_ms


def test_sweep_points_respect_bounds():
    decode = {"inputs": [["bfloat16", ["B", 8, "P + 1", 16]]], "outputs": []}
    assert request_vars(decode) == ["B", "P"]
    got = points(decode, Bounds(max_tokens=16, max_seqs=2, max_context=64))
    assert got == [{"B": b, "P": p} for b in (1, 2) for p in (16,)]
    tokens = {"inputs": [["bfloat16", ["m", 64]]], "outputs": [["bfloat16", ["m", 32]]]}
    assert points(tokens, Bounds(max_tokens=8)) == [{"m": m} for m in (1, 2, 4, 8)]


def test_plan_counts_and_dedup_saving(tmp_path):
    specs = [tiny_spec("llama-3.1-8b"), tiny_spec("mistral-7b", vocab_size=512)]
    coll = collect(specs, EngineProfile(), ["decode"])
    with LatencyDB.open(tmp_path / "lat.db") as db:
        env = environment("cpu")
        report = plan(db, coll, env, Bounds(16, 2, 64), [s.name for s in specs])
    llama, mistral = report["models"]
    # The two share every decode unit but the vocab-sized ones (embedding, LM head).
    shared = set(coll.signatures_of(specs[0].name)) & set(coll.signatures_of(specs[1].name))
    assert len(shared) == llama["signatures"] - 2
    assert report["unique_signatures"] == llama["signatures"] + 2
    assert llama["missing_points"] == llama["points"] and llama["covered_points"] == 0
    assert report["unique_points"] < llama["points"] + mistral["points"]
    assert 0.3 < report["saving"] < 0.5


def test_plan_of_one_model_saves_nothing_not_minus_zero(tmp_path):
    """Regression: one model's dedup and per-model seconds, summed in different orders, came
    out a rounding error apart, and plan printed a saving of -0.0%."""
    out = tmp_path / "plan.json"
    result = _cli("plan", "llama-3.1-8b", "--db", str(tmp_path / "lat.db"), "--device", "cpu",
                  "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert re.search(r"saving\s+0\.0%", result.stdout) and "-0.0%" not in result.stdout
    saving = json.loads(out.read_text())["saving"]
    assert saving == 0.0 and math.copysign(1.0, saving) == 1.0


def test_profile_cli_then_nothing_left(tmp_path):
    config = _config(tmp_path, "llama-3.1-8b")
    db = str(tmp_path / "lat.db")
    first = _cli("profile", config, "--db", db, "--device", "cpu", "--phase", "decode",
                 *BOUNDS, *QUICK)
    assert first.returncode == 0, first.stderr
    assert "failed" not in first.stderr
    again = _cli("profile", config, "--db", db, "--device", "cpu", "--phase", "decode", *BOUNDS)
    assert again.returncode == 0
    assert "nothing to profile" in again.stdout
    with LatencyDB.open(db) as handle:
        (env,) = handle.environments()
        units = handle.model_units(config, env["fingerprint"], EngineProfile().label)
    assert {u["phase"] for u in units} == {"decode"}
    assert sum(u["count"] for u in units if u["role"].endswith("q_proj")) == 3
    # Decode: every GEMM sees one token per sequence; so does the LM head.
    assert {u["binding"]["m"] for u in units if u["role"].endswith("q_proj")} == {"B"}
    out = tmp_path / "plan.json"
    result = _cli("plan", config, "--db", db, "--device", "cpu", "--phase", "decode", *BOUNDS,
                  "--json", str(out))
    assert result.returncode == 0
    report = json.loads(out.read_text())
    assert report["models"][0]["model"] == config
    assert report["models"][0]["missing_points"] == 0
    assert report["models"][0]["covered_points"] > 0
    assert 0.0 <= report["saving"] <= 1.0


def test_refresh_host_measures_host_times_again_beside_a_probe(tmp_path):
    """Every point profiled now carries the host probe measured beside its host time. On
    points recorded without one (a DB from before probes), `--refresh-host` measures the host
    time again at up to 3 points per signature, smallest to largest, keeps every GPU time,
    records a run, and the second time finds nothing to do."""
    config = _config(tmp_path, "llama-3.1-8b")
    db = str(tmp_path / "lat.db")
    assert _cli("profile", config, "--db", db, "--device", "cpu", "--phase", "decode",
                *BOUNDS, *QUICK).returncode == 0
    with LatencyDB.open(db) as handle:
        (env,) = [e["fingerprint"] for e in handle.environments()]
        query = "SELECT signature, point, median_ms, host_probe_ms FROM points ORDER BY 1, 2"
        before = handle.conn.execute(query).fetchall()
        assert all(r["host_probe_ms"] > 0 for r in before)
        handle.conn.execute("UPDATE points SET host_probe_ms = NULL")
    result = _cli("profile", config, "--db", db, "--device", "cpu", "--phase", "decode",
                  *BOUNDS, "--refresh-host")
    assert result.returncode == 0, result.stderr
    with LatencyDB.open(db) as handle:
        after = handle.conn.execute(query).fetchall()
        runs = [r[0] for r in handle.conn.execute("SELECT command FROM runs ORDER BY id")]
    assert [tuple(r)[:3] for r in after] == [tuple(r)[:3] for r in before]
    per_signature: dict[str, list[dict]] = {}
    for r in after:
        per_signature.setdefault(r["signature"], []).append(r)
    for key, rows in per_signature.items():
        probed = [json.loads(r["point"]) for r in rows if r["host_probe_ms"] is not None]
        assert len(probed) == min(3, len(rows)), key
        values = sorted(sorted(json.loads(r["point"]).items()) for r in rows)
        ends = [sorted(p.items()) for p in probed]
        assert values[0] in ends and values[-1] in ends, key
    assert f"{len(per_signature)} signatures" in result.stdout
    assert "--refresh-host" in runs[-1]
    again = _cli("profile", config, "--db", db, "--device", "cpu", "--phase", "decode",
                 *BOUNDS, "--refresh-host")
    assert again.returncode == 0 and "nothing to refresh" in again.stdout


def test_adaptive_sweep_refines_only_where_latency_bends():
    """Every other grid value first; then the values skipped beside a point off the log-log
    line through its measured neighbours (a bend), and nothing where the curve is straight."""
    gemm = {"kind": "gemm", "inputs": [["bfloat16", ["m", 64]]],
            "outputs": [["bfloat16", ["m", 32]]]}
    bounds = Bounds(4096, 64, 4096, adaptive=True)
    coarse = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert [p["m"] for p in sweep_points(gemm, bounds)] == coarse
    straight = {m: 0.01 * m**0.8 for m in coarse}  # a power law is a line in log-log
    assert [p["m"] for p in sweep_points(gemm, bounds, straight)] == coarse
    knee = {m: max(0.01, m * 1e-5) for m in coarse}  # launch-bound, then linear from m=1000
    assert [p["m"] for p in sweep_points(gemm, bounds, knee)] == \
        [1, 4, 16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 4096]
    full = [p["m"] for p in points(gemm, bounds)]
    assert [p["m"] for p in sweep_points(gemm, Bounds(4096, 64, 4096), knee)] == full
    attention = {"kind": "attention", "inputs": [["bfloat16", ["B", "S", 256]]], "outputs": []}
    assert sweep_points(attention, bounds) == points(attention, bounds)  # two variables


def test_adaptive_profile_ends_at_a_fixed_point_of_its_sweep(tmp_path):
    """`profile` with an adaptive sweep measures rounds until the sweep asks for nothing new:
    every one-variable signature's measured points are what `sweep_points` wants given them,
    between the coarse and the full grid; plan agrees that nothing is missing, and a plan of
    the full grid counts exactly the points left out."""
    spec = tiny_spec("llama-3.1-8b")
    coll = collect([spec], EngineProfile(), ["decode"])
    adaptive, full = Bounds(64, 2, 64, adaptive=True), Bounds(64, 2, 64)
    with LatencyDB.open(tmp_path / "lat.db") as db:
        env = environment("cpu")
        result = profile(db, coll, env, adaptive, "cpu", "test", budget_ms=(0.5, 1.0))
        assert result.failed == 0
        left_out = 0
        for case in coll.cases.values():
            if len(request_vars(case.canonical)) != 1:
                continue
            measured = {next(iter(p.values())): ms for p, ms in db.ok_points(env.fingerprint,
                                                                             case.key)}
            wanted = {next(iter(p.values())) for p in sweep_points(case.canonical, adaptive,
                                                                    measured)}
            grid = [next(iter(p.values())) for p in points(case.canonical, full)]
            assert set(measured) == wanted and {*grid[::2], grid[-1]} <= wanted <= set(grid)
            left_out += len(grid) - len(measured)
        assert plan(db, coll, env, adaptive, [spec.name])["missing_points"] == 0
        assert plan(db, coll, env, full, [spec.name])["missing_points"] == left_out > 0


def test_plan_does_not_create_a_db_and_bad_db_is_refused(tmp_path):
    config = _config(tmp_path, "llama-3.1-8b")
    missing = tmp_path / "none.db"
    result = _cli("plan", config, "--db", str(missing), "--device", "cpu", "--phase", "decode",
                  *BOUNDS)
    assert result.returncode == 0 and not missing.exists()
    bad = tmp_path / "bad.db"
    bad.write_text("hello")
    result = _cli("profile", config, "--db", str(bad), "--device", "cpu", *BOUNDS)
    assert result.returncode == 2 and "not a dooly_fx latency DB" in result.stderr
    assert bad.read_text() == "hello"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_profile_resumes_with_only_the_missing_points(tmp_path, sig):
    config = _config(tmp_path, "llama-3.1-8b")
    db_path = tmp_path / "lat.db"
    # Enough points that most are left when the signal lands: timing budgets do not slow tiny
    # ops down (their sample count is capped), so a short sweep could finish between polls.
    args = ["profile", config, "--db", str(db_path), "--device", "cpu", "--phase", "prefill",
            "--max-tokens", "256", "--max-seqs", "4", "--max-context", "256",
            "--warmup-ms", "20", "--rep-ms", "40"]
    proc = subprocess.Popen([sys.executable, "-m", "dooly_fx", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    done_before = 0
    while time.time() < deadline and done_before < 5:
        time.sleep(0.1)
        if db_path.exists():
            with LatencyDB.open(db_path) as db:
                done_before = db.conn.execute(
                    "SELECT COUNT(*) FROM points WHERE status = 'ok'").fetchone()[0]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 2 and "interrupted" in stderr
    with LatencyDB.open(db_path) as db:
        saved = {r[0] for r in db.conn.execute(
            "SELECT signature || point FROM points WHERE status = 'ok'")}
    assert len(saved) >= 5
    rerun = _cli(*args[:-4], *QUICK)
    assert rerun.returncode == 0, rerun.stderr
    with LatencyDB.open(db_path) as db:
        rows = db.conn.execute("SELECT signature || point, status, attempts, run_id "
                               "FROM points").fetchall()
        runs = db.conn.execute("SELECT id FROM runs ORDER BY id").fetchall()
    assert all(r[1] == "ok" for r in rows)
    assert len({r[0] for r in rows}) == len(rows)  # no duplicates
    last_run = runs[-1][0]
    remeasured = {r[0] for r in rows if r[3] == last_run}
    assert not remeasured & saved  # the re-run measured only what was missing
    assert all(r[2] == 1 for r in rows if r[0] in saved)


def test_every_family_profiles_without_failures(tmp_path):
    specs = [tiny_spec(n, layers=2) for n in ("mixtral-8x7b", "gemma-2-9b", "phi-3-mini")]
    for engine in (EngineProfile(), EngineProfile(engine="paged")):
        coll = collect(specs, engine, ["prefill", "decode"])
        with LatencyDB.open(tmp_path / f"{engine.engine}.db") as db:
            result = profile(db, coll, environment("cpu"), Bounds(8, 2, 48), "cpu",
                             "test", budget_ms=(0.5, 1.0))
        assert result.failed == 0, result.errors
        assert result.measured == sum(len(points(c.canonical, Bounds(8, 2, 48)))
                                      for c in coll.cases.values())


def test_one_worker_process_per_device_splits_the_points(tmp_path):
    """The --devices path: two profiler processes on one DB measure every point exactly once
    (run here with two CPU workers)."""
    from dooly_fx.profile import spawn_workers

    config = _config(tmp_path, "llama-3.1-8b")
    db_path = tmp_path / "lat.db"
    ticks = []
    results = spawn_workers([config], EngineProfile(), ["decode"], Bounds(16, 2, 64),
                            str(db_path), ["cpu", "cpu"], "test", lambda: ticks.append(1),
                            (1.0, 2.0))
    with LatencyDB.open(db_path) as db:
        rows = db.conn.execute("SELECT status, attempts FROM points").fetchall()
        runs = db.conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    assert runs == 2
    assert len(rows) == sum(r.measured for r in results) > 0
    assert all(status == "ok" and attempts == 1 for status, attempts in rows)
    assert all(r.failed == 0 for r in results)


def test_measured_saving_from_the_db_run_records(tmp_path):
    from dooly_fx.profile import savings

    specs = [tiny_spec("llama-3.1-8b"), tiny_spec("mistral-7b", vocab_size=512)]
    engine = EngineProfile()
    coll = collect(specs, engine, ["decode"])
    env = environment("cpu")
    with LatencyDB.open(tmp_path / "lat.db") as db:
        profile(db, coll, env, Bounds(8, 2, 32), "cpu", "test", budget_ms=(0.5, 1.0))
        report = savings(db, env.fingerprint, engine.label)
        spent = db.device_seconds(env.fingerprint)
    llama = set(coll.signatures_of(specs[0].name))
    mistral = set(coll.signatures_of(specs[1].name))
    assert [m["model"] for m in report["models"]] == sorted(s.name for s in specs)
    assert {m["shared_signatures"] for m in report["models"]} == {len(llama & mistral)}
    alone = sum(spent[s] for s in llama) + sum(spent[s] for s in mistral)
    assert report["device_seconds_per_model"] == pytest.approx(alone)
    assert report["device_seconds_dedup"] == pytest.approx(sum(spent[s] for s in llama | mistral))
    kinds = report["by_kind"].values()
    assert sum(k["signatures"] for k in kinds) == len(llama | mistral)
    assert sum(k["device_seconds_alone"] for k in kinds) == pytest.approx(alone)
    assert 0 < report["saving"] < 1


def test_plan_reads_units_recorded_in_the_db(tmp_path):
    """A GPU DB is planned against on a machine whose own capture would differ: the units the
    model ran with in that environment come from the DB, not from a local capture."""
    from dooly_fx.profile import Collection

    spec = tiny_spec("llama-3.1-8b")
    engine = EngineProfile()
    coll = collect([spec], engine, ["decode"])
    env = environment("cpu")
    bounds = Bounds(8, 2, 32)
    with LatencyDB.open(tmp_path / "lat.db") as db:
        profile(db, coll, env, bounds, "cpu", "test", budget_ms=(0.5, 1.0))
        report = plan(db, Collection(), env, bounds, [spec.name])  # nothing captured here
        (model,) = report["models"]
        assert model["units_from"] == "db"
        assert model["signatures"] == len(coll.cases)
        assert model["missing_points"] == 0 and model["covered_points"] > 0
        # The model was recorded before one of its units existed (a newer capture has it, not
        # yet profiled): the profiler plans from its own capture, so that unit is missing.
        units = coll.units[spec.name]
        new = units[-1][3]
        db.conn.execute("DELETE FROM points WHERE signature = ?", (new,))
        db.set_model(spec.name, env.fingerprint, coll.engine, coll.configs[spec.name],
                     [u for u in units if u[3] != new])
        old = plan(db, coll, env, bounds, [spec.name])["models"][0]
        here = plan(db, coll, env, bounds, [spec.name], local=True)["models"][0]
    assert old["signatures"] == len(coll.cases) - 1 and old["missing_points"] == 0
    assert old["captured_not_recorded"] == 1  # `plan` says the capture here has one more
    assert here["signatures"] == len(coll.cases) and here["missing_points"] > 0
    assert here["units_from"] == "capture" and here["captured_not_recorded"] == 0
    assert model["captured_not_recorded"] == 0  # nothing captured to compare with


def test_a_model_keeps_its_recorded_units_until_its_new_ones_are_measured(tmp_path):
    """A capture that names other units than those recorded (another capture pass, a model
    changed under the same name) replaces them only once every point of the new ones is
    measured: a profile cut short leaves the model with the units it has fits for."""
    before = tiny_spec("llama-3.1-8b")
    after = spec_from_fields(before.name, tiny_fields("llama-3.1-8b", intermediate_size=192))
    engine, env, bounds = EngineProfile(), environment("cpu"), Bounds(8, 2, 32)
    old, new = (collect([spec], engine, ["decode"]) for spec in (before, after))
    old_units, new_units = (sorted(map(tuple, (u[:5] for u in c.units[before.name])))
                            for c in (old, new))
    assert old_units != new_units
    with LatencyDB.open(tmp_path / "lat.db") as db:
        def recorded():
            return sorted((u["phase"], u["regime"], u["role"], u["signature"], u["count"])
                          for u in db.model_units(before.name, env.fingerprint, engine.label))

        profile(db, old, env, bounds, "cpu", "test", budget_ms=(0.5, 1.0))
        assert recorded() == old_units
        cut = profile(db, new, env, bounds, "cpu", "test", budget_ms=(0.5, 1.0),
                      stop=lambda: True)
        assert cut.interrupted and recorded() == old_units
        profile(db, new, env, bounds, "cpu", "test", budget_ms=(0.5, 1.0))
        assert recorded() == new_units


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_moe_experts_run_the_engine_implementation_at_each_skew(impl):
    """The experts unit names its implementation, sweeps routing skew, and times transformers'
    own experts function, checked against the op's reference semantics first."""
    from dooly_fx.lowering import lower, moe_routing

    coll = collect([tiny_spec("mixtral-8x7b")], EngineProfile(experts_impl=impl), ["prefill"])
    (case,) = [c for c in coll.cases.values() if c.kind == "moe_experts"]
    assert case.canonical["scalars"][0][-1] == impl
    sweep = points(case.canonical, Bounds(max_tokens=4))
    assert sweep == [{"m": m, "skew": s} for m in (1, 2, 4) for s in (0.0, 1.0, 2.0)]
    for point in sweep:
        lower(case, point, "cpu").check()
    uniform = torch.bincount(moe_routing(64, 2, 8, 0.0, "cpu").flatten(), minlength=8)
    assert uniform.tolist() == [16] * 8
    skewed = torch.bincount(moe_routing(64, 2, 8, 2.0, "cpu").flatten(), minlength=8)
    assert skewed.sum() == 128 and skewed[0] >= 48 > 16 > skewed[7]
    assert all(len(set(row.tolist())) == 2 for row in moe_routing(64, 2, 8, 2.0, "cpu"))


def test_fused_engine_variant_times_triton_kernels_checked_against_the_units():
    """--kernels triton: norms, SiLU·mul and rotary get their own signatures and run as our
    Triton kernels (interpreted on CPU), each checked against the unit's subgraph first;
    GEMMs and attention keep the eager engine's signatures."""
    from dooly_fx.lowering import lower

    spec = tiny_spec("llama-3.1-8b")
    fused_kinds = {"norm", "act_mul", "rotary"}
    for phase in ("prefill", "decode"):
        eager = collect([spec], EngineProfile(dtype="float32"), [phase])
        fused = collect([spec], EngineProfile(dtype="float32", kernels="triton"), [phase])
        kinds = {c.kind for c in fused.cases.values() if c.canonical.get("impl") == "triton"}
        assert kinds == fused_kinds
        shared = set(eager.cases) & set(fused.cases)
        assert {eager.cases[k].kind for k in set(eager.cases) - shared} == fused_kinds
        assert fused.engine == "padded|sdpa|float32|triton"
        for case in fused.cases.values():
            if case.canonical.get("impl") == "triton":
                for point in points(case.canonical, Bounds(8, 2, 16))[-2:]:
                    lower(case, point, "cpu").check()


def test_each_timer_has_its_own_cuda_environment(tmp_path, monkeypatch):
    """A timer other than do_bench is named in the environment (so its samples never answer
    for do_bench's); the replay overhead it measured is noted but not hashed; a plan on a
    machine without a GPU picks the recorded CUDA environment of the timer asked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
            "timing_version": TIMING_VERSION}
    stream = {**base, "timer": "stream", "replay_overhead_us": 2.9}
    assert fingerprint(stream) != fingerprint(base)
    assert fingerprint(stream) == fingerprint({**stream, "replay_overhead_us": 4.0})
    with LatencyDB.open(tmp_path / "lat.db") as db:
        db.add_environment(fingerprint(base), base["device"], base)
        db.add_environment(fingerprint(stream), stream["device"], stream)
        assert plan_environment(db, "cuda", "do_bench").fingerprint == fingerprint(base)
        assert plan_environment(db, "cuda").fingerprint == fingerprint(stream)  # the default
    with LatencyDB.open(tmp_path / "do_bench.db") as db:
        assert plan_environment(db, "cuda").device == "cuda (none recorded)"
        db.add_environment(fingerprint(base), base["device"], base)
        with pytest.raises(UserError, match="taken with the do_bench timer, not stream: "
                                            "pass --timer do_bench"):
            plan_environment(db, "cuda")
    assert "timer" not in environment("cpu", "stream").info  # CPU timing has no flush
