"""Importance weights: stabilisation (none, clip, PSIS) and the diagnostics that judge them.

Input: the candidate's raw log-weights log w1_i = log p1(x_i)/q(x_i) of every sequence
of the run (with the reference alone sampling, d_i = S1_i - S0_i, EOS included).

Stabilisation (``weights.mode``), applied to w1 only:

* ``none``: the raw weights.
* ``clip``: truncated importance sampling (Ionides, JCGS 2008): w <- min(w, tau mean w)
  with tau = ``clip_threshold`` (default sqrt(N)); reports the fraction clipped.
* ``psis``: Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao, Gabry,
  JMLR 2024), arviz-stats' implementation: the largest weights are replaced by
  quantiles of a generalised Pareto fit to the tail. When no tail can be fitted (fewer
  than ``PSIS_MIN_DRAWS`` draws, or the largest log-weights tied, e.g. one short
  completion sampled many times) the raw weights are used, with a warning.

Diagnostics (always, from the raw weights, so that clipping or smoothing cannot hide a
collapse): Kish ESS = (sum w)^2 / sum w^2 and ESS/N, beside the ESS of the stabilised
weights; per-prompt ESS (minimum, 5th percentile, median); the Pareto shape k-hat,
reliable below min(1 - 1/log10 N, 0.7); the log-weight range; and the mean-weight
test. E_q[w1] = 1 whenever the sampling models cover p1, so m = mean_i w1_i with its
prompt-set standard error (``uncertainty.stratum_dispersion`` of w1) must not sit far
below 1: m more than 3 SE below 1 means p1 puts mass where the sampling models
rarely go, a bias that ESS and k-hat cannot see (they only see the draws that exist).
The cure is to sample from p1 too (``sampling.models``).

Public API: ``stabilise_log_weights``, ``pareto_k_threshold``, ``effective_sample_size``,
``weight_diagnostics``, ``weight_warnings``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.stats.estimators import Sequences
from pipeline.stats.uncertainty import stratum_dispersion

WeightMode = Literal["none", "clip", "psis"]
# Below this many pooled draws the Pareto tail fit has too few points to mean anything.
PSIS_MIN_DRAWS = 30
# The mean-weight test warns when m is this many standard errors below 1.
MEAN_WEIGHT_Z = 3.0


def pareto_k_threshold(num_draws: int) -> float:
    """Sample-size-dependent reliability threshold min(1 - 1/log10 N, 0.7)."""
    return min(1.0 - 1.0 / math.log10(num_draws), 0.7)


def pareto_smooth(log_w: np.ndarray) -> tuple[np.ndarray, float] | str:
    """PSIS-smoothed log-weights and k-hat, or the reason no Pareto tail fits."""
    if len(log_w) < PSIS_MIN_DRAWS:
        return (
            f"a Pareto tail needs at least {PSIS_MIN_DRAWS} pooled sequences, and "
            f"there are {len(log_w)}"
        )
    if np.ptp(log_w) == 0.0:
        return "all log-weights are equal (no tail)"
    from arviz_stats.base import array_stats

    tied = "the largest log-weights are tied, e.g. one short completion sampled many times"
    try:
        # arviz-stats smooths importance ratios 1/p(y|theta) of leave-one-out CV: it
        # takes log-likelihoods and negates them. Our log-weights go in negated so
        # that they come out as they are (tests/test_weights.py pins this convention).
        # A tail with values tied at its cutoff divides by zero inside the fit; the
        # result is checked below instead of letting NumPy warn.
        with np.errstate(all="ignore"):
            smoothed, k_hat = array_stats.psislw(-log_w)
    except ValueError as err:
        # Raised for a tail of identical values ("All tail values are the same").
        return f"{tied} (arviz-stats: {err})"
    smoothed = np.asarray(smoothed, dtype=np.float64)
    if not (np.isfinite(k_hat) and np.all(np.isfinite(smoothed))):
        return f"{tied} (the Pareto fit gave no finite tail)"
    return smoothed, float(k_hat)


@dataclass(frozen=True)
class StabilisedWeights:
    """The log-weights to average with, the mode's diagnostics, and warnings."""

    log_w: np.ndarray
    diagnostics: dict[str, Any]
    warnings: list[str]


