"""Estimators on synthetic columns, against closed forms written out by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from pipeline.stats.estimators import entropy_estimates


def _frame(
    log_w: list[float], s0: list[float], s1: list[float], lengths: list[int], prompts: list[str]
) -> pl.DataFrame:
    return pl.DataFrame(
        {"prompt_id": prompts, "log_w_raw": log_w, "log_w": log_w, "S0": s0, "S1": s1, "L": lengths}
    )


# Two prompts, two sequences each. w = (1, e, 1, 1) after the shift by max log w = 1.
FRAME = _frame(
    [0.0, 1.0, 0.0, 0.0],
    [-2.0, -4.0, -1.0, -3.0],
    [-2.0, -3.0, -1.0, -3.0],
    [2, 4, 1, 3],
    ["a", "a", "b", "b"],
)
E = math.e


def test_sequence_unit_closed_form() -> None:
    est = entropy_estimates(FRAME, "sequence")
    assert est["H0_nats"] == pytest.approx((2 + 4 + 1 + 3) / 4, abs=1e-15)
    assert est["H1_nats"] == pytest.approx((2 + 3 * E + 1 + 3) / (3 + E), abs=1e-15)
    assert est["delta_H_nats"] == pytest.approx(est["H1_nats"] - 2.5, abs=1e-15)
    # KL = sum w log w / sum w: only the second sequence has log w != 0.
    assert est["kl_nats"] == pytest.approx(E * 1.0 / (3 + E), abs=1e-15)
    # dH1 = -mean over prompts of the unbiased covariance of (S0, log w):
    # prompt a: Cov((-2, -4), (0, 1)) = (-2 - -3)(0 - .5) + (-4 - -3)(1 - .5) = -1 (n - 1 = 1);
    # prompt b: log w constant -> 0.
    assert est["delta_H1_nats"] == pytest.approx(-(-1.0 + 0.0) / 2, abs=1e-15)
    assert est["ess"] == pytest.approx((3 + E) ** 2 / (3 + E**2), abs=1e-14)
    assert est["ess_fraction"] == pytest.approx(est["ess"] / 4, abs=1e-15)
    assert est["H0_bits"] == pytest.approx(2.5 / math.log(2), abs=1e-15)
    assert (est["log_weight_min"], est["log_weight_median"], est["log_weight_max"]) == (0, 0, 1)
    # The identity -Cov(w, l0) - KL reproduces SNIS dH when S1 - S0 = log w ...
    assert est["identity_discrepancy_nats"] == pytest.approx(0.0, abs=1e-15)


def test_identity_discrepancy_when_integrand_differs_from_log_weight() -> None:
    # ... and is off by the weighted mean of (S1 - S0 - log w) otherwise (e.g. EOS dropped).
    frame = FRAME.with_columns(S1=pl.col("S1") + pl.Series([0.0, 0.5, 0.0, 0.0]))
    est = entropy_estimates(frame, "sequence")
    assert est["identity_discrepancy_nats"] == pytest.approx(E * 0.5 / (3 + E), abs=1e-15)


def test_per_token_unit_closed_form() -> None:
    est = entropy_estimates(FRAME, "per_token")
    total_length, weighted_length = 10, 2 + 4 * E + 1 + 3
    assert est["H0_nats"] == pytest.approx(10 / total_length, abs=1e-15)
    assert est["H1_nats"] == pytest.approx((2 + 3 * E + 1 + 3) / weighted_length, abs=1e-15)
    assert est["kl_nats"] == pytest.approx(E / weighted_length, abs=1e-15)
    assert est["per_token_nll_p1_nats"] == est["H1_nats"]
    # dH1 per token = -(mean_q Cov_q(S0, d) + h0 mean_q Cov_q(L, d)) / mean L, with h0 = 1:
    # Cov_a(L, d) = (2 - 3)(-.5) + (4 - 3)(.5) = 1, Cov_b = 0; Cov_a(S0, d) = -1.
    assert est["delta_H1_nats"] == pytest.approx(-(-1 / 2 + 1.0 * 1 / 2) / 2.5, abs=1e-15)


def test_length_normalised_first_order_term() -> None:
    est = entropy_estimates(FRAME, "sequence", length_normalize_deltah1=True)
    # S0 / L in prompt a: (-1, -1) -> covariance 0; prompt b: log w constant -> 0.
    assert est["delta_H1_nats"] == 0.0
    frame = FRAME.with_columns(L=pl.Series([1, 4, 1, 3]))
    est = entropy_estimates(frame, "sequence", length_normalize_deltah1=True)
    # prompt a: S0/L = (-2, -1): Cov((-2, -1), (0, 1)) = .5
    assert est["delta_H1_nats"] == pytest.approx(-0.5 / 2, abs=1e-15)


def test_weights_survive_huge_log_weights() -> None:
    # exp(5000) overflows float64; the max shift keeps every ratio finite and exact.
    frame = _frame([5000.0, 5000.0 - math.log(3)], [-1.0, -1.0], [-2.0, -6.0], [1, 1], ["a", "a"])
    est = entropy_estimates(frame, "sequence")
    assert est["H1_nats"] == pytest.approx((3 * 2.0 + 1 * 6.0) / 4, abs=1e-12)
    assert math.isfinite(est["ess"])
