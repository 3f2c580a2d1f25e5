"""Serving verbs: `simulate` on the shipped DB, `export-vidur` from a tiny CPU profile, and the
weight / KV-cache sizing they rest on."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dooly_fx.capacity import Slo, check, max_rate
from dooly_fx.cli import main
from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.errors import UserError
from dooly_fx.serving import (
    cache_layout,
    kv_bytes_per_token,
    size_kv_cache,
    unit_weight_bytes,
    weight_bytes,
)
from dooly_fx.validate_serving import PROBE_EVERY, Served, lockstep
from dooly_fx.vidur import attention_header, num_tokens_grid
from dooly_fx.workload import LengthDist, synthetic

from tiny import tiny_spec

SHARED = Path("/work/shared/data")
TRACE = SHARED / "traces" / "splitwise_conv.csv"
VIDUR_MLP = SHARED / "vidur_profiles" / "h100" / "Llama-2-7b-hf.mlp.csv"
H100_ENV = "dc371c01ad193bd855816ee036af5899d677d52b6cda860135be371723e67822"
ENGINE = "padded|sdpa|bfloat16"
SERVED_RUN = (Path(__file__).parents[1] / "bench" / "results" / "serving"
              / "serving_llama-3.2-1b_sdpa.json")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(capsys, *args: str) -> str:
    code, _, err = _cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _ordered(stats: dict) -> None:
    assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


# --- simulate on the shipped DB ------------------------------------------------------------


def test_simulate_synthetic_json_contract_and_kv_sizing(tmp_path, capsys):
    path = tmp_path / "run.json"
    code, out, _ = _cli(capsys, "simulate", "llama-3.1-8b", "--qps", "4", "--num-requests", "20",
                        "--prompt", "uniform:64:512", "--output", "16", "--json", str(path))
    assert code == 0 and "TTFT" in out and "TPOT" in out
    run = json.loads(path.read_text())
    assert run["num_requests"] == 20 and run["completed"] == 20 and run["rejected"] == 0
    for key in ("ttft", "tpot", "e2e"):
        _ordered(run[key])
    assert run["tpot"]["p50"] < run["e2e"]["p50"]
    assert run["model"] == "llama-3.1-8b" and run["engine"] == ENGINE
    assert run["scheduler"]["policy"] == "transformers-fifo"
    # (79.2 GiB x 0.9 - 8.03e9 bf16 parameters) / (2 x 32 layers x 8 KV heads x 128 x 2 bytes
    # per token x 256 tokens per block)
    kv = run["kv_cache"]
    with LatencyDB.open(SHIPPED_DB, create=False, readonly=True) as db:
        weights = weight_bytes(db, "llama-3.1-8b", H100_ENV, ENGINE)
    assert 8.02e9 < weights / 2 < 8.04e9
    assert kv["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    assert kv["num_blocks"] == int((79.2 * 2**30 * 0.9 - weights) // (131072 * 256))
    assert run["scheduler"]["num_blocks"] == kv["num_blocks"]


def test_simulate_replays_the_first_50_trace_rows(tmp_path, capsys):
    files = {k: tmp_path / f"run.{k}" for k in ("json", "trace.json", "png")}
    code, _, _ = _cli(capsys, "simulate", "llama-3.1-8b", "--trace", str(TRACE),
                      "--num-requests", "50", "--policy", "vllm", "--json", str(files["json"]),
                      "--chrome-trace", str(files["trace.json"]), "--plot", str(files["png"]))
    assert code == 0
    run = json.loads(files["json"].read_text())
    assert run["num_requests"] == 50 and run["completed"] == 50
    assert run["workload"] == {"source": "trace", "trace": str(TRACE), "num_requests": 50}
    assert run["scheduler"]["block_size"] == 16 and run["kv_cache"]["block_size"] == 16
    _ordered(run["ttft"])
    _ordered(run["tpot"])
    events = json.loads(files["trace.json"].read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == run["steps"]
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_at_another_host_speed(tmp_path, capsys):
    """--host-probe: the same workload on a host twice as slow (probe 2x the DB's) runs
    host-bound paged decode steps slower; the JSON says which speed it simulated."""
    runs = {}
    for name, probe in (("db", None), ("fast", "0.5"), ("slow", "1.0")):
        path = tmp_path / f"{name}.json"
        extra = ("--host-probe", probe) if probe else ()
        code, _, _ = _cli(capsys, "simulate", "llama-3.2-1b", "--engine", "paged", "--qps", "2",
                          "--num-requests", "10", "--prompt", "128", "--output", "32", *extra,
                          "--json", str(path))
        assert code == 0
        runs[name] = json.loads(path.read_text())
    with LatencyDB.open(SHIPPED_DB, create=False, readonly=True) as db:
        assert runs["db"]["host_probe_ms"] == pytest.approx(db.host_probe_ms(H100_ENV))
    assert (runs["fast"]["host_probe_ms"], runs["slow"]["host_probe_ms"]) == (0.5, 1.0)
    assert runs["slow"]["tpot"]["p50"] > 1.5 * runs["fast"]["tpot"]["p50"]
    for bad in ("-1", "inf"):
        line = _one_line_error(capsys, "simulate", "llama-3.2-1b", "--qps", "1",
                               "--host-probe", bad)
        assert "--host-probe" in line


def test_options_that_would_be_ignored_are_refused(capsys):
    """Options that do not apply to what was asked are errors, not silently dropped."""
    for args, message in [
            (("--qps", "1", "--cv", "3"), "--cv shapes gamma arrivals; add --arrival gamma"),
            (("--qps", "1", "--num-blocks", "64", "--gpu-memory-fraction", "0.5"),
             "give --num-blocks or --gpu-memory-fraction, not both"),
            (("--qps", "1", "--seed", "-1"), "--seed: expected an integer >= 0, got '-1'")]:
        line = _one_line_error(capsys, "simulate", "llama-3.2-1b", "--num-requests", "4", *args)
        assert message in line


def test_measured_runs_of_another_model_or_engine_are_refused(tmp_path, capsys):
    """`validate-serving --measured` compares a saved run only with the model and engine it
    measured; a field of the wrong type is named."""
    run = json.loads(SERVED_RUN.read_text())
    for args, message in [
            (("llama-3.1-8b",), f"a measurement of {run['model']}, not llama-3.1-8b"),
            ((run["model"], "--attn", "eager"),
             f"measured on {run['engine']}, not paged|eager|bfloat16"),
            ((run["model"], "--qps", "2"), "--measured replays the saved run's own requests")]:
        line = _one_line_error(capsys, "validate-serving", *args, "--measured", str(SERVED_RUN))
        assert message in line
    run["measured"]["steps"][3]["new"] = "x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(run))
    line = _one_line_error(capsys, "validate-serving", run["model"], "--measured", str(bad))
    assert "steps[3].new is 'x', not list[int]" in line


def test_synthetic_rates_scale_the_same_requests():
    """A sweep's rates share their requests: the same lengths, arrivals scaled by the rate."""
    slow = synthetic(50, 2.0, prompt=LengthDist.uniform(16, 512), output=LengthDist.fixed(8))
    fast = synthetic(50, 8.0, prompt=LengthDist.uniform(16, 512), output=LengthDist.fixed(8))
    assert [r.prompt_tokens for r in slow] == [r.prompt_tokens for r in fast]
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 4 for r in slow])


