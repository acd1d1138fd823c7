"""Standard errors: the linearisation against hand-written influence functions, finite
differences and brute-force jackknives; Wald intervals; when SEs cannot be estimated."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from pipeline.stats.estimators import means_from_totals, prepare, prompt_sums
from pipeline.stats.registry import ESTIMATES, UNITS, atoms_needed
from pipeline.stats.uncertainty import (
    INTERVAL_ESTIMATES,
    ClusterBootstrap,
    cluster_bootstrap,
    estimates_from_means,
    influence_values,
    interval_warnings,
    linearise,
    per_prompt_errors,
    prompt_set_errors,
    prompt_set_standard_errors,
    stratum_dispersion,
    stratum_scatter,
    wald_intervals,
)

Z95 = 1.959963984540054


def _frame(prompts: int, per_prompt: int, seed: int = 0, eos: bool = True) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = prompts * per_prompt
    length = rng.integers(1, 12, n)
    s0 = -rng.gamma(2.0, 1.0, n) * length - rng.normal(0, 5, prompts).repeat(per_prompt)
    d = rng.normal(0, 0.6, n) + 0.05 * s0
    # Without EOS in the integrand, S1 - S0 differs from d by the EOS log-ratio e.
    e = np.zeros(n) if eos else rng.normal(0, 0.3, n)
    return pl.DataFrame(
        {
            "prompt_id": np.repeat([f"q{i:03d}" for i in range(prompts)], per_prompt),
            "S0": s0,
            "S1": s0 + d - e,
            "L": length,
            "L_full": length + (0 if eos else 1),
            "d": d,
        }
    )


def _deviations(seqs: object, psi: np.ndarray) -> np.ndarray:
    """psi minus its stratum mean: influence values are defined up to that constant."""
    strata = seqs.stratum  # type: ignore[attr-defined]
    mean = np.bincount(strata, weights=psi) / np.bincount(strata)
    return psi - mean[strata]


def _psi(frame: pl.DataFrame, name: str, unit: str) -> tuple[np.ndarray, object]:
    seqs = prepare(frame)
    sums = prompt_sums(seqs)
    (estimate,) = [e for e in ESTIMATES if e.name == name]
    linear = estimates_from_means(linearise(sums.run_means()), unit, (estimate,))[name]
    return influence_values(seqs, linear.gradient, run_shift=True), seqs


def test_influence_functions_equal_the_written_out_forms() -> None:
    """The issue's list: H0 psi = -S0; H1 psi = w(-S1 - H1)/w_bar; KL psi = w(d - KL)/w_bar;
    per token H0 psi = (-S0 - H0 L)/L_bar, H1 psi = w(-S1 - H1 L)/(sum w L / N)."""
    frame = _frame(12, 6)
    s0, s1, d, length = (frame[c].to_numpy().astype(float) for c in ("S0", "S1", "d", "L"))
    w = np.exp(d - d.max())
    h0, h1 = -s0.mean(), -(w * s1).sum() / w.sum()
    kl = (w * d).sum() / w.sum()
    h0_token, h1_token = -s0.sum() / length.sum(), -(w * s1).sum() / (w * length).sum()
    expected = {
        ("H0", "sequence"): -s0,
        ("H1", "sequence"): w * (-s1 - h1) / w.mean(),
        ("delta_H", "sequence"): w * (-s1 - h1) / w.mean() + s0 - h0,
        ("kl", "sequence"): w * (d - kl) / w.mean(),
        ("H0", "per_token"): (-s0 - h0_token * length) / length.mean(),
        ("H1", "per_token"): w * (-s1 - h1_token * length) / (w * length).mean(),
    }
    for (name, unit), psi in expected.items():
        found, seqs = _psi(frame, name, unit)
        assert _deviations(seqs, found) == pytest.approx(_deviations(seqs, psi), abs=1e-10), (
            name,
            unit,
        )


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("estimate", INTERVAL_ESTIMATES, ids=lambda e: e.name)
def test_linearisation_equals_the_formulas_numerical_gradient(estimate: object, unit: str) -> None:
    """d estimate / d m[a], by central differences of the formula on the run's means."""
    frame = _frame(8, 5, eos=False)
    means = prompt_sums(prepare(frame)).run_means()
    linear = estimates_from_means(linearise(means), unit, (estimate,))  # type: ignore[arg-type]
    (lin,) = linear.values()
    for name in estimate.needs:  # type: ignore[attr-defined]
        step = 1e-6 * (abs(means[name]) or 1.0)
        up = estimate.formula({**means, name: means[name] + step}, unit)  # type: ignore[attr-defined]
        down = estimate.formula({**means, name: means[name] - step}, unit)  # type: ignore[attr-defined]
        expected = (up - down) / (2 * step)
        assert lin.gradient.get(name, 0.0) == pytest.approx(expected, rel=1e-6, abs=1e-8), name