def stabilise_log_weights(
    log_w: np.ndarray, mode: WeightMode, clip_threshold: float | None = None
) -> StabilisedWeights:
    """Stabilise raw log-weights by ``mode``; k-hat of the raw weights in every mode.

    The result may differ from the input by a constant (estimators self-normalise).
    ``diagnostics`` holds ``weights_mode`` (the mode applied), ``pareto_k`` (null with
    ``pareto_k_note`` when no tail fits), ``pareto_k_threshold``,
    ``pareto_k_exceeded``, and for clip ``fraction_clipped`` and ``clip_threshold``.
    """
    num_draws = len(log_w)
    fit = pareto_smooth(log_w)
    threshold = pareto_k_threshold(num_draws) if num_draws > 1 else None
    diagnostics: dict[str, Any] = {
        "weights_mode": mode,
        "pareto_k": None,
        "pareto_k_threshold": threshold,
        "pareto_k_exceeded": None,
        "pareto_k_note": None,
        "fraction_clipped": None,
        "clip_threshold": None,
    }
    warnings = []
    if isinstance(fit, str):
        diagnostics["pareto_k_note"] = f"k-hat not computed: {fit}"
    else:
        diagnostics["pareto_k"] = fit[1]
        diagnostics["pareto_k_exceeded"] = bool(threshold is not None and fit[1] > threshold)
    if mode == "clip":
        tau = math.sqrt(num_draws) if clip_threshold is None else clip_threshold
        shifted = log_w - log_w.max()
        ceiling = np.log(np.mean(np.exp(shifted))) + math.log(tau)
        diagnostics["clip_threshold"] = tau
        diagnostics["fraction_clipped"] = float((shifted > ceiling).mean())
        return StabilisedWeights(np.minimum(shifted, ceiling), diagnostics, warnings)
    if mode == "psis":
        if isinstance(fit, str):
            diagnostics["weights_mode"] = "none"
            warnings.append(
                f"weights.mode=psis could not fit a Pareto tail: {fit}. The raw weights "
                "were used; weights.mode=clip bounds them instead."
            )
            return StabilisedWeights(log_w, diagnostics, warnings)
        return StabilisedWeights(fit[0], diagnostics, warnings)
    return StabilisedWeights(log_w, diagnostics, warnings)


def effective_sample_size(log_w: np.ndarray) -> float:
    """Kish ESS (sum w)^2 / sum w^2 of w = exp(log w), shift-invariant."""
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w * w).sum())


def prompt_effective_sample_sizes(seqs: Sequences, log_w: np.ndarray) -> np.ndarray:
    """Kish ESS within each prompt (each prompt's weights shifted by its own maximum)."""
    prompt_max = np.full(seqs.num_prompts, -np.inf)
    np.maximum.at(prompt_max, seqs.prompt, log_w)
    w = np.exp(log_w - prompt_max[seqs.prompt])
    total = np.bincount(seqs.prompt, weights=w, minlength=seqs.num_prompts)
    squares = np.bincount(seqs.prompt, weights=w * w, minlength=seqs.num_prompts)
    return total**2 / squares


def mean_weight_test(seqs: Sequences) -> dict[str, float]:
    """The mean raw weight m = mean w1, its prompt-set SE, and z = (m - 1) / SE.

    Computed as c + log of the mean of exp(log w1 - c), c = max log w1, so that neither
    huge nor tiny weights overflow; z is then (mean - exp(-c)) / SE on that scale.
    """
    shift = float(seqs.log_w1.max())
    w = np.exp(seqs.log_w1 - shift)
    n = seqs.num_sequences
    mean = float(w.mean())
    se = float(np.sqrt(stratum_dispersion(seqs, w).sum()) / n)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = np.exp(shift)
        return {
            "mean_weight": float(mean * scale),
            "mean_weight_se": float(se * scale),
            "mean_weight_z": float((mean - np.exp(-shift)) / np.float64(se)),
        }


def weight_diagnostics(seqs: Sequences) -> dict[str, Any]:
    """ESS (raw and stabilised), per-prompt ESS, mean-weight test, log-weight range."""
    n = seqs.num_sequences
    ess = effective_sample_size(seqs.log_w1)
    stabilised = effective_sample_size(seqs.log_w)
    per_prompt = prompt_effective_sample_sizes(seqs, seqs.log_w1)
    low, p05, median = np.quantile(per_prompt, [0.0, 0.05, 0.5])
    return {
        "ess": ess,
        "ess_fraction": ess / n,
        "ess_stabilised": stabilised,
        "ess_stabilised_fraction": stabilised / n,
        "prompt_ess_min": float(low),
        "prompt_ess_p05": float(p05),
        "prompt_ess_median": float(median),
        **mean_weight_test(seqs),
        "log_weight_min": float(seqs.log_w1.min()),
        "log_weight_median": float(np.median(seqs.log_w1)),
        "log_weight_max": float(seqs.log_w1.max()),
    }


def weight_warnings(
    row: dict[str, Any], min_ess_fraction: float, reference: str, candidate: str
) -> list[str]:
    """Plain-language warnings, each with its remedy, when the weights cannot be trusted."""
    advice = (
        "take fewer update steps between the models, sample more completions, or "
        f"sample from {candidate} too (sampling.models: [{reference}, {candidate}])"
    )
    warnings = []
    if row["ess_fraction"] < min_ess_fraction:
        warnings.append(
            f"ESS fraction {row['ess_fraction']:.3f} is below {min_ess_fraction}: "
            f"H({candidate}) rests on about {row['ess']:.0f} effective samples; {advice}."
        )
    if row["pareto_k_exceeded"]:
        warnings.append(
            f"Pareto k-hat {row['pareto_k']:.2f} exceeds {row['pareto_k_threshold']:.2f}: "
            f"the weights are too heavy-tailed for a reliable estimate; {advice}."
        )
    z = row["mean_weight_z"]
    if z < -MEAN_WEIGHT_Z:
        warnings.append(
            f"mean weight {row['mean_weight']:.4g} +- {row['mean_weight_se']:.2g} is "
            f"{-z:.1f} standard errors below 1, its expectation: {candidate} puts "
            "probability where the sampling models rarely sample, which ESS and k-hat "
            f"cannot see, so H({candidate}), delta H and KL are biased. Sample from "
            f"{candidate} too: sampling.models: [{reference}, {candidate}]."
        )
    return warnings
