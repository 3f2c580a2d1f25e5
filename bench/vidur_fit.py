"""Held-out error of dooly_fx.fit on Vidur's published H100 per-op profiles, and Vidur's own
random-forest predictor on the same points.

    python bench/vidur_fit.py --data ../shared/data/vidur_profiles/h100

Every (model, tensor-parallel degree, op) of the `*.mlp.csv` files is one unit over `m` =
num_tokens (259 token counts, 1..4096, a few repeated). Three splits, each fitted on one part
and scored on the other (MAPE of the median latency):

* `alternate`: rows sorted by num_tokens, fit on even positions, predict odd ones;
* `random`: a random half (seeded) against the other half;
* `extrapolate`: fit on num_tokens ≤ 1024, predict 1025..4096 (up to 4x the fitted range).

Roofline features come from the model dims in the CSV (GEMM: 2·m·K·N FLOPs, fp16 bytes of x, W
and the output; elementwise ops: bytes ∝ m·width). Vidur's default predictor (a
`RandomForestRegressor` grid-searched over n_estimators {250, 500, 750}, max_depth {8, 16, 32},
min_samples_split {2, 5, 10} with 10-fold CV scored by MAPE, num_tokens as the only feature) is
re-implemented here from its documented defaults, with `random_state=0` for repeatability, and
run on `--rf-model` at `--rf-tp` for `--rf-splits` (about a minute per op and split on two
cores).
Writes `bench/results/vidur_fit.{json,md}`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import sklearn
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dooly_fx.fit import METHODS, fit_unit  # noqa: E402
from dooly_fx.hostinfo import cpu_name  # noqa: E402

OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
       "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
RF_GRID = {"n_estimators": [250, 500, 750], "max_depth": [8, 16, 32],
           "min_samples_split": [2, 5, 10]}
RF_FOLDS = 10
EXTRAPOLATE_FROM = 1024


def gemm(m: np.ndarray, k: float, n: float) -> tuple[np.ndarray, np.ndarray]:
    """2·m·K·N FLOPs of x (m, K) @ W (K, N); fp16 bytes of x, W and the output, once each."""
    return 2.0 * m * k * n, 2.0 * (m * k + k * n + m * n)


def features(op: str, cfg: dict[str, int], m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, bytes) of one call of `op` for m tokens on one tensor-parallel rank."""
    e, h, hkv, inter, tp = (cfg[k] for k in ("n_embd", "n_head", "n_kv_head",
                                             "n_expanded_embd", "tp"))
    d = e // h
    if op == "attn_pre_proj":  # fused QKV
        return gemm(m, e, (h + 2 * hkv) * d / tp)
    if op == "attn_post_proj":
        return gemm(m, h * d / tp, e)
    if op == "mlp_up_proj":  # fused gate + up when gated
        return gemm(m, e, (2 if cfg["use_gated_mlp"] else 1) * inter / tp)
    if op == "mlp_down_proj":
        return gemm(m, inter / tp, e)
    if op == "emb":  # gather one row per token
        return np.zeros_like(m), 2.0 * m * e + 8.0 * m
    if op in ("input_layernorm", "post_attention_layernorm"):  # read x, write y, 4 FLOPs/elem
        return 4.0 * m * e, 2.0 * (2 * m * e + e)
    if op == "attn_rope":  # rotate q and k heads of this rank in place
        width = (h + hkv) * d / tp
        return 3.0 * m * width, 2.0 * (2 * m * width + m * d)
    if op == "mlp_act":  # silu(gate) * up
        width = inter / tp
        return 5.0 * m * width, 2.0 * 3 * m * width
    if op == "add":  # residual add
        return 1.0 * m * e, 2.0 * 3 * m * e
    raise KeyError(op)


def load(path: Path) -> dict[int, tuple[dict, list[dict]]]:
    """{tp degree: (model dims, rows sorted by num_tokens)} of one Vidur mlp.csv."""
    out: dict[int, tuple[dict, list[dict]]] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            tp = int(row["num_tensor_parallel_workers"])
            cfg = {k: int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd",
                                            "vocab_size")}
            cfg |= {"use_gated_mlp": row["use_gated_mlp"] == "True", "tp": tp}
            out.setdefault(tp, (cfg, []))[1].append(row)
    for _, rows in out.values():
        rows.sort(key=lambda r: int(r["num_tokens"]))
    return out


