"""Vidur (PyPI `vidur==0.0.26`) driven by our exported profiles, against the GPU serving run it
replays and against our own simulator on the same requests.

    python bench/vidur_dropin.py
    python bench/vidur_dropin.py --venv /tmp/vidur-venv   # create once, reuse afterwards
    python bench/vidur_dropin.py --run bench/results/serving/serving_llama-3.1-8b_sdpa.json \\
        --estimators 50 --max-depth 16 --cv 3 --keep /tmp/vidur-work

Steps (CPU only; the shipped DB `dooly_fx/data/h100.db.gz` is only read):

1. A virtualenv with `pip install vidur==0.0.26` from PyPI: a fresh one in a temp folder, or
   `--venv DIR` (created there if missing, reused when it already has that version).
2. `python -m dooly_fx export-vidur MODEL --engine E --attn A --dtype D` from the shipped DB, for
   the engine profile our simulator replays the run with, at the run's block size, with
   `--max-tokens` = the run's token budget per step (every step of the run fits in Vidur's
   `num_tokens` range) and decode batches up to the number of requests.
3. The files placed where Vidur 0.0.26 looks for them. That code line fetches its profiles with
   `huggingface_hub.snapshot_download(repo_id, repo_type="dataset", cache_dir=...)`, so they go
   into a local hub-cache layout under the predictor's `cache_dir`:
   `profiling_data/compute/datasets--ORG--NAME/snapshots/<40 hex>/{config.json, mlp.csv.xz,
   attention.csv.xz}` with `refs/main` holding that hash, and the same under
   `profiling_data/network/` for `{config.json, all_reduce.csv.xz, send_recv.csv.xz}`;
   `HF_HUB_OFFLINE=1` makes the hub client answer from there. The network files are minimal
   placeholders (one row each, 0 ms): Vidur reads them only for tensor parallelism > 1 or
   pipeline stages > 1, and this run has one GPU. Its attempt to fetch precomputed predictions
   (`_load_predictions_from_hf`) fails offline with `LocalEntryNotFoundError`, which it logs and
   catches, and it trains its random forests instead. `HF_HOME` points into the work folder, so
   no user cache or token is read.
4. Vidur's simulator (`python -m vidur.main`, `WANDB_MODE=disabled`, no plots, no Chrome trace)
   replays the run's requests (trace replay: arrival = when the engine received each request,
   as `validate-serving` replays them) with the Sarathi scheduler at the run's token budget,
   sequence cap, block size and block count, for the Vidur model preset of the same shapes.
   Twice: cold (trains its predictors: the whole cost) and warm (same cache: predictors and
   their prediction tables reused, i.e. start-up and simulation).
5. Ours: `python -m dooly_fx validate-serving MODEL --measured RUN` (no `--db`: the shipped DB),
   the replay `bench/validate_serving_report.py` runs, which simulates the same requests with
   the run's engine settings.
6. Per request: TTFT and TPOT of the GPU run, of ours and of Vidur. Vidur's TTFT is its
   `prefill_e2e_time` (arrival to the end of the prefill, which yields the first token); its
   TPOT is (`request_e2e_time` - `prefill_e2e_time`) / (output tokens - 1), the definition of
   the measurement and of our simulator (Vidur's own `decode_time_execution_plus_preemption_
   normalized` divides by all output tokens). MAPE over requests and p50/p90 errors use
   `dooly_fx.validate_serving`'s metric, as `validate-serving` reports them.

Writes `bench/results/vidur_dropin.{json,md}` and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import lzma
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dooly_fx.hostinfo import cpu_name  # noqa: E402
from dooly_fx.validate_serving import _metric, _num  # noqa: E402

DEFAULT_RUN = ROOT / "bench" / "results" / "serving" / "serving_llama-3.1-8b_sdpa.json"
VIDUR_VERSION = "0.0.26"
VIDUR_MODELS = {"llama-3.1-8b": "meta-llama/Llama-3-8B"}
"""Our model name -> Vidur 0.0.26's model preset of the same shapes (checked at run time)."""
VIDUR_DEVICES = {"H100": ("h100", "h100_dgx")}
"""A word of the GPU's name -> Vidur's (device, network device)."""
COMPUTE_REPO = "dooly-fx/{model}-export"
NETWORK_REPO = "dooly-fx/network-unused"
TRACE_DATE = "2023-08-21"
"""Any date: Vidur's trace replay keeps the rows of one `Date`."""
KV_GRANULARITY = 256
"""Vidur's default `kv_cache_prediction_granularity` (contexts are looked up rounded up to it)."""
DECODE_BATCHING_OVERHEAD = 0.1
"""Vidur's default `attention_decode_batching_overhead_fraction` (GQA decode batches)."""
WATERMARK = 0.01
"""Vidur's default `watermark_blocks_fraction` (blocks kept free when admitting a request)."""
VIDUR_PACKAGES = ("vidur", "scikit-learn", "pandas", "numpy", "huggingface_hub", "torch",
                  "transformers")