def test_slo_parse_check_and_highest_rate():
    slo = Slo.parse("ttft:p90:0.5")
    assert (slo.metric, slo.stat, slo.seconds, slo.label) == ("ttft", "p90", 0.5,
                                                             "ttft p90 <= 500 ms")
    summary = {"ttft": {"p90": 0.5}, "tpot": {"p90": None}, "rejected": 0}
    assert check(summary, [slo]) == {"met": {"ttft p90 <= 500 ms": True}, "all": True}
    assert not Slo.parse("tpot:p90:1").met(summary)  # no request completed: not met
    assert not check({**summary, "rejected": 1}, [slo])["all"]
    rows = [{"qps": q, "slo": {"all": ok}} for q, ok in ((1, True), (2, True), (4, False),
                                                          (8, True))]
    assert max_rate(rows) == 2  # 8 meets again, but a rate below it does not
    assert max_rate(rows[2:]) is None
    for bad in ("ttft:p90", "ttfb:p90:1", "ttft:p95:1", "ttft:p90:x", "ttft:p90:0"):
        with pytest.raises(UserError, match="--slo"):
            Slo.parse(bad)


def test_simulate_sweeps_rates_against_slos(tmp_path, capsys):
    path, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, out, _ = _cli(capsys, "simulate", "llama-3.2-1b", "--engine", "paged",
                        "--qps", "64,2,8", "--num-requests", "40", "--prompt", "uniform:128:1024",
                        "--output", "32", "--slo", "ttft:p90:0.2", "--slo", "tpot:p90:10",
                        "--json", str(path), "--plot", str(png))
    assert code == 0 and "highest rate within it" in out
    run = json.loads(path.read_text())
    rows = run["sweep"]
    assert [r["qps"] for r in rows] == [2, 8, 64] and run["workload"]["qps"] == [2, 8, 64]
    assert all(r["num_requests"] == r["completed"] == 40 for r in rows)
    assert run["slo"] == ["ttft p90 <= 200 ms", "tpot p90 <= 10000 ms"]
    for r in rows:
        assert r["slo"]["met"]["ttft p90 <= 200 ms"] == (r["ttft"]["p90"] <= 0.2)
        assert r["slo"]["met"]["tpot p90 <= 10000 ms"]
    # The shipped DB's 1B paged steps: TTFT p90 ~0.15-0.16 s at 2 and 8 requests/s, ~0.24 s
    # at 64.
    assert [r["slo"]["all"] for r in rows] == [True, True, False]
    assert run["max_qps_within_slo"] == max_rate(rows) == 8
    assert rows[0]["ttft"]["p90"] <= rows[-1]["ttft"]["p90"]  # the same requests, faster
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One rate with an SLO: the plain summary, checked.
    code, _, _ = _cli(capsys, "simulate", "llama-3.2-1b", "--qps", "2", "--num-requests", "5",
                      "--slo", "e2e:max:0.000001", "--json", str(path))
    one = json.loads(path.read_text())
    assert code == 0 and "sweep" not in one and one["slo"]["all"] is False
    line = _one_line_error(capsys, "simulate", "llama-3.2-1b", "--qps", "1,2",
                           "--chrome-trace", str(tmp_path / "t.json"))
    assert "--chrome-trace" in line
    assert "given twice" in _one_line_error(capsys, "simulate", "llama-3.2-1b", "--qps", "1,1")
    assert "finite" in _one_line_error(capsys, "simulate", "llama-3.2-1b", "--qps", "1,inf")
    assert "not a positive rate" in _one_line_error(capsys, "simulate", "llama-3.2-1b", "--qps",
                                                    "fast")


