"""A straightforward NumPy implementation of what ``entropy-pipeline stats`` computes.

Usage::

    python benchmarks/numpy_baseline.py RUN_DIR [--replicates 1000] [--seed S]
        [--level L] [--include-eos true|false]

It exists to be timed side by side with the Polars stats stage
(``benchmarks/stats_scale.py``) and to cross-check its numbers. It reads the Parquet
parts with pyarrow, turns the columns into NumPy arrays (keys, ``S``, ``L``,
``finish_reason``, last token log-prob), aligns samples, p0 and p1 by sorting each
table on (prompt_id, sample_idx) (pyarrow's ``sort_indices``, the one non-NumPy
step: it is faster than NumPy's string sorts), and computes, in the sequence unit
with raw weights (``weights.mode=none``):

* H0, H1 (SNIS), delta H, KL, the identity delta H, first-order dH1 (within-prompt
  unbiased covariances), ESS, per-token NLLs and log-weight min/median/max;
* the cluster bootstrap over prompts with the pipeline's draws (same seed, same
  replicate chunking, so the same resampled prompts) and ``np.bincount`` counts;
* the generation diagnostics, including max |decode - prefill| between samples/ and
  scores/<reference>/ token log-probs, compared block by block in sorted order.

Prompts are grouped by ``np.bincount`` over integer codes of the sorted prompt ids.
The sorted keys of samples, p0 and p1 must be identical (every sampled sequence
scored exactly once). Prints one JSON object (the estimates, under the same names as
``summary.json``, and the time of each step) on stdout.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _common import argument_parser

KEYS = ["prompt_id", "sample_idx"]
SORT_KEYS = [("prompt_id", "ascending"), ("sample_idx", "ascending")]
# The pipeline's bound on the replicate-by-prompt count matrix (uncertainty.py); the
# same chunking makes the same random draws, so the intervals can be compared too.
MAX_MATRIX_ENTRIES = 20_000_000
DIFF_BLOCK_ROWS = 1_000_000
ESTIMATES = ("H0", "H1", "delta_H", "kl", "delta_H1")
SUM_COLUMNS = ("n", "sw", "sw2", "swS1", "swS0", "swL", "swD", "sS0", "sL", "cS", "cL", "cR")


@dataclass
class Sequences:
    """One table of sequences as NumPy arrays, rows in (prompt_id, sample_idx) order."""

    prompt_id: pa.Array
    sample_idx: np.ndarray
    S: np.ndarray
    L: np.ndarray
    stop: np.ndarray
    ended_by_length: np.ndarray
    last: np.ndarray
    order: np.ndarray
    lists: pa.ChunkedArray | None


def _last_values(lists: pa.ListArray) -> np.ndarray:
    """Last element of every list as float64 (0 for an empty list)."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy().astype(np.float64)
    if values.size == 0:
        return np.zeros(len(lists))
    ends = offsets[1:]
    return np.where(ends > offsets[:-1], values[np.maximum(ends - 1, 0)], 0.0)


