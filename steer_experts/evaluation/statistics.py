"""Uncertainty of measurements: percentile bootstrap intervals of means and rates, result rows
with their intervals, where a curve over k (units steered) crosses zero, and Spearman
correlations with bootstrap intervals (plain and paired)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values``.

    Resamples ``values`` with replacement ``n_resamples`` times and returns
    ``(estimate, low, high)``: the statistic on the full sample and the
    (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled
    statistics. On a 0/1 vector with ``np.mean`` this is the interval of a rate.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"bootstrap_interval takes a 1-D vector of values, got shape {data.shape}.")
    if data.size == 0:
        raise ValueError("bootstrap_interval got no values; it needs at least one observation.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}.")
    rng = np.random.default_rng(seed)
    resampled = np.array(
        [statistic(data[rng.integers(0, data.size, size=data.size)]) for _ in range(n_resamples)],
        dtype=np.float64,
    )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(statistic(data)), float(low), float(high)


def rate_row(flags: Sequence[bool] | np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """``{prefix: estimate, prefix_low, prefix_high}``: a rate with its 95% percentile-bootstrap interval."""
    estimate, low, high = bootstrap_interval(np.asarray(flags, dtype=float), n_resamples=n_resamples, seed=seed)
    return {prefix: estimate, f"{prefix}_low": low, f"{prefix}_high": high}


def mean_row(values: Sequence[float] | np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """Mean of the finite ``values`` with its 95% bootstrap interval (NaN when none is finite)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {prefix: float("nan"), f"{prefix}_low": float("nan"), f"{prefix}_high": float("nan")}
    estimate, low, high = bootstrap_interval(values, n_resamples=n_resamples, seed=seed)
    return {prefix: estimate, f"{prefix}_low": low, f"{prefix}_high": high}


def difference_row(a: np.ndarray, b: np.ndarray, prefix: str, seed: int, n_resamples: int = 1000) -> dict:
    """mean(a) - mean(b) with a 95% bootstrap interval, ``a`` and ``b`` resampled independently."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = np.array([a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
                      for _ in range(n_resamples)])
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {prefix: float(a.mean() - b.mean()), f"{prefix}_low": float(low), f"{prefix}_high": float(high)}


# --------------------------------------------------------------------------- curves over k


def finite_mean(values) -> float:
    """Mean of the finite values; NaN when there is none (no scorer, or no continuation)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def crossing_k(ks: list[int], values: list[float]) -> float | None:
    """The k where ``values`` first takes the opposite sign of values[0], linear in log(1 + k); None if never."""
    start = np.sign(values[0])
    if start == 0:
        return float(ks[0])
    for i in range(1, len(ks)):
        if np.sign(values[i]) != start:
            x0, x1 = np.log1p(ks[i - 1]), np.log1p(ks[i])
            y0, y1 = values[i - 1], values[i]
            x = x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else x1
            return float(np.expm1(x))
    return None


def value_at_k(ks: list[int], values: list[float], k: float) -> float:
    """``values`` (given on the grid ``ks``) interpolated at ``k``, linear in log(1 + k)."""
    return float(np.interp(np.log1p(k), np.log1p(ks), values))


# --------------------------------------------------------------------------- correlation


def json_fields(result) -> dict:
    """A result dataclass's fields as a JSON-ready dict: NaN (undefined) becomes None."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in result.__dict__.items()}


@dataclass
class Correlation:
    """Spearman's rho with a bootstrap confidence interval.

    ``low``/``high`` bound the ``confidence`` percentile interval over ``n_boot``
    resamples of the pairs; all NaN when rho is undefined (fewer than 3 pairs or
    a constant input). ``n_pairs`` counts the pairs used (NaN similarities dropped).
    """

    rho: float
    low: float
    high: float
    n_pairs: int
    p_value: float
    confidence: float = 0.95
    n_boot: int = 1000

    def to_dict(self) -> dict:
        """JSON-ready fields (NaN as None)."""
        return json_fields(self)


def spearman_with_ci(x: Sequence[float], y: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> Correlation:
    """Spearman's rho of ``x`` and ``y`` (pairs with a NaN dropped) and its percentile bootstrap CI.

    Each resample draws the pairs with replacement; resamples in which either side
    is constant are skipped. ``seed`` fixes the resamples.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of equal length; got {x.shape} and {y.shape}.")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(nan, nan, nan, n, nan, confidence, n_boot)
    result = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    boots = _spearman_rows(x[draws], y[draws])
    boots = boots[~np.isnan(boots)]  # resamples where one side came out constant
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boots, [tail, 100.0 - tail]) if len(boots) else (nan, nan)
    return Correlation(float(result.statistic), float(low), float(high), n, float(result.pvalue), confidence, n_boot)


@dataclass
class CorrelationDifference:
    """rho(a) - rho(b) against the same ratings, with a paired bootstrap CI over the shared pairs."""

    difference: float
    low: float
    high: float
    n_pairs: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        """JSON-ready fields (NaN as None)."""
        return json_fields(self)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x with the same row of y (NaN where a row is constant)."""
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=1) / denominator, np.nan)


def spearman_difference(a: Sequence[float], b: Sequence[float], y: Sequence[float], *, n_boot: int = 1000,
                        confidence: float = 0.95, seed: int = 0) -> CorrelationDifference:
    """rho(a, y) - rho(b, y) over the pairs where a, b and y are all defined; paired bootstrap CI.

    Each resample draws the same pairs for both, so the interval reflects the
    difference, not two independent uncertainties.
    """
    a, b, y = (np.asarray(v, dtype=np.float64) for v in (a, b, y))
    keep = ~(np.isnan(a) | np.isnan(b) | np.isnan(y))
    a, b, y = a[keep], b[keep], y[keep]
    n, nan = len(y), float("nan")
    if n < 3 or min(np.ptp(a), np.ptp(b), np.ptp(y)) == 0:
        return CorrelationDifference(nan, nan, nan, n, confidence)
    point = float(spearmanr(a, y).statistic - spearmanr(b, y).statistic)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = _spearman_rows(a[draws], y[draws]) - _spearman_rows(b[draws], y[draws])
    boots = boots[~np.isnan(boots)]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boots, [tail, 100.0 - tail]) if len(boots) else (nan, nan)
    return CorrelationDifference(point, float(low), float(high), n, confidence)