def test_predict_and_coverage_default_to_the_shipped_db(tmp_path, capsys):
    """Verbs that only read a DB use the shipped one without --db, as simulate does."""
    step, cov = tmp_path / "step.json", tmp_path / "coverage.json"
    code, _, _ = _cli(capsys, "predict", "llama-3.1-8b", "--batch", "decode:4x512",
                      "--json", str(step))
    assert code == 0 and json.loads(step.read_text())["environment"] == H100_ENV
    assert json.loads(step.read_text())["total_ms"] > 0
    code, out, _ = _cli(capsys, "coverage", "llama-3.2-1b", "--json", str(cov))
    report = json.loads(cov.read_text())
    assert code == 0 and report["environment"] == H100_ENV
    assert "23/23 unit signatures covered" in out


def test_request_longer_than_the_cache_is_rejected_not_hung(capsys, tmp_path):
    path = tmp_path / "run.json"
    code, _, _ = _cli(capsys, "simulate", "llama-3.1-8b", "--qps", "inf", "--num-requests", "5",
                      "--prompt", "40", "--output", "8", "--num-blocks", "2", "--block-size",
                      "16", "--json", str(path))
    run = json.loads(path.read_text())
    assert code == 0 and run["rejected"] == 5 and run["completed"] == 0 and run["steps"] == 0
    assert run["ttft"]["p50"] is None


def test_model_not_in_db_is_one_line_listing_the_db(capsys):
    line = _one_line_error(capsys, "simulate", "gpt-9", "--qps", "1")
    assert "gpt-9" in line and "llama-3.1-8b" in line and "qwen3-8b" in line
    # Never profiled on the paged engine: captured here, it lacks only its own whole-forward
    # host unit.
    line = _one_line_error(capsys, "simulate", "qwen3-8b", "--engine", "paged", "--qps", "1")
    assert "qwen3-8b: 1 of its unit signatures has no fit" in line and "(engine:forward)" in line
    line = _one_line_error(capsys, "simulate", "llama-3.1-8b", "--device", "cpu", "--qps", "1")
    assert "no cpu environment" in line and "H100" in line


