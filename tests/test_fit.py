"""Per-signature latency models: recovery, exact interpolation, selection, JSON, range flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.model_selection import KFold

from dooly_fx.fit import METHODS, TIE, LatencyModel, fit_unit

# The first values of dooly_fx.sweep's grids (importing it would import torch: seconds).
TOKEN_GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536,
              2048, 3072, 4096, 6144, 8192)
SEQ_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTEXT_GRID = (16, 64, 128, 256, 512, 1024, 2048, 4096)
N, K = 4096, 4096


def gemm_features(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs and bytes of x (m, K) @ W (N, K)^T in fp16."""
    return 2.0 * m * N * K, 2.0 * (m * K + K * N + m * N)


def wavy_gemm(m: np.ndarray) -> np.ndarray:
    """A GEMM-like latency with a wave-quantisation wobble the roofline cannot follow."""
    flops, bytes_ = gemm_features(m)
    return (0.01 + flops / 6e11 + bytes_ / 3e9) * (1.0 + 0.15 * np.sin(np.log(m)))


def attention_grid(max_tokens: int = 8192) -> np.ndarray:
    """(B, S) sweep points with B·S ≤ max_tokens: the infeasible corner is missing."""
    return np.array([(b, s) for b in SEQ_GRID[:7] for s in TOKEN_GRID if s >= 16
                     and b * s <= max_tokens], dtype=float)


