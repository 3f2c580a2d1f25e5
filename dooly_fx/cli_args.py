"""Argument helpers shared by the CLI modules (`cli`, `cli_latency`, `cli_serve`,
`cli_validate_serving`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.engine import ATTN_IMPLS, ENGINES
from dooly_fx.errors import UserError, positive_number


class OneLineErrors(argparse.ArgumentParser):
    """A parser (and its verbs' parsers) whose usage errors are one line, as every other
    user error: `error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


INPUT_FILES = ("db", "trace", "measured")
"""Options (argparse dests) naming files a verb reads."""
OUTPUT_FILES = ("json", "chrome_trace", "plot")
"""Options naming files a verb writes (replacing them)."""
OUTPUT_FOLDERS = ("html", "out")
"""Options naming folders a verb writes into (made if missing)."""
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that would replace one of the verb's inputs (a
    `--json` onto its `--db`), or that cannot be written: a folder where a file goes, a
    missing folder, a file where a folder goes, a plot format matplotlib is not asked for."""
    flag = {k: "--" + k.replace("_", "-") for k in (*INPUT_FILES, *OUTPUT_FILES,
                                                    *OUTPUT_FOLDERS)}
    inputs = {Path(v).resolve(): flag[k] for k in INPUT_FILES if (v := getattr(args, k, None))}
    for key in OUTPUT_FILES:
        value = getattr(args, key, None)
        if value is None:
            continue
        path = Path(value)
        if not value or path.is_dir():
            raise UserError(f"{flag[key]} {value!r}: give a file name, not a folder")
        if path.resolve() in inputs:
            raise UserError(f"{flag[key]} {value} is the file given to "
                            f"{inputs[path.resolve()]}; write to another file")
        if not path.parent.is_dir():
            why = "is not a folder" if path.parent.exists() else "does not exist"
            raise UserError(f"cannot write {value}: {path.parent} {why}")
        if key == "plot" and path.suffix.lower() not in PLOT_SUFFIXES:
            raise UserError(f"--plot {value}: name a {', '.join(PLOT_SUFFIXES)} file")
    for key in OUTPUT_FOLDERS:
        value = getattr(args, key, None)
        if value is not None and (not value or Path(value).exists()
                                  and not Path(value).is_dir()):
            raise UserError(f"{flag[key]} {value!r}: not a folder")


def check_measured(path: str, saved: dict, model: str, engine: str) -> None:
    """A UserError where a saved measurement (`--measured`) is of another model or engine
    than the one asked for: its predictions would be compared with the wrong steps."""
    if saved.get("model", model) != model:
        raise UserError(f"{path}: a measurement of {saved['model']}, not {model}")
    if saved.get("engine", engine) != engine:
        raise UserError(f"{path}: measured on {saved['engine']}, not {engine}; give the "
                        "options it was measured with")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]):
    """`text` as a finite `kind` that is `ok`, or argparse's error `expected what`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def add_verb(verbs, name: str, func: Callable[[argparse.Namespace], None],
             text: str) -> argparse.ArgumentParser:
    """A subcommand `name` running `func`, with `text` as its one-line help and `func`'s
    docstring (examples included, line breaks kept) as its description."""
    verb = verbs.add_parser(name, help=text, description=func.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    verb.set_defaults(func=func)
    return verb


def open_db(path: str | None) -> LatencyDB:
    """The DB at `path`, or the DB shipped with the package (read-only, as is any
    compressed DB)."""
    if path is None:
        return LatencyDB.open(SHIPPED_DB, create=False, readonly=True)
    return LatencyDB.open(path, create=False, readonly=path.endswith(".gz"))


def collect_models(specs, engine, phases):
    """`profile.collect` of `phases` of each model spec under `engine`, with a progress bar."""
    from dooly_fx.profile import collect
    from dooly_fx.ui import progress

    with progress() as bar:
        task = bar.add_task("capture", total=len(specs))
        return collect(specs, engine, phases, on_model=lambda _: bar.advance(task))


def db_option(parser: argparse.ArgumentParser) -> None:
    """`--db FILE` on a verb that only reads a DB: without it, the shipped one (`open_db`)."""
    parser.add_argument("--db", metavar="FILE", help="latency DB (default: the shipped H100 DB)")


def engine_args(parser: argparse.ArgumentParser) -> None:
    """--engine, --attn, --dtype and --kernels: which engine profile a verb works on."""
    parser.add_argument("--engine", default="padded", choices=ENGINES,
                        help="padded: model(input_ids[B,S]) with DynamicCache; paged: continuous "
                             "batching, tokens flattened to [1,T] (default: padded)")
    parser.add_argument("--attn", default="sdpa", choices=ATTN_IMPLS, help="attention impl")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--kernels", default="eager", choices=("eager", "triton"),
                        help="triton: the fused-engine variant (norms, SiLU·mul and rotary as "
                             "one Triton kernel each)")


def host_probe_option(parser: argparse.ArgumentParser) -> None:
    """`--host-probe MS|here` on a verb that predicts host-side times (`host_probe_arg`)."""
    parser.add_argument("--host-probe", metavar="MS|here",
                        help="predict host-side times for a host whose probe takes MS ms "
                             "('here': this machine, measured now); default: the speed of the "
                             "host the DB was profiled on")


def host_probe_arg(text: str | None) -> float | None:
    """`--host-probe`: None, a time in ms, or 'here' (this machine's probe, measured now)."""
    from dooly_fx.hostinfo import host_probe_ms

    if text is None:
        return None
    if text == "here":
        return host_probe_ms(21)
    return positive_number(text, "--host-probe", "a positive time in ms, nor 'here'")
