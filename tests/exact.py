"""Exact entropies of the enumerable model pair, by enumeration in float64.

Every completion of at most ``max_tokens`` ids is listed (non-EOS ids then EOS, or
``max_tokens`` non-EOS ids), scored with Hugging Face transformers in float64, and
the quantities the pipeline estimates are computed as exact expectations, pooled over
prompts the way the pipeline pools them (each prompt has the same number of samples).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def completions(vocab_size: int, eos: int, max_tokens: int) -> list[list[int]]:
    """Every possible completion: ids before EOS are any non-EOS id (BOS included)."""
    others = [i for i in range(vocab_size) if i != eos]
    result = []
    for length in range(max_tokens + 1):
        for body in itertools.product(others, repeat=length):
            if length < max_tokens:
                result.append([*body, eos])
            else:
                result.append(list(body))
    return result


def sequence_logprobs(
    model: torch.nn.Module, prompt: list[int], tails: list[list[int]]
) -> list[np.ndarray]:
    """Per-token log-probs (float64) of each completion after ``prompt``.

    All completions go in one batch, right-padded: with causal attention, padding after
    a position cannot change its logits.
    """
    width = len(prompt) + max(len(t) for t in tails)
    ids = torch.tensor([(prompt + tail + [0] * width)[:width] for tail in tails])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits, dim=-1)
    start = len(prompt)
    return [
        np.array(
            [logprobs[row, j - 1, ids[row, j]].item() for j in range(start, start + len(tail))]
        )
        for row, tail in enumerate(tails)
    ]


def exact_quantities(
    p0_path: Path,
    p1_path: Path,
    prompts: list[list[int]],
    eos: int,
    vocab_size: int,
    max_tokens: int,
) -> dict[tuple[str, bool], dict[str, float]]:
    """Exact H0, H1, delta_H, kl, delta_H1 (nats) for each (unit, include_eos).

    Also ``total_probability_p0``: the smallest sum over completions of p0 (must be 1).
    """
    tails = completions(vocab_size, eos, max_tokens)
    p0, p1 = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        for path in (p0_path, p1_path)
    )
    per_prompt = [
        (sequence_logprobs(p0, prompt, tails), sequence_logprobs(p1, prompt, tails))
        for prompt in prompts
    ]
    total_probability = min(sum(math.exp(x.sum()) for x in lp0) for lp0, _ in per_prompt)
    results = {}
    for include_eos in (True, False):
        # Per prompt: expectations under p0 and p1 of the integrand pieces.
        e0_s0, e1_s1, e0_l, e1_l, e1_d, cov_s, cov_l, cov_r = ([] for _ in range(8))
        for lp0, lp1 in per_prompt:
            p0 = np.array([math.exp(x.sum()) for x in lp0])
            p1 = np.array([math.exp(x.sum()) for x in lp1])
            d = np.array([b.sum() - a.sum() for a, b in zip(lp0, lp1, strict=True)])

            def counted(
                x: np.ndarray, tail: list[int], include_eos: bool = include_eos
            ) -> np.ndarray:
                ends_with_eos = tail[-1:] == [eos]
                return x[:-1] if ends_with_eos and not include_eos else x

            s0 = np.array([counted(x, t).sum() for x, t in zip(lp0, tails, strict=True)])
            s1 = np.array([counted(x, t).sum() for x, t in zip(lp1, tails, strict=True)])
            lengths = np.array([len(counted(x, t)) for x, t in zip(lp0, tails, strict=True)], float)
            ratio = s0 / np.maximum(lengths, 1)

            def cov(x: np.ndarray, p0: np.ndarray = p0, d: np.ndarray = d) -> float:
                return float(np.sum(p0 * (x - np.sum(p0 * x)) * (d - np.sum(p0 * d))))

            e0_s0.append(np.sum(p0 * s0))
            e1_s1.append(np.sum(p1 * s1))
            e0_l.append(np.sum(p0 * lengths))
            e1_l.append(np.sum(p1 * lengths))
            e1_d.append(np.sum(p1 * d))
            cov_s.append(cov(s0))
            cov_l.append(cov(lengths))
            cov_r.append(cov(ratio))
        n = len(prompts)
        h0_tok = -sum(e0_s0) / sum(e0_l)
        results[("sequence", include_eos)] = {
            "H0": -sum(e0_s0) / n,
            "H1": -sum(e1_s1) / n,
            "kl": sum(e1_d) / n,
            "delta_H1": -sum(cov_s) / n,
            "delta_H1_length_normalized": -sum(cov_r) / n,
        }
        results[("per_token", include_eos)] = {
            "H0": h0_tok,
            "H1": -sum(e1_s1) / sum(e1_l),
            "kl": sum(e1_d) / sum(e1_l),
            "delta_H1": -(sum(cov_s) + h0_tok * sum(cov_l)) / sum(e0_l),
        }
        for unit in ("sequence", "per_token"):
            exact = results[(unit, include_eos)]
            exact["delta_H"] = exact["H1"] - exact["H0"]
            exact["total_probability_p0"] = total_probability
    return results
