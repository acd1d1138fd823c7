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

Shard by shard: a first pass (``LogWeightScan``) keeps the extremes and the largest
log-weights, from which ``fit_stabiliser`` fits the mode (the Pareto tail needs only
its K + 1 largest draws); a second pass applies it and adds up the diagnostics
(``WeightTotals``). The in-memory forms (``stabilise_log_weights``,
``weight_diagnostics``) run the same code on one shard.

Public API: ``LogWeightScan``, ``fit_stabiliser``, ``Stabiliser``, ``WeightTotals``,
``stabilise_log_weights``, ``pareto_k_threshold``, ``psis_tail_size``,
``effective_sample_size``, ``prompt_effective_sample_sizes``, ``weight_diagnostics``,
``weight_warnings``, ``PROMPT_ESS_QUANTILES``, ``LOG_WEIGHT_QUANTILES``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def psis_tail_size(num_draws: int) -> int:
    """Draws in the Pareto tail: floor(3 sqrt(N)) above 225 draws, else floor(N / 5).

    The rule of Vehtari et al. (relative efficiency 1), as arviz-stats applies it.
    """
    return math.floor(3.0 * math.sqrt(num_draws)) if num_draws > 225 else num_draws // 5


class LogWeightScan:
    """The first pass over a run's raw log-weights, fed shard by shard in run order.

    Keeps the count, extremes, log sum exp and the K + 1 largest log-weights with their
    positions in the run (K = ``psis_tail_size(num_draws)``): all that clipping and the
    Pareto fit need, in memory that does not grow with the run. Ties are ranked by
    position (a later sequence ranks higher), so which of two equal log-weights gets
    which smoothed value is fixed by the run's order.
    """

    def __init__(self, num_draws: int) -> None:
        self.num_draws = num_draws
        self.keep = psis_tail_size(num_draws) + 1 if num_draws >= PSIS_MIN_DRAWS else 0
        self.count = 0
        self.max, self.min, self.log_sum = -math.inf, math.inf, -math.inf
        self.top = np.empty(0)
        self.top_position = np.empty(0, dtype=np.int64)

    def add(self, log_w: np.ndarray) -> None:
        """Add the next shard's raw log-weights."""
        positions = np.arange(self.count, self.count + len(log_w))
        self.count += len(log_w)
        if not len(log_w):
            return
        largest = float(log_w.max())
        self.max, self.min = max(self.max, largest), min(self.min, float(log_w.min()))
        shard_log_sum = largest + math.log(float(np.exp(log_w - largest).sum()))
        self.log_sum = float(np.logaddexp(self.log_sum, shard_log_sum))
        if not self.keep:
            return
        if len(self.top) == self.keep:
            entering = log_w >= self.top[0]
            log_w, positions = log_w[entering], positions[entering]
        values = np.concatenate([self.top, log_w])
        where = np.concatenate([self.top_position, positions])
        order = np.lexsort((where, values))[-self.keep :]
        self.top, self.top_position = values[order], where[order]


def _pareto_tail(scan: LogWeightScan) -> tuple[np.ndarray, float] | str:
    """The smoothed tail (log-weights of ``scan.top[1:]``, same scale) and k-hat, or why not.

    arviz-stats' PSIS (Vehtari et al. 2024) on the K + 1 largest log-weights: its tail
    step reads nothing else, so the result is what ``array_stats.psislw`` gives for
    the whole run (``tests/test_weights.py`` checks this).
    """
    if scan.num_draws < PSIS_MIN_DRAWS:
        return (
            f"a Pareto tail needs at least {PSIS_MIN_DRAWS} pooled sequences, and "
            f"there are {scan.num_draws}"
        )
    if scan.max == scan.min:
        return "all log-weights are equal (no tail)"
    from arviz_stats.base import array_stats

    tied = "the largest log-weights are tied, e.g. one short completion sampled many times"
    try:
        # A tail with values tied at its cutoff divides by zero inside the fit; the
        # result is checked below instead of letting NumPy warn.
        with np.errstate(all="ignore"):
            smoothed, k_hat = array_stats._ps_tail(
                scan.top.copy(),
                scan.keep,
                scan.keep - 1,
                smooth_draws=True,
                tail="right",
                log_weights=True,
            )
    except ValueError as err:
        # Raised for a tail of identical values ("All tail values are the same").
        return f"{tied} (arviz-stats: {err})"
    smoothed = np.asarray(smoothed, dtype=np.float64)
    if not (np.isfinite(k_hat) and np.all(np.isfinite(smoothed))):
        return f"{tied} (the Pareto fit gave no finite tail)"
    # arviz-stats shifts by the maximum and normalises over the values it was given;
    # the cutoff (first value) is not smoothed, so it gives the shift back. Sorted, so
    # that tied raw values take the smoothed values in the scan's order.
    return np.sort(smoothed[1:]) + (scan.top[0] - smoothed[0]), float(k_hat)


