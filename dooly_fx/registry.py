"""Per-op-kind registries filled by decorators (STYLE §4), torch-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F], what: str) -> Callable[..., Callable[[F], F]]:
    """A decorator factory filling `table` by op kind: `@register("gemm", "lm_head")`. A kind
    registered twice is a programming error."""
    def register(*kinds: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for kind in kinds:
                if kind in table:
                    raise ValueError(f"{what} for {kind!r} registered twice")
                table[kind] = fn
            return fn
        return deco
    return register
