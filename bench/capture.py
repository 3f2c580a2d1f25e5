"""Capture benchmark: dooly_fx's period capture against a naive full-depth `torch.export`.

Example (all zoo models, about 25 minutes on 2 cores; `--models` to restrict)::

    python bench/capture.py --wait-idle 30
    python bench/capture.py --models llama-3.2-1b,gemma-2-2b --out /tmp/capture.json
    python bench/capture.py --render-only   # re-print and re-write capture.md from capture.json

Every measurement runs in a fresh subprocess (this script re-invoked with `--worker`), one at a
time, so each time is cold and each peak RSS belongs to that measurement alone:

ours
    `analyze_model(resolve_model(name), EngineProfile(), ["prefill", "decode"])`: symbolic
    capture of the repeating layer period, taint, partition and signatures. The wall time is that
    call alone (after imports and `resolve_model`). Models with sliding-window layers are
    captured in two regimes (below and at/above the window), so four graphs instead of two.

naive
    A plain, unlabelled, full-depth non-strict `torch.export.export` of both phases. The model
    is built with all its layers on the meta device (`torch.device("meta")` + `from_config`,
    bfloat16, sdpa attention, eval mode); meta works for every zoo model, so FakeTensorMode is
    not needed. The time is model build + prefill export + decode export.

    - prefill: `model(input_ids=ids).logits`, ids (B, S), Dims B and S (min 2). The wrapper
      only drops the `DynamicCache` from the output, which export cannot return.
    - decode: `model(input_ids (B, 1), past_key_values=cache, use_cache=True).logits`, the
      `DynamicCache` built inside `forward` from a flat list of per-layer K and V tensors
      (B, num_key_value_heads, P, head_dim); Dims B and P (min 2) shared by all of them, and
      `prefer_deferred_runtime_asserts_over_guards=True`.
    - MoE models use `config._experts_implementation = "grouped_mm"`.
    - Sliding-window models (Gemma 2, Phi 3, Command R7B): an unbounded S or P fails with a
      constraint violation (the cache branches on the window), so the naive export covers
      only the regime below the window, S <= W - 2 and P <= W - 3, the bounds export itself
      suggests. Covering both regimes as ours does would take two more exports, so for these
      models the speed-up shown is a lower bound.

Peak memory is `ru_maxrss` of the worker (KiB on Linux), read right before the measured call
and after it, so the increment is visible. Each record also notes how many cores other
processes kept busy meanwhile (`other_cpu_load`; `--wait-idle` waits for a quiet machine first)
and a digest of the package sources it measured, since the code may change during a long run.
Results go to a JSON file (default `bench/results/capture.json`) and a markdown table next to
it (`capture.md`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "
REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("dooly_fx", "passes", "kernels")  # the package's directories (pyproject.toml)
DEFAULT_OUT = REPO / "bench" / "results" / "capture.json"
DEFAULT_TIMEOUT_S = 600
EIGHT_B = ("llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b")
SEVENTY_B = ("llama-3.1-70b", "qwen2.5-72b")
GOAL_OURS_S = 3.0
GOAL_SPEEDUP = 5.0

Record = dict[str, Any]


# ---- worker side (runs inside the fresh subprocess) -------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def measure_ours(name: str) -> Record:
    """Time `analyze_model` for both phases; report its size and labelling figures."""
    from dooly_fx.engine import EngineProfile
    from dooly_fx.report import analyze_model
    from dooly_fx.spec import resolve_model

    spec = resolve_model(name)
    engine = EngineProfile()
    rss_before = _peak_rss_mib()
    cpu_start, start = time.process_time(), time.perf_counter()
    report = analyze_model(spec, engine, ["prefill", "decode"])
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    summary = report.summary()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
        "unique_signatures": summary["unique_signatures"],
        "unlabelled_dims": summary["unlabelled_dims"],
        "units": summary["units"],
        "unit_instances": summary["unit_instances"],
        "built_layers": summary["built_layers"],
        "total_layers": summary["total_layers"],
        "graphs": [
            {"phase": p.phase, "regime": p.regime, "capture_seconds": p.capture_seconds,
             "analysis_seconds": p.analysis_seconds}
            for p in report.phases
        ],
    }


def _sliding_window(config) -> int | None:
    """The window of the config's sliding cache layers, or None without any."""
    from transformers import DynamicCache

    windows = [layer.sliding_window for layer in DynamicCache(config=config).layers
               if getattr(layer, "is_sliding", False)]
    return min(windows) if windows else None


