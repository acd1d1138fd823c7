"""Estimators on synthetic columns, against closed forms written out by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from pipeline.stats.estimators import entropy_estimates


def _frame(
    log_w: list[float], s0: list[float], s1: list[float], lengths: list[int]
) -> pl.DataFrame:
    return pl.DataFrame({"log_w": log_w, "S0": s0, "S1": s1, "L": lengths})


def test_two_sequences_closed_form() -> None:
    # w = (1, e) after the shift by max log w = 1.
    frame = _frame([0.0, 1.0], [-2.0, -4.0], [-3.0, -1.0], [2, 4])
    e = math.e
    seq = entropy_estimates(frame, "sequence")
    assert seq["H0_nats"] == pytest.approx((2.0 + 4.0) / 2, abs=1e-15)
    assert seq["H1_nats"] == pytest.approx((1 * 3.0 + e * 1.0) / (1 + e), abs=1e-15)
    assert seq["delta_H_nats"] == pytest.approx(seq["H1_nats"] - 3.0, abs=1e-15)
    assert seq["ess"] == pytest.approx((1 + e) ** 2 / (1 + e**2), abs=1e-15)
    assert seq["ess_fraction"] == pytest.approx(seq["ess"] / 2, abs=1e-15)
    assert seq["H0_bits"] == pytest.approx(3.0 / math.log(2), abs=1e-15)
    tok = entropy_estimates(frame, "per_token")
    assert tok["H0_nats"] == pytest.approx(6.0 / 6.0, abs=1e-15)
    assert tok["H1_nats"] == pytest.approx((3.0 + e * 1.0) / (2 + e * 4), abs=1e-15)
    assert tok["per_token_nll_p1_nats"] == tok["H1_nats"]
    assert seq["per_token_nll_p0_nats"] == tok["H0_nats"]
    assert (seq["log_weight_min"], seq["log_weight_median"], seq["log_weight_max"]) == (
        0.0,
        0.5,
        1.0,
    )


def test_identical_models_give_zero_change_and_full_ess() -> None:
    s = [-1.25, -7.5, -3.0, -0.125]
    est = entropy_estimates(_frame([0.0] * 4, s, s, [1, 5, 2, 1]), "sequence")
    assert est["delta_H_nats"] == 0.0
    assert est["ess"] == 4.0


def test_weights_survive_huge_log_weights() -> None:
    # exp(5000) overflows float64; the max shift keeps every ratio finite and exact.
    est = entropy_estimates(
        _frame([5000.0, 5000.0 - math.log(3)], [-1.0, -1.0], [-2.0, -6.0], [1, 1]), "sequence"
    )
    assert est["H1_nats"] == pytest.approx((3 * 2.0 + 1 * 6.0) / 4, abs=1e-12)
    assert math.isfinite(est["ess"])