@dataclass(frozen=True)
class Stabiliser:
    """Maps raw log-weights, by their positions in the run, to stabilised ones.

    ``mode`` is the mode applied (``none`` after a failed Pareto fit). Clipping returns
    min(log w - max, ceiling); PSIS replaces the tail's log-weights, found by their
    positions (``tail_position``, in increasing order, with ``tail_log_w`` beside them).
    """

    mode: WeightMode
    max: float
    ceiling: float = math.inf
    tail_position: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    tail_log_w: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def stabilised_max(self) -> float:
        """The largest stabilised log-weight of the run."""
        if self.mode == "clip":
            return min(0.0, self.ceiling)
        if self.mode == "psis":
            return float(self.tail_log_w.max())
        return self.max

    def apply(self, log_w: np.ndarray, first_position: int = 0) -> np.ndarray:
        """Stabilised log-weights of a shard whose first sequence is ``first_position``."""
        if self.mode == "clip":
            return np.minimum(log_w - self.max, self.ceiling)
        if self.mode == "none":
            return log_w
        positions = self.tail_position
        low, high = np.searchsorted(positions, [first_position, first_position + len(log_w)])
        out = log_w.copy()
        out[positions[low:high] - first_position] = self.tail_log_w[low:high]
        return out

    def count_clipped(self, log_w: np.ndarray) -> int:
        """How many of a shard's log-weights clipping lowers."""
        return int((log_w - self.max > self.ceiling).sum()) if self.mode == "clip" else 0


def fit_stabiliser(
    scan: LogWeightScan, mode: WeightMode, clip_threshold: float | None = None
) -> tuple[Stabiliser, dict[str, Any], list[str]]:
    """The stabilisation of ``mode`` for a scanned run, its diagnostics and warnings.

    k-hat of the raw weights in every mode. ``diagnostics`` holds ``weights_mode`` (the
    mode applied), ``pareto_k`` (null with ``pareto_k_note`` when no tail fits),
    ``pareto_k_threshold``, ``pareto_k_exceeded``, and for clip ``clip_threshold`` and
    ``fraction_clipped`` (null here: the caller counts it while applying).
    """
    num_draws = scan.num_draws
    fit = _pareto_tail(scan)
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
        # log of the mean of exp(log w - max), plus log tau.
        ceiling = scan.log_sum - scan.max - math.log(num_draws) + math.log(tau)
        diagnostics["clip_threshold"] = tau
        return Stabiliser("clip", scan.max, ceiling), diagnostics, warnings
    if mode == "psis":
        if isinstance(fit, str):
            diagnostics["weights_mode"] = "none"
            warnings.append(
                f"weights.mode=psis could not fit a Pareto tail: {fit}. The raw weights "
                "were used; weights.mode=clip bounds them instead."
            )
            return Stabiliser("none", scan.max), diagnostics, warnings
        # Sorted by position once, so that each shard finds its tail by bisection.
        order = np.argsort(scan.top_position[1:])
        tail = Stabiliser(
            "psis", scan.max, tail_position=scan.top_position[1:][order], tail_log_w=fit[0][order]
        )
        return tail, diagnostics, warnings
    return Stabiliser("none", scan.max), diagnostics, warnings


@dataclass(frozen=True)
class StabilisedWeights:
    """The log-weights to average with, the mode's diagnostics, and warnings."""

    log_w: np.ndarray
    diagnostics: dict[str, Any]
    warnings: list[str]