def read_sequences(
    folder: Path, keep_lists: bool, timings: dict[str, float], label: str
) -> Sequences:
    """Read every ``part-*.parquet`` of ``folder`` and sort it by the keys.

    Parameters
    ----------
    folder : Path
        A ``samples`` or ``scores/<model>`` folder.
    keep_lists : bool
        Keep the per-token log-prob lists (for the decode-vs-prefill diagnostic).
    timings : dict of str to float
        Receives the seconds spent reading and sorting, under ``read <label>`` and
        ``sort <label>``.
    label : str
        Name of the table in ``timings``.

    Returns
    -------
    Sequences
        Keys, S, L, stop flag and last log-prob, sorted by (prompt_id, sample_idx);
        ``order`` maps sorted rows to file rows, ``lists`` stays in file order.
    """
    started = time.perf_counter()
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise SystemExit(f"no Parquet parts in {folder}")
    tables, lasts = [], []
    for part in parts:
        table = pq.read_table(part, columns=[*KEYS, "finish_reason", "token_logprobs", "S", "L"])
        lists = table["token_logprobs"].combine_chunks()
        lasts.append(_last_values(lists))
        if not keep_lists:
            table = table.drop_columns(["token_logprobs"])
        tables.append(table)
    table = pa.concat_tables(tables)
    finish = table["finish_reason"]
    sorted_at = time.perf_counter()
    timings[f"read {label}"] = round(sorted_at - started, 3)
    order = pc.sort_indices(table.select(KEYS), sort_keys=SORT_KEYS).to_numpy()
    sequences = Sequences(
        prompt_id=table["prompt_id"].take(order).combine_chunks(),
        sample_idx=table["sample_idx"].to_numpy()[order],
        S=table["S"].to_numpy()[order],
        L=table["L"].to_numpy()[order],
        stop=pc.equal(finish, "stop").to_numpy()[order],
        ended_by_length=pc.equal(finish, "length").to_numpy()[order],
        last=np.concatenate(lasts)[order],
        order=order,
        lists=table["token_logprobs"] if keep_lists else None,
    )
    timings[f"sort {label}"] = round(time.perf_counter() - sorted_at, 3)
    return sequences


def check_same_keys(reference: Sequences, other: Sequences, name: str) -> None:
    """Refuse tables whose sorted keys differ (a missing or extra score row)."""
    if not (
        np.array_equal(reference.sample_idx, other.sample_idx)
        and reference.prompt_id.equals(other.prompt_id)
    ):
        raise SystemExit(f"{name}: its (prompt_id, sample_idx) keys differ from the samples'")


def max_abs_diff(samples: Sequences, prefill: Sequences) -> float:
    """Largest |decode - prefill| token log-prob, comparing rows in sorted order.

    Parameters
    ----------
    samples : Sequences
        The samples, with ``lists``.
    prefill : Sequences
        The reference model's scores, with ``lists``.

    Returns
    -------
    float
        The maximum over all tokens of all sequences (nats).
    """
    if samples.lists is None or prefill.lists is None:
        raise ValueError("read samples and prefill scores with keep_lists=True")
    largest = 0.0
    for start in range(0, len(samples.order), DIFF_BLOCK_ROWS):
        stop = start + DIFF_BLOCK_ROWS
        decode = samples.lists.take(samples.order[start:stop]).combine_chunks()
        teacher = prefill.lists.take(prefill.order[start:stop]).combine_chunks()
        if not np.array_equal(decode.offsets.to_numpy(), teacher.offsets.to_numpy()):
            raise SystemExit("decode and prefill token log-prob lists differ in length")
        diff = np.abs(decode.flatten().to_numpy() - teacher.flatten().to_numpy())
        if diff.size:
            largest = max(largest, float(diff.max()))
    return largest


def prompt_codes(sorted_ids: pa.Array) -> np.ndarray:
    """0-based code of each row's prompt; ids are sorted, so codes follow id order."""
    changed = pc.not_equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1))
    codes = np.zeros(len(sorted_ids), dtype=np.int64)
    np.cumsum(changed.to_numpy(zero_copy_only=False), out=codes[1:])
    return codes


