"""An independent implementation of the statistics, for checking the pipeline's.

It reads the Parquet artifacts with pyarrow (not Polars), rebuilds S and L from the
per-token log-probs in float64 with NumPy, and applies the formulas of DESIGN.md §2
written out directly. It shares no code with ``pipeline.stats``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _read(folder: Path) -> dict[tuple[str, int], dict]:
    rows = [
        row
        for part in sorted(folder.glob("part-*.parquet"))
        for row in pq.read_table(part).to_pylist()
    ]
    return {(r["prompt_id"], r["sample_idx"]): r for r in rows}


def reference_summary(
    run_dir: Path, reference: str, candidate: str, unit: str, include_eos: bool
) -> dict:
    samples = _read(run_dir / "samples")
    scores0 = _read(run_dir / "scores" / reference)
    scores1 = _read(run_dir / "scores" / candidate)
    keys = sorted(samples)
    s0_full, s1_full, s0, s1, lengths = [], [], [], [], []
    for key in keys:
        ended = samples[key]["finish_reason"] == "stop"
        lp0 = np.asarray(scores0[key]["token_logprobs"], dtype=np.float64)
        lp1 = np.asarray(scores1[key]["token_logprobs"], dtype=np.float64)
        s0_full.append(math.fsum(lp0))
        s1_full.append(math.fsum(lp1))
        counted = slice(0, len(lp0) - 1) if (ended and not include_eos) else slice(0, len(lp0))
        s0.append(math.fsum(lp0[counted]))
        s1.append(math.fsum(lp1[counted]))
        lengths.append(len(lp0[counted]))
    s0_full, s1_full, s0, s1 = map(np.asarray, (s0_full, s1_full, s0, s1))
    prompt_of = np.asarray([k[0] for k in keys])
    lengths = np.asarray(lengths, dtype=np.float64)
    log_w = s1_full - s0_full
    w = np.exp(log_w - log_w.max())
    n = len(keys)
    if unit == "sequence":
        h0 = -s0.sum() / n
        h1 = -(w * s1).sum() / w.sum()
    else:
        h0 = -s0.sum() / lengths.sum()
        h1 = -(w * s1).sum() / (w * lengths).sum()
    kl = (w * log_w).sum() / (w.sum() if unit == "sequence" else (w * lengths).sum())
    # First-order term: mean over prompts of the unbiased within-prompt covariances.
    cov_s0, cov_len = [], []
    for prompt in sorted(set(prompt_of)):
        rows = prompt_of == prompt
        cov_s0.append(np.cov(s0[rows], log_w[rows])[0, 1])
        cov_len.append(np.cov(lengths[rows], log_w[rows])[0, 1])
    if unit == "sequence":
        delta_h1 = -np.mean(cov_s0)
        reweighting = (w * s0).sum() / w.sum() - s0.mean()
    else:
        delta_h1 = -(np.mean(cov_s0) + h0 * np.mean(cov_len)) / lengths.mean()
        reweighting = (w * s0).sum() / (w * lengths).sum() - s0.sum() / lengths.sum()
    nll0 = -s0.sum() / lengths.sum()
    nll1 = -(w * s1).sum() / (w * lengths).sum()
    ln2 = math.log(2)
    reasons = [samples[k]["finish_reason"] for k in keys]
    decode_diff = max(
        abs(a - b)
        for k in keys
        for a, b in zip(samples[k]["token_logprobs"], scores0[k]["token_logprobs"], strict=True)
    )
    return {
        "num_prompts": len({k[0] for k in keys}),
        "num_sequences": n,
        "H0_nats": h0,
        "H1_nats": h1,
        "delta_H_nats": h1 - h0,
        "H0_bits": h0 / ln2,
        "H1_bits": h1 / ln2,
        "delta_H_bits": (h1 - h0) / ln2,
        "kl_nats": kl,
        "kl_bits": kl / ln2,
        "delta_H1_nats": delta_h1,
        "delta_H1_bits": delta_h1 / ln2,
        "identity_delta_H_nats": -reweighting - kl,
        "ess": w.sum() ** 2 / (w**2).sum(),
        "ess_fraction": w.sum() ** 2 / (w**2).sum() / n,
        "log_weight_min": log_w.min(),
        "log_weight_median": float(np.median(log_w)),
        "log_weight_max": log_w.max(),
        "avg_gen_length": float(np.mean([len(samples[k]["completion_token_ids"]) for k in keys])),
        "per_token_nll_p0_nats": nll0,
        "per_token_nll_p1_nats": nll1,
        "per_token_nll_p0_bits": nll0 / ln2,
        "per_token_nll_p1_bits": nll1 / ln2,
        "fraction_ended_by_eos": reasons.count("stop") / n,
        "fraction_ended_by_length": reasons.count("length") / n,
        "max_abs_decode_vs_prefill_logprob_diff": decode_diff,
    }
