"""Coverage of a model's units in a latency DB, for kernel developers.

    coverage(db, model, env, engine) -> [UnitCoverage]     one row per unit signature
    write_html(rows, db, env, out_dir)                     plots + an index.html

Per unit: covered or not in the environment (every sweep point measured, failed, or missing),
the profiled range of each request variable, the fit's method and held-out error, and the
unit's share of a reference prefill and decode step. The HTML report plots each unit's measured
points with its fitted curve, and predicted against measured latency over every point.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dooly_fx.db import LatencyDB
from dooly_fx.predict import Loaded, features, predict_step, unit_ms, unit_vars

REFERENCE_STEPS = {"prefill": [(1024, 0)], "decode": [(1, 1024)] * 16}
"""Steps whose time shares are reported: one 1024-token prefill; 16 sequences decoding at 1K."""


@dataclass
class UnitCoverage:
    signature: str
    kind: str
    roles: list[str]
    phases: list[str]
    variables: list[str]
    ok: int
    failed: int
    oom: int
    ranges: dict[str, tuple[float, float]]
    method: str | None
    cv_mape: float | None
    share: dict[str, float] = field(default_factory=dict)
    """Phase -> share of the reference step's GPU time (count × latency / step)."""

    @property
    def covered(self) -> bool:
        return self.ok > 0 and self.method is not None


def coverage(db: LatencyDB, loaded: Loaded) -> list[UnitCoverage]:
    """One row per signature of the loaded model (see module docstring)."""
    env = loaded.env
    rows: dict[str, UnitCoverage] = {}
    stored = db.fits(env)
    for (phase, _regime), uses in sorted(loaded.uses.items()):
        for use in uses:
            row = rows.get(use.signature)
            if row is None:
                sig = db.signature(use.signature)
                status = db.point_status(env, use.signature)
                counts = {s: sum(r["status"] == s for r in status.values())
                          for s in ("ok", "failed", "oom")}
                names = unit_vars(sig["canonical"])
                points = [p for p, _ in db.ok_points(env, use.signature)]
                ranges = {n: (min(p.get(n, 0) for p in points), max(p.get(n, 0) for p in points))
                          for n in names} if points else {}
                fit = stored.get(use.signature)
                row = rows[use.signature] = UnitCoverage(
                    use.signature, sig["kind"], [], [], names, counts["ok"], counts["failed"],
                    counts["oom"], ranges, fit["method"] if fit else None,
                    fit["cv_mape"] if fit else None)
            if use.role not in row.roles:
                row.roles.append(use.role)
            if phase not in row.phases:
                row.phases.append(phase)
    if not loaded.missing:
        for phase, batch in REFERENCE_STEPS.items():
            if not any(p == phase for p, _ in loaded.uses):
                continue
            step = predict_step(loaded, batch)
            for unit in step.units:
                share = unit.count * step.in_step_ms(unit) / step.gpu_ms if step.gpu_ms \
                    else 0.0
                rows[unit.signature].share[phase] = \
                    rows[unit.signature].share.get(phase, 0.0) + share
    return sorted(rows.values(), key=lambda r: -max(r.share.values(), default=0.0))


def _measured_and_fitted(db: LatencyDB, loaded: Loaded, key: str):
    # The sweep grid (points remeasured in another key class, `A`, are not on it).
    points = [(p, ms) for p, ms in db.ok_points(loaded.env, key) if "A" not in p]
    fit = loaded.fits.get(key)
    if not points or fit is None:
        return None
    X, _, _ = features(fit.canonical, [p for p, _ in points])
    measured = np.array([ms for _, ms in points])
    return X, measured, np.array([unit_ms(fit, p) for p, _ in points]), fit


