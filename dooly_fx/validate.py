"""Step-level validation: time real forward steps of a model, compare with `predict_step`.

    parse_batch("prefill:2x512,decode:30x1024") -> [(512, 0), (512, 0), (1, 1024), ...]
    measure_steps(spec, engine, batches, device) -> [MeasuredStep]   GPU (or CPU) side only
    compare(loaded, measured) -> report dict                           CPU side only

The real step is what the engine runs, on a transformers model built from the config with
random weights. The padded engine: `model(input_ids[B, S], past_key_values=cache,
logits_to_keep=1)`, where the cache is a fresh `DynamicCache` holding P random tokens per
sequence and layer (made with transformers' own cache code, so sliding layers keep their
window), equal-length sequences only. The paged engine (continuous batching, `paged|sdpa` or
`paged|eager`): a whole engine step over any list of (new, cached) per sequence, on the
engine's own scheduler, paged cache and I/O objects (`paged.EngineBatch`): batch
preparation, forward, sampling, outputs back to the host. Each step is timed from an idle GPU
with CUDA events (so host-bound steps count their issue time): its first run is kept apart
(`first_ms`), then warm-up, then the median of `reps`. A host probe before each rep
(`hostinfo.host_probe_ms`) records how fast the host was, so that a host-bound step can be
predicted for the host it ran on as well as for the DB's (`compare`).
"""

from __future__ import annotations

import functools
import gc
import itertools
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dooly_fx.engine import EngineProfile
from dooly_fx.errors import UserError
from dooly_fx.hostinfo import host_probe_ms
from dooly_fx.spec import ModelSpec

_ITEM = re.compile(r"^(?:(prefill|decode|mixed):)?(\d+)x(\d+)(?:\+(\d+))?$")

STANDARD_STEPS = (
    "prefill:1x128", "prefill:1x512", "prefill:1x2048", "prefill:4x256", "prefill:4x1024",
    "prefill:8x512", "decode:1x512", "decode:1x2048", "decode:8x512", "decode:8x2048",
    "decode:32x1024", "decode:64x512", "decode:64x2048", "mixed:1x256+1024",
    "mixed:4x128+2048", "mixed:2x512+512",
)
"""Batch compositions validated by default: prefill, decode at several sizes and cached
lengths, and mixed (chunked-prefill) steps, within the default profile bounds."""

PAGED_STEPS = STANDARD_STEPS + (
    "decode:16x512,decode:16x2048", "prefill:1x512,decode:31x1024",
    "mixed:1x1024+2048,decode:15x512", "prefill:2x1024,decode:62x1024",
    "mixed:1x384+640,mixed:1x128+3000,decode:24x700",
)
"""The paged engine's default steps: the standard set, then batches as continuous batching
forms them, sequences of different lengths in one step (decodes at several cached lengths;
a prefill or a prefill chunk beside decodes; odd key counts)."""


MAX_BATCH_SEQUENCES = 1 << 20
"""The most sequences a batch spec may hold (a list entry each)."""


