"""Make the compact latency DB shipped with the package from a profiled (and fitted) DB.

    python -m dooly_fx fit --db bench/results/h100.db
    python bench/ship_db.py --db bench/results/h100.db

Copies the DB with `VACUUM INTO` (no free pages, no WAL) and gzips it to
`dooly_fx/data/h100.db.gz` (`db.SHIPPED_DB`, read into memory when opened), after checking it is
a current dooly_fx DB whose every profiled signature has a fit. The shipped file
keeps its provenance: environments (device, driver, library versions), runs (commands) and
per-point timings. Writes `dooly_fx/data/README.md` from the DB's own records.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

from dooly_fx.db import SHIPPED_DB, LatencyDB, env_timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    args = parser.parse_args()
    with LatencyDB.open(args.db, create=False) as db:
        lines = ["# Shipped latency DB", "",
                 f"`h100.db.gz` is `{args.db}` copied and gzipped by "
                 f"`python {' '.join(sys.argv)}`.", "",
                 "| environment | device | torch | triton | transformers | driver | CUDA | timer | "
                 "signatures | ok points | fits |",
                 "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
        for env in db.environments():
            fp = env["fingerprint"]
            sigs = db.conn.execute("SELECT COUNT(DISTINCT signature) FROM points WHERE env = ? "
                                   "AND status = 'ok'", (fp,)).fetchone()[0]
            points = db.conn.execute("SELECT COUNT(*) FROM points WHERE env = ? AND "
                                     "status = 'ok'", (fp,)).fetchone()[0]
            fits = len(db.fits(fp))
            if fits < sigs:
                sys.exit(f"{args.db}: {sigs - fits} signatures have no fit; run "
                         f"`python -m dooly_fx fit --db {args.db}` first")
            lines.append(f"| {fp[:12]} | {env['device']} | {env['torch']} | {env['triton']} | "
                         f"{env['transformers']} | {env.get('driver')} | {env.get('cuda')} | "
                         f"{env_timer(env)} | {sigs} | {points} | {fits} |")
        lines += ["", "Models and engine profiles recorded in it:", ""]
        lines += [f"- {m['name']} · {m['engine']}" for m in db.models()]
        lines += ["", "Profiling runs (from its `runs` table):", ""]
        lines += [f"- `{r[0]}` ({r[1]})" for r in db.conn.execute(
            "SELECT command, status FROM runs ORDER BY id")]
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "h100.db"
            db.conn.execute("VACUUM INTO ?", (str(copy),))
            size = copy.stat().st_size
            # mtime 0: the same DB gzips to the same bytes.
            SHIPPED_DB.write_bytes(gzip.compress(copy.read_bytes(), compresslevel=9, mtime=0))
    sizes = f"{SHIPPED_DB.stat().st_size / 2**20:.1f} MiB ({size / 2**20:.1f} MiB uncompressed)"
    lines[2:2] = [f"Size: {sizes}.", ""]
    (SHIPPED_DB.parent / "README.md").write_text("\n".join(lines) + "\n")
    print(f"{SHIPPED_DB}: {sizes}")


if __name__ == "__main__":
    main()
