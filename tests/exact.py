"""Exact answers for the enumerable model pairs: every completion listed, float64.

A completion of at most ``MAX_TOKENS`` ids either ends with EOS or reaches the limit;
the ids before EOS are any of the other ids (BOS included). With 5 ids and 4 tokens a
prompt has 1 + 4 + 16 + 64 + 256 = 341 completions, so a model is a table of exact
probabilities, prompt x completion (``Distribution``), scored with Hugging Face
transformers in float64, and every quantity the pipeline estimates is a finite sum.

Notation, per prompt q, for a completion y under model m (E_m: expectation over the
completions of q under p_m):

* S_m(y) = log p_m(y | q), the full sequence (EOS included), and L(y) its length;
* with ``include_eos`` false the integrand drops the final EOS: S'_m = S_m - log
  p_m(EOS | q, y_<T) and L' = L - 1 for a completion that ends with EOS (S' = S, L' = L
  with ``include_eos`` true);
* d = S_1 - S_0 = log w (always the full sequence) and e = d - (S'_1 - S'_0), the
  log-ratio of the positions the integrand leaves out (the EOS position, or 0).

Pooling over prompts follows the pipeline, where every prompt has the same number of
samples: a "sequence" or "rate" value is a mean over prompts, a "per_token" value a
ratio of sums over prompts. Estimands (all in nats):

=============  ================================  ============================
estimand       H(p_m)                            unit
=============  ================================  ============================
``sequence``   -mean_q E_m[S'_m]                 nats per sequence
``per_token``  -sum_q E_m[S'_m] / sum_q E_m[L']  nats per token (ratio of means)
``rate``       -mean_q E_m[S'_m / L']            nats per token, per sequence
=============  ================================  ============================

A completion with L' = 0 (EOS alone, not counted) has rate 0 (its integrand is empty).

The geometric path p_eps proportional to p0^(1-eps) p1^eps (sequence level,
normalised per prompt over the enumerated completions) gives the exact slope at eps =
0 that the first-order term dH1 must reproduce (``path``, ``slope``); its token-level
log-probs are those of the marginals: p_eps(EOS | y_<T) = p_eps(y) / P_eps(y_<T),
P_eps(u) = the total probability of the completions that start with u.

``draw_frame`` draws completions by their exact probabilities and returns the paired
frame the statistics take (``pipeline.stats.estimators``), so repeated runs cost no
model: coverage and bias are measured against the exact values of the same prompts.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "data" / "models"
PROMPTS_FILE = ROOT / "data" / "enumerable_prompts.jsonl"
VOCAB_SIZE, EOS, MAX_TOKENS = 5, 1, 4

Estimand = Literal["sequence", "per_token", "rate"]
ESTIMANDS: tuple[Estimand, ...] = ("sequence", "per_token", "rate")


@dataclass(frozen=True)
class Completions:
    """Every completion of one length limit (K of them), with what the sums need.

    ``extends[k, j]`` is 1 when completion j starts with the ids of completion k before
    its EOS (the prefix u = y_<T of k; completion k itself included), so that P(u) =
    sum_j extends[k, j] p(j) is the probability of that prefix.
    """

    token_ids: list[list[int]]
    length: np.ndarray
    ends_with_eos: np.ndarray
    extends: np.ndarray

    @classmethod
    def build(cls, vocab_size: int, eos: int, max_tokens: int) -> Completions:
        others = [i for i in range(vocab_size) if i != eos]
        token_ids = []
        for length in range(max_tokens + 1):
            for body in itertools.product(others, repeat=length):
                token_ids.append([*body, eos] if length < max_tokens else list(body))
        ends_with_eos = np.array([ids[-1:] == [eos] for ids in token_ids])
        prefixes = [ids[:-1] if ids[-1:] == [eos] else None for ids in token_ids]
        extends = np.array(
            [[u is not None and ids[: len(u)] == u for ids in token_ids] for u in prefixes],
            dtype=np.float64,
        )
        length = np.array([len(ids) for ids in token_ids], dtype=np.float64)
        return cls(token_ids, length, ends_with_eos, extends)


@dataclass(frozen=True)
class Distribution:
    """One model's exact distribution over the completions of each prompt.

    ``log_p[q, k]`` = log p(y_k | q) (nats, full sequence); ``eos_logprob[q, k]`` = log
    p(EOS | q, y_<T) of the final EOS of completion k, 0 for a completion without EOS.
    """

    log_p: np.ndarray
    eos_logprob: np.ndarray

    @property
    def p(self) -> np.ndarray:
        """Probabilities, prompt x completion."""
        return np.exp(self.log_p)


@functools.cache
def completions() -> Completions:
    """The completions of the enumerable pairs (5 ids, EOS = 1, at most 4 tokens)."""
    return Completions.build(VOCAB_SIZE, EOS, MAX_TOKENS)


@functools.cache
def prompt_token_ids(path: Path = PROMPTS_FILE) -> tuple[tuple[int, ...], ...]:
    """Token ids of the enumerable prompts, tokenized by Hugging Face (BOS prepended)."""
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "enum-p0")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return tuple(tuple(ids) for ids in tokenizer(texts)["input_ids"])


@functools.cache
def score(model_dir: Path, prompts: tuple[tuple[int, ...], ...]) -> Distribution:
    """Teacher-force every completion of every prompt with transformers in float64.

    One forward pass per prompt over the prompt followed by each of the 4^3 bodies of
    ``MAX_TOKENS`` - 1 non-EOS ids gives the next-token distribution at every context
    a completion passes through (each shorter prefix is the start of some body), so a
    completion's log-prob is a sum of entries of that table.
    """
    comps = completions()
    others = [i for i in range(VOCAB_SIZE) if i != EOS]
    bodies = list(itertools.product(others, repeat=MAX_TOKENS - 1))
    row_of = {body: row for row, body in enumerate(bodies)}
    # Completion k's token t is read at (row, t) of the table: the row of any body that
    # starts with the completion's first t ids (padded with the first non-EOS id).
    rows, steps, tokens, owners = [], [], [], []
    for k, ids in enumerate(comps.token_ids):
        for t, token in enumerate(ids):
            padded = tuple(ids[:t]) + (others[0],) * (MAX_TOKENS - 1 - t)
            rows.append(row_of[padded])
            steps.append(t)
            tokens.append(token)
            owners.append(k)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    last = np.cumsum(comps.length).astype(int) - 1  # index of each completion's last token
    log_p, eos_logprob = [], []
    for prompt in prompts:
        ids = torch.tensor([list(prompt) + list(body) for body in bodies])
        with torch.no_grad():
            table = torch.log_softmax(model(ids).logits[:, len(prompt) - 1 :], dim=-1).numpy()
        token_logprob = table[rows, steps, tokens]
        log_p.append(np.bincount(owners, weights=token_logprob, minlength=len(comps.length)))
        eos_logprob.append(np.where(comps.ends_with_eos, token_logprob[last], 0.0))
    return Distribution(np.array(log_p), np.array(eos_logprob))


def load(name: str, prompts: tuple[tuple[int, ...], ...] | None = None) -> Distribution:
    """The exact distribution of ``data/models/<name>`` on the enumerable prompts."""
    return score(MODELS / name, prompt_token_ids() if prompts is None else prompts)


def path(p0: Distribution, p1: Distribution, eps: float) -> Distribution:
    """p_eps proportional to p0^(1-eps) p1^eps per prompt, with its EOS log-probs.

    log p_eps = (1-eps) log p0 + eps log p1 - log Z_eps(q); the EOS log-prob of a
    completion is log p_eps(y) - log P_eps(y_<T) (marginal of the prefix).
    """
    comps = completions()
    unnormalised = (1.0 - eps) * p0.log_p + eps * p1.log_p
    shift = unnormalised.max(axis=1, keepdims=True)
    log_z = shift + np.log(np.exp(unnormalised - shift).sum(axis=1, keepdims=True))
    log_p = unnormalised - log_z
    with np.errstate(divide="ignore"):
        log_prefix = np.log(np.exp(log_p) @ comps.extends.T)
    return Distribution(log_p, np.where(comps.ends_with_eos, log_p - log_prefix, 0.0))


def integrand(m: Distribution, include_eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(S'_m, L') per prompt and completion: the counted log-prob sum and length."""
    comps = completions()
    drop = comps.ends_with_eos & (not include_eos)
    return m.log_p - np.where(drop, m.eos_logprob, 0.0), comps.length - drop


