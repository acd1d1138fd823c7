"""Weights: clipping by closed form, PSIS against arviz-stats' convention and its failure
modes, and the diagnostics (raw ESS, per-prompt ESS, mean-weight test)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from pipeline.stats.estimators import prepare
from pipeline.stats.weights import (
    LogWeightScan,
    effective_sample_size,
    fit_stabiliser,
    pareto_k_threshold,
    psis_tail_size,
    stabilise_log_weights,
    weight_diagnostics,
    weight_warnings,
)


def test_pareto_k_threshold() -> None:
    assert pareto_k_threshold(100) == pytest.approx(0.5)  # 1 - 1/log10(100)
    assert pareto_k_threshold(1000) == pytest.approx(2 / 3)
    assert pareto_k_threshold(10**6) == 0.7  # capped


def test_none_returns_the_raw_weights_and_still_computes_k_hat() -> None:
    log_w = np.random.default_rng(0).normal(0, 1.0, 400)
    out = stabilise_log_weights(log_w, "none")
    assert out.log_w is log_w
    assert out.diagnostics["weights_mode"] == "none"
    assert 0 < out.diagnostics["pareto_k"] < 1
    assert out.diagnostics["pareto_k_threshold"] == pytest.approx(pareto_k_threshold(400))
    assert out.diagnostics["fraction_clipped"] is None
    assert out.warnings == []


def test_clip_truncates_at_tau_times_mean() -> None:
    log_w = np.array([0.0] * 99 + [10.0])
    out = stabilise_log_weights(log_w, "clip")  # tau = sqrt(100) = 10
    mean_w = (99 + math.exp(10)) / 100
    w = np.exp(out.log_w - out.log_w.max())
    assert out.diagnostics["clip_threshold"] == 10.0
    assert out.diagnostics["fraction_clipped"] == 0.01
    # The big weight is cut to 10 x mean; the others are untouched (ratio to it preserved).
    assert w[-1] / w[0] == pytest.approx(10 * mean_w, rel=1e-12)
    # ESS of the clipped weights (big one r = 10 mean_w times the others) vs raw ones.
    r = 10 * mean_w
    assert effective_sample_size(out.log_w) == pytest.approx((r + 99) ** 2 / (r**2 + 99), rel=1e-12)
    raw = math.exp(10)
    assert effective_sample_size(log_w) == pytest.approx((raw + 99) ** 2 / (raw**2 + 99), rel=1e-12)
    assert stabilise_log_weights(log_w, "clip", 1e9).diagnostics["fraction_clipped"] == 0.0


def test_psis_keeps_the_sign_of_log_weights() -> None:
    """arviz-stats negates its input (LOO log-likelihoods); ours must come out unflipped."""
    rng = np.random.default_rng(0)
    log_w = rng.standard_t(3, size=2000) * 1.5
    out = stabilise_log_weights(log_w, "psis")
    smoothed = out.log_w
    order = np.argsort(log_w)
    # Same ranking: smoothing never reorders weights (ties allowed in the smoothed tail).
    assert np.all(np.diff(smoothed[order]) >= -1e-12)
    # The body is unchanged up to the normalising constant; the tail is pulled in.
    body = log_w < np.quantile(log_w, 0.5)
    shift = smoothed[body] - log_w[body]
    assert np.ptp(shift) < 1e-9
    assert (smoothed - shift[0])[order[-1]] < log_w[order[-1]]
    assert out.diagnostics["weights_mode"] == "psis"
    assert out.diagnostics["pareto_k_threshold"] == pytest.approx(pareto_k_threshold(2000))


def test_k_hat_separates_light_and_heavy_tails_in_every_mode() -> None:
    rng = np.random.default_rng(1)
    light, heavy = rng.normal(0, 0.3, 5000), rng.normal(0, 3.0, 5000)
    for mode in ("none", "clip", "psis"):
        assert stabilise_log_weights(light, mode).diagnostics["pareto_k_exceeded"] is False
        found = stabilise_log_weights(heavy, mode).diagnostics
        assert found["pareto_k"] > 0.7
        assert found["pareto_k_exceeded"] is True


def test_psis_with_too_few_draws_falls_back_with_a_warning() -> None:
    log_w = np.linspace(-1, 1, 10)
    out = stabilise_log_weights(log_w, "psis")
    assert out.log_w is log_w
    assert out.diagnostics["weights_mode"] == "none"
    assert out.diagnostics["pareto_k"] is None
    assert "at least 30 pooled sequences" in out.diagnostics["pareto_k_note"]
    (warning,) = out.warnings
    assert warning.startswith("weights.mode=psis could not fit")
    assert "raw weights" in warning


def test_psis_with_tied_largest_log_weights_falls_back_with_a_warning() -> None:
    """One short completion sampled many times: the largest log-weights are all equal
    and arviz-stats raises "All tail values are the same"; no traceback may follow."""
    log_w = np.concatenate([np.random.default_rng(2).normal(-3, 1, 900), np.full(100, 2.0)])
    out = stabilise_log_weights(log_w, "psis")
    assert out.log_w is log_w
    assert out.diagnostics["pareto_k"] is None
    assert "tied" in out.diagnostics["pareto_k_note"]
    assert "tied" in out.warnings[0]
    # In the other modes the missing k-hat is noted, not warned about.
    assert stabilise_log_weights(log_w, "none").warnings == []


def _seqs(log_w1: list[float], prompts: list[str]) -> object:
    frame = pl.DataFrame(
        {"prompt_id": prompts, "S0": 0.0, "S1": 0.0, "L": 1, "d": log_w1},
    )
    return prepare(frame)


def test_diagnostics_closed_form() -> None:
    # Prompt a: w = (1, 3); prompt b: w = (1, 1).
    seqs = _seqs([0.0, math.log(3), 0.0, 0.0], ["a", "a", "b", "b"])
    found = weight_diagnostics(seqs)  # type: ignore[arg-type]
    assert found["ess"] == pytest.approx(36 / 12, rel=1e-12)  # (1+3+1+1)^2 / (1+9+1+1)
    assert found["ess_fraction"] == pytest.approx(3 / 4, rel=1e-12)
    # Per prompt: a: 16 / 10 = 1.6, b: 2.
    assert found["prompt_ess_min"] == pytest.approx(1.6, rel=1e-12)
    assert found["prompt_ess_median"] == pytest.approx(1.8, rel=1e-12)
    # Mean weight 6/4; within-prompt variance: a: 2/1 ((1-2)^2 + (3-2)^2) = 4, b: 0;
    # SE = sqrt(4) / 4.
    assert found["mean_weight"] == pytest.approx(1.5, rel=1e-12)
    assert found["mean_weight_se"] == pytest.approx(0.5, rel=1e-12)
    assert found["mean_weight_z"] == pytest.approx(1.0, rel=1e-12)
    assert (found["log_weight_min"], found["log_weight_max"]) == (0.0, math.log(3))


def test_mean_weight_test_survives_extreme_log_weights() -> None:
    rng = np.random.default_rng(3)
    low = _seqs(list(rng.normal(-800, 1, 8)), ["a"] * 4 + ["b"] * 4)
    found = weight_diagnostics(low)  # type: ignore[arg-type]
    assert found["mean_weight"] == 0.0  # underflows, and the test still says how far below
    assert found["mean_weight_z"] == -math.inf


def test_mean_weight_warning_names_the_remedy() -> None:
    # p1 puts mass where p0 never samples: exp(d) averages well below 1, with small spread.
    rng = np.random.default_rng(4)
    d = np.log(rng.uniform(0.4, 0.6, 400))
    seqs = _seqs(list(d), [f"q{i // 8}" for i in range(400)])
    row = {**weight_diagnostics(seqs), "pareto_k_exceeded": False}  # type: ignore[arg-type]
    assert row["mean_weight_z"] < -3
    warnings = weight_warnings(row, 0.1, "p0", "p1")
    (warning,) = [w for w in warnings if "mean weight" in w]
    assert "standard errors below 1" in warning
    assert "sampling.models: [p0, p1]" in warning
    # A mean weight near 1 raises nothing.
    fine = _seqs(list(np.log(rng.uniform(0.5, 1.5, 400))), [f"q{i // 8}" for i in range(400)])
    row = {**weight_diagnostics(fine), "pareto_k_exceeded": False}  # type: ignore[arg-type]
    assert weight_warnings(row, 0.1, "p0", "p1") == []


def test_psis_from_the_largest_draws_equals_arviz_on_the_whole_run() -> None:
    """The streaming fit (the K + 1 largest log-weights, fed in shards) gives what
    arviz-stats' psislw gives on every log-weight at once, up to its normalising
    constant, and applies it shard by shard to the right sequences."""
    from arviz_stats.base import array_stats

    rng = np.random.default_rng(5)
    log_w = rng.standard_t(4, size=5000) * 1.2
    expected, k_hat = array_stats.psislw(-log_w)
    scan = LogWeightScan(len(log_w))
    bounds = [0, 1, 700, 701, 2500, 5000]  # uneven shards, one of a single sequence
    for low, high in itertools.pairwise(bounds):
        scan.add(log_w[low:high])
    assert scan.keep == psis_tail_size(5000) + 1 == 213
    stabiliser, diagnostics, _ = fit_stabiliser(scan, "psis")
    assert diagnostics["pareto_k"] == pytest.approx(float(k_hat), rel=1e-12)
    found = np.concatenate(
        [stabiliser.apply(log_w[low:high], low) for low, high in itertools.pairwise(bounds)]
    )
    shift = found - np.asarray(expected)
    assert np.ptp(shift) < 1e-10
    assert stabiliser.stabilised_max == pytest.approx(found.max(), abs=0)
    assert np.sum(found != log_w) == 212  # only the tail moved
    # Clipping, shard by shard, equals clipping the whole run.
    clip, _, _ = fit_stabiliser(scan, "clip")
    whole = stabilise_log_weights(log_w, "clip").log_w
    parts = [clip.apply(log_w[low:high], low) for low, high in itertools.pairwise(bounds)]
    assert np.concatenate(parts) == pytest.approx(whole, abs=1e-12)
