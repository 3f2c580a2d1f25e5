"""Stage 9: a latency model per unit signature, chosen by held-out error. See docs/fitting.md.

Every model predicts, for request values `x` (one per variable in `names`) and the roofline
features of one call at `x` (FLOPs `F`, bytes moved `D`):

    latency_ms = base(F, D) · exp(g(u(x)))
    base(F, D) = max(c0 + c1·F + c2·D + c3·max(F, r·D), floor)       # roofline-linear, c ≥ 0
    u_j(x)     = log1p(x_j), clipped to the profiled range [lo_j, hi_j]

`g` is a correction in log latency, so it is held at its boundary value outside the profiled
range and the roofline alone carries the trend there. The candidates differ only in `g`:

* `constant`:  base = c0, g = 0 (a unit without request variables, or a single point).
* `roofline`:  g = 0.
* `poly`:      g is a low-degree polynomial in the normalised log variables.
* `interp`:    g interpolates the measured residuals multilinearly on the grid of profiled values,
               so measured points are reproduced exactly.

`fit_unit` scores each candidate by k-fold held-out MAPE and keeps the best, refitted on all
points. Fitting uses numpy, scipy and scikit-learn; prediction is plain Python (`predict`) or
numpy (`predict_many`) over the stored coefficients.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

FORMAT = 1
"""Version of the JSON written by `LatencyModel.to_json`."""
METHODS = ("roofline", "poly", "interp")
"""Default candidates, in order of simplicity (`constant` may be asked for too)."""
TIE = 1e-9
"""Held-out MAPEs this close count as equal (the simpler candidate wins)."""
MIN_POINTS = 4
"""Fewer points than this: the roofline alone (one point: a constant)."""
MAX_GRID_CELLS = 50_000
"""`interp` is skipped when the product grid of profiled values would be larger."""
POLY_DEGREE = {1: 3, 2: 2, 3: 2}
"""Polynomial degree of `poly` by number of variables (lowered when points are few)."""
FLOOR_FRACTION = 1e-3
"""`base` never drops below this fraction of the smallest measured latency."""


@dataclass
class LatencyModel:
    """Latency of one unit signature as a function of its request variables.

    Contract: `predict` > 0 and finite for finite non-negative inputs; `predict` and
    `predict_many` agree; a model read back with `from_json(m.to_json())` predicts identically.
    """

    kind: str
    names: list[str]
    """Request variables, in the order of `x`."""
    method: str
    """`constant`, `roofline`, `poly` or `interp`."""
    roofline: dict
    """`coef` [c0 (ms), c1 (ms/FLOP), c2 (ms/byte), c3], `intensity` r (FLOP/byte), `floor_ms`."""
    params: dict
    """The correction `g`: {} for constant/roofline; `powers`, `coef` for poly; `axes` (profiled
    values per variable) and `table` (log residuals on their product grid, C order) for interp."""
    lo: list[float]
    """Smallest profiled value of each variable."""
    hi: list[float]
    """Largest profiled value of each variable."""
    n_points: int
    cv_mape: float | None = None
    """k-fold held-out MAPE (a fraction) of `method`; None when there were too few points."""
    cv_by_method: dict[str, float] = field(default_factory=dict)
    """Held-out MAPE of every candidate that was scored."""
    _ulo: list[float] = field(init=False, repr=False, compare=False)
    _uhi: list[float] = field(init=False, repr=False, compare=False)
    _axes: list[list[float]] = field(init=False, repr=False, compare=False)
    _table: list[float] = field(init=False, repr=False, compare=False)
    _terms: list[tuple[float, list[tuple[int, int]]]] = field(init=False, repr=False,
                                                             compare=False)
    _base: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Unpack the JSON-shaped fields into what `predict` reads (plain floats and lists)."""
        self._ulo = [math.log1p(v) for v in self.lo]
        self._uhi = [math.log1p(v) for v in self.hi]
        self._axes = [[math.log1p(v) for v in axis] for axis in self.params.get("axes", [])]
        self._table = [float(v) for v in self.params.get("table", [])]
        self._terms = [(float(c), [(j, p) for j, p in enumerate(powers) if p])
                       for powers, c in zip(self.params.get("powers", []),
                                            self.params.get("coef", []), strict=True)]
        roof = self.roofline
        self._base = (*map(float, roof["coef"]), float(roof["intensity"]),
                      float(roof["floor_ms"]))

    # --- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """Plain JSON data (lists, numbers, strings); `from_json` reads it back."""
        return {"format": FORMAT, "kind": self.kind, "names": list(self.names),
                "method": self.method, "roofline": self.roofline, "params": self.params,
                "lo": list(self.lo), "hi": list(self.hi), "n_points": self.n_points,
                "cv_mape": self.cv_mape, "cv_by_method": dict(self.cv_by_method)}

    @classmethod
    def from_json(cls, data: Mapping) -> LatencyModel:
        """The model written by `to_json`; raises ValueError for another format version."""
        if data.get("format") != FORMAT:
            raise ValueError(f"latency model format {data.get('format')!r}, expected {FORMAT}")
        return cls(kind=data["kind"], names=list(data["names"]), method=data["method"],
                   roofline=dict(data["roofline"]), params=dict(data["params"]),
                   lo=[float(v) for v in data["lo"]], hi=[float(v) for v in data["hi"]],
                   n_points=int(data["n_points"]), cv_mape=data.get("cv_mape"),
                   cv_by_method=dict(data.get("cv_by_method", {})))

    # --- prediction ----------------------------------------------------------------------------

    def _values(self, x: Sequence[float] | Mapping[str, float]) -> list[float]:
        values = [x[n] for n in self.names] if isinstance(x, Mapping) else list(x)
        if len(values) != len(self.names):
            raise ValueError(f"expected {len(self.names)} values for {self.names}, got {x!r}")
        return values

    def in_range(self, x: Sequence[float] | Mapping[str, float]) -> bool:
        """True when every variable lies within its profiled range (no extrapolation)."""
        values = self._values(x)
        return all(lo <= v <= hi for v, lo, hi in zip(values, self.lo, self.hi, strict=True))

    def predict(self, x: Sequence[float] | Mapping[str, float], flops: float,
                bytes_: float) -> float:
        """Latency (ms, > 0) of one call at request values `x` with the given roofline features.
        Outside the profiled range the correction is held at the boundary (see `in_range`)."""
        c0, c1, c2, c3, r, floor = self._base
        base = c0 + c1 * flops + c2 * bytes_
        if c3:
            base += c3 * max(flops, r * bytes_)
        base = max(base, floor)
        if self.method in ("constant", "roofline"):
            return base
        u = [min(max(math.log1p(max(v, 0.0)), lo), hi)
             for v, lo, hi in zip(self._values(x), self._ulo, self._uhi, strict=True)]
        if self.method == "poly":
            z = [(v - lo) / (hi - lo) if hi > lo else 0.0
                 for v, lo, hi in zip(u, self._ulo, self._uhi, strict=True)]
            g = 0.0
            for coef, factors in self._terms:
                for j, p in factors:
                    coef *= z[j] ** p
                g += coef
            return base * math.exp(g)
        table = self._table
        if len(u) == 1 and len(self._axes[0]) > 1:  # the common case, without corner lists
            axis, v = self._axes[0], u[0]
            i = min(max(bisect.bisect_right(axis, v) - 1, 0), len(axis) - 2)
            w = (v - axis[i]) / (axis[i + 1] - axis[i])
            return base * math.exp(table[i] * (1.0 - w) + table[i + 1] * w)
        return base * math.exp(_multilinear(self._axes, table, u))

    def predict_many(self, X: np.ndarray, flops: np.ndarray, bytes_: np.ndarray) -> np.ndarray:
        """`predict` for each row of X (n, d) with its features (n,); returns (n,) ms."""
        X = np.asarray(X, dtype=float).reshape(len(flops), len(self.names))
        flops, bytes_ = np.asarray(flops, dtype=float), np.asarray(bytes_, dtype=float)
        c0, c1, c2, c3 = self.roofline["coef"]
        base = c0 + c1 * flops + c2 * bytes_
        if c3:
            base = base + c3 * np.maximum(flops, self.roofline["intensity"] * bytes_)
        base = np.maximum(base, self.roofline["floor_ms"])
        if self.method in ("constant", "roofline"):
            return base
        u = np.clip(np.log1p(np.maximum(X, 0.0)), self._ulo, self._uhi)  # (n, d)
        if self.method == "poly":
            span = np.asarray(self._uhi) - np.asarray(self._ulo)
            z = np.where(span > 0, (u - self._ulo) / np.where(span > 0, span, 1.0), 0.0)
            powers = np.asarray(self.params["powers"], dtype=float).reshape(-1, len(self.names))
            g = (z[:, None, :] ** powers[None]).prod(axis=2) @ np.asarray(self.params["coef"])
            return base * np.exp(g)
        flat, weight = np.zeros(len(X), dtype=np.int64), np.ones(len(X))
        corners = [(flat, weight)]
        for j, axis in enumerate(self._axes):
            a = np.asarray(axis)
            if len(a) == 1:
                i, w = np.zeros(len(X), dtype=np.int64), np.zeros(len(X))
            else:
                i = np.clip(np.searchsorted(a, u[:, j], side="right") - 1, 0, len(a) - 2)
                w = (u[:, j] - a[i]) / (a[i + 1] - a[i])
            corners = [(f * len(a) + i + step, wt * (w if step else 1.0 - w))
                       for f, wt in corners for step in ((0, 1) if len(a) > 1 else (0,))]
        table = np.asarray(self.params["table"])
        return base * np.exp(sum(table[f] * wt for f, wt in corners))


