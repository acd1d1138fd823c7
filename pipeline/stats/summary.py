"""Statistics stage: read a run's Parquet artifacts and write ``summary.json``.

Loads no model, so it re-runs in seconds with other ``entropy.*`` options. The paired
frame handed to the estimators is built here, and this is where ``include_eos`` is
applied: it changes the integrands S0, S1 and the length L, never the log-weight,
which always compares the full sampled sequences (EOS included).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.artifacts import (
    SEQUENCE_SCHEMA,
    SUMMARY,
    SUMMARY_PARQUET,
    SUMMARY_SCHEMA,
    samples_dir,
    scan,
    scores_dir,
    write_json,
    write_table,
)
from pipeline.config import STATS_SECTIONS, RunConfig
from pipeline.errors import PipelineError
from pipeline.stats.estimators import NATS_PER_BIT, entropy_estimates, prompt_sums
from pipeline.stats.uncertainty import cluster_bootstrap
from pipeline.stats.weights import stabilise_log_weights

KEYS = ["prompt_id", "sample_idx"]


def _model_scores(run_dir: Path, model: str, tag: str, include_eos: bool) -> pl.LazyFrame:
    """Keys, full-sequence sum, and integrand sum and length of one model's scores."""
    ended_by_stop = pl.col("finish_reason") == "stop"
    drop_last = ended_by_stop & (not include_eos)
    last_logprob = pl.col("token_logprobs").list.last().cast(pl.Float64)
    return scan(scores_dir(run_dir, model), SEQUENCE_SCHEMA).select(
        *(pl.col(key).alias(f"{key}{tag}") for key in KEYS),
        pl.col("S").alias(f"S{tag}_full"),
        (pl.col("S") - pl.when(drop_last).then(last_logprob).otherwise(0.0)).alias(f"S{tag}"),
        (pl.col("L") - drop_last.cast(pl.Int32)).alias(f"L{tag}"),
    )


def paired_frame(run_dir: Path, reference: str, candidate: str, include_eos: bool) -> pl.DataFrame:
    """One row per sequence: ``log_w_raw``, ``S0``, ``S1``, ``L`` (see estimators).

    The score stage writes each model's shard row for row in the order of the samples
    shard, so the three tables are put side by side instead of joined (a join on the
    string keys held ~300 bytes per sequence); the keys are compared row by row, and
    score files that do not cover exactly the sampled sequences, in order, are refused.
    The shard order is fixed, so every sum, and so every figure, is reproducible bit
    for bit.
    """
    sampled = scan(samples_dir(run_dir), SEQUENCE_SCHEMA).select(KEYS)
    aligned = pl.lit(True)
    for tag in ("0", "1"):
        for key in KEYS:
            aligned = aligned & (pl.col(key) == pl.col(f"{key}{tag}"))
    frame = (
        pl.concat(
            [
                sampled,
                _model_scores(run_dir, reference, "0", include_eos),
                _model_scores(run_dir, candidate, "1", include_eos),
            ],
            how="horizontal",
        )
        .select(
            *KEYS,
            aligned=aligned.fill_null(False),
            log_w_raw=pl.col("S1_full") - pl.col("S0_full"),
            S0="S0",
            S1="S1",
            L="L0",
        )
        # Streaming: the list columns are read in batches and reduced to scalars, so
        # the per-token log-probs are never all in memory.
        .collect(engine="streaming")
    )
    misaligned = frame.filter(~pl.col("aligned"))
    if misaligned.height:
        first = misaligned.row(0, named=True)
        raise PipelineError(
            f"{misaligned.height} sampled sequence(s) have no score, or a score out of "
            f"order, under {reference!r} or {candidate!r} (first: prompt "
            f"{first['prompt_id']!r}, sample {first['sample_idx']}); the score stage did "
            "not finish for this run. Re-run `entropy-pipeline run --out` on it."
        )
    return frame.drop("aligned")


