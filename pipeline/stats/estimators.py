"""Entropy estimators: Polars reduces sequences to per-prompt sums, NumPy finishes.

Nothing here knows about models or files. The input frame holds one row per sequence
x_i sampled from p0 (DESIGN.md §2), with columns

* ``prompt_id``;
* ``log_w_raw`` = S1_i - S0_i over the full sequence (EOS included): log p1(x_i)/p0(x_i);
* ``log_w``: the log-weights used for averaging (``log_w_raw`` itself, or clipped or
  Pareto-smoothed, see ``weights``);
* ``S0``, ``S1``: the entropy integrands, sums of teacher-forced log-probs (nats) over
  the counted tokens (the final EOS dropped when ``include_eos`` is false);
* ``L``: the number of counted tokens.

Every estimate is a smooth function of sums over prompts (``prompt_sums``), so the
point estimate and each cluster-bootstrap replicate (``uncertainty``) are the same
function (``estimates_from_totals``) of other totals. With w_i = exp(log_w_i - max log_w)
(float64; the shift cancels in every ratio), E1[f] = sum w f / sum w (SNIS), and
d = log_w_raw:

================  ===============================  ======================================
quantity          unit "sequence" (nats/sequence)  unit "per_token" (nats/token)
================  ===============================  ======================================
H(p0)             -sum S0 / N                      -sum S0 / sum L
H(p1), SNIS       -sum w S1 / sum w                -sum w S1 / sum w L
KL(p1 || p0)      sum w d / sum w                  sum w d / sum w L
identity dH       -C - KL                          -(sum w S0/sum w L - sum S0/sum L) - KL
first-order dH1   -mean_q Cov_q(S0, d)             -(mean_q Cov_q(S0, d)
                                                     + h0 mean_q Cov_q(L, d)) / mean L
================  ===============================  ======================================

C = sum w S0 / sum w - mean S0 is Cov_p0(w/E w, S0), so the identity row is the exact
relation dH = -Cov_p0(w, l0) - KL(p1 || p0) evaluated with the same weights; it
reproduces the SNIS dH up to rounding when ``include_eos`` is true (then S1 - S0 = d)
and differs by the weighted mean EOS log-ratio otherwise.

dH1 is the first-order term of dH in d (gradient-free: "entropy change = -Cov(log p,
delta logit)"). Cov_q is the unbiased covariance over the samples of prompt q, so
the between-prompt spread of means does not leak into it; h0 = -sum S0 / sum L.
With ``length_normalize_deltah1`` the integrand is S0/L (nats/token) in both units.
Bits = nats / ln 2. ESS = (sum w)^2 / sum w^2 (Kish).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import polars as pl

Unit = Literal["sequence", "per_token"]
NATS_PER_BIT = math.log(2.0)
# Estimates that get intervals and a bits twin.
ESTIMATES = ("H0", "H1", "delta_H", "kl", "delta_H1")


def _within_prompt_covariance(x: pl.Expr, y: pl.Expr) -> pl.Expr:
    """Unbiased covariance of x and y within one group (use inside ``group_by().agg``)."""
    return ((x - x.mean()) * (y - y.mean())).sum() / (pl.len() - 1)


def prompt_sums(paired: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Per-prompt sufficient statistics of every estimator, one row per prompt.

    Columns: ``n`` (sequences), ``sw``, ``sw2``, ``swS1``, ``swS0``, ``swL``, ``swD``
    (sums of w, w^2, w S1, w S0, w L, w d), ``sS0``, ``sL``, and the within-prompt
    covariances ``cS`` = Cov(S0, d), ``cL`` = Cov(L, d), ``cR`` = Cov(S0/L, d)
    (null for a prompt with one sequence).
    """
    log_w = pl.col("log_w")
    w = (log_w - log_w.max()).exp()
    d = pl.col("log_w_raw")
    per_token_s0 = pl.col("S0") / pl.col("L").clip(lower_bound=1)
    frame = paired.lazy().with_columns(w=w, L=pl.col("L").cast(pl.Float64))
    w, length = pl.col("w"), pl.col("L")
    return (
        frame.group_by("prompt_id")
        .agg(
            n=pl.len(),
            sw=w.sum(),
            sw2=(w * w).sum(),
            swS1=(w * pl.col("S1")).sum(),
            swS0=(w * pl.col("S0")).sum(),
            swL=(w * length).sum(),
            swD=(w * d).sum(),
            sS0=pl.col("S0").sum(),
            sL=length.sum(),
            cS=_within_prompt_covariance(pl.col("S0"), d),
            cL=_within_prompt_covariance(length, d),
            cR=_within_prompt_covariance(per_token_s0, d),
        )
        .sort("prompt_id")
        .collect(engine="streaming")
    )


