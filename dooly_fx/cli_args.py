"""Argument helpers shared by the CLI modules (`cli`, `cli_latency`, `cli_serve`,
`cli_validate_serving`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dooly_fx.db import SHIPPED_DB, LatencyDB
from dooly_fx.engine import ATTN_IMPLS, ENGINES
from dooly_fx.errors import positive_number


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