def splits(m: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train/test index arrays for each split; `m` is sorted."""
    idx = np.arange(len(m))
    perm = np.random.default_rng(seed).permutation(len(m))
    half = len(m) // 2
    return {"alternate": (idx[::2], idx[1::2]),
            "random": (np.sort(perm[:half]), np.sort(perm[half:])),
            "extrapolate": (idx[m <= EXTRAPOLATE_FROM], idx[m > EXTRAPOLATE_FROM])}


def mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / y))


def vidur_mape_percent(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Vidur's scorer: MAPE in percent (no zero latencies occur in these profiles)."""
    return float(np.mean(np.abs((y_true - y_pred) / y_true)) * 100)


def run_ours(files: list[Path], seed: int) -> tuple[list[dict], dict]:
    """Per-unit held-out MAPE of the selected model and of each candidate forced, per split."""
    units, timing = [], {"fit_s": {}, "fit_all_points_s": 0.0, "units": 0, "points": 0}
    fit_unit("warm-up", ["m"], [[1.0], [2.0], [4.0], [8.0]], [1.0, 2, 4, 8], [1.0, 2, 4, 8],
             [1.0, 2, 4, 8])  # imports scikit-learn and scipy outside the timed region
    for path in files:
        model_name = path.name.removesuffix(".mlp.csv")
        for tp, (cfg, rows) in sorted(load(path).items()):
            m = np.array([float(r["num_tokens"]) for r in rows])
            for op in OPS:
                y = np.array([float(r[f"time_stats.{op}.median"]) for r in rows])
                flops, bytes_ = features(op, cfg, m)
                unit = {"model": model_name, "tp": tp, "op": op, "points": len(m), "splits": {}}
                start = time.perf_counter()
                whole = fit_unit(op, ["m"], m[:, None], flops, bytes_, y, seed=seed)
                timing["fit_all_points_s"] += time.perf_counter() - start
                timing["units"] += 1
                timing["points"] += len(m)
                unit["method_all_points"] = whole.method
                for split, (tr, te) in splits(m, seed).items():
                    start = time.perf_counter()
                    model = fit_unit(op, ["m"], m[tr, None], flops[tr], bytes_[tr], y[tr],
                                     seed=seed)
                    timing["fit_s"][split] = timing["fit_s"].get(split, 0.0) + \
                        time.perf_counter() - start
                    pred = model.predict_many(m[te, None], flops[te], bytes_[te])
                    forced = {}
                    for method in METHODS:
                        alone = fit_unit(op, ["m"], m[tr, None], flops[tr], bytes_[tr], y[tr],
                                         seed=seed, methods=(method,))
                        forced[method] = mape(alone.predict_many(m[te, None], flops[te],
                                                                 bytes_[te]), y[te])
                    unit["splits"][split] = {
                        "train": len(tr), "test": len(te), "method": model.method,
                        "cv_mape": model.cv_mape, "cv_by_method": model.cv_by_method,
                        "test_mape": mape(pred, y[te]), "test_mape_by_method": forced,
                        "test_in_range": int(sum(model.in_range([v]) for v in m[te]))}
                units.append(unit)
    return units, timing


def predict_speed(files: list[Path]) -> dict[str, float]:
    """Microseconds per `predict` call of each method on one GEMM unit."""
    cfg, rows = load(files[0])[1]
    m = np.array([float(r["num_tokens"]) for r in rows])
    y = np.array([float(r["time_stats.mlp_up_proj.median"]) for r in rows])
    flops, bytes_ = features("mlp_up_proj", cfg, m)
    out = {}
    for method in METHODS:
        model = fit_unit("mlp_up_proj", ["m"], m[:, None], flops, bytes_, y, methods=(method,))
        f, b = (float(v[0]) for v in features("mlp_up_proj", cfg, np.array([300.0])))
        calls = 20_000
        start = time.perf_counter()
        for _ in range(calls):
            model.predict((300.0,), f, b)
        out[method] = (time.perf_counter() - start) / calls * 1e6
    return out


def run_vidur_rf(path: Path, tp: int, ops: list[str], split_names: list[str],
                 seed: int) -> list[dict]:
    """Vidur's default grid-searched random forest per op and split."""
    rows = load(path)[tp][1]
    m = np.array([float(r["num_tokens"]) for r in rows])
    out = []
    for split in split_names:
        tr, te = splits(m, seed)[split]
        for op in ops:
            y = np.array([float(r[f"time_stats.{op}.median"]) for r in rows])
            search = GridSearchCV(RandomForestRegressor(random_state=0), RF_GRID, cv=RF_FOLDS,
                                  scoring=make_scorer(vidur_mape_percent,
                                                      greater_is_better=False), n_jobs=-1)
            start = time.perf_counter()
            search.fit(m[tr, None], y[tr])
            seconds = time.perf_counter() - start
            pred = search.best_estimator_.predict(m[te, None])
            out.append({"op": op, "split": split, "fit_s": seconds,
                        "best_params": search.best_params_, "cv_mape": -search.best_score_ / 100,
                        "test_mape": mape(pred, y[te])})
            print(f"  RF {split} {op}: {out[-1]['test_mape']:.2%} held out, {seconds:.1f} s",
                  flush=True)
    return out


def summarise(units: list[dict]) -> dict[str, dict[str, dict]]:
    """{model: {op: {split: mean test MAPE over TP degrees, methods chosen}}}."""
    out: dict[str, dict[str, dict]] = {}
    for u in units:
        cell = out.setdefault(u["model"], {}).setdefault(u["op"], {})
        for split, r in u["splits"].items():
            s = cell.setdefault(split, {"mapes": [], "methods": []})
            s["mapes"].append(r["test_mape"])
            s["methods"].append(r["method"])
    for ops in out.values():
        for cell in ops.values():
            for s in cell.values():
                s["mean_mape"] = float(np.mean(s.pop("mapes")))
    return out


def markdown(payload: dict) -> str:
    meta, timing = payload["meta"], payload["timing"]
    lines = ["# dooly_fx.fit on Vidur's H100 profiles: held-out error", "",
             f"- command: `{meta['command']}`",
             f"- CPU: {meta['cpu']} ({meta['cpu_count']} cores); Python {meta['python']}, "
             f"numpy {meta['numpy']}, scipy {meta['scipy']}, scikit-learn {meta['sklearn']}",
             f"- data: {', '.join(meta['files'])} (tensor-parallel degrees 1, 2, 4, 8; "
             f"num_tokens 1..4096)",
             f"- units: {timing['units']} (model × TP degree × op), {timing['points']} points",
             "", "## Fit time (all units, 5-fold selection among "
             f"{', '.join(METHODS)})", "",
             "| fitted on | total s | ms per unit |", "|---|---:|---:|"]
    per = 1000 / timing["units"]
    lines.append(f"| all points | {timing['fit_all_points_s']:.2f} | "
                 f"{timing['fit_all_points_s'] * per:.1f} |")
    for split, s in timing["fit_s"].items():
        lines.append(f"| {split} split, train part | {s:.2f} | {s * per:.1f} |")
    lines += ["", "Prediction, one `predict` call (µs): " + ", ".join(
        f"{k} {v:.2f}" for k, v in payload["predict_us"].items()), "",
        "## Held-out MAPE per op (mean over the 4 TP degrees; method chosen per unit)", "",
        "Splits: `alternate` (fit even, predict odd positions by num_tokens), `random` (a seeded "
        f"half), `extrapolate` (fit num_tokens ≤ {EXTRAPOLATE_FROM}, predict above).", ""]
    for model, ops in payload["summary"].items():
        lines += [f"### {model}", "", "| op | alternate | random | extrapolate | chosen "
                  "(alternate) |", "|---|---:|---:|---:|---|"]
        for op, cell in ops.items():
            chosen = ", ".join(f"{m}×{cell['alternate']['methods'].count(m)}"
                               for m in dict.fromkeys(cell["alternate"]["methods"]))
            lines.append(f"| {op} | {cell['alternate']['mean_mape']:.2%} | "
                         f"{cell['random']['mean_mape']:.2%} | "
                         f"{cell['extrapolate']['mean_mape']:.2%} | {chosen} |")
        lines.append("")
    lines += ["## Each candidate forced (held-out MAPE, mean over all units)", "",
              "| split | selected | " + " | ".join(METHODS) + " |",
              "|---|---:|" + "---:|" * len(METHODS)]
    for split, row in payload["by_method"].items():
        lines.append(f"| {split} | {row['selected']:.2%} | "
                     + " | ".join(f"{row[m]:.2%}" for m in METHODS) + " |")
    rf = payload["vidur_rf"]
    lines += ["", f"## Vidur's random forest vs dooly_fx.fit ({rf['model']}, TP {rf['tp']})", "",
              f"Grid {RF_GRID}, {RF_FOLDS}-fold CV scored by MAPE, `n_jobs=-1`, "
              "num_tokens as the only feature (Vidur's defaults). Fit times are wall seconds "
              "for one op's train part.", "",
              "| split | op | RF held-out MAPE | RF fit s | ours held-out MAPE | ours method | "
              "ours fit s |", "|---|---|---:|---:|---:|---|---:|"]
    for r in rf["ops"]:
        lines.append(f"| {r['split']} | {r['op']} | {r['test_mape']:.2%} | {r['fit_s']:.1f} | "
                     f"{r['ours_test_mape']:.2%} | {r['ours_method']} | {r['ours_fit_s']:.3f} |")
    for split in dict.fromkeys(r["split"] for r in rf["ops"]):
        rs = [r for r in rf["ops"] if r["split"] == split]
        lines.append(f"| {split} | **mean / total** | "
                     f"{np.mean([r['test_mape'] for r in rs]):.2%} | "
                     f"{sum(r['fit_s'] for r in rs):.1f} | "
                     f"{np.mean([r['ours_test_mape'] for r in rs]):.2%} | | "
                     f"{sum(r['ours_fit_s'] for r in rs):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path("../shared/data/vidur_profiles/h100"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/vidur_fit.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rf-model", default="Llama-2-7b-hf")
    parser.add_argument("--rf-tp", type=int, default=1)
    parser.add_argument("--rf-ops", default=",".join(OPS),
                        help="comma-separated ops for the random-forest comparison ('' = none)")
    parser.add_argument("--rf-splits", default="alternate,extrapolate",
                        help="comma-separated splits for the random-forest comparison")
    args = parser.parse_args()
    files = sorted(args.data.glob("*.mlp.csv"))
    if not files:
        sys.exit(f"no *.mlp.csv under {args.data}")
    units, timing = run_ours(files, args.seed)
    print(f"fitted {timing['units']} units: {timing['fit_all_points_s']:.2f} s on all points, "
          + ", ".join(f"{k} {v:.2f} s" for k, v in timing["fit_s"].items()), flush=True)
    by_method = {}
    for split in ("alternate", "random", "extrapolate"):
        rs = [u["splits"][split] for u in units]
        by_method[split] = {"selected": float(np.mean([r["test_mape"] for r in rs]))} | {
            m: float(np.mean([r["test_mape_by_method"][m] for r in rs])) for m in METHODS}
    rf_ops = [op for op in args.rf_ops.split(",") if op]
    rf_splits = [s for s in args.rf_splits.split(",") if s]
    rf = run_vidur_rf(args.data / f"{args.rf_model}.mlp.csv", args.rf_tp, rf_ops, rf_splits,
                      args.seed)
    cfg, rows = load(args.data / f"{args.rf_model}.mlp.csv")[args.rf_tp]
    m = np.array([float(r["num_tokens"]) for r in rows])
    for r in rf:
        tr, _ = splits(m, args.seed)[r["split"]]
        unit = next(u for u in units if u["model"] == args.rf_model and u["tp"] == args.rf_tp
                    and u["op"] == r["op"])
        y = np.array([float(row[f"time_stats.{r['op']}.median"]) for row in rows])
        flops, bytes_ = features(r["op"], cfg, m)
        start = time.perf_counter()
        fit_unit(r["op"], ["m"], m[tr, None], flops[tr], bytes_[tr], y[tr], seed=args.seed)
        r["ours_fit_s"] = time.perf_counter() - start
        r["ours_test_mape"] = unit["splits"][r["split"]]["test_mape"]
        r["ours_method"] = unit["splits"][r["split"]]["method"]
    payload = {
        "meta": {"command": " ".join(["python", *sys.argv]), "cpu": cpu_name(),
                 "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "numpy": np.__version__, "scipy": scipy.__version__,
                 "sklearn": sklearn.__version__, "files": [f.name for f in files],
                 "seed": args.seed},
        "timing": timing, "predict_us": predict_speed(files),
        "summary": summarise(units), "by_method": by_method,
        "vidur_rf": {"model": args.rf_model, "tp": args.rf_tp, "grid": RF_GRID,
                     "folds": RF_FOLDS, "ops": rf},
        "units": units}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