def generation_diagnostics(run_dir: Path, reference: str) -> dict[str, Any]:
    """Length and stop statistics of the samples, and the decode-vs-prefill mismatch.

    ``max_abs_decode_vs_prefill_logprob_diff`` is the largest |decode-time log-prob -
    teacher-forced p0 log-prob| over all sampled tokens, in nats.
    """
    samples = scan(samples_dir(run_dir), SEQUENCE_SCHEMA)
    prefill = scan(scores_dir(run_dir, reference), SEQUENCE_SCHEMA).select(
        pl.col("token_logprobs").alias("prefill")
    )
    # Row for row, as in paired_frame (which checks that the keys line up).
    per_token = pl.concat(
        [samples.select(pl.col("token_logprobs").alias("decode")), prefill],
        how="horizontal",
    ).select(
        (pl.col("decode") - pl.col("prefill"))
        .list.eval(pl.element().abs())
        .list.max()
        .max()
        .cast(pl.Float64)
        .alias("diff")
    )
    row = (
        samples.select(
            num_prompts=pl.col("prompt_id").n_unique(),
            num_sequences=pl.len(),
            avg_gen_length=pl.col("L").mean(),
            fraction_ended_by_eos=(pl.col("finish_reason") == "stop").mean(),
            fraction_ended_by_length=(pl.col("finish_reason") == "length").mean(),
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    row["max_abs_decode_vs_prefill_logprob_diff"] = per_token.collect(engine="streaming").item()
    return row


def candidate_summary(paired: pl.DataFrame, config: RunConfig) -> dict[str, Any]:
    """Estimates, intervals, weight diagnostics and warnings of one candidate."""
    entropy, weights, uncertainty = config.entropy, config.weights, config.uncertainty
    log_w, weight_diagnostics = stabilise_log_weights(
        paired["log_w_raw"].to_numpy(), weights.mode, weights.clip_threshold
    )
    paired = paired.with_columns(log_w=pl.Series(log_w))
    sums = prompt_sums(paired)
    row = entropy_estimates(paired, entropy.unit, entropy.length_normalize_deltah1, sums)
    row.update(weight_diagnostics)
    intervals = cluster_bootstrap(
        sums,
        entropy.unit,
        entropy.length_normalize_deltah1,
        uncertainty.replicates,
        uncertainty.seed,
        uncertainty.level,
    )
    for name, interval in intervals.items():
        for part, value in interval.items():
            row[f"{name}_{part}_nats"] = value
            row[f"{name}_{part}_bits"] = value / NATS_PER_BIT
    row["warnings"] = weight_warnings(row, weights.min_ess_fraction)
    return row


def weight_warnings(row: dict[str, Any], min_ess_fraction: float) -> list[str]:
    """Plain-language warnings when the importance weights cannot be trusted."""
    advice = (
        "take fewer update steps between p0 and p1, sample more completions, or sample "
        "from p1 instead"
    )
    warnings = []
    if row["ess_fraction"] < min_ess_fraction:
        warnings.append(
            f"ESS fraction {row['ess_fraction']:.3f} is below {min_ess_fraction}: H(p1) "
            f"rests on about {row['ess']:.0f} effective samples; {advice}."
        )
    if row.get("pareto_k_exceeded"):
        warnings.append(
            f"Pareto k-hat {row['pareto_k']:.2f} exceeds {row['pareto_k_threshold']:.2f}: "
            f"the weights are too heavy-tailed for a reliable estimate; {advice}."
        )
    return warnings


def compute_summary(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """The summary of a run under ``config``'s statistics options."""
    reference, entropy = config.reference_model, config.entropy
    candidates = {
        name: candidate_summary(paired_frame(run_dir, reference, name, entropy.include_eos), config)
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
        "warnings": [f"{name}: {w}" for name, c in candidates.items() for w in c["warnings"]],
        "candidates": candidates,
        "statistics_options": {
            section: getattr(config, section).model_dump(mode="json") for section in STATS_SECTIONS
        },
        "uncertainty_method": (
            f"{config.uncertainty.method} over prompts, {config.uncertainty.replicates} "
            f"replicates, seed {config.uncertainty.seed}, percentile intervals at "
            f"level {config.uncertainty.level}"
        ),
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. dH1 of a run with one sample per prompt) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# Columns of summary.parquet besides the per-candidate estimates.
RUN_COLUMNS = (
    "run_started_at",
    "config_hash",
    "reference_model",
    "unit",
    "include_eos",
    "num_prompts",
    "num_sequences",
)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` and ``summary.parquet`` atomically into ``run_dir``.

    The Parquet file has one row per candidate (its estimates, intervals and weight
    diagnostics, with the run's identity), so a folder of runs laid out by date is
    one ``pl.scan_parquet("**/summary.parquet", hive_partitioning=True)`` away from a
    history table. Non-finite numbers are written as null.
    """
    summary = _json_safe(summary)
    write_json(summary, run_dir / SUMMARY)
    rows = [
        {
            "candidate": name,
            **{k: summary.get(k) for k in RUN_COLUMNS},
            **{k: v for k, v in estimates.items() if k != "warnings"},
            "num_warnings": len(estimates["warnings"]),
        }
        for name, estimates in summary["candidates"].items()
    ]
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    write_table(table, run_dir / SUMMARY_PARQUET, {"content": "summary"})
    return run_dir / SUMMARY
