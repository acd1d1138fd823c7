"""Exact quantiles in bounded memory (pipeline/stats/quantiles.py) against np.quantile."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stats import quantiles
from pipeline.stats.quantiles import exact_quantiles

PROBS = [0, 0.05, 0.5, 1]
MANY_PROBS = [*np.linspace(0, 1, 41).tolist(), 0.001, 0.999, 1 / 3, 2 / 3, 0.5]


class Reader:
    """Re-readable chunks of an array, uneven and with empty ones; counts the passes."""

    def __init__(self, values: np.ndarray, seed: int = 0, size: int = 3000) -> None:
        rng = np.random.default_rng(seed)
        cuts = np.sort(rng.integers(0, len(values) + 1, size=max(len(values) // size, 1) + 3))
        # Repeated cut points give empty chunks, in the middle and at both ends.
        self.chunks = np.split(
            values, np.sort(np.concatenate(([0], cuts, cuts[:2], [len(values)])))
        )
        assert sum(map(len, self.chunks)) == len(values)
        self.passes = 0

    def __call__(self) -> Iterator[np.ndarray]:
        self.passes += 1
        return iter(self.chunks)


def assert_exact(values: np.ndarray, probs: list, reader: Callable | None = None, **kw) -> None:
    got = np.array(exact_quantiles(reader or Reader(values), probs, **kw))
    expected = np.quantile(values, probs)
    # Equal, NaN included; then equal bits, but for the sign of a zero (see the module).
    np.testing.assert_array_equal(got, expected, strict=True)
    nonzero = expected != 0
    assert (got.view(np.uint64)[nonzero] == expected.view(np.uint64)[nonzero]).all()


def normals(n: int = 30_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n)


def test_small_input_takes_one_pass() -> None:
    values = normals()
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader)
    assert reader.passes == 1


@pytest.mark.parametrize("max_gathered", [0, 1, 500, 29_999])
@pytest.mark.parametrize("bins", [3, 64, 4096])
def test_normals_in_uneven_chunks(bins: int, max_gathered: int) -> None:
    values = normals()
    assert_exact(values, PROBS + MANY_PROBS, bins=bins, max_gathered=max_gathered)


def test_typical_case_takes_three_passes() -> None:
    # The scale of a run, shrunk: values whose median's binade holds more than
    # max_gathered values need the binade's histogram, then a gather.
    values = np.random.default_rng(1).normal(-3.0, 8.0, size=200_000)
    reader = Reader(values)
    assert_exact(values, PROBS, reader, max_gathered=10_000)
    assert reader.passes == 3


def test_median_near_zero_takes_at_most_two_passes() -> None:
    values = np.random.default_rng(2).normal(size=100_000)
    reader = Reader(values)
    assert_exact(values, [0.5], reader, max_gathered=10_000)
    # The binades near 0 hold few values each: pass 1 often pins the median down alone.
    assert reader.passes <= 2


@pytest.mark.parametrize("max_gathered", [0, 100, 1 << 20])
def test_heavy_ties(max_gathered: int) -> None:
    rng = np.random.default_rng(3)
    values = np.where(rng.random(50_000) < 0.9, 0.7, rng.normal(size=50_000))
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader, max_gathered=max_gathered)
    assert reader.passes <= 3


@pytest.mark.parametrize("pair", [(0.0, 1.0), (1.0, np.nextafter(1.0, 2.0)), (-5.0, 3e200)])
def test_two_distinct_values(pair: tuple[float, float]) -> None:
    values = np.random.default_rng(4).choice(np.array(pair), size=20_001)
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader, max_gathered=10)
    # Each value fills bins of one distinct key, which pin the ranks down without a gather.
    assert reader.passes <= 2


@pytest.mark.parametrize("value", [0.0, -0.0, 2.5, -1e300, 5e-324])
@pytest.mark.parametrize("n", [1, 2, 10_000])
def test_all_equal_and_single_values(value: float, n: int) -> None:
    values = np.full(n, value)
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader, max_gathered=0)
    assert reader.passes == 1


def test_concentrated_cluster_with_outliers_refines_in_few_passes() -> None:
    rng = np.random.default_rng(5)
    # Outliers at 1.0 and 1.999 stretch the binade [1, 2) that pass 1 finds the cluster
    # in, so pass 2's bin around 1.5 still holds the whole cluster: pass 3 narrows it to
    # the cluster's own range, and pass 4 gathers.
    cluster = 1.5 + rng.normal(scale=1e-12, size=100_000)
    outliers = np.array([1.0, 1.0000001, 1.999, -1e6, 1e6, 3e300])
    values = rng.permutation(np.concatenate((cluster, outliers)))
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader, max_gathered=2000)
    assert reader.passes == 4


def test_histograms_alone_take_at_most_six_passes() -> None:
    values = np.random.default_rng(6).normal(size=20_000) * 10.0 ** np.arange(-10, 10).repeat(1000)
    reader = Reader(values)
    assert_exact(values, PROBS + MANY_PROBS, reader, max_gathered=0)
    assert reader.passes <= 6


def test_extreme_magnitudes_subnormals_and_zeros() -> None:
    rng = np.random.default_rng(7)
    magnitudes = 10.0 ** rng.uniform(-300, 300, size=20_000)
    special = [0.0, -0.0, 5e-324, -5e-324, 2.2e-308, 1e-310, -1e-320, 1.7e308, -1.7e308]
    values = rng.permutation(
        np.concatenate((rng.choice([-1.0, 1.0], 20_000) * magnitudes, special))
    )
    for max_gathered in (0, 300, 1 << 20):
        assert_exact(values, PROBS + MANY_PROBS, max_gathered=max_gathered)
    subnormals = rng.integers(0, 1 << 52, size=5000).view(np.float64) * rng.choice(
        [-1.0, 1.0], 5000
    )
    assert_exact(subnormals, PROBS + MANY_PROBS, max_gathered=50)


def test_overflowing_interpolation_matches_numpy() -> None:
    # (b - a) overflows to inf: np.quantile returns inf or NaN, and so must this.
    values = np.array([-1.7976931348623157e308, 1.7976931348623157e308, 0.0])
    with np.errstate(over="ignore", invalid="ignore"):
        assert_exact(values, [0.25, 0.5, 0.75, 0.1], max_gathered=0)


def test_probabilities_as_numpy_takes_them() -> None:
    values = normals(5000)
    assert_exact(values, [0, 1], max_gathered=10)  # integers: the order statistics themselves
    assert_exact(values, [0.5, 0.5, 0.05, 0.05], max_gathered=10)  # shared ranks
    assert_exact(values, np.array([0.3, 0.7], dtype=np.float32), max_gathered=10)
    assert exact_quantiles(Reader(values), []) == []


def test_gathers_hold_at_most_max_gathered_values(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(8).normal(size=60_000)
    reader = Reader(values)
    held: dict[int, int] = {}
    pick = quantiles._pick

    def recording_pick(keys: np.ndarray, below: int, ranks: list[int]) -> dict[int, int]:
        held[reader.passes] = held.get(reader.passes, 0) + len(keys)
        return pick(keys, below, ranks)

    monkeypatch.setattr(quantiles, "_pick", recording_pick)
    assert_exact(values, MANY_PROBS, reader, bins=16, max_gathered=700)
    assert held  # some ranks were gathered
    assert max(held.values()) <= 700


def test_error_on_empty_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        exact_quantiles(lambda: iter([]), [0.5])
    with pytest.raises(ValueError, match="no values"):
        exact_quantiles(lambda: iter([np.empty(0), np.empty(0)]), [0.5])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_on_non_finite_values(bad: float) -> None:
    chunks = [np.ones(3), np.array([1.0, bad])]
    with pytest.raises(ValueError, match="chunk 1 holds 1 NaN or infinite"):
        exact_quantiles(lambda: iter(chunks), [0.5])


def test_error_on_bad_arguments() -> None:
    reader = Reader(normals(100))
    with pytest.raises(ValueError, match=r"range \[0, 1\]"):
        exact_quantiles(reader, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"range \[0, 1\]"):
        exact_quantiles(reader, [np.nan])
    with pytest.raises(ValueError, match="bins"):
        exact_quantiles(reader, [0.5], bins=1)
    with pytest.raises(ValueError, match="max_gathered"):
        exact_quantiles(reader, [0.5], max_gathered=-1)


def test_error_when_chunks_is_not_re_readable() -> None:
    once = iter(np.array_split(normals(10_000), 7))
    with pytest.raises(ValueError, match="fresh iterator"):
        exact_quantiles(lambda: once, [0.5], max_gathered=100)


@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=300
    ),
    probs=st.lists(st.floats(0, 1), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    bins=st.sampled_from([2, 3, 16, 4096]),
    max_gathered=st.sampled_from([0, 1, 7, 1 << 20]),
)
@settings(max_examples=200, deadline=None)
def test_matches_numpy(
    values: list[float], probs: list[float], seed: int, bins: int, max_gathered: int
) -> None:
    array = np.array(values)
    reader = Reader(array, seed, size=20)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_exact(array, probs, reader, bins=bins, max_gathered=max_gathered)
    # Each level divides a key span of at most 2^64 - 1 by at least `bins`.
    assert reader.passes <= math.ceil(64 / math.log2(bins))
