"""Standard errors and intervals by a cluster bootstrap over prompts.

The G completions of one prompt are correlated (they share the prompt), so prompts,
not sequences, are the independent units. A replicate draws P prompts with
replacement from the run's P prompts and recomputes every estimate from the summed
per-prompt statistics (``estimators.prompt_sums``), which makes a replicate one
matrix product instead of a pass over the sequences. The importance weights are the
full-sample ones (normalisation and any clipping or smoothing are not redone per
replicate), a standard simplification for self-normalised estimators.

Reported: the standard error (standard deviation of the replicates) and the
percentile interval at ``level``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.stats.estimators import ESTIMATES, SUM_COLUMNS, Unit, estimates_from_totals

# Bound on the replicate-by-prompt count matrix held at once (float64 entries).
_MAX_MATRIX_ENTRIES = 20_000_000


def cluster_bootstrap(
    sums: pl.DataFrame,
    unit: Unit,
    length_normalize_deltah1: bool,
    replicates: int,
    seed: int,
    level: float,
) -> dict[str, dict[str, float]]:
    """Bootstrap SE and percentile interval of each of ``ESTIMATES`` (nats).

    ``sums`` is ``prompt_sums`` of the run; the result maps an estimate's name to
    ``{"se", "low", "high"}``.
    """
    matrix = sums.select(SUM_COLUMNS).to_numpy().astype(np.float64)
    num_prompts = matrix.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_MATRIX_ENTRIES // num_prompts)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in ESTIMATES}
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        # How often each prompt is drawn in each replicate: P index draws per replicate.
        drawn = rng.integers(0, num_prompts, size=(size, num_prompts))
        drawn += np.arange(size)[:, None] * num_prompts
        counts = np.bincount(drawn.ravel(), minlength=size * num_prompts)
        totals = counts.reshape(size, num_prompts).astype(np.float64) @ matrix
        estimates = estimates_from_totals(
            {c: totals[:, j] for j, c in enumerate(SUM_COLUMNS)},
            num_prompts,
            unit,
            length_normalize_deltah1,
        )
        for name in ESTIMATES:
            draws[name].append(estimates[name])
    tail = (1.0 - level) / 2.0 * 100.0
    result = {}
    for name in ESTIMATES:
        values = np.concatenate(draws[name])
        low, high = np.percentile(values, [tail, 100.0 - tail])
        result[name] = {"se": float(np.std(values, ddof=1)), "low": float(low), "high": float(high)}
    return result