def _multilinear(axes: Sequence[Sequence[float]], table: Sequence[float],
                 u: Sequence[float]) -> float:
    """Multilinear interpolation of `table` (C order over the product grid of `axes`) at `u`,
    each value already within its axis."""
    corners = [(0, 1.0)]  # (flat index into the table, weight)
    for axis, v in zip(axes, u, strict=True):
        size = len(axis)
        if size == 1:
            corners = [(k * size, wt) for k, wt in corners]
            continue
        i = min(max(bisect.bisect_right(axis, v) - 1, 0), size - 2)
        w = (v - axis[i]) / (axis[i + 1] - axis[i])
        corners = [c for k, wt in corners
                   for c in ((k * size + i, wt * (1.0 - w)), (k * size + i + 1, wt * w))]
    return sum(table[k] * wt for k, wt in corners)


# --- fitting -----------------------------------------------------------------------------------


def _fit_roofline(flops: np.ndarray, bytes_: np.ndarray, y: np.ndarray) -> dict:
    """Non-negative least squares of relative error on [1, F, D, max(F, r·D)]; the kink r is
    tried at quantiles of the data's own intensities F/D (and left out), keeping the best."""
    from scipy.optimize import nnls

    ones = np.ones_like(y)
    intensity = flops[bytes_ > 0] / bytes_[bytes_ > 0]
    kinks = [0.0, *np.unique(np.quantile(intensity, np.linspace(0.1, 0.9, 5))).tolist()] \
        if intensity.size and np.ptp(intensity) > 0 else [0.0]
    best: tuple[float, list[float], float] | None = None
    for r in kinks:
        cols = [ones, flops, bytes_] + ([np.maximum(flops, r * bytes_)] if r > 0 else [])
        A = np.column_stack(cols)
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        W = A / scale / y[:, None]
        coef, _ = nnls(W, ones)
        sse = float(np.sum((W @ coef - 1.0) ** 2))
        if best is None or sse < best[0] - 1e-12:
            full = (coef / scale).tolist() + ([0.0] if r == 0 else [])
            best = (sse, full, r)
    assert best is not None
    return {"coef": best[1], "intensity": best[2], "floor_ms": FLOOR_FRACTION * float(y.min())}


