"""Weight stabilisation: clipping by closed form, PSIS against arviz-stats' convention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stats.weights import pareto_k_threshold, stabilise_log_weights


def test_pareto_k_threshold() -> None:
    assert pareto_k_threshold(100) == pytest.approx(0.5)  # 1 - 1/log10(100)
    assert pareto_k_threshold(1000) == pytest.approx(2 / 3)
    assert pareto_k_threshold(10**6) == 0.7  # capped


def test_none_returns_the_raw_weights() -> None:
    log_w = np.array([0.5, -1.0, 2.0])
    out, info = stabilise_log_weights(log_w, "none")
    assert out is log_w
    assert info == {"weights_mode": "none"}


def test_clip_truncates_at_tau_times_mean() -> None:
    log_w = np.array([0.0] * 99 + [10.0])
    out, info = stabilise_log_weights(log_w, "clip")  # tau = sqrt(100) = 10
    mean_w = (99 + math.exp(10)) / 100
    w = np.exp(out - out.max())
    assert info["clip_threshold"] == 10.0
    assert info["fraction_clipped"] == 0.01
    # The big weight is cut to 10 x mean; the others are untouched (ratio to it preserved).
    assert w[-1] / w[0] == pytest.approx(10 * mean_w, rel=1e-12)
    _, info = stabilise_log_weights(log_w, "clip", clip_threshold=1e9)
    assert info["fraction_clipped"] == 0.0


def test_psis_keeps_the_sign_of_log_weights() -> None:
    """arviz-stats negates its input (LOO log-likelihoods); ours must come out unflipped."""
    rng = np.random.default_rng(0)
    log_w = rng.standard_t(3, size=2000) * 1.5
    smoothed, info = stabilise_log_weights(log_w, "psis")
    order = np.argsort(log_w)
    # Same ranking: smoothing never reorders weights (ties allowed in the smoothed tail).
    assert np.all(np.diff(smoothed[order]) >= -1e-12)
    # The body is unchanged up to the normalising constant; the tail is pulled in.
    body = log_w < np.quantile(log_w, 0.5)
    shift = smoothed[body] - log_w[body]
    assert np.ptp(shift) < 1e-9
    assert (smoothed - shift[0])[order[-1]] < log_w[order[-1]]
    assert info["weights_mode"] == "psis"
    assert info["pareto_k_threshold"] == pytest.approx(pareto_k_threshold(2000))


def test_psis_k_hat_separates_light_and_heavy_tails() -> None:
    rng = np.random.default_rng(1)
    _, light = stabilise_log_weights(rng.normal(0, 0.3, 5000), "psis")
    _, heavy = stabilise_log_weights(rng.normal(0, 3.0, 5000), "psis")
    assert light["pareto_k"] < 0.5
    assert light["pareto_k_exceeded"] is False
    assert heavy["pareto_k"] > 0.7
    assert heavy["pareto_k_exceeded"] is True


def test_psis_refuses_too_few_draws() -> None:
    with pytest.raises(PipelineError, match="at least 30 pooled sequences"):
        stabilise_log_weights(np.zeros(10), "psis")