def attention_features(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, s = X[:, 0], X[:, 1]
    return 4.0 * b * 32 * s * s * 128, 2.0 * 4 * b * s * 32 * 128


def attention_latency(X: np.ndarray) -> np.ndarray:
    flops, bytes_ = attention_features(X)
    return (0.02 + flops / 3e11 + bytes_ / 2e9) * (1.0 + 0.1 * np.cos(X[:, 1]))


TOKENS = np.array([m for m in TOKEN_GRID if m <= 1024], dtype=float)


def test_latency_linear_in_flops_is_recovered_and_extrapolates():
    train, held_out = TOKENS[::2], TOKENS[1::2]
    flops, bytes_ = gemm_features(train)
    model = fit_unit("gemm", ["m"], train[:, None], flops, bytes_, 0.005 + flops / 5e11)
    far = np.array([1536.0, 2048.0, 4096.0])  # up to 4x the profiled range
    for m in (held_out, far):
        f, b = gemm_features(m)
        pred = model.predict_many(m[:, None], f, b)
        assert np.abs(pred / (0.005 + f / 5e11) - 1).max() < 0.01
    assert not model.in_range([4096.0])


def test_interp_reproduces_measured_points_1d_and_2d_with_missing_corner():
    flops, bytes_ = gemm_features(TOKENS)
    y = wavy_gemm(TOKENS)
    model = fit_unit("gemm", ["m"], TOKENS[:, None], flops, bytes_, y, methods=("interp",))
    assert model.method == "interp"
    np.testing.assert_allclose(model.predict_many(TOKENS[:, None], flops, bytes_), y, rtol=1e-12)
    X = attention_grid()
    f2, b2 = attention_features(X)
    y2 = attention_latency(X)
    grid = fit_unit("attention", ["B", "S"], X, f2, b2, y2, methods=("interp",))
    assert len(X) < len(grid.params["axes"][0]) * len(grid.params["axes"][1])  # corner missing
    got = [grid.predict({"B": b, "S": s}, f, by) for (b, s), f, by in zip(X, f2, b2, strict=True)]
    np.testing.assert_allclose(got, y2, rtol=1e-12)


def test_interp_fills_unmeasured_cells_with_the_mean_of_their_neighbours():
    X = attention_grid(max_tokens=2048)
    f, b = attention_features(X)
    model = fit_unit("attention", ["B", "S"], X, f, b, attention_latency(X), methods=("interp",))
    axes = model.params["axes"]
    table = np.array(model.params["table"]).reshape(len(axes[0]), len(axes[1]))
    measured = {(axes[0].index(bb), axes[1].index(ss)) for bb, ss in X}
    holes = [(i, j) for i in range(len(axes[0])) for j in range(len(axes[1]))
             if (i, j) not in measured]
    assert len(holes) > 5
    for i, j in holes:
        near = [table[a, c] for a, c in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                if 0 <= a < len(axes[0]) and 0 <= c < len(axes[1])]
        assert table[i, j] == pytest.approx(np.mean(near), rel=1e-9, abs=1e-12)


def test_interp_blends_log_residuals_linearly_in_log1p_between_grid_values():
    flops, bytes_ = gemm_features(TOKENS)
    y = wavy_gemm(TOKENS)
    model = fit_unit("gemm", ["m"], TOKENS[:, None], flops, bytes_, y, methods=("interp",))
    c0, c1, c2, c3 = model.roofline["coef"]

    def base(m: float) -> float:
        f, b = gemm_features(np.array([m]))
        return max(c0 + c1 * f[0] + c2 * b[0]
                   + c3 * max(f[0], model.roofline["intensity"] * b[0]), 1e-12)

    lo, hi = 48.0, 64.0  # neighbouring grid values
    t_lo, t_hi = (np.log(y[list(TOKENS).index(v)] / base(v)) for v in (lo, hi))
    m = 56.0
    w = (np.log1p(m) - np.log1p(lo)) / (np.log1p(hi) - np.log1p(lo))
    f, b = gemm_features(np.array([m]))
    expected = base(m) * np.exp((1 - w) * t_lo + w * t_hi)
    assert model.predict([m], f[0], b[0]) == pytest.approx(expected, rel=1e-12)


def _models() -> list[LatencyModel]:
    flops, bytes_ = gemm_features(TOKENS)
    y = wavy_gemm(TOKENS)
    out = [fit_unit("gemm", ["m"], TOKENS[:, None], flops, bytes_, y, methods=(m,))
           for m in METHODS]
    X = attention_grid()
    f2, b2 = attention_features(X)
    out += [fit_unit("attention", ["B", "S"], X, f2, b2, attention_latency(X), methods=(m,))
            for m in METHODS]
    out.append(fit_unit("positions", [], np.zeros((1, 0)), [0.0], [0.0], [0.03]))
    return out


def _queries(model: LatencyModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-range and out-of-range points (down to zero, up to 8x) with their features."""
    if not model.names:
        return np.zeros((3, 0)), np.zeros(3), np.zeros(3)
    if model.names == ["m"]:
        m = np.array([0.0, 1.0, 3.0, 100.0, 1024.0, 3000.0, 8192.0])
        return m[:, None], *gemm_features(m)
    X = np.array([[1, 16], [3, 100], [64, 128], [64, 4096], [512, 8192], [0, 0]], dtype=float)
    return X, *attention_features(X)


@pytest.mark.parametrize("model", _models(), ids=lambda m: f"{m.kind}-{m.method}")
def test_json_round_trip_predicts_identically_and_scalar_matches_vector(model):
    back = LatencyModel.from_json(json.loads(json.dumps(model.to_json())))
    assert back == model
    X, flops, bytes_ = _queries(model)
    many = model.predict_many(X, flops, bytes_)
    assert (back.predict_many(X, flops, bytes_) == many).all()
    one = [back.predict(x, f, b) for x, f, b in zip(X.tolist(), flops, bytes_, strict=True)]
    np.testing.assert_allclose(one, many, rtol=1e-12)
    assert (many > 0).all() and np.isfinite(many).all()


def test_from_json_refuses_another_format():
    data = _models()[0].to_json() | {"format": 99}
    with pytest.raises(ValueError, match="format"):
        LatencyModel.from_json(data)


def test_in_range_flags_extrapolation():
    X = np.array([(b, p) for b in SEQ_GRID[:5] for p in CONTEXT_GRID[:6]], dtype=float)
    flops, bytes_ = X[:, 0] * X[:, 1], X[:, 0] * X[:, 1] * 2.0
    model = fit_unit("attention", ["B", "P"], X, flops, bytes_, 0.01 + bytes_ / 1e6)
    assert (model.lo, model.hi) == ([1.0, 16.0], [16.0, 1024.0])
    assert model.in_range([1, 16]) and model.in_range({"B": 16, "P": 1024})
    assert model.in_range([3, 100])  # between grid values is interpolation, not extrapolation
    assert not model.in_range([32, 512]) and not model.in_range({"B": 4, "P": 8})


def test_predictions_stay_positive_when_latency_falls_with_size():
    m = TOKENS
    flops, bytes_ = gemm_features(m)
    y = 1.0 / np.sqrt(m)  # adversarial: a linear fit would cross zero
    for method in METHODS:
        model = fit_unit("gemm", ["m"], m[:, None], flops, bytes_, y, methods=(method,))
        assert min(model.roofline["coef"]) >= 0  # NNLS: latency never falls with work
        big = np.array([0.0, 1e5, 1e7])
        assert (model.predict_many(big[:, None], *gemm_features(big)) > 0).all()


def test_chosen_method_has_lowest_held_out_error_and_cv_is_really_held_out():
    flops, bytes_ = gemm_features(TOKENS)
    y = wavy_gemm(TOKENS)
    model = fit_unit("gemm", ["m"], TOKENS[:, None], flops, bytes_, y, folds=5, seed=3)
    assert set(model.cv_by_method) == set(METHODS)
    assert model.cv_mape == model.cv_by_method[model.method]
    assert model.cv_mape <= min(model.cv_by_method.values()) + TIE
    assert model.method == "interp"  # the wobble defeats the smooth candidates
    errors = []
    for train, test in KFold(5, shuffle=True, random_state=3).split(TOKENS):
        part = fit_unit("gemm", ["m"], TOKENS[train, None], flops[train], bytes_[train],
                        y[train], methods=("roofline",))
        pred = part.predict_many(TOKENS[test, None], flops[test], bytes_[test])
        errors.extend(np.abs(pred - y[test]) / y[test])
    assert model.cv_by_method["roofline"] == pytest.approx(np.mean(errors), rel=1e-12)


def test_exact_fit_ties_go_to_the_simplest_candidate():
    flops, bytes_ = gemm_features(TOKENS)
    model = fit_unit("gemm", ["m"], TOKENS[:, None], flops, bytes_, 0.01 + flops / 4e11)
    assert model.method == "roofline" and model.cv_mape < 1e-9


def test_constant_unit_and_tiny_samples():
    const = fit_unit("positions", [], np.zeros((1, 0)), [0.0], [0.0], [0.0421])
    assert const.method == "constant" and const.cv_mape is None and const.n_points == 1
    assert const.predict([], 0.0, 0.0) == 0.0421 and const.predict({}, 5.0, 5.0) == 0.0421
    assert const.in_range([])
    one = fit_unit("norm", ["m"], [[64.0]], [64.0], [128.0], [0.02])
    assert one.method == "constant" and one.predict([4096], 4096.0, 8192.0) == 0.02
    for n in (2, 3):
        m = TOKENS[:n]
        small = fit_unit("norm", ["m"], m[:, None], m, 2 * m, 0.01 + m / 1e3)
        assert small.method == "roofline" and set(small.cv_by_method) == {"roofline"}
        assert small.predict([100.0], 100.0, 200.0) > 0
    scattered = np.random.default_rng(0).uniform(1, 100, size=(300, 2))  # 90,000 grid cells
    alone = fit_unit("attention", ["B", "S"], scattered, scattered[:, 0], scattered[:, 1],
                     np.ones(300), methods=("interp",))
    assert alone.method == "roofline"  # interp cannot be fitted, the roofline always can


def test_malformed_input_is_refused():
    with pytest.raises(ValueError, match="positive"):
        fit_unit("gemm", ["m"], [[1.0], [2.0]], [1.0, 2.0], [1.0, 2.0], [0.1, -0.1])
    with pytest.raises(ValueError, match="shapes"):
        fit_unit("gemm", ["m", "B"], [[1.0], [2.0]], [1.0, 2.0], [1.0, 2.0], [0.1, 0.2])


def test_key_class_ratios_are_recovered_from_points_measured_in_every_class():
    from dooly_fx.fit import fit_key_classes, key_class_ratio

    points = []
    for t in (16, 128, 1024):
        for p in (256, 4096):
            aligned = 0.01 * t + p * 1e-3
            points += [({"T": t, "N": 4, "P": p, "A": 8}, aligned),
                       ({"T": t, "N": 4, "P": p, "A": 2}, aligned * 1.25),
                       ({"T": t, "N": 4, "P": p, "A": 1}, aligned * 3.0 * t ** -0.2)]
    points.append(({"T": 16, "N": 4, "P": 256}, 1.0))  # a grid point: not a class point
    classes = fit_key_classes(points)
    assert classes["axes"] == [[16, 128, 1024], [256, 4096]]
    assert classes["2"] == pytest.approx([np.log(1.25)] * 6)
    # log ratio linear in log q between the grid values: bilinear interpolation is exact
    assert key_class_ratio(classes, 8, {"T": 100, "P": 1000}) == 1.0
    assert key_class_ratio(classes, 1, {"T": 100, "P": 1000}) == pytest.approx(3.0 * 100 ** -0.2)
    edge = {"T": 1, "P": 99999}  # held at the measured edges
    assert key_class_ratio(classes, 1, edge) == pytest.approx(3.0 * 16 ** -0.2)
    assert key_class_ratio(classes, 2, {"T": 5000, "P": 1}) == pytest.approx(1.25)
    assert fit_key_classes([({"N": 4, "P": 256}, 1.0)]) == {}
    assert key_class_ratio({}, 1, {"T": 100, "P": 100}) == 1.0
