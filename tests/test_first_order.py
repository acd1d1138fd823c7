"""The first-order terms of docs/design.md §2 against the true slope, on exact values.

Along the path p_eps proportional to p0^(1-eps) p1^eps, dH1 must be the slope of
dH(eps) = H(p_eps) - H(p0) at eps = 0. The slope comes from central differences of
exact, enumerated entropies (``tests.exact.slope``); the formulas are evaluated
exactly under p0 (``tests.exact.first_order``, written apart from ``pipeline.stats``).
Nothing here compares a formula with itself:

* with the EOS position counted, the formulas are the exact slope of the pair (p0, p1);
* without it, the slope involves prefix marginals no sample can see, and the formula
  is first-order correct only: applied to the pair (p0, p_eps) its error against
  dH(eps) must shrink like eps^2 (the formula without the EOS term E[e]: like eps).
"""

from __future__ import annotations

import math

import pytest

from tests import exact

# About 20 s, most of it scoring the four models; nothing here runs pipeline code.
pytestmark = pytest.mark.slow

PAIRS = {"near": ("enum-p0", "enum-p1"), "far": ("enum-far-p0", "enum-far-p1")}
SETTINGS = [(estimand, eos) for estimand in exact.ESTIMANDS for eos in (True, False)]
STEP = 1e-4  # central-difference step: truncation ~1e-8 relative, rounding ~1e-12


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request: pytest.FixtureRequest) -> tuple[exact.Distribution, exact.Distribution]:
    return tuple(exact.load(name) for name in PAIRS[request.param])


@pytest.mark.parametrize("name", [n for names in PAIRS.values() for n in names])
def test_enumeration_is_complete(name: str) -> None:
    assert exact.total_probability(exact.load(name)) == pytest.approx(1.0, abs=1e-12)


def test_path_ends_are_the_models(pair: tuple) -> None:
    """At eps = 0 and 1 the path is p0 and p1, EOS log-probs from prefix marginals included.

    The EOS log-prob of the path is log p(y) - log P(y_<T) over the enumeration; for a
    model it must equal the teacher-forced conditional of transformers, which checks
    the prefix table and the completeness of every prefix's continuations.
    """
    for eps, model in ((0.0, pair[0]), (1.0, pair[1])):
        end = exact.path(*pair, eps)
        assert abs(end.log_p - model.log_p).max() < 1e-12
        assert abs(end.eos_logprob - model.eos_logprob).max() < 1e-12


@pytest.mark.parametrize(("estimand", "include_eos"), SETTINGS)
def test_central_differences_converge(pair: tuple, estimand: str, include_eos: bool) -> None:
    """Steps 1e-3, 1e-4, 1e-5 agree: truncation (step^2) and rounding are negligible."""
    slopes = [exact.slope(*pair, estimand, include_eos, step) for step in (1e-3, STEP, 1e-5)]
    scale = max(1.0, abs(slopes[1]))
    assert abs(slopes[0] - slopes[1]) < 1e-6 * scale
    assert abs(slopes[2] - slopes[1]) < 1e-7 * scale


@pytest.mark.parametrize("estimand", exact.ESTIMANDS)
def test_first_order_term_is_the_slope_with_eos(pair: tuple, estimand: str) -> None:
    """Counting EOS, -Cov(S0, d) and its per-token and rate forms are the exact slope."""
    truth = exact.slope(*pair, estimand, True, STEP)
    assert exact.first_order(*pair, estimand, True) == pytest.approx(truth, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize(("estimand", "include_eos"), SETTINGS)
def test_first_order_error_is_second_order(pair: tuple, estimand: str, include_eos: bool) -> None:
    """|dH1(p0, p_eps) - dH(eps)| shrinks like eps^2 in every estimand and EOS setting.

    The order is log2 of the error ratio between eps = 0.02 and 0.01. The formula
    without E[e] (the pre-fix one) has order 1 without EOS, and its slope estimate
    dH1(p0, p_eps) / eps stays off the true slope.
    """

    def error(eps: float, eos_term: bool) -> float:
        step = exact.path(*pair, eps)
        first = exact.first_order(pair[0], step, estimand, include_eos, eos_term)
        return abs(first - exact.delta_entropy(*pair, estimand, include_eos, eps))

    assert 1.9 < math.log2(error(0.02, True) / error(0.01, True)) < 2.2
    truth = exact.slope(*pair, estimand, include_eos, STEP)
    eps = 1e-4
    with_e = exact.first_order(pair[0], exact.path(*pair, eps), estimand, include_eos) / eps
    assert abs(with_e - truth) < 1e-3 * max(abs(truth), 0.1)
    if not include_eos:
        assert 0.9 < math.log2(error(0.02, False) / error(0.01, False)) < 1.1
        without_e = exact.first_order(
            pair[0], exact.path(*pair, eps), estimand, include_eos, eos_term=False
        )
        assert abs(without_e / eps - truth) > 0.3 * abs(truth)