def prompt_sums(
    codes: np.ndarray,
    log_w: np.ndarray,
    d: np.ndarray,
    s0: np.ndarray,
    s1: np.ndarray,
    length: np.ndarray,
) -> np.ndarray:
    """Per-prompt sufficient statistics, one row per prompt, columns ``SUM_COLUMNS``.

    Parameters
    ----------
    codes : np.ndarray
        Prompt code of each sequence.
    log_w : np.ndarray
        Log-weights to average with.
    d : np.ndarray
        Raw log-weights S1 - S0 over the full sequences.
    s0, s1 : np.ndarray
        Entropy integrands under p0 and p1.
    length : np.ndarray
        Counted tokens L.

    Returns
    -------
    np.ndarray
        Float64 matrix (prompts x 12): n, sums of w, w^2, w S1, w S0, w L, w d, S0, L,
        and the within-prompt unbiased covariances Cov(S0, d), Cov(L, d), Cov(S0/L, d).
    """
    num_prompts = int(codes[-1]) + 1

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(codes, weights=values, minlength=num_prompts)

    n = np.bincount(codes, minlength=num_prompts).astype(np.float64)

    def covariance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mean_x, mean_y = total(x) / n, total(y) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            return total((x - mean_x[codes]) * (y - mean_y[codes])) / (n - 1)

    w = np.exp(log_w - log_w.max())
    length = length.astype(np.float64)
    columns = [
        n,
        total(w),
        total(w * w),
        total(w * s1),
        total(w * s0),
        total(w * length),
        total(w * d),
        total(s0),
        total(length),
        covariance(s0, d),
        covariance(length, d),
        covariance(s0 / np.maximum(length, 1.0), d),
    ]
    return np.column_stack(columns)


def estimates(totals: np.ndarray, num_prompts: int) -> dict[str, np.ndarray]:
    """Sequence-unit estimates from column totals (last axis: ``SUM_COLUMNS``).

    Parameters
    ----------
    totals : np.ndarray
        Sums over (possibly resampled) prompts; shape (12,) or (replicates, 12).
    num_prompts : int
        Number of prompts (the covariance columns are averaged over it).

    Returns
    -------
    dict of str to np.ndarray
        H0, H1, delta_H, kl, delta_H1, identity_delta_H, identity_discrepancy, ess and
        the per-token NLLs, in nats.
    """
    t = dict(zip(SUM_COLUMNS, np.moveaxis(totals, -1, 0), strict=True))
    h0 = -t["sS0"] / t["n"]
    h1 = -t["swS1"] / t["sw"]
    kl = t["swD"] / t["sw"]
    identity = -(t["swS0"] / t["sw"] - t["sS0"] / t["n"]) - kl
    return {
        "H0": h0,
        "H1": h1,
        "delta_H": h1 - h0,
        "kl": kl,
        "delta_H1": -t["cS"] / num_prompts,
        "identity_delta_H": identity,
        "identity_discrepancy": identity - (h1 - h0),
        "ess": t["sw"] ** 2 / t["sw2"],
        "per_token_nll_p0": -t["sS0"] / t["sL"],
        "per_token_nll_p1": -t["swS1"] / t["swL"],
    }


def column_totals(sums: np.ndarray) -> np.ndarray:
    """Column sums of the per-prompt matrix; covariances of one-sequence prompts skipped."""
    totals = sums.sum(axis=0)
    totals[9:] = np.nansum(sums[:, 9:], axis=0)
    return totals


def cluster_bootstrap(
    sums: np.ndarray, replicates: int, seed: int, level: float
) -> dict[str, dict[str, float]]:
    """SE and percentile interval of each estimate by resampling prompts.

    Parameters
    ----------
    sums : np.ndarray
        Per-prompt statistics (``prompt_sums``); NaN covariances count as 0.
    replicates : int
        Number of bootstrap replicates.
    seed : int
        Seed of ``np.random.default_rng``.
    level : float
        Coverage of the percentile interval.

    Returns
    -------
    dict
        ``{estimate: {"se", "low", "high"}}`` in nats.
    """
    matrix = np.nan_to_num(sums)
    num_prompts = matrix.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_MATRIX_ENTRIES // num_prompts)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in ESTIMATES}
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        drawn = rng.integers(0, num_prompts, size=(size, num_prompts))
        drawn += np.arange(size)[:, None] * num_prompts
        counts = np.bincount(drawn.ravel(), minlength=size * num_prompts)
        totals = counts.reshape(size, num_prompts).astype(np.float64) @ matrix
        values = estimates(totals, num_prompts)
        for name in ESTIMATES:
            draws[name].append(values[name])
    tail = (1.0 - level) / 2.0 * 100.0
    result = {}
    for name in ESTIMATES:
        values = np.concatenate(draws[name])
        low, high = np.percentile(values, [tail, 100.0 - tail])
        result[name] = {"se": float(np.std(values, ddof=1)), "low": float(low), "high": float(high)}
    return result


