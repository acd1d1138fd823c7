"""Statistics stage: read a run's Parquet artifacts, write per_prompt.parquet and the summary.

Loads no model, so it re-runs in seconds with other ``entropy.*``, ``weights.*`` and
``uncertainty.*`` options. The paired frame handed to the estimators is built here,
and this is where ``include_eos`` is applied: it changes the integrands S0, S1 and
the length L, never the log-weights, which always compare the full sampled sequences
(EOS included).

Sampling from several models (``sampling.models``): model m (in
``config.sampling_models`` order) draws sample_idx = m G + g, G =
``sampling.num_samples`` (samples/ for the first model, samples/<model>/ for further
ones; ``artifacts.scan_samples`` reads them in the score parts' row order), and every
sequence is scored under every model. The proposal is the equal mixture of the sampling
models, log q_i = logsumexp_m S_m,full,i - log M (the balance heuristic), and the
paired frame carries log w0 = S0_full - log q and log w1 = S1_full - log q. With the
reference alone sampling, log q = S0_full, so log w0 = 0 and log w1 = d exactly.

Public API: ``paired_frame``, ``generation_diagnostics``, ``candidate_summary``,
``compute_summary`` (also writes per_prompt.parquet), ``write_summary``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.artifacts import (
    PER_PROMPT_PARQUET,
    SEQUENCE_SCHEMA,
    SUMMARY,
    SUMMARY_PARQUET,
    scan,
    scan_samples,
    scores_dir,
    write_json,
    write_table,
)
from pipeline.config import STATS_SECTIONS, RunConfig
from pipeline.errors import PipelineError
from pipeline.stats.estimators import (
    PromptSums,
    Sequences,
    check_finite,
    complete_paired,
    point_estimates,
    prepare,
    prompt_sums,
    with_bits,
)
from pipeline.stats.registry import (
    PER_PROMPT_ESTIMATES,
    PER_PROMPT_SCHEMA,
    RUN_KEYS,
    SUMMARY_SCHEMA,
    Unit,
    candidate_keys,
)
from pipeline.stats.uncertainty import (
    INTERVAL_ESTIMATES,
    cluster_bootstrap,
    interval_warnings,
    per_prompt_errors,
    prompt_set_errors,
    wald_intervals,
)
from pipeline.stats.weights import (
    prompt_effective_sample_sizes,
    stabilise_log_weights,
    weight_diagnostics,
    weight_warnings,
)

KEYS = ["prompt_id", "sample_idx"]
# Prompts listed in the summary (and the report) by |delta H| / SE.
TOP_PROMPTS = 5


def _model_scores(run_dir: Path, model: str, tag: str, include_eos: bool) -> pl.LazyFrame:
    """Keys, full-sequence sum and length, and integrand sum and length of one model."""
    ended_by_stop = pl.col("finish_reason") == "stop"
    drop_last = ended_by_stop & (not include_eos)
    last_logprob = pl.col("token_logprobs").list.last().cast(pl.Float64)
    return scan(scores_dir(run_dir, model), SEQUENCE_SCHEMA).select(
        *(pl.col(key).alias(f"{key}_{tag}") for key in KEYS),
        pl.col("S").alias(f"S_full_{tag}"),
        pl.col("L").alias(f"L_full_{tag}"),
        (pl.col("S") - pl.when(drop_last).then(last_logprob).otherwise(0.0)).alias(f"S_{tag}"),
        (pl.col("L") - drop_last.cast(pl.Int32)).alias(f"L_{tag}"),
    )


def paired_frame(
    run_dir: Path,
    reference: str,
    candidate: str,
    include_eos: bool,
    sampling_models: Sequence[str],
    num_samples: int,
) -> pl.DataFrame:
    """One row per sequence, the columns of ``pipeline.stats.estimators`` (and keys).

    The score stage writes each model's shard row for row in the order of the samples
    shard, so the tables are put side by side instead of joined (a join on the string
    keys held ~300 bytes per sequence); the keys are compared row by row, and score
    files that do not cover exactly the sampled sequences, in order, are refused. The
    shard order is fixed, so every sum, and so every figure, is reproducible bit for
    bit. ``stratum`` = sample_idx // ``num_samples`` is the sampling model's index.
    """
    models = list(dict.fromkeys([reference, candidate, *sampling_models]))
    tags = {model: str(i) for i, model in enumerate(models)}
    aligned = pl.lit(True)
    for tag in tags.values():
        for key in KEYS:
            aligned = aligned & (pl.col(key) == pl.col(f"{key}_{tag}"))
    ref, cand = tags[reference], tags[candidate]
    proposal = [pl.col(f"S_full_{tags[m]}") for m in sampling_models]
    top = pl.max_horizontal(proposal)
    # Balance heuristic: log of the equal mixture's density. With one sampling model
    # this is its S_full exactly (top + log 1 - log 1).
    log_q = top + pl.sum_horizontal([(s - top).exp() for s in proposal]).log()
    log_q = log_q - math.log(len(sampling_models))
    sampled = scan_samples(run_dir, list(sampling_models)).select(KEYS)
    frame = (
        pl.concat(
            [sampled, *(_model_scores(run_dir, m, tag, include_eos) for m, tag in tags.items())],
            how="horizontal",
        )
        .select(
            *KEYS,
            aligned=aligned.fill_null(False),
            stratum=(pl.col("sample_idx") // num_samples).cast(pl.Int64),
            S0=f"S_{ref}",
            S1=f"S_{cand}",
            L=f"L_{ref}",
            L_full=f"L_full_{ref}",
            d=pl.col(f"S_full_{cand}") - pl.col(f"S_full_{ref}"),
            log_w0=pl.col(f"S_full_{ref}") - log_q,
            log_w1=pl.col(f"S_full_{cand}") - log_q,
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
            f"order, under one of {models} (first: prompt {first['prompt_id']!r}, "
            f"sample {first['sample_idx']}); the score stage did not finish for this "
            "run. Re-run `entropy-pipeline run --out` on it."
        )
    return frame.drop("aligned")


def generation_diagnostics(
    run_dir: Path, sampling_models: Sequence[str], num_samples: int
) -> dict[str, Any]:
    """Length and stop statistics of the samples, and the decode-vs-prefill mismatch.

    ``max_abs_decode_vs_prefill_logprob_diff`` is the largest |decode-time log-prob -
    teacher-forced log-prob under the model that sampled the token|, in nats.
    """
    samples = scan_samples(run_dir, list(sampling_models))
    prefills = [
        scan(scores_dir(run_dir, model), SEQUENCE_SCHEMA).select(
            pl.col("token_logprobs").alias(f"prefill_{m}")
        )
        for m, model in enumerate(sampling_models)
    ]
    model = pl.col("sample_idx") // num_samples
    prefill = pl.col("prefill_0")
    for m in range(1, len(sampling_models)):
        prefill = pl.when(model == m).then(pl.col(f"prefill_{m}")).otherwise(prefill)
    # Row for row, as in paired_frame (which checks that the keys line up).
    per_token = pl.concat(
        [samples.select("sample_idx", pl.col("token_logprobs").alias("decode")), *prefills],
        how="horizontal",
    ).select(
        (pl.col("decode") - prefill)
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


def _interval_keys(intervals: dict[str, dict[str, float]]) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, parts in intervals.items():
        for part, value in parts.items():
            row.update(with_bits({name: value}, f"_{part}"))
    return row


def per_prompt_table(seqs: Sequences, sums: PromptSums, unit: Unit, candidate: str) -> pa.Table:
    """Per-prompt estimates with standard errors, and raw-weight ESS (PER_PROMPT_SCHEMA)."""
    errors = per_prompt_errors(seqs, sums, unit, PER_PROMPT_ESTIMATES)
    ess = prompt_effective_sample_sizes(seqs, seqs.log_w1)
    columns: dict[str, Any] = {
        "candidate": pa.array([candidate] * seqs.num_prompts, pa.string()),
        "prompt_id": seqs.prompt_ids.to_arrow().cast(pa.string()),
        "num_sequences": pa.array(seqs.prompt_size, pa.int64()),
    }
    for name, (values, se) in errors.items():
        # from_pandas: NaN (undefined, e.g. one sequence per prompt) becomes null.
        columns[f"{name}_nats"] = pa.array(values, pa.float64(), from_pandas=True)
        columns[f"{name}_se_nats"] = pa.array(se, pa.float64(), from_pandas=True)
    columns["ess"] = pa.array(ess, pa.float64())
    columns["ess_fraction"] = pa.array(ess / seqs.prompt_size, pa.float64())
    return pa.Table.from_pydict(columns, schema=PER_PROMPT_SCHEMA)


def largest_changes(table: pa.Table, count: int = TOP_PROMPTS) -> list[dict[str, Any]]:
    """The ``count`` prompts with the largest |delta H| / SE (finite ratios only)."""
    frame = (
        pl.from_arrow(table)
        .select(
            "prompt_id",
            "delta_H_nats",
            "delta_H_se_nats",
            z=pl.col("delta_H_nats") / pl.col("delta_H_se_nats"),
        )
        .filter(pl.col("z").is_finite())
    )
    return frame.sort(pl.col("z").abs(), descending=True).head(count).to_dicts()


def candidate_summary(
    paired: pl.DataFrame, config: RunConfig, reference: str, candidate: str
) -> tuple[dict[str, Any], pa.Table]:
    """Estimates, intervals, diagnostics and warnings of one candidate; its per-prompt table.

    The keys are ``registry.candidate_keys()``, in that order.
    """
    entropy, weights, uncertainty = config.entropy, config.weights, config.uncertainty
    paired = complete_paired(paired)
    check_finite(paired)
    stabilised = stabilise_log_weights(
        paired["log_w1"].to_numpy(), weights.mode, weights.clip_threshold
    )
    seqs = prepare(paired.with_columns(log_w=pl.Series(stabilised.log_w)))
    del paired  # the arrays in seqs are all that is needed from here on
    sums = prompt_sums(seqs)
    values = point_estimates(sums, entropy.unit)
    if uncertainty.estimand == "prompt_set":
        errors = prompt_set_errors(seqs, sums, entropy.unit)
        intervals = wald_intervals(values, errors, uncertainty.level)
    elif seqs.num_prompts >= 2:
        intervals = cluster_bootstrap(
            sums, entropy.unit, uncertainty.replicates, uncertainty.seed, uncertainty.level
        )
    else:
        nothing = {"se": math.nan, "low": math.nan, "high": math.nan}
        intervals = {e.name: nothing for e in INTERVAL_ESTIMATES}
    row: dict[str, Any] = {
        **with_bits(values),
        **_interval_keys(intervals),
        **stabilised.diagnostics,
        **weight_diagnostics(seqs),
    }
    table = per_prompt_table(seqs, sums, entropy.unit, candidate)
    row["prompts_largest_delta_H"] = largest_changes(table)
    row["warnings"] = [
        *stabilised.warnings,
        *weight_warnings(row, weights.min_ess_fraction, reference, candidate),
        *interval_warnings(seqs, uncertainty.estimand),
    ]
    return {key: row[key] for key in candidate_keys()}, table


def uncertainty_method(config: RunConfig) -> str:
    """How the intervals were computed, in words (recorded in the summary)."""
    u = config.uncertainty
    if u.estimand == "prompt_set":
        return (
            "prompt_set: value for this prompt set; linearised (influence-function) "
            "variance from within-prompt deviations, jackknife for covariances, Wald "
            f"intervals at level {u.level}"
        )
    return (
        f"population: value for the population of prompts; cluster bootstrap over "
        f"prompts, {u.replicates} replicates, seed {u.seed}, percentile intervals at "
        f"level {u.level}"
    )


def compute_summary(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """The summary of a run under ``config``'s statistics options.

    Also writes ``per_prompt.parquet`` (every candidate's per-prompt estimates) into
    ``run_dir``, atomically.
    """
    reference, entropy = config.reference_model, config.entropy
    sampling, num_samples = config.sampling_models, config.sampling.num_samples
    candidates, tables = {}, []
    for name in config.candidates:
        try:
            # The frame is handed over, not kept here: candidate_summary frees it once
            # it has the arrays it needs.
            candidates[name], table = candidate_summary(
                paired_frame(run_dir, reference, name, entropy.include_eos, sampling, num_samples),
                config,
                reference,
                name,
            )
        except PipelineError as err:
            raise PipelineError(f"candidate {name!r}: {err}") from None
        tables.append(table)
    write_table(
        pa.concat_tables(tables),
        run_dir / PER_PROMPT_PARQUET,
        {"content": "per_prompt", "unit": entropy.unit, "include_eos": str(entropy.include_eos)},
    )
    first = config.candidates[0]
    return {
        "unit": entropy.unit,
        "include_eos": entropy.include_eos,
        "reference_model": reference,
        "sampling_models": list(sampling),
        **generation_diagnostics(run_dir, sampling, num_samples),
        "uncertainty_estimand": config.uncertainty.estimand,
        "uncertainty_method": uncertainty_method(config),
        "statistics_options": {
            section: getattr(config, section).model_dump(mode="json") for section in STATS_SECTIONS
        },
        "candidate": first,
        **candidates[first],
        "warnings": [f"{name}: {w}" for name, c in candidates.items() for w in c["warnings"]],
        "candidates": candidates,
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. dH1 of a run with one sample per prompt) become null."""
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` and ``summary.parquet`` atomically into ``run_dir``.

    The Parquet file has one row per candidate (SUMMARY_SCHEMA: the run's keys, the
    candidate's estimates, intervals and diagnostics), so a folder of runs laid out by
    date is one ``pl.scan_parquet("**/summary.parquet", hive_partitioning=True)`` away
    from a history table. Non-finite numbers are written as null.
    """
    summary = _json_safe(summary)
    write_json(summary, run_dir / SUMMARY)
    columns = set(SUMMARY_SCHEMA.names)
    run = {k.name: summary.get(k.name) for k in RUN_KEYS if k.name in columns}
    rows = [
        {
            "candidate": name,
            **run,
            **{k: v for k, v in estimates.items() if k in columns},
            "num_warnings": len(estimates["warnings"]),
        }
        for name, estimates in summary["candidates"].items()
    ]
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    write_table(table, run_dir / SUMMARY_PARQUET, {"content": "summary"})
    return run_dir / SUMMARY