def parse_batch(text: str) -> list[tuple[int, int]]:
    """A batch spec to (new, cached) per sequence. Items, comma-separated, concatenate:
    `prefill:BxS` (B sequences of S new tokens), `decode:BxP` (B sequences, 1 new token,
    P cached), `mixed:BxS+P` or plain `BxS+P` (S new on top of P cached)."""
    batch: list[tuple[int, int]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        match = _ITEM.match(item)
        if not match:
            raise UserError(f"bad batch item '{item}': expected prefill:BxS, decode:BxP or "
                            "mixed:BxS+P")
        phase, b, n, cached = match.group(1), int(match.group(2)), int(match.group(3)), \
            match.group(4)
        if b < 1 or n < 1:
            raise UserError(f"bad batch item '{item}': counts must be >= 1")
        if len(batch) + b > MAX_BATCH_SEQUENCES:
            raise UserError(f"bad batch item '{item}': more than {MAX_BATCH_SEQUENCES} "
                            "sequences in one step")
        if phase == "decode":
            if cached is not None:
                raise UserError(f"bad batch item '{item}': decode:BxP takes no +")
            batch += [(1, n)] * b
        elif phase == "prefill" and cached is not None:
            raise UserError(f"bad batch item '{item}': prefill:BxS has no cached tokens")
        else:
            batch += [(n, int(cached or 0))] * b
    if not batch:
        raise UserError("empty batch spec")
    return batch


@dataclass
class MeasuredStep:
    spec: str
    batch: list[tuple[int, int]]
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    skipped: str | None = None
    first_ms: float | None = None
    """The step's first run, before its warm-up: in the paged engine, at an attention shape
    the engine had not seen (cuDNN graph builds and the like)."""
    host_probe_ms: float | None = None
    """How fast the host was while the step ran: the median host probe
    (`hostinfo.host_probe_ms`) run before each timed rep."""


def build_model(spec: ModelSpec, engine: EngineProfile, device: str,
                fused_kinds=None) -> torch.nn.Module:
    """The transformers model of `spec` with random weights, in the engine's dtype and
    attention implementation, on `device`; with `kernels="triton"`, fused (`fused.fuse_model`,
    the unit kinds `fused_kinds`, default all)."""
    from transformers import AutoModelForCausalLM

    from dooly_fx.capture import has_experts

    config = spec.config.__class__.from_dict(spec.config.to_dict())
    config._attn_implementation = engine.attn_impl
    if has_experts(config):
        config._experts_implementation = engine.experts_impl
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=engine.torch_dtype)
    if engine.kernels == "triton":
        from dooly_fx.fused import fuse_model

        fuse_model(model, fused_kinds)
    return model.eval()


def engine_model(spec: ModelSpec, engine: EngineProfile, device: str,
                 fused_kinds=None) -> torch.nn.Module:
    """`build_model`, then, for the paged engine, the model switched to its `paged|<attn>`
    attention, as continuous batching runs it."""
    model = build_model(spec, engine, device, fused_kinds)
    if engine.engine == "paged":
        model.set_attn_implementation(f"paged|{engine.attn_impl}")
    return model


