"""An independent implementation of the statistics, for checking the pipeline's.

It reads the Parquet artifacts with pyarrow (not Polars), rebuilds S and L from the
per-token log-probs in float64 with NumPy, and applies the formulas of the README
written out directly, one prompt at a time where that is the plainest. It shares no
code with ``pipeline.stats``; in particular the standard errors use the influence
functions written out by hand (not derived from the formulas), the covariances'
jackknife deletes each sequence and recomputes the covariance, and the weights are
shifted by the run's maximum (not per prompt).
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow.parquet as pq


def _read(folder: Path) -> dict[tuple[str, int], dict]:
    rows = [
        row
        # rglob: samples/<model>/ holds a further sampling model's draws.
        for part in sorted(folder.rglob("part-*.parquet"))
        for row in pq.read_table(part).to_pylist()
    ]
    return {(r["prompt_id"], r["sample_idx"]): r for r in rows}


def _weighted_cov(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """sum w (x - x_w)(y - y_w) / (sum w - sum w^2 / sum w); unbiased when w = 1."""
    xm, ym = np.sum(w * x) / np.sum(w), np.sum(w * y) / np.sum(w)
    return float(np.sum(w * (x - xm) * (y - ym)) / (np.sum(w) - np.sum(w * w) / np.sum(w)))


class _Run:
    """The columns of one (reference, candidate) comparison, as NumPy arrays."""

    def __init__(
        self,
        run_dir: Path,
        reference: str,
        candidate: str,
        include_eos: bool,
        sampling_models: list[str],
        num_samples: int,
    ) -> None:
        samples = _read(run_dir / "samples")
        scores = {
            m: _read(run_dir / "scores" / m)
            for m in dict.fromkeys([reference, candidate, *sampling_models])
        }
        self.keys = sorted(samples)
        self.samples = samples
        full = {m: [] for m in scores}
        s0, s1, lengths = [], [], []
        for key in self.keys:
            ended = samples[key]["finish_reason"] == "stop"
            for m, table in scores.items():
                full[m].append(math.fsum(np.asarray(table[key]["token_logprobs"], np.float64)))
            lp0 = np.asarray(scores[reference][key]["token_logprobs"], dtype=np.float64)
            lp1 = np.asarray(scores[candidate][key]["token_logprobs"], dtype=np.float64)
            keep = len(lp0) - 1 if (ended and not include_eos) else len(lp0)
            s0.append(math.fsum(lp0[:keep]))
            s1.append(math.fsum(lp1[:keep]))
            lengths.append(keep)
        full = {m: np.asarray(v) for m, v in full.items()}
        self.s0, self.s1 = np.asarray(s0), np.asarray(s1)
        self.length = np.asarray(lengths, dtype=np.float64)
        self.length_full = np.asarray(
            [len(samples[k]["completion_token_ids"]) for k in self.keys], dtype=np.float64
        )
        self.d = full[candidate] - full[reference]
        self.e = self.d - (self.s1 - self.s0)
        self.inv_length = np.array([1.0 / x if x > 0 else 0.0 for x in self.length])
        stacked = np.stack([full[m] for m in sampling_models])
        top = stacked.max(axis=0)
        log_q = top + np.log(np.exp(stacked - top).sum(axis=0)) - math.log(len(sampling_models))
        self.log_w0 = full[reference] - log_q
        self.log_w1 = full[candidate] - log_q
        self.w0 = np.exp(self.log_w0 - self.log_w0.max())
        self.w1 = np.exp(self.log_w1 - self.log_w1.max())
        self.prompt = np.asarray([k[0] for k in self.keys])
        self.prompts = sorted(set(self.prompt))
        self.stratum = np.asarray([f"{k[0]}/{k[1] // num_samples}" for k in self.keys])
        self.n = len(self.keys)

    def covariance_and_pseudo(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean over prompts of Cov_q(x, d) under w0, and the jackknife pseudo-values
        -(n_q - 1) Cov_q(without i), by deleting each sequence in turn."""
        covs, pseudo = [], np.zeros(self.n)
        for prompt in self.prompts:
            rows = np.flatnonzero(self.prompt == prompt)
            w, xs, ds = self.w0[rows], x[rows], self.d[rows]
            covs.append(_weighted_cov(xs, ds, w))
            for j, row in enumerate(rows):
                keep = np.arange(len(rows)) != j
                left_out = _weighted_cov(xs[keep], ds[keep], w[keep]) if len(rows) > 2 else math.nan
                pseudo[row] = -(len(rows) - 1) * left_out
        return float(np.mean(covs)), pseudo

    def standard_error(self, psi: np.ndarray) -> float:
        """sqrt(N^-2 sum_s G_s/(G_s - 1) sum_{i in s} (psi_i - mean_s psi)^2)."""
        total = 0.0
        for stratum in sorted(set(self.stratum)):
            values = psi[self.stratum == stratum]
            g = len(values)
            total += g / (g - 1) * np.sum((values - values.mean()) ** 2) if g > 1 else math.nan
        return math.sqrt(total) / self.n