def _unit_plot(db: LatencyDB, loaded: Loaded, row: UnitCoverage, path: Path) -> bool:
    """Measured points and the fitted curve of one unit over its first variable (one line
    per value of the second variable, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _measured_and_fitted(db, loaded, row.signature)
    if data is None or not row.variables:
        return False
    X, measured, _, fit = data
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = np.unique(X[:, 1]) if X.shape[1] > 1 else [None]
    for i, group in enumerate(groups[:8]):
        mask = np.ones(len(X), bool) if group is None else X[:, 1] == group
        rest = X[mask][0].copy()
        xs = np.unique(X[mask][:, 0])
        grid = np.unique(np.round(np.geomspace(max(xs.min(), 1), xs.max() * 2, 60)))
        Xg = np.repeat(rest[None, :], len(grid), axis=0)
        Xg[:, 0] = grid
        curve = [unit_ms(fit, dict(zip(fit.names, x, strict=True))) for x in Xg]
        label = None if group is None else f"{row.variables[1]}={group:g}"
        color = f"C{i}"
        ax.plot(grid, curve, color=color, label=label)
        ax.scatter(X[mask][:, 0], measured[mask], s=12, color=color)
    ax.set(xscale="log", yscale="log", xlabel=row.variables[0], ylabel="ms",
           title=f"{row.kind} {row.signature[:12]} · {row.method} · cv {row.cv_mape or 0:.1%}")
    if groups[0] is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _scatter(db: LatencyDB, loaded: Loaded, rows: Sequence[UnitCoverage], path: Path) -> None:
    """Predicted (the fits) against measured latency over every measured point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    kinds: dict[str, list[np.ndarray]] = {}
    for row in rows:
        data = _measured_and_fitted(db, loaded, row.signature)
        if data is not None:
            kinds.setdefault(row.kind, []).append(np.stack([data[1], data[2]]))
    lo, hi = math.inf, 0.0
    for i, (kind, arrays) in enumerate(sorted(kinds.items())):
        both = np.concatenate(arrays, axis=1)
        ax.scatter(both[0], both[1], s=6, color=f"C{i % 10}", label=kind)
        lo, hi = min(lo, both.min()), max(hi, both.max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="fitted ms",
           title=f"{loaded.model}: fits vs measured points")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_html(db: LatencyDB, loaded: Loaded, rows: Sequence[UnitCoverage], out: Path) -> Path:
    """Write `<out>/<model>/index.html` with one plot per unit and the scatter; returns it."""
    folder = out / loaded.model.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    _scatter(db, loaded, rows, folder / "fits_vs_measured.png")
    cells = []
    for row in rows:
        image = folder / f"{row.signature[:12]}.png"
        plotted = _unit_plot(db, loaded, row, image)
        ranges = ", ".join(f"{n} {lo:g}–{hi:g}" for n, (lo, hi) in row.ranges.items())
        share = ", ".join(f"{p} {v:.1%}" for p, v in row.share.items())
        cells.append(
            f"<tr><td>{html.escape(', '.join(row.roles))}</td><td>{row.kind}</td>"
            f"<td>{'yes' if row.covered else 'NO'}</td><td>{row.ok}/{row.failed}/{row.oom}</td>"
            f"<td>{ranges}</td><td>{row.method or '-'}</td>"
            f"<td>{'' if row.cv_mape is None else f'{row.cv_mape:.1%}'}</td><td>{share}</td>"
            f"<td>{f'<img src={image.name!r} width=360>' if plotted else ''}</td></tr>")
    page = folder / "index.html"
    page.write_text(
        f"<html><head><meta charset='utf-8'><title>{html.escape(loaded.model)} coverage</title>"
        "</head><body>"
        f"<h1>{html.escape(loaded.model)} · {html.escape(loaded.engine)}</h1>"
        "<p><img src='fits_vs_measured.png' width=420></p><table border=1 cellpadding=3>"
        "<tr><th>unit</th><th>kind</th><th>covered</th><th>ok/failed/oom</th><th>range</th>"
        "<th>fit</th><th>cv MAPE</th><th>share of step</th><th>measured and fitted</th></tr>"
        + "".join(cells) + "</table></body></html>\n")
    return page