def test_malformed_trace_and_oversized_model_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,abc,3\n")
    line = _one_line_error(capsys, "simulate", "llama-3.1-8b", "--trace", str(bad))
    assert "bad.csv:3" in line and "num_prefill_tokens" in line
    line = _one_line_error(capsys, "simulate", "llama-3.1-70b", "--qps", "1")
    assert "does not fit" in line


# --- weights and KV-cache sizing -----------------------------------------------------------


def _hand_made_db(path: Path, tied: bool) -> LatencyDB:
    """A model of 2 layers, hidden 8, vocab 16, in two sliding-window regimes."""
    db = LatencyDB.open(path)
    db.add_environment("env", "gpu", {"device_type": "cuda", "memory_gib": 1.0})
    sigs = {
        "emb": ("embedding", {"inputs": [["bfloat16", [16, 8]], ["int64", ["m"]]]}),
        "norm": ("norm", {"inputs": [["bfloat16", ["m", 8]], ["float32", [8]]]}),
        "qkv": ("gemm", {"inputs": [["bfloat16", ["m", 8]], ["bfloat16", [24, 8]],
                                    ["bfloat16", [24]]]}),
        "attn": ("attention", {"inputs": [["bfloat16", ["B", "S", 8]], ["bfloat16", [0]],
                                          ["symint", ["P"]], ["bfloat16", [1, "S", 4]]]}),
        "head": ("lm_head", {"inputs": [["bfloat16", ["m", 8]], ["bfloat16", [16, 8]]]}),
    }
    db.add_signatures((k, kind, json.dumps({"kind": kind, **c})) for k, (kind, c) in sigs.items())
    units = [(regime, role, key, count) for regime in ("window<", "window>=") for role, key, count
             in (("embed_tokens", "emb", 1), ("layers.*.norm", "norm", 2), ("qkv", "qkv", 2),
                 ("attn", "attn", 2), ("lm_head", "head", 1))]
    db.set_model("toy", "env", ENGINE, {"tie_word_embeddings": tied},
                 [("prefill", regime, role, key, count, {}) for regime, role, key, count in units]
                 + [("decode", "", "extra", "qkv", 5, {})])
    return db


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_exact_on_a_hand_made_model(tmp_path, tied):
    with _hand_made_db(tmp_path / "toy.db", tied) as db:
        got = weight_bytes(db, "toy", "env", ENGINE)
    emb, norm, qkv, head = 16 * 8 * 2, 8 * 4, (24 * 8 + 24) * 2, 16 * 8 * 2
    # One regime counted; decode units ignored; a tied LM head reads the embedding's matrix.
    assert got == emb + 2 * norm + 2 * qkv + (0 if tied else head)
    assert unit_weight_bytes({"inputs": [["bfloat16", ["B", "S", 8]], ["symint", []]]}) == 0


def test_kv_bytes_per_token_and_cache_blocks():
    qwen = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "hidden_size": 3584}  # no head_dim: hidden / heads = 128
    assert kv_bytes_per_token(qwen, "bfloat16") == 2 * 28 * 4 * 128 * 2
    assert kv_bytes_per_token({**qwen, "head_dim": 64}, "float32") == 2 * 28 * 4 * 64 * 4
    sizing = size_kv_cache("m", 1000.0, 0.5, 100, 10, 4)
    assert sizing.num_blocks == (500 - 100) // 40 and sizing.cache_bytes == 400
    with pytest.raises(UserError, match="does not fit"):
        size_kv_cache("m", 1000.0, 0.5, 480, 10, 4)
    with pytest.raises(UserError, match="kv_bytes|num_hidden_layers"):
        kv_bytes_per_token({"hidden_size": 8}, "bfloat16")
    # Two layer groups: a block holds one group's layers, so twice as many fit.
    assert size_kv_cache("m", 1000.0, 0.5, 100, 10, 4, groups=2).num_blocks == 400 // 20


