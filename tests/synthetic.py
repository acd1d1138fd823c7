"""A synthetic run directory (samples and scores, no model) for tests of the stats stage.

Sampling model m of ``sampling`` draws sample_idx m G .. m G + G - 1 of every prompt,
and every sequence is scored under every model, in the run's layout of mixture
sampling.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.artifacts import SEQUENCE_SCHEMA, part_name, samples_dir, scores_dir, write_table

EOS = 2
MAX_TOKENS = 6


def _tables(
    models: list[str], sampling: list[str], prompts: int, per_model: int, seed: int
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Rows of samples and of each model's scores.

    Each model's per-token log-probs are a shared random base plus its own tilt by
    token position and id; a sample's decode-time log-probs are its sampler's scores.
    """
    rng = np.random.default_rng(seed)
    tilt = {m: rng.normal(0, 0.4, (MAX_TOKENS, 5)) for m in models}
    samples, scores = [], {m: [] for m in models}
    for q in range(prompts):
        for m, sampler in enumerate(sampling):
            for g in range(per_model):
                length = int(rng.integers(1, MAX_TOKENS + 1))
                ids = [int(i) for i in rng.integers(3, 5, length)]
                finish = "length"
                if length < MAX_TOKENS:
                    ids[-1], finish = EOS, "stop"
                base = -rng.exponential(1.5, length) - 1e-3
                # Negative, float32 like vLLM's; not a normalised model (the stats
                # need none).
                logprobs = {
                    model: [
                        float(np.float32(min(b + tilt[model][t, i], -1e-3)))
                        for t, (b, i) in enumerate(zip(base, ids, strict=True))
                    ]
                    for model in models
                }
                key = {"prompt_id": f"prompt-{q:02d}", "sample_idx": m * per_model + g}
                for model in models:
                    row = {
                        **key,
                        "completion_token_ids": ids,
                        "finish_reason": finish,
                        "token_logprobs": logprobs[model],
                        "S": math.fsum(logprobs[model]),
                        "L": length,
                    }
                    scores[model].append(row)
                samples.append({**scores[sampler][-1]})
    return samples, scores


def write_run(
    run_dir: Path,
    models: list[str],
    sampling: list[str],
    prompts: int,
    per_model: int,
    seed: int = 11,
    shards: int = 2,
) -> Path:
    """Write the samples and scores (``shards`` shards of whole prompts) of a synthetic run.

    Shard k holds prompts prompts k / shards .. prompts (k + 1) / shards - 1 (rounded
    down). The run's layout: the first sampling model's samples in samples/, a further
    one's in samples/<model>/; each model's score part holds, in order, the shard's rows
    of the first sampling model, then the next one's. The sequences do not depend on
    ``shards``.
    """
    samples, scores = _tables(models, sampling, prompts, per_model, seed)
    bounds = [prompts * k // shards for k in range(1, shards)]
    shard_of = {f"prompt-{q:02d}": sum(q >= b for b in bounds) for q in range(prompts)}
    for index in range(shards):
        stamp = {"content": "synthetic"}
        in_shard = [shard_of[r["prompt_id"]] == index for r in samples]
        ordered = []  # row numbers in the score parts' order
        for m, sampler in enumerate(sampling):
            rows = [
                i
                for i, r in enumerate(samples)
                if in_shard[i] and r["sample_idx"] // per_model == m
            ]
            ordered += rows
            folder = samples_dir(run_dir, None if m == 0 else sampler)
            table = pa.Table.from_pylist([samples[i] for i in rows], schema=SEQUENCE_SCHEMA)
            write_table(table, folder / part_name(index), stamp)
        for model in models:
            rows = [scores[model][i] for i in ordered]
            table = pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
            write_table(table, scores_dir(run_dir, model) / part_name(index), stamp)
    return run_dir