def compute(
    run_dir: Path, replicates: int, seed: int, level: float, include_eos: bool
) -> dict[str, Any]:
    """Every figure of the baseline for the run's first candidate.

    Parameters
    ----------
    run_dir : Path
        A complete run directory.
    replicates : int
        Bootstrap replicates.
    seed : int
        Bootstrap seed.
    level : float
        Interval coverage.
    include_eos : bool
        Count the final stop token in S0, S1 and L (log-weights always include it).

    Returns
    -------
    dict
        Estimates named as in ``summary.json``, diagnostics, and ``timings`` (s).
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 3)
        clock = now

    manifest = json.loads((run_dir / "manifest.json").read_text())
    reference = manifest["config"]["reference_model"]
    candidate = next(m for m in manifest["config"]["models"] if m != reference)

    samples = read_sequences(run_dir / "samples", True, timings, "samples")
    p0 = read_sequences(run_dir / "scores" / reference, True, timings, f"scores/{reference}")
    p1 = read_sequences(run_dir / "scores" / candidate, False, timings, f"scores/{candidate}")
    clock = time.perf_counter()
    check_same_keys(samples, p0, reference)
    check_same_keys(samples, p1, candidate)
    codes = prompt_codes(samples.prompt_id)
    lap("check keys, prompt codes")

    drop0 = p0.stop & (not include_eos)
    drop1 = p1.stop & (not include_eos)
    s0 = p0.S - np.where(drop0, p0.last, 0.0)
    s1 = p1.S - np.where(drop1, p1.last, 0.0)
    length = p0.L - drop0.astype(np.int32)
    log_w_raw = p1.S - p0.S
    sums = prompt_sums(codes, log_w_raw, log_w_raw, s0, s1, length)
    num_prompts = sums.shape[0]
    point = {k: float(v) for k, v in estimates(column_totals(sums), num_prompts).items()}
    row: dict[str, Any] = {f"{k}_nats": v for k, v in point.items() if k != "ess"}
    row["ess"] = point["ess"]
    row["num_sequences"] = len(codes)
    row["ess_fraction"] = point["ess"] / len(codes)
    row["log_weight_min"] = float(log_w_raw.min())
    row["log_weight_median"] = float(np.median(log_w_raw))
    row["log_weight_max"] = float(log_w_raw.max())
    lap("point estimates")

    for name, interval in cluster_bootstrap(sums, replicates, seed, level).items():
        for part, value in interval.items():
            row[f"{name}_{part}_nats"] = value
    lap(f"bootstrap ({replicates} replicates)")

    row["num_prompts"] = num_prompts
    row["avg_gen_length"] = float(samples.L.mean())
    row["fraction_ended_by_eos"] = float(samples.stop.mean())
    row["fraction_ended_by_length"] = float(samples.ended_by_length.mean())
    row["max_abs_decode_vs_prefill_logprob_diff"] = max_abs_diff(samples, p0)
    lap("generation diagnostics")
    for name in (*ESTIMATES, "per_token_nll_p0", "per_token_nll_p1"):
        row[f"{name}_bits"] = row[f"{name}_nats"] / math.log(2.0)
    row["timings"] = timings
    return row


def main(argv: list[str] | None = None) -> int:
    """Command line of the baseline: print the figures as JSON; return the exit status."""
    parser = argument_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="interval coverage")
    parser.add_argument(
        "--include-eos", choices=["true", "false"], default="true", help="entropy.include_eos"
    )
    args = parser.parse_args(argv)
    row = compute(args.run_dir, args.replicates, args.seed, args.level, args.include_eos == "true")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
