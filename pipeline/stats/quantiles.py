"""Exact quantiles of values read chunk by chunk, in memory that does not grow with them.

The statistics stage reads a run shard by shard so that its memory does not grow with
the number of sequences, yet some diagnostics are quantiles over ~10^7 values (the
median log-weight; the 0, 5 and 50 % quantiles of the per-prompt ESS) that must equal
``np.quantile(all_values, probs)`` (method 'linear') bit for bit. A streaming sketch
(t-digest, P^2) only approximates them and sorting needs every value at once, so this
module reads the values several times instead (``chunks()`` is called once per pass)
and selects the needed order statistics exactly:

1. Keys. Each float64 is mapped to a uint64 whose unsigned order is the float order
   (negative floats: all bits flipped; the others: sign bit set). All selection runs on
   keys in integer arithmetic, so it is exact where float bin edges are not: no
   overflow between -1e308 and 1e308, no rounding for subnormals, and a value's bin is
   computed the same way on every pass.
2. Histograms. A needed rank r is searched in an interval [lo, hi] of keys, knowing
   how many values lie below lo. A pass splits the interval into ``bins`` bins of equal
   key width and counts each bin's values and their smallest and largest key; the bin
   holding r, cut down to the smallest and largest key really in it, is the next
   interval. Each such level divides the key span by at least ``bins``, so
   ceil(64 / log2(bins)) levels (6 for 4096 bins) single out one key whatever the data.
   A rank that is the first or last of its bin, or whose bin holds one distinct key
   (ties: one value repeated a million times), is known at once. One pass serves all
   ranks; ranks that fall in the same bin share its next histogram.
3. Gathering. Once a rank's interval holds few enough values, the next pass collects
   them (at most ``max_gathered`` keys over all intervals gathered in one pass) and a
   partition picks the rank.
4. Combining. numpy's own index, weight and ``_lerp`` operations (copied from
   ``numpy/lib/_function_base_impl.py``, numpy 2.3) combine the order statistics
   x[floor(h)] and x[floor(h) + 1], h = (n - 1) p, so the result is np.quantile's.

The first pass counts the values, rejects NaN and infinities, and bins the whole key
range: with 4096 bins that is one bin per sign and binary exponent, and within one
exponent the keys are linear in the value, so the second level bins the rank's binade
evenly in value (between its smallest and largest value). Typical data thus need 3
passes (count and binade histogram, in-binade histogram, gather), 2 when the rank's
binade holds at most ``max_gathered`` values, and 1 when all of them do (the first
pass keeps them while it counts); values concentrated far below their bin's width need
one more pass per factor ``bins`` of concentration, never more than
ceil(64 / log2(bins)) in all.

Memory: three arrays of ``bins`` entries per interval being refined (at most two
intervals per probability), at most ``max_gathered`` gathered keys, and one chunk.

The one difference from np.quantile: -0.0 sorts just below 0.0 here, while
np.quantile's partition leaves their order to chance, so a result that is zero may have
the other sign (the two compare equal).

Public API: ``exact_quantiles``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_SIGN = np.uint64(1 << 63)
_KEY_MAX = (1 << 64) - 1


def _values_of(chunk: np.ndarray) -> np.ndarray:
    """A chunk as a contiguous 1-D float64 array (keys view its bytes)."""
    return np.ascontiguousarray(chunk, dtype=np.float64).reshape(-1)


def _keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float64 values (-0.0 just below 0.0)."""
    bits = values.view(np.uint64)
    # Flipping every bit of a negative float reverses the order of its magnitudes and
    # puts it below all non-negative floats, whose set sign bit lifts them above.
    return np.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _values_of_keys(keys: np.ndarray) -> np.ndarray:
    """The float64 values of keys (the inverse of ``_keys``)."""
    keys = np.asarray(keys, dtype=np.uint64)
    return np.where(keys >= _SIGN, keys ^ _SIGN, ~keys).view(np.float64)