def _naive_modules(model, config):
    """The prefill and decode wrappers around a full-depth transformers model."""
    import torch
    from transformers import DynamicCache

    class Prefill(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, past):
            cache = DynamicCache(config=config)
            for layer, k, v in zip(cache.layers, past[0::2], past[1::2], strict=True):
                layer.keys, layer.values = k, v
                layer.dtype, layer.device = k.dtype, k.device
                layer.is_initialized = True
                if getattr(layer, "is_sliding", False):
                    layer.cumulative_length = k.shape[-2]
            return self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits

    return Prefill(), Decode()


def _naive_export(config) -> Record:
    """Build the full model on meta and export prefill and decode; seconds per step."""
    import torch
    import transformers
    from torch.export import Dim, export

    from dooly_fx.capture import has_experts

    config._attn_implementation = "sdpa"
    if has_experts(config):
        config._experts_implementation = "grouped_mm"
    window = _sliding_window(config)
    s_max = {"max": window - 2} if window else {}
    p_max = {"max": window - 3} if window else {}
    batch, seq, past_len = Dim("B", min=2), Dim("S", min=2, **s_max), Dim("P", min=2, **p_max)

    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    prefill, decode = _naive_modules(model, config)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    ids = torch.zeros((2, 16), dtype=torch.long, device="meta")
    prefill_ep = export(prefill, (ids,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_cache = 2 * len(transformers.DynamicCache(config=config).layers)
    past = [torch.zeros((2, kv_heads, 16, head_dim), dtype=torch.bfloat16, device="meta")
            for _ in range(n_cache)]
    step = torch.zeros((2, 1), dtype=torch.long, device="meta")
    decode_ep = export(decode, (step, past), dynamic_shapes=({0: batch}, [{0: batch, 2: past_len}]
                                                             * n_cache),
                       strict=False, prefer_deferred_runtime_asserts_over_guards=True)
    decode_s = time.perf_counter() - start
    return {
        "build_seconds": build_s, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
        "prefill_nodes": len(prefill_ep.graph.nodes), "decode_nodes": len(decode_ep.graph.nodes),
        "regime": "window<" if window else "",
    }


def measure_naive(name: str) -> Record:
    """Time the full-depth export of both phases; a failed export is recorded, not raised."""
    from dooly_fx.spec import resolve_model

    config = resolve_model(name).config
    rss_before = _peak_rss_mib()
    cpu_start, start = time.process_time(), time.perf_counter()
    try:
        record = _naive_export(config)
    except Exception as exc:  # the point is to record what a plain export cannot do
        return {"failed": _one_line(exc), "seconds": time.perf_counter() - start,
                "rss_before_mib": rss_before, "peak_rss_mib": _peak_rss_mib()}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start,
            "rss_before_mib": rss_before, "peak_rss_mib": _peak_rss_mib(),
            "num_layers": config.num_hidden_layers, **record}


def worker(kind: str, name: str) -> None:
    """Run one measurement and print its record as one tagged JSON line."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (imports are outside every timed region)
    import transformers  # noqa: F401

    import dooly_fx.report  # noqa: F401

    record = measure_ours(name) if kind == "ours" else measure_naive(name)
    print(RESULT_TAG + json.dumps(record), flush=True)


# ---- driver side --------------------------------------------------------------------------------


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_wait_s: float, threshold: float = 0.25, sample_s: float = 2.0) -> float:
    """Wait (at most `max_wait_s`) until other processes use < `threshold` cores; the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        busy = _machine_busy_seconds()
        time.sleep(sample_s)
        if (_machine_busy_seconds() - busy) / sample_s < threshold:
            break
    return time.perf_counter() - start


def run_measurement(kind: str, name: str, timeout_s: int, wait_idle_s: float = 0) -> Record:
    """Run one measurement in a fresh interpreter; a crash or timeout becomes `failed`.

    `other_cpu_load` is the average number of cores that other processes kept busy while the
    worker ran (machine busy time less the worker's own CPU time): 0 on a quiet machine.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--models", name]
    waited = wait_for_idle(wait_idle_s) if wait_idle_s > 0 else 0.0
    context: Record = {"waited_for_idle_s": round(waited, 1), "source_digest": source_digest(),
                       "loadavg_before": round(os.getloadavg()[0], 2)}
    busy, children, start = _machine_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout after {timeout_s} s", "process_seconds": timeout_s, **context}
    wall = time.perf_counter() - start
    others = (_machine_busy_seconds() - busy) - (_children_cpu_seconds() - children)
    context.update(process_seconds=wall, other_cpu_load=round(max(others, 0.0) / wall, 2))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"exit {proc.returncode}: {tail}"[:300], **context}
    return {**json.loads(lines[-1][len(RESULT_TAG):]), **context}


def measure_model(name: str, timeout_s: int, wait_idle_s: float) -> Record:
    from dooly_fx.zoo import ZOO

    ours = run_measurement("ours", name, timeout_s, wait_idle_s)
    _progress(name, "ours", ours)
    naive = run_measurement("naive", name, timeout_s, wait_idle_s)
    _progress(name, "naive", naive)
    record: Record = {"model": name, "hf_id": ZOO[name].hf_id,
                      "layers": ZOO[name].config["num_hidden_layers"], "ours": ours,
                      "naive": naive, "speedup": None}
    if "failed" not in ours and "failed" not in naive:
        record["speedup"] = naive["seconds"] / ours["seconds"]
    return record


def _progress(name: str, kind: str, rec: Record) -> None:
    what = rec["failed"] if "failed" in rec else f"{rec['seconds']:.2f} s"
    if "other_cpu_load" in rec:
        what += f"  (other load {rec['other_cpu_load']:.2f})"
    print(f"  {name:<20} {kind:<6} {what}", file=sys.stderr, flush=True)


def source_digest() -> str:
    """A short hash of the package's Python sources (the code measured; there may be no commit)."""
    digest = hashlib.sha256()
    for path in sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_name() -> str:
    from dooly_fx.hostinfo import cpu_name  # imported late: workers time their own imports

    return cpu_name()


def _total_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def meta_block() -> Record:
    return {
        "command": shlex.join(sys.orig_argv),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_digest": source_digest(),
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(),
                    "cpu_count": os.cpu_count(), "memory_gib": _total_memory_gib()},
        "versions": {"python": platform.python_version(), "torch": version("torch"),
                     "transformers": version("transformers"), "sympy": version("sympy"),
                     "dooly_fx": version("dooly_fx")},
        "notes": "each measurement in a fresh subprocess, sequentially; seconds are wall time "
                 "of the measured call only (cpu_seconds: its process CPU time); peak RSS is "
                 "the worker's ru_maxrss; other_cpu_load: cores other processes kept busy "
                 "meanwhile",
    }


