"""Standard errors and intervals for two estimands: the prompt set, or a prompt population.

``uncertainty.estimand``:

* ``prompt_set`` (default): the value for *this* set of prompts; only the sampling of
  completions is random. Each estimate is linearised, theta_hat - theta ~ sum_i psi_i / N,
  and its variance estimated from within-stratum deviations,

      V = N^-2 sum_s G_s / (G_s - 1) sum_{i in s} (psi_i - mean_s psi)^2,

  a stratum s being one prompt's G_s sequences from one sampling model (with the
  reference alone sampling, one prompt). Intervals are Wald: theta_hat +- z SE.
  The influence values psi come from the registry's formula by forward-mode
  linearisation (``Linearised``): a mean m[a] has psi_i = a_i (up to a constant that
  the deviations remove), and psi(f / g) = (psi_f - (f/g) psi_g) / g, etc. For the
  ratio estimators this gives psi = w0 (-S0 - H0) / m[w0] for H0 (sequence),
  w1 (-S1 - H1) / m[w1] for H1, w1 (d - KL) / m[w1] for KL, w0 (-S0 - H0 L) / m[w0 L]
  for per-token H0 and w1 (-S1 - H1 L) / m[w1 L] for per-token H1; with the reference
  alone sampling (w0 = 1) that is psi = -S0 for H0 and (-S0 - H0 L) / m[L] per token.
  A covariance atom (in dH1) has as psi its within-prompt delete-one jackknife values
  -(n_q - 1) Cov_q,(-i), so that for dH1 = -mean_q Cov_q the variance is exactly the
  sum over prompts of each covariance's jackknife variance. (A naive
  bootstrap within prompts would be low by sqrt((G-1)/G) and would shift dH1.)
  The variance needs G_s >= 2 (>= 3 for a covariance's jackknife); otherwise it is
  NaN, reported as null, and ``interval_warnings`` says why.

* ``population``: the value for the population the prompts were drawn from; prompts
  are the independent units. A cluster bootstrap over prompts: a replicate draws Q
  prompts with replacement and re-applies the formulas to the resampled per-prompt
  sums (one matrix product per batch of replicates). The weights are the full-sample
  ones in every replicate. SE = standard deviation of the replicates; percentile
  intervals. Meaningless with one prompt, unreliable with few (warned below 20).

Public API: ``Linearised``, ``stratum_dispersion``, ``prompt_set_errors``,
``per_prompt_errors``, ``wald_intervals``, ``cluster_bootstrap``, ``interval_warnings``.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from pipeline.stats.estimators import (
    PromptSums,
    Sequences,
    atom_values,
    covariance,
    estimates_from_means,
)
from pipeline.stats.registry import ATOMS, ESTIMATES, Estimate, Unit, atoms_needed

Estimand = Literal["prompt_set", "population"]
# Bound on the replicate-by-prompt count matrix held at once (float64 entries).
_MAX_MATRIX_ENTRIES = 20_000_000
# Fewer prompts than this make a population interval unreliable (warned).
MIN_POPULATION_PROMPTS = 20
INTERVAL_ESTIMATES = tuple(e for e in ESTIMATES if e.interval)


def _gradient(a: dict[str, Any], ca: Any, b: dict[str, Any], cb: Any) -> dict[str, Any]:
    return {k: ca * a.get(k, 0.0) + cb * b.get(k, 0.0) for k in a.keys() | b.keys()}


class Linearised:
    """A value and its gradient with respect to the atom means (forward mode).

    Arithmetic with floats, arrays (one value per prompt) or other ``Linearised``
    follows the chain rule, so a registry formula evaluated on linearised means
    returns its influence coefficients: psi_i = sum_a gradient[a] * a_i.
    """

    __slots__ = ("gradient", "value")

    def __init__(self, value: Any, gradient: dict[str, Any]) -> None:
        self.value = value
        self.gradient = gradient

    @staticmethod
    def _lift(other: Any) -> Linearised:
        return other if isinstance(other, Linearised) else Linearised(other, {})

    def __add__(self, other: Any) -> Linearised:
        o = self._lift(other)
        return Linearised(self.value + o.value, _gradient(self.gradient, 1.0, o.gradient, 1.0))

    __radd__ = __add__

    def __sub__(self, other: Any) -> Linearised:
        o = self._lift(other)
        return Linearised(self.value - o.value, _gradient(self.gradient, 1.0, o.gradient, -1.0))

    def __rsub__(self, other: Any) -> Linearised:
        return self._lift(other) - self

    def __neg__(self) -> Linearised:
        return Linearised(-self.value, {k: -g for k, g in self.gradient.items()})

    def __mul__(self, other: Any) -> Linearised:
        o = self._lift(other)
        return Linearised(
            self.value * o.value, _gradient(self.gradient, o.value, o.gradient, self.value)
        )

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Linearised:
        o = self._lift(other)
        ratio = self.value / o.value
        return Linearised(
            ratio, _gradient(self.gradient, 1.0 / o.value, o.gradient, -ratio / o.value)
        )

    def __rtruediv__(self, other: Any) -> Linearised:
        return self._lift(other) / self


def linearise(means: Mapping[str, Any]) -> dict[str, Linearised]:
    """Means as ``Linearised`` seeds: d m[a] / d m[a] = 1."""
    return {name: Linearised(value, {name: 1.0}) for name, value in means.items()}


def stratum_dispersion(seqs: Sequences, psi: np.ndarray) -> np.ndarray:
    """G_s / (G_s - 1) sum_{i in s} (psi_i - mean_s psi)^2 for every stratum s.

    Empty strata (a sampling model with no sequence for a prompt) give 0; a stratum of
    one sequence gives NaN (its variance cannot be estimated).
    """
    size = seqs.stratum_size
    occupied = size > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(seqs.stratum, weights=psi, minlength=len(size)) / size
        squares = np.bincount(
            seqs.stratum, weights=(psi - mean[seqs.stratum]) ** 2, minlength=len(size)
        )
        factor = size / (size - 1.0)
        return np.where(occupied, factor * squares, 0.0)


def influence_values(seqs: Sequences, gradient: Mapping[str, Any], run_shift: bool) -> np.ndarray:
    """psi_i = sum_a gradient[a] a_i, up to a constant per stratum.

    ``gradient`` values are floats (run estimates, ``run_shift`` true: the atoms carry
    the run's common weight shift) or arrays over prompts (per-prompt estimates, each
    prompt's own shift). A covariance atom's values are its jackknife values.
    """
    psi = np.zeros(seqs.num_sequences)
    for name, coefficient in gradient.items():
        atom = ATOMS[name]
        if atom.covariance:
            values: np.ndarray | float = covariance(seqs, atom).pseudo
        else:
            values = atom_values(seqs, atom, run_shift)
        if np.ndim(coefficient):
            psi += coefficient[seqs.prompt] * values
        else:
            psi += coefficient * values
    return psi


def prompt_set_errors(
    seqs: Sequences,
    sums: PromptSums,
    unit: Unit,
    estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
) -> dict[str, float]:
    """Standard error (nats) of each run estimate for the fixed prompt set."""
    linear = estimates_from_means(linearise(sums.run_means()), unit, estimates)
    errors = {}
    for name, lin in linear.items():
        psi = influence_values(seqs, lin.gradient, run_shift=True)
        variance = stratum_dispersion(seqs, psi).sum() / seqs.num_sequences**2
        errors[name] = float(np.sqrt(variance))
    return errors


def per_prompt_errors(
    seqs: Sequences, sums: PromptSums, unit: Unit, estimates: tuple[Estimate, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each estimate within each prompt, and its standard error: name -> (values, SEs).

    The same linearisation with one prompt's own means: V_q = n_q^-2 sum over the
    prompt's strata of the dispersion.
    """
    linear = estimates_from_means(linearise(sums.prompt_means()), unit, estimates)
    result = {}
    for name, lin in linear.items():
        psi = influence_values(seqs, lin.gradient, run_shift=False)
        dispersion = stratum_dispersion(seqs, psi)
        prompt_of_stratum = np.arange(len(dispersion)) // seqs.num_models
        variance = np.bincount(prompt_of_stratum, weights=dispersion, minlength=seqs.num_prompts)
        result[name] = (
            np.asarray(lin.value, dtype=np.float64),
            np.sqrt(variance) / seqs.prompt_size,
        )
    return result


def wald_intervals(
    values: Mapping[str, float], errors: Mapping[str, float], level: float
) -> dict[str, dict[str, float]]:
    """Wald intervals: estimate +- z SE, z the standard normal quantile at (1 + level) / 2."""
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    return {
        name: {"se": se, "low": values[name] - z * se, "high": values[name] + z * se}
        for name, se in errors.items()
    }


def cluster_bootstrap(
    sums: PromptSums,
    unit: Unit,
    replicates: int,
    seed: int,
    level: float,
    estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
) -> dict[str, dict[str, float]]:
    """Bootstrap SE and percentile interval of each estimate (nats), over prompts.

    The result maps an estimate's name to ``{"se", "low", "high"}``; NaN where a
    replicate's value is undefined.
    """
    names = atoms_needed(estimates)
    columns = [sums.column(name) for name in names]
    matrix = sums.run_matrix()[:, columns]
    count_column = names.index("n")
    num_prompts = matrix.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_MATRIX_ENTRIES // num_prompts)
    draws: dict[str, list[np.ndarray]] = {e.name: [] for e in estimates}
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        # How often each prompt is drawn in each replicate: Q index draws per replicate.
        drawn = rng.integers(0, num_prompts, size=(size, num_prompts))
        drawn += np.arange(size)[:, None] * num_prompts
        counts = np.bincount(drawn.ravel(), minlength=size * num_prompts)
        totals = counts.reshape(size, num_prompts).astype(np.float64) @ matrix
        means = {name: totals[:, j] / totals[:, count_column] for j, name in enumerate(names)}
        for name, values in estimates_from_means(means, unit, estimates).items():
            draws[name].append(values)
    tail = (1.0 - level) / 2.0 * 100.0
    result = {}
    for name, chunks in draws.items():
        values = np.concatenate(chunks)
        if np.all(np.isfinite(values)):
            low, high = np.percentile(values, [tail, 100.0 - tail])
            se = float(np.std(values, ddof=1))
        else:
            low = high = se = float("nan")
        result[name] = {"se": se, "low": float(low), "high": float(high)}
    return result


def interval_warnings(seqs: Sequences, estimand: Estimand) -> list[str]:
    """Why some standard errors cannot be estimated or trusted, in plain words."""
    warnings = []
    if estimand == "population":
        if seqs.num_prompts < 2:
            warnings.append(
                "uncertainty.estimand=population resamples prompts, and this run has "
                f"{seqs.num_prompts}: no standard error can be estimated (null). Use "
                "uncertainty.estimand=prompt_set, or run more prompts."
            )
        elif seqs.num_prompts < MIN_POPULATION_PROMPTS:
            warnings.append(
                f"only {seqs.num_prompts} prompts: a bootstrap over so few prompts gives "
                "unreliable population intervals. Use uncertainty.estimand=prompt_set "
                f"for this prompt set, or run at least {MIN_POPULATION_PROMPTS} prompts."
            )
        return warnings
    occupied = seqs.stratum_size[seqs.stratum_size > 0]
    if len(occupied) and occupied.min() < 2:
        warnings.append(
            "some prompt has a single completion (per sampling model): the prompt-set "
            "standard errors come from the spread within prompts and cannot be "
            "estimated (null). Sample sampling.num_samples >= 2."
        )
    elif len(occupied) and seqs.prompt_size.min() < 3:
        warnings.append(
            "the standard errors of the first-order terms (delta_H1, delta_H1_rate) come "
            "from a delete-one jackknife of within-prompt covariances, which needs at "
            "least 3 completions per prompt (null here). Sample sampling.num_samples >= 3."
        )
    return warnings
