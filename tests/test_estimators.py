"""Estimators on synthetic columns, against closed forms written out by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.errors import PipelineError
from pipeline.stats.estimators import entropy_estimates, prepare, prompt_sums


def _frame(
    d: list[float], s0: list[float], s1: list[float], lengths: list[int], prompts: list[str]
) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": prompts, "d": d, "S0": s0, "S1": s1, "L": lengths})


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
    # KL = sum w d / sum w: only the second sequence has d != 0.
    assert est["kl_nats"] == pytest.approx(E * 1.0 / (3 + E), abs=1e-15)
    # dH1 = -mean over prompts of the unbiased covariance of (S0, d) (+ mean e = 0 here):
    # prompt a: Cov((-2, -4), (0, 1)) = (-2 - -3)(0 - .5) + (-4 - -3)(1 - .5) = -1 (n - 1 = 1);
    # prompt b: d constant -> 0.
    assert est["delta_H1_nats"] == pytest.approx(-(-1.0 + 0.0) / 2, abs=1e-15)
    assert est["H0_bits"] == pytest.approx(2.5 / math.log(2), abs=1e-15)
    # Rates -S/L: (1, 1, 1, 1) under p0; under p1 (1, .75, 1, 1) weighted by (1, e, 1, 1).
    assert est["H0_rate_nats"] == pytest.approx(1.0, abs=1e-15)
    assert est["H1_rate_nats"] == pytest.approx((3 + 0.75 * E) / (3 + E), abs=1e-15)


def test_first_order_term_adds_the_eos_log_ratio() -> None:
    """With the EOS position outside the integrand, e = d - (S1 - S0) != 0 and
    dH1 = -mean_q Cov_q(S0, d) + mean e (issue: the EOS term was dropped)."""
    frame = FRAME.with_columns(S1=pl.col("S1") - pl.Series([0.0, 0.5, 0.0, 0.0]))
    est = entropy_estimates(frame, "sequence")
    # e = (0, .5, 0, 0): mean e under p0 = .5 / 4.
    assert est["delta_H1_nats"] == pytest.approx(0.5 + 0.5 / 4, abs=1e-15)
    # Per token: (-mean Cov(S0, d) + mean e - h0 mean Cov(L, d)) / mean L, h0 = 10 / 10:
    # Cov_a(L, d) = (2 - 3)(-.5) + (4 - 3)(.5) = 1, Cov_b = 0.
    est = entropy_estimates(frame, "per_token")
    assert est["delta_H1_nats"] == pytest.approx((0.5 + 0.125 - 1.0 * 0.5) / 2.5, abs=1e-15)


def test_per_token_unit_closed_form() -> None:
    est = entropy_estimates(FRAME, "per_token")
    total_length, weighted_length = 10, 2 + 4 * E + 1 + 3
    assert est["H0_nats"] == pytest.approx(10 / total_length, abs=1e-15)
    assert est["H1_nats"] == pytest.approx((2 + 3 * E + 1 + 3) / weighted_length, abs=1e-15)
    assert est["kl_nats"] == pytest.approx(E / weighted_length, abs=1e-15)
    assert est["per_token_nll_p1_nats"] == est["H1_nats"]
    # dH1 per token = -(mean_q Cov_q(S0, d) + h0 mean_q Cov_q(L, d)) / mean L, with h0 = 1:
    # Cov_a(L, d) = 1, Cov_b = 0; Cov_a(S0, d) = -1.
    assert est["delta_H1_nats"] == pytest.approx(-(-1 / 2 + 1.0 * 1 / 2) / 2.5, abs=1e-15)


def test_per_token_kl_divides_by_full_lengths() -> None:
    """KL compares whole sequences (EOS included), so per token it divides by the full
    length sum w L_full even when the integrand's L excludes the EOS position."""
    frame = FRAME.with_columns(L_full=pl.col("L") + 1)
    est = entropy_estimates(frame, "per_token")
    assert est["kl_nats"] == pytest.approx(E / (3 + 5 * E + 2 + 4), abs=1e-15)


