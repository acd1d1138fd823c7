"""Coverage of the intervals, by repeated draws with a known truth (no model runs).

Prompt set (the default ``uncertainty.estimand``): the estimand is the value for the
fixed 24 enumerable prompts, known exactly (tests/exact.py). Each repetition draws G
completions per prompt and sampling model by their exact probabilities
(``exact.draw_frame``), applies the pipeline's estimators and Wald intervals, and
records whether each 95% interval covers the exact value. Cases: the near pair
sampled from p0 alone, the far pair sampled from p0 and p1 (mixture sampling, the
balance heuristic), each at G = 8 and G = 64, both units, EOS counted (the defaults);
and the far pair from p0 alone, where the intervals must miss (the failure the
mean-weight test warns about).

Bounds: with R = 600 repetitions a true coverage of 0.95 gives an observed coverage
with standard deviation sqrt(0.95 x 0.05 / 600) = 0.0089, so [0.92, 0.98] is about
3.4 SD either side. A biased estimator, or an SE off by 20%, falls outside.

Population (``uncertainty.estimand: population``): a synthetic population of 1,000
prompts with categorical p0_q, p1_q; each repetition draws 100 prompts and G = 4
outcomes, and the cluster-bootstrap intervals must cover the population value.

``python -m tests.test_coverage`` prints the prompt-set coverage table recorded in the
README.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.stats.estimators import point_estimates, prepare, prompt_sums
from pipeline.stats.uncertainty import cluster_bootstrap, prompt_set_errors, wald_intervals
from tests import exact

LEVEL = 0.95
UNITS = ("sequence", "per_token")
# Exact value of each interval estimate: (estimand of tests.exact, its key there).
TARGETS = {
    **{name: (None, name) for name in ("H0", "H1", "delta_H", "kl", "delta_H1")},
    "H0_rate": ("rate", "H0"),
    "H1_rate": ("rate", "H1"),
    "delta_H_rate": ("rate", "delta_H"),
    "delta_H1_rate": ("rate", "delta_H1"),
}
# name: (reference, candidate, sampling models, G per sampling model, repetitions)
COVERING = {
    "near, p0 alone, G=8": ("enum-p0", "enum-p1", ("p0",), 8, 600),
    "near, p0 alone, G=64": ("enum-p0", "enum-p1", ("p0",), 64, 600),
    "far, p0 and p1, G=8": ("enum-far-p0", "enum-far-p1", ("p0", "p1"), 8, 600),
    "far, p0 and p1, G=64": ("enum-far-p0", "enum-far-p1", ("p0", "p1"), 64, 600),
}
FAR_FROM_P0 = "far, p0 alone, G=64"
CASES = {**COVERING, FAR_FROM_P0: ("enum-far-p0", "enum-far-p1", ("p0",), 64, 100)}


def prompt_set_coverage(case: str, seed: int = 2026) -> dict[tuple[str, str], float]:
    """Observed coverage of each (unit, estimate) over the repetitions of one case."""
    reference, candidate, sampling, per_model, repetitions = CASES[case]
    p0, p1 = exact.load(reference), exact.load(candidate)
    samplers = [{"p0": p0, "p1": p1}[name] for name in sampling]
    truth = {
        (unit, name): exact.exact_values(p0, p1, estimand or unit, True)[key]
        for unit in UNITS
        for name, (estimand, key) in TARGETS.items()
    }
    covered = dict.fromkeys(truth, 0)
    rng = np.random.default_rng(seed)
    for _ in range(repetitions):
        seqs = prepare(exact.draw_frame(p0, p1, True, per_model, rng, samplers))
        sums = prompt_sums(seqs)
        for unit in UNITS:
            point = point_estimates(sums, unit)
            intervals = wald_intervals(point, prompt_set_errors(seqs, sums, unit), LEVEL)
            for name in TARGETS:
                interval = intervals[name]
                covered[unit, name] += interval["low"] <= truth[unit, name] <= interval["high"]
    return {key: count / repetitions for key, count in covered.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", COVERING)
def test_prompt_set_intervals_cover_the_exact_values(case: str) -> None:
    coverage = prompt_set_coverage(case)
    outside = {key: value for key, value in coverage.items() if not 0.92 <= value <= 0.98}
    assert not outside, outside


@pytest.mark.slow
def test_far_pair_intervals_from_p0_alone_miss() -> None:
    """Sampling the far pair from p0 alone, H1 and dH intervals almost never cover."""
    coverage = prompt_set_coverage(FAR_FROM_P0)
    for unit in UNITS:
        assert coverage[unit, "H1"] < 0.2, coverage
        assert coverage[unit, "delta_H"] < 0.2, coverage


def test_first_order_estimate_targets_the_first_order_term() -> None:
    """Without EOS, dH1 estimates -Cov(S0', d) + E[e] (and its per-token and rate forms).

    One large draw (G = 2048) of the near pair: each estimate lies within 4 SE of the
    exact first-order term and more than 8 SE from the term without E[e].
    """
    p0, p1 = exact.load("enum-p0"), exact.load("enum-p1")
    seqs = prepare(exact.draw_frame(p0, p1, False, 2048, np.random.default_rng(7)))
    sums = prompt_sums(seqs)
    for name, estimand, unit in (
        ("delta_H1", "sequence", "sequence"),
        ("delta_H1", "per_token", "per_token"),
        ("delta_H1_rate", "rate", "sequence"),
    ):
        estimate = point_estimates(sums, unit)[name]
        se = prompt_set_errors(seqs, sums, unit)[name]
        truth = exact.first_order(p0, p1, estimand, False)
        without_e = exact.first_order(p0, p1, estimand, False, eos_term=False)
        assert abs(estimate - truth) < 4 * se, (name, estimand, estimate, truth, se)
        assert abs(estimate - without_e) > 8 * se, (name, estimand, estimate, without_e, se)


POPULATION, PROMPTS, SAMPLES, OUTCOMES, REPETITIONS = 1000, 100, 4, 6, 300
NAMES = ("H0", "H1", "delta_H", "kl", "delta_H1")


def _population(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Prompts differ a lot (clustered): logits with a per-prompt scale.
    logits0 = rng.normal(0, 1, (POPULATION, OUTCOMES)) * rng.uniform(0.5, 2.5, (POPULATION, 1))
    logits1 = logits0 + rng.normal(0, 0.4, (POPULATION, OUTCOMES))
    log_p0 = logits0 - np.log(np.exp(logits0).sum(1, keepdims=True))
    log_p1 = logits1 - np.log(np.exp(logits1).sum(1, keepdims=True))
    return log_p0, log_p1, rng.integers(1, 10, OUTCOMES).astype(float)


def _population_truth(
    log_p0: np.ndarray, log_p1: np.ndarray, lengths: np.ndarray, unit: str
) -> dict[str, float]:
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


@pytest.mark.slow
@pytest.mark.parametrize("unit", UNITS)
def test_population_bootstrap_intervals_cover_the_population_value(unit: str) -> None:
    """Bounds [0.90, 0.99]: R = 300 gives SD 0.0126, and percentile intervals with 100
    clusters under-cover by about a point."""
    rng = np.random.default_rng(2026)
    log_p0, log_p1, lengths = _population(rng)
    truth = _population_truth(log_p0, log_p1, lengths, unit)
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
                "S0": s0,
                "S1": s1,
                "L": lengths[outcome],
                "d": s1 - s0,
            }
        )
        sums = prompt_sums(prepare(frame))
        point = point_estimates(sums, unit)
        intervals = cluster_bootstrap(sums, unit, 300, repetition, LEVEL)
        for name in NAMES:
            assert intervals[name]["low"] <= point[name] <= intervals[name]["high"]
            covered[name] += intervals[name]["low"] <= truth[name] <= intervals[name]["high"]
    coverage = {name: count / REPETITIONS for name, count in covered.items()}
    for name, value in coverage.items():
        assert 0.90 <= value <= 0.99, (name, coverage)


def coverage_table() -> str:
    """The README's Markdown table: every case, unit and estimate."""
    lines = [
        "| sampling (G per model) | unit | " + " | ".join(TARGETS) + " | reps |",
        "|---|---|" + "---|" * len(TARGETS) + "---|",
    ]
    for case, (*_, repetitions) in CASES.items():
        coverage = prompt_set_coverage(case)
        for unit in UNITS:
            cells = " | ".join(f"{coverage[unit, name]:.3f}" for name in TARGETS)
            lines.append(f"| {case} | {unit} | {cells} | {repetitions} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(coverage_table())
