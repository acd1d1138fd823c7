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
  NaN, reported as null, and ``interval_warnings`` says why. The gradient is known only
  once the whole run is summed, so V is kept as a quadratic form: the within-stratum
  scatter matrix C of the atoms' influence values (``stratum_scatter``, summed shard by
  shard) gives V = g' C g / N^2 for each estimate's gradient g
  (``prompt_set_standard_errors``).

* ``population``: the value for the population the prompts were drawn from; prompts
  are the independent units. A cluster bootstrap over prompts: a replicate draws Q
  prompts with replacement and re-applies the formulas to the resampled per-prompt
  sums (one matrix product per batch of replicates). The weights are the full-sample
  ones in every replicate. SE = standard deviation of the replicates; percentile
  intervals. Meaningless with one prompt, unreliable with few (warned below 20).
  Shard by shard (``ClusterBootstrap``): a replicate's Q draws are first split over the
  shards (one multinomial over the shards' prompt counts), then spread uniformly over
  each shard's prompts when it is read; conditionally on the split this is the same
  multinomial as Q uniform draws over all prompts, so one shard in memory suffices.

Public API: ``Linearised``, ``stratum_dispersion``, ``stratum_scatter``,
``prompt_set_standard_errors``, ``prompt_set_errors``, ``per_prompt_errors``,
``wald_intervals``, ``ClusterBootstrap``, ``cluster_bootstrap``, ``interval_warnings``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from pipeline.stats.estimators import (
    PromptSums,
    SampleShape,
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
    # Keys in a fixed order (a's, then b's new ones), never a set's: influence values sum
    # the gradient's terms in this order, and a set's order changes with the process's
    # string hash seed, which changed the last digits of the errors from run to run.
    return {k: ca * a.get(k, 0.0) + cb * b.get(k, 0.0) for k in dict.fromkeys([*a, *b])}


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


def _influence_atom(seqs: Sequences, name: str, run_shift: bool) -> np.ndarray | float:
    """An atom's per-sequence influence values: its values, or a covariance's jackknife."""
    atom = ATOMS[name]
    if atom.covariance:
        return covariance(seqs, atom).pseudo
    return atom_values(seqs, atom, run_shift)


def influence_values(seqs: Sequences, gradient: Mapping[str, Any], run_shift: bool) -> np.ndarray:
    """psi_i = sum_a gradient[a] a_i, up to a constant per stratum.

    ``gradient`` values are floats (run estimates, ``run_shift`` true: the atoms carry
    the run's common weight shift) or arrays over prompts (per-prompt estimates, each
    prompt's own shift). A covariance atom's values are its jackknife values.
    """
    psi = np.zeros(seqs.num_sequences)
    for name, coefficient in gradient.items():
        values = _influence_atom(seqs, name, run_shift)
        psi += (coefficient[seqs.prompt] if np.ndim(coefficient) else coefficient) * values
    return psi


def stratum_scatter(seqs: Sequences, names: Sequence[str]) -> np.ndarray:
    """C[a, b] = sum_s G_s / (G_s - 1) sum_{i in s} (a_i - mean_s a)(b_i - mean_s b).

    Over the influence values of the atoms ``names`` (run weight shift). For any
    gradient g, g' C g is the summed ``stratum_dispersion`` of psi = sum_a g_a a, so
    scatter matrices of shards add up to the run's. A stratum of one sequence makes C
    NaN (as its dispersion is).
    """
    values = np.empty((seqs.num_sequences, len(names)))
    for j, name in enumerate(names):
        values[:, j] = _influence_atom(seqs, name, run_shift=True)
    size = seqs.stratum_size.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(len(names)):
            mean = np.bincount(seqs.stratum, weights=values[:, j], minlength=len(size)) / size
            values[:, j] -= mean[seqs.stratum]
        factor = (size / (size - 1.0))[seqs.stratum]
        # einsum, not BLAS: on a busy machine a threaded BLAS call on a matrix this
        # small can wait far longer for its threads than the product takes, per batch.
        return np.einsum("ia,ib->ab", values, values * factor[:, None])


def prompt_set_standard_errors(
    scatter: np.ndarray,
    names: Sequence[str],
    means: Mapping[str, float],
    num_sequences: int,
    unit: Unit,
    estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
) -> dict[str, float]:
    """SE (nats) = sqrt(g' C g) / N of each estimate, g its gradient at the run ``means``.

    ``scatter`` is the run's ``stratum_scatter`` over the atoms ``names``; only the
    rows and columns of the atoms an estimate reads enter its variance, so a NaN
    covariance jackknife (fewer than 3 sequences in a prompt) leaves the others defined.
    """
    linear = estimates_from_means(linearise(means), unit, estimates)
    errors = {}
    for name, lin in linear.items():
        rows = [names.index(atom) for atom in lin.gradient]
        gradient = np.array([lin.gradient[atom] for atom in lin.gradient], dtype=np.float64)
        variance = gradient @ scatter[np.ix_(rows, rows)] @ gradient / num_sequences**2
        errors[name] = float(np.sqrt(variance))
    return errors


def prompt_set_errors(
    seqs: Sequences,
    sums: PromptSums,
    unit: Unit,
    estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
) -> dict[str, float]:
    """Standard error (nats) of each run estimate for the fixed prompt set."""
    names = atoms_needed(estimates)
    scatter = stratum_scatter(seqs, names)
    return prompt_set_standard_errors(
        scatter, names, sums.run_means(), seqs.num_sequences, unit, estimates
    )


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


class ClusterBootstrap:
    """The cluster bootstrap over prompts, fed one shard's per-prompt sums at a time.

    ``shard_prompts`` is the number of prompts of each shard. Replicate totals (B x k)
    are all that is kept between shards.
    """

    def __init__(
        self,
        shard_prompts: Sequence[int],
        unit: Unit,
        replicates: int,
        seed: int,
        estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
    ) -> None:
        self.unit, self.seed, self.estimates = unit, seed, estimates
        self.names = atoms_needed(estimates)
        self.shard_prompts = list(shard_prompts)
        num_prompts = sum(self.shard_prompts)
        # Where each replicate's Q draws fall: how many in each shard.
        shares = np.asarray(self.shard_prompts, dtype=np.float64) / num_prompts
        self._draws = np.random.default_rng(seed).multinomial(num_prompts, shares, size=replicates)
        self._totals = np.zeros((replicates, len(self.names)))

    def add(self, shard: int, sums: PromptSums) -> None:
        """Add shard ``shard``'s per-prompt sums (on the run's common weight shift)."""
        matrix = sums.run_matrix()[:, [sums.column(name) for name in self.names]]
        num_prompts = matrix.shape[0]
        if num_prompts != self.shard_prompts[shard]:
            raise ValueError(
                f"shard {shard} has {num_prompts} prompts, {self.shard_prompts[shard]} expected"
            )
        rng = np.random.default_rng([self.seed, shard])
        uniform = np.full(num_prompts, 1.0 / num_prompts)
        replicates = len(self._totals)
        chunk = max(1, _MAX_MATRIX_ENTRIES // num_prompts)
        for start in range(0, replicates, chunk):
            rows = slice(start, min(start + chunk, replicates))
            # How often each of the shard's prompts is drawn in each replicate.
            counts = rng.multinomial(self._draws[rows, shard], uniform)
            self._totals[rows] += np.einsum("rq,qa->ra", counts.astype(np.float64), matrix)

    def intervals(self, level: float) -> dict[str, dict[str, float]]:
        """SE and percentile interval of each estimate (nats); NaN where undefined."""
        count = self._totals[:, self.names.index("n")]
        means = {name: self._totals[:, j] / count for j, name in enumerate(self.names)}
        tail = (1.0 - level) / 2.0 * 100.0
        result = {}
        for name, values in estimates_from_means(means, self.unit, self.estimates).items():
            if np.all(np.isfinite(values)):
                low, high = np.percentile(values, [tail, 100.0 - tail])
                se = float(np.std(values, ddof=1))
            else:
                low = high = se = float("nan")
            result[name] = {"se": se, "low": float(low), "high": float(high)}
        return result


def cluster_bootstrap(
    sums: PromptSums,
    unit: Unit,
    replicates: int,
    seed: int,
    level: float,
    estimates: tuple[Estimate, ...] = INTERVAL_ESTIMATES,
) -> dict[str, dict[str, float]]:
    """Bootstrap SE and percentile interval of each estimate (nats), in memory.

    Over the prompts of ``sums`` (one shard): ``{"se", "low", "high"}`` per estimate.
    """
    bootstrap = ClusterBootstrap([sums.local.shape[0]], unit, replicates, seed, estimates)
    bootstrap.add(0, sums)
    return bootstrap.intervals(level)


def interval_warnings(shape: SampleShape, estimand: Estimand) -> list[str]:
    """Why some standard errors cannot be estimated or trusted, in plain words."""
    warnings = []
    if estimand == "population":
        if shape.num_prompts < 2:
            warnings.append(
                "uncertainty.estimand=population resamples prompts, and this run has "
                f"{shape.num_prompts}: no standard error can be estimated (null). Use "
                "uncertainty.estimand=prompt_set, or run more prompts."
            )
        elif shape.num_prompts < MIN_POPULATION_PROMPTS:
            warnings.append(
                f"only {shape.num_prompts} prompts: a bootstrap over so few prompts gives "
                "unreliable population intervals. Use uncertainty.estimand=prompt_set "
                f"for this prompt set, or run at least {MIN_POPULATION_PROMPTS} prompts."
            )
        return warnings
    if shape.smallest_stratum and shape.smallest_stratum < 2:
        warnings.append(
            "some prompt has a single completion (per sampling model): the prompt-set "
            "standard errors come from the spread within prompts and cannot be "
            "estimated (null). Sample sampling.num_samples >= 2."
        )
    elif shape.smallest_stratum and shape.smallest_prompt < 3:
        warnings.append(
            "the standard errors of the first-order terms (delta_H1, delta_H1_rate) come "
            "from a delete-one jackknife of within-prompt covariances, which needs at "
            "least 3 completions per prompt (null here). Sample sampling.num_samples >= 3."
        )
    return warnings