def _per_token_inverse(length: np.ndarray) -> np.ndarray:
    """1 / L', and 0 where L' = 0 (an empty integrand counts 0 in the rate)."""
    return np.divide(1.0, length, out=np.zeros_like(length), where=length > 0)


def entropy(m: Distribution, estimand: Estimand, include_eos: bool) -> float:
    """H(p_m) of one estimand (module docstring table), nats."""
    s, length = integrand(m, include_eos)
    p = m.p
    if estimand == "sequence":
        return float(-(p * s).sum(axis=1).mean())
    if estimand == "per_token":
        return float(-(p * s).sum() / (p * length).sum())
    return float(-(p * s * _per_token_inverse(length)).sum(axis=1).mean())


def kl(p0: Distribution, p1: Distribution, estimand: Estimand) -> float:
    """KL(p1 || p0) = E_1[d]: mean over prompts ("sequence") or per full-sequence token.

    Per token the denominator is the full length L (EOS included) whatever
    ``include_eos`` says: the divergence is one of full sequences.
    """
    d, p = p1.log_p - p0.log_p, p1.p
    if estimand == "sequence":
        return float((p * d).sum(axis=1).mean())
    if estimand == "per_token":
        return float((p * d).sum() / (p * completions().length).sum())
    raise ValueError(f"KL has no {estimand!r} form")


