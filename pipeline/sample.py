"""Sample stage: draw G completions per prompt of one shard from the reference model.

Sampling is plain ancestral sampling from the raw model (temperature 1, no
truncation, no penalties; the config refuses anything else), because the importance
weights p1/p0 are computed from raw teacher-forced log-probs. Each prompt's request
carries its own seed (column ``sampling_seed`` of the prompts table: a hash of the run
seed and the prompt id), so any shard re-samples to the same completions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.artifacts import SEQUENCE_SCHEMA, sequence_row
from pipeline.config import SamplingConfig
from pipeline.engine import EngineProfile
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from vllm import LLM


def token_budget_batches(
    prompt_lengths: list[int], num_samples: int, budget: int | None
) -> Iterator[range]:
    """Ranges of consecutive prompts with sum(len(prompt) x G) <= budget each.

    ``budget`` None: one range over every prompt.
    """
    start, used = 0, 0
    for index, length in enumerate(prompt_lengths):
        cost = length * num_samples
        if budget is not None and index > start and used + cost > budget:
            yield range(start, index)
            start, used = index, 0
        used += cost
    if start < len(prompt_lengths):
        yield range(start, len(prompt_lengths))


def sample_shard(
    llm: LLM,
    prompts: pa.Table,
    sampling: SamplingConfig,
    stop_token_ids: frozenset[int],
    profile: EngineProfile,
    first_sample_idx: int,
    seeds: list[int],
) -> pa.Table:
    """Sample ``sampling.num_samples`` completions per prompt (SEQUENCE_SCHEMA rows).

    ``prompts`` is one shard's prompts table (PROMPTS_SCHEMA) and ``seeds`` the request
    seed of each of its prompts. Completion g of a prompt gets ``sample_idx`` =
    ``first_sample_idx`` + g (mixture sampling: m G + g for sampling model m).
    ``token_logprobs`` are vLLM's decode-time log-probs of the sampled tokens; the estimates use
    teacher-forced ones, these only measure the mismatch. ``stop_token_ids`` is every
    id that ends a completion (EOS included), used to check that a completion ended
    by "stop" really ends with one. On CPU the requests go in batches that fit one
    engine step (``profile.max_num_batched_tokens``), on CUDA in one call.
    """
    from vllm import SamplingParams, TokensPrompt

    prompt_ids = prompts.column("prompt_id").to_pylist()
    token_ids = prompts.column("prompt_token_ids").to_pylist()
    budget = None if profile.one_call_per_shard else profile.max_num_batched_tokens
    rows: list[dict[str, Any]] = []
    for batch in token_budget_batches([len(t) for t in token_ids], sampling.num_samples, budget):
        requests = [TokensPrompt(prompt_token_ids=token_ids[i]) for i in batch]
        params = [
            SamplingParams(
                n=sampling.num_samples,
                max_tokens=sampling.max_tokens,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                seed=seeds[i],
                stop_token_ids=sampling.stop_token_ids,
                logprobs=0,
                detokenize=False,
            )
            for i in batch
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        for i, output in zip(batch, outputs, strict=True):
            for completion in output.outputs:
                sampled = list(completion.token_ids)
                if completion.finish_reason == "stop" and sampled[-1] not in stop_token_ids:
                    raise PipelineError(
                        f"prompt {prompt_ids[i]!r}: vLLM reported a stop but the last "
                        f"sampled id {sampled[-1]} is not a stop token id; refusing to "
                        "guess which tokens were sampled."
                    )
                logprobs = [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, sampled, strict=True)
                ]
                rows.append(
                    sequence_row(
                        prompt_ids[i],
                        first_sample_idx + completion.index,
                        sampled,
                        completion.finish_reason,
                        logprobs,
                    )
                )
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