def _covariance(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.cov(x, y)[0, 1])


def test_first_order_se_is_the_sum_of_prompt_jackknife_variances() -> None:
    """dH1 = -mean_q Cov_q(S0, d) (EOS counted): its prompt-set variance must equal
    Q^-2 sum_q (G-1)/G sum_j (Cov_q(-j) - mean_j Cov_q(-j))^2, by brute force."""
    frame = _frame(10, 5)
    s0, d = frame["S0"].to_numpy(), frame["d"].to_numpy()
    total = 0.0
    for q in range(10):
        rows = slice(5 * q, 5 * q + 5)
        left_out = [_covariance(np.delete(s0[rows], j), np.delete(d[rows], j)) for j in range(5)]
        total += 4 / 5 * np.sum((np.array(left_out) - np.mean(left_out)) ** 2)
    seqs = prepare(frame)
    errors = prompt_set_errors(seqs, prompt_sums(seqs), "sequence")
    assert errors["delta_H1"] == pytest.approx(math.sqrt(total) / 10, rel=1e-10)


def test_sequence_h0_se_closed_form() -> None:
    frame = _frame(7, 4)
    s0 = frame["S0"].to_numpy().reshape(7, 4)
    within = (4 / 3 * ((s0 - s0.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)).sum()
    seqs = prepare(frame)
    errors = prompt_set_errors(seqs, prompt_sums(seqs), "sequence")
    assert errors["H0"] == pytest.approx(math.sqrt(within) / 28, rel=1e-12)


def test_per_prompt_estimates_and_errors() -> None:
    frame = _frame(5, 6, seed=3)
    seqs = prepare(frame)
    found = per_prompt_errors(seqs, prompt_sums(seqs), "sequence", INTERVAL_ESTIMATES[:5])
    s0 = frame["S0"].to_numpy().reshape(5, 6)
    values, se = found["H0"]
    assert values == pytest.approx(-s0.mean(axis=1), rel=1e-12)
    assert se == pytest.approx(s0.std(axis=1, ddof=1) / math.sqrt(6), rel=1e-10)
    # dH1 within a prompt is -Cov_q, its SE the jackknife of that covariance.
    d = frame["d"].to_numpy().reshape(5, 6)
    values, se = found["delta_H1"]
    assert values[2] == pytest.approx(-_covariance(s0[2], d[2]), rel=1e-12)
    left_out = [_covariance(np.delete(s0[2], j), np.delete(d[2], j)) for j in range(6)]
    jackknife = 5 / 6 * np.sum((np.array(left_out) - np.mean(left_out)) ** 2)
    assert se[2] == pytest.approx(math.sqrt(jackknife), rel=1e-10)


def test_strata_are_prompt_and_sampling_model() -> None:
    """Sequences of one prompt drawn by two models are two strata: the spread between
    the strata means is not sampling noise of the prompt-set value."""
    frame = _frame(4, 6).with_columns(stratum=pl.Series([0, 0, 0, 1, 1, 1] * 4))
    seqs = prepare(frame)
    psi = frame["S0"].to_numpy().reshape(8, 3)
    within = (3 / 2 * ((psi - psi.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)).sum()
    assert stratum_dispersion(seqs, frame["S0"].to_numpy()).sum() == pytest.approx(within)


def test_wald_intervals() -> None:
    (interval,) = wald_intervals({"H0": 2.0}, {"H0": 0.5}, 0.95).values()
    assert interval == pytest.approx({"se": 0.5, "low": 2 - Z95 * 0.5, "high": 2 + Z95 * 0.5})


def test_one_completion_per_prompt_gives_null_errors_and_a_warning() -> None:
    seqs = prepare(_frame(30, 1))
    errors = prompt_set_errors(seqs, prompt_sums(seqs), "sequence")
    assert all(math.isnan(se) for se in errors.values())
    (warning,) = interval_warnings(seqs.shape, "prompt_set")
    assert "single completion" in warning
    assert "num_samples >= 2" in warning


def test_two_completions_per_prompt_leave_only_the_jackknife_undefined() -> None:
    seqs = prepare(_frame(30, 2))
    errors = prompt_set_errors(seqs, prompt_sums(seqs), "sequence")
    assert math.isnan(errors["delta_H1"])
    assert math.isnan(errors["delta_H1_rate"])
    assert all(math.isfinite(errors[n]) for n in ("H0", "H1", "delta_H", "kl", "H0_rate"))
    (warning,) = interval_warnings(seqs.shape, "prompt_set")
    assert "jackknife" in warning


def test_population_intervals_need_prompts() -> None:
    assert "no standard error" in interval_warnings(prepare(_frame(1, 8)).shape, "population")[0]
    assert "unreliable" in interval_warnings(prepare(_frame(5, 8)).shape, "population")[0]
    assert interval_warnings(prepare(_frame(20, 8)).shape, "population") == []
    assert interval_warnings(prepare(_frame(20, 8)).shape, "prompt_set") == []


def test_bootstrap_is_reproducible_and_brackets_the_estimate() -> None:
    frame = _frame(40, 4)
    sums = prompt_sums(prepare(frame))
    a = cluster_bootstrap(sums, "per_token", 200, 7, 0.9)
    assert a == cluster_bootstrap(sums, "per_token", 200, 7, 0.9)
    assert a != cluster_bootstrap(sums, "per_token", 200, 8, 0.9)
    h0 = -frame["S0"].sum() / frame["L"].sum()
    assert a["H0"]["low"] < h0 < a["H0"]["high"]
    # Between-prompt spread dominates here, so the population SE exceeds the prompt-set SE.
    seqs = prepare(frame)
    assert a["H0"]["se"] > prompt_set_errors(seqs, sums, "per_token")["H0"]


def test_prompt_set_errors_add_up_shard_by_shard() -> None:
    """Totals and scatter matrices of shards (each prepared on the run's weight shift)
    give the errors of the whole run: V = g' C g / N^2 with C summed over shards."""
    frame = _frame(12, 5, seed=4, eos=False)
    for unit in ("sequence", "per_token"):
        whole = prepare(frame)
        expected = prompt_set_errors(whole, prompt_sums(whole), unit)
        run_max = {"w0": 0.0, "w1": float(frame["d"].max())}
        names = atoms_needed(INTERVAL_ESTIMATES)
        totals, scatter = np.zeros(len(names)), np.zeros((len(names), len(names)))
        for rows in (slice(0, 5), slice(5, 35), slice(35, 60)):
            shard = prepare(frame[rows], run_max)
            totals += prompt_sums(shard, names).run_totals()
            scatter += stratum_scatter(shard, names)
        means = means_from_totals(names, totals)
        found = prompt_set_standard_errors(scatter, names, means, 60, unit)
        assert found == pytest.approx(expected, rel=1e-10)


def test_a_bootstrap_fed_shard_by_shard_draws_q_prompts_per_replicate() -> None:
    frame = _frame(30, 4, seed=6)
    whole = prompt_sums(prepare(frame))
    run_max = {"w0": 0.0, "w1": float(frame["d"].max())}
    sizes = [7, 1, 22]
    bootstrap = ClusterBootstrap(sizes, "sequence", 4000, 3)
    assert (bootstrap._draws.sum(axis=1) == 30).all()
    start = 0
    for shard, size in enumerate(sizes):
        rows = slice(start * 4, (start + size) * 4)
        bootstrap.add(shard, prompt_sums(prepare(frame[rows], run_max)))
        start += size
    # Every replicate resampled 30 prompts of 4 sequences.
    assert (bootstrap._totals[:, 0] == 120).all()
    sharded = bootstrap.intervals(0.9)
    # The same distribution as drawing from all prompts at once.
    in_memory = cluster_bootstrap(whole, "sequence", 4000, 3, 0.9)
    for name in ("H0", "H1", "delta_H"):
        assert sharded[name]["se"] == pytest.approx(in_memory[name]["se"], rel=0.1), name