def _estimates_and_influence(run: _Run, unit: str) -> dict[str, tuple[float, np.ndarray]]:
    """Each interval estimate and its influence values psi, written out by hand."""
    w0, w1, s0, s1, length = run.w0, run.w1, run.s0, run.s1, run.length
    m = np.mean
    if unit == "sequence":
        h0 = -m(w0 * s0) / m(w0)
        psi_h0 = w0 * (-s0 - h0) / m(w0)
        h1 = -m(w1 * s1) / m(w1)
        psi_h1 = w1 * (-s1 - h1) / m(w1)
        kl = m(w1 * run.d) / m(w1)
        psi_kl = w1 * (run.d - kl) / m(w1)
    else:
        h0 = -m(w0 * s0) / m(w0 * length)
        psi_h0 = w0 * (-s0 - h0 * length) / m(w0 * length)
        h1 = -m(w1 * s1) / m(w1 * length)
        psi_h1 = w1 * (-s1 - h1 * length) / m(w1 * length)
        kl = m(w1 * run.d) / m(w1 * run.length_full)
        psi_kl = w1 * (run.d - kl * run.length_full) / m(w1 * run.length_full)
    cov_s, pseudo_s = run.covariance_and_pseudo(s0)
    e_bar = m(w0 * run.e) / m(w0)
    psi_e_bar = w0 * (run.e - e_bar) / m(w0)
    if unit == "sequence":
        delta_h1 = -cov_s + e_bar
        psi_delta_h1 = -pseudo_s + psi_e_bar
    else:
        cov_l, pseudo_l = run.covariance_and_pseudo(length)
        h0_token = -m(w0 * s0) / m(w0 * length)
        psi_h0_token = w0 * (-s0 - h0_token * length) / m(w0 * length)
        mean_length = m(w0 * length) / m(w0)
        psi_mean_length = w0 * (length - mean_length) / m(w0)
        delta_h1 = (-cov_s + e_bar - h0_token * cov_l) / mean_length
        psi_delta_h1 = (
            -pseudo_s
            + psi_e_bar
            - h0_token * pseudo_l
            - cov_l * psi_h0_token
            - delta_h1 * psi_mean_length
        ) / mean_length
    rate0 = -m(w0 * s0 * run.inv_length) / m(w0)
    psi_rate0 = w0 * (-s0 * run.inv_length - rate0) / m(w0)
    rate1 = -m(w1 * s1 * run.inv_length) / m(w1)
    psi_rate1 = w1 * (-s1 * run.inv_length - rate1) / m(w1)
    cov_r, pseudo_r = run.covariance_and_pseudo((s0 + 1.0) * run.inv_length)
    e_rate = m(w0 * run.e * run.inv_length) / m(w0)
    psi_e_rate = w0 * (run.e * run.inv_length - e_rate) / m(w0)
    return {
        "H0": (h0, psi_h0),
        "H1": (h1, psi_h1),
        "delta_H": (h1 - h0, psi_h1 - psi_h0),
        "kl": (kl, psi_kl),
        "delta_H1": (delta_h1, psi_delta_h1),
        "H0_rate": (rate0, psi_rate0),
        "H1_rate": (rate1, psi_rate1),
        "delta_H_rate": (rate1 - rate0, psi_rate1 - psi_rate0),
        "delta_H1_rate": (-cov_r + e_rate, -pseudo_r + psi_e_rate),
    }


def _ess(w: np.ndarray) -> float:
    return float(w.sum() ** 2 / (w**2).sum())


