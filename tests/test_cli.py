"""`python -m dooly_fx` verbs: contracts, tables, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

from dooly_fx.cli import main

from tiny import tiny_fields


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dooly_fx", *args], capture_output=True,
                          text=True, timeout=600)


def _write_config(tmp_path, name: str, **overrides) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(tiny_fields(name, **overrides)))
    return str(path)


def test_capture_json_contract(tmp_path):
    config = _write_config(tmp_path, "llama-3.1-8b")
    out = tmp_path / "report.json"
    assert main(["capture", config, "--phase", "all", "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    (model,) = data["models"]
    assert model["model"] == config
    assert [p["phase"] for p in model["phases"]] == ["prefill", "decode", "mixed"]
    for phase in model["phases"]:
        for unit in phase["units"]:
            assert len(unit["signature"]) == 64 and int(unit["signature"], 16) >= 0
            assert unit["count"] >= 1 and unit["kind"]
    summary = model["summary"]
    assert summary["unlabelled_dims"] == 0
    assert summary["unique_signatures"] == len(
        {u["signature"] for p in model["phases"] for u in p["units"]})
    assert summary["capture_seconds"] > 0


def test_capture_prints_tables_and_shared(tmp_path):
    llama = _write_config(tmp_path, "llama-3.1-8b")
    mistral = _write_config(tmp_path, "mistral-7b")
    result = _run("capture", llama, mistral, "--phase", "decode", "--shared")
    assert result.returncode == 0, result.stderr
    assert "signatures shared across models" in result.stdout
    assert "model.layers.*.self_attn.q_proj" in result.stdout
    assert "head_dim*num_key_value_heads=32" in result.stdout


def test_zoo_lists_models():
    result = _run("zoo")
    assert result.returncode == 0
    for name in ("llama-3.1-8b", "mixtral-8x7b", "gemma-2-9b", "qwen2.5-72b"):
        assert name in result.stdout


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_model_suggests_close_matches():
    line = _one_line_error(_run("capture", "llama-3-8b"))
    assert "unknown model 'llama-3-8b'" in line and "llama-3.1-8b" in line


def test_malformed_and_incomplete_configs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "bad.json" in _one_line_error(_run("capture", str(bad)))
    fields = tiny_fields("llama-3.1-8b")
    del fields["hidden_size"]
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps(fields))
    assert "hidden_size" in _one_line_error(_run("capture", str(incomplete)))


def test_uncapturable_architecture_names_the_stage(tmp_path):
    # ALBERT's config has every field the capture needs, but it is an encoder: transformers
    # has no causal-LM class for it.
    config = tmp_path / "albert.json"
    config.write_text(json.dumps({"model_type": "albert", "hidden_size": 64,
                                  "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "vocab_size": 256}))
    line = _one_line_error(_run("capture", str(config)))
    assert "build failed" in line


def test_bad_flag_values_exit_2_with_one_line(capsys):
    for args, message in [
            (("capture", "llama-3.1-8b", "--phase", "sideways"), "invalid choice"),
            (("simulate",), "the following arguments are required: MODEL"),
            (("profile", "llama-3.2-1b", "--rep-ms", "nan"),
             "--rep-ms: expected a positive number, got 'nan'"),
            (("profile", "llama-3.2-1b", "--warmup-ms", "-1"), "--warmup-ms: expected a number"),
            (("predict", "llama-3.2-1b", "--batch", "decode:1x8", "--skew", "nan"),
             "--skew: expected a number >= 0"),
            (("validate-steps", "llama-3.2-1b", "--reps", "0"),
             "--reps: expected a positive integer, got '0'")]:
        assert main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_outputs_that_would_replace_an_input_or_cannot_be_written_are_refused(tmp_path,
                                                                              capsys):
    """Checked before any work: the DB, the trace and the folders are left as they were."""
    from dooly_fx.db import LatencyDB

    db = tmp_path / "lat.db"
    LatencyDB.open(db).close()
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,8,2\n")
    before = db.read_bytes(), trace.read_bytes()
    for args, message in [
            (("fit", "--db", str(db), "--json", str(db)),
             f"--json {db} is the file given to --db; write to another file"),
            (("simulate", "m", "--trace", str(trace), "--chrome-trace", str(trace)),
             "is the file given to --trace"),
            (("zoo", "--json", str(tmp_path)), "give a file name, not a folder"),
            (("zoo", "--json", str(db / "x.json")), f"{db} is not a folder"),
            (("simulate", "m", "--qps", "1", "--plot", str(tmp_path / "p.txt")),
             "name a .png, .svg, .pdf file"),
            (("coverage", "m", "--db", str(db), "--html", str(db)), "not a folder")]:
        assert main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert (db.read_bytes(), trace.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.db", "t.csv"]


def test_json_to_missing_folder_is_a_user_error(tmp_path):
    config = _write_config(tmp_path, "llama-3.1-8b")
    line = _one_line_error(_run("capture", config, "--phase", "decode",
                                "--json", str(tmp_path / "nope" / "out.json")))
    assert "does not exist" in line
