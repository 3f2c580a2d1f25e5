"""User-facing errors: reported as one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (unknown model, malformed config, bad flag value)."""


class StageError(UserError):
    """A model that cannot go through one pipeline stage; the message names the stage."""

    def __init__(self, stage: str, model: str, reason: str) -> None:
        self.stage = stage
        super().__init__(f"{model}: {stage} failed: {reason}")


def positive_number(text: str, context: str, what: str, allow_inf: bool = False) -> float:
    """`text` as a positive finite number (`inf` too where `allow_inf`), or a UserError
    `context: 'text' is not what`."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or (value == float("inf") and not allow_inf):
        raise UserError(f"{context}: {text!r} is not {what}")
    return value
