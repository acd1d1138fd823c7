"""Statistics stage: read a run's Parquet artifacts and write ``summary.json``.

Loads no model, so it re-runs in seconds with other ``entropy.*`` options. The paired
frame handed to the estimators is built here, and this is where ``include_eos`` is
applied: it changes the integrands S0, S1 and the length L, never the log-weight,
which always compares the full sampled sequences (EOS included).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.artifacts import (
    SEQUENCE_SCHEMA,
    SUMMARY,
    samples_dir,
    scan,
    scores_dir,
    write_json,
)
from pipeline.config import EntropyConfig, RunConfig
from pipeline.errors import PipelineError
from pipeline.stats.estimators import entropy_estimates

KEYS = ["prompt_id", "sample_idx"]


def _model_scores(run_dir: Path, model: str, tag: str, include_eos: bool) -> pl.LazyFrame:
    """Full-sequence sum, and integrand sum and length, of one model's scores."""
    ended_by_stop = pl.col("finish_reason") == "stop"
    drop_last = ended_by_stop & (not include_eos)
    last_logprob = pl.col("token_logprobs").list.last().cast(pl.Float64)
    return scan(scores_dir(run_dir, model), SEQUENCE_SCHEMA).select(
        *KEYS,
        pl.col("S").alias(f"S{tag}_full"),
        (pl.col("S") - pl.when(drop_last).then(last_logprob).otherwise(0.0)).alias(f"S{tag}"),
        (pl.col("L") - drop_last.cast(pl.Int32)).alias(f"L{tag}"),
    )


def paired_frame(run_dir: Path, reference: str, candidate: str, include_eos: bool) -> pl.DataFrame:
    """One row per sequence: ``log_w``, ``S0``, ``S1``, ``L`` (see estimators).

    Refuses score files that do not cover exactly the sampled sequences.
    """
    sampled = scan(samples_dir(run_dir), SEQUENCE_SCHEMA).select(KEYS)
    frame = (
        sampled.join(_model_scores(run_dir, reference, "0", include_eos), on=KEYS, how="left")
        .join(_model_scores(run_dir, candidate, "1", include_eos), on=KEYS, how="left")
        .select(
            *KEYS,
            log_w=pl.col("S1_full") - pl.col("S0_full"),
            S0="S0",
            S1="S1",
            L="L0",
        )
        .collect()
    )
    missing = frame.filter(pl.col("log_w").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise PipelineError(
            f"{missing.height} sampled sequence(s) have no score under {reference!r} or "
            f"{candidate!r} (first: prompt {first['prompt_id']!r}, sample "
            f"{first['sample_idx']}); the score stage did not finish for this run."
        )
    return frame


def generation_diagnostics(run_dir: Path, reference: str) -> dict[str, Any]:
    """Length and stop statistics of the samples, and the decode-vs-prefill mismatch.

    ``max_abs_decode_vs_prefill_logprob_diff`` is the largest |decode-time log-prob -
    teacher-forced p0 log-prob| over all sampled tokens, in nats.
    """
    samples = scan(samples_dir(run_dir), SEQUENCE_SCHEMA)
    prefill = scan(scores_dir(run_dir, reference), SEQUENCE_SCHEMA).select(
        *KEYS, pl.col("token_logprobs").alias("prefill")
    )
    per_token = (
        samples.select(*KEYS, pl.col("token_logprobs").alias("decode"))
        .join(prefill, on=KEYS)
        .explode(["decode", "prefill"])
        .select(((pl.col("decode") - pl.col("prefill")).abs().max()).cast(pl.Float64).alias("diff"))
    )
    row = (
        samples.select(
            num_prompts=pl.col("prompt_id").n_unique(),
            num_sequences=pl.len(),
            avg_gen_length=pl.col("L").mean(),
            fraction_ended_by_eos=(pl.col("finish_reason") == "stop").mean(),
            fraction_ended_by_length=(pl.col("finish_reason") == "length").mean(),
        )
        .collect()
        .row(0, named=True)
    )
    row["max_abs_decode_vs_prefill_logprob_diff"] = per_token.collect().item()
    return row


def compute_summary(run_dir: Path, config: RunConfig, entropy: EntropyConfig) -> dict[str, Any]:
    """The summary of a run under the ``entropy`` options (which may differ from the run's)."""
    reference = config.reference_model
    candidates = {
        name: entropy_estimates(
            paired_frame(run_dir, reference, name, entropy.include_eos), entropy.unit
        )
        for name in config.candidates
    }
    first = config.candidates[0]
    diagnostics = generation_diagnostics(run_dir, reference)
    estimates = {k: v for k, v in candidates[first].items() if k not in diagnostics}
    return {
        "unit": entropy.unit,
        "include_eos": entropy.include_eos,
        "reference_model": reference,
        "candidate": first,
        **diagnostics,
        **estimates,
        "candidates": candidates,
        "entropy_options": entropy.model_dump(mode="json"),
        "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically into ``run_dir``."""
    path = run_dir / SUMMARY
    write_json(summary, path)
    return path