def _cache(model, batch: list[tuple[int, int]], device: str, dtype: torch.dtype,
           base: dict) -> object:
    """A fresh DynamicCache holding P random tokens per sequence (the same tensors each time:
    transformers' first `update` keeps them, later updates make new tensors)."""
    from transformers import DynamicCache

    from dooly_fx.capture import kv_geometry

    cached = max(c for _, c in batch)
    cache = DynamicCache(config=model.config)
    if cached == 0:
        return cache
    config = model.config
    kv_heads, head_dim = kv_geometry(config)
    shape = (len(batch), kv_heads, cached, head_dim)
    if base.get("shape") != shape:
        base.clear()
        base["shape"] = shape
        base["k"] = torch.randn(shape, device=device, dtype=dtype) * 0.02
        base["v"] = torch.randn(shape, device=device, dtype=dtype) * 0.02
    for layer in range(config.num_hidden_layers):
        cache.update(base["k"], base["v"], layer)
    return cache


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    if not device.startswith("cuda"):
        def cpu(fn: Callable[[], object]) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return cpu

    def cuda(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return cuda


def engine_grad_mode():
    """The autograd mode transformers' engines run their forwards in: `torch.no_grad()`
    (`GenerationMixin.generate`, `ContinuousBatchProcessor._generation_step`), the parameters
    still requiring grad. Under `torch.inference_mode()` a forward skips the autograd and
    view-tracking dispatch the engine pays, and host-bound steps take 8-15% less time
    (`bench/results/grad_mode.md`), so the harness times the engine's mode."""
    return torch.no_grad()


def measure_steps(spec: ModelSpec, engine: EngineProfile, steps: Sequence[str], device: str,
                  warmup: int = 3, reps: int = 10,
                  on_step: Callable[[], None] | None = None,
                  fused_kinds=None) -> list[MeasuredStep]:
    """Time each batch spec's real engine step; a step that runs out of memory is recorded
    as skipped. `fused_kinds`: see `build_model`."""
    model = engine_model(spec, engine, device, fused_kinds)
    base: dict = {}

    def calls(batch):
        return (_paged_calls(model, engine, device, batch) if engine.engine == "paged" else
                _padded_calls(model, engine, device, batch, base))

    timer, out = _timer(device), []
    with engine_grad_mode():  # first-use costs (library handles, kernels) go here
        for call in itertools.islice(calls(parse_batch("prefill:1x16")), 2):
            call()
    for text in steps:
        batch = parse_batch(text)
        try:
            times, probes = [], []
            gc.collect()
            gc.disable()  # a collection inside a timed step would be noise, not the engine
            with engine_grad_mode():
                for call in itertools.islice(calls(batch), warmup + reps):
                    probes.append(host_probe_ms())
                    times.append(timer(call))
            out.append(MeasuredStep(text, batch, statistics.median(times[warmup:]),
                                    min(times[warmup:]), max(times[warmup:]), reps,
                                    first_ms=times[0],
                                    host_probe_ms=statistics.median(probes[warmup:])))
        except torch.cuda.OutOfMemoryError:
            out.append(MeasuredStep(text, batch, float("nan"), float("nan"), float("nan"), 0,
                                    skipped="out of memory"))
        finally:
            gc.enable()
            base.clear()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if on_step:
            on_step()
    return out


def _padded_calls(model, engine: EngineProfile, device: str, batch: list[tuple[int, int]],
                  base: dict) -> Iterator[Callable[[], object]]:
    """The padded engine's step, again and again: the forward over `input_ids[B, S]` on a
    fresh cache each time (made before the call, outside the timed region)."""
    if len({c for _, c in batch}) > 1 or len({q for q, _ in batch}) > 1:
        raise UserError("the padded engine runs equal-length sequences; give one item per "
                        "step")
    ids = torch.randint(0, model.config.vocab_size, (len(batch), batch[0][0]), device=device)
    while True:
        cache = _cache(model, batch, device, engine.torch_dtype, base)
        yield functools.partial(model, input_ids=ids, use_cache=True, past_key_values=cache,
                                logits_to_keep=1)


def _paged_calls(model, engine: EngineProfile, device: str, batch: list[tuple[int, int]]
                 ) -> Iterator[Callable[[], object]]:
    """The continuous-batching engine's step, again and again (`paged.EngineBatch.step`:
    batch preparation, forward, sampling, outputs back to the host)."""
    from dooly_fx.paged import EngineBatch

    step = EngineBatch(model.config, engine.torch_dtype, device, [q for q, _ in batch],
                       [c for _, c in batch])
    return itertools.repeat(functools.partial(step.step, model))


FIDELITY_STEPS = 3
"""Steps profiled per batch in `unit_fidelity` (a unit's in-step time averages their calls)."""

LEAF_KINDS = ("gemm", "lm_head", "norm", "embedding", "moe_experts")
"""Unit kinds that are one leaf module of the model: their kernels can be attributed to the
unit inside a real step by a profiler range around the module."""


def unit_fidelity(spec: ModelSpec, engine: EngineProfile, loaded, steps: Sequence[str],
                  device: str = "cuda") -> list[dict]:
    """Microbenchmark fidelity: per unit, the predicted GPU time of one call against the time
    of the same module's kernels inside the real step (torch.profiler ranges around each leaf
    module of a `LEAF_KINDS` unit; kernel time per call, averaged over the module's calls):
    `predicted_ms` as the unit was timed (boost clock), `loaded_ms` with its share of the
    step's lower clock under load (`Step.in_step_ms`). The profiler slows the host, so a
    step it records may keep the GPU less busy than the same step does unprofiled."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from dooly_fx.fused import profiled_kinds
    from dooly_fx.predict import predict_step

    model = build_model(spec, engine, device, profiled_kinds(loaded))
    modules = dict(model.named_modules())
    rows, base = [], {}
    ranges: dict[str, object] = {}  # module name -> its open profiler range
    for text in steps:
        batch = parse_batch(text)
        step = predict_step(loaded, batch)
        wanted = {u.role: u for u in step.units if u.kind in LEAF_KINDS}
        hooks = []
        for name, module in modules.items():
            role = _role(name)
            if role in wanted:
                def enter(mod, args, role=role, name=name):
                    ranges[name] = record_function(f"dooly:{role}")
                    ranges[name].__enter__()

                def leave(mod, args, output, name=name):
                    ranges.pop(name).__exit__(None, None, None)
                hooks += [module.register_forward_pre_hook(enter),
                          module.register_forward_hook(leave)]
        ids = torch.randint(0, model.config.vocab_size, (len(batch), batch[0][0]), device=device)
        try:
            with engine_grad_mode():
                for _ in range(2):  # warm-up
                    model(input_ids=ids, past_key_values=_cache(model, batch, device,
                                                                 engine.torch_dtype, base),
                          use_cache=True, logits_to_keep=1)
                cache = _cache(model, batch, device, engine.torch_dtype, base)
                activities = [ProfilerActivity.CPU]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    activities.append(ProfilerActivity.CUDA)
                with profile(activities=activities) as prof:
                    for _ in range(FIDELITY_STEPS):
                        model(input_ids=ids, past_key_values=cache, use_cache=True,
                              logits_to_keep=1)
                        cache = _cache(model, batch, device, engine.torch_dtype, base)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
        finally:
            for hook in hooks:
                hook.remove()
            base.clear()
        for event in prof.key_averages():
            # The host-side range: its device time is its kernels' (the GPU-side copy of the
            # range spans the gaps between them too).
            if not event.key.startswith("dooly:") or event.device_type != DeviceType.CPU:
                continue
            unit = wanted[event.key.removeprefix("dooly:")]
            total = event.device_time_total if device.startswith("cuda") else \
                event.cpu_time_total
            measured = total / 1e3 / max(1, event.count)
            held = step.in_step_ms(unit)
            rows.append({"step": text, "role": unit.role, "kind": unit.kind,
                         "calls": event.count, "in_step_ms": measured,
                         "predicted_ms": unit.gpu_ms,
                         "error": (unit.gpu_ms - measured) / measured if measured else None,
                         "loaded_ms": held,
                         "loaded_error": (held - measured) / measured if measured else None})
    return rows


def _role(module_name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `model.layers.*.mlp.down_proj` (unit roles)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", module_name)


def compare(loaded, measured: Sequence[MeasuredStep]) -> dict:
    """Per-step prediction error of `loaded` (a `predict.Loaded`) against measured steps;
    median and p90 absolute percentage error over the steps that ran. Where the prediction
    has a per-shape setup (`Step.setup_ms`) and the step's first run was recorded, that run
    is compared with the prediction plus the setup as well (`first_error`). Where the host's
    speed was measured beside the step (`MeasuredStep.host_probe_ms`), the step is predicted
    again for a host of that speed (`predict.at_host_speed`: `at_host_ms`, `at_host_error`)."""
    from dooly_fx.predict import at_host_speed, predict_step

    rows, errors, first, at_host = [], [], [], []
    for m in measured:
        row = asdict(m)
        if m.skipped is None:
            step = predict_step(loaded, m.batch)
            error = (step.total_ms - m.median_ms) / m.median_ms
            errors.append(abs(error))
            row.update(phase=step.phase, predicted_ms=step.total_ms, gpu_ms=step.gpu_ms,
                       host_ms=step.host_ms, prepare_ms=step.prepare_ms,
                       setup_ms=step.setup_ms, error=error,
                       extrapolated=any(u.extrapolated for u in step.units))
            if m.host_probe_ms and loaded.host_probe_ms:
                timed = at_host_speed(loaded, m.host_probe_ms)
                row["at_host_ms"] = predict_step(timed, m.batch).total_ms
                row["at_host_error"] = (row["at_host_ms"] - m.median_ms) / m.median_ms
                row["host_scale"] = timed.host_scale
                at_host.append(abs(row["at_host_error"]))
            if step.setup_ms and m.first_ms:
                row["first_error"] = (step.total_ms + step.setup_ms - m.first_ms) / m.first_ms
                first.append(abs(row["first_error"]))
        rows.append(row)
    report = {"model": loaded.model, "engine": loaded.engine, "steps": rows,
              **_ape("", errors, always=True)}
    if first:
        report["first_median_ape"] = float(np.median(first))
    return {**report, **_ape("at_host_", at_host)}


def _ape(prefix: str, errors: Sequence[float], always: bool = False) -> dict:
    """{prefix}median_ape and {prefix}p90_ape of absolute errors (None, or nothing unless
    `always`, when there are none)."""
    if not errors:
        return {f"{prefix}median_ape": None, f"{prefix}p90_ape": None} if always else {}
    return {f"{prefix}median_ape": float(np.median(errors)),
            f"{prefix}p90_ape": float(np.percentile(errors, 90))}