OUR_PACKAGES = ("numpy", "torch", "transformers", "rich")

console = Console(width=200) if not sys.stdout.isatty() else Console()


# --- environments ----------------------------------------------------------------------------


def _run(command: list[str], log: Path, what: str, **kw) -> float:
    """Run `command` with its output into `log`; exit with the log's tail if it fails.
    Returns the wall time in seconds."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, **kw)
    wall = time.perf_counter() - t0
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        sys.exit(f"{what} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    return wall


def _versions(python: str, packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of `packages` in the interpreter `python` (None: not installed)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n"
            "    try:\n        return m.version(p)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def venv_with_vidur(folder: Path, log: Path) -> tuple[str, dict]:
    """(python of a virtualenv in `folder` that has vidur==VIDUR_VERSION, how it was made)."""
    python = folder / "bin" / "python"
    made = {"created": False, "installed": False, "install_s": None}
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        made["created"] = True
    if _versions(str(python), ("vidur",))["vidur"] != VIDUR_VERSION:
        made["install_s"] = round(_run(
            [str(python), "-m", "pip", "install", f"vidur=={VIDUR_VERSION}"], log,
            f"pip install vidur=={VIDUR_VERSION}"), 1)
        made["installed"] = True
    return str(python), made


def vidur_model_dims(python: str, name: str) -> dict:
    """Vidur's preset `name` (layers, heads, widths, vocabulary) as its own config reports it."""
    code = ("import dataclasses, json, sys\n"
            "from vidur.config.model_config import BaseModelConfig\n"
            "c = BaseModelConfig.create_from_name(sys.argv[1])\n"
            "print(json.dumps(dataclasses.asdict(c), default=str))")
    done = subprocess.run([python, "-c", code, name], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"Vidur has no model preset {name!r}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Vidur's inputs ----------------------------------------------------------------------------


def _hub_dataset(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """`files` as the snapshot of dataset `repo` in a hub cache at `cache`; returns its folder.
    The snapshot's name (a commit hash to the hub client) is the SHA-1 of the contents."""
    org, name = repo.split("/")
    store = cache / f"datasets--{org}--{name}"
    digest = hashlib.sha1()
    for fname in sorted(files):
        digest.update(fname.encode() + b"\0" + files[fname])
    commit = digest.hexdigest()
    snapshot = store / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (snapshot / fname).write_bytes(data)
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / "main").write_text(commit)  # no newline: read back verbatim
    return snapshot


def place_profiles(cache_dir: Path, export: Path, model: str, vidur_model: str,
                   device: str, network: str) -> dict:
    """Our CSVs and the network placeholders where Vidur 0.0.26's `_get_input_files` finds them
    offline; returns the repos and snapshot folders."""
    compute_repo = COMPUTE_REPO.format(model=model)
    compute = _hub_dataset(cache_dir / "profiling_data" / "compute", compute_repo, {
        "config.json": json.dumps({"model": vidur_model, "device_sku": device}).encode(),
        "mlp.csv.xz": lzma.compress((export / "mlp.csv").read_bytes()),
        "attention.csv.xz": lzma.compress((export / "attention.csv").read_bytes())})
    # Read only with tensor parallelism > 1 (all_reduce) or pipeline stages > 1 (send_recv).
    all_reduce = ("num_workers,devices_per_node,collective,size,time_stats.all_reduce.median\n"
                  "1,1,all_reduce,8192,0.0\n")
    send_recv = "devices_per_node,collective,size,time_stats.send_recv.median\n" \
                "2,send_recv,8192,0.0\n"
    network_dir = _hub_dataset(cache_dir / "profiling_data" / "network", NETWORK_REPO, {
        "config.json": json.dumps({"sku": network}).encode(),
        "all_reduce.csv.xz": lzma.compress(all_reduce.encode()),
        "send_recv.csv.xz": lzma.compress(send_recv.encode())})
    return {"compute_repo": compute_repo, "network_repo": NETWORK_REPO,
            "compute_snapshot": str(compute), "network_snapshot": str(network_dir)}


def write_trace(path: Path, requests: list[dict]) -> None:
    """Vidur's trace-replay CSV: one row per request, arrival = when the engine received it."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Date", "Time", "PromptTokenCount", "CompletionTokenCount"])
        for r in requests:
            writer.writerow([TRACE_DATE, repr(r["submitted_s"]), r["prompt_tokens"],
                             r["output_tokens"]])


def vidur_args(a: dict) -> list[str]:
    """`python -m vidur.main` arguments for the settings in `a`."""
    rf = "--random_forrest_execution_time_predictor_config_"
    trace = "--trace_request_generator_config_"
    pairs = [
        ("--replica_config_model_name", a["model"]),
        ("--replica_config_device", a["device"]),
        ("--replica_config_network_device", a["network_device"]),
        ("--replica_config_tensor_parallel_size", 1),
        ("--replica_config_num_pipeline_stages", 1),
        ("--cluster_config_num_replicas", 1),
        ("--replica_scheduler_config_type", "sarathi"),
        ("--sarathi_scheduler_config_chunk_size", a["chunk_size"]),
        ("--sarathi_scheduler_config_batch_size_cap", a["batch_size_cap"]),
        ("--cache_config_block_size", a["block_size"]),
        ("--cache_config_num_blocks", a["num_blocks"]),
        ("--cache_config_watermark_blocks_fraction", WATERMARK),
        ("--request_generator_config_type", "trace_replay"),
        (trace + "trace_file", a["trace"]),
        (trace + "date", TRACE_DATE),
        (trace + "prefill_scale_factor", 1),
        (trace + "decode_scale_factor", 1),
        (trace + "time_scale_factor", 1),
        (trace + "max_tokens", a["max_request_tokens"]),
        ("--execution_time_predictor_config_type", "random_forrest"),
        (rf + "model_profiling_dataset", a["compute_repo"]),
        (rf + "network_profiling_dataset", a["network_repo"]),
        (rf + "cache_dir", a["cache_dir"]),
        (rf + "num_estimators", a["estimators"]),
        (rf + "max_depth", a["max_depth"]),
        (rf + "min_samples_split", a["min_samples_split"]),
        (rf + "k_fold_cv_splits", a["cv"]),
        (rf + "prediction_max_tokens_per_request", a["max_tokens"]),
        (rf + "prediction_max_prefill_chunk_size", a["max_prefill_chunk"]),
        (rf + "prediction_max_batch_size", a["max_batch"]),
        (rf + "kv_cache_prediction_granularity", KV_GRANULARITY),
        (rf + "attention_decode_batching_overhead_fraction", DECODE_BATCHING_OVERHEAD),
        ("--metrics_config_output_dir", a["output_dir"]),
    ]
    flags = ["--no-metrics_config_store_plots", "--no-metrics_config_enable_chrome_trace",
             "--no-metrics_config_store_utilization_metrics",
             "--metrics_config_keep_individual_batch_metrics"]
    return [str(x) for pair in pairs for x in pair] + flags


def run_vidur(python: str, args: dict, work: Path, name: str) -> tuple[float, Path, str]:
    """One `python -m vidur.main` run in `work`; (wall s, its output folder, its log text)."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    args = dict(args, output_dir=out)
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               HF_HOME=str(work / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    log = work / f"{name}.log"
    wall = _run([python, "-m", "vidur.main", *vidur_args(args)], log, f"Vidur ({name})",
                cwd=work, env=env)
    (folder,) = [p.parent for p in out.glob("*/request_metrics.csv")]
    return wall, folder, log.read_text()


def read_vidur(folder: Path, requests: list[dict]) -> dict:
    """Per-request TTFT/TPOT (seconds, in `requests` order) and per-step times of one run."""
    with (folder / "request_metrics.csv").open(newline="") as fh:
        rows = {int(r["Request Id"]): r for r in csv.DictReader(fh)}
    if len(rows) != len(requests):
        sys.exit(f"Vidur finished {len(rows)} of {len(requests)} requests ({folder})")
    ttft, tpot, restarts = [], [], 0
    for i, req in enumerate(requests):  # Vidur numbers the trace's rows 0, 1, ...
        row = rows[i]
        if (int(row["request_num_prefill_tokens"]), int(row["request_num_decode_tokens"])) != \
                (req["prompt_tokens"], req["output_tokens"]):
            sys.exit(f"Vidur request {i} has other lengths than request id {req['id']}")
        first, e2e = float(row["prefill_e2e_time"]), float(row["request_e2e_time"])
        n = req["output_tokens"]
        ttft.append(first)
        tpot.append((e2e - first) / (n - 1) if n > 1 else math.nan)
        restarts += int(float(row["request_num_restarts"]))
    with (folder / "batch_metrics.csv").open(newline="") as fh:
        steps = [float(r["batch_execution_time"]) for r in csv.DictReader(fh)]
    return {"ttft": np.array(ttft), "tpot": np.array(tpot), "restarts": restarts,
            "step_s": np.array(steps)}


# --- report ------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:,.1f}"


def _pct(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def _shown(command: list[str], subs: dict[str, str]) -> str:
    text = " ".join(command)
    for old, new in subs.items():
        text = text.replace(old, new)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN,
                    help="a validate-serving JSON (measured on the GPU) to replay")
    ap.add_argument("--venv", type=Path,
                    help="virtualenv for Vidur (created if missing; default: a temp one)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="work folder to keep (export, Vidur inputs, logs; default: temp)")
    ap.add_argument("--estimators", type=int, default=50, help="Vidur RF n_estimators")
    ap.add_argument("--max-depth", type=int, default=16, help="Vidur RF max_depth")
    ap.add_argument("--min-samples-split", type=int, default=2)
    ap.add_argument("--cv", type=int, default=3, help="Vidur k_fold_cv_splits")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vidur_dropin.json")
    args = ap.parse_args()

    run = json.loads(args.run.read_text())
    model, settings, requests = run["model"], run["settings"], run["measured"]["requests"]
    if model not in VIDUR_MODELS:
        sys.exit(f"no Vidur model preset known for {model} (VIDUR_MODELS)")
    device_name = run["measured_on"].get("device", run.get("device", ""))
    sku = next((v for k, v in VIDUR_DEVICES.items() if k in device_name), None)
    if sku is None:
        sys.exit(f"no Vidur device for {device_name!r} (VIDUR_DEVICES)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="vidur_dropin_"))).resolve()
    venv = (args.venv or work / "venv").resolve()
    try:
        report = measure(args, run, model, settings, requests, sku, work, venv)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write(report, args.out)


def measure(args, run: dict, model: str, settings: dict, requests: list[dict],
            sku: tuple[str, str], work: Path, venv: Path) -> dict:
    """Steps 1-6 of the module docstring; returns the report (JSON-ready)."""
    subs = {str(venv): "$VENV", str(work): "$WORK", str(ROOT) + "/": ""}
    console.print(f"venv {venv} · work folder {work}")
    python, made = venv_with_vidur(venv, work / "pip.log")
    vidur_versions = _versions(python, VIDUR_PACKAGES)
    vidur_model = VIDUR_MODELS[model]
    dims = vidur_model_dims(python, vidur_model)

    # Ours first: its replay names the engine profile the export must use.
    attn, dtype = run["engine"].split("|")[1:3]
    ours_json = work / "ours.json"
    ours_cmd = [sys.executable, "-m", "dooly_fx", "validate-serving", model, "--attn", attn,
                "--dtype", dtype, "--device", "cuda", "--measured", str(args.run.resolve()),
                "--json", str(ours_json)]
    ours_wall = _run(ours_cmd, work / "ours.log", "validate-serving --measured", cwd=ROOT)
    ours = json.loads(ours_json.read_text())
    engine, e_attn, e_dtype = ours["predicted_from"].split("|")

    n = len(requests)
    budget = int(settings["max_batch_tokens"])
    longest = max(r["prompt_tokens"] + r["output_tokens"] for r in requests)
    max_tokens = max(budget, longest)
    max_batch = min(int(settings["max_seqs"]), n)
    export_dir = work / "export"
    export_cmd = [sys.executable, "-m", "dooly_fx", "export-vidur", model, "--engine", engine,
                  "--attn", e_attn, "--dtype", e_dtype, "--device", "cuda", "--out",
                  str(export_dir), "--max-tokens", str(max_tokens), "--max-batch-size",
                  str(-(-max_batch // 8) * 8), "--block-size", str(settings["block_size"]),
                  "--json", str(work / "export.json")]
    export_wall = _run(export_cmd, work / "export.log", "export-vidur", cwd=ROOT)
    exported = json.loads((work / "export.json").read_text())
    with (export_dir / "mlp.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    ours_dims = {k: int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd",
                                          "vocab_size")}
    theirs = {"n_head": dims["num_q_heads"], "n_kv_head": dims["num_kv_heads"],
              "n_embd": dims["embedding_dim"], "n_expanded_embd": dims["mlp_hidden_dim"],
              "vocab_size": dims["vocab_size"]}
    if ours_dims != theirs:
        sys.exit(f"Vidur preset {vidur_model} {theirs} differs from {model} {ours_dims}")

    cache_dir = work / "vidur_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # the cold run must train
    placed = place_profiles(cache_dir, export_dir, model, vidur_model, *sku)
    trace = work / "vidur_trace.csv"
    write_trace(trace, requests)
    max_prompt = max(r["prompt_tokens"] for r in requests)
    vsettings = {
        "model": vidur_model, "device": sku[0], "network_device": sku[1],
        "chunk_size": budget, "batch_size_cap": int(settings["max_seqs"]),
        "block_size": int(settings["block_size"]), "num_blocks": int(settings["num_blocks"]),
        "trace": trace, "max_request_tokens": max(4096, longest),
        "compute_repo": placed["compute_repo"], "network_repo": placed["network_repo"],
        "cache_dir": cache_dir, "estimators": args.estimators, "max_depth": args.max_depth,
        "min_samples_split": args.min_samples_split, "cv": args.cv,
        "max_tokens": max_tokens, "max_batch": max_batch,
        "max_prefill_chunk": -(-min(budget, max_prompt) // 32) * 32,
    }
    console.print("Vidur cold run (trains its predictors) ...")
    cold_wall, cold_dir, cold_log = run_vidur(python, vsettings, work, "vidur_cold")
    console.print("Vidur warm run (same cache) ...")
    warm_wall, warm_dir, _ = run_vidur(python, vsettings, work, "vidur_warm")
    vidur = read_vidur(cold_dir, requests)
    warm = read_vidur(warm_dir, requests)
    fallback = re.search(r"Failed to load predictions from HF: (.*)", cold_log)
    trained = re.findall(r"Trained model (\w+) .*?\(MEAP\) ([0-9.eE+-]+)%", cold_log)
    ended = re.search(r"Simulation ended at: ([0-9.eE+-]+)s", cold_log)

    per = {r["id"]: r for r in ours["per_request"]}
    rows = [per[r["id"]] for r in requests]
    measured = {k: np.array([np.nan if p[k] is None else p[k] for p in rows])
                for k in ("ttft", "tpot")}
    sim = {k: np.array([np.nan if p[f"sim_{k}"] is None else p[f"sim_{k}"] for p in rows])
           for k in ("ttft", "tpot")}
    metrics = {k: {"vidur_vs_measured": _metric(measured[k], vidur[k]),
                   "ours_vs_measured": _metric(measured[k], sim[k]),
                   "vidur_vs_ours": _metric(sim[k], vidur[k])} for k in ("ttft", "tpot")}
    steps = ours["steps"]
    report = {
        "meta": {
            "command": " ".join(["python", *sys.argv]),
            "cpu": cpu_name(), "logical_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(),
            "vidur_env": vidur_versions,
            "our_env": {p: _version(p) for p in OUR_PACKAGES},
            "run": _shown([str(args.run.resolve())], subs),
            "model": model, "measured_on": run["measured_on"], "workload": run["workload"],
            "engine_settings": settings, "requests": n,
            "ours_predicted_from": ours["predicted_from"], "ours_db": "dooly_fx/data/h100.db.gz",
            "vidur_model": vidur_model,
            "vidur_model_dims": {k: dims[k] for k in ("num_layers", "num_q_heads",
                                                      "num_kv_heads", "embedding_dim",
                                                      "mlp_hidden_dim", "vocab_size",
                                                      "max_model_len")},
            "venv": {"given": args.venv is not None, **made},
        },
        "commands": {
            "pip": f"$VENV/bin/python -m pip install vidur=={VIDUR_VERSION}",
            "export": _shown(["python", *export_cmd[1:]], subs),
            "vidur": _shown(["WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_HOME=$WORK/hf_home "
                             "$VENV/bin/python -m vidur.main",
                             *vidur_args(dict(vsettings, output_dir=work / "vidur_cold"))],
                            subs),
            "ours": _shown(["python", *ours_cmd[1:]], subs),
        },
        "hub_cache": {k: _shown([str(v)], subs) for k, v in placed.items()},
        "vidur_settings": {k: _shown([str(v)], subs) if isinstance(v, Path) else v
                           for k, v in vsettings.items()}
        | {"kv_cache_prediction_granularity": KV_GRANULARITY,
           "attention_decode_batching_overhead_fraction": DECODE_BATCHING_OVERHEAD,
           "watermark_blocks_fraction": WATERMARK},
        "vidur_run": {
            "predictions_from_hub": "failed offline, trained instead: " + fallback.group(1)
            if fallback else "no fallback logged",
            "trained_rf_mape_percent": {name: float(v) for name, v in trained},
            "simulated_s": float(ended.group(1)) if ended else None,
            "restarts": vidur["restarts"],
            "warm_identical": bool(np.array_equal(vidur["ttft"], warm["ttft"], equal_nan=True)
                                   and np.array_equal(vidur["tpot"], warm["tpot"],
                                                      equal_nan=True)),
        },
        "export": {"rows": exported["rows"], "mapping": exported["mapping"],
                   "not_exported": exported["not_exported"], "engine": exported["engine"]},
        "differences": differences(settings, vsettings, exported),
        "metrics": metrics,
        "steps": {
            "measured": {"steps": steps["steps"], "mean_ms": steps["measured_ms"]["mean"],
                         "prepare_ms": steps["measured_ms"]["prepare"],
                         "forward_ms": steps["measured_ms"]["forward"],
                         "update_ms": steps["measured_ms"]["update"],
                         "busy_s": steps["busy_s"], "wall_s": run["measured"]["wall_s"]},
            "ours": {"steps": ours["simulated_steps"],
                     "predicted_ms_on_measured_batches": steps["predicted_ms"]["mean"],
                     "step_mape_on_measured_batches": steps["mape"],
                     "busy_s": ours["simulated"]["busy_s"],
                     "simulated_s": ours["simulated"]["throughput"]["duration_s"]},
            "vidur": {"steps": int(vidur["step_s"].size),
                      "mean_ms": float(vidur["step_s"].mean() * 1e3),
                      "busy_s": float(vidur["step_s"].sum())},
        },
        "wall_s": {
            "pip_install": made["install_s"],
            "export_vidur": round(export_wall, 2),
            "vidur_cold": round(cold_wall, 2),
            "vidur_warm": round(warm_wall, 2),
            "ours": round(ours_wall, 2),
        },
        "per_request": [
            {"id": r["id"], "prompt": r["prompt_tokens"], "output": r["output_tokens"],
             "arrival_s": r["submitted_s"],
             **{f"{who}_{k}": _num(arr[k][i]) for who, arr in (
                 ("measured", measured), ("ours", sim), ("vidur", vidur))
                for k in ("ttft", "tpot")}}
            for i, r in enumerate(requests)],
    }
    return report


def differences(settings: dict, v: dict, exported: dict) -> list[str]:
    """How Vidur's replay differs from the GPU run and from ours, from the settings used."""
    return [
        f"Scheduler: the GPU run is transformers continuous batching (FIFO, chunked prefill, "
        f"{settings['max_batch_tokens']} tokens and {settings['max_seqs']} sequences per "
        "step) and our simulator replays it with its `transformers-fifo` policy at the same "
        f"settings; Vidur 0.0.26 has no such scheduler, and its closest is Sarathi "
        f"(`chunk_size` {v['chunk_size']} = the token budget per step, `batch_size_cap` "
        f"{v['batch_size_cap']} = requests holding KV blocks): decodes first, then running "
        "prefills, then new requests FCFS into the leftover budget.",
        f"KV cache: block size {v['block_size']} and {v['num_blocks']} blocks in both; Vidur "
        "allocates a prompt's blocks whole on admission and keeps "
        f"{WATERMARK:.0%} of blocks free (its watermark), transformers allocates as tokens "
        "arrive and holds back its FIFO safety margin of free blocks.",
        "Step time: Vidur 0.0.26 sums per-layer GPU operator times (x layers) and adds "
        "nothing else: no embedding (its `emb` column is not read), LM head, final norm, "
        "sampling, host time (scheduling, batch preparation, kernel launches) or "
        "host/device overlap. Ours (`FlatStepTime` on the "
        f"`{exported['engine']}` profile) predicts the engine's whole step, host time and "
        "batch preparation included.",
        f"Lookups: Vidur rounds a step's tokens up to a multiple of 8, contexts up to its "
        f"`kv_cache_prediction_granularity` ({KV_GRANULARITY}) and prefill chunks up to 32, "
        "predicts a decode batch's attention at the batch's mean context times "
        f"(1 + {DECODE_BATCHING_OVERHEAD}) (GQA decode-batching overhead), and looks "
        "`attn_prefill` up at kv_cache_size = cached + new tokens, while its profiler (and our "
        "export) records kv_cache_size = cached tokens.",
        f"Predictors: random forests grid-searched over n_estimators {v['estimators']}, "
        f"max_depth {v['max_depth']}, min_samples_split {v['min_samples_split']} with "
        f"{v['cv']}-fold CV (Vidur's default grid is 250/500/750 x 8/16/32 x 2/5/10 with "
        f"10-fold CV); prediction tables up to {v['max_tokens']} tokens, prefill chunks up to "
        f"{v['max_prefill_chunk']}, decode batches up to {v['max_batch']} (the run's requests).",
        f"Model: Vidur's preset `{v['model']}` (same layers, heads, widths and vocabulary as "
        "the run's model, checked); one GPU, no tensor or pipeline parallelism, so the "
        "network placeholder files are never read.",
        "Export: `export-vidur` rows are predictions of our fits at Vidur's profiling grids "
        f"({exported['rows']['mlp']} mlp rows, {exported['rows']['attention']} attention "
        f"rows); not exported: {', '.join(exported['not_exported']) or 'nothing'}.",
        "TPOT: Vidur's own decode metric divides by all output tokens; here every TPOT is "
        "(last token - first token) / (output tokens - 1), the measurement's definition.",
    ]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def tables(r: dict) -> tuple[Table, Table]:
    """The accuracy and wall-time tables for the terminal."""
    m = r["meta"]
    acc = Table(title=f"Vidur {m['vidur_env']['vidur']} on our export vs ours vs measured · "
                      f"{m['model']} · {m['measured_on'].get('device')} · {m['requests']} "
                      "requests", title_justify="left")
    for col in ("metric", "measured p50", "Vidur p50", "ours p50", "measured p90", "Vidur p90",
                "ours p90", "Vidur MAPE", "ours MAPE", "Vidur vs ours MAPE"):
        acc.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("ttft", "tpot"):
        x = r["metrics"][key]
        vm, om = x["vidur_vs_measured"], x["ours_vs_measured"]
        acc.add_row(f"{key.upper()} (ms)", _ms(vm["measured"]["p50"]),
                    f"{_ms(vm['simulated']['p50'])} ({_pct(vm['p50_error'])})",
                    f"{_ms(om['simulated']['p50'])} ({_pct(om['p50_error'])})",
                    _ms(vm["measured"]["p90"]),
                    f"{_ms(vm['simulated']['p90'])} ({_pct(vm['p90_error'])})",
                    f"{_ms(om['simulated']['p90'])} ({_pct(om['p90_error'])})",
                    _pct(vm["mape"], False), _pct(om["mape"], False),
                    _pct(x["vidur_vs_ours"]["mape"], False))
    walls = Table(title="wall time (whole processes, CPU)", title_justify="left")
    walls.add_column("what")
    walls.add_column("s", justify="right")
    for label, value in _wall_rows(r):
        walls.add_row(label, value)
    return acc, walls


def _wall_rows(r: dict) -> list[tuple[str, str]]:
    w = r["wall_s"]
    return [
        (f"pip install vidur=={VIDUR_VERSION} (fresh venv)",
         "-" if w["pip_install"] is None else f"{w['pip_install']:.1f}"),
        ("export-vidur (our fits -> mlp.csv, attention.csv)", f"{w['export_vidur']:.2f}"),
        ("Vidur cold: train predictors + simulate", f"{w['vidur_cold']:.2f}"),
        ("Vidur warm: cached predictors, simulate", f"{w['vidur_warm']:.2f}"),
        ("ours: validate-serving --measured (load DB, simulate, step check)",
         f"{w['ours']:.2f}"),
    ]


def write(r: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    acc, walls = tables(r)
    console.print(acc)
    console.print(walls)
    m, s, v = r["meta"], r["steps"], r["vidur_run"]
    ve, oe = m["vidur_env"], m["our_env"]
    lines = [
        f"# Vidur {ve['vidur']} (PyPI) on our exported profiles vs our simulator vs the GPU",
        "",
        f"- command: `{m['command']}`",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs), Python {m['python']}; "
        f"Vidur venv: vidur {ve['vidur']}, scikit-learn {ve['scikit-learn']}, pandas "
        f"{ve['pandas']}, numpy {ve['numpy']}, huggingface_hub {ve['huggingface_hub']}, torch "
        f"{ve['torch'] or 'not installed'}, transformers {ve['transformers'] or 'not installed'} "
        f"(vidur {ve['vidur']} needs neither); ours: numpy {oe['numpy']}, torch {oe['torch']}, "
        f"transformers {oe['transformers']}",
        f"- replayed run: `{m['run']}` ({m['model']}, {m['requests']} requests, measured on "
        f"{m['measured_on'].get('device')}, torch {m['measured_on'].get('torch')}, "
        f"transformers {m['measured_on'].get('transformers')}; workload "
        f"`{json.dumps(m['workload'])}`; engine `{json.dumps(m['engine_settings'])}`)",
        f"- ours: the shipped `{m['ours_db']}`, profile `{m['ours_predicted_from']}`; Vidur: "
        f"preset `{m['vidur_model']}` on `export-vidur` of the same profile",
        f"- Vidur offline: profiles in a local hub cache (`{r['hub_cache']['compute_snapshot']}`"
        f", network placeholders in `{r['hub_cache']['network_snapshot']}`), "
        f"`HF_HUB_OFFLINE=1`; precomputed predictions: {v['predictions_from_hub']}",
        "",
        "Commands (`$VENV`: the virtualenv, `$WORK`: the work folder):",
        "",
        *[f"- {k}: `{c}`" for k, c in r["commands"].items()],
        "",
        "## TTFT and TPOT per request (ms)",
        "",
        "MAPE over requests; in brackets the error of the percentile vs the measured one. "
        "`Vidur vs ours`: Vidur's MAPE taking our simulator as the reference.",
        "",
        "| metric | measured p50 | Vidur p50 | ours p50 | measured p90 | Vidur p90 | ours p90 "
        "| Vidur MAPE | ours MAPE | Vidur vs ours MAPE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("ttft", "tpot"):
        x = r["metrics"][key]
        vm, om = x["vidur_vs_measured"], x["ours_vs_measured"]
        lines.append(
            f"| {key.upper()} | {_ms(vm['measured']['p50'])} | {_ms(vm['simulated']['p50'])} "
            f"({_pct(vm['p50_error'])}) | {_ms(om['simulated']['p50'])} "
            f"({_pct(om['p50_error'])}) | {_ms(vm['measured']['p90'])} | "
            f"{_ms(vm['simulated']['p90'])} ({_pct(vm['p90_error'])}) | "
            f"{_ms(om['simulated']['p90'])} ({_pct(om['p90_error'])}) | "
            f"{_pct(vm['mape'], False)} | {_pct(om['mape'], False)} | "
            f"{_pct(x['vidur_vs_ours']['mape'], False)} |")
    me, ou, vi = s["measured"], s["ours"], s["vidur"]
    lines += [
        "",
        "## Engine steps",
        "",
        "| | steps | mean step ms | busy s |",
        "|---|---:|---:|---:|",
        f"| measured | {me['steps']} | {me['mean_ms']:.1f} (prepare {me['prepare_ms']:.1f} + "
        f"forward {me['forward_ms']:.1f} + update {me['update_ms']:.1f}) | "
        f"{me['busy_s']:.1f} |",
        f"| ours | {ou['steps']} | {ou['busy_s'] / ou['steps'] * 1e3:.1f} (on the measured "
        f"batches: {ou['predicted_ms_on_measured_batches']:.1f}, step MAPE "
        f"{ou['step_mape_on_measured_batches']:.1%}) | {ou['busy_s']:.1f} |",
        f"| Vidur | {vi['steps']} | {vi['mean_ms']:.1f} | {vi['busy_s']:.1f} |",
        "",
        f"Vidur's requests restarted (preempted): {v['restarts']}; its simulation ended at "
        f"{v['simulated_s']:.1f} s (measured run: {me['wall_s']:.1f} s, ours: "
        f"{ou['simulated_s']:.1f} s). The warm run's per-request times are "
        f"{'identical to' if v['warm_identical'] else 'different from'} the cold run's.",
        "",
        "## Wall time (CPU, whole processes)",
        "",
        "| what | s |",
        "|---|---:|",
        *[f"| {label} | {value} |" for label, value in _wall_rows(r)],
        "",
        "## Settings: where Vidur's replay differs",
        "",
        *[f"- {d}" for d in r["differences"]],
        "",
        "Vidur's random forests on the exported rows (training MAPE, % , as it logs them): "
        + ", ".join(f"{k} {x:.3g}" for k, x in v["trained_rf_mape_percent"].items()) + ".",
        "",
        "<details><summary>Per request (ms)</summary>",
        "",
        "| id | prompt | output | arrival s | TTFT measured | ours | Vidur | TPOT measured | ours "
        "| Vidur |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["per_request"]:
        lines.append(
            f"| {p['id']} | {p['prompt']} | {p['output']} | {p['arrival_s']:.2f} | "
            f"{_ms(p['measured_ttft'])} | {_ms(p['ours_ttft'])} | {_ms(p['vidur_ttft'])} | "
            f"{_ms(p['measured_tpot'])} | {_ms(p['ours_tpot'])} | {_ms(p['vidur_tpot'])} |")
    lines += ["", "</details>", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
