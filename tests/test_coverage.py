"""Coverage of the cluster-bootstrap intervals, on synthetic runs with a known truth.

Prompts are the independent units: a run's prompts are a sample from a population of
prompts, and the estimand is the population's value. Here the population has 1,000
prompts; prompt q has a categorical p0_q over K outcomes and p1_q = softmax(log p0_q +
b_q); an outcome's "sequence log-prob" is log p_q(k) and its length L_k. The truth of
every estimate is then an exact finite sum over the population. Each repetition draws
100 prompts, samples G = 4 outcomes per prompt from p0, runs the pipeline's estimators and
bootstrap, and records whether each 95% interval covers the truth.

Bounds: with R = 300 repetitions a true coverage of 0.95 gives an observed coverage
with standard deviation sqrt(0.95 x 0.05 / 300) = 0.0126. We accept [0.90, 0.99]:
about 4 SD either side, minus the known small-sample under-coverage of percentile
bootstrap intervals with 100 clusters (about a point). A biased estimator or an SE
that ignored the clustering (too narrow) falls far below 0.90.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.stats.estimators import entropy_estimates, prompt_sums
from pipeline.stats.uncertainty import cluster_bootstrap

POPULATION, PROMPTS, SAMPLES, OUTCOMES, REPETITIONS = 1000, 100, 4, 6, 300
NAMES = ("H0", "H1", "delta_H", "kl", "delta_H1")


def _model(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Prompts differ a lot (clustered): logits with a per-prompt scale.
    logits0 = rng.normal(0, 1, (POPULATION, OUTCOMES)) * rng.uniform(0.5, 2.5, (POPULATION, 1))
    logits1 = logits0 + rng.normal(0, 0.4, (POPULATION, OUTCOMES))
    log_p0 = logits0 - np.log(np.exp(logits0).sum(1, keepdims=True))
    log_p1 = logits1 - np.log(np.exp(logits1).sum(1, keepdims=True))
    return log_p0, log_p1, rng.integers(1, 10, OUTCOMES).astype(float)


def _truth(log_p0: np.ndarray, log_p1: np.ndarray, lengths: np.ndarray, unit: str) -> dict:
    p0, p1 = np.exp(log_p0), np.exp(log_p1)
    d = log_p1 - log_p0
    e0_s0, e1_s1 = (p0 * log_p0).sum(1), (p1 * log_p1).sum(1)
    e0_l, e1_l, e1_d = (p0 * lengths).sum(1), (p1 * lengths).sum(1), (p1 * d).sum(1)

    def cov(x: np.ndarray) -> np.ndarray:
        return (
            p0 * (x - (p0 * x).sum(1, keepdims=True)) * (d - (p0 * d).sum(1, keepdims=True))
        ).sum(1)

    if unit == "sequence":
        h0, h1 = -e0_s0.mean(), -e1_s1.mean()
        return {
            "H0": h0,
            "H1": h1,
            "delta_H": h1 - h0,
            "kl": e1_d.mean(),
            "delta_H1": -cov(log_p0).mean(),
        }
    h0, h1 = -e0_s0.sum() / e0_l.sum(), -e1_s1.sum() / e1_l.sum()
    lengths_2d = np.broadcast_to(lengths, log_p0.shape)
    delta_h1 = -(cov(log_p0).sum() + h0 * cov(lengths_2d).sum()) / e0_l.sum()
    return {
        "H0": h0,
        "H1": h1,
        "delta_H": h1 - h0,
        "kl": e1_d.sum() / e1_l.sum(),
        "delta_H1": delta_h1,
    }


@pytest.mark.parametrize("unit", ["sequence", "per_token"])
def test_bootstrap_intervals_cover_the_truth(unit: str) -> None:
    rng = np.random.default_rng(2026)
    log_p0, log_p1, lengths = _model(rng)
    truth = _truth(log_p0, log_p1, lengths, unit)
    covered = dict.fromkeys(NAMES, 0)
    slots = np.repeat(np.arange(PROMPTS), SAMPLES)
    for repetition in range(REPETITIONS):
        drawn = rng.integers(0, POPULATION, PROMPTS)
        u = rng.random((PROMPTS, SAMPLES, 1))
        cdf = np.cumsum(np.exp(log_p0[drawn]), 1)[:, None, :]
        outcome = np.minimum((u > cdf).sum(2), OUTCOMES - 1).ravel()
        s0, s1 = log_p0[drawn[slots], outcome], log_p1[drawn[slots], outcome]
        frame = pl.DataFrame(
            {
                "prompt_id": slots.astype(str),
                "log_w_raw": s1 - s0,
                "log_w": s1 - s0,
                "S0": s0,
                "S1": s1,
                "L": lengths[outcome],
            }
        )
        point = entropy_estimates(frame, unit)
        intervals = cluster_bootstrap(prompt_sums(frame), unit, False, 300, repetition, 0.95)
        for name in NAMES:
            assert intervals[name]["low"] <= point[f"{name}_nats"] <= intervals[name]["high"]
            covered[name] += intervals[name]["low"] <= truth[name] <= intervals[name]["high"]
    coverage = {name: count / REPETITIONS for name, count in covered.items()}
    for name, value in coverage.items():
        assert 0.90 <= value <= 0.99, (name, coverage)