def stabilise_log_weights(
    log_w: np.ndarray, mode: WeightMode, clip_threshold: float | None = None
) -> StabilisedWeights:
    """Stabilise the raw log-weights of a whole run held in memory (``fit_stabiliser``).

    The result may differ from the input by a constant (estimators self-normalise).
    """
    scan = LogWeightScan(len(log_w))
    scan.add(log_w)
    stabiliser, diagnostics, warnings = fit_stabiliser(scan, mode, clip_threshold)
    if stabiliser.mode == "clip":
        diagnostics["fraction_clipped"] = stabiliser.count_clipped(log_w) / len(log_w)
    return StabilisedWeights(stabiliser.apply(log_w), diagnostics, warnings)


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


class WeightTotals:
    """The sums behind the weight diagnostics, added shard by shard.

    ``raw_max`` and ``stabilised_max`` are the run's largest raw and stabilised
    log-weights, the common shifts of the sums (so no weight overflows).
    """

    def __init__(self, raw_max: float, stabilised_max: float) -> None:
        self.raw_max, self.stabilised_max = raw_max, stabilised_max
        self.num_sequences = 0
        self.raw = np.zeros(2)  # sum w, sum w^2 of the raw weights
        self.stabilised = np.zeros(2)
        self.raw_dispersion = 0.0  # summed stratum dispersion of the raw weights

    def add(self, seqs: Sequences) -> np.ndarray:
        """Add a shard; return its per-prompt ESS (raw weights)."""
        w = np.exp(seqs.log_w1 - self.raw_max)
        s = np.exp(seqs.log_w - self.stabilised_max)
        self.num_sequences += seqs.num_sequences
        self.raw += (w.sum(), (w * w).sum())
        self.stabilised += (s.sum(), (s * s).sum())
        self.raw_dispersion += float(stratum_dispersion(seqs, w).sum())
        return prompt_effective_sample_sizes(seqs, seqs.log_w1)

    def mean_weight_test(self) -> dict[str, float]:
        """The mean raw weight m = mean w1, its prompt-set SE, and z = (m - 1) / SE.

        Computed as c + log of the mean of exp(log w1 - c), c = max log w1, so that
        neither huge nor tiny weights overflow; z is then (mean - exp(-c)) / SE on that
        scale.
        """
        n, shift = self.num_sequences, self.raw_max
        mean = float(self.raw[0] / n)
        se = math.sqrt(self.raw_dispersion) / n
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scale = np.exp(shift)
            return {
                "mean_weight": float(mean * scale),
                "mean_weight_se": float(se * scale),
                "mean_weight_z": float((mean - np.exp(-shift)) / np.float64(se)),
            }

    def diagnostics(
        self, prompt_ess: Sequence[float], log_weight: Sequence[float]
    ) -> dict[str, Any]:
        """ESS (raw and stabilised), per-prompt ESS, mean-weight test, log-weight range.

        ``prompt_ess``: the minimum, 5% quantile and median of the per-prompt ESS;
        ``log_weight``: the minimum, median and maximum raw log-weight.
        """
        n = self.num_sequences
        ess = float(self.raw[0] ** 2 / self.raw[1])
        stabilised = float(self.stabilised[0] ** 2 / self.stabilised[1])
        return {
            "ess": ess,
            "ess_fraction": ess / n,
            "ess_stabilised": stabilised,
            "ess_stabilised_fraction": stabilised / n,
            "prompt_ess_min": float(prompt_ess[0]),
            "prompt_ess_p05": float(prompt_ess[1]),
            "prompt_ess_median": float(prompt_ess[2]),
            **self.mean_weight_test(),
            "log_weight_min": float(log_weight[0]),
            "log_weight_median": float(log_weight[1]),
            "log_weight_max": float(log_weight[2]),
        }


# The quantiles the diagnostics report: per-prompt ESS (min, 5%, median) and raw
# log-weights (min, median, max).
PROMPT_ESS_QUANTILES = (0.0, 0.05, 0.5)
LOG_WEIGHT_QUANTILES = (0.0, 0.5, 1.0)


def weight_diagnostics(seqs: Sequences) -> dict[str, Any]:
    """``WeightTotals.diagnostics`` of a whole run held in memory."""
    totals = WeightTotals(float(seqs.log_w1.max()), float(seqs.log_w.max()))
    prompt_ess = totals.add(seqs)
    return totals.diagnostics(
        np.quantile(prompt_ess, PROMPT_ESS_QUANTILES),
        np.quantile(seqs.log_w1, LOG_WEIGHT_QUANTILES),
    )


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
