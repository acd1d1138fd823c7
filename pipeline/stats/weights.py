"""Importance-weight stabilisation: none, truncation (clipping) or Pareto smoothing.

Input: the pooled raw log-weights log w_i = S1_i - S0_i (nats) of every sequence of the
run. Output: the log-weights the estimators average with, and diagnostics.

* ``none``: the raw weights.
* ``clip``: truncated importance sampling (Ionides, JCGS 2008): w_i <- min(w_i, tau *
  mean w) with tau = ``clip_threshold`` (default sqrt(N)); reports the fraction clipped.
* ``psis``: Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao, Gabry,
  JMLR 2024), using arviz-stats' implementation: the largest weights are replaced by
  quantiles of a generalised Pareto fit to the tail. Its shape estimate k-hat says
  how heavy the tail is; estimates are reliable only for k-hat below
  min(1 - 1/log10 N, 0.7).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from pipeline.errors import PipelineError

WeightMode = Literal["none", "clip", "psis"]
# Below this many pooled draws the Pareto tail fit has too few points to mean anything.
PSIS_MIN_DRAWS = 30


def pareto_k_threshold(num_draws: int) -> float:
    """Sample-size-dependent reliability threshold min(1 - 1/log10 N, 0.7)."""
    return min(1.0 - 1.0 / math.log10(num_draws), 0.7)


def stabilise_log_weights(
    log_w: np.ndarray, mode: WeightMode, clip_threshold: float | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the log-weights to average with, and the diagnostics of ``mode``.

    The result may differ from the input by a constant (estimators self-normalise).
    """
    num_draws = len(log_w)
    if mode == "none":
        return log_w, {"weights_mode": "none"}
    if mode == "clip":
        tau = math.sqrt(num_draws) if clip_threshold is None else clip_threshold
        shifted = log_w - log_w.max()
        log_mean = np.log(np.mean(np.exp(shifted)))
        ceiling = log_mean + math.log(tau)
        clipped = shifted > ceiling
        return np.minimum(shifted, ceiling), {
            "weights_mode": "clip",
            "clip_threshold": tau,
            "fraction_clipped": float(clipped.mean()),
        }
    if num_draws < PSIS_MIN_DRAWS:
        raise PipelineError(
            f"weights.mode=psis needs at least {PSIS_MIN_DRAWS} pooled sequences to fit "
            f"the Pareto tail; this run has {num_draws}. Sample more, or use "
            "weights.mode=clip."
        )
    from arviz_stats.base import array_stats

    # arviz-stats smooths importance ratios 1/p(y|theta) of leave-one-out CV: it takes
    # log-likelihoods and negates them. Our log-weights go in negated so that they come
    # out as they are (tests/test_weights.py pins this convention).
    smoothed, k_hat = array_stats.psislw(-log_w)
    threshold = pareto_k_threshold(num_draws)
    return np.asarray(smoothed, dtype=np.float64), {
        "weights_mode": "psis",
        "pareto_k": float(k_hat),
        "pareto_k_threshold": threshold,
        "pareto_k_exceeded": bool(k_hat > threshold),
    }
