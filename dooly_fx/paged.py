"""Opaque attention ops that stand for transformers' paged attention during capture.

In the continuous-batching engine, attention is stateful: it writes the step's K/V into the paged
cache and reads each sequence's context back. For capture that is two opaque ops with fake
(shape-only) implementations, so the graph holds exactly one node for each:

    kv_cache_write(k: (T, Hkv, D), v: (T, Hkv, D), cu_seqlens_q: (N+1,)) -> marker
    paged_attention(q: (T, H, D), k, v, cu_seqlens_q, marker, sliding_window, softcap,
                    cached: P, impl) -> (T, H, D)

`cached` is the request symbol P (cached tokens per sequence; 0 in a prefill step), so the
attention unit's signature is swept over (T, N, P), and `impl` names the engine's attention
(`sdpa`, `eager`). At profile time the unit runs as the engine runs it: transformers'
`paged|<impl>` attention function on a `PagedAttentionCache` built by transformers' own code,
with the read/write indices and block-diagonal mask continuous batching makes
(`engine_attention`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import Tensor

_REGISTERED = False

ENGINE_BLOCK_SIZE = 256
"""KV block size of transformers continuous batching (`ContinuousBatchingConfig` default)."""


@contextlib.contextmanager
def cache_memory(available: int):
    """transformers sizes a `PagedAttentionCache` from the device's free memory (psutil's on
    CPU, 0 without psutil); inside this block it sees `available` bytes instead."""
    from unittest import mock

    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    with mock.patch.object(PagedAttentionMemoryHandler, "get_available_memory",
                           return_value=available):
        yield


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks a sequence of `tokens` tokens holds."""
    return -(-tokens // block_size)


def batch_cache(config, dtype: torch.dtype, device: str, new: list[int], cached: list[int],
                block_size: int = ENGINE_BLOCK_SIZE):
    """(cache, resolved ContinuousBatchingConfig): a `PagedAttentionCache` made by transformers
    for `config`, sized for one batch of (new, cached) tokens per sequence (not from free
    device memory), with the blocks of sequence i allocated under request id `r{i}` in every
    layer group; sync batching, no CUDA graphs, no block sharing, as `paged|sdpa`/`eager`."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import (
        PagedAttentionCache,
        group_layers_by_attn_type,
    )
    from transformers.generation.continuous_batching.distributed import DistributedHelper
    from transformers.generation.continuous_batching.initialization import (
        resolve_continuous_batching_config,
    )

    blocks = [blocks_for(q + c, block_size) for q, c in zip(new, cached, strict=True)]
    groups = len(group_layers_by_attn_type(config)[0])
    # The token budget, a whole number of blocks: the I/O's mask buffers are (budget, cache
    # pages + budget), and the engine's budget (8192 by default) keeps their rows aligned;
    # an odd one would make every step's attention read a misaligned mask.
    budget = blocks_for(max(sum(new), 1), block_size) * block_size
    cb = resolve_continuous_batching_config(config, ContinuousBatchingConfig(
        block_size=block_size, num_blocks=groups * sum(blocks) + 1,
        max_batch_tokens=budget, max_requests_per_batch=len(new),
        max_blocks_per_request=0, use_cuda_graph=False, use_async_batching=False,
        allow_block_sharing=False), None, False)
    with cache_memory(2**50):
        cache = PagedAttentionCache(config, cb, device, DistributedHelper(None, None), {},
                                    dtype=dtype)
    for i, n in enumerate(blocks):
        if cache.allocate_blocks(n, f"r{i}", 0) is None:
            raise RuntimeError(f"the engine's cache could not hold sequence {i}")
    return cache, cb


@torch.library.custom_op("dooly::kv_cache_write", mutates_args=())
def kv_cache_write(k: Tensor, v: Tensor, cu_seqlens_q: Tensor) -> Tensor:
    """Stand-in for writing the step's K/V into the paged cache; returns a 0-d marker."""
    return torch.zeros((), dtype=k.dtype, device=k.device)


@kv_cache_write.register_fake
def _(k: Tensor, v: Tensor, cu_seqlens_q: Tensor) -> Tensor:
    return k.new_empty(())


@torch.library.custom_op("dooly::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, written: Tensor,
    sliding_window: int, softcap: float, cached: int, impl: str,
) -> Tensor:
    """Causal attention of each sequence's new tokens over themselves (reference semantics;
    the cached tokens are not materialised here)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    groups = q.shape[1] // k.shape[1]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[lo:hi].transpose(0, 1)  # (H, q, D)
        ks = k[lo:hi].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[lo:hi].transpose(0, 1).repeat_interleave(groups, 0)
        out[lo:hi] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


@paged_attention.register_fake
def _(q, k, v, cu_seqlens_q, written, sliding_window, softcap, cached, impl):
    return torch.empty_like(q)


IMPLS = ("sdpa", "eager")


def backend_name(impl: str) -> str:
    """The `attn_implementation` that captures the paged engine's `paged|<impl>` attention."""
    return f"dooly_paged_{impl}"


def _attention_for(impl: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  sliding_window=None, softcap=None, **kwargs):
        """(1, H, T, D) q/k/v in, (1, T, H, D) out; `dooly_cached` is P (absent: 0)."""
        cu_seqlens = kwargs["cu_seq_lens_q"]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
        written = torch.ops.dooly.kv_cache_write(k, v, cu_seqlens)
        out = torch.ops.dooly.paged_attention(
            q, k, v, cu_seqlens, written, int(sliding_window or 0), float(softcap or 0.0),
            kwargs.get("dooly_cached", 0), impl)
        return out.unsqueeze(0), None
    return attention


def _no_mask(*args, **kwargs):
    """The paged engine builds its masks outside the model (host side)."""
    return None


def register() -> None:
    """Make `attn_implementation="dooly_paged"` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for impl in IMPLS:
        AttentionInterface.register(backend_name(impl), _attention_for(impl))
        AttentionMaskInterface.register(backend_name(impl), _no_mask)
    _REGISTERED = True


def engine_attention(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
                     impl: str, new: list[int], cached: list[int],
                     block_size: int = ENGINE_BLOCK_SIZE,
                     window: int = 0):
    """One layer of the paged engine's attention for a batch of (new, cached) tokens per
    sequence: transformers' `paged|<impl>` function on a `PagedAttentionCache` made by
    transformers (its blocks allocated for the batch), with continuous batching's read/write
    indices and mask. A sliding-window layer (`window` > 0) runs the engine's sliding path: a
    rolling buffer read before it is written (the last `window` - 1 cached tokens, the new ones
    put in with `masked_scatter_`) and a banded mask. Returns (fn, reference): `fn()` runs it
    on fixed q/k/v; `reference()` runs plain attention of each sequence over the keys the
    engine reads (as they were before the first `fn()`) and its new tokens, to check `fn`."""
    import itertools
    from types import SimpleNamespace

    from transformers import AttentionInterface, LlamaConfig
    from transformers.generation.continuous_batching.utils import build_attention_mask

    sliding = {"sliding_window": window, "layer_types": ["sliding_attention"]} if window else {}
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim,
                         hidden_size=heads * head_dim, **sliding)
    cache, _ = batch_cache(config, dtype, device, new, cached, block_size)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    for layer in (*cache.key_cache, *cache.value_cache):
        layer.normal_(0, 1, generator=generator)
    reads: list[list[int]] | None = [[]] if any(cached) else None
    writes: list[list[int]] = [[]]
    for i, (q, c) in enumerate(zip(new, cached, strict=True)):
        cache.extend_read_and_write_indices(f"r{i}", c, q, reads, writes)
    index = {"read_index": [torch.tensor(r, dtype=torch.int64, device=device)
                            for r in (reads or [[]])],
             "write_index": [torch.tensor(w, dtype=torch.int64, device=device) for w in writes]}
    t = sum(new)
    seen = [next(iter(cache.get_seqlens_k(c, q).values()))
            for q, c in zip(new, cached, strict=True)]  # keys each sequence attends over
    cu_q = [0, *itertools.accumulate(new)]
    cu_k = [0, *itertools.accumulate(seen)]
    # The engine slices each step's (T, keys) mask out of one buffer as wide as its cache
    # pages plus its token budget, a multiple of the block size: the mask's rows keep that
    # aligned stride whatever the key count (a contiguous (T, keys) mask would not, and odd
    # rows make cuDNN's attention up to 1.5x slower, which the engine never pays).
    width = -(-cu_k[-1] // block_size) * block_size
    mask = torch.zeros(1, 1, t, width, dtype=dtype, device=device)[..., :cu_k[-1]]
    build_attention_mask(mask, cu_q, cu_k, sliding_window=window or 1)
    q, k, v = (torch.randn(1, h, t, head_dim, dtype=dtype, device=device, generator=generator)
               for h in (heads, kv_heads, kv_heads))
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads,
                             is_causal=True, training=False, scaling=head_dim**-0.5)
    attention = AttentionInterface._global_mapping[f"paged|{impl}"]
    extra = {"cu_seq_lens_q": torch.tensor(cu_q, device=device),
             "cu_seq_lens_k": torch.tensor(cu_k, device=device)}
    # The keys and values the engine reads, before fn() writes (a rolling buffer reuses slots).
    read = index["read_index"][0]
    before = [x[0].index_select(0, read) for x in (cache.key_cache, cache.value_cache)] \
        if reads and window else None

    def fn() -> Tensor:
        return attention(module, q, k, v, mask, scaling=head_dim**-0.5, cache=cache,
                         **index, **extra)[0]

    def reference() -> Tensor:  # (1, T, H, D): plain attention over what the engine reads
        if not reads:
            keys, values = k[0].transpose(0, 1), v[0].transpose(0, 1)
        elif before is None:  # full attention reads the cache after writing the new tokens
            keys, values = (x[0].index_select(0, read) for x in (cache.key_cache,
                                                                  cache.value_cache))
        else:  # sliding: the old contents, the new tokens at the sentinel slots
            fresh = read == cache.sentinel_index
            keys, values = before[0].clone(), before[1].clone()
            keys[fresh], values[fresh] = k[0].transpose(0, 1), v[0].transpose(0, 1)
        groups = heads // kv_heads
        keys, values = (x.transpose(0, 1).repeat_interleave(groups, 0).float()
                        for x in (keys, values))  # (H, K, D)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[0].float(), keys, values, attn_mask=mask[0].float())  # (H, T, D)
        return out.transpose(0, 1).unsqueeze(0)

    return fn, reference


# --- per-shape setup ------------------------------------------------------------------------

SHAPE_BUILD_IMPLS = ("sdpa",)
"""Engine attentions whose kernels pay a host-side setup for every new shape. `paged|sdpa`
calls `scaled_dot_product_attention` with a mask over (T new, K read) tokens; where PyTorch
picks its cuDNN backend, each new (T, K) builds a cuDNN graph (tens of ms on the host) and
repeated shapes hit a cache. A continuous-batching step almost always has a new K, so the
engine pays one build per attention group per step, while a unit timed at a fixed shape
never does. `paged|eager` runs matmul/softmax kernels with no such setup."""


def shape_build_canonical(attention: dict) -> dict | None:
    """The shape-build signature's canonical content for a `paged_attention` canonical (the
    query layout, dtype and impl, T its one request variable: K/V reach SDPA with every query
    head), or None when the impl has no per-shape setup."""
    impl = attention["scalars"][-1][-1]
    if impl not in SHAPE_BUILD_IMPLS:
        return None
    dtype, (_, heads, head_dim) = attention["inputs"][0]
    return {"kind": "shape_build", "ops": ["scaled_dot_product_attention"],
            "inputs": [[dtype, ["T", heads, head_dim]]], "outputs": [], "scalars": [[impl]]}


def new_shape_attention(heads: int, head_dim: int, dtype: torch.dtype, device: str,
                        tokens: int, context: int = 1024, fresh: int = 2048):
    """`fn()` runs the engine's `paged|sdpa` attention call (`sdpa_attention_paged_forward`
    after its cache read: contiguous q/k/v with every query head, a float mask viewed out of
    a wider buffer) for `tokens` queries over `tokens + context + i` keys, i growing by one
    per call, so that every call (up to `fresh`) meets a shape it has not seen."""
    width = tokens + context + fresh
    mask = torch.zeros(1, 1, tokens, width, dtype=dtype, device=device)
    q = torch.randn(1, heads, tokens, head_dim, dtype=dtype, device=device)
    calls = [0]

    def fn() -> Tensor:
        keys = tokens + context + calls[0] % fresh
        calls[0] += 1
        k = torch.empty(1, heads, keys, head_dim, dtype=dtype, device=device).normal_()
        v = torch.empty_like(k).normal_()
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, :, :, :keys], is_causal=False, scale=head_dim**-0.5)

    return fn


def cache_groups(config) -> dict[str, int]:
    """How transformers' paged cache lays out a model's layers (`group_layers_by_attn_type`),
    as `SchedulerConfig` fields: its full-attention and sliding-window layer groups, and the
    window of the latter. `config`: a transformers config."""
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    _, types = group_layers_by_attn_type(config)
    sliding = types.count("sliding_attention")
    return {"full_groups": types.count("full_attention"), "sliding_groups": sliding,
            "sliding_window": int(config.sliding_window) if sliding else 0}


# --- the engine's own per-step work -----------------------------------------------------------

def engine_prepare_canonical(config, dtype: str, attn_impl: str) -> dict:
    """The `engine_prepare` signature of a model: what the engine's per-step preparation
    depends on besides the batch (T new tokens, N sequences, P cached each), i.e. its
    scheduler, its attention layer groups as transformers forms them, the sliding window, block
    size, the attention backend (`paged|sdpa` and `paged|eager` need a dense mask) and the
    mask's dtype."""
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    _, types = group_layers_by_attn_type(config)
    window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
    return {"kind": "engine_prepare",
            "ops": ["FIFOScheduler.schedule_batch", "ContinuousBatchingIOs.prepare_batch_tensors"],
            "inputs": [["int64", ["T"]], ["int32", ["N + 1"]], ["int64", ["N*P"]]],
            "outputs": [],
            "scalars": [[sorted(types), window, ENGINE_BLOCK_SIZE, dtype, f"paged|{attn_impl}"]]}