def goals_block(models: list[Record]) -> Record:
    """The 8B-class (≤ 3 s, ≥ 5×) and 70B-class (≤ 8B median) goals, from the records."""
    by_name = {m["model"]: m for m in models}
    ok = {n: m for n, m in by_name.items() if m["speedup"] is not None}
    eight = {n: {"ours_seconds": ok[n]["ours"]["seconds"], "speedup": ok[n]["speedup"],
                 "ours_le_3s": ok[n]["ours"]["seconds"] <= GOAL_OURS_S,
                 "speedup_ge_5x": ok[n]["speedup"] >= GOAL_SPEEDUP} for n in EIGHT_B if n in ok}
    eight_met = None if len(eight) < len(EIGHT_B) else all(
        e["ours_le_3s"] and e["speedup_ge_5x"] for e in eight.values())
    ours_ok = {n: m["ours"]["seconds"] for n, m in by_name.items() if "failed" not in m["ours"]}
    median = statistics.median(ours_ok[n] for n in EIGHT_B) if all(
        n in ours_ok for n in EIGHT_B) else None
    seventy = {n: {"ours_seconds": ours_ok[n],
                   "le_8b_median": None if median is None else ours_ok[n] <= median}
               for n in SEVENTY_B if n in ours_ok}
    seventy_met = None if median is None or len(seventy) < len(SEVENTY_B) else all(
        s["le_8b_median"] for s in seventy.values())
    return {
        "8b_class": {"models": eight, "goal": f"ours <= {GOAL_OURS_S} s and speed-up >= "
                     f"{GOAL_SPEEDUP}x", "met": eight_met},
        "70b_class": {"models": seventy, "8b_median_ours_seconds": median,
                      "goal": "ours <= 8B-class median ours time", "met": seventy_met},
    }


# ---- output -------------------------------------------------------------------------------------

COLUMNS = ("model", "layers", "ours s", "ours peak MiB", "naive s", "naive peak MiB",
           "speed-up ×", "unique sigs", "unlabelled dims", "other load")
LEGEND = ("layers: built/total for ours; seconds: the measured call only; peak MiB: the worker's "
          "peak RSS (+ its rise during the call); other load: cores that other processes kept "
          "busy during the ours/naive measurement (0 = quiet machine)")


