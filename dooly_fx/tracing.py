"""Context managers that let transformers build and run a model on symbolic shapes.

Building: `symbolic_build(fields)` keeps config fields symbolic while transformers constructs a
model (no weight init, no `reset_parameters`, rope buffers of symbolic length).
Tracing: `eager_tracing()` records whole Python stacks and makes transformers take the code
paths eager execution takes (no materialised causal mask), with FakeTensor's op cache off.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch._dynamo.config
from torch import nn


@contextmanager
def symbolic_build(fields: dict[str, int]) -> Iterator[None]:
    """Construct transformers models without specialising the symbolic config `fields`."""
    from transformers.initialization import no_init_weights

    # Weight init would specialise fan-in sizes (kaiming computes sqrt(fan_in)); it is moot here.
    with no_init_weights(), _no_reset_parameters(), _symbolic_rope_init(fields):
        yield


def concretise_floats(model: nn.Module) -> None:
    """Replace SymFloat attributes (`scaling = head_dim ** -0.5`) by their example values.

    A float made from config symbols while building is not a traced value, so an op using it
    could not be recorded; a scale carries no dimension provenance anyway.
    """
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.SymFloat):
                setattr(module, name, float(value.node.hint))


@contextmanager
def eager_tracing() -> Iterator[None]:
    """Trace the way eager execution runs, recording the Python call stack of every node."""
    with ExitStack() as stack:
        stack.enter_context(_full_stack_traces())
        stack.enter_context(_eager_masks())
        # FakeTensor's op cache costs more than it saves on symbolic shapes (2x slower capture).
        stack.enter_context(torch._dynamo.config.patch(fake_tensor_cache_enabled=False))
        yield


@contextmanager
def _no_reset_parameters() -> Iterator[None]:
    """Skip `reset_parameters` of torch.nn modules (Linear's bias bound is 1/sqrt(fan_in))."""
    classes = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, nn.Module)
               and "reset_parameters" in c.__dict__]
    originals = {c: c.__dict__["reset_parameters"] for c in classes}
    try:
        for cls in classes:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in originals.items():
            cls.reset_parameters = fn


@contextmanager
def _symbolic_rope_init(fields: dict[str, int]) -> Iterator[None]:
    """Keep `inv_freq`'s length symbolic in the head dim.

    transformers' rope initialisers compute `int(head_dim * partial_rotary_factor)`, which would
    force head_dim to a constant. Under fake tensors only the buffer's shape matters, so each
    initialiser runs on a concrete copy of the config (for its attention scaling) and returns a
    buffer of the symbolic length.
    """
    from fractions import Fraction

    from transformers import modeling_rope_utils

    table = modeling_rope_utils.ROPE_INIT_FUNCTIONS
    originals = dict(table)

    def wrap(fn):
        def init(config, device=None, *args, **kwargs):
            concrete = copy.copy(config)
            concrete.__dict__.update(fields)
            inv_freq, scaling = fn(concrete, device, *args, **kwargs)
            head_dim = getattr(config, "head_dim", None) or \
                config.hidden_size // config.num_attention_heads
            concrete_head_dim = getattr(concrete, "head_dim", None) or \
                concrete.hidden_size // concrete.num_attention_heads
            ratio = Fraction(2 * inv_freq.shape[0], concrete_head_dim)
            if isinstance(head_dim, int) or ratio.denominator > 64:
                return inv_freq, scaling
            rotary_dim = head_dim * ratio.numerator // ratio.denominator
            return torch.empty((rotary_dim // 2,), dtype=inv_freq.dtype), scaling
        return init

    try:
        for name, fn in originals.items():
            table[name] = wrap(fn)
        yield
    finally:
        table.clear()
        table.update(originals)


@contextmanager
def _full_stack_traces() -> Iterator[None]:
    """Record the whole Python stack per node (HF helper functions delimit kernels)."""
    from torch.fx.experimental import proxy_tensor

    original = proxy_tensor._ModuleStackTracer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._record_forward_stack_traces_only = False

    proxy_tensor._ModuleStackTracer.__init__ = init
    try:
        yield
    finally:
        proxy_tensor._ModuleStackTracer.__init__ = original


@contextmanager
def _eager_masks() -> Iterator[None]:
    """Build attention masks as eager execution does, not as a traced graph would.

    transformers materialises an explicit causal mask whenever it detects tracing, which
    `make_fx` triggers; eager sdpa with no padding passes `is_causal=True` instead (and so runs
    the flash kernel). Batches here are unpadded and unpacked, which is what eager's
    data-dependent checks would find.
    """
    from transformers import masking_utils

    saved = masking_utils.is_tracing, masking_utils.find_packed_sequence_indices
    masking_utils.is_tracing = lambda tensor=None: False
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.is_tracing, masking_utils.find_packed_sequence_indices = saved