SUM_COLUMNS = ("n", "sw", "sw2", "swS1", "swS0", "swL", "swD", "sS0", "sL", "cS", "cL", "cR")


def estimates_from_totals(
    totals: dict[str, np.ndarray],
    num_prompts: int | np.ndarray,
    unit: Unit,
    length_normalize_deltah1: bool,
) -> dict[str, np.ndarray]:
    """Every estimate (nats) from summed ``prompt_sums`` columns; vectorised over replicates.

    ``totals[c]`` is the sum over (possibly resampled) prompts of column c; covariance
    columns are averaged over ``num_prompts``.
    """
    t = totals
    kl_denominator = t["sw"] if unit == "sequence" else t["swL"]
    if unit == "sequence":
        h0 = -t["sS0"] / t["n"]
        h1 = -t["swS1"] / t["sw"]
        reweighting = t["swS0"] / t["sw"] - t["sS0"] / t["n"]
    else:
        h0 = -t["sS0"] / t["sL"]
        h1 = -t["swS1"] / t["swL"]
        reweighting = t["swS0"] / t["swL"] - t["sS0"] / t["sL"]
    kl = t["swD"] / kl_denominator
    if length_normalize_deltah1:
        delta_h1 = -t["cR"] / num_prompts
    elif unit == "sequence":
        delta_h1 = -t["cS"] / num_prompts
    else:
        h0_per_token = -t["sS0"] / t["sL"]
        delta_h1 = -(t["cS"] + h0_per_token * t["cL"]) / t["sL"] * t["n"] / num_prompts
    identity = -reweighting - kl
    return {
        "H0": h0,
        "H1": h1,
        "delta_H": h1 - h0,
        "kl": kl,
        "delta_H1": delta_h1,
        "identity_delta_H": identity,
        "identity_discrepancy": identity - (h1 - h0),
        "ess": t["sw"] ** 2 / t["sw2"],
    }


def totals_of(sums: pl.DataFrame) -> dict[str, np.ndarray]:
    """Column sums of ``prompt_sums`` (float64 scalars as 0-d arrays)."""
    return {c: np.asarray(sums[c].sum(), dtype=np.float64) for c in SUM_COLUMNS}


def entropy_estimates(
    paired: pl.LazyFrame | pl.DataFrame,
    unit: Unit,
    length_normalize_deltah1: bool = False,
    sums: pl.DataFrame | None = None,
) -> dict[str, float]:
    """Point estimates (nats and bits), ESS and the log-weight range of one candidate.

    Per-token NLLs are reported in any unit: -sum S0 / sum L under p0 and
    -sum w S1 / sum w L under p1 (the per-token entropies). ``sums`` is
    ``prompt_sums(paired)`` when the caller already has it.
    """
    if sums is None:
        sums = prompt_sums(paired)
    totals = totals_of(sums)
    estimates = estimates_from_totals(totals, sums.height, unit, length_normalize_deltah1)
    per_token = estimates_from_totals(totals, sums.height, "per_token", length_normalize_deltah1)
    log_w = (
        paired.lazy()
        .select(
            log_weight_min=pl.col("log_w_raw").min(),
            log_weight_median=pl.col("log_w_raw").median(),
            log_weight_max=pl.col("log_w_raw").max(),
        )
        .collect()
        .row(0, named=True)
    )
    row: dict[str, float] = {f"{k}_nats": float(v) for k, v in estimates.items() if k != "ess"}
    row["per_token_nll_p0_nats"] = float(per_token["H0"])
    row["per_token_nll_p1_nats"] = float(per_token["H1"])
    for name in (*ESTIMATES, "per_token_nll_p0", "per_token_nll_p1"):
        row[f"{name}_bits"] = row[f"{name}_nats"] / NATS_PER_BIT
    row["ess"] = float(estimates["ess"])
    row["num_sequences"] = int(totals["n"])
    row["ess_fraction"] = row["ess"] / row["num_sequences"]
    row.update(log_w)
    return row
