"""Property-based tests of the estimators on synthetic columns (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stats.estimators import entropy_estimates
from pipeline.stats.registry import ESTIMATE_NAMES

KEYS = tuple(f"{name}_nats" for name in ESTIMATE_NAMES)


@st.composite
def runs(draw: st.DrawFn, log_w_scale: float = 3.0) -> pl.DataFrame:
    prompts = draw(st.integers(2, 6))
    per_prompt = draw(st.integers(2, 5))
    n = prompts * per_prompt
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 20, n)
    s0 = -rng.gamma(2.0, 1.0, n) * lengths
    log_w = rng.normal(0, log_w_scale, n)
    return pl.DataFrame(
        {
            "prompt_id": np.repeat([f"q{i}" for i in range(prompts)], per_prompt),
            "d": log_w,
            "S0": s0,
            "S1": s0 + log_w,
            "L": lengths,
        }
    )


def _estimates(frame: pl.DataFrame, unit: str) -> dict:
    return entropy_estimates(frame, unit)


@pytest.mark.parametrize("unit", ["sequence", "per_token"])
@given(frame=runs(), permutation_seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_invariant_to_row_order(unit: str, frame: pl.DataFrame, permutation_seed: int) -> None:
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=permutation_seed)
    a, b = _estimates(frame, unit), _estimates(shuffled, unit)
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("unit", ["sequence", "per_token"])
@given(frame=runs())
@settings(max_examples=40, deadline=None)
def test_identical_models_give_zero_change_and_full_ess(unit: str, frame: pl.DataFrame) -> None:
    same = frame.with_columns(S1=pl.col("S0"), d=0.0)
    est = _estimates(same, unit)
    for name in ("delta_H", "kl", "delta_H1", "delta_H_rate", "delta_H1_rate"):
        assert est[f"{name}_nats"] == 0.0, name


@given(frame=runs(), shift=st.floats(-50, 50))
@settings(max_examples=40, deadline=None)
def test_constant_log_weight_shift(frame: pl.DataFrame, shift: float) -> None:
    """S1 -> S1 + c shifts every log-weight by c: the weights (self-normalised) do not
    change, so H(p1) moves by exactly -c per sequence, KL by +c, and the first-order
    term (a covariance) stays put."""
    moved = frame.with_columns(S1=pl.col("S1") + shift, d=pl.col("d") + shift)
    a, b = _estimates(frame, "sequence"), _estimates(moved, "sequence")
    tolerance = 1e-9 * (1 + abs(shift) + abs(a["H1_nats"]))
    assert b["H1_nats"] == pytest.approx(a["H1_nats"] - shift, abs=tolerance)
    assert b["delta_H_nats"] == pytest.approx(a["delta_H_nats"] - shift, abs=tolerance)
    assert b["kl_nats"] == pytest.approx(a["kl_nats"] + shift, abs=tolerance)
    assert b["delta_H1_nats"] == pytest.approx(a["delta_H1_nats"], abs=tolerance)


@pytest.mark.parametrize("unit", ["sequence", "per_token"])
@given(frame=runs(log_w_scale=2000.0))
@settings(max_examples=30, deadline=None)
def test_finite_with_log_weights_in_the_thousands(unit: str, frame: pl.DataFrame) -> None:
    est = _estimates(frame, unit)
    for key in KEYS:
        assert math.isfinite(est[key]), key


@pytest.mark.parametrize("unit", ["sequence", "per_token"])
@given(frame=runs(), log_q=st.floats(-700, 700), strata_seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_a_constant_proposal_density_cancels(
    unit: str, frame: pl.DataFrame, log_q: float, strata_seed: int
) -> None:
    """log w0 = log p0/q and log w1 = log p1/q share -log q: a constant log q (and any
    strata labels) leaves every point estimate as with q = p0 (w0 = 1, w1 = exp(d))."""
    strata = np.random.default_rng(strata_seed).integers(0, 3, frame.height)
    mixed = frame.with_columns(
        log_w0=pl.lit(-log_q), log_w1=pl.col("d") - log_q, stratum=pl.Series(strata)
    )
    a, b = _estimates(frame, unit), _estimates(mixed, unit)
    for key in KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-9), key
