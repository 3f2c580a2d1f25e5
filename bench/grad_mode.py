"""What the engine's autograd mode costs its host-bound steps, and whether the DB sees it.

    python bench/grad_mode.py [--db bench/results/h100.db] [--rounds 15]
        [--runs llama-3.2-1b:eager llama-3.2-1b:sdpa llama-3.1-8b:sdpa]
        [--out bench/results/grad_mode]

transformers runs its forwards under `torch.no_grad()` (`ContinuousBatchProcessor.
_generation_step`, `GenerationMixin.generate`), its parameters requiring grad as built; an
`inference_mode` forward skips the autograd and view-tracking dispatch altogether. On a CUDA
machine, for each paged model and attention:

* steps: `paged.EngineBatch.step` (what `validate-steps --engine paged` times) for a few
  batches under `inference_mode`, under `no_grad`, and under `no_grad` with the parameters
  frozen (`requires_grad_(False)`), the modes interleaved round by round, CUDA events around
  each step and a host probe before it;
* units: every unit of one decode and one prefill step (`predict.predict_step` on the DB
  gives their signatures, counts and points), lowered as the profiler lowers them, host issue
  time (`timing.host_issue`) as the profiler times it (grad on, plain input tensors), as the
  engine would run it (`no_grad`, the weight inputs requiring grad) and under
  `inference_mode`; Σ count × host ms per mode against the DB's own Σ.

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from dooly_fx.db import LatencyDB
from dooly_fx.engine import EngineProfile
from dooly_fx.hostinfo import host_probe_ms, machine
from dooly_fx.lowering import LOWERINGS, lower, materialise, replay_subgraph
from dooly_fx.paged import EngineBatch
from dooly_fx.passes.taint import Config
from dooly_fx.predict import load, predict_step
from dooly_fx.profile import collect
from dooly_fx.spec import resolve_model
from dooly_fx.validate import _timer, engine_model, parse_batch

STEP_BATCHES = ("decode:8x600", "decode:16x500", "decode:28x900", "decode:64x512",
                "prefill:1x512", "mixed:1x256+1024,decode:15x512")
UNIT_BATCHES = ("decode:16x500", "prefill:1x512")
UNIT_MODES = {"profiled": (contextlib.nullcontext, False),
              "engine_no_grad": (torch.no_grad, True),
              "inference_mode": (torch.inference_mode, False)}
"""How a unit's host issue is timed: (autograd context, weight inputs requiring grad): as the
profiler times it, as the engine would run it, and under `inference_mode`."""


def _frozen(model, frozen: bool):
    @contextlib.contextmanager
    def ctx():
        model.requires_grad_(not frozen)
        try:
            with torch.no_grad():
                yield
        finally:
            model.requires_grad_(True)
    return ctx


def step_modes(model) -> dict:
    return {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
            "no_grad_frozen": _frozen(model, True)}


def measure_steps(model, batches, rounds: int, device: str = "cuda") -> list[dict]:
    timer, rows = _timer(device), []
    modes = step_modes(model)
    for text in batches:
        batch = parse_batch(text)
        engine_step = EngineBatch(model.config, next(model.parameters()).dtype, device,
                                  [q for q, _ in batch], [c for _, c in batch])
        call = functools.partial(engine_step.step, model)
        times = {m: [] for m in modes}
        probes = {m: [] for m in modes}
        for rnd in range(rounds + 3):
            for name, ctx in modes.items():
                with ctx():
                    probe = host_probe_ms()
                    ms = timer(call)
                if rnd >= 3:
                    times[name].append(ms)
                    probes[name].append(probe)
        row = {"batch": text, "rounds": rounds}
        for name in modes:
            row[name] = {"median_ms": statistics.median(times[name]),
                         "probe_ms": statistics.median(probes[name])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine_step, call
        torch.cuda.empty_cache()
    return rows


def _unit_fn(case, point, requires_grad: bool, device: str = "cuda"):
    """The unit's runnable as the profiler lowers it; with `requires_grad`, a subgraph's
    weight inputs (floating, every dim a config value) require grad as the model's do."""
    if case.kind in LOWERINGS or case.subgraph is None or not requires_grad:
        runnable = lower(case, point, device)
    else:
        args = materialise(case, point, device)
        for label, arg in zip(case.inputs, args, strict=True):
            if (isinstance(arg, torch.Tensor) and arg.is_floating_point()
                    and all(isinstance(d, Config) for d in label.dims)):
                arg.requires_grad_(True)
        runnable = replay_subgraph(case, point, device, args=args)
    with torch.no_grad():
        runnable.check()
    return runnable.fn


