"""Entropy estimators as pure Polars expressions over one row per sampled sequence.

Nothing here knows about models or files. The input frame (see ``PAIRED_COLUMNS``)
holds, for every sequence x_i sampled from p0:

* ``log_w``  = S1_i - S0_i over the full sequence (EOS included): log p1(x_i)/p0(x_i);
* ``S0``, ``S1``: the entropy integrands, sums of teacher-forced log-probs (nats) over
  the counted tokens (the final EOS dropped when ``include_eos`` is false);
* ``L``: the number of counted tokens.

With self-normalised weights w_i = exp(log_w_i - max_j log_w_j) (computed in float64;
the shift cancels in every ratio below), DESIGN.md §2:

=============  =====================  ==========================
quantity       unit "sequence"        unit "per_token"
=============  =====================  ==========================
H(p0)          -mean_i S0_i           -sum S0_i / sum L_i
H(p1), SNIS    -sum w S1 / sum w      -sum w S1 / sum w L
=============  =====================  ==========================

Units: nats per sequence or nats per token; bits = nats / ln 2.
"""

from __future__ import annotations

import math
from typing import Literal

import polars as pl

Unit = Literal["sequence", "per_token"]
PAIRED_COLUMNS = ("log_w", "S0", "S1", "L")
NATS_PER_BIT = math.log(2.0)


def importance_weights() -> pl.Expr:
    """w_i = exp(log_w_i - max log_w): self-normalised weights, largest exactly 1."""
    log_w = pl.col("log_w")
    return (log_w - log_w.max()).exp()


def entropy_p0(unit: Unit) -> pl.Expr:
    """H(p0): -sum S0 / N (nats/sequence) or -sum S0 / sum L (nats/token).

    Written as a sum over a count, like the SNIS ratio with all weights 1, so that
    scoring p0 as the candidate gives delta H = 0 exactly.
    """
    denominator = pl.len() if unit == "sequence" else pl.col("L").sum()
    return -pl.col("S0").sum() / denominator


def entropy_p1_snis(unit: Unit) -> pl.Expr:
    """H(p1) by SNIS: -sum w S1 / sum w (nats/sequence) or -sum w S1 / sum w L (nats/token)."""
    w = importance_weights()
    denominator = w.sum() if unit == "sequence" else (w * pl.col("L")).sum()
    return -(w * pl.col("S1")).sum() / denominator


def effective_sample_size() -> pl.Expr:
    """Kish ESS = (sum w)^2 / sum w^2, between 1 and N."""
    w = importance_weights()
    return w.sum() ** 2 / (w**2).sum()


def entropy_estimates(paired: pl.LazyFrame | pl.DataFrame, unit: Unit) -> dict[str, float]:
    """H0, H1, delta H (nats and bits), ESS and log-weight summary of one candidate.

    Per-token NLLs are reported in any unit: -sum S0 / sum L under p0 and
    -sum w S1 / sum w L under p1 (the per-token entropies).
    """
    row = (
        paired.lazy()
        .select(
            H0_nats=entropy_p0(unit),
            H1_nats=entropy_p1_snis(unit),
            per_token_nll_p0_nats=entropy_p0("per_token"),
            per_token_nll_p1_nats=entropy_p1_snis("per_token"),
            ess=effective_sample_size(),
            num_sequences=pl.len(),
            log_weight_min=pl.col("log_w").min(),
            log_weight_median=pl.col("log_w").median(),
            log_weight_max=pl.col("log_w").max(),
        )
        .collect()
        .row(0, named=True)
    )
    row["delta_H_nats"] = row["H1_nats"] - row["H0_nats"]
    row["ess_fraction"] = row["ess"] / row["num_sequences"]
    for name in ("H0", "H1", "delta_H", "per_token_nll_p0", "per_token_nll_p1"):
        row[f"{name}_bits"] = row[f"{name}_nats"] / NATS_PER_BIT
    return row