def test_cache_layout_is_transformers_grouping():
    from dooly_fx.spec import resolve_model

    layouts = {m: cache_layout(resolve_model(m).config.to_dict())
               for m in ("llama-3.1-8b", "gemma-2-9b", "phi-3-mini", "command-r7b")}
    assert layouts == {
        "llama-3.1-8b": {"full_groups": 1, "sliding_groups": 0, "sliding_window": 0},
        "gemma-2-9b": {"full_groups": 1, "sliding_groups": 1, "sliding_window": 4096},
        "phi-3-mini": {"full_groups": 0, "sliding_groups": 1, "sliding_window": 2047},
        "command-r7b": {"full_groups": 1, "sliding_groups": 3, "sliding_window": 4096}}


# --- export-vidur from a tiny CPU profile ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    """A real CPU profile (tiny Llama, every phase) with its fits."""
    from dooly_fx.engine import EngineProfile
    from dooly_fx.predict import fit_db
    from dooly_fx.profile import collect, environment, profile, record_models
    from dooly_fx.sweep import Bounds

    path = tmp_path_factory.mktemp("tiny") / "cpu.db"
    spec = tiny_spec("llama-3.1-8b")
    coll = collect([spec], EngineProfile(), ["prefill", "decode", "mixed"])
    with LatencyDB.open(path) as db:
        env = environment("cpu")
        result = profile(db, coll, env, Bounds(16, 2, 64), "cpu", "test", budget_ms=(1.0, 2.0))
        assert result.failed == 0
        record_models(db, coll, env)
        fit_db(db, env.fingerprint)
    return path, spec.name


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_export_vidur_headers_times_and_agreement_with_predict(tiny_db, tmp_path, capsys):
    from dooly_fx.predict import load, predict_step

    db_path, model = tiny_db
    out = tmp_path / "h100" / "tiny"  # parents created
    code, text, _ = _cli(capsys, "export-vidur", model, "--db", str(db_path), "--device", "cpu",
                         "--out", str(out), "--max-tokens", "256", "--max-batch-size", "4")
    assert code == 0 and "mlp_up_proj" in text
    mlp_header, mlp = _rows(out / "mlp.csv")
    attn_header, attn = _rows(out / "attention.csv")
    with VIDUR_MLP.open() as fh:
        assert mlp_header == next(csv.reader(fh))
    assert attn_header == attention_header()
    assert attn_header[:25:5] == [f"time_stats.{op}.min" for op in (
        "attn_input_reshape", "attn_kv_cache_save", "attn_prefill", "attn_decode",
        "attn_output_reshape")]
    assert [int(r["num_tokens"]) for r in mlp] == num_tokens_grid(256)
    mapped = ("emb", "input_layernorm", "attn_pre_proj", "attn_post_proj",
              "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
    assert all(float(r[f"time_stats.{op}.median"]) > 0 for r in mlp for op in mapped)
    assert {r["n_embd"] for r in mlp} == {"64"} and {r["use_gated_mlp"] for r in mlp} == {"True"}
    prefills = [r for r in attn if r["is_prefill"] == "True"]
    decodes = [r for r in attn if r["is_prefill"] == "False"]
    assert any(int(r["kv_cache_size"]) > 0 for r in prefills)  # chunked prefills
    assert all(float(r["time_stats.attn_prefill.median"]) > 0 for r in prefills)
    assert all(float(r["time_stats.attn_decode.median"]) > 0 for r in decodes)
    assert {int(r["batch_size"]) for r in decodes} == {1, 2, 3, 4}

    # Every mlp row is `predict` of the same units at one sequence of num_tokens new tokens,
    # per layer; attention rows are the units of the matching step whose latency depends on
    # more than the token count.
    with LatencyDB.open(db_path, create=False) as db:
        (env,) = db.environments()
        loaded = load(db, model, env["fingerprint"], ENGINE)
    layers = loaded.config["num_hidden_layers"]
    ops = {"attn_pre_proj": ("q_proj", "k_proj", "v_proj"), "attn_post_proj": ("o_proj",),
           "mlp_up_proj": ("gate_proj", "up_proj"), "mlp_act": ("act_fn",),
           "mlp_down_proj": ("down_proj",), "input_layernorm": ("input_layernorm",)}
    for row in (mlp[0], mlp[4], mlp[-1]):
        step = predict_step(loaded, [(int(row["num_tokens"]), 0)])
        for op, leaves in ops.items():
            want = sum(u.count * u.gpu_ms for u in step.units
                       if u.role.rsplit(".", 1)[-1] in leaves) / layers
            assert float(row[f"time_stats.{op}.median"]) == pytest.approx(want, rel=1e-9)
        emb = sum(u.gpu_ms for u in step.units if u.kind == "embedding")
        assert float(row["time_stats.emb.median"]) == pytest.approx(emb, rel=1e-9)
    for row in (decodes[0], decodes[-1]):
        batch = [(1, int(row["kv_cache_size"]))] * int(row["batch_size"])
        step = predict_step(loaded, batch)
        want = sum(u.count * u.gpu_ms for u in step.units
                   if set(u.point) - {"m", "skew"}) / layers
        assert float(row["time_stats.attn_decode.median"]) == pytest.approx(want, rel=1e-9)


def test_export_vidur_from_a_paged_profile_follows_the_token_count(tmp_path, capsys):
    """Regression: a paged profile binds its units to (T, N, P); rows predicted at (B, S, P)
    gave every num_tokens the 1-token time, and the paged capture's rotary unit was dropped."""
    from dooly_fx.predict import load, predict_step

    out = tmp_path / "paged"
    code, _, _ = _cli(capsys, "export-vidur", "llama-3.1-8b", "--engine", "paged", "--out",
                      str(out), "--max-tokens", "128", "--max-batch-size", "4", "--block-size",
                      "256")
    assert code == 0
    _, mlp = _rows(out / "mlp.csv")
    _, attn = _rows(out / "attention.csv")
    with LatencyDB.open(SHIPPED_DB, create=False, readonly=True) as db:
        loaded = load(db, "llama-3.1-8b", H100_ENV, "paged|sdpa|bfloat16")
    layers = loaded.config["num_hidden_layers"]
    ops = {"attn_pre_proj": ("q_proj", "k_proj", "v_proj"),
           "attn_rope": ("self_attn:apply_rotary_pos_emb",),
           "mlp_up_proj": ("gate_proj", "up_proj"), "mlp_down_proj": ("down_proj",)}
    for row in mlp:
        step = predict_step(loaded, [(int(row["num_tokens"]), 0)])
        for op, leaves in ops.items():
            want = sum(u.count * u.gpu_ms for u in step.units
                       if u.role.rsplit(".", 1)[-1] in leaves) / layers
            assert float(row[f"time_stats.{op}.median"]) == pytest.approx(want, rel=1e-9)
    first, last = mlp[0], mlp[-1]
    assert (first["num_tokens"], last["num_tokens"]) == ("1", "128")
    for op in ops:
        assert float(last[f"time_stats.{op}.median"]) > float(first[f"time_stats.{op}.median"])
    assert {r["block_size"] for r in attn} == {"256"}
    for row in attn:
        chunk, cached = int(row["prefill_chunk_size"]), int(row["kv_cache_size"])
        prefill = row["is_prefill"] == "True"
        batch = [(chunk, cached)] if prefill else [(1, cached)] * int(row["batch_size"])
        step = predict_step(loaded, batch)
        want = sum(u.count * u.gpu_ms for u in step.units
                   if set(u.point) - {"m", "skew"}) / layers
        column = "attn_prefill" if prefill else "attn_decode"
        assert float(row[f"time_stats.{column}.median"]) == pytest.approx(want, rel=1e-9)
    empty = tmp_path / "empty"
    line = _one_line_error(capsys, "export-vidur", "llama-3.1-8b", "--out", str(empty),
                           "--max-tokens", "32")
    assert "Vidur's attention grid has no point below it" in line and not empty.exists()


def test_vidur_grids_match_vidur():
    with VIDUR_MLP.open() as fh:
        tokens = sorted({int(r["num_tokens"]) for r in csv.DictReader(fh)})
    assert num_tokens_grid(4096) == tokens
    assert num_tokens_grid(10) == [1, 2, 4, 8]


def test_simulate_on_a_cpu_profile_needs_the_cache_size(tiny_db, tmp_path, capsys):
    db_path, model = tiny_db
    args = ("simulate", model, "--db", str(db_path), "--device", "cpu", "--qps", "50",
            "--num-requests", "10", "--prompt", "uniform:4:16", "--output", "4")
    assert "--num-blocks" in _one_line_error(capsys, *args)
    path = tmp_path / "run.json"
    code, _, _ = _cli(capsys, *args, "--num-blocks", "4", "--block-size", "16", "--json",
                      str(path))
    run = json.loads(path.read_text())
    assert code == 0 and run["completed"] == 10 and run["kv_cache"]["source"] == "--num-blocks"
    _ordered(run["ttft"])


# --- validate-serving: the real engine on CPU, then simulate ---------------------------------


def test_validate_serving_serves_every_token_and_replays_the_same_report(tiny_db, tmp_path,
                                                                        capsys):
    """transformers continuous batching serves a tiny model (built from the config the DB
    recorded); the recorded steps account for every prompt and output token, and --measured
    recomputes the same comparison without the engine."""
    import gc

    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    hooks = list(gc.callbacks)
    db_path, model = tiny_db
    path, again = tmp_path / "serve.json", tmp_path / "again.json"
    code, _, _ = _cli(capsys, "validate-serving", model, "--db", str(db_path), "--device", "cpu",
                      "--qps", "40", "--num-requests", "6", "--prompt", "uniform:4:24",
                      "--output", "uniform:2:6", "--num-blocks", "8", "--block-size", "16",
                      "--max-batch-tokens", "32", "--json", str(path))
    run = json.loads(path.read_text())
    measured = run["measured"]
    reqs = measured["requests"]
    assert code == 0 and run["finished"] == 6 and not run["timed_out"]
    assert run["settings"]["num_blocks"] == 8 and run["settings"]["max_batch_tokens"] == 32
    assert all(r["generated"] == r["output_tokens"] and r["error"] is None for r in reqs)
    # Every prompt token and every output token but the last is fed through some step.
    fed = sum(sum(s["new"]) for s in measured["steps"])
    assert fed == sum(r["prompt_tokens"] + r["output_tokens"] - 1 for r in reqs)
    assert all(sum(s["new"]) <= 32 for s in measured["steps"])
    # paged|sdpa: every forward's attention calls timed on the host, the wrapper gone after.
    assert run["engine"] == "paged|sdpa|bfloat16"
    assert all(0 < s["attention_max_ms"] <= s["attention_host_ms"] for s in measured["steps"])
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    # The collector's pauses timed per step, its hook gone after.
    assert run["settings"]["garbage_collector"] is True and gc.callbacks == hooks
    assert all(s["gc_ms"] >= 0 for s in measured["steps"])
    assert run["steps"]["measured_ms"]["gc"] >= 0
    assert run["ttft"]["requests"] == 6 and run["ttft"]["mape"] >= 0
    assert run["steps"]["steps"] == len(measured["steps"])
    # The simulator's scheduler, given the engine's own step durations, forms the engine's
    # batches one for one (chunked prompts, a cache of 8 blocks); its request times differ
    # only where the engine sat idle (the wait counts in the step before it).
    lock = run["scheduler"]
    assert lock["steps"] == lock["simulated_steps"] == lock["matched"] == len(measured["steps"])
    assert lock["first_mismatch"] is None and lock["ttft_mape"] < 0.05
    served = Served.from_json(measured)
    assert lockstep(served, served.scheduler()) == lock
    # A scheduler with another token budget chunks the first long prompt differently.
    tight = lockstep(served, replace(served.scheduler(), max_batch_tokens=3))
    assert tight["first_mismatch"] == 0 and tight["matched"] < tight["steps"]
    kinds = {k["kind"]: k["steps"] for k in run["steps"]["by_kind"]}
    assert sum(kinds.values()) == len(measured["steps"])
    assert kinds.get("decode only", 0) == sum(all(n == 1 for n in s["new"])
                                              for s in measured["steps"])
    # The host probe after the first step and every PROBE_EVERY steps; the prediction is for
    # the run's mean probe (stalls clipped), and also made at the DB's own speed.
    probes = [s["host_probe_ms"] for s in measured["steps"]]
    assert [i for i, x in enumerate(probes) if x is not None] == \
        list(range(0, len(probes), PROBE_EVERY))
    host = run["host_speed"]
    assert host["probes"] == len(range(0, len(probes), PROBE_EVERY))
    taken = [x for x in probes if x]
    cap = 2 * np.median(taken)
    assert host["run_probe_ms"] == pytest.approx(np.mean(np.minimum(taken, cap)))
    assert 0 <= host["elasticity"] <= 1
    assert host["host_scale"] == pytest.approx(
        (host["run_probe_ms"] / host["db_probe_ms"]) ** host["elasticity"])
    assert host["at_db_speed"]["ttft_mape"] >= 0
    code, _, _ = _cli(capsys, "validate-serving", model, "--db", str(db_path), "--device", "cpu",
                      "--measured", str(path), "--json", str(again))
    replay = json.loads(again.read_text())
    assert code == 0
    assert (replay["ttft"], replay["tpot"], replay["steps"]) == \
        (run["ttft"], run["tpot"], run["steps"])
    # A measurement from before probes is predicted at the DB's own speed.
    for step in run["measured"]["steps"]:
        del step["host_probe_ms"]
    old = tmp_path / "unprobed.json"
    old.write_text(json.dumps(run))
    code, _, _ = _cli(capsys, "validate-serving", model, "--db", str(db_path), "--device", "cpu",
                      "--measured", str(old), "--json", str(again))
    unprobed = json.loads(again.read_text())["host_speed"]
    assert code == 0 and unprobed["run_probe_ms"] is None and unprobed["host_scale"] == 1.0
    assert "at_db_speed" not in unprobed


def test_validate_serving_needs_a_workload_and_a_real_measurement(tiny_db, tmp_path, capsys):
    db_path, model = tiny_db
    base = ("validate-serving", model, "--db", str(db_path), "--device", "cpu")
    assert "--trace CSV or --qps X" in _one_line_error(capsys, *base)
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"measured": {"model": "x"}}')
    assert "not a validate-serving" in _one_line_error(capsys, *base, "--measured", str(bogus))