def _covariance(p: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cov_p(x, y) per prompt (rows)."""
    x_c = x - (p * x).sum(axis=1, keepdims=True)
    y_c = y - (p * y).sum(axis=1, keepdims=True)
    return (p * x_c * y_c).sum(axis=1)


def first_order(
    p0: Distribution,
    p1: Distribution,
    estimand: Estimand,
    include_eos: bool,
    eos_term: bool = True,
) -> float:
    """The first-order term dH1 of docs/design.md §2, evaluated exactly under p0 (nats).

    With d = S1 - S0 (full), e = d - (S'1 - S'0), h0 = H(p0) per token, Cov and E under
    p0 per prompt:

    * sequence: -mean_q Cov(S'0, d) + mean_q E[e];
    * per_token: (-sum_q Cov(S'0, d) + sum_q E[e] - h0 sum_q Cov(L', d)) / sum_q E[L'];
    * rate: -mean_q Cov((S'0 + 1) / L', d) + mean_q E[e / L'] (1/L' = 0 where L' = 0).

    ``eos_term=False`` leaves out the E[e] terms (the pre-fix formula, wrong when
    ``include_eos`` is false).
    """
    s0, length = integrand(p0, include_eos)
    s1, _ = integrand(p1, include_eos)
    d = p1.log_p - p0.log_p
    e = (d - (s1 - s0)) if eos_term else np.zeros_like(d)
    p = p0.p
    if estimand == "sequence":
        return float((-_covariance(p, s0, d) + (p * e).sum(axis=1)).mean())
    if estimand == "per_token":
        lengths = np.broadcast_to(length, p.shape)
        h0 = -(p * s0).sum() / (p * lengths).sum()
        numerator = -_covariance(p, s0, d).sum() + (p * e).sum()
        return float((numerator - h0 * _covariance(p, lengths, d).sum()) / (p * lengths).sum())
    inverse = np.broadcast_to(_per_token_inverse(length), p.shape)
    return float((-_covariance(p, (s0 + 1.0) * inverse, d) + (p * e * inverse).sum(axis=1)).mean())


def delta_entropy(
    p0: Distribution, p1: Distribution, estimand: Estimand, include_eos: bool, eps: float
) -> float:
    """H(p_eps) - H(p0) along the geometric path (nats)."""
    return entropy(path(p0, p1, eps), estimand, include_eos) - entropy(p0, estimand, include_eos)


def slope(
    p0: Distribution, p1: Distribution, estimand: Estimand, include_eos: bool, step: float
) -> float:
    """d dH(eps) / d eps at eps = 0 by the central difference of exact values (nats).

    The error is O(step^2) (truncation) plus about 1e-16 / step (float64 rounding).
    """
    ahead = delta_entropy(p0, p1, estimand, include_eos, step)
    behind = delta_entropy(p0, p1, estimand, include_eos, -step)
    return (ahead - behind) / (2.0 * step)


def weight_moments(p0: Distribution, p1: Distribution) -> dict[str, float]:
    """Exact weight diagnostics of sampling from p0 with w = p1/p0 (full sequences).

    ``mean_weight`` = mean_q E_0[w] (the mean-weight test's target: 1 when p1's support
    is covered, as it is here); ``ess_fraction`` = (mean_q E_0[w])^2 / mean_q E_0[w^2],
    the limit of the pooled Kish ESS/N with equal samples per prompt;
    ``min_prompt_ess_fraction`` the smallest per-prompt E_0[w]^2 / E_0[w^2].
    """
    p, w = p0.p, np.exp(p1.log_p - p0.log_p)
    first, second = (p * w).sum(axis=1), (p * w * w).sum(axis=1)
    return {
        "mean_weight": float(first.mean()),
        "ess_fraction": float(first.mean() ** 2 / second.mean()),
        "min_prompt_ess_fraction": float((first**2 / second).min()),
    }


def exact_values(
    p0: Distribution, p1: Distribution, estimand: Estimand, include_eos: bool
) -> dict[str, float]:
    """H0, H1, delta_H, delta_H1 (the first-order term) and, but for ``rate``, kl (nats)."""
    h0, h1 = entropy(p0, estimand, include_eos), entropy(p1, estimand, include_eos)
    values = {
        "H0": h0,
        "H1": h1,
        "delta_H": h1 - h0,
        "delta_H1": first_order(p0, p1, estimand, include_eos),
    }
    if estimand != "rate":
        values["kl"] = kl(p0, p1, estimand)
    return values


def draw_frame(
    p0: Distribution,
    p1: Distribution,
    include_eos: bool,
    per_model: int,
    rng: np.random.Generator,
    sampling: Sequence[Distribution] = (),
) -> pl.DataFrame:
    """A paired frame of completions drawn by their exact probabilities.

    Each sampling model (default: p0 alone) draws ``per_model`` completions of every
    prompt. Columns as the stats stage builds them from a run: ``prompt_id``,
    ``sample_idx``, ``stratum`` (index of the sampling model), the integrands ``S0``,
    ``S1`` and length ``L`` (EOS dropped when ``include_eos`` is false), ``L_full``,
    ``d`` = S1_full - S0_full, and the raw log-weights against the equal mixture q of
    the sampling models, ``log_w0`` = log p0/q and ``log_w1`` = ``log_w`` = log p1/q.
    """
    samplers = list(sampling) or [p0]
    s0, length = integrand(p0, include_eos)
    s1, _ = integrand(p1, include_eos)
    stacked = np.stack([m.log_p for m in samplers])
    shift = stacked.max(axis=0)
    log_q = shift + np.log(np.exp(stacked - shift).mean(axis=0))
    num_prompts = p0.log_p.shape[0]
    prompt = np.repeat(np.arange(num_prompts), per_model)
    parts = []
    for index, sampler in enumerate(samplers):
        cdf = np.cumsum(sampler.p, axis=1)
        cdf /= cdf[:, -1:]  # ends at exactly 1, so u in [0, 1) always finds a completion
        u = rng.random((num_prompts, per_model))
        k = np.concatenate(
            [np.searchsorted(c, row, side="right") for c, row in zip(cdf, u, strict=True)]
        )
        parts.append(
            pl.DataFrame(
                {
                    "prompt_id": [f"q{q:03d}" for q in prompt],
                    "sample_idx": np.tile(np.arange(per_model), num_prompts) + index * per_model,
                    "stratum": np.full(len(k), index),
                    "S0": s0[prompt, k],
                    "S1": s1[prompt, k],
                    "L": length[k],
                    "L_full": completions().length[k],
                    "d": p1.log_p[prompt, k] - p0.log_p[prompt, k],
                    "log_w0": p0.log_p[prompt, k] - log_q[prompt, k],
                    "log_w1": p1.log_p[prompt, k] - log_q[prompt, k],
                }
            )
        )
    return pl.concat(parts).with_columns(log_w=pl.col("log_w1")).sort("prompt_id", "sample_idx")


def total_probability(m: Distribution) -> float:
    """The smallest, over prompts, sum of p over the completions (1 when complete)."""
    return float(min(math.fsum(row) for row in m.p))