def _fit_poly(U: np.ndarray, t: np.ndarray, ulo: np.ndarray, uhi: np.ndarray) -> dict | None:
    """Ridge-regularised polynomial in normalised log variables for the log residual `t`."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import PolynomialFeatures

    span = uhi - ulo
    Z = np.where(span > 0, (U - ulo) / np.where(span > 0, span, 1.0), 0.0)
    degree = POLY_DEGREE.get(U.shape[1], 2)
    while degree > 0:
        poly = PolynomialFeatures(degree).fit(Z)
        if poly.n_output_features_ <= len(t) - 1:
            break
        degree -= 1
    if degree == 0:
        return None
    ridge = Ridge(alpha=1e-4, fit_intercept=False).fit(poly.transform(Z), t)
    return {"powers": poly.powers_.tolist(), "coef": ridge.coef_.tolist()}


def _fit_interp(X: np.ndarray, t: np.ndarray) -> dict | None:
    """Mean log residual per cell of the grid of profiled values. Cells never measured (an
    infeasible corner, or a point held out) are filled harmonically: each equals the mean of its
    grid neighbours, which in 1-D is linear interpolation between the measured cells."""
    from scipy.sparse import coo_matrix, diags
    from scipy.sparse.linalg import spsolve

    axes = [np.unique(X[:, j]) for j in range(X.shape[1])]
    shape = tuple(len(a) for a in axes)
    cells = math.prod(shape)
    if cells > MAX_GRID_CELLS:
        return None
    flat = np.ravel_multi_index([np.searchsorted(a, X[:, j]) for j, a in enumerate(axes)], shape)
    counts = np.bincount(flat, minlength=cells)
    table = np.bincount(flat, weights=t, minlength=cells) / np.maximum(counts, 1)
    missing = counts == 0
    if missing.any():
        ids = np.arange(cells).reshape(shape)
        edges = np.concatenate([np.stack([np.delete(ids, -1, axis=j).ravel(),
                                          np.delete(ids, 0, axis=j).ravel()], axis=1)
                                for j in range(len(shape)) if shape[j] > 1])
        rows, cols = np.concatenate([edges, edges[:, ::-1]]).T
        adjacency = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(cells, cells)).tocsr()
        laplacian = (diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency).tocsr()
        known = laplacian[missing][:, ~missing] @ table[~missing]
        table[missing] = np.atleast_1d(spsolve(laplacian[missing][:, missing].tocsc(), -known))
    return {"axes": [a.tolist() for a in axes], "table": table.tolist()}


def _fit_methods(kind: str, names: list[str], X: np.ndarray, flops: np.ndarray,
                 bytes_: np.ndarray, y: np.ndarray, methods: Sequence[str]
                 ) -> dict[str, LatencyModel]:
    """Each of `methods` fitted on these points (a method that cannot be fitted is absent)."""
    lo, hi = X.min(axis=0).tolist(), X.max(axis=0).tolist()

    def model(method: str, roofline: dict, params: dict) -> LatencyModel:
        return LatencyModel(kind, list(names), method, roofline, params, lo, hi, len(y))

    value = float(np.median(y))
    out = {"constant": model("constant", {"coef": [value, 0.0, 0.0, 0.0], "intensity": 0.0,
                                          "floor_ms": FLOOR_FRACTION * value}, {})}
    if not names or set(methods) <= {"constant"}:
        return out
    roofline = _fit_roofline(flops, bytes_, y)
    out["roofline"] = model("roofline", roofline, {})
    if set(methods) <= {"constant", "roofline"}:
        return {m: out[m] for m in methods if m in out}
    t = np.log(y) - np.log(out["roofline"].predict_many(X, flops, bytes_))
    if "poly" in methods:
        U = np.log1p(np.maximum(X, 0.0))
        params = _fit_poly(U, t, U.min(axis=0), U.max(axis=0))
        if params is not None:
            out["poly"] = model("poly", roofline, params)
    if "interp" in methods:
        params = _fit_interp(X, t)
        if params is not None:
            out["interp"] = model("interp", roofline, params)
    return {m: out[m] for m in methods if m in out}


def _validate(names: list[str], X: np.ndarray, flops: np.ndarray, bytes_: np.ndarray,
              y: np.ndarray) -> None:
    n = len(y)
    if n == 0:
        raise ValueError("no points to fit")
    if X.shape != (n, len(names)) or flops.shape != (n,) or bytes_.shape != (n,):
        raise ValueError(f"shapes X {X.shape}, flops {flops.shape}, bytes {bytes_.shape} do not "
                         f"match {n} latencies over {names}")
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("latencies must be finite and positive")
    if not all(np.isfinite(a).all() and (a >= 0).all() for a in (X, flops, bytes_)):
        raise ValueError("request values and roofline features must be finite and >= 0")


def fit_unit(kind: str, names: list[str], X: np.ndarray, flops: np.ndarray, bytes_: np.ndarray,
             y_ms: np.ndarray, folds: int = 5, seed: int = 0,
             methods: Sequence[str] = METHODS) -> LatencyModel:
    """The candidate among `methods` with the lowest k-fold held-out MAPE, refitted on all points
    (within `TIE`, the one listed first).

    X is (n, d) request values for `names`; flops, bytes_ and y_ms are (n,): roofline features
    and median latency (ms, > 0) at each point. Units without request variables, or with one
    point, get a constant; fewer than `MIN_POINTS` points get the roofline alone. Folds are
    shuffled with `seed`, so the result is deterministic. Raises ValueError on malformed input.
    """
    y = np.asarray(y_ms, dtype=float)
    X = np.asarray(X, dtype=float)
    X = X.reshape(len(y), 0) if X.size == 0 else X
    flops, bytes_ = np.asarray(flops, dtype=float), np.asarray(bytes_, dtype=float)
    _validate(names, X, flops, bytes_, y)
    n = len(y)
    if not names or n == 1:
        methods = ("constant",)
    elif n < MIN_POINTS:
        methods = ("roofline",)
    methods = tuple(methods)
    k = min(folds, n)
    if k < 2:
        chosen = _fit_methods(kind, names, X, flops, bytes_, y, methods)
        return next(iter(chosen.values()))
    from sklearn.model_selection import KFold

    errors: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for train, test in KFold(k, shuffle=True, random_state=seed).split(X):
        fitted = _fit_methods(kind, names, X[train], flops[train], bytes_[train], y[train],
                              methods)
        for method, m in fitted.items():
            pred = m.predict_many(X[test], flops[test], bytes_[test])
            errors[method].append(np.abs(pred - y[test]) / y[test])
    cv = {m: float(np.concatenate(e).mean()) for m, e in errors.items()
          if len(e) == k}  # a method that failed on some fold is not scored
    if not cv:  # none of the asked methods could be fitted: the roofline always can
        return fit_unit(kind, names, X, flops, bytes_, y, folds, seed, ("roofline",))
    best = next(m for m in methods if m in cv and cv[m] <= min(cv.values()) + TIE)
    model = _fit_methods(kind, names, X, flops, bytes_, y, (best,))[best]
    model.cv_mape, model.cv_by_method = cv[best], cv
    return model


# --- key classes of paged attention ------------------------------------------------------------


def _queries(point: Mapping) -> float:
    return float(point.get("T", point.get("N", 1)))


def fit_key_classes(points: Sequence[tuple[Mapping, float]]) -> dict:
    """How much slower a paged attention call runs when the keys it reads are not a multiple
    of 8 (`costs.KEY_CLASSES`), from the points measured in every class (those with `A`):
    per class, log(latency / aligned latency) on the grid of their query counts q (T, or N in
    a decode step) and cached lengths P. The ratio is not monotone in the work (near 1 where
    a call is launch-bound, largest in between, smaller again where the aligned kernels are
    compute-bound), so it is interpolated, not fitted. Returns {"axes": [q values, P values],
    "2": table, "1": table} (tables q-major; {} without such points); `key_class_ratio`
    reads it."""
    groups: dict[tuple[float, float], dict[int, list[float]]] = {}
    for point, ms in points:
        if "A" in point:
            cell = groups.setdefault((_queries(point), float(point.get("P", 0))), {})
            cell.setdefault(int(point["A"]), []).append(ms)
    full = {k: v for k, v in groups.items() if len(v) == 3}
    if not full:
        return {}
    qs, ps = sorted({q for q, _ in full}), sorted({p for _, p in full})
    out: dict = {"axes": [qs, ps]}
    for cls in (2, 1):
        table = np.zeros((len(qs), len(ps)))
        seen = np.zeros(table.shape, bool)
        for (q, p), by in full.items():
            i, j = qs.index(q), ps.index(p)
            table[i, j], seen[i, j] = math.log(np.mean(by[cls]) / np.mean(by[8])), True
        table[~seen] = table[seen].mean()  # a corner not measured (infeasible): the mean
        out[str(cls)] = table.ravel().tolist()
    return out


def key_class_ratio(classes: Mapping, cls: int, point: Mapping) -> float:
    """Latency in key class `cls` over the aligned latency at `point` (its query count and P),
    from `fit_key_classes`' result (1 for aligned keys or without it): bilinear in log q and
    log P, held at the edges of the measured grid."""
    if str(cls) not in classes:
        return 1.0
    axes = [[math.log(max(v, 1.0)) for v in axis] for axis in classes["axes"]]
    u = [min(max(math.log(max(v, 1.0)), axis[0]), axis[-1])
         for v, axis in zip((_queries(point), float(point.get("P", 0))), axes, strict=True)]
    return math.exp(_multilinear(axes, classes[str(cls)], u))