def reference_summary(
    run_dir: Path,
    reference: str,
    candidate: str,
    unit: str,
    include_eos: bool,
    sampling_models: list[str] | None = None,
    num_samples: int = 0,
    level: float = 0.95,
) -> dict:
    """Every summary figure this module can compute independently (prompt-set intervals).

    ``sampling_models`` (default: the reference alone) and ``num_samples`` describe
    mixture sampling, where sample_idx // num_samples is the sampling model's index.
    """
    sampling_models = sampling_models or [reference]
    run = _Run(run_dir, reference, candidate, include_eos, sampling_models, num_samples or 10**9)
    ln2 = math.log(2)
    z = NormalDist().inv_cdf((1 + level) / 2)
    result: dict = {}
    for name, (value, psi) in _estimates_and_influence(run, unit).items():
        se = run.standard_error(psi)
        for part, number in (
            ("", value),
            ("_se", se),
            ("_low", value - z * se),
            ("_high", value + z * se),
        ):
            result[f"{name}{part}_nats"] = number
            result[f"{name}{part}_bits"] = number / ln2
    nll0 = -(run.w0 * run.s0).sum() / (run.w0 * run.length).sum()
    nll1 = -(run.w1 * run.s1).sum() / (run.w1 * run.length).sum()
    raw = np.exp(run.log_w1)
    per_prompt_ess = [_ess(run.w1[run.prompt == p]) for p in run.prompts]
    low, p05, median = np.quantile(per_prompt_ess, [0.0, 0.05, 0.5])
    reasons = [run.samples[k]["finish_reason"] for k in run.keys]
    decode_diff = 0.0
    scores = {m: _read(run_dir / "scores" / m) for m in sampling_models}
    for key in run.keys:
        sampler = sampling_models[min(key[1] // (num_samples or 10**9), len(sampling_models) - 1)]
        decode = run.samples[key]["token_logprobs"]
        prefill = scores[sampler][key]["token_logprobs"]
        decode_diff = max(decode_diff, *(abs(a - b) for a, b in zip(decode, prefill, strict=True)))
    result.update(
        {
            "num_prompts": len(run.prompts),
            "num_sequences": run.n,
            "per_token_nll_p0_nats": nll0,
            "per_token_nll_p1_nats": nll1,
            "per_token_nll_p0_bits": nll0 / ln2,
            "per_token_nll_p1_bits": nll1 / ln2,
            "ess": _ess(run.w1),
            "ess_fraction": _ess(run.w1) / run.n,
            "prompt_ess_min": low,
            "prompt_ess_p05": p05,
            "prompt_ess_median": median,
            "mean_weight": raw.mean(),
            "mean_weight_se": run.standard_error(raw),
            "mean_weight_z": (raw.mean() - 1.0) / run.standard_error(raw),
            "log_weight_min": run.log_w1.min(),
            "log_weight_median": float(np.median(run.log_w1)),
            "log_weight_max": run.log_w1.max(),
            "avg_gen_length": float(np.mean(run.length_full)),
            "fraction_ended_by_eos": reasons.count("stop") / run.n,
            "fraction_ended_by_length": reasons.count("length") / run.n,
            "max_abs_decode_vs_prefill_logprob_diff": decode_diff,
        }
    )
    return result


def reference_per_prompt(
    run_dir: Path, reference: str, candidate: str, unit: str, include_eos: bool
) -> dict[str, dict[str, float]]:
    """Per prompt (reference alone sampling): H0, H1, delta_H, kl, delta_H1 with SEs, ESS.

    Each prompt on its own: its estimates, and the same influence functions with its
    own estimates and normalisers; SE^2 = G/(G - 1) sum (psi - mean psi)^2 / G^2.
    """
    run = _Run(run_dir, reference, candidate, include_eos, [reference], 10**9)
    result = {}
    for prompt in run.prompts:
        rows = run.prompt == prompt
        sub = _Run.__new__(_Run)
        for name in ("s0", "s1", "length", "length_full", "d", "e", "inv_length"):
            setattr(sub, name, getattr(run, name)[rows])
        sub.w0 = np.exp(run.log_w0[rows] - run.log_w0[rows].max())
        sub.w1 = np.exp(run.log_w1[rows] - run.log_w1[rows].max())
        sub.prompt = run.prompt[rows]
        sub.prompts = [prompt]
        sub.stratum = run.prompt[rows]
        sub.n = int(rows.sum())
        figures = {}
        for name, (value, psi) in _estimates_and_influence(sub, unit).items():
            if name in ("H0", "H1", "delta_H", "kl", "delta_H1"):
                figures[f"{name}_nats"] = value
                figures[f"{name}_se_nats"] = sub.standard_error(psi)
        figures["ess"] = _ess(sub.w1)
        result[prompt] = figures
    return result
