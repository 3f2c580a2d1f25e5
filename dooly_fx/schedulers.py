"""Batch schedulers of continuous-batching engines, and their configuration.

A scheduler owns the waiting and running requests and the paged KV cache's free-block count.
`schedule(now)` picks the next engine step: it sets `seq.chunk` (new tokens) on every sequence
it returns and allocates their blocks, preempting requests when the policy does. It never
measures or predicts time: the simulator (`dooly_fx/simulate.py`) asks a step-time function.

Policies (docs/simulator.md has the details and what is not modelled):
* "transformers-fifo", "transformers-prefill-first": transformers 5.17 continuous batching,
  mirroring `generation/continuous_batching/scheduler.py` (`FIFOScheduler`,
  `PrefillFirstScheduler`, `Scheduler._process_candidates`) and the soft-reset eviction of
  `offloading_manager.py` (`OffloadingManager.offload_requests`, no CPU swap space).
* "vllm": vLLM v1 (`vllm/v1/core/sched/scheduler.py`): running requests first, then waiting
  ones FCFS into the leftover token budget, preemption by recompute of the newest request.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, fields, replace
from math import inf

from dooly_fx.errors import UserError

POLICIES = ("transformers-fifo", "transformers-prefill-first", "vllm")


@dataclass(frozen=True)
class SchedulerConfig:
    """How an engine forms batches from requests and manages its paged KV cache."""

    policy: str = "transformers-fifo"
    """One of POLICIES."""
    max_batch_tokens: int = 8192
    """Token budget of one step (transformers `max_batch_tokens`, vLLM
    `max_num_batched_tokens`)."""
    max_seqs: int = 1024
    """Most sequences in one step (transformers `max_requests_per_batch`, vLLM `max_num_seqs`,
    which caps the running requests)."""
    block_size: int = 256
    """Tokens per KV-cache block."""
    num_blocks: int = 2048
    """KV-cache blocks on the GPU. Engines size this from free memory: see `num_blocks_for`."""
    chunked_prefill: bool = True
    """Split prompts across steps to fit the token budget. transformers always does; off, a
    prompt that does not fit the leftover budget waits for a later step."""
    cuda_graph_padding: bool = False
    """Pad each step's shape as the engine's CUDA graphs do; the padding reaches the step-time
    function as pseudo-sequences with 0 cached tokens (see `padding`)."""
    safety_margin: float | None = None
    """transformers only: below this fraction of free blocks, only decodes and the first
    prefill are scheduled. None: the scheduler's default (FIFO 0.15, prefill-first 0.0)."""
    q_padding_interval: int = 64
    """transformers only: with padding, a varlen step's tokens are padded to a multiple of this
    (`q_padding_interval_size`)."""
    full_groups: int = 1
    """transformers only: full-attention layer groups of the paged cache
    (`group_layers_by_attn_type`); each holds one physical block per block of a request."""
    sliding_groups: int = 0
    """transformers only: sliding-window layer groups; each holds one physical block per block
    of a request, up to a window's worth (`sliding_blocks`) per request."""
    sliding_window: int = 0
    """transformers only: the sliding window in tokens (with sliding-window groups)."""
    max_blocks_per_request: int = 0
    """transformers only: decode fast path (flash_attn_with_kvcache block table) for
    sequences shorter than this many blocks; 0 disables it, as for `paged|sdpa`."""
    max_graph_tokens: int | None = None
    """vLLM only: largest CUDA-graph capture size; bigger steps run unpadded. None: vLLM's
    default min(2 * max_seqs, 512)."""
    max_prefill_chunk: int = 0
    """vLLM only: `long_prefill_token_threshold`, the most prompt tokens one request gets in
    a step; 0: no cap."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UserError(f"unknown scheduler policy {self.policy!r} "
                            f"(choose from {', '.join(POLICIES)})")
        for name in ("max_batch_tokens", "max_seqs", "block_size", "num_blocks",
                     "q_padding_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_blocks_per_request", "max_prefill_chunk", "full_groups",
                     "sliding_groups", "sliding_window"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.full_groups + self.sliding_groups < 1:
            raise UserError("the KV cache needs at least one layer group")
        if self.sliding_groups and self.sliding_window < 1:
            raise UserError("sliding-window layer groups need a sliding_window >= 1")
        if self.safety_margin is not None and not 0 <= self.safety_margin <= 1:
            raise UserError(f"safety_margin must be in [0, 1], got {self.safety_margin}")
        if self.max_graph_tokens is not None and self.max_graph_tokens < 1:
            raise UserError(f"max_graph_tokens must be positive, got {self.max_graph_tokens}")

    @property
    def num_pages(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.num_blocks * self.block_size

    @property
    def sliding_blocks(self) -> int:
        """The most blocks a request keeps in a sliding-window group, ceil(window / block)
        (`SlidingAttentionCacheAllocator`)."""
        return -(-self.sliding_window // self.block_size)

    @property
    def read_limit(self) -> float:
        """The most cached tokens a request reads in a step: all of them, or with only
        sliding-window groups the window (`Scheduler.read_cache_limit`)."""
        return self.sliding_window if self.sliding_groups and not self.full_groups else inf

    @property
    def request_tokens(self) -> float:
        """Most tokens one request can keep in the KV cache: `num_pages`, less where
        transformers' layer groups each hold their own blocks of it (inf: a cache of
        sliding-window groups only, which one request never outgrows)."""
        full, sliding, window = self.full_groups, self.sliding_groups, self.sliding_blocks
        if self.policy == "vllm":
            return self.num_pages
        if not full:
            return inf if sliding * window <= self.num_blocks else \
                self.num_blocks // sliding * self.block_size
        per = full + sliding
        blocks = (self.num_blocks // per if per * window >= self.num_blocks
                  else window + (self.num_blocks - per * window) // full)
        return blocks * self.block_size


# Engine defaults. transformers: `ContinuousBatchingConfig` (block_size 256), the memory
# handler's default max_batch_tokens (8192) and generate_batch's max_requests_per_batch
# (min(num_requests, 1024)); CUDA graphs are off by default for paged|sdpa (it needs an
# attention mask). vLLM v1: block 16, max_num_batched_tokens 8192 and max_num_seqs 256 (the
# OpenAI server on a large GPU), chunked prefill and CUDA graphs on.
PRESETS: dict[str, SchedulerConfig] = {
    "transformers": SchedulerConfig(policy="transformers-fifo"),
    "transformers-prefill-first": SchedulerConfig(policy="transformers-prefill-first"),
    "vllm": SchedulerConfig(policy="vllm", max_batch_tokens=8192, max_seqs=256, block_size=16,
                            num_blocks=32768, cuda_graph_padding=True),
}


def preset(name: str, **overrides) -> SchedulerConfig:
    """A named preset with some fields replaced: `preset("vllm", num_blocks=20000)`."""
    if name not in PRESETS:
        raise UserError(f"unknown scheduler preset {name!r} (choose from {', '.join(PRESETS)})")
    known = {f.name for f in fields(SchedulerConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UserError(f"unknown scheduler setting(s): {', '.join(bad)}")
    return replace(PRESETS[name], **overrides)


def num_blocks_for(cache_bytes: float, kv_bytes_per_token: float, block_size: int) -> int:
    """KV blocks that fit in `cache_bytes`; `kv_bytes_per_token` = 2 (K and V) x layers x
    KV heads x head_dim x bytes per element."""
    return int(cache_bytes // (kv_bytes_per_token * block_size))


class Seq:
    """Mutable state of one request inside the engine. `tokens` = prompt + generated so far;
    `computed` of them have their KV in the cache; a token comes out of every step that
    makes `computed == tokens`."""

    __slots__ = ("idx", "tokens", "computed", "generated", "output", "blocks", "chunk",
                 "decoding", "preemptions", "started", "first", "finish")

    def __init__(self, idx: int, prompt: int, output: int) -> None:
        self.idx = idx
        self.tokens = prompt
        self.computed = 0
        self.generated = 0
        self.output = output
        self.blocks = 0
        self.chunk = 0
        self.decoding = False  # transformers RequestStatus.DECODING: remaining prefill scheduled
        self.preemptions = 0
        self.started = -1.0  # first time scheduled
        self.first = -1.0  # first output token
        self.finish = -1.0

    def reset(self) -> None:
        """Preemption by recompute: the KV is dropped, prompt + generated tokens are redone."""
        self.computed = 0
        self.blocks = 0
        self.decoding = False
        self.preemptions += 1


class TransformersScheduler:
    """transformers 5.17 `FIFOScheduler` / `PrefillFirstScheduler` with soft-reset eviction."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.free_blocks = cfg.num_blocks
        self.active: dict[int, Seq] = {}  # Scheduler.active_requests (insertion ordered)
        self.waiting: deque[Seq] = deque()  # Scheduler.waiting_requests_order
        self.block_new = False  # Scheduler.block_new_requests
        self.prefill_first = cfg.policy == "transformers-prefill-first"
        margin = cfg.safety_margin
        if margin is None:
            margin = 0.0 if self.prefill_first else 0.15
        self.margin_blocks = margin * cfg.num_blocks
        self.fast_len = cfg.max_blocks_per_request * cfg.block_size
        self.read_limit = cfg.read_limit
        self.used_fast_path = False
        self.wait_min = inf  # lower bound on the prompt length of any waiting request

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)
        self.wait_min = min(self.wait_min, seq.tokens - seq.computed)

    # A request's `blocks` are transformers' `allocated_blocks`: blocks of its tokens, the
    # most any layer group allocated. The free count is of physical blocks, shared by the
    # groups: a full-attention group takes one per block, a sliding-window group one per
    # block up to a window's worth (`PagedAttentionCache.blocks_needed`, `allocate_blocks`).

    def _held(self, blocks: int) -> int:
        """Physical blocks held by a request of `blocks` blocks."""
        cfg = self.cfg
        return cfg.full_groups * blocks + cfg.sliding_groups * min(blocks, cfg.sliding_blocks)

    def _needed(self, blocks: int, more: int) -> int:
        """Physical blocks to give a request of `blocks` blocks `more` more."""
        return self._held(blocks + more) - self._held(blocks)

    def _grown(self, blocks: int, more: int) -> int:
        """`allocated_blocks` after allocating `more`: every group grows it by `more`, but a
        sliding-window group stops at its window."""
        if self.cfg.full_groups:
            return blocks + more
        return max(blocks, min(blocks + more, self.cfg.sliding_blocks))

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    def release(self, seq: Seq) -> None:
        """A finished request frees its blocks and lets new requests in again."""
        del self.active[seq.idx]
        self.free_blocks += self._held(seq.blocks)
        seq.blocks = 0
        self.block_new = False

    def drop_blocked(self) -> Seq:
        """Remove the request that keeps the engine from scheduling anything."""
        if self.active:
            seq = self.active.pop(next(reversed(self.active)))
        else:
            seq = self.waiting.popleft()
        self.free_blocks += self._held(seq.blocks)
        seq.blocks = 0
        self.block_new = False
        return seq

    def schedule(self, now: float) -> list[Seq]:
        """`ContinuousBatchProcessor.prepare_next_batch`: schedule; while nothing could be
        scheduled for lack of blocks, evict and retry; evict the starved after a batch."""
        while True:
            batch, failed, starved = self._candidates(now)
            if batch or not failed:
                if starved:
                    self._offload(starved)
                return batch
            if not self._offload(starved):
                return []  # transformers raises here; the simulator drops a request

    def _candidates(self, now: float) -> tuple[list[Seq], bool, list[tuple[Seq, int]]]:
        """`schedule_batch` + `_process_candidates`: (batch, an allocation failed, starved
        active requests with the blocks they asked for)."""
        cfg, bs = self.cfg, self.cfg.block_size
        decoding = [s for s in self.active.values() if s.decoding]
        prefilling = [s for s in self.active.values() if not s.decoding]
        cands = prefilling + decoding if self.prefill_first else decoding + prefilling
        token_budget, cache_budget, req_budget = cfg.max_batch_tokens, cfg.num_pages, cfg.max_seqs
        fast = self.fast_len > 0
        margin, chunked = self.margin_blocks, cfg.chunked_prefill
        batch: list[Seq] = []
        failed = False
        starved: list[tuple[Seq, int]] = []
        done = False
        for s in cands:
            free = self.free_blocks
            dec = s.decoding
            if free < margin and batch and not dec:
                done = True
                break
            rem = 1 if dec else s.tokens - s.computed
            n = rem if rem < token_budget else token_budget
            c = s.computed
            read = c if c < self.read_limit else self.read_limit
            eligible = n == 1 and c < self.fast_len
            if (not (fast and eligible) and cache_budget < read) or (n < rem and not chunked):
                continue
            occupancy = s.blocks * bs - c
            if occupancy < n or s.blocks == 0:
                need = (n - occupancy + 1) // bs + 1  # _allocate_blocks_if_needed, verbatim
                physical = self._needed(s.blocks, need)
                if physical > free:
                    failed = True
                    starved.append((s, physical))
                    continue
                s.blocks = self._grown(s.blocks, need)
                self.free_blocks = free - physical
            s.chunk = n
            if n == rem:
                s.decoding = True
            fast = fast and eligible
            token_budget -= n
            cache_budget -= read
            req_budget -= 1
            batch.append(s)
            if token_budget == 0 or (cache_budget <= 0 and not fast) or req_budget <= 0:
                done = True
                break
        if not done and self.waiting and not self.block_new:
            fast, failed = self._admit(now, batch, token_budget, cache_budget, req_budget,
                                       fast, failed)
        self.used_fast_path = fast
        return batch, failed, starved

    def _admit(self, now: float, batch: list[Seq], token_budget: int, cache_budget: int,
               req_budget: int, fast: bool, failed: bool) -> tuple[bool, bool]:
        """The waiting part of `_process_candidates`, in arrival order."""
        cfg, bs = self.cfg, self.cfg.block_size
        free = self.free_blocks
        if free < self.margin_blocks and batch:
            return fast, failed
        # Shortcut, same outcome: if even the shortest waiting prompt cannot get its blocks,
        # every waiting request fails allocation (and the scan stops at once if none are free).
        shortest = min(self.wait_min, token_budget)
        if (cfg.chunked_prefill and cache_budget >= 0
                and self._needed(0, (shortest + 1) // bs + 1) > free):
            return fast, True
        admitted: list[Seq] = []
        skipped = False
        exact_min = inf
        for s in self.waiting:
            free = self.free_blocks
            if free < self.margin_blocks and batch:
                break
            rem = s.tokens  # nothing computed while waiting
            n = rem if rem < token_budget else token_budget
            if ((not (fast and n == 1) and cache_budget < 0)
                    or (n < rem and not cfg.chunked_prefill)):
                skipped = True
                exact_min = min(exact_min, rem)
                continue
            need = (n + 1) // bs + 1
            physical = self._needed(0, need)
            if physical > free:
                failed = True
                if free == 0:
                    break
                skipped = True
                exact_min = min(exact_min, rem)
                continue
            s.blocks = self._grown(0, need)
            self.free_blocks = free - physical
            s.chunk = n
            s.decoding = n == rem
            if s.started < 0:
                s.started = now
            fast = fast and n == 1
            token_budget -= n
            req_budget -= 1
            batch.append(s)
            admitted.append(s)
            self.active[s.idx] = s
            if token_budget == 0 or (cache_budget <= 0 and not fast) or req_budget <= 0:
                break
        else:
            self.wait_min = exact_min  # the whole queue was seen
        if skipped:
            taken = {s.idx for s in admitted}
            self.waiting = deque(s for s in self.waiting if s.idx not in taken)
        else:
            for _ in admitted:
                self.waiting.popleft()
        return fast, failed

    def _offload(self, starved: list[tuple[Seq, int]]) -> int:
        """`OffloadingManager.offload_requests` without CPU swap: soft-reset the newest starved
        requests until the rest fit, never the last active one; requeue them oldest first."""
        free = self.free_blocks
        demand = sum(need for _, need in starved)
        victims: list[Seq] = []
        while demand > free and starved and len(self.active) - len(victims) > 1:
            seq, need = starved.pop()
            victims.append(seq)
            demand -= need
            free += self._held(seq.blocks)
        for seq in reversed(victims):
            del self.active[seq.idx]
            self.free_blocks += self._held(seq.blocks)
            seq.reset()
            self.add(seq)
        if victims:
            self.block_new = True
        return len(victims)

    def padding(self, tokens: int, seqs: int) -> list[tuple[int, int]]:
        """`ModelRunner.maybe_pad_inputs`: decode fast path pads the sequences to a power of
        two (each a 1-token pseudo-sequence); varlen pads the tokens to the next multiple of
        `q_padding_interval` (one pseudo-sequence). Both capped as transformers caps them."""
        cfg = self.cfg
        if self.used_fast_path:
            padded = min(1 << (seqs - 1).bit_length(), cfg.max_seqs)
            return [(1, 0)] * (padded - seqs)
        interval = cfg.q_padding_interval
        padded = min(-(-tokens // interval) * interval, cfg.max_batch_tokens)
        return [(padded - tokens, 0)] if padded > tokens else []


class VllmScheduler:
    """vLLM v1 `Scheduler.schedule` (no prefix caching, no speculative decoding)."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.free_blocks = cfg.num_blocks
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        top = cfg.max_graph_tokens or min(2 * cfg.max_seqs, 512)
        sizes = [1, 2, 4, *range(8, 256, 8), *range(256, top + 1, 16)]
        self.graph_sizes = sorted({s for s in sizes if s <= top} | {top})

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def release(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def drop_blocked(self) -> Seq:
        seq = self.running.pop() if self.running else self.waiting.popleft()
        self.free_blocks += seq.blocks
        seq.blocks = 0
        return seq

    def schedule(self, now: float) -> list[Seq]:
        cfg, bs = self.cfg, self.cfg.block_size
        cap = cfg.max_prefill_chunk
        budget = cfg.max_batch_tokens
        running = self.running
        batch: list[Seq] = []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            s = running[i]
            n = s.tokens - s.computed
            if cap and n > cap:
                n = cap
            if n > budget:
                n = budget
            need = (s.computed + n + bs - 1) // bs - s.blocks
            if need > self.free_blocks:
                # Preempt the newest running request until the blocks fit, maybe this one.
                while True:
                    victim = running.pop()
                    self.free_blocks += victim.blocks
                    victim.reset()
                    self.waiting.appendleft(victim)
                    preempted = True
                    if victim is s or need <= self.free_blocks:
                        break
                if victim is s:
                    break
            if need > 0:
                s.blocks += need
                self.free_blocks -= need
            s.chunk = n
            batch.append(s)
            budget -= n
            i += 1
        if preempted:
            return batch  # vLLM admits no waiting request in a step that preempted
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < cfg.max_seqs:
            s = waiting[0]
            n = s.tokens
            if cap and n > cap:
                n = cap
            if n > budget:
                if not cfg.chunked_prefill:
                    break
                n = budget
            need = (n + bs - 1) // bs
            if need > self.free_blocks:
                break
            waiting.popleft()
            running.append(s)
            s.blocks = need
            self.free_blocks -= need
            s.chunk = n
            if s.started < 0:
                s.started = now
            batch.append(s)
            budget -= n
        return batch

    def padding(self, tokens: int, seqs: int) -> list[tuple[int, int]]:
        """Piecewise CUDA graphs: a step of at most `max_graph_tokens` tokens runs at the next
        capture size (one pseudo-sequence of padding tokens); a bigger one runs eagerly."""
        sizes = self.graph_sizes
        if tokens > sizes[-1]:
            return []
        padded = sizes[bisect.bisect_left(sizes, tokens)]
        return [(padded - tokens, 0)] if padded > tokens else []


def make_scheduler(cfg: SchedulerConfig) -> TransformersScheduler | VllmScheduler:
    return VllmScheduler(cfg) if cfg.policy == "vllm" else TransformersScheduler(cfg)