def test_forget_marks_a_kind_to_be_measured_again(tiny_db, tmp_path, capsys):
    """`forget --kind norm` marks exactly the model's norm points (status failed, no attempts,
    old timing kept), fits then skip them, and a user mistake is one line."""
    import shutil

    path = tmp_path / "copy.db"
    shutil.copy(tiny_db[0], path)
    with LatencyDB.open(path, create=False, readonly=True) as db:
        env = db.environments()[-1]["fingerprint"]
        norms = {u["signature"] for u in db.model_units(tiny_db[1], env, "padded|sdpa|bfloat16")
                 if db.signature(u["signature"])["kind"] == "norm"}
        expected = sum(len(db.ok_points(env, s)) for s in norms)
    code, out, _ = _cli(capsys, "forget", tiny_db[1], "--db", str(path), "--kind", "norm",
                        "--device", "cpu")
    assert code == 0 and out.startswith(f"{expected} points of {len(norms)} signatures")
    with LatencyDB.open(path, create=False, readonly=True) as db:
        rows = [r for (sig, _), r in db.point_status(env).items() if sig in norms]
        assert len(rows) == expected and norms and expected > 0
        assert all(r["status"] == "failed" and r["attempts"] == 0 and r["median_ms"] > 0
                   for r in rows)
        assert all(not db.ok_points(env, s) for s in norms)
    before = path.read_bytes()
    line = _one_line_error(capsys, "forget", tiny_db[1], "--db", str(path), "--kind", "norm",
                           "--kind", "moe", "--device", "cpu")  # one kind it lacks: none marked
    assert line.startswith(f"error: no unit of kind moe in {tiny_db[1]} (their kinds: ")
    assert "norm" in line
    assert path.read_bytes() == before


def test_a_garbage_collection_inside_a_step_is_charged_to_it():
    """The step clock adds each collection that begins between a step's batch preparation
    and its update to that step (`gc_ms`), and none to a step without one."""
    import gc
    import time
    from types import SimpleNamespace

    from dooly_fx.validate_serving import _StepClock

    seq = SimpleNamespace(query_length=1, state=SimpleNamespace(position_offset=9))
    collect = [True, False]

    def step(model):
        if collect.pop(0):
            gc.collect()
        time.sleep(0.001)

    processor = SimpleNamespace(
        prepare_next_batch=lambda: True, _generation_step=step, update_batch=lambda: None,
        inputs_and_outputs=SimpleNamespace(requests_in_batch=[seq]))
    steps = []
    clock = _StepClock(processor, steps)
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection in the second step
    try:
        for _ in range(2):
            processor.prepare_next_batch()
            processor._generation_step(None)
            processor.update_batch()
    finally:
        clock.restore()
        if enabled:
            gc.enable()
    assert [s.batch for s in steps] == [[(1, 8)], [(1, 8)]]
    assert steps[0].gc_ms > 0 and steps[1].gc_ms == 0.0
    assert clock._collection not in gc.callbacks