def engine_prepare(canonical: dict, device: str, new: list[int], cached: list[int]):
    """`fn()` runs continuous batching's per-step preparation for `(new, cached)` per sequence
    and returns the forward's keyword arguments (`EngineBatch.prepare`), on the engine's
    objects for a model shaped as `canonical` says (an `engine_prepare_canonical`)."""
    from transformers import LlamaConfig

    types, window, block_size, dtype, attn = canonical["scalars"][0]
    # One layer per group type: groups, not layers, shape the work.
    config = LlamaConfig(num_hidden_layers=len(types), num_attention_heads=1,
                         num_key_value_heads=1, head_dim=8, hidden_size=8, vocab_size=16,
                         sliding_window=window, layer_types=list(types))
    config._attn_implementation = attn  # decides whether the I/O builds attention masks
    return EngineBatch(config, getattr(torch, dtype), device, new, cached, block_size).prepare


FORWARD_HOST_CACHED = 16
"""Cached tokens of each sequence in the decode steps `engine_forward` runs."""
_UNHASHED_FIELDS = ("transformers_version", "_name_or_path", "_commit_hash")


def forward_host_canonical(config, engine) -> dict:
    """The `forward_host` signature of a model under a paged `engine` (an `EngineProfile`):
    the host work of the engine's forward depends on the model's code path (its class, depth
    and every config flag) and on the engine (attention backend, dtype, experts and kernels),
    not on the batch, so the signature is the model's whole config plus the engine, and its
    one request variable, N, only says where it is timed."""
    from dataclasses import asdict

    fields = {k: v for k, v in config.to_diff_dict().items() if k not in _UNHASHED_FIELDS}
    return {"kind": "forward_host",
            "ops": [f"{config.model_type}.forward", "ModelRunner.compute_batch"],
            "inputs": [["int64", ["N"]]], "outputs": [],
            "scalars": [[engine.label]], "config": fields, "engine": asdict(engine)}