def measure_units(db, env: str, spec, engine: EngineProfile, batches,
                  device: str = "cuda") -> list[dict]:
    from dooly_fx.timing import host_issue

    loaded = load(db, spec.name, env, engine.label)
    coll = collect([spec], engine, ["prefill", "decode"])
    rows = []
    for text in batches:
        step = predict_step(loaded, parse_batch(text))
        sums = dict.fromkeys(UNIT_MODES, 0.0)
        units = []
        for u in step.units:
            case = coll.cases.get(u.signature)
            if case is None:
                continue
            got = {}
            for mode, (ctx, weights_require_grad) in UNIT_MODES.items():
                fn = _unit_fn(case, u.point, weights_require_grad, device)
                with ctx():
                    got[mode] = host_issue(fn, device)[0]
                sums[mode] += u.count * got[mode]
            units.append({"role": u.role, "kind": u.kind, "count": u.count,
                          "db_host_ms": u.host_ms, **got})
        row = {"batch": text, "db_host_ms": step.host_ms, "db_gpu_ms": step.gpu_ms,
               "db_prepare_ms": step.prepare_ms, "sum_host_ms": sums, "units": units}
        print(json.dumps({k: v for k, v in row.items() if k != "units"}), flush=True)
        rows.append(row)
    return rows


def _markdown(result: dict) -> str:
    lines = ["# Autograd mode of the engine's steps", "",
             f"- command: `{result['command']}`",
             f"- machine: {result['machine']['device']}, torch {result['machine']['torch']}, "
             f"transformers {result['machine']['transformers']}",
             "- steps: `EngineBatch.step` median ms over the rounds, modes interleaved; "
             "ratio = no_grad / inference_mode", "",
             "| model | attn | batch | inference_mode ms | no_grad ms | no_grad, frozen ms "
             "| no_grad / inference | probe ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        for r in run["steps"]:
            inf, ng, fr = (r[m]["median_ms"] for m in ("inference_mode", "no_grad",
                                                          "no_grad_frozen"))
            lines.append(f"| {run['model']} | {run['attn']} | {r['batch']} | {inf:.2f} | "
                         f"{ng:.2f} | {fr:.2f} | {ng / inf:.3f} | "
                         f"{r['no_grad']['probe_ms']:.3f} |")
    lines += ["", "Units: Σ count × host issue ms of one step's units, per mode, and the DB's "
              "Σ (its fitted host ms at its own host speed)", "",
              "| model | attn | batch | DB Σ host | profiled (grad on, plain) | engine "
              "(no_grad, weights require grad) | inference_mode |",
              "|---|---|---|---:|---:|---:|---:|"]
    for run in result["runs"]:
        for r in run["units"]:
            s = r["sum_host_ms"]
            lines.append(f"| {run['model']} | {run['attn']} | {r['batch']} | "
                         f"{r['db_host_ms']:.2f} | {s['profiled']:.2f} | "
                         f"{s['engine_no_grad']:.2f} | {s['inference_mode']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="bench/results/h100.db")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", nargs="+",
                        default=["llama-3.2-1b:eager", "llama-3.2-1b:sdpa", "llama-3.1-8b:sdpa"])
    parser.add_argument("--out", default="bench/results/grad_mode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("grad_mode.py needs a CUDA device")
    runs = []
    with LatencyDB.open(args.db, create=False) as db:
        env = next(e["fingerprint"] for e in db.environments()
                   if e.get("device_type") == "cuda")
        for item in args.runs:
            name, attn = item.split(":")
            spec = resolve_model(name)
            engine = EngineProfile(engine="paged", attn_impl=attn)
            model = engine_model(spec, engine, "cuda")
            steps = measure_steps(model, STEP_BATCHES, args.rounds)
            del model
            torch.cuda.empty_cache()
            units = measure_units(db, env, spec, engine, UNIT_BATCHES)
            runs.append({"model": name, "attn": attn, "steps": steps, "units": units})
    result = {"command": "python bench/grad_mode.py " + " ".join(sys.argv[1:]),
              "machine": machine("cuda"), "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
