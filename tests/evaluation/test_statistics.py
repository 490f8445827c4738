"""Curves over k: where a dose-response curve crosses zero, and values between grid points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steer_experts.evaluation.statistics import crossing_k, finite_mean, value_at_k


def test_parity_crossing_is_interpolated_in_log1p_k():
    # from -0.5 at k=1 to +0.5 at k=3, halfway in log(1+k): log(1+k) = (log 2 + log 4) / 2, k = 2*sqrt(2) - 1
    assert crossing_k([0, 1, 3], [-1.0, -0.5, 0.5]) == pytest.approx(2 * math.sqrt(2) - 1)
    assert crossing_k([0, 1, 3], [0.2, 0.1, 0.05]) is None
    assert crossing_k([0, 10], [0.3, -0.3]) == pytest.approx(math.expm1(math.log(11) / 2))


def test_value_at_k_interpolates_in_log1p_k_and_finite_mean_skips_nan():
    assert value_at_k([0, 3], [1.0, 3.0], 1) == pytest.approx(2.0)  # log(2) is halfway from log(1) to log(4)
    assert finite_mean([1.0, float("nan"), 3.0]) == 2.0
    assert np.isnan(finite_mean([float("nan")]))