_FORWARD_MODELS: dict[str, torch.nn.Module] = {}
"""The model `engine_forward` built last (one at a time: the next signature's replaces it)."""


def engine_forward(canonical: dict, device: str, seqs: int):
    """(fn, batch): `fn()` runs the paged engine's forward (`EngineBatch.forward`) over a
    decode step of `seqs` sequences of `FORWARD_HOST_CACHED` cached tokens each, in the
    engine's autograd mode (`validate.engine_grad_mode`), on the model of a
    `forward_host_canonical` with random weights (built once per signature and device);
    `batch` is its `EngineBatch`."""
    import json

    from dooly_fx.engine import EngineProfile
    from dooly_fx.spec import spec_from_config
    from dooly_fx.validate import engine_grad_mode, engine_model

    key = f"{device} {json.dumps(canonical, sort_keys=True)}"
    if key not in _FORWARD_MODELS:
        release_models()
        spec = spec_from_config("forward_host", canonical["config"], "a forward_host signature")
        _FORWARD_MODELS[key] = engine_model(spec, EngineProfile(**canonical["engine"]), device)
    model = _FORWARD_MODELS[key]
    batch = EngineBatch(model.config, model.dtype, device, [1] * seqs,
                        [FORWARD_HOST_CACHED] * seqs)
    forward = batch.forward(model)

    def fn() -> None:
        with engine_grad_mode():
            forward()

    return fn, batch