class _Histogram:
    """Counts, smallest and largest key of ``bins`` equal-width bins of [lo, hi]."""

    def __init__(self, lo: int, hi: int, bins: int) -> None:
        self.lo, self.hi = np.uint64(lo), np.uint64(hi)
        self.whole = lo == 0 and hi == _KEY_MAX
        # Width floor(span / bins) + 1 puts the largest key in bin bins - 1 at most, and
        # leaves each bin a span of at most floor(span / bins): the bound on levels.
        self.width = np.uint64((hi - lo) // bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.smallest = np.full(bins, _KEY_MAX, dtype=np.uint64)
        self.largest = np.zeros(bins, dtype=np.uint64)

    def add(self, keys: np.ndarray) -> None:
        """Count the keys of one chunk that lie in [lo, hi]."""
        if not self.whole:
            keys = keys[(keys >= self.lo) & (keys <= self.hi)]
        index = ((keys - self.lo) // self.width).astype(np.intp)
        self.counts += np.bincount(index, minlength=len(self.counts))
        np.minimum.at(self.smallest, index, keys)
        np.maximum.at(self.largest, index, keys)


@dataclass
class _Interval:
    """Keys lo..hi (both present in the data), ``below`` values under lo, ``count`` in it."""

    lo: int
    hi: int
    below: int
    count: int
    ranks: list[int] = field(default_factory=list)


def _split(
    hist: _Histogram, below: int, ranks: list[int], found: dict[int, int]
) -> list[_Interval]:
    """Resolve the ranks that a histogram pins down into ``found``; intervals for the rest."""
    ends = below + np.cumsum(hist.counts)
    children: dict[int, _Interval] = {}
    for rank in ranks:
        j = int(np.searchsorted(ends, rank, side="right"))
        end, count = int(ends[j]), int(hist.counts[j])
        lo, hi = int(hist.smallest[j]), int(hist.largest[j])
        if rank == end - count or lo == hi:
            found[rank] = lo
        elif rank == end - 1:
            found[rank] = hi
        else:
            children.setdefault(j, _Interval(lo, hi, end - count, count)).ranks.append(rank)
    return list(children.values())


def _pick(keys: np.ndarray, below: int, ranks: list[int]) -> dict[int, int]:
    """The keys of the given ranks among gathered keys whose first rank is ``below``."""
    if not ranks:
        return {}
    local = sorted(rank - below for rank in ranks)
    keys = np.partition(keys, local)
    return {rank: int(keys[rank - below]) for rank in ranks}


def _changed(pass_number: int) -> ValueError:
    return ValueError(
        f"chunks() gave other values on pass {pass_number} than on pass 1; it must return "
        "a fresh iterator over the same values each time it is called"
    )


def _first_pass(
    chunks: Callable[[], Iterable[np.ndarray]], root: _Histogram, max_gathered: int
) -> tuple[int, np.ndarray | None]:
    """Count and check the values, bin them into ``root``; all their keys if few enough."""
    n = 0
    kept: list[np.ndarray] | None = []
    for number, chunk in enumerate(chunks()):
        values = _values_of(chunk)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(
                f"chunk {number} holds {bad} NaN or infinite value(s); quantiles need finite values"
            )
        keys = _keys(values)
        n += keys.size
        root.add(keys)
        if kept is not None:
            # Small inputs are answered from this pass alone; the keys are dropped as
            # soon as they would exceed the memory allowed for gathering.
            if n <= max_gathered:
                kept.append(keys)
            else:
                kept = None
    if n == 0:
        raise ValueError("no values: chunks() yielded only empty chunks, or none")
    return n, (np.concatenate(kept) if kept is not None else None)


def _refine(
    chunks: Callable[[], Iterable[np.ndarray]],
    root: _Histogram,
    n: int,
    ranks: list[int],
    bins: int,
    max_gathered: int,
) -> dict[int, int]:
    """The keys of ``ranks``, by further passes of histograms and gathers."""
    found: dict[int, int] = {}
    pending = _split(root, 0, ranks, found)
    pass_number = 1
    while pending:
        pass_number += 1
        # Gather the smallest intervals within the budget; refining the others in the
        # same pass costs no extra pass, and their bins fit the budget sooner.
        budget = max_gathered
        gather: list[_Interval] = []
        refine: list[_Interval] = []
        for interval in sorted(pending, key=lambda interval: interval.count):
            if interval.count <= budget:
                gather.append(interval)
                budget -= interval.count
            else:
                refine.append(interval)
        hists = [_Histogram(interval.lo, interval.hi, bins) for interval in refine]
        gathered = [np.empty(interval.count, dtype=np.uint64) for interval in gather]
        filled = [0] * len(gather)
        seen = 0
        for chunk in chunks():
            keys = _keys(_values_of(chunk))
            seen += keys.size
            for hist in hists:
                hist.add(keys)
            for i, interval in enumerate(gather):
                inside = keys[(keys >= interval.lo) & (keys <= interval.hi)]
                if filled[i] + inside.size > interval.count:
                    raise _changed(pass_number)
                gathered[i][filled[i] : filled[i] + inside.size] = inside
                filled[i] += inside.size
        counted = [int(hist.counts.sum()) for hist in hists]
        if seen != n or filled != [i.count for i in gather] or counted != [i.count for i in refine]:
            raise _changed(pass_number)
        for interval, keys in zip(gather, gathered, strict=True):
            found.update(_pick(keys, interval.below, interval.ranks))
        pending = [
            child
            for interval, hist in zip(refine, hists, strict=True)
            for child in _split(hist, interval.below, interval.ranks, found)
        ]
    return found


def _checked_probs(probs: Sequence[float]) -> np.ndarray:
    """``probs`` as np.quantile takes them (dtype kept), checked as np.quantile does."""
    q = np.asanyarray(probs)
    if q.ndim != 1:
        raise ValueError(f"probs must be a sequence of numbers, got shape {q.shape}")
    if q.dtype.kind not in "biuf":
        q = q.astype(np.float64)
    if not (np.all(q >= 0) and np.all(q <= 1)):
        raise ValueError("Quantiles must be in the range [0, 1]")
    return q


def _order_indices(n: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ranks of the lower and upper order statistics, and the weight (None: exact ranks).

    numpy's 'linear' method step for step (``_quantile`` and ``_get_indexes``), with the
    same dtypes: h = (n - 1) q; ranks floor(h) and floor(h) + 1, both n - 1 when
    h >= n - 1; weight h - lower, where lower is -1 (numpy's index of the last value)
    in that case, as numpy computes it.
    """
    virtual = np.asanyarray((n - 1) * q)
    if np.issubdtype(virtual.dtype, np.integer):
        return virtual.astype(np.intp), virtual.astype(np.intp), None
    previous = np.asanyarray(np.floor(virtual))
    following = np.asanyarray(previous + 1)
    above = virtual >= n - 1
    previous[above] = -1
    following[above] = -1
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    return previous % n, following % n, gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A copy of numpy's ``_lerp``: a + (b - a) t, but b - (b - a)(1 - t) where t >= 0.5."""
    diff_b_a = np.subtract(b, a)
    lerp_interpolation = np.asanyarray(np.add(a, diff_b_a * t))
    np.subtract(
        b,
        diff_b_a * (1 - t),
        out=lerp_interpolation,
        where=t >= 0.5,
        casting="unsafe",
        dtype=type(lerp_interpolation.dtype),
    )
    return lerp_interpolation


def exact_quantiles(
    chunks: Callable[[], Iterable[np.ndarray]],
    probs: Sequence[float],
    *,
    bins: int = 4096,
    max_gathered: int = 1 << 20,
) -> list[float]:
    """np.quantile(all values of ``chunks()``, probs), method 'linear', exactly, in bounded memory.

    Reads the values several times, once per call of ``chunks()``: the first pass
    counts them and histograms their order-preserving integer keys, later passes
    histogram ever narrower key intervals around each needed rank (floor((n - 1) p) and
    the next one) until it is pinned down, or until the values left around it fit in
    ``max_gathered`` and are gathered and partitioned. The order statistics are then
    combined with numpy's own interpolation operations, so the results are
    np.quantile's bit for bit (but for the sign of a zero result; see the module
    docstring). Typically 3 passes, 1 when there are at most ``max_gathered`` values,
    and never more than ceil(64 / log2(bins)) (6 for 4096 bins).

    Parameters
    ----------
    chunks
        Returns a fresh iterator over the same 1-D arrays (taken as float64) each time
        it is called; one call is one pass.
    probs
        Probabilities in [0, 1]; their dtype is kept as np.quantile keeps it.
    bins
        Bins per histogram (at least 2); memory is three such arrays per interval.
    max_gathered
        The most values held at once for a final partition (0: none, then histograms
        alone pin each rank down, in more passes).

    Returns
    -------
    list[float]
        The quantiles, in the order of ``probs``.

    Raises
    ------
    ValueError
        If there are no values, a value is NaN or infinite, a probability lies outside
        [0, 1], ``bins`` < 2, ``max_gathered`` < 0, or ``chunks()`` gives other values
        on a later pass.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    if max_gathered < 0:
        raise ValueError(f"max_gathered must be at least 0, got {max_gathered}")
    q = _checked_probs(probs)
    root = _Histogram(0, _KEY_MAX, bins)
    n, kept = _first_pass(chunks, root, max_gathered)
    lower, upper, gamma = _order_indices(n, q)
    ranks = sorted(set(lower.tolist()) | set(upper.tolist()))
    if kept is not None:
        found = _pick(kept, 0, ranks)
    else:
        found = _refine(chunks, root, n, ranks, bins, max_gathered)
    a = _values_of_keys(np.array([found[rank] for rank in lower.tolist()], dtype=np.uint64))
    if gamma is None:
        return a.tolist()
    b = _values_of_keys(np.array([found[rank] for rank in upper.tolist()], dtype=np.uint64))
    return _lerp(a, b, gamma).tolist()