def table_rows(models: list[Record]) -> list[list[str]]:
    def secs(rec: Record) -> str:
        return "failed" if "failed" in rec else f"{rec['seconds']:.2f}"

    def mib(rec: Record) -> str:  # peak, and its rise during the measured call
        if "peak_rss_mib" not in rec:
            return "—"
        return f"{rec['peak_rss_mib']:.0f} (+{rec['peak_rss_mib'] - rec['rss_before_mib']:.0f})"

    rows = []
    for m in models:
        ours, naive = m["ours"], m["naive"]
        layers = str(m["layers"]) if "failed" in ours else \
            f"{ours['built_layers']}/{ours['total_layers']}"
        rows.append([
            m["model"], layers, secs(ours), mib(ours), secs(naive), mib(naive),
            "—" if m["speedup"] is None else f"{m['speedup']:.1f}",
            str(ours.get("unique_signatures", "—")), str(ours.get("unlabelled_dims", "—")),
            "/".join(f"{r['other_cpu_load']:.1f}" if "other_cpu_load" in r else "—"
                     for r in (ours, naive)),
        ])
    return rows


def print_table(models: list[Record], goals: Record) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="capture: ours (period, labelled) vs naive full-depth torch.export")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in table_rows(models):
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    console.print(LEGEND, highlight=False)
    for line in goal_lines(goals):
        console.print(line, highlight=False)
    for m in models:
        for kind in ("ours", "naive"):
            if "failed" in m[kind]:
                console.print(f"{m['model']} {kind} failed: {m[kind]['failed']}", markup=False)


def goal_lines(goals: Record) -> list[str]:
    eight, seventy = goals["8b_class"], goals["70b_class"]
    median = seventy["8b_median_ours_seconds"]
    return [
        f"8B-class goal ({eight['goal']}): {_met(eight['met'])}",
        f"70B-class goal ({seventy['goal']}"
        + (f", median {median:.2f} s" if median is not None else "")
        + f"): {_met(seventy['met'])}",
    ]


def _met(flag: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[flag]


def write_markdown(path: Path, meta: Record, models: list[Record], goals: Record) -> None:
    mach, ver = meta["machine"], meta["versions"]
    lines = [
        "# Capture benchmark", "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date_utc']}",
        f"- machine: {mach['platform']}; {mach['cpu']}; {mach['cpu_count']} CPUs; "
        f"{mach['memory_gib']} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        f"- source digest: {meta['source_digest']} (changed during the run: "
        f"{'yes' if meta.get('source_changed_during_run') else 'no'})",
        f"- {meta['notes']}", "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(models)), "",
        LEGEND, "",
        *(f"- {line}" for line in goal_lines(goals)),
    ]
    digests: dict[str, list[str]] = {}
    for m in models:
        digests.setdefault(m["ours"].get("source_digest", "?"), []).append(m["model"])
    if len(digests) > 1:
        lines += ["", "Package sources changed during the run; digest per model:", "",
                  *(f"- {d}: {', '.join(names)}" for d, names in digests.items())]
    failures = [f"- {m['model']} {kind} failed: {m[kind]['failed']}"
                for m in models for kind in ("ours", "naive") if "failed" in m[kind]]
    if failures:
        lines += ["", "## Failures", "", *failures]
    path.write_text("\n".join(lines) + "\n")


def write_results(out: Path, meta: Record, models: list[Record]) -> Record:
    goals = goals_block(models)
    seen = {r["source_digest"] for m in models for r in (m["ours"], m["naive"])}
    meta["source_changed_during_run"] = seen != {meta["source_digest"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "goals": goals, "models": models}, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), meta, models, goals)
    return goals


# ---- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: the whole zoo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S,
                        help="seconds per measurement subprocess")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other processes "
                             "to leave the CPUs idle (0: do not wait)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: print the table of --out and rewrite its .md")
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select_models(arg: str | None) -> list[str]:
    from dooly_fx.zoo import ZOO

    if not arg:
        return list(ZOO)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO]
    if not names:
        raise SystemExit("--models names no model")
    if unknown:
        raise SystemExit(f"unknown zoo model(s): {', '.join(unknown)}")
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.models)
        return
    if args.render_only:
        saved = json.loads(args.out.read_text())
        write_markdown(args.out.with_suffix(".md"), saved["meta"], saved["models"], saved["goals"])
        print_table(saved["models"], saved["goals"])
        return
    names = select_models(args.models)
    meta = meta_block()
    models: list[Record] = []
    for name in names:
        models.append(measure_model(name, args.timeout, args.wait_idle))
        goals = write_results(args.out, meta, models)  # after each model: partial runs survive
    print_table(models, goals)


if __name__ == "__main__":
    main()