def test_rate_first_order_term() -> None:
    # -mean_q Cov_q((S0 + 1)/L, d): prompt a: (S0 + 1)/L = (-1/2, -3/4), d = (0, 1):
    # Cov = (-.5 + .625)(-.5) + (-.75 + .625)(.5) = -.125; prompt b: d constant -> 0.
    est = entropy_estimates(FRAME, "sequence")
    assert est["delta_H1_rate_nats"] == pytest.approx(0.125 / 2, abs=1e-15)


def test_a_completion_without_counted_tokens_has_rate_zero() -> None:
    """EOS alone with include_eos false: L = 0, S = 0; its rate is 0, not 0/0."""
    frame = FRAME.with_columns(L=pl.Series([0, 4, 1, 3]), S0=pl.Series([0.0, -4.0, -1.0, -3.0]))
    est = entropy_estimates(frame, "sequence")
    assert est["H0_rate_nats"] == pytest.approx((0 + 1 + 1 + 1) / 4, abs=1e-15)


def test_weights_survive_huge_log_weights() -> None:
    # exp(5000) overflows float64; the max shift keeps every ratio finite and exact.
    frame = _frame([5000.0, 5000.0 - math.log(3)], [-1.0, -1.0], [-2.0, -6.0], [1, 1], ["a", "a"])
    est = entropy_estimates(frame, "sequence")
    assert est["H1_nats"] == pytest.approx((3 * 2.0 + 1 * 6.0) / 4, abs=1e-12)


def test_each_prompt_shifts_its_own_weights() -> None:
    """Prompt b's log-weights sit 2000 nats below prompt a's: exp underflows on a common
    shift, but its per-prompt sums stay exact, and the run total is still right."""
    frame = _frame(
        [0.0, math.log(3), -2000.0, -2000.0 + math.log(3)],
        [-1.0, -1.0, -1.0, -1.0],
        [-2.0, -6.0, -4.0, -8.0],
        [1, 1, 1, 1],
        ["a", "a", "b", "b"],
    )
    sums = prompt_sums(prepare(frame))
    per_prompt = sums.prompt_means()
    h1 = -per_prompt["w1_S1"] / per_prompt["w1"]
    assert h1 == pytest.approx([(2 + 3 * 6) / 4, (4 + 3 * 8) / 4], abs=1e-12)
    # Run total: prompt b's weights are exp(-2000) of a's, nothing of it is left.
    assert entropy_estimates(frame, "sequence")["H1_nats"] == pytest.approx(5.0, abs=1e-12)


def test_prompts_are_coded_in_sorted_order_whatever_the_row_order() -> None:
    shuffled = FRAME.select(pl.all().gather([3, 0, 2, 1]))
    seqs = prepare(shuffled)
    assert seqs.prompt_ids.to_list() == ["a", "b"]
    assert seqs.prompt.tolist() == [1, 0, 1, 0]
    assert seqs.prompt_size.tolist() == [2, 2]


@pytest.mark.parametrize("column", ["S0", "S1", "d"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_refused_by_name(column: str, bad: float) -> None:
    values = FRAME[column].to_list()
    values[2] = bad
    frame = FRAME.with_columns(pl.Series(column, values), sample_idx=pl.Series([0, 1, 0, 1]))
    with pytest.raises(PipelineError, match=rf"non-finite .*\({column} = .*prompt 'b', sample 0"):
        prepare(frame)


def test_missing_columns_are_named() -> None:
    with pytest.raises(ValueError, match=r"\['d'\]"):
        prepare(FRAME.drop("d"))


def test_within_prompt_covariance_is_nan_for_a_single_sequence() -> None:
    frame = FRAME.head(3)  # prompt b has one sequence
    sums = prompt_sums(prepare(frame))
    covariance = sums.local[:, sums.column("cov_S0_d")]
    assert covariance[0] == pytest.approx(2 * -1.0, abs=1e-15)  # n_a Cov_a
    assert np.isnan(covariance[1])