def release_models() -> None:
    """Free the model `engine_forward` keeps (the profiler calls this after each signature, so
    that it holds no device memory while other units are timed)."""
    if _FORWARD_MODELS:
        _FORWARD_MODELS.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class EngineBatch:
    """One continuous-batching step of `config`'s model for `(new, cached)` tokens per
    sequence, on transformers' own scheduler, cache and I/O objects sized for the batch
    (`batch_cache`); requests with one new token over a cache are decoding, the others
    (chunked) prefilling. `config._attn_implementation` is the engine's (`paged|sdpa`,
    `paged|eager`): it decides whether the I/O builds attention masks.

    `prepare()` is what `ContinuousBatchProcessor.prepare_next_batch` does between forwards:
    the FIFO scheduler picks the batch from its active requests (token budget, block checks,
    request states), `ContinuousBatchingIOs.prepare_batch_tensors` builds input ids,
    positions, cumulative lengths, the cache's read/write indices and one attention mask per
    layer group, all copied to the device, and `get_model_kwargs` hands them over. `step(model)`
    is a whole engine step: `prepare()`, then the engine's `ModelRunner` (forward, logits,
    greedy sampling) and the wait for its outputs. Both can run again and again: each call
    puts the requests back where the step begins."""

    def __init__(self, config, dtype: torch.dtype, device: str, new: list[int],
                 cached: list[int], block_size: int = ENGINE_BLOCK_SIZE,
                 tokens: list[list[int]] | None = None) -> None:
        """`tokens`: each sequence's token ids, cached then new (default: all 1)."""
        from transformers import LogitsProcessorList
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList,
        )
        from transformers.generation.continuous_batching.input_outputs import (
            ContinuousBatchingIOs,
        )
        from transformers.generation.continuous_batching.requests import (
            RequestState,
            RequestStatus,
        )
        from transformers.generation.continuous_batching.scheduler import FIFOScheduler

        self.cache, self.cb = batch_cache(config, dtype, device, new, cached, block_size)
        self.processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList())
        self.io = ContinuousBatchingIOs(self.cache, config, self.cb, torch.device(device), dtype,
                                        self.processors)
        # No safety margin: the cache is sized for this batch, so it has no free blocks to keep.
        self.scheduler = FIFOScheduler(self.cache, 0.0, len(new))
        self._requests = []
        for i, (q, c) in enumerate(zip(new, cached, strict=True)):
            ids = tokens[i] if tokens else [1] * (q + c)
            state = RequestState(request_id=f"r{i}", initial_tokens=ids)
            state.allocated_blocks = blocks_for(q + c, block_size)  # as batch_cache did
            decoding = q == 1 and c > 0
            self._requests.append((state, c, ids[c:], decoding, RequestStatus.DECODING
                                   if decoding else RequestStatus.PREFILLING))
            self.scheduler.active_requests[state.request_id] = state
        self.tokens = sum(new)
        self._runner = None

    def prepare(self) -> dict:
        for state, c, todo, decoding, status in self._requests:  # back to the step's start
            state.status, state.position_offset = status, c
            if decoding:
                state.tokens_to_process, state.remaining_prefill_tokens = todo, []
            else:
                state.tokens_to_process, state.remaining_prefill_tokens = [], todo
        batch, fast_path, q_tokens, kv_read = self.scheduler.schedule_batch(
            self.tokens, self.cache.num_pages)
        if batch is None or len(batch) != len(self._requests) or q_tokens != self.tokens:
            raise RuntimeError(f"the scheduler took {0 if batch is None else len(batch)} of "
                               f"{len(self._requests)} sequences ({q_tokens} of {self.tokens} "
                               "tokens)")
        self.io.prepare_batch_tensors(batch, self.processors, fast_path, q_tokens, kv_read,
                                      False)
        return self.io.get_model_kwargs()

    def step(self, model) -> None:
        self._model_runner().compute_batch(model, self.prepare())
        self.io.retrieve_device_outputs()

    def forward(self, model) -> Callable[[], None]:
        """The engine's forward over this step, prepared once, to run again and again: the
        `ModelRunner`'s forward, logits processing and greedy sampling, with no wait for the
        GPU (`io.retrieve_device_outputs()` brings the sampled ids back)."""
        return functools.partial(self._model_runner().compute_batch, model, self.prepare())

    def _model_runner(self):
        if self._runner is None:
            from transformers.generation.continuous_batching.model_runner import ModelRunner

            self._runner = ModelRunner(self.processors, self.cb, self.io, self.cache,
                                       do_sample=False, return_logprobs=False)
        return self._runner
