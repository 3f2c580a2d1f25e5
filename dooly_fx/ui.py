"""Terminal output shared by the CLI verbs: consoles, progress bars, atomic JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dooly_fx.errors import UserError

# Tables are wide; a pipe or a narrow terminal would wrap every cell.
out = Console(width=200) if not sys.stdout.isatty() else Console()
err = Console(stderr=True)


def progress(eta: bool = False) -> Progress:
    """A transient progress bar on stderr (with ETA when asked); none where stderr is no
    terminal (a log or a pipe would only get the blank line it leaves)."""
    columns = [TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


def write_json(path: str | Path, payload: dict) -> None:
    """Write JSON atomically (temp file, then rename); a missing folder is a UserError."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(target)
